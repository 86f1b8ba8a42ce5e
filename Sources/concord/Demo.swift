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
        abstract: "Run a publisher, a workload and replicas on SQLite, inject faults, and prove every replica equal.",
        discussion: """
            Everything runs in a temporary folder over real HTTP on loopback. A customers-and-orders
            workload writes multi-record transactions while three replicas follow (one of them only
            customers). On a schedule the demo kills and restarts a subscriber, edits a replica's rows
            behind its back, stops a subscriber until the log is pruned past it, lets a new subscriber
            (orders only) join mid-stream and deletes a replica's file; the publisher loses stream
            messages on the wire all along. A live view shows each replica's position, lag, state,
            last verified LSN and repairs. At the end every replica must be verified equal at the
            source's head LSN (the digest of its stored rows equals the source's, and a record-by-record
            comparison agrees); the report gives what each fault cost in bytes and seconds against a
            full reload. Exit status 0: every replica verified equal; 1: not.
            """)

    @Option(help: "Seconds of workload.")
    var duration = 20

    @Option(help: "Source transactions per second.")
    var rate = 200

    @Option(help: "Seed of the workload.")
    var seed: UInt64 = 1

    @Option(help: "Records (customers and orders) the source holds before the workload starts.")
    var records = 20_000

    @Option(help: "The publisher drops every n-th message of each stream (0: none).")
    var dropEvery = 100

    @OptionGroup var output: OutputOptions
    @OptionGroup var global: GlobalOptions

    func validate() throws {
        guard duration > 0, rate > 0, dropEvery >= 0, records >= 0 else {
            throw ValidationError("--duration and --rate must be positive, --drop-every and --records at least 0")
        }
    }

    func run() async throws {
        var global = self.global
        if !CommandLine.arguments.contains("--log-level") { global.logLevel = "critical" }
        let logger = global.bootstrapLogging(label: "concord.demo")
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("concord-demo-\(getpid())")
        try? FileManager.default.removeItem(at: folder)
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: folder) }
        let settings = DemoScenario.Settings(
            duration: duration, rate: rate, seed: seed, retainedChanges: UInt64(max(50, rate * duration / 25)))
        var storeConfiguration = PublisherStore.Configuration()
        storeConfiguration.durability = .normal
        storeConfiguration.retention.maxChanges = settings.retainedChanges
        let store = try PublisherStore(
            path: folder.appendingPathComponent("source.sqlite").path, configuration: storeConfiguration)
        var preloaded = Workload(seed: seed)
        for batch in preloaded.initialData(records: records) { try await store.write(batch) }
        let workload = preloaded
        var serverConfiguration = PublisherServer.Configuration()
        serverConfiguration.port = 0
        serverConfiguration.heartbeatInterval = .milliseconds(500)
        serverConfiguration.dropEveryNthStreamItem = dropEvery > 0 ? dropEvery : nil
        let view = DemoView(silent: output.json)
        view.say("concord demo: a publisher and its replicas in \(folder.path)")
        let outcome = try await PublisherServer.withRunningServer(
            store: store, configuration: serverConfiguration, logger: logger
        ) { url in
            view.say(
                "publisher on \(url) with \(records) records; \(settings.rate) transactions/s for "
                    + "\(settings.duration) s (seed \(settings.seed))")
            let http = SourceClient.makeHTTPClient()
            do {
                let scenario = DemoScenario(
                    url: url, folder: folder, source: store, http: http, settings: settings, workload: workload,
                    logger: logger, view: view)
                try await scenario.run()
                let verdicts = try await scenario.verify()
                var reloads: [String: (bytes: Int, seconds: Double)] = [:]
                for replica in scenario.replicas {
                    let key = replica.collections?.joined(separator: ",") ?? "all"
                    if reloads[key] == nil {
                        reloads[key] = try await scenario.fullReload(collections: replica.collections)
                    }
                }
                let refills = scenario.replicas.reduce((holes: 0, bytes: 0)) { total, replica in
                    let refills = replica.refills
                    return (total.holes + refills.holes, total.bytes + refills.bytes)
                }
                try await http.shutdown()
                return Outcome(
                    head: store.head, verdicts: verdicts, faults: scenario.faults, refills: refills,
                    reloads: scenario.replicas.reduce(into: [:]) { result, replica in
                        result[replica.name] = reloads[replica.collections?.joined(separator: ",") ?? "all"]
                    })
            } catch {
                try? await http.shutdown()
                throw error
            }
        }
        try report(outcome, view: view)
    }

    struct Outcome {
        var head: LSN
        var verdicts: [DemoScenario.Verdict]
        var faults: [DemoFault]
        var refills: (holes: Int, bytes: Int)
        /// What a full reload of each replica's collections cost at the end, by replica.
        var reloads: [String: (bytes: Int, seconds: Double)]

        var succeeded: Bool { verdicts.allSatisfy(\.equal) && faults.allSatisfy(\.recovered) }
    }

    func report(_ outcome: Outcome, view: DemoView) throws {
        if output.json {
            let object: [String: Any] = [
                "verified": outcome.succeeded, "lsn": outcome.head,
                "replicas": outcome.verdicts.map {
                    [
                        "name": $0.name, "collections": $0.collections, "position": $0.position,
                        "verifiedLSN": $0.verifiedLSN, "equal": $0.equal, "records": $0.records,
                        "differences": $0.differences, "repairs": $0.repairs, "bytesReceived": $0.bytes,
                        "fullReloadBytes": outcome.reloads[$0.name]?.bytes ?? 0,
                    ] as [String: Any]
                },
                "faults": outcome.faults.map { fault in
                    [
                        "fault": fault.name, "replica": fault.replica, "recovered": fault.recovered,
                        "bytes": fault.bytes, "seconds": fault.seconds,
                        "fullReloadBytes": outcome.reloads[fault.replica]?.bytes ?? 0,
                        "fullReloadSeconds": outcome.reloads[fault.replica]?.seconds ?? 0,
                    ] as [String: Any]
                },
                "lostMessages": ["holes": outcome.refills.holes, "refillBytes": outcome.refills.bytes],
            ]
            let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        } else {
            view.say("")
            view.say("Replicas at the source's head, LSN \(outcome.head):")
            for verdict in outcome.verdicts {
                let name = verdict.name.padding(toLength: 10, withPad: " ", startingAt: 0)
                view.say(
                    verdict.equal
                        ? "  \(name) verified equal at LSN \(verdict.verifiedLSN): \(verdict.records) records in "
                            + "\(verdict.collections.joined(separator: ", ")), \(verdict.repairs) repairs"
                        : "  \(name) NOT verified: at LSN \(verdict.position), \(verdict.differences) records differ")
            }
            view.say("")
            view.say("What each fault cost, against a full reload of the same collections at the end:")
            view.say(
                "  "
                    + DemoView.columnsOf(
                        ["fault", "replica", "received", "seconds", "full reload", "ratio"], [30, 10, 11, 9, 20, 6]))
            for fault in outcome.faults {
                let reload = outcome.reloads[fault.replica] ?? (0, 0)
                let share = reload.bytes > 0 ? Double(fault.bytes) / Double(reload.bytes) : 0
                let ratio = reload.bytes > 0 ? String(format: share < 0.1 ? "%.3fx" : "%.2fx", share) : "-"
                view.say(
                    "  "
                        + DemoView.columnsOf(
                            [
                                fault.name, fault.replica,
                                fault.recovered ? DemoView.bytes(fault.bytes) : "NOT RECOVERED",
                                String(format: "%.2f", fault.seconds),
                                DemoView.bytes(reload.bytes) + String(format: ", %.2f s", reload.seconds), ratio,
                            ], [30, 10, 11, 9, 20, 6]))
            }
            view.say(
                "  messages lost on the wire: \(outcome.refills.holes) holes, refilled by pulls of "
                    + "\(DemoView.bytes(outcome.refills.bytes)) in all")
            view.say("")
            view.say(
                outcome.succeeded
                    ? "Every replica is verified equal to the source at LSN \(outcome.head)."
                    : "Some replica is NOT verified equal to the source.")
        }
        if !outcome.succeeded { throw ExitCode(1) }
    }
}
