import ConcordCore
import ConcordSQLite
import ConcordServer
import Foundation
import Testing

/// Export and import: a round trip equals the source and `follow` continues from the file's
/// LSN; every corruption is refused; a kill halfway leaves the target as it was.
@Suite(.serialized, .timeLimit(.minutes(6)))
struct ExportImportTests {
    @Test func anImportedReplicaEqualsTheSourceAndFollowContinuesFromTheExportLSN() async throws {
        let folder = Harness.folder()
        let source = try VerificationTests.sourceStore(folder)
        try await VerificationTests.fill(source, records: 3000)
        try await source.write([.upsert("people", "ada", json: "{\"name\":\"Ada\"}"), .delete("items", "k7")])
        let file = folder.appendingPathComponent("snapshot.concord").path
        let replicaPath = folder.appendingPathComponent("imported.sqlite").path
        try await PublisherServer.withRunningServer(store: source, configuration: .testing, logger: Harness.logger) {
            url in
            let export = try ConcordProcess(["export", "--source", url, "--out", file, "--quiet"])
            #expect(try await export.exitStatus() == 0)
            let exportedAt = source.head
            let importer = try ConcordProcess(["import", file, "--db", replicaPath, "--quiet"])
            #expect(try await importer.exitStatus() == 0)
            let replica = try ReplicaStore(path: replicaPath)
            let state = try #require(try replica.state())
            #expect(state.position == exportedAt && state.progress.phase == .following)
            #expect(try await Harness.differences(source: source, replica: replica).isEmpty)

            // The source moves on; follow continues from the export's LSN, it does not copy again.
            var workload = RandomWorkload(keySpace: 3000)
            for _ in 0..<100 { try await source.write(workload.transaction()) }
            try await VerificationTests.withSubscriber(url: url, replica: replica) {
                try await VerificationTests.waitVerified(replica, source: source)
            }
            let after = try #require(try replica.state())
            #expect(after.appliedChanges == Int(source.head - exportedAt), "only the changes after the export")
            #expect(after.repairedRecords == 0)
            #expect(try await Harness.differences(source: source, replica: replica).isEmpty)
        }
    }

    /// A snapshot file of `records` synthetic records, written straight with the file writer.
    static func syntheticSnapshot(at path: String, records: Int) throws {
        let values = (0..<records).map { "{\"n\":\($0),\"pad\":\"\(String(repeating: "p", count: 150))\"}" }
        var digest = CollectionDigest.empty
        for (index, value) in values.enumerated() {
            digest.add(Element(collection: "items", key: "k\(index)", version: LSN(index + 1), value: value))
        }
        let header = SnapshotHeader(
            feedID: "feed-test", source: "http://127.0.0.1:9", lsn: LSN(records), filter: nil,
            collections: [.init(name: "items", digest: digest)])
        var writer = try SnapshotFile.Writer(path: path, header: header)
        for (index, value) in values.enumerated() {
            try writer.append(Record(key: "k\(index)", version: LSN(index + 1), value: value), collection: "items")
        }
        try writer.finish()
    }

    @Test func everySingleByteCorruptionAt200RandomOffsetsIsRefusedAndCreatesNothing() throws {
        let folder = Harness.folder()
        let file = folder.appendingPathComponent("good.concord").path
        try Self.syntheticSnapshot(at: file, records: 2000)
        let good = try Array(Data(contentsOf: URL(fileURLWithPath: file)))
        // The intact file imports.
        let intact = folder.appendingPathComponent("intact.sqlite").path
        try ReplicaStore.importSnapshot(from: file, to: intact)
        #expect(try ReplicaStore(path: intact).records(of: "items").count == 2000)

        var generator = SeededGenerator(seed: 42)
        let corrupt = folder.appendingPathComponent("corrupt.concord").path
        let target = folder.appendingPathComponent("target.sqlite").path
        for round in 0..<200 {
            var bytes = good
            let offset = Int.random(in: 0..<bytes.count, using: &generator)
            bytes[offset] ^= UInt8.random(in: 1...255, using: &generator)
            try Data(bytes).write(to: URL(fileURLWithPath: corrupt))
            #expect(throws: ConcordError.self, "round \(round): a flip at byte \(offset) of \(bytes.count)") {
                try ReplicaStore.importSnapshot(from: corrupt, to: target)
            }
            #expect(!FileManager.default.fileExists(atPath: target))
        }
        // Truncated and foreign files too.
        for cut in [0, 10, 30, good.count / 2, good.count - 1] {
            try Data(good.prefix(cut)).write(to: URL(fileURLWithPath: corrupt))
            #expect(throws: ConcordError.self) { try ReplicaStore.importSnapshot(from: corrupt, to: target) }
        }
        try Data("SQLite format 3\0 not an export".utf8).write(to: URL(fileURLWithPath: corrupt))
        #expect(throws: ConcordError.self) { try ReplicaStore.importSnapshot(from: corrupt, to: target) }
        #expect(!FileManager.default.fileExists(atPath: target))
    }

    @Test func anImportKilledHalfwayLeavesTheTargetAsItWas() async throws {
        let folder = Harness.folder()
        let file = folder.appendingPathComponent("big.concord").path
        try Self.syntheticSnapshot(at: file, records: 300_000)
        let target = folder.appendingPathComponent("target.sqlite").path
        let importer = try ConcordProcess(["import", file, "--db", target, "--quiet"])
        // Killed once the replica under construction is well on its way.
        try await Harness.waitUntil("the import is under way", timeout: .seconds(60)) {
            let size =
                (try? FileManager.default.attributesOfItem(atPath: target + ".importing-wal")[.size] as? Int) ?? 0
            return size > 4 << 20 || !importer.isRunning
        }
        #expect(importer.isRunning, "the import was still running when killed")
        importer.kill9()
        #expect(!FileManager.default.fileExists(atPath: target))
        // A second import cleans up what the first left and completes.
        let again = try ConcordProcess(["import", file, "--db", target, "--quiet"])
        #expect(try await again.exitStatus() == 0)
        #expect(try ReplicaStore(path: target).records(of: "items").count == 300_000)
        #expect(!FileManager.default.fileExists(atPath: target + ".importing"))
    }
}
