import AsyncHTTPClient
import ConcordClient
import ConcordCore
import ConcordSQLite
import ConcordServer
import Foundation
import GRDB
import NIOCore
import Synchronization
import Testing

/// Every failure mode injected for real ends verified equal, and repairing k differences
/// moves O(k) records, not the collection.
@Suite(.serialized, .timeLimit(.minutes(6)))
struct VerificationTests {
    static func sourceStore(_ folder: URL, retainChanges: UInt64? = nil) throws -> PublisherStore {
        var configuration = PublisherStore.Configuration()
        configuration.checkpoints.everyChanges = 50
        configuration.checkpoints.interval = .milliseconds(200)
        configuration.retention.maxChanges = retainChanges
        return try PublisherStore(
            path: folder.appendingPathComponent("source.sqlite").path, configuration: configuration)
    }

    static func fill(_ source: PublisherStore, records: Int) async throws {
        for start in stride(from: 0, to: records, by: 1000) {
            try await source.write(
                (start..<min(records, start + 1000)).map {
                    .upsert("items", "k\($0)", json: "{\"v\":\($0),\"pad\":\"\(String(repeating: "x", count: 40))\"}")
                })
        }
    }

    /// A source holding `records` records and a new, empty replica file beside it.
    static func sourceWithEmptyReplica(records: Int) async throws -> (PublisherStore, String, ReplicaStore) {
        let folder = Harness.folder()
        let source = try sourceStore(folder)
        try await fill(source, records: records)
        let replicaPath = folder.appendingPathComponent("replica.sqlite").path
        return (source, replicaPath, try ReplicaStore(path: replicaPath))
    }

    /// Runs a subscriber in the background until `body` returns.
    static func withSubscriber<T: Sendable>(
        url: String, replica: any ReplicaStoring, scrub: Duration? = nil, _ body: @Sendable () async throws -> T
    ) async throws -> T {
        let http = SourceClient.makeHTTPClient()
        var configuration = Subscriber.Configuration(source: url)
        configuration.pageSize = 500
        configuration.backoffInitial = .milliseconds(20)
        configuration.backoffMaximum = .milliseconds(300)
        configuration.scrubInterval = scrub
        let subscriber = Subscriber(configuration: configuration, store: replica, http: http, logger: Harness.logger)
        do {
            let result = try await withThrowingTaskGroup(of: T?.self) { group in
                group.addTask {
                    try await subscriber.run()
                    return nil
                }
                let result = try await body()
                group.cancelAll()
                try await group.waitForAll()
                return result
            }
            try await http.shutdown()
            return result
        } catch {
            try? await http.shutdown()
            throw error
        }
    }

    static func waitVerified(_ replica: ReplicaStore, source: PublisherStore) async throws {
        do {
            try await Harness.waitUntil("the replica is verified at the head", timeout: .seconds(30)) {
                let state = try replica.state()
                return state?.verifiedLSN == source.head && state?.position == source.head
            }
        } catch {
            let state = try replica.state()
            let digests = try replica.digests()
            let summary = "position \(state?.position ?? 0), verified \(state?.verifiedLSN ?? 0), digests \(digests)"
            Issue.record("head \(source.head), \(summary)")
            throw error
        }
    }

    /// Plain SQL on the replica file from another connection: what a careless service might do.
    static func editBehindTheBack(_ path: String, _ sql: String) throws {
        // Waits its turn while the replica writes, as any other writer of the file must.
        var configuration = Configuration()
        configuration.busyMode = .timeout(10)
        let queue = try DatabaseQueue(path: path, configuration: configuration)
        try queue.inDatabase { db in try db.execute(sql: sql) }
        try queue.close()
    }

    static let nineEdits = """
        UPDATE items SET value = '{"v":-1}' WHERE key IN ('k10', 'k20', 'k30');
        DELETE FROM items WHERE key IN ('k11', 'k21', 'k31');
        INSERT INTO items (key, version, value) VALUES ('zz1', 5, '{}'), ('zz2', 5, '{}'), ('zz3', 5, '{}');
        """

    @Test func rowsEditedBehindTheBackWhileRunningAreFoundByTheScrubAndRepaired() async throws {
        let (source, replicaPath, replica) = try await Self.sourceWithEmptyReplica(records: 5000)
        try await PublisherServer.withRunningServer(store: source, configuration: .testing, logger: Harness.logger) {
            url in
            try await Self.withSubscriber(url: url, replica: replica, scrub: .milliseconds(500)) {
                try await Self.waitVerified(replica, source: source)
                try Self.editBehindTheBack(replicaPath, Self.nineEdits)
                #expect(try await Harness.differences(source: source, replica: replica).count == 9)
                try await Harness.waitUntil("the scrub repairs the edits", timeout: .seconds(30)) {
                    try await Harness.differences(source: source, replica: replica).isEmpty
                }
                // Writes go on and are verified at checkpoints after the repair.
                try await source.write([.upsert("items", "k1", json: "{\"v\":\"after\"}")])
                try await Self.waitVerified(replica, source: source)
            }
        }
        let state = try #require(try replica.state())
        #expect(state.repairedRecords == 9, "9 records repaired, not the collection of 5000")
        #expect(state.mismatches >= 1)
    }

    @Test func rowsEditedWhileStoppedAreReportedByKeyAndRepairedWithFewBytes() async throws {
        let (source, replicaPath, replica) = try await Self.sourceWithEmptyReplica(records: 5000)
        try await PublisherServer.withRunningServer(store: source, configuration: .testing, logger: Harness.logger) {
            url in
            try await Self.withSubscriber(url: url, replica: replica) {
                try await Self.waitVerified(replica, source: source)
            }
            try Self.editBehindTheBack(replicaPath, Self.nineEdits)
            let http = SourceClient.makeHTTPClient()
            defer { _ = http.shutdown() as EventLoopFuture<Void> }  // on every path, or deinit traps
            let reconciler = Reconciler(client: SourceClient(baseURL: url, http: http), logger: Harness.logger)
            let position = try #require(try replica.state()).position
            let scanned = try #require(try await replica.scanAll()["items"])
            let local = scanned.sketch
            let found = try await reconciler.reconcile(
                "items", at: position, local: local, store: replica, repair: false)
            #expect(found.missing == ["k11", "k21", "k31"])
            #expect(found.extra == ["zz1", "zz2", "zz3"])
            #expect(found.stale == ["k10", "k20", "k30"])
            // 9 differences: a few dozen 41-byte symbols and 8 bytes per key hash, far from 5000 records.
            #expect(found.totalBytes < 4000, "\(found.totalBytes) bytes beyond the records")
            try await replica.adopt(scanned)
            let repaired = try await reconciler.reconcile(
                "items", at: position, local: local, store: replica, repair: true)
            #expect(repaired.repaired)
            #expect(try await Harness.differences(source: source, replica: replica).isEmpty)
            // The CLI says the same, by exit status.
            let verify = try ConcordProcess(["verify", "--source", url, "--db", replicaPath])
            #expect(try await verify.exitStatus() == 0)
            try await Self.withSubscriber(url: url, replica: replica) {
                try await source.write([.upsert("items", "k2", json: "{\"v\":\"later\"}")])
                try await Self.waitVerified(replica, source: source)
            }
        }
    }

    @Test func changesDroppedOnTheWireEndVerifiedEqual() async throws {
        let folder = Harness.folder()
        let source = try Self.sourceStore(folder)
        try await Self.fill(source, records: 2000)
        let replica = try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path)
        var configuration = PublisherServer.Configuration.testing
        configuration.dropEveryNthStreamItem = 37
        try await PublisherServer.withRunningServer(store: source, configuration: configuration, logger: Harness.logger)
        { url in
            try await Self.withSubscriber(url: url, replica: replica) {
                var workload = RandomWorkload(keySpace: 3000)
                for _ in 0..<400 { try await source.write(workload.transaction()) }
                try await Self.waitVerified(replica, source: source)
            }
        }
        #expect(try await Harness.differences(source: source, replica: replica).isEmpty)
    }

    /// The last change of the last transaction written is lost on the wire: no later line shows
    /// the hole, but the heartbeat's head does, and the replica refills it by a pull.
    @Test func theEndOfTheLastTransactionLostOnTheWireIsRefilled() async throws {
        let folder = Harness.folder()
        let source = try Self.sourceStore(folder)
        try await source.write([.upsert("items", "first", json: "0")])
        let replica = try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path)
        var configuration = PublisherServer.Configuration.testing
        configuration.dropEveryNthStreamItem = 4
        try await PublisherServer.withRunningServer(store: source, configuration: configuration, logger: Harness.logger)
        { url in
            try await Self.withSubscriber(url: url, replica: replica) {
                // Following the stream from the head: the next stream item sent is the first of
                // the transaction below, so its fourth and last is the one dropped.
                try await Self.waitVerified(replica, source: source)
                try await source.write([
                    .upsert("items", "a", json: "1"), .upsert("items", "b", json: "2"),
                    .delete("items", "first"), .upsert("items", "c", json: "3"),
                ])
                try await Self.waitVerified(replica, source: source)
            }
        }
        #expect(try await Harness.differences(source: source, replica: replica).isEmpty)
    }

    @Test func aReplicaStoppedPastRetentionRecoversByMovingOnlyWhatChanged() async throws {
        let folder = Harness.folder()
        let source = try Self.sourceStore(folder, retainChanges: 100)
        try await Self.fill(source, records: 5000)
        let replica = try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path)
        try await PublisherServer.withRunningServer(store: source, configuration: .testing, logger: Harness.logger) {
            url in
            try await Self.withSubscriber(url: url, replica: replica) {
                try await Self.waitVerified(replica, source: source)
            }
            let stoppedAt = try #require(try replica.state()).position
            // 1% of the records change, then the log is pruned past the replica's position.
            for round in 0..<3 {
                for index in 0..<50 {
                    try await source.write([.upsert("items", "k\(index * 100)", json: "{\"v\":\(round)}")])
                }
            }
            try await source.write([.delete("items", "k1"), .upsert("items", "new", json: "1")])
            try await source.pruneLog()
            let oldest = try await source.feedInfo().oldest
            #expect(oldest > stoppedAt + 1, "the replica's position fell out of the log")
            try await Self.withSubscriber(url: url, replica: replica) {
                try await Self.waitVerified(replica, source: source)
            }
        }
        #expect(try await Harness.differences(source: source, replica: replica).isEmpty)
        let state = try #require(try replica.state())
        #expect(state.repairedRecords == 52, "the 52 changed records moved, not 5000")
    }

    /// A replica stopped halfway through its bootstrap while the log is pruned past its position
    /// cannot bring its copied pages up to date from the log: it copies again from the head.
    @Test func aBootstrapInterruptedPastRetentionStartsOverAndEndsEqual() async throws {
        let folder = Harness.folder()
        let source = try Self.sourceStore(folder, retainChanges: 100)
        try await Self.fill(source, records: 20_000)
        let replica = try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path)
        try await PublisherServer.withRunningServer(store: source, configuration: .testing, logger: Harness.logger) {
            url in
            try await Self.withSubscriber(url: url, replica: replica) {
                try await Harness.waitUntil("a few pages are copied", timeout: .seconds(30)) {
                    (try replica.state()?.progress.remaining["items"] ?? nil) != nil
                }
            }
            let stoppedAt = try #require(try replica.state())
            #expect(stoppedAt.progress.phase == .bootstrapping)
            // Deletes and updates on both sides of the copied key range, then the log is pruned.
            for index in stride(from: 0, to: 20_000, by: 97) {
                try await source.write([.delete("items", "k\(index)"), .upsert("items", "k\(index + 1)", json: "-1")])
            }
            try await source.pruneLog()
            #expect(try await source.feedInfo().oldest > stoppedAt.position + 1)
            try await Self.withSubscriber(url: url, replica: replica) {
                try await Self.waitVerified(replica, source: source)
            }
        }
        #expect(try await Harness.differences(source: source, replica: replica).isEmpty)
    }

    /// 2,000 of 16,000 records stale need about 5,400 coded symbols: past the 4,096 both
    /// sides keep, so both compute the rest from their rows, and still only what changed moves.
    @Test func aDifferencePastTheKeptSymbolsIsStillReconciledRecordByRecord() async throws {
        let folder = Harness.folder()
        let source = try Self.sourceStore(folder, retainChanges: 100)
        try await Self.fill(source, records: 16_000)
        let replica = try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path)
        try await PublisherServer.withRunningServer(store: source, configuration: .testing, logger: Harness.logger) {
            url in
            try await Self.withSubscriber(url: url, replica: replica) {
                try await Self.waitVerified(replica, source: source)
            }
            for start in stride(from: 0, to: 16_000, by: 4000) {
                try await source.write(
                    stride(from: start, to: start + 4000, by: 8).map { .upsert("items", "k\($0)", json: "{\"v\":-1}") })
            }
            try await source.pruneLog()
            let local = try await replica.sketch(of: "items")
            let http = SourceClient.makeHTTPClient()
            defer { _ = http.shutdown() as EventLoopFuture<Void> }  // on every path, or deinit traps
            let reconciler = Reconciler(client: SourceClient(baseURL: url, http: http), logger: Harness.logger)
            let report = try await reconciler.reconcile(
                "items", at: source.head, local: local, store: replica, repair: true)
            #expect(report.symbols > ReplicaStore.sketchCapacity && !report.tooLarge)
            #expect(report.stale.count == 2000 && report.missing.isEmpty && report.extra.isEmpty)
            try await replica.jump(to: source.head)
            try await Self.withSubscriber(url: url, replica: replica) {
                try await Self.waitVerified(replica, source: source)
            }
        }
        #expect(try await Harness.differences(source: source, replica: replica).isEmpty)
        #expect(try #require(try replica.state()).repairedRecords == 2000, "2,000 records moved, not 16,000")
    }

    @Test func aReplicaRestoredFromAnOldCopyOfItsFileEndsEqual() async throws {
        let folder = Harness.folder()
        let source = try Self.sourceStore(folder, retainChanges: 100)
        try await Self.fill(source, records: 3000)
        let replicaPath = folder.appendingPathComponent("replica.sqlite").path
        let backupPath = folder.appendingPathComponent("backup.sqlite").path
        try await PublisherServer.withRunningServer(store: source, configuration: .testing, logger: Harness.logger) {
            url in
            let replica = try ReplicaStore(path: replicaPath)
            try await Self.withSubscriber(url: url, replica: replica) {
                try await Self.waitVerified(replica, source: source)
            }
            // An old backup: a consistent copy of the file as it is now.
            try Self.editBehindTheBack(replicaPath, "VACUUM INTO '\(backupPath)'")
            var workload = RandomWorkload(keySpace: 3000)
            for _ in 0..<300 { try await source.write(workload.transaction()) }
            try await Self.withSubscriber(url: url, replica: replica) {
                try await Self.waitVerified(replica, source: source)
            }
            try await source.pruneLog()
            // The replica's disk dies; the old backup is put in its place.
            for suffix in ["", "-wal", "-shm"] { try? FileManager.default.removeItem(atPath: replicaPath + suffix) }
            try FileManager.default.copyItem(atPath: backupPath, toPath: replicaPath)
            let restored = try ReplicaStore(path: replicaPath)
            try await Self.withSubscriber(url: url, replica: restored) {
                try await Self.waitVerified(restored, source: source)
            }
            #expect(try await Harness.differences(source: source, replica: restored).isEmpty)
        }
    }
}
