import Testing

@testable import ConcordCore

@Suite struct OptionSourcesTests {
    let options = [
        OptionSources.Option(name: "db", isFlag: false), OptionSources.Option(name: "port", isFlag: false),
        OptionSources.Option(name: "checkpoint-interval-ms", isFlag: false),
        OptionSources.Option(name: "no-verification", isFlag: true),
    ]

    @Test func namesOptionsAsTheParserDoes() {
        #expect(OptionSources.optionName(property: "checkpointIntervalMs") == "checkpoint-interval-ms")
        #expect(OptionSources.optionName(property: "dropEveryNthStreamItem") == "drop-every-nth-stream-item")
        #expect(OptionSources.optionName(property: "db") == "db")
        #expect(OptionSources.optionName(property: "retainBytes") == "retain-bytes")
        #expect(OptionSources.Option(name: "max-body-bytes", isFlag: false).environmentName == "CONCORD_MAX_BODY_BYTES")
    }

    @Test func commandLineWinsOverEnvironmentOverFile() throws {
        let file = try ConfigFile.parse(
            """
            # every command
            port = 1
            checkpoint-interval-ms = 50
            [serve]
            port = 2
            db = "/data/source.sqlite"
            no-verification = true
            [follow]
            port = 3
            """, path: "concord.conf")
        let added = try OptionSources.arguments(
            command: "serve", options: options, given: ["--port", "9"],
            environment: ["CONCORD_DB": "/env.sqlite", "CONCORD_UNRELATED": "x"], file: file)
        #expect(added == ["--db=/env.sqlite", "--checkpoint-interval-ms=50", "--no-verification"])
        let fromSection = try OptionSources.arguments(
            command: "serve", options: options, given: [], environment: [:], file: file)
        #expect(fromSection.contains("--port=2"))
        #expect(fromSection.contains("--db=/data/source.sqlite"))
    }

    @Test func flagsTakeTrueOrFalse() throws {
        let off = try OptionSources.arguments(
            command: "follow", options: options, given: [], environment: ["CONCORD_NO_VERIFICATION": "false"],
            file: nil)
        #expect(off.isEmpty)
        #expect(throws: ConcordError.self) {
            try OptionSources.arguments(
                command: "follow", options: options, given: [], environment: ["CONCORD_NO_VERIFICATION": "maybe"],
                file: nil)
        }
    }

    @Test func refusesUnknownKeysAndMalformedLinesWithTheirLine() throws {
        let file = try ConfigFile.parse("[serve]\nport = 1\nbogus = 2\n", path: "c.conf")
        do {
            _ = try OptionSources.arguments(command: "serve", options: options, given: [], environment: [:], file: file)
            Issue.record("an unknown key was accepted")
        } catch {
            #expect(error.code == .invalidConfiguration)
            #expect(error.message.contains("c.conf:3"))
        }
        // Outside a section a key may belong to another command, so it is not an error there.
        let shared = try ConfigFile.parse("page-size = 5\n", path: "c.conf")
        #expect(
            try OptionSources.arguments(command: "serve", options: options, given: [], environment: [:], file: shared)
                .isEmpty)
        // Knowing every command, typos anywhere in the file are refused.
        let every: [String: Set<String>] = ["serve": ["db", "port"], "follow": ["db", "page-size"]]
        for text in ["[folow]\ndb = x\n", "[follow]\nport = 1\n", "pagesize = 3\n"] {
            let file = try ConfigFile.parse(text, path: "c.conf")
            #expect(throws: ConcordError.self) {
                try OptionSources.arguments(
                    command: "serve", options: options, given: [], environment: [:], file: file, everyCommand: every)
            }
        }
        #expect(throws: ConcordError.self) { try ConfigFile.parse("port 7070\n", path: "c.conf") }
        #expect(throws: ConcordError.self) { try ConfigFile.parse("[serve\n", path: "c.conf") }
    }
}
