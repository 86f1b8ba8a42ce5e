import ArgumentParser
import AsyncHTTPClient
import ConcordClient
import ConcordCore
import ConcordSQLite
import Foundation
import Logging

struct Export: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write a consistent snapshot of a source's collections to a file, for offline bootstrap.",
        discussion: """
            The file holds the chosen collections as they were at one source LSN, with their
            digests: self-describing, zlib-compressed, every block checksummed. With --source,
            Concord bootstraps a temporary replica, proves it equal to the source at its LSN by
            reconciliation, and writes the file from it; with --db it exports an existing
            replica (which must match its digests). `concord import` makes a replica from it.
            """)

    @Option(help: "The publisher's URL.")
    var source: String?

    @Option(help: "Export this replica file instead of bootstrapping from --source.")
    var db: String?

    @Option(help: "The file to write (must not exist).")
    var out: String

    @Option(help: "Only these collections (comma-separated), with --source.")
    var collections: String?

    @Flag(help: "No progress output.")
    var quiet = false

    @OptionGroup var output: OutputOptions
    @OptionGroup var global: GlobalOptions

    func validate() throws {
        guard (source == nil) != (db == nil) else { throw ValidationError("give either --source or --db") }
        if FileManager.default.fileExists(atPath: out) { throw ValidationError("\(out) exists; choose a new file") }
    }

    func run() async throws {
        let logger = global.bootstrapLogging(label: "concord.export")
        let started = ContinuousClock.now
        let header: SnapshotHeader
        do {
            if let db {
                guard FileManager.default.fileExists(atPath: db) else {
                    throw ConcordError(.invalidRequest, "no replica at \(db)")
                }
                header = try write(store: try ReplicaStore(path: db))
            } else {
                header = try await exportFromSource(source!, logger: logger)
            }
        } catch let error as ConcordError {
            FileHandle.printError("error: \(error.message)")
            throw ExitCode(1)
        }
        let size = (try? FileManager.default.attributesOfItem(atPath: out)[.size] as? Int) ?? 0
        let seconds = (ContinuousClock.now - started).seconds
        if output.json {
            let object: [String: Any] = [
                "file": out, "lsn": header.lsn, "records": header.recordCount, "bytes": size, "seconds": seconds,
                "collections": header.collections.map { ["name": $0.name, "count": $0.digest.count] },
            ]
            let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        } else {
            print(
                "exported \(header.recordCount) records of \(header.collections.map(\.name).joined(separator: ", ")) "
                    + "at LSN \(header.lsn) to \(out) (\(size) bytes, \(String(format: "%.2f", seconds)) s)")
        }
    }

    func write(store: ReplicaStore) throws -> SnapshotHeader {
        let progress = ProgressLine("export", quiet: quiet || output.json)
        defer { progress.finish() }
        return try store.export(to: out, progress: progress.update)
    }

    /// Bootstraps a temporary replica, proves it equal to the source at its LSN, exports it.
    func exportFromSource(_ source: String, logger: Logger) async throws -> SnapshotHeader {
        let folder = URL(fileURLWithPath: out).deletingLastPathComponent()
            .appendingPathComponent(".concord-export-\(getpid())")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: folder) }
        let store = try ReplicaStore(path: folder.appendingPathComponent("snapshot.sqlite").path)
        let http = SourceClient.makeHTTPClient()
        defer { _ = http.shutdown() }
        var configuration = Subscriber.Configuration(
            source: source, collections: collections?.split(separator: ",").map(String.init))
        configuration.scrubInterval = nil
        configuration.backoffMaximum = .seconds(1)
        configuration.bootstrapProgress = CollectionProgress(label: "bootstrap", quiet: quiet || output.json).update
        let subscriber = Subscriber(configuration: configuration, store: store, http: http, logger: logger)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await subscriber.run() }
            let deadline = ContinuousClock.now + .seconds(3600)
            while ContinuousClock.now < deadline {
                if let state = try store.state(), state.progress.phase == .following, state.verifiedLSN > 0 { break }
                try await Task.sleep(for: .milliseconds(100))
            }
            group.cancelAll()
        }
        guard let state = try store.state(), state.progress.phase == .following else {
            throw ConcordError(.unavailable, "could not copy \(source) within an hour")
        }
        // Proof at the exported LSN: an equal collection decodes from its first coded symbol.
        let reconciler = Reconciler(client: SourceClient(baseURL: source, http: http), logger: logger)
        for name in try store.digests().keys.sorted() {
            let report = try await reconciler.reconcile(
                name, at: state.position, local: try await store.sketch(of: name), store: store, repair: false)
            guard report.isEqual else {
                throw ConcordError(.internal, "the copy of \(name) differs from the source at \(state.position)")
            }
        }
        return try write(store: store)
    }
}

struct Import: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make a new replica file from an export file.",
        discussion: """
            Every block and every collection's digest is checked; a corrupt, truncated or foreign
            file is refused and nothing is created. The replica is built beside --db and renamed
            into place at the end, so a kill halfway leaves --db as it was. `concord follow` on
            it continues from the export's LSN (or reconciles when the source's log no longer
            reaches back to it).
            """)

    @Argument(help: "The export file.")
    var file: String

    @Option(help: "The replica file to create (must not exist).")
    var db: String

    @Flag(help: "No progress output.")
    var quiet = false

    @OptionGroup var output: OutputOptions
    @OptionGroup var global: GlobalOptions

    func run() async throws {
        _ = global.bootstrapLogging(label: "concord.import")
        let started = ContinuousClock.now
        let progress = ProgressLine("import", quiet: quiet || output.json)
        let header: SnapshotHeader
        do {
            header = try ReplicaStore.importSnapshot(from: file, to: db, progress: progress.update)
            progress.finish()
        } catch let error as ConcordError {
            progress.finish()
            FileHandle.printError("error: \(error.message)")
            throw ExitCode(1)
        }
        let seconds = (ContinuousClock.now - started).seconds
        if output.json {
            let object: [String: Any] = [
                "db": db, "lsn": header.lsn, "records": header.recordCount, "seconds": seconds, "feed": header.feedID,
            ]
            let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        } else {
            print(
                "imported \(header.recordCount) records at LSN \(header.lsn) into \(db) "
                    + "(\(String(format: "%.2f", seconds)) s); continue with: concord follow --source \(header.source) --db \(db)"
            )
        }
    }
}
