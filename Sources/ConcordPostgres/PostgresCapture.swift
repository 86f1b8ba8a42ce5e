import ConcordCore
import ConcordSQLite
import Foundation
import Logging
import PostgresNIO
import ServiceLifecycle
import Synchronization

/// Captures the changes of PostgreSQL tables into a publisher's log, the way a CDC tool does,
/// without the owning service changing a line.
///
/// A logical replication slot with wal2json holds every change from the moment it is created.
/// The existing rows are copied in one repeatable-read transaction (no table lock), then the
/// slot's changes are applied from its start: those already in the copy converge, as each is
/// a whole row or a delete applied in commit order. Each PostgreSQL transaction becomes one
/// Concord transaction, written together with its commit LSN; the slot is advanced only after
/// that, so a crash of either side repeats transactions, which are then skipped, and never
/// loses one. A dropped slot is created again, with a new copy whose pass also deletes the
/// records that vanished meanwhile.
public final class PostgresCapture: Service, Sendable {
    public struct Configuration: Sendable {
        /// `postgres://user[:password]@host[:port]/database`.
        public var url: String
        /// `schema.table` or `table` (schema `public`); each becomes the collection named after the table.
        public var tables: [String]
        /// The replication slot's name: lowercase letters, digits and underscores.
        public var slot = "concord"
        /// Changes read ahead of the log's writer at most; past them the reading waits (a
        /// larger transaction is still taken whole).
        public var maxQueuedChanges = 50_000
        /// Records written per Concord transaction during the initial copy. Each transaction
        /// writes every index page it touches in full, and the key-hash index takes new keys in
        /// random order: at 50,000 rows a transaction a million-row copy took 15 s, at 5,000 23 s.
        /// Two batches are held at a time, one filling while the other is written: about 36 MB
        /// of 225-byte rows.
        public var copyBatch = 50_000
        /// A source transaction with more changes than this goes into the log in pieces of about
        /// this many, each written while the next is read, in one SQLite transaction that commits
        /// with the source's: readers still see it whole, and the publisher never holds it whole.
        public var transactionPiece = 10_000
        /// How often, while streaming, the captured tables' definitions (OID, columns, their
        /// types and modifiers, the primary key) are compared with those the records were copied under. Logical
        /// decoding carries no DDL: rows an `ALTER TABLE` filled or emptied send no change.
        public var tableCheckInterval: Duration = .seconds(30)
        public var backoffMaximum: Duration = .seconds(5)

        public init(url: String, tables: [String]) {
            self.url = url
            self.tables = tables
        }
    }

    /// A captured table.
    struct Table: Sendable {
        var schema: String
        var name: String
        var collection: String
        var keyColumns: [String]
        var columns: [(name: String, typeOID: UInt32)]
        /// The table's own OID: a table swapped in under the name (a new one renamed) differs.
        var oid: Int64 = 0
        /// Each column's type modifier (a numeric's scale, say), which changes values' text too.
        var typeModifiers: [Int] = []

        /// The table's name, OID, primary key, columns, and their types and modifiers, as one line.
        var definition: String {
            let described = columns.enumerated().map { index, column in
                let modifier = index < typeModifiers.count ? typeModifiers[index] : -1
                return modifier == -1
                    ? "\(column.name) \(column.typeOID)" : "\(column.name) \(column.typeOID)(\(modifier))"
            }
            return "\(schema).\(name) oid \(oid) key (\(keyColumns.joined(separator: ", "))) columns ("
                + described.joined(separator: ", ") + ")"
        }

        /// The definitions of `tables`, one a line: what the records were copied under.
        static func definitions(_ tables: [Table]) -> String {
            tables.map(\.definition).joined(separator: "\n")
        }
    }

    /// A captured table's definition is no longer the one its records were copied under.
    struct TableDefinitionsChanged: Error, CustomStringConvertible {
        var before: String
        var now: String

        var description: String {
            let old = Set(before.split(separator: "\n"))
            let changed = now.split(separator: "\n").filter { !old.contains($0) }
            return "the definition of a captured table changed; now: \(changed.joined(separator: "; "))"
        }
    }

    enum Marker {
        static let phase = "postgres.phase"
        static let lsn = "postgres.lsn"
        /// ``Table/definitions(_:)`` of the tables the records were last copied from.
        static let definitions = "postgres.definitions"
    }

    public let configuration: Configuration
    let store: PublisherStore
    let logger: Logger
    private let streaming = Atomic<Bool>(false)

    /// True while the tables are copied and the slot is being followed: the records are the
    /// source's, up to the last poll. The publisher's readiness check reports it.
    public var isStreaming: Bool { streaming.load(ordering: .relaxed) }

    public init(configuration: Configuration, store: PublisherStore, logger: Logger) {
        self.configuration = configuration
        self.store = store
        self.logger = logger
    }

    public func run() async throws {
        try Self.validate(slot: configuration.slot)
        var delay = Duration.milliseconds(100)
        var slotBusySince: ContinuousClock.Instant?
        while !(Task.isCancelled || Task.isShuttingDownGracefully) {
            let started = ContinuousClock.now
            defer {
                // A session that ran a while ended a streak of failures.
                if ContinuousClock.now - started > .seconds(30) {
                    delay = .milliseconds(100)
                    slotBusySince = nil
                }
            }
            do {
                try await cancelWhenGracefulShutdown { try await self.session() }
                if Task.isCancelled || Task.isShuttingDownGracefully { return }
            } catch let error as CancellationError {
                // Only a shutdown ends the capture; a query cancelled under it is retried.
                if Task.isCancelled || Task.isShuttingDownGracefully { return }
                logger.warning("PostgreSQL query cancelled, retrying", metadata: ["error": "\(error)"])
            } catch is TableDefinitionsChanged {
                // The next session copies the tables again under their new definitions, and
                // says so in the log.
                continue
            } catch let error as ConcordError where error.code == .invalidConfiguration {
                logger.error("capture stopped: \(error.message)")
                throw error
            } catch let error as CaptureError where error.sqlState == "55006" {
                // A slot stays active for a moment after its last user died (kill -9); another
                // live capture keeps it active.
                let since = slotBusySince ?? .now
                slotBusySince = since
                if ContinuousClock.now - since > .seconds(15) {
                    throw ConcordError(
                        .invalidConfiguration,
                        "replication slot \(configuration.slot) is in use by another process (\(error.message)); "
                            + "another concord serve may capture this database: stop it, or give this one "
                            + "another --slot")
                }
            } catch let error as ConcordError
                where [.tooLarge, .invalidRequest, .protocolViolation].contains(error.code)
            {
                // A change that no longer fits its table's definition (a renamed key column, say)
                // is put right by copying the tables again under the new one.
                if await definitionsChanged() {
                    logger.warning(
                        "a captured change does not fit its table's definition, which changed: \(error.message)")
                    continue
                }
                // The same transaction would fail again on every retry while the slot holds the WAL.
                throw ConcordError(
                    .invalidConfiguration, "a captured change cannot be stored (\(error.code)): \(error.message)")
            } catch let error as CaptureError
                where Self.fatalStates.contains(error.sqlState) && !Self.isSlotInvalidated(error)
            {
                throw ConcordError(.invalidConfiguration, Self.advice(for: error))
            } catch {
                if Task.isCancelled || Task.isShuttingDownGracefully { return }
                logger.warning(
                    "PostgreSQL capture interrupted, retrying", metadata: ["error": "\(error)", "in": "\(delay)"])
            }
            try? await Task.sleep(for: delay)
            delay = min(delay * 2, configuration.backoffMaximum)
        }
    }

    /// SQLSTATEs that retrying cannot fix.
    static let fatalStates: Set<String> = ["55000", "42501", "58P01", "42P01", "3D000", "28000", "28P01"]

    /// PostgreSQL removed WAL the slot still needed (`max_slot_wal_keep_size`): the next session
    /// finds the slot lost, drops it and copies again, as after a dropped slot.
    static func isSlotInvalidated(_ error: CaptureError) -> Bool {
        error.sqlState == "55000" && error.message.contains("can no longer get changes")
    }

    static func advice(for error: CaptureError) -> String {
        switch error.sqlState {
        case "55000" where error.message.contains("wal_level"):
            return "PostgreSQL's wal_level is not logical (\(error.message)): set wal_level = logical "
                + "(ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL"
        case "42501":
            return "the role lacks a privilege (\(error.message)): it needs REPLICATION (ALTER ROLE name "
                + "WITH REPLICATION) and SELECT on every captured table"
        case "28000" where error.message.contains("replication"):
            return "PostgreSQL refuses the role a replication connection (\(error.message)): allow it in "
                + "pg_hba.conf with a line like `host replication ROLE ADDRESS scram-sha-256`, then reload"
        case "58P01":
            return "the wal2json output plugin is missing (\(error.message)): install it "
                + "(apt-get install postgresql-15-wal2json)"
        default:
            return error.message
        }
    }

    static func validate(slot: String) throws {
        guard !slot.isEmpty, slot.count <= 63,
            slot.utf8.allSatisfy({ (0x61...0x7A).contains($0) || (0x30...0x39).contains($0) || $0 == 0x5F })
        else {
            throw ConcordError(
                .invalidConfiguration, "--slot must be 1 to 63 lowercase letters, digits and underscores")
        }
    }

    // MARK: A session

    func session() async throws {
        logger.debug("connecting to PostgreSQL", metadata: ["url": "\(PostgresSource.redacted(configuration.url))"])
        let source = try await PostgresSource.connect(url: configuration.url, logger: logger)
        do {
            let tables = try await prepare(source)
            try await dropSlotIfTablesChanged(tables, source: source)
            let slotExists = try await ensureSlot(source)
            let phase = try store.marker(Marker.phase)
            if !slotExists || phase != "streaming" {
                try await copy(tables)
            } else if try store.marker(Marker.definitions) == nil {
                // Records copied before definitions were kept: taken as copied under these.
                logger.info(
                    """
                    keeping the captured tables' definitions from now on; a table altered before \
                    this start is not noticed (drop the slot to copy the tables again)
                    """)
                try await store.write([], marker: (Marker.definitions, Table.definitions(tables)))
            }
            // The replication connection is a session of its own.
            await source.close()
            streaming.store(true, ordering: .relaxed)
            try await stream(tables: tables)
        } catch {
            streaming.store(false, ordering: .relaxed)
            await source.close()
            throw error
        }
        streaming.store(false, ordering: .relaxed)
        await source.close()
    }

    /// Checks what capture needs, with a message that says what to do when something is missing.
    func prepare(_ source: PostgresSource) async throws -> [Table] {
        let level = try await source.rows("SHOW wal_level").first?.decode(String.self) ?? ""
        guard level == "logical" else {
            throw ConcordError(
                .invalidConfiguration,
                "PostgreSQL's wal_level is \(level); logical decoding needs wal_level = logical: run "
                    + "ALTER SYSTEM SET wal_level = logical and restart PostgreSQL")
        }
        let user = try await source.rows(
            "SELECT current_user::text, rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user")
        if let row = user.first {
            let (name, allowed) = try row.decode((String, Bool).self)
            guard allowed else {
                throw ConcordError(
                    .invalidConfiguration,
                    "role \(name) may not use replication slots: ALTER ROLE \(name) WITH REPLICATION")
            }
        }
        var tables: [Table] = []
        for entry in configuration.tables {
            let parts = entry.split(separator: ".", maxSplits: 1).map(String.init)
            let (schema, name) = parts.count == 2 ? (parts[0], parts[1]) : ("public", parts[0])
            let found = try await source.rows(
                """
                SELECT c.oid::int8, has_table_privilege(c.oid, 'SELECT'), c.relreplident::text, c.relkind::text
                FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = \(schema) AND c.relname = \(name) AND c.relkind IN ('r', 'p')
                """)
            guard let row = found.first else {
                throw ConcordError(.invalidConfiguration, "no table \(schema).\(name) in the database")
            }
            let (oid, readable, identity, kind) = try row.decode((Int64, Bool, String, String).self)
            guard kind == "r" else {
                throw ConcordError(
                    .invalidConfiguration,
                    "\(schema).\(name) is partitioned: its changes are decoded under the partitions' names; "
                        + "capture the partitions instead")
            }
            // Without the old key, updates and deletes do not reach the slot at all.
            guard identity == "d" || identity == "f" else {
                throw ConcordError(
                    .invalidConfiguration,
                    "\(schema).\(name) has REPLICA IDENTITY \(identity == "n" ? "NOTHING" : "USING INDEX"): its "
                        + "updates and deletes would not carry the primary key: ALTER TABLE \(schema).\(name) "
                        + "REPLICA IDENTITY DEFAULT")
            }
            guard readable else {
                throw ConcordError(
                    .invalidConfiguration, "the role may not read \(schema).\(name): GRANT SELECT ON it")
            }
            let keyColumns = try await source.rows(
                """
                SELECT a.attname::text FROM pg_constraint c
                CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord)
                JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
                WHERE c.contype = 'p' AND c.conrelid = \(oid)::oid ORDER BY k.ord
                """
            ).map { try $0.decode(String.self) }
            guard !keyColumns.isEmpty else {
                throw ConcordError(
                    .invalidConfiguration,
                    "table \(schema).\(name) has no primary key, and Concord keys records by it: "
                        + "ALTER TABLE \(schema).\(name) ADD PRIMARY KEY (...)")
            }
            let described = try await source.rows(
                """
                SELECT attname::text, atttypid::int8, atttypmod::int8 FROM pg_attribute
                WHERE attrelid = \(oid)::oid AND attnum > 0 AND NOT attisdropped ORDER BY attnum
                """
            ).map { row in try row.decode((String, Int64, Int64).self) }
            let columns = described.map { (name: $0.0, typeOID: UInt32(truncatingIfNeeded: $0.1)) }
            do {
                try CollectionName.validate(name)
            } catch {
                throw ConcordError(.invalidConfiguration, "table \(name) cannot name a collection: \(error)")
            }
            guard !tables.contains(where: { $0.name == name }) else {
                throw ConcordError(.invalidConfiguration, "two captured tables are named \(name)")
            }
            tables.append(
                Table(
                    schema: schema, name: name, collection: name, keyColumns: keyColumns, columns: columns,
                    oid: oid, typeModifiers: described.map { Int($0.2) }))
        }
        return tables
    }

    /// Whether the tables' definitions in the catalog differ from those the records were copied
    /// under; false when they cannot be read.
    func definitionsChanged() async -> Bool {
        guard let before = try? store.marker(Marker.definitions), let now = try? await catalogDefinitions() else {
            return false
        }
        return now != before
    }

    /// The captured tables' definitions as the catalog has them now, read on a connection of
    /// its own (``prepare(_:)``'s checks included).
    func catalogDefinitions() async throws -> String {
        let source = try await PostgresSource.connect(url: configuration.url, logger: logger)
        do {
            let tables = try await prepare(source)
            await source.close()
            return Table.definitions(tables)
        } catch {
            await source.close()
            throw error
        }
    }

    /// When a captured table's definition differs from the one its records were copied under,
    /// drops the slot, so that the tables are copied again from a new one.
    ///
    /// Rows an `ALTER TABLE` filled (a column added with a default) or emptied (a column
    /// dropped) send no change, and changes the old slot still holds from before the change
    /// would bring the old columns back over the copy: a slot made now holds only later ones.
    func dropSlotIfTablesChanged(_ tables: [Table], source: PostgresSource) async throws {
        let now = Table.definitions(tables)
        guard let before = try store.marker(Marker.definitions), before != now else { return }
        // A stop from here on copies again at the next start, with or without the slot.
        try await store.write([], marker: (Marker.phase, "copying"))
        // Only this capture's slot (``ensureSlot(_:)`` refuses one of another database or plugin),
        // once the connection that streamed from it has let go of it (a moment after it closed).
        let slot = configuration.slot
        for _ in 0..<50 {
            let active = try await source.rows(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = \(slot) AND active")
            if active.isEmpty { break }
            try await Task.sleep(for: .milliseconds(100))
        }
        _ = try await source.rows(
            """
            SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
            WHERE slot_name = \(slot) AND database = current_database() AND plugin = 'wal2json'
            """)
        logger.warning(
            "\(TableDefinitionsChanged(before: before, now: now)); creating the replication slot again and copying the tables"
        )
    }

    /// Creates the slot when it does not exist; returns whether it existed.
    func ensureSlot(_ source: PostgresSource) async throws -> Bool {
        let slot = configuration.slot
        // Slot names are unique in the whole server, not per database.
        let existing = try await source.rows(
            """
            SELECT plugin::text, database::text, current_database()::text, wal_status::text
            FROM pg_replication_slots WHERE slot_name = \(slot)
            """)
        if let row = existing.first {
            let (plugin, database, current, walStatus) = try row.decode((String?, String?, String, String?).self)
            guard database == current else {
                throw ConcordError(
                    .invalidConfiguration,
                    "the replication slot \(slot) belongs to database \(database ?? "none"); slot names are shared "
                        + "by the whole server: give this capture another --slot")
            }
            guard plugin == "wal2json" else {
                throw ConcordError(
                    .invalidConfiguration,
                    "slot \(slot) uses the plugin \(plugin ?? "none"), not wal2json: give another --slot")
            }
            guard walStatus == "lost" else { return true }
            // The capture was away longer than the server keeps WAL for a slot: the changes
            // since are gone from it, so it is made again and the tables copied again, which
            // also deletes the records that vanished meanwhile.
            logger.warning(
                """
                replication slot \(slot) was invalidated (PostgreSQL removed WAL it needed, \
                max_slot_wal_keep_size); creating it again and copying the tables
                """)
            _ = try await source.rows("SELECT pg_drop_replication_slot(\(slot))")
        }
        // Everything committed from here on is kept by the slot; the copy that follows starts later.
        try await store.write([], marker: (Marker.phase, "copying"))
        _ = try await source.rows("SELECT lsn::text FROM pg_create_logical_replication_slot(\(slot), 'wal2json')")
        logger.info("replication slot created", metadata: ["slot": "\(slot)"])
        return false
    }

    // MARK: The initial copy

    /// Copies every table's rows in one repeatable-read transaction, skipping records that are
    /// already equal, and deletes the records the copy no longer holds.
    func copy(_ tables: [Table]) async throws {
        // The phase is already "copying" (written before the slot was made, or when it vanished),
        // or unset for a slot made elsewhere: either way a copy cut short runs again.
        logger.info("copying the tables", metadata: ["tables": "\(tables.map(\.name).joined(separator: ","))"])
        // A first copy fills empty collections: the key-hash index is built once at the end.
        let counts = Dictionary(
            try await store.feedInfo().collections.map { ($0.name, $0.count) }, uniquingKeysWith: { first, _ in first })
        if tables.allSatisfy({ (counts[$0.collection] ?? 0) == 0 }) {
            try await store.dropKeyHashIndex()
        }
        let source = try await PostgresSource.connect(url: configuration.url, logger: logger)
        do {
            try await source.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            for table in tables {
                try await copy(table, from: source)
            }
            try await source.execute("COMMIT")
        } catch {
            await source.close()
            throw error
        }
        await source.close()
        try await store.buildKeyHashIndex()
        // The slot's changes are replayed from its start: the copy may already hold some.
        try await store.write([], marker: (Marker.lsn, "0/0"))
        try await store.write([], marker: (Marker.definitions, Table.definitions(tables)))
        try await store.write([], marker: (Marker.phase, "streaming"))
    }

    func copy(_ table: Table, from source: PostgresSource) async throws {
        let started = ContinuousClock.now
        let existing = Set(try await store.keys(of: table.collection))
        let select = table.columns.map { column in
            column.typeOID == PostgresDecoding.byteaType
                ? "encode(\(PostgresSource.quote(column.name)), 'hex')" : "\(PostgresSource.quote(column.name))::text"
        }.joined(separator: ", ")
        let order = table.keyColumns.map(PostgresSource.quote).joined(separator: ", ")
        let sql =
            "SELECT \(select) FROM \(PostgresSource.quote(table.schema)).\(PostgresSource.quote(table.name)) ORDER BY \(order)"
        var seen = Set<String>()
        var rowCount = 0
        var batch: [WriteOperation] = []
        var writing: Task<Void, any Error>?
        var copied = 0
        // Into an empty collection every key is new: none is looked up.
        let store = self.store
        let fresh = existing.isEmpty
        let writeBatch: @Sendable ([WriteOperation]) async throws -> Void = { operations in
            _ = try await fresh ? store.insertNew(operations) : store.write(operations)
        }
        // Read through a cursor: rows are written to the log between two fetches.
        do {
            try await source.forEachPage(of: sql, cursor: "concord_copy", pageSize: 5000) { rows in
                var page: [(key: String, value: String)] = []
                page.reserveCapacity(rows.count)
                for row in rows {
                    let cells = row.makeRandomAccess()
                    var columns: [PostgresDecoding.Column] = []
                    columns.reserveCapacity(table.columns.count)
                    for (index, column) in table.columns.enumerated() {
                        let text = try cells[index].decode(String?.self)
                        columns.append(
                            PostgresDecoding.Column(
                                name: column.name, json: PostgresDecoding.json(text: text, typeOID: column.typeOID)))
                    }
                    // Built here from column values PostgresDecoding.json made: JSON already.
                    page.append(
                        (
                            try PostgresDecoding.key(columns, keyColumns: table.keyColumns),
                            PostgresDecoding.value(columns)
                        ))
                }
                rowCount += page.count
                // Only a collection that already held records can have some to delete, or some
                // equal already: the records held are looked up a page at a time.
                var stored = [String?](repeating: nil, count: page.count)
                if !existing.isEmpty {
                    for (key, _) in page { seen.insert(key) }
                    let held = page.indices.filter { existing.contains(page[$0].key) }
                    if !held.isEmpty {
                        let values = try await store.values(of: table.collection, keys: held.map { page[$0].key })
                        for (index, value) in zip(held, values) { stored[index] = value }
                    }
                }
                for (index, (key, value)) in page.enumerated() {
                    if stored[index] == value { continue }
                    batch.append(.upsert(table.collection, key, checkedJSON: value))
                    if batch.count >= configuration.copyBatch {
                        // Written while the next rows are fetched and encoded.
                        try await writing?.value
                        let full = batch
                        writing = Task { try await writeBatch(full) }
                        copied += batch.count
                        batch.removeAll(keepingCapacity: true)
                    }
                }
            }
        } catch {
            // A batch still being written when the copy fails finishes before the error goes up.
            _ = try? await writing?.value
            throw error
        }
        try await writing?.value
        // Records the copy no longer holds were deleted while no slot kept their deletes.
        batch += existing.subtracting(seen).sorted().map { .delete(table.collection, $0) }
        for start in stride(from: 0, to: batch.count, by: configuration.copyBatch) {
            try await writeBatch(Array(batch[start..<min(batch.count, start + configuration.copyBatch)]))
        }
        copied += batch.count
        logger.info(
            "table copied",
            metadata: [
                "table": "\(table.schema).\(table.name)", "rows": "\(rowCount)", "written": "\(copied)",
                "seconds": "\((ContinuousClock.now - started).components.seconds)",
            ])
    }

    // MARK: Streaming

    /// Follows the slot over a replication connection. One task reads the decoded changes and
    /// builds each source transaction's operations; another writes every transaction queued
    /// since its last write in one SQLite transaction, then tells the server how far the log
    /// holds them, so the slot lets go of nothing that is not durable. The server decodes while
    /// the log is written, and a service's stream of small transactions costs one commit per
    /// write rather than one each.
    func stream(tables: [Table]) async throws {
        let byName = Dictionary(tables.map { ("\($0.schema).\($0.name)", $0) }, uniquingKeysWith: { first, _ in first })
        let addTables = tables.map { Self.escapeForWal2JSON($0.schema) + "." + Self.escapeForWal2JSON($0.name) }
            .joined(separator: ",")
        let applied = PostgresDecoding.lsn(try store.marker(Marker.lsn) ?? "0/0") ?? 0
        let slot = configuration.slot
        let options = [
            ("format-version", "2"), ("include-lsn", "1"), ("include-transaction", "1"), ("include-types", "0"),
            ("add-tables", addTables),
        ]
        logger.info(
            "capturing changes", metadata: ["slot": "\(slot)", "after": "\(PostgresDecoding.lsnText(applied))"])
        let queue = CapturedTransactions(limit: configuration.maxQueuedChanges)
        let builder = TransactionBuilder(store: store, tables: byName)
        let piece = configuration.transactionPiece
        let store = self.store
        let logger = self.logger
        do {
            try await ReplicationConnection.stream(url: configuration.url, slot: slot, options: options, logger: logger)
            { stream in
                try await withThrowingTaskGroup(of: Void.self) { group in
                    group.addTask {
                        try await Self.read(
                            stream.messages, with: builder, into: queue, after: applied, piece: piece, logger: logger)
                    }
                    group.addTask {
                        try await Self.write(
                            queue, to: store, confirmingOn: stream, after: applied, logger: logger)
                    }
                    group.addTask { try await self.watchDefinitions(of: tables) }
                    // None ends but by an error or a cancellation, which ends the others too.
                    try await group.next()
                    group.cancelAll()
                }
            }
        } catch let error as CaptureError where error.sqlState == "42704" {
            // The slot was dropped: the changes since are lost to it, so copy again.
            logger.warning("replication slot \(slot) is gone; creating it again and copying the tables")
            try await store.write([], marker: (Marker.phase, "copying"))
            throw error
        }
    }

    /// Compares the tables' definitions with `tables` every `tableCheckInterval`, on a connection
    /// of its own; throws ``TableDefinitionsChanged`` when one differs. A failed check (the
    /// server restarting, say) is tried again at the next.
    func watchDefinitions(of tables: [Table]) async throws {
        let expected = Table.definitions(tables)
        while true {
            try await Task.sleep(for: configuration.tableCheckInterval)
            let now: String
            do {
                now = try await catalogDefinitions()
            } catch let error as ConcordError where error.code == .invalidConfiguration {
                // A migration's passing state (a table renamed away, a key dropped before it is
                // added again) must not stop the capture: the next check, or the next start,
                // tells.
                logger.warning("the captured tables cannot be checked: \(error.message)")
                continue
            } catch {
                if Task.isCancelled { throw CancellationError() }
                logger.debug("checking the tables' definitions failed", metadata: ["error": "\(error)"])
                continue
            }
            if now != expected { throw TableDefinitionsChanged(before: expected, now: now) }
        }
    }

    /// Turns the streamed wal2json lines into transactions and queues those past `applied`; a
    /// transaction of more than `piece` changes is handed over in pieces while it is read.
    static func read(
        _ messages: ReplicationConnection.Messages, with builder: TransactionBuilder, into queue: CapturedTransactions,
        after applied: UInt64, piece: Int, logger: Logger
    ) async throws {
        var builder = builder
        var inTransaction = false
        var lastCommit = applied
        var lastMovedOn = ContinuousClock.now - .seconds(1)
        // Where the transaction being read commits, when wal2json said so at its start.
        var commitAhead: UInt64?
        // Whether the transaction being read is one the log holds, sent again after a crash.
        var replayed = false
        var pieces: TransactionPieces?
        do {
            for try await message in messages {
                queue.heard()
                switch message {
                case .data(let line):
                    let record = try PostgresDecoding.record(String(buffer: line))
                    switch record {
                    case .begin(let commit):
                        builder.begin()
                        inTransaction = true
                        commitAhead = commit
                        replayed = false
                    case .commit(let lsn):
                        inTransaction = false
                        let operations = builder.commit()
                        if let open = pieces {
                            try await open.add(operations)
                            try open.end(marker: (Marker.lsn, PostgresDecoding.lsnText(lsn)))
                            pieces = nil
                        } else if lsn > applied {
                            // Transactions the log already holds come again after a crash: skipped.
                            try await queue.push(operations, commit: lsn, number: builder.committed)
                        }
                        lastCommit = max(lastCommit, lsn)
                        builder.forget(through: queue.durableNumber)
                    case .other:
                        break
                    default:
                        try await builder.add(record)
                        // Only a transaction known to come after the log's position goes in pieces:
                        // one the log holds already is read past, one of unknown position held whole.
                        guard builder.operations.count >= piece, let commit = commitAhead else { break }
                        if commit <= applied {
                            if !replayed {
                                logger.info(
                                    "a large source transaction the log holds already is sent again; read past",
                                    metadata: ["commit": "\(PostgresDecoding.lsnText(commit))"])
                                replayed = true
                            }
                            builder.dropOperations()
                        } else {
                            if pieces == nil {
                                let open = TransactionPieces(limit: queue.limit)
                                try await queue.push(open, number: builder.committed + 1)
                                builder.pieces = open
                                pieces = open
                            }
                            try await pieces!.add(builder.handOverOperations())
                        }
                    }
                case .keepalive(let walEnd, let replyRequested):
                    // Everything that committed up to walEnd has been sent, and a transaction still
                    // open there commits after it: a quiet database, whose slot would otherwise keep
                    // the whole server's WAL while other databases write, moves its position on (at
                    // most once a second: each move is a write of the log's marker).
                    if !inTransaction, walEnd > lastCommit, ContinuousClock.now - lastMovedOn >= .seconds(1) {
                        try await queue.push([], commit: walEnd, number: builder.committed)
                        lastCommit = walEnd
                        lastMovedOn = .now
                    }
                    if replyRequested { queue.requestReply() }
                }
            }
            throw ConcordError(.unavailable, "the replication stream ended")
        } catch {
            // The pieces written so far are rolled back; the slot sends the transaction again.
            pieces?.abort(error)
            throw error
        }
    }

    /// Writes what is queued to the log, then confirms it to the server; answers keepalives.
    static func write(
        _ queue: CapturedTransactions, to store: PublisherStore, confirmingOn stream: ReplicationConnection.Stream,
        after applied: UInt64, logger: Logger
    ) async throws {
        var durable = applied
        var status = StatusUpdates()
        // A transaction in pieces this writer will not write is given up, or its reader waits on.
        var taken: TransactionPieces?
        defer { taken?.abort(ConcordError(.unavailable, "the log's writer stopped")) }
        defer { queue.abandonPieces() }
        do {
            while true {
                try Task.checkCancellation()
                let batch = queue.takeAll()
                taken = batch.pieces
                if let commit = batch.lastCommit {
                    try await store.write(
                        transactions: batch.transactions, marker: (Marker.lsn, PostgresDecoding.lsnText(commit)))
                    queue.markDurable(through: batch.lastNumber)
                    durable = commit
                    // The reader may have waited on this write, not on the server.
                    queue.heard()
                }
                if let pieces = batch.pieces {
                    logger.info("a large source transaction goes into the log in pieces while it is read")
                    try await write(pieces, to: store, answering: queue, on: stream, durable: durable)
                    queue.markDurable(through: batch.piecesNumber)
                    durable = PostgresDecoding.lsn(try store.marker(Marker.lsn) ?? "") ?? durable
                    queue.heard()
                }
                try await status.send(
                    when: batch.lastCommit != nil || batch.pieces != nil || batch.replyRequested, durable: durable,
                    on: stream)
                if ContinuousClock.now - queue.lastHeard > .seconds(60) {
                    throw ConcordError(.unavailable, "PostgreSQL sent nothing on the replication connection for 60 s")
                }
                // At least once a second, for the silence check above.
                if batch.lastCommit == nil && batch.pieces == nil { await queue.waitForWork(timeout: .seconds(1)) }
            }
        } catch {
            await confirmOnLeaving(store: store, durable: durable, on: stream)
            throw error
        }
    }

    /// A stop right after a write would leave the slot behind the log, and the server would
    /// decode and send those transactions again at the next start: the position the log holds
    /// goes out on the way (within a second, and only if the connection still takes it).
    static func confirmOnLeaving(store: PublisherStore, durable: UInt64, on stream: ReplicationConnection.Stream)
        async
    {
        // The marker commits with the changes: it may be past what the loop had confirmed.
        let logged = (try? store.marker(Marker.lsn)).flatMap { $0.flatMap(PostgresDecoding.lsn) } ?? durable
        // A task of its own: the writer's is cancelled, and a cancelled task cannot write.
        let confirming = Task { try await stream.confirm(flushed: max(logged, durable)) }
        let deadline = Task {
            try await Task.sleep(for: .seconds(1))
            confirming.cancel()
        }
        _ = try? await confirming.value
        deadline.cancel()
    }

    /// Writes a transaction handed over in pieces, however long the reading takes, answering
    /// the server meanwhile: it drops a client that stays silent for `wal_sender_timeout`.
    static func write(
        _ pieces: TransactionPieces, to store: PublisherStore, answering queue: CapturedTransactions,
        on stream: ReplicationConnection.Stream, durable: UInt64
    ) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                try await withTaskCancellationHandler {
                    _ = try await store.write(pieces)
                } onCancel: {
                    pieces.abort(CancellationError())
                }
            }
            group.addTask {
                var status = StatusUpdates()
                while true {
                    try await Task.sleep(for: .milliseconds(200))
                    try await status.send(when: queue.takeReplyRequest(), durable: durable, on: stream)
                }
            }
            do {
                try await group.next()
            } catch {
                // The reason goes to the reader before the cancellation would.
                pieces.abort(error)
                throw error
            }
            group.cancelAll()
        }
    }

    /// The writer's status updates to the server, which times out a client silent for
    /// `wal_sender_timeout` (a minute by default): sent when asked for, and every 10 s with a
    /// request for an answer, so a server gone silent is noticed.
    struct StatusUpdates {
        var last = ContinuousClock.now

        /// Tells the server that everything up to `durable` is durable, when `asked` or when the
        /// periodic update is due.
        mutating func send(when asked: Bool, durable: UInt64, on stream: ReplicationConnection.Stream)
            async throws
        {
            let periodic = ContinuousClock.now - last > .seconds(10)
            guard asked || periodic else { return }
            try await stream.confirm(flushed: durable, replyRequested: periodic)
            last = .now
        }
    }

    /// wal2json's `add-tables` takes `schema.table` with `,`, `.` and `*` escaped by a backslash.
    static func escapeForWal2JSON(_ name: String) -> String {
        var escaped = ""
        for character in name {
            if character == "," || character == "." || character == "*" || character == "\\" { escaped.append("\\") }
            escaped.append(character)
        }
        return escaped
    }
}

/// The Concord operations of PostgreSQL transactions, built change by change, one transaction
/// after another in commit order. Values written earlier, by the same transaction or by one
/// before it that is not in the store yet, are seen by later changes.
struct TransactionBuilder: Sendable {
    let store: PublisherStore
    let tables: [String: PostgresCapture.Table]
    /// The operations of the transaction being built.
    private(set) var operations: [WriteOperation] = []
    /// Transactions ended so far; the one being built has the next number.
    private(set) var committed = 0
    /// What a transaction not yet durable in the log did to a record.
    enum Written {
        case value(String)
        case deleted
        /// Written by a piece handed over: the value is in the store's open transaction.
        case handedOver
    }
    /// Records written since the builder was made, by collection and key, with the number of
    /// the transaction that wrote them.
    private var written: [String: [String: (state: Written, transaction: Int)]] = [:]
    /// The last transaction handed over in pieces, which answers for the records it wrote.
    var pieces: TransactionPieces?
    private var writtenCount = 0
    private var lastTable: (schema: String, name: String, table: PostgresCapture.Table?)?
    /// Forgetting scans every entry: only once they are twice as many as after the last time.
    private var forgetAt = 100_000

    init(store: PublisherStore, tables: [String: PostgresCapture.Table]) {
        self.store = store
        self.tables = tables
    }

    /// Starts the next transaction; what the previous ones wrote stays visible.
    mutating func begin() {
        operations.removeAll()
    }

    /// The operations built so far, handed over as a piece of the transaction: what they wrote
    /// is then looked up in ``pieces``, not held here.
    mutating func handOverOperations() -> [WriteOperation] {
        defer { operations = [] }
        let transaction = committed + 1
        for operation in operations {
            guard let entry = written[operation.collection]?[operation.key], entry.transaction == transaction,
                case .value = entry.state
            else { continue }
            written[operation.collection]![operation.key] = (.handedOver, transaction)
        }
        return operations
    }

    /// Drops the operations built so far, of a transaction the log already holds.
    mutating func dropOperations() {
        operations = []
    }

    /// Ends the transaction being built and returns its operations.
    mutating func commit() -> [WriteOperation] {
        committed += 1
        defer { operations = [] }
        return operations
    }

    /// Drops what transactions up to number `durable` wrote, now in the store, unless a later
    /// one wrote the same record again.
    mutating func forget(through durable: Int) {
        guard writtenCount >= forgetAt else { return }
        writtenCount = 0
        for collection in written.keys {
            written[collection] = written[collection]!.filter { $0.value.transaction > durable }
            writtenCount += written[collection]!.count
        }
        forgetAt = max(100_000, 2 * writtenCount)
    }

    mutating func add(_ record: PostgresDecoding.Record) async throws {
        switch record {
        case .insert(let schema, let name, let columns):
            guard let table = table(schema: schema, name: name) else { return }
            upsert(table, key: try PostgresDecoding.key(columns, keyColumns: table.keyColumns), columns: columns)
        case .update(let schema, let name, let columns, let identity):
            guard let table = table(schema: schema, name: name) else { return }
            let key = try PostgresDecoding.key(columns, keyColumns: table.keyColumns)
            let oldKey = identity.isEmpty ? key : try PostgresDecoding.key(identity, keyColumns: table.keyColumns)
            // Values stored out of line that the update left alone (wal2json leaves them out) come
            // from the row before it; after a copy the row may already sit under its new key.
            var full = columns
            if !Self.holdsEveryColumn(of: table, columns) {
                var previous = try await current(table, key: oldKey)
                if previous == nil { previous = try await current(table, key: key) }
                full = try PostgresDecoding.merged(columns, previous: previous)
            }
            if oldKey != key { delete(table, key: oldKey) }
            upsert(table, key: key, columns: full)
        case .delete(let schema, let name, let identity):
            guard let table = table(schema: schema, name: name) else { return }
            delete(table, key: try PostgresDecoding.key(identity, keyColumns: table.keyColumns))
        case .truncate(let schema, let name):
            guard let table = table(schema: schema, name: name) else { return }
            var keys = Set(try await store.keys(of: table.collection))
            for (key, entry) in written[table.collection] ?? [:] {
                if case .deleted = entry.state { keys.remove(key) } else { keys.insert(key) }
            }
            for key in keys.sorted() { delete(table, key: key) }
        case .begin, .commit, .other:
            break
        }
    }

    /// The captured table `schema.name`, or nil for one not captured. Changes come table by
    /// table: the last answer is kept, which saves building the name for each change.
    private mutating func table(schema: String, name: String) -> PostgresCapture.Table? {
        if let last = lastTable, last.schema == schema, last.name == name { return last.table }
        let table = tables["\(schema).\(name)"]
        lastTable = (schema, name, table)
        return table
    }

    /// Whether `columns` hold a value for every column of `table`. wal2json writes a full row
    /// in the table's column order: compared in order first, which costs no set per change.
    static func holdsEveryColumn(of table: PostgresCapture.Table, _ columns: [PostgresDecoding.Column]) -> Bool {
        if columns.count == table.columns.count
            && zip(columns, table.columns).allSatisfy({ $0.name == $1.name })
        {
            return true
        }
        let given = Set(columns.map(\.name))
        return table.columns.allSatisfy { given.contains($0.name) }
    }

    func current(_ table: PostgresCapture.Table, key: String) async throws -> String? {
        switch written[table.collection]?[key]?.state {
        case .value(let value): return value
        case .deleted: return nil
        case .handedOver:
            // Written by the last transaction handed over (one written later would be held
            // here): its open transaction, or the store once it committed, has it.
            guard let pieces else { throw ConcordError(.internal, "a record handed over without its transaction") }
            return try await pieces.value(of: table.collection, key: key, in: store)
        case nil: return try store.value(of: table.collection, key: key)
        }
    }

    mutating func remember(_ value: String?, of table: PostgresCapture.Table, key: String) {
        let state: Written = value.map { .value($0) } ?? .deleted
        if written[table.collection, default: [:]].updateValue((state, committed + 1), forKey: key) == nil {
            writtenCount += 1
        }
    }

    mutating func upsert(_ table: PostgresCapture.Table, key: String, columns: [PostgresDecoding.Column]) {
        let value = PostgresDecoding.value(columns)
        // Scalars as wal2json wrote them (after a parser read the whole line) or as stored
        // before hold no whitespace to compact: only a column holding an object or an array
        // (a json column) needs the store's parser.
        let isCompact = columns.allSatisfy { column in
            let first = column.json.utf8.first
            return first != UInt8(ascii: "{") && first != UInt8(ascii: "[")
        }
        operations.append(
            isCompact ? .upsert(table.collection, key, checkedJSON: value) : .upsert(table.collection, key, json: value)
        )
        remember(value, of: table, key: key)
    }

    mutating func delete(_ table: PostgresCapture.Table, key: String) {
        operations.append(.delete(table.collection, key))
        remember(nil, of: table, key: key)
    }
}

/// The transactions read from the replication stream and not yet in the log, handed from the
/// reading task to the writing one, which waits for them without polling: an idle capture
/// wakes once a second, and a transaction goes into the log as soon as it is queued.
final class CapturedTransactions: Sendable {
    struct Batch {
        var transactions: [[WriteOperation]] = []
        /// The commit position of the last transaction, `nil` when none was queued.
        var lastCommit: UInt64?
        /// Its number, as the reader counted transactions.
        var lastNumber = 0
        var replyRequested = false
        /// A transaction handed over in pieces, after those above, and its number.
        var pieces: TransactionPieces?
        var piecesNumber = 0
    }

    private struct State {
        var batch = Batch()
        var changes = 0
        var durableNumber = 0
        var lastHeard = ContinuousClock.now
        /// How many times work came for the writer, and how many of those its last
        /// ``takeAll()`` took.
        var rings: LSN = 0
        var taken: LSN = 0
    }

    let limit: Int
    private let state = Mutex(State())
    /// `rings` as it moves, for the writer to wait on.
    private let rang = HeadWatch(head: 0)

    init(limit: Int) {
        self.limit = limit
    }

    /// Queues a transaction, waiting first while `limit` changes already wait for the writer,
    /// or a transaction in pieces before it; a transaction is always taken whole.
    func push(_ operations: [WriteOperation], commit: UInt64, number: Int) async throws {
        while state.withLock({ $0.batch.pieces != nil || ($0.changes > 0 && $0.changes + operations.count > limit) }) {
            try await Task.sleep(for: .milliseconds(2))
        }
        state.withLock { state in
            state.batch.transactions.append(operations)
            state.batch.lastCommit = commit
            state.batch.lastNumber = number
            state.changes += operations.count
        }
        ring()
    }

    /// Queues a transaction that comes in pieces: the writer writes it after the transactions
    /// queued before it, taking the pieces as they come.
    func push(_ pieces: TransactionPieces, number: Int) async throws {
        while state.withLock({ $0.batch.pieces != nil }) {
            try await Task.sleep(for: .milliseconds(2))
        }
        state.withLock { state in
            state.batch.pieces = pieces
            state.batch.piecesNumber = number
        }
        ring()
    }

    /// Gives up a transaction in pieces the writer has not taken: it will take nothing more.
    func abandonPieces() {
        let pieces = state.withLock { $0.batch.pieces }
        pieces?.abort(ConcordError(.unavailable, "the log's writer stopped"))
    }

    /// When the server last sent anything.
    var lastHeard: ContinuousClock.Instant { state.withLock { $0.lastHeard } }

    func heard() {
        state.withLock { $0.lastHeard = .now }
    }

    func requestReply() {
        state.withLock { $0.batch.replyRequested = true }
        ring()
    }

    /// Wakes the writer, or makes its next wait return at once.
    private func ring() {
        let rings = state.withLock { state in
            state.rings += 1
            return state.rings
        }
        rang.advance(to: rings)
    }

    /// Waits until a transaction is queued or the server asks for a reply (since the last
    /// ``takeAll()``), `timeout` passes, or the task is cancelled.
    func waitForWork(timeout: Duration) async {
        _ = await rang.wait(beyond: state.withLock { $0.taken }, timeout: timeout)
    }

    /// Whether the server asked for an answer, which this takes.
    func takeReplyRequest() -> Bool {
        state.withLock { state in
            defer { state.batch.replyRequested = false }
            return state.batch.replyRequested
        }
    }

    /// Everything queued, leaving the queue empty.
    func takeAll() -> Batch {
        state.withLock { state in
            defer {
                state.batch = Batch()
                state.changes = 0
                // Whatever rang is taken here.
                state.taken = state.rings
            }
            return state.batch
        }
    }

    /// The number of the last transaction the log holds.
    var durableNumber: Int { state.withLock { $0.durableNumber } }

    func markDurable(through number: Int) {
        state.withLock { $0.durableNumber = number }
    }
}
