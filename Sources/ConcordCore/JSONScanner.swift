/// A strict, allocation-light JSON reader that keeps the raw text of values.
///
/// Concord stores and forwards record values as JSON text and never interprets
/// them, so it needs the exact bytes of a nested value rather than a decoded tree.
/// The scanner validates everything it walks (RFC 8259, UTF-8, a nesting limit).
public struct JSONScanner {
    public enum Kind: Sendable, Equatable {
        case object, array, string, number, bool, null
    }

    /// A value's kind and the byte range of its text.
    public struct Value: Sendable, Equatable {
        public var kind: Kind
        public var range: Range<Int>
    }

    public static let defaultMaxDepth = 64

    public let bytes: [UInt8]
    public let maxDepth: Int

    public init(_ bytes: [UInt8], maxDepth: Int = JSONScanner.defaultMaxDepth) {
        self.bytes = bytes
        self.maxDepth = maxDepth
    }

    public init(_ text: String, maxDepth: Int = JSONScanner.defaultMaxDepth) {
        self.init(Array(text.utf8), maxDepth: maxDepth)
    }

    /// Parses the whole input as one JSON value (surrounding white space allowed).
    public func document() throws(ConcordError) -> Value {
        try document(in: 0..<bytes.count)
    }

    /// Parses `range` of the input as one JSON value (surrounding white space allowed),
    /// e.g. one line of a newline-delimited body without copying it out.
    public func document(in range: Range<Int>) throws(ConcordError) -> Value {
        var index = range.lowerBound
        let value = try parseValue(at: &index, depth: 0)
        while index < range.upperBound, Self.isWhitespace(bytes[index]) { index += 1 }
        guard index == range.upperBound else { throw Self.error("unexpected text after the JSON value", at: index) }
        return value
    }

    /// Calls `body` with each member name and value of the object at `object`.
    public func forEachMember(
        of object: Value,
        _ body: (String, Value) throws(ConcordError) -> Void
    ) throws(ConcordError) {
        guard object.kind == .object else { throw ConcordError(.invalidRequest, "expected a JSON object") }
        var index = object.range.lowerBound + 1
        skipWhitespace(&index)
        if bytes[index] == UInt8(ascii: "}") { return }
        while true {
            skipWhitespace(&index)
            let nameValue = try parseString(at: &index)
            let name = try decodeString(nameValue)
            skipWhitespace(&index)
            index += 1  // ':' (validated when the object was parsed)
            let member = try parseValue(at: &index, depth: 1)
            try body(name, member)
            skipWhitespace(&index)
            if bytes[index] == UInt8(ascii: ",") {
                index += 1
                continue
            }
            return
        }
    }

    /// Parses `range` of the input as one JSON object and calls `body` with each member's name
    /// (as a string value: see ``nameIs(_:_:)``) and value as it reaches them: one pass, where
    /// ``document(in:)`` then ``forEachMember(of:_:)`` walk every value twice.
    public func forEachMember(
        ofDocumentIn range: Range<Int>,
        _ body: (Value, Value) throws(ConcordError) -> Void
    ) throws(ConcordError) {
        var index = range.lowerBound
        skipWhitespace(&index)
        guard index < bytes.count, bytes[index] == UInt8(ascii: "{") else {
            throw ConcordError(.invalidRequest, "expected a JSON object")
        }
        try parseObject(at: &index, depth: 0, body)
        while index < range.upperBound, Self.isWhitespace(bytes[index]) { index += 1 }
        guard index == range.upperBound else { throw Self.error("unexpected text after the JSON value", at: index) }
    }

    /// Whether the string value `name` is `literal`, compared byte for byte without building a
    /// `String` (a name written with escapes is decoded first).
    @inline(__always)
    public func nameIs(_ name: Value, _ literal: StaticString) -> Bool {
        let inner = (name.range.lowerBound + 1)..<(name.range.upperBound - 1)
        let count = literal.utf8CodeUnitCount
        if inner.count == count {
            let pointer = literal.utf8Start
            for offset in 0..<count where bytes[inner.lowerBound + offset] != pointer[offset] {
                return false
            }
            return true
        }
        guard inner.count > count, bytes[inner].contains(UInt8(ascii: "\\")) else { return false }
        return (try? decodeString(name)) == literal.description
    }

    /// Calls `body` with each element of the array at `array`.
    public func forEachElement(of array: Value, _ body: (Value) throws(ConcordError) -> Void) throws(ConcordError) {
        guard array.kind == .array else { throw ConcordError(.invalidRequest, "expected a JSON array") }
        var index = array.range.lowerBound + 1
        skipWhitespace(&index)
        if bytes[index] == UInt8(ascii: "]") { return }
        while true {
            let element = try parseValue(at: &index, depth: 1)
            try body(element)
            skipWhitespace(&index)
            if bytes[index] == UInt8(ascii: ",") {
                index += 1
                continue
            }
            return
        }
    }

    /// The decoded text of a string value.
    public func decodeString(_ value: Value) throws(ConcordError) -> String {
        guard value.kind == .string else { throw ConcordError(.invalidRequest, "expected a JSON string") }
        let inner = (value.range.lowerBound + 1)..<(value.range.upperBound - 1)
        // Fast path: no escapes.
        if !bytes[inner].contains(UInt8(ascii: "\\")) {
            return String(decoding: bytes[inner], as: UTF8.self)
        }
        var out: [UInt8] = []
        out.reserveCapacity(inner.count)
        var index = inner.lowerBound
        while index < inner.upperBound {
            let byte = bytes[index]
            if byte != UInt8(ascii: "\\") {
                out.append(byte)
                index += 1
                continue
            }
            let escape = bytes[index + 1]
            index += 2
            switch escape {
            case UInt8(ascii: "\""): out.append(0x22)
            case UInt8(ascii: "\\"): out.append(0x5C)
            case UInt8(ascii: "/"): out.append(0x2F)
            case UInt8(ascii: "b"): out.append(0x08)
            case UInt8(ascii: "f"): out.append(0x0C)
            case UInt8(ascii: "n"): out.append(0x0A)
            case UInt8(ascii: "r"): out.append(0x0D)
            case UInt8(ascii: "t"): out.append(0x09)
            default:  // 'u', validated by parseString
                var scalar = hex4(at: index)
                index += 4
                if (0xD800..<0xDC00).contains(scalar) {
                    let low = hex4(at: index + 2)
                    index += 6
                    scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                }
                // Lone surrogates were refused by parseString, so this is a valid scalar.
                out.append(contentsOf: Array(String(Character(Unicode.Scalar(scalar)!)).utf8))
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// The value of an integer number (no fraction, no exponent) that fits in `UInt64`.
    public func decodeUInt64(_ value: Value) throws(ConcordError) -> UInt64 {
        guard value.kind == .number, let number = UInt64(String(decoding: bytes[value.range], as: UTF8.self)) else {
            throw ConcordError(.invalidRequest, "expected a non-negative integer")
        }
        return number
    }

    public func decodeBool(_ value: Value) throws(ConcordError) -> Bool {
        guard value.kind == .bool else { throw ConcordError(.invalidRequest, "expected true or false") }
        return bytes[value.range.lowerBound] == UInt8(ascii: "t")
    }

    /// The value's text with all white space outside strings removed.
    public func compactText(_ value: Value) -> String {
        let slice = bytes[value.range]
        var hasWhitespace = false
        if value.kind == .object || value.kind == .array {
            var inString = false
            var escaped = false
            for byte in slice {
                if inString {
                    if escaped {
                        escaped = false
                    } else if byte == 0x5C {
                        escaped = true
                    } else if byte == 0x22 {
                        inString = false
                    }
                } else if byte == 0x22 {
                    inString = true
                } else if Self.isWhitespace(byte) {
                    hasWhitespace = true
                    break
                }
            }
        }
        if !hasWhitespace { return String(decoding: slice, as: UTF8.self) }
        var out: [UInt8] = []
        out.reserveCapacity(slice.count)
        var inString = false
        var escaped = false
        for byte in slice {
            if inString {
                out.append(byte)
                if escaped {
                    escaped = false
                } else if byte == 0x5C {
                    escaped = true
                } else if byte == 0x22 {
                    inString = false
                }
            } else if byte == 0x22 {
                inString = true
                out.append(byte)
            } else if !Self.isWhitespace(byte) {
                out.append(byte)
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    // MARK: - Parsing

    @inline(__always)
    static func isWhitespace(_ byte: UInt8) -> Bool {
        byte == 0x20 || byte == 0x0A || byte == 0x0D || byte == 0x09
    }

    @inline(__always)
    func skipWhitespace(_ index: inout Int) {
        while index < bytes.count, Self.isWhitespace(bytes[index]) { index += 1 }
    }

    static func error(_ message: String, at index: Int) -> ConcordError {
        ConcordError(.invalidRequest, "invalid JSON at byte \(index): \(message)")
    }

    func parseValue(at index: inout Int, depth: Int) throws(ConcordError) -> Value {
        skipWhitespace(&index)
        guard index < bytes.count else { throw Self.error("unexpected end of input", at: index) }
        let start = index
        switch bytes[index] {
        case UInt8(ascii: "{"):
            try parseObject(at: &index, depth: depth) { _, _ in }
            return Value(kind: .object, range: start..<index)
        case UInt8(ascii: "["):
            guard depth < maxDepth else { throw Self.error("nested deeper than \(maxDepth) levels", at: index) }
            index += 1
            skipWhitespace(&index)
            if index < bytes.count, bytes[index] == UInt8(ascii: "]") {
                index += 1
                return Value(kind: .array, range: start..<index)
            }
            while true {
                _ = try parseValue(at: &index, depth: depth + 1)
                skipWhitespace(&index)
                guard index < bytes.count else { throw Self.error("unterminated array", at: index) }
                if bytes[index] == UInt8(ascii: ",") {
                    index += 1
                } else if bytes[index] == UInt8(ascii: "]") {
                    index += 1
                    return Value(kind: .array, range: start..<index)
                } else {
                    throw Self.error("expected ',' or ']'", at: index)
                }
            }
        case UInt8(ascii: "\""):
            return try parseString(at: &index)
        case UInt8(ascii: "t"):
            try expectLiteral("true", at: &index)
            return Value(kind: .bool, range: start..<index)
        case UInt8(ascii: "f"):
            try expectLiteral("false", at: &index)
            return Value(kind: .bool, range: start..<index)
        case UInt8(ascii: "n"):
            try expectLiteral("null", at: &index)
            return Value(kind: .null, range: start..<index)
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"):
            try parseNumber(at: &index)
            return Value(kind: .number, range: start..<index)
        default:
            throw Self.error("unexpected character", at: index)
        }
    }

    /// Parses the object whose `{` is at `index`, at nesting `depth`, calling `body` with each
    /// member's name and value as it reaches them; leaves `index` just past the `}`.
    func parseObject(
        at index: inout Int, depth: Int, _ body: (Value, Value) throws(ConcordError) -> Void
    ) throws(ConcordError) {
        guard depth < maxDepth else { throw Self.error("nested deeper than \(maxDepth) levels", at: index) }
        index += 1
        skipWhitespace(&index)
        if index < bytes.count, bytes[index] == UInt8(ascii: "}") {
            index += 1
            return
        }
        while true {
            skipWhitespace(&index)
            let name = try parseString(at: &index)
            skipWhitespace(&index)
            guard index < bytes.count, bytes[index] == UInt8(ascii: ":") else {
                throw Self.error("expected ':'", at: index)
            }
            index += 1
            let member = try parseValue(at: &index, depth: depth + 1)
            try body(name, member)
            skipWhitespace(&index)
            guard index < bytes.count else { throw Self.error("unterminated object", at: index) }
            if bytes[index] == UInt8(ascii: ",") {
                index += 1
            } else if bytes[index] == UInt8(ascii: "}") {
                index += 1
                return
            } else {
                throw Self.error("expected ',' or '}'", at: index)
            }
        }
    }

    func expectLiteral(_ literal: StaticString, at index: inout Int) throws(ConcordError) {
        let count = literal.utf8CodeUnitCount
        guard index + count <= bytes.count else { throw Self.error("unexpected end of input", at: index) }
        let pointer = literal.utf8Start
        for offset in 0..<count where bytes[index + offset] != pointer[offset] {
            throw Self.error("invalid literal", at: index)
        }
        index += count
    }

    func parseNumber(at index: inout Int) throws(ConcordError) {
        let start = index
        func digits(_ index: inout Int) -> Int {
            let begin = index
            while index < bytes.count, bytes[index] >= 0x30, bytes[index] <= 0x39 { index += 1 }
            return index - begin
        }
        if bytes[index] == UInt8(ascii: "-") { index += 1 }
        guard index < bytes.count else { throw Self.error("unexpected end of number", at: start) }
        if bytes[index] == UInt8(ascii: "0") {
            index += 1
        } else if digits(&index) == 0 {
            throw Self.error("invalid number", at: start)
        }
        if index < bytes.count, bytes[index] == UInt8(ascii: ".") {
            index += 1
            guard digits(&index) > 0 else { throw Self.error("invalid number", at: start) }
        }
        if index < bytes.count, bytes[index] == UInt8(ascii: "e") || bytes[index] == UInt8(ascii: "E") {
            index += 1
            if index < bytes.count, bytes[index] == UInt8(ascii: "+") || bytes[index] == UInt8(ascii: "-") {
                index += 1
            }
            guard digits(&index) > 0 else { throw Self.error("invalid number", at: start) }
        }
    }

    func hex4(at index: Int) -> UInt32 {
        var value: UInt32 = 0
        for offset in 0..<4 {
            let byte = bytes[index + offset]
            let digit: UInt32
            switch byte {
            case 0x30...0x39: digit = UInt32(byte - 0x30)
            case 0x41...0x46: digit = UInt32(byte - 0x41 + 10)
            default: digit = UInt32(byte - 0x61 + 10)
            }
            value = value << 4 | digit
        }
        return value
    }

    func isHex4(at index: Int) -> Bool {
        guard index + 4 <= bytes.count else { return false }
        for offset in 0..<4 {
            switch bytes[index + offset] {
            case 0x30...0x39, 0x41...0x46, 0x61...0x66: continue
            default: return false
            }
        }
        return true
    }

    func parseString(at index: inout Int) throws(ConcordError) -> Value {
        let start = index
        guard index < bytes.count, bytes[index] == 0x22 else { throw Self.error("expected a string", at: index) }
        index += 1
        while index < bytes.count {
            index = Self.skipPlainASCII(bytes, from: index)
            guard index < bytes.count else { break }
            let byte = bytes[index]
            switch byte {
            case 0x22:
                index += 1
                return Value(kind: .string, range: start..<index)
            case 0x5C:
                guard index + 1 < bytes.count else { throw Self.error("unterminated string", at: start) }
                switch bytes[index + 1] {
                case 0x22, 0x5C, 0x2F, 0x62, 0x66, 0x6E, 0x72, 0x74:
                    index += 2
                case 0x75:
                    guard isHex4(at: index + 2) else { throw Self.error("invalid \\u escape", at: index) }
                    let unit = hex4(at: index + 2)
                    index += 6
                    if (0xD800..<0xDC00).contains(unit) {
                        guard index + 1 < bytes.count, bytes[index] == 0x5C, bytes[index + 1] == 0x75,
                            isHex4(at: index + 2), (0xDC00..<0xE000).contains(hex4(at: index + 2))
                        else { throw Self.error("unpaired surrogate", at: index) }
                        index += 6
                    } else if (0xDC00..<0xE000).contains(unit) {
                        throw Self.error("unpaired surrogate", at: index)
                    }
                default:
                    throw Self.error("invalid escape", at: index)
                }
            case 0x00..<0x20:
                throw Self.error("control character in string", at: index)
            case 0x20..<0x80:
                index += 1
            default:
                index = try validateUTF8Sequence(at: index)
            }
        }
        throw Self.error("unterminated string", at: start)
    }

    /// The high bit of each byte of `word` that is a quote, a backslash or below 0x20 (others
    /// may be set spuriously only where one of those comes first, so zero means none).
    @inline(__always)
    static func quoteBackslashOrControl(in word: UInt64) -> UInt64 {
        let ones: UInt64 = 0x0101_0101_0101_0101
        let highs: UInt64 = 0x8080_8080_8080_8080
        // A byte of `x` is zero exactly when (x - 1) & ~x has its high bit set.
        let quote = word ^ (ones &* 0x22)
        let backslash = word ^ (ones &* 0x5C)
        let hasQuote = (quote &- ones) & ~quote & highs
        let hasBackslash = (backslash &- ones) & ~backslash & highs
        // Bytes below 0x20: subtracting 0x20 borrows into the high bit (only for ASCII bytes).
        let hasControl = (word &- ones &* 0x20) & ~word & highs
        return hasQuote | hasBackslash | hasControl
    }

    /// The index of the first byte at or after `start` that needs attention inside a string:
    /// a quote, a backslash, a control character or a non-ASCII byte.
    ///
    /// Looks at eight bytes at a time: values are mostly plain ASCII, and this loop decides
    /// how fast a subscriber can read them.
    @inline(__always)
    static func skipPlainASCII(_ bytes: [UInt8], from start: Int) -> Int {
        bytes.withUnsafeBufferPointer { buffer in
            guard let base = buffer.baseAddress else { return start }
            var position = start
            let highs: UInt64 = 0x8080_8080_8080_8080
            while position + 8 <= buffer.count {
                let word = UnsafeRawPointer(base + position).loadUnaligned(as: UInt64.self)
                let found = Self.quoteBackslashOrControl(in: word) | (word & highs)
                // The lowest flag is never spurious: it marks the first byte to look at.
                if found != 0 { return position + UInt64(littleEndian: found).trailingZeroBitCount / 8 }
                position += 8
            }
            while position < buffer.count {
                let byte = buffer[position]
                if byte == 0x22 || byte == 0x5C || byte < 0x20 || byte >= 0x80 { break }
                position += 1
            }
            return position
        }
    }

    /// Validates one multi-byte UTF-8 sequence and returns the index after it.
    func validateUTF8Sequence(at index: Int) throws(ConcordError) -> Int {
        let lead = bytes[index]
        let length: Int
        let minimum: UInt32
        var scalar: UInt32
        switch lead {
        case 0xC2...0xDF: (length, scalar, minimum) = (2, UInt32(lead & 0x1F), 0x80)
        case 0xE0...0xEF: (length, scalar, minimum) = (3, UInt32(lead & 0x0F), 0x800)
        case 0xF0...0xF4: (length, scalar, minimum) = (4, UInt32(lead & 0x07), 0x10000)
        default: throw Self.error("invalid UTF-8", at: index)
        }
        guard index + length <= bytes.count else { throw Self.error("invalid UTF-8", at: index) }
        for offset in 1..<length {
            let continuation = bytes[index + offset]
            guard continuation & 0xC0 == 0x80 else { throw Self.error("invalid UTF-8", at: index) }
            scalar = scalar << 6 | UInt32(continuation & 0x3F)
        }
        guard scalar >= minimum, scalar <= 0x10FFFF, !(0xD800..<0xE000).contains(scalar) else {
            throw Self.error("invalid UTF-8", at: index)
        }
        return index + length
    }
}

/// Writes JSON text into a byte array; the counterpart of ``JSONScanner`` for Concord's own messages.
public struct JSONWriter {
    public var bytes: [UInt8]

    public init(capacity: Int = 256) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    @inline(__always)
    public mutating func raw(_ text: StaticString) {
        bytes.append(contentsOf: UnsafeBufferPointer(start: text.utf8Start, count: text.utf8CodeUnitCount))
    }

    @inline(__always)
    public mutating func raw(_ text: String) {
        var text = text
        text.withUTF8 { bytes.append(contentsOf: $0) }
    }

    public mutating func number(_ value: UInt64) {
        if value < 10 {
            bytes.append(UInt8(truncatingIfNeeded: value) + 0x30)
            return
        }
        var digits: (UInt64, Int) = (value, 0)
        var buffer = [UInt8](repeating: 0, count: 20)
        while digits.0 > 0 {
            buffer[19 - digits.1] = UInt8(truncatingIfNeeded: digits.0 % 10) + 0x30
            digits.0 /= 10
            digits.1 += 1
        }
        bytes.append(contentsOf: buffer[(20 - digits.1)...])
    }

    public mutating func number(_ value: Int) {
        if value < 0 {
            bytes.append(UInt8(ascii: "-"))
            number(UInt64(value.magnitude))
        } else {
            number(UInt64(value))
        }
    }

    /// Writes `text` as a JSON string literal, escaping what RFC 8259 requires.
    public mutating func string(_ text: String) {
        bytes.append(0x22)
        var text = text
        text.withUTF8 { utf8 in
            // Runs that need no escape (nearly all text) are copied whole.
            var start = 0
            while start < utf8.count {
                let end = Self.endOfUnescapedRun(utf8, from: start)
                if end > start { bytes.append(contentsOf: UnsafeBufferPointer(rebasing: utf8[start..<end])) }
                guard end < utf8.count else { break }
                escape(utf8[end])
                start = end + 1
            }
        }
        bytes.append(0x22)
    }

    /// The index of the first byte at or after `start` that a JSON string must escape.
    static func endOfUnescapedRun(_ utf8: UnsafeBufferPointer<UInt8>, from start: Int) -> Int {
        guard let base = utf8.baseAddress else { return start }
        var position = start
        while position + 8 <= utf8.count {
            let word = UnsafeRawPointer(base + position).loadUnaligned(as: UInt64.self)
            if JSONScanner.quoteBackslashOrControl(in: word) != 0 { break }
            position += 8
        }
        while position < utf8.count {
            let byte = utf8[position]
            if byte == 0x22 || byte == 0x5C || byte < 0x20 { break }
            position += 1
        }
        return position
    }

    private mutating func escape(_ byte: UInt8) {
        switch byte {
        case 0x22: bytes.append(0x5C); bytes.append(0x22)
        case 0x5C: bytes.append(0x5C); bytes.append(0x5C)
        case 0x0A: bytes.append(0x5C); bytes.append(UInt8(ascii: "n"))
        case 0x0D: bytes.append(0x5C); bytes.append(UInt8(ascii: "r"))
        case 0x09: bytes.append(0x5C); bytes.append(UInt8(ascii: "t"))
        case 0x00..<0x20:
            let hex: [UInt8] = Array("0123456789abcdef".utf8)
            bytes.append(contentsOf: [
                0x5C, UInt8(ascii: "u"), 0x30, 0x30, hex[Int(byte >> 4)], hex[Int(byte & 0xF)],
            ])
        default: bytes.append(byte)
        }
    }
}
