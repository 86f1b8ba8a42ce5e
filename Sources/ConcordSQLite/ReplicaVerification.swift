import ConcordCore
import Foundation
import GRDB

/// The digests of the collections one write transaction touches, and the element changes the
/// in-memory sketches need after it; what both replica stores keep while they write.
package struct DigestLedger {
    /// The tracked collections and their digests, side by side: a transaction touches one or
    /// a few collections, and comparing names beats hashing them once per change.
    package private(set) var names: [String] = []
    package private(set) var digests: [CollectionDigest] = []
    package private(set) var elementChanges: [PublisherStore.ElementChange] = []

    package init() {}

    /// Tracks `collection` from its stored `digest`.
    package mutating func track(_ collection: String, from digest: CollectionDigest) {
        names.append(collection)
        digests.append(digest)
    }

    package func tracks(_ collection: String) -> Bool { names.contains(collection) }

    /// Notes that a record of `collection` went from `before` to `after` (either may be absent);
    /// untracked collections are ignored.
    package mutating func record(_ collection: String, before: Element?, after: Element?) {
        guard before != after, let index = names.firstIndex(of: collection) else { return }
        if let before { digests[index].remove(before) }
        if let after { digests[index].add(after) }
        elementChanges.append(.init(collection: collection, before: before, after: after))
    }
}

/// Keeps the digests of the collections one apply transaction touches, and the element
/// changes the in-memory sketches need after it.
///
/// In LSN order a change replaces the element its `before` names (the source's, equal to
/// the replica's when both are in step); in merge mode, where a change may be skipped, the
/// replica's own row is read before and after, so the digest always describes the disk.
struct DigestTracker {
    let db: Database
    let exactFromDisk: Bool
    private var ledger = DigestLedger()
    private var before: Element?
    var elementChanges: [PublisherStore.ElementChange] { ledger.elementChanges }

    init(db: Database, collections: Set<String>, exactFromDisk: Bool) throws {
        self.db = db
        self.exactFromDisk = exactFromDisk
        for collection in collections {
            if let digest = try Self.storedDigest(of: collection, in: db) { ledger.track(collection, from: digest) }
        }
    }

    static func storedDigest(of collection: String, in db: Database) throws -> CollectionDigest? {
        guard
            let row = try Row.fetchOne(
                db, sql: "SELECT count, digest, digest_valid FROM concord_collections WHERE name = ?",
                arguments: [collection]), row["digest_valid"] as Bool
        else { return nil }
        return CollectionDigest(count: row["count"], sumHex: row["digest"])
    }

    mutating func willApply(_ change: Change) throws {
        guard ledger.tracks(change.collection) else { return }
        before = exactFromDisk ? try Self.element(of: change.collection, key: change.key, in: db) : change.before
    }

    mutating func didApply(_ change: Change) throws {
        guard ledger.tracks(change.collection) else { return }
        let after =
            exactFromDisk
            ? try Self.element(of: change.collection, key: change.key, in: db) : change.after ?? Element(change)
        ledger.record(change.collection, before: before, after: after)
    }

    /// Notes that a record of `collection` went from `before` to `after` (either may be absent).
    mutating func record(_ collection: String, before: Element?, after: Element?) {
        ledger.record(collection, before: before, after: after)
    }

    static func element(of collection: String, key: String, in db: Database) throws -> Element? {
        guard
            let row = try Row.fetchOne(
                db.cachedStatement(sql: "SELECT version, value FROM \(SQLiteOpener.quote(collection)) WHERE key = ?"),
                arguments: [key])
        else { return nil }
        return Element(collection: collection, key: key, version: LSN(row[0] as Int64), value: row[1])
    }

    func save() throws {
        for (collection, digest) in zip(ledger.names, ledger.digests) {
            try db.execute(
                sql: "UPDATE concord_collections SET count = ?, digest = ? WHERE name = ?",
                arguments: [digest.count, digest.sumHex, collection])
        }
    }

    static func invalidate(_ collections: some Sequence<String>, in db: Database) throws {
        for collection in collections {
            try db.execute(
                sql: "UPDATE concord_collections SET digest_valid = 0 WHERE name = ?", arguments: [collection])
        }
    }
}

extension ReplicaStore {
    public static let sketchCapacity = ReplicaSketch.capacity

    /// Queues element changes for the in-memory sketches (dropped while they are not built).
    func updateSketches(_ changes: [PublisherStore.ElementChange]) {
        sketches.queue(changes)
    }

    /// Hashes every stored row of `collection`.
    static func scan(_ collection: String, in db: Database, progress: ((Int) -> Void)? = nil) throws
        -> ScannedCollection
    {
        var scanned = ScannedCollection(collection: collection)
        let select = RawStatement(
            try db.cachedStatement(sql: "SELECT key, version, value FROM \(SQLiteOpener.quote(collection))"), in: db)
        defer { select.reset() }
        while try select.step() {
            scanned.add(
                Element(
                    collection: collection, key: select.text(0), version: LSN(select.int64(1)), value: select.text(2)),
                progress: progress)
        }
        scanned.reportRest(to: progress)
        return scanned
    }

    /// The sketch items of `collection`'s stored rows, for coded symbols past the kept capacity.
    public func sketchItems(of collection: String) async throws -> [SketchItem] {
        try await pool.read { db in
            guard try db.tableExists(collection) else { return [] }
            var items: [SketchItem] = []
            let select = RawStatement(
                try db.cachedStatement(sql: "SELECT key, version, value FROM \(SQLiteOpener.quote(collection))"),
                in: db)
            defer { select.reset() }
            while try select.step() {
                items.append(
                    SketchItem(
                        Element(
                            collection: collection, key: select.text(0), version: LSN(select.int64(1)),
                            value: select.text(2))))
            }
            return items
        }
    }

    /// Whether every digest is valid and the sketches are built.
    public func digestsReady() throws -> Bool {
        let invalid = try pool.read { db in
            try Int.fetchOne(db, sql: "SELECT count(*) FROM concord_collections WHERE digest_valid = 0") ?? 0
        }
        return invalid == 0 && sketches.isBuilt
    }

    /// Rebuilds digests and sketches from the stored rows where they are not known; call it
    /// when the replica applies in LSN order (after bootstrap, or on start).
    public func rebuildDigests() async throws {
        try await pool.write { db in
            var set = SketchSet(capacity: Self.sketchCapacity)
            for name in try String.fetchAll(db, sql: "SELECT name FROM concord_collections ORDER BY name") {
                let scanned = try Self.scan(name, in: db)
                set.set(name, scanned.sketch)
                try db.execute(
                    sql: "UPDATE concord_collections SET count = ?, digest = ?, digest_valid = 1 WHERE name = ?",
                    arguments: [scanned.digest.count, scanned.digest.sumHex, name])
            }
            self.sketches.install(set)
        }
    }

    /// The stored digest of each collection (`nil` where it must be rebuilt).
    public func digests() throws -> [String: CollectionDigest?] {
        try pool.read { db in
            var result: [String: CollectionDigest?] = [:]
            for name in try String.fetchAll(db, sql: "SELECT name FROM concord_collections") {
                result[name] = try DigestTracker.storedDigest(of: name, in: db)
            }
            return result
        }
    }

    /// The replica's kept sketch of `collection`, or one from a scan when none is kept.
    public func sketch(of collection: String) async throws -> RatelessSketch {
        if let kept = sketches.sketch(of: collection) { return kept }
        return try await pool.read { db in
            guard try db.tableExists(collection) else { return RatelessSketch(capacity: Self.sketchCapacity) }
            return try Self.scan(collection, in: db).sketch
        }
    }

    /// Compares `checkpoint` with the replica's digests; records "verified at" on a match.
    public func check(_ checkpoint: Checkpoint) async throws -> CheckpointOutcome {
        try await pool.write { db in try Self.judge(checkpoint, in: db) }
    }

    /// Compares `checkpoint` with the stored digests inside a write transaction.
    static func judge(_ checkpoint: Checkpoint, in db: Database) throws -> CheckpointOutcome {
        guard let state = try Self.readState(db), state.position == checkpoint.lsn,
            state.progress.phase == .following, state.progress.applyMode(position: state.position) == .ordered
        else { return .notJudged }
        let followed = state.collections.map(Set.init)
        var local: [String: CollectionDigest] = [:]
        for name in try String.fetchAll(db, sql: "SELECT name FROM concord_collections") {
            if let followed, !followed.contains(name) { continue }
            guard let digest = try DigestTracker.storedDigest(of: name, in: db) else { return .notJudged }
            local[name] = digest
        }
        let differing = checkpoint.differing(from: local, followed: followed)
        if differing.isEmpty {
            try db.execute(
                sql: "UPDATE concord_state SET verified_lsn = ?, verified_at = ? WHERE id = 1",
                arguments: [Int64(checkpoint.lsn), Date().timeIntervalSince1970])
            return .verified
        }
        try db.execute(sql: "UPDATE concord_state SET mismatches = mismatches + 1 WHERE id = 1")
        return .mismatch(collections: differing)
    }

    /// Re-hashes every stored row and compares with the kept digests: returns the
    /// collections whose rows changed behind Concord's back, as they are on disk.
    public func scrub() async throws -> [ScannedCollection] {
        try await pool.read { db in
            var changed: [ScannedCollection] = []
            for name in try String.fetchAll(db, sql: "SELECT name FROM concord_collections ORDER BY name") {
                guard let stored = try DigestTracker.storedDigest(of: name, in: db) else { continue }
                let scanned = try Self.scan(name, in: db)
                if scanned.digest != stored { changed.append(scanned) }
            }
            return changed
        }
    }

    /// Makes the kept digest and sketch of a collection those of its stored rows (after a
    /// scrub found them different), so the following reconciliation starts from the disk.
    public func adopt(_ scanned: ScannedCollection, countingMismatch: Bool = false) async throws {
        try await pool.write { db in
            try db.execute(
                sql: "UPDATE concord_collections SET count = ?, digest = ?, digest_valid = 1 WHERE name = ?",
                arguments: [scanned.digest.count, scanned.digest.sumHex, scanned.collection])
            if countingMismatch {
                try db.execute(sql: "UPDATE concord_state SET mismatches = mismatches + 1 WHERE id = 1")
            }
            self.sketches.replace(scanned.collection, by: scanned.sketch)
        }
    }

    /// The keys of `collection` whose key hashes are in `keyHashes` (one scan of the keys).
    public func keys(of collection: String, keyHashes: Set<UInt64>) async throws -> [UInt64: String] {
        guard !keyHashes.isEmpty else { return [:] }
        return try await pool.read { db in
            guard try db.tableExists(collection) else { return [:] }
            var found: [UInt64: String] = [:]
            let select = RawStatement(
                try db.cachedStatement(sql: "SELECT key FROM \(SQLiteOpener.quote(collection))"), in: db)
            defer { select.reset() }
            while try select.step() {
                let key = select.text(0)
                let hash = Element.keyHash(collection: collection, key: key)
                if keyHashes.contains(hash) { found[hash] = key }
            }
            return found
        }
    }

    /// Writes what the source holds for keys found to differ and deletes the keys it does
    /// not hold, in one transaction; the digest follows the rows exactly.
    ///
    /// Records newer than the LSN `at` raise the horizon: until the position passes it,
    /// changes merge by version, so a concurrent write is never undone.
    public func repair(
        _ collection: String, at lsn: LSN, writing records: [ConcordCore.Record], deleting keys: [String]
    )
        async throws
    {
        guard !records.isEmpty || !keys.isEmpty else { return }
        try await sketches.forgettingOnFailure {
            try await pool.write { db in
                try Self.createTable(collection, in: db)
                var tracker = try DigestTracker(db: db, collections: [collection], exactFromDisk: true)
                let table = SQLiteOpener.quote(collection)
                let upsert = try db.cachedStatement(
                    sql: """
                        INSERT INTO \(table) (key, version, value) VALUES (?, ?, ?)
                        ON CONFLICT (key) DO UPDATE SET version = excluded.version, value = excluded.value
                        """)
                let delete = try db.cachedStatement(sql: "DELETE FROM \(table) WHERE key = ?")
                for record in records {
                    let before = try DigestTracker.element(of: collection, key: record.key, in: db)
                    try upsert.execute(arguments: [record.key, Int64(record.version), record.value])
                    tracker.record(
                        collection, before: before,
                        after: Element(
                            collection: collection, key: record.key, version: record.version, value: record.value))
                }
                for key in keys {
                    let before = try DigestTracker.element(of: collection, key: key, in: db)
                    try delete.execute(arguments: [key])
                    tracker.record(collection, before: before, after: nil)
                }
                try tracker.save()
                let newest = records.map(\.version).max() ?? 0
                try db.execute(
                    sql: """
                        UPDATE concord_state SET horizon = max(horizon, ?), repairs = repairs + 1,
                            repaired_records = repaired_records + ?, updated_at = ? WHERE id = 1
                        """,
                    arguments: [Int64(max(newest, lsn)), records.count + keys.count, Date().timeIntervalSince1970])
                self.updateSketches(tracker.elementChanges)
            }
        }
    }

    /// Moves the position forward to `lsn` after every collection was reconciled against the
    /// source's state at `lsn` (recovery past the log's retention).
    public func jump(to lsn: LSN) async throws {
        try await pool.write { db in
            try db.execute(
                sql: "UPDATE concord_state SET position = max(position, ?), updated_at = ? WHERE id = 1",
                arguments: [Int64(lsn), Date().timeIntervalSince1970])
        }
    }

    /// Copies `collection` again page by page (merge by version, then deleting local rows
    /// the pages do not hold): the fallback when too much differs for a reconciliation.
    public func startRecopy(_ collection: String) async throws {
        try await pool.write { db in
            try db.execute(
                sql: """
                    INSERT INTO concord_bootstrap (collection, after_key, sweep) VALUES (?, NULL, 1)
                    ON CONFLICT (collection) DO UPDATE SET after_key = NULL, sweep = 1;
                    UPDATE concord_state SET phase = 'bootstrapping' WHERE id = 1;
                    """, arguments: [collection])
            try DigestTracker.invalidate([collection], in: db)
            self.sketches.invalidate()
        }
    }

    /// Starts the bootstrap over at `head` when the log no longer reaches back to a replica that
    /// was still bootstrapping: every collection is paged again from its first key, merged by
    /// version, and local rows the pages do not hold are deleted, so changes lost with the log
    /// (deletes included) cannot survive. Rows already copied stay readable meanwhile.
    public func restartBootstrap(at head: LSN, collections: [String]) async throws {
        try await pool.write { db in
            for collection in collections { try Self.createTable(collection, in: db) }
            try db.execute(sql: "DELETE FROM concord_bootstrap")
            for collection in collections {
                try db.execute(
                    sql: "INSERT INTO concord_bootstrap (collection, after_key, sweep) VALUES (?, NULL, 1)",
                    arguments: [collection])
            }
            try db.execute(
                sql: "UPDATE concord_state SET phase = 'bootstrapping', position = ?, horizon = ? WHERE id = 1",
                arguments: [Int64(head), Int64(head)])
            try DigestTracker.invalidate(collections, in: db)
            self.sketches.invalidate()
        }
    }

    /// Deletes the local rows in a page's key range that the page does not hold, unless
    /// written after the page was read.
    static func sweep(_ page: SnapshotPage, after afterKey: String?, in db: Database) throws {
        let keep = Set(page.records.map(\.key))
        let table = SQLiteOpener.quote(page.collection)
        var sql = "SELECT key FROM \(table) WHERE key > ? AND version <= ?"
        var arguments: StatementArguments = [afterKey ?? "", Int64(page.lsn)]
        if page.hasMore, let last = page.records.last?.key {
            sql += " AND key <= ?"
            arguments += [last]
        }
        let stale = try String.fetchAll(db, sql: sql, arguments: arguments).filter { !keep.contains($0) }
        for key in stale { try db.execute(sql: "DELETE FROM \(table) WHERE key = ?", arguments: [key]) }
    }
}

extension ReplicaStore {
    /// Every collection's stored rows hashed, in one read transaction (so at one position).
    public func scanAll(progress: RecordProgress? = nil) async throws -> [String: ScannedCollection] {
        try await pool.read { db in
            var result: [String: ScannedCollection] = [:]
            let names = try String.fetchAll(db, sql: "SELECT name FROM concord_collections")
            var total = 0
            if progress != nil {
                for name in names where try db.tableExists(name) {
                    total += try Int.fetchOne(db, sql: "SELECT count(*) FROM \(SQLiteOpener.quote(name))") ?? 0
                }
            }
            var done = 0
            for name in names {
                result[name] = try Self.scan(name, in: db) { rows in
                    done += rows
                    progress?(done, total)
                }
            }
            return result
        }
    }
}

/// Reads any Concord SQLite file, publisher or replica, for comparisons.
public enum ConcordFile {
    public struct Contents: Sendable {
        /// The head of a publisher, the position of a replica.
        public var position: LSN
        public var isPublisher: Bool
        /// Per collection, each key's element.
        public var records: [String: [String: Element]]
    }

    public static func read(path: String) throws -> Contents {
        var configuration = GRDB.Configuration()
        configuration.readonly = true
        let queue = try DatabaseQueue(path: path, configuration: configuration)
        return try queue.read { db in
            var records: [String: [String: Element]] = [:]
            if try db.tableExists("concord_feed") {
                let head = try Int64.fetchOne(db, sql: "SELECT head FROM concord_feed WHERE id = 1") ?? 0
                let rows = try Row.fetchCursor(db, sql: "SELECT collection, key, version, value FROM concord_records")
                while let row = try rows.next() {
                    let collection: String = row[0]
                    let key: String = row[1]
                    records[collection, default: [:]][key] = Element(
                        collection: collection, key: key, version: LSN(row[2] as Int64), value: row[3])
                }
                return Contents(position: LSN(head), isPublisher: true, records: records)
            }
            guard try db.tableExists("concord_state") else {
                throw ConcordError(.invalidRequest, "\(path) is neither a Concord publisher nor a replica")
            }
            let position = try Int64.fetchOne(db, sql: "SELECT position FROM concord_state WHERE id = 1") ?? 0
            for name in try String.fetchAll(db, sql: "SELECT name FROM concord_collections") {
                var keyed: [String: Element] = [:]
                let rows = try Row.fetchCursor(db, sql: "SELECT key, version, value FROM \(SQLiteOpener.quote(name))")
                while let row = try rows.next() {
                    let key: String = row[0]
                    keyed[key] = Element(collection: name, key: key, version: LSN(row[1] as Int64), value: row[2])
                }
                records[name] = keyed
            }
            return Contents(position: LSN(position), isPublisher: false, records: records)
        }
    }
}
