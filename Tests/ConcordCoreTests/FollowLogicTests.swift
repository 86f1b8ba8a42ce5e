import Testing

@testable import ConcordCore

@Suite struct ApplyBacklogTests {
    func changes(_ lsns: ClosedRange<LSN>) -> [StreamItem] {
        lsns.map {
            .change(Change(lsn: $0, collection: "c", key: "k\($0)", operation: .upsert, value: "1", isCommit: true))
        }
    }

    func checkpoint(_ lsn: LSN) -> Checkpoint {
        Checkpoint(lsn: lsn, digests: ["c": CollectionDigest(count: Int64(lsn), sum: (0, 0, 0, 0))])
    }

    @Test func takesEverythingUpToTheNewestCheckpointAsOneBatch() {
        var backlog = ApplyBacklog()
        backlog.append(changes(1...3), through: 3, checkpoint: checkpoint(3))
        backlog.append(changes(4...5), through: 5, checkpoint: nil)
        backlog.append(changes(6...6), through: 6, checkpoint: checkpoint(6))
        backlog.append(changes(7...8), through: 8, checkpoint: nil)
        #expect(backlog.itemCount == 8)
        let batch = backlog.takeBatch()
        // The checkpoint at 3 is superseded by the one at 6, judged where the batch ends.
        #expect(batch?.items.map(\.lastLSN) == Array(1...6))
        #expect(batch?.through == 6)
        #expect(batch?.checkpoint == checkpoint(6))
        #expect(backlog.itemCount == 2)
        // What follows the newest checkpoint waits for it, or goes alone when none comes.
        let rest = backlog.takeBatch()
        #expect(rest?.items.map(\.lastLSN) == [7, 8])
        #expect(rest?.through == 8)
        #expect(rest?.checkpoint == nil)
        #expect(backlog.takeBatch() == nil)
        #expect(backlog.isEmpty && backlog.itemCount == 0)
    }

    @Test func aCheckpointInALaterChunkClosesTheItemsItFollows() {
        var backlog = ApplyBacklog()
        backlog.append(changes(1...4), through: 4, checkpoint: nil)
        backlog.append([], through: nil, checkpoint: checkpoint(4))
        let batch = backlog.takeBatch()
        #expect(batch?.items.count == 4)
        #expect(batch?.through == 4)
        #expect(batch?.checkpoint == checkpoint(4))
        #expect(backlog.isEmpty)
    }

    @Test func aCheckpointAloneIsJudgedWithoutItems() {
        var backlog = ApplyBacklog()
        backlog.append([], through: nil, checkpoint: checkpoint(9))
        #expect(backlog.takeBatch() == ApplyBacklog.Batch(items: [], through: nil, checkpoint: checkpoint(9)))
        // Nothing at all is not queued.
        backlog.append([], through: nil, checkpoint: nil)
        #expect(backlog.isEmpty)
    }

    @Test func aCheckpointAfterOtherItemsKeepsTheLastItemsPosition() {
        var backlog = ApplyBacklog()
        backlog.append(changes(1...2), through: 2, checkpoint: nil)
        // Not the items' end: it stays its own segment, and the batch ends at the items'.
        backlog.append([], through: nil, checkpoint: checkpoint(1))
        let batch = backlog.takeBatch()
        #expect(batch?.through == 2)
        #expect(batch?.checkpoint == checkpoint(1))
        backlog.append(changes(3...3), through: 3, checkpoint: nil)
        backlog.removeAll()
        #expect(backlog.isEmpty && backlog.itemCount == 0 && backlog.takeBatch() == nil)
    }

    @Test func piecesOfATransactionSayTheyContinueAndItsEndCarriesTheCheckpoint() {
        var backlog = ApplyBacklog()
        backlog.append(changes(1...3), through: 3, checkpoint: nil, continues: true)
        // A checkpoint cannot stand inside a transaction: no replica stops there to judge it.
        backlog.append([], through: nil, checkpoint: checkpoint(3))
        backlog.append(changes(4...6), through: 6, checkpoint: nil, continues: true)
        let open = backlog.takeBatch()
        #expect(open?.items.map(\.lastLSN) == Array(1...6))
        #expect(open?.through == 6 && open?.continues == true && open?.checkpoint == nil)
        // The end of the transaction, with whole ones after it and their checkpoint.
        backlog.append(changes(7...9), through: 9, checkpoint: checkpoint(9))
        backlog.append(changes(10...11), through: 11, checkpoint: nil, continues: true)
        let closing = backlog.takeBatch()
        #expect(closing?.items.map(\.lastLSN) == Array(7...9))
        #expect(closing?.continues == false && closing?.checkpoint == checkpoint(9))
        // A batch that ends in the next open transaction continues, whatever it began with.
        backlog.append(changes(12...12), through: 12, checkpoint: nil, continues: true)
        let next = backlog.takeBatch()
        #expect(next?.items.map(\.lastLSN) == [10, 11, 12] && next?.continues == true)
        #expect(backlog.isEmpty && backlog.itemCount == 0)
    }
}

@Suite struct ChangeSequencerTests {
    func change(_ lsn: LSN, commit: Bool = true) -> StreamItem {
        .change(Change(lsn: lsn, collection: "c", key: "k\(lsn)", operation: .upsert, value: "1", isCommit: commit))
    }

    @Test func releasesOnlyWholeTransactions() {
        var sequencer = ChangeSequencer(after: 10)
        #expect(sequencer.receive(change(11, commit: false)) == .accepted)
        #expect(sequencer.receive(change(12, commit: false)) == .accepted)
        #expect(sequencer.takeComplete() == nil)
        #expect(sequencer.receive(change(13)) == .accepted)
        let complete = sequencer.takeComplete()
        #expect(complete?.items.map(\.lastLSN) == [11, 12, 13])
        #expect(complete?.through == 13)
        #expect(sequencer.committed == 13)
    }

    @Test func reportsAGapInsteadOfSkippingIt() {
        var sequencer = ChangeSequencer(after: 10)
        #expect(sequencer.receive(change(11)) == .accepted)
        #expect(sequencer.receive(change(13)) == .gap(expected: 12, received: 13))
        // The hole is not papered over: the next item must still be 12.
        #expect(sequencer.receive(change(14)) == .gap(expected: 12, received: 14))
        #expect(sequencer.receive(change(12)) == .accepted)
        #expect(sequencer.takeComplete()?.through == 12)
    }

    @Test func ignoresRepeatsOfWhatWasReceived() {
        var sequencer = ChangeSequencer(after: 10)
        #expect(sequencer.receive(change(11)) == .accepted)
        #expect(sequencer.receive(change(11)) == .duplicate)
        #expect(sequencer.receive(change(5)) == .duplicate)
        #expect(sequencer.takeComplete()?.items.count == 1)
    }

    @Test func skipsCoverRangesAndJoin() {
        var sequencer = ChangeSequencer(after: 0)
        #expect(sequencer.receive(.skip(from: 1, through: 4, isCommit: false)) == .accepted)
        #expect(sequencer.receive(change(5)) == .accepted)
        #expect(sequencer.receive(.skip(from: 7, through: 8, isCommit: true)) == .gap(expected: 6, received: 7))
        #expect(sequencer.receive(.skip(from: 6, through: 8, isCommit: true)) == .accepted)
        #expect(sequencer.takeComplete()?.through == 8)
    }

    @Test func aLargeTransactionIsTakenInPiecesOnceEnoughOfItWaits() {
        var sequencer = ChangeSequencer(after: 0)
        _ = sequencer.receive(change(1))
        _ = sequencer.receive(change(2, commit: false))
        #expect(sequencer.isInsideTransaction)
        // Fewer than a piece of the open transaction: only the whole one before it.
        let whole = sequencer.takeReady(minimumPiece: 3)
        #expect(whole?.items.map(\.lastLSN) == [1] && whole?.through == 1 && whole?.continues == false)
        _ = sequencer.receive(change(3, commit: false))
        _ = sequencer.receive(change(4, commit: false))
        let piece = sequencer.takeReady(minimumPiece: 3)
        #expect(piece?.items.map(\.lastLSN) == [2, 3, 4] && piece?.through == 4 && piece?.continues == true)
        #expect(sequencer.takeReady(minimumPiece: 3) == nil)
        // The commit ends it: the rest goes without `continues`, with the next whole transaction.
        _ = sequencer.receive(change(5))
        _ = sequencer.receive(change(6))
        let rest = sequencer.takeReady(minimumPiece: 3)
        #expect(rest?.items.map(\.lastLSN) == [5, 6] && rest?.through == 6 && rest?.continues == false)
        #expect(!sequencer.isInsideTransaction && sequencer.committed == 6)
        // Whole transactions and a piece of the next come out together, in order.
        _ = sequencer.receive(change(7))
        _ = sequencer.receive(change(8, commit: false))
        let both = sequencer.takeReady(minimumPiece: 1)
        #expect(both?.items.map(\.lastLSN) == [7, 8] && both?.through == 8 && both?.continues == true)
    }

    @Test func discardingAnOpenTransactionRewindsToTheLastCommit() {
        var sequencer = ChangeSequencer(after: 0)
        _ = sequencer.receive(change(1))
        _ = sequencer.receive(change(2, commit: false))
        sequencer.discardOpenTransaction()
        #expect(sequencer.received == 1)
        #expect(sequencer.receive(change(2, commit: true)) == .accepted)
        #expect(sequencer.takeComplete()?.items.map(\.lastLSN) == [1, 2])
    }
}

@Suite struct MergeAndBootstrapTests {
    @Test func higherVersionWinsStrictly() {
        #expect(MergeRule.incomingWins(incoming: 5, local: nil))
        #expect(MergeRule.incomingWins(incoming: 5, local: 4))
        #expect(!MergeRule.incomingWins(incoming: 5, local: 5))
        #expect(!MergeRule.incomingWins(incoming: 4, local: 5))
    }

    @Test func mergesUntilEveryPageIsInAndThePositionPassesTheHorizon() {
        var progress = BootstrapProgress.starting(collections: ["a", "b"], at: 100)
        #expect(progress.applyMode(position: 100) == .merge)
        progress.pageApplied(collection: "a", lsn: 120, lastKey: "k", hasMore: true)
        progress.pageApplied(collection: "a", lsn: 130, lastKey: "z", hasMore: false)
        #expect(progress.remaining.keys.sorted() == ["b"])
        #expect(progress.remaining["b"] == .some(nil))
        progress.pageApplied(collection: "b", lsn: 125, lastKey: nil, hasMore: false)
        #expect(progress.horizon == 130)
        #expect(!progress.isComplete(position: 129))
        #expect(progress.isComplete(position: 130))
        #expect(progress.applyMode(position: 200) == .merge)  // still bootstrapping until marked complete
        progress.phase = .following
        #expect(progress.applyMode(position: 130) == .ordered)
    }

    @Test func backoffGrowsToItsCeilingWithJitter() {
        var backoff = Backoff(initial: .milliseconds(100), maximum: .seconds(1))
        var generator = SystemRandomNumberGenerator()
        var ceilings: [Duration] = []
        for _ in 0..<6 {
            let ceiling = backoff.ceiling
            ceilings.append(ceiling)
            let wait = backoff.next(using: &generator)
            #expect(wait >= ceiling / 2 && wait <= ceiling)
        }
        #expect(
            ceilings == [
                .milliseconds(100), .milliseconds(200), .milliseconds(400), .milliseconds(800), .seconds(1),
                .seconds(1),
            ])
        backoff.reset()
        #expect(backoff.ceiling == .milliseconds(100))
    }
}
