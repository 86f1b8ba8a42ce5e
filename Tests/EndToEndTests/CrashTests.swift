import AsyncHTTPClient
import ConcordClient
import ConcordCore
import ConcordSQLite
import ConcordServer
import Foundation
import NIOCore
import Synchronization
import Testing

@Suite(.serialized, .timeLimit(.minutes(8)))
struct CrashTests {
    /// kill -9 the subscriber process at random moments, during bootstrap and while following:
    /// the replica ends equal, and the audit of applied LSNs shows each change applied exactly once.
    @Test func aSubscriberKilledAtRandomMomentsLosesNothingAndRepeatsNothing() async throws {
        let folder = Harness.folder()
        let source = try PublisherStore(path: folder.appendingPathComponent("source.sqlite").path)
        for start in stride(from: 0, to: 20_000, by: 2000) {
            try await source.write((start..<start + 2000).map { .upsert("items", "k\($0)", json: "{\"v\":\($0)}") })
        }
        let replicaPath = folder.appendingPathComponent("replica.sqlite").path
        try await PublisherServer.withRunningServer(store: source, configuration: .testing, logger: Harness.logger) {
            url in
            let kills = try await withThrowingTaskGroup(of: Int.self) { group in
                let writing = Mutex(true)
                group.addTask {
                    var workload = RandomWorkload(keySpace: 25_000)
                    while writing.withLock({ $0 }) {
                        try await source.write(workload.transaction())
                        try await Task.sleep(for: .milliseconds(3))
                    }
                    return 0
                }
                var kills = 0
                var killedDuringBootstrap = 0
                for _ in 0..<24 {
                    let child = try ConcordProcess([
                        "follow", "--source", url, "--db", replicaPath, "--page-size", "500", "--audit-applied",
                    ])
                    try await Task.sleep(for: .milliseconds(Int.random(in: 40...400)))
                    child.kill9()
                    kills += 1
                    if FileManager.default.fileExists(atPath: replicaPath),
                        try ReplicaStore(path: replicaPath).state()?.progress.phase == .bootstrapping
                    {
                        killedDuringBootstrap += 1
                    }
                }
                writing.withLock { $0 = false }
                for try await _ in group {}
                #expect(killedDuringBootstrap > 0, "some kills hit the bootstrap")
                return kills
            }
            #expect(kills >= 20)
            let head = source.head
            let child = try ConcordProcess(["follow", "--source", url, "--db", replicaPath, "--audit-applied"])
            let replica = try ReplicaStore(path: replicaPath)
            try await Harness.waitUntil("the replica reaches the head", timeout: .seconds(120)) {
                let state = try replica.state()
                return state?.position == head && state?.progress.phase == .following
            }
            #expect(await child.terminate() == 0, "SIGTERM stops follow cleanly")
            #expect(try await Harness.differences(source: source, replica: replica) == [])
            let audit = try replica.appliedAudit()
            #expect(audit.repeated == 0, "no change applied twice")
            #expect(audit.highest == head)
            if let lowest = audit.lowest, let highest = audit.highest {
                #expect(audit.applied == Int(highest - lowest + 1), "no change skipped")
            }
        }
    }

    /// kill -9 the publisher while writes and a stream are under way, restart it on the same
    /// port: every acknowledged write is still there and the replica, which saw its stream
    /// break, resumes and ends equal. Then SIGTERM stops the publisher cleanly with a stream open.
    @Test func aPublisherKilledMidStreamLosesNoAcknowledgedWrite() async throws {
        let folder = Harness.folder()
        let sourcePath = folder.appendingPathComponent("source.sqlite").path
        var (publisher, port) = try await ConcordProcess.serve(db: sourcePath)
        let url = "http://127.0.0.1:\(port)"
        let http = SourceClient.makeHTTPClient()
        defer { _ = http.shutdown() as EventLoopFuture<Void> }  // on every path, or deinit traps
        let client = SourceClient(baseURL: url, http: http)
        let replica = try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path)
        let subscriber = Harness.makeSubscriber(source: url, store: replica, http: http)
        var acknowledged: [String: String] = [:]
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await subscriber.run() }
            var failures = 0
            for n in 0..<600 {
                if n == 200 || n == 400 {
                    publisher.kill9()
                    (publisher, _) = try await ConcordProcess.serve(db: sourcePath, port: port)
                }
                let key = "w\(n % 150)"
                let value = "{\"n\":\(n)}"
                do {
                    try await client.write([.upsert("writes", key, json: value), .upsert("log", "e\(n)", json: value)])
                    acknowledged[key] = value
                } catch {
                    failures += 1
                }
            }
            #expect(failures == 0, "the publisher was back before the next write")
            let head = try await client.feed().head
            try await Harness.waitUntil("the replica reaches the head") { try replica.state()?.position == head }
            group.cancelAll()
        }
        var stored: [String: String] = [:]
        var afterKey: String?
        while true {
            let page = try await client.page(collection: "writes", afterKey: afterKey, limit: 1000)
            for record in page.records { stored[record.key] = record.value }
            guard page.hasMore else { break }
            afterKey = page.records.last?.key
        }
        #expect(stored == acknowledged)
        let replicated = try replica.records(of: "writes")
        #expect(Dictionary(uniqueKeysWithValues: replicated.map { ($0.key, $0.value) }) == acknowledged)
        #expect(try replica.records(of: "log").count == 600)

        // Graceful shutdown with a stream open: the stream ends and the process exits 0.
        let stream = try await client.stream(after: 0)
        var iterator = stream.body.makeAsyncIterator()
        _ = try await iterator.next()
        #expect(await publisher.terminate() == 0)
    }

    /// SIGTERM while a stream is inside a large transaction, to a reader slower than the
    /// publisher: the stream goes on to the end of that transaction, and no further, and the
    /// publisher exits only once the reader has all of it (it closed the connection with the
    /// last megabytes still queued).
    @Test func aPublisherStoppedWhileStreamingALargeTransactionEndsTheStreamAtItsEnd() async throws {
        let folder = Harness.folder()
        let (publisher, port) = try await ConcordProcess.serve(
            db: folder.appendingPathComponent("source.sqlite").path,
            // A loaded machine may read and write slowly for long: this test is not about stalled
            // readers or silent connections.
            extra: ["--max-body-bytes", "134217728", "--stalled-client-seconds", "100"])
        let http = SourceClient.makeHTTPClient(idleTimeout: .seconds(120))
        defer { _ = http.shutdown() as EventLoopFuture<Void> }  // on every path, or deinit traps
        let client = SourceClient(baseURL: "http://127.0.0.1:\(port)", http: http)
        // 10,000 changes (the most one write takes) of 4 KB: three stream reads, and far more
        // than the socket buffers between the two hold, so the publisher is still sending the
        // transaction when it is told to stop.
        let filler = String(repeating: "x", count: 4000)
        let count = 10_000
        try await client.write([.upsert("small", "before", json: "0")])
        try await client.write((0..<count).map { .upsert("big", "k\($0)", json: "\"\(filler)\($0)\"") })
        let stream = try await client.stream(after: 0)
        var iterator = stream.body.makeAsyncIterator()
        var bytes: [UInt8] = []
        if let first = try await iterator.next() { bytes += first.readableBytesView }
        let stopping = Task { await publisher.terminate() }
        // Shutdown begins while the stream waits on the reader.
        try await Task.sleep(for: .milliseconds(500))
        // Slowly until near the end, where the publisher queues the transaction's last write
        // and closes: what the socket does not take at once is then still queued.
        let slowlyUntil = count * 4000 * 95 / 100
        while let chunk = try await iterator.next() {
            bytes += chunk.readableBytesView
            if bytes.count < slowlyUntil { try await Task.sleep(for: .milliseconds(3)) }
        }
        #expect(await stopping.value == 0)
        var items: [StreamItem] = []
        for line in bytes.split(separator: UInt8(ascii: "\n")) {
            if case .item(let item) = try WireFormat.parseStreamLine(Array(line)) { items.append(item) }
        }
        #expect(items.map(\.lastLSN) == Array(1...LSN(count + 1)), "every change, in order, to the end")
        #expect(items.last?.isCommit == true)
    }
}
