/// The source's digest of every collection at one LSN, sent in the change stream so a
/// replica that has applied through that LSN can prove it holds the same state.
public struct Checkpoint: Sendable, Hashable {
    /// A commit LSN: the digests describe the state after that source transaction.
    public var lsn: LSN
    public var digests: [String: CollectionDigest]

    public init(lsn: LSN, digests: [String: CollectionDigest]) {
        self.lsn = lsn
        self.digests = digests
    }

    /// The followed collections (`nil`: all) whose digest in `local` differs from this
    /// checkpoint's; a collection missing on either side counts as empty.
    public func differing(from local: [String: CollectionDigest], followed: Set<String>?) -> [String] {
        var differing: [String] = []
        for name in Set(local.keys).union(digests.keys) {
            if let followed, !followed.contains(name) { continue }
            if (local[name] ?? .empty) != (digests[name] ?? .empty) { differing.append(name) }
        }
        return differing.sorted()
    }

    /// The same checkpoint restricted to `collections` (`nil`: all).
    public func restricted(to collections: Set<String>?) -> Checkpoint {
        guard let collections else { return self }
        return Checkpoint(lsn: lsn, digests: digests.filter { collections.contains($0.key) })
    }
}

/// When a publisher records a checkpoint: every `everyChanges` LSNs, and at least every
/// `interval` while the head moves.
public struct CheckpointPolicy: Sendable, Hashable {
    public var everyChanges: UInt64 = 1_000
    public var interval: Duration = .seconds(1)
    public init() {}

    /// Whether a batch that moved the head from `head` to `last` crosses a multiple of `everyChanges`.
    public func crossesBoundary(from head: LSN, to last: LSN) -> Bool {
        everyChanges > 0 && last / everyChanges > head / everyChanges
    }
}

/// How long a publisher keeps its log. A reader whose position falls out of it gets
/// `410 Gone` and recovers by reconciliation. Each limit is off when `nil`.
public struct RetentionPolicy: Sendable, Hashable {
    /// Keep at most this many changes.
    public var maxChanges: UInt64?
    /// Drop changes committed longer ago than this.
    public var maxAge: Duration? = .seconds(7 * 24 * 3600)
    /// Keep at most about this many bytes of logged values.
    public var maxBytes: Int64?
    public init() {}
}
