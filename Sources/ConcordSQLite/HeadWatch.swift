import ConcordCore
import Synchronization

/// The head LSN of a feed, and a way to wait until it moves.
///
/// Writers call ``advance(to:)`` after each commit; long-polls and streams wait on it
/// instead of polling the database.
public final class HeadWatch: Sendable {
    private struct State {
        var head: LSN
        var isClosed = false
        var nextID = 0
        var waiters: [Int: CheckedContinuation<Void, Never>] = [:]
    }

    private let state: Mutex<State>

    public init(head: LSN) {
        state = Mutex(State(head: head))
    }

    public var head: LSN { state.withLock { $0.head } }

    /// Moves the head forward (never back) and wakes every waiter.
    public func advance(to lsn: LSN) {
        let waiters = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            guard lsn > state.head else { return [] }
            state.head = lsn
            let waiting = Array(state.waiters.values)
            state.waiters.removeAll()
            return waiting
        }
        for waiter in waiters { waiter.resume() }
    }

    /// Whether ``close()`` was called: the publisher is shutting down.
    public var isClosed: Bool { state.withLock { $0.isClosed } }

    /// Wakes every waiter and makes later waits return at once, so streams can end.
    public func close() {
        let waiters = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            state.isClosed = true
            let waiting = Array(state.waiters.values)
            state.waiters.removeAll()
            return waiting
        }
        for waiter in waiters { waiter.resume() }
    }

    /// Waits until the head passes `lsn`, the timeout ends, or the task is cancelled; returns the head.
    public func wait(beyond lsn: LSN, timeout: Duration) async -> LSN {
        if head > lsn || timeout <= .zero || isClosed { return head }
        await withTaskGroup(of: Void.self) { group in
            group.addTask { try? await Task.sleep(for: timeout) }
            group.addTask { await self.waitForAdvance(beyond: lsn) }
            await group.next()
            group.cancelAll()
        }
        return head
    }

    private func waitForAdvance(beyond lsn: LSN) async {
        let id = state.withLock { state -> Int in
            state.nextID += 1
            return state.nextID
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let resumeNow = state.withLock { state -> Bool in
                    if state.head > lsn || state.isClosed || Task.isCancelled { return true }
                    state.waiters[id] = continuation
                    return false
                }
                if resumeNow { continuation.resume() }
            }
        } onCancel: {
            let waiter = state.withLock { $0.waiters.removeValue(forKey: id) }
            waiter?.resume()
        }
    }
}
