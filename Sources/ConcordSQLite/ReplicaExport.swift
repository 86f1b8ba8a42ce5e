import ConcordCore
import Foundation
import GRDB

extension ReplicaStore {
    /// Closes the file; the store must not be used afterwards.
    public func close() throws {
        try pool.close()
    }

    /// Writes the replica's rows to a new snapshot file at `path`, all read in one transaction
    /// (so at one position), and returns its header.
    ///
    /// Refuses a replica that is still bootstrapping or merging, and one whose rows no longer
    /// match its digests (edited behind Concord's back: `concord verify --repair` first). The
    /// file appears at `path` only once complete.
    @discardableResult
    public func export(to path: String, progress: RecordProgress = { _, _ in }) throws -> SnapshotHeader {
        guard !FileManager.default.fileExists(atPath: path) else {
            throw ConcordError(.invalidRequest, "\(path) exists; export writes a new file")
        }
        let partial = path + ".partial"
        try? FileManager.default.removeItem(atPath: partial)
        do {
            let header = try pool.read { db -> SnapshotHeader in
                guard let state = try Self.readState(db), state.progress.phase == .following,
                    state.progress.applyMode(position: state.position) == .ordered
                else {
                    throw ConcordError(
                        .invalidRequest, "\(self.path) is not following in order yet; export it once it is")
                }
                let names = try String.fetchAll(db, sql: "SELECT name FROM concord_collections ORDER BY name")
                    .filter { state.collections?.contains($0) ?? true }
                var collections: [SnapshotHeader.Collection] = []
                for name in names {
                    guard let digest = try DigestTracker.storedDigest(of: name, in: db) else {
                        throw ConcordError(
                            .invalidRequest, "the digest of \(name) is being rebuilt; export once follow has verified")
                    }
                    collections.append(.init(name: name, digest: digest))
                }
                let header = SnapshotHeader(
                    feedID: state.feedID, source: state.source, lsn: state.position, filter: state.collections,
                    collections: collections)
                var writer = try SnapshotFile.Writer(path: partial, header: header)
                let total = Int(header.recordCount)
                for collection in collections {
                    var digest = CollectionDigest.empty
                    let select = RawStatement(
                        try db.cachedStatement(
                            sql: "SELECT key, version, value FROM \(SQLiteOpener.quote(collection.name)) ORDER BY key"),
                        in: db)
                    defer { select.reset() }
                    while try select.step() {
                        let record = ConcordCore.Record(
                            key: select.text(0), version: LSN(select.int64(1)), value: select.text(2))
                        digest.add(
                            Element(
                                collection: collection.name, key: record.key, version: record.version,
                                value: record.value))
                        try writer.append(record, collection: collection.name)
                        if writer.records % 10_000 == 0 { progress(writer.records, total) }
                    }
                    guard digest == collection.digest else {
                        throw ConcordError(
                            .invalidRequest,
                            "the rows of \(collection.name) differ from its digest (edited behind Concord's back); "
                                + "run concord verify --repair first")
                    }
                }
                try writer.finish()
                progress(writer.records, total)
                return header
            }
            try FileManager.default.moveItem(atPath: partial, toPath: path)
            return header
        } catch {
            try? FileManager.default.removeItem(atPath: partial)
            if let error = error as? ConcordError { throw error }
            throw ConcordError.storage(error, "cannot export \(self.path)")
        }
    }

    /// Makes a new replica file at `path` from a snapshot file, atomically: it is built beside
    /// `path` and renamed into place only once every block and every collection's digest
    /// checked. A corrupt, truncated or foreign file, or a kill halfway, leaves `path` as it was.
    /// `follow` then continues from the snapshot's LSN.
    @discardableResult
    public static func importSnapshot(from file: String, to path: String, progress: RecordProgress = { _, _ in })
        throws -> SnapshotHeader
    {
        guard !FileManager.default.fileExists(atPath: path) else {
            throw ConcordError(.invalidRequest, "\(path) exists; import makes a new replica file")
        }
        let building = path + ".importing"
        func removeBuilding() {
            for suffix in ["", "-wal", "-shm"] { try? FileManager.default.removeItem(atPath: building + suffix) }
        }
        removeBuilding()
        var reader = try SnapshotFile.Reader(path: file)
        defer { reader.close() }
        let header = reader.header
        do {
            let store = try ReplicaStore(path: building)
            try store.pool.write { db in
                try insertState(
                    feedID: header.feedID, source: header.source, position: header.lsn, phase: .following,
                    filter: header.filter, in: db)
                for collection in header.collections { try createTable(collection.name, in: db) }
                let inserts = try header.collections.map { collection in
                    RawStatement(
                        try db.cachedStatement(
                            sql:
                                "INSERT INTO \(SQLiteOpener.quote(collection.name)) (key, version, value) VALUES (?, ?, ?)"
                        ), in: db)
                }
                var digests = Array(repeating: CollectionDigest.empty, count: header.collections.count)
                var done = 0
                let total = Int(header.recordCount)
                while let block = try reader.nextBlock() {
                    for (index, record) in block {
                        let insert = inserts[index]
                        insert.bind(1, record.key)
                        insert.bind(2, record.version)
                        insert.bind(3, record.value)
                        try insert.run()
                        digests[index].add(
                            Element(
                                collection: header.collections[index].name, key: record.key,
                                version: record.version, value: record.value))
                    }
                    done += block.count
                    progress(done, total)
                }
                for (index, collection) in header.collections.enumerated() {
                    guard digests[index] == collection.digest else {
                        throw ConcordError(
                            .invalidRequest, "\(file) is corrupt: \(collection.name) does not match its digest")
                    }
                    try db.execute(
                        sql: "UPDATE concord_collections SET count = ?, digest = ?, digest_valid = 1 WHERE name = ?",
                        arguments: [collection.digest.count, collection.digest.sumHex, collection.name])
                }
            }
            try store.pool.writeWithoutTransaction { db in try db.execute(sql: "PRAGMA wal_checkpoint(TRUNCATE)") }
            try store.close()
            try FileManager.default.moveItem(atPath: building, toPath: path)
            removeBuilding()
            return header
        } catch {
            removeBuilding()
            if let error = error as? ConcordError { throw error }
            throw ConcordError.storage(error, "cannot import \(file)")
        }
    }
}
