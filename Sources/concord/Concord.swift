import ArgumentParser
import Foundation
import Logging

@main
struct Concord: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "concord",
        abstract: "Keeps replicas of a service's data exactly in sync with the service that owns it.",
        subcommands: [
            Serve.self, Follow.self, Status.self, Verify.self, Diff.self, Export.self, Import.self, Demo.self,
            Bench.self,
        ]
    )
}

/// Options every command shares.
struct GlobalOptions: ParsableArguments {
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = ProcessInfo.processInfo.environment["CONCORD_LOG_LEVEL"] ?? "info"

    /// Sets up logging once for the process; returns the root logger.
    func bootstrapLogging(label: String) -> Logger {
        let level = Logger.Level(rawValue: logLevel.lowercased()) ?? .info
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        return Logger(label: label)
    }
}

struct OutputOptions: ParsableArguments {
    @Flag(help: "Print data as JSON.")
    var json = false
}

extension FileHandle {
    static func printError(_ text: String) {
        FileHandle.standardError.write(Data((text + "\n").utf8))
    }
}
