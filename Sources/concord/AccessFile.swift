import ConcordCore
import ConcordServer
import Foundation
import Logging
import ServiceLifecycle
import Synchronization

/// Where `serve` reads its bearer tokens: a file (`--tokens-file`), or the lines themselves
/// (`--tokens`, or `CONCORD_TOKENS`).
struct AccessSource {
    var file: String?
    var text: String?

    var isConfigured: Bool { file != nil || text != nil }

    func load() throws -> AccessPolicy {
        if let file {
            let contents: String
            do {
                contents = try String(contentsOfFile: file, encoding: .utf8)
            } catch {
                throw ConcordError(
                    .invalidConfiguration, "cannot read the tokens file \(file): \(error.localizedDescription)")
            }
            return try AccessPolicy.parse(contents, origin: file)
        }
        return try AccessPolicy.parse(text ?? "", origin: "--tokens")
    }
}

/// Reloads the tokens file on SIGHUP and when it changes (checked every second), so a token
/// is rotated without a restart. A file that no longer parses keeps the tokens in force and
/// logs why.
struct AccessReloader: Service {
    let gate: AccessGate
    let file: String
    let logger: Logger

    /// Set by the SIGHUP handler, taken by the reload loop.
    static let hangup = Atomic<Bool>(false)

    func run() async throws {
        signal(SIGHUP, SIG_IGN)
        let source = DispatchSource.makeSignalSource(signal: SIGHUP)
        source.setEventHandler { Self.hangup.store(true, ordering: .releasing) }
        source.resume()
        defer { source.cancel() }
        let file = self.file
        await cancelWhenGracefulShutdown {
            var stamp = Self.stamp(file)
            while !Task.isCancelled {
                try? await Task.sleep(for: .seconds(1))
                let now = Self.stamp(file)
                let signalled = Self.hangup.exchange(false, ordering: .acquiringAndReleasing)
                guard signalled || now != stamp else { continue }
                stamp = now
                do {
                    let policy = try AccessSource(file: file).load()
                    gate.replace(policy)
                    logger.info(
                        "tokens reloaded",
                        metadata: ["file": "\(file)", "tokens": "\(policy.tokens.map(\.name).joined(separator: ","))"])
                } catch {
                    logger.error(
                        "tokens not reloaded; the previous ones stay in force", metadata: ["error": "\(error)"])
                }
            }
        }
    }

    /// The file's modification time and size, to notice a change.
    static func stamp(_ file: String) -> String {
        let attributes = try? FileManager.default.attributesOfItem(atPath: file)
        let date = (attributes?[.modificationDate] as? Date)?.timeIntervalSince1970 ?? 0
        return "\(date):\(attributes?[.size] as? Int ?? -1)"
    }
}
