import ConcordSQLite
import Logging
import ServiceLifecycle

extension PublisherServer {
    /// Runs a publisher over `store` for the duration of `body`, which receives its base URL.
    ///
    /// The server listens on `configuration.host` (port 0 picks a free one) and shuts down
    /// gracefully when `body` returns or throws. For tools, demos and tests in one process.
    public static func withRunningServer<T: Sendable>(
        store: PublisherStore,
        configuration: Configuration = Configuration(),
        logger: Logger = Logger(label: "concord.publisher"),
        _ body: @Sendable (String) async throws -> T
    ) async throws -> T {
        let (ports, portContinuation) = AsyncStream<Int>.makeStream()
        let app = try makeApplication(store: store, configuration: configuration, logger: logger) { port in
            portContinuation.yield(port)
            portContinuation.finish()
        }
        let group = ServiceGroup(
            configuration: .init(
                services: [
                    .init(service: app),
                    .init(service: PublisherMaintenance(store: store, logger: logger)),
                    .init(service: StreamCloser(store: store)),
                ],
                gracefulShutdownSignals: [], logger: logger))
        return try await withThrowingTaskGroup(of: T?.self) { tasks in
            tasks.addTask {
                try await group.run()
                return nil
            }
            var iterator = ports.makeAsyncIterator()
            guard let port = await iterator.next() else {
                await group.triggerGracefulShutdown()
                try await tasks.waitForAll()
                throw CancellationError()
            }
            let result: T
            do {
                result = try await body("http://\(configuration.host):\(port)")
            } catch {
                await group.triggerGracefulShutdown()
                try? await tasks.waitForAll()
                throw error
            }
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
            return result
        }
    }
}
