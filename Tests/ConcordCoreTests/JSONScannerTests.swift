import Testing

@testable import ConcordCore

@Suite struct JSONScannerTests {
    @Test func keepsTheRawTextOfNestedValues() throws {
        let scanner = JSONScanner(#"{"a": {"b": [1, 2.5e3, "x"]}, "c": null}"#)
        var members: [String: String] = [:]
        try scanner.forEachMember(of: try scanner.document()) { (name, value) throws(ConcordError) in
            members[name] = String(decoding: scanner.bytes[value.range], as: UTF8.self)
        }
        #expect(members == ["a": #"{"b": [1, 2.5e3, "x"]}"#, "c": "null"])
    }

    @Test func compactTextRemovesWhitespaceOutsideStringsOnly() throws {
        let scanner = JSONScanner(" { \"name\" : \"Ada  Lovelace\" ,\n \"tags\" : [ 1 , 2 ] } ")
        #expect(scanner.compactText(try scanner.document()) == #"{"name":"Ada  Lovelace","tags":[1,2]}"#)
    }

    @Test func decodesEscapesAndSurrogatePairs() throws {
        let scanner = JSONScanner(#""a\"b\\c\n\u00e9\ud83d\ude00""#)
        #expect(try scanner.decodeString(try scanner.document()) == "a\"b\\c\né😀")
    }

    @Test(arguments: [
        "", "{", "[1,]", "{\"a\" 1}", "{\"a\":1,}", "01", "1.", "-", "tru", "\"abc", "\"\\x\"", "\"\\ud800\"",
        "\"\\udc00\"", "{} {}", "[1] x", "\"a\u{01}b\"", "nul", "1e", "{\"a\":}",
    ])
    func refusesMalformedJSON(_ text: String) {
        #expect(throws: ConcordError.self) { try JSONScanner(text).document() }
    }

    @Test func refusesInvalidUTF8() {
        let overlong: [UInt8] = [0x22, 0xC0, 0xAF, 0x22]
        let truncated: [UInt8] = [0x22, 0xE2, 0x82, 0x22]
        let surrogate: [UInt8] = [0x22, 0xED, 0xA0, 0x80, 0x22]
        for bytes in [overlong, truncated, surrogate] {
            #expect(throws: ConcordError.self) { try JSONScanner(bytes).document() }
        }
        #expect(throws: Never.self) { try JSONScanner(Array("\"héllo 😀\"".utf8)).document() }
    }

    @Test func enforcesTheNestingLimit() {
        let deep = String(repeating: "[", count: 65) + String(repeating: "]", count: 65)
        #expect(throws: ConcordError.self) { try JSONScanner(deep).document() }
        let fine = String(repeating: "[", count: 64) + String(repeating: "]", count: 64)
        #expect(throws: Never.self) { try JSONScanner(fine).document() }
    }

    @Test func writerEscapesWhatJSONRequires() throws {
        var writer = JSONWriter()
        writer.string("q\"b\\n\n\t\u{01}é")
        let text = String(decoding: writer.bytes, as: UTF8.self)
        #expect(text == #""q\"b\\n\n\t\u0001é""#)
        let scanner = JSONScanner(writer.bytes)
        #expect(try scanner.decodeString(try scanner.document()) == "q\"b\\n\n\t\u{01}é")
    }

    @Test func writerEscapesEveryByteAtEveryPositionOfLongRuns() throws {
        // Runs are copied eight bytes at a time: each special byte is tried at each offset of a word.
        let specials: [String] = (0..<0x20).map { String(UnicodeScalar(UInt8($0))) } + ["\"", "\\", "é", "€", "😀"]
        for special in specials {
            for offset in 0..<20 {
                let text = String(repeating: "a", count: offset) + special + String(repeating: "b", count: 19 - offset)
                var writer = JSONWriter()
                writer.string(text)
                let scanner = JSONScanner(writer.bytes)
                #expect(try scanner.decodeString(try scanner.document()) == text)
                let escapedControl = writer.bytes.dropFirst().dropLast().contains { $0 < 0x20 }
                #expect(!escapedControl, "a control byte went out unescaped")
            }
        }
        var writer = JSONWriter()
        writer.raw("plain ")
        writer.raw(String(repeating: "x", count: 40))
        #expect(String(decoding: writer.bytes, as: UTF8.self) == "plain " + String(repeating: "x", count: 40))
    }

    @Test func writerPrintsNumbers() {
        for value: UInt64 in [0, 7, 10, 12345, UInt64.max] {
            var writer = JSONWriter()
            writer.number(value)
            #expect(String(decoding: writer.bytes, as: UTF8.self) == String(value))
        }
    }
}

@Suite struct PlainASCIISkipTests {
    /// The word-at-a-time scan must stop exactly where the byte-at-a-time definition does.
    @Test func stopsAtTheFirstByteThatNeedsAttention() {
        var generator = SystemRandomNumberGenerator()
        let special: [UInt8] = [0x22, 0x5C, 0x00, 0x1F, 0x0A, 0x80, 0xC3, 0xFF]
        for _ in 0..<2000 {
            let length = Int.random(in: 0..<40, using: &generator)
            var bytes = (0..<length).map { _ in UInt8.random(in: 0x20...0x7E, using: &generator) }
                .map { $0 == 0x22 || $0 == 0x5C ? UInt8(ascii: "a") : $0 }
            if length > 0, Bool.random(using: &generator) {
                bytes[Int.random(in: 0..<length, using: &generator)] = special.randomElement(using: &generator)!
            }
            let start = length > 0 ? Int.random(in: 0..<length, using: &generator) : 0
            let expected =
                bytes[start...].firstIndex { $0 == 0x22 || $0 == 0x5C || $0 < 0x20 || $0 >= 0x80 } ?? bytes.count
            #expect(JSONScanner.skipPlainASCII(bytes, from: start) == expected)
        }
    }
}
