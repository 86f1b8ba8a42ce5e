/// Whole source transactions read from a stream and not yet written, with the checkpoints
/// that follow them, in arrival order; and pieces of a large transaction whose end has not
/// come yet (they `continue`: the writer keeps its local transaction open for the rest).
///
/// The stream reader appends while the writer is busy; the writer takes everything up to the
/// newest checkpoint as one batch. One local transaction then covers many checkpoint intervals
/// and judges only the newest checkpoint, which supersedes the others: a replica equal to
/// the source there is what "verified" claims, whatever it was at the earlier ones.
public struct ApplyBacklog: Sendable {
    /// What the writer does next: apply `items` through `through` (none: nothing to apply),
    /// then judge `checkpoint` (none: nothing to judge). `continues`: `through` is inside a
    /// source transaction, whose rest comes in the next batches.
    public struct Batch: Sendable, Equatable {
        public var items: [StreamItem]
        public var through: LSN?
        public var checkpoint: Checkpoint?
        public var continues = false
    }

    private struct Segment: Sendable {
        var items: [StreamItem]
        var through: LSN?
        var checkpoint: Checkpoint?
        var continues = false
    }

    private var segments: [Segment] = []
    /// Stream items waiting, for a bound on memory.
    public private(set) var itemCount = 0

    public init() {}

    public var isEmpty: Bool { segments.isEmpty }

    /// Appends whole transactions ending at `through`, and the checkpoint that follows them.
    /// Either may be absent: a checkpoint alone is judged at the position reached by then.
    /// `continues`: the items end inside a transaction (no checkpoint can follow them then).
    public mutating func append(
        _ items: [StreamItem], through: LSN?, checkpoint: Checkpoint?, continues: Bool = false
    ) {
        // A checkpoint inside a source transaction cannot be judged: no replica stops there.
        let insideTransaction = continues || (items.isEmpty && segments.last?.continues == true)
        let checkpoint = insideTransaction ? nil : checkpoint
        guard !items.isEmpty || checkpoint != nil else { return }
        // A checkpoint right after items that came in an earlier chunk closes their segment,
        // so it is judged in their transaction.
        if items.isEmpty, let last = segments.last, last.checkpoint == nil, let through = last.through,
            through == checkpoint?.lsn
        {
            segments[segments.count - 1].checkpoint = checkpoint
            return
        }
        segments.append(
            Segment(
                items: items, through: items.isEmpty ? nil : through, checkpoint: checkpoint,
                continues: continues && !items.isEmpty))
        itemCount += items.count
    }

    /// Everything up to the newest checkpoint, or everything when none waits; `nil` when empty.
    public mutating func takeBatch() -> Batch? {
        guard !segments.isEmpty else { return nil }
        let end = (segments.lastIndex { $0.checkpoint != nil } ?? segments.count - 1) + 1
        var batch: Batch
        if end == 1 {
            let only = segments[0]
            batch = Batch(
                items: only.items, through: only.through, checkpoint: only.checkpoint, continues: only.continues)
        } else {
            var items: [StreamItem] = []
            items.reserveCapacity(segments[..<end].reduce(0) { $0 + $1.items.count })
            var through: LSN?
            for segment in segments[..<end] {
                items.append(contentsOf: segment.items)
                through = segment.through ?? through
            }
            batch = Batch(
                items: items, through: through, checkpoint: segments[end - 1].checkpoint,
                continues: segments[end - 1].continues)
        }
        segments.removeFirst(end)
        itemCount -= batch.items.count
        return batch
    }

    /// Forgets everything waiting (the session stops; the next one reads again from the replica's position).
    public mutating func removeAll() {
        segments.removeAll()
        itemCount = 0
    }
}
