import ConcordCore
import Synchronization
import Testing

@testable import ConcordClient

/// The subscriber's writer stage, with a recording writer in place of the store: the reader
/// queues while a batch is written, and the writer takes all that waits at once.
@Suite struct ApplyPipelineTests {
    struct Failure: Error {}

    func changes(_ lsns: ClosedRange<LSN>) -> [StreamItem] {
        lsns.map {
            .change(Change(lsn: $0, collection: "c", key: "k\($0)", operation: .upsert, value: "1", isCommit: true))
        }
    }

    func checkpoint(_ lsn: LSN) -> Checkpoint {
        Checkpoint(lsn: lsn, digests: ["c": CollectionDigest(count: Int64(lsn), sum: (0, 0, 0, 0))])
    }

    @Test func writesEveryItemOnceInOrderMergingWhatQueuedMeanwhile() async throws {
        let written = Mutex<[ApplyBacklog.Batch]>([])
        let gate = Mutex<CheckedContinuation<Void, Never>?>(nil)
        let pipeline = ApplyPipeline(maxBacklog: 1_000_000) { batch, _ in
            let first = written.withLock { written in
                written.append(batch)
                return written.count == 1
            }
            // The first batch is held until the reader has queued everything behind it.
            if first { await withCheckedContinuation { continuation in gate.withLock { $0 = continuation } } }
            return true
        }
        var next: LSN = 1
        for round in 0..<20 {
            let items = changes(next...(next + 9))
            next += 10
            // Checkpoints after rounds 2, 5, ..., 17: the newest queued one ends at LSN 180.
            try await pipeline.submit(items, through: next - 1, checkpoint: round % 3 == 2 ? checkpoint(next - 1) : nil)
        }
        while gate.withLock({ $0 == nil }) { try await Task.sleep(for: .milliseconds(1)) }
        gate.withLock { $0?.resume() }
        try await pipeline.drain()
        let batches = written.withLock { $0 }
        #expect(batches.flatMap(\.items).map(\.lastLSN) == Array(1...200))
        // Whatever the first batch took, the rest went as one batch to the newest checkpoint and
        // one after it.
        #expect(batches.count <= 3)
        #expect(batches.dropFirst().first?.through == 180 || batches.first?.through == 180)
        #expect(batches.last?.through == 200 && batches.last?.checkpoint == nil)
        for batch in batches {
            #expect(batch.through == batch.items.last?.lastLSN)
            // A checkpoint is judged only where its batch ends.
            if let checkpoint = batch.checkpoint { #expect(checkpoint.lsn == batch.through) }
        }
    }

    @Test func theReaderWaitsWhileTheBacklogIsFull() async throws {
        let gate = Mutex<CheckedContinuation<Void, Never>?>(nil)
        let started = Mutex(0)
        let pipeline = ApplyPipeline(maxBacklog: 15) { _, _ in
            started.withLock { $0 += 1 }
            await withCheckedContinuation { continuation in gate.withLock { $0 = continuation } }
            return true
        }
        try await pipeline.submit(changes(1...10), through: 10, checkpoint: nil)
        while gate.withLock({ $0 == nil }) { try await Task.sleep(for: .milliseconds(1)) }
        // The writer holds the first batch; 10 more fit, 20 do not.
        try await pipeline.submit(changes(11...20), through: 20, checkpoint: nil)
        let blocked = Task { try await pipeline.submit(changes(21...30), through: 30, checkpoint: nil) }
        try await Task.sleep(for: .milliseconds(50))
        #expect(started.withLock { $0 } == 1)
        // Releasing the writer lets it take the backlog, which frees the reader.
        gate.withLock {
            $0?.resume(); $0 = nil
        }
        try await blocked.value
        while started.withLock({ $0 }) < 2 || gate.withLock({ $0 == nil }) {
            try await Task.sleep(for: .milliseconds(1))
        }
        gate.withLock {
            $0?.resume(); $0 = nil
        }
        try await pipeline.drain()
    }

    @Test func aFailedBatchIsRethrownAndWhatWaitedIsDropped() async throws {
        let written = Mutex<[LSN]>([])
        let pipeline = ApplyPipeline(maxBacklog: 1_000_000) { batch, _ in
            try await Task.sleep(for: .milliseconds(20))
            if batch.items.first?.lastLSN == 1 { throw Failure() }
            written.withLock { $0.append(contentsOf: batch.items.map(\.lastLSN)) }
            return true
        }
        try await pipeline.submit(changes(1...5), through: 5, checkpoint: nil)
        try await pipeline.submit(changes(6...10), through: 10, checkpoint: nil)
        await #expect(throws: Failure.self) { try await pipeline.drain() }
        // Nothing after the failed batch was written: the next session starts from the replica's position.
        #expect(written.withLock { $0 }.isEmpty)
    }

    @Test func piecesOfATransactionReachTheWriterThatHoldsItOpen() async throws {
        // What one write call saw: its batch, then each batch `more` gave.
        let calls = Mutex<[[ApplyBacklog.Batch]]>([])
        let pipeline = ApplyPipeline(maxBacklog: 4) { batch, more in
            var seen = [batch]
            var last = batch
            while last.continues {
                guard let next = await more() else { throw Failure() }
                seen.append(next)
                last = next
            }
            calls.withLock { $0.append(seen) }
            return true
        }
        try await pipeline.submit(changes(1...5), through: 5, checkpoint: nil, continues: true)
        // Past the backlog's bound the reader waits until the writer, inside the transaction, takes these.
        try await pipeline.submit(changes(6...10), through: 10, checkpoint: nil, continues: true)
        try await pipeline.submit(changes(11...15), through: 15, checkpoint: nil, continues: true)
        try await pipeline.submit(changes(16...17), through: 17, checkpoint: checkpoint(17))
        try await pipeline.submit(changes(18...18), through: 18, checkpoint: nil)
        try await pipeline.drain()
        let seen = calls.withLock { $0 }
        #expect(seen.flatMap { $0 }.flatMap(\.items).map(\.lastLSN) == Array(1...18))
        let transaction = try #require(seen.first)
        #expect(transaction.dropLast().allSatisfy(\.continues) && transaction.last?.continues == false)
        // The batch that ends the transaction brings the checkpoint after it.
        #expect(transaction.last?.through == 17 && transaction.last?.checkpoint == checkpoint(17))
        #expect(seen.count == 2 && seen.last?.first?.through == 18)
    }

    @Test func aTransactionLeftOpenWhenTheReaderDrainsIsRolledBackNotFailed() async throws {
        let ended = Mutex<[String]>([])
        let pipeline = ApplyPipeline(maxBacklog: 1_000_000) { batch, more in
            guard batch.continues else {
                ended.withLock { $0.append("whole \(batch.through ?? 0)") }
                return true
            }
            while let next = await more() {
                if !next.continues { return true }
            }
            ended.withLock { $0.append("abandoned") }
            // What a store does when the rest never comes: throws, rolling its transaction back.
            throw Failure()
        }
        try await pipeline.submit(changes(1...3), through: 3, checkpoint: nil)
        while !ended.withLock({ $0.contains("whole 3") }) { try await Task.sleep(for: .milliseconds(1)) }
        try await pipeline.submit(changes(4...6), through: 6, checkpoint: nil, continues: true)
        // The writer waits inside the transaction; the reader drains (the stream broke).
        try await Task.sleep(for: .milliseconds(20))
        try await pipeline.drain()
        #expect(ended.withLock { $0 } == ["whole 3", "abandoned"])
        // The next batches are written as before.
        try await pipeline.submit(changes(7...9), through: 9, checkpoint: nil)
        try await pipeline.drain()
        #expect(ended.withLock { $0 } == ["whole 3", "abandoned", "whole 9"])
    }

    @Test func aBatchThatAsksToStopEndsTheSession() async throws {
        let written = Mutex<[LSN]>([])
        let pipeline = ApplyPipeline(maxBacklog: 1_000_000) { batch, _ in
            try await Task.sleep(for: .milliseconds(20))
            written.withLock { $0.append(contentsOf: batch.items.map(\.lastLSN)) }
            return batch.checkpoint == nil
        }
        try await pipeline.submit(changes(1...5), through: 5, checkpoint: checkpoint(5))
        try await pipeline.submit(changes(6...10), through: 10, checkpoint: nil)
        try await pipeline.drain()
        #expect(pipeline.mustStop)
        #expect(written.withLock { $0 } == Array(1...5))
    }
}
