import CConcordHash

/// The 32-byte identity of one live record's exact content: `keyHash64 ‖ contentHash192`.
///
/// `keyHash64` is the first 8 bytes of SHA-256(collection ‖ key) and `contentHash192` the
/// first 24 bytes of SHA-256(collection ‖ key ‖ version ‖ value), where strings are
/// prefixed with their UTF-8 length as a 4-byte big-endian integer and the version is an
/// 8-byte big-endian integer. Two copies of a record have the same element exactly when
/// collection, key, version and value text are byte-for-byte equal. A deleted record has
/// no element.
public struct Element: Sendable, Hashable, Comparable, CustomStringConvertible {
    /// The 32 bytes as four big-endian words: `words.0` is `keyHash64`.
    public var words: (UInt64, UInt64, UInt64, UInt64)

    public static let zero = Element(words: (0, 0, 0, 0))

    public init(words: (UInt64, UInt64, UInt64, UInt64)) {
        self.words = words
    }

    public init(collection: String, key: String, version: LSN, value: String) {
        self.init(collection: collection, key: key, version: version, value: value, keyHash: nil)
    }

    /// `keyHash`, when given, must be `keyHash64` of `collection` and `key`: it saves one SHA-256.
    package init(collection: String, key: String, version: LSN, value: String, keyHash: UInt64?) {
        var collection = collection
        var key = key
        var value = value
        let size = 20 + collection.utf8.count + key.utf8.count + value.utf8.count
        // Hashed from one stack buffer: allocation, not SHA-256, dominated the cost.
        let words = withUnsafeTemporaryAllocation(byteCount: size, alignment: 8) { buffer in
            var offset = 0
            Self.putLengthPrefixed(&collection, into: buffer, at: &offset)
            Self.putLengthPrefixed(&key, into: buffer, at: &offset)
            let knownKeyHash = keyHash ?? Self.sha256(UnsafeRawBufferPointer(rebasing: buffer[0..<offset])).0
            buffer.storeBytes(of: version.bigEndian, toByteOffset: offset, as: UInt64.self)
            offset += 8
            Self.putLengthPrefixed(&value, into: buffer, at: &offset)
            let contentDigest = Self.sha256(UnsafeRawBufferPointer(rebasing: buffer[0..<offset]))
            return (knownKeyHash, contentDigest.0, contentDigest.1, contentDigest.2)
        }
        self.words = words
    }

    /// The element of the record a change writes; `nil` for a delete.
    public init?(_ change: Change) {
        self.init(change, replacing: nil)
    }

    /// The element of the record a change writes, taking `keyHash64` from the element it
    /// replaces: `before` names the same collection and key, so its first word is the same,
    /// and a reader that hashes every change it applies saves one SHA-256 of two.
    public init?(_ change: Change, replacing before: Element?) {
        guard let value = change.value else { return nil }
        self.init(
            collection: change.collection, key: change.key, version: change.lsn, value: value,
            keyHash: before?.keyHash)
    }

    public var keyHash: UInt64 { words.0 }

    /// `keyHash64` alone: the first 8 bytes of SHA-256(collection ‖ key), length-prefixed as in the element.
    public static func keyHash(collection: String, key: String) -> UInt64 {
        var collection = collection
        var key = key
        let size = 8 + collection.utf8.count + key.utf8.count
        return withUnsafeTemporaryAllocation(byteCount: size, alignment: 8) { buffer in
            var offset = 0
            putLengthPrefixed(&collection, into: buffer, at: &offset)
            putLengthPrefixed(&key, into: buffer, at: &offset)
            return sha256(UnsafeRawBufferPointer(buffer)).0
        }
    }

    /// SHA-256 of `bytes` as four big-endian words.
    @inline(__always)
    public static func sha256(_ bytes: UnsafeRawBufferPointer) -> (UInt64, UInt64, UInt64, UInt64) {
        var digest: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
        withUnsafeMutableBytes(of: &digest) { out in
            concord_sha256(bytes.baseAddress, bytes.count, out.baseAddress!.assumingMemoryBound(to: UInt8.self))
        }
        return (
            UInt64(bigEndian: digest.0), UInt64(bigEndian: digest.1), UInt64(bigEndian: digest.2),
            UInt64(bigEndian: digest.3)
        )
    }

    /// Writes `lp(text)` (big-endian 32-bit UTF-8 length, then the bytes) at `offset`, moving it on.
    @inline(__always)
    static func putLengthPrefixed(
        _ text: inout String, into buffer: UnsafeMutableRawBufferPointer, at offset: inout Int
    ) {
        text.withUTF8 { bytes in
            buffer.storeBytes(of: UInt32(bytes.count).bigEndian, toByteOffset: offset, as: UInt32.self)
            offset += 4
            if let base = bytes.baseAddress {
                (buffer.baseAddress! + offset).copyMemory(from: base, byteCount: bytes.count)
            }
            offset += bytes.count
        }
    }

    public var isZero: Bool { self == .zero }

    public static func == (lhs: Element, rhs: Element) -> Bool {
        lhs.words.0 == rhs.words.0 && lhs.words.1 == rhs.words.1 && lhs.words.2 == rhs.words.2
            && lhs.words.3 == rhs.words.3
    }

    public static func < (lhs: Element, rhs: Element) -> Bool {
        (lhs.words.0, lhs.words.1, lhs.words.2, lhs.words.3) < (rhs.words.0, rhs.words.1, rhs.words.2, rhs.words.3)
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(words.0)
        hasher.combine(words.1)
        hasher.combine(words.2)
        hasher.combine(words.3)
    }

    /// 64 lowercase hex digits.
    public var description: String { Self.hex(words) }

    /// Parses 64 hex digits.
    public init?(hex: String) {
        guard let words = Self.parseHex(hex) else { return nil }
        self.words = words
    }

    @inline(__always)
    static func xor(_ a: Element, _ b: Element) -> Element {
        Element(words: (a.words.0 ^ b.words.0, a.words.1 ^ b.words.1, a.words.2 ^ b.words.2, a.words.3 ^ b.words.3))
    }

    // MARK: Encoding

    static func hex(_ words: (UInt64, UInt64, UInt64, UInt64)) -> String {
        String(unsafeUninitializedCapacity: 64) { buffer in
            writeHex(words, into: UnsafeMutableRawBufferPointer(buffer))
            return 64
        }
    }

    /// Appends the 64 hex digits of `words` to `bytes` without an intermediate string.
    public static func appendHex(_ words: (UInt64, UInt64, UInt64, UInt64), to bytes: inout [UInt8]) {
        withUnsafeTemporaryAllocation(byteCount: 64, alignment: 8) { buffer in
            writeHex(words, into: buffer)
            bytes.append(contentsOf: buffer)
        }
    }

    @inline(__always)
    static func writeHex(_ words: (UInt64, UInt64, UInt64, UInt64), into buffer: UnsafeMutableRawBufferPointer) {
        let digits: StaticString = "0123456789abcdef"
        func put(_ word: UInt64, at start: Int) {
            for index in 0..<16 {
                buffer[start + index] = digits.utf8Start[Int((word >> UInt64(60 - 4 * index)) & 0xF)]
            }
        }
        put(words.0, at: 0)
        put(words.1, at: 16)
        put(words.2, at: 32)
        put(words.3, at: 48)
    }

    static func parseHex(_ text: String) -> (UInt64, UInt64, UInt64, UInt64)? {
        var text = text
        return text.withUTF8 { parseHex(UnsafeRawBufferPointer($0)) }
    }

    /// Parses exactly 64 lowercase hex digits.
    ///
    /// Eight digits at a time with word arithmetic: a digit-or-letter branch per byte
    /// mispredicts on random hashes, and this runs once per change a replica applies.
    public static func parseHex(_ bytes: UnsafeRawBufferPointer) -> (UInt64, UInt64, UInt64, UInt64)? {
        guard bytes.count == 64 else { return nil }
        var invalid: UInt64 = 0
        func half(_ offset: Int) -> UInt64 {
            // Eight ASCII bytes, the first digit in the lowest byte; no sum below crosses a byte.
            let chunk = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
            let ones: UInt64 = 0x0101_0101_0101_0101
            // '0'...'9' are 0x30...0x39 and 'a'...'f' 0x61...0x66: bit 6 tells letters from digits.
            let letter = (chunk >> 6) & ones
            let low = chunk & (ones &* 0x0F)
            // Valid: the high nibble is 3 for a digit, 6 for a letter; a digit's low nibble is at
            // most 9 (so low + 6 < 16) and a letter's is 1...6 (so low + 9 < 16 and low + 15 ≥ 16).
            invalid |= (chunk & (ones &* 0xF0)) ^ ((ones &- letter) &* 0x30 | letter &* 0x60)
            invalid |= (low &+ ones &* 6 &+ letter &* 3) & (ones &* 0x10)
            invalid |= (letter << 4) & ~(low &+ ones &* 0x0F)
            // Nibble values, then packed with the first digit most significant.
            let nibbles = low &+ letter &* 9
            let pairs = (nibbles << 4 | nibbles >> 8) & 0x00FF_00FF_00FF_00FF
            let quads = (pairs << 8 | pairs >> 16) & 0x0000_FFFF_0000_FFFF
            return (quads << 16 | quads >> 32) & 0xFFFF_FFFF
        }
        let words = (
            half(0) << 32 | half(8), half(16) << 32 | half(24), half(32) << 32 | half(40), half(48) << 32 | half(56)
        )
        return invalid == 0 ? words : nil
    }
}

/// A collection's whole state in 40 bytes: `(count, Σ element mod 2^256)`.
///
/// Updating it for a change costs O(1): subtract the element the change replaces, add the
/// new one. Two copies with equal digests hold the same records, barring a collision of
/// the additive hash, which guards against accidents, not attackers.
public struct CollectionDigest: Sendable, Hashable, CustomStringConvertible {
    public var count: Int64
    /// The sum as four big-endian words (`sum.0` most significant).
    public var sum: (UInt64, UInt64, UInt64, UInt64)

    public static let empty = CollectionDigest(count: 0, sum: (0, 0, 0, 0))

    public init(count: Int64, sum: (UInt64, UInt64, UInt64, UInt64)) {
        self.count = count
        self.sum = sum
    }

    public mutating func add(_ element: Element) {
        count += 1
        var carry: UInt64 = 0
        (sum.3, carry) = Self.add(sum.3, element.words.3, carry)
        (sum.2, carry) = Self.add(sum.2, element.words.2, carry)
        (sum.1, carry) = Self.add(sum.1, element.words.1, carry)
        (sum.0, _) = Self.add(sum.0, element.words.0, carry)
    }

    public mutating func remove(_ element: Element) {
        count -= 1
        var borrow: UInt64 = 0
        (sum.3, borrow) = Self.subtract(sum.3, element.words.3, borrow)
        (sum.2, borrow) = Self.subtract(sum.2, element.words.2, borrow)
        (sum.1, borrow) = Self.subtract(sum.1, element.words.1, borrow)
        (sum.0, _) = Self.subtract(sum.0, element.words.0, borrow)
    }

    /// Applies a change given the element of the record it replaces (`nil`: there was none).
    public mutating func apply(_ change: Change, replacing before: Element?) {
        if let before { remove(before) }
        if let after = Element(change) { add(after) }
    }

    @inline(__always)
    static func add(_ a: UInt64, _ b: UInt64, _ carry: UInt64) -> (UInt64, UInt64) {
        let (partial, overflow1) = a.addingReportingOverflow(b)
        let (result, overflow2) = partial.addingReportingOverflow(carry)
        return (result, (overflow1 ? 1 : 0) + (overflow2 ? 1 : 0))
    }

    @inline(__always)
    static func subtract(_ a: UInt64, _ b: UInt64, _ borrow: UInt64) -> (UInt64, UInt64) {
        let (partial, overflow1) = a.subtractingReportingOverflow(b)
        let (result, overflow2) = partial.subtractingReportingOverflow(borrow)
        return (result, (overflow1 ? 1 : 0) + (overflow2 ? 1 : 0))
    }

    public static func == (lhs: CollectionDigest, rhs: CollectionDigest) -> Bool {
        lhs.count == rhs.count && lhs.sum.0 == rhs.sum.0 && lhs.sum.1 == rhs.sum.1 && lhs.sum.2 == rhs.sum.2
            && lhs.sum.3 == rhs.sum.3
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(count)
        hasher.combine(sum.0)
        hasher.combine(sum.1)
        hasher.combine(sum.2)
        hasher.combine(sum.3)
    }

    /// The sum as 64 hex digits.
    public var sumHex: String { Element.hex(sum) }

    public var description: String { "\(count):\(sumHex)" }

    public init?(count: Int64, sumHex: String) {
        guard let sum = Element.parseHex(sumHex) else { return nil }
        self.init(count: count, sum: sum)
    }

    /// Parses `description`: `<count>:<64 hex>`.
    public init?(description: String) {
        let parts = description.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2, let count = Int64(parts[0]), count >= 0 else { return nil }
        self.init(count: count, sumHex: String(parts[1]))
    }
}
