import ConcordCore
import Foundation
import Testing

/// Options from the environment and a config file reach the real binary, in order of precedence.
@Suite struct ConfigurationTests {
    @Test func servesWithOptionsFromTheFileAndTheEnvironment() async throws {
        let folder = Harness.folder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let config = folder.appendingPathComponent("concord.conf").path
        let db = folder.appendingPathComponent("source.sqlite").path
        let portFile = folder.appendingPathComponent("port").path
        // The file names a port that is taken below; the environment's 0 must win over it.
        let listener = try await ConcordProcess.serve(db: folder.appendingPathComponent("other.sqlite").path)
        try """
        # a comment
        [serve]
        db = \(db)
        port = \(listener.1)
        port-file = "\(portFile)"
        checkpoint-every = 7
        [follow]
        page-size = 10
        """.write(toFile: config, atomically: true, encoding: .utf8)
        let server = try ConcordProcess(
            ["serve"], environment: ["CONCORD_CONFIG": config, "CONCORD_PORT": "0"])
        var port = 0
        try await Harness.waitUntil("the publisher listens", timeout: .seconds(30)) {
            guard server.isRunning else { throw ConcordError(.internal, "concord serve exited") }
            port = (try? String(contentsOfFile: portFile, encoding: .utf8)).flatMap { Int($0) } ?? 0
            return port > 0
        }
        #expect(port != listener.1)
        #expect(FileManager.default.fileExists(atPath: db))
        #expect(await server.terminate() == 0)
        #expect(await listener.0.terminate() == 0)
    }

    @Test func refusesAnUnknownKeyNamingFileAndLine() async throws {
        let folder = Harness.folder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let config = folder.appendingPathComponent("concord.conf").path
        try "[serve]\nport = 0\nretain-forever = 1\n".write(toFile: config, atomically: true, encoding: .utf8)
        let errors = Pipe()
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Harness.binary)
        process.arguments = ["serve", "--config", config, "--db", folder.appendingPathComponent("s.sqlite").path]
        process.standardError = errors
        process.standardOutput = FileHandle.nullDevice
        let message = String(decoding: try await Harness.runToEnd(process, reading: errors), as: UTF8.self)
        #expect(process.terminationStatus == 2)
        #expect(message.contains("concord.conf:3"))
        #expect(message.contains("retain-forever"))
        #expect(!FileManager.default.fileExists(atPath: folder.appendingPathComponent("s.sqlite").path))
    }
}
