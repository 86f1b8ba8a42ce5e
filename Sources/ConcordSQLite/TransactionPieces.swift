import ConcordCore
import Foundation

/// One transaction handed to ``PublisherStore/write(_:)`` a piece at a time, so that a source
/// transaction of millions of changes is never held whole in memory and is written while it
/// is still being read.
///
/// The store appends each piece inside one SQLite transaction, which commits at ``end(marker:)``:
/// readers see all of it or none of it, like any other write. Until then the store's writer
/// waits here for the next piece; ``abort(_:)`` rolls everything back.
public final class TransactionPieces: @unchecked Sendable {
    /// What the store's writer takes next.
    enum Item {
        case operations([WriteOperation])
        /// A record's value as the open transaction has it, earlier pieces included.
        case lookup(collection: String, key: String, reply: @Sendable (Result<String?, any Error>) -> Void)
        case end(marker: (name: String, value: String)?)
    }

    /// Changes queued ahead of the writer at most; past them ``add(_:)`` waits.
    public let limit: Int
    /// How long the writer waits for the next piece before it gives the transaction up: its
    /// write lock must not be held by a reader that went away without a word.
    let patience: Duration
    private let condition = NSCondition()
    private var items: [Item] = []
    private var queuedChanges = 0
    private var failure: (any Error)?
    private var ended = false
    private var outcome: Result<LSN, any Error>?

    public init(limit: Int = 50_000, patience: Duration = .seconds(120)) {
        self.limit = limit
        self.patience = patience
    }

    // MARK: The reading side

    /// Queues a piece, waiting first while `limit` changes already wait for the writer.
    public func add(_ operations: [WriteOperation]) async throws {
        guard !operations.isEmpty else { return }
        while locked({ failure == nil && queuedChanges > 0 && queuedChanges + operations.count > limit }) {
            try await Task.sleep(for: .milliseconds(2))
        }
        try locked {
            if let failure { throw failure }
            precondition(!ended, "a piece added after the end")
            items.append(.operations(operations))
            queuedChanges += operations.count
            condition.signal()
        }
    }

    /// The value of a record as the transaction left it so far: read by the writer, after the
    /// pieces queued before, inside the open SQLite transaction. Once the transaction has ended,
    /// the value as committed.
    public func value(of collection: String, key: String, in store: PublisherStore) async throws -> String? {
        let queued: Bool = try locked {
            if let failure { throw failure }
            return !ended
        }
        if !queued {
            _ = try await committed()
            return try store.value(of: collection, key: key)
        }
        // A reader cancelled while it waits gives the transaction up: nothing else would answer.
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { continuation in
                let reply: @Sendable (Result<String?, any Error>) -> Void = { continuation.resume(with: $0) }
                let refused: (any Error)? = locked {
                    if let failure { return failure }
                    items.append(.lookup(collection: collection, key: key, reply: reply))
                    condition.signal()
                    return nil
                }
                if let refused { continuation.resume(throwing: refused) }
            }
        } onCancel: {
            abort(CancellationError())
        }
    }

    /// Ends the transaction: the writer commits it with `marker`.
    public func end(marker: (name: String, value: String)?) throws {
        try locked {
            if let failure { throw failure }
            items.append(.end(marker: marker))
            ended = true
            condition.signal()
        }
    }

    /// Gives the transaction up: the writer rolls it back and fails with `error`, and so does
    /// everything asked of it from now on. Does nothing once it is committed.
    public func abort(_ error: any Error) {
        let lookups: [Item] = locked {
            guard failure == nil, outcome == nil else { return [] }
            failure = error
            defer { items.removeAll() }
            condition.broadcast()
            return items
        }
        for case .lookup(_, _, let reply) in lookups { reply(.failure(error)) }
    }

    /// Waits until the writer has committed the transaction (its last LSN) or given it up.
    public func committed() async throws -> LSN {
        while true {
            let (outcome, failure) = locked { (self.outcome, self.failure) }
            if let outcome { return try outcome.get() }
            if let failure { throw failure }
            try await Task.sleep(for: .milliseconds(2))
        }
    }

    // MARK: The writing side

    /// The next item, waiting for it; throws the reason the transaction was given up.
    func next() throws -> Item {
        try locked {
            let (seconds, attoseconds) = patience.components
            let deadline = Date().addingTimeInterval(Double(seconds) + Double(attoseconds) / 1e18)
            while items.isEmpty && failure == nil {
                if !condition.wait(until: deadline) && items.isEmpty && failure == nil {
                    failure = ConcordError(
                        .unavailable, "no piece of the open transaction came for \(patience.components.seconds) s")
                }
            }
            if let failure { throw failure }
            let item = items.removeFirst()
            if case .operations(let operations) = item { queuedChanges -= operations.count }
            return item
        }
    }

    /// Records how the write ended, for ``committed()``.
    func finish(_ result: Result<LSN, any Error>) {
        if case .failure(let error) = result { abort(error) }
        locked { if outcome == nil { outcome = result } }
    }

    private func locked<Result>(_ body: () throws -> Result) rethrows -> Result {
        condition.lock()
        defer { condition.unlock() }
        return try body()
    }
}
