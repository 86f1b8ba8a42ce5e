import ConcordCore
import GRDB
import GRDBSQLite

/// A prepared statement bound and stepped directly, for loops that run per record.
///
/// GRDB owns the statement (this keeps it alive); this only skips the per-call argument
/// boxing that dominates when millions of rows go through.
struct RawStatement {
    let statement: Statement
    let handle: OpaquePointer
    let connection: OpaquePointer

    init(_ statement: Statement, in db: Database) {
        self.statement = statement
        handle = statement.sqliteStatement
        connection = db.sqliteConnection!
    }

    private static let transient = unsafeBitCast(-1, to: sqlite3_destructor_type.self)

    @inline(__always)
    func bind(_ index: Int32, _ text: String) {
        var text = text
        text.withUTF8 { buffer in
            _ = sqlite3_bind_text(handle, index, buffer.baseAddress, Int32(buffer.count), Self.transient)
        }
    }

    @inline(__always)
    func bind(_ index: Int32, _ value: UInt64) {
        sqlite3_bind_int64(handle, index, Int64(bitPattern: value))
    }

    @inline(__always)
    func bind(_ index: Int32, _ value: Int) {
        sqlite3_bind_int64(handle, index, Int64(value))
    }

    @inline(__always)
    func bindNull(_ index: Int32) {
        sqlite3_bind_null(handle, index)
    }

    /// Runs a statement that returns no rows, then resets it.
    @inline(__always)
    func run() throws {
        let code = sqlite3_step(handle)
        sqlite3_reset(handle)
        guard code == SQLITE_DONE || code == SQLITE_ROW else { throw failure(code) }
    }

    /// Steps once: `true` with a row to read, `false` when done. Call ``reset()`` after.
    @inline(__always)
    func step() throws -> Bool {
        let code = sqlite3_step(handle)
        if code == SQLITE_ROW { return true }
        if code == SQLITE_DONE { return false }
        sqlite3_reset(handle)
        throw failure(code)
    }

    @inline(__always)
    func reset() { sqlite3_reset(handle) }

    @inline(__always)
    func int64(_ column: Int32) -> Int64 { sqlite3_column_int64(handle, column) }

    @inline(__always)
    func isNull(_ column: Int32) -> Bool { sqlite3_column_type(handle, column) == SQLITE_NULL }

    @inline(__always)
    func text(_ column: Int32) -> String {
        guard let pointer = sqlite3_column_text(handle, column) else { return "" }
        let count = Int(sqlite3_column_bytes(handle, column))
        return String(decoding: UnsafeBufferPointer(start: pointer, count: count), as: UTF8.self)
    }

    @inline(__always)
    var changes: Int { Int(sqlite3_changes(connection)) }

    private func failure(_ code: Int32) -> DatabaseError {
        DatabaseError(resultCode: ResultCode(rawValue: code), message: String(cString: sqlite3_errmsg(connection)))
    }
}

/// How hard SQLite works to keep a commit across a power loss.
public enum SQLiteDurability: String, Sendable, CaseIterable {
    /// fsync on every commit: a commit survives power loss.
    case full
    /// fsync at checkpoints only (WAL): a commit survives a process crash, and the
    /// database stays consistent on power loss, but the last commits may be lost.
    case normal

    var pragma: String { self == .full ? "FULL" : "NORMAL" }
}

enum SQLiteOpener {
    /// Opens (or creates) a WAL-mode database pool with Concord's settings.
    static func open(path: String, durability: SQLiteDurability, cacheMegabytes: Int = 64, readonly: Bool = false)
        throws -> DatabasePool
    {
        var configuration = GRDB.Configuration()
        configuration.readonly = readonly
        configuration.busyMode = .timeout(10)
        configuration.prepareDatabase { db in
            // Only takes effect when the file is new: 16 KiB pages make bulk inserts of
            // ~250-byte rows about 20% faster than the 4 KiB default (measured with `concord bench`).
            try db.execute(sql: "PRAGMA page_size = 16384")
            try db.execute(sql: "PRAGMA synchronous = \(durability.pragma)")
            try db.execute(sql: "PRAGMA cache_size = -\(cacheMegabytes * 1024)")
            try db.execute(sql: "PRAGMA temp_store = MEMORY")
        }
        do {
            return try DatabasePool(path: path, configuration: configuration)
        } catch {
            throw ConcordError(.storage, "cannot open SQLite database \(path): \(error)")
        }
    }

    /// Quotes an SQL identifier (collection names are validated, this is belt and braces).
    static func quote(_ identifier: String) -> String {
        "\"" + identifier.replacingOccurrences(of: "\"", with: "\"\"") + "\""
    }
}

extension ConcordError {
    /// Wraps a storage failure, passing Concord's own errors through.
    static func storage(_ error: any Error, _ context: String) -> ConcordError {
        if let error = error as? ConcordError { return error }
        return ConcordError(.storage, "\(context): \(error)")
    }
}

/// Concord's record, not GRDB's `Record` class.
typealias Record = ConcordCore.Record

/// The physical limit a replica's bulk apply is measured against.
package enum SQLiteInsertBenchmark {
    /// Inserts `rows` into a fresh table laid out like a replica table, with Concord's
    /// settings, binding arguments directly, `batch` rows per transaction; returns seconds.
    package static func run(path: String, rows: [(key: String, value: String)], batch: Int) throws -> Double {
        let pool = try SQLiteOpener.open(path: path, durability: .normal)
        try pool.write { db in
            try db.execute(
                sql: "CREATE TABLE bench (key TEXT PRIMARY KEY, version INTEGER NOT NULL, value TEXT NOT NULL)")
        }
        let start = ContinuousClock.now
        var index = 0
        while index < rows.count {
            let end = min(rows.count, index + batch)
            try pool.write { db in
                let insert = RawStatement(
                    try db.cachedStatement(sql: "INSERT INTO bench (key, version, value) VALUES (?1, ?2, ?3)"), in: db)
                for position in index..<end {
                    insert.bind(1, rows[position].key)
                    insert.bind(2, position + 1)
                    insert.bind(3, rows[position].value)
                    try insert.run()
                }
            }
            index = end
        }
        let elapsed = ContinuousClock.now - start
        return Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
    }
}

/// Plain SQL on a Concord file from a connection of its own, as another program would run
/// it: for benchmarks that damage a replica behind Concord's back.
package enum PlainSQL {
    package static func execute(path: String, _ sql: String) throws {
        let queue = try DatabaseQueue(path: path)
        try queue.inDatabase { db in try db.execute(sql: sql) }
        try queue.close()
    }
}
