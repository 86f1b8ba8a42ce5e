import ArgumentParser
import ConcordCore
import ConcordPostgres
import ConcordSQLite
import ConcordServer
import Foundation
import Logging
import ServiceLifecycle

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a publisher: the source's store, its change log and the HTTP protocol.",
        discussion: """
            The SQLite file holds the records, the log and the feed id; it is created if missing.
            Writes come through POST /v1/write. SIGTERM or SIGINT stop the publisher cleanly:
            open streams end at a transaction boundary and subscribers resume where they were.
            """)

    @Option(help: "The publisher's SQLite file.")
    var db: String

    @Option(help: "Address to listen on.")
    var host = "127.0.0.1"

    @Option(help: "Port to listen on (0 picks a free one).")
    var port = 7070

    @Option(help: "full: each write survives power loss; normal: survives a crash, faster.")
    var durability: String = "full"

    @Option(help: "Largest request body in bytes.")
    var maxBodyBytes = 16 << 20

    @Option(help: "Record a checkpoint (every collection's digest) every N changes.")
    var checkpointEvery: UInt64 = 1000

    @Option(help: "...and at least every this many milliseconds while the head moves.")
    var checkpointIntervalMs = 1000

    @Option(help: "Keep at most this many changes in the log (default: no limit).")
    var retainChanges: UInt64?

    @Option(help: "Drop changes older than this many seconds (default 7 days; 0: no age limit).")
    var retainSeconds = 7 * 24 * 3600

    @Option(help: "Keep at most about this many bytes of logged values (default: no limit).")
    var retainBytes: Int64?

    @Option(help: "How often to apply the retention limits, in seconds.")
    var pruneIntervalSeconds = 30

    @Option(help: .hidden)
    var dropEveryNthStreamItem: Int?

    @Option(help: "Write the port listened on to this file once the server runs (useful with --port 0).")
    var portFile: String?

    @Option(
        help: """
            Capture the records from this PostgreSQL database (postgres://USER[:PASSWORD]@HOST[:PORT]/DB) \
            by logical decoding instead of taking writes over HTTP. Needs wal_level = logical, a role with \
            REPLICATION and SELECT on the tables, and the wal2json plugin.
            """)
    var postgres: String?

    @Option(help: "With --postgres: the tables to capture, comma-separated (schema.table, or table in public).")
    var tables: String?

    @Option(help: "With --postgres: the replication slot's name.")
    var slot = "concord"

    @Option(help: "With --postgres: milliseconds between polls of an idle slot.")
    var pollIntervalMs = 100

    @Option(
        help: """
            Require bearer tokens, read from this file: one token a line, NAME ROLE COLLECTIONS SECRET \
            (ROLE read, write or admin; COLLECTIONS a,b or *). Reloaded on SIGHUP and when the file changes.
            """)
    var tokensFile: String?

    @Option(help: "Require bearer tokens, given here as lines of the tokens file separated by ';'.")
    var tokens: String?

    @OptionGroup var global: GlobalOptions

    func validate() throws {
        if tokensFile != nil, tokens != nil { throw ValidationError("give --tokens-file or --tokens, not both") }
        if postgres != nil, (tables ?? "").isEmpty {
            throw ValidationError("--postgres needs --tables, e.g. --tables public.customers,public.orders")
        }
        if postgres == nil, tables != nil { throw ValidationError("--tables goes with --postgres") }
    }

    func run() async throws {
        let logger = global.bootstrapLogging(label: "concord.serve")
        guard let durability = SQLiteDurability(rawValue: durability) else {
            throw ValidationError("--durability must be full or normal")
        }
        var storeConfiguration = PublisherStore.Configuration()
        storeConfiguration.durability = durability
        guard checkpointIntervalMs > 0, pruneIntervalSeconds > 0, retainSeconds >= 0 else {
            throw ValidationError("intervals must be positive")
        }
        storeConfiguration.checkpoints.everyChanges = checkpointEvery
        storeConfiguration.checkpoints.interval = .milliseconds(checkpointIntervalMs)
        storeConfiguration.retention.maxChanges = retainChanges
        storeConfiguration.retention.maxAge = retainSeconds > 0 ? .seconds(retainSeconds) : nil
        storeConfiguration.retention.maxBytes = retainBytes
        let store: PublisherStore
        do {
            store = try PublisherStore(path: db, configuration: storeConfiguration)
        } catch {
            FileHandle.printError("error: \(error)")
            throw ExitCode(2)
        }
        var configuration = PublisherServer.Configuration()
        let access = AccessSource(file: tokensFile, text: tokens)
        var reloader: AccessReloader?
        if access.isConfigured {
            do {
                let gate = AccessGate(try access.load())
                configuration.access = gate
                if let tokensFile { reloader = AccessReloader(gate: gate, file: tokensFile, logger: logger) }
            } catch let error as ConcordError {
                FileHandle.printError("error: \(error.message)")
                throw ExitCode(2)
            }
        }
        configuration.host = host
        configuration.port = port
        configuration.maxBodyBytes = maxBodyBytes
        configuration.dropEveryNthStreamItem = dropEveryNthStreamItem
        var capture: PostgresCapture?
        if let postgres {
            var captureConfiguration = PostgresCapture.Configuration(
                url: postgres, tables: (tables ?? "").split(separator: ",").map(String.init))
            captureConfiguration.slot = slot
            captureConfiguration.pollInterval = .milliseconds(max(1, pollIntervalMs))
            capture = PostgresCapture(configuration: captureConfiguration, store: store, logger: logger)
            configuration.writesRefused =
                "this publisher captures its records from PostgreSQL; write to the database instead"
        }
        let host = self.host
        let portFile = self.portFile
        let app = PublisherServer.makeApplication(store: store, configuration: configuration, logger: logger) { port in
            logger.info("publisher listening", metadata: ["url": "http://\(host):\(port)", "feed": "\(store.feedID)"])
            print("concord: serving feed \(store.feedID) on http://\(host):\(port) (head \(store.head))")
            fflush(nil)
            if let portFile {
                try? String(port).write(toFile: portFile, atomically: true, encoding: .utf8)
            }
        }
        let group = ServiceGroup(
            configuration: .init(
                services: [
                    .init(service: app),
                    .init(
                        service: PublisherMaintenance(
                            store: store, pruneInterval: .seconds(pruneIntervalSeconds), logger: logger)),
                    .init(service: StreamCloser(store: store)),
                ] + (capture.map { [.init(service: $0)] } ?? []) + (reloader.map { [.init(service: $0)] } ?? []),
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger))
        do {
            try await group.run()
        } catch let error as ConcordError where error.code == .invalidConfiguration {
            FileHandle.printError("error: \(error.message)")
            throw ExitCode(2)
        }
    }
}
