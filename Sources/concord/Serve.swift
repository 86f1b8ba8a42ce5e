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
    var maxBodyBytes = Serve.serverDefaults.maxBodyBytes

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

    /// No longer used (the log's writer wakes when a transaction is queued); still accepted so
    /// that command lines and configuration files that name it keep working.
    @Option(help: .hidden)
    var pollIntervalMs = 5

    @Option(
        help: """
            With --postgres: rows written per publisher transaction while the tables are copied \
            (larger is faster, each holds its rows in memory).
            """)
    var copyBatch = PostgresCapture.Configuration(url: "", tables: []).copyBatch

    @Option(
        help: """
            With --postgres: a source transaction with more changes goes into the log in pieces of \
            this many while it is read, still committed whole (smaller holds less in memory).
            """)
    var transactionPiece = PostgresCapture.Configuration(url: "", tables: []).transactionPiece

    @Option(
        help: """
            With --postgres: seconds between checks of the captured tables' definitions (columns, \
            types, primary key); after an ALTER TABLE the tables are copied again.
            """)
    var tableCheckSeconds = Serve.seconds(PostgresCapture.Configuration(url: "", tables: []).tableCheckInterval)

    @Option(
        help: """
            Require bearer tokens, read from this file: one token a line, NAME ROLE COLLECTIONS SECRET \
            (ROLE read, write or admin; COLLECTIONS a,b or *). Reloaded on SIGHUP and when the file changes.
            """)
    var tokensFile: String?

    @Option(help: "Require bearer tokens, given here as lines of the tokens file separated by ';'.")
    var tokens: String?

    @Option(help: "Serve HTTPS with this certificate chain (PEM); needs --tls-key.")
    var tlsCert: String?

    @Option(help: "The private key (PEM) of --tls-cert.")
    var tlsKey: String?

    @Option(help: "Longest key accepted in a write, in bytes.")
    var maxKeyBytes = Serve.limitDefaults.maxKeyBytes

    @Option(help: "Largest value accepted in a write, in bytes.")
    var maxValueBytes = Serve.limitDefaults.maxValueBytes

    @Option(help: "Most changes in one write.")
    var maxBatchChanges = Serve.limitDefaults.maxBatchChanges

    @Option(help: "Deepest nesting of JSON accepted in a value.")
    var maxJsonDepth = Serve.limitDefaults.maxDepth

    @Option(help: "Largest snapshot page (and pull) a client may ask for.")
    var maxPageSize = Serve.serverDefaults.maxPageLimit

    @Option(help: "Longest long-poll wait a client may ask for, in seconds.")
    var maxWaitSeconds = Serve.seconds(Serve.serverDefaults.maxWait)

    @Option(help: "Change streams one token may hold open at once (without tokens only --max-streams applies).")
    var maxStreamsPerToken = Serve.serverDefaults.maxStreamsPerToken

    @Option(help: "Change streams open at once in all.")
    var maxStreams = Serve.serverDefaults.maxStreams

    @Option(help: "Disconnect a client that reads nothing for this many seconds while data waits for it.")
    var stalledClientSeconds = Serve.seconds(Serve.serverDefaults.stalledClientTimeout)

    @Option(help: "A request body must arrive within this many seconds (else 408).")
    var requestBodySeconds = Serve.seconds(Serve.serverDefaults.requestBodyTimeout)

    @OptionGroup var global: GlobalOptions

    /// The flags' defaults are the configurations' own, so the two cannot drift apart.
    static let serverDefaults = PublisherServer.Configuration()
    static let limitDefaults = WireFormat.Limits()
    static func seconds(_ duration: Duration) -> Int { Int(duration.components.seconds) }

    func validate() throws {
        if tokensFile != nil, tokens != nil { throw ValidationError("give --tokens-file or --tokens, not both") }
        if (tlsCert == nil) != (tlsKey == nil) { throw ValidationError("--tls-cert and --tls-key go together") }
        for (name, value) in [
            ("--max-key-bytes", maxKeyBytes), ("--max-value-bytes", maxValueBytes),
            ("--max-batch-changes", maxBatchChanges), ("--max-json-depth", maxJsonDepth),
            ("--max-page-size", maxPageSize), ("--max-streams-per-token", maxStreamsPerToken),
            ("--max-streams", maxStreams), ("--stalled-client-seconds", stalledClientSeconds),
            ("--request-body-seconds", requestBodySeconds),
            ("--max-body-bytes", maxBodyBytes), ("--copy-batch", copyBatch),
            ("--transaction-piece", transactionPiece), ("--table-check-seconds", tableCheckSeconds),
        ] where value < 1 {
            throw ValidationError("\(name) must be at least 1")
        }
        if maxWaitSeconds < 0 { throw ValidationError("--max-wait-seconds cannot be negative") }
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
        storeConfiguration.limits.maxKeyBytes = maxKeyBytes
        storeConfiguration.limits.maxValueBytes = maxValueBytes
        storeConfiguration.limits.maxBatchChanges = maxBatchChanges
        storeConfiguration.limits.maxDepth = maxJsonDepth
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
        configuration.maxChangeLimit = maxPageSize
        configuration.defaultChangeLimit = min(configuration.defaultChangeLimit, maxPageSize)
        configuration.maxPageLimit = maxPageSize
        configuration.defaultPageLimit = min(configuration.defaultPageLimit, maxPageSize)
        configuration.maxWait = .seconds(maxWaitSeconds)
        configuration.maxStreamsPerToken = maxStreamsPerToken
        configuration.maxStreams = maxStreams
        configuration.stalledClientTimeout = .seconds(stalledClientSeconds)
        configuration.requestBodyTimeout = .seconds(requestBodySeconds)
        if let tlsCert, let tlsKey { configuration.tls = .init(certificate: tlsCert, key: tlsKey) }
        configuration.dropEveryNthStreamItem = dropEveryNthStreamItem
        var capture: PostgresCapture?
        if let postgres {
            var captureConfiguration = PostgresCapture.Configuration(
                url: postgres, tables: (tables ?? "").split(separator: ",").map(String.init))
            captureConfiguration.slot = slot
            captureConfiguration.copyBatch = copyBatch
            captureConfiguration.transactionPiece = transactionPiece
            captureConfiguration.tableCheckInterval = .seconds(tableCheckSeconds)
            capture = PostgresCapture(configuration: captureConfiguration, store: store, logger: logger)
            configuration.writesRefused =
                "this publisher captures its records from PostgreSQL; write to the database instead"
            configuration.readiness = { [capture] in
                capture?.isStreaming == true ? nil : "copying or reconnecting to PostgreSQL"
            }
        }
        let host = self.host
        let portFile = self.portFile
        let scheme = configuration.tls == nil ? "http" : "https"
        let app: any Service
        do {
            app = try PublisherServer.makeApplication(store: store, configuration: configuration, logger: logger) {
                port in
                logger.info(
                    "publisher listening", metadata: ["url": "\(scheme)://\(host):\(port)", "feed": "\(store.feedID)"])
                print("concord: serving feed \(store.feedID) on \(scheme)://\(host):\(port) (head \(store.head))")
                fflush(nil)
                if let portFile {
                    try? String(port).write(toFile: portFile, atomically: true, encoding: .utf8)
                }
            }
        } catch let error as ConcordError {
            FileHandle.printError("error: \(error.message)")
            throw ExitCode(2)
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
