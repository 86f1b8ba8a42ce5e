import ConcordCore
import Foundation
import GRDB
import Testing

@testable import ConcordSQLite

func temporaryFile(_ name: String) -> String {
    let folder = FileManager.default.temporaryDirectory.appendingPathComponent("concord-tests-\(UUID().uuidString)")
    try! FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
    return folder.appendingPathComponent(name).path
}

@Suite struct PublisherStoreTests {
    @Test func writesTakeGapFreeLSNsAndMarkCommits() async throws {
        let store = try PublisherStore(path: temporaryFile("p.sqlite"))
        let first = try await store.write { batch in
            batch.upsert("users", key: "1", json: #"{ "a" : 1 }"#)
            batch.upsert("users", key: "2", json: "2")
        }
        let second = try await store.write([.delete("users", "1")])
        #expect(first == 2 && second == 3 && store.head == 3)
        let items = try await store.items(after: 0, limit: 100)
        #expect(items.map(\.lastLSN) == [1, 2, 3])
        #expect(items.map(\.isCommit) == [false, true, true])
        guard case .change(let change) = items[0] else { Issue.record("expected a change"); return }
        #expect(change.value == #"{"a":1}"#)
        let feed = try await store.feedInfo()
        #expect(feed.collections.map(\.name) == ["users"])
        #expect(feed.collections.map(\.count) == [1])
        #expect(try await store.records(of: "users") == [Record(key: "2", version: 2, value: "2")])
    }

    /// An update or delete takes the replaced element's key hash from its record: the element
    /// it names, the digests and the stored key hashes are those of a full hashing.
    @Test func theReplacedElementTakesItsKeyHashFromTheRecord() async throws {
        let store = try PublisherStore(path: temporaryFile("p.sqlite"))
        try await store.write([.upsert("users", "a", json: "1"), .upsert("users", "b", json: "2")])
        try await store.write([.upsert("users", "a", json: "3"), .delete("users", "b")])
        try await store.write([.upsert("users", "b", json: "4")])
        // A record whose key hash is not stored (zero, as the column's default) is hashed in full.
        try await store.pool.write { db in
            try db.execute(sql: "UPDATE concord_records SET key_hash = 0 WHERE key = 'a'")
        }
        try await store.write([.upsert("users", "a", json: "6")])
        try await store.write([.upsert("users", "b", json: "7")])
        let named = try await store.pool.read { db in
            try String.fetchAll(db, sql: "SELECT coalesce(before, '') FROM concord_log ORDER BY lsn")
        }
        let replaced: [Element?] = [
            nil, nil, Element(collection: "users", key: "a", version: 1, value: "1"),
            Element(collection: "users", key: "b", version: 2, value: "2"), nil,
            Element(collection: "users", key: "a", version: 3, value: "3"),
            Element(collection: "users", key: "b", version: 5, value: "4"),
        ]
        #expect(named == replaced.map { $0?.description ?? "" })
        for check in try await store.digestCheck() { #expect(check.stored == check.scanned) }
        let keyHashes = try await store.pool.read { db in
            try Int64.fetchAll(db, sql: "SELECT key_hash FROM concord_records WHERE key = 'b'")
        }
        #expect(keyHashes == [Int64(bitPattern: Element.keyHash(collection: "users", key: "b"))])
    }

    @Test func transactionsWrittenTogetherStayAtomicEachAndCommitWithTheirMarker() async throws {
        let store = try PublisherStore(path: temporaryFile("p.sqlite"))
        let last = try await store.write(
            transactions: [
                [.upsert("users", "1", json: "1"), .upsert("users", "2", json: "2")], [],
                [.upsert("users", "1", json: #"{ "b" : 2 }"#)], [.delete("users", "2")],
            ], marker: ("source.position", "41"))
        #expect(last == 4 && store.head == 4)
        let items = try await store.items(after: 0, limit: 100)
        #expect(items.map(\.isCommit) == [false, true, true, true])
        // A pull never ends inside one of them.
        #expect(try await store.items(after: 0, limit: 1).map(\.lastLSN) == [1, 2])
        guard case .change(let replaced) = items[2] else { Issue.record("expected a change"); return }
        #expect(replaced.value == #"{"b":2}"#)
        #expect(replaced.before == Element(collection: "users", key: "1", version: 1, value: "1"))
        #expect(try store.marker("source.position") == "41")
        #expect(try await store.records(of: "users") == [Record(key: "1", version: 3, value: #"{"b":2}"#)])
        // Only empty transactions: the marker moves, the head stays.
        #expect(try await store.write(transactions: [[]], marker: ("source.position", "42")) == 4)
        #expect(try store.marker("source.position") == "42" && store.head == 4)
        // One bad value anywhere and none of them is written, nor the marker.
        await #expect(throws: ConcordError.self) {
            try await store.write(
                transactions: [[.upsert("users", "3", json: "3")], [.upsert("users", "4", json: "{bad")]],
                marker: ("source.position", "43"))
        }
        #expect(try store.marker("source.position") == "42" && store.head == 4)
    }

    @Test func newRecordsGoInWithoutTheirKeyHashIndexAndAKeyHeldFailsTheWrite() async throws {
        let path = temporaryFile("p.sqlite")
        var store: PublisherStore? = try PublisherStore(path: path)
        try await store!.write([.upsert("users", "1", json: "1")])
        try await store!.dropKeyHashIndex()
        #expect(try await store!.insertNew([.upsert("users", "2", json: "2"), .upsert("users", "3", json: "3")]) == 3)
        // A key the store holds fails the whole write: nothing is replaced unseen.
        await #expect(throws: ConcordError.self) {
            try await store!.insertNew([.upsert("users", "4", json: "4"), .upsert("users", "1", json: "5")])
        }
        #expect(store!.head == 3)
        #expect(try await store!.records(of: "users").map(\.value) == ["1", "2", "3"])
        let items = try await store!.items(after: 1, limit: 100)
        #expect(items.map(\.isCommit) == [false, true])
        for check in try await store!.digestCheck() { #expect(check.stored == check.scanned) }
        // Found by key hash without the index, and with it again once the store is opened again.
        let hash = Element.keyHash(collection: "users", key: "2")
        #expect(try await store!.records(of: "users", keyHashes: [hash]).records.map(\.key) == ["2"])
        store = nil
        store = try PublisherStore(path: path)
        #expect(try await store!.records(of: "users", keyHashes: [hash]).records.map(\.key) == ["2"])
        let indexes = try await DatabaseQueue(path: path).read { db in
            try String.fetchAll(db, sql: "SELECT name FROM sqlite_master WHERE type = 'index'")
        }
        #expect(indexes.contains("concord_records_key_hash"))
    }

    @Test func aTransactionGivenInPiecesCommitsWholeOrNotAtAll() async throws {
        let path = temporaryFile("p.sqlite")
        let store = try PublisherStore(path: path)
        try await store.write([.upsert("users", "1", json: "1"), .upsert("users", "2", json: "2")])
        let pieces = TransactionPieces(limit: 2)
        let writing = Task { try await store.write(pieces) }
        try await pieces.add([.upsert("users", "1", json: #"{ "a" : 1 }"#), .upsert("users", "3", json: "3")])
        // Asked of the open transaction: what its earlier pieces wrote, and what was there before.
        #expect(try await pieces.value(of: "users", key: "1", in: store) == #"{"a":1}"#)
        #expect(try await pieces.value(of: "users", key: "2", in: store) == "2")
        // Readers meanwhile see none of it.
        #expect(try await store.values(of: "users", keys: ["1", "3"]) == ["1", nil])
        #expect(try await store.items(after: 2, limit: 10).isEmpty && store.head == 2)
        try await pieces.add([.delete("users", "2")])
        try pieces.end(marker: ("source.position", "7"))
        #expect(try await writing.value == 5)
        #expect(try await pieces.committed() == 5)
        #expect(try await pieces.value(of: "users", key: "3", in: store) == "3")
        let items = try await store.items(after: 2, limit: 1)
        #expect(items.map(\.lastLSN) == [3, 4, 5], "a pull takes the transaction whole")
        #expect(items.map(\.isCommit) == [false, false, true])
        guard case .change(let replaced) = items[0] else { Issue.record("expected a change"); return }
        #expect(replaced.before == Element(collection: "users", key: "1", version: 1, value: "1"))
        #expect(try store.marker("source.position") == "7" && store.head == 5)
        #expect(try await store.records(of: "users").map(\.key) == ["1", "3"])
        // The kept sketch, folded piece by piece, matches one scanned from the records.
        let kept = try await store.sketch(of: "users", at: 5)
        #expect(try await PublisherStore(path: path).sketch(of: "users", at: 5).symbols == kept.symbols)

        // Given up halfway: nothing of it stays, nor its marker.
        let abandoned = TransactionPieces()
        let failing = Task { try await store.write(abandoned) }
        try await abandoned.add([.upsert("users", "4", json: "4"), .delete("users", "1")])
        #expect(try await abandoned.value(of: "users", key: "4", in: store) == "4")
        abandoned.abort(ConcordError(.unavailable, "the source went away"))
        await #expect(throws: ConcordError.self) { try await failing.value }
        await #expect(throws: ConcordError.self) { try await abandoned.add([.delete("users", "3")]) }
        #expect(try store.marker("source.position") == "7" && store.head == 5)
        #expect(try await store.records(of: "users").map(\.key) == ["1", "3"])
        // A bad value in a piece fails the whole transaction the same way.
        let refused = TransactionPieces()
        let refusing = Task { try await store.write(refused) }
        try await refused.add([.upsert("users", "5", json: "5")])
        try? await refused.add([.upsert("users", "6", json: "{bad")])
        try? refused.end(marker: nil)
        await #expect(throws: ConcordError.self) { try await refusing.value }
        #expect(store.head == 5)
        try await store.write([.upsert("users", "8", json: "8")])
        for check in try await store.digestCheck() { #expect(check.stored == check.scanned) }
    }

    @Test func valuesAreLookedUpOneAtATimeOrManyInTheOrderAsked() async throws {
        let store = try PublisherStore(path: temporaryFile("p.sqlite"))
        try await store.write([
            .upsert("users", "1", json: "1"), .upsert("users", "2", json: #"{"a":2}"#),
            .upsert("teams", "3", json: "3"),
        ])
        try await store.write([.delete("users", "1")])
        #expect(try store.value(of: "users", key: "2") == #"{"a":2}"#)
        #expect(try store.value(of: "users", key: "1") == nil)
        #expect(try store.value(of: "users", key: "3") == nil)
        // A key twice, a deleted one, one of another collection and one never written.
        let values = try await store.values(of: "users", keys: ["2", "1", "3", "2", "9"])
        #expect(values == [#"{"a":2}"#, nil, nil, #"{"a":2}"#, nil])
        #expect(try await store.values(of: "users", keys: []).isEmpty)
    }

    @Test func aWriteWithInvalidJSONChangesNothing() async throws {
        let store = try PublisherStore(path: temporaryFile("p.sqlite"))
        try await store.write([.upsert("users", "1", json: "1")])
        await #expect(throws: ConcordError.self) {
            try await store.write([.upsert("users", "2", json: "2"), .upsert("users", "3", json: "{bad")])
        }
        #expect(store.head == 1)
        #expect(try await store.records(of: "users").count == 1)
    }

    @Test func aPullNeverEndsInsideATransaction() async throws {
        let store = try PublisherStore(path: temporaryFile("p.sqlite"))
        try await store.write((1...50).map { .upsert("c", "\($0)", json: "\($0)") })
        try await store.write([.upsert("c", "x", json: "0")])
        let items = try await store.items(after: 0, limit: 10)
        #expect(items.count == 50)
        #expect(items.last?.isCommit == true)
        #expect(try await store.items(after: 50, limit: 10).map(\.lastLSN) == [51])
    }

    @Test func aStreamReadEndsWhereItsLimitDoesAndSkipsCoverTheCut() async throws {
        let store = try PublisherStore(path: temporaryFile("p.sqlite"))
        try await store.write((1...50).map { .upsert($0 % 10 == 0 ? "a" : "b", "\($0)", json: "\($0)") })
        try await store.write([.upsert("a", "x", json: "0")])
        // Read as a stream reads: 12 at a time, inside the transaction, each read joining the last.
        var sequencer = ChangeSequencer(after: 0)
        var cursor: LSN = 0
        var reads = 0
        while cursor < store.head {
            let items = try await store.items(after: cursor, limit: 12, wholeTransactions: false)
            #expect(items.count <= 12)
            for item in items { #expect(sequencer.receive(item) == .accepted) }
            cursor = items.last!.lastLSN
            reads += 1
        }
        #expect(reads == 5 && sequencer.committed == 51)
        // Filtered, a read that ends in other collections' changes covers them with a skip.
        let filtered = try await store.items(after: 0, limit: 12, collections: ["a"], wholeTransactions: false)
        #expect(filtered.last?.lastLSN == 12 && filtered.last?.isCommit == false)
        // A read of nothing but other collections' changes still moves the reader on: were it
        // empty, a stream would read the same rows again and again.
        #expect(
            try await store.items(after: 10, limit: 9, collections: ["a"], wholeTransactions: false)
                == [.skip(from: 11, through: 19, isCommit: false)])
        var joined = ChangeSequencer(after: 0)
        cursor = 0
        while cursor < store.head {
            let items = try await store.items(after: cursor, limit: 12, collections: ["a"], wholeTransactions: false)
            for item in items { #expect(joined.receive(item) == .accepted) }
            cursor = items.last!.lastLSN
        }
        #expect(joined.committed == 51)
    }

    @Test func filteredPullsCoverOtherCollectionsWithSkips() async throws {
        let store = try PublisherStore(path: temporaryFile("p.sqlite"))
        try await store.write([.upsert("a", "1", json: "1"), .upsert("b", "1", json: "1")])
        try await store.write([.upsert("b", "2", json: "1"), .upsert("b", "3", json: "1")])
        try await store.write([
            .upsert("b", "4", json: "1"), .upsert("a", "2", json: "1"), .upsert("b", "5", json: "1"),
        ])
        let items = try await store.items(after: 0, limit: 100, collections: ["a"])
        var sequencer = ChangeSequencer(after: 0)
        for item in items { #expect(sequencer.receive(item) == .accepted) }
        #expect(sequencer.committed == 7)
        let changed: [LSN] = items.compactMap { if case .change(let c) = $0 { c.lsn } else { nil } }
        #expect(changed == [1, 6])
    }

    @Test func pagesAreKeyOrderedAndStampedWithTheHead() async throws {
        let store = try PublisherStore(path: temporaryFile("p.sqlite"))
        try await store.write((1...25).map { .upsert("c", String(format: "%03d", $0), json: "\($0)") })
        var keys: [String] = []
        var afterKey: String?
        while true {
            let page = try await store.page(collection: "c", afterKey: afterKey, limit: 10)
            #expect(page.lsn == 25)
            keys += page.records.map(\.key)
            guard page.hasMore else { break }
            afterKey = page.records.last?.key
        }
        #expect(keys == (1...25).map { String(format: "%03d", $0) })
        await #expect(throws: ConcordError.self) { try await store.page(collection: "nope", afterKey: nil, limit: 10) }
    }

    @Test func positionsPastTheHeadAreRefused() async throws {
        let store = try PublisherStore(path: temporaryFile("p.sqlite"))
        try await store.write([.upsert("c", "1", json: "1")])
        try await store.checkPosition(1)
        await #expect {
            try await store.checkPosition(2)
        } throws: { ($0 as? ConcordError)?.code == .beyondHead }
    }

    /// Many small batches, and a few large ones that touch each key several times.
    @Test(arguments: [(1...4, 300), (300...600, 12)])
    func digestsAndBeforeElementsMatchARescanAndAReplayOfTheLog(sizes: ClosedRange<Int>, batches: Int) async throws {
        let store = try PublisherStore(path: temporaryFile("p.sqlite"))
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<batches {
            try await store.write { batch in
                for _ in 0..<Int.random(in: sizes, using: &generator) {
                    let collection = Bool.random(using: &generator) ? "a" : "b"
                    let key = "k\(Int.random(in: 0..<40, using: &generator))"
                    if Int.random(in: 0..<3, using: &generator) == 0 {
                        batch.delete(collection, key: key)
                    } else {
                        batch.upsert(collection, key: key, json: "{\"v\":\(Int.random(in: 0..<9, using: &generator))}")
                    }
                }
            }
        }
        // The digest kept write by write equals one computed from the records.
        let checks = try await store.digestCheck()
        #expect(checks.map(\.collection) == ["a", "b"])
        for check in checks { #expect(check.stored == check.scanned, "\(check.collection)") }
        let feed = try await store.feedInfo()
        #expect(feed.collections.map(\.digest) == checks.map(\.stored))
        // Replaying the log from nothing reproduces every change's before-element, and the digests.
        var current: [String: Element] = [:]
        var replayed: [String: CollectionDigest] = ["a": .empty, "b": .empty]
        for item in try await store.items(after: 0, limit: 10_000) {
            guard case .change(let change) = item else { continue }
            let id = change.collection + "/" + change.key
            #expect(change.before == current[id], "LSN \(change.lsn)")
            replayed[change.collection]!.apply(change, replacing: change.before)
            current[id] = Element(change)
        }
        #expect(replayed["a"] == checks[0].stored && replayed["b"] == checks[1].stored)
        // The records are the last write of each key.
        for collection in ["a", "b"] {
            let records = try await store.records(of: collection)
            let expected = current.filter { $0.key.hasPrefix(collection + "/") }
            #expect(records.count == expected.count)
            for record in records {
                #expect(
                    expected[collection + "/" + record.key]
                        == Element(
                            collection: collection, key: record.key, version: record.version, value: record.value))
            }
        }
    }

    @Test func theFeedSurvivesReopening() async throws {
        let path = temporaryFile("p.sqlite")
        let feedID: String
        do {
            let store = try PublisherStore(path: path)
            try await store.write([.upsert("c", "1", json: "1")])
            feedID = store.feedID
        }
        let reopened = try PublisherStore(path: path)
        #expect(reopened.feedID == feedID)
        #expect(reopened.head == 1)
    }
}

@Suite struct ReplicaStoreTests {
    func upsert(_ lsn: LSN, _ key: String, _ value: String, commit: Bool = true) -> StreamItem {
        .change(Change(lsn: lsn, collection: "c", key: key, operation: .upsert, value: value, isCommit: commit))
    }

    func delete(_ lsn: LSN, _ key: String) -> StreamItem {
        .change(Change(lsn: lsn, collection: "c", key: key, operation: .delete, value: nil, isCommit: true))
    }

    @Test func snapshotRecordsNeverOverwriteNewerLogChangesOrTombstones() async throws {
        let store = try ReplicaStore(path: temporaryFile("r.sqlite"))
        _ = try await store.initialize(feedID: "f", source: "s", head: 10, collections: ["c"], filter: nil)
        // The log runs ahead of the snapshot: k1 updated at 11, k2 deleted at 12.
        try await store.apply([upsert(11, "k1", "\"new\""), delete(12, "k2")], through: 12)
        // A page read at 10 still holds the old k1 and k2.
        try await store.apply(
            SnapshotPage(
                collection: "c", lsn: 10,
                records: [
                    Record(key: "k1", version: 5, value: "\"old\""), Record(key: "k2", version: 6, value: "\"gone\""),
                    Record(key: "k3", version: 7, value: "\"kept\""),
                ], hasMore: false))
        #expect(
            try store.records(of: "c") == [
                Record(key: "k1", version: 11, value: "\"new\""), Record(key: "k3", version: 7, value: "\"kept\""),
            ])
        #expect(try await store.completeBootstrapIfReady())
        #expect(try store.state()?.progress.phase == .following)
    }

    @Test func aPageReadAfterTheLogChangeWinsAndBootstrapWaitsForTheHorizon() async throws {
        let store = try ReplicaStore(path: temporaryFile("r.sqlite"))
        _ = try await store.initialize(feedID: "f", source: "s", head: 10, collections: ["c"], filter: nil)
        try await store.apply(
            SnapshotPage(
                collection: "c", lsn: 15, records: [Record(key: "k1", version: 14, value: "14")], hasMore: false))
        #expect(try await store.completeBootstrapIfReady() == false)  // position 10 < horizon 15
        try await store.apply(
            [
                upsert(11, "k1", "11"), upsert(12, "k2", "12"), delete(13, "k2"), upsert(14, "k1", "14"),
                upsert(15, "k3", "15"),
            ], through: 15)
        #expect(try await store.completeBootstrapIfReady())
        #expect(try store.records(of: "c").map(\.key) == ["k1", "k3"])
        #expect(try store.records(of: "c").first?.version == 14)
    }

    @Test func changesThatDoNotContinueThePositionAreRefusedAndChangeNothing() async throws {
        let store = try ReplicaStore(path: temporaryFile("r.sqlite"))
        _ = try await store.initialize(feedID: "f", source: "s", head: 0, collections: [], filter: nil)
        _ = try await store.completeBootstrapIfReady()
        try await store.apply([upsert(1, "a", "1")], through: 1)
        await #expect(throws: ConcordError.self) { try await store.apply([upsert(3, "b", "3")], through: 3) }
        await #expect(throws: ConcordError.self) { try await store.apply([upsert(1, "b", "3")], through: 1) }
        #expect(try store.state()?.position == 1)
        #expect(try store.records(of: "c").map(\.key) == ["a"])
    }

    /// The SQLite store gathers the pieces of a large transaction and applies them whole.
    @Test func piecesOfATransactionAreAppliedWholeOrNotAtAll() async throws {
        let store = try ReplicaStore(path: temporaryFile("r.sqlite"))
        _ = try await store.initialize(feedID: "f", source: "s", head: 0, collections: [], filter: nil)
        _ = try await store.completeBootstrapIfReady()
        try await store.apply([upsert(1, "a", "1")], through: 1)
        var given = 0
        try await store.apply([upsert(2, "b", "2", commit: false)], through: 2) { () async throws -> StreamPiece in
            given += 1
            #expect(try store.state()?.position == 1)
            return given == 1
                ? StreamPiece(items: [upsert(3, "c", "3", commit: false)], through: 3, endsTransaction: false)
                : StreamPiece(items: [upsert(4, "a", "4")], through: 4, endsTransaction: true)
        }
        #expect(try store.state()?.position == 4)
        #expect(try store.records(of: "c").map { "\($0.key)=\($0.value)" } == ["a=4", "b=2", "c=3"])
        struct StreamBroke: Error {}
        await #expect(throws: StreamBroke.self) {
            try await store.apply([upsert(5, "d", "5", commit: false)], through: 5) { throw StreamBroke() }
        }
        // A piece that leaves a hole is refused.
        await #expect(throws: ConcordError.self) {
            try await store.apply([upsert(5, "d", "5", commit: false)], through: 5) {
                StreamPiece(items: [upsert(7, "e", "7")], through: 7, endsTransaction: true)
            }
        }
        #expect(try store.state()?.position == 4)
        #expect(try store.records(of: "c").count == 3)
    }

    @Test func replicaTablesArePlainSQL() async throws {
        let path = temporaryFile("r.sqlite")
        let store = try ReplicaStore(path: path)
        _ = try await store.initialize(feedID: "f", source: "s", head: 0, collections: [], filter: nil)
        try await store.apply([upsert(1, "a", #"{"n":1}"#)], through: 1)
        let queue = try DatabaseQueue(path: path)
        let row = try queue.read { db in try Row.fetchOne(db, sql: "SELECT key, version, value FROM c") }
        #expect(row?["key"] == "a")
        #expect(row?["version"] == 1)
        #expect(row?["value"] == #"{"n":1}"#)
        let columns = try await queue.read { db in try db.columns(in: "c").map(\.name) }
        #expect(columns == ["key", "version", "value"])
    }
}

@Suite struct KeptSketchesTests {
    /// A transaction's element changes, interleaving collections, fold in as if applied one by one.
    @Test func aBatchOfElementChangesFoldsInLikeEachChangeAlone() {
        let collections = ["a", "b", "a", "a", "c", "b", "b", "a"]
        var changes: [PublisherStore.ElementChange] = []
        for round in 0..<3 {
            for (index, collection) in collections.enumerated() {
                let before =
                    round == 0
                    ? nil : Element(collection: collection, key: "k\(index)", version: UInt64(round), value: "v")
                let after =
                    round == 2 && index % 2 == 0
                    ? nil : Element(collection: collection, key: "k\(index)", version: UInt64(round + 1), value: "v")
                changes.append(.init(collection: collection, before: before, after: after))
            }
        }
        var batched = SketchSet(capacity: 128)
        batched.apply(changes)
        var single = SketchSet(capacity: 128)
        for change in changes { single.apply(change.collection, before: change.before, after: change.after) }
        for collection in ["a", "b", "c"] {
            #expect(batched.sketch(of: collection).symbols == single.sketch(of: collection).symbols)
        }
    }

    /// Queued transactions are folded in by the idle thread with no reader asking, and a reader
    /// then sees the same sketch as one built change by change.
    @Test func queuedChangesAreFoldedInWithoutAReader() async throws {
        let kept = KeptSketches()
        kept.install(SketchSet(capacity: 128))
        var expected = RatelessSketch(capacity: 128)
        // Small transactions, and large ones that are queued in several chunks.
        for transaction in 0..<50 {
            var changes: [PublisherStore.ElementChange] = []
            for index in 0..<(transaction % 10 == 9 ? 5000 : 20) {
                let before =
                    transaction == 0
                    ? nil : Element(collection: "a", key: "k\(index)", version: UInt64(transaction), value: "v")
                let after = Element(collection: "a", key: "k\(index)", version: UInt64(transaction + 1), value: "v")
                changes.append(.init(collection: "a", before: before, after: after))
                expected.apply(before: before, after: after)
            }
            kept.queue(changes)
        }
        let deadline = ContinuousClock.now + .seconds(30)
        while kept.queuedCount > 0, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        #expect(kept.queuedCount == 0)
        #expect(kept.sketch(of: "a")?.symbols == expected.symbols)
    }

    /// Past the bound, the transaction that queues folds everything itself: the queue never
    /// holds more than the bound, whether or not the idle thread gets a core.
    @Test func theQueueStaysWithinItsBound() {
        let kept = KeptSketches()
        kept.install(SketchSet(capacity: 16))
        let change = PublisherStore.ElementChange(
            collection: "a", before: nil, after: Element(collection: "a", key: "k", version: 1, value: "v"))
        let batch = Array(repeating: change, count: 4096)
        var expected = RatelessSketch(capacity: 16)
        for _ in 0..<(KeptSketches.maxQueued / batch.count + 2) {
            kept.queue(batch)
            #expect(kept.queuedCount < KeptSketches.maxQueued)
            for change in batch { expected.apply(before: change.before, after: change.after) }
        }
        // Folded inline or by the idle thread, every change is in, once.
        #expect(kept.sketch(of: "a")?.symbols == expected.symbols)
    }
}
