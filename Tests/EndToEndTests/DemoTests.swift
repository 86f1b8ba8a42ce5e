import Foundation
import Testing

/// `concord demo`, the README's first command, at a small size: it must end with every replica
/// verified equal at the source's head, every fault recovered, and recoveries that cost what differs.
@Suite struct DemoTests {
    @Test func endsVerifiedWithEveryFaultRecovered() async throws {
        let output = Pipe()
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Harness.binary)
        process.arguments = ["demo", "--duration", "5", "--rate", "100", "--records", "4000", "--json"]
        process.standardOutput = output
        process.standardError = FileHandle.nullDevice
        let data = try await Harness.runToEnd(process, reading: output)
        #expect(process.terminationStatus == 0)
        let report = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        #expect(report["verified"] as? Bool == true)
        let head = try #require(report["lsn"] as? Int)
        #expect(head > 4000)
        let replicas = try #require(report["replicas"] as? [[String: Any]])
        #expect(replicas.count == 4)
        for replica in replicas {
            #expect(replica["equal"] as? Bool == true)
            #expect(replica["verifiedLSN"] as? Int == head)
            #expect(replica["differences"] as? Int == 0)
        }
        // The edited replica and the one past retention were repaired by reconciliation, not re-copied.
        for name in ["search", "analytics"] {
            #expect((replicas.first { $0["name"] as? String == name }?["repairs"] as? Int ?? 0) > 0)
        }
        let faults = try #require(report["faults"] as? [[String: Any]])
        let byName = Dictionary(faults.map { ($0["fault"] as? String ?? "", $0) }, uniquingKeysWith: { a, _ in a })
        #expect(
            Set(byName.keys) == [
                "killed and restarted", "rows edited behind its back", "new subscriber joins",
                "stopped past log retention", "replica file deleted",
            ])
        for fault in faults { #expect(fault["recovered"] as? Bool == true) }
        func share(_ name: String) -> Double {
            let fault = byName[name] ?? [:]
            let bytes = Double(fault["bytes"] as? Int ?? 0)
            let reload = Double(fault["fullReloadBytes"] as? Int ?? 0)
            return reload > 0 ? bytes / reload : 1
        }
        // Six rows edited and a short stop cost a small share of a full reload; a lost file costs one.
        #expect(share("rows edited behind its back") < 0.05)
        #expect(share("stopped past log retention") < 0.5)
        #expect(share("replica file deleted") > 0.8)
        let lost = try #require(report["lostMessages"] as? [String: Any])
        #expect((lost["holes"] as? Int ?? 0) > 0)
    }
}
