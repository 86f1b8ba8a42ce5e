import ArgumentParser
import ConcordClient
import ConcordCore
import ConcordSQLite
import Foundation

struct Diff: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compare two Concord SQLite files (publisher or replica) record by record.",
        discussion: """
            Hashes every record of both files the same way the digests do and reports per
            collection whether they are equal, and which keys only A holds (missing from B),
            only B holds (extra in B) or both hold with different content (stale).
            Exit status 0: equal; 3: different.
            """)

    @Argument(help: "The first file (the reference).")
    var a: String

    @Argument(help: "The second file.")
    var b: String

    @Option(help: "Print at most this many keys per kind of difference.")
    var maxKeys = 20

    @OptionGroup var output: OutputOptions
    @OptionGroup var global: GlobalOptions

    func run() async throws {
        for path in [a, b] where !FileManager.default.fileExists(atPath: path) {
            FileHandle.printError("error: no file at \(path)")
            throw ExitCode(1)
        }
        let left: ConcordFile.Contents
        let right: ConcordFile.Contents
        do {
            left = try ConcordFile.read(path: a)
            right = try ConcordFile.read(path: b)
        } catch {
            FileHandle.printError("error: \(error)")
            throw ExitCode(1)
        }
        var reports: [ReconciliationReport] = []
        for name in Set(left.records.keys).union(right.records.keys).sorted() {
            let l = left.records[name] ?? [:]
            let r = right.records[name] ?? [:]
            var report = ReconciliationReport(collection: name, lsn: left.position)
            for (key, record) in l {
                if let other = r[key] {
                    if other != record { report.stale.append(key) }
                } else {
                    report.missing.append(key)
                }
            }
            for key in r.keys where l[key] == nil { report.extra.append(key) }
            report.missing.sort()
            report.extra.sort()
            report.stale.sort()
            reports.append(report)
        }
        print(report: reports, json: output.json, maxKeys: maxKeys)
        if reports.contains(where: { !$0.isEqual }) { throw ExitCode(3) }
    }
}
