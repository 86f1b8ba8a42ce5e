import ConcordCore
import Foundation
import GRDB
import Synchronization

/// A feed's source of truth on SQLite: the current records, the change log and the head.
///
/// One file holds everything. Every write batch is one SQLite transaction that takes
/// the next LSNs, appends them to the log, updates the records and moves the head, so
/// the log never has a hole and a reader never sees half a batch.
public final class PublisherStore: Sendable {
    public struct Configuration: Sendable {
        /// `.full` (default): an acknowledged write survives power loss.
        public var durability: SQLiteDurability = .full
        public var limits = WireFormat.Limits()
        /// When checkpoints (the digests at one LSN) go into the stream.
        public var checkpoints = CheckpointPolicy()
        /// How long the log is kept.
        public var retention = RetentionPolicy()
        /// Coded symbols kept per collection for reconciliation; more are computed by a scan.
        public var sketchCapacity = 4096
        public init() {}
    }

    /// Collects the operations of one atomic write.
    public struct Batch: Sendable {
        public fileprivate(set) var operations: [WriteOperation] = []

        /// Sets `key` in `collection` to `json`, which must be one valid JSON value.
        public mutating func upsert(_ collection: String, key: String, json: String) {
            operations.append(.upsert(collection, key, json: json))
        }

        public mutating func delete(_ collection: String, key: String) {
            operations.append(.delete(collection, key))
        }
    }

    public let path: String
    public let configuration: Configuration
    public let feedID: String
    /// The head LSN; long-polls and streams wait on it.
    public let headWatch: HeadWatch
    let pool: DatabasePool
    /// A read-only connection of its own for the reads made on the caller's thread
    /// (``value(of:key:)``, ``marker(_:)``): waiting there for one of the pool's readers could
    /// block the very thread that the asynchronous reads holding them need to give them back.
    let lookups: DatabaseQueue
    /// Each collection's first coded symbols at the head; `nil` until built by a scan.
    let sketches: Mutex<SketchSet?>
    /// Sketches rewound to recent LSNs, so the batches of one reconciliation cost one rewind.
    let rewound = Mutex<[RewoundKey: RatelessSketch]>([:])
    /// The items of one collection at one LSN, for symbols past the kept capacity.
    let scannedItems = Mutex<(key: RewoundKey, items: [SketchItem])?>(nil)
    /// When the last checkpoint was recorded (monotonic), for the time-based policy.
    let lastCheckpoint = Mutex<ContinuousClock.Instant>(.now)

    public init(path: String, configuration: Configuration = Configuration()) throws {
        self.path = path
        self.configuration = configuration
        pool = try SQLiteOpener.open(path: path, durability: configuration.durability)
        do {
            var migrator = DatabaseMigrator()
            migrator.registerMigration("v1") { db in
                try db.execute(
                    sql: """
                        CREATE TABLE concord_feed (
                            id INTEGER PRIMARY KEY CHECK (id = 1),
                            feed_id TEXT NOT NULL,
                            head INTEGER NOT NULL,
                            created_at TEXT NOT NULL
                        );
                        CREATE TABLE concord_log (
                            lsn INTEGER PRIMARY KEY,
                            collection TEXT NOT NULL,
                            key TEXT NOT NULL,
                            op INTEGER NOT NULL,
                            value TEXT,
                            is_commit INTEGER NOT NULL,
                            committed_at INTEGER NOT NULL
                        );
                        CREATE TABLE concord_records (
                            collection TEXT NOT NULL,
                            key TEXT NOT NULL,
                            version INTEGER NOT NULL,
                            value TEXT NOT NULL,
                            PRIMARY KEY (collection, key)
                        ) WITHOUT ROWID;
                        CREATE TABLE concord_collections (
                            name TEXT PRIMARY KEY,
                            count INTEGER NOT NULL
                        );
                        """)
                try db.execute(
                    sql: "INSERT INTO concord_feed (id, feed_id, head, created_at) VALUES (1, ?, 0, ?)",
                    arguments: [UUID().uuidString.lowercased(), ISO8601DateFormatter().string(from: Date())])
            }
            migrator.registerMigration("v2-digests") { db in
                // Each change names the element it replaced; each collection keeps its digest.
                // Files from before get their digests by one scan, never a silently wrong zero.
                try db.execute(sql: "ALTER TABLE concord_log ADD COLUMN before TEXT")
                try db.execute(sql: "ALTER TABLE concord_collections ADD COLUMN digest TEXT")
                for name in try String.fetchAll(db, sql: "SELECT name FROM concord_collections") {
                    let digest = try Self.scanDigest(of: name, in: db)
                    try db.execute(
                        sql: "UPDATE concord_collections SET digest = ? WHERE name = ?",
                        arguments: [digest.sumHex, name])
                }
            }
            migrator.registerMigration("v3-reconcile") { db in
                // key_hash finds the records a reconciliation names by their element's key hash.
                try db.execute(
                    sql: """
                        ALTER TABLE concord_records ADD COLUMN key_hash INTEGER NOT NULL DEFAULT 0;
                        CREATE TABLE concord_checkpoints (lsn INTEGER PRIMARY KEY, digests TEXT NOT NULL);
                        """)
                let rows = try Row.fetchAll(db, sql: "SELECT collection, key FROM concord_records")
                for row in rows {
                    let hash = Element.keyHash(collection: row["collection"], key: row["key"])
                    try db.execute(
                        sql: "UPDATE concord_records SET key_hash = ? WHERE collection = ? AND key = ?",
                        arguments: [Int64(bitPattern: hash), row["collection"] as String, row["key"] as String])
                }
                try db.execute(
                    sql: "CREATE INDEX concord_records_key_hash ON concord_records (collection, key_hash)")
            }
            migrator.registerMigration("v4-markers") { db in
                // Where a capture from another database is, written with the changes it produced.
                try db.execute(sql: "CREATE TABLE concord_markers (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            }
            try migrator.migrate(pool)
            // A copy into empty collections leaves the key-hash index out until it ends; one cut
            // short by a crash gets it back here.
            try pool.write { db in try db.execute(sql: Self.createKeyHashIndex) }
            let (feedID, head) = try pool.read { db -> (String, LSN) in
                let row = try Row.fetchOne(db, sql: "SELECT feed_id, head FROM concord_feed WHERE id = 1")!
                return (row["feed_id"], LSN(row["head"] as Int64))
            }
            self.feedID = feedID
            headWatch = HeadWatch(head: head)
            var lookupConfiguration = GRDB.Configuration()
            lookupConfiguration.readonly = true
            lookupConfiguration.busyMode = .timeout(10)
            lookups = try DatabaseQueue(path: path, configuration: lookupConfiguration)
            let capacity = configuration.sketchCapacity
            sketches = Mutex(try pool.read { db in try Self.scanSketches(capacity: capacity, in: db) })
        } catch {
            throw ConcordError.storage(error, "cannot prepare publisher database \(path)")
        }
    }

    public var head: LSN { headWatch.head }

    /// Applies the operations collected by `build` atomically; returns the LSN of the last one.
    @discardableResult
    public func write(_ build: (inout Batch) throws -> Void) async throws -> LSN {
        var batch = Batch()
        try build(&batch)
        return try await write(batch.operations)
    }

    /// Applies `operations` atomically, in order; returns the LSN of the last one.
    @discardableResult
    public func write(_ operations: [WriteOperation]) async throws -> LSN {
        try await write(operations, marker: nil)
    }

    /// Applies `operations` atomically and, in the same transaction, sets the marker `name` to
    /// `value`: a capture's position in its source commits with what it produced. Without
    /// operations only the marker is written, and the head stays.
    @discardableResult
    public func write(_ operations: [WriteOperation], marker: (name: String, value: String)?) async throws -> LSN {
        guard !operations.isEmpty || marker != nil else {
            throw ConcordError(.invalidRequest, "a write needs at least one change")
        }
        return try await write(transactions: [operations], marker: marker)
    }

    /// Appends `transactions` in order, each one atomic in the log as a write of its own, in a
    /// single SQLite transaction that also sets the marker: a capture commits every source
    /// transaction of one poll at once instead of paying a commit for each. Empty transactions
    /// are left out; with none left only the marker is written, and the head stays.
    @discardableResult
    public func write(transactions: [[WriteOperation]], marker: (name: String, value: String)?) async throws -> LSN {
        try await write(transactions: transactions, marker: marker, keysAreNew: false)
    }

    /// Appends `operations` atomically as upserts of keys the store does not hold, as a copy into
    /// an empty collection writes them: no previous version is looked up, and a key already held
    /// fails the whole write instead of being replaced unseen.
    @discardableResult
    public func insertNew(_ operations: [WriteOperation]) async throws -> LSN {
        guard operations.allSatisfy({ $0.operation == .upsert }) else {
            throw ConcordError(.invalidRequest, "only upserts insert new records")
        }
        return try await write(transactions: [operations], marker: nil, keysAreNew: true)
    }

    /// Appends one transaction given in pieces, in one SQLite transaction that also sets the
    /// marker ``TransactionPieces/end(marker:)`` names: readers see all of it or none of it.
    /// Returns the LSN of its last change (the head as it was, when it had none).
    ///
    /// Holds the write lock until the transaction ends or is given up, which rolls it back.
    @discardableResult
    public func write(_ pieces: TransactionPieces) async throws -> LSN {
        let last: LSN
        do {
            last = try await pool.write { db in
                do {
                    return try self.append(pieces, in: db)
                } catch {
                    // Forgotten before the write lock is let go: the kept sketches hold the
                    // pieces that are rolled back, and a reader waiting for the lock copies them.
                    self.sketches.withLock { $0 = nil }
                    self.rewound.withLock { $0.removeAll() }
                    throw error
                }
            }
        } catch {
            sketches.withLock { $0 = nil }
            let failure = ConcordError.storage(error, "write failed")
            pieces.finish(.failure(failure))
            throw failure
        }
        headWatch.advance(to: last)
        pieces.finish(.success(last))
        return last
    }

    /// Appends the pieces as they come, inside the transaction open on `db`, until their end.
    private func append(_ pieces: TransactionPieces, in db: Database) throws -> LSN {
        var appender = try LogAppender(keysAreNew: false, in: db)
        let start = appender.lsn
        while true {
            switch try pieces.next() {
            case .operations(var operations):
                try self.validate(&operations)
                try appender.append(operations, endingTransaction: false)
                // Folded in piece by piece: they are read under the write lock, and
                // a transaction that fails forgets them.
                self.sketches.withLock { [touched = appender.touched] in $0?.apply(touched) }
                appender.touched.removeAll(keepingCapacity: true)
            case .lookup(let collection, let key, let reply):
                reply(Result { try Self.values(of: collection, keys: [key], in: db)[0] })
            case .end(let marker):
                if appender.lsn > start {
                    try appender.endTransaction()
                    try appender.finish()
                    try recordCheckpointIfDue(from: start, to: appender.lsn, in: db)
                }
                if let marker { try Self.setMarker(marker, in: db) }
                return appender.lsn
            }
        }
    }

    /// Records a checkpoint at `last`, inside the write that took the LSNs after `first`, when
    /// the policy's interval has passed or the write crossed one of its boundaries.
    private func recordCheckpointIfDue(from first: LSN, to last: LSN, in db: Database) throws {
        let policy = configuration.checkpoints
        let due = ContinuousClock.now - lastCheckpoint.withLock { $0 } >= policy.interval
        guard due || policy.crossesBoundary(from: first, to: last) else { return }
        try Self.recordCheckpoint(at: last, in: db)
        lastCheckpoint.withLock { $0 = .now }
    }

    private func write(transactions: [[WriteOperation]], marker: (name: String, value: String)?, keysAreNew: Bool)
        async throws -> LSN
    {
        let transactions = transactions.filter { !$0.isEmpty }
        guard !transactions.isEmpty else {
            guard let marker else { throw ConcordError(.invalidRequest, "a write needs at least one change") }
            do {
                try await pool.write { db in try Self.setMarker(marker, in: db) }
            } catch {
                throw ConcordError.storage(error, "cannot record \(marker.name)")
            }
            return head
        }
        var checked = transactions
        for transaction in checked.indices {
            try validate(&checked[transaction])
        }
        let batch = checked
        let count = LSN(batch.reduce(0) { $0 + $1.count })
        let last: LSN
        do {
            last = try await pool.write { db in
                let (last, touched) = try Self.append(batch, keysAreNew: keysAreNew, in: db)
                if let marker { try Self.setMarker(marker, in: db) }
                try self.recordCheckpointIfDue(from: last - count, to: last, in: db)
                // Inside the write, so a reader that copies the sketches under the write lock
                // sees them at exactly the committed head.
                self.sketches.withLock { $0?.apply(touched) }
                return last
            }
        } catch {
            // The sketches may hold changes of a transaction that did not commit: rebuild them.
            sketches.withLock { $0 = nil }
            throw ConcordError.storage(error, "write failed")
        }
        headWatch.advance(to: last)
        return last
    }

    /// Checks names, sizes and values against the limits; compacts values not checked before.
    private func validate(_ operations: inout [WriteOperation]) throws {
        let limits = configuration.limits
        for index in operations.indices {
            let operation = operations[index]
            try CollectionName.validate(operation.collection)
            guard !operation.key.isEmpty, operation.key.utf8.count <= limits.maxKeyBytes else {
                throw ConcordError(.invalidRequest, "key must be 1 to \(limits.maxKeyBytes) bytes")
            }
            if let value = operation.value {
                guard value.utf8.count <= limits.maxValueBytes else {
                    throw ConcordError(.tooLarge, "value larger than \(limits.maxValueBytes) bytes")
                }
                if !operation.valueIsChecked {
                    let scanner = JSONScanner(value, maxDepth: limits.maxDepth)
                    operations[index].value = scanner.compactText(try scanner.document())
                }
            } else if operation.operation == .upsert {
                throw ConcordError(.invalidRequest, "an upsert needs a value")
            }
        }
    }

    static func setMarker(_ marker: (name: String, value: String), in db: Database) throws {
        try db.execute(
            sql: "INSERT INTO concord_markers (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = ?",
            arguments: [marker.name, marker.value, marker.value])
    }

    /// The marker `name`, as last written with ``write(_:marker:)``.
    public func marker(_ name: String) throws -> String? {
        try lookups.read { db in
            try String.fetchOne(db, sql: "SELECT value FROM concord_markers WHERE name = ?", arguments: [name])
        }
    }

    /// The current value of one record, `nil` when there is none. Read on the calling thread:
    /// a capture asks this once per changed row that left a large value out, and with an
    /// asynchronous read such updates cost three times as much CPU.
    public func value(of collection: String, key: String) throws -> String? {
        do {
            return try lookups.read { db in try Self.values(of: collection, keys: [key], in: db)[0] }
        } catch {
            throw ConcordError.storage(error, "cannot read collection \(collection)")
        }
    }

    /// The current values of many records of one collection, read in one transaction: one
    /// entry per key, in the order asked, `nil` where there is no record.
    public func values(of collection: String, keys: [String]) async throws -> [String?] {
        do {
            return try await pool.read { db in try Self.values(of: collection, keys: keys, in: db) }
        } catch {
            throw ConcordError.storage(error, "cannot read collection \(collection)")
        }
    }

    static func values(of collection: String, keys: [String], in db: Database) throws -> [String?] {
        let find = RawStatement(
            try db.cachedStatement(sql: "SELECT value FROM concord_records WHERE collection = ?1 AND key = ?2"), in: db)
        defer { find.reset() }
        find.bind(1, collection)
        var values: [String?] = []
        values.reserveCapacity(keys.count)
        for key in keys {
            find.bind(2, key)
            values.append(try find.step() ? find.text(0) : nil)
            find.reset()
        }
        return values
    }

    /// Every key of a collection, in key order.
    public func keys(of collection: String) async throws -> [String] {
        try await pool.read { db in
            try String.fetchAll(
                db, sql: "SELECT key FROM concord_records WHERE collection = ? ORDER BY key", arguments: [collection])
        }
    }

    /// What one change did to the elements of its collection.
    package struct ElementChange: Sendable {
        package var collection: String
        package var before: Element?
        package var after: Element?

        package init(collection: String, before: Element?, after: Element?) {
            self.collection = collection
            self.before = before
            self.after = after
        }
    }

    private static func append(_ transactions: [[WriteOperation]], keysAreNew: Bool, in db: Database) throws -> (
        LSN, [ElementChange]
    ) {
        var appender = try LogAppender(keysAreNew: keysAreNew, in: db)
        // Reserved once: reserving per transaction would copy the array for each one.
        appender.touched.reserveCapacity(transactions.reduce(0) { $0 + $1.count })
        for operations in transactions {
            try appender.append(operations, endingTransaction: true)
        }
        try appender.finish()
        return (appender.lsn, appender.touched)
    }

    /// Appends changes to the log inside the SQLite transaction open on `db`: each takes the
    /// next LSN, names the element it replaced, and updates its record, digest and count. The
    /// counts, digests and head are stored by ``finish()``.
    struct LogAppender {
        let db: Database
        let keysAreNew: Bool
        let now = Int(Date().timeIntervalSince1970 * 1000)
        let find: RawStatement
        let upsert: RawStatement
        let delete: RawStatement
        let log: RawStatement
        /// The LSN of the last change appended (the head, before the first).
        private(set) var lsn: LSN
        private var countDeltas: [String: Int] = [:]
        private var digests: [String: CollectionDigest] = [:]
        /// What the changes appended did to the elements, for the kept sketches.
        var touched: [ElementChange] = []

        init(keysAreNew: Bool, in db: Database) throws {
            self.db = db
            self.keysAreNew = keysAreNew
            lsn = try LSN(Int64.fetchOne(db, sql: "SELECT head FROM concord_feed WHERE id = 1")!)
            find = RawStatement(
                try db.cachedStatement(
                    sql: "SELECT version, value, key_hash FROM concord_records WHERE collection = ?1 AND key = ?2"),
                in: db)
            // New keys are inserted without ON CONFLICT: a key held after all is a failed write.
            upsert = RawStatement(
                try db.cachedStatement(
                    sql: """
                        INSERT INTO concord_records (collection, key, version, value, key_hash)
                        VALUES (?1, ?2, ?3, ?4, ?5)
                        """
                            + (keysAreNew
                                ? ""
                                : " ON CONFLICT (collection, key) DO UPDATE SET version = excluded.version, value = excluded.value")
                ), in: db)
            delete = RawStatement(
                try db.cachedStatement(sql: "DELETE FROM concord_records WHERE collection = ?1 AND key = ?2"), in: db)
            log = RawStatement(
                try db.cachedStatement(
                    sql: """
                        INSERT INTO concord_log (lsn, collection, key, op, value, is_commit, committed_at, before)
                        VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                        """), in: db)
        }

        /// Appends `operations`; `endingTransaction`: the last one ends a transaction.
        mutating func append(_ operations: [WriteOperation], endingTransaction: Bool) throws {
            for (index, operation) in operations.enumerated() {
                lsn += 1
                var existed = false
                var before: Element?
                if !keysAreNew {
                    find.bind(1, operation.collection)
                    find.bind(2, operation.key)
                    existed = try find.step()
                    if existed {
                        // The key hash stored with the record saves one of the element's two
                        // SHA-256 (zero only in a file from before it was kept: then computed).
                        let storedKeyHash = UInt64(bitPattern: find.int64(2))
                        before = Element(
                            collection: operation.collection, key: operation.key, version: LSN(find.int64(0)),
                            value: find.text(1), keyHash: storedKeyHash == 0 ? nil : storedKeyHash)
                    }
                    find.reset()
                }
                if digests[operation.collection] == nil {
                    digests[operation.collection] = try PublisherStore.storedDigest(of: operation.collection, in: db)
                }
                if let before { digests[operation.collection]!.remove(before) }
                let after = operation.value.map {
                    Element(
                        collection: operation.collection, key: operation.key, version: lsn, value: $0,
                        keyHash: before?.keyHash)
                }
                if let after { digests[operation.collection]!.add(after) }
                touched.append(ElementChange(collection: operation.collection, before: before, after: after))
                if let value = operation.value, let after {
                    upsert.bind(1, operation.collection)
                    upsert.bind(2, operation.key)
                    upsert.bind(3, lsn)
                    upsert.bind(4, value)
                    upsert.bind(5, after.keyHash)
                    try upsert.run()
                    if !existed { countDeltas[operation.collection, default: 0] += 1 }
                } else if existed {
                    delete.bind(1, operation.collection)
                    delete.bind(2, operation.key)
                    try delete.run()
                    countDeltas[operation.collection, default: 0] -= 1
                }
                if countDeltas[operation.collection] == nil { countDeltas[operation.collection] = 0 }
                log.bind(1, lsn)
                log.bind(2, operation.collection)
                log.bind(3, operation.key)
                log.bind(4, operation.value == nil ? 1 : 0)
                if let value = operation.value { log.bind(5, value) } else { log.bindNull(5) }
                log.bind(6, endingTransaction && index == operations.count - 1 ? 1 : 0)
                log.bind(7, now)
                if let before { log.bind(8, before.description) } else { log.bindNull(8) }
                try log.run()
            }
        }

        /// Marks the last change appended as the end of its transaction: the last piece of a
        /// transaction given in pieces can come empty.
        func endTransaction() throws {
            try db.execute(sql: "UPDATE concord_log SET is_commit = 1 WHERE lsn = ?", arguments: [Int64(lsn)])
        }

        /// Stores the counts, digests and head.
        func finish() throws {
            for (collection, delta) in countDeltas {
                try db.execute(
                    sql: """
                        INSERT INTO concord_collections (name, count, digest) VALUES (?, ?, ?)
                        ON CONFLICT (name) DO UPDATE SET count = count + excluded.count, digest = excluded.digest
                        """, arguments: [collection, delta, digests[collection]!.sumHex])
            }
            try db.execute(sql: "UPDATE concord_feed SET head = ? WHERE id = 1", arguments: [Int64(lsn)])
        }
    }

    static let createKeyHashIndex =
        "CREATE INDEX IF NOT EXISTS concord_records_key_hash ON concord_records (collection, key_hash)"

    /// Drops the index that finds records by key hash, while a copy fills empty collections:
    /// its random inserts cost about a third of such a copy, and one sorted build at the end
    /// (``buildKeyHashIndex()``, or the next open after a crash) costs a fraction of that.
    /// Lookups by key hash scan the collection meanwhile.
    public func dropKeyHashIndex() async throws {
        do {
            try await pool.write { db in try db.execute(sql: "DROP INDEX IF EXISTS concord_records_key_hash") }
        } catch {
            throw ConcordError.storage(error, "cannot drop the key-hash index")
        }
    }

    /// Builds the key-hash index when it is missing.
    public func buildKeyHashIndex() async throws {
        do {
            try await pool.write { db in try db.execute(sql: Self.createKeyHashIndex) }
        } catch {
            throw ConcordError.storage(error, "cannot build the key-hash index")
        }
    }

    /// A collection's digest as stored (the empty digest for a collection not written yet).
    static func storedDigest(of collection: String, in db: Database) throws -> CollectionDigest {
        guard
            let row = try Row.fetchOne(
                db, sql: "SELECT count, digest FROM concord_collections WHERE name = ?", arguments: [collection])
        else { return .empty }
        let count: Int64 = row["count"]
        guard let digest = CollectionDigest(count: count, sumHex: row["digest"] ?? "") else {
            throw ConcordError(.storage, "the stored digest of \(collection) is unreadable")
        }
        return digest
    }

    /// A collection's digest computed from its records, for checking the stored one.
    static func scanDigest(of collection: String, in db: Database) throws -> CollectionDigest {
        var digest = CollectionDigest.empty
        let rows = try Row.fetchCursor(
            db, sql: "SELECT key, version, value FROM concord_records WHERE collection = ?", arguments: [collection])
        while let row = try rows.next() {
            digest.add(
                Element(
                    collection: collection, key: row["key"], version: LSN(row["version"] as Int64), value: row["value"])
            )
        }
        return digest
    }

    /// Each collection's stored digest and the digest recomputed from its records.
    public func digestCheck() async throws -> [(
        collection: String, stored: CollectionDigest, scanned: CollectionDigest
    )] {
        try await pool.read { db in
            try String.fetchAll(db, sql: "SELECT name FROM concord_collections ORDER BY name").map { name in
                (name, try Self.storedDigest(of: name, in: db), try Self.scanDigest(of: name, in: db))
            }
        }
    }

    /// The feed's id, head, retained range and collections.
    public func feedInfo() async throws -> FeedInfo {
        do {
            return try await pool.read { [feedID] db in
                let head = try LSN(Int64.fetchOne(db, sql: "SELECT head FROM concord_feed WHERE id = 1")!)
                let oldest = try Int64.fetchOne(db, sql: "SELECT min(lsn) FROM concord_log").map(LSN.init) ?? head + 1
                let collections = try Row.fetchAll(
                    db, sql: "SELECT name, count, digest FROM concord_collections ORDER BY name"
                ).map { row in
                    FeedInfo.Collection(
                        name: row["name"], count: row["count"],
                        digest: CollectionDigest(count: row["count"], sumHex: row["digest"] ?? ""))
                }
                return FeedInfo(feedID: feedID, head: head, oldest: oldest, collections: collections)
            }
        } catch {
            throw ConcordError.storage(error, "cannot read feed info")
        }
    }

    /// When the change at `lsn` was committed, if the log still holds it: a reader at `lsn - 1`
    /// lags by the time since then.
    public func committedAt(_ lsn: LSN) async throws -> Date? {
        do {
            return try await pool.read { db in
                try Int64.fetchOne(
                    db, sql: "SELECT committed_at FROM concord_log WHERE lsn = ?", arguments: [Int64(clamping: lsn)]
                )
                .map { Date(timeIntervalSince1970: Double($0) / 1000) }
            }
        } catch {
            throw ConcordError.storage(error, "cannot read the log")
        }
    }

    /// Stream items after `after`: at least one whole source transaction when any exists,
    /// about `limit` changes, never ending inside a transaction; with `wholeTransactions`
    /// false, at most `limit` changes, ending wherever they do (a stream reader assembles
    /// transactions itself, and gets a large one's first changes before the rest are read).
    ///
    /// With `collections`, changes of other collections come as `skip` items, so the
    /// reader can still check that the LSNs join.
    public func items(after: LSN, limit: Int, collections: Set<String>? = nil, wholeTransactions: Bool = true)
        async throws -> [StreamItem]
    {
        let limit = max(1, limit)
        let rows: [Change]
        do {
            rows = try await pool.read { db in
                try Self.readLog(after: after, limit: limit, wholeTransactions: wholeTransactions, in: db)
            }
        } catch {
            throw ConcordError.storage(error, "cannot read the log")
        }
        guard let collections else { return rows.map(StreamItem.change) }
        var items: [StreamItem] = []
        var skipStart: LSN?
        for change in rows {
            if collections.contains(change.collection) {
                if let start = skipStart {
                    items.append(.skip(from: start, through: change.lsn - 1, isCommit: false))
                    skipStart = nil
                }
                items.append(.change(change))
            } else {
                if skipStart == nil { skipStart = change.lsn }
                if change.isCommit {
                    items.append(.skip(from: skipStart!, through: change.lsn, isCommit: true))
                    skipStart = nil
                }
            }
        }
        // Rows that end inside a transaction may end in changes of other collections.
        if let start = skipStart, let last = rows.last {
            items.append(.skip(from: start, through: last.lsn, isCommit: false))
        }
        return items
    }

    /// Checks that a reader may start after `after`: not past the head, not before retention.
    public func checkPosition(_ after: LSN) async throws {
        let head = self.head
        if after > head {
            throw ConcordError(.beyondHead, "after=\(after) is beyond the head LSN \(head)")
        }
        let oldest = try await feedInfo().oldest
        if after + 1 < oldest {
            throw ConcordError(
                .gone, "changes after \(after) are no longer retained; the oldest retained LSN is \(oldest)")
        }
    }

    private static func readLog(after: LSN, limit: Int, wholeTransactions: Bool, in db: Database) throws -> [Change] {
        let select = RawStatement(
            try db.cachedStatement(
                sql: """
                    SELECT lsn, collection, key, op, value, is_commit, before FROM concord_log
                    WHERE lsn > ?1 AND lsn <= ?2 ORDER BY lsn LIMIT ?3
                    """), in: db)
        func fetch(after: LSN, through: LSN, limit: Int, into changes: inout [Change]) throws {
            select.bind(1, after)
            select.bind(2, through)
            select.bind(3, limit)
            defer { select.reset() }
            while try select.step() {
                let isDelete = select.int64(3) == 1
                changes.append(
                    Change(
                        lsn: LSN(select.int64(0)), collection: select.text(1), key: select.text(2),
                        operation: isDelete ? .delete : .upsert, value: isDelete ? nil : select.text(4),
                        isCommit: select.int64(5) == 1, before: select.isNull(6) ? nil : Element(hex: select.text(6))))
            }
        }
        var changes: [Change] = []
        changes.reserveCapacity(min(limit, 65536))
        try fetch(after: after, through: LSN(Int64.max), limit: limit, into: &changes)
        if wholeTransactions, let last = changes.last, !last.isCommit {
            // Finish the transaction the limit cut.
            if let end = try Int64.fetchOne(
                db, sql: "SELECT lsn FROM concord_log WHERE lsn > ? AND is_commit = 1 ORDER BY lsn LIMIT 1",
                arguments: [Int64(last.lsn)])
            {
                try fetch(after: last.lsn, through: LSN(end), limit: Int(Int32.max), into: &changes)
            }
        }
        return changes
    }

    /// Up to `limit` records of `collection` with keys after `afterKey`, read in one
    /// read transaction and stamped with the head LSN of that transaction.
    public func page(collection: String, afterKey: String?, limit: Int) async throws -> SnapshotPage {
        let limit = max(1, limit)
        do {
            return try await pool.read { db in
                guard
                    try Bool.fetchOne(
                        db, sql: "SELECT 1 FROM concord_collections WHERE name = ?", arguments: [collection]) ?? false
                else {
                    throw ConcordError(.unknownCollection, "no collection named \"\(collection)\"")
                }
                let head = try LSN(Int64.fetchOne(db, sql: "SELECT head FROM concord_feed WHERE id = 1")!)
                let select = RawStatement(
                    try db.cachedStatement(
                        sql: """
                            SELECT key, version, value FROM concord_records
                            WHERE collection = ?1 AND key > ?2 ORDER BY key LIMIT ?3
                            """), in: db)
                select.bind(1, collection)
                select.bind(2, afterKey ?? "")
                select.bind(3, limit + 1)
                defer { select.reset() }
                var records: [Record] = []
                records.reserveCapacity(min(limit, 65536))
                while try select.step() {
                    records.append(Record(key: select.text(0), version: LSN(select.int64(1)), value: select.text(2)))
                }
                let hasMore = records.count > limit
                if hasMore { records.removeLast() }
                return SnapshotPage(collection: collection, lsn: head, records: records, hasMore: hasMore)
            }
        } catch {
            throw ConcordError.storage(error, "cannot read collection \(collection)")
        }
    }

    /// All live records of `collection` in key order (for checks and tools; reads the whole collection).
    public func records(of collection: String) async throws -> [ConcordCore.Record] {
        var all: [Record] = []
        var afterKey: String?
        while true {
            let page = try await page(collection: collection, afterKey: afterKey, limit: 10_000)
            all.append(contentsOf: page.records)
            guard page.hasMore, let last = page.records.last else { return all }
            afterKey = last.key
        }
    }
}
