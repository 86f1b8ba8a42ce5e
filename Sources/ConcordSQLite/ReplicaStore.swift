import ConcordCore
import Foundation
import GRDB
import Synchronization

/// A replica on SQLite: one plain table per collection (`key`, `version`, `value`) that
/// services query with SQL, and Concord's own state in `concord_` tables.
///
/// Every method that changes data also moves the position or bootstrap cursor in the
/// same transaction, so a crash at any point leaves a state the subscriber resumes from
/// without losing or repeating a change.
public final class ReplicaStore: ReplicaStoring {
    public struct Configuration: Sendable {
        /// `.normal` (default): a crash loses nothing; a power loss may lose the last
        /// transactions, and the subscriber fetches them again because the position rolls back with them.
        public var durability: SQLiteDurability = .normal
        /// SQLite page cache per connection. A replica writes mostly in key or LSN order, so a
        /// small cache costs little speed and keeps the subscriber's memory flat.
        public var cacheMegabytes = 16
        /// Records the LSN of every change applied in `concord_applied`, so tests can
        /// prove that no change was applied twice. Off by default.
        public var auditAppliedChanges = false
        /// Keeps each collection's digest and sketch in the apply transaction (default). Off
        /// only to measure what proof costs: the digests are then marked unknown, so nothing is
        /// verified against them until they are rebuilt by a scan.
        public var tracksDigests = true
        public init() {}
    }

    public let path: String
    public var location: String { path }
    public let configuration: Configuration
    let pool: DatabasePool

    public init(path: String, configuration: Configuration = Configuration()) throws {
        self.path = path
        self.configuration = configuration
        pool = try SQLiteOpener.open(
            path: path, durability: configuration.durability, cacheMegabytes: configuration.cacheMegabytes)
        do {
            var migrator = DatabaseMigrator()
            migrator.registerMigration("v1") { db in
                try db.execute(
                    sql: """
                        CREATE TABLE concord_state (
                            id INTEGER PRIMARY KEY CHECK (id = 1),
                            feed_id TEXT NOT NULL,
                            source TEXT NOT NULL,
                            position INTEGER NOT NULL,
                            phase TEXT NOT NULL,
                            horizon INTEGER NOT NULL,
                            collections TEXT,
                            applied_changes INTEGER NOT NULL DEFAULT 0,
                            source_head INTEGER NOT NULL DEFAULT 0,
                            updated_at REAL NOT NULL
                        );
                        CREATE TABLE concord_bootstrap (
                            collection TEXT PRIMARY KEY,
                            after_key TEXT
                        );
                        CREATE TABLE concord_tombstones (
                            collection TEXT NOT NULL,
                            key TEXT NOT NULL,
                            version INTEGER NOT NULL,
                            PRIMARY KEY (collection, key)
                        ) WITHOUT ROWID;
                        CREATE TABLE concord_collections (name TEXT PRIMARY KEY);
                        CREATE TABLE concord_applied (lsn INTEGER NOT NULL);
                        """)
            }
            migrator.registerMigration("v2-digests") { db in
                // digest_valid = 0: the digest must be rebuilt by a scan before it is used.
                try db.execute(
                    sql: """
                        ALTER TABLE concord_collections ADD COLUMN count INTEGER NOT NULL DEFAULT 0;
                        ALTER TABLE concord_collections ADD COLUMN digest TEXT NOT NULL DEFAULT '';
                        ALTER TABLE concord_collections ADD COLUMN digest_valid INTEGER NOT NULL DEFAULT 0;
                        ALTER TABLE concord_state ADD COLUMN verified_lsn INTEGER NOT NULL DEFAULT 0;
                        ALTER TABLE concord_state ADD COLUMN verified_at REAL;
                        ALTER TABLE concord_state ADD COLUMN repairs INTEGER NOT NULL DEFAULT 0;
                        ALTER TABLE concord_state ADD COLUMN repaired_records INTEGER NOT NULL DEFAULT 0;
                        ALTER TABLE concord_state ADD COLUMN mismatches INTEGER NOT NULL DEFAULT 0;
                        ALTER TABLE concord_bootstrap ADD COLUMN sweep INTEGER NOT NULL DEFAULT 0;
                        """)
            }
            try migrator.migrate(pool)
        } catch {
            throw ConcordError.storage(error, "cannot prepare replica database \(path)")
        }
    }

    /// Each collection's first coded symbols as the replica holds them; `nil` until built by a scan.
    let sketches = KeptSketches()

    // MARK: State

    public func state() throws -> ReplicaState? {
        do {
            return try pool.read { db in try Self.readState(db) }
        } catch {
            throw ConcordError.storage(error, "cannot read replica state")
        }
    }

    static func readState(_ db: Database) throws -> ReplicaState? {
        guard let row = try Row.fetchOne(db, sql: "SELECT * FROM concord_state WHERE id = 1") else { return nil }
        var remaining: [String: String?] = [:]
        for cursor in try Row.fetchAll(db, sql: "SELECT collection, after_key FROM concord_bootstrap") {
            remaining[cursor["collection"]] = .some(cursor["after_key"] as String?)
        }
        let collections = (row["collections"] as String?).map { $0.split(separator: ",").map(String.init) }
        return ReplicaState(
            feedID: row["feed_id"], source: row["source"], position: LSN(row["position"] as Int64),
            progress: BootstrapProgress(
                phase: BootstrapProgress.Phase(rawValue: row["phase"]) ?? .bootstrapping,
                horizon: LSN(row["horizon"] as Int64), remaining: remaining),
            collections: collections, appliedChanges: row["applied_changes"],
            sourceHead: LSN(row["source_head"] as Int64),
            updatedAt: Date(timeIntervalSince1970: row["updated_at"]),
            verifiedLSN: LSN(row["verified_lsn"] as Int64),
            verifiedAt: (row["verified_at"] as Double?).map(Date.init(timeIntervalSince1970:)),
            repairs: row["repairs"], repairedRecords: row["repaired_records"], mismatches: row["mismatches"])
    }

    /// Starts a new replica of `feedID` at `head`: follows from there and pages through `collections`.
    public func initialize(feedID: String, source: String, head: LSN, collections: [String], filter: [String]?)
        async throws -> ReplicaState
    {
        do {
            return try await pool.write { db in
                if let existing = try Self.readState(db) { return existing }
                let progress = BootstrapProgress.starting(collections: collections, at: head)
                try Self.insertState(
                    feedID: feedID, source: source, position: head, phase: progress.phase, filter: filter, in: db)
                for collection in collections {
                    try Self.createTable(collection, in: db)
                    try db.execute(
                        sql: "INSERT INTO concord_bootstrap (collection, after_key) VALUES (?, NULL)",
                        arguments: [collection])
                }
                return try Self.readState(db)!
            }
        } catch {
            throw ConcordError.storage(error, "cannot initialize replica")
        }
    }

    /// Writes a new replica's state row at `position`, which is also its horizon and the
    /// source head it knows of.
    static func insertState(
        feedID: String, source: String, position: LSN, phase: BootstrapProgress.Phase, filter: [String]?,
        in db: Database
    ) throws {
        try db.execute(
            sql: """
                INSERT INTO concord_state (id, feed_id, source, position, phase, horizon, collections,
                    source_head, updated_at)
                VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?)
                """,
            arguments: [
                feedID, source, Int64(position), phase.rawValue, Int64(position), filter?.joined(separator: ","),
                Int64(position), Date().timeIntervalSince1970,
            ])
    }

    /// Records the source's head, for lag reporting.
    public func noteSourceHead(_ head: LSN) async throws {
        try await pool.write { db in
            try db.execute(
                sql: "UPDATE concord_state SET source_head = max(source_head, ?) WHERE id = 1", arguments: [Int64(head)]
            )
        }
    }

    /// Creates the plain table of a collection if it does not exist yet.
    ///
    /// A schema change makes GRDB finalize its cached statements, so this must run before
    /// any ``RawStatement`` of the transaction is prepared, and does nothing when the table exists.
    static func createTable(_ collection: String, in db: Database) throws {
        try CollectionName.validate(collection)
        if try db.tableExists(collection) { return }
        let table = SQLiteOpener.quote(collection)
        try db.execute(
            sql: """
                CREATE TABLE IF NOT EXISTS \(table) (
                    key TEXT PRIMARY KEY,
                    version INTEGER NOT NULL,
                    value TEXT NOT NULL
                );
                INSERT OR IGNORE INTO concord_collections (name, count, digest, digest_valid) VALUES (?, 0, ?, 1);
                """, arguments: [collection, CollectionDigest.empty.sumHex])
    }

    // MARK: Applying changes

    /// Applies the items of whole source transactions, ending at `through`, in one local
    /// transaction that also moves the position to `through`.
    ///
    /// - Throws: a `protocolViolation` if the items do not continue the replica's position.
    public func apply(_ items: [StreamItem], through: LSN) async throws {
        _ = try await apply(items, through: through, judging: nil)
    }

    /// Applies, then judges `checkpoint` in the same transaction: one commit per checkpoint
    /// interval instead of two.
    public func apply(_ items: [StreamItem], through: LSN, checking checkpoint: Checkpoint) async throws
        -> CheckpointOutcome
    {
        try await apply(items, through: through, judging: checkpoint) ?? .notJudged
    }

    private func apply(_ items: [StreamItem], through: LSN, judging checkpoint: Checkpoint?) async throws
        -> CheckpointOutcome?
    {
        do {
            return try await sketches.forgettingOnFailure {
                try await pool.write { db in
                    guard let state = try Self.readState(db) else {
                        throw ConcordError(.storage, "replica is not initialized")
                    }
                    try state.checkContinued(by: items)
                    let mode = state.progress.applyMode(position: state.position)
                    let keepTombstones = state.progress.phase == .bootstrapping
                    let filter = state.collections.map(Set.init)
                    var touched = Set<String>()
                    for item in items {
                        if case .change(let change) = item, filter?.contains(change.collection) ?? true {
                            touched.insert(change.collection)
                        }
                    }
                    var applier = try Applier(db: db, mode: mode, keepTombstones: keepTombstones, collections: touched)
                    var digests = try DigestTracker(
                        db: db, collections: configuration.tracksDigests ? touched : [], exactFromDisk: mode == .merge)
                    if !configuration.tracksDigests, !touched.isEmpty {
                        try DigestTracker.invalidate(Array(touched), in: db)
                        self.sketches.invalidate()
                    }
                    var applied = 0
                    for item in items {
                        guard case .change(let change) = item else { continue }
                        if let filter, !filter.contains(change.collection) { continue }
                        try digests.willApply(change)
                        try applier.apply(change)
                        try digests.didApply(change)
                        applied += 1
                    }
                    try digests.save()
                    self.updateSketches(digests.elementChanges)
                    if configuration.auditAppliedChanges {
                        let audit = RawStatement(
                            try db.cachedStatement(sql: "INSERT INTO concord_applied (lsn) VALUES (?)"), in: db)
                        for item in items {
                            guard case .change(let change) = item else { continue }
                            audit.bind(1, change.lsn)
                            try audit.run()
                        }
                    }
                    try db.execute(
                        sql: """
                            UPDATE concord_state SET position = ?, applied_changes = applied_changes + ?,
                                source_head = max(source_head, ?), updated_at = ? WHERE id = 1
                            """,
                        arguments: [Int64(through), applied, Int64(through), Date().timeIntervalSince1970])
                    return try checkpoint.map { try Self.judge($0, in: db) }
                }
            }
        } catch {
            throw ConcordError.storage(error, "cannot apply changes")
        }
    }

    /// Merges a snapshot page by version and records the bootstrap cursor, in one transaction.
    public func apply(_ page: SnapshotPage) async throws {
        do {
            try await pool.write { db in
                guard var state = try Self.readState(db) else {
                    throw ConcordError(.storage, "replica is not initialized")
                }
                guard state.progress.remaining[page.collection] != nil else { return }  // already complete
                var applier = try Applier(db: db, mode: .merge, keepTombstones: true, collections: [page.collection])
                try DigestTracker.invalidate([page.collection], in: db)
                self.sketches.invalidate()
                if try Bool.fetchOne(
                    db, sql: "SELECT sweep FROM concord_bootstrap WHERE collection = ?", arguments: [page.collection])
                    ?? false
                {
                    try Self.sweep(page, after: state.progress.remaining[page.collection] ?? nil, in: db)
                }
                // Tombstones are rare (deletes that raced the bootstrap); without one in the
                // page's key range, the version check alone decides.
                let hasTombstones =
                    try Bool.fetchOne(
                        db,
                        sql: """
                            SELECT EXISTS (SELECT 1 FROM concord_tombstones
                                WHERE collection = ? AND key >= ? AND key <= ?)
                            """,
                        arguments: [page.collection, page.records.first?.key ?? "", page.records.last?.key ?? ""]
                    ) ?? true
                for record in page.records {
                    try applier.merge(record, into: page.collection, checkTombstones: hasTombstones)
                }
                state.progress.pageApplied(
                    collection: page.collection, lsn: page.lsn, lastKey: page.records.last?.key,
                    hasMore: page.hasMore)
                if page.hasMore {
                    try db.execute(
                        sql: "UPDATE concord_bootstrap SET after_key = ? WHERE collection = ?",
                        arguments: [page.records.last?.key, page.collection])
                } else {
                    try db.execute(
                        sql: "DELETE FROM concord_bootstrap WHERE collection = ?", arguments: [page.collection])
                }
                try db.execute(
                    sql: "UPDATE concord_state SET horizon = ?, updated_at = ? WHERE id = 1",
                    arguments: [Int64(state.progress.horizon), Date().timeIntervalSince1970])
            }
        } catch {
            throw ConcordError.storage(error, "cannot apply snapshot page")
        }
    }

    /// Ends the bootstrap once every page is in and the position passed the horizon:
    /// from then on changes apply in LSN order, and tombstones are no longer needed.
    @discardableResult
    public func completeBootstrapIfReady() async throws -> Bool {
        try await pool.write { db in
            guard let state = try Self.readState(db), state.progress.phase == .bootstrapping,
                state.progress.isComplete(position: state.position)
            else { return false }
            try db.execute(sql: "UPDATE concord_state SET phase = 'following' WHERE id = 1")
            try db.execute(sql: "DELETE FROM concord_tombstones")
            return true
        }
    }

    // MARK: Reading

    /// The collections this replica holds a table for.
    public func collections() throws -> [String] {
        try pool.read { db in try String.fetchAll(db, sql: "SELECT name FROM concord_collections ORDER BY name") }
    }

    /// All rows of a collection's table in key order.
    public func records(of collection: String) throws -> [ConcordCore.Record] {
        try pool.read { db in
            let known =
                try Bool.fetchOne(
                    db, sql: "SELECT 1 FROM concord_collections WHERE name = ?", arguments: [collection]) ?? false
            guard known else { return [] }
            return try Row.fetchAll(
                db, sql: "SELECT key, version, value FROM \(SQLiteOpener.quote(collection)) ORDER BY key"
            ).map { Record(key: $0["key"], version: LSN($0["version"] as Int64), value: $0["value"]) }
        }
    }

    /// For audits: how many changes were applied, and how many LSNs were applied more than once.
    public func appliedAudit() throws -> (applied: Int, repeated: Int, lowest: LSN?, highest: LSN?) {
        try pool.read { db in
            let row = try Row.fetchOne(
                db,
                sql:
                    "SELECT count(*) AS n, count(DISTINCT lsn) AS d, min(lsn) AS lo, max(lsn) AS hi FROM concord_applied"
            )!
            let applied: Int = row["n"]
            let distinct: Int = row["d"]
            return (
                applied, applied - distinct, (row["lo"] as Int64?).map(LSN.init), (row["hi"] as Int64?).map(LSN.init)
            )
        }
    }
}

/// Applies changes and records to replica tables inside one open transaction, with
/// statements prepared once per collection.
struct Applier {
    struct Statements {
        var upsert: RawStatement
        var delete: RawStatement
        var mergeUpsert: RawStatement
        var newerUpsert: RawStatement
        var mergeDelete: RawStatement
    }

    let db: Database
    let mode: ApplyMode
    let keepTombstones: Bool
    private var statements: [String: Statements] = [:]
    private var tombstone: RawStatement?

    /// Creates the tables of `collections` first: statements are prepared only after every schema change.
    init(db: Database, mode: ApplyMode, keepTombstones: Bool, collections: Set<String>) throws {
        self.db = db
        self.mode = mode
        self.keepTombstones = keepTombstones
        for collection in collections { try ReplicaStore.createTable(collection, in: db) }
    }

    private mutating func statements(for collection: String) throws -> Statements {
        if let cached = statements[collection] { return cached }
        let table = SQLiteOpener.quote(collection)
        let made = Statements(
            upsert: RawStatement(
                try db.cachedStatement(
                    sql: """
                        INSERT INTO \(table) (key, version, value) VALUES (?1, ?2, ?3)
                        ON CONFLICT (key) DO UPDATE SET version = excluded.version, value = excluded.value
                        """), in: db),
            delete: RawStatement(try db.cachedStatement(sql: "DELETE FROM \(table) WHERE key = ?1"), in: db),
            mergeUpsert: RawStatement(
                try db.cachedStatement(
                    sql: """
                        INSERT INTO \(table) (key, version, value)
                        SELECT ?1, ?2, ?3 WHERE NOT EXISTS (
                            SELECT 1 FROM concord_tombstones WHERE collection = ?4 AND key = ?1 AND version >= ?2)
                        ON CONFLICT (key) DO UPDATE SET version = excluded.version, value = excluded.value
                        WHERE excluded.version > \(table).version
                        """), in: db),
            newerUpsert: RawStatement(
                try db.cachedStatement(
                    sql: """
                        INSERT INTO \(table) (key, version, value) VALUES (?1, ?2, ?3)
                        ON CONFLICT (key) DO UPDATE SET version = excluded.version, value = excluded.value
                        WHERE excluded.version > \(table).version
                        """), in: db),
            mergeDelete: RawStatement(
                try db.cachedStatement(sql: "DELETE FROM \(table) WHERE key = ?1 AND version < ?2"), in: db))
        statements[collection] = made
        return made
    }

    mutating func apply(_ change: Change) throws {
        let statements = try statements(for: change.collection)
        switch (mode, change.value) {
        case (.ordered, let value?):
            statements.upsert.bind(1, change.key)
            statements.upsert.bind(2, change.lsn)
            statements.upsert.bind(3, value)
            try statements.upsert.run()
        case (.ordered, nil):
            statements.delete.bind(1, change.key)
            try statements.delete.run()
        case (.merge, let value?):
            try merge(Record(key: change.key, version: change.lsn, value: value), into: change.collection)
        case (.merge, nil):
            statements.mergeDelete.bind(1, change.key)
            statements.mergeDelete.bind(2, change.lsn)
            try statements.mergeDelete.run()
            if keepTombstones { try recordTombstone(change.collection, change.key, change.lsn) }
        }
    }

    /// Writes `record` unless the replica holds the key, or a tombstone of it, at an equal or higher version.
    ///
    /// `checkTombstones: false` is for callers that know no tombstone can match.
    mutating func merge(_ record: Record, into collection: String, checkTombstones: Bool = true) throws {
        let statements = try statements(for: collection)
        if checkTombstones {
            statements.mergeUpsert.bind(1, record.key)
            statements.mergeUpsert.bind(2, record.version)
            statements.mergeUpsert.bind(3, record.value)
            statements.mergeUpsert.bind(4, collection)
            try statements.mergeUpsert.run()
        } else {
            statements.newerUpsert.bind(1, record.key)
            statements.newerUpsert.bind(2, record.version)
            statements.newerUpsert.bind(3, record.value)
            try statements.newerUpsert.run()
        }
    }

    private mutating func recordTombstone(_ collection: String, _ key: String, _ version: LSN) throws {
        if tombstone == nil {
            tombstone = RawStatement(
                try db.cachedStatement(
                    sql: """
                        INSERT INTO concord_tombstones (collection, key, version) VALUES (?1, ?2, ?3)
                        ON CONFLICT (collection, key) DO UPDATE SET version = max(version, excluded.version)
                        """), in: db)
        }
        tombstone!.bind(1, collection)
        tombstone!.bind(2, key)
        tombstone!.bind(3, version)
        try tombstone!.run()
    }
}
