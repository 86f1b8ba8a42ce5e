import ConcordCore
import ConcordSQLite
import Foundation
import Logging
import PostgresNIO
import Synchronization

/// A replica in a PostgreSQL schema, laid out like the SQLite store: one plain table per
/// collection (`key`, `version`, `value`) that services query with SQL, and Concord's own state
/// in `concord_` tables beside them.
///
/// Every method that changes rows moves the position, bootstrap cursor or digests in the same
/// PostgreSQL transaction. A batch of changes is written with one statement per collection
/// and kind (rows bound as arrays), so a transaction costs a few round trips, not one per change.
public final class PostgresReplicaStore: ReplicaStoring {
    public struct Configuration: Sendable {
        /// The schema holding the replica's tables (created if missing).
        public var schema = "public"
        /// `false` (default): a commit returns before its WAL is flushed. A server crash may
        /// lose the last transactions, never half of one, and the position rolls back with
        /// them, so the subscriber fetches them again (PostgreSQL's own subscriptions apply the same way).
        public var synchronousCommit = false
        /// Keeps each collection's digest and sketch in the apply transaction (default); off only
        /// to measure what proof costs.
        public var tracksDigests = true
        /// Rows per fetch when scanning a table.
        public var scanBatch = 10_000

        public init(schema: String = "public") {
            self.schema = schema
        }
    }

    public let url: String
    public let configuration: Configuration
    public var location: String { "\(PostgresSource.redacted(url)) schema \(configuration.schema)" }
    let logger: Logger
    /// Writes go through one connection, reads through another, so a long scan or a status
    /// read never waits behind an apply (and never sees one half done).
    let writer: PostgresConnectionSlot
    let reader: PostgresConnectionSlot
    /// Each collection's first coded symbols as the replica holds them; `nil` until built by a scan.
    let sketches = KeptSketches()
    /// Collections whose table is known to exist, so an apply need not ask.
    let knownTables = Mutex<Set<String>>([])
    /// `"schema".`, quoted, to prefix every table name.
    let prefix: String

    /// Connects, and creates the schema and Concord's tables if they are missing; with
    /// `creating: false` (for reading an existing replica), fails if they are.
    public static func open(
        url: String, configuration: Configuration = Configuration(), creating: Bool = true, logger: Logger
    ) async throws -> PostgresReplicaStore {
        let store = try PostgresReplicaStore(url: url, configuration: configuration, logger: logger)
        if creating {
            try await store.prepare()
        } else {
            let exists: Bool
            do {
                exists = try await store.reader.withConnection { db in
                    try await db.rows("SELECT to_regclass(\(store.table("concord_state"))) IS NOT NULL").first?
                        .decode(Bool.self) ?? false
                }
            } catch {
                await store.close()
                throw Self.failure(error, "cannot read \(store.location)")
            }
            guard exists else {
                await store.close()
                throw ConcordError(.storage, "no Concord replica in \(store.location)")
            }
        }
        return store
    }

    init(url: String, configuration: Configuration, logger: Logger) throws {
        _ = try PostgresSource.configuration(url: url)
        guard !configuration.schema.isEmpty, configuration.schema.utf8.count <= 63 else {
            throw ConcordError(.invalidConfiguration, "--schema must be 1 to 63 characters")
        }
        self.url = url
        self.configuration = configuration
        self.logger = logger
        prefix = PostgresSource.quote(configuration.schema) + "."
        writer = PostgresConnectionSlot(
            url: url, logger: logger,
            settings: configuration.synchronousCommit ? [] : ["SET synchronous_commit TO off"])
        reader = PostgresConnectionSlot(url: url, logger: logger)
    }

    public func close() async {
        await writer.close()
        await reader.close()
    }

    func table(_ name: String) -> String { prefix + PostgresSource.quote(name) }

    private func prepare() async throws {
        do {
            try await writer.transaction { db in
                // Two replicas starting against one empty schema must not both create it.
                try await db.execute("SELECT pg_advisory_xact_lock(7254431)")
                try await db.execute("CREATE SCHEMA IF NOT EXISTS \(PostgresSource.quote(configuration.schema))")
                try await db.execute(
                    """
                    CREATE TABLE IF NOT EXISTS \(table("concord_state")) (
                        id integer PRIMARY KEY CHECK (id = 1),
                        feed_id text NOT NULL,
                        source text NOT NULL,
                        position bigint NOT NULL,
                        phase text NOT NULL,
                        horizon bigint NOT NULL,
                        collections text,
                        applied_changes bigint NOT NULL DEFAULT 0,
                        source_head bigint NOT NULL DEFAULT 0,
                        updated_at timestamptz NOT NULL DEFAULT now(),
                        verified_lsn bigint NOT NULL DEFAULT 0,
                        verified_at timestamptz,
                        repairs bigint NOT NULL DEFAULT 0,
                        repaired_records bigint NOT NULL DEFAULT 0,
                        mismatches bigint NOT NULL DEFAULT 0
                    )
                    """)
                try await db.execute(
                    """
                    CREATE TABLE IF NOT EXISTS \(table("concord_bootstrap")) (
                        collection text PRIMARY KEY,
                        after_key text COLLATE "C",
                        sweep boolean NOT NULL DEFAULT false
                    )
                    """)
                try await db.execute(
                    """
                    CREATE TABLE IF NOT EXISTS \(table("concord_tombstones")) (
                        collection text NOT NULL,
                        key text COLLATE "C" NOT NULL,
                        version bigint NOT NULL,
                        PRIMARY KEY (collection, key)
                    )
                    """)
                // digest_valid = false: the digest must be rebuilt by a scan before it is used.
                try await db.execute(
                    """
                    CREATE TABLE IF NOT EXISTS \(table("concord_collections")) (
                        name text PRIMARY KEY,
                        count bigint NOT NULL DEFAULT 0,
                        digest text NOT NULL DEFAULT '',
                        digest_valid boolean NOT NULL DEFAULT false
                    )
                    """)
            }
        } catch {
            throw Self.failure(error, "cannot prepare the replica schema \(configuration.schema) at \(location)")
        }
    }

    /// Concord's own errors pass through; PostgreSQL's refusals are storage errors; a lost
    /// connection stays `unavailable`, so the subscriber retries.
    static func failure(_ error: any Error, _ context: String) -> ConcordError {
        if let error = error as? ConcordError {
            return error.code == .unavailable ? ConcordError(.unavailable, "\(context): \(error.message)") : error
        }
        return ConcordError(.storage, "\(context): \(error)")
    }

    // MARK: State

    public func state() async throws -> ReplicaState? {
        do {
            return try await reader.withConnection { db in try await readState(db) }
        } catch let error as CaptureError where error.sqlState == "42P01" {
            // The schema or Concord's tables were dropped: the replica is gone, so a new one
            // starts here (the subscriber bootstraps it).
            logger.warning("the replica's tables are gone; creating them again", metadata: ["at": "\(location)"])
            knownTables.withLock { $0.removeAll() }
            sketches.invalidate()
            try await prepare()
            return nil
        } catch {
            throw Self.failure(error, "cannot read replica state")
        }
    }

    func readState(_ db: PostgresSource) async throws -> ReplicaState? {
        let rows = try await db.rows(
            PostgresQuery(
                unsafeSQL: """
                    SELECT feed_id, source, position, phase, horizon, collections, applied_changes, source_head,
                        extract(epoch FROM updated_at)::float8, verified_lsn, extract(epoch FROM verified_at)::float8,
                        repairs, repaired_records, mismatches
                    FROM \(table("concord_state")) WHERE id = 1
                    """))
        guard let row = rows.first?.makeRandomAccess() else { return nil }
        var remaining: [String: String?] = [:]
        for cursor in try await db.rows(
            PostgresQuery(unsafeSQL: "SELECT collection, after_key FROM \(table("concord_bootstrap"))"))
        {
            let (collection, afterKey) = try cursor.decode((String, String?).self)
            remaining[collection] = .some(afterKey)
        }
        let collections = try row[5].decode(String?.self).map { $0.split(separator: ",").map(String.init) }
        return ReplicaState(
            feedID: try row[0].decode(String.self), source: try row[1].decode(String.self),
            position: LSN(try row[2].decode(Int64.self)),
            progress: BootstrapProgress(
                phase: BootstrapProgress.Phase(rawValue: try row[3].decode(String.self)) ?? .bootstrapping,
                horizon: LSN(try row[4].decode(Int64.self)), remaining: remaining),
            collections: collections, appliedChanges: Int(try row[6].decode(Int64.self)),
            sourceHead: LSN(try row[7].decode(Int64.self)),
            updatedAt: Date(timeIntervalSince1970: try row[8].decode(Double.self)),
            verifiedLSN: LSN(try row[9].decode(Int64.self)),
            verifiedAt: try row[10].decode(Double?.self).map(Date.init(timeIntervalSince1970:)),
            repairs: Int(try row[11].decode(Int64.self)), repairedRecords: Int(try row[12].decode(Int64.self)),
            mismatches: Int(try row[13].decode(Int64.self)))
    }

    public func initialize(feedID: String, source: String, head: LSN, collections: [String], filter: [String]?)
        async throws -> ReplicaState
    {
        do {
            let (state, empty) = try await writer.transaction { db in
                try await lockReplica(db)
                if let existing = try await readState(db) { return (existing, false) }
                // A schema with no collection yet: the bootstrap can keep digests and sketches
                // from the pages it copies, starting from nothing.
                let empty =
                    try await db.rows(
                        "SELECT NOT EXISTS (SELECT 1 FROM \(unescaped: table("concord_collections")))"
                    ).first?.decode(Bool.self) ?? false
                var binds = PostgresBindings()
                binds.append(feedID)
                binds.append(source)
                binds.append(Int64(head))
                binds.append(filter?.joined(separator: ","))
                _ = try await db.rows(
                    PostgresQuery(
                        unsafeSQL: """
                            INSERT INTO \(table("concord_state")) (id, feed_id, source, position, phase, horizon,
                                collections, source_head)
                            VALUES (1, $1, $2, $3, 'bootstrapping', $3, $4, $3)
                            """, binds: binds))
                // What a replica dropped in part left behind is neither trusted nor kept: digests
                // are rebuilt, and tables that already hold rows are swept by the bootstrap.
                try await db.execute("DELETE FROM \(table("concord_bootstrap"))")
                try await db.execute("DELETE FROM \(table("concord_tombstones"))")
                try await db.execute("UPDATE \(table("concord_collections")) SET digest_valid = false")
                knownTables.withLock { $0.removeAll() }
                for collection in collections {
                    let existed = try await tableExists(collection, in: db)
                    _ = try await db.rows(
                        """
                        INSERT INTO \(unescaped: table("concord_bootstrap")) (collection, sweep)
                        VALUES (\(collection), \(existed))
                        """)
                }
                try await createTables(collections, in: db)
                return (try await readState(db)!, empty)
            }
            if empty, configuration.tracksDigests { sketches.install(SketchSet(capacity: ReplicaSketch.capacity)) }
            return state
        } catch {
            throw Self.failure(error, "cannot initialize replica")
        }
    }

    public func noteSourceHead(_ head: LSN) async throws {
        do {
            try await writer.withConnection { db in
                _ = try await db.rows(
                    """
                    UPDATE \(unescaped: table("concord_state"))
                    SET source_head = GREATEST(source_head, \(Int64(head))) WHERE id = 1
                    """)
            }
        } catch {
            throw Self.failure(error, "cannot record the source's head")
        }
    }

    /// Serialises the writers of this replica (two processes pointed at one schema, or `verify
    /// --repair` beside `follow`): each write transaction reads the position and digests it moves.
    func lockReplica(_ db: PostgresSource) async throws {
        _ = try await db.rows("SELECT pg_advisory_xact_lock(hashtext(\("concord:" + configuration.schema)))")
    }

    func tableExists(_ collection: String, in db: PostgresSource) async throws -> Bool {
        try await db.rows("SELECT to_regclass(\(table(collection))) IS NOT NULL").first?.decode(Bool.self) ?? false
    }

    /// Creates the plain tables of `collections` that do not exist yet. A table found already
    /// there (left by an earlier replica) gets no digest until a scan makes one.
    func createTables(_ collections: some Collection<String>, in db: PostgresSource) async throws {
        let missing = knownTables.withLock { known in collections.filter { !known.contains($0) } }
        for collection in missing {
            try CollectionName.validate(collection)
            let existed = try await tableExists(collection, in: db)
            try await db.execute(
                """
                CREATE TABLE IF NOT EXISTS \(table(collection)) (
                    key text COLLATE "C" PRIMARY KEY,
                    version bigint NOT NULL,
                    value text NOT NULL
                )
                """)
            _ = try await db.rows(
                """
                INSERT INTO \(unescaped: table("concord_collections")) (name, count, digest, digest_valid)
                VALUES (\(collection), 0, \(CollectionDigest.empty.sumHex), \(!existed)) ON CONFLICT (name) DO NOTHING
                """)
        }
        // Known only once the transaction commits: a rolled-back CREATE TABLE leaves no table.
        pendingTables.withLock { $0.formUnion(missing) }
    }

    /// Tables created by the transaction in progress (there is one writer at a time).
    let pendingTables = Mutex<Set<String>>([])

    /// Runs a write transaction, holding the replica's lock; tables it created become known
    /// when it commits.
    func write<T>(_ context: String, _ body: (PostgresSource) async throws -> T) async throws -> T {
        do {
            let (result, created) = try await writer.transaction { db in
                try await lockReplica(db)
                pendingTables.withLock { $0.removeAll() }
                let result = try await body(db)
                // Taken while this writer still holds the connection.
                let created = pendingTables.withLock { pending in
                    defer { pending.removeAll() }
                    return pending
                }
                return (result, created)
            }
            knownTables.withLock { $0.formUnion(created) }
            return result
        } catch {
            knownTables.withLock { $0.removeAll() }
            throw Self.failure(error, context)
        }
    }

    // MARK: Applying changes

    public func apply(_ items: [StreamItem], through: LSN) async throws {
        try await apply(items, through: through, next: nil)
    }

    /// Writes each piece as it comes, inside one transaction: PostgreSQL works on the first
    /// pieces while the subscriber still reads the rest, and memory holds one piece, not the
    /// whole source transaction.
    public func apply(_ items: [StreamItem], through: LSN, continuing next: () async throws -> StreamPiece)
        async throws
    {
        try await withoutActuallyEscaping(next) { next in try await apply(items, through: through, next: next) }
    }

    private func apply(_ items: [StreamItem], through: LSN, next: (() async throws -> StreamPiece)?) async throws {
        // What `next` threw is the caller's own error (the stream broke), not the replica's.
        var nextFailure: (any Error)?
        do {
            try await applyPieces(items, through: through) {
                guard let next else { return nil }
                do {
                    return try await next()
                } catch {
                    nextFailure = error
                    throw error
                }
            }
        } catch {
            throw nextFailure ?? error
        }
    }

    private func applyPieces(_ items: [StreamItem], through: LSN, next: () async throws -> StreamPiece?) async throws {
        try await sketches.forgettingOnFailure {
            try await write("cannot apply changes") { db in
                guard let state = try await readState(db) else {
                    throw ConcordError(.storage, "replica is not initialized")
                }
                try state.checkContinued(by: items)
                var writer = ChangeWriter(
                    mode: state.progress.applyMode(position: state.position),
                    keepingTombstones: state.progress.phase == .bootstrapping,
                    filter: state.collections.map(Set.init))
                var piece = StreamPiece(items: items, through: through, endsTransaction: false)
                var position = state.position
                while true {
                    try piece.checkContinues(after: position)
                    try await writeChanges(piece.items, with: &writer, in: db)
                    position = piece.through
                    guard !piece.endsTransaction, let following = try await next() else { break }
                    piece = following
                }
                try await writer.ledger.save(to: table("concord_collections"), in: db)
                _ = try await db.rows(
                    """
                    UPDATE \(unescaped: table("concord_state")) SET position = \(Int64(position)),
                        applied_changes = applied_changes + \(Int64(writer.applied)),
                        source_head = GREATEST(source_head, \(Int64(position))), updated_at = now()
                    WHERE id = 1
                    """)
                // Before the commit, under the replica's lock: a rebuild of the sketches sees
                // these changes either in the rows it scans or in the queue after it, never both.
                sketches.queue(writer.ledger.elementChanges)
            }
        }
    }

    /// What one apply transaction carries from piece to piece.
    struct ChangeWriter {
        let mode: ApplyMode
        let keepingTombstones: Bool
        let filter: Set<String>?
        var ledger = DigestLedger()
        /// Collections whose stored digest was read (tracked or not).
        var loaded: Set<String> = []
        var applied = 0
    }

    /// Writes `items` in the transaction open on `db`, one statement per collection and kind.
    private func writeChanges(_ items: [StreamItem], with writer: inout ChangeWriter, in db: PostgresSource)
        async throws
    {
        var batches: [String: CollectionBatch] = [:]
        var order: [String] = []
        for item in items {
            guard case .change(let change) = item else { continue }
            if let filter = writer.filter, !filter.contains(change.collection) { continue }
            if batches[change.collection] == nil {
                batches[change.collection] = CollectionBatch()
                order.append(change.collection)
            }
            batches[change.collection]!.add(change)
            writer.applied += 1
        }
        try await createTables(order, in: db)
        let unread = order.filter { !writer.loaded.contains($0) }
        writer.loaded.formUnion(unread)
        try await writer.ledger.load(
            configuration.tracksDigests ? unread : [], from: table("concord_collections"), in: db)
        if !configuration.tracksDigests, !unread.isEmpty {
            try await invalidateDigests(unread, in: db)
            sketches.invalidate()
        }
        for collection in order {
            let batch = batches[collection]!
            switch writer.mode {
            case .ordered:
                if writer.ledger.tracks(collection) {
                    for change in batch.changes {
                        writer.ledger.record(collection, before: change.before, after: change.after ?? Element(change))
                    }
                }
                try await writeOrdered(batch, into: collection, in: db)
            case .merge:
                let keys = batch.lastByKey.keys.map { $0 }
                let tracked = writer.ledger.tracks(collection)
                let before = tracked ? try await elements(of: collection, keys: keys, in: db) : [:]
                try await writeMerged(batch, into: collection, keepingTombstones: writer.keepingTombstones, in: db)
                if tracked {
                    let after = try await elements(of: collection, keys: keys, in: db)
                    for key in keys { writer.ledger.record(collection, before: before[key], after: after[key]) }
                }
            }
        }
    }

    /// In LSN order the last change of each key decides its row. Rows of keys the table does
    /// not hold go in by COPY (a replica following a source's first load gets only those). A
    /// batch that replaces a record at the source (a change with a before-element) is merged
    /// without asking; otherwise the table is asked, not the changes, so a row inserted behind
    /// Concord's back is overwritten rather than failing the batch.
    private func writeOrdered(_ batch: CollectionBatch, into collection: String, in db: PostgresSource) async throws {
        let (upserts, deletes) = batch.split()
        let onlyNewKeys = batch.changes.allSatisfy { $0.before == nil }
        for rows in upserts.chunks() where !rows.keys.isEmpty {
            if onlyNewKeys, try await holdsNone(of: rows.keys, in: collection, in: db) {
                try await copy(rows, into: collection, in: db)
            } else {
                try await upsert(rows, into: collection, in: db)
            }
        }
        for rows in deletes.chunks() { try await delete(rows.keys, from: collection, in: db) }
    }

    /// Writes `rows` over whatever the table holds for their keys.
    func upsert(_ rows: RowColumns, into collection: String, in db: PostgresSource) async throws {
        var binds = PostgresBindings()
        binds.append(rows.keys)
        binds.append(rows.versions)
        binds.append(rows.values)
        _ = try await db.rows(
            PostgresQuery(
                unsafeSQL: """
                    INSERT INTO \(table(collection)) (key, version, value)
                    SELECT * FROM unnest($1::text[], $2::int8[], $3::text[])
                    ON CONFLICT (key) DO UPDATE SET version = excluded.version, value = excluded.value
                    """, binds: binds))
    }

    func delete(_ keys: [String], from collection: String, in db: PostgresSource) async throws {
        guard !keys.isEmpty else { return }
        var binds = PostgresBindings()
        binds.append(keys)
        _ = try await db.rows(
            PostgresQuery(unsafeSQL: "DELETE FROM \(table(collection)) WHERE key = ANY($1::text[])", binds: binds))
    }

    /// While bootstrapping, a change is written only over an older row, and a delete leaves a
    /// tombstone so an older snapshot page cannot bring the row back. The last change of each
    /// key decides, as applying them one by one would.
    private func writeMerged(
        _ batch: CollectionBatch, into collection: String, keepingTombstones: Bool, in db: PostgresSource
    ) async throws {
        let (upserts, deletes) = batch.split()
        for upserts in upserts.chunks() where !upserts.keys.isEmpty {
            try await mergeUpsert(upserts, into: collection, in: db)
        }
        for deletes in deletes.chunks() where !deletes.keys.isEmpty {
            var binds = PostgresBindings()
            binds.append(deletes.keys)
            binds.append(deletes.versions)
            _ = try await db.rows(
                PostgresQuery(
                    unsafeSQL: """
                        DELETE FROM \(table(collection)) AS t USING unnest($1::text[], $2::int8[]) AS d(key, version)
                        WHERE t.key = d.key AND t.version < d.version
                        """, binds: binds))
            if keepingTombstones {
                binds.append(collection)
                _ = try await db.rows(
                    PostgresQuery(
                        unsafeSQL: """
                            INSERT INTO \(table("concord_tombstones")) AS b (collection, key, version)
                            SELECT $3, d.key, d.version FROM unnest($1::text[], $2::int8[]) AS d(key, version)
                            ON CONFLICT (collection, key) DO UPDATE SET version = GREATEST(b.version, excluded.version)
                            """, binds: binds))
            }
        }
    }

    /// Whether the replica holds no row and no tombstone of any key of `page`: then there is
    /// nothing to merge with, and its records go in by COPY (every page of a first bootstrap
    /// but those that changes applied meanwhile reached).
    func holdsNone(of page: SnapshotPage, in db: PostgresSource) async throws -> Bool {
        try await holdsNone(of: page.records.map(\.key), in: page.collection, in: db)
    }

    /// Whether the replica holds no row and no tombstone of any of `keys`. A page's keys are a
    /// run of the source's, so the range from the least to the greatest (in byte order, as the
    /// key columns' "C" collation sorts) is asked first: one index probe, where asking for each
    /// key took one per key, most of a bootstrap's work for the server. Keys spread across the
    /// range, as a stream's are, are asked one by one when the range holds any.
    func holdsNone(of keys: [String], in collection: String, in db: PostgresSource) async throws -> Bool {
        guard var least = keys.first, var greatest = keys.first else { return true }
        for key in keys.dropFirst() {
            if Self.bytewisePrecedes(key, least) { least = key }
            if Self.bytewisePrecedes(greatest, key) { greatest = key }
        }
        var binds = PostgresBindings()
        binds.append(keys)
        binds.append(collection)
        binds.append(least)
        binds.append(greatest)
        // CASE evaluates its branches only when reached: the probes per key run only when the
        // range holds something.
        let held = try await db.rows(
            PostgresQuery(
                unsafeSQL: """
                    SELECT CASE
                        WHEN NOT EXISTS (SELECT 1 FROM \(table(collection)) WHERE key >= $3 AND key <= $4)
                            AND NOT EXISTS (SELECT 1 FROM \(table("concord_tombstones"))
                                WHERE collection = $2 AND key >= $3 AND key <= $4)
                        THEN false
                        ELSE EXISTS (SELECT 1 FROM \(table(collection)) WHERE key = ANY($1::text[]))
                            OR EXISTS (SELECT 1 FROM \(table("concord_tombstones"))
                                WHERE collection = $2 AND key = ANY($1::text[]))
                    END
                    """, binds: binds))
        return try !(held.first?.decode(Bool.self) ?? true)
    }

    /// Whether `first` sorts before `second` byte by byte, as the "C" collation sorts.
    /// (String's own `<` orders by Unicode canonical equivalence, which is not that.)
    static func bytewisePrecedes(_ first: String, _ second: String) -> Bool {
        first.utf8.lexicographicallyPrecedes(second.utf8)
    }

    /// Inserts records none of whose keys the table holds, with COPY: several times less work
    /// for the server than a merging INSERT, which is what bounds a bootstrap into PostgreSQL.
    /// The rows are sent in pieces as they are encoded, so the server parses one while the
    /// next is made.
    func copy(_ rows: RowColumns, into collection: String, in db: PostgresSource) async throws {
        // Qualified, never found through the search path, where pg_catalog comes first.
        try await db.copy(
            into: PostgresSource.quoteInside(configuration.schema) + "\".\"" + collection,
            columns: ["key", "version", "value"]
        ) { writer in
            var text: [UInt8] = []
            text.reserveCapacity(Self.copyPiece + 4_096)
            for index in rows.keys.indices {
                PostgresCopyText.appendRow(
                    key: rows.keys[index], version: rows.versions[index], value: rows.values[index], to: &text)
                if text.count >= Self.copyPiece {
                    try await writer.write(ByteBuffer(bytes: text))
                    text.removeAll(keepingCapacity: true)
                }
            }
            if !text.isEmpty { try await writer.write(ByteBuffer(bytes: text)) }
        }
    }

    /// Bytes of COPY data sent at a time.
    static let copyPiece = 256 * 1024

    /// Whether `page` would go in by COPY now (for tests).
    package func copies(_ page: SnapshotPage) async throws -> Bool {
        try await reader.withConnection { db in try await holdsNone(of: page, in: db) }
    }

    /// Writes rows unless the replica holds the key, or a tombstone of it, at an equal or higher version.
    func mergeUpsert(_ rows: RowColumns, into collection: String, in db: PostgresSource) async throws {
        var binds = PostgresBindings()
        binds.append(rows.keys)
        binds.append(rows.versions)
        binds.append(rows.values)
        binds.append(collection)
        _ = try await db.rows(
            PostgresQuery(
                unsafeSQL: """
                    INSERT INTO \(table(collection)) AS t (key, version, value)
                    SELECT u.key, u.version, u.value FROM unnest($1::text[], $2::int8[], $3::text[]) AS u(key, version, value)
                    WHERE NOT EXISTS (SELECT 1 FROM \(table("concord_tombstones")) b
                        WHERE b.collection = $4 AND b.key = u.key AND b.version >= u.version)
                    ON CONFLICT (key) DO UPDATE SET version = excluded.version, value = excluded.value
                    WHERE excluded.version > t.version
                    """, binds: binds))
    }

    /// The stored elements of `keys` (absent keys are left out).
    func elements(of collection: String, keys: [String], in db: PostgresSource) async throws -> [String: Element] {
        guard !keys.isEmpty else { return [:] }
        var binds = PostgresBindings()
        binds.append(keys)
        var found: [String: Element] = [:]
        for row in try await db.rows(
            PostgresQuery(
                unsafeSQL: "SELECT key, version, value FROM \(table(collection)) WHERE key = ANY($1::text[])",
                binds: binds))
        {
            let (key, version, value) = try row.decode((String, Int64, String).self)
            found[key] = Element(collection: collection, key: key, version: LSN(version), value: value)
        }
        return found
    }

    func invalidateDigests(_ collections: [String], in db: PostgresSource) async throws {
        var binds = PostgresBindings()
        binds.append(collections)
        _ = try await db.rows(
            PostgresQuery(
                unsafeSQL:
                    "UPDATE \(table("concord_collections")) SET digest_valid = false WHERE name = ANY($1::text[])",
                binds: binds))
    }

    /// Applies a snapshot page. A page copied in adds only new rows: its records go into the
    /// collection's digest and sketch as they go in, as changes applied in order do, so a first
    /// bootstrap ends with digests and sketches that need no scan of the rows. A page that sweeps
    /// or merges leaves them to be built again from the rows.
    public func apply(_ page: SnapshotPage) async throws {
        try await sketches.forgettingOnFailure { try await applyPage(page) }
    }

    private func applyPage(_ page: SnapshotPage) async throws {
        try await write("cannot apply snapshot page") { db in
            guard let state = try await readState(db) else {
                throw ConcordError(.storage, "replica is not initialized")
            }
            guard let cursor = state.progress.remaining[page.collection] else { return }  // already complete
            try await createTables([page.collection], in: db)
            let sweep =
                try await db.rows(
                    "SELECT sweep FROM \(unescaped: table("concord_bootstrap")) WHERE collection = \(page.collection)"
                ).first?.decode(Bool.self) ?? false
            if sweep { try await self.sweep(page, after: cursor, in: db) }
            let copied = try await holdsNone(of: page, in: db)
            if copied, !sweep, configuration.tracksDigests {
                var ledger = try await DigestLedger.load(
                    [page.collection], from: table("concord_collections"), in: db)
                if ledger.tracks(page.collection) {
                    for record in page.records {
                        ledger.record(page.collection, before: nil, after: Element(page.collection, record))
                    }
                    try await ledger.save(to: table("concord_collections"), in: db)
                    // Before the commit, under the replica's lock, as changes applied in order.
                    sketches.queue(ledger.elementChanges)
                } else if !page.records.isEmpty {
                    sketches.invalidate()
                }
            } else if !page.records.isEmpty || sweep {
                try await invalidateDigests([page.collection], in: db)
                sketches.invalidate()
            }
            if !page.records.isEmpty {
                if copied {
                    try await copy(RowColumns(page.records), into: page.collection, in: db)
                } else {
                    try await mergeUpsert(RowColumns(page.records), into: page.collection, in: db)
                }
            }
            var progress = state.progress
            progress.pageApplied(
                collection: page.collection, lsn: page.lsn, lastKey: page.records.last?.key, hasMore: page.hasMore)
            if page.hasMore {
                _ = try await db.rows(
                    """
                    UPDATE \(unescaped: table("concord_bootstrap")) SET after_key = \(page.records.last?.key)
                    WHERE collection = \(page.collection)
                    """)
            } else {
                _ = try await db.rows(
                    "DELETE FROM \(unescaped: table("concord_bootstrap")) WHERE collection = \(page.collection)")
            }
            _ = try await db.rows(
                """
                UPDATE \(unescaped: table("concord_state")) SET horizon = \(Int64(progress.horizon)), updated_at = now()
                WHERE id = 1
                """)
        }
    }

    /// Deletes the local rows in a page's key range that the page does not hold, unless
    /// written after the page was read.
    func sweep(_ page: SnapshotPage, after afterKey: String?, in db: PostgresSource) async throws {
        var binds = PostgresBindings()
        binds.append(afterKey ?? "")
        binds.append(Int64(page.lsn))
        binds.append(page.records.map(\.key))
        var sql = """
            DELETE FROM \(table(page.collection))
            WHERE key > $1 AND version <= $2 AND NOT (key = ANY($3::text[]))
            """
        if page.hasMore, let last = page.records.last?.key {
            binds.append(last)
            sql += " AND key <= $4"
        }
        _ = try await db.rows(PostgresQuery(unsafeSQL: sql, binds: binds))
    }

    public func completeBootstrapIfReady() async throws -> Bool {
        try await write("cannot complete the bootstrap") { db in
            guard let state = try await readState(db), state.progress.phase == .bootstrapping,
                state.progress.isComplete(position: state.position)
            else { return false }
            try await db.execute("UPDATE \(table("concord_state")) SET phase = 'following' WHERE id = 1")
            try await db.execute("DELETE FROM \(table("concord_tombstones"))")
            return true
        }
    }

    // MARK: Reading

    public func collections() async throws -> [String] {
        do {
            return try await reader.withConnection { db in
                try await db.rows(
                    PostgresQuery(unsafeSQL: "SELECT name FROM \(table("concord_collections")) ORDER BY name")
                ).map { try $0.decode(String.self) }
            }
        } catch {
            throw Self.failure(error, "cannot list the replica's collections")
        }
    }

    public func records(of collection: String) async throws -> [Record] {
        var records: [Record] = []
        try await scan([collection], ordered: true) { _, record in records.append(record) }
        return records
    }
}

/// The changes of one collection in one apply, and the last change of each key.
struct CollectionBatch {
    var changes: [Change] = []
    var lastByKey: [String: Int] = [:]

    mutating func add(_ change: Change) {
        lastByKey[change.key] = changes.count
        changes.append(change)
    }

    /// The keys whose last change writes a row, and those whose last change deletes it, with the change's LSN.
    func split() -> (upserts: RowColumns, deletes: RowColumns) {
        var upserts = RowColumns()
        var deletes = RowColumns()
        for index in lastByKey.values.sorted() {
            let change = changes[index]
            if let value = change.value {
                upserts.append(key: change.key, version: change.lsn, value: value)
            } else {
                deletes.append(key: change.key, version: change.lsn, value: "")
            }
        }
        return (upserts, deletes)
    }
}

/// Rows as columns, to bind as arrays to `unnest`.
struct RowColumns {
    var keys: [String] = []
    var versions: [Int64] = []
    var values: [String] = []

    init() {}

    init(_ records: [Record]) {
        keys.reserveCapacity(records.count)
        versions.reserveCapacity(records.count)
        values.reserveCapacity(records.count)
        for record in records { append(key: record.key, version: record.version, value: record.value) }
    }

    mutating func append(key: String, version: LSN, value: String) {
        keys.append(key)
        versions.append(Int64(version))
        values.append(value)
    }

    /// The rows in pieces of at most `size`: a statement binding a few thousand rows costs little
    /// more per row than one binding all, and its buffers stay small.
    func chunks(of size: Int = 5_000) -> [RowColumns] {
        guard keys.count > size else { return [self] }
        return stride(from: 0, to: keys.count, by: size).map { start in
            let end = min(keys.count, start + size)
            var chunk = RowColumns()
            chunk.keys = Array(keys[start..<end])
            chunk.versions = Array(versions[start..<end])
            chunk.values = Array(values[start..<end])
            return chunk
        }
    }
}

/// Reading and writing the ledger's digests in `concord_collections`.
extension DigestLedger {
    /// The stored digests of `collections` that are valid; the others are not tracked.
    static func load(_ collections: [String], from table: String, in db: PostgresSource) async throws -> DigestLedger {
        var ledger = DigestLedger()
        try await ledger.load(collections, from: table, in: db)
        return ledger
    }

    /// Tracks the stored digests of `collections` that are valid and not tracked yet.
    mutating func load(_ collections: [String], from table: String, in db: PostgresSource) async throws {
        guard !collections.isEmpty else { return }
        var binds = PostgresBindings()
        binds.append(collections)
        for row in try await db.rows(
            PostgresQuery(
                unsafeSQL: "SELECT name, count, digest FROM \(table) WHERE name = ANY($1::text[]) AND digest_valid",
                binds: binds))
        {
            let (name, count, sumHex) = try row.decode((String, Int64, String).self)
            guard !tracks(name), let digest = CollectionDigest(count: count, sumHex: sumHex) else { continue }
            track(name, from: digest)
        }
    }

    func save(to table: String, in db: PostgresSource) async throws {
        guard !names.isEmpty else { return }
        var binds = PostgresBindings()
        binds.append(names)
        binds.append(digests.map(\.count))
        binds.append(digests.map(\.sumHex))
        _ = try await db.rows(
            PostgresQuery(
                unsafeSQL: """
                    UPDATE \(table) AS c SET count = u.count, digest = u.digest
                    FROM unnest($1::text[], $2::int8[], $3::text[]) AS u(name, count, digest) WHERE c.name = u.name
                    """, binds: binds))
    }
}
