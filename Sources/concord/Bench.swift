import ArgumentParser
import ConcordClient
import ConcordCore
import ConcordSQLite
import ConcordServer
import Foundation
import Logging
import PostgresNIO

struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure streaming apply, bootstrap and raw SQLite insert speed on this machine.",
        discussion: """
            Runs a publisher in this process and a real `concord follow` child process over
            loopback HTTP, in a temporary folder. Baselines (shared/bench/README.md, this machine
            kind): PostgreSQL logical replication applies about 51,000 rows/s and syncs 1,000,000
            rows initially in 5.05 s.
            """)

    @Argument(
        help: "What to measure: stream, bootstrap, upkeep, reconcile, export, all, or postgres (needs --postgres).")
    var what: String = "all"

    @Option(help: "Changes per streaming phase.")
    var changes = 200_000

    @Option(help: "Records for the bootstrap benchmark.")
    var records = 1_000_000

    @Option(
        help: """
            For bench postgres: the one-row transactions committed while the replicas are paused, \
            whose backlog they then catch up on.
            """)
    var transactions = 100_000

    @Option(
        help: """
            For bench postgres: a PostgreSQL 15 server with wal_level=logical and wal2json, as a superuser \
            URL (scripts/bench-postgres.sh starts a throwaway one). Its concord_bench_* databases are replaced.
            """)
    var postgres: String?

    @Option(
        help: """
            For bench postgres: the server for the replicas (PostgreSQL's subscription and Concord's \
            replica); default: --postgres.
            """)
    var replicaPostgres: String?

    @Option(
        help: """
            For bench postgres: the concord binary the publishers and replicas run (default: this \
            one), to compare two builds against the same servers in one run.
            """)
    var concordBinary: String?

    @Flag(
        help: """
            For bench stream: run both replicas without verification, to measure how far apart two \
            identical setups land on this machine (the noise under the verification ratio).
            """)
    var control = false

    @Flag(help: "Keep the temporary folder (and the PostgreSQL benchmark's databases).")
    var keep = false

    @OptionGroup var output: OutputOptions
    @OptionGroup var global: GlobalOptions

    static var server: PublisherServer.Configuration {
        var configuration = PublisherServer.Configuration()
        configuration.port = 0
        return configuration
    }

    static let pgApplyRowsPerSecond = 51_000.0
    static let pgInitialSyncSeconds = 5.05

    func run() async throws {
        let logger = global.bootstrapLogging(label: "concord.bench")
        guard ["stream", "bootstrap", "upkeep", "reconcile", "export", "all", "postgres"].contains(what) else {
            throw ValidationError("measure stream, bootstrap, upkeep, reconcile, export, all or postgres")
        }
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("concord-bench-\(getpid())")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { if !keep { try? FileManager.default.removeItem(at: folder) } }
        var results: [String: Double] = [:]
        if what == "stream" || what == "all" {
            try await streamBenchmark(folder: folder, logger: logger, results: &results)
        }
        if what == "bootstrap" || what == "all" {
            try await bootstrapBenchmark(folder: folder, logger: logger, results: &results)
        }
        if what == "upkeep" || what == "all" {
            upkeepBenchmark(results: &results)
        }
        if what == "reconcile" || what == "all" {
            try await reconcileBenchmark(folder: folder, logger: logger, results: &results)
        }
        if what == "export" || what == "all" {
            try await exportBenchmark(folder: folder, logger: logger, results: &results)
        }
        if what == "postgres" {
            do {
                try await postgresBenchmark(folder: folder, logger: logger, results: &results)
            } catch let error as PSQLError {
                // PostgresNIO hides the server's message unless asked.
                throw ConcordError(.storage, String(reflecting: error))
            }
        }
        if output.json {
            let data = try JSONSerialization.data(withJSONObject: results, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        }
    }

    func say(_ line: String) {
        guard !output.json else { return }
        print(line)
        fflush(nil)
    }

    // MARK: Streaming apply

    /// Streaming apply with verification (digests, sketches, checkpoint comparison) and, in
    /// the same run, without it, to show what proof costs.
    ///
    /// Two publishers and two `concord follow` children run side by side, one of them with
    /// `--no-verification`. The phases alternate between them, each measured `rounds` times
    /// while the other child is paused, and the medians are compared: a single measurement of
    /// a two-second catch-up varies by a third between runs on this machine.
    func streamBenchmark(folder: URL, logger: Logger, results: inout [String: Double]) async throws {
        let count = changes
        let rounds = 10
        say(
            "stream: \(count) records of 200-byte values, then \(rounds) rounds of \(count) updates caught up and "
                + "\(count) applied live, alternating between a replica with verification and one without"
                + (control ? " (control run: neither replica verifies)" : ""))
        let verifiedStore = try Self.source(in: folder, named: "stream-source")
        let plainStore = try Self.source(in: folder, named: "stream-source-plain")
        try await Self.load(verifiedStore, count: count, size: 200, revision: 0)
        try await Self.load(plainStore, count: count, size: 200, revision: 0)
        let report = try await PublisherServer.withRunningServer(
            store: verifiedStore, configuration: Self.server, logger: logger
        ) { verifiedURL in
            try await PublisherServer.withRunningServer(
                store: plainStore, configuration: Self.server, logger: logger
            ) { plainURL in
                let verified = try FollowProcess(
                    source: verifiedURL, db: folder.appendingPathComponent("stream-replica.sqlite").path,
                    arguments: control ? ["--no-verification"] : [])
                defer { verified.stop() }
                let plain = try FollowProcess(
                    source: plainURL, db: folder.appendingPathComponent("stream-replica-plain.sqlite").path,
                    arguments: ["--no-verification"])
                defer { plain.stop() }
                // With verification, the digests are built (one scan) and verified before the clock starts.
                try await verified.waitUntil(timeout: .seconds(300)) {
                    $0.progress.phase == .following && $0.position >= verifiedStore.head
                        && (control || $0.verifiedLSN >= verifiedStore.head)
                }
                try await plain.waitUntil(timeout: .seconds(300)) {
                    $0.progress.phase == .following && $0.position >= plainStore.head
                }
                verified.pause()
                plain.pause()
                let setups = [
                    (name: "", store: verifiedStore, child: verified),
                    (name: "_no_verification", store: plainStore, child: plain),
                ]
                var samples: [String: [Double]] = [:]
                var revision = 0
                for round in 0..<rounds {
                    // Each setup goes first in half the rounds: a round's first slot runs slower
                    // on this machine even when the two setups are the same (see --control).
                    for setup in round % 2 == 0 ? setups : setups.reversed() {
                        // Catch-up: the subscriber is paused while the log grows, then applies it all.
                        revision += 1
                        let writeStart = ContinuousClock.now
                        try await Self.load(setup.store, count: count, size: 200, revision: revision)
                        samples["stream_publisher_write_per_s" + setup.name, default: []].append(
                            Double(count) / (ContinuousClock.now - writeStart).seconds)
                        let catchUpStart = ContinuousClock.now
                        let followerCPUStart = setup.child.cpuSeconds
                        let publisherCPUStart = ProcessCPU.ownSeconds
                        setup.child.resume()
                        let head = setup.store.head
                        try await setup.child.waitUntil(timeout: .seconds(300)) { $0.position >= head }
                        samples["stream_catchup_per_s" + setup.name, default: []].append(
                            Double(count) / (ContinuousClock.now - catchUpStart).seconds)
                        // CPU per change tells what verification costs even when the wall clock is noisy.
                        samples["stream_catchup_subscriber_cpu_us" + setup.name, default: []].append(
                            (setup.child.cpuSeconds - followerCPUStart) * 1e6 / Double(count))
                        samples["stream_catchup_publisher_cpu_us" + setup.name, default: []].append(
                            (ProcessCPU.ownSeconds - publisherCPUStart) * 1e6 / Double(count))
                        // Live: writes and apply run at the same time; end to end is write start to replica at head.
                        revision += 1
                        let liveStart = ContinuousClock.now
                        try await Self.load(setup.store, count: count, size: 200, revision: revision)
                        let liveHead = setup.store.head
                        try await setup.child.waitUntil(timeout: .seconds(300)) { $0.position >= liveHead }
                        samples["stream_live_end_to_end_per_s" + setup.name, default: []].append(
                            Double(count) / (ContinuousClock.now - liveStart).seconds)
                        setup.child.pause()
                    }
                }
                verified.resume()
                plain.resume()
                var report = samples.mapValues { values in
                    // An even number of rounds: the mean of the two middle ones.
                    let sorted = values.sorted()
                    return sorted.count % 2 == 1
                        ? sorted[sorted.count / 2] : (sorted[sorted.count / 2 - 1] + sorted[sorted.count / 2]) / 2
                }
                for (key, values) in samples { report[key + "_samples"] = Double(values.count) }
                report["stream_subscriber_peak_rss_mb"] = verified.peakRSSMegabytes
                report["stream_subscriber_peak_rss_mb_no_verification"] = plain.peakRSSMegabytes
                for (key, values) in samples.sorted(by: { $0.key < $1.key }) {
                    say("  \(key): " + values.map { String(format: "%.0f", $0) }.joined(separator: ", "))
                }
                return report
            }
        }
        results.merge(report) { $1 }
        for suffix in ["", "_no_verification"] {
            say(suffix.isEmpty ? "  with verification (medians):" : "  without verification (medians):")
            say(
                String(
                    format: "    publisher writes (batches of 1000):   %9.0f changes/s",
                    report["stream_publisher_write_per_s" + suffix]!))
            let catchUp = report["stream_catchup_per_s" + suffix]!
            let live = report["stream_live_end_to_end_per_s" + suffix]!
            say(
                String(
                    format:
                        "    streaming apply, catch-up:            %9.0f changes/s  (%.2fx PostgreSQL logical replication's 51,000/s)",
                    catchUp, catchUp / Self.pgApplyRowsPerSecond))
            say(
                String(
                    format:
                        "    streaming apply, live end to end:     %9.0f changes/s  (%.2fx; writes and apply share the 2 cores)",
                    live, live / Self.pgApplyRowsPerSecond))
            say(
                String(
                    format: "    CPU per change caught up:             %9.2f µs subscriber, %.2f µs publisher process",
                    report["stream_catchup_subscriber_cpu_us" + suffix]!,
                    report["stream_catchup_publisher_cpu_us" + suffix]!))
            say(
                String(
                    format: "    subscriber peak RSS:                  %9.1f MB",
                    report["stream_subscriber_peak_rss_mb" + suffix]!))
        }
        for (name, key) in [("catch-up", "stream_catchup_per_s"), ("live end to end", "stream_live_end_to_end_per_s")] {
            let ratio = report[key]! / report[key + "_no_verification"]!
            results[key + "_verification_ratio"] = ratio
            say(
                String(
                    format: "  %@ with verification at %.1f%% of the same run without it (goal: at least 90%%)",
                    name, 100 * ratio))
        }
    }

    // MARK: Bootstrap

    func bootstrapBenchmark(folder: URL, logger: Logger, results: inout [String: Double]) async throws {
        let count = records
        let store = try Self.source(in: folder, named: "boot-source")
        say("bootstrap: \(count) records of about 225-byte values into an empty replica")
        let loadStart = ContinuousClock.now
        try await Self.load(store, count: count, size: 225, revision: 0)
        say(String(format: "  loaded the source in %.2f s", (ContinuousClock.now - loadStart).seconds))

        let small = max(1, count / 10)
        let smallStore = try Self.source(in: folder, named: "boot-small")
        try await Self.load(smallStore, count: small, size: 225, revision: 0)

        func measure(_ store: PublisherStore, name: String) async throws -> (seconds: Double, rss: Double) {
            let replicaPath = folder.appendingPathComponent("boot-replica-\(name).sqlite").path
            return try await PublisherServer.withRunningServer(store: store, configuration: Self.server, logger: logger)
            { url in
                let start = ContinuousClock.now
                let child = try FollowProcess(source: url, db: replicaPath)
                defer { child.stop() }
                try await child.waitUntil(timeout: .seconds(600)) { $0.progress.phase == .following }
                let seconds = (ContinuousClock.now - start).seconds
                return (seconds, child.peakRSSMegabytes)
            }
        }
        let full = try await measure(store, name: "full")
        let tenth = try await measure(smallStore, name: "tenth")

        // The physical limit: the same rows inserted straight into a fresh SQLite table.
        let rawPath = folder.appendingPathComponent("raw.sqlite").path
        let rawSeconds = try Self.rawInsert(path: rawPath, count: count)

        results["bootstrap_seconds"] = full.seconds
        results["bootstrap_records_per_s"] = Double(count) / full.seconds
        results["bootstrap_peak_rss_mb"] = full.rss
        results["bootstrap_tenth_peak_rss_mb"] = tenth.rss
        results["raw_sqlite_insert_per_s"] = Double(count) / rawSeconds
        say(
            String(
                format: "  bootstrap of %d records:          %6.2f s  (%.0f records/s; %.2fx PostgreSQL's %.2f s)",
                count, full.seconds, Double(count) / full.seconds, Self.pgInitialSyncSeconds / full.seconds,
                Self.pgInitialSyncSeconds))
        say(
            String(
                format: "  subscriber peak RSS: %.1f MB at %d records, %.1f MB at %d records", full.rss, count,
                tenth.rss, small))
        say(
            String(
                format: "  raw SQLite insert of the same rows: %6.2f s  (%.0f rows/s); bootstrap is %.0f%% of it",
                rawSeconds, Double(count) / rawSeconds, 100 * rawSeconds / full.seconds))
    }

    // MARK: Digest and sketch upkeep

    /// The per-change cost of proof upkeep: hashing the new record's element, updating the
    /// collection digest and a 2^14-symbol rateless sketch (remove the old element, add the new).
    func upkeepBenchmark(results: inout [String: Double]) {
        let count = changes
        let values = (0..<1000).map { SampleData.value(id: $0, size: 200) }
        let keys = (0..<50_000).map { SampleData.key($0) }
        say("upkeep: element hash + digest + rateless sketch per change, \(count) changes of 200-byte values")
        for capacity in [1 << 12, 1 << 14] {
            var digest = CollectionDigest.empty
            var sketch = RatelessSketch(capacity: capacity)
            var previous = Element.zero
            let start = ContinuousClock.now
            for n in 0..<count {
                let element = Element(
                    collection: "bench", key: keys[n % keys.count], version: LSN(n + 1), value: values[n % values.count]
                )
                if n > 0 {
                    digest.remove(previous)
                    sketch.replace(previous, with: element)
                } else {
                    sketch.add(element)
                }
                digest.add(element)
                previous = element
            }
            let nanos = (ContinuousClock.now - start).seconds * 1e9 / Double(count)
            results["upkeep_ns_per_change_\(capacity)"] = nanos
            say(String(format: "  %5d-symbol sketch: %4.0f ns per change (goal: at most 1,000 ns)", capacity, nanos))
        }
        var hashing = CollectionDigest.empty
        let start = ContinuousClock.now
        for n in 0..<count {
            hashing.add(
                Element(
                    collection: "bench", key: keys[n % keys.count], version: LSN(n + 1), value: values[n % values.count]
                ))
        }
        let nanos = (ContinuousClock.now - start).seconds * 1e9 / Double(count)
        results["upkeep_ns_per_change_digest_only"] = nanos
        say(String(format: "  element hash + digest alone: %4.0f ns per change", nanos))
    }

    /// Writes `count` upserts of keys 1...count in batches of 1000.
    /// A publisher store in `folder` without an fsync per write, as benchmarks load millions of rows.
    static func source(
        in folder: URL, named name: String, retainChanges: UInt64? = nil
    ) throws -> PublisherStore {
        var configuration = PublisherStore.Configuration()
        configuration.durability = .normal
        configuration.retention.maxChanges = retainChanges
        return try PublisherStore(
            path: folder.appendingPathComponent("\(name).sqlite").path, configuration: configuration)
    }

    /// Bootstraps a replica at `path` with a `concord follow` child until it holds the head, then stops the child.
    static func bootstrapReplica(source url: String, store: PublisherStore, path: String) async throws {
        let child = try FollowProcess(source: url, db: path)
        defer { child.stop() }
        try await child.waitUntil(timeout: .seconds(600)) {
            $0.progress.phase == .following && $0.position >= store.head
        }
    }

    static func load(_ store: PublisherStore, count: Int, size: Int, revision: Int) async throws {
        var id = 1
        while id <= count {
            let end = min(count, id + 999)
            var batch: [WriteOperation] = []
            batch.reserveCapacity(end - id + 1)
            for n in id...end {
                batch.append(
                    .upsert("bench", SampleData.key(n), json: SampleData.value(id: n, revision: revision, size: size)))
            }
            try await store.write(batch)
            id = end + 1
        }
    }

    static func rawInsert(path: String, count: Int) throws -> Double {
        let rows = (1...count).map { (key: SampleData.key($0), value: SampleData.value(id: $0, size: 225)) }
        return try SQLiteInsertBenchmark.run(path: path, rows: rows, batch: 5000)
    }
}

extension Duration {
    var seconds: Double {
        Double(components.seconds) + Double(components.attoseconds) / 1e18
    }
}

/// CPU time of processes, read from /proc.
enum ProcessCPU {
    /// User plus system CPU time of `pid` (fields 14 and 15 of /proc/PID/stat, in clock ticks).
    static func seconds(of pid: pid_t) -> Double {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = stat.lastIndex(of: ")")
        else { return 0 }
        // Fields after the command name, which may hold spaces, start at field 3.
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        guard fields.count > 12, let user = Double(fields[11]), let system = Double(fields[12]) else { return 0 }
        return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    static var ownSeconds: Double { seconds(of: getpid()) }
}

enum ProcessMemory {
    /// The peak resident memory of `pid` so far (VmHWM in /proc/PID/status), in MiB.
    static func peakMegabytes(of pid: pid_t) -> Double {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
            let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }),
            let kilobytes = line.split(separator: " ").dropFirst().first.flatMap({ Double($0) })
        else { return 0 }
        return kilobytes / 1024
    }
}

/// A `concord follow` child process, watched through its replica file.
final class FollowProcess: @unchecked Sendable {
    let process = Process()
    let store: ReplicaStore

    init(source: String, db: String, arguments: [String] = []) throws {
        store = try ReplicaStore(path: db)
        process.executableURL = URL(
            fileURLWithPath: try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
        process.arguments = ["follow", "--source", source, "--db", db, "--log-level", "warning", "--quiet"] + arguments
        try process.run()
    }

    func waitUntil(timeout: Duration, _ condition: (ReplicaState) -> Bool) async throws {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let state = try store.state(), condition(state) { return }
            guard process.isRunning else {
                throw ConcordError(.internal, "concord follow exited with \(process.terminationStatus)")
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        throw ConcordError(.internal, "the replica did not get there within \(timeout)")
    }

    func pause() { kill(process.processIdentifier, SIGSTOP) }
    func resume() { kill(process.processIdentifier, SIGCONT) }

    /// User plus system CPU time the child has used so far.
    var cpuSeconds: Double { ProcessCPU.seconds(of: process.processIdentifier) }

    var peakRSSMegabytes: Double {
        guard let status = try? String(contentsOfFile: "/proc/\(process.processIdentifier)/status", encoding: .utf8),
            let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }),
            let kilobytes = Double(line.split(separator: " ").dropFirst().first ?? "")
        else { return 0 }
        return kilobytes / 1024
    }

    func stop() {
        guard process.isRunning else { return }
        process.terminate()
        process.waitUntilExit()
    }
}
