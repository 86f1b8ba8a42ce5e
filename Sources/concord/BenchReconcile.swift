import ConcordClient
import ConcordCore
import ConcordSQLite
import ConcordServer
import Foundation
import Logging

extension Bench {
    /// Finding and repairing differences between a replica and its source, and recovery
    /// past the log's retention, counting the bytes of every exchange.
    func reconcileBenchmark(folder: URL, logger: Logger, results: inout [String: Double]) async throws {
        let count = records
        let store = try Self.source(in: folder, named: "reconcile-source")
        say("reconcile: \(count) records of about 225-byte values; differences made with plain SQL on the replica")
        try await Self.load(store, count: count, size: 225, revision: 0)
        let replicaPath = folder.appendingPathComponent("reconcile-replica.sqlite").path
        let report = try await PublisherServer.withRunningServer(
            store: store, configuration: Self.server, logger: logger
        ) { url in
            try await Self.bootstrapReplica(source: url, store: store, path: replicaPath)
            var report: [String: Double] = [:]
            let http = SourceClient.makeHTTPClient()
            defer { _ = http.shutdown() }
            let reconciler = Reconciler(client: SourceClient(baseURL: url, http: http), logger: logger)
            let replica = try ReplicaStore(path: replicaPath)
            let position = try replica.state()!.position

            // 999 scattered differences: 333 stale, 333 missing, 333 extra.
            let step = count / 1000
            func keys(_ offset: Int) -> String {
                (0..<333).map { "'\(SampleData.key(1 + offset + $0 * 3 * step))'" }.joined(separator: ",")
            }
            let extra = (0..<333).map {
                "('x\($0)', 1, '\(SampleData.value(id: count + 1 + $0, size: 225))')"
            }.joined(separator: ",")
            try PlainSQL.execute(
                path: replicaPath,
                """
                UPDATE bench SET value = '{"damaged":true}' WHERE key IN (\(keys(0)));
                DELETE FROM bench WHERE key IN (\(keys(step)));
                INSERT INTO bench (key, version, value) VALUES \(extra);
                """)
            let scanStart = ContinuousClock.now
            let scanned = try await replica.scanAll()["bench"]!
            let scanSeconds = (ContinuousClock.now - scanStart).seconds
            try await replica.adopt(scanned)
            let found = try await reconciler.reconcile(
                "bench", at: position, local: scanned.sketch, store: replica, repair: true)
            let equal = try await replica.scanAll()["bench"]!.digest == store.feedInfo().collections[0].digest
            report["reconcile_999_seconds"] = found.seconds
            report["reconcile_999_overhead_bytes"] = Double(found.totalBytes)
            report["reconcile_999_record_bytes"] = Double(found.recordBytes)
            report["reconcile_999_symbols"] = Double(found.symbols)
            report["replica_scan_seconds"] = scanSeconds
            say(
                String(
                    format: "  999 differences (%d stale, %d missing, %d extra) found and repaired in %.3f s, "
                        + "%d symbols, %d bytes beyond the %d bytes of the records; equal after: %@",
                    found.stale.count, found.missing.count, found.extra.count, found.seconds, found.symbols,
                    found.totalBytes, found.recordBytes, equal ? "yes" : "NO"))
            say(
                String(
                    format: "    time: symbols %.3f s, lookup %.3f s, naming the extra keys %.3f s, repair %.3f s",
                    found.symbolSeconds, found.lookupSeconds, found.localKeySeconds, found.repairSeconds))
            say(
                String(
                    format: "    against reladiff (find only) 3.56 s and 558 KB: %.1fx faster, %.1fx fewer bytes; "
                        + "pg_comparator 2.19 s and 13.2 MB: %.1fx, %.0fx",
                    3.56 / found.seconds, 558_000 / Double(found.totalBytes), 2.19 / found.seconds,
                    13_200_000 / Double(found.totalBytes)))
            say(
                String(
                    format: "    (the replica's sketch is kept by a running follow; from a cold file, one scan "
                        + "of the replica takes %.2f s)", scanSeconds))

            // One difference.
            try PlainSQL.execute(
                path: replicaPath, "UPDATE bench SET value = '{\"one\":1}' WHERE key = '\(SampleData.key(count / 2))'")
            let one = try await replica.scanAll()["bench"]!
            try await replica.adopt(one)
            let single = try await reconciler.reconcile(
                "bench", at: position, local: one.sketch, store: replica, repair: true)
            report["reconcile_1_total_bytes"] = Double(single.totalBytes + single.recordBytes)
            say(
                String(
                    format: "  1 difference: %d bytes in all (%d symbols), %.3f s",
                    single.totalBytes + single.recordBytes,
                    single.symbols, single.seconds))
            return report
        }
        results.merge(report) { $1 }
        try await retentionBenchmark(folder: folder, logger: logger, results: &results)
    }

    /// A replica stopped while 1% of the records changed and the log was pruned past it:
    /// reconciliation bytes against the changed records and against a full re-bootstrap.
    func retentionBenchmark(folder: URL, logger: Logger, results: inout [String: Double]) async throws {
        let count = records
        let changed = count / 100
        // The log keeps half of the changes made while the replica is stopped: it falls out of it.
        let store = try Self.source(
            in: folder, named: "retention-source", retainChanges: UInt64(max(1, changed / 2)))
        try await Self.load(store, count: count, size: 225, revision: 0)
        let replicaPath = folder.appendingPathComponent("retention-replica.sqlite").path
        let report = try await PublisherServer.withRunningServer(
            store: store, configuration: Self.server, logger: logger
        ) { url in
            try await Self.bootstrapReplica(source: url, store: store, path: replicaPath)
            var batch: [WriteOperation] = []
            for index in 0..<changed {
                let id = 1 + index * 100
                batch.append(
                    .upsert("bench", SampleData.key(id), json: SampleData.value(id: id, revision: 1, size: 225)))
            }
            for start in stride(from: 0, to: batch.count, by: 500) {
                try await store.write(Array(batch[start..<min(batch.count, start + 500)]))
            }
            try await store.pruneLog()
            let feed = try await store.feedInfo()
            let replica = try ReplicaStore(path: replicaPath)
            guard try replica.state()!.position + 1 < feed.oldest else {
                throw ConcordError(.internal, "the log still reaches the replica")
            }
            let http = SourceClient.makeHTTPClient()
            defer { _ = http.shutdown() }
            let client = SourceClient(baseURL: url, http: http)
            let reconciler = Reconciler(client: client, logger: logger)
            let local = try await replica.sketch(of: "bench")
            let found = try await reconciler.reconcile(
                "bench", at: feed.head, local: local, store: replica, repair: true)
            try await replica.jump(to: feed.head)
            // What a full re-bootstrap would move: every page of the collection.
            var bootstrapBytes = 0
            var afterKey: String?
            while true {
                let page = try await client.page(collection: "bench", afterKey: afterKey, limit: 10_000)
                bootstrapBytes += WireFormat.encode(page).count
                guard page.hasMore else { break }
                afterKey = page.records.last?.key
            }
            let moved = found.totalBytes + found.recordBytes
            let equal = try await replica.scanAll()["bench"]!.digest == feed.collections[0].digest
            say(
                String(
                    format: "  past retention, %d of %d records changed: %d bytes moved, %.2fx the %d bytes of the "
                        + "changed records; a full re-bootstrap moves %d bytes (%.1fx more); equal after: %@",
                    changed, count, moved, Double(moved) / Double(found.recordBytes), found.recordBytes,
                    bootstrapBytes, Double(bootstrapBytes) / Double(moved), equal ? "yes" : "NO"))
            return [
                "retention_recovery_bytes": Double(moved),
                "retention_changed_record_bytes": Double(found.recordBytes),
                "retention_full_bootstrap_bytes": Double(bootstrapBytes),
            ]
        }
        results.merge(report) { $1 }
    }
}
