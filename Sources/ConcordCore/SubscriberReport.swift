/// What a subscriber tells its publisher about itself (`POST /v1/subscribers/report`), so the
/// publisher's dashboard and metrics show every replica's position, proof and repairs.
///
/// Reports are advisory: the publisher never trusts them for data, only for display.
public struct SubscriberReport: Sendable, Hashable {
    /// The subscriber's name, unique among the publisher's subscribers (`follow --name`).
    public var name: String
    /// What it is doing: `bootstrapping`, `following`, `repairing`, ...
    public var activity: String
    /// The last LSN applied.
    public var position: LSN
    /// The last LSN at which the replica equalled the source's checkpoint (0: never).
    public var verifiedLSN: LSN
    /// Reconciliations that changed something, and the records they wrote or deleted.
    public var repairs: Int
    public var repairedRecords: Int
    /// Checkpoints or scrubs that found a difference.
    public var mismatches: Int

    public init(
        name: String, activity: String, position: LSN, verifiedLSN: LSN = 0, repairs: Int = 0,
        repairedRecords: Int = 0, mismatches: Int = 0
    ) {
        self.name = name
        self.activity = activity
        self.position = position
        self.verifiedLSN = verifiedLSN
        self.repairs = repairs
        self.repairedRecords = repairedRecords
        self.mismatches = mismatches
    }

    /// Longest name accepted; names are shown on the dashboard and used as metric labels.
    public static let maxNameBytes = 128

    /// Whether `byte` may stand in a name: printable ASCII but space, `"`, `\`, `<` and `>`, so
    /// names are safe as metric labels and in HTML.
    public static func isNameByte(_ byte: UInt8) -> Bool {
        byte > 0x20 && byte < 0x7F && byte != 0x22 && byte != 0x5C && byte != 0x3C && byte != 0x3E
    }

    public static func validate(name: String) throws(ConcordError) {
        guard !name.isEmpty, name.utf8.count <= maxNameBytes, name.utf8.allSatisfy(isNameByte) else {
            throw ConcordError(
                .invalidRequest,
                "a subscriber name is 1 to \(maxNameBytes) printable ASCII characters without spaces, quotes, \\, < or >"
            )
        }
    }

    public func encoded() -> [UInt8] {
        var writer = JSONWriter(capacity: 200)
        writer.raw("{\"name\":")
        writer.string(name)
        writer.raw(",\"activity\":")
        writer.string(activity)
        writer.raw(",\"position\":")
        writer.number(position)
        writer.raw(",\"verified\":")
        writer.number(verifiedLSN)
        writer.raw(",\"repairs\":")
        writer.number(repairs)
        writer.raw(",\"repairedRecords\":")
        writer.number(repairedRecords)
        writer.raw(",\"mismatches\":")
        writer.number(mismatches)
        writer.raw("}\n")
        return writer.bytes
    }

    public static func decode(_ bytes: [UInt8]) throws(ConcordError) -> SubscriberReport {
        let scanner = JSONScanner(bytes, maxDepth: 4)
        var report = SubscriberReport(name: "", activity: "", position: 0)
        func count(_ value: JSONScanner.Value) throws(ConcordError) -> Int {
            let number = try scanner.decodeUInt64(value)
            guard number <= UInt64(Int.max) else { throw ConcordError(.invalidRequest, "a count is too large") }
            return Int(number)
        }
        try scanner.forEachMember(of: try scanner.document()) { (field, value) throws(ConcordError) in
            switch field {
            case "name": report.name = try scanner.decodeString(value)
            case "activity": report.activity = try scanner.decodeString(value)
            case "position": report.position = try scanner.decodeUInt64(value)
            case "verified": report.verifiedLSN = try scanner.decodeUInt64(value)
            case "repairs": report.repairs = try count(value)
            case "repairedRecords": report.repairedRecords = try count(value)
            case "mismatches": report.mismatches = try count(value)
            default: break
            }
        }
        try validate(name: report.name)
        guard !report.activity.isEmpty, report.activity.utf8.count <= 32,
            report.activity.utf8.allSatisfy({ $0 >= 0x61 && $0 <= 0x7A })
        else {
            throw ConcordError(.invalidRequest, "\"activity\" must be a lowercase word")
        }
        guard report.verifiedLSN <= report.position else {
            throw ConcordError(.invalidRequest, "\"verified\" cannot be beyond \"position\"")
        }
        return report
    }
}
