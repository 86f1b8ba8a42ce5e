import ConcordCore
import ConcordSQLite
import ConcordServer
import Foundation
import Logging

extension Bench {
    /// Export and import of a bootstrapped replica: records per second, and the file's size
    /// against the replica's SQLite file.
    func exportBenchmark(folder: URL, logger: Logger, results: inout [String: Double]) async throws {
        let count = records
        let store = try Self.source(in: folder, named: "export-source")
        say("export: \(count) records of about 225-byte values, from a replica to a file and back")
        try await Self.load(store, count: count, size: 225, revision: 0)
        let replicaPath = folder.appendingPathComponent("export-replica.sqlite").path
        try await PublisherServer.withRunningServer(store: store, configuration: Self.server, logger: logger) { url in
            try await Self.bootstrapReplica(source: url, store: store, path: replicaPath)
        }
        let replica = try ReplicaStore(path: replicaPath)
        try await replica.rebuildDigests()
        try replica.close()
        let sqliteBytes = Self.fileSize(replicaPath)
        let file = folder.appendingPathComponent("export.concord").path
        let exportStart = ContinuousClock.now
        try ReplicaStore(path: replicaPath).export(to: file)
        let exportSeconds = (ContinuousClock.now - exportStart).seconds
        let fileBytes = Self.fileSize(file)
        let importPath = folder.appendingPathComponent("imported.sqlite").path
        let importStart = ContinuousClock.now
        try ReplicaStore.importSnapshot(from: file, to: importPath)
        let importSeconds = (ContinuousClock.now - importStart).seconds
        results["export_records_per_s"] = Double(count) / exportSeconds
        results["import_records_per_s"] = Double(count) / importSeconds
        results["export_file_bytes"] = Double(fileBytes)
        results["export_sqlite_bytes"] = Double(sqliteBytes)
        say(
            String(
                format: "  export: %.2f s (%.0f records/s); import: %.2f s (%.0f records/s)", exportSeconds,
                Double(count) / exportSeconds, importSeconds, Double(count) / importSeconds))
        say(
            String(
                format: "  file: %d bytes, %.2fx the replica's SQLite file (%d bytes)", fileBytes,
                Double(fileBytes) / Double(sqliteBytes), sqliteBytes))
    }

    static func fileSize(_ path: String) -> Int {
        (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? 0
    }
}
