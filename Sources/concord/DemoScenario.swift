import AsyncHTTPClient
import ConcordClient
import ConcordCore
import ConcordSQLite
import Foundation
import GRDB
import Logging

/// One replica of the demo: its file, its store and the subscriber that keeps it.
final class DemoReplica {
    let name: String
    /// `nil`: every collection.
    let collections: [String]?
    let path: String
    var store: ReplicaStore
    var subscriber: Subscriber
    var task: Task<Void, Never>?
    /// Why it is not running, for the view ("waiting", "killed", "stopped", ...).
    var down = "waiting"
    /// Earlier subscribers of this replica (one is made per file).
    var retired: [Subscriber] = []

    init(name: String, collections: [String]?, path: String, makeSubscriber: (ReplicaStore) -> Subscriber) throws {
        self.name = name
        self.collections = collections
        self.path = path
        store = try ReplicaStore(path: path)
        subscriber = makeSubscriber(store)
    }

    var isRunning: Bool { task != nil }
    var subscribers: [Subscriber] { retired + [subscriber] }
    var bytesReceived: Int { subscribers.reduce(0) { $0 + $1.bytesReceived } }
    var reconciliationBytes: Int { subscribers.reduce(0) { $0 + $1.reconciliationBytes } }
    var refills: (holes: Int, bytes: Int) {
        subscribers.reduce((0, 0)) { total, subscriber in
            (total.0 + subscriber.refills.holes, total.1 + subscriber.refills.bytes)
        }
    }

    func start() {
        let subscriber = self.subscriber
        task = Task { try? await subscriber.run() }
    }

    func stop(as reason: String) async {
        task?.cancel()
        await task?.value
        task = nil
        down = reason
    }
}

/// A fault the demo injected, and what recovering from it cost.
struct DemoFault {
    var name: String
    var replica: String
    /// When recovery began: the injection, or the restart after a stop.
    var since: ContinuousClock.Instant
    var bytesAtStart: Int
    var repairsAtStart: Int
    /// Recovered once the replica's position reaches this LSN (and, for edits, once it repaired).
    var target: LSN?
    /// Counts only reconciliation bytes: the rest of what the replica receives meanwhile is the live stream.
    var needsRepair = false
    var bytes = 0
    var seconds = 0.0
    var recovered = false
    var detail = ""
}

/// The demo's timeline: a workload against the publisher, replicas following it, and faults
/// injected on a schedule; every replica ends verified equal at one LSN.
final class DemoScenario {
    struct Settings {
        var duration: Int
        var rate: Int
        var seed: UInt64
        /// Changes the log keeps when it is pruned, so a stopped replica falls past retention.
        var retainedChanges: UInt64
    }

    let url: String
    let folder: URL
    let source: PublisherStore
    let http: HTTPClient
    let settings: Settings
    var workload: Workload
    let logger: Logger
    let view: DemoView
    var replicas: [DemoReplica] = []
    var faults: [DemoFault] = []
    let began = ContinuousClock.now

    init(
        url: String, folder: URL, source: PublisherStore, http: HTTPClient, settings: Settings, workload: Workload,
        logger: Logger, view: DemoView
    ) {
        self.workload = workload
        self.url = url
        self.folder = folder
        self.source = source
        self.http = http
        self.settings = settings
        self.logger = logger
        self.view = view
    }

    func makeSubscriber(_ store: ReplicaStore, collections: [String]?) -> Subscriber {
        var configuration = Subscriber.Configuration(source: url, collections: collections)
        // Scrubs often, so rows edited behind a replica's back are found within seconds.
        configuration.scrubInterval = .seconds(3)
        configuration.backoffMaximum = .milliseconds(500)
        return Subscriber(configuration: configuration, store: store, http: http, logger: logger)
    }

    func addReplica(_ name: String, collections: [String]?) throws -> DemoReplica {
        let replica = try DemoReplica(
            name: name, collections: collections, path: folder.appendingPathComponent("\(name).sqlite").path
        ) { store in makeSubscriber(store, collections: collections) }
        replicas.append(replica)
        return replica
    }

    func event(_ text: String) {
        view.event(at: (ContinuousClock.now - began).seconds, text)
    }

    /// Starts tracking a fault's recovery from now.
    func track(_ name: String, _ replica: DemoReplica, target: LSN?, needsRepair: Bool = false, detail: String = "")
        throws
    {
        faults.append(
            DemoFault(
                name: name, replica: replica.name, since: .now,
                bytesAtStart: needsRepair ? replica.reconciliationBytes : replica.bytesReceived,
                repairsAtStart: try replica.store.state()?.repairs ?? 0, target: target, needsRepair: needsRepair,
                detail: detail))
    }

    // MARK: Faults

    func kill(_ replica: DemoReplica) async {
        await replica.stop(as: "killed")
        event("fault: \(replica.name) killed mid-stream")
    }

    func restart(_ replica: DemoReplica, fault: String) throws {
        replica.start()
        event("\(replica.name) restarted; resumes from its stored position")
        try track(fault, replica, target: source.head)
    }

    /// Deletes the replica's SQLite file (and its WAL) and starts it again from nothing.
    func deleteFile(of replica: DemoReplica) async throws {
        await replica.stop(as: "file deleted")
        try replica.store.close()
        replica.retired.append(replica.subscriber)
        for suffix in ["", "-wal", "-shm"] { try? FileManager.default.removeItem(atPath: replica.path + suffix) }
        event("fault: \(replica.name)'s replica file deleted; it bootstraps again")
        replica.store = try ReplicaStore(path: replica.path)
        replica.subscriber = makeSubscriber(replica.store, collections: replica.collections)
        replica.start()
        try track("replica file deleted", replica, target: source.head)
    }

    /// Updates, deletes and inserts rows in the replica's table with plain SQL while its subscriber runs.
    func editRows(of replica: DemoReplica, table: String) throws {
        var configuration = Configuration()
        configuration.busyMode = .timeout(10)
        let queue = try DatabaseQueue(path: replica.path, configuration: configuration)
        let edited = try queue.write { db -> Int in
            try db.execute(
                sql: """
                    UPDATE "\(table)" SET value = '{"name":"edited by hand"}'
                    WHERE key IN (SELECT key FROM "\(table)" ORDER BY key LIMIT 3)
                    """)
            var count = db.changesCount
            try db.execute(
                sql:
                    "DELETE FROM \"\(table)\" WHERE key IN (SELECT key FROM \"\(table)\" ORDER BY key LIMIT 2 OFFSET 10)"
            )
            count += db.changesCount
            try db.execute(
                sql: "INSERT INTO \"\(table)\" (key, version, value) VALUES ('intruder', 1, '{\"name\":\"nobody\"}')")
            return count + db.changesCount
        }
        try queue.close()
        event("fault: \(edited) rows of \(replica.name).\(table) edited behind its back (update, delete, insert)")
        try track("rows edited behind its back", replica, target: nil, needsRepair: true, detail: "\(edited) rows")
    }

    // MARK: Running

    /// Runs the workload and the fault schedule, then waits until every replica caught up.
    func run() async throws {
        let billing = try addReplica("billing", collections: nil)
        let search = try addReplica("search", collections: ["customers"])
        let analytics = try addReplica("analytics", collections: nil)
        let audit = try addReplica("audit", collections: ["orders"])
        billing.start()
        search.start()
        analytics.start()
        event("billing, search (customers only) and analytics start and bootstrap")
        event("fault: the publisher loses messages of every stream on the wire, all along")

        // The schedule, as fractions of the duration.
        var steps: [(at: Double, action: () async throws -> Void)] = [
            (0.15, { await self.kill(billing) }),
            (0.25, { try self.restart(billing, fault: "killed and restarted") }),
            (0.35, { try self.editRows(of: search, table: "customers") }),
            (
                0.40,
                {
                    // Stopped once it follows: a replica still bootstrapping that falls behind the
                    // log copies again, which is another story than recovering by reconciliation.
                    let deadline = ContinuousClock.now + .seconds(30)
                    while try analytics.store.state()?.progress.phase != .following, ContinuousClock.now < deadline {
                        try await Task.sleep(for: .milliseconds(20))
                    }
                    await analytics.stop(as: "stopped")
                    self.event("fault: analytics stopped")
                }
            ),
            (
                0.50,
                {
                    audit.start()
                    self.event("audit (orders only) joins mid-stream and bootstraps while writes go on")
                    try self.track("new subscriber joins", audit, target: self.source.head)
                }
            ),
            (0.58, { try await self.pruneLog(behind: analytics) }),
            (0.60, { try self.restart(analytics, fault: "stopped past log retention") }),
            (0.70, { try await self.deleteFile(of: billing) }),
        ]
        let client = SourceClient(baseURL: url, http: http)
        let duration = Duration.seconds(settings.duration)
        let interval = Duration.seconds(1) / max(1, settings.rate)
        var next = began
        var transactions = 0
        while ContinuousClock.now - began < duration {
            try await client.write(workload.nextTransaction())
            transactions += 1
            next += interval
            let now = ContinuousClock.now
            if next > now { try await Task.sleep(until: next) }
            let fraction = (now - began).seconds / duration.seconds
            while let step = steps.first, step.at <= fraction {
                steps.removeFirst()
                try await step.action()
            }
            try refresh()
        }
        for step in steps { try await step.action() }
        let head = source.head
        event(
            "workload done at LSN \(head): \(transactions) transactions, "
                + String(format: "%.0f/s", Double(transactions) / (ContinuousClock.now - began).seconds)
                + "; waiting for every replica to catch up and recover")
        let deadline = ContinuousClock.now + .seconds(60)
        while ContinuousClock.now < deadline {
            try refresh()
            let positions = replicas.map { (try? $0.store.state()?.position) ?? 0 }
            if positions.allSatisfy({ $0 >= head }), faults.allSatisfy(\.recovered) { break }
            try await Task.sleep(for: .milliseconds(100))
        }
        for replica in replicas { await replica.stop(as: "done") }
        try refresh()
    }

    /// Drops the log's old changes so the stopped replica's position is no longer in it.
    func pruneLog(behind replica: DemoReplica) async throws {
        // The stopped replica must end up behind the retained window. On a starved machine the
        // schedule's steps can fire together, with too few writes between its stop and here.
        let stoppedAt = try replica.store.state()?.position ?? 0
        while source.head <= stoppedAt + settings.retainedChanges {
            try await source.write(workload.nextTransaction())
        }
        let dropped = try await source.pruneLog()
        let oldest = try await source.feedInfo().oldest
        let position = try replica.store.state()?.position ?? 0
        event(
            "fault: the log is pruned to its last \(settings.retainedChanges) changes (\(dropped) dropped); "
                + "it starts at LSN \(oldest), \(replica.name) stopped at \(position)")
    }

    /// Updates the view and notes faults that have recovered.
    func refresh() throws {
        var rows: [DemoView.Row] = []
        let head = source.head
        for replica in replicas {
            let state = try replica.store.state()
            let activity = replica.isRunning ? replica.subscriber.activity.rawValue : replica.down
            rows.append(
                DemoView.Row(
                    name: replica.name, collections: replica.collections?.joined(separator: ",") ?? "all",
                    position: state?.position ?? 0, lag: head - min(head, state?.position ?? 0),
                    state: state?.progress.phase == .bootstrapping && replica.isRunning ? "bootstrapping" : activity,
                    verified: state?.verifiedLSN ?? 0, repairs: state?.repairs ?? 0, bytes: replica.bytesReceived))
        }
        for index in faults.indices where !faults[index].recovered {
            guard let replica = replicas.first(where: { $0.name == faults[index].replica }), replica.isRunning,
                let state = try replica.store.state()
            else { continue }
            if faults[index].needsRepair, faults[index].target == nil {
                // Found once a scrub repaired the rows; the replica must then reach the head of that moment.
                guard state.repairs > faults[index].repairsAtStart else { continue }
                faults[index].target = head
            }
            guard let target = faults[index].target, state.progress.phase == .following, state.position >= target,
                replica.subscriber.activity == .following
            else { continue }
            faults[index].recovered = true
            faults[index].seconds = (ContinuousClock.now - faults[index].since).seconds
            faults[index].bytes =
                (faults[index].needsRepair ? replica.reconciliationBytes : replica.bytesReceived)
                - faults[index].bytesAtStart
            event(
                "\(replica.name) recovered from \"\(faults[index].name)\" in "
                    + String(format: "%.2f s, %@", faults[index].seconds, DemoView.bytes(faults[index].bytes)))
        }
        view.draw(
            elapsed: (ContinuousClock.now - began).seconds, total: Double(settings.duration), head: head, rows: rows)
    }

    // MARK: The end

    struct Verdict {
        var name: String
        var collections: [String]
        var position: LSN
        var verifiedLSN: LSN
        var equal: Bool
        var records: Int
        var differences: Int
        var repairs: Int
        var bytes: Int
    }

    /// Proves every replica equal to the source at the head: the digest of its stored rows must
    /// equal the source's, and a record-by-record comparison must agree.
    func verify() async throws -> [Verdict] {
        let feed = try await source.feedInfo()
        let sourceDigests = Dictionary(
            feed.collections.compactMap { collection in collection.digest.map { (collection.name, $0) } },
            uniquingKeysWith: { first, _ in first })
        var verdicts: [Verdict] = []
        for replica in replicas {
            let collections = replica.collections ?? feed.collections.map(\.name)
            let scanned = try await replica.store.scanAll()
            var digestsEqual = true
            var differences = 0
            var records = 0
            for collection in collections {
                let rows = scanned[collection]?.digest ?? .empty
                if rows != (sourceDigests[collection] ?? .empty) { digestsEqual = false }
                let expected = try await source.records(of: collection)
                let held = try replica.store.records(of: collection)
                records += held.count
                differences += Self.differences(expected, held)
            }
            let position = try replica.store.state()?.position ?? 0
            var equal = digestsEqual && differences == 0 && position == feed.head
            if equal {
                let checkpoint = Checkpoint(
                    lsn: feed.head, digests: sourceDigests.filter { collections.contains($0.key) })
                if case .verified = try await replica.store.check(checkpoint) {} else { equal = false }
            }
            let state = try replica.store.state()
            verdicts.append(
                Verdict(
                    name: replica.name, collections: collections, position: position,
                    verifiedLSN: state?.verifiedLSN ?? 0, equal: equal && state?.verifiedLSN == feed.head,
                    records: records, differences: differences, repairs: state?.repairs ?? 0,
                    bytes: replica.bytesReceived))
        }
        return verdicts
    }

    /// Bootstraps a fresh replica of these collections and measures it: what a full reload costs now.
    func fullReload(collections: [String]?) async throws -> (bytes: Int, seconds: Double) {
        let path = folder.appendingPathComponent("reload-\(collections?.joined(separator: "-") ?? "all").sqlite").path
        let store = try ReplicaStore(path: path)
        let subscriber = makeSubscriber(store, collections: collections)
        let head = source.head
        let started = ContinuousClock.now
        let task = Task { try? await subscriber.run() }
        let deadline = ContinuousClock.now + .seconds(60)
        while ContinuousClock.now < deadline {
            if let state = try store.state(), state.progress.phase == .following, state.position >= head { break }
            try await Task.sleep(for: .milliseconds(20))
        }
        let seconds = (ContinuousClock.now - started).seconds
        task.cancel()
        await task.value
        return (subscriber.bytesReceived, seconds)
    }

    /// Number of keys whose version or value differ, counting keys on one side only.
    static func differences(_ source: [ConcordCore.Record], _ replica: [ConcordCore.Record]) -> Int {
        var byKey: [String: ConcordCore.Record] = [:]
        for record in source { byKey[record.key] = record }
        var count = 0
        for record in replica {
            if let match = byKey.removeValue(forKey: record.key) {
                if match != record { count += 1 }
            } else {
                count += 1
            }
        }
        return count + byKey.count
    }
}
