import AsyncHTTPClient
import ConcordClient
import ConcordCore
import ConcordSQLite
import ConcordServer
import Foundation
import GRDB
import NIOCore
import Testing

/// What an operator sees and relies on: metrics, readiness, the dashboard in a real browser,
/// TLS, limits against stuck or greedy clients, and a clean stop on SIGTERM.
@Suite(.serialized, .timeLimit(.minutes(4)))
struct OperationsTests {
    static func fetch(_ http: HTTPClient, _ url: String, token: String? = nil) async throws -> (
        status: UInt, body: String
    ) {
        var request = HTTPClientRequest(url: url)
        if let token { request.headers.add(name: "authorization", value: "Bearer \(token)") }
        let response = try await http.execute(request, timeout: .seconds(10))
        let body = try await response.body.collect(upTo: 8 << 20)
        return (response.status.code, String(buffer: body))
    }

    static func metrics(_ http: HTTPClient, _ url: String) async throws -> [String: Double] {
        parseMetrics(try await fetch(http, url + "/metrics").body)
    }

    /// A port nothing listens on now (the kernel's next free one).
    static func freePort() throws -> Int {
        let probe = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(probe) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(probe, $0, length) == 0 && getsockname(probe, $0, &length) == 0
            }
        }
        guard bound else { throw POSIXError(.EADDRINUSE) }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    @Test func metricsDashboardAndReadinessFollowEverySubscriber() async throws {
        let folder = Harness.folder()
        let (server, port) = try await ConcordProcess.serve(db: folder.appendingPathComponent("source.sqlite").path)
        let base = "http://127.0.0.1:\(port)"
        let http = SourceClient.makeHTTPClient()
        defer { _ = http.shutdown() as EventLoopFuture<Void> }  // on every path, or deinit traps
        let source = SourceClient(baseURL: base, http: http)
        for batch in 0..<20 {
            try await source.write(
                (0..<10).map { .upsert("customers", "c\(batch * 10 + $0)", json: "{\"n\":\(batch * 10 + $0)}") })
        }
        let billingDB = folder.appendingPathComponent("billing.sqlite").path
        let billingMetrics = try Self.freePort()
        let billing = try ConcordProcess([
            "follow", "--source", base, "--db", billingDB, "--name", "billing", "--metrics-port",
            String(billingMetrics), "--scrub-interval-seconds", "1", "--quiet",
        ])
        let shipping = try ConcordProcess([
            "follow", "--source", base, "--db", folder.appendingPathComponent("shipping.sqlite").path, "--name",
            "shipping", "--quiet",
        ])
        var head = try await source.feed().head
        try await Harness.waitUntil("both subscribers report verified at the head", timeout: .seconds(60)) {
            let values = try await Self.metrics(http, base)
            return ["billing", "shipping"].allSatisfy {
                values["concord_subscriber_verified_lsn{subscriber=\"\($0)\"}"] == Double(head)
            }
        }
        var publisher = try await Self.metrics(http, base)
        #expect(publisher["concord_publisher_head_lsn"] == Double(head))
        #expect(publisher["concord_publisher_subscribers"] == 2)
        #expect(publisher["concord_publisher_open_streams"] == 2)
        #expect(publisher["concord_subscriber_lag_changes{subscriber=\"billing\"}"] == 0)
        #expect(publisher["concord_publisher_changes_written_total"] == Double(head))
        #expect(publisher["concord_publisher_errors_total{code=\"unauthorized\"}"] == nil)
        #expect(try await Self.fetch(http, base + "/readyz").status == 200)

        // The follower's own metrics and readiness.
        let followerURL = "http://127.0.0.1:\(billingMetrics)"
        try await Harness.waitUntil("the follower's metrics answer", timeout: .seconds(20)) {
            (try? await Self.fetch(http, followerURL + "/readyz"))?.status == 200
        }
        var follower = try await Self.metrics(http, followerURL)
        #expect(follower["concord_replica_position_lsn"] == Double(head))
        #expect(follower["concord_replica_lag_changes"] == 0)
        #expect((follower["concord_replica_verifications_total"] ?? 0) >= 1)
        #expect((follower["concord_replica_bytes_received_total"] ?? 0) > 0)

        // Live changes: the publisher's counters move, and the subscribers catch up.
        for batch in 0..<5 { try await source.write([.upsert("orders", "o\(batch)", json: "{\"total\":\(batch)}")]) }
        head = try await source.feed().head
        try await Harness.waitUntil("both subscribers reach the new head", timeout: .seconds(30)) {
            let values = try await Self.metrics(http, base)
            return ["billing", "shipping"].allSatisfy {
                values["concord_subscriber_position_lsn{subscriber=\"\($0)\"}"] == Double(head)
            }
        }
        publisher = try await Self.metrics(http, base)
        #expect(
            (publisher["concord_publisher_changes_served_total"] ?? 0) >= 10, "5 changes to each streaming subscriber")

        // Rows edited behind Concord's back in billing's file: its scrub finds them, the repair
        // shows on the follower's metrics and, through its report, on the publisher's.
        let queue = try DatabaseQueue(path: billingDB)
        try await queue.write { db in
            try db.execute(sql: #"UPDATE customers SET value = '{"n":-1}' WHERE key IN ('c1', 'c2')"#)
            try db.execute(sql: "DELETE FROM customers WHERE key = 'c3'")
        }
        try queue.close()
        try await Harness.waitUntil("the publisher shows billing's repair", timeout: .seconds(60)) {
            let values = try await Self.metrics(http, base)
            return (values["concord_subscriber_repairs{subscriber=\"billing\"}"] ?? 0) >= 1
                && values["concord_subscriber_verified_lsn{subscriber=\"billing\"}"] == Double(head)
        }
        follower = try await Self.metrics(http, followerURL)
        #expect((follower["concord_replica_repairs_total"] ?? 0) >= 1)
        #expect((follower["concord_replica_records_repaired_total"] ?? 0) >= 3)
        #expect((follower["concord_replica_differences_found_total"] ?? 0) >= 1)

        // The dashboard, as a browser renders it.
        let html = try await Self.fetch(http, base + "/")
        #expect(html.status == 200)
        #expect(html.body.contains("data-subscriber=\"billing\"") && html.body.contains("data-subscriber=\"shipping\""))
        let chromium = try Chromium.find()
        let dom = try await chromium.dumpDOM(url: base + "/")
        #expect(dom.contains("<b id=\"head\">\(head)</b>"), "the head as the browser shows it")
        #expect(dom.contains("<td>billing</td>") && dom.contains("<td>shipping</td>"))
        #expect(dom.contains("http-equiv=\"refresh\""), "the page reloads itself")
        let shot = folder.appendingPathComponent("dashboard.png").path
        try await chromium.screenshot(url: base + "/", to: shot)
        let png = try Data(contentsOf: URL(fileURLWithPath: shot))
        #expect(png.starts(with: [0x89, 0x50, 0x4E, 0x47]) && png.count > 10_000, "a real screenshot: \(png.count) B")
        if let keep = ProcessInfo.processInfo.environment["CONCORD_DASHBOARD_SCREENSHOT"] {
            try? FileManager.default.removeItem(atPath: keep)
            try FileManager.default.copyItem(atPath: shot, toPath: keep)
        }

        // SIGTERM stops a follower cleanly: exit 0, its stream closed.
        #expect(await shipping.terminate() == 0)
        try await Harness.waitUntil("shipping's stream is closed", timeout: .seconds(20)) {
            try await Self.metrics(http, base)["concord_subscriber_open_streams{subscriber=\"shipping\"}"] == 0
        }
        #expect(await billing.terminate() == 0)
        #expect(await server.terminate() == 0)
    }

    @Test func tlsServesHTTPSAndTheClientTrustsAPrivateCA() async throws {
        let folder = Harness.folder()
        let pki = try TestPKI(in: folder)
        let (server, port) = try await ConcordProcess.serve(
            db: folder.appendingPathComponent("source.sqlite").path,
            extra: ["--tls-cert", pki.serverCertificate, "--tls-key", pki.serverKey])
        let base = "https://127.0.0.1:\(port)"
        let trusting = try SourceClient.makeHTTPClient(trustedCertificates: pki.caCertificate)
        let source = SourceClient(baseURL: base, http: trusting)
        for index in 0..<30 { try await source.write([.upsert("items", "k\(index)", json: "{\"i\":\(index)}")]) }
        let head = try await source.feed().head

        // The system's trust store does not know the private CA: refused.
        let untrusting = SourceClient.makeHTTPClient()
        await #expect(throws: ConcordError.self) { try await SourceClient(baseURL: base, http: untrusting).feed() }
        // Plain HTTP to the TLS port gets nothing.
        await #expect(throws: ConcordError.self) {
            try await SourceClient(baseURL: "http://127.0.0.1:\(port)", http: untrusting).feed()
        }
        try await untrusting.shutdown()

        // `follow --ca-file` keeps a verified replica over HTTPS.
        let replicaPath = folder.appendingPathComponent("replica.sqlite").path
        let follower = try ConcordProcess([
            "follow", "--source", base, "--db", replicaPath, "--ca-file", pki.caCertificate, "--quiet",
        ])
        let replica = try ReplicaStore(path: replicaPath)
        try await Harness.waitUntil("the replica is verified at the head over HTTPS", timeout: .seconds(60)) {
            guard let state = try replica.state() else { return false }
            return state.position == head && state.verifiedLSN == head
        }
        #expect(try replica.records(of: "items").count == 30)
        #expect(await follower.terminate() == 0)

        // `status` without the CA fails with a certificate error, and exits 1.
        let output = folder.appendingPathComponent("status.out")
        _ = FileManager.default.createFile(atPath: output.path, contents: nil)
        let status = try ConcordProcess(
            ["status", "--source", base], output: FileHandle(forWritingAtPath: output.path))
        #expect(try await status.exitStatus(timeout: .seconds(30)) == 1)
        // A missing CA file is a usage error.
        let missing = try ConcordProcess([
            "status", "--source", base, "--ca-file", folder.appendingPathComponent("nope.pem").path,
        ])
        #expect(try await missing.exitStatus(timeout: .seconds(30)) != 0)
        // A key that does not exist stops serve at start with exit 2.
        let broken = try ConcordProcess([
            "serve", "--db", folder.appendingPathComponent("other.sqlite").path, "--port", "0", "--tls-cert",
            pki.serverCertificate, "--tls-key", folder.appendingPathComponent("missing.key").path,
        ])
        #expect(try await broken.exitStatus(timeout: .seconds(30)) == 2)
        #expect(await server.terminate() == 0)
        try await trusting.shutdown()
    }

    @Test func streamLimitsStalledReadersAndSlowBodies() async throws {
        let folder = Harness.folder()
        let store = try PublisherStore(path: folder.appendingPathComponent("source.sqlite").path)
        // Values of 8 KB, so a stalled reader's socket fills quickly.
        let pad = String(repeating: "x", count: 8000)
        for batch in 0..<40 {
            try await store.write((0..<50).map { .upsert("items", "k\(batch)-\($0)", json: "{\"pad\":\"\(pad)\"}") })
        }
        var configuration = PublisherServer.Configuration.testing
        configuration.maxStreamsPerToken = 2
        configuration.stalledClientTimeout = .seconds(1)
        configuration.requestBodyTimeout = .seconds(1)
        configuration.access = AccessGate(
            try AccessPolicy.parse(
                "a read * stream-limit-secret-aaaa\nb read * stream-limit-secret-bbbb\nops admin * stream-limit-admin-secret",
                origin: "test"))
        let http = SourceClient.makeHTTPClient()
        defer { _ = http.shutdown() as EventLoopFuture<Void> }
        try await PublisherServer.withRunningServer(store: store, configuration: configuration, logger: Harness.logger)
        {
            url in
            let port = Int(url.split(separator: ":").last!)!
            func openStream(_ secret: String) throws -> RawConnection {
                let connection = try RawConnection(port: port)
                connection.send(
                    "GET /v1/changes/stream?after=0 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \(secret)\r\n\r\n")
                return connection
            }
            // Two streams for token a, never read; the third is refused with 429.
            let first = try openStream("stream-limit-secret-aaaa")
            let second = try openStream("stream-limit-secret-aaaa")
            try await Task.sleep(for: .milliseconds(300))
            var refused = HTTPClientRequest(url: url + "/v1/changes/stream?after=0")
            refused.headers.add(name: "authorization", value: "Bearer stream-limit-secret-aaaa")
            let third = try await http.execute(refused, timeout: .seconds(10))
            #expect(third.status == .tooManyRequests)
            let body = String(buffer: try await third.body.collect(upTo: 4096))
            #expect(body.contains("too_many_requests"), "\(body)")
            // Another token is not held back by a's streams.
            var other = HTTPClientRequest(url: url + "/v1/changes?after=0&limit=1")
            other.headers.add(name: "authorization", value: "Bearer stream-limit-secret-bbbb")
            #expect(try await http.execute(other, timeout: .seconds(10)).status == .ok)

            // The two readers never read: once their sockets are full for a second, the
            // publisher drops them, and their slots are free again.
            try await Harness.waitUntil("the stalled readers are disconnected", timeout: .seconds(20)) {
                let metrics = try await Self.fetch(http, url + "/metrics", token: "stream-limit-admin-secret")
                return parseMetrics(metrics.body)["concord_publisher_open_streams"] == 0
            }
            let bothClosed = await Harness.onOwnThread { first.peerClosed && second.peerClosed }
            #expect(bothClosed, "the publisher closed both connections")
            try await Harness.waitUntil("a's slots are free again", timeout: .seconds(10)) {
                var again = HTTPClientRequest(url: url + "/v1/changes/stream?after=\(store.head)")
                again.headers.add(name: "authorization", value: "Bearer stream-limit-secret-aaaa")
                return try await http.execute(again, timeout: .seconds(10)).status == .ok
            }

            // A body that trickles in is cut off by the body timeout (1 s) with 408 `timeout`. The
            // client never sends the rest, and the only other limit, the idle timeout, is 75 s: an
            // answer well within that can only come from the body timeout, however loaded the
            // machine is (other suites run beside this one).
            let slow = try RawConnection(port: port, receiveTimeout: .seconds(60))
            slow.send(
                "POST /v1/write HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer stream-limit-admin-secret\r\n"
                    + "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"changes\":[")
            let started = ContinuousClock.now
            let answer = await Harness.onOwnThread { slow.read(until: "}\n") }
            #expect(answer.hasPrefix("HTTP/1.1 408") && answer.contains(#""code":"timeout""#), "\(answer)")
            #expect(ContinuousClock.now - started < .seconds(30))
        }
        #expect(try await store.feedInfo().head == 2000, "nothing was written")
    }

    /// The stalled-client limit cuts a reader that stopped, not one that reads slowly: a reader
    /// at 1 MB/s gets a 17.6 MB transaction whole from `concord serve` under an 8 s limit. (When
    /// a stream wrote up to 4,096 lines at once, the transaction went in one write that kept the
    /// connection full for over 10 s, and the reader was cut.) The publisher is a process of its
    /// own: in this one its event loops serve every other test's servers too, and under that
    /// load they fell seconds behind the socket.
    @Test func aSlowReaderIsNotCutAsStalled() async throws {
        let folder = Harness.folder()
        let db = folder.appendingPathComponent("source.sqlite").path
        let count = 1100
        do {
            let store = try PublisherStore(path: db)
            let pad = String(repeating: "x", count: 16_000)
            try await store.write((0..<count).map { .upsert("items", "k\($0)", json: "{\"pad\":\"\(pad)\"}") })
        }
        let (server, port) = try await ConcordProcess.serve(db: db, extra: ["--stalled-client-seconds", "8"])
        let connection = try RawConnection(port: port, receiveTimeout: .seconds(20))
        connection.send("GET /v1/changes/stream?after=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        let (received, closed) = await Harness.onOwnThread {
            connection.readSlowly(bytesPerSecond: 1_000_000, until: #""commit":true}"#)
        }
        #expect(!closed, "the publisher did not cut the reader")
        let upserts = received.split(separator: UInt8(ascii: "\n")).count {
            $0.firstRange(of: Array(#""op":"upsert""#.utf8)) != nil
        }
        #expect(upserts == count, "every change arrived (\(received.count) bytes)")
        #expect(await server.terminate() == 0)
    }

    @Test func sigtermStopsThePublisherCleanlyAndSubscribersResume() async throws {
        let folder = Harness.folder()
        let db = folder.appendingPathComponent("source.sqlite").path
        let log = folder.appendingPathComponent("serve.log").path
        var (server, port) = try await ConcordProcess.serve(db: db, extra: ["--log-format", "json"], log: log)
        let base = "http://127.0.0.1:\(port)"
        let http = SourceClient.makeHTTPClient()
        defer { _ = http.shutdown() as EventLoopFuture<Void> }  // on every path, or deinit traps
        let replicaPath = folder.appendingPathComponent("replica.sqlite").path
        let follower = try ConcordProcess(["follow", "--source", base, "--db", replicaPath, "--quiet"])
        // Multi-change transactions go on while the publisher is stopped and started again.
        let written = ByteCounter()
        let writer = Task {
            var workload = RandomWorkload(keySpace: 300)
            let client = SourceClient(baseURL: base, http: http)
            while !Task.isCancelled, written.value < 500 {
                do {
                    try await client.write(workload.transaction())
                    written.add(1)
                    try await Task.sleep(for: .milliseconds(5))
                } catch {
                    try? await Task.sleep(for: .milliseconds(20))
                }
            }
        }
        try await Harness.waitUntil("writes are going on", timeout: .seconds(30)) { written.value >= 50 }
        let stopping = ContinuousClock.now
        let writtenBeforeStop = written.value
        #expect(await server.terminate() == 0, "SIGTERM ends the publisher with exit 0")
        #expect(ContinuousClock.now - stopping < .seconds(10), "promptly")
        let replica = try ReplicaStore(path: replicaPath)
        (server, port) = try await ConcordProcess.serve(db: db, port: port)
        #expect(writtenBeforeStop < 500, "the publisher stopped while writes went on")
        await writer.value
        let source = try PublisherStore(path: db)
        let head = try await SourceClient(baseURL: base, http: http).feed().head
        try await Harness.waitUntil("the replica is verified at the head after the restart", timeout: .seconds(60)) {
            guard let state = try replica.state() else { return false }
            return state.position == head && state.verifiedLSN == head
        }
        #expect(try await Harness.differences(source: source, replica: replica).isEmpty)
        #expect(await follower.terminate() == 0)
        #expect(await server.terminate() == 0)
        // `--log-format json`: every line a JSON object with level, label and message.
        let lines = try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n")
        #expect(lines.count >= 2)
        for line in lines {
            let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
            #expect(object?["level"] is String && object?["message"] is String, "\(line)")
        }
        #expect(lines.contains { $0.contains("publisher listening") })
    }
}

/// Chromium from Debian, headless, for checking the dashboard as a browser renders it.
struct Chromium {
    let path: String

    static func find() throws -> Chromium {
        for path in ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"]
        where FileManager.default.isExecutableFile(atPath: path) {
            return Chromium(path: path)
        }
        throw ConcordError(.internal, "no Chromium: install Debian's chromium package (scripts/test.sh does)")
    }

    func run(_ arguments: [String]) async throws -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments =
            [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--user-data-dir="
                    + FileManager.default.temporaryDirectory.appendingPathComponent(
                        "concord-chromium-\(UUID().uuidString)"
                    ).path,
            ] + arguments
        let output = Pipe()
        process.standardOutput = output
        process.standardError = FileHandle.nullDevice
        let data = try await Harness.runToEnd(process, reading: output)
        return String(decoding: data, as: UTF8.self)
    }

    func dumpDOM(url: String) async throws -> String { try await run(["--dump-dom", url]) }

    func screenshot(url: String, to path: String) async throws {
        _ = try await run(["--screenshot=" + path, "--window-size=1280,760", "--hide-scrollbars", url])
    }
}

/// A private certificate authority and a server certificate for 127.0.0.1, made with openssl.
struct TestPKI {
    let caCertificate: String
    let serverCertificate: String
    let serverKey: String

    init(in folder: URL) throws {
        func path(_ name: String) -> String { folder.appendingPathComponent(name).path }
        caCertificate = path("ca.pem")
        serverCertificate = path("server.pem")
        serverKey = path("server.key")
        let extensions = path("server.ext")
        try "subjectAltName = IP:127.0.0.1, DNS:localhost\nbasicConstraints = CA:FALSE\n".write(
            toFile: extensions, atomically: true, encoding: .utf8)
        let steps: [[String]] = [
            [
                "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
                path("ca.key"), "-out", caCertificate, "-days", "2", "-subj", "/CN=Concord test CA",
            ],
            [
                "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", serverKey,
                "-out", path("server.csr"), "-subj", "/CN=127.0.0.1",
            ],
            [
                "x509", "-req", "-in", path("server.csr"), "-CA", caCertificate, "-CAkey", path("ca.key"),
                "-CAcreateserial", "-out", serverCertificate, "-days", "2", "-extfile", extensions,
            ],
        ]
        for step in steps {
            guard try Harness.runQuietly("/usr/bin/openssl", step) == 0 else {
                throw ConcordError(.internal, "openssl \(step.first!) failed")
            }
        }
    }
}
