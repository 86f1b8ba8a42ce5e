import ConcordCore
import Synchronization

/// A replica's in-memory sketches, kept off the apply path: an apply transaction only queues
/// its element changes, and the idle thread folds them in when a core is free. A reader
/// drains the queue first, so it always sees the sketches of the committed rows.
package final class KeptSketches: Sendable {
    /// Queued changes beyond which the transaction that queues them folds them itself: memory
    /// stays bounded (about 100 bytes a change, besides the transaction being queued) even
    /// when no core is ever free.
    static let maxQueued = 131_072
    /// Changes folded under one hold of the lock: the idle thread runs at the lowest priority,
    /// and a reader that waits for it should wait for a short fold only (about a millisecond).
    static let chunk = 2048
    /// Chunks the idle thread folds before it lets the jobs of other replicas run.
    static let chunksPerJob = 16

    private struct Pending {
        /// Queued changes in chunks, oldest first from `head` (taken ones are dropped in bulk).
        var chunks: [ArraySlice<PublisherStore.ElementChange>] = []
        var head = 0
        var count = 0
        var scheduled = false

        mutating func takeFirst() -> ArraySlice<PublisherStore.ElementChange>? {
            guard head < chunks.count else { return nil }
            let chunk = chunks[head]
            head += 1
            count -= chunk.count
            if head == chunks.count {
                chunks.removeAll(keepingCapacity: true)
                head = 0
            } else if head >= 1024, head * 2 >= chunks.count {
                chunks.removeFirst(head)
                head = 0
            }
            return chunk
        }

        mutating func takeAll() -> [ArraySlice<PublisherStore.ElementChange>] {
            defer {
                chunks.removeAll()
                head = 0
                count = 0
            }
            return Array(chunks[head...])
        }
    }

    /// Lock order: `sets`, then `pending`.
    private let sets = Mutex<SketchSet?>(nil)
    private let pending = Mutex(Pending())

    package init() {}

    /// Queues a write transaction's element changes, inside it, before it commits (dropped while
    /// no sketches are built); a failed commit forgets the sketches (``forgettingOnFailure(_:)``).
    package func queue(_ changes: [PublisherStore.ElementChange]) {
        guard !changes.isEmpty else { return }
        let (schedule, full) = pending.withLock { pending in
            for start in stride(from: changes.startIndex, to: changes.endIndex, by: Self.chunk) {
                pending.chunks.append(changes[start..<min(changes.endIndex, start + Self.chunk)])
            }
            pending.count += changes.count
            let full = pending.count >= Self.maxQueued
            guard !pending.scheduled else { return (false, full) }
            pending.scheduled = true
            return (true, full)
        }
        if full { drain() }
        if schedule { IdleThread.shared.submit { self.foldQueued() } }
    }

    /// Folds queued chunks one by one (on the idle thread); after a few, submits itself again
    /// behind the other jobs, so one busy replica does not keep another's queue waiting.
    private func foldQueued() {
        for _ in 0..<Self.chunksPerJob {
            let folded = sets.withLock { set in
                let chunk = pending.withLock { pending in
                    let chunk = pending.takeFirst()
                    if chunk == nil { pending.scheduled = false }
                    return chunk
                }
                guard let chunk else { return false }
                set?.apply(chunk)
                return true
            }
            if !folded { return }
        }
        IdleThread.shared.submit { self.foldQueued() }
    }

    /// Applies every queued change.
    package func drain() {
        sets.withLock { set in
            let chunks = pending.withLock { $0.takeAll() }
            guard set != nil else { return }
            for chunk in chunks { set!.apply(chunk) }
        }
    }

    /// Installs sketches built from the rows as they are now: queued changes are already in them.
    package func install(_ set: SketchSet?) {
        sets.withLock { current in
            current = set
            _ = pending.withLock { $0.takeAll() }
        }
    }

    /// Forgets the sketches (they no longer describe the rows); a scan builds them again.
    package func invalidate() { install(nil) }

    /// Runs a write transaction that queues its element changes before it commits: should it
    /// fail, they may describe rows that were never committed, so the sketches are forgotten.
    package func forgettingOnFailure<T>(_ write: () async throws -> T) async throws -> T {
        do {
            return try await write()
        } catch {
            invalidate()
            throw error
        }
    }

    /// Replaces one collection's sketch by one scanned from its rows now.
    package func replace(_ collection: String, by sketch: RatelessSketch) {
        drain()
        sets.withLock { $0?.set(collection, sketch) }
    }

    package var isBuilt: Bool { sets.withLock { $0 != nil } }

    /// Changes queued and not folded in yet.
    package var queuedCount: Int { pending.withLock { $0.count } }

    /// The kept sketch of `collection`, up to date with every committed transaction.
    package func sketch(of collection: String) -> RatelessSketch? {
        drain()
        return sets.withLock { $0?.sketch(of: collection) }
    }
}

extension SketchSet {
    /// Applies element changes in order, one dictionary lookup per run of changes to a collection.
    package mutating func apply(_ changes: some RandomAccessCollection<PublisherStore.ElementChange>) {
        var start = changes.startIndex
        while start < changes.endIndex {
            let collection = changes[start].collection
            var end = changes.index(after: start)
            while end < changes.endIndex, changes[end].collection == collection { end = changes.index(after: end) }
            modify(collection) { sketch in
                for change in changes[start..<end] { sketch.apply(before: change.before, after: change.after) }
            }
            start = end
        }
    }
}
