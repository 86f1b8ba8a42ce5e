import ArgumentParser
import ConcordCore
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

    @Option(help: .hidden)
    var dropEveryNthStreamItem: Int?

    @Option(help: "Write the port listened on to this file once the server runs (useful with --port 0).")
    var portFile: String?

    @OptionGroup var global: GlobalOptions

    func run() async throws {
        let logger = global.bootstrapLogging(label: "concord.serve")
        guard let durability = SQLiteDurability(rawValue: durability) else {
            throw ValidationError("--durability must be full or normal")
        }
        var storeConfiguration = PublisherStore.Configuration()
        storeConfiguration.durability = durability
        let store: PublisherStore
        do {
            store = try PublisherStore(path: db, configuration: storeConfiguration)
        } catch {
            FileHandle.printError("error: \(error)")
            throw ExitCode(2)
        }
        var configuration = PublisherServer.Configuration()
        configuration.host = host
        configuration.port = port
        configuration.maxBodyBytes = maxBodyBytes
        configuration.dropEveryNthStreamItem = dropEveryNthStreamItem
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
                services: [.init(service: app), .init(service: StreamCloser(store: store))],
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger))
        try await group.run()
    }
}
