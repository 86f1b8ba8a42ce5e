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

    /// Pages and pulls larger than the publisher serves (its feed says how many) are asked at
    /// its size: the replica bootstraps and follows as with a smaller --page-size.
    @Test func pagesLargerThanThePublisherServesAreAskedAtItsSize() async throws {
        let folder = Harness.folder()
        let source = try PublisherStore(path: folder.appendingPathComponent("source.sqlite").path)
        try await source.write((0..<250).map { .upsert("c", "\($0)", json: "\($0)") })
        let replica = try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path)
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

    /// A read the publisher refuses as malformed (here pages of 0, from a subscriber that did
    /// not check) would be refused again: the subscriber stops and says why instead of asking
    /// without end.
    @Test func aReadThePublisherRefusesStopsTheSubscriberWithTheReason() async throws {
        let folder = Harness.folder()
        let source = try PublisherStore(path: folder.appendingPathComponent("source.sqlite").path)
        try await source.write([.upsert("c", "1", json: "1")])
        let replica = try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path)
        let http = SourceClient.makeHTTPClient()
        defer { _ = http.shutdown() as EventLoopFuture<Void> }  // on every path, or deinit traps
        try await PublisherServer.withRunningServer(store: source, configuration: .testing, logger: Harness.logger) {
            url in
            let subscriber = Harness.makeSubscriber(source: url, store: replica, http: http, pageSize: 0)
            let outcome = await withTaskGroup(of: (any Error)?.self) { group in
                group.addTask {
                    do { try await subscriber.run() } catch { return error }
                    return nil
                }
                // One that kept asking would still be running here.
                group.addTask {
                    try? await Task.sleep(for: .seconds(20))
                    return CancellationError()
                }
                let first = await group.next() ?? nil
                group.cancelAll()
                return first
            }
            let error = outcome as? ConcordError
            #expect(error?.code == .invalidConfiguration, "\(String(describing: outcome))")
            #expect(error?.message.contains("GET /v1/collections/c/records") == true)
            #expect(error?.message.contains("\"limit\" must be an integer from 1 to") == true)
            #expect(error?.message.contains("--page-size") == true)
        }
        #expect(try replica.records(of: "c").isEmpty)
    }

    /// A session that reaches the publisher and then fails without moving the replica (here
    /// every stream refused, 429) waits longer each time, as when the publisher cannot be
    /// reached at all, instead of asking again at once.
    @Test func sessionsThatFailWithoutProgressBackOff() async throws {
        let folder = Harness.folder()
        let source = try PublisherStore(path: folder.appendingPathComponent("source.sqlite").path)
        try await source.write([.upsert("c", "1", json: "1")])
        let replica = try ReplicaStore(path: folder.appendingPathComponent("replica.sqlite").path)
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
