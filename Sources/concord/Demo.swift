import ArgumentParser
import AsyncHTTPClient
import ConcordClient
import ConcordCore
import ConcordSQLite
import ConcordServer
import Foundation
import Logging

struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a publisher, a workload and three subscribers on SQLite, with faults, and check every replica.",
        discussion: """
            Everything runs in a temporary folder over real HTTP on loopback. A customers-and-orders
            workload writes multi-record transactions; the publisher loses stream messages on the
            wire; one subscriber follows only customers; one is stopped and restarted; one joins
            mid-stream and bootstraps while writes go on. At the end every replica is compared with
            the source record by record. Exit status 0 means every replica is equal.
            """)

    @Option(help: "Seconds of workload.")
    var duration = 10

    @Option(help: "Source transactions per second.")
    var rate = 200

    @Option(help: "Seed of the workload.")
    var seed: UInt64 = 1

    @Option(help: "The publisher drops every n-th stream message (0: none).")
    var dropEvery = 500

    @OptionGroup var output: OutputOptions
    @OptionGroup var global: GlobalOptions

    struct ReplicaReport: Sendable {
        var name: String
        var collections: [String]
        var position: LSN
        var equal: Bool
        var differences: Int
    }

    func run() async throws {
        var global = self.global
        if !CommandLine.arguments.contains("--log-level") { global.logLevel = "error" }
        let logger = global.bootstrapLogging(label: "concord.demo")
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("concord-demo-\(getpid())")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: folder) }
        var storeConfiguration = PublisherStore.Configuration()
        storeConfiguration.durability = .normal
        let store = try PublisherStore(
            path: folder.appendingPathComponent("source.sqlite").path, configuration: storeConfiguration)
        var serverConfiguration = PublisherServer.Configuration()
        serverConfiguration.port = 0
        serverConfiguration.heartbeatInterval = .milliseconds(500)
        serverConfiguration.dropEveryNthStreamItem = dropEvery > 0 ? dropEvery : nil
        let json = output.json
        let (duration, rate, seed) = (self.duration, self.rate, self.seed)
        let say: @Sendable (String) -> Void = { line in
            guard !json else { return }
            print(line)
            fflush(nil)
        }
        say("concord demo: source and replicas in \(folder.path)")
        let reports = try await PublisherServer.withRunningServer(
            store: store, configuration: serverConfiguration, logger: logger
        ) { url in
            say("publisher on \(url); workload \(rate) transactions/s for \(duration) s (seed \(seed))")
            let http = SourceClient.makeHTTPClient()
            do {
                let reports = try await Self.scenario(
                    url: url, folder: folder, store: store, http: http, duration: duration, rate: rate, seed: seed,
                    logger: logger, say: say)
                try await http.shutdown()
                return reports
            } catch {
                try? await http.shutdown()
                throw error
            }
        }
        try finish(reports, say: say)
    }

    static func scenario(
        url: String, folder: URL, store: PublisherStore, http: HTTPClient, duration: Int, rate: Int, seed: UInt64,
        logger: Logger, say: @Sendable (String) -> Void
    ) async throws -> [ReplicaReport] {
        let plan: [(name: String, collections: [String]?)] = [
            ("billing", nil), ("search", ["customers"]), ("analytics", nil),
        ]
        let subscribers = try plan.map { entry in
            let store = try ReplicaStore(path: folder.appendingPathComponent("\(entry.name).sqlite").path)
            return Subscriber(
                configuration: Subscriber.Configuration(source: url, collections: entry.collections),
                store: store, http: http, logger: logger)
        }
        var running: [Int: Task<Void, Never>] = [:]
        func start(_ index: Int) {
            let subscriber = subscribers[index]
            running[index] = Task { try? await subscriber.run() }
        }
        start(0)
        start(1)
        var workload = Workload(seed: seed)
        let client = SourceClient(baseURL: url, http: http)
        let begin = ContinuousClock.now
        let interval = Duration.seconds(1) / max(1, rate)
        var next = begin
        var lastStatus = begin
        var restarted = false
        var stopped = false
        while ContinuousClock.now - begin < .seconds(duration) {
            try await client.write(workload.nextTransaction())
            next += interval
            let now = ContinuousClock.now
            if next > now { try await Task.sleep(until: next) }
            let elapsed = now - begin
            if !stopped, elapsed > .seconds(duration) / 4 {
                say("fault: billing stopped")
                running[0]?.cancel()
                await running[0]?.value
                stopped = true
            }
            if running[2] == nil, elapsed > .seconds(duration) / 3 {
                say("event: analytics joins mid-stream and bootstraps")
                start(2)
            }
            if !restarted, elapsed > .seconds(duration) / 2 {
                say("event: billing restarted, resumes where it was")
                start(0)
                restarted = true
            }
            if now - lastStatus > .seconds(1) {
                lastStatus = now
                var line = "head \(store.head)"
                for (index, subscriber) in subscribers.enumerated() {
                    let position = (try? subscriber.store.state()?.position) ?? 0
                    let activity = running[index] == nil ? "waiting" : subscriber.activity.rawValue
                    line += " | \(plan[index].name) \(position) \(activity)"
                }
                say(line)
            }
        }
        let head = store.head
        say("workload done at head \(head); waiting for every replica")
        let deadline = ContinuousClock.now + .seconds(60)
        while ContinuousClock.now < deadline {
            let positions = subscribers.map { (try? $0.store.state()?.position) ?? 0 }
            if positions.allSatisfy({ $0 >= head }) { break }
            try await Task.sleep(for: .milliseconds(50))
        }
        for task in running.values { task.cancel() }
        for task in running.values { await task.value }
        var reports: [ReplicaReport] = []
        let feed = try await store.feedInfo()
        for (index, subscriber) in subscribers.enumerated() {
            let collections = plan[index].collections ?? feed.collections.map(\.name)
            var differences = 0
            for collection in collections {
                let source = try await store.records(of: collection)
                let replica = try subscriber.store.records(of: collection)
                differences += Self.differences(source, replica)
            }
            let position = try subscriber.store.state()?.position ?? 0
            reports.append(
                ReplicaReport(
                    name: plan[index].name, collections: collections, position: position,
                    equal: differences == 0 && position == head, differences: differences))
        }
        return reports
    }

    func finish(_ reports: [ReplicaReport], say: (String) -> Void) throws {
        let json = output.json
        let allEqual = reports.allSatisfy(\.equal)
        if json {
            let object: [String: Any] = [
                "equal": allEqual,
                "replicas": reports.map {
                    [
                        "name": $0.name, "position": $0.position, "equal": $0.equal, "differences": $0.differences,
                        "collections": $0.collections,
                    ] as [String: Any]
                },
            ]
            let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        } else {
            for report in reports {
                say(
                    "\(report.name.padding(toLength: 10, withPad: " ", startingAt: 0)) at \(report.position): "
                        + (report.equal
                            ? "equal to the source (\(report.collections.joined(separator: ", ")))"
                            : "DIFFERS in \(report.differences) records"))
            }
            say(allEqual ? "every replica equals the source" : "some replica differs from the source")
        }
        if !allEqual { throw ExitCode(1) }
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

/// Customers and orders: inserts, updates, deletes and multi-record transactions.
struct Workload {
    var generator: SeededGenerator
    var customers = 0
    var orders: [Int] = []
    var nextOrder = 1

    init(seed: UInt64) { generator = SeededGenerator(seed: seed) }

    mutating func nextTransaction() -> [WriteOperation] {
        let roll = Int.random(in: 0..<100, using: &generator)
        if customers < 20 || roll < 20 {
            customers += 1
            return [.upsert("customers", "c\(customers)", json: customer(customers, tier: "basic"))]
        }
        let customer = Int.random(in: 1...customers, using: &generator)
        if roll < 60 {
            // An order and the customer's updated profile, atomically.
            let order = nextOrder
            nextOrder += 1
            orders.append(order)
            let amount = Int.random(in: 100...99_999, using: &generator)
            return [
                .upsert(
                    "orders", "o\(order)",
                    json: "{\"customer\":\"c\(customer)\",\"amount_cents\":\(amount),\"status\":\"placed\"}"),
                .upsert("customers", "c\(customer)", json: self.customer(customer, tier: "active")),
            ]
        }
        if roll < 85, !orders.isEmpty {
            let order = orders[Int.random(in: 0..<orders.count, using: &generator)]
            return [.upsert("orders", "o\(order)", json: "{\"customer\":\"c\(customer)\",\"status\":\"shipped\"}")]
        }
        if !orders.isEmpty {
            let index = Int.random(in: 0..<orders.count, using: &generator)
            let order = orders.remove(at: index)
            return [.delete("orders", "o\(order)")]
        }
        return [.upsert("customers", "c\(customer)", json: self.customer(customer, tier: "gold"))]
    }

    func customer(_ id: Int, tier: String) -> String {
        "{\"name\":\"Customer \(id)\",\"email\":\"c\(id)@example.com\",\"tier\":\"\(tier)\"}"
    }
}
