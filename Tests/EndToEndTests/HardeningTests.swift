import AsyncHTTPClient
import ConcordClient
import ConcordCore
import ConcordSQLite
import ConcordServer
import Foundation
import NIOCore
import NIOHTTP1
import Synchronization
import Testing

/// A live publisher under hostile and heavy use: 100,000 malformed or random requests, then
/// 50 subscribers streaming at once. Nothing crashes, nothing is stored that should not be,
/// memory stays bounded, and every replica ends verified equal.
@Suite(.serialized, .timeLimit(.minutes(6)))
struct HardeningTests {
    static let admin = "fuzz-admin-secret-0123456789"
    static let loader = "fuzz-loader-secret-0123456789"
    static let reader = "fuzz-reader-secret-0123456789"

    /// A write body that is never valid, whatever the random choices.
    static func invalidWrite(_ random: inout SeededGenerator) -> [UInt8] {
        let valid = Array(
            #"{"changes":[{"collection":"items","key":"k1","op":"upsert","value":{"n":1,"s":"é"}},{"collection":"items","key":"k2","op":"delete"}]}"#
                .utf8)
        switch Int.random(in: 0..<10, using: &random) {
        case 0:  // truncated anywhere before its last byte
            return Array(valid.prefix(Int.random(in: 0..<(valid.count - 1), using: &random)))
        case 1:  // random bytes
            return (0..<Int.random(in: 0...2000, using: &random)).map { _ in UInt8.random(in: 0...255, using: &random) }
        case 2:  // invalid UTF-8 inside a key
            return Array(#"{"changes":[{"collection":"items","key":"a"#.utf8) + [0xC3, 0x28, 0xFF]
                + Array(#"","op":"delete"}]}"#.utf8)
        case 3:  // nested deeper than the limit
            let depth = Int.random(in: 65...3000, using: &random)
            return Array(#"{"changes":[{"collection":"items","key":"d","op":"upsert","value":"#.utf8)
                + [UInt8](repeating: UInt8(ascii: "["), count: depth)
                + [UInt8](repeating: UInt8(ascii: "]"), count: depth)
                + Array("}]}".utf8)
        case 4:  // a huge number where an operation belongs
            return Array(
                #"{"changes":[{"collection":"items","key":"n","op":123456789012345678901234567890e999}]}"#.utf8)
        case 5:  // a collection name that is not allowed
            return Array(#"{"changes":[{"collection":"../etc","key":"x","op":"delete"}]}"#.utf8)
        case 6:  // a key longer than allowed
            return Array(#"{"changes":[{"collection":"items","key":""#.utf8)
                + [UInt8](repeating: UInt8(ascii: "k"), count: 1100) + Array(#"","op":"delete"}]}"#.utf8)
        case 7:  // changes that are not an array
            return Array(#"{"changes":{"collection":"items"}}"#.utf8)
        case 8:  // an upsert without a value, after a valid change: the whole batch is refused
            return Array(
                #"{"changes":[{"collection":"items","key":"ok","op":"upsert","value":1},{"collection":"items","key":"v","op":"upsert"}]}"#
                    .utf8)
        default:  // an unterminated string with an escape cut in half
            return Array(#"{"changes":[{"collection":"items","key":"\u12"#.utf8)
        }
    }

    static let oddValues = [
        "-1", "-9223372036854775808", "18446744073709551616", "99999999999999999999999999", "abc", "", "0x10",
        "1e3", "%FF%FE", "%00", "1%20", "+5", "3.5", "NaN", "%C3%28",
    ]

    static func randomRequest(_ random: inout SeededGenerator, head: LSN) -> HTTPClientRequest {
        func odd() -> String { oddValues.randomElement(using: &random)! }
        var path: String
        var method = HTTPMethod.GET
        var body: [UInt8]?
        switch Int.random(in: 0..<9, using: &random) {
        case 0: path = "/v1/changes?after=\(odd())&limit=\(odd())"
        case 1:
            path =
                "/v1/changes?after=\(Int.random(in: 0...Int(head), using: &random))&limit=\(odd())&collections=\(odd())"
        case 2: path = "/v1/changes/stream?after=\(odd())&before=\(odd())"
        case 3:
            path =
                "/v1/collections/\(["items", "Bad%20Name", "%FF", "nope", "items%2F..%2F"].randomElement(using: &random)!)/records?limit=\(odd())&afterKey=\(odd())"
        case 4: path = "/v1/collections/items/symbols?at=\(odd())&start=\(odd())&count=\(odd())"
        case 5:
            path = "/v1/collections/items/lookup"
            method = .POST
            body = (0..<Int.random(in: 0...100, using: &random)).map { _ in UInt8.random(in: 0...255, using: &random) }
        case 6:
            path = "/v1/subscribers/report"
            method = .POST
            body = [
                Array(#"{"name":"a b","activity":"following","position":1}"#.utf8),
                Array(#"{"name":"x","activity":"following","position":-3}"#.utf8),
                Array(#"{"name":"x","activity":"following","position":1,"verified":99}"#.utf8),
                Array(#"{"name":"<script>","activity":"x","position":0}"#.utf8),
                Array(#"{"name":"x","activity":"following","position":18446744073709551615}"#.utf8),
            ].randomElement(using: &random)!
        case 7:
            path = ["/", "/v1/nowhere", "/metrics", "/v1/feed?x=\(odd())", "//v1//feed", "/v1/write"].randomElement(
                using: &random)!
            method = [.GET, .PUT, .DELETE, .PATCH, .OPTIONS].randomElement(using: &random)!
        default:
            path = "/v1/write"
            method = .POST
            body = invalidWrite(&random)
        }
        var request = HTTPClientRequest(url: "PLACEHOLDER" + path)
        request.method = method
        if let body { request.body = .bytes(ByteBuffer(bytes: body)) }
        switch Int.random(in: 0..<10, using: &random) {
        case 0: break
        case 1:
            request.headers.add(
                name: "authorization", value: "Bearer wrong-\(UInt64.random(in: 0...UInt64.max, using: &random))")
        case 2: request.headers.add(name: "authorization", value: "Basic %%%")
        case 3: request.headers.add(name: "authorization", value: "Bearer \(reader)")
        default: request.headers.add(name: "authorization", value: "Bearer \(method == .POST ? loader : admin)")
        }
        return request
    }

    /// Requests no HTTP client sends: broken request lines and headers, bodies cut short.
    static func malformedRequest(_ random: inout SeededGenerator) -> (bytes: [UInt8], closeEarly: Bool) {
        let auth = "Authorization: Bearer \(loader)\r\n"
        switch Int.random(in: 0..<8, using: &random) {
        case 0: return (Array("GARBAGE\r\n\r\n".utf8), false)
        case 1: return (Array("GET /v1/feed HTTP/9.9\r\n\r\n".utf8), false)
        case 2: return (Array("GET /v1/feed HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n".utf8), false)
        case 3:
            return (
                Array("POST /v1/write HTTP/1.1\r\nHost: x\r\n\(auth)Content-Length: 500\r\n\r\n{\"changes\":[".utf8),
                true
            )
        case 4:
            return (Array("POST /v1/write HTTP/1.1\r\nHost: x\r\n\(auth)Content-Length: -5\r\n\r\n".utf8), false)
        case 5:
            return (
                Array(
                    "POST /v1/write HTTP/1.1\r\nHost: x\r\n\(auth)Transfer-Encoding: chunked\r\n\r\nZZ\r\nxx\r\n".utf8),
                false
            )
        case 6:
            return (
                Array(
                    "GET /v1/feed HTTP/1.1\r\nHost: x\r\nX-Long: \(String(repeating: "a", count: 100_000))\r\n\r\n".utf8
                ),
                false
            )
        default:
            return (
                (0..<Int.random(in: 1...300, using: &random)).map { _ in UInt8.random(in: 0...255, using: &random) },
                true
            )
        }
    }

    @Test func hundredThousandHostileRequestsChangeNothing() async throws {
        let folder = Harness.folder()
        let tokens = folder.appendingPathComponent("tokens").path
        try """
        ops     admin * \(Self.admin)
        loader  write * \(Self.loader)
        viewer  read  * \(Self.reader)
        """.write(toFile: tokens, atomically: true, encoding: .utf8)
        let db = folder.appendingPathComponent("source.sqlite").path
        let (server, port) = try await ConcordProcess.serve(
            db: db, extra: ["--tokens-file", tokens, "--request-body-seconds", "1", "--max-wait-seconds", "0"])
        let base = "http://127.0.0.1:\(port)"
        var poolConfiguration = HTTPClient.Configuration()
        poolConfiguration.connectionPool.concurrentHTTP1ConnectionsPerHostSoftLimit = 64
        poolConfiguration.timeout = .init(connect: .seconds(5), read: .seconds(30))
        let http = HTTPClient(eventLoopGroupProvider: .singleton, configuration: poolConfiguration)
        defer { _ = http.shutdown() as EventLoopFuture<Void> }
        var loading = SourceClient.Configuration()
        loading.token = Self.loader
        let loader = SourceClient(baseURL: base, http: http, configuration: loading)
        for batch in 0..<10 {
            try await loader.write((0..<20).map { .upsert("items", "k\(batch * 20 + $0)", json: "{\"n\":\($0)}") })
        }
        let replicaPath = folder.appendingPathComponent("replica.sqlite").path
        let follower = try ConcordProcess([
            "follow", "--source", base, "--db", replicaPath, "--token", Self.reader, "--name", "fuzzed", "--quiet",
        ])
        let pid = server.process.processIdentifier
        // Warm up, then take the resident size the fuzz run is compared with.
        var random = SeededGenerator(seed: 0xC0C0_2026)
        let head = try await loader.feed().head
        for _ in 0..<2000 {
            var request = Self.randomRequest(&random, head: head)
            request.url = request.url.replacingOccurrences(of: "PLACEHOLDER", with: base)
            _ = try? await http.execute(request, timeout: .seconds(30)).body.collect(upTo: 16 << 20)
        }
        let residentBefore = residentBytes(of: pid) ?? 0

        // Legitimate writes go on during the run; the fuzz itself must store nothing.
        let legitimate = Task {
            var workload = RandomWorkload(keySpace: 400)
            var changes = 0
            for _ in 0..<200 {
                let transaction = workload.transaction()
                try await loader.write(transaction)
                changes += transaction.count
                try await Task.sleep(for: .milliseconds(20))
            }
            return changes
        }
        let tally = Tally()
        let clientRequests = 97_000
        let workers = 32
        try await withThrowingTaskGroup(of: Void.self) { group in
            for worker in 0..<workers {
                group.addTask {
                    var random = SeededGenerator(seed: UInt64(worker) &* 0x9E37_79B9_7F4A_7C15 &+ 1)
                    for _ in 0..<(clientRequests / workers) {
                        var request = Self.randomRequest(&random, head: head)
                        request.url = request.url.replacingOccurrences(of: "PLACEHOLDER", with: base)
                        do {
                            let response = try await http.execute(request, timeout: .seconds(30))
                            // Streams never end: their status is what counts.
                            if !request.url.contains("stream") || response.status != .ok {
                                _ = try await response.body.collect(upTo: 16 << 20)
                            }
                            tally.statuses.withLock { $0[response.status.code, default: 0] += 1 }
                            if response.status.code >= 500 {
                                tally.failures.withLock {
                                    $0.append("\(response.status) from \(request.method) \(request.url)")
                                }
                            }
                        } catch {
                            tally.failures.withLock { $0.append("\(request.method) \(request.url): \(error)") }
                        }
                    }
                }
            }
            // Raw connections: broken HTTP, bodies cut short, and a few bodies that trickle in.
            // Each on a thread of its own: their reads block (see `Harness.onOwnThread`).
            for worker in 0..<4 {
                group.addTask {
                    await Harness.onOwnThread {
                        var random = SeededGenerator(seed: 0xBAD + UInt64(worker))
                        for index in 0..<1000 {
                            guard let connection = try? RawConnection(port: port, receiveTimeout: .seconds(3)) else {
                                tally.failures.withLock { $0.append("raw connection \(index) refused") }
                                continue
                            }
                            if index % 200 == 0 {
                                // A slow body: a few bytes, then nothing; the publisher answers 408.
                                connection.send(
                                    "POST /v1/write HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \(Self.loader)\r\n"
                                        + "Content-Length: 100\r\n\r\n{\"ch")
                                let status = connection.status()
                                tally.statuses.withLock { $0[UInt(status ?? 0), default: 0] += 1 }
                                continue
                            }
                            let (bytes, closeEarly) = Self.malformedRequest(&random)
                            connection.send(bytes)
                            if closeEarly {
                                tally.statuses.withLock { $0[0, default: 0] += 1 }
                            } else {
                                let status = connection.status()
                                tally.statuses.withLock { $0[UInt(status ?? 0), default: 0] += 1 }
                            }
                        }
                    }
                }
            }
            try await group.waitForAll()
        }
        let legitimateChanges = try await legitimate.value
        #expect(server.isRunning, "the publisher survived")
        let residentAfter = residentBytes(of: pid) ?? 0
        let counted = tally.statuses.withLock { $0 }
        let total = counted.values.reduce(0, +) + tally.failures.withLock { $0.count }
        print(
            "fuzz: \(total) requests, statuses \(counted.sorted { $0.key < $1.key }), resident "
                + "\(residentBefore >> 20) MiB before, \(residentAfter >> 20) MiB after")
        #expect(total >= 100_000)
        #expect(counted.keys.allSatisfy { $0 < 500 }, "no request made the publisher fail: \(counted)")
        let failed = tally.failures.withLock { $0 }
        #expect(failed.isEmpty, "\(failed.count) failed: \(Set(failed).prefix(8))")
        #expect(residentAfter < residentBefore + (256 << 20), "memory stays bounded")
        // Only the legitimate writes are stored.
        let feed = try await loader.feed()
        #expect(feed.head == head + LSN(legitimateChanges))
        // The replica that followed throughout ends verified equal.
        let replica = try ReplicaStore(path: replicaPath)
        try await Harness.waitUntil("the replica is verified at the head", timeout: .seconds(60)) {
            guard let state = try replica.state() else { return false }
            return state.position == feed.head && state.verifiedLSN == feed.head
        }
        let source = try PublisherStore(path: db)
        #expect(try await Harness.differences(source: source, replica: replica).isEmpty)
        #expect(await follower.terminate() == 0)
        #expect(await server.terminate() == 0)
    }

    @Test func fiftySubscribersStreamWhileWritesGoOn() async throws {
        let folder = Harness.folder()
        let db = folder.appendingPathComponent("source.sqlite").path
        let (server, port) = try await ConcordProcess.serve(db: db)
        let base = "http://127.0.0.1:\(port)"
        var poolConfiguration = HTTPClient.Configuration()
        poolConfiguration.connectionPool.concurrentHTTP1ConnectionsPerHostSoftLimit = 128
        poolConfiguration.timeout = .init(connect: .seconds(5), read: .seconds(30))
        poolConfiguration.decompression = .disabled
        let http = HTTPClient(eventLoopGroupProvider: .singleton, configuration: poolConfiguration)
        defer { _ = http.shutdown() as EventLoopFuture<Void> }
        let writer = SourceClient(baseURL: base, http: http)
        for batch in 0..<10 {
            try await writer.write((0..<100).map { .upsert("items", "k\(batch * 100 + $0)", json: "{\"n\":\($0)}") })
        }
        var stores: [ReplicaStore] = []
        var subscribers: [Subscriber] = []
        for index in 0..<50 {
            var storeConfiguration = ReplicaStore.Configuration()
            storeConfiguration.durability = .normal
            let store = try ReplicaStore(
                path: folder.appendingPathComponent("replica-\(index).sqlite").path, configuration: storeConfiguration)
            var configuration = Subscriber.Configuration(source: base)
            configuration.name = "load-\(index)"
            configuration.backoffInitial = .milliseconds(50)
            configuration.backoffMaximum = .milliseconds(500)
            stores.append(store)
            subscribers.append(
                Subscriber(configuration: configuration, store: store, http: http, logger: Harness.logger))
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for subscriber in subscribers { group.addTask { try await subscriber.run() } }
            var workload = RandomWorkload(keySpace: 1500)
            for _ in 0..<300 {
                try await writer.write(workload.transaction())
                try await Task.sleep(for: .milliseconds(10))
            }
            let head = try await writer.feed().head
            try await Harness.waitUntil("all 50 replicas are verified at the head", timeout: .seconds(180)) {
                for store in stores {
                    guard let state = try store.state(), state.position == head, state.verifiedLSN == head else {
                        return false
                    }
                }
                return true
            }
            let metrics = parseMetrics(try await OperationsTests.fetch(http, base + "/metrics").body)
            #expect(metrics["concord_publisher_open_streams"] == 50)
            #expect(metrics["concord_publisher_subscribers"] == 50)
            group.cancelAll()
        }
        let source = try PublisherStore(path: db)
        for (index, store) in stores.enumerated() {
            let differences = try await Harness.differences(source: source, replica: store)
            #expect(differences.isEmpty, "replica \(index): \(differences.prefix(3))")
        }
        #expect(await server.terminate() == 0)
    }
}

/// What the fuzz run's workers saw, shared between them.
final class Tally: Sendable {
    let statuses = Mutex<[UInt: Int]>([:])
    let failures = Mutex<[String]>([])
}
