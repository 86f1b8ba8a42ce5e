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
        let pipeline = ApplyPipeline(maxBacklog: 1_000_000) { batch in
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
        let pipeline = ApplyPipeline(maxBacklog: 15) { _ in
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
        let pipeline = ApplyPipeline(maxBacklog: 1_000_000) { batch in
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

    @Test func aBatchThatAsksToStopEndsTheSession() async throws {
        let written = Mutex<[LSN]>([])
        let pipeline = ApplyPipeline(maxBacklog: 1_000_000) { batch in
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
