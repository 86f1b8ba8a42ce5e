import AsyncHTTPClient
import ConcordClient
import ConcordCore
import ConcordSQLite
import Foundation
import NIOCore
import NIOHTTP1
import Testing

/// Bearer tokens on a real `concord serve`: every endpoint with no token, a wrong one, one for
/// another collection and the right one; rotation by SIGHUP; `follow` with a token.
@Suite(.serialized, .timeLimit(.minutes(3)))
struct AccessTests {
    static let admin = "admin-secret-0123456789"
    static let writer = "writer-secret-0123456789"
    static let customersReader = "customers-reader-0123456789"
    static let ordersReader = "orders-reader-0123456789"
    static let ordersWriter = "orders-writer-0123456789"

    static func tokens(customersSecret: String = customersReader) -> String {
        """
        # name            role   collections  secret
        ops               admin  *            \(admin)
        loader            write  *            \(writer)
        billing           read   customers    \(customersSecret)
        shipping          read   orders       \(ordersReader)
        shipping_writer   write  orders       \(ordersWriter)
        """
    }

    struct Call: Sendable, CustomStringConvertible {
        var method: HTTPMethod
        var path: String
        var body: [UInt8]?
        var description: String { "\(method) \(path)" }
    }

    static func request(
        _ http: HTTPClient, _ base: String, _ call: Call, token: String?
    ) async throws -> (status: UInt, body: String, authenticate: String?) {
        var request = HTTPClientRequest(url: base + call.path)
        request.method = call.method
        if let token { request.headers.add(name: "authorization", value: "Bearer \(token)") }
        if let body = call.body { request.body = .bytes(ByteBuffer(bytes: body)) }
        let response = try await http.execute(request, timeout: .seconds(10))
        // A stream has no end: its status and first bytes are enough.
        var bytes: [UInt8] = []
        for try await chunk in response.body {
            bytes += Array(buffer: chunk)
            if call.path.contains("stream") || bytes.count > 65536 { break }
        }
        return (
            response.status.code, String(decoding: bytes, as: UTF8.self),
            response.headers.first(name: "www-authenticate")
        )
    }

    @Test func everyEndpointRefusesMissingWrongAndForeignTokens() async throws {
        let folder = Harness.folder()
        let tokensFile = folder.appendingPathComponent("tokens").path
        try Self.tokens().write(toFile: tokensFile, atomically: true, encoding: .utf8)
        let (server, port) = try await ConcordProcess.serve(
            db: folder.appendingPathComponent("source.sqlite").path, extra: ["--tokens-file", tokensFile])
        let base = "http://127.0.0.1:\(port)"
        let http = SourceClient.makeHTTPClient()
        defer { _ = http.shutdown() as EventLoopFuture<Void> }  // on every path, or deinit traps
        var writing = SourceClient.Configuration()
        writing.token = Self.writer
        let head = try await SourceClient(baseURL: base, http: http, configuration: writing).write([
            .upsert("customers", "c1", json: #"{"name":"Ada"}"#), .upsert("orders", "o1", json: #"{"total":3}"#),
        ])
        let customerCalls = [
            Call(method: .GET, path: "/v1/collections/customers/records"),
            Call(method: .GET, path: "/v1/collections/customers/symbols?at=\(head)&count=4"),
            Call(method: .POST, path: "/v1/collections/customers/lookup", body: [UInt8](repeating: 0, count: 8)),
            Call(method: .GET, path: "/v1/changes?after=0&collections=customers"),
            Call(method: .GET, path: "/v1/changes/stream?after=0&collections=customers"),
        ]
        let readCalls =
            [
                Call(method: .GET, path: "/v1/feed"), Call(method: .GET, path: "/v1/changes?after=0"),
                Call(method: .GET, path: "/v1/changes/stream?after=0"),
                Call(
                    method: .POST, path: "/v1/subscribers/report",
                    body: SubscriberReport(name: "billing-replica", activity: "following", position: 1).encoded()),
            ] + customerCalls
        let customerWrite = Call(
            method: .POST, path: "/v1/write",
            body: Array(#"{"changes":[{"collection":"customers","key":"c2","op":"upsert","value":{}}]}"#.utf8))
        for call in readCalls + [customerWrite] {
            let missing = try await Self.request(http, base, call, token: nil)
            #expect(missing.status == 401 && missing.body.contains("unauthorized"), "\(call) without a token")
            #expect(missing.authenticate?.hasPrefix("Bearer") == true, "\(call) names the scheme")
            let wrong = try await Self.request(http, base, call, token: "not-a-token-0123456789")
            #expect(wrong.status == 401, "\(call) with a wrong token")
        }
        for call in readCalls {
            let right = try await Self.request(http, base, call, token: Self.customersReader)
            #expect(right.status == 200, "\(call) with the customers reader: \(right.body)")
            #expect(!right.body.contains("o1") && !right.body.contains("\"orders\""), "\(call) shows only customers")
        }
        for call in customerCalls {
            let foreign = try await Self.request(http, base, call, token: Self.ordersReader)
            #expect(foreign.status == 403 && foreign.body.contains("forbidden"), "\(call) with the orders reader")
        }
        // Writes need the write role and the collection.
        #expect(try await Self.request(http, base, customerWrite, token: Self.customersReader).status == 403)
        #expect(try await Self.request(http, base, customerWrite, token: Self.ordersWriter).status == 403)
        #expect(try await Self.request(http, base, customerWrite, token: Self.writer).status == 200)
        // Only what the writers wrote is stored: the refused writes changed nothing.
        let feed = try await SourceClient(baseURL: base, http: http, configuration: writing).feed()
        #expect(feed.head == head + 1)
        // /healthz and /readyz need no token.
        #expect(try await Self.request(http, base, Call(method: .GET, path: "/healthz"), token: nil).status == 200)
        #expect(try await Self.request(http, base, Call(method: .GET, path: "/readyz"), token: nil).status == 200)
        // The metrics and the dashboard show every collection's subscribers: admin only.
        for path in ["/metrics", "/"] {
            let call = Call(method: .GET, path: path)
            let missing = try await Self.request(http, base, call, token: nil)
            #expect(missing.status == 401, "\(path) without a token")
            #expect(try await Self.request(http, base, call, token: "not-a-token-0123456789").status == 401)
            #expect(try await Self.request(http, base, call, token: Self.customersReader).status == 403, "\(path)")
            let admin = try await Self.request(http, base, call, token: Self.admin)
            #expect(admin.status == 200 && admin.body.contains("billing-replica"), "\(path) for the admin")
        }
        // A browser prompts for the dashboard's password (Basic) and sends the admin secret as it.
        let dashboard = try await Self.request(http, base, Call(method: .GET, path: "/"), token: nil)
        #expect(dashboard.authenticate?.hasPrefix("Basic") == true)
        var basic = HTTPClientRequest(url: base + "/")
        basic.headers.add(name: "authorization", value: "Basic " + Data("ops:\(Self.admin)".utf8).base64EncodedString())
        #expect(try await http.execute(basic, timeout: .seconds(10)).status == .ok)
        basic.headers.replaceOrAdd(
            name: "authorization", value: "Basic " + Data("ops:\(Self.customersReader)".utf8).base64EncodedString())
        #expect(try await http.execute(basic, timeout: .seconds(10)).status == .forbidden)

        // Rotation: billing gets a new secret; SIGHUP makes it the only one, without a restart,
        // and ends the stream open with the old one.
        var streamRequest = HTTPClientRequest(url: base + "/v1/changes/stream?after=0")
        streamRequest.headers.add(name: "authorization", value: "Bearer \(Self.customersReader)")
        let open = try await http.execute(streamRequest, timeout: .seconds(60))
        #expect(open.status == .ok)
        let streamEnded = Task {
            for try await _ in open.body {}
            return true
        }
        let rotated = "customers-reader-rotated-42"
        try Self.tokens(customersSecret: rotated).write(toFile: tokensFile, atomically: true, encoding: .utf8)
        kill(server.process.processIdentifier, SIGHUP)
        let feedCall = Call(method: .GET, path: "/v1/feed")
        try await Harness.waitUntil("the rotated token is in force", timeout: .seconds(10)) {
            try await Self.request(http, base, feedCall, token: rotated).status == 200
        }
        #expect(try await Self.request(http, base, feedCall, token: Self.customersReader).status == 401)
        // The publisher checks an idle stream's token at each heartbeat (every 5 s).
        let ended = try await withThrowingTaskGroup(of: Bool.self) { group in
            group.addTask { try await streamEnded.value }
            group.addTask {
                try await Task.sleep(for: .seconds(15))
                return false
            }
            defer { group.cancelAll() }
            return try await group.next() ?? false
        }
        #expect(ended, "the stream opened with the revoked token ended")
        // A tokens file that no longer parses keeps the tokens in force.
        try "broken line".write(toFile: tokensFile, atomically: true, encoding: .utf8)
        kill(server.process.processIdentifier, SIGHUP)
        try await Task.sleep(for: .seconds(2))
        #expect(try await Self.request(http, base, feedCall, token: rotated).status == 200)
        #expect(server.isRunning)

        // follow with its token from the environment: the replica holds customers only, verified.
        let replicaPath = folder.appendingPathComponent("replica.sqlite").path
        let follower = try ConcordProcess(
            ["follow", "--source", base, "--db", replicaPath, "--quiet"], environment: ["CONCORD_TOKEN": rotated])
        let replica = try ReplicaStore(path: replicaPath)
        try await Harness.waitUntil("the replica follows with its token", timeout: .seconds(30)) {
            guard let state = try replica.state() else { return false }
            return state.progress.phase == .following && state.position == head + 1
        }
        #expect(try replica.collections() == ["customers"])
        #expect(try replica.records(of: "customers").map(\.key) == ["c1", "c2"])
        #expect(await follower.terminate() == 0)
        // status with a token file, and without a token.
        let tokenFile = folder.appendingPathComponent("token").path
        try "\(rotated)\n".write(toFile: tokenFile, atomically: true, encoding: .utf8)
        let (ok, _) = try await PostgresCaptureTests.run(["status", "--source", base, "--token-file", tokenFile])
        #expect(ok == 0)
        let (refused, message) = try await PostgresCaptureTests.run(["status", "--source", base])
        #expect(refused == 1 && message.contains("bearer token"), "\(message)")
        #expect(await server.terminate() == 0)
    }

    @Test func serveRefusesABadTokensFile() async throws {
        let folder = Harness.folder()
        let tokensFile = folder.appendingPathComponent("tokens").path
        try "ops admin * short\n".write(toFile: tokensFile, atomically: true, encoding: .utf8)
        let (status, message) = try await PostgresCaptureTests.run([
            "serve", "--db", folder.appendingPathComponent("s.sqlite").path, "--port", "0", "--tokens-file", tokensFile,
        ])
        #expect(status == 2 && message.contains("\(tokensFile):1") && message.contains("shorter"), "\(message)")
    }
}
