/// The binary forms of a reconciliation's two exchanges: coded symbols, and the records a
/// key-hash lookup answers with. Both are counted against the bytes of the differing records
/// themselves, so their framing is kept to a few bytes.

/// Coded symbols on the wire: per symbol the 16-byte sum (key hash, content hash), the 8-byte
/// checksum (all big-endian words) and the count as a zigzag varint — 25 bytes for the usual
/// count of -1, 0 or 1.
public enum SymbolCodec {
    public static let minimumSymbolSize = 25

    public static func encode(_ symbols: some Sequence<CodedSymbol>, into bytes: inout [UInt8]) {
        for symbol in symbols {
            BinaryWire.appendWord(symbol.sum.keyHash, to: &bytes)
            BinaryWire.appendWord(symbol.sum.contentHash, to: &bytes)
            BinaryWire.appendWord(symbol.checksum, to: &bytes)
            BinaryWire.appendVarint(UInt64(bitPattern: (symbol.count << 1) ^ (symbol.count >> 63)), to: &bytes)
        }
    }

    public static func decode(_ bytes: [UInt8]) throws(ConcordError) -> [CodedSymbol] {
        var symbols: [CodedSymbol] = []
        symbols.reserveCapacity(bytes.count / minimumSymbolSize)
        var offset = 0
        while offset < bytes.count {
            guard bytes.count - offset >= minimumSymbolSize else {
                throw ConcordError(.protocolViolation, "truncated coded symbol at byte \(offset)")
            }
            let sum = SketchItem(
                keyHash: BinaryWire.readWord(bytes, offset), contentHash: BinaryWire.readWord(bytes, offset + 8))
            let checksum = BinaryWire.readWord(bytes, offset + 16)
            offset += 24
            let zigzag = try BinaryWire.readVarint(bytes, &offset)
            let count = Int64(bitPattern: zigzag >> 1) ^ -Int64(bitPattern: zigzag & 1)
            symbols.append(CodedSymbol(sum: sum, checksum: checksum, count: count))
        }
        return symbols
    }
}

/// The answer to a key-hash lookup: the source's head LSN as an 8-byte big-endian word, then
/// per record the key's UTF-8 length (varint), the key, the version (varint), the value's
/// UTF-8 length (varint) and the value — about 5 bytes of framing per record, where JSON
/// lines spend about 30.
public enum RecordCodec {
    public static func encode(lsn: LSN, records: [Record]) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(8 + records.reduce(0) { $0 + $1.key.utf8.count + $1.value.utf8.count + 12 })
        BinaryWire.appendWord(lsn, to: &bytes)
        for record in records {
            BinaryWire.appendVarint(UInt64(record.key.utf8.count), to: &bytes)
            bytes.append(contentsOf: record.key.utf8)
            BinaryWire.appendVarint(record.version, to: &bytes)
            BinaryWire.appendVarint(UInt64(record.value.utf8.count), to: &bytes)
            bytes.append(contentsOf: record.value.utf8)
        }
        return bytes
    }

    public static func decode(_ bytes: [UInt8]) throws(ConcordError) -> (lsn: LSN, records: [Record]) {
        guard bytes.count >= 8 else { throw ConcordError(.protocolViolation, "lookup answer shorter than its header") }
        let lsn = BinaryWire.readWord(bytes, 0)
        var offset = 8
        var records: [Record] = []
        while offset < bytes.count {
            let key = try text(bytes, &offset, what: "key")
            let version = try BinaryWire.readVarint(bytes, &offset)
            let value = try text(bytes, &offset, what: "value")
            records.append(Record(key: key, version: version, value: value))
        }
        return (lsn, records)
    }

    public static func text(_ bytes: [UInt8], _ offset: inout Int, what: String) throws(ConcordError) -> String {
        let length = try BinaryWire.readVarint(bytes, &offset)
        guard length <= UInt64(bytes.count - offset) else {
            throw ConcordError(.protocolViolation, "truncated \(what) at byte \(offset)")
        }
        let end = offset + Int(length)
        guard let text = String(validating: bytes[offset..<end], as: UTF8.self) else {
            throw ConcordError(.protocolViolation, "\(what) at byte \(offset) is not UTF-8")
        }
        offset = end
        return text
    }
}

/// Big-endian words and LEB128 varints.
public enum BinaryWire {
    public static func appendWord(_ word: UInt64, to bytes: inout [UInt8]) {
        var big = word.bigEndian
        withUnsafeBytes(of: &big) { bytes.append(contentsOf: $0) }
    }

    public static func appendVarint(_ value: UInt64, to bytes: inout [UInt8]) {
        var value = value
        while value >= 0x80 {
            bytes.append(UInt8(truncatingIfNeeded: value) | 0x80)
            value >>= 7
        }
        bytes.append(UInt8(value))
    }

    /// The word at `offset`; the caller checked that 8 bytes are there.
    public static func readWord(_ bytes: [UInt8], _ offset: Int) -> UInt64 {
        var value: UInt64 = 0
        for index in offset..<(offset + 8) { value = value << 8 | UInt64(bytes[index]) }
        return value
    }

    public static func readVarint(_ bytes: [UInt8], _ offset: inout Int) throws(ConcordError) -> UInt64 {
        var value: UInt64 = 0
        var shift: UInt64 = 0
        while true {
            guard offset < bytes.count, shift < 64 else {
                throw ConcordError(.protocolViolation, "bad varint at byte \(offset)")
            }
            let byte = bytes[offset]
            offset += 1
            value |= UInt64(byte & 0x7F) << shift
            if byte < 0x80 { return value }
            shift += 7
        }
    }
}
