import ConcordCore
import Foundation
import Logging
import PostgresNIO
import Synchronization

/// A connection to a PostgreSQL database with the session settings that make every value's
/// text the same whether it is read by SQL or decoded from the WAL.
package struct PostgresSource {
    let connection: PostgresConnection
    let logger: Logger
    let waiting = WaitingStatements()

    /// The connection settings a `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE` URL names.
    package static func configuration(url: String) throws -> PostgresConnection.Configuration {
        let endpoint = try Endpoint(url: url)
        return PostgresConnection.Configuration(
            host: endpoint.host, port: endpoint.port, username: endpoint.user, password: endpoint.password,
            database: endpoint.database, tls: .disable)
    }

    /// Where a `postgres://` URL points, and as whom.
    struct Endpoint {
        var host: String
        var port: Int
        var user: String
        var password: String?
        var database: String

        init(url: String) throws {
            guard let components = URLComponents(string: url),
                ["postgres", "postgresql"].contains(components.scheme),
                let host = components.host, let user = components.user
            else {
                throw ConcordError(
                    .invalidConfiguration, "--postgres must look like postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE")
            }
            let database = components.path.hasPrefix("/") ? String(components.path.dropFirst()) : components.path
            self.host = host
            port = components.port ?? 5432
            self.user = user
            password = components.password
            self.database = database.isEmpty ? user : database
        }
    }

    /// The session settings that fix how values are written, here and in the WAL's decoding.
    static let settings = [
        ("TimeZone", "UTC"), ("DateStyle", "ISO, MDY"), ("IntervalStyle", "postgres"), ("extra_float_digits", "1"),
        ("bytea_output", "hex"),
    ]

    static func connect(url: String, logger: Logger) async throws -> PostgresSource {
        let configuration = try configuration(url: url)
        let connection: PostgresConnection
        do {
            connection = try await PostgresConnection.connect(configuration: configuration, id: 1, logger: logger)
        } catch {
            throw ConcordError(.unavailable, "cannot connect to PostgreSQL at \(redacted(url)): \(describe(error))")
        }
        let source = PostgresSource(connection: connection, logger: logger)
        let waiting = source.waiting
        connection.closeFuture.whenComplete { _ in waiting.closed() }
        // wal2json writes values with the decoding session's output functions: pin the settings
        // that change them, here and in the session that reads the initial copy.
        do {
            for (name, value) in settings {
                try await source.execute("SET \(name) TO '\(value)'")
            }
        } catch {
            await source.close()
            throw error
        }
        return source
    }

    func close() async {
        try? await connection.close()
    }

    func execute(_ sql: String) async throws {
        _ = try await rows(PostgresQuery(unsafeSQL: sql))
    }

    /// Runs `query` and collects its rows.
    ///
    /// A connection the server drops in the middle of a statement (a restart) can leave the
    /// query's await unanswered; the connection's close fails every statement still waiting,
    /// so the capture reconnects instead of waiting forever. Slow statements are left alone.
    func rows(_ query: PostgresQuery) async throws -> [PostgresRow] {
        try await guarded(doing: query.sql) { connection, logger in
            try await connection.query(query, logger: logger).collect()
        }
    }

    /// Runs `COPY table (columns) FROM STDIN` with the rows `write` sends in COPY's text format,
    /// guarded against a dropped connection like a statement.
    ///
    /// PostgresNIO puts `table` between double quotes as it is: pass `schema"."name` with any
    /// quote in them doubled (``quoteInside(_:)``) to name a table outside the search path.
    func copy(
        into table: String, columns: [String],
        writing write: @escaping @Sendable (PostgresCopyFromWriter) async throws -> Void
    ) async throws {
        _ = try await guarded(doing: "COPY \(table)") { connection, logger in
            try await connection.copyFrom(table: table, columns: columns, logger: logger, writeData: write)
            return []
        }
    }

    /// Runs `work` on the connection, failed when the connection closes before it ends.
    private func guarded(
        doing sql: String, _ work: @escaping @Sendable (PostgresConnection, Logger) async throws -> [PostgresRow]
    ) async throws -> [PostgresRow] {
        let connection = self.connection
        let logger = self.logger
        let waiting = self.waiting
        return try await withCheckedThrowingContinuation { continuation in
            let outcome = StatementOutcome(continuation)
            guard waiting.add(outcome) else {
                outcome.finish(.failure(ConcordError(.unavailable, "the PostgreSQL connection is closed")))
                return
            }
            Task {
                do {
                    outcome.finish(.success(try await work(connection, logger)))
                } catch {
                    outcome.finish(.failure(Self.translate(error, doing: sql)))
                }
                waiting.remove(outcome)
            }
        }
    }

    /// Runs `sql` through a cursor, in the transaction open on this connection, handing `body`
    /// each page of at most `pageSize` rows. A cursor, because a row stream left waiting while
    /// the caller works on the rows is not something PostgresNIO copes with.
    ///
    /// The server reads the next page while `body` works on one: each page is collected whole
    /// by its own statement, queued on the connection behind the one before.
    func forEachPage(
        of sql: String, cursor: String, pageSize: Int, _ body: ([PostgresRow]) async throws -> Void
    ) async throws {
        try await execute("DECLARE \(cursor) NO SCROLL CURSOR FOR \(sql)")
        let fetch = PostgresQuery(unsafeSQL: "FETCH \(pageSize) FROM \(cursor)")
        var next = Task { try await self.rows(fetch) }
        while true {
            let rows = try await next.value
            let more = rows.count == pageSize
            if more { next = Task { try await self.rows(fetch) } }
            do {
                if !rows.isEmpty { try await body(rows) }
            } catch {
                // The statement already sent finishes before whatever the caller sends next.
                if more { _ = try? await next.value }
                throw error
            }
            if !more { break }
        }
        try await execute("CLOSE \(cursor)")
    }

    /// The URL without its password, for messages.
    static func redacted(_ url: String) -> String {
        guard var components = URLComponents(string: url), components.password != nil else { return url }
        components.password = "***"
        return components.string ?? url
    }

    /// PostgreSQL's SQLSTATE and message, or the error's description.
    static func describe(_ error: any Error) -> String {
        if let error = error as? PSQLError, let message = error.serverInfo?[.message] {
            return "\(message) (SQLSTATE \(error.serverInfo?[.sqlState] ?? "?"))"
        }
        return String(reflecting: error)
    }

    static func sqlState(_ error: any Error) -> String? {
        (error as? PSQLError)?.serverInfo?[.sqlState]
    }

    /// A server's refusal keeps its SQLSTATE in ``CaptureError``; a lost connection is `.unavailable`.
    static func translate(_ error: any Error, doing sql: String) -> any Error {
        if error is ConcordError || error is CaptureError || error is CancellationError { return error }
        if let state = sqlState(error) {
            return CaptureError(sqlState: state, message: describe(error))
        }
        return ConcordError(.unavailable, "PostgreSQL connection failed: \(describe(error))")
    }

    /// `"Name"` quoted for SQL.
    static func quote(_ identifier: String) -> String {
        "\"" + quoteInside(identifier) + "\""
    }

    /// What goes between the double quotes of a quoted identifier: the name, quotes doubled.
    static func quoteInside(_ identifier: String) -> String {
        identifier.replacingOccurrences(of: "\"", with: "\"\"")
    }
}

/// An error PostgreSQL answered with, by SQLSTATE.
struct CaptureError: Error, CustomStringConvertible {
    var sqlState: String
    var message: String
    var description: String { message }
}

/// The statements waiting on one connection, failed together when it closes.
final class WaitingStatements: Sendable {
    private let state = Mutex<(open: Bool, outcomes: [ObjectIdentifier: StatementOutcome])>((true, [:]))

    /// Registers a statement; false when the connection is already closed.
    func add(_ outcome: StatementOutcome) -> Bool {
        state.withLock { state in
            guard state.open else { return false }
            state.outcomes[ObjectIdentifier(outcome)] = outcome
            return true
        }
    }

    func remove(_ outcome: StatementOutcome) {
        _ = state.withLock { $0.outcomes.removeValue(forKey: ObjectIdentifier(outcome)) }
    }

    func closed() {
        let outcomes = state.withLock { state in
            state.open = false
            defer { state.outcomes = [:] }
            return Array(state.outcomes.values)
        }
        for outcome in outcomes {
            outcome.finish(.failure(ConcordError(.unavailable, "the PostgreSQL connection closed during a statement")))
        }
    }
}

/// Resumes a statement's caller once: with its rows, its error, or the deadline's error.
final class StatementOutcome: Sendable {
    let continuation: CheckedContinuation<[PostgresRow], any Error>
    private let finished = Atomic<Bool>(false)

    init(_ continuation: CheckedContinuation<[PostgresRow], any Error>) { self.continuation = continuation }

    var isFinished: Bool { finished.load(ordering: .acquiring) }

    func finish(_ result: Result<[PostgresRow], any Error>) {
        guard !finished.exchange(true, ordering: .acquiringAndReleasing) else { return }
        continuation.resume(with: result)
    }
}
