import AsyncHTTPClient
import ConcordCore
import ConcordSQLite
import Logging
import NIOCore
import ServiceLifecycle
import Synchronization

/// Keeps a replica (``ReplicaStoring``) equal to a publisher's feed: bootstraps a new replica from
/// snapshot pages while following the log, then applies the live stream.
///
/// Runs until cancelled or shut down gracefully. Network failures and publisher
/// restarts are retried with backoff from the position stored in the replica; a replica
/// that belongs to another feed stops it with an error, and so does a page or pull refused
/// by a publisher that does not say its limit.
public final class Subscriber: Service, Sendable {
    public struct Configuration: Sendable {
        /// The publisher, e.g. `http://127.0.0.1:7070`.
        public var source: String
        /// Follow only these collections; `nil`: all.
        public var collections: [String]?
        /// Records per snapshot page.
        public var pageSize = 10_000
        /// Changes per pull while catching up.
        public var pullLimit = 10_000
        /// Changes of a source transaction written together while its rest is still coming: a
        /// store that can (PostgreSQL) writes a large transaction piece by piece inside one
        /// local transaction, instead of waiting for all of it.
        public var transactionPiece = 5_000
        public var backoffInitial: Duration = .milliseconds(100)
        public var backoffMaximum: Duration = .seconds(5)
        /// How often the stored rows are re-hashed and compared with the digests (`nil`: never).
        public var scrubInterval: Duration? = .seconds(3600)
        public var reconciler = Reconciler.Configuration()
        /// Keeps digests, compares checkpoints and scrubs (default). Off only to measure what
        /// proof costs; the store must then not track digests either.
        public var verification = true
        /// The bearer token the publisher requires, if any.
        public var token: String?
        /// The name the publisher shows this subscriber under (dashboard, metrics); `nil`: anonymous.
        public var name: String?
        /// How often the subscriber reports its position, proof and repairs to the publisher
        /// (`nil`: never; only with a name).
        public var reportInterval: Duration? = .seconds(2)
        /// Called as bootstrap pages are written: the collection, records copied and the source's count.
        public var bootstrapProgress: (@Sendable (_ collection: String, _ copied: Int, _ total: Int) -> Void)?

        public init(source: String, collections: [String]? = nil) {
            self.source = source
            self.collections = collections
        }
    }

    /// What the subscriber is doing, for status displays.
    public enum Activity: String, Sendable {
        case starting, bootstrapping, following, verifying, repairing, retrying, stopped
    }

    public let configuration: Configuration
    public let store: any ReplicaStoring
    let client: SourceClient
    let logger: Logger
    let activityBox = ActivityBox()
    let reconciler: Reconciler
    let nextScrub: Mutex<ContinuousClock.Instant>
    /// The largest `limit` the publisher's feed said it takes (`Int.max` until one says).
    let publisherLimit = Atomic<Int>(.max)

    /// Records per snapshot page: as configured, but no more than the publisher serves.
    var pageSize: Int { min(configuration.pageSize, publisherLimit.load(ordering: .relaxed)) }
    /// Changes per pull: as configured, but no more than the publisher serves.
    var pullLimit: Int { min(configuration.pullLimit, publisherLimit.load(ordering: .relaxed)) }

    public init(configuration: Configuration, store: any ReplicaStoring, http: HTTPClient, logger: Logger) {
        self.configuration = configuration
        self.store = store
        var clientConfiguration = SourceClient.Configuration()
        clientConfiguration.requestsBefore = configuration.verification
        clientConfiguration.token = configuration.token
        clientConfiguration.subscriberName = configuration.name
        self.client = SourceClient(baseURL: configuration.source, http: http, configuration: clientConfiguration)
        self.logger = logger
        reconciler = Reconciler(client: client, configuration: configuration.reconciler, logger: logger)
        nextScrub = Mutex(.now + (configuration.scrubInterval ?? .seconds(0)))
    }

    public var activity: Activity { activityBox.value }

    /// This subscriber's Prometheus metrics (served by `follow --metrics-port`).
    public let metrics = SubscriberMetrics()

    /// Bytes received from the publisher since this subscriber was made.
    public var bytesReceived: Int { client.received.value }

    /// Holes in the stream (messages lost on the wire) refilled by a pull, and the bytes those pulls took.
    public var refills: (holes: Int, bytes: Int) { refillCounts.withLock { $0 } }
    let refillCounts = Mutex<(holes: Int, bytes: Int)>((0, 0))

    /// Source transactions written in pieces as they came (see ``Configuration/transactionPiece``).
    public var transactionsWrittenInPieces: Int { piecedTransactions.load(ordering: .relaxed) }
    let piecedTransactions = Atomic<Int>(0)

    /// Bytes that reconciliations sent and received (symbols, lookups and the records repaired).
    public var reconciliationBytes: Int { reconciledBytes.withLock { $0 } }
    let reconciledBytes = Mutex(0)

    public func run() async throws {
        defer { activityBox.value = .stopped }
        try await cancelWhenGracefulShutdown {
            try await withThrowingTaskGroup(of: Void.self) { group in
                if let interval = self.configuration.reportInterval, self.configuration.name != nil {
                    group.addTask { await self.reportLoop(every: interval) }
                }
                try await self.sessions()
                group.cancelAll()
            }
        }
    }

    /// Sessions, one after another, with backoff between failures, until cancelled.
    func sessions() async throws {
        var backoff = Backoff(initial: configuration.backoffInitial, maximum: configuration.backoffMaximum)
        while !Task.isCancelled {
            // Only a session that moved the replica, or lasted longer than the longest wait,
            // starts the backoff over: one that reaches the publisher and then fails the same way
            // each time (a stream refused with 429, a replica database that refuses writes) would
            // otherwise be retried at once, forever.
            let before = try? await store.state()
            let started = ContinuousClock.now
            do {
                try await session()
                backoff.reset()
            } catch let error as ConcordError
                where Self.stops(on: error, publisherSaidLimit: publisherLimit.load(ordering: .relaxed) != .max)
            {
                // Trying again cannot help: another feed, or options the publisher refuses.
                metrics.failed(error.code)
                logger.error("stopping: \(error.message)")
                throw error
            } catch is CancellationError {
                return
            } catch let error as ConcordError where [.unauthorized, .forbidden].contains(error.code) {
                // The publisher's tokens may be fixed while this waits: keep trying, loudly.
                if Task.isCancelled { return }
                metrics.failed(error.code)
                activityBox.value = .retrying
                let delay = backoff.next()
                logger.error(
                    "the publisher refuses this subscriber's token; check --token",
                    metadata: ["error": "\(error.message)", "in": "\(delay)"])
                try? await Task.sleep(for: delay)
            } catch {
                if Task.isCancelled { return }
                metrics.failed((error as? ConcordError)?.code ?? .internal)
                activityBox.value = .retrying
                // A long healthy session that finally breaks is retried promptly, as is one that
                // moved the replica.
                let after = try? await store.state()
                if ContinuousClock.now - started >= configuration.backoffMaximum || Self.moved(from: before, to: after)
                {
                    backoff.reset()
                }
                let delay = backoff.next()
                logger.warning("source unavailable, retrying", metadata: ["error": "\(error)", "in": "\(delay)"])
                try? await Task.sleep(for: delay)
            }
        }
    }

    /// Tells the publisher where this replica is, what it proved and what it repaired, until
    /// cancelled. Failures are only logged: reports are for display.
    func reportLoop(every interval: Duration) async {
        guard let name = configuration.name else { return }
        while !Task.isCancelled {
            do {
                if let state = try await store.state() {
                    metrics.noteLag(position: state.position, head: state.sourceHead)
                    try await client.report(
                        SubscriberReport(
                            name: name, activity: activity.rawValue, position: state.position,
                            verifiedLSN: min(state.verifiedLSN, state.position), repairs: state.repairs,
                            repairedRecords: state.repairedRecords, mismatches: state.mismatches))
                }
            } catch is CancellationError {
                return
            } catch {
                logger.debug("report not delivered", metadata: ["error": "\(error)"])
            }
            try? await Task.sleep(for: interval)
        }
    }

    /// Whether `error` ends the subscriber rather than being retried: a replica of another feed,
    /// or a page or pull refused by a publisher that does not say its limit. One that says it
    /// may have lowered it since the session read it: the next session reads it again.
    public static func stops(on error: ConcordError, publisherSaidLimit: Bool) -> Bool {
        switch error.code {
        case .feedMismatch: true
        case .invalidConfiguration: !publisherSaidLimit
        default: false
        }
    }

    /// Whether the replica moved between two readings: its position, its bootstrap, what it
    /// proved or repaired.
    static func moved(from before: ReplicaState?, to after: ReplicaState?) -> Bool {
        before?.position != after?.position || before?.progress != after?.progress
            || before?.verifiedLSN != after?.verifiedLSN || before?.repairs != after?.repairs
    }

    /// One connection's worth of work: check the feed, bootstrap if needed, follow.
    func session() async throws {
        activityBox.value = .starting
        let feed = try await client.feed()
        let limit = feed.limit ?? .max
        if publisherLimit.exchange(limit, ordering: .relaxed) != limit, configuration.pageSize > limit {
            logger.info(
                "the publisher serves at most \(limit) records a request: pages and pulls ask for that many",
                metadata: ["page_size": "\(configuration.pageSize)"])
        }
        var state = try await store.state()
        if state == nil {
            let paged = Self.followed(feed, filter: configuration.collections)
            state = try await store.initialize(
                feedID: feed.feedID, source: configuration.source, head: feed.head, collections: paged,
                filter: configuration.collections)
            logger.info("new replica", metadata: ["feed": "\(feed.feedID)", "head": "\(feed.head)"])
        }
        guard let state else { return }
        guard state.feedID == feed.feedID else {
            throw ConcordError(
                .feedMismatch,
                "this replica follows feed \(state.feedID), but \(configuration.source) serves feed \(feed.feedID)")
        }
        guard state.position <= feed.head else {
            throw ConcordError(
                .feedMismatch,
                "this replica is at LSN \(state.position), past the source's head \(feed.head): the source lost changes"
            )
        }
        try await store.noteSourceHead(feed.head)
        if state.progress.phase == .bootstrapping {
            activityBox.value = .bootstrapping
            do {
                guard state.position + 1 >= feed.oldest else { throw ConcordError(.gone, "") }
                try await bootstrap(state)
            } catch let error as ConcordError where error.code == .gone {
                try await restartBootstrap()
                return
            }
        }
        if state.position + 1 < feed.oldest {
            try await recoverPastRetention()
            return
        }
        try await prepareDigests()
        // A replica at the head can be verified against the feed's digests right away.
        let digests = Dictionary(
            feed.collections.compactMap { collection in collection.digest.map { (collection.name, $0) } },
            uniquingKeysWith: { first, _ in first })
        if try await store.state()?.position == feed.head, digests.count == feed.collections.count {
            try await verify(Checkpoint(lsn: feed.head, digests: digests))
        }
        if let interval = configuration.scrubInterval, nextScrub.withLock({ $0 }) <= .now {
            nextScrub.withLock { $0 = .now + interval }
            try await scrub()
        }
        activityBox.value = .following
        do {
            try await follow()
        } catch let error as ConcordError where error.code == .gone {
            try await recoverPastRetention()
        }
    }

    // MARK: Verification

    /// Builds digests and sketches from the stored rows when they are not known yet, once
    /// changes apply in LSN order.
    func prepareDigests() async throws {
        guard configuration.verification, let state = try await store.state(), state.progress.phase == .following,
            state.progress.applyMode(position: state.position) == .ordered, try await !store.digestsReady()
        else { return }
        activityBox.value = .verifying
        let started = ContinuousClock.now
        try await store.rebuildDigests()
        logger.info(
            "digests built from the stored rows",
            metadata: ["position": "\(state.position)", "seconds": "\(Reconciler.seconds(since: started))"])
    }

    /// Re-hashes the stored rows; repairs the collections changed behind Concord's back.
    public func scrub() async throws {
        guard configuration.verification, let state = try await store.state(), state.progress.phase == .following,
            state.progress.applyMode(position: state.position) == .ordered
        else { return }
        activityBox.value = .verifying
        let changed = try await store.scrub()
        for scanned in changed {
            logger.warning(
                "rows changed behind Concord's back, reconciling", metadata: ["collection": "\(scanned.collection)"])
            try await store.adopt(scanned, countingMismatch: true)
            try await reconcile(scanned.collection, at: state.position, local: scanned.sketch)
        }
    }

    /// Compares a checkpoint the replica has applied through (or takes the comparison the
    /// apply transaction made, `outcome`); reconciles what differs.
    func verify(_ checkpoint: Checkpoint, outcome: CheckpointOutcome? = nil) async throws {
        guard configuration.verification else { return }
        let judged: CheckpointOutcome
        if let outcome { judged = outcome } else { judged = try await store.check(checkpoint) }
        switch judged {
        case .verified:
            metrics.verifications.increment()
            logger.debug("verified", metadata: ["lsn": "\(checkpoint.lsn)"])
        case .notJudged:
            logger.debug("checkpoint not judged", metadata: ["lsn": "\(checkpoint.lsn)"])
        case .mismatch(let collections):
            logger.warning(
                "digest differs from the source's checkpoint, reconciling",
                metadata: ["lsn": "\(checkpoint.lsn)", "collections": "\(collections.joined(separator: ","))"])
            // The rows are what must equal the source: compare from a scan of them, which also
            // resets a kept digest that had drifted from the rows.
            let scanned = try await store.scanAll()
            for collection in collections {
                let rows =
                    scanned[collection]
                    ?? ScannedCollection(
                        collection: collection, digest: .empty,
                        sketch: RatelessSketch(capacity: ReplicaSketch.capacity))
                try await store.adopt(rows)
                try await reconcile(collection, at: checkpoint.lsn, local: rows.sketch)
            }
            if case .mismatch = try await store.check(checkpoint) {
                logger.error("still differs after reconciliation", metadata: ["lsn": "\(checkpoint.lsn)"])
            }
        }
    }

    @discardableResult
    func reconcile(_ collection: String, at lsn: LSN, local: RatelessSketch) async throws -> ReconciliationReport {
        activityBox.value = .repairing
        defer { activityBox.value = .following }
        let report = try await reconciler.reconcile(collection, at: lsn, local: local, store: store, repair: true)
        reconciledBytes.withLock { $0 += report.totalBytes + report.recordBytes }
        logger.info(
            "reconciled",
            metadata: [
                "collection": "\(collection)", "lsn": "\(lsn)", "missing": "\(report.missing.count)",
                "extra": "\(report.extra.count)", "stale": "\(report.stale.count)", "symbols": "\(report.symbols)",
                "bytes": "\(report.totalBytes + report.recordBytes)", "recopy": "\(report.tooLarge)",
            ])
        return report
    }

    /// The log no longer holds the changes after the replica's position: reconcile every
    /// collection against the source's state at its head, then follow from there.
    func recoverPastRetention() async throws {
        let feed = try await client.feed()
        guard let state = try await store.state() else { return }
        logger.warning(
            "the source's log no longer reaches back to this replica, reconciling",
            metadata: ["position": "\(state.position)", "oldest": "\(feed.oldest)", "head": "\(feed.head)"])
        // One scan builds the kept sketches for every collection, rather than one per collection here
        // and another when following resumes.
        try await prepareDigests()
        let followed = state.collections.map(Set.init)
        var names = Set(feed.collections.map(\.name)).union(try await store.collections())
        if let followed { names.formIntersection(followed) }
        for collection in names.sorted() {
            try await reconcile(collection, at: feed.head, local: try await store.sketch(of: collection))
        }
        try await store.jump(to: feed.head)
    }

    // MARK: Bootstrap

    /// The feed's collections a replica pages through: those the filter names, or all.
    static func followed(_ feed: FeedInfo, filter: [String]?) -> [String] {
        let available = feed.collections.map(\.name)
        return filter.map { wanted in available.filter(wanted.contains) } ?? available
    }

    /// The log no longer reaches back to this bootstrapping replica: the changes that would
    /// bring its copied pages up to date are gone, so it pages every collection again from the
    /// source's head, keeping (and merging by version) what it copied.
    func restartBootstrap() async throws {
        let feed = try await client.feed()
        guard let state = try await store.state() else { return }
        let collections = Self.followed(feed, filter: state.collections)
        logger.warning(
            "the source's log no longer reaches back to this bootstrapping replica, copying again from the head",
            metadata: ["position": "\(state.position)", "oldest": "\(feed.oldest)", "head": "\(feed.head)"])
        try await store.restartBootstrap(at: feed.head, collections: collections)
    }

    func bootstrap(_ state: ReplicaState) async throws {
        let sizes = Dictionary(
            (try await client.feed().collections).map { ($0.name, $0.count) }, uniquingKeysWith: { first, _ in first })
        for (collection, cursor) in state.progress.remaining.sorted(by: { $0.key < $1.key }) {
            let total = sizes[collection] ?? 0
            logger.info("copying collection", metadata: ["collection": "\(collection)", "records": "\(total)"])
            var page = try await client.page(collection: collection, afterKey: cursor, limit: pageSize)
            var copied = 0
            let started = ContinuousClock.now
            var lastReport = started
            while true {
                let current = page
                var next: SnapshotPage?
                // Fetch the next page while this one is written.
                try await withThrowingTaskGroup(of: SnapshotPage?.self) { group in
                    if current.hasMore, let last = current.records.last?.key {
                        group.addTask {
                            try await self.client.page(
                                collection: collection, afterKey: last, limit: self.pageSize)
                        }
                    }
                    group.addTask {
                        try await self.store.apply(current)
                        return nil
                    }
                    for try await result in group where result != nil { next = result }
                }
                // Keep the log applied alongside, so the replica never falls far behind;
                // a page read at the replica's position says there is nothing to pull.
                if let position = try await store.state()?.position, current.lsn > position {
                    _ = try await pull(maxRounds: 1)
                }
                copied += current.records.count
                configuration.bootstrapProgress?(collection, copied, max(total, copied))
                let now = ContinuousClock.now
                if now - lastReport >= .seconds(2) {
                    lastReport = now
                    let elapsed = now - started
                    let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
                    let rate = seconds > 0 ? Int(Double(copied) / seconds) : 0
                    let remaining = rate > 0 && total > copied ? (total - copied) / rate : 0
                    logger.debug(
                        "bootstrap progress",
                        metadata: [
                            "collection": "\(collection)", "copied": "\(copied)", "of": "\(total)",
                            "records_per_s": "\(rate)", "eta_s": "\(remaining)",
                        ])
                }
                guard let following = next else { break }
                page = following
            }
        }
        while true {
            if try await store.completeBootstrapIfReady() {
                let position = try await store.state()?.position ?? 0
                logger.info("bootstrap complete", metadata: ["position": "\(position)"])
                return
            }
            if try await pull(maxRounds: 1) == 0 {
                throw ConcordError(
                    .protocolViolation, "bootstrap cannot complete: the source's log ends before its pages")
            }
        }
    }

    /// Pulls and applies changes until the source has none newer or `maxRounds` pulls were made;
    /// returns the number of changes applied.
    @discardableResult
    func pull(maxRounds: Int = .max, until target: LSN? = nil) async throws -> Int {
        var total = 0
        for _ in 0..<maxRounds {
            guard let position = try await store.state()?.position else { return total }
            if let target, position >= target { return total }
            let (items, head) = try await client.changes(
                after: position, limit: pullLimit, collections: configuration.collections)
            if let head { try await store.noteSourceHead(head) }
            var sequencer = ChangeSequencer(after: position)
            for item in items {
                if case .gap(let expected, let received) = sequencer.receive(item) {
                    throw ConcordError(.protocolViolation, "pull skipped from \(expected) to \(received)")
                }
            }
            guard let (complete, through) = sequencer.takeComplete() else { return total }
            try await store.apply(complete, through: through)
            total += complete.count
        }
        return total
    }

    // MARK: Following

    /// Applies the live stream. Returns when the stream ends; a hole in it is refilled by a pull first.
    ///
    /// Reading and parsing the stream overlap with writing it: whole transactions go to an
    /// ``ApplyPipeline`` whose writer takes all that waits as one batch while the next ones are
    /// parsed, so the two cores share the work instead of taking turns.
    func follow() async throws {
        guard let position = try await store.state()?.position else { return }
        let response = try await client.stream(after: position, collections: configuration.collections)
        var sequencer = ChangeSequencer(after: position)
        var lines = LineSplitter()
        let bootstrapping = try await store.state()?.progress.phase == .bootstrapping
        let verifying = configuration.verification
        let pipeline = ApplyPipeline(maxBacklog: configuration.pullLimit) { batch, more in
            if batch.continues, let through = batch.through {
                // A large source transaction, written as it comes: the batch that ends it says
                // which checkpoint to judge after the commit.
                var closing: ApplyBacklog.Batch?
                var pieces = 1
                let started = ContinuousClock.now
                self.logger.debug(
                    "a large source transaction is written as it comes",
                    metadata: ["from": "\(batch.items.first?.firstLSN ?? 0)"])
                try await self.store.apply(batch.items, through: through) {
                    while true {
                        guard let next = await more() else {
                            throw ConcordError(.unavailable, "the stream ended inside a source transaction")
                        }
                        // A checkpoint alone cannot be judged inside a transaction.
                        guard let through = next.through else { continue }
                        pieces += 1
                        if !next.continues { closing = next }
                        return StreamPiece(items: next.items, through: through, endsTransaction: !next.continues)
                    }
                }
                self.piecedTransactions.add(1, ordering: .relaxed)
                self.logger.debug(
                    "a large source transaction is written",
                    metadata: [
                        "through": "\(closing?.through ?? through)", "pieces": "\(pieces)",
                        "seconds": "\(Reconciler.seconds(since: started))",
                    ])
                guard let checkpoint = closing?.checkpoint else { return true }
                return try await self.verifyAt(checkpoint)
            }
            guard let through = batch.through else {
                guard let checkpoint = batch.checkpoint else { return true }
                return try await self.verifyAt(checkpoint)
            }
            guard let checkpoint = batch.checkpoint else {
                try await self.store.apply(batch.items, through: through)
                return true
            }
            guard verifying, checkpoint.lsn == through else {
                try await self.store.apply(batch.items, through: through)
                return try await self.verifyAt(checkpoint)
            }
            let outcome = try await self.store.apply(batch.items, through: through, checking: checkpoint)
            return try await self.verifyAt(checkpoint, outcome: outcome)
        }
        let hashesAhead = verifying && !bootstrapping
        // While bootstrapping, only whole transactions: the bootstrap may complete with any.
        let piece = bootstrapping ? Int.max : max(1, configuration.transactionPiece)
        /// Hands whole transactions (and a checkpoint that follows them), or the first pieces of
        /// a large one, to the pipeline; while bootstrapping, waits for them, as the bootstrap may
        /// complete with any of them.
        func submit(checkpoint: Checkpoint? = nil) async throws -> Bool {
            let ready = sequencer.takeReady(minimumPiece: piece)
            guard ready != nil || checkpoint != nil else { return true }
            try await pipeline.submit(
                ready?.items ?? [], through: ready?.through, checkpoint: checkpoint,
                continues: ready?.continues ?? false)
            if bootstrapping {
                try await pipeline.drain()
                if try await store.completeBootstrapIfReady() { return false }
            }
            return true
        }
        /// Writes what came before a hole, then pulls until `target`; the stream starts again.
        func refill(until target: LSN) async throws {
            _ = try await submit()
            try await pipeline.drain()
            let before = client.received.value
            try await pull(until: target)
            let bytes = client.received.value - before
            refillCounts.withLock { $0 = ($0.holes + 1, $0.bytes + bytes) }
        }
        do {
            for try await chunk in response.body {
                client.received.add(chunk.readableBytes)
                lines.append(chunk.readableBytesView)
                while let line = lines.nextRange() {
                    // Hashed here, while the previous batch is written.
                    switch try WireFormat.parseStreamLine(lines.buffer, range: line, hashingAfter: hashesAhead) {
                    case .heartbeat(let head):
                        // A heartbeat goes out only once everything up to the head has: what did
                        // not come was lost on the wire with no later line to show the hole (the
                        // end of the last transaction written, say).
                        if sequencer.received < head {
                            logger.warning(
                                "stream short of the head, refilling by pull",
                                metadata: ["received": "\(sequencer.received)", "head": "\(head)"])
                            try await refill(until: head)
                            return
                        }
                        // The pipeline's writer may hold the replica's write connection open
                        // for the rest of a transaction written in pieces. Handed everything
                        // received, it finishes on its own, unless the transaction's end has not
                        // come yet: then the next heartbeat says the head, and the scrub waits.
                        guard try await submit() else { return }
                        guard !sequencer.isInsideTransaction else { break }
                        try await store.noteSourceHead(head)
                        if scrubDue {
                            try await pipeline.drain()
                            return
                        }
                    case .checkpoint(let checkpoint):
                        // None can be judged inside a transaction (its end was lost on the wire).
                        let judged = sequencer.isInsideTransaction ? nil : checkpoint
                        guard try await submit(checkpoint: judged) else { return }
                    case .item(let item):
                        if case .gap(let expected, let received) = sequencer.receive(item) {
                            logger.warning(
                                "gap in stream, refilling by pull",
                                metadata: ["expected": "\(expected)", "received": "\(received)"])
                            try await refill(until: received)
                            return
                        }
                    }
                    if pipeline.mustStop {
                        try await pipeline.drain()
                        return
                    }
                }
                // Whole transactions go to the pipeline at once: its writer takes them as soon as
                // it is free, together with any that queued while it wrote.
                guard try await submit() else { return }
                if scrubDue, !sequencer.isInsideTransaction {
                    _ = try await submit()
                    try await pipeline.drain()
                    return
                }
            }
            _ = try await submit()
            try await pipeline.drain()
        } catch let error as ConcordError {
            try? await pipeline.drain()
            throw error
        } catch is CancellationError {
            try? await pipeline.drain()
            return
        } catch {
            try? await pipeline.drain()
            if Task.isCancelled { return }
            throw ConcordError(.unavailable, "stream from \(configuration.source) broke: \(error)")
        }
        if !Task.isCancelled { throw ConcordError(.unavailable, "stream from \(configuration.source) ended") }
    }

    /// Compares a checkpoint once the replica is at its LSN; tells the pipeline to stop when the
    /// comparison moved the replica (a collection to copy again), so the session starts over.
    func verifyAt(_ checkpoint: Checkpoint, outcome: CheckpointOutcome? = nil) async throws -> Bool {
        try await verify(checkpoint, outcome: outcome)
        // Verified means the replica is at the checkpoint and following: no need to read it back.
        if outcome == .verified { return true }
        let state = try await store.state()
        return state?.position == checkpoint.lsn && state?.progress.phase == .following
    }
}

/// Writes what the stream reader parsed, behind it: the reader queues whole transactions and
/// goes on parsing; one writer task takes everything that waits (up to the newest checkpoint)
/// as a single batch. With more than `maxBacklog` stream items queued, the reader waits until
/// the writer takes its next batch: memory stays near that bound, not exactly under it.
///
/// A batch that ends inside a source transaction (pieces of a large one) is written with the
/// batches that follow it, which the writer asks for with `more`, until one ends the
/// transaction; `more` gives `nil` once the reader drains without the end, and the batch's
/// work is then rolled back, not reported as a failure.
final class ApplyPipeline: Sendable {
    private struct State: Sendable {
        var backlog = ApplyBacklog()
        var writer: Task<Void, Never>?
        var failure: (any Error)?
        var waitingForSpace: CheckedContinuation<Void, Never>?
        /// The writer, inside a source transaction, waiting for its next piece.
        var waitingForPiece: CheckedContinuation<ApplyBacklog.Batch?, Never>?
        /// The reader is draining: nothing more comes until it returns.
        var draining = false
        /// A transaction was left open when the reader drained: its rollback is no failure.
        var abandoned = false

        /// Takes the next batch; frees a reader that waits for space.
        mutating func take() -> (ApplyBacklog.Batch?, CheckedContinuation<Void, Never>?) {
            defer { waitingForSpace = nil }
            return (backlog.takeBatch(), waitingForSpace)
        }
    }

    private let state = Mutex(State())
    private let stopRequested = Atomic<Bool>(false)
    private let maxBacklog: Int
    /// Writes one batch, asking `more` for the rest of a transaction it leaves open; returns
    /// false to ask the reader to stop (its checkpoint changed the replica's phase).
    private let write: @Sendable (ApplyBacklog.Batch, _ more: () async -> ApplyBacklog.Batch?) async throws -> Bool

    init(
        maxBacklog: Int,
        write: @escaping @Sendable (ApplyBacklog.Batch, _ more: () async -> ApplyBacklog.Batch?) async throws -> Bool
    ) {
        self.maxBacklog = max(1, maxBacklog)
        self.write = write
    }

    /// A batch's work asked the stream to end; what still waited was dropped (the next session
    /// reads it again from the replica's position).
    var mustStop: Bool { stopRequested.load(ordering: .acquiring) }

    /// Queues `items`, whole transactions ending at `through` (or, with `continues`, a piece
    /// ending inside one), and the checkpoint after them; rethrows a failed batch's error. Past
    /// `maxBacklog` queued items, waits for the writer to take its next batch.
    func submit(_ items: [StreamItem], through: LSN?, checkpoint: Checkpoint?, continues: Bool = false) async throws {
        // The writer, inside a source transaction, may be waiting for exactly this.
        let (full, handOver) = try state.withLock {
            state throws -> (Bool, (CheckedContinuation<ApplyBacklog.Batch?, Never>, ApplyBacklog.Batch)?) in
            if let failure = state.failure { throw failure }
            state.backlog.append(items, through: through, checkpoint: checkpoint, continues: continues)
            if let waiting = state.waitingForPiece, let batch = state.backlog.takeBatch() {
                state.waitingForPiece = nil
                return (false, (waiting, batch))
            }
            if state.writer == nil { state.writer = Task { await self.writeAll() } }
            return (state.backlog.itemCount > maxBacklog, nil)
        }
        if let (waiting, batch) = handOver { waiting.resume(returning: batch) }
        guard full else { return }
        await withCheckedContinuation { (waiting: CheckedContinuation<Void, Never>) in
            let room = state.withLock { state -> Bool in
                guard state.backlog.itemCount > maxBacklog, state.writer != nil else { return true }
                state.waitingForSpace = waiting
                return false
            }
            if room { waiting.resume() }
        }
    }

    /// Waits until everything queued is written; rethrows a failed batch's error. A source
    /// transaction still open is rolled back: its rest never came.
    func drain() async throws {
        let waiting = state.withLock { state in
            state.draining = true
            defer { state.waitingForPiece = nil }
            if state.waitingForPiece != nil { state.abandoned = true }
            return state.waitingForPiece
        }
        waiting?.resume(returning: nil)
        while let writer = state.withLock({ $0.writer }) { await writer.value }
        if let failure = state.withLock({ state -> (any Error)? in
            defer {
                state.failure = nil
                state.draining = false
            }
            return state.failure
        }) {
            throw failure
        }
    }

    /// The next batch of a transaction the writer holds open: waits for the reader to queue
    /// it; `nil` once the reader drains without it.
    private func more() async -> ApplyBacklog.Batch? {
        await withCheckedContinuation { (continuation: CheckedContinuation<ApplyBacklog.Batch?, Never>) in
            let (ready, batch, space) = state.withLock {
                state -> (Bool, ApplyBacklog.Batch?, CheckedContinuation<Void, Never>?) in
                let (batch, space) = state.take()
                if batch != nil { return (true, batch, space) }
                if state.draining {
                    state.abandoned = true
                    return (true, nil, space)
                }
                state.waitingForPiece = continuation
                return (false, nil, space)
            }
            space?.resume()
            if ready { continuation.resume(returning: batch) }
        }
    }

    /// The writer task: takes batches until none waits, a batch fails or one asks to stop.
    private func writeAll() async {
        while true {
            let (batch, waiting) = state.withLock { state -> (ApplyBacklog.Batch?, CheckedContinuation<Void, Never>?) in
                if state.failure != nil || mustStop { state.backlog.removeAll() }
                let taken = state.take()
                if taken.0 == nil { state.writer = nil }
                return taken
            }
            waiting?.resume()
            guard let batch else { return }
            do {
                if try await !write(batch, { await self.more() }) { stopRequested.store(true, ordering: .releasing) }
            } catch {
                state.withLock { state in
                    if !state.abandoned { state.failure = error }
                }
            }
            state.withLock { $0.abandoned = false }
        }
    }
}

extension Subscriber {
    var scrubDue: Bool {
        configuration.scrubInterval != nil && nextScrub.withLock { $0 } <= .now
    }
}

/// The subscriber's current activity, readable from other tasks.
final class ActivityBox: Sendable {
    private let box = Mutex<Subscriber.Activity>(.starting)
    var value: Subscriber.Activity {
        get { box.withLock { $0 } }
        set { box.withLock { $0 = newValue } }
    }
}
