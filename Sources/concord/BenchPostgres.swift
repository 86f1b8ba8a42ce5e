import ArgumentParser
import AsyncHTTPClient
import ConcordClient
import ConcordCore
import ConcordPostgres
import Foundation
import Logging
import PostgresNIO

extension Bench {
    /// PostgreSQL to PostgreSQL, in one run on one server: PostgreSQL's own logical replication
    /// (CREATE SUBSCRIPTION) against Concord (`serve --postgres` capturing the source table,
    /// `follow --postgres` writing the replica), on the same rows: the initial sync, then one
    /// transaction updating `changes` rows.
    func postgresBenchmark(folder: URL, logger: Logger, results: inout [String: Double]) async throws {
        guard let url = postgres else {
            throw ValidationError(
                "bench postgres needs --postgres URL (a superuser; scripts/bench-postgres.sh starts one)")
        }
        let rows = records
        let updates = min(changes, rows)
        // The replicas live on their own server, as they would beside the services that query
        // them; on one server, the source's logical decoding would also read the replicas' WAL.
        let replicaServer = replicaPostgres ?? url
        let admin = try await PostgresAdmin.connect(url, logger: logger)
        let replicaAdmin = try await PostgresAdmin.connect(replicaServer, logger: logger)
        say(
            "postgres: \(rows) rows of about 225-byte values, then one transaction updating \(updates) of them, "
                + "then a backlog of \(min(transactions, rows)) one-row transactions")
        let replicaDatabases = ["concord_bench_pg", "concord_bench_replica"]
        try await replicaAdmin.resetDatabases(dropping: replicaDatabases, creating: replicaDatabases)
        try await admin.resetDatabases(dropping: ["concord_bench_source"], creating: ["concord_bench_source"])
        let sourceURL = PostgresAdmin.url(url, database: "concord_bench_source")
        let source = try await PostgresAdmin.connect(sourceURL, logger: logger)
        try await source.run("CREATE TABLE src (id bigint PRIMARY KEY, v text NOT NULL)")
        try await source.run(
            """
            INSERT INTO src SELECT i,
              json_build_object('id', i, 'name', md5(i::text), 'email', md5((i*7)::text) || '@example.com',
                                'bio', repeat(substr(md5((i*13)::text),1,8), 12))::text
            FROM generate_series(1, \(rows)) i
            """)
        try await source.run("VACUUM ANALYZE src")

        // PostgreSQL's logical replication.
        let pgURL = PostgresAdmin.url(replicaServer, database: "concord_bench_pg")
        let target = try await PostgresAdmin.connect(pgURL, logger: logger)
        try await target.run("CREATE TABLE src (id bigint PRIMARY KEY, v text NOT NULL)")
        try await source.run("CREATE PUBLICATION concord_bench FOR TABLE src")
        // Inside one cluster CREATE SUBSCRIPTION waits for itself unless the slot exists first.
        try await source.run("SELECT pg_create_logical_replication_slot('concord_bench_pg', 'pgoutput')")
        let components = URLComponents(string: url)!
        let connection =
            "host=\(components.host ?? "127.0.0.1") port=\(components.port ?? 5432) user=\(components.user ?? "postgres") dbname=concord_bench_source"
        var started = ContinuousClock.now
        try await target.run(
            """
            CREATE SUBSCRIPTION concord_bench CONNECTION '\(connection)' PUBLICATION concord_bench
            WITH (create_slot = false, slot_name = 'concord_bench_pg')
            """)
        try await Self.poll("PostgreSQL's initial sync", timeout: .seconds(600)) {
            try await target.flag("SELECT count(*) = 1 AND bool_and(srsubstate = 'r') FROM pg_subscription_rel")
        }
        let pgSync = (ContinuousClock.now - started).seconds
        say(String(format: "  PostgreSQL logical replication: initial sync %.2f s", pgSync))
        started = ContinuousClock.now
        try await source.run("UPDATE src SET v = v || ' ' WHERE id <= \(updates)")
        try await Self.poll("PostgreSQL's apply", timeout: .seconds(600)) {
            try await target.flag("SELECT right(v, 1) = ' ' FROM src WHERE id = \(updates)")
        }
        let pgApply = (ContinuousClock.now - started).seconds
        say(
            String(
                format: "  PostgreSQL logical replication: %d updates in %.2f s (%.0f rows/s)", updates, pgApply,
                Double(updates) / pgApply))
        // A backlog of one-row transactions, the shape of a service's everyday writes, committed
        // while the subscription is disabled; the apply rate is how fast it catches up.
        try await source.run(
            """
            CREATE PROCEDURE concord_bench_touch(n int, mark text) LANGUAGE plpgsql AS $$
            BEGIN
              FOR i IN 1..n LOOP
                UPDATE src SET v = v || mark WHERE id = i;
                COMMIT;
              END LOOP;
            END $$
            """)
        let small = min(transactions, rows)
        try await target.run("ALTER SUBSCRIPTION concord_bench DISABLE")
        try await Self.poll("PostgreSQL's apply worker stops", timeout: .seconds(30)) {
            try await source.flag(
                "SELECT NOT active FROM pg_replication_slots WHERE slot_name = 'concord_bench_pg'")
        }
        let pgBacklog = try await Self.backlog(source, transactions: small, mark: "+")
        say(String(format: "  %d one-row transactions committed at the source in %.2f s", small, pgBacklog))
        started = ContinuousClock.now
        try await target.run("ALTER SUBSCRIPTION concord_bench ENABLE")
        try await Self.poll("PostgreSQL's catch-up", timeout: .seconds(600)) {
            try await target.flag("SELECT right(v, 1) = '+' FROM src WHERE id = \(small)")
        }
        let pgCatchUp = (ContinuousClock.now - started).seconds
        say(
            String(
                format: "  PostgreSQL logical replication: caught up on %d transactions in %.2f s (%.0f/s)", small,
                pgCatchUp, Double(small) / pgCatchUp))
        try await target.run("ALTER SUBSCRIPTION concord_bench DISABLE")
        try await target.run("ALTER SUBSCRIPTION concord_bench SET (slot_name = NONE)")
        try await target.run("DROP SUBSCRIPTION concord_bench")
        // The subscription's sender takes a moment to let go of the slot.
        try await Self.dropSlot("concord_bench_pg", on: source)
        await target.close()

        // Concord: capture into a publisher, follow into a PostgreSQL replica, verified.
        let replicaURL = PostgresAdmin.url(replicaServer, database: "concord_bench_replica")
        let replica = try await PostgresAdmin.connect(replicaURL, logger: logger)
        let binary = try concordBinary ?? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
        let portFile = folder.appendingPathComponent("pg-publisher.port").path
        let followerBackends = try await replica.serverTime()
        started = ContinuousClock.now
        let publisher = try Self.child(
            binary,
            [
                "serve", "--db", folder.appendingPathComponent("pg-publisher.sqlite").path, "--port", "0",
                "--port-file", portFile, "--postgres", sourceURL, "--tables", "public.src", "--slot",
                "concord_bench_capture", "--log-level", "warning",
            ])
        defer { Self.stop(publisher) }
        var port = 0
        try await Self.poll("the publisher listens", timeout: .seconds(60)) {
            port = (try? String(contentsOfFile: portFile, encoding: .utf8)).flatMap { Int($0) } ?? 0
            return port > 0
        }
        let follower = try Self.child(
            binary,
            [
                "follow", "--source", "http://127.0.0.1:\(port)", "--postgres", replicaURL, "--schema", "concord",
                "--quiet", "--log-level", "warning",
            ])
        defer { Self.stop(follower) }
        let http = SourceClient.makeHTTPClient()
        defer { _ = http.shutdown() }
        let feedClient = SourceClient(baseURL: "http://127.0.0.1:\(port)", http: http)
        /// The replica is at the publisher's head, verified there, and holds `expected` rows.
        func verifiedAtHead(schema: String = "concord") async throws -> Bool {
            guard let feed = try? await feedClient.feed(), feed.collections.first?.count == rows,
                try await replica.tableExists("\(schema).concord_state")
            else { return false }
            let state = try await replica.texts(
                "SELECT position::text, verified_lsn::text, phase FROM \(schema).concord_state WHERE id = 1")
            guard let row = state.first, row[2] == "following", let position = row[0].flatMap({ UInt64($0) })
            else { return false }
            return position == feed.head && row[1].flatMap({ UInt64($0) }) == position
        }
        var captured: Double?
        try await Self.poll("Concord's initial sync", timeout: .seconds(900)) {
            guard publisher.isRunning, follower.isRunning else {
                throw ConcordError(.internal, "concord serve or follow exited")
            }
            if captured == nil, (try? await feedClient.feed())?.collections.first?.count == rows {
                captured = (ContinuousClock.now - started).seconds
            }
            return try await verifiedAtHead()
        }
        let concordSync = (ContinuousClock.now - started).seconds
        say(
            String(
                format:
                    "  Concord: initial sync %.2f s (the publisher held every row after %.2f s; the replica is verified at the head)",
                concordSync, captured ?? 0))
        // CPU per row tells a change in Concord's own work apart from the machine's noise, which
        // moves the wall clock by a fifth between runs.
        let publisherCPU = ProcessCPU.seconds(of: publisher.processIdentifier)
        let followerCPU = ProcessCPU.seconds(of: follower.processIdentifier)
        let replicaServerCPU = try await replica.backendCPU(openedSince: followerBackends)
        say(
            String(
                format:
                    "    CPU per row: %.1f µs in the publisher, %.1f µs in the subscriber, %.1f µs in the replica's PostgreSQL backends (the source's not counted)",
                publisherCPU * 1e6 / Double(rows), followerCPU * 1e6 / Double(rows),
                replicaServerCPU * 1e6 / Double(rows)))
        let headBefore = try await feedClient.feed().head
        started = ContinuousClock.now
        try await source.run("UPDATE src SET v = v || ' ' WHERE id <= \(updates)")
        var capturedUpdate: Double?
        try await Self.poll("Concord's apply", timeout: .seconds(900)) {
            if capturedUpdate == nil, try await feedClient.feed().head >= headBefore + LSN(updates) {
                capturedUpdate = (ContinuousClock.now - started).seconds
            }
            return try await replica.flag("SELECT value LIKE '%  \"}' FROM concord.src WHERE key = '\(updates)'")
        }
        let concordApply = (ContinuousClock.now - started).seconds
        try await Self.poll("Concord's verification", timeout: .seconds(300)) { try await verifiedAtHead() }
        let concordVerified = (ContinuousClock.now - started).seconds
        say(
            String(
                format:
                    "  Concord: %d updates in %.2f s (%.0f rows/s; captured into the publisher after %.2f s), verified at the head after %.2f s",
                updates, concordApply, Double(updates) / concordApply, capturedUpdate ?? concordApply, concordVerified))
        let publisherUpdateCPU = ProcessCPU.seconds(of: publisher.processIdentifier) - publisherCPU
        let followerUpdateCPU = ProcessCPU.seconds(of: follower.processIdentifier) - followerCPU
        let replicaServerUpdateCPU = try await replica.backendCPU(openedSince: followerBackends) - replicaServerCPU
        say(
            String(
                format:
                    "    CPU per row: %.1f µs in the publisher, %.1f µs in the subscriber, %.1f µs in the replica's PostgreSQL backends",
                publisherUpdateCPU * 1e6 / Double(updates), followerUpdateCPU * 1e6 / Double(updates),
                replicaServerUpdateCPU * 1e6 / Double(updates)))
        // The largest transactions so far are this one and the copy's; neither side should hold
        // one whole.
        let publisherPeak = ProcessMemory.peakMegabytes(of: publisher.processIdentifier)
        let followerPeak = ProcessMemory.peakMegabytes(of: follower.processIdentifier)
        say(
            String(
                format: "    peak memory so far: %.0f MiB in the publisher, %.0f MiB in the subscriber",
                publisherPeak, followerPeak))
        results["postgres_concord_update_publisher_peak_mib"] = publisherPeak
        results["postgres_concord_update_subscriber_peak_mib"] = followerPeak

        // The same backlog, committed while the publisher is paused (SIGSTOP), so its slot holds
        // it as PostgreSQL's disabled subscription's did.
        let cpuBeforeBacklog = (
            ProcessCPU.seconds(of: publisher.processIdentifier), ProcessCPU.seconds(of: follower.processIdentifier),
            try await replica.backendCPU(openedSince: followerBackends)
        )
        let headBeforeBacklog = try await feedClient.feed().head
        kill(publisher.processIdentifier, SIGSTOP)
        let concordBacklog: Double
        do {
            concordBacklog = try await Self.backlog(source, transactions: small, mark: "#")
        } catch {
            kill(publisher.processIdentifier, SIGCONT)
            throw error
        }
        say(String(format: "  %d one-row transactions committed at the source in %.2f s", small, concordBacklog))
        started = ContinuousClock.now
        kill(publisher.processIdentifier, SIGCONT)
        var capturedBacklog: Double?
        try await Self.poll("Concord's catch-up", timeout: .seconds(900)) {
            if capturedBacklog == nil, try await feedClient.feed().head >= headBeforeBacklog + LSN(small) {
                capturedBacklog = (ContinuousClock.now - started).seconds
            }
            return try await replica.flag("SELECT value LIKE '%#\"}' FROM concord.src WHERE key = '\(small)'")
        }
        let concordCatchUp = (ContinuousClock.now - started).seconds
        try await Self.poll("Concord's verification", timeout: .seconds(300)) { try await verifiedAtHead() }
        let concordCatchUpVerified = (ContinuousClock.now - started).seconds
        say(
            String(
                format:
                    "  Concord: caught up on %d transactions in %.2f s (%.0f/s; captured into the publisher after %.2f s), verified at the head after %.2f s",
                small, concordCatchUp, Double(small) / concordCatchUp, capturedBacklog ?? concordCatchUp,
                concordCatchUpVerified))
        let replicaServerBacklogCPU = try await replica.backendCPU(openedSince: followerBackends) - cpuBeforeBacklog.2
        say(
            String(
                format:
                    "    CPU per transaction: %.1f µs in the publisher, %.1f µs in the subscriber, %.1f µs in the replica's PostgreSQL backends",
                (ProcessCPU.seconds(of: publisher.processIdentifier) - cpuBeforeBacklog.0) * 1e6 / Double(small),
                (ProcessCPU.seconds(of: follower.processIdentifier) - cpuBeforeBacklog.1) * 1e6 / Double(small),
                replicaServerBacklogCPU * 1e6 / Double(small)))

        // A service's writes one at a time: how soon each is in the publisher's log after the
        // statement began (a long poll waits on the head), and what both processes cost while
        // nothing is written.
        var latencies: [Double] = []
        // Committed as a service commits: the walsender sends only what is flushed, and a commit
        // that does not wait for its flush reaches the slot at the WAL writer's next round.
        try await source.run("SET synchronous_commit = on")
        for id in 1...40 {
            let head = try await feedClient.feed().head
            let logged = Task { try await feedClient.changes(after: head, limit: 1, wait: 10) }
            try await Task.sleep(for: .milliseconds(50))
            let sent = ContinuousClock.now
            try await source.run("UPDATE src SET v = v || '+' WHERE id = \(id)")
            _ = try await logged.value
            latencies.append((ContinuousClock.now - sent).seconds * 1000)
        }
        latencies.sort()
        try await Task.sleep(for: .seconds(2))
        let idleBefore = (
            ProcessCPU.seconds(of: publisher.processIdentifier), ProcessCPU.seconds(of: follower.processIdentifier)
        )
        try await Task.sleep(for: .seconds(10))
        let idleCPU = (
            (ProcessCPU.seconds(of: publisher.processIdentifier) - idleBefore.0) * 1000,
            (ProcessCPU.seconds(of: follower.processIdentifier) - idleBefore.1) * 1000
        )
        say(
            String(
                format:
                    "  Concord: 40 one-row updates one at a time, each in the publisher's log %.1f ms after its statement began (median; 90th percentile %.1f ms); then idle for 10 s: %.0f ms of CPU in the publisher, %.0f ms in the subscriber",
                latencies[20], latencies[36], idleCPU.0, idleCPU.1))
        results["postgres_concord_commit_to_log_median_ms"] = latencies[20]
        results["postgres_concord_commit_to_log_p90_ms"] = latencies[36]
        results["postgres_concord_idle_publisher_cpu_ms_per_10s"] = idleCPU.0
        results["postgres_concord_idle_subscriber_cpu_ms_per_10s"] = idleCPU.1

        // A second replica of the same publisher: what each further replica costs once the
        // source is captured (PostgreSQL's subscription copies from the source table each time).
        let secondBackends = try await replica.serverTime()
        let publisherCPUBeforeSecond = ProcessCPU.seconds(of: publisher.processIdentifier)
        started = ContinuousClock.now
        let second = try Self.child(
            binary,
            [
                "follow", "--source", "http://127.0.0.1:\(port)", "--postgres", replicaURL, "--schema", "concord2",
                "--quiet", "--log-level", "warning",
            ])
        defer { Self.stop(second) }
        try await Self.poll("the second replica's bootstrap", timeout: .seconds(900)) {
            try await verifiedAtHead(schema: "concord2")
        }
        let secondSync = (ContinuousClock.now - started).seconds
        say(
            String(
                format: "  Concord: a second replica of the same publisher bootstrapped and verified in %.2f s",
                secondSync))
        // Where a further replica's time goes, process by process.
        let secondServerCPU = try await replica.backendCPU(openedSince: secondBackends)
        say(
            String(
                format:
                    "    CPU: %.2f s in the publisher, %.2f s in the subscriber, %.2f s in the replica's PostgreSQL backends",
                ProcessCPU.seconds(of: publisher.processIdentifier) - publisherCPUBeforeSecond,
                ProcessCPU.seconds(of: second.processIdentifier), secondServerCPU))
        results["postgres_concord_second_replica_seconds"] = secondSync
        results["postgres_concord_second_replica_server_cpu_seconds"] = secondServerCPU
        Self.stop(second)
        say(
            String(
                format:
                    "  ratios (PostgreSQL's time / Concord's; above 1: Concord is faster): sync %.2fx, apply %.2fx, catch-up on one-row transactions %.2fx, second replica %.2fx",
                pgSync / concordSync, pgApply / concordApply, pgCatchUp / concordCatchUp, pgSync / secondSync))
        results["postgres_pg_catch_up_seconds"] = pgCatchUp
        results["postgres_concord_catch_up_seconds"] = concordCatchUp
        results["postgres_pg_sync_seconds"] = pgSync
        results["postgres_pg_apply_seconds"] = pgApply
        results["postgres_concord_sync_seconds"] = concordSync
        results["postgres_concord_apply_seconds"] = concordApply
        results["postgres_concord_verified_seconds"] = concordVerified
        let headBeforeCopy = try await feedClient.feed().head
        Self.stop(follower)
        Self.stop(publisher)
        try await Self.dropSlot("concord_bench_capture", on: source)

        // The slot dropped while the publisher was down: started again, it copies the table
        // again, finds every row equal to what it holds, writes nothing and streams on.
        started = ContinuousClock.now
        let (restarted, restartedPort) = try await Self.readyPublisher(
            binary, db: folder.appendingPathComponent("pg-publisher.sqlite").path, source: sourceURL,
            tables: "public.src", slot: "concord_bench_capture", portFile: portFile, http: http)
        defer { Self.stop(restarted) }
        let recopy = (ContinuousClock.now - started).seconds
        let recopyCPU = ProcessCPU.seconds(of: restarted.processIdentifier)
        let headAfterCopy = try await SourceClient(baseURL: "http://127.0.0.1:\(restartedPort)", http: http).feed().head
        say(
            String(
                format:
                    "  Concord: slot dropped while the publisher was down; started again, copied again over %d equal rows and streaming after %.2f s (%.1f µs of CPU per row, its start included), %d records written",
                rows, recopy, recopyCPU * 1e6 / Double(rows), Int(headAfterCopy) - Int(headBeforeCopy)))
        results["postgres_concord_recopy_seconds"] = recopy
        Self.stop(restarted)
        try await Self.dropSlot("concord_bench_capture", on: source)

        // Updates that leave a large out-of-line (TOASTed) value alone: wal2json leaves the value
        // out, and the publisher takes it from the record it holds.
        let documents = min(rows, 20_000)
        try await source.run("CREATE TABLE doc (id bigint PRIMARY KEY, status text NOT NULL, body text NOT NULL)")
        try await source.run("ALTER TABLE doc ALTER body SET STORAGE EXTERNAL")
        try await source.run(
            "INSERT INTO doc SELECT i, 'new', repeat(md5(i::text), 100) FROM generate_series(1, \(documents)) i")
        let (documentPublisher, documentPort) = try await Self.readyPublisher(
            binary, db: folder.appendingPathComponent("pg-documents.sqlite").path, source: sourceURL,
            tables: "public.doc", slot: "concord_bench_documents", portFile: portFile, http: http)
        defer { Self.stop(documentPublisher) }
        let documentClient = SourceClient(baseURL: "http://127.0.0.1:\(documentPort)", http: http)
        let toasted = try await Self.capture(
            "UPDATE doc SET status = 'shipped'", at: source, changes: documents, by: documentPublisher,
            client: documentClient, timeout: .seconds(600))
        // The value left out was carried over from the record held.
        let last = try await documentClient.page(collection: "doc", afterKey: nil, limit: 1).records.first
        guard let last, last.value.contains("\"shipped\""), last.value.utf8.count > 3_200 else {
            throw ConcordError(
                .internal, "an update lost the out-of-line value: \(String(describing: last?.value.prefix(80)))")
        }
        say(
            String(
                format:
                    "  Concord: %d updates leaving a 3,200-byte out-of-line value out, captured into the publisher in %.2f s (%.1f µs of CPU each)",
                documents, toasted.logged, toasted.cpuPerChange))
        results["postgres_concord_toasted_updates_seconds"] = toasted.logged
        Self.stop(documentPublisher)
        try await Self.dropSlot("concord_bench_documents", on: source)

        // One source transaction of `rows` inserts: the publisher takes it in pieces while it
        // is read, so it never holds it whole, and logs it as one transaction at its commit.
        try await source.run("CREATE TABLE bulk (id bigint PRIMARY KEY, v text NOT NULL)")
        let (bulkPublisher, bulkPort) = try await Self.readyPublisher(
            binary, db: folder.appendingPathComponent("pg-bulk.sqlite").path, source: sourceURL,
            tables: "public.bulk", slot: "concord_bench_bulk", portFile: portFile, http: http)
        defer { Self.stop(bulkPublisher) }
        let memoryBefore = ProcessMemory.peakMegabytes(of: bulkPublisher.processIdentifier)
        let bulk = try await Self.capture(
            "INSERT INTO bulk SELECT id, v FROM src", at: source, changes: rows, by: bulkPublisher,
            client: SourceClient(baseURL: "http://127.0.0.1:\(bulkPort)", http: http), timeout: .seconds(900))
        let memoryPeak = ProcessMemory.peakMegabytes(of: bulkPublisher.processIdentifier)
        say(
            String(
                format:
                    "  Concord: one source transaction of %d inserts (committed in %.2f s) in the publisher's log %.2f s after it began (%.1f µs of CPU each); the publisher's peak memory %.0f MiB, %.0f MiB before it",
                rows, bulk.committed, bulk.logged, bulk.cpuPerChange, memoryPeak, memoryBefore))
        results["postgres_concord_large_transaction_seconds"] = bulk.logged
        results["postgres_concord_large_transaction_peak_mib"] = memoryPeak
        Self.stop(bulkPublisher)
        try await Self.dropSlot("concord_bench_bulk", on: source)
        await replica.close()
        await source.close()
        if !keep {
            try await replicaAdmin.resetDatabases(dropping: replicaDatabases, creating: [])
            try await admin.resetDatabases(dropping: ["concord_bench_source"], creating: [])
        }
        await replicaAdmin.close()
        await admin.close()
    }

    /// Commits `transactions` one-row updates at the source, each appending `mark`; returns the seconds taken.
    static func backlog(_ source: PostgresAdmin, transactions: Int, mark: String) async throws -> Double {
        // Not waiting for each commit's flush, as a busy service's source would group them.
        try await source.run("SET synchronous_commit = off")
        let started = ContinuousClock.now
        try await source.run("CALL concord_bench_touch(\(transactions), '\(mark)')")
        return (ContinuousClock.now - started).seconds
    }

    static func child(_ binary: String, _ arguments: [String]) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = arguments
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        return process
    }

    /// Starts `concord serve --postgres` and waits until it has copied the tables and streams
    /// (its `/readyz` answers 200); returns the process and its port.
    static func readyPublisher(
        _ binary: String, db: String, source: String, tables: String, slot: String, portFile: String,
        http: HTTPClient
    ) async throws -> (Process, Int) {
        try? FileManager.default.removeItem(atPath: portFile)
        let publisher = try child(
            binary,
            [
                "serve", "--db", db, "--port", "0", "--port-file", portFile, "--postgres", source, "--tables", tables,
                "--slot", slot, "--log-level", "warning",
            ])
        var port = 0
        do {
            try await poll("the publisher copies \(tables) and streams", timeout: .seconds(900)) {
                guard publisher.isRunning else { throw ConcordError(.internal, "concord serve exited") }
                if port == 0 {
                    port = (try? String(contentsOfFile: portFile, encoding: .utf8)).flatMap { Int($0) } ?? 0
                    if port == 0 { return false }
                }
                return try await http.get(url: "http://127.0.0.1:\(port)/readyz").get().status == .ok
            }
        } catch {
            stop(publisher)
            throw error
        }
        return (publisher, port)
    }

    /// Runs `sql` at the source, then waits until `publisher` has logged `changes` more; returns
    /// the seconds the statement took and the seconds until they were logged, both from its
    /// start, and the publisher's CPU per change in µs.
    static func capture(
        _ sql: String, at source: PostgresAdmin, changes: Int, by publisher: Process, client: SourceClient,
        timeout: Duration
    ) async throws -> (committed: Double, logged: Double, cpuPerChange: Double) {
        let head = try await client.feed().head
        let cpu = ProcessCPU.seconds(of: publisher.processIdentifier)
        let started = ContinuousClock.now
        try await source.run(sql)
        let committed = (ContinuousClock.now - started).seconds
        try await poll("the publisher captures \(changes) changes", timeout: timeout) {
            guard publisher.isRunning else { throw ConcordError(.internal, "concord serve exited") }
            return try await client.feed().head >= head + LSN(changes)
        }
        let logged = (ContinuousClock.now - started).seconds
        return (committed, logged, (ProcessCPU.seconds(of: publisher.processIdentifier) - cpu) * 1e6 / Double(changes))
    }

    /// Drops a slot whose user was just stopped: its connection lets go of it a moment later.
    static func dropSlot(_ slot: String, on source: PostgresAdmin) async throws {
        try await poll("replication slot \(slot) is dropped", timeout: .seconds(30)) {
            try await source.flag(
                "SELECT count(pg_drop_replication_slot(slot_name)) = 1 FROM pg_replication_slots WHERE slot_name = '\(slot)' AND NOT active"
            )
        }
    }

    static func stop(_ process: Process) {
        guard process.isRunning else { return }
        process.terminate()
        process.waitUntilExit()
    }

    static func poll(_ what: String, timeout: Duration, _ condition: () async throws -> Bool) async throws {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if try await condition() { return }
            try await Task.sleep(for: .milliseconds(20))
        }
        throw ConcordError(.internal, "\(what) did not finish within \(timeout)")
    }

}

/// Plain SQL for the PostgreSQL benchmark: statements and single values as text.
final class PostgresAdmin: Sendable {
    let url: String
    let connection: PostgresConnection
    let logger: Logger

    init(url: String, connection: PostgresConnection, logger: Logger) {
        self.url = url
        self.connection = connection
        self.logger = logger
    }

    /// Closes the connection of an admin dropped on an error path (PostgresNIO requires a close).
    deinit {
        let connection = self.connection
        if !connection.isClosed { connection.close().whenComplete { _ in _ = connection } }
    }

    static func connect(_ url: String, logger: Logger) async throws -> PostgresAdmin {
        let configuration = try PostgresSource.configuration(url: url)
        return PostgresAdmin(
            url: url,
            connection: try await PostgresConnection.connect(configuration: configuration, id: 1, logger: logger),
            logger: logger)
    }

    static func url(_ url: String, database: String) -> String {
        var components = URLComponents(string: url)!
        components.path = "/" + database
        return components.string!
    }

    func run(_ sql: String) async throws {
        _ = try await connection.query(PostgresQuery(unsafeSQL: sql), logger: logger).collect()
    }

    func texts(_ sql: String) async throws -> [[String?]] {
        try await connection.query(PostgresQuery(unsafeSQL: sql), logger: logger).collect().map { row in
            try row.map { cell in try cell.decode(String?.self) }
        }
    }

    /// The first column of the first row, a boolean; false when there is no row or it is NULL.
    func flag(_ sql: String) async throws -> Bool {
        try await connection.query(PostgresQuery(unsafeSQL: sql), logger: logger).collect().first?
            .decode(Bool?.self) ?? false
    }

    /// The server's clock, to tell the backends opened from now on from those before.
    func serverTime() async throws -> String {
        guard let now = try await texts("SELECT now()::text").first?.first ?? nil else {
            throw ConcordError(.internal, "the replica server did not say its time")
        }
        return now
    }

    /// CPU time used so far by the backends of this connection's database opened at or after
    /// `since` (``serverTime()``), this connection's own left out. Read from /proc: the server
    /// must run on this machine; a backend that has ended is not counted.
    func backendCPU(openedSince since: String) async throws -> Double {
        let pids = try await texts(
            """
            SELECT pid::text FROM pg_stat_activity
            WHERE datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid()
                AND backend_start >= '\(since)'::timestamptz
            """)
        return pids.compactMap { $0.first ?? nil }.compactMap { pid_t($0) }.reduce(0.0) {
            $0 + ProcessCPU.seconds(of: $1)
        }
    }

    func tableExists(_ name: String) async throws -> Bool {
        try await flag("SELECT to_regclass('\(name)') IS NOT NULL")
    }

    /// Drops `dropping` (the benchmark's subscription and slots first), then creates `creating`.
    func resetDatabases(dropping: [String], creating: [String]) async throws {
        if try await flag("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'concord_bench_pg')") {
            let target = try await Self.connect(Self.url(url, database: "concord_bench_pg"), logger: logger)
            if try await target.flag("SELECT EXISTS (SELECT 1 FROM pg_subscription WHERE subname = 'concord_bench')") {
                try await target.run("ALTER SUBSCRIPTION concord_bench DISABLE")
                try await target.run("ALTER SUBSCRIPTION concord_bench SET (slot_name = NONE)")
                try await target.run("DROP SUBSCRIPTION concord_bench")
            }
            await target.close()
        }
        // A disabled subscription's sender takes a moment to let go of its slot.
        try await Bench.poll("the benchmark's replication slots are released", timeout: .seconds(30)) {
            try await run(
                """
                SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                WHERE slot_name LIKE 'concord_bench%' AND NOT active
                """)
            return try await !flag(
                "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name LIKE 'concord_bench%')")
        }
        for name in dropping { try await run("DROP DATABASE IF EXISTS \(name) WITH (FORCE)") }
        for name in creating { try await run("CREATE DATABASE \(name)") }
    }

    func close() async {
        try? await connection.close()
    }
}
