import AsyncHTTPClient
import ConcordClient
import ConcordCore
import ConcordSQLite
import ConcordServer
import Foundation
import Logging
import NIOCore
import Testing

/// What the end-to-end tests share: folders, the `concord` binary, child processes, waiting, comparing.
enum Harness {
    static let logger: Logger = {
        var logger = Logger(label: "concord.tests")
        logger.logLevel =
            ProcessInfo.processInfo.environment["CONCORD_TEST_LOG"].flatMap(Logger.Level.init(rawValue:)) ?? .critical
        return logger
    }()

    static func folder() -> URL {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("concord-e2e-\(UUID().uuidString)")
        try! FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        return folder
    }

    /// A publisher file in `folder` whose checkpoints come by time only, every `interval`: no
    /// checkpoint line follows a commit for the number of changes it held, so a subscriber
    /// gets a transaction's end without one.
    static func publisherCheckpointedByTime(in folder: URL, every interval: Duration) throws -> PublisherStore {
        var configuration = PublisherStore.Configuration()
        configuration.checkpoints.everyChanges = 0
        configuration.checkpoints.interval = interval
        return try PublisherStore(
            path: folder.appendingPathComponent("source.sqlite").path, configuration: configuration)
    }

    /// The `concord` executable built with the tests (`CONCORD_BIN` overrides).
    static var binary: String {
        if let path = ProcessInfo.processInfo.environment["CONCORD_BIN"] { return path }
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        return root.appendingPathComponent(".build/debug/concord").path
    }

    /// Runs blocking `work` (a socket read, a wait for a child process) on a thread of its own.
    ///
    /// The tests share Swift's cooperative pool, which has one thread per core (two in CI), with
    /// every publisher and subscriber they run in-process. A wait that blocks a pool thread
    /// stalls all of those; two at once stalled a publisher for a minute, and one waiting on a
    /// child that needs an in-process publisher can wait forever.
    static func onOwnThread<T: Sendable>(_ work: @escaping @Sendable () -> T) async -> T {
        await withCheckedContinuation { continuation in
            Thread { continuation.resume(returning: work()) }.start()
        }
    }

    /// Runs `process` to its end, off the cooperative pool; returns what it wrote to `pipe`
    /// (read while it runs, so a full pipe cannot stall it).
    static func runToEnd(_ process: Process, reading pipe: Pipe) async throws -> Data {
        try process.run()
        let handle = pipe.fileHandleForReading
        return await onOwnThread {
            let data = handle.readDataToEndOfFile()
            process.waitUntilExit()
            return data
        }
    }

    /// Runs `executable` with its output discarded; returns its exit status.
    ///
    /// It blocks its thread: only for short commands that need nothing from this process.
    static func runQuietly(_ executable: String, _ arguments: [String]) throws -> Int32 {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        process.waitUntilExit()
        return process.terminationStatus
    }

    static func waitUntil(
        _ what: String, timeout: Duration = .seconds(60), _ condition: () async throws -> Bool
    ) async throws {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if try await condition() { return }
            try await Task.sleep(for: .milliseconds(25))
        }
        throw ConcordError(.internal, "timed out waiting until \(what)")
    }

    /// Differences between the source's records and a replica's, per key (missing, extra or different).
    static func differences(source: PublisherStore, replica: any ReplicaStoring, collections: [String]? = nil)
        async throws
        -> [String]
    {
        var names = collections ?? []
        if collections == nil { names = try await source.feedInfo().collections.map(\.name) }
        var found: [String] = []
        for name in names {
            var expected: [String: ConcordCore.Record] = [:]
            for record in try await source.records(of: name) { expected[record.key] = record }
            for record in try await replica.records(of: name) {
                if let match = expected.removeValue(forKey: record.key) {
                    if match != record { found.append("\(name)/\(record.key): stale") }
                } else {
                    found.append("\(name)/\(record.key): extra")
                }
            }
            found += expected.keys.map { "\(name)/\($0): missing" }
        }
        return found
    }

    /// A subscriber that retries quickly; with `piece`, one that writes transactions in pieces
    /// of that many changes and queues at most two pieces.
    static func makeSubscriber(
        source: String, store: any ReplicaStoring, http: HTTPClient, collections: [String]? = nil,
        pageSize: Int = 500, piece: Int? = nil
    )
        -> Subscriber
    {
        var configuration = Subscriber.Configuration(source: source, collections: collections)
        configuration.pageSize = pageSize
        if let piece {
            configuration.transactionPiece = piece
            configuration.pullLimit = 2 * piece
        }
        configuration.backoffInitial = .milliseconds(20)
        configuration.backoffMaximum = .milliseconds(300)
        return Subscriber(configuration: configuration, store: store, http: http, logger: logger)
    }
}

/// A `concord` child process.
final class ConcordProcess: @unchecked Sendable {
    let process = Process()

    init(
        _ arguments: [String], environment: [String: String] = [:], output: FileHandle? = nil, log: String? = nil
    ) throws {
        process.executableURL = URL(fileURLWithPath: Harness.binary)
        process.arguments =
            arguments.contains("--log-level") ? arguments : arguments + ["--log-level", log == nil ? "error" : "info"]
        process.standardOutput = output ?? FileHandle.nullDevice
        if let log {
            // Appended to, so a restarted process's lines follow the last ones.
            if !FileManager.default.fileExists(atPath: log) {
                _ = FileManager.default.createFile(atPath: log, contents: nil)
            }
            let handle = FileHandle(forWritingAtPath: log)
            handle?.seekToEndOfFile()
            process.standardError = handle
        }
        if !environment.isEmpty {
            process.environment = ProcessInfo.processInfo.environment.merging(environment) { _, new in new }
        }
        try process.run()
    }

    var isRunning: Bool { process.isRunning }

    /// Waits for the process to exit on its own and returns its status.
    func exitStatus(timeout: Duration = .seconds(120)) async throws -> Int32 {
        try await Harness.waitUntil("concord exits", timeout: timeout) { !self.process.isRunning }
        return process.terminationStatus
    }

    func kill9() {
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    /// Stops the process where it is (SIGSTOP), as a long pause would; ``resume()`` lets it go on.
    func pause() {
        kill(process.processIdentifier, SIGSTOP)
    }

    func resume() {
        kill(process.processIdentifier, SIGCONT)
    }

    /// Sends SIGTERM and returns the exit status, once the process has stopped.
    func terminate() async -> Int32 {
        process.terminate()
        let process = process
        return await Harness.onOwnThread {
            process.waitUntilExit()
            return process.terminationStatus
        }
    }

    deinit {
        if process.isRunning { kill9() }
    }

    /// Starts `concord serve` on `port` (0: any) and returns it with the port it listens on.
    static func serve(db: String, port: Int = 0, extra: [String] = [], log: String? = nil) async throws
        -> (ConcordProcess, Int)
    {
        let portFile = db + ".port"
        try? FileManager.default.removeItem(atPath: portFile)
        let child = try ConcordProcess(
            ["serve", "--db", db, "--port", String(port), "--port-file", portFile] + extra, log: log)
        var bound = 0
        try await Harness.waitUntil("the publisher listens", timeout: .seconds(30)) {
            guard child.isRunning else { throw ConcordError(.internal, "concord serve exited") }
            bound = (try? String(contentsOfFile: portFile, encoding: .utf8)).flatMap { Int($0) } ?? 0
            return bound > 0
        }
        return (child, bound)
    }
}

/// A background writer of random transactions (upserts and deletes over a key space) straight into a store.
struct RandomWorkload {
    var generator: SystemRandomNumberGenerator = .init()
    let keySpace: Int

    mutating func transaction() -> [WriteOperation] {
        (0..<Int.random(in: 1...5, using: &generator)).map { _ in
            let key = "k\(Int.random(in: 0..<keySpace, using: &generator))"
            if Int.random(in: 0..<4, using: &generator) == 0 { return .delete("items", key) }
            return .upsert(
                "items", key,
                json:
                    "{\"v\":\(Int.random(in: 0..<1_000_000, using: &generator)),\"pad\":\"\(String(repeating: "x", count: 40))\"}"
            )
        }
    }
}
