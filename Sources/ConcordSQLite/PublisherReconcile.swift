import ConcordCore
import Foundation
import GRDB

/// Which sketch a rewound copy is: a collection at an LSN.
struct RewoundKey: Hashable {
    var collection: String
    var lsn: LSN
}

extension PublisherStore {
    // MARK: Sketches

    static func scanSketches(capacity: Int, in db: Database) throws -> SketchSet {
        var set = SketchSet(capacity: capacity)
        let rows = try Row.fetchCursor(db, sql: "SELECT collection, key, version, value FROM concord_records")
        while let row = try rows.next() {
            let collection: String = row[0]
            let element = Element(collection: collection, key: row[1], version: LSN(row[2] as Int64), value: row[3])
            set.apply(collection, before: nil, after: element)
        }
        return set
    }

    /// The first `sketchCapacity` coded symbols of `collection` as it was at `lsn`: the kept
    /// sketch, rewound over the logged changes after `lsn` with their before-elements.
    ///
    /// - Throws: `gone` when the log no longer reaches back to `lsn`, `beyondHead` past the head.
    public func sketch(of collection: String, at lsn: LSN) async throws -> RatelessSketch {
        let key = RewoundKey(collection: collection, lsn: lsn)
        if let cached = rewound.withLock({ $0[key] }) { return cached }
        // Copied under the write lock, so no write is halfway in the kept sketch.
        let (current, head) = try await pool.write { db -> (SketchSet, LSN) in
            let head = try LSN(Int64.fetchOne(db, sql: "SELECT head FROM concord_feed WHERE id = 1")!)
            if let kept = self.sketches.withLock({ $0 }) { return (kept, head) }
            let rebuilt = try Self.scanSketches(capacity: self.configuration.sketchCapacity, in: db)
            self.sketches.withLock { $0 = rebuilt }
            return (rebuilt, head)
        }
        guard lsn <= head else { throw ConcordError(.beyondHead, "lsn=\(lsn) is beyond the head LSN \(head)") }
        let sketch = try await pool.read { db in
            var sketch = current.sketch(of: collection)
            let oldest = try Int64.fetchOne(db, sql: "SELECT min(lsn) FROM concord_log").map(LSN.init) ?? head + 1
            guard lsn + 1 >= oldest || lsn == head else {
                throw ConcordError(
                    .gone, "the log no longer reaches back to \(lsn); the oldest retained LSN is \(oldest)")
            }
            try Self.forEachLogged(collection, after: lsn, through: head, in: db) { before, after in
                if let after { sketch.remove(after) }
                if let before { sketch.add(before) }
            }
            return sketch
        }
        rewound.withLock { cache in
            if cache.count >= 8 { cache.removeAll() }
            cache[key] = sketch
        }
        return sketch
    }

    /// Calls `body` with the before- and after-element of each logged change of `collection` in (after, through].
    static func forEachLogged(
        _ collection: String, after: LSN, through: LSN, in db: Database, _ body: (Element?, Element?) -> Void
    ) throws {
        guard after < through else { return }
        let rows = try Row.fetchCursor(
            db,
            sql: """
                SELECT lsn, key, value, before FROM concord_log
                WHERE lsn > ? AND lsn <= ? AND collection = ? ORDER BY lsn
                """, arguments: [Int64(after), Int64(through), collection])
        while let row = try rows.next() {
            let value: String? = row[2]
            let after = value.map {
                Element(collection: collection, key: row[1], version: LSN(row[0] as Int64), value: $0)
            }
            let before = (row[3] as String?).flatMap(Element.init(hex:))
            body(before, after)
        }
    }

    /// Coded symbols `range` of `collection` at `lsn`. Symbols past the kept capacity are
    /// computed from the collection's items at `lsn`, read by one scan and kept for the next
    /// batches of the same reconciliation; a reconciliation that needs them is large.
    public func symbols(of collection: String, at lsn: LSN, range: Range<Int>) async throws -> [CodedSymbol] {
        guard range.lowerBound >= 0, range.count <= 1 << 20 else {
            throw ConcordError(.invalidRequest, "symbol range must start at 0 or later and hold at most 2^20 symbols")
        }
        if range.upperBound <= configuration.sketchCapacity {
            return Array(try await sketch(of: collection, at: lsn).symbols[range])
        }
        let key = RewoundKey(collection: collection, lsn: lsn)
        if let items = scannedItems.withLock({ $0?.key == key ? $0?.items : nil }) {
            return RatelessSketch.symbols(of: items, range: range)
        }
        let items = try await pool.read { db -> [SketchItem] in
            let head = try LSN(Int64.fetchOne(db, sql: "SELECT head FROM concord_feed WHERE id = 1")!)
            guard lsn <= head else { throw ConcordError(.beyondHead, "lsn=\(lsn) is beyond the head LSN \(head)") }
            var items: [SketchItem] = []
            let rows = try Row.fetchCursor(
                db, sql: "SELECT key, version, value FROM concord_records WHERE collection = ?",
                arguments: [collection])
            while let row = try rows.next() {
                items.append(
                    SketchItem(
                        Element(collection: collection, key: row[0], version: LSN(row[1] as Int64), value: row[2])))
            }
            var removed = Set<SketchItem>()
            try Self.forEachLogged(collection, after: lsn, through: head, in: db) { before, after in
                if let after { removed.insert(SketchItem(after)) }
                if let before { items.append(SketchItem(before)) }
            }
            return removed.isEmpty ? items : items.filter { !removed.contains($0) }
        }
        scannedItems.withLock { $0 = (key, items) }
        return RatelessSketch.symbols(of: items, range: range)
    }

    // MARK: Lookup

    /// The current records of `collection` whose key hashes are `keyHashes`, read in one
    /// transaction and stamped with its head.
    public func records(of collection: String, keyHashes: [UInt64]) async throws -> SnapshotPage {
        do {
            return try await pool.read { db in
                let head = try LSN(Int64.fetchOne(db, sql: "SELECT head FROM concord_feed WHERE id = 1")!)
                // Without statistics SQLite would scan the collection per hash, so the index is
                // named; a copy into empty collections leaves it out until it ends.
                let indexed =
                    try Bool.fetchOne(
                        db,
                        sql:
                            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'index' AND name = 'concord_records_key_hash'"
                    ) ?? false
                let select = RawStatement(
                    try db.cachedStatement(
                        sql: """
                            SELECT key, version, value FROM concord_records \(indexed ? "INDEXED BY concord_records_key_hash" : "")
                            WHERE collection = ?1 AND key_hash = ?2
                            """), in: db)
                var records: [Record] = []
                for hash in Set(keyHashes) {
                    select.bind(1, collection)
                    select.bind(2, hash)
                    defer { select.reset() }
                    while try select.step() {
                        records.append(
                            Record(key: select.text(0), version: LSN(select.int64(1)), value: select.text(2)))
                    }
                }
                records.sort { $0.key < $1.key }
                return SnapshotPage(collection: collection, lsn: head, records: records, hasMore: false)
            }
        } catch {
            throw ConcordError.storage(error, "cannot read collection \(collection)")
        }
    }

    // MARK: Checkpoints

    static func recordCheckpoint(at lsn: LSN, in db: Database) throws {
        var writer = JSONWriter(capacity: 256)
        WireFormat.append(Checkpoint(lsn: lsn, digests: try storedDigests(in: db)), to: &writer)
        try db.execute(
            sql: "INSERT OR REPLACE INTO concord_checkpoints (lsn, digests) VALUES (?, ?)",
            arguments: [Int64(lsn), String(decoding: writer.bytes, as: UTF8.self)])
    }

    static func storedDigests(in db: Database) throws -> [String: CollectionDigest] {
        var digests: [String: CollectionDigest] = [:]
        for name in try String.fetchAll(db, sql: "SELECT name FROM concord_collections") {
            digests[name] = try storedDigest(of: name, in: db)
        }
        return digests
    }

    /// Records a checkpoint at the head when the policy's interval passed and the head moved
    /// since the last one; returns its LSN.
    @discardableResult
    public func checkpointIfDue() async throws -> LSN? {
        guard ContinuousClock.now - lastCheckpoint.withLock({ $0 }) >= configuration.checkpoints.interval else {
            return nil
        }
        return try await pool.write { db -> LSN? in
            let head = try LSN(Int64.fetchOne(db, sql: "SELECT head FROM concord_feed WHERE id = 1")!)
            let last = try Int64.fetchOne(db, sql: "SELECT max(lsn) FROM concord_checkpoints").map(LSN.init) ?? 0
            self.lastCheckpoint.withLock { $0 = .now }
            guard head > last else { return nil }
            try Self.recordCheckpoint(at: head, in: db)
            return head
        }
    }

    /// The checkpoints recorded at LSNs in (after, through].
    public func checkpoints(after: LSN, through: LSN) async throws -> [Checkpoint] {
        guard after < through else { return [] }
        let lines = try await pool.read { db in
            try String.fetchAll(
                db, sql: "SELECT digests FROM concord_checkpoints WHERE lsn > ? AND lsn <= ? ORDER BY lsn",
                arguments: [Int64(after), Int64(through)])
        }
        return try lines.compactMap { line in
            let bytes = Array(line.utf8)
            if case .checkpoint(let checkpoint) = try WireFormat.parseStreamLine(bytes, range: 0..<(bytes.count - 1)) {
                return checkpoint
            }
            return nil
        }
    }

    // MARK: Retention

    /// Drops the log's changes the retention policy no longer keeps, with their
    /// checkpoints; returns how many changes were dropped.
    @discardableResult
    public func pruneLog(now: Date = Date()) async throws -> Int {
        let policy = configuration.retention
        do {
            return try await pool.write { db in
                guard let oldest = try Int64.fetchOne(db, sql: "SELECT min(lsn) FROM concord_log") else { return 0 }
                let head = try Int64.fetchOne(db, sql: "SELECT head FROM concord_feed WHERE id = 1")!
                var keepFrom = oldest
                if let maxChanges = policy.maxChanges {
                    keepFrom = max(keepFrom, head - Int64(min(maxChanges, UInt64(Int64.max))) + 1)
                }
                if let maxAge = policy.maxAge {
                    let cutoff = Int64((now.timeIntervalSince1970 - Double(maxAge.components.seconds)) * 1000)
                    let first =
                        try Int64.fetchOne(
                            db, sql: "SELECT min(lsn) FROM concord_log WHERE committed_at >= ?", arguments: [cutoff])
                        ?? head + 1
                    keepFrom = max(keepFrom, first)
                }
                if let maxBytes = policy.maxBytes {
                    var bytes: Int64 = 0
                    let rows = try Row.fetchCursor(
                        db, sql: "SELECT lsn, length(value) + length(key) + 64 FROM concord_log ORDER BY lsn DESC")
                    while let row = try rows.next() {
                        bytes += row[1] as Int64? ?? 64
                        if bytes > maxBytes {
                            keepFrom = max(keepFrom, (row[0] as Int64) + 1)
                            break
                        }
                    }
                }
                guard keepFrom > oldest else { return 0 }
                try db.execute(sql: "DELETE FROM concord_log WHERE lsn < ?", arguments: [keepFrom])
                let dropped = db.changesCount
                try db.execute(sql: "DELETE FROM concord_checkpoints WHERE lsn < ?", arguments: [keepFrom])
                return dropped
            }
        } catch {
            throw ConcordError.storage(error, "cannot prune the log")
        }
    }
}
