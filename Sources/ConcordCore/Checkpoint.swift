/// The source's digest of every collection at one LSN, sent in the change stream so a
/// replica that has applied through that LSN can prove it holds the same state.
public struct Checkpoint: Sendable, Hashable {
    /// A commit LSN: the digests describe the state after that source transaction.
    public var lsn: LSN
    public var digests: [String: CollectionDigest]

    public init(lsn: LSN, digests: [String: CollectionDigest]) {
        self.lsn = lsn
        self.digests = digests
    }

    /// The same checkpoint restricted to `collections` (`nil`: all).
    public func restricted(to collections: Set<String>?) -> Checkpoint {
        guard let collections else { return self }
        return Checkpoint(lsn: lsn, digests: digests.filter { collections.contains($0.key) })
    }
}

/// When a publisher records a checkpoint: every `everyChanges` LSNs, and at least every
/// `interval` while the head moves.
public struct CheckpointPolicy: Sendable, Hashable {
    public var everyChanges: UInt64 = 1_000
    public var interval: Duration = .seconds(1)
    public init() {}

    /// Whether a batch that moved the head from `head` to `last` crosses a multiple of `everyChanges`.
    public func crossesBoundary(from head: LSN, to last: LSN) -> Bool {
        everyChanges > 0 && last / everyChanges > head / everyChanges
    }
}

/// The binary form of coded symbols on the wire: per symbol the 32-byte sum, the 8-byte
/// checksum (both big-endian words) and the count as a zigzag varint — 41 bytes for the
/// usual count of -1, 0 or 1, against about 110 as JSON.
public enum SymbolCodec {
    public static func encode(_ symbols: some Sequence<CodedSymbol>, into bytes: inout [UInt8]) {
        for symbol in symbols {
            appendWord(symbol.sum.words.0, to: &bytes)
            appendWord(symbol.sum.words.1, to: &bytes)
            appendWord(symbol.sum.words.2, to: &bytes)
            appendWord(symbol.sum.words.3, to: &bytes)
            appendWord(symbol.checksum, to: &bytes)
            var zigzag = UInt64(bitPattern: (symbol.count << 1) ^ (symbol.count >> 63))
            while zigzag >= 0x80 {
                bytes.append(UInt8(truncatingIfNeeded: zigzag) | 0x80)
                zigzag >>= 7
            }
            bytes.append(UInt8(zigzag))
        }
    }

    public static func decode(_ bytes: [UInt8]) throws(ConcordError) -> [CodedSymbol] {
        var symbols: [CodedSymbol] = []
        var offset = 0
        while offset < bytes.count {
            guard bytes.count - offset >= 41 else {
                throw ConcordError(.protocolViolation, "truncated coded symbol at byte \(offset)")
            }
            let sum = Element(
                words: (
                    readWord(bytes, offset), readWord(bytes, offset + 8), readWord(bytes, offset + 16),
                    readWord(bytes, offset + 24)
                ))
            let checksum = readWord(bytes, offset + 32)
            offset += 40
            var zigzag: UInt64 = 0
            var shift: UInt64 = 0
            while true {
                guard offset < bytes.count, shift < 64 else {
                    throw ConcordError(.protocolViolation, "bad symbol count at byte \(offset)")
                }
                let byte = bytes[offset]
                offset += 1
                zigzag |= UInt64(byte & 0x7F) << shift
                if byte < 0x80 { break }
                shift += 7
            }
            let count = Int64(bitPattern: zigzag >> 1) ^ -Int64(bitPattern: zigzag & 1)
            symbols.append(CodedSymbol(sum: sum, checksum: checksum, count: count))
        }
        return symbols
    }

    public static func appendWord(_ word: UInt64, to bytes: inout [UInt8]) {
        var big = word.bigEndian
        withUnsafeBytes(of: &big) { bytes.append(contentsOf: $0) }
    }

    static func readWord(_ bytes: [UInt8], _ offset: Int) -> UInt64 {
        var value: UInt64 = 0
        for index in offset..<(offset + 8) { value = value << 8 | UInt64(bytes[index]) }
        return value
    }
}

/// How long a publisher keeps its log. A reader whose position falls out of it gets
/// `410 Gone` and recovers by reconciliation. Each limit is off when `nil`.
public struct RetentionPolicy: Sendable, Hashable {
    /// Keep at most this many changes.
    public var maxChanges: UInt64?
    /// Drop changes committed longer ago than this.
    public var maxAge: Duration? = .seconds(7 * 24 * 3600)
    /// Keep at most about this many bytes of logged values.
    public var maxBytes: Int64?
    public init() {}
}
