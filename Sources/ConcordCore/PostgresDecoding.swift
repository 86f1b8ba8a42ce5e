/// Changes captured from PostgreSQL by logical decoding with wal2json (format-version 2), and
/// how a row becomes a Concord record: no I/O here, so every rule is tested on its own.
public enum PostgresDecoding {
    /// A PostgreSQL LSN, `X/Y` in hex, as one ordered number.
    public static func lsn(_ text: String) -> UInt64? {
        let parts = text.split(separator: "/")
        guard parts.count == 2, let high = UInt64(parts[0], radix: 16), let low = UInt64(parts[1], radix: 16),
            high <= UInt32.max, low <= UInt32.max
        else { return nil }
        return high << 32 | low
    }

    public static func lsnText(_ lsn: UInt64) -> String {
        String(lsn >> 32, radix: 16, uppercase: true) + "/" + String(lsn & 0xFFFF_FFFF, radix: 16, uppercase: true)
    }

    /// A column and its value as JSON text.
    public struct Column: Sendable, Hashable {
        public var name: String
        public var json: String

        public init(name: String, json: String) {
            self.name = name
            self.json = json
        }
    }

    /// One row of wal2json's output.
    public enum Record: Sendable, Hashable {
        /// The start of a transaction; `commit` is its commit's `nextlsn`, when wal2json gives it.
        case begin(commit: UInt64?)
        /// The end of a transaction; `lsn` is the end of its commit record (`nextlsn`), which
        /// orders transactions.
        case commit(lsn: UInt64)
        case insert(schema: String, table: String, columns: [Column])
        /// `columns` lacks the values stored out of line that the update did not change;
        /// `identity` holds the old key.
        case update(schema: String, table: String, columns: [Column], identity: [Column])
        case delete(schema: String, table: String, identity: [Column])
        case truncate(schema: String, table: String)
        /// Anything else (a logical message): nothing to do.
        case other
    }

    /// Parses one row of `pg_logical_slot_peek_changes` with wal2json's format-version 2.
    public static func record(_ data: String) throws(ConcordError) -> Record {
        let scanner = JSONScanner(data, maxDepth: 8)
        let document = try scanner.document()
        var action = ""
        var schema = ""
        var table = ""
        var nextLSN: String?
        var columns: [Column]?
        var identity: [Column] = []
        try scanner.forEachMember(of: document) { (name, value) throws(ConcordError) in
            switch name {
            case "action": action = try scanner.decodeString(value)
            case "schema": schema = try scanner.decodeString(value)
            case "table": table = try scanner.decodeString(value)
            case "nextlsn": nextLSN = try scanner.decodeString(value)
            case "columns": columns = try Self.columns(value, in: scanner)
            case "identity": identity = try Self.columns(value, in: scanner)
            default: break
            }
        }
        switch action {
        case "B": return .begin(commit: nextLSN.flatMap(lsn))
        case "C":
            guard let text = nextLSN, let lsn = lsn(text) else {
                throw ConcordError(.protocolViolation, "wal2json commit without nextlsn: \(data.prefix(200))")
            }
            return .commit(lsn: lsn)
        case "I":
            guard let columns else { throw ConcordError(.protocolViolation, "wal2json insert without columns") }
            return .insert(schema: schema, table: table, columns: columns)
        case "U":
            guard let columns else { throw ConcordError(.protocolViolation, "wal2json update without columns") }
            return .update(schema: schema, table: table, columns: columns, identity: identity)
        case "D": return .delete(schema: schema, table: table, identity: identity)
        case "T": return .truncate(schema: schema, table: table)
        default: return .other
        }
    }

    static func columns(_ array: JSONScanner.Value, in scanner: JSONScanner) throws(ConcordError) -> [Column] {
        guard array.kind == .array else { throw ConcordError(.protocolViolation, "wal2json columns must be an array") }
        var columns: [Column] = []
        try scanner.forEachElement(of: array) { (element) throws(ConcordError) in
            var name: String?
            var json = "null"
            try scanner.forEachMember(of: element) { (member, value) throws(ConcordError) in
                switch member {
                case "name": name = try scanner.decodeString(value)
                case "value": json = String(decoding: scanner.bytes[value.range], as: UTF8.self)
                default: break
                }
            }
            guard let name else { throw ConcordError(.protocolViolation, "wal2json column without a name") }
            columns.append(Column(name: name, json: json))
        }
        return columns
    }

    // MARK: Rows as records

    /// Type OIDs whose values wal2json writes as bare JSON numbers.
    public static let numberTypes: Set<UInt32> = [20, 21, 23, 26, 700, 701, 1700]
    public static let boolType: UInt32 = 16
    public static let byteaType: UInt32 = 17

    /// The JSON a column value gets, exactly as wal2json writes it, for rows read with SQL
    /// during the initial load: `text` is the value's text output (bytea as hex without `\x`).
    ///
    /// Numbers are bare (NaN and the infinities null), booleans bare, everything else a string.
    public static func json(text: String?, typeOID: UInt32) -> String {
        guard let text else { return "null" }
        if numberTypes.contains(typeOID) {
            return ["NaN", "Infinity", "-Infinity"].contains(text) ? "null" : text
        }
        if typeOID == boolType { return text == "t" || text == "true" ? "true" : "false" }
        var writer = JSONWriter(capacity: text.utf8.count + 2)
        writer.string(text)
        return String(decoding: writer.bytes, as: UTF8.self)
    }

    /// The record's value: a JSON object of the columns, in their order.
    public static func value(_ columns: [Column]) -> String {
        var writer = JSONWriter(capacity: columns.reduce(2) { $0 + $1.name.utf8.count + $1.json.utf8.count + 4 })
        writer.raw("{")
        for (index, column) in columns.enumerated() {
            if index > 0 { writer.raw(",") }
            writer.string(column.name)
            writer.raw(":")
            writer.raw(column.json)
        }
        writer.raw("}")
        return String(decoding: writer.bytes, as: UTF8.self)
    }

    /// The record's key from its primary key's columns, named in key order.
    ///
    /// One column: its value as text (a string's content, a number's digits). Several: a JSON
    /// array of those texts, so `("a,b", 1)` and `("a", "b,1")` stay apart. A table's key has
    /// a fixed number of columns, so the two forms never meet in one collection.
    public static func key(_ columns: [Column], keyColumns: [String]) throws(ConcordError) -> String {
        var texts: [String] = []
        for name in keyColumns {
            guard let column = columns.first(where: { $0.name == name }) else {
                throw ConcordError(.protocolViolation, "the row lacks key column \(name)")
            }
            let scanner = JSONScanner(column.json, maxDepth: 2)
            let value = try scanner.document()
            switch value.kind {
            case .string: texts.append(try scanner.decodeString(value))
            case .number, .bool: texts.append(column.json)
            default: throw ConcordError(.protocolViolation, "key column \(name) is \(column.json)")
            }
        }
        if texts.count == 1 { return texts[0] }
        var writer = JSONWriter()
        writer.raw("[")
        for (index, text) in texts.enumerated() {
            if index > 0 { writer.raw(",") }
            writer.string(text)
        }
        writer.raw("]")
        return String(decoding: writer.bytes, as: UTF8.self)
    }

    /// An update's full row: its columns, with the ones it left out (values stored out of line
    /// that did not change) taken from the record's previous value, in the previous order.
    public static func merged(_ columns: [Column], previous: String?) throws(ConcordError) -> [Column] {
        guard let previous else { return columns }
        let scanner = JSONScanner(previous)
        let object = try scanner.document()
        var old: [Column] = []
        try scanner.forEachMember(of: object) { (name, value) throws(ConcordError) in
            old.append(Column(name: name, json: String(decoding: scanner.bytes[value.range], as: UTF8.self)))
        }
        let given = Set(columns.map(\.name))
        if old.allSatisfy({ given.contains($0.name) }) { return columns }
        let byName = Dictionary(columns.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        var result = old.map { byName[$0.name] ?? $0 }
        let kept = Set(old.map(\.name))
        result += columns.filter { !kept.contains($0.name) }
        return result
    }
}

/// Rows in the text format of PostgreSQL's `COPY ... FROM STDIN`: columns separated by a
/// tab, rows ended by a newline, and a backslash, tab, newline or carriage return inside a
/// value written as its backslash escape.
public enum PostgresCopyText {
    /// Appends the row of a replica table: key, version, value.
    public static func appendRow(key: String, version: Int64, value: String, to bytes: inout [UInt8]) {
        appendField(key, to: &bytes)
        bytes.append(0x09)
        appendDecimal(version, to: &bytes)
        bytes.append(0x09)
        appendField(value, to: &bytes)
        bytes.append(0x0A)
    }

    /// Appends `number` in decimal, without making a string of it.
    static func appendDecimal(_ number: Int64, to bytes: inout [UInt8]) {
        if number < 0 { bytes.append(0x2D) }
        var magnitude = number.magnitude
        var divisor: UInt64 = 1
        while magnitude / divisor >= 10 { divisor *= 10 }
        while divisor > 0 {
            bytes.append(0x30 + UInt8(truncatingIfNeeded: magnitude / divisor))
            magnitude %= divisor
            divisor /= 10
        }
    }

    /// Appends one field, escaped.
    ///
    /// Looks at eight bytes at a time for one that may need an escape: values are mostly plain
    /// text, and this loop is much of what a bootstrap into PostgreSQL costs the subscriber.
    public static func appendField(_ text: String, to bytes: inout [UInt8]) {
        var text = text
        text.withUTF8 { utf8 in
            guard let base = utf8.baseAddress else { return }
            let count = utf8.count
            var runStart = 0
            var position = 0
            while true {
                while position + 8 <= count,
                    !mayNeedEscape(UnsafeRawPointer(base + position).loadUnaligned(as: UInt64.self))
                {
                    position += 8
                }
                guard position < count else { break }
                let escape: UInt8
                switch base[position] {
                case 0x5C: escape = 0x5C  // \\
                case 0x09: escape = 0x74  // \t
                case 0x0A: escape = 0x6E  // \n
                case 0x0D: escape = 0x72  // \r
                default:
                    position += 1
                    continue
                }
                bytes.append(contentsOf: UnsafeBufferPointer(start: base + runStart, count: position - runStart))
                bytes.append(0x5C)
                bytes.append(escape)
                position += 1
                runStart = position
            }
            bytes.append(contentsOf: UnsafeBufferPointer(start: base + runStart, count: count - runStart))
        }
    }

    /// Whether a byte of `word` is a backslash or below 0x0E, which takes in tab, newline and
    /// carriage return (a flag may be spurious, never missing).
    @inline(__always)
    static func mayNeedEscape(_ word: UInt64) -> Bool {
        let ones: UInt64 = 0x0101_0101_0101_0101
        let highs: UInt64 = 0x8080_8080_8080_8080
        let backslash = word ^ (ones &* 0x5C)
        let hasBackslash = (backslash &- ones) & ~backslash & highs
        let hasLow = (word &- ones &* 0x0E) & ~word & highs
        return hasBackslash | hasLow != 0
    }
}
