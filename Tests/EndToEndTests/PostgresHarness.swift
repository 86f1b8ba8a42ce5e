import ConcordCore
import ConcordPostgres
import Foundation
import Logging
import PostgresNIO
import Synchronization

/// The PostgreSQL server the capture tests use: the one `scripts/test.sh` started
/// (`CONCORD_TEST_POSTGRES_URL`, `CONCORD_TEST_POSTGRES_DIR`), or one started here with
/// `scripts/postgres.sh` in a temporary folder when the tests run on their own.
enum PostgresHarness {
    static let started = Mutex<(url: String, folder: String)?>(nil)

    static func server() throws -> (url: String, folder: String) {
        let environment = ProcessInfo.processInfo.environment
        if let url = environment["CONCORD_TEST_POSTGRES_URL"], let folder = environment["CONCORD_TEST_POSTGRES_DIR"] {
            return (url, folder)
        }
        return try started.withLock { started in
            if let started { return started }
            let folder = FileManager.default.temporaryDirectory.appendingPathComponent("concord-test-pg-\(getpid())")
                .path
            let url = try script("start", folder)
            started = (url, folder)
            // The server started here stops when the test process exits.
            atexit { PostgresHarness.stopStarted() }
            return (url, folder)
        }
    }

    /// Stops and removes the server this process started, if any.
    static func stopStarted() {
        guard let (_, folder) = started.withLock({ $0 }) else { return }
        _ = try? script("stop", folder)
        try? FileManager.default.removeItem(atPath: folder)
    }

    /// Runs `scripts/postgres.sh COMMAND FOLDER`; returns the server's URL (from `FOLDER/url`).
    ///
    /// Its output goes to a file, not a pipe: the server it starts would hold a pipe open.
    @discardableResult
    static func script(_ command: String, _ folder: String) throws -> String {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        let status = try Harness.runQuietly(
            "/bin/bash", [root.appendingPathComponent("scripts/postgres.sh").path, command, folder])
        guard status == 0 else {
            throw ConcordError(.internal, "scripts/postgres.sh \(command) failed (\(status))")
        }
        let url = (try? String(contentsOfFile: folder + "/url", encoding: .utf8)) ?? ""
        return url.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// A new, empty database on the server; returns its URL.
    static func database() async throws -> String {
        let (url, _) = try server()
        let name = "t_" + UUID().uuidString.lowercased().replacingOccurrences(of: "-", with: "").prefix(16)
        let session = try await SQLSession.connect(url)
        try await session.run("CREATE DATABASE \(name)")
        await session.close()
        var components = URLComponents(string: url)!
        components.path = "/\(name)"
        return components.string!
    }

    /// Stops and starts the server (its port stays when it is free).
    static func restart() throws -> String {
        let (_, folder) = try server()
        try script("stop", folder)
        return try script("start", folder)
    }
}

/// Plain SQL against PostgreSQL for the tests: statements, and rows as text.
final class SQLSession: Sendable {
    let connection: PostgresConnection
    static let logger = Logger(label: "concord.tests.postgres")

    init(connection: PostgresConnection) { self.connection = connection }

    static func connect(_ url: String) async throws -> SQLSession {
        let configuration = try PostgresSource.configuration(url: url)
        return SQLSession(
            connection: try await PostgresConnection.connect(configuration: configuration, id: 1, logger: logger))
    }

    func run(_ sql: String) async throws {
        _ = try await connection.query(PostgresQuery(unsafeSQL: sql), logger: Self.logger).collect()
    }

    /// Every row of `sql`, each column decoded as text (cast in the query).
    func texts(_ sql: String) async throws -> [[String?]] {
        try await connection.query(PostgresQuery(unsafeSQL: sql), logger: Self.logger).collect().map { row in
            try row.map { cell in try cell.decode(String?.self) }
        }
    }

    func close() async {
        try? await connection.close()
    }

    /// A test that fails midway drops its session without closing it; PostgresNIO requires a close.
    deinit {
        if !connection.isClosed { try? connection.close().wait() }
    }
}
