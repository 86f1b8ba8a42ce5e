import ArgumentParser
import AsyncHTTPClient
import ConcordClient
import ConcordCore
import ConcordPostgres
import ConcordSQLite
import ConcordServer
import Foundation
import Logging
import ServiceLifecycle

struct Follow: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Keep a replica (SQLite file or PostgreSQL schema) equal to a publisher's feed.",
        discussion: """
            A new replica is bootstrapped from snapshot pages while the log is followed; then
            the live stream is applied, each source transaction atomically with the position.
            Restart it at any time (even after kill -9): it resumes where it was.
            """)

    @Option(help: "The publisher's URL, e.g. http://127.0.0.1:7070.")
    var source: String = "http://127.0.0.1:7070"

    @Option(help: "The replica's SQLite file (created if missing).")
    var db: String?

    @Option(
        help: """
            Keep the replica in this PostgreSQL database instead (postgres://USER[:PASSWORD]@HOST[:PORT]/DB): \
            one table per collection, in --schema.
            """)
    var postgres: String?

    @Option(help: "With --postgres: the schema holding the replica's tables (created if missing).")
    var schema = "public"

    @Option(help: "Follow only these collections (comma-separated).")
    var collections: String?

    @Option(help: "Records per snapshot page during bootstrap.")
    var pageSize = 10_000

    @Option(
        help:
            "Re-hash the stored rows and repair rows changed behind Concord's back every this many seconds (0: never).")
    var scrubIntervalSeconds = 3600

    @Flag(
        help: """
            Apply without digests, checkpoint comparison or scrub. Only to measure what proof \
            costs: such a replica is never verified.
            """)
    var noVerification = false

    @Flag(help: "No progress bar for the bootstrap.")
    var quiet = false

    @Option(
        help: """
            The name the publisher's dashboard and metrics show this subscriber under (default: this \
            host and the replica's place). Printable ASCII, no spaces.
            """)
    var name: String?

    @Option(help: "Serve /metrics (Prometheus), /healthz and /readyz on this port (0 picks a free one).")
    var metricsPort: Int?

    @Option(help: "Address for --metrics-port.")
    var metricsHost = "127.0.0.1"

    @Flag(help: .hidden)
    var auditApplied = false

    @OptionGroup var access: SourceAccessOptions
    @OptionGroup var global: GlobalOptions

    func run() async throws {
        guard pageSize >= 1 else { throw ValidationError("--page-size must be at least 1") }
        let logger = global.bootstrapLogging(label: "concord.follow")
        let filter = try collections.map { list in
            try list.split(separator: ",").map { name in
                let name = String(name)
                do { try CollectionName.validate(name) } catch { throw ValidationError("\(error)") }
                return name
            }
        }
        let store: any ReplicaStoring
        switch (db, postgres) {
        case (let db?, nil):
            var storeConfiguration = ReplicaStore.Configuration()
            storeConfiguration.auditAppliedChanges = auditApplied
            storeConfiguration.tracksDigests = !noVerification
            store = try ReplicaStore(path: db, configuration: storeConfiguration)
        case (nil, let postgres?):
            var storeConfiguration = PostgresReplicaStore.Configuration(schema: schema)
            storeConfiguration.tracksDigests = !noVerification
            do {
                store = try await PostgresReplicaStore.open(
                    url: postgres, configuration: storeConfiguration, logger: logger)
            } catch let error as ConcordError {
                FileHandle.printError("error: \(error.message)")
                throw ExitCode(2)
            }
        default:
            throw ValidationError("give the replica's place: --db FILE or --postgres URL (one of them)")
        }
        if let state = try await store.state(), let filter, Set(filter) != Set(state.collections ?? []) {
            throw ValidationError(
                "\(store.location) follows \(state.collections?.joined(separator: ",") ?? "all collections"); "
                    + "start a new replica to follow others")
        }
        var configuration = Subscriber.Configuration(source: source, collections: filter)
        configuration.pageSize = pageSize
        configuration.token = try access.resolved()
        configuration.verification = !noVerification
        configuration.scrubInterval = scrubIntervalSeconds > 0 ? .seconds(scrubIntervalSeconds) : nil
        configuration.bootstrapProgress = CollectionProgress(label: "bootstrap", quiet: quiet).update
        configuration.name = try subscriberName(location: store.location)
        let http = try access.makeHTTPClient()
        let subscriber = Subscriber(configuration: configuration, store: store, http: http, logger: logger)
        var services: [ServiceGroupConfiguration.ServiceConfiguration] = [.init(service: subscriber)]
        if let metricsPort {
            let host = metricsHost
            let metricsApp = MetricsServer.makeApplication(
                host: host, port: metricsPort, logger: logger,
                metrics: { await subscriber.metrics.render(subscriber) },
                readiness: { Self.readiness(of: subscriber.activity) }
            ) { port in
                logger.info("metrics listening", metadata: ["url": "http://\(host):\(port)/metrics"])
            }
            // Listed first, so it stops last: the metrics stay readable while the replica shuts down.
            services.insert(.init(service: metricsApp), at: 0)
        }
        let group = ServiceGroup(
            configuration: .init(services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        do {
            try await group.run()
        } catch {
            try? await http.shutdown()
            if let error = error as? ConcordError {
                FileHandle.printError("error: \(error.message)")
                throw ExitCode(1)
            }
            throw error
        }
        try await http.shutdown()
        await (store as? PostgresReplicaStore)?.close()
    }

    /// The replica serves reads that are current: it is past its bootstrap and following.
    static func readiness(of activity: Subscriber.Activity) -> String? {
        switch activity {
        case .following, .verifying, .repairing: nil
        default: activity.rawValue
        }
    }

    /// `--name`, checked, or `HOST:PLACE` (the replica's file or schema).
    func subscriberName(location: String) throws -> String {
        if let name {
            do { try SubscriberReport.validate(name: name) } catch { throw ValidationError("--name: \(error.message)") }
            return name
        }
        let host = ProcessInfo.processInfo.hostName.split(separator: ".").first.map(String.init) ?? "host"
        let place = location.split(separator: "/").last.map(String.init) ?? location
        let safe = String(
            String(
                decoding: "\(host):\(place)".utf8.map { SubscriberReport.isNameByte($0) ? $0 : UInt8(ascii: "_") },
                as: UTF8.self
            )
            .prefix(SubscriberReport.maxNameBytes))
        return safe
    }
}
