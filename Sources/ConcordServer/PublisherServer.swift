import ConcordCore
import ConcordSQLite
import HTTPTypes
import Hummingbird
import HummingbirdCore
import HummingbirdTLS
import Logging
import NIOCore
import NIOSSL
import ServiceLifecycle
import Synchronization

/// The publisher's HTTP API (protocol v1) over a ``PublisherStore``.
///
/// Build one with ``makeApplication(store:configuration:logger:onServerRunning:)`` and run
/// it in a `ServiceGroup`; on graceful shutdown open streams end at a whole transaction,
/// so every subscriber resumes from a clean position.
public enum PublisherServer {
    public struct Configuration: Sendable {
        public var host = "127.0.0.1"
        public var port = 7070
        /// Largest request body accepted (`POST /v1/write`).
        public var maxBodyBytes = 16 << 20
        /// Default and largest number of changes a pull returns.
        public var defaultChangeLimit = 1000
        public var maxChangeLimit = 10_000
        /// Default and largest snapshot page.
        public var defaultPageLimit = 1000
        public var maxPageLimit = 10_000
        /// Longest long-poll wait a client may ask for.
        public var maxWait: Duration = .seconds(60)
        /// How often an idle stream sends a heartbeat line.
        public var heartbeatInterval: Duration = .seconds(5)
        /// Changes read from the log at a time for a stream.
        public var streamBatch = 4096
        /// Bytes of change lines a stream writes at a time (a longer line goes alone). A
        /// reader is cut as stalled when its connection stays full for `stalledClientTimeout`,
        /// and each write must drain first: at the defaults any reader faster than 35 KB/s
        /// keeps up. For 225-byte values a write holds about as many lines as `streamBatch`.
        public var streamWriteBytes = 1 << 20
        /// Change streams one token may hold open at once (without tokens only `maxStreams` applies).
        public var maxStreamsPerToken = 16
        /// Change streams open at once in all.
        public var maxStreams = 512
        /// A client that reads nothing for this long while the publisher has bytes for it is
        /// disconnected, so a stuck reader holds no more than its socket's buffers.
        public var stalledClientTimeout: Duration = .seconds(30)
        /// A request body must arrive within this time.
        public var requestBodyTimeout: Duration = .seconds(30)
        /// A connection with no request in progress is closed after this long; a request's head
        /// must arrive within it too.
        public var idleTimeout: Duration = .seconds(75)
        /// Serve HTTPS with this certificate (PEM chain) and private key (PEM).
        public var tls: TLSFiles?
        /// Fault injection for tests: drop every n-th item of `/v1/changes/stream`.
        public var dropEveryNthStreamItem: Int?
        /// Refuses `POST /v1/write` with this reason (set when the records are captured from
        /// another database, which alone may change them).
        public var writesRefused: String?
        /// The bearer tokens accepted; `nil`: every request is served (a publisher on loopback
        /// or behind a gateway).
        public var access: AccessGate?
        /// Why the publisher is not ready to serve (`nil`: ready), for `/readyz`.
        public var readiness: @Sendable () -> String? = { nil }
        /// Where the metrics are kept; the caller may keep a reference to read them.
        public var metrics = PublisherMetrics()
        /// The subscribers known to the dashboard and the metrics.
        public var subscribers = SubscriberRegistry()

        public init() {}
    }

    /// A certificate chain and its private key, both PEM files.
    public struct TLSFiles: Sendable, Hashable {
        public var certificate: String
        public var key: String
        public init(certificate: String, key: String) {
            self.certificate = certificate
            self.key = key
        }
    }

    public static func makeApplication(
        store: PublisherStore,
        configuration: Configuration = Configuration(),
        logger: Logger = Logger(label: "concord.publisher"),
        onServerRunning: @escaping @Sendable (Int) async -> Void = { _ in }
    ) throws -> some ApplicationProtocol {
        let router = Router(context: BasicRequestContext.self)
        let metrics = configuration.metrics
        metrics.countWrites(from: store.head)
        router.add(middleware: ErrorMiddleware(logger: logger, metrics: metrics))
        let api = API(store: store, configuration: configuration, logger: logger)
        let gate = configuration.access
        /// The request's token, which must have `role` (`nil` when no tokens are configured).
        @Sendable func token(_ request: Request, _ role: AccessRole) throws -> AccessToken? {
            guard let gate else { return nil }
            let token = try gate.policy.authenticate(request.headers[.authorization])
            try token.require(role)
            return token
        }
        /// Checks the token may touch the collection named in the path, and returns the name.
        @Sendable func collection(_ request: Request, _ context: BasicRequestContext) throws -> String {
            let name = try context.parameters.require("collection")
            _ = try token(request, .read)?.scope([name])
            return name
        }
        /// Why the publisher is not ready (`nil`: ready).
        @Sendable func notReady() -> String? {
            store.headWatch.isClosed ? "shutting down" : configuration.readiness()
        }
        @Sendable func overview() async throws -> PublisherOverview {
            try await PublisherOverview.gather(
                store: store, registry: configuration.subscribers, openStreams: api.slots.openCount,
                readiness: notReady())
        }
        router.addHealthChecks(readiness: notReady)
        router.get("/metrics") { request, _ in
            _ = try token(request, .admin)
            return Response.prometheus(metrics.render(try await overview()))
        }
        router.get("/") { request, _ in
            if let gate {
                // Browsers send a password they prompt for (Basic) where a program sends Bearer.
                do {
                    try gate.policy.authenticate(dashboardCredentials: request.headers[.authorization]).require(.admin)
                } catch let error as ConcordError where error.code == .unauthorized {
                    var headers = HTTPFields()
                    headers[.wwwAuthenticate] = "Basic realm=\"concord\", charset=\"UTF-8\""
                    headers[.contentType] = "text/plain; charset=utf-8"
                    return Response(
                        status: .unauthorized, headers: headers,
                        body: ResponseBody(
                            byteBuffer: ByteBuffer(string: "an admin token is needed: give it as the password\n")))
                }
            }
            var headers = HTTPFields()
            headers[.contentType] = "text/html; charset=utf-8"
            headers[.cacheControl] = "no-store"
            let page = Dashboard.render(try await overview())
            return Response(status: .ok, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(string: page)))
        }
        router.get("/v1/feed") { request, _ in try await api.feed(token: try token(request, .read)) }
        router.get("/v1/changes") { request, _ in try await api.changes(request, token: try token(request, .read)) }
        router.get("/v1/changes/stream") { request, _ in
            let holder = try token(request, .read)
            // A token revoked or changed while its stream is open ends the stream.
            return try await api.stream(request, token: holder) {
                guard let gate, let holder else { return true }
                return gate.policy.tokens.contains(holder)
            }
        }
        router.get("/v1/collections/:collection/records") { request, context in
            try await api.page(request, collection: try collection(request, context))
        }
        router.get("/v1/collections/:collection/symbols") { request, context in
            try await api.symbols(request, collection: try collection(request, context))
        }
        router.post("/v1/collections/:collection/lookup") { request, context in
            try await api.lookup(request, collection: try collection(request, context))
        }
        router.post("/v1/subscribers/report") { request, _ in
            _ = try token(request, .read)
            return try await api.report(request)
        }
        router.post("/v1/write") { request, _ in
            try await api.write(request, token: try token(request, .write))
        }
        let stalledAfter = TimeAmount(configuration.stalledClientTimeout)
        let http1 = HTTPServerBuilder.http1(
            configuration: .init(
                additionalChannelHandlers: [
                    StalledClientHandler(timeout: stalledAfter), CloseAfterWritesHandler(timeout: stalledAfter),
                ],
                idleTimeout: TimeAmount(configuration.idleTimeout)))
        let server = try configuration.tls.map { files in
            try HTTPServerBuilder.tls(http1, tlsConfiguration: try files.load())
        }
        return Application(
            router: router,
            server: server ?? http1,
            configuration: .init(address: .hostname(configuration.host, port: configuration.port), serverName: nil),
            onServerRunning: { channel in await onServerRunning(channel.localAddress?.port ?? configuration.port) },
            logger: logger
        )
    }
}

extension PublisherServer.TLSFiles {
    /// The server's TLS configuration, or an `invalid_configuration` error naming the file at fault.
    func load() throws -> TLSConfiguration {
        let chain: [NIOSSLCertificate]
        do {
            chain = try NIOSSLCertificate.fromPEMFile(certificate)
        } catch {
            throw ConcordError(.invalidConfiguration, "cannot read the TLS certificate \(certificate): \(error)")
        }
        guard !chain.isEmpty else {
            throw ConcordError(.invalidConfiguration, "no PEM certificate in \(certificate)")
        }
        let privateKey: NIOSSLPrivateKey
        do {
            privateKey = try NIOSSLPrivateKey(file: key, format: .pem)
        } catch {
            throw ConcordError(.invalidConfiguration, "cannot read the TLS private key \(key): \(error)")
        }
        return TLSConfiguration.makeServerConfiguration(
            certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(privateKey))
    }
}

/// Closes a connection whose peer has read nothing for `timeout` while bytes wait for it
/// (the channel stayed unwritable): a stuck stream reader then holds only its socket's buffers.
final class StalledClientHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = NIOAny
    let timeout: TimeAmount
    private var deadline: Scheduled<Void>?

    init(timeout: TimeAmount) {
        self.timeout = timeout
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            deadline?.cancel()
            deadline = nil
        } else if deadline == nil {
            // Closed from here, toward the socket: ``CloseAfterWritesHandler`` (nearer the
            // application) would hold this close back for the very writes that stalled.
            let boundContext = NIOLoopBound(context, eventLoop: context.eventLoop)
            deadline = context.eventLoop.scheduleTask(in: timeout) { boundContext.value.close(promise: nil) }
        }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        deadline?.cancel()
        deadline = nil
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        deadline?.cancel()
        deadline = nil
    }
}

/// Holds a connection's close until the response bytes already queued on it are written.
///
/// On graceful shutdown Hummingbird closes a connection as soon as it has queued a response's
/// end, and a closed channel drops what it still had queued: a stream to a reader slower than
/// the publisher lost its last megabytes, the rest of the transaction it had promised to finish.
/// After `timeout` (a reader that stopped reading), or at a second close, it closes at once.
/// It must come after ``StalledClientHandler`` in the pipeline, which closes past it.
final class CloseAfterWritesHandler: ChannelOutboundHandler, RemovableChannelHandler {
    typealias OutboundIn = NIOAny
    let timeout: TimeAmount
    private var unwritten = 0
    private var held: (mode: CloseMode, promise: EventLoopPromise<Void>?, deadline: Scheduled<Void>)?

    init(timeout: TimeAmount) {
        self.timeout = timeout
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let written = promise ?? context.eventLoop.makePromise(of: Void.self)
        unwritten += 1
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let boundContext = NIOLoopBound(context, eventLoop: context.eventLoop)
        written.futureResult.whenComplete { _ in
            handler.value.unwritten -= 1
            if handler.value.unwritten == 0 { handler.value.releaseClose(context: boundContext.value) }
        }
        context.write(data, promise: written)
    }

    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        guard held == nil, unwritten > 0 else {
            releaseClose(context: context)
            context.close(mode: mode, promise: promise)
            return
        }
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let boundContext = NIOLoopBound(context, eventLoop: context.eventLoop)
        let deadline = context.eventLoop.scheduleTask(in: timeout) {
            handler.value.releaseClose(context: boundContext.value)
        }
        held = (mode, promise, deadline)
        // Writes not flushed yet would wait for the deadline.
        context.flush()
    }

    /// Passes on the close held back, if any.
    private func releaseClose(context: ChannelHandlerContext) {
        guard let close = held else { return }
        held = nil
        close.deadline.cancel()
        context.close(mode: close.mode, promise: close.promise)
    }
}

/// Ends open change streams when the service group begins a graceful shutdown.
///
/// Place it after the application in the group: services stop in reverse order, so the
/// streams end (at a transaction boundary) before the server waits for open requests.
public struct PublisherMaintenance: Service {
    let store: PublisherStore
    let pruneInterval: Duration
    let logger: Logger

    public init(store: PublisherStore, pruneInterval: Duration = .seconds(30), logger: Logger) {
        self.store = store
        self.pruneInterval = pruneInterval
        self.logger = logger
    }

    /// Records time-based checkpoints and prunes the log until shutdown.
    public func run() async throws {
        let tick = min(store.configuration.checkpoints.interval, pruneInterval)
        await cancelWhenGracefulShutdown {
            var lastPrune = ContinuousClock.now
            while !Task.isCancelled {
                try? await Task.sleep(for: tick)
                do {
                    try await store.checkpointIfDue()
                    if ContinuousClock.now - lastPrune >= pruneInterval {
                        lastPrune = .now
                        let dropped = try await store.pruneLog()
                        if dropped > 0 { logger.info("pruned the log", metadata: ["changes": "\(dropped)"]) }
                    }
                } catch {
                    // Shutdown cancels the work in flight; that is no failure.
                    if Task.isCancelled || error is CancellationError { return }
                    logger.warning("maintenance failed", metadata: ["error": "\(error)"])
                }
            }
        }
    }
}

public struct StreamCloser: Service {
    let headWatch: HeadWatch

    public init(store: PublisherStore) {
        headWatch = store.headWatch
    }

    public func run() async throws {
        try? await gracefulShutdown()
        headWatch.close()
    }
}

extension Response {
    static func json(_ bytes: [UInt8], status: HTTPResponse.Status = .ok, headers: HTTPFields = [:]) -> Response {
        var fields = headers
        fields[.contentType] = "application/json"
        return Response(status: status, headers: fields, body: ResponseBody(byteBuffer: ByteBuffer(bytes: bytes)))
    }
}

/// Turns every error into `{"error":{"code","message"}}` with the fitting status, in one place,
/// and counts requests and errors for the metrics.
struct ErrorMiddleware<Context: RequestContext>: RouterMiddleware {
    let logger: Logger
    /// Where requests and errors are counted (`nil`: nowhere).
    let metrics: PublisherMetrics?

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response)
        async throws -> Response
    {
        metrics?.requests.increment()
        do {
            return try await next(request, context)
        } catch let error as ConcordError {
            metrics?.failed(error.code)
            var response = Response.json(WireFormat.encode(error), status: Self.status(for: error.code))
            if error.code == .unauthorized { response.headers[.wwwAuthenticate] = "Bearer realm=\"concord\"" }
            return response
        } catch let error as any HTTPResponseError {
            let code: ConcordError.Code =
                switch error.status {
                case .notFound: .notFound
                case .contentTooLarge: .tooLarge
                case .badRequest: .invalidRequest
                default: .internal
                }
            metrics?.failed(code)
            let message = error.status == .contentTooLarge ? "request body too large" : "\(error.status)"
            return Response.json(WireFormat.encode(ConcordError(code, message)), status: error.status)
        } catch {
            metrics?.failed(.internal)
            logger.error("request failed", metadata: ["path": "\(request.uri.path)", "error": "\(error)"])
            return Response.json(
                WireFormat.encode(ConcordError(.internal, "internal error")), status: .internalServerError)
        }
    }

    static func status(for code: ConcordError.Code) -> HTTPResponse.Status {
        switch code {
        case .invalidRequest, .beyondHead: .badRequest
        case .tooLarge: .contentTooLarge
        case .unknownCollection, .notFound: .notFound
        case .gone: .gone
        case .writesRefused: .conflict
        case .unauthorized: .unauthorized
        case .forbidden: .forbidden
        case .unavailable: .serviceUnavailable
        case .tooManyRequests: .tooManyRequests
        case .timeout: .requestTimeout
        default: .internalServerError
        }
    }
}

/// The handlers; each parses its parameters strictly and fails before touching the store.
struct API: Sendable {
    let store: PublisherStore
    let configuration: PublisherServer.Configuration
    let logger: Logger
    let slots: StreamSlots
    var metrics: PublisherMetrics { configuration.metrics }
    var subscribers: SubscriberRegistry { configuration.subscribers }

    init(store: PublisherStore, configuration: PublisherServer.Configuration, logger: Logger) {
        self.store = store
        self.configuration = configuration
        self.logger = logger
        slots = StreamSlots(perToken: configuration.maxStreamsPerToken, total: configuration.maxStreams)
    }

    static let subscriberField = HTTPField.Name(SubscriberRegistry.nameField)!

    /// The subscriber a request comes from, when it names itself.
    static func subscriber(_ request: Request) throws(ConcordError) -> String? {
        guard let name = request.headers[subscriberField] else { return nil }
        try SubscriberReport.validate(name: name)
        return name
    }

    /// The request body, at most `limit` bytes, arriving within the configured time.
    func body(of request: Request, upTo limit: Int) async throws -> [UInt8] {
        let body = request.body
        let timeout = configuration.requestBodyTimeout
        return try await withThrowingTaskGroup(of: ByteBuffer?.self) { group in
            group.addTask {
                do {
                    return try await body.collect(upTo: limit)
                } catch let error as any HTTPResponseError {
                    throw error
                } catch is CancellationError {
                    throw CancellationError()
                } catch {
                    // A body the HTTP decoder rejects (a bad chunk size, say) is the client's fault.
                    throw ConcordError(.invalidRequest, "the request body is malformed: \(error)")
                }
            }
            group.addTask {
                try await Task.sleep(for: timeout)
                return nil
            }
            defer { group.cancelAll() }
            guard case .some(.some(let buffer)) = try await group.next() else {
                throw ConcordError(.timeout, "the request body did not arrive within \(timeout)")
            }
            return Array(buffer: buffer)
        }
    }

    /// `POST /v1/subscribers/report`: a subscriber's position, proof and repairs, for display.
    func report(_ request: Request) async throws -> Response {
        let report = try SubscriberReport.decode(try await body(of: request, upTo: 4096))
        guard report.position <= store.head else {
            throw ConcordError(.beyondHead, "position \(report.position) is beyond the head LSN \(store.head)")
        }
        subscribers.reported(report)
        return Response.json(Array("{\"status\":\"ok\"}\n".utf8))
    }

    /// The feed; a token limited to some collections sees only those.
    func feed(token: AccessToken?) async throws -> Response {
        var feed = try await store.feedInfo()
        if let allowed = token?.collections { feed.collections.removeAll { !allowed.contains($0.name) } }
        feed.limit = min(configuration.maxChangeLimit, configuration.maxPageLimit)
        return Response.json(WireFormat.encode(feed))
    }

    func changes(_ request: Request, token: AccessToken?) async throws -> Response {
        let query = request.uri.queryParameters
        let after = try Self.lsn(query["after"], name: "after")
        let limit = try Self.integer(
            query["limit"], name: "limit", default: configuration.defaultChangeLimit,
            range: 1...configuration.maxChangeLimit)
        let maxWaitSeconds = Int(configuration.maxWait.components.seconds)
        let wait = try Self.integer(query["wait"], name: "wait", default: 0, range: 0...maxWaitSeconds)
        let collections = try Self.scope(try Self.collections(query["collections"]), token: token)
        let includeBefore = try Self.flag(query["before"], name: "before")
        let subscriber = try Self.subscriber(request)
        try await store.checkPosition(after)
        var items = try await store.items(after: after, limit: limit, collections: collections)
        if items.isEmpty, wait > 0 {
            _ = await store.headWatch.wait(beyond: after, timeout: .seconds(wait))
            items = try await store.items(after: after, limit: limit, collections: collections)
        }
        let checkpoints = try await store.checkpoints(after: after, through: items.last?.lastLSN ?? after)
        var writer = JSONWriter(
            capacity: WireFormat.encodedSize(of: items, includeBefore: includeBefore, checkpoints: checkpoints))
        Self.append(
            items, checkpoints: checkpoints, collections: collections, includeBefore: includeBefore, to: &writer)
        served(subscriber, after: after, items: items, bytes: writer.bytes.count)
        var headers = HTTPFields()
        headers[.contentType] = "application/x-ndjson"
        headers[Self.headField] = String(store.head)
        return Response(status: .ok, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(bytes: writer.bytes)))
    }

    static let headField = HTTPField.Name("Concord-Head")!

    func stream(
        _ request: Request, token: AccessToken?, stillAllowed: @escaping @Sendable () -> Bool = { true }
    ) async throws -> Response {
        let query = request.uri.queryParameters
        let after = try Self.lsn(query["after"], name: "after")
        let collections = try Self.scope(try Self.collections(query["collections"]), token: token)
        let includeBefore = try Self.flag(query["before"], name: "before")
        let subscriber = try Self.subscriber(request)
        try await store.checkPosition(after)
        let store = self.store
        let configuration = self.configuration
        let api = self
        // Held until the response is written or dropped, whichever comes first.
        let lease = try StreamLease(api: self, token: token?.name, subscriber: subscriber, after: after)
        var headers = HTTPFields()
        headers[.contentType] = "application/x-ndjson"
        headers[Self.headField] = String(store.head)
        return Response(
            status: .ok, headers: headers,
            body: ResponseBody { writer in
                defer { lease.release() }
                var cursor = after
                var sent = 0
                // A checkpoint at `after` itself is sent too: a subscriber that reached the head by
                // pulling waits for one at its own position to be verified while the feed is idle.
                var checkpointed = after == 0 ? 0 : after - 1
                // Reads need not end at a transaction's end: a large transaction's first changes
                // go out while the rest are read, and a read holds `streamBatch` changes, not the
                // whole transaction. Ends at a transaction boundary once the publisher begins to
                // shut down.
                var insideTransaction = false
                while !Task.isCancelled, insideTransaction || !store.headWatch.isClosed, stillAllowed() {
                    // Shutting down, the read finishes the transaction and stops at its end.
                    let items = try await store.items(
                        after: cursor, limit: configuration.streamBatch, collections: collections,
                        wholeTransactions: store.headWatch.isClosed)
                    if items.isEmpty {
                        // A time-based checkpoint may land on the last LSN sent after it went out.
                        if checkpointed < cursor,
                            let late = try await store.checkpoints(after: cursor - 1, through: cursor).last
                        {
                            var line = JSONWriter(capacity: 256)
                            WireFormat.append(late.restricted(to: collections), to: &line)
                            try await writer.write(ByteBuffer(bytes: line.bytes))
                            checkpointed = cursor
                        }
                        let head = await store.headWatch.wait(beyond: cursor, timeout: configuration.heartbeatInterval)
                        if head <= cursor, !store.headWatch.isClosed {
                            var line = JSONWriter(capacity: 48)
                            WireFormat.appendHeartbeat(head: head, to: &line)
                            try await writer.write(ByteBuffer(bytes: line.bytes))
                        }
                        continue
                    }
                    let checkpoints = try await store.checkpoints(after: cursor, through: items.last!.lastLSN)
                    if checkpoints.last?.lsn == items.last!.lastLSN { checkpointed = items.last!.lastLSN }
                    var kept = items
                    if let every = configuration.dropEveryNthStreamItem {
                        kept = []
                        for item in items {
                            sent += 1
                            if sent % every != 0 { kept.append(item) }
                        }
                    }
                    // Written in pieces of bounded size: a large transaction is neither held whole
                    // in one buffer nor copied whole into another, the subscriber reads its first
                    // lines while the rest are encoded, and a slow reader drains each write well
                    // within the stalled-client limit.
                    var bytes = 0
                    let runs = WireFormat.runs(
                        of: kept, includeBefore: includeBefore, bytes: configuration.streamWriteBytes)
                    for run in runs {
                        let piece = kept[run]
                        var lines = JSONWriter(
                            capacity: WireFormat.encodedSize(
                                of: piece, includeBefore: includeBefore, checkpoints: checkpoints))
                        Self.append(
                            piece, checkpoints: checkpoints, collections: collections, includeBefore: includeBefore,
                            to: &lines)
                        try await writer.write(ByteBuffer(bytes: lines.bytes))
                        bytes += lines.bytes.count
                    }
                    api.served(subscriber, after: cursor, items: kept, bytes: bytes)
                    cursor = items.last!.lastLSN
                    insideTransaction = !items.last!.isCommit
                }
                try await writer.finish(nil)
            })
    }

    /// Counts changes sent, in all and for the subscriber that asked.
    func served(_ subscriber: String?, after: LSN, items: [StreamItem], bytes: Int) {
        var changes = 0
        for item in items { if case .change = item { changes += 1 } }
        metrics.changesServed.increment(by: Int64(changes))
        metrics.bytesServed.increment(by: Int64(bytes))
        if let subscriber {
            subscribers.served(subscriber, after: after, through: items.last?.lastLSN ?? after, changes: changes)
        }
    }

    /// Writes `items`, each checkpoint right after the item that ends at its LSN.
    static func append(
        _ items: some Collection<StreamItem>, checkpoints: [Checkpoint], collections: Set<String>?,
        includeBefore: Bool, to writer: inout JSONWriter
    ) {
        var next = checkpoints.startIndex
        for item in items {
            WireFormat.append(item, to: &writer, includeBefore: includeBefore)
            while next < checkpoints.endIndex, checkpoints[next].lsn <= item.lastLSN {
                if checkpoints[next].lsn == item.lastLSN {
                    WireFormat.append(checkpoints[next].restricted(to: collections), to: &writer)
                }
                next += 1
            }
        }
    }

    /// `GET /v1/collections/{c}/symbols?at=P&start=i&count=n`: coded symbols i..<i+n of the
    /// collection as it was at P, binary (``SymbolCodec``).
    func symbols(_ request: Request, collection: String) async throws -> Response {
        try CollectionName.validate(collection)
        let query = request.uri.queryParameters
        let at = try Self.lsn(query["at"], name: "at")
        let start = try Self.integer(query["start"], name: "start", default: 0, range: 0...(1 << 30))
        let count = try Self.integer(query["count"], name: "count", default: 64, range: 1...(1 << 20))
        let symbols = try await store.symbols(of: collection, at: at, range: start..<(start + count))
        var bytes: [UInt8] = []
        bytes.reserveCapacity(symbols.count * 42)
        SymbolCodec.encode(symbols, into: &bytes)
        metrics.reconciliationBytes.increment(by: Int64(bytes.count))
        metrics.bytesServed.increment(by: Int64(bytes.count))
        var headers = HTTPFields()
        headers[.contentType] = "application/octet-stream"
        return Response(status: .ok, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(bytes: bytes)))
    }

    /// `POST /v1/collections/{c}/lookup` with a body of 8-byte big-endian key hashes: the
    /// current records with those key hashes, binary (``RecordCodec``).
    func lookup(_ request: Request, collection: String) async throws -> Response {
        try CollectionName.validate(collection)
        let body = try await body(of: request, upTo: configuration.maxBodyBytes)
        guard body.count % 8 == 0 else {
            throw ConcordError(.invalidRequest, "the body must be 8-byte key hashes")
        }
        var hashes: [UInt64] = []
        hashes.reserveCapacity(body.count / 8)
        for offset in stride(from: 0, to: body.count, by: 8) { hashes.append(BinaryWire.readWord(body, offset)) }
        let page = try await store.records(of: collection, keyHashes: hashes)
        var headers = HTTPFields()
        headers[.contentType] = "application/octet-stream"
        let bytes = RecordCodec.encode(lsn: page.lsn, records: page.records)
        metrics.reconciliationBytes.increment(by: Int64(bytes.count))
        metrics.bytesServed.increment(by: Int64(bytes.count))
        return Response(status: .ok, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(bytes: bytes)))
    }

    func page(_ request: Request, collection: String) async throws -> Response {
        try CollectionName.validate(collection)
        let query = request.uri.queryParameters
        let limit = try Self.integer(
            query["limit"], name: "limit", default: configuration.defaultPageLimit,
            range: 1...configuration.maxPageLimit)
        let afterKey = query["afterKey"].map(String.init)
        let page = try await store.page(collection: collection, afterKey: afterKey, limit: limit)
        var headers = HTTPFields()
        headers[.contentType] = "application/x-ndjson"
        let bytes = WireFormat.encode(page)
        metrics.bytesServed.increment(by: Int64(bytes.count))
        return Response(status: .ok, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(bytes: bytes)))
    }

    func write(_ request: Request, token: AccessToken?) async throws -> Response {
        if let reason = configuration.writesRefused { throw ConcordError(.writesRefused, reason) }
        let body = try await body(of: request, upTo: configuration.maxBodyBytes)
        let operations = try WireFormat.decodeWriteRequest(body, limits: store.configuration.limits)
        _ = try token?.scope(Set(operations.map(\.collection)))
        let lsn = try await store.write(operations)
        var writer = JSONWriter()
        writer.raw("{\"lsn\":")
        writer.number(lsn)
        writer.raw("}\n")
        return Response.json(writer.bytes)
    }

    // MARK: Parameters

    static func lsn(_ text: Substring?, name: String) throws(ConcordError) -> LSN {
        guard let text else { throw ConcordError(.invalidRequest, "missing query parameter \"\(name)\"") }
        guard text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }), let value = LSN(text) else {
            throw ConcordError(.invalidRequest, "\"\(name)\" must be a non-negative integer below 2^64")
        }
        return value
    }

    static func integer(_ text: Substring?, name: String, default value: Int, range: ClosedRange<Int>)
        throws(ConcordError) -> Int
    {
        guard let text else { return value }
        guard text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }), let number = Int(text), range.contains(number) else {
            throw ConcordError(
                .invalidRequest, "\"\(name)\" must be an integer from \(range.lowerBound) to \(range.upperBound)")
        }
        return number
    }

    static func flag(_ text: Substring?, name: String) throws(ConcordError) -> Bool {
        switch text {
        case nil, "false", "0": return false
        case "true", "1", "": return true
        default: throw ConcordError(.invalidRequest, "\"\(name)\" must be true or false")
        }
    }

    /// The collections a request reads: those asked for, within what its token allows (a token
    /// limited to some collections reads only those when the request names none).
    static func scope(_ requested: Set<String>?, token: AccessToken?) throws(ConcordError) -> Set<String>? {
        guard let token else { return requested }
        return try token.scope(requested)
    }

    static func collections(_ text: Substring?) throws(ConcordError) -> Set<String>? {
        guard let text, !text.isEmpty else { return nil }
        var names = Set<String>()
        for part in text.split(separator: ",") {
            let name = String(part)
            try CollectionName.validate(name)
            names.insert(name)
        }
        return names
    }
}

/// An open stream's slot and its place in the subscriber registry, given back exactly once:
/// when the stream ends, or when its response is dropped unwritten.
final class StreamLease: Sendable {
    let slots: StreamSlots
    let subscribers: SubscriberRegistry
    let token: String
    let subscriber: String?
    private let released = Atomic<Bool>(false)

    init(api: API, token: String?, subscriber: String?, after: LSN) throws(ConcordError) {
        // Taken before the lease exists: a refused lease must not give back (in deinit) what it never took.
        try api.slots.take(for: token ?? "")
        slots = api.slots
        subscribers = api.subscribers
        self.token = token ?? ""
        self.subscriber = subscriber
        if let subscriber { subscribers.streamOpened(subscriber, after: after) }
    }

    func release() {
        guard !released.exchange(true, ordering: .relaxed) else { return }
        slots.release(for: token)
        if let subscriber { subscribers.streamClosed(subscriber) }
    }

    deinit { release() }
}

/// The bearer tokens a publisher accepts, replaceable while it runs: rotating a token is
/// writing the new set and reloading it (SIGHUP, or the file watch), with no restart.
public final class AccessGate: Sendable {
    private let current: Mutex<AccessPolicy>

    public init(_ policy: AccessPolicy) {
        current = Mutex(policy)
    }

    public var policy: AccessPolicy { current.withLock { $0 } }

    public func replace(_ policy: AccessPolicy) {
        current.withLock { $0 = policy }
    }
}
