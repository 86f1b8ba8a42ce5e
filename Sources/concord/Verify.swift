import ArgumentParser
import AsyncHTTPClient
import ConcordClient
import ConcordCore
import ConcordPostgres
import ConcordSQLite
import Foundation
import Logging

struct Verify: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check a replica against its source now, and optionally repair it.",
        discussion: """
            Re-hashes the replica's stored rows, then reconciles each collection with the source
            at one LSN (the replica's position, or the source's head when the log no longer
            reaches back to it): prints per collection whether it is equal and which keys are
            missing, extra or stale. Exit status 0: all equal (or repaired); 3: differences found.
            """)

    @Option(help: "The publisher's URL.")
    var source: String = "http://127.0.0.1:7070"

    @OptionGroup var replica: ReplicaPlace

    @Flag(help: "Write what the source holds for the keys that differ.")
    var repair = false

    @Option(help: "Print at most this many keys per kind of difference.")
    var maxKeys = 20

    @Flag(help: "No progress bars.")
    var quiet = false

    @OptionGroup var access: SourceAccessOptions
    @OptionGroup var output: OutputOptions
    @OptionGroup var global: GlobalOptions

    func run() async throws {
        let logger = global.bootstrapLogging(label: "concord.verify")
        let store = try await replica.open(logger: logger)
        do {
            try await verify(store, logger: logger)
        } catch {
            await (store as? PostgresReplicaStore)?.close()
            throw error
        }
        await (store as? PostgresReplicaStore)?.close()
    }

    func verify(_ store: any ReplicaStoring, logger: Logger) async throws {
        let db = store.location
        guard let state = try await store.state() else {
            FileHandle.printError("error: \(db) is not initialized; run concord follow first")
            throw ExitCode(1)
        }
        guard state.progress.phase == .following else {
            FileHandle.printError("error: \(db) is still bootstrapping; verify it once the bootstrap is complete")
            throw ExitCode(1)
        }
        let http = try access.makeHTTPClient()
        let client = SourceClient(baseURL: source, http: http, configuration: try access.clientConfiguration)
        var reports: [ReconciliationReport] = []
        do {
            let feed = try await client.feed()
            guard feed.feedID == state.feedID else {
                FileHandle.printError("error: \(db) follows feed \(state.feedID), but \(source) serves \(feed.feedID)")
                throw ExitCode(1)
            }
            let pastRetention = state.position + 1 < feed.oldest
            let lsn = pastRetention ? feed.head : state.position
            let reconciler = Reconciler(client: client, logger: logger)
            var names = Set(feed.collections.map(\.name)).union(try await store.collections())
            if let followed = state.collections { names.formIntersection(followed) }
            let hashing = ProgressLine("hash stored rows", unit: "rows", quiet: quiet || output.json)
            let scanned = try await store.scanAll(progress: hashing.update)
            hashing.finish()
            let reconciling = ProgressLine(
                repair ? "reconcile and repair" : "reconcile", unit: "collections", quiet: quiet || output.json)
            for (index, name) in names.sorted().enumerated() {
                let local = scanned[name]?.sketch ?? RatelessSketch(capacity: ReplicaSketch.capacity)
                reports.append(
                    try await reconciler.reconcile(name, at: lsn, local: local, store: store, repair: repair))
                reconciling.update(index + 1, names.count)
            }
            reconciling.finish()
            if repair, pastRetention { try await store.jump(to: lsn) }
            if repair { try await store.rebuildDigests() }
        } catch let error as ConcordError {
            try? await http.shutdown()
            FileHandle.printError("error: \(error.message)")
            throw ExitCode(1)
        } catch {
            try? await http.shutdown()
            throw error
        }
        try await http.shutdown()
        print(report: reports, json: output.json, maxKeys: maxKeys)
        if !repair, reports.contains(where: { !$0.isEqual }) { throw ExitCode(3) }
    }
}

/// Prints reconciliation reports as text or JSON (shared by verify and diff).
func print(report reports: [ReconciliationReport], json: Bool, maxKeys: Int) {
    if json {
        let objects: [[String: Any]] = reports.map { report in
            [
                "collection": report.collection, "lsn": report.lsn, "equal": report.isEqual,
                "missing": report.missing, "extra": report.extra, "stale": report.stale,
                "tooLarge": report.tooLarge, "repaired": report.repaired, "symbols": report.symbols,
                "bytes": report.totalBytes, "recordBytes": report.recordBytes, "seconds": report.seconds,
            ]
        }
        if let data = try? JSONSerialization.data(withJSONObject: objects, options: [.prettyPrinted, .sortedKeys]) {
            print(String(decoding: data, as: UTF8.self))
        }
        return
    }
    for report in reports {
        let name = report.collection.padding(toLength: 20, withPad: " ", startingAt: 0)
        if report.isEqual {
            print("\(name) equal at LSN \(report.lsn)")
            continue
        }
        if report.tooLarge {
            print(
                "\(name) differs at LSN \(report.lsn) in more records than a reconciliation handles"
                    + (report.repaired ? "; copying it again" : ""))
            continue
        }
        print(
            "\(name) differs at LSN \(report.lsn): \(report.missing.count) missing, \(report.extra.count) extra, "
                + "\(report.stale.count) stale\(report.repaired ? " (repaired)" : "")")
        for (kind, keys) in [("missing", report.missing), ("extra", report.extra), ("stale", report.stale)]
        where !keys.isEmpty {
            let shown = keys.prefix(maxKeys).joined(separator: ", ")
            print("  \(kind): \(shown)\(keys.count > maxKeys ? ", … (\(keys.count - maxKeys) more)" : "")")
        }
    }
}

/// An existing replica: a SQLite file, or a schema in a PostgreSQL database.
struct ReplicaPlace: ParsableArguments {
    @Option(help: "The replica's SQLite file.")
    var db: String?

    @Option(help: "Or the PostgreSQL database holding the replica (postgres://USER[:PASSWORD]@HOST[:PORT]/DB).")
    var postgres: String?

    @Option(help: "With --postgres: the replica's schema.")
    var schema = "public"

    func validate() throws {
        if db != nil, postgres != nil { throw ValidationError("give --db or --postgres, not both") }
    }

    /// Opens the replica without creating anything; prints why and exits 1 when there is none.
    func open(logger: Logger) async throws -> any ReplicaStoring {
        do {
            if let postgres {
                return try await PostgresReplicaStore.open(
                    url: postgres, configuration: .init(schema: schema), creating: false, logger: logger)
            }
            guard let db else { throw ValidationError("give the replica: --db PATH or --postgres URL") }
            guard FileManager.default.fileExists(atPath: db) else {
                throw ConcordError(.storage, "no replica at \(db)")
            }
            return try ReplicaStore(path: db)
        } catch let error as ConcordError {
            FileHandle.printError("error: \(error.message)")
            throw ExitCode(1)
        }
    }
}
