import AsyncHTTPClient
import ConcordClient
import ConcordCore
import ConcordSQLite
import ConcordServer
import Foundation
import NIOCore
import Testing

@Suite(.serialized, .timeLimit(.minutes(5)))
struct ReplicationTests {
    @Test func aNewReplicaBootstrapsWhileWritesContinueAndEndsEqual() async throws {
        let folder = Harness.folder()
        let source = try PublisherStore(path: folder.appendingPathComponent("source.sqlite").path)
        for start in stride(from: 0, to: 5000, by: 1000) {
            try await source.write((start..<start + 1000).map { .upsert("items", "k\($0)", json: "{\"v\":\($0)}") })
        }
        try await PublisherServer.withRunningServer(store: source, configuration: .testing, logger: Harness.logger) {
            url in
            let replica = try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path)
            let http = SourceClient.makeHTTPClient()
            defer { _ = http.shutdown() as EventLoopFuture<Void> }  // on every path, or deinit traps
            let subscriber = Harness.makeSubscriber(source: url, store: replica, http: http, pageSize: 100)
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await subscriber.run() }
                var workload = RandomWorkload(keySpace: 6000)
                var sawBootstrap = false
                for _ in 0..<400 {
                    try await source.write(workload.transaction())
                    if try replica.state()?.progress.phase == .bootstrapping { sawBootstrap = true }
                    try await Task.sleep(for: .milliseconds(2))
                }
                #expect(sawBootstrap, "writes went on while the replica was bootstrapping")
                let head = source.head
                try await Harness.waitUntil("the replica reaches the head") {
                    let state = try replica.state()
                    return state?.position == head && state?.progress.phase == .following
                }
                group.cancelAll()
            }
            #expect(try await Harness.differences(source: source, replica: replica) == [])
        }
    }

    @Test func aLostStreamMessageIsDetectedAndRefilledByPull() async throws {
        let folder = Harness.folder()
        let source = try PublisherStore(path: folder.appendingPathComponent("source.sqlite").path)
        var configuration = PublisherServer.Configuration.testing
        configuration.dropEveryNthStreamItem = 13
        try await PublisherServer.withRunningServer(store: source, configuration: configuration, logger: Harness.logger)
        { url in
            let replica = try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path)
            let http = SourceClient.makeHTTPClient()
            defer { _ = http.shutdown() as EventLoopFuture<Void> }  // on every path, or deinit traps
            let subscriber = Harness.makeSubscriber(source: url, store: replica, http: http)
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await subscriber.run() }
                var workload = RandomWorkload(keySpace: 300)
                for _ in 0..<300 {
                    try await source.write(workload.transaction())
                    try await Task.sleep(for: .milliseconds(1))
                }
                let head = source.head
                try await Harness.waitUntil("the replica reaches the head") {
                    let state = try replica.state()
                    return state?.position == head && state?.progress.phase == .following
                }
                group.cancelAll()
            }
            #expect(try await Harness.differences(source: source, replica: replica) == [])
        }
    }

    @Test func largeTransactionsCutAcrossStreamReadsAndLostLinesReachASQLiteReplicaWhole() async throws {
        let folder = Harness.folder()
        let replica = try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path)
        try await Self.followLargeTransactionsThroughLosses(into: replica, folder: folder)
    }

    /// Transactions of up to 300 changes, read by the publisher 7 changes at a time and written
    /// by the subscriber in pieces of 10, while every 401st line of a stream is lost and
    /// heartbeats follow the ends of transactions within a millisecond (a writer that holds a
    /// transaction open must get its end before the reader notes the head): the replica ends
    /// equal to the source and verified at its head.
    ///
    /// `stall`, when given, holds the replica's writes up for a moment while the large
    /// transactions come, so that lines pile up behind the reader.
    static func followLargeTransactionsThroughLosses(
        into replica: any ReplicaStoring, folder: URL, stall: (@Sendable () async throws -> Void)? = nil
    ) async throws {
        // Checkpoints by time only: a checkpoint line after a commit would hand the writer the
        // transaction's end before any heartbeat could come.
        let source = try Harness.publisherCheckpointedByTime(in: folder, every: .milliseconds(300))
        var configuration = PublisherServer.Configuration.testing
        configuration.streamBatch = 7
        configuration.dropEveryNthStreamItem = 401
        configuration.heartbeatInterval = .milliseconds(1)
        try await PublisherServer.withRunningServer(store: source, configuration: configuration, logger: Harness.logger)
        { url in
            let http = SourceClient.makeHTTPClient()
            defer { _ = http.shutdown() as EventLoopFuture<Void> }  // on every path, or deinit traps
            // A small queue: the reader waits while pieces are written, and lines pile up behind it.
            let subscriber = Harness.makeSubscriber(source: url, store: replica, http: http, piece: 10)
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await subscriber.run() }
                var workload = RandomWorkload(keySpace: 500)
                for round in 0..<60 {
                    var operations: [WriteOperation] = []
                    // Every third transaction is large: several reads, several pieces.
                    let parts = round % 3 == 0 ? 60 : 1
                    for _ in 0..<parts { operations += workload.transaction() }
                    try await source.write(operations)
                    if let stall, round % 15 == 6 { group.addTask { try await stall() } }
                    try await Task.sleep(for: .milliseconds(5))
                }
                let head = source.head
                try await Harness.waitUntil("the replica is verified at the head", timeout: .seconds(60)) {
                    let state = try await replica.state()
                    return state?.position == head && state?.verifiedLSN == head
                }
                group.cancelAll()
            }
            #expect(try await Harness.differences(source: source, replica: replica) == [])
            #expect(subscriber.refills.holes > 0, "lines were lost and refilled")
            #expect(subscriber.transactionsWrittenInPieces > 0, "transactions were written in pieces")
        }
    }

    /// A stream reads 7 changes at a time, and a subscriber of one collection passes
    /// transactions made mostly of another: reads that hold none of its changes still move on.
    @Test func aFilteredStreamPassesLargeTransactionsOfOtherCollections() async throws {
        let folder = Harness.folder()
        let source = try PublisherStore(path: folder.appendingPathComponent("source.sqlite").path)
        try await source.write([.upsert("customers", "c0", json: "0")])
        var configuration = PublisherServer.Configuration.testing
        configuration.streamBatch = 7
        try await PublisherServer.withRunningServer(store: source, configuration: configuration, logger: Harness.logger)
        { url in
            let replica = try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path)
            let http = SourceClient.makeHTTPClient()
            defer { _ = http.shutdown() as EventLoopFuture<Void> }  // on every path, or deinit traps
            let subscriber = Harness.makeSubscriber(
                source: url, store: replica, http: http, collections: ["customers"], piece: 5)
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await subscriber.run() }
                try await Harness.waitUntil("the replica follows") {
                    try replica.state()?.progress.phase == .following
                }
                for n in 1...5 {
                    try await source.write(
                        (0..<50).map { .upsert("orders", "o\(n)-\($0)", json: "\($0)") }
                            + [.upsert("customers", "c\(n)", json: "\(n)")]
                            + (0..<30).map { .upsert("orders", "p\(n)-\($0)", json: "\($0)") })
                }
                let head = source.head
                try await Harness.waitUntil("the replica reaches the head", timeout: .seconds(30)) {
                    try replica.state()?.position == head
                }
                group.cancelAll()
            }
            #expect(try await Harness.differences(source: source, replica: replica, collections: ["customers"]) == [])
            #expect(try replica.records(of: "customers").count == 6)
        }
    }

    @Test func aReplicaFollowsOnlyTheCollectionsItAsksFor() async throws {
        let folder = Harness.folder()
        let source = try PublisherStore(path: folder.appendingPathComponent("source.sqlite").path)
        try await source.write([.upsert("customers", "c1", json: "1"), .upsert("orders", "o1", json: "1")])
        try await PublisherServer.withRunningServer(store: source, configuration: .testing, logger: Harness.logger) {
            url in
            let replica = try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path)
            let http = SourceClient.makeHTTPClient()
            defer { _ = http.shutdown() as EventLoopFuture<Void> }  // on every path, or deinit traps
            let subscriber = Harness.makeSubscriber(source: url, store: replica, http: http, collections: ["customers"])
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await subscriber.run() }
                for n in 2...50 {
                    try await source.write([
                        .upsert("orders", "o\(n)", json: "\(n)"), .upsert("customers", "c\(n)", json: "\(n)"),
                        .upsert("orders", "x\(n)", json: "\(n)"),
                    ])
                    try await source.write([.upsert("orders", "only\(n)", json: "\(n)")])
                }
                let head = source.head
                try await Harness.waitUntil("the replica reaches the head") {
                    let state = try replica.state()
                    return state?.position == head && state?.progress.phase == .following
                }
                group.cancelAll()
            }
            #expect(try replica.collections() == ["customers"])
            #expect(try await Harness.differences(source: source, replica: replica, collections: ["customers"]) == [])
        }
    }

    /// In a new folder: a publisher file holding `records` records of collection "c", and an
    /// empty replica file.
    static func publisherAndReplica(records: Int = 1) async throws -> (PublisherStore, ReplicaStore) {
        let folder = Harness.folder()
        let source = try PublisherStore(path: folder.appendingPathComponent("source.sqlite").path)
        try await source.write((0..<records).map { .upsert("c", "\($0)", json: "\($0)") })
        return (source, try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path))
    }

    /// Pages and pulls larger than the publisher serves (its feed says how many) are asked at
    /// its size: the replica bootstraps and follows as with a smaller --page-size.
    @Test func pagesLargerThanThePublisherServesAreAskedAtItsSize() async throws {
        let (source, replica) = try await Self.publisherAndReplica(records: 250)
        let http = SourceClient.makeHTTPClient()
        defer { _ = http.shutdown() as EventLoopFuture<Void> }  // on every path, or deinit traps
        var configuration = PublisherServer.Configuration.testing
        configuration.maxPageLimit = 100
        configuration.maxChangeLimit = 100
        try await PublisherServer.withRunningServer(store: source, configuration: configuration, logger: Harness.logger)
        { url in
            #expect(try await SourceClient(baseURL: url, http: http).feed().limit == 100)
            let subscriber = Harness.makeSubscriber(source: url, store: replica, http: http, pageSize: 500)
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await subscriber.run() }
                try await Harness.waitUntil("the replica follows at the head", timeout: .seconds(30)) {
                    let state = try replica.state()
                    return state?.progress.phase == .following && state?.position == source.head
                }
                group.cancelAll()
            }
        }
        #expect(try await Harness.differences(source: source, replica: replica) == [])
    }

    /// A page the publisher refuses as malformed comes back as a configuration error naming the
    /// request. A subscriber stops on it only when the publisher did not say its limit (one that
    /// said it may have lowered it since, and the next session reads it): against this one it
    /// keeps retrying.
    @Test func aPageThePublisherRefusesNamesTheRequest() async throws {
        let (source, replica) = try await Self.publisherAndReplica()
        let http = SourceClient.makeHTTPClient()
        defer { _ = http.shutdown() as EventLoopFuture<Void> }  // on every path, or deinit traps
        try await PublisherServer.withRunningServer(store: source, configuration: .testing, logger: Harness.logger) {
            url in
            let refusal = await #expect(throws: ConcordError.self) {
                _ = try await SourceClient(baseURL: url, http: http).page(collection: "c", afterKey: nil, limit: 0)
            }
            #expect(refusal?.code == .invalidConfiguration)
            #expect(refusal?.message.contains("GET /v1/collections/c/records") == true)
            #expect(refusal?.message.contains("\"limit\" must be an integer from 1 to") == true)
            #expect(refusal?.message.contains("--page-size") == true)
            if let refusal {
                #expect(Subscriber.stops(on: refusal, publisherSaidLimit: false))
                #expect(!Subscriber.stops(on: refusal, publisherSaidLimit: true))
            }
            let subscriber = Harness.makeSubscriber(source: url, store: replica, http: http, pageSize: 0)
            let ended = await withTaskGroup(of: Bool.self) { group in
                group.addTask {
                    _ = try? await subscriber.run()
                    return true
                }
                group.addTask {
                    try? await Task.sleep(for: .seconds(2))
                    return false
                }
                let first = await group.next() ?? true
                group.cancelAll()
                return first
            }
            #expect(!ended, "a publisher that says its limit is asked again")
        }
        #expect(try replica.records(of: "c").isEmpty)
        #expect(Subscriber.stops(on: ConcordError(.feedMismatch, ""), publisherSaidLimit: true))
        #expect(!Subscriber.stops(on: ConcordError(.unavailable, ""), publisherSaidLimit: false))
    }

    /// A session that reaches the publisher and then fails without moving the replica (here
    /// every stream refused, 429) waits longer each time, as when the publisher cannot be
    /// reached at all, instead of asking again at once.
    @Test func sessionsThatFailWithoutProgressBackOff() async throws {
        let (source, replica) = try await Self.publisherAndReplica()
        let http = SourceClient.makeHTTPClient()
        defer { _ = http.shutdown() as EventLoopFuture<Void> }  // on every path, or deinit traps
        var configuration = PublisherServer.Configuration.testing
        configuration.maxStreams = 0
        try await PublisherServer.withRunningServer(store: source, configuration: configuration, logger: Harness.logger)
        { url in
            let subscriber = Harness.makeSubscriber(source: url, store: replica, http: http)
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await subscriber.run() }
                try await Task.sleep(for: .seconds(3))
                group.cancelAll()
            }
            let metrics = String(decoding: await subscriber.metrics.render(subscriber), as: UTF8.self)
            let line = metrics.split(separator: "\n").first {
                $0.hasPrefix("concord_replica_errors_total") && $0.contains("too_many_requests")
            }
            let refused = line.flatMap { $0.split(separator: " ").last }.flatMap { Double($0) } ?? 0
            // Waits of 20 ms doubling up to 300 ms: about a dozen in 3 s; asked again at once
            // after each, as before, well over a hundred.
            #expect(refused >= 3 && refused <= 30, "\(refused) sessions refused in 3 s")
        }
        #expect(try replica.records(of: "c").count == 1, "the bootstrap went in before the stream was refused")
    }

    @Test func aReplicaOfAnotherFeedIsRefused() async throws {
        let folder = Harness.folder()
        let first = try PublisherStore(path: folder.appendingPathComponent("a.sqlite").path)
        let second = try PublisherStore(path: folder.appendingPathComponent("b.sqlite").path)
        try await first.write([.upsert("c", "1", json: "1")])
        let replica = try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path)
        let http = SourceClient.makeHTTPClient()
        defer { _ = http.shutdown() as EventLoopFuture<Void> }  // on every path, or deinit traps
        try await PublisherServer.withRunningServer(store: first, configuration: .testing, logger: Harness.logger) {
            url in
            let subscriber = Harness.makeSubscriber(source: url, store: replica, http: http)
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await subscriber.run() }
                // A new replica's position is the head from the start; following means its pages are in.
                try await Harness.waitUntil("the replica follows") {
                    try replica.state()?.progress.phase == .following
                }
                group.cancelAll()
            }
        }
        try await PublisherServer.withRunningServer(store: second, configuration: .testing, logger: Harness.logger) {
            url in
            let subscriber = Harness.makeSubscriber(source: url, store: replica, http: http)
            await #expect {
                try await subscriber.run()
            } throws: { ($0 as? ConcordError)?.code == .feedMismatch }
        }
        #expect(try replica.records(of: "c").count == 1)
    }
}

extension PublisherServer.Configuration {
    static var testing: Self {
        var configuration = Self()
        configuration.port = 0
        configuration.heartbeatInterval = .milliseconds(200)
        return configuration
    }
}
