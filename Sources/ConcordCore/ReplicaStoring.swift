import Foundation

/// Progress of long work over records (an export, an import, a scan): records done of the total.
public typealias RecordProgress = @Sendable (_ done: Int, _ total: Int) -> Void

/// Where a replica lives: a SQLite file or a PostgreSQL schema. The subscriber and the
/// reconciler work through this, so both stores keep the same guarantees.
///
/// Every method that changes rows moves the position, bootstrap cursor or digests in the
/// same transaction, so a crash at any point leaves a state the subscriber resumes from
/// without losing or repeating a change.
public protocol ReplicaStoring: Sendable {
    /// Where the replica is, for messages (a path, or a database and schema).
    var location: String { get }

    func state() async throws -> ReplicaState?
    /// Starts a new replica of `feedID` at `head`: follows from there and pages through `collections`.
    func initialize(feedID: String, source: String, head: LSN, collections: [String], filter: [String]?)
        async throws -> ReplicaState
    /// Records the source's head, for lag reporting.
    func noteSourceHead(_ head: LSN) async throws

    /// Applies the items of whole source transactions, ending at `through`, in one local
    /// transaction that also moves the position to `through`.
    func apply(_ items: [StreamItem], through: LSN) async throws
    /// Applies a source transaction as it comes, in pieces: `items` through `through` (inside
    /// the transaction), then each piece `next` gives, until one ends it; all in one local
    /// transaction that moves the position once, at the end. When `next` throws, nothing of it
    /// stays. `items` may begin with whole transactions, and the last piece may end with some.
    func apply(_ items: [StreamItem], through: LSN, continuing next: () async throws -> StreamPiece) async throws
    /// Applies like ``apply(_:through:)``, then compares `checkpoint` (at `through`) with the
    /// digests as ``check(_:)`` does; a store may do both in one transaction.
    func apply(_ items: [StreamItem], through: LSN, checking checkpoint: Checkpoint) async throws
        -> CheckpointOutcome
    /// Merges a snapshot page by version and records the bootstrap cursor, in one transaction.
    func apply(_ page: SnapshotPage) async throws
    /// Ends the bootstrap once every page is in and the position passed the horizon.
    func completeBootstrapIfReady() async throws -> Bool

    /// The collections the replica holds a table for.
    func collections() async throws -> [String]
    /// All rows of a collection in key order.
    func records(of collection: String) async throws -> [Record]

    /// Whether every digest is valid and the sketches are built.
    func digestsReady() async throws -> Bool
    /// Rebuilds digests and sketches from the stored rows where they are not known.
    func rebuildDigests() async throws
    /// The kept sketch of `collection`, or one from a scan when none is kept.
    func sketch(of collection: String) async throws -> RatelessSketch
    /// The sketch items of `collection`'s stored rows, for coded symbols past the kept capacity.
    func sketchItems(of collection: String) async throws -> [SketchItem]
    /// Compares `checkpoint` with the replica's digests; records "verified at" on a match.
    func check(_ checkpoint: Checkpoint) async throws -> CheckpointOutcome
    /// Re-hashes every stored row: the collections whose rows no longer match their digests.
    func scrub() async throws -> [ScannedCollection]
    /// Every collection's stored rows hashed, at one position.
    func scanAll(progress: RecordProgress?) async throws -> [String: ScannedCollection]
    /// Makes the kept digest and sketch of a collection those of its stored rows.
    func adopt(_ scanned: ScannedCollection, countingMismatch: Bool) async throws

    /// The keys of `collection` whose key hashes are in `keyHashes`.
    func keys(of collection: String, keyHashes: Set<UInt64>) async throws -> [UInt64: String]
    /// Writes what the source holds for keys found to differ and deletes the keys it does not
    /// hold, in one transaction; records newer than `lsn` raise the horizon.
    func repair(_ collection: String, at lsn: LSN, writing records: [Record], deleting keys: [String]) async throws
    /// Moves the position forward to `lsn` after every collection was reconciled at `lsn`.
    func jump(to lsn: LSN) async throws
    /// Copies `collection` again page by page: the fallback when too much differs.
    func startRecopy(_ collection: String) async throws
    /// Starts the bootstrap over at `head`, sweeping rows the pages do not hold.
    func restartBootstrap(at head: LSN, collections: [String]) async throws
}

/// Stream items that go on with a source transaction an earlier piece left open.
public struct StreamPiece: Sendable {
    public var items: [StreamItem]
    /// The LSN the items end at.
    public var through: LSN
    /// Whether `through` ends a transaction: the last piece of it.
    public var endsTransaction: Bool

    public init(items: [StreamItem], through: LSN, endsTransaction: Bool) {
        self.items = items
        self.through = through
        self.endsTransaction = endsTransaction
    }

    /// Throws unless the items start right after `position`, where the last piece ended.
    public func checkContinues(after position: LSN) throws(ConcordError) {
        if let first = items.first, first.firstLSN != position + 1 {
            throw ConcordError(
                .protocolViolation, "a piece starts at \(first.firstLSN), but the last one ended at \(position)")
        }
    }
}

extension ReplicaStoring {
    /// Gathers the pieces and applies them whole: for a store that cannot keep a local
    /// transaction open while the rest comes.
    public func apply(_ items: [StreamItem], through: LSN, continuing next: () async throws -> StreamPiece)
        async throws
    {
        var items = items
        var through = through
        while true {
            let piece = try await next()
            try piece.checkContinues(after: through)
            items.append(contentsOf: piece.items)
            through = piece.through
            if piece.endsTransaction { break }
        }
        try await apply(items, through: through)
    }

    public func apply(_ items: [StreamItem], through: LSN, checking checkpoint: Checkpoint) async throws
        -> CheckpointOutcome
    {
        try await apply(items, through: through)
        return try await check(checkpoint)
    }

    public func scanAll() async throws -> [String: ScannedCollection] { try await scanAll(progress: nil) }
    public func adopt(_ scanned: ScannedCollection) async throws { try await adopt(scanned, countingMismatch: false) }
}

/// The coded symbols a replica keeps per collection, for a reconciliation to start without a scan.
public enum ReplicaSketch {
    public static let capacity = 4096
}

/// What a replica knows about itself, stored in `concord_state`.
public struct ReplicaState: Sendable, Hashable {
    public var feedID: String
    public var source: String
    /// The last LSN applied; data and position commit together.
    public var position: LSN
    public var progress: BootstrapProgress
    /// The collections this replica follows; `nil`: all.
    public var collections: [String]?
    /// Changes applied since the replica was created.
    public var appliedChanges: Int
    /// Source head last seen, for lag.
    public var sourceHead: LSN
    public var updatedAt: Date
    /// The last LSN at which every followed collection's digest equalled the source's checkpoint.
    public var verifiedLSN: LSN = 0
    public var verifiedAt: Date?
    /// Reconciliations that changed something, and the records they wrote or deleted.
    public var repairs: Int = 0
    public var repairedRecords: Int = 0
    /// Checkpoints or scrubs that found a difference.
    public var mismatches: Int = 0

    /// Throws unless `items` start right after the position: a batch must continue the replica.
    public func checkContinued(by items: [StreamItem]) throws(ConcordError) {
        guard let first = items.first, first.firstLSN == position + 1 else {
            throw ConcordError(
                .protocolViolation, "changes start at \(items.first?.firstLSN ?? 0), but the replica is at \(position)")
        }
    }

    public init(
        feedID: String, source: String, position: LSN, progress: BootstrapProgress, collections: [String]?,
        appliedChanges: Int, sourceHead: LSN, updatedAt: Date, verifiedLSN: LSN = 0, verifiedAt: Date? = nil,
        repairs: Int = 0, repairedRecords: Int = 0, mismatches: Int = 0
    ) {
        self.feedID = feedID
        self.source = source
        self.position = position
        self.progress = progress
        self.collections = collections
        self.appliedChanges = appliedChanges
        self.sourceHead = sourceHead
        self.updatedAt = updatedAt
        self.verifiedLSN = verifiedLSN
        self.verifiedAt = verifiedAt
        self.repairs = repairs
        self.repairedRecords = repairedRecords
        self.mismatches = mismatches
    }
}

/// What a replica's stored rows hash to, from a scan.
public struct ScannedCollection: Sendable {
    public var collection: String
    public var digest: CollectionDigest
    public var sketch: RatelessSketch

    public init(collection: String, digest: CollectionDigest, sketch: RatelessSketch) {
        self.collection = collection
        self.digest = digest
        self.sketch = sketch
    }

    /// A scan of `collection` before its first row.
    public init(collection: String) {
        self.init(collection: collection, digest: .empty, sketch: RatelessSketch(capacity: ReplicaSketch.capacity))
    }

    /// Adds a stored row; `progress` hears of every 10,000 rows (``reportRest(to:)`` tells the rest).
    public mutating func add(_ element: Element, progress: ((Int) -> Void)? = nil) {
        digest.add(element)
        sketch.add(element)
        if digest.count % 10_000 == 0 { progress?(10_000) }
    }

    /// Reports the rows added since the last 10,000.
    public func reportRest(to progress: ((Int) -> Void)?) {
        progress?(Int(digest.count % 10_000))
    }
}

/// How a checkpoint compared with the replica.
public enum CheckpointOutcome: Sendable, Equatable {
    case verified
    /// The replica cannot judge this checkpoint (not at its LSN, merging, or digests being rebuilt).
    case notJudged
    case mismatch(collections: [String])
}
