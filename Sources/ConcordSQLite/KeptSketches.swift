import ConcordCore
import Synchronization

/// A replica's in-memory sketches, kept off the apply path: an apply transaction only queues
/// its element changes, and the idle thread folds them in when a core is free. A reader
/// drains the queue first, so it always sees the sketches of the committed rows.
package final class KeptSketches: Sendable {
    /// Queued changes beyond which the transaction that queues them folds them itself: memory
    /// stays bounded (about 100 bytes a change) even when no core is ever free.
    static let maxQueued = 131_072

    private struct Pending {
        /// Each transaction's changes, oldest first: the idle thread folds one at a time, so
        /// a reader that drains waits for one transaction's fold at most.
        var batches: [[PublisherStore.ElementChange]] = []
        var count = 0
        var scheduled = false
    }

    /// Lock order: `sets`, then `pending`.
    private let sets = Mutex<SketchSet?>(nil)
    private let pending = Mutex(Pending())

    package init() {}

    /// Queues the element changes of a committed transaction (dropped while no sketches are built).
    package func queue(_ changes: [PublisherStore.ElementChange]) {
        guard !changes.isEmpty else { return }
        let (schedule, full) = pending.withLock { pending in
            pending.batches.append(changes)
            pending.count += changes.count
            let full = pending.count >= Self.maxQueued
            guard !pending.scheduled else { return (false, full) }
            pending.scheduled = true
            return (true, full)
        }
        if full { drain() }
        if schedule { IdleThread.shared.submit { self.foldQueued() } }
    }

    /// Folds queued transactions one by one until none is left (on the idle thread).
    private func foldQueued() {
        while sets.withLock({ set in
            let batch = pending.withLock { pending -> [PublisherStore.ElementChange]? in
                guard !pending.batches.isEmpty else {
                    pending.scheduled = false
                    return nil
                }
                pending.count -= pending.batches[0].count
                return pending.batches.removeFirst()
            }
            guard let batch else { return false }
            set?.apply(batch)
            return true
        }) {}
    }

    /// Applies every queued change.
    package func drain() {
        sets.withLock { set in
            let batches = pending.withLock { pending in
                pending.count = 0
                return Self.take(&pending.batches)
            }
            guard set != nil else { return }
            for batch in batches { set!.apply(batch) }
        }
    }

    private static func take<T>(_ items: inout [T]) -> [T] {
        var taken: [T] = []
        swap(&taken, &items)
        return taken
    }

    /// Installs sketches built from the rows as they are now: queued changes are already in them.
    package func install(_ set: SketchSet?) {
        sets.withLock { current in
            current = set
            pending.withLock { pending in
                pending.batches.removeAll()
                pending.count = 0
            }
        }
    }

    /// Forgets the sketches (they no longer describe the rows); a scan builds them again.
    package func invalidate() { install(nil) }

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
    package mutating func apply(_ changes: [PublisherStore.ElementChange]) {
        var start = changes.startIndex
        while start < changes.endIndex {
            let collection = changes[start].collection
            var end = start + 1
            while end < changes.endIndex, changes[end].collection == collection { end += 1 }
            modify(collection) { sketch in
                for change in changes[start..<end] { sketch.apply(before: change.before, after: change.after) }
            }
            start = end
        }
    }
}
