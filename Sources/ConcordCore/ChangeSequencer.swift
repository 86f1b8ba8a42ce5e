/// Checks that stream items join without holes and cuts them into whole source transactions.
///
/// A pure value: feed it items in the order they arrived; take complete transactions
/// when it has some. It never skips a hole: an item that does not start right after
/// the last one is refused, and the caller refetches from ``committed``.
public struct ChangeSequencer: Sendable {
    public enum Outcome: Sendable, Equatable {
        /// The item extends the sequence.
        case accepted
        /// The item was already received (it ends at or before the last LSN seen); it is ignored.
        case duplicate
        /// Items between `expected` and the item's first LSN are missing.
        case gap(expected: LSN, received: LSN)
    }

    /// The last LSN of the last complete transaction received.
    public private(set) var committed: LSN
    /// The last LSN received, complete or not.
    public private(set) var received: LSN
    private var openTransaction: [StreamItem] = []
    private var complete: [StreamItem] = []
    private var completeThrough: LSN

    /// Starts after `position`, the last LSN the replica has applied.
    public init(after position: LSN) {
        committed = position
        received = position
        completeThrough = position
    }

    public mutating func receive(_ item: StreamItem) -> Outcome {
        if item.lastLSN <= received { return .duplicate }
        guard item.firstLSN == received + 1 else { return .gap(expected: received + 1, received: item.firstLSN) }
        received = item.lastLSN
        openTransaction.append(item)
        if item.isCommit {
            complete.append(contentsOf: openTransaction)
            openTransaction.removeAll(keepingCapacity: true)
            completeThrough = item.lastLSN
            committed = item.lastLSN
        }
        return .accepted
    }

    /// Number of changes in complete transactions waiting to be taken.
    public var readyCount: Int { complete.count }

    /// Whether items of a transaction whose commit has not come yet were received.
    public var isInsideTransaction: Bool { received > committed }

    /// Like ``takeComplete()``, and also the items of the open transaction once at least
    /// `minimumPiece` of them wait: a large transaction is then written as it comes, in pieces,
    /// rather than held whole. `continues`: the items end inside that transaction, and the
    /// next take goes on with it.
    public mutating func takeReady(minimumPiece: Int) -> (items: [StreamItem], through: LSN, continues: Bool)? {
        guard openTransaction.count >= max(1, minimumPiece) else {
            return takeComplete().map { ($0.items, $0.through, false) }
        }
        var items = complete
        items.append(contentsOf: openTransaction)
        complete.removeAll(keepingCapacity: true)
        openTransaction.removeAll(keepingCapacity: true)
        return (items, received, true)
    }

    /// Items of the complete transactions received since the last call, and the LSN they end at.
    public mutating func takeComplete() -> (items: [StreamItem], through: LSN)? {
        guard !complete.isEmpty else { return nil }
        let items = complete
        complete.removeAll(keepingCapacity: true)
        return (items, completeThrough)
    }

    /// Forgets the items of an unfinished transaction, e.g. when the connection drops;
    /// reading resumes after ``committed``. Pieces of it already taken must be rolled back too.
    public mutating func discardOpenTransaction() {
        openTransaction.removeAll()
        received = committed
    }
}

/// Which record wins when two copies of a key meet: the higher version, and only strictly.
public enum MergeRule {
    /// Whether a record or tombstone at `incoming` replaces the local copy at `local` (`nil`: none held).
    @inline(__always)
    public static func incomingWins(incoming: LSN, local: LSN?) -> Bool {
        guard let local else { return true }
        return incoming > local
    }
}

/// How a replica applies log changes.
public enum ApplyMode: String, Sendable {
    /// By version: an incoming change wins only over an older local copy. Used while the
    /// replica holds snapshot records newer than its position.
    case merge
    /// In LSN order, as they come: the replica's rows are exactly the source's state at its position.
    case ordered
}

/// A replica's bootstrap bookkeeping: which collections are fully paged, and the horizon.
///
/// The horizon is the highest LSN at which a snapshot page was read. Until the replica's
/// position reaches it, some rows may be newer than the position, so log changes must
/// merge by version; after it, the replica is the source's state at its position.
public struct BootstrapProgress: Sendable, Hashable {
    public enum Phase: String, Sendable {
        case bootstrapping
        case following
    }

    public var phase: Phase
    public var horizon: LSN
    /// Collections still to page through, with the last key copied (`nil`: none yet).
    public var remaining: [String: String?]

    public init(phase: Phase, horizon: LSN, remaining: [String: String?]) {
        self.phase = phase
        self.horizon = horizon
        self.remaining = remaining
    }

    public static func starting(collections: [String], at head: LSN) -> BootstrapProgress {
        var remaining: [String: String?] = [:]
        for collection in collections { remaining[collection] = .some(nil) }
        return BootstrapProgress(phase: .bootstrapping, horizon: head, remaining: remaining)
    }

    public func applyMode(position: LSN) -> ApplyMode {
        phase == .following && position >= horizon ? .ordered : .merge
    }

    /// Records that a page of `collection` read at `lsn` was applied.
    public mutating func pageApplied(collection: String, lsn: LSN, lastKey: String?, hasMore: Bool) {
        horizon = max(horizon, lsn)
        if hasMore {
            remaining[collection] = .some(lastKey)
        } else {
            remaining[collection] = nil
        }
    }

    /// Whether every page is in and the replica has applied the log past every page.
    public func isComplete(position: LSN) -> Bool {
        remaining.isEmpty && position >= horizon
    }
}

/// Exponential backoff with jitter: each wait falls in the upper half of a ceiling that doubles up to `maximum`.
public struct Backoff: Sendable {
    public var initial: Duration
    public var maximum: Duration
    private var attempt = 0

    public init(initial: Duration = .milliseconds(100), maximum: Duration = .seconds(5)) {
        self.initial = initial
        self.maximum = maximum
    }

    /// The ceiling of the next wait, before jitter.
    public var ceiling: Duration {
        let factor = 1 << min(attempt, 20)
        return min(initial * factor, maximum)
    }

    public mutating func next<G: RandomNumberGenerator>(using generator: inout G) -> Duration {
        let ceiling = self.ceiling
        attempt += 1
        let nanos = ceiling.components.seconds * 1_000_000_000 + ceiling.components.attoseconds / 1_000_000_000
        let half = nanos / 2
        return .nanoseconds(half + Int64.random(in: 0...max(half, 0), using: &generator))
    }

    public mutating func next() -> Duration {
        var generator = SystemRandomNumberGenerator()
        return next(using: &generator)
    }

    public mutating func reset() { attempt = 0 }
}
