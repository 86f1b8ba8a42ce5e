import ArgumentParser
import AsyncHTTPClient
import ConcordClient
import ConcordCore
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

    /// Parses the command line with the options the environment and a config file add under it.
    static func main() async {
        let given = Array(CommandLine.arguments.dropFirst())
        do {
            await main(try OptionSourcesForCLI.arguments(given, environment: ProcessInfo.processInfo.environment))
        } catch {
            FileHandle.printError("error: \((error as? ConcordError)?.message ?? "\(error)")")
            Foundation.exit(2)
        }
    }
}

/// Finds the command a command line names and the options it takes, so the environment and
/// a config file can supply them (see ``OptionSources``).
enum OptionSourcesForCLI {
    /// Groups of options commands share, by type name, since a group's type is not reachable
    /// from a mirror of the command.
    static let groups: [String: any ParsableArguments.Type] = [
        "\(GlobalOptions.self)": GlobalOptions.self, "\(OutputOptions.self)": OutputOptions.self,
        "\(SourceAccessOptions.self)": SourceAccessOptions.self, "\(ReplicaPlace.self)": ReplicaPlace.self,
    ]

    static func arguments(_ given: [String], environment: [String: String]) throws -> [String] {
        var command: any ParsableCommand.Type = Concord.self
        var path = 0
        while path < given.count,
            let next = command.configuration.subcommands.first(where: { $0._commandName == given[path] })
        {
            command = next
            path += 1
        }
        guard command != Concord.self else { return given }
        let options = self.options(of: command)
        let configPath = value(of: "config", in: given) ?? environment[OptionSources.configEnvironmentName]
        let file = try configPath.map { path in
            guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
                throw ConcordError(.invalidConfiguration, "cannot read the config file \(path)")
            }
            return try ConfigFile.parse(text, path: path)
        }
        let added = try OptionSources.arguments(
            command: command._commandName, options: options, given: Array(given[path...]),
            environment: environment, file: file, everyCommand: file == nil ? nil : everyCommand())
        return Array(given[..<path]) + added + Array(given[path...])
    }

    /// Every command's name and option names, by walking the command tree.
    static func everyCommand() -> [String: Set<String>] {
        var result: [String: Set<String>] = [:]
        var pending: [any ParsableCommand.Type] = Concord.configuration.subcommands
        while let command = pending.popLast() {
            result[command._commandName, default: []].formUnion(options(of: command).map(\.name))
            pending += command.configuration.subcommands
        }
        return result
    }

    /// The named options and flags of a command, from a mirror of its default value.
    static func options(of type: any ParsableArguments.Type) -> [OptionSources.Option] {
        var options: [OptionSources.Option] = []
        for child in Mirror(reflecting: type.init()).children {
            guard let label = child.label, label.hasPrefix("_") else { continue }
            let kind = "\(Swift.type(of: child.value))"
            let name = OptionSources.optionName(property: String(label.dropFirst()))
            if kind.hasPrefix("Option<") {
                options.append(OptionSources.Option(name: name, isFlag: false))
            } else if kind.hasPrefix("Flag<") {
                options.append(OptionSources.Option(name: name, isFlag: true))
            } else if kind.hasPrefix("OptionGroup<") {
                let group = groups[String(kind.dropFirst(12).dropLast())]
                // A group missing here would silently lose its environment variables and config keys.
                precondition(group != nil, "register \(kind) in Concord.groups")
                if let group { options += self.options(of: group) }
            }
        }
        return options
    }

    static func value(of option: String, in given: [String]) -> String? {
        for (index, argument) in given.enumerated() {
            if argument == "--\(option)", index + 1 < given.count { return given[index + 1] }
            if argument.hasPrefix("--\(option)=") { return String(argument.dropFirst(option.count + 3)) }
        }
        return nil
    }
}

/// Options every command shares.
struct GlobalOptions: ParsableArguments {
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    @Option(help: "Log format: text, or json (one object a line, for log collectors).")
    var logFormat: String = "text"

    @Option(
        help: """
            Read options from this file (also CONCORD_CONFIG): `key = value` lines, optionally under \
            [command] sections. Every option --some-option can also be set by the environment variable \
            CONCORD_SOME_OPTION. The command line wins over the environment, the environment over the file.
            """)
    var config: String?

    /// Sets up logging once for the process; returns the root logger.
    func bootstrapLogging(label: String) -> Logger {
        let level = Logger.Level(rawValue: logLevel.lowercased()) ?? .info
        let json = logFormat.lowercased() == "json"
        LoggingSystem.bootstrap { label in
            if json {
                var handler = JSONLogHandler(label: label)
                handler.logLevel = level
                return handler
            }
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

/// The bearer token a command presents to a publisher that requires one.
struct SourceAccessOptions: ParsableArguments {
    @Option(help: "The bearer token the publisher requires (also the CONCORD_TOKEN variable).")
    var token: String?

    @Option(help: "Read the bearer token from this file (first line).")
    var tokenFile: String?

    @Option(help: "Trust the certificate authorities in this PEM file for an https:// source (a private CA).")
    var caFile: String?

    /// An HTTP client trusting `--ca-file` when given.
    func makeHTTPClient() throws -> HTTPClient {
        do {
            return try SourceClient.makeHTTPClient(trustedCertificates: caFile)
        } catch let error as ConcordError {
            throw ValidationError(error.message)
        }
    }

    func validate() throws {
        if token != nil, tokenFile != nil { throw ValidationError("give --token or --token-file, not both") }
    }

    /// The token, if one is given; a file that cannot be read or is empty is an error.
    func resolved() throws -> String? {
        guard let tokenFile else { return token }
        guard let contents = try? String(contentsOfFile: tokenFile, encoding: .utf8) else {
            throw ValidationError("cannot read the token file \(tokenFile)")
        }
        let token = contents.split(whereSeparator: \.isNewline).first.map {
            $0.trimmingCharacters(in: .whitespaces)
        }
        guard let token, !token.isEmpty else { throw ValidationError("the token file \(tokenFile) is empty") }
        return token
    }

    var clientConfiguration: SourceClient.Configuration {
        get throws {
            var configuration = SourceClient.Configuration()
            configuration.token = try resolved()
            return configuration
        }
    }
}
