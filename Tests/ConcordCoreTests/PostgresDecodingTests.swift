import Testing

@testable import ConcordCore

/// wal2json rows as PostgreSQL 15 writes them (format-version 2, include-lsn), and the records they become.
@Suite struct PostgresDecodingTests {
    typealias Column = PostgresDecoding.Column

    @Test func parsesLSNsInOrder() {
        #expect(PostgresDecoding.lsn("0/19E84F8") == 0x19E_84F8)
        #expect(PostgresDecoding.lsn("1/0")! > PostgresDecoding.lsn("0/FFFFFFFF")!)
        #expect(PostgresDecoding.lsnText(PostgresDecoding.lsn("A/19E84F8")!) == "A/19E84F8")
        #expect(PostgresDecoding.lsn("19E84F8") == nil)
        #expect(PostgresDecoding.lsn("0/x") == nil)
    }

    @Test func decodesTransactionsInsertsUpdatesDeletesAndTruncates() throws {
        #expect(
            try PostgresDecoding.record(#"{"action":"B","xid":732,"lsn":"0/195FE80","nextlsn":"0/195FEB0"}"#)
                == .begin(commit: 0x195_FEB0))
        #expect(try PostgresDecoding.record(#"{"action":"B"}"#) == .begin(commit: nil))
        #expect(
            try PostgresDecoding.record(#"{"action":"C","xid":732,"lsn":"0/195FE80","nextlsn":"0/195FEB0"}"#)
                == .commit(lsn: 0x195_FEB0))
        let insert = try PostgresDecoding.record(
            #"{"action":"I","xid":732,"lsn":"0/195FD08","schema":"public","table":"customers","columns":[{"name":"id","value":1},{"name":"balance","value":12.50},{"name":"meta","value":"{\"n\": [1, 2]}"},{"name":"active","value":true},{"name":"avatar","value":"deadbeef"},{"name":"email","value":null}]}"#
        )
        let columns = [
            Column(name: "id", json: "1"), Column(name: "balance", json: "12.50"),
            Column(name: "meta", json: #""{\"n\": [1, 2]}""#), Column(name: "active", json: "true"),
            Column(name: "avatar", json: #""deadbeef""#), Column(name: "email", json: "null"),
        ]
        #expect(insert == .insert(schema: "public", table: "customers", columns: columns))
        #expect(
            PostgresDecoding.value(columns)
                == #"{"id":1,"balance":12.50,"meta":"{\"n\": [1, 2]}","active":true,"avatar":"deadbeef","email":null}"#)
        let update = try PostgresDecoding.record(
            #"{"action":"U","xid":750,"lsn":"0/19A41F0","schema":"public","table":"order_lines","columns":[{"name":"order_no","value":"A-1"},{"name":"line","value":3}],"identity":[{"name":"order_no","value":"A-1"},{"name":"line","value":2}]}"#
        )
        #expect(
            update
                == .update(
                    schema: "public", table: "order_lines",
                    columns: [Column(name: "order_no", json: #""A-1""#), Column(name: "line", json: "3")],
                    identity: [Column(name: "order_no", json: #""A-1""#), Column(name: "line", json: "2")]))
        #expect(
            try PostgresDecoding.record(
                #"{"action":"D","xid":747,"lsn":"0/19A3F40","schema":"public","table":"customers","identity":[{"name":"id","value":10}]}"#
            ) == .delete(schema: "public", table: "customers", identity: [Column(name: "id", json: "10")]))
        #expect(
            try PostgresDecoding.record(
                #"{"action":"T","xid":788,"lsn":"0/19DF7C0","schema":"public","table":"events"}"#)
                == .truncate(schema: "public", table: "events"))
        #expect(throws: ConcordError.self) { try PostgresDecoding.record(#"{"action":"C","xid":1}"#) }
        #expect(throws: ConcordError.self) { try PostgresDecoding.record("not json") }
    }

    @Test func keysAreTheKeyColumnsInKeyOrderAndNeverAmbiguous() throws {
        let row = [Column(name: "b", json: #""x""#), Column(name: "c", json: "2"), Column(name: "a", json: "1")]
        #expect(try PostgresDecoding.key(row, keyColumns: ["a"]) == "1")
        #expect(try PostgresDecoding.key(row, keyColumns: ["b"]) == "x")
        // Key order (c, b) even though the columns come in table order (b, c).
        #expect(try PostgresDecoding.key(row, keyColumns: ["c", "b"]) == #"["2","x"]"#)
        let commaInside = [Column(name: "p", json: #""a,b""#), Column(name: "q", json: #""c""#)]
        let commaAfter = [Column(name: "p", json: #""a""#), Column(name: "q", json: #""b,c""#)]
        #expect(
            try PostgresDecoding.key(commaInside, keyColumns: ["p", "q"])
                != PostgresDecoding.key(commaAfter, keyColumns: ["p", "q"]))
        #expect(throws: ConcordError.self) { try PostgresDecoding.key(row, keyColumns: ["missing"]) }
    }

    @Test func copiedValuesMatchWhatWal2JSONWrites() {
        #expect(PostgresDecoding.json(text: "12.50", typeOID: 1700) == "12.50")
        #expect(PostgresDecoding.json(text: "NaN", typeOID: 701) == "null")
        #expect(PostgresDecoding.json(text: "-Infinity", typeOID: 1700) == "null")
        #expect(PostgresDecoding.json(text: "t", typeOID: 16) == "true")
        #expect(PostgresDecoding.json(text: "f", typeOID: 16) == "false")
        #expect(PostgresDecoding.json(text: nil, typeOID: 25) == "null")
        #expect(PostgresDecoding.json(text: "deadbeef", typeOID: 17) == #""deadbeef""#)
        #expect(PostgresDecoding.json(text: "{\"a\": 1}", typeOID: 3802) == #""{\"a\": 1}""#)
        #expect(PostgresDecoding.json(text: "line\nbreak", typeOID: 25) == #""line\nbreak""#)
    }

    /// A copied row's value goes into the log without being parsed again: what the column
    /// values become must be compact JSON for every type and every text PostgreSQL prints.
    @Test func copiedRowsAreCompactJSONForEveryColumnType() throws {
        let printed: [(UInt32, String?)] = [
            (20, "-9223372036854775808"), (21, "7"), (23, "0"), (26, "4294967295"), (700, "1e+20"),
            (701, "-1.5e-07"), (701, "-0"), (701, "Infinity"), (1700, "123.450"), (1700, "NaN"), (16, "t"),
            (17, "00ff"), (25, "tab\there \"quoted\" \\ back\u{1}"), (3802, #"{"a": [1, 2]}"#), (1082, "2026-11-24"),
            (25, nil), (25, "é ü 😀"),
        ]
        let columns = printed.enumerated().map { index, cell in
            PostgresDecoding.Column(name: "c\(index)", json: PostgresDecoding.json(text: cell.1, typeOID: cell.0))
        }
        let value = PostgresDecoding.value(columns)
        let scanner = JSONScanner(value)
        #expect(scanner.compactText(try scanner.document()) == value)
    }

    @Test func anUpdateWithoutItsOutOfLineValueKeepsThePreviousOne() throws {
        let previous = #"{"id":1,"body":"long text","version":1}"#
        let update = [Column(name: "id", json: "1"), Column(name: "version", json: "2")]
        #expect(
            PostgresDecoding.value(try PostgresDecoding.merged(update, previous: previous))
                == #"{"id":1,"body":"long text","version":2}"#)
        let complete = [Column(name: "id", json: "1"), Column(name: "body", json: #""new""#)]
        #expect(try PostgresDecoding.merged(complete, previous: #"{"id":1,"body":"old"}"#) == complete)
        #expect(try PostgresDecoding.merged(update, previous: nil) == update)
    }

    /// COPY's text format: the separators and the backslash inside a field are escaped, and
    /// everything else (quotes, non-ASCII) goes through as it is.
    @Test func copyTextEscapesSeparatorsAndBackslashes() {
        var bytes: [UInt8] = []
        PostgresCopyText.appendRow(key: "a\tb\\", version: 42, value: #"{"s":"x\"y","é":"\n"}"#, to: &bytes)
        PostgresCopyText.appendRow(key: "tab\there", version: 1, value: "line\nbreak\r", to: &bytes)
        PostgresCopyText.appendRow(key: "", version: 7, value: "\\\\", to: &bytes)
        let expected =
            "a\\tb\\\\\t42\t{\"s\":\"x\\\\\"y\",\"é\":\"\\\\n\"}\n"
            + "tab\\there\t1\tline\\nbreak\\r\n"
            + "\t7\t\\\\\\\\\n"
        #expect(String(decoding: bytes, as: UTF8.self) == expected)
    }

    /// The eight-bytes-at-a-time scan finds every byte to escape wherever it lies, and a
    /// replica row's version is written in decimal.
    @Test func copyTextEscapesAtEveryOffsetAndWritesVersions() {
        let specials: [(Character, String)] = [("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r")]
        for length in 0..<20 {
            for offset in 0..<max(length, 1) {
                for (special, escaped) in specials {
                    var plain = Array(repeating: Character("a"), count: length)
                    var expected = String(plain)
                    if length > 0 {
                        // A control byte just past the ones escaped goes through as it is.
                        plain[(offset + 3) % length] = "\u{0E}"
                        plain[offset] = special
                        expected = plain.map { $0 == special ? escaped : String($0) }.joined()
                    }
                    var bytes: [UInt8] = []
                    PostgresCopyText.appendRow(key: String(plain), version: 7, value: "é\(String(plain))", to: &bytes)
                    #expect(String(decoding: bytes, as: UTF8.self) == "\(expected)\t7\té\(expected)\n")
                }
            }
        }
        for version in [Int64.min, -1, 0, 9, 10, 1_234_567_890, Int64.max] {
            var bytes: [UInt8] = []
            PostgresCopyText.appendRow(key: "k", version: version, value: "v", to: &bytes)
            #expect(String(decoding: bytes, as: UTF8.self) == "k\t\(version)\tv\n")
        }
    }
}
