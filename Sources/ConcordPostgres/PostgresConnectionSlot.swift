import ConcordCore
import Logging
import PostgresNIO
import Synchronization

/// One PostgreSQL connection used by one piece of work at a time, connected on first use and
/// again after the server dropped it.
///
/// A transaction is a run of statements on one connection; two tasks sharing it would mix
/// their statements into each other's transactions, so work waits its turn here.
final class PostgresConnectionSlot: Sendable {
    private struct State {
        var busy = false
        var waiters: [CheckedContinuation<Void, Never>] = []
        var source: PostgresSource?
    }

    let url: String
    let logger: Logger
    /// Statements run on every new connection, e.g. `SET synchronous_commit TO off`.
    let settings: [String]
    private let state = Mutex(State())

    init(url: String, logger: Logger, settings: [String] = []) {
        self.url = url
        self.logger = logger
        self.settings = settings
    }

    /// Runs `body` with the connection to itself.
    func withConnection<T>(_ body: (PostgresSource) async throws -> T) async throws -> T {
        await acquire()
        defer { release() }
        return try await body(try await open())
    }

    /// Runs `body` in a transaction: committed if it returns, rolled back if it throws.
    func transaction<T>(_ begin: String = "BEGIN", _ body: (PostgresSource) async throws -> T) async throws -> T {
        try await withConnection { source in
            try await source.execute(begin)
            do {
                let result = try await body(source)
                try await source.execute("COMMIT")
                return result
            } catch {
                try? await source.execute("ROLLBACK")
                throw error
            }
        }
    }

    func close() async {
        let source = state.withLock { state in
            defer { state.source = nil }
            return state.source
        }
        await source?.close()
    }

    /// A store dropped without ``close()`` (a failing caller) still closes its connection.
    deinit {
        if let connection = state.withLock({ $0.source?.connection }), !connection.isClosed {
            // The closure keeps the connection alive until it is closed.
            connection.close().whenComplete { _ in _ = connection }
        }
    }

    private func acquire() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let now = state.withLock { state in
                if !state.busy {
                    state.busy = true
                    return true
                }
                state.waiters.append(continuation)
                return false
            }
            if now { continuation.resume() }
        }
    }

    private func release() {
        let next = state.withLock { state -> CheckedContinuation<Void, Never>? in
            if state.waiters.isEmpty {
                state.busy = false
                return nil
            }
            return state.waiters.removeFirst()
        }
        next?.resume()
    }

    private func open() async throws -> PostgresSource {
        if let source = state.withLock({ $0.source }), !source.connection.isClosed { return source }
        let source = try await PostgresSource.connect(url: url, logger: logger)
        do {
            for setting in settings { try await source.execute(setting) }
        } catch {
            await source.close()
            throw error
        }
        state.withLock { $0.source = source }
        return source
    }
}
