import ConcordClient
import ConcordCore
import ConcordSQLite
import Foundation
import GRDB
import NIOCore
import Synchronization
import Testing

/// `concord serve --postgres` against a real PostgreSQL 15 with wal2json: every kind of change,
/// crashes, a dropped slot and a restarted server, checked against the tables by SQL.
@Suite(.serialized) struct PostgresCaptureTests {
    static let customers = """
        CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text, balance numeric(12,2),
            active bool, meta jsonb, avatar bytea, note text)
        """
    static let orderLines =
        "CREATE TABLE order_lines (order_no text, line int, qty int, note text, PRIMARY KEY (order_no, line))"
    static let customerColumns =
        "id::text, name, email, balance::text, active::text, meta::text, encode(avatar, 'hex'), note"
    static let customerNames = ["id", "name", "email", "balance", "active", "meta", "avatar", "note"]

    /// The initial rows of the captured tables.
    static func fillInitialRows(_ sql: SQLSession) async throws {
        try await sql.run(
            """
            INSERT INTO customers SELECT g, 'customer ' || g, 'c' || g || '@example.com', g * 1.25, g % 2 = 0,
                '{"tier": "basic"}', '\\xdeadbeef', NULL FROM generate_series(1, 3000) g
            """)
        try await sql.run(
            "INSERT INTO order_lines SELECT 'o' || (g / 3), g % 3, g, NULL FROM generate_series(1, 600) g")
    }

    /// The sentinel's table comes last: the copy takes tables in this order and the stream in
    /// commit order, so its row arrives after everything written before it.
    static let tables = "public.customers,public.order_lines,public.sentinels"

    static func serve(_ folder: URL, url: String, port: Int = 0, extra: [String] = []) async throws -> (
        ConcordProcess, Int
    ) {
        // Copies in several transactions, so a kill -9 can land in the middle of one.
        try await ConcordProcess.serve(
            db: folder.appendingPathComponent("source.sqlite").path, port: port,
            extra: [
                "--postgres", url, "--tables", tables, "--slot", slot(url), "--copy-batch",
                "5000",
            ] + extra,
            log: folder.appendingPathComponent("serve.log").path)
    }

    /// Slot names are shared by the whole server: one per test database.
    static func slot(_ url: String) -> String {
        "s_" + (URLComponents(string: url)?.path.dropFirst() ?? "")
    }

    /// Writes the sentinel row, then waits until the publisher's capture has passed its commit
    /// and the replica holds it and is verified at the publisher's head.
    ///
    /// A copy after a dropped slot can bring the sentinel ahead of older changes the slot still
    /// replays, so holding it proves nothing alone: the publisher must be streaming and its slot
    /// confirmed past the sentinel's commit (the publisher moves it only once its log holds the
    /// changes, and a slot made after the sentinel starts past it, with the copy holding it).
    static func waitForSentinel(
        _ replica: any ReplicaStoring, url: String, log: URL, timeout: Duration = .seconds(90)
    ) async throws {
        let session = try await SQLSession.connect(url)
        let walBefore = try await session.texts("SELECT pg_current_wal_insert_lsn()::text").first?.first ?? nil
        // A new row each time, so a test can wait for the sentinel more than once.
        let sentinel = try await session.texts(
            "INSERT INTO sentinels SELECT coalesce(max(id), 0) + 1 FROM sentinels RETURNING id::text"
        ).first?.first??.description
        await session.close()
        let sentinelAfter = try #require(walBefore.flatMap(PostgresDecoding.lsn))
        let publisherDB = log.deletingLastPathComponent().appendingPathComponent("source.sqlite").path
        do {
            try await Harness.waitUntil("the replica holds the sentinel and is verified", timeout: timeout) {
                guard let capture = try? Self.capture(of: publisherDB), capture.streaming,
                    try await Self.confirmedLSN(url: url) > sentinelAfter,
                    let state = try await replica.state(), state.progress.phase == .following
                else { return false }
                let held = try await replica.records(of: "sentinels").contains { $0.key == sentinel }
                return held && state.position == capture.head && state.verifiedLSN == state.position
            }
        } catch {
            // What the publisher said is the first thing to read.
            let text = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
            Issue.record("concord serve's log:\n\(text.split(separator: "\n").suffix(30).joined(separator: "\n"))")
            throw error
        }
    }

    /// A publisher's file, opened read-only beside the running publisher.
    static func publisherFile(_ publisherDB: String) throws -> DatabaseQueue {
        var configuration = Configuration()
        configuration.readonly = true
        return try DatabaseQueue(path: publisherDB, configuration: configuration)
    }

    /// Whether a publisher's capture has finished copying, and its head, from its file.
    static func capture(of publisherDB: String) throws -> (streaming: Bool, head: LSN) {
        try publisherFile(publisherDB).read { db in
            let phase = try String.fetchOne(db, sql: "SELECT value FROM concord_markers WHERE name = 'postgres.phase'")
            let head = try Int64.fetchOne(db, sql: "SELECT head FROM concord_feed WHERE id = 1") ?? 0
            return (phase == "streaming", LSN(head))
        }
    }

    /// How far the test database's slot is confirmed (0 while it does not exist).
    static func confirmedLSN(url: String) async throws -> UInt64 {
        let session = try await SQLSession.connect(url)
        let rows = try await session.texts(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '\(slot(url))'")
        await session.close()
        let text = rows.first?.first ?? nil
        return text.flatMap(PostgresDecoding.lsn) ?? 0
    }

    /// Compares a replica's collection with the rows an SQL query returns, column by column.
    static func differences(
        _ replica: any ReplicaStoring, collection: String, sql: SQLSession, query: String, columns: [String],
        key: ([String?]) -> String
    ) async throws -> [String] {
        var expected: [String: [String?]] = [:]
        for row in try await sql.texts(query) { expected[key(row)] = row }
        var found: [String] = []
        let records = try await replica.records(of: collection)
        for record in records {
            guard let want = expected.removeValue(forKey: record.key) else {
                found.append("extra \(record.key)")
                continue
            }
            let scanner = JSONScanner(record.value)
            var held: [String: String?] = [:]
            try scanner.forEachMember(of: try scanner.document()) { (name, value) throws(ConcordError) in
                switch value.kind {
                case .null: held[name] = .some(nil)
                case .string: held[name] = try scanner.decodeString(value)
                default: held[name] = String(decoding: scanner.bytes[value.range], as: UTF8.self)
                }
            }
            for (index, column) in columns.enumerated() where held[column] != .some(want[index]) {
                found.append(
                    "\(record.key).\(column): \(String(describing: held[column])) != \(String(describing: want[index]))"
                )
            }
        }
        found += expected.keys.sorted().map { "missing \($0)" }
        return found
    }

    static func expectEqualToTables(_ replica: any ReplicaStoring, sql: SQLSession) async throws {
        let customers = try await differences(
            replica, collection: "customers", sql: sql,
            query: "SELECT \(customerColumns) FROM customers", columns: customerNames
        ) { $0[0]! }
        #expect(customers.isEmpty, "customers: \(customers.prefix(5))")
        let lines = try await differences(
            replica, collection: "order_lines", sql: sql,
            query: "SELECT order_no, line::text, qty::text, note FROM order_lines",
            columns: ["order_no", "line", "qty", "note"]
        ) { "[\"\($0[0]!)\",\"\($0[1]!)\"]" }
        #expect(lines.isEmpty, "order_lines: \(lines.prefix(5))")
    }

    /// A new database with the captured tables; returns its URL and a session on it.
    static func database() async throws -> (String, SQLSession) {
        let url = try await PostgresHarness.database()
        let sql = try await SQLSession.connect(url)
        try await sql.run(customers)
        try await sql.run(orderLines)
        try await sql.run("CREATE TABLE sentinels (id int PRIMARY KEY)")
        return (url, sql)
    }

    @Test func everyKindOfChangeReachesAReplicaEqualToTheTables() async throws {
        let (url, sql) = try await Self.database()
        try await Self.fillInitialRows(sql)
        let folder = Harness.folder()
        let (server, port) = try await Self.serve(folder, url: url)
        let replica = try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path)
        try await VerificationTests.withSubscriber(url: "http://127.0.0.1:\(port)", replica: replica) {
            // Paused once it follows the slot, so every transaction reaches the publisher in one
            // poll and one write: a transaction must see what the ones before it wrote (the
            // out-of-line note, the lines a truncate removes) before any of it is in its store.
            let publisherDB = folder.appendingPathComponent("source.sqlite").path
            try await Harness.waitUntil("the publisher follows the slot", timeout: .seconds(60)) {
                (try? Self.capture(of: publisherDB))?.streaming == true
            }
            server.pause()
            do {
                try await Self.writeEveryKind(sql)
            } catch {
                server.resume()
                throw error
            }
            server.resume()
            try await Self.waitForSentinel(replica, url: url, log: folder.appendingPathComponent("serve.log"))
        }
        try await Self.expectEqualToTables(replica, sql: sql)
        let toasted = try replica.records(of: "customers").first { $0.key == "6001" }
        #expect(toasted?.value.contains("toasted, renamed") == true)
        #expect(
            (toasted?.value.utf8.count ?? 0) > 25_000, "the out-of-line note survived two updates that left it alone")
        // Writes over HTTP are refused: the database owns the records.
        let http = SourceClient.makeHTTPClient()
        defer { _ = http.shutdown() as EventLoopFuture<Void> }  // on every path, or deinit traps
        do {
            try await SourceClient(baseURL: "http://127.0.0.1:\(port)", http: http).write([
                .upsert("customers", "9", json: "{}")
            ])
            Issue.record("a write over HTTP was accepted")
        } catch let error as ConcordError {
            #expect(error.code == .writesRefused)
        }
        #expect(await server.terminate() == 0)
        await sql.close()
    }

    @Test func crashesADroppedSlotAndARestartedServerLoseNothing() async throws {
        let (url, sql) = try await Self.database()
        try await sql.run(
            "INSERT INTO customers (id, name, balance) SELECT g, 'customer ' || g, g FROM generate_series(1, 100000) g")
        let folder = Harness.folder()
        let (first, _) = try await Self.serve(folder, url: url)
        let replica = try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path)
        // kill -9 while the tables are copied: watched in the publisher's file, not over HTTP, so
        // the kill follows the first copied batch closely, and judged from the file it left.
        let publisherDB = folder.appendingPathComponent("source.sqlite").path
        try await Harness.waitUntil("the copy is under way", timeout: .seconds(60)) {
            ((try? Self.capture(of: publisherDB))?.head ?? 0) > 0
        }
        first.kill9()
        #expect(try Self.capture(of: publisherDB).streaming == false, "killed during the copy")
        let (second, port) = try await Self.serve(folder, url: url)
        let servers = Mutex([second])
        try await VerificationTests.withSubscriber(url: "http://127.0.0.1:\(port)", replica: replica) {
            let writer = Task { try await Self.write(url: url, transactions: 400, seed: 1) }
            try await Task.sleep(for: .milliseconds(700))
            // kill -9 while streaming, with writes going on; the replica keeps retrying the same port.
            servers.withLock { $0.last! }.kill9()
            let (third, _) = try await Self.serve(folder, url: url, port: port)
            servers.withLock { $0.append(third) }
            try await writer.value
            // The slot is dropped behind Concord's back, its streaming connection ended first as
            // an operator must: it copies again and deletes what vanished.
            try await Harness.waitUntil("the slot is dropped", timeout: .seconds(30)) {
                _ = try? await sql.run(
                    """
                    SELECT pg_terminate_backend(active_pid, 5000) FROM pg_replication_slots
                    WHERE slot_name = '\(Self.slot(url))' AND active_pid IS NOT NULL
                    """)
                return (try? await sql.run("SELECT pg_drop_replication_slot('\(Self.slot(url))')")) != nil
            }
            try await Self.write(url: url, transactions: 200, seed: 2)
            // PostgreSQL itself restarts.
            await sql.close()
            _ = try PostgresHarness.restart()
            try await Self.write(url: url, transactions: 200, seed: 3)
            try await Self.waitForSentinel(
                replica, url: url, log: folder.appendingPathComponent("serve.log"), timeout: .seconds(120))
        }
        let check = try await SQLSession.connect(url)
        try await Self.expectEqualToTables(replica, sql: check)
        #expect(await servers.withLock { $0.last! }.terminate() == 0)
        await check.close()
    }

    /// Source transactions larger than a piece: one goes into the log as one transaction, its
    /// later changes seeing what its earlier pieces wrote; a kill -9 while another is written in
    /// pieces leaves none of it behind, and the publisher started again logs it whole.
    @Test func aTransactionLargerThanAPieceStaysWholeAndAKillLosesNothing() async throws {
        let (url, sql) = try await Self.database()
        try await Self.fillInitialRows(sql)
        let folder = Harness.folder()
        let publisherDB = folder.appendingPathComponent("source.sqlite").path
        let log = folder.appendingPathComponent("serve.log")
        let pieceOptions = ["--transaction-piece", "100"]
        let (first, _) = try await Self.serve(folder, url: url, extra: pieceOptions)
        try await Harness.waitUntil("the first copy is done", timeout: .seconds(60)) {
            (try? Self.capture(of: publisherDB))?.streaming == true
        }
        let before = try Self.capture(of: publisherDB).head
        try await sql.run("BEGIN")
        try await sql.run(
            """
            INSERT INTO customers (id, name, note)
            SELECT 10000, 'toasted', string_agg(md5(random()::text), '') FROM generate_series(1, 800)
            """)
        try await sql.run("INSERT INTO customers (id, name) SELECT g, 'big ' || g FROM generate_series(10001, 11000) g")
        // wal2json leaves the out-of-line note out: it is in a piece handed over already.
        try await sql.run("UPDATE customers SET name = 'toasted, renamed' WHERE id = 10000")
        try await sql.run("UPDATE customers SET balance = 7 WHERE id <= 3000")
        try await sql.run("DELETE FROM customers WHERE id BETWEEN 10500 AND 10599")
        // The truncate removes the lines committed before and the ones of earlier pieces.
        try await sql.run("INSERT INTO order_lines SELECT 'big', g, g, NULL FROM generate_series(2, 201) g")
        try await sql.run("TRUNCATE order_lines")
        try await sql.run("INSERT INTO order_lines VALUES ('big', 1, 1, NULL)")
        try await sql.run("COMMIT")
        // 1 + 1,000 + 1 + 3,000 + 100 + 200 + (600 + 200) + 1 changes.
        let changes: LSN = 5103
        try await Harness.waitUntil("the large transaction is in the log", timeout: .seconds(60)) {
            ((try? Self.capture(of: publisherDB))?.head ?? 0) >= before + changes
        }
        let (count, commits, lastIsCommit) = try await Self.publisherFile(publisherDB).read {
            db in
            let row = try Row.fetchOne(
                db,
                sql: """
                    SELECT count(*), sum(is_commit), (SELECT is_commit FROM concord_log ORDER BY lsn DESC LIMIT 1)
                    FROM concord_log WHERE lsn > ?
                    """, arguments: [Int64(before)])!
            return (row[0] as Int64, row[1] as Int64, row[2] as Int64)
        }
        #expect(count == Int64(changes) && commits == 1 && lastIsCommit == 1, "one transaction, marked at its end")
        let logged = try String(contentsOf: log, encoding: .utf8)
        #expect(logged.contains("goes into the log in pieces"))

        // kill -9 while the next one is written in pieces.
        try await sql.run(
            "INSERT INTO customers (id, name) SELECT g, 'bulk ' || g FROM generate_series(20001, 120000) g")
        try await Harness.waitUntil("the second goes into the log in pieces", timeout: .seconds(60)) {
            let text = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
            return text.components(separatedBy: "goes into the log in pieces").count > 2
        }
        first.kill9()
        #expect(
            try Self.capture(of: publisherDB).head == before + changes, "none of the unfinished transaction is logged")
        let (second, port) = try await Self.serve(folder, url: url, extra: pieceOptions)
        let replica = try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path)
        try await VerificationTests.withSubscriber(url: "http://127.0.0.1:\(port)", replica: replica) {
            try await Self.waitForSentinel(replica, url: url, log: log, timeout: .seconds(120))
        }
        try await Self.expectEqualToTables(replica, sql: sql)
        // Sent again by the slot after the kill, the 100,000 inserts are logged as one transaction.
        let (inserts, insertCommits) = try await Self.publisherFile(publisherDB).read { db in
            let row = try Row.fetchOne(
                db, sql: "SELECT count(*), sum(is_commit) FROM concord_log WHERE lsn > ? AND collection = 'customers'",
                arguments: [Int64(before + changes)])!
            return (row[0] as Int64, row[1] as Int64)
        }
        #expect(inserts == 100_000 && insertCommits == 1)
        let toasted = try replica.records(of: "customers").first { $0.key == "10000" }
        #expect(toasted?.value.contains("toasted, renamed") == true)
        #expect((toasted?.value.utf8.count ?? 0) > 25_000, "the out-of-line note came from an earlier piece")
        #expect(await second.terminate() == 0)
        await sql.close()
    }

    /// The publisher logged a large transaction but stopped before its slot was confirmed past
    /// it, as a crash between the two leaves it: the slot sends the transaction again, whole,
    /// and the publisher reads it past instead of logging it twice. The window is made for real
    /// with PostgreSQL's own slot copy: a copy taken before the transaction takes the slot's place.
    @Test func aLargeTransactionSentAgainAfterItsCommitIsLoggedOnce() async throws {
        let (url, sql) = try await Self.database()
        try await Self.fillInitialRows(sql)
        let folder = Harness.folder()
        let publisherDB = folder.appendingPathComponent("source.sqlite").path
        let slot = Self.slot(url)
        let pieceOptions = ["--transaction-piece", "100"]
        let (first, _) = try await Self.serve(folder, url: url, extra: pieceOptions)
        try await Harness.waitUntil("the first copy is done", timeout: .seconds(60)) {
            (try? Self.capture(of: publisherDB))?.streaming == true
        }
        let before = try Self.capture(of: publisherDB).head
        try await sql.run("SELECT pg_copy_logical_replication_slot('\(slot)', '\(slot)_before')")
        do {
            try await Self.replayAfterCommit(
                url: url, sql: sql, folder: folder, publisher: first, from: before, slot: slot, options: pieceOptions)
        } catch {
            // The copy would keep the shared server's WAL for good.
            try? await sql.run("ROLLBACK")
            try? await sql.run(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '\(slot)_before'"
            )
            throw error
        }
        await sql.close()
    }

    /// The rest of the test above: a large transaction, logged, then sent again by the slot copy.
    static func replayAfterCommit(
        url: String, sql: SQLSession, folder: URL, publisher first: ConcordProcess, from before: LSN, slot: String,
        options pieceOptions: [String]
    ) async throws {
        let publisherDB = folder.appendingPathComponent("source.sqlite").path
        let log = folder.appendingPathComponent("serve.log")
        try await sql.run("BEGIN")
        try await sql.run("INSERT INTO customers (id, name) SELECT g, 'big ' || g FROM generate_series(10001, 12000) g")
        try await sql.run("UPDATE customers SET balance = 7 WHERE id <= 1000")
        try await sql.run("DELETE FROM customers WHERE id BETWEEN 11001 AND 11500")
        let beforeCommit = try #require(
            try await sql.texts("SELECT pg_current_wal_insert_lsn()::text").first?.first?.flatMap(PostgresDecoding.lsn))
        try await sql.run("COMMIT")
        let changes: LSN = 2000 + 1000 + 500
        try await Harness.waitUntil("the large transaction is logged and confirmed", timeout: .seconds(60)) {
            guard ((try? Self.capture(of: publisherDB))?.head ?? 0) >= before + changes else { return false }
            return try await Self.confirmedLSN(url: url) > beforeCommit
        }
        #expect(await first.terminate() == 0)
        let logged = try Self.capture(of: publisherDB).head
        #expect(logged == before + changes)
        // The slot as it stood before the transaction takes its place.
        try await Harness.waitUntil("the slot is dropped", timeout: .seconds(30)) {
            (try? await sql.run("SELECT pg_drop_replication_slot('\(slot)')")) != nil
        }
        try await sql.run("SELECT pg_copy_logical_replication_slot('\(slot)_before', '\(slot)')")
        try await sql.run("SELECT pg_drop_replication_slot('\(slot)_before')")
        #expect(try await Self.confirmedLSN(url: url) < beforeCommit, "the slot sends the transaction again")

        let (second, port) = try await Self.serve(folder, url: url, extra: pieceOptions)
        let replica = try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path)
        try await VerificationTests.withSubscriber(url: "http://127.0.0.1:\(port)", replica: replica) {
            try await Self.waitForSentinel(replica, url: url, log: log)
        }
        let readPast = try String(contentsOf: log, encoding: .utf8).contains("the log holds already is sent again")
        #expect(readPast, "the publisher said it read the transaction sent again past")
        let again = try await Self.publisherFile(publisherDB).read { db in
            try Int64.fetchOne(
                db, sql: "SELECT count(*) FROM concord_log WHERE lsn > ? AND collection != 'sentinels'",
                arguments: [Int64(logged)])!
        }
        #expect(again == 0, "nothing but the sentinel is logged after the restart")
        try await Self.expectEqualToTables(replica, sql: sql)
        #expect(await second.terminate() == 0)
    }

    /// A publisher stopped the moment its log holds a transaction still tells the slot so on its
    /// way out: started again, it is not sent the transaction again. A large transaction goes in
    /// pieces, a small one whole; each is followed by a stop as soon as the file shows it.
    @Test func aPublisherStoppedRightAfterAWriteLeavesItsSlotConfirmed() async throws {
        let (url, sql) = try await Self.database()
        try await Self.fillInitialRows(sql)
        let folder = Harness.folder()
        let publisherDB = folder.appendingPathComponent("source.sqlite").path
        let log = folder.appendingPathComponent("serve.log")
        let pieceOptions = ["--transaction-piece", "100"]
        for (round, rows) in [50000, 1, 50000].enumerated() {
            let (publisher, _) = try await Self.serve(folder, url: url, extra: pieceOptions)
            try await Harness.waitUntil("the publisher streams", timeout: .seconds(60)) {
                let text = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
                return text.components(separatedBy: "capturing changes").count > round + 1
            }
            let before = try Self.capture(of: publisherDB).head
            let first = 100_000 * (round + 1)
            try await sql.run(
                "INSERT INTO customers (id, name) SELECT g, 'stop ' || g FROM generate_series(\(first), \(first + rows - 1)) g"
            )
            // Watched in the file, a few milliseconds apart, so the stop follows the write closely.
            let deadline = ContinuousClock.now + .seconds(60)
            while (try? Self.capture(of: publisherDB))?.head ?? 0 < before + LSN(rows) {
                guard ContinuousClock.now < deadline else { throw ConcordError(.timeout, "the rows are not logged") }
                try await Task.sleep(for: .milliseconds(2))
            }
            #expect(await publisher.terminate() == 0)
            let logged = try await Self.publisherFile(publisherDB).read { db in
                try String.fetchOne(db, sql: "SELECT value FROM concord_markers WHERE name = 'postgres.lsn'")
            }
            let position = try #require(logged.flatMap(PostgresDecoding.lsn))
            let confirmed = try await Self.confirmedLSN(url: url)
            #expect(
                confirmed >= position,
                "round \(round): the slot is confirmed to \(PostgresDecoding.lsnText(confirmed)), the log holds \(PostgresDecoding.lsnText(position))"
            )
        }
        let sentAgain = try String(contentsOf: log, encoding: .utf8).contains("the log holds already is sent again")
        #expect(!sentAgain, "no transaction the log holds was sent again")
        let (last, port) = try await Self.serve(folder, url: url)
        let replica = try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path)
        try await VerificationTests.withSubscriber(url: "http://127.0.0.1:\(port)", replica: replica) {
            try await Self.waitForSentinel(replica, url: url, log: log)
        }
        try await Self.expectEqualToTables(replica, sql: sql)
        #expect(await last.terminate() == 0)
        await sql.close()
    }

    /// The slot dropped while the publisher was down: the copy made again writes exactly the
    /// rows that changed or vanished meanwhile, and leaves the equal ones alone.
    @Test func aCopyMadeAgainWritesOnlyTheRowsThatChanged() async throws {
        let (url, sql) = try await Self.database()
        try await Self.fillInitialRows(sql)
        let folder = Harness.folder()
        let publisherDB = folder.appendingPathComponent("source.sqlite").path
        let (first, _) = try await Self.serve(folder, url: url)
        try await Harness.waitUntil("the first copy is done", timeout: .seconds(60)) {
            (try? Self.capture(of: publisherDB))?.streaming == true
        }
        #expect(await first.terminate() == 0)
        let copied = try Self.capture(of: publisherDB).head
        #expect(copied == 3600)
        try await sql.run("UPDATE customers SET name = 'changed' WHERE id IN (7, 2500)")
        try await sql.run("UPDATE order_lines SET qty = -1 WHERE order_no = 'o10' AND line = 1")
        try await sql.run("UPDATE order_lines SET note = 'changed' WHERE order_no = 'o99' AND line = 2")
        try await sql.run("DELETE FROM customers WHERE id IN (1, 3000)")
        // The stopped publisher's connection takes a moment to let go of the slot.
        try await Harness.waitUntil("the slot is dropped", timeout: .seconds(30)) {
            (try? await sql.run("SELECT pg_drop_replication_slot('\(Self.slot(url))')")) != nil
        }
        let (second, port) = try await Self.serve(folder, url: url)
        let replica = try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path)
        try await VerificationTests.withSubscriber(url: "http://127.0.0.1:\(port)", replica: replica) {
            try await Self.waitForSentinel(replica, url: url, log: folder.appendingPathComponent("serve.log"))
        }
        // Two rows changed in each table and two deleted; the sentinel may come twice, from the
        // copy and from the slot.
        let written = try await Self.publisherFile(publisherDB).read { db in
            try String.fetchAll(
                db, sql: "SELECT collection || ' ' || key FROM concord_log WHERE lsn > ? AND collection != 'sentinels'",
                arguments: [Int64(copied)])
        }
        #expect(
            written.sorted() == [
                "customers 1", "customers 2500", "customers 3000", "customers 7", #"order_lines ["o10","1"]"#,
                #"order_lines ["o99","2"]"#,
            ])
        try await Self.expectEqualToTables(replica, sql: sql)
        #expect(await second.terminate() == 0)
        await sql.close()
    }

    /// The publisher is down longer than PostgreSQL keeps WAL for its slot (max_slot_wal_keep_size):
    /// the server invalidates the slot, and the publisher, started again, makes a new one and
    /// copies the tables again, deleting what vanished meanwhile; nothing is lost.
    @Test func aSlotInvalidatedWhileThePublisherWasDownIsMadeAgainAndLosesNothing() async throws {
        let (url, sql) = try await Self.database()
        try await Self.fillInitialRows(sql)
        let folder = Harness.folder()
        let log = folder.appendingPathComponent("serve.log")
        let (first, port) = try await Self.serve(folder, url: url)
        let replica = try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path)
        let servers = Mutex([first])
        try await VerificationTests.withSubscriber(url: "http://127.0.0.1:\(port)", replica: replica) {
            try await Self.write(url: url, transactions: 100, seed: 4)
            try await Self.waitForSentinel(replica, url: url, log: log)
            #expect(await first.terminate() == 0)
            // While it is down: changes its slot keeps, then WAL past what the server keeps for it.
            try await Self.write(url: url, transactions: 200, seed: 5)
            try await sql.run("DELETE FROM customers WHERE id BETWEEN 100 AND 199")
            try await Self.invalidateSlot(url: url, sql: sql)
            let (second, _) = try await Self.serve(folder, url: url, port: port)
            servers.withLock { $0.append(second) }
            try await Self.write(url: url, transactions: 100, seed: 6)
            try await Self.waitForSentinel(replica, url: url, log: log, timeout: .seconds(120))
        }
        try await Self.expectEqualToTables(replica, sql: sql)
        #expect(try replica.records(of: "customers").contains { $0.key == "150" } == false)
        let said = try String(contentsOf: log, encoding: .utf8)
        #expect(said.contains("was invalidated"), "the second publisher found the slot lost")
        #expect(await servers.withLock { $0.last! }.terminate() == 0)
        await sql.close()
    }

    /// A captured table's columns change (ALTER TABLE) while the publisher streams, and again
    /// while it is down. Logical decoding sends no change for the rows an added column's default
    /// fills or a dropped column empties: the publisher notices the new definition, copies the
    /// tables again from a new slot, and the replica ends equal to the tables, column by column.
    @Test func aTableWhoseColumnsChangeIsCopiedAgain() async throws {
        let (url, sql) = try await Self.database()
        try await Self.fillInitialRows(sql)
        let folder = Harness.folder()
        let log = folder.appendingPathComponent("serve.log")
        let (first, port) = try await Self.serve(folder, url: url, extra: ["--table-check-seconds", "1"])
        let replica = try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path)
        let servers = Mutex([first])
        @Sendable func copiesAgain() throws -> Int {
            try String(contentsOf: log, encoding: .utf8).components(separatedBy: "creating the replication slot again")
                .count - 1
        }
        let withTier = "id::text, name, email, balance::text, active::text, meta::text, encode(avatar, 'hex'), tier"
        let tierNames = ["id", "name", "email", "balance", "active", "meta", "avatar", "tier"]
        try await VerificationTests.withSubscriber(url: "http://127.0.0.1:\(port)", replica: replica) {
            try await Self.write(url: url, transactions: 30, seed: 7)
            try await Self.waitForSentinel(replica, url: url, log: log)
            #expect(try copiesAgain() == 0)
            // While streaming, in one transaction (a migration): a column added with a default, a
            // change to it, a column dropped; then an update that no longer names that column.
            try await sql.run("BEGIN")
            try await sql.run("ALTER TABLE customers ADD COLUMN tier text NOT NULL DEFAULT 'basic'")
            try await sql.run("UPDATE customers SET tier = 'gold' WHERE id = 5")
            try await sql.run("ALTER TABLE customers DROP COLUMN note")
            try await sql.run("COMMIT")
            try await sql.run("UPDATE customers SET name = 'after the drop' WHERE id = 6")
            try await Harness.waitUntil("the publisher copies the tables again", timeout: .seconds(60)) {
                try copiesAgain() >= 1
            }
            try await sql.run("UPDATE customers SET tier = 'silver' WHERE id = 7")
            try await Self.waitForSentinel(replica, url: url, log: log)
            let customers = try await Self.differences(
                replica, collection: "customers", sql: sql, query: "SELECT \(withTier) FROM customers",
                columns: tierNames
            ) { $0[0]! }
            #expect(customers.isEmpty, "customers: \(customers.prefix(5))")
            let stale = try replica.records(of: "customers").filter { $0.value.contains(#""note":"#) }
            #expect(stale.isEmpty, "\(stale.count) records still hold the dropped column")

            // While the publisher is down: a column added to the other table.
            #expect(await first.terminate() == 0)
            try await sql.run("ALTER TABLE order_lines ADD COLUMN shipped bool NOT NULL DEFAULT false")
            try await sql.run("UPDATE order_lines SET shipped = true WHERE order_no = 'o3'")
            let (second, _) = try await Self.serve(folder, url: url, port: port, extra: ["--table-check-seconds", "1"])
            servers.withLock { $0.append(second) }
            try await Self.waitForSentinel(replica, url: url, log: log, timeout: .seconds(120))
            #expect(try copiesAgain() >= 2)
            // Only a numeric column's scale: the type stays, every balance's text changes, and
            // no change is sent.
            try await sql.run("ALTER TABLE customers ALTER COLUMN balance TYPE numeric(12,3)")
            try await Harness.waitUntil("the publisher copies the tables again", timeout: .seconds(60)) {
                try copiesAgain() >= 3
            }
            try await Self.waitForSentinel(replica, url: url, log: log)
            // A key column renamed, then a row inserted: its change no longer names the key the
            // publisher knows. The publisher copies again rather than stopping.
            try await sql.run("ALTER TABLE order_lines RENAME COLUMN line TO line_no")
            try await sql.run("INSERT INTO order_lines (order_no, line_no, qty, shipped) VALUES ('new', 1, 1, true)")
            try await Harness.waitUntil("the publisher copies the tables again", timeout: .seconds(60)) {
                try copiesAgain() >= 4
            }
            try await Self.waitForSentinel(replica, url: url, log: log)
            #expect(servers.withLock { $0.last! }.isRunning)
        }
        let lines = try await Self.differences(
            replica, collection: "order_lines", sql: sql,
            query: "SELECT order_no, line_no::text, qty::text, note, shipped::text FROM order_lines",
            columns: ["order_no", "line_no", "qty", "note", "shipped"]
        ) { "[\"\($0[0]!)\",\"\($0[1]!)\"]" }
        #expect(lines.isEmpty, "order_lines: \(lines.prefix(5))")
        let customers = try await Self.differences(
            replica, collection: "customers", sql: sql, query: "SELECT \(withTier) FROM customers", columns: tierNames
        ) { $0[0]! }
        #expect(customers.isEmpty, "customers: \(customers.prefix(5))")
        #expect(await servers.withLock { $0.last! }.terminate() == 0)
        await sql.close()
    }

    /// Lowers max_slot_wal_keep_size, switches WAL segments and checkpoints until the server has
    /// invalidated the test database's slot, then restores the setting.
    static func invalidateSlot(url: String, sql: SQLSession) async throws {
        try await sql.run("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        try await sql.run("SELECT pg_reload_conf()")
        do {
            try await Harness.waitUntil("PostgreSQL invalidates the slot", timeout: .seconds(60)) {
                try await sql.run("SELECT pg_logical_emit_message(false, 'concord-test', 'wal')")
                try await sql.run("SELECT pg_switch_wal()")
                try await sql.run("CHECKPOINT")
                let status = try await sql.texts(
                    "SELECT wal_status::text FROM pg_replication_slots WHERE slot_name = '\(slot(url))'")
                return status.first?.first == "lost"
            }
        } catch {
            try? await sql.run("ALTER SYSTEM RESET max_slot_wal_keep_size")
            try? await sql.run("SELECT pg_reload_conf()")
            throw error
        }
        try await sql.run("ALTER SYSTEM RESET max_slot_wal_keep_size")
        try await sql.run("SELECT pg_reload_conf()")
    }

    /// A role that signs in with a password, as production servers ask: the capture's SQL
    /// connection and its replication connection both authenticate (SCRAM-SHA-256, or MD5 for
    /// a password stored that way), and a change reaches the replica.
    @Test(arguments: ["concord_scram", "concord_md5"])
    func aRoleSigningInWithAPasswordCaptures(role: String) async throws {
        let (url, sql) = try await Self.database()
        try await Self.fillInitialRows(sql)
        // Roles belong to the whole server: made once, given this test database's tables.
        try await sql.run(
            "DO $$ BEGIN CREATE ROLE \(role) LOGIN REPLICATION; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
        try await sql.run("SET password_encryption = '\(role == "concord_md5" ? "md5" : "scram-sha-256")'")
        try await sql.run("ALTER ROLE \(role) PASSWORD 'correct horse'")
        try await sql.run("GRANT SELECT ON customers, order_lines, sentinels TO \(role)")
        var components = try #require(URLComponents(string: url))
        components.user = role
        components.password = "correct horse"
        let roleURL = try #require(components.string)
        let folder = Harness.folder()
        let (server, port) = try await Self.serve(folder, url: roleURL)
        let replica = try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path)
        try await VerificationTests.withSubscriber(url: "http://127.0.0.1:\(port)", replica: replica) {
            try await sql.run("UPDATE customers SET name = 'signed in' WHERE id = 1")
            try await Self.waitForSentinel(replica, url: url, log: folder.appendingPathComponent("serve.log"))
        }
        #expect(try replica.records(of: "customers").first { $0.key == "1" }?.value.contains("signed in") == true)
        try await Self.expectEqualToTables(replica, sql: sql)
        #expect(await server.terminate() == 0)
        await sql.close()
    }

    /// The slot of a database nobody writes still moves on while other databases of the server
    /// write, or the server would keep their WAL for it without end.
    @Test func aQuietDatabasesSlotMovesOnWhileOthersWrite() async throws {
        let (url, sql) = try await Self.database()
        let folder = Harness.folder()
        let (server, _) = try await Self.serve(folder, url: url)
        let publisherDB = folder.appendingPathComponent("source.sqlite").path
        try await Harness.waitUntil("the publisher follows the slot", timeout: .seconds(60)) {
            (try? Self.capture(of: publisherDB))?.streaming == true
        }
        let busy = try await SQLSession.connect(try await PostgresHarness.database())
        try await busy.run("CREATE TABLE elsewhere (id int PRIMARY KEY, note text)")
        let walBefore = try #require(
            try await sql.texts("SELECT pg_current_wal_insert_lsn()::text").first?.first?.flatMap(PostgresDecoding.lsn))
        try await busy.run("INSERT INTO elsewhere SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
        try await Harness.waitUntil("the quiet database's slot passes the others' writes", timeout: .seconds(60)) {
            try await Self.confirmedLSN(url: url) > walBefore
        }
        #expect(await server.terminate() == 0)
        await busy.close()
        await sql.close()
    }

    @Test func configurationErrorsSayWhatToDo() async throws {
        let url = try await PostgresHarness.database()
        let sql = try await SQLSession.connect(url)
        try await sql.run("CREATE TABLE events (message text)")
        try await sql.run(Self.customers)
        try await sql.run("DROP ROLE IF EXISTS plain_role")
        try await sql.run("CREATE ROLE plain_role LOGIN")
        let folder = Harness.folder()
        let db = folder.appendingPathComponent("source.sqlite").path
        var (status, message) = try await Self.run([
            "serve", "--db", db, "--port", "0", "--postgres", url, "--tables", "public.events",
        ])
        #expect(
            status == 2 && message.contains("has no primary key") && message.contains("ADD PRIMARY KEY"), "\(message)")
        (status, message) = try await Self.run([
            "serve", "--db", db, "--port", "0", "--postgres", url, "--tables", "public.nope",
        ])
        #expect(status == 2 && message.contains("no table public.nope"), "\(message)")
        var plain = URLComponents(string: url)!
        plain.user = "plain_role"
        (status, message) = try await Self.run([
            "serve", "--db", db, "--port", "0", "--postgres", plain.string!, "--tables", "public.customers",
        ])
        #expect(status == 2 && message.contains("WITH REPLICATION"), "\(message)")
        (status, message) = try await Self.run(["serve", "--db", db, "--port", "0", "--tables", "public.customers"])
        #expect(status != 0 && message.contains("--tables goes with --postgres"), "\(message)")
        await sql.close()
    }

    /// Inserts (while the tables may still be copied), updates, deletes, a transaction of several
    /// statements, NULLs, an out-of-line value, key changes, and a truncated and refilled table.
    static func writeEveryKind(_ sql: SQLSession) async throws {
        // Written while the tables are being copied.
        try await sql.run(
            "INSERT INTO customers (id, name) SELECT g, 'late ' || g FROM generate_series(3001, 3100) g")
        try await sql.run("UPDATE customers SET name = 'renamed ' || id, balance = NULL WHERE id % 10 = 0")
        try await sql.run("DELETE FROM customers WHERE id % 7 = 0")
        // One transaction of several statements.
        try await sql.run("BEGIN")
        try await sql.run("INSERT INTO customers (id, name, active) VALUES (5000, 'in a transaction', true)")
        try await sql.run("UPDATE customers SET email = NULL, meta = NULL, avatar = NULL WHERE id < 50")
        try await sql.run("DELETE FROM customers WHERE id BETWEEN 60 AND 69")
        try await sql.run("COMMIT")
        // A value stored out of line, then an update that leaves it alone (wal2json omits it).
        try await sql.run(
            """
            INSERT INTO customers (id, name, note)
            SELECT 6000, 'toasted', string_agg(md5(random()::text), '') FROM generate_series(1, 800)
            """)
        try await sql.run("UPDATE customers SET name = 'toasted, renamed' WHERE id = 6000")
        try await sql.run("UPDATE customers SET id = 6001 WHERE id = 6000")
        // Composite keys: one half of the key changes; then the table is truncated and refilled.
        try await sql.run("UPDATE order_lines SET line = line + 100, note = 'moved' WHERE order_no = 'o5'")
        try await sql.run("UPDATE order_lines SET qty = qty * 2 WHERE order_no = 'o7'")
        try await sql.run("TRUNCATE order_lines")
        try await sql.run("INSERT INTO order_lines VALUES ('after', 1, 1, 'x'), ('after', 2, 2, NULL)")
    }

    // MARK: Helpers

    static func publisherCount(port: Int) async throws -> Int {
        let http = SourceClient.makeHTTPClient()
        defer { _ = http.shutdown() }
        let feed = try? await SourceClient(baseURL: "http://127.0.0.1:\(port)", http: http).feed()
        return feed?.collections.reduce(0) { $0 + $1.count } ?? 0
    }

    /// Random transactions of inserts, updates and deletes on customers and order lines.
    static func write(url: String, transactions: Int, seed: UInt64) async throws {
        let session = try await SQLSession.connect(url)
        var generator = SeededGenerator(seed: seed)
        for _ in 0..<transactions {
            try await session.run("BEGIN")
            for _ in 0..<Int.random(in: 1...3, using: &generator) {
                let id = Int.random(in: 1...45_000, using: &generator)
                switch Int.random(in: 0..<4, using: &generator) {
                case 0:
                    try await session.run(
                        "INSERT INTO customers (id, name) VALUES (\(id), 'new \(id)') ON CONFLICT (id) DO UPDATE SET name = 'again \(id)'"
                    )
                case 1:
                    try await session.run(
                        "UPDATE customers SET balance = \(id % 1000).5, active = true WHERE id = \(id)")
                case 2: try await session.run("DELETE FROM customers WHERE id = \(id)")
                default:
                    try await session.run(
                        "INSERT INTO order_lines VALUES ('o\(id % 50)', \(id % 7), \(id), 'n') ON CONFLICT DO NOTHING")
                }
            }
            try await session.run("COMMIT")
        }
        await session.close()
    }

    /// Runs `concord ARGUMENTS` to its end; returns its exit status and standard error.
    static func run(_ arguments: [String]) async throws -> (Int32, String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Harness.binary)
        process.arguments = arguments + ["--log-level", "critical"]
        let errors = Pipe()
        process.standardError = errors
        process.standardOutput = FileHandle.nullDevice
        let text = String(decoding: try await Harness.runToEnd(process, reading: errors), as: UTF8.self)
        return (process.terminationStatus, text)
    }
}
