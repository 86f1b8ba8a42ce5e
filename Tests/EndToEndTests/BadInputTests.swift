import AsyncHTTPClient
import ConcordClient
import ConcordCore
import ConcordSQLite
import ConcordServer
import Foundation
import NIOCore
import NIOHTTP1
import Testing

@Suite(.serialized, .timeLimit(.minutes(3)))
struct BadInputTests {
    struct Case: Sendable, CustomStringConvertible {
        var method: HTTPMethod
        var path: String
        var body: [UInt8]?
        var status: UInt
        var code: String
        var description: String { "\(method) \(path) -> \(status) \(code)" }
    }

    static func post(_ body: String, status: UInt = 400, code: String = "invalid_request") -> Case {
        Case(method: .POST, path: "/v1/write", body: Array(body.utf8), status: status, code: code)
    }

    static func get(_ path: String, status: UInt = 400, code: String = "invalid_request") -> Case {
        Case(method: .GET, path: path, body: nil, status: status, code: code)
    }

    static let cases: [Case] = [
        post("{"),
        post("not json at all"),
        post(""),
        post(#"{"changes":[{"collection":"items","key":"1","op":"upsert"}]}"#),
        post(
            #"{"changes":[{"collection":"items","key":"1","op":"upsert","value":{"a":1}},{"collection":"items","key":"2","op":"upsert","value":{"b":}}]}"#
        ),
        post(#"{"changes":[{"collection":"Bad Name","key":"1","op":"delete"}]}"#),
        post(
            #"{"changes":[{"collection":"items","key":"1","op":"upsert","value":"#
                + String(repeating: "[", count: 100) + String(repeating: "]", count: 100) + "}]}"),
        Case(
            method: .POST, path: "/v1/write",
            body: Array(#"{"changes":[{"collection":"items","key":""#.utf8) + [0xFF, 0xFE]
                + Array(#"","op":"delete"}]}"#.utf8),
            status: 400, code: "invalid_request"),
        post(
            #"{"changes":[{"collection":"items","key":"1","op":"upsert","value":""#
                + String(repeating: "x", count: 8000) + "\"}]}",
            status: 413, code: "too_large"),
        get("/v1/changes"),
        get("/v1/changes?after=-1"),
        get("/v1/changes?after=abc"),
        get("/v1/changes?after=99999999999999999999999"),
        get("/v1/changes?after=0&limit=0"),
        get("/v1/changes?after=0&limit=1000000"),
        get("/v1/changes?after=0&wait=3600"),
        get("/v1/changes?after=500&wait=30", code: "lsn_beyond_head"),
        get("/v1/changes/stream?after=500", code: "lsn_beyond_head"),
        get("/v1/changes?after=0&collections=Nope!"),
        get("/v1/changes?after=0&before=maybe"),
        get("/v1/collections/nothing_here/records", status: 404, code: "unknown_collection"),
        get("/v1/collections/Bad%20Name/records"),
        get("/v1/collections/items/records?limit=-5"),
        get("/v1/nowhere", status: 404, code: "not_found"),
    ]

    @Test func badRequestsGetClearErrorsAndChangeNothing() async throws {
        let folder = Harness.folder()
        let source = try PublisherStore(path: folder.appendingPathComponent("source.sqlite").path)
        try await source.write((0..<20).map { .upsert("items", "k\($0)", json: "{\"v\":\($0)}") })
        let before = try await source.items(after: 0, limit: 1000)
        var configuration = PublisherServer.Configuration.testing
        configuration.maxBodyBytes = 4096
        let http = SourceClient.makeHTTPClient()
        defer { _ = http.shutdown() as EventLoopFuture<Void> }  // on every path, or deinit traps
        try await PublisherServer.withRunningServer(store: source, configuration: configuration, logger: Harness.logger)
        { url in
            for test in Self.cases {
                var request = HTTPClientRequest(url: url + test.path)
                request.method = test.method
                if let body = test.body { request.body = .bytes(ByteBuffer(bytes: body)) }
                // A bad position must be answered at once, not after the long-poll wait.
                let response = try await http.execute(request, timeout: .seconds(5))
                let body = try await response.body.collect(upTo: 1 << 20)
                #expect(response.status.code == test.status, "\(test)")
                let error = WireFormat.decodeError(Array(buffer: body))
                #expect(error?.code.rawValue == test.code, "\(test): \(String(buffer: body))")
                #expect(error?.message.isEmpty == false)
                #expect(response.headers.first(name: "content-type") == "application/json")
            }
        }
        #expect(source.head == 20)
        #expect(try await source.items(after: 0, limit: 1000) == before)
    }

    @Test func beforeElementsAreSentOnlyWhenAskedFor() async throws {
        let folder = Harness.folder()
        let source = try PublisherStore(path: folder.appendingPathComponent("source.sqlite").path)
        try await source.write([.upsert("items", "k", json: "1")])
        try await source.write([.upsert("items", "k", json: "2")])
        let http = SourceClient.makeHTTPClient()
        defer { _ = http.shutdown() as EventLoopFuture<Void> }  // on every path, or deinit traps
        try await PublisherServer.withRunningServer(store: source, configuration: .testing, logger: Harness.logger) {
            url in
            for (query, expected) in [("", false), ("&before=true", true)] {
                let response = try await http.execute(
                    HTTPClientRequest(url: url + "/v1/changes?after=1" + query), timeout: .seconds(30))
                let body = Array(buffer: try await response.body.collect(upTo: 1 << 20))
                let line = try WireFormat.parseStreamLine(Array(body.dropLast()))
                guard case .item(.change(let change)) = line else {
                    Issue.record("expected a change")
                    continue
                }
                let replaced = Element(collection: "items", key: "k", version: 1, value: "1")
                #expect(change.before == (expected ? replaced : nil), "query \(query)")
            }
        }
    }
}
