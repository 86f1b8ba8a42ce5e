/// A config file: `key = value` lines, `#` comments, and `[command]` sections whose keys
/// apply to that command only. Keys before any section apply to every command with that option.
public struct ConfigFile: Sendable, Equatable {
    public struct Entry: Sendable, Equatable {
        /// The command the entry is for; `nil`: every command that has the option.
        public var section: String?
        public var key: String
        public var value: String
        public var line: Int
    }

    public var path: String
    public var entries: [Entry]

    public static func parse(_ text: String, path: String) throws(ConcordError) -> ConfigFile {
        var entries: [Entry] = []
        var section: String?
        for (index, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let number = index + 1
            let line = raw.trimmingSpaces()
            if line.isEmpty || line.hasPrefix("#") { continue }
            if line.hasPrefix("[") {
                guard line.hasSuffix("]"), line.count > 2 else {
                    throw ConcordError(.invalidConfiguration, "\(path):\(number): a section is written [command]")
                }
                section = String(line.dropFirst().dropLast()).trimmingSpaces()
                continue
            }
            guard let equals = line.firstIndex(of: "=") else {
                throw ConcordError(.invalidConfiguration, "\(path):\(number): expected key = value, found \"\(line)\"")
            }
            var key = String(line[..<equals]).trimmingSpaces()
            if key.hasPrefix("--") { key.removeFirst(2) }
            var value = String(line[line.index(after: equals)...]).trimmingSpaces()
            if value.count >= 2, value.first == "\"", value.last == "\"" {
                value = String(value.dropFirst().dropLast())
            }
            guard !key.isEmpty, key.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" }) else {
                throw ConcordError(.invalidConfiguration, "\(path):\(number): \"\(key)\" is not an option name")
            }
            entries.append(Entry(section: section, key: key, value: value, line: number))
        }
        return ConfigFile(path: path, entries: entries)
    }
}

/// Merges options from the environment (`CONCORD_SOME_OPTION`) and a config file under the
/// command line: the command line wins, then the environment, then the file, then the default.
///
/// The result is more command-line arguments, so one parser checks every value whatever its
/// source, and `--help` documents each option once.
public enum OptionSources {
    public struct Option: Sendable, Equatable {
        /// The long name without dashes, e.g. `max-body-bytes`.
        public var name: String
        /// A flag takes no value: `true` sets it, `false` leaves it off.
        public var isFlag: Bool

        public init(name: String, isFlag: Bool) {
            self.name = name
            self.isFlag = isFlag
        }

        /// `CONCORD_MAX_BODY_BYTES` for `max-body-bytes`.
        public var environmentName: String {
            "CONCORD_" + name.uppercased().replacingDashes()
        }
    }

    /// The environment variable naming a config file.
    public static let configEnvironmentName = "CONCORD_CONFIG"

    /// `checkpointIntervalMs` → `checkpoint-interval-ms`, as the argument parser names options.
    public static func optionName(property: String) -> String {
        var name = ""
        var previousWasLower = false
        for character in property {
            if character.isUppercase {
                if previousWasLower { name.append("-") }
                name.append(contentsOf: character.lowercased())
                previousWasLower = false
            } else {
                name.append(character)
                previousWasLower = character.isLowercase || character.isNumber
            }
        }
        return name
    }

    /// Arguments to add for the options `given` does not set.
    ///
    /// - Parameters:
    ///   - everyCommand: every command's name and options, to refuse a file's unknown sections and
    ///     keys (typos) even when they are not for this command; `nil`: only this command's are checked.
    public static func arguments(
        command: String, options: [Option], given: [String], environment: [String: String], file: ConfigFile?,
        everyCommand: [String: Set<String>]? = nil
    ) throws(ConcordError) -> [String] {
        var present = Set<String>()
        for argument in given {
            if argument == "--" { break }
            guard argument.hasPrefix("--") else { continue }
            let name = argument.dropFirst(2).split(separator: "=", maxSplits: 1).first.map(String.init) ?? ""
            present.insert(name)
        }
        let known = Dictionary(options.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        var fromFile: [String: ConfigFile.Entry] = [:]
        for entry in file?.entries ?? [] {
            if let everyCommand {
                let path = file?.path ?? "config"
                if let section = entry.section {
                    guard let known = everyCommand[section] else {
                        throw ConcordError(
                            .invalidConfiguration, "\(path):\(entry.line): no command is named [\(section)]")
                    }
                    guard known.contains(entry.key) else {
                        throw ConcordError(
                            .invalidConfiguration,
                            "\(path):\(entry.line): concord \(section) has no option --\(entry.key)")
                    }
                } else if !everyCommand.values.contains(where: { $0.contains(entry.key) }) {
                    throw ConcordError(
                        .invalidConfiguration, "\(path):\(entry.line): no command has an option --\(entry.key)")
                }
            }
            guard entry.section == nil || entry.section == command else { continue }
            guard known[entry.key] != nil else {
                // A key outside any section may be meant for another command.
                if entry.section == nil { continue }
                throw ConcordError(
                    .invalidConfiguration,
                    "\(file?.path ?? "config"):\(entry.line): concord \(command) has no option --\(entry.key)")
            }
            // A command's own section overrides the keys for every command.
            if entry.section != nil || fromFile[entry.key]?.section == nil { fromFile[entry.key] = entry }
        }
        var added: [String] = []
        for option in options where !present.contains(option.name) && option.name != "config" {
            let value: String
            let origin: String
            if let fromEnvironment = environment[option.environmentName] {
                value = fromEnvironment
                origin = option.environmentName
            } else if let entry = fromFile[option.name] {
                value = entry.value
                origin = "\(file?.path ?? "config"):\(entry.line)"
            } else {
                continue
            }
            if option.isFlag {
                switch value.lowercased() {
                case "1", "true", "yes", "on": added.append("--\(option.name)")
                case "0", "false", "no", "off", "": break
                default:
                    throw ConcordError(
                        .invalidConfiguration, "\(origin): --\(option.name) is a flag; give true or false, not \(value)"
                    )
                }
            } else {
                added.append("--\(option.name)=\(value)")
            }
        }
        return added
    }
}

extension StringProtocol {
    func trimmingSpaces() -> String {
        var slice = Substring(self)
        while let first = slice.first, first == " " || first == "\t" || first == "\r" { slice.removeFirst() }
        while let last = slice.last, last == " " || last == "\t" || last == "\r" { slice.removeLast() }
        return String(slice)
    }

    func replacingDashes() -> String {
        String(map { $0 == "-" ? "_" : $0 })
    }
}
