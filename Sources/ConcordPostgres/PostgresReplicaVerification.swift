import ConcordCore
import ConcordSQLite
import Foundation
import PostgresNIO

extension PostgresReplicaStore {
    /// Calls `body` with every stored row of `collection`, read through a cursor in pages, inside
    /// the transaction open on `db`.
    func scanRows(
        _ collection: String, ordered: Bool = false, in db: PostgresSource, _ body: (Record) throws -> Void
    ) async throws {
        let order = ordered ? " ORDER BY key" : ""
        try await db.forEachPage(
            of: "SELECT key, version, value FROM \(table(collection))\(order)", cursor: "concord_scan",
            pageSize: configuration.scanBatch
        ) { rows in
            for row in rows {
                // Cell by cell: decoding the row as a tuple looks its generic type up at run time
                // for every row, which took a third of a scan.
                let cells = row.makeRandomAccess()
                try body(
                    Record(
                        key: try cells[0].decode(String.self), version: LSN(try cells[1].decode(Int64.self)),
                        value: try cells[2].decode(String.self)))
            }
        }
    }

    /// The collections the replica holds a table for, read in the transaction open on `db`.
    func knownCollections(in db: PostgresSource) async throws -> [String] {
        try await db.rows(PostgresQuery(unsafeSQL: "SELECT name FROM \(table("concord_collections")) ORDER BY name"))
            .map { try $0.decode(String.self) }
    }

    /// Reads `collections` (those the replica knows) in one snapshot, so at one position.
    func scan(
        _ collections: [String], ordered: Bool = false, _ body: (_ collection: String, Record) throws -> Void
    ) async throws {
        do {
            try await reader.transaction("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY") { db in
                let known = Set(try await knownCollections(in: db))
                for collection in collections where known.contains(collection) {
                    try await scanRows(collection, ordered: ordered, in: db) { try body(collection, $0) }
                }
            }
        } catch {
            throw Self.failure(error, "cannot read the replica's rows")
        }
    }

    func storedDigests(in db: PostgresSource) async throws -> [String: CollectionDigest?] {
        var result: [String: CollectionDigest?] = [:]
        for row in try await db.rows(
            PostgresQuery(unsafeSQL: "SELECT name, count, digest, digest_valid FROM \(table("concord_collections"))"))
        {
            let (name, count, sumHex, valid) = try row.decode((String, Int64, String, Bool).self)
            result[name] = valid ? CollectionDigest(count: count, sumHex: sumHex) : nil
        }
        return result
    }

    public func digestsReady() async throws -> Bool {
        let digests = try await reader.withConnection { db in try await storedDigests(in: db) }
        return digests.values.allSatisfy { $0 != nil } && sketches.isBuilt
    }

    public func rebuildDigests() async throws {
        try await write("cannot rebuild digests") { db in
            var set = SketchSet(capacity: ReplicaSketch.capacity)
            for name in try await knownCollections(in: db) {
                let scanned = try await scanCollection(name, in: db)
                set.set(name, scanned.sketch)
                _ = try await db.rows(
                    """
                    UPDATE \(unescaped: table("concord_collections"))
                    SET count = \(scanned.digest.count), digest = \(scanned.digest.sumHex), digest_valid = true
                    WHERE name = \(name)
                    """)
            }
            sketches.install(set)
        }
    }

    public func sketch(of collection: String) async throws -> RatelessSketch {
        if let kept = sketches.sketch(of: collection) { return kept }
        var sketch = RatelessSketch(capacity: ReplicaSketch.capacity)
        try await scan([collection]) { _, record in sketch.add(Element(collection, record)) }
        return sketch
    }

    public func sketchItems(of collection: String) async throws -> [SketchItem] {
        var items: [SketchItem] = []
        try await scan([collection]) { _, record in items.append(SketchItem(Element(collection, record))) }
        return items
    }

    public func check(_ checkpoint: Checkpoint) async throws -> CheckpointOutcome {
        try await write("cannot compare a checkpoint") { db in
            guard let state = try await readState(db), state.position == checkpoint.lsn,
                state.progress.phase == .following, state.progress.applyMode(position: state.position) == .ordered
            else { return .notJudged }
            let followed = state.collections.map(Set.init)
            var local: [String: CollectionDigest] = [:]
            for (name, digest) in try await storedDigests(in: db) {
                if let followed, !followed.contains(name) { continue }
                guard let digest else { return .notJudged }
                local[name] = digest
            }
            let differing = checkpoint.differing(from: local, followed: followed)
            if differing.isEmpty {
                _ = try await db.rows(
                    """
                    UPDATE \(unescaped: table("concord_state"))
                    SET verified_lsn = \(Int64(checkpoint.lsn)), verified_at = now() WHERE id = 1
                    """)
                return .verified
            }
            try await db.execute("UPDATE \(table("concord_state")) SET mismatches = mismatches + 1 WHERE id = 1")
            return .mismatch(collections: differing)
        }
    }

    public func scrub() async throws -> [ScannedCollection] {
        var changed: [ScannedCollection] = []
        do {
            try await reader.transaction("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY") { db in
                for (name, stored) in try await storedDigests(in: db).sorted(by: { $0.key < $1.key }) {
                    guard let stored else { continue }
                    let scanned = try await scanCollection(name, in: db)
                    if scanned.digest != stored { changed.append(scanned) }
                }
            }
        } catch {
            throw Self.failure(error, "cannot scrub the replica")
        }
        return changed
    }

    func scanCollection(_ name: String, in db: PostgresSource, progress: ((Int) -> Void)? = nil) async throws
        -> ScannedCollection
    {
        var scanned = ScannedCollection(collection: name)
        try await scanRows(name, in: db) { record in scanned.add(Element(name, record), progress: progress) }
        scanned.reportRest(to: progress)
        return scanned
    }

    public func scanAll(progress: RecordProgress?) async throws -> [String: ScannedCollection] {
        var result: [String: ScannedCollection] = [:]
        do {
            try await reader.transaction("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY") { db in
                let names = try await knownCollections(in: db)
                var total = 0
                if progress != nil {
                    for name in names {
                        total += Int(
                            try await db.rows(PostgresQuery(unsafeSQL: "SELECT count(*) FROM \(table(name))"))
                                .first?.decode(Int64.self) ?? 0)
                    }
                }
                var done = 0
                for name in names {
                    result[name] = try await scanCollection(name, in: db) { rows in
                        done += rows
                        progress?(done, total)
                    }
                }
            }
        } catch {
            throw Self.failure(error, "cannot hash the replica's rows")
        }
        return result
    }

    public func adopt(_ scanned: ScannedCollection, countingMismatch: Bool) async throws {
        try await write("cannot record a digest") { db in
            _ = try await db.rows(
                """
                UPDATE \(unescaped: table("concord_collections"))
                SET count = \(scanned.digest.count), digest = \(scanned.digest.sumHex), digest_valid = true
                WHERE name = \(scanned.collection)
                """)
            if countingMismatch {
                try await db.execute("UPDATE \(table("concord_state")) SET mismatches = mismatches + 1 WHERE id = 1")
            }
            sketches.replace(scanned.collection, by: scanned.sketch)
        }
    }

    public func keys(of collection: String, keyHashes: Set<UInt64>) async throws -> [UInt64: String] {
        guard !keyHashes.isEmpty else { return [:] }
        var found: [UInt64: String] = [:]
        do {
            try await reader.transaction("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY") { db in
                guard try await knownCollections(in: db).contains(collection) else { return }
                try await db.forEachPage(
                    of: "SELECT key FROM \(table(collection))", cursor: "concord_keys",
                    pageSize: configuration.scanBatch
                ) { rows in
                    for row in rows {
                        let key = try row.decode(String.self)
                        let hash = Element.keyHash(collection: collection, key: key)
                        if keyHashes.contains(hash) { found[hash] = key }
                    }
                }
            }
        } catch {
            throw Self.failure(error, "cannot read the replica's keys")
        }
        return found
    }

    public func repair(_ collection: String, at lsn: LSN, writing records: [Record], deleting keys: [String])
        async throws
    {
        guard !records.isEmpty || !keys.isEmpty else { return }
        try await sketches.forgettingOnFailure {
            try await write("cannot repair \(collection)") { db in
                try await createTables([collection], in: db)
                var ledger = try await DigestLedger.load([collection], from: table("concord_collections"), in: db)
                let touched = records.map(\.key) + keys
                let before = try await elements(of: collection, keys: touched, in: db)
                for rows in RowColumns(records).chunks() where !rows.keys.isEmpty {
                    try await upsert(rows, into: collection, in: db)
                }
                try await delete(keys, from: collection, in: db)
                for record in records {
                    ledger.record(
                        collection, before: before[record.key],
                        after: Element(
                            collection: collection, key: record.key, version: record.version, value: record.value))
                }
                for key in keys { ledger.record(collection, before: before[key], after: nil) }
                try await ledger.save(to: table("concord_collections"), in: db)
                let newest = records.map(\.version).max() ?? 0
                _ = try await db.rows(
                    """
                    UPDATE \(unescaped: table("concord_state"))
                    SET horizon = GREATEST(horizon, \(Int64(max(newest, lsn)))), repairs = repairs + 1,
                        repaired_records = repaired_records + \(Int64(records.count + keys.count)), updated_at = now()
                    WHERE id = 1
                    """)
                sketches.queue(ledger.elementChanges)
            }
        }
    }

    public func jump(to lsn: LSN) async throws {
        try await write("cannot move the position") { db in
            _ = try await db.rows(
                """
                UPDATE \(unescaped: table("concord_state"))
                SET position = GREATEST(position, \(Int64(lsn))), updated_at = now() WHERE id = 1
                """)
        }
    }

    public func startRecopy(_ collection: String) async throws {
        try await write("cannot start copying \(collection) again") { db in
            _ = try await db.rows(
                """
                INSERT INTO \(unescaped: table("concord_bootstrap")) (collection, after_key, sweep)
                VALUES (\(collection), NULL, true)
                ON CONFLICT (collection) DO UPDATE SET after_key = NULL, sweep = true
                """)
            try await db.execute("UPDATE \(table("concord_state")) SET phase = 'bootstrapping' WHERE id = 1")
            try await invalidateDigests([collection], in: db)
            sketches.invalidate()
        }
    }

    public func restartBootstrap(at head: LSN, collections: [String]) async throws {
        try await write("cannot restart the bootstrap") { db in
            try await createTables(collections, in: db)
            try await db.execute("DELETE FROM \(table("concord_bootstrap"))")
            for collection in collections {
                _ = try await db.rows(
                    """
                    INSERT INTO \(unescaped: table("concord_bootstrap")) (collection, after_key, sweep)
                    VALUES (\(collection), NULL, true)
                    """)
            }
            _ = try await db.rows(
                """
                UPDATE \(unescaped: table("concord_state"))
                SET phase = 'bootstrapping', position = \(Int64(head)), horizon = \(Int64(head)) WHERE id = 1
                """)
            try await invalidateDigests(collections, in: db)
            sketches.invalidate()
        }
    }
}

extension Element {
    init(_ collection: String, _ record: Record) {
        self.init(collection: collection, key: record.key, version: record.version, value: record.value)
    }
}
