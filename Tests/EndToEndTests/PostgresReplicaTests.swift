import ConcordClient
import ConcordCore
import ConcordPostgres
import ConcordSQLite
import ConcordServer
import Foundation
import NIOCore
import Testing

/// `concord follow --postgres`: replicas kept in a real PostgreSQL schema. Part of the capture
/// suite, so no test here runs while another restarts the server.
extension PostgresCaptureTests {
    /// Starts `concord follow --postgres URL --schema replica` against a publisher.
    static func followIntoPostgres(
        source: String, url: String, folder: URL, extra: [String] = []
    ) throws -> ConcordProcess {
        try ConcordProcess(
            ["follow", "--source", source, "--postgres", url, "--schema", "replica", "--page-size", "500", "--quiet"]
                + extra,
            log: folder.appendingPathComponent("follow.log").path)
    }

    @Test func aPostgresReplicaOfAPostgresSourceEqualsTheTablesThroughCrashesAndEdits() async throws {
        let (url, sql) = try await Self.database()
        try await Self.fillInitialRows(sql)
        let replicaURL = try await PostgresHarness.database()
        let folder = Harness.folder()
        let (server, port) = try await Self.serve(folder, url: url)
        let source = "http://127.0.0.1:\(port)"
        var follower = try Self.followIntoPostgres(
            source: source, url: replicaURL, folder: folder, extra: ["--scrub-interval-seconds", "1"])
        let replica = try await PostgresReplicaStore.open(
            url: replicaURL, configuration: .init(schema: "replica"), logger: Harness.logger)
        try await Self.writeEveryKind(sql)
        // kill -9 of the replica's process while it applies, with writes going on.
        let writer = Task { try await Self.write(url: url, transactions: 300, seed: 4) }
        try await Harness.waitUntil("the replica applies changes", timeout: .seconds(60)) {
            try await replica.state()?.appliedChanges ?? 0 > 0
        }
        follower.kill9()
        follower = try Self.followIntoPostgres(
            source: source, url: replicaURL, folder: folder, extra: ["--scrub-interval-seconds", "1"])
        try await writer.value
        try await Self.waitForSentinel(replica, url: url, log: folder.appendingPathComponent("serve.log"))
        try await Self.expectEqualToTables(replica, sql: sql)

        // Rows edited behind Concord's back in the replica's tables, with plain SQL.
        let edit = try await SQLSession.connect(replicaURL)
        try await edit.run("UPDATE replica.customers SET value = '{\"id\": 1}' WHERE key IN ('1', '2', '3')")
        try await edit.run("DELETE FROM replica.customers WHERE key IN ('4', '5')")
        try await edit.run("INSERT INTO replica.customers VALUES ('999999', 1, '{}')")
        await edit.close()
        let repairsBefore = try await replica.state()?.repairs ?? 0
        try await Harness.waitUntil("the scrub repairs the edited rows", timeout: .seconds(60)) {
            try await replica.state()?.repairs ?? 0 > repairsBefore
        }
        try await Self.expectEqualToTables(replica, sql: sql)
        let state = try #require(try await replica.state())
        #expect(state.repairedRecords >= 6 && state.mismatches >= 1)
        // The repair moved the differing records, not the table: under 1% of a record per row held.
        #expect(state.repairedRecords < 20, "repaired \(state.repairedRecords) records for 6 edited rows")

        // The replica's schema is dropped while following: a new replica is bootstrapped in its place.
        let drop = try await SQLSession.connect(replicaURL)
        try await drop.run("DROP SCHEMA replica CASCADE")
        await drop.close()
        try await sql.run("DELETE FROM sentinels")
        try await Self.waitForSentinel(replica, url: url, log: folder.appendingPathComponent("follow.log"))
        try await Self.expectEqualToTables(replica, sql: sql)

        #expect(await follower.terminate() == 0)
        #expect(await server.terminate() == 0)
        await replica.close()
        await sql.close()
    }

    @Test func aPostgresReplicaKilledDuringBootstrapResumesAndVerifies() async throws {
        let folder = Harness.folder()
        let publisher = try VerificationTests.sourceStore(folder)
        try await VerificationTests.fill(publisher, records: 30_000)
        let replicaURL = try await PostgresHarness.database()
        try await PublisherServer.withRunningServer(store: publisher, configuration: .testing, logger: Harness.logger) {
            source in
            var follower = try Self.followIntoPostgres(source: source, url: replicaURL, folder: folder)
            let replica = try await PostgresReplicaStore.open(
                url: replicaURL, configuration: .init(schema: "replica"), logger: Harness.logger)
            var workload = RandomWorkload(keySpace: 40_000)
            // Writes while the pages are copied: they merge by version with the pages.
            for _ in 0..<30 { try await publisher.write(workload.transaction()) }
            try await Harness.waitUntil("the bootstrap is under way", timeout: .seconds(60)) {
                guard let state = try await replica.state() else { return false }
                return state.progress.remaining["items"].map { $0 != nil } ?? false
            }
            #expect(try await replica.state()?.progress.phase == .bootstrapping, "killed during the bootstrap")
            follower.kill9()
            for _ in 0..<30 { try await publisher.write(workload.transaction()) }
            follower = try Self.followIntoPostgres(source: source, url: replicaURL, folder: folder)
            for _ in 0..<200 { try await publisher.write(workload.transaction()) }
            do {
                try await Harness.waitUntil("the replica is verified at the head", timeout: .seconds(90)) {
                    let state = try await replica.state()
                    return state?.position == publisher.head && state?.verifiedLSN == publisher.head
                }
            } catch {
                let log = (try? String(contentsOf: folder.appendingPathComponent("follow.log"), encoding: .utf8)) ?? ""
                let state = String(describing: try await replica.state())
                let tail = log.split(separator: "\n").suffix(30).joined(separator: "\n")
                Issue.record("head \(publisher.head), replica \(state), follow's log:\n\(tail)")
                throw error
            }
            let differences = try await Harness.differences(source: publisher, replica: replica)
            #expect(differences.isEmpty, "\(differences.prefix(5))")
            #expect(await follower.terminate() == 0)
            await replica.close()
        }
    }

    /// A replica store in `schema`, bootstrapping `collections` from a source at `head`.
    static func bootstrappingReplica(_ url: String, schema: String, head: LSN, collections: [String]) async throws
        -> PostgresReplicaStore
    {
        let replica = try await PostgresReplicaStore.open(
            url: url, configuration: .init(schema: schema), logger: Harness.logger)
        _ = try await replica.initialize(
            feedID: "feed", source: "http://127.0.0.1:1", head: head, collections: collections, filter: nil)
        return replica
    }

    /// Snapshot pages go in by COPY where the replica holds none of their keys, and by a
    /// merging INSERT where it does: keys and values with tabs, newlines and backslashes come
    /// back as sent, and a change or delete newer than a page wins over it either way. The
    /// collection is named like a system catalog table, which an unqualified COPY would hit.
    @Test func snapshotPagesAreCopiedOrMergedByWhatTheReplicaHolds() async throws {
        let url = try await PostgresHarness.database()
        let collection = "pg_class"
        let replica = try await Self.bootstrappingReplica(url, schema: "pages", head: 100, collections: [collection])
        let awkward = ["a\tb", "line\nbreak", "back\\slash", "cr\rlf", "quote\"s", "é ü", "\\", "\\.", "\\N", "plain"]
        var expected: [String: Record] = [:]
        // In the publisher's (byte) order, as pages come.
        let first = awkward.sorted { Array($0.utf8).lexicographicallyPrecedes(Array($1.utf8)) }.enumerated().map {
            index, key in
            Record(key: key, version: LSN(10 + index), value: "{\"s\":\t\"x\\\\y\\\"\(index)\"}\n")
        }
        for record in first { expected[record.key] = record }
        let firstPage = SnapshotPage(collection: collection, lsn: 100, records: first, hasMore: true)
        #expect(try await replica.copies(firstPage))
        try await replica.apply(firstPage)
        // Changes after the pages were read: a newer row for one key of the next page, a delete of another.
        try await replica.apply(
            [
                .change(
                    Change(
                        lsn: 101, collection: collection, key: "ü2", operation: .upsert, value: #"{"new":true}"#,
                        isCommit: true)),
                .change(
                    Change(lsn: 102, collection: collection, key: "ü3", operation: .delete, value: nil, isCommit: true)),
            ], through: 102)
        let second = ["ü2", "ü3", "ü4"].map { Record(key: $0, version: 50, value: #"{"old":true}"#) }
        let secondPage = SnapshotPage(collection: collection, lsn: 100, records: second, hasMore: false)
        #expect(try await !replica.copies(secondPage))
        try await replica.apply(secondPage)
        expected["ü2"] = Record(key: "ü2", version: 101, value: #"{"new":true}"#)
        expected["ü4"] = second[2]
        let stored = try await replica.records(of: collection)
        #expect(Dictionary(uniqueKeysWithValues: stored.map { ($0.key, $0) }) == expected)
        await replica.close()
    }

    /// Whether a page goes in by COPY is asked of its key range first: a row held inside the
    /// range sends the page to the merge only when it is one of the page's keys.
    @Test func aRowHeldInsideAPagesKeyRangeIsAskedKeyByKey() async throws {
        let url = try await PostgresHarness.database()
        let collection = "ranged"
        let replica = try await Self.bootstrappingReplica(url, schema: "ranges", head: 100, collections: [collection])
        try await replica.apply(
            [
                .change(
                    Change(
                        lsn: 101, collection: collection, key: "m", operation: .upsert, value: #"{"log":true}"#,
                        isCommit: true))
            ], through: 101)
        func page(_ keys: [String]) -> SnapshotPage {
            SnapshotPage(
                collection: collection, lsn: 100, records: keys.map { Record(key: $0, version: 50, value: "1") },
                hasMore: true)
        }
        // "m" lies between the keys, but is not one of them: still copied.
        #expect(try await replica.copies(page(["k", "n"])))
        #expect(try await replica.copies(page(["z", "a"])))
        // One of the keys, whichever order they come in: merged.
        #expect(try await !replica.copies(page(["k", "m", "n"])))
        #expect(try await !replica.copies(page(["z", "m"])))
        try await replica.apply(page(["k", "m", "n"]))
        let stored = try await replica.records(of: collection)
        #expect(stored.map(\.key) == ["k", "m", "n"])
        #expect(stored.map(\.version) == [50, 101, 50])
        await replica.close()
    }

    /// A first bootstrap into an empty schema keeps its digests and sketches from the pages it
    /// copies and the changes applied meanwhile, equal to a scan of the rows; a page that merges
    /// leaves them to a scan.
    @Test func copiedPagesKeepTheDigestsAndSketchesAndAMergedOneLeavesThemToAScan() async throws {
        let url = try await PostgresHarness.database()
        func records(_ numbers: ClosedRange<Int>) -> [Record] {
            numbers.map { Record(key: String(format: "%04d", $0), version: LSN($0), value: #"{"n":\#($0)}"#) }
        }
        for (schema, changedKey, kept) in [("kept", "0200", true), ("merged", "0070", false)] {
            let replica = try await Self.bootstrappingReplica(
                url, schema: schema, head: 100, collections: ["items", "none"])
            try await replica.apply(
                SnapshotPage(collection: "items", lsn: 100, records: records(1...50), hasMore: true))
            try await replica.apply(
                [
                    .change(
                        Change(
                            lsn: 101, collection: "items", key: changedKey, operation: .upsert,
                            value: #"{"new":true}"#, isCommit: true))
                ], through: 101)
            try await replica.apply(
                SnapshotPage(collection: "items", lsn: 100, records: records(51...100), hasMore: false))
            try await replica.apply(SnapshotPage(collection: "none", lsn: 100, records: [], hasMore: false))
            #expect(try await replica.completeBootstrapIfReady())
            #expect(try await replica.digestsReady() == kept, "\(schema)")
            if !kept { try await replica.rebuildDigests() }
            #expect(try await replica.scrub().isEmpty, "\(schema): the stored digests are the rows'")
            let scanned = try await replica.scanAll(progress: nil)
            #expect(scanned["items"]?.digest.count == (kept ? 101 : 100))
            #expect(try await replica.sketch(of: "items").symbols == scanned["items"]?.sketch.symbols)
            #expect(try await replica.check(Checkpoint(lsn: 101, digests: scanned.mapValues(\.digest))) == .verified)
            await replica.close()
        }
    }

    /// Once following, a batch of changes whose keys the table does not hold goes in by COPY,
    /// any other by a merging INSERT: awkward keys and values come back exact, and a row
    /// inserted behind Concord's back under a key a change creates is overwritten, not a failure.
    @Test func followingChangesOfNewKeysAreCopiedAndOthersMerged() async throws {
        let url = try await PostgresHarness.database()
        let collection = "items"
        let replica = try await Self.bootstrappingReplica(url, schema: "stream", head: 0, collections: [collection])
        try await replica.apply(SnapshotPage(collection: collection, lsn: 0, records: [], hasMore: false))
        #expect(try await replica.completeBootstrapIfReady())
        func upsert(_ lsn: LSN, _ key: String, _ value: String, commit: Bool = false) -> StreamItem {
            .change(
                Change(lsn: lsn, collection: collection, key: key, operation: .upsert, value: value, isCommit: commit))
        }
        let awkward = ["a\tb", "line\nbreak", "back\\slash", "cr\rlf", "é ü", "\\.", "\\N"]
        var expected: [String: Record] = [:]
        var items: [StreamItem] = []
        for (index, key) in awkward.enumerated() {
            let value = "{\"s\":\t\"x\\\\y\\\"\(index)\"}\n"
            items.append(upsert(LSN(index + 1), key, value, commit: index == awkward.count - 1))
            expected[key] = Record(key: key, version: LSN(index + 1), value: value)
        }
        let probe = SnapshotPage(
            collection: collection, lsn: 0, records: awkward.map { Record(key: $0, version: 1, value: "{}") },
            hasMore: false)
        #expect(try await replica.copies(probe))
        try await replica.apply(items, through: LSN(awkward.count))
        // A row written with plain SQL under a key the next batch creates, beside updates of held keys.
        let session = try await SQLSession.connect(url)
        try await session.run(
            #"INSERT INTO stream.items (key, version, value) VALUES ('intruder', 1, '{"by":"hand"}')"#)
        await session.close()
        let next = LSN(awkward.count)
        let mixed = [
            upsert(next + 1, "intruder", #"{"by":"concord"}"#),
            upsert(next + 2, awkward[0], #"{"updated":true}"#),
            upsert(next + 3, "fresh", #"{"new":true}"#, commit: true),
        ]
        #expect(
            try await !replica.copies(
                SnapshotPage(
                    collection: collection, lsn: 0,
                    records: [
                        Record(key: "intruder", version: 1, value: "{}"), Record(key: "fresh", version: 1, value: "{}"),
                    ], hasMore: false)))
        try await replica.apply(mixed, through: next + 3)
        expected["intruder"] = Record(key: "intruder", version: next + 1, value: #"{"by":"concord"}"#)
        expected[awkward[0]] = Record(key: awkward[0], version: next + 2, value: #"{"updated":true}"#)
        expected["fresh"] = Record(key: "fresh", version: next + 3, value: #"{"new":true}"#)
        let stored = try await replica.records(of: collection)
        #expect(Dictionary(uniqueKeysWithValues: stored.map { ($0.key, $0) }) == expected)
        await replica.close()
    }

    /// A source transaction applied in pieces, as a subscriber writes a large one: neither its
    /// rows nor the position show before its last piece commits; when the rest never comes,
    /// nothing of it stays; the digests follow every piece.
    @Test func aTransactionAppliedInPiecesShowsWholeOrNotAtAll() async throws {
        let url = try await PostgresHarness.database()
        let collection = "items"
        let replica = try await Self.bootstrappingReplica(url, schema: "pieces", head: 0, collections: [collection])
        try await replica.apply(SnapshotPage(collection: collection, lsn: 0, records: [], hasMore: false))
        #expect(try await replica.completeBootstrapIfReady())
        // The source's records by collection, to give each change the element it replaces.
        var sources: [String: [String: Record]] = [:]
        var source: [String: Record] {
            get { sources[collection] ?? [:] }
            set { sources[collection] = newValue }
        }
        var lsn: LSN = 0
        func change(_ key: String, _ value: String?, commit: Bool = false, in name: String = collection)
            -> StreamItem
        {
            lsn += 1
            let before = sources[name]?[key].map {
                Element(collection: name, key: key, version: $0.version, value: $0.value)
            }
            sources[name, default: [:]][key] = value.map { Record(key: key, version: lsn, value: $0) }
            return .change(
                Change(
                    lsn: lsn, collection: name, key: key, operation: value == nil ? .delete : .upsert,
                    value: value, isCommit: commit, before: before))
        }
        func digests() -> [String: CollectionDigest] {
            var digests: [String: CollectionDigest] = [:]
            for (name, records) in sources {
                for record in records.values {
                    digests[name, default: .empty].add(
                        Element(collection: name, key: record.key, version: record.version, value: record.value))
                }
            }
            return digests
        }
        let first = (1...20).map { change("k\($0)", #"{"n":\#($0)}"#, commit: $0 == 20) }
        try await replica.apply(first, through: lsn)
        let watcher = try await SQLSession.connect(url)
        func visible() async throws -> [[String?]] {
            try await watcher.texts("SELECT key, version::text, value FROM pieces.items ORDER BY key")
        }
        let before = try await visible()
        #expect(before.count == 20)

        // Updates, deletes and new keys in four pieces; between pieces, another connection
        // sees the rows and the position of before.
        let start = lsn
        var pieces: [[StreamItem]] = []
        for round in 0..<4 {
            var items: [StreamItem] = []
            for n in 1...10 {
                let key = "k\(round * 10 + n)"
                items.append(change(key, n % 4 == 0 ? nil : #"{"round":\#(round),"n":\#(n)}"#))
            }
            // A collection the replica has no table for yet, first seen in the third piece.
            if round >= 2 { items.append(change("o\(round)", #"{"other":\#(round)}"#, in: "others")) }
            if round == 3 { items.append(change("last", "{}", commit: true)) }
            pieces.append(items)
        }
        let ends = pieces.map { $0.last!.lastLSN }
        var given = 1
        try await replica.apply(pieces[0], through: ends[0]) { () async throws -> StreamPiece in
            #expect(try await visible() == before, "rows of piece \(given) show before the end")
            #expect(try await replica.state()?.position == start)
            // Yet the pieces so far are written, in a transaction still open: not held back.
            let writing = try await watcher.texts(
                """
                SELECT count(*)::text FROM pg_stat_activity
                WHERE datname = current_database() AND backend_xid IS NOT NULL AND pid <> pg_backend_pid()
                """)
            #expect(writing == [["1"]], "piece \(given - 1) is not written before the next comes")
            defer { given += 1 }
            return StreamPiece(items: pieces[given], through: ends[given], endsTransaction: given == 3)
        }
        #expect(given == 4)
        let state = try #require(try await replica.state())
        #expect(state.position == lsn && state.appliedChanges == 20 + 43)
        let stored = try await replica.records(of: collection)
        #expect(stored == source.values.sorted { $0.key < $1.key })
        #expect(try await replica.records(of: "others").map(\.key) == ["o2", "o3"])
        #expect(try await replica.check(Checkpoint(lsn: lsn, digests: digests())) == .verified)
        #expect(try await replica.scrub().isEmpty)

        // A transaction whose rest never comes (the stream broke): nothing of it stays.
        let whole = source
        let beforeBroken = try await visible()
        let brokenStart = lsn
        let broken = (1...5).map { change("k\($0)", #"{"broken":\#($0)}"#) }
        struct StreamBroke: Error {}
        await #expect(throws: StreamBroke.self) {
            try await replica.apply(broken, through: brokenStart + 5) { throw StreamBroke() }
        }
        #expect(try await visible() == beforeBroken)
        #expect(try await replica.state()?.position == brokenStart)
        // A piece that does not continue the last one is refused, and rolled back too.
        await #expect(throws: ConcordError.self) {
            try await replica.apply(broken, through: brokenStart + 5) {
                StreamPiece(
                    items: [
                        .change(
                            Change(
                                lsn: brokenStart + 9, collection: collection, key: "x", operation: .upsert, value: "{}",
                                isCommit: true))
                    ], through: brokenStart + 9, endsTransaction: true)
            }
        }
        #expect(try await visible() == beforeBroken)
        // The same transaction sent again, whole, applies on what stayed.
        source = whole
        lsn = brokenStart
        let again = (1...5).map { change("k\($0)", #"{"again":\#($0)}"#, commit: $0 == 5) }
        try await replica.apply(again, through: lsn)
        #expect(try await replica.check(Checkpoint(lsn: lsn, digests: digests())) == .verified)
        #expect(try await replica.scrub().isEmpty)
        await watcher.close()
        await replica.close()
    }

    /// A large source transaction reaches a PostgreSQL replica piece by piece. `concord follow`
    /// killed with kill -9 while it writes the pieces leaves none of the transaction behind, and
    /// the next one applies all of it.
    @Test func aFollowerKilledInsideALargeTransactionLeavesNoneOfIt() async throws {
        let folder = Harness.folder()
        let publisher = try VerificationTests.sourceStore(folder)
        try await VerificationTests.fill(publisher, records: 2_000)
        let replicaURL = try await PostgresHarness.database()
        try await PublisherServer.withRunningServer(store: publisher, configuration: .testing, logger: Harness.logger) {
            source in
            let log = folder.appendingPathComponent("follow.log")
            var follower = try Self.followIntoPostgres(
                source: source, url: replicaURL, folder: folder, extra: ["--log-level", "debug"])
            let replica = try await PostgresReplicaStore.open(
                url: replicaURL, configuration: .init(schema: "replica"), logger: Harness.logger)
            try await Harness.waitUntil("the replica follows at the head", timeout: .seconds(60)) {
                let state = try await replica.state()
                return state?.position == publisher.head && state?.progress.phase == .following
            }
            // 60,000 changes in one transaction: every held key updated, the rest new.
            let start = publisher.head
            let end = try await publisher.write(
                (0..<60_000).map {
                    .upsert("items", "k\($0)", json: "{\"v\":\($0),\"large\":\"\(String(repeating: "y", count: 60))\"}")
                })
            try await Harness.waitUntil("the follower writes the transaction's first pieces", timeout: .seconds(60)) {
                let text = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
                return text.contains("a large source transaction is written as it comes")
            }
            // Killed once the replica's transaction has been writing a while (or, were pieces
            // committed one by one, once the position moved).
            let session = try await SQLSession.connect(replicaURL)
            try await Harness.waitUntil("the replica's transaction is under way", timeout: .seconds(60)) {
                let writing = try await session.texts(
                    """
                    SELECT count(*)::text FROM pg_stat_activity WHERE datname = current_database()
                        AND backend_xid IS NOT NULL AND now() - xact_start > interval '200 milliseconds'
                    """)
                let position = try await replica.state()?.position
                return writing != [["0"]] || position != start
            }
            follower.kill9()
            let newer = try await session.texts("SELECT count(*)::text FROM replica.items WHERE version > \(start)")
            await session.close()
            #expect(try await replica.state()?.position == start, "killed inside the transaction")
            #expect(newer == [["0"]], "rows of a transaction not committed show")
            follower = try Self.followIntoPostgres(source: source, url: replicaURL, folder: folder)
            try await Harness.waitUntil("the replica is verified past the transaction", timeout: .seconds(120)) {
                let state = try await replica.state()
                return state?.position == publisher.head && state?.verifiedLSN == publisher.head
            }
            #expect(publisher.head >= end)
            let differences = try await Harness.differences(source: publisher, replica: replica)
            #expect(differences.isEmpty, "\(differences.prefix(5))")
            #expect(await follower.terminate() == 0)
            await replica.close()
        }
    }

    @Test func largeTransactionsCutAcrossStreamReadsAndLostLinesReachAPostgresReplicaWhole() async throws {
        let url = try await PostgresHarness.database()
        let replica = try await PostgresReplicaStore.open(
            url: url, configuration: .init(schema: "lossy"), logger: Harness.logger)
        // Another session locks the replica's table for a moment, as a long report would.
        try await ReplicationTests.followLargeTransactionsThroughLosses(into: replica, folder: Harness.folder()) {
            let session = try await SQLSession.connect(url)
            try await Harness.waitUntil("the replica's table exists", timeout: .seconds(30)) {
                try await session.texts("SELECT to_regclass('lossy.items') IS NOT NULL")
                    == [["true"]]
            }
            try await session.run("BEGIN")
            try await session.run("LOCK TABLE lossy.items IN ACCESS EXCLUSIVE MODE")
            try await session.run("SELECT pg_sleep(0.3)")
            try await session.run("COMMIT")
            await session.close()
        }
        await replica.close()
    }

    /// The replica's table is locked by another session while a large transaction comes in
    /// pieces: the writer waits inside the open transaction, the reader waits behind it, and
    /// the transaction's end and hundreds of heartbeats pile up on the wire. Once the lock goes,
    /// the replica gets all of it.
    @Test func aReplicaStalledInsideALargeTransactionCatchesUp() async throws {
        let folder = Harness.folder()
        // No checkpoint line follows the commit to hand its end over first.
        let source = try Harness.publisherCheckpointedByTime(in: folder, every: .seconds(3600))
        try await source.write((0..<300).map { .upsert("c", "\($0)", json: "{\"n\":\($0)}") })
        let url = try await PostgresHarness.database()
        let replica = try await PostgresReplicaStore.open(
            url: url, configuration: .init(schema: "stalled"), logger: Harness.logger)
        var configuration = PublisherServer.Configuration.testing
        configuration.heartbeatInterval = .milliseconds(1)
        try await PublisherServer.withRunningServer(store: source, configuration: configuration, logger: Harness.logger)
        { publisher in
            let http = SourceClient.makeHTTPClient()
            defer { _ = http.shutdown() as EventLoopFuture<Void> }  // on every path, or deinit traps
            let subscriber = Harness.makeSubscriber(source: publisher, store: replica, http: http, piece: 10)
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await subscriber.run() }
                try await Harness.waitUntil("the replica follows at the head", timeout: .seconds(30)) {
                    let state = try await replica.state()
                    return state?.position == source.head && state?.progress.phase == .following
                }
                let lock = try await SQLSession.connect(url)
                try await lock.run("BEGIN")
                try await lock.run("LOCK TABLE stalled.c IN ACCESS EXCLUSIVE MODE")
                try await source.write((0..<20_000).map { .upsert("c", "\($0)", json: "{\"n\":-\($0)}") })
                // Heartbeats pile up behind the transaction's end while the writer waits. (This
                // publisher sends each heartbeat in an HTTP chunk of its own; were a proxy to join
                // one to the end of the transaction, the reader hands the end over first.)
                try await Task.sleep(for: .milliseconds(500))
                let waiting = try await lock.texts(
                    """
                    SELECT count(*)::text FROM pg_stat_activity
                    WHERE datname = current_database() AND wait_event_type = 'Lock'
                    """)
                #expect(waiting == [["1"]], "the replica's writer waits for the lock")
                try await lock.run("COMMIT")
                await lock.close()
                try await Harness.waitUntil("the replica reaches the head", timeout: .seconds(30)) {
                    try await replica.state()?.position == source.head
                }
                group.cancelAll()
            }
            #expect(try await Harness.differences(source: source, replica: replica) == [])
            #expect(subscriber.transactionsWrittenInPieces >= 1)
        }
        await replica.close()
    }

    @Test func aReplicaSchemaThatDoesNotExistIsReported() async throws {
        let url = try await PostgresHarness.database()
        let (status, message) = try await Self.run(["status", "--postgres", url, "--schema", "nowhere"])
        #expect(status == 1 && message.contains("no Concord replica in"), "\(message)")
        let (badStatus, badMessage) = try await Self.run([
            "follow", "--source", "http://127.0.0.1:1", "--postgres", "mysql://x@h/db",
        ])
        #expect(badStatus == 2 && badMessage.contains("--postgres must look like"), "\(badMessage)")
    }
}
