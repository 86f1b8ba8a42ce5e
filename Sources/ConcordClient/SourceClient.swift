import AsyncHTTPClient
import ConcordCore
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOSSL
import Synchronization

/// Bytes received from a publisher, shared by the copies of one ``SourceClient``, so what
/// a bootstrap, a refill or a reconciliation costs can be reported.
public final class ByteCounter: Sendable {
    private let total = Atomic<Int>(0)
    public init() {}
    public func add(_ bytes: Int) { total.add(bytes, ordering: .relaxed) }
    public var value: Int { total.load(ordering: .relaxed) }
}

/// Calls a publisher's protocol v1 over HTTP.
///
/// Every failure surfaces as a ``ConcordError``: the publisher's own code when it sent
/// one, `.unavailable` when it could not be reached or failed on its side.
public struct SourceClient: Sendable {
    public struct Configuration: Sendable {
        /// How long a plain request may take.
        public var requestTimeout: Duration = .seconds(60)
        /// Largest response body read into memory.
        public var maxResponseBytes = 512 << 20
        /// Asks for each change's before-element, which digests kept in LSN order need.
        public var requestsBefore = true
        /// Sent as `Authorization: Bearer TOKEN` with every request, when the publisher requires tokens.
        public var token: String?
        /// Sent as `Concord-Subscriber` with every request, so the publisher's dashboard and
        /// metrics show this subscriber under its name.
        public var subscriberName: String?
        public init() {}
    }

    public let baseURL: String
    public let configuration: Configuration
    /// Response bytes received through this client (stream bodies are counted by their reader).
    public let received = ByteCounter()
    let http: HTTPClient

    /// - Parameter baseURL: the publisher, e.g. `http://127.0.0.1:7070`.
    public init(baseURL: String, http: HTTPClient, configuration: Configuration = Configuration()) {
        var base = baseURL
        while base.hasSuffix("/") { base.removeLast() }
        self.baseURL = base
        self.http = http
        self.configuration = configuration
    }

    /// An HTTP client with the timeouts a subscriber wants: a dead connection is noticed
    /// within `idleTimeout` (streams send heartbeats more often than that).
    ///
    /// - Parameter trustedCertificates: a PEM file of the certificate authorities to trust for
    ///   `https://` publishers instead of the system's (a private CA).
    public static func makeHTTPClient(idleTimeout: Duration = .seconds(30), trustedCertificates: String?) throws
        -> HTTPClient
    {
        var configuration = HTTPClient.Configuration()
        configuration.timeout = .init(connect: .seconds(5), read: .nanoseconds(idleTimeout.nanoseconds))
        configuration.decompression = .disabled
        if let trustedCertificates {
            let certificates: [NIOSSLCertificate]
            do {
                certificates = try NIOSSLCertificate.fromPEMFile(trustedCertificates)
            } catch {
                throw ConcordError(
                    .invalidConfiguration, "cannot read the CA certificates \(trustedCertificates): \(error)")
            }
            guard !certificates.isEmpty else {
                throw ConcordError(.invalidConfiguration, "no PEM certificate in \(trustedCertificates)")
            }
            var tls = TLSConfiguration.makeClientConfiguration()
            tls.trustRoots = .certificates(certificates)
            configuration.tlsConfiguration = tls
        }
        return HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
    }

    /// An HTTP client for the system's trusted certificates only.
    public static func makeHTTPClient(idleTimeout: Duration = .seconds(30)) -> HTTPClient {
        // Without a CA file nothing can fail.
        try! makeHTTPClient(idleTimeout: idleTimeout, trustedCertificates: nil)
    }

    public func feed() async throws -> FeedInfo {
        let (body, _) = try await get("/v1/feed")
        return try WireFormat.decodeFeed(body)
    }

    /// Changes after `after` (long-polling up to `wait`), and the head the publisher reported.
    public func changes(after: LSN, limit: Int, wait: Int = 0, collections: [String]? = nil) async throws
        -> (items: [StreamItem], head: LSN?)
    {
        let result = try await changesWithCheckpoints(after: after, limit: limit, wait: wait, collections: collections)
        return (result.items, result.head)
    }

    /// Changes after `after` with the checkpoints among them and the elements they replace.
    public func changesWithCheckpoints(after: LSN, limit: Int, wait: Int = 0, collections: [String]? = nil)
        async throws -> (items: [StreamItem], checkpoints: [Checkpoint], head: LSN?)
    {
        var path = "/v1/changes?after=\(after)&limit=\(limit)&wait=\(wait)"
        if configuration.requestsBefore { path += "&before=1" }
        if let collections { path += "&collections=" + collections.joined(separator: ",") }
        let (body, headers) = try await getSized(path, timeout: .seconds(Int64(wait)) + configuration.requestTimeout)
        var lines = LineRanges(body)
        var items: [StreamItem] = []
        var checkpoints: [Checkpoint] = []
        while let line = lines.next() {
            switch try WireFormat.parseStreamLine(body, range: line) {
            case .item(let item): items.append(item)
            case .checkpoint(let checkpoint): checkpoints.append(checkpoint)
            case .heartbeat: break
            }
        }
        return (items, checkpoints, headers.first(name: "concord-head").flatMap { LSN($0) })
    }

    /// Coded symbols `range` of `collection` as the source held it at `lsn`; the count of
    /// response bytes is returned for accounting.
    public func symbols(collection: String, at lsn: LSN, range: Range<Int>) async throws
        -> (symbols: [CodedSymbol], bytes: Int)
    {
        let (body, _) = try await get(
            "/v1/collections/\(collection)/symbols?at=\(lsn)&start=\(range.lowerBound)&count=\(range.count)")
        return (try SymbolCodec.decode(body), body.count)
    }

    /// The source's current records with these key hashes, and the bytes sent and received.
    public func records(collection: String, keyHashes: [UInt64]) async throws -> (page: SnapshotPage, bytes: Int) {
        var request = HTTPClientRequest(url: baseURL + "/v1/collections/\(collection)/lookup")
        request.method = .POST
        request.headers.add(name: "content-type", value: "application/octet-stream")
        var payload: [UInt8] = []
        payload.reserveCapacity(keyHashes.count * 8)
        for hash in keyHashes { BinaryWire.appendWord(hash, to: &payload) }
        request.body = .bytes(ByteBuffer(bytes: payload))
        let (body, _) = try await send(request, timeout: configuration.requestTimeout)
        let (lsn, records) = try RecordCodec.decode(body)
        let page = SnapshotPage(collection: collection, lsn: lsn, records: records, hasMore: false)
        return (page, body.count + payload.count)
    }

    public func page(collection: String, afterKey: String?, limit: Int) async throws -> SnapshotPage {
        var path = "/v1/collections/\(collection)/records?limit=\(limit)"
        if let afterKey {
            path += "&afterKey=" + (afterKey.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? afterKey)
        }
        let (body, _) = try await getSized(path)
        return try WireFormat.decodePage(body)
    }

    /// Opens the live change stream after `after`; the caller reads the body.
    public func stream(after: LSN, collections: [String]? = nil) async throws -> HTTPClientResponse {
        var path = "/v1/changes/stream?after=\(after)"
        if configuration.requestsBefore { path += "&before=1" }
        if let collections { path += "&collections=" + collections.joined(separator: ",") }
        var request = HTTPClientRequest(url: baseURL + path)
        authorize(&request)
        let response: HTTPClientResponse
        do {
            // The stream has no end; a dead connection is caught by the client's idle timeout.
            response = try await http.execute(request, timeout: .hours(24 * 365))
        } catch {
            throw ConcordError(.unavailable, "cannot reach \(baseURL): \(error)")
        }
        guard response.status == .ok else {
            let body = try? await response.body.collect(upTo: 1 << 20)
            throw Self.failure(status: response.status, body: body.map { Array(buffer: $0) } ?? [])
        }
        return response
    }

    /// Tells the publisher this subscriber's position, proof and repairs (for its dashboard).
    public func report(_ report: SubscriberReport) async throws {
        var request = HTTPClientRequest(url: baseURL + "/v1/subscribers/report")
        request.method = .POST
        request.headers.add(name: "content-type", value: "application/json")
        request.body = .bytes(ByteBuffer(bytes: report.encoded()))
        _ = try await send(request, timeout: .seconds(10))
    }

    /// Writes an atomic batch; returns the LSN of its last change.
    @discardableResult
    public func write(_ operations: [WriteOperation]) async throws -> LSN {
        var request = HTTPClientRequest(url: baseURL + "/v1/write")
        request.method = .POST
        request.headers.add(name: "content-type", value: "application/json")
        request.body = .bytes(ByteBuffer(bytes: WireFormat.encodeWriteRequest(operations)))
        let (body, _) = try await send(request, timeout: configuration.requestTimeout)
        let scanner = JSONScanner(body)
        var lsn: LSN?
        try scanner.forEachMember(of: try scanner.document()) { (name, value) throws(ConcordError) in
            if name == "lsn" { lsn = try scanner.decodeUInt64(value) }
        }
        guard let lsn else { throw ConcordError(.protocolViolation, "write answer without lsn") }
        return lsn
    }

    // MARK: Plumbing

    func get(_ path: String, timeout: Duration? = nil) async throws -> ([UInt8], HTTPHeaders) {
        try await send(HTTPClientRequest(url: baseURL + path), timeout: timeout ?? configuration.requestTimeout)
    }

    /// A read of changes or of a page, whose size this client's options chose.
    func getSized(_ path: String, timeout: Duration? = nil) async throws -> ([UInt8], HTTPHeaders) {
        do {
            return try await get(path, timeout: timeout)
        } catch let error as ConcordError {
            throw Self.refusedSizedRead(error, path: path)
        }
    }

    /// A read of changes or of a page that the publisher calls malformed is one this client's
    /// options shaped (pages larger than a publisher serves that does not say its limit in the
    /// feed): asked again, it is refused again, so it is reported as a configuration error,
    /// which stops a subscriber when the feed gave no limit.
    static func refusedSizedRead(_ error: ConcordError, path: String) -> ConcordError {
        guard error.code == .invalidRequest else { return error }
        let request = path.split(separator: "?").first.map(String.init) ?? path
        return ConcordError(
            .invalidConfiguration,
            "the publisher refuses GET \(request): \(error.message); check follow --page-size against the "
                + "publisher's serve --max-page-size")
    }

    func authorize(_ request: inout HTTPClientRequest) {
        if let token = configuration.token {
            request.headers.replaceOrAdd(name: "authorization", value: "Bearer \(token)")
        }
        if let name = configuration.subscriberName {
            request.headers.replaceOrAdd(name: "concord-subscriber", value: name)
        }
    }

    func send(_ request: HTTPClientRequest, timeout: Duration) async throws -> ([UInt8], HTTPHeaders) {
        var request = request
        authorize(&request)
        let response: HTTPClientResponse
        let body: ByteBuffer
        do {
            response = try await http.execute(request, timeout: .nanoseconds(timeout.nanoseconds))
            body = try await response.body.collect(upTo: configuration.maxResponseBytes)
        } catch let error as CancellationError {
            throw error
        } catch {
            throw ConcordError(.unavailable, "cannot reach \(baseURL): \(error)")
        }
        received.add(body.readableBytes)
        guard response.status == .ok else {
            throw Self.failure(status: response.status, body: Array(buffer: body))
        }
        return (Array(buffer: body), response.headers)
    }

    static func failure(status: HTTPResponseStatus, body: [UInt8]) -> ConcordError {
        if let error = WireFormat.decodeError(body) {
            // A server-side failure is worth retrying; a refusal of the request is not.
            if status.code >= 500 { return ConcordError(.unavailable, "\(error.code): \(error.message)") }
            return error
        }
        return ConcordError(status.code >= 500 ? .unavailable : .protocolViolation, "HTTP \(status.code)")
    }
}

extension Duration {
    var nanoseconds: Int64 {
        components.seconds * 1_000_000_000 + components.attoseconds / 1_000_000_000
    }
}
