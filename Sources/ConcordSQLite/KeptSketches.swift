import ConcordCore
import Synchronization

/// A replica's in-memory sketches, kept off the apply path: an apply transaction only queues
/// its element changes, and a background task folds them in on the other core. A reader
/// drains the queue first, so it always sees the sketches of the committed rows.
package final class KeptSketches: Sendable {
    /// Changes queued before a background drain is started.
    static let drainThreshold = 8192

    private struct Pending {
        var changes: [PublisherStore.ElementChange] = []
        var scheduled = false
    }

    /// Lock order: `sets`, then `pending`.
    private let sets = Mutex<SketchSet?>(nil)
    private let pending = Mutex(Pending())

    package init() {}

    /// Queues the element changes of a committed transaction (dropped while no sketches are built).
    package func queue(_ changes: [PublisherStore.ElementChange]) {
        guard !changes.isEmpty else { return }
        let schedule = pending.withLock { pending in
            pending.changes.append(contentsOf: changes)
            guard pending.changes.count >= Self.drainThreshold, !pending.scheduled else { return false }
            pending.scheduled = true
            return true
        }
        if schedule { Task.detached(priority: .utility) { self.drain() } }
    }

    /// Applies every queued change.
    package func drain() {
        sets.withLock { set in
            let changes = pending.withLock { pending in
                pending.scheduled = false
                return pending.changes.isEmpty ? [] : Self.take(&pending.changes)
            }
            guard set != nil else { return }
            set!.apply(changes)
        }
    }

    private static func take(_ changes: inout [PublisherStore.ElementChange]) -> [PublisherStore.ElementChange] {
        var taken: [PublisherStore.ElementChange] = []
        swap(&taken, &changes)
        return taken
    }

    /// Installs sketches built from the rows as they are now: queued changes are already in them.
    package func install(_ set: SketchSet?) {
        sets.withLock { current in
            current = set
            pending.withLock { $0.changes.removeAll() }
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
