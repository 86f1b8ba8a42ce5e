import ConcordCore
import HTTPTypes
import Hummingbird
import Logging
import NIOCore

/// A small HTTP server for a process that serves no protocol of its own (`concord follow`):
/// `/metrics` for Prometheus, `/healthz` (the process runs) and `/readyz` (it serves its purpose).
public enum MetricsServer {
    public static func makeApplication(
        host: String, port: Int, logger: Logger,
        metrics: @escaping @Sendable () async -> [UInt8],
        readiness: @escaping @Sendable () -> String?,
        onServerRunning: @escaping @Sendable (Int) async -> Void = { _ in }
    ) -> some ApplicationProtocol {
        let router = Router(context: BasicRequestContext.self)
        router.add(middleware: ErrorMiddleware(logger: logger, metrics: nil))
        router.addHealthChecks(readiness: readiness)
        router.get("/metrics") { _, _ in Response.prometheus(await metrics()) }
        return Application(
            router: router,
            configuration: .init(address: .hostname(host, port: port), serverName: nil),
            onServerRunning: { channel in await onServerRunning(channel.localAddress?.port ?? port) },
            logger: logger)
    }
}

extension Router where Context == BasicRequestContext {
    /// `/healthz` (the process runs) and `/readyz` (503 with `readiness`'s reason while it is not ready).
    func addHealthChecks(readiness: @escaping @Sendable () -> String?) {
        get("/healthz") { _, _ in Response.json(Array("{\"status\":\"ok\"}\n".utf8)) }
        get("/readyz") { _, _ in
            if let reason = readiness() { throw ConcordError(.unavailable, "not ready: \(reason)") }
            return Response.json(Array("{\"status\":\"ready\"}\n".utf8))
        }
    }
}

extension Response {
    /// A Prometheus exposition text.
    static func prometheus(_ bytes: [UInt8]) -> Response {
        var headers = HTTPFields()
        headers[.contentType] = "text/plain; version=0.0.4; charset=utf-8"
        return Response(status: .ok, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(bytes: bytes)))
    }
}
