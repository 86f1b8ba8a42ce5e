import Testing

@testable import ConcordCore

@Suite struct WireFormatTests {
    func line(_ item: StreamItem) -> [UInt8] {
        var writer = JSONWriter()
        WireFormat.append(item, to: &writer)
        #expect(writer.bytes.last == 0x0A)
        return Array(writer.bytes.dropLast())
    }

    /// A stream batch's writer is sized once: the estimate covers what is written, with and
    /// without `before`, with checkpoint lines among the items and LSNs of every length, and is
    /// not far above it.
    @Test func encodedSizeCoversABatch() {
        var items: [StreamItem] = []
        var checkpoints: [Checkpoint] = []
        let digest = CollectionDigest.empty
        for index in 0..<500 {
            let value = #"{"n":\#(index),"text":""# + String(repeating: "x", count: index % 300) + #""}"#
            let lsn = index % 2 == 0 ? LSN(index + 1) : LSN.max - LSN(500 - index)
            items.append(
                .change(
                    Change(
                        lsn: lsn, collection: "orders", key: "order-\(index)",
                        operation: index % 7 == 0 ? .delete : .upsert, value: index % 7 == 0 ? nil : value,
                        isCommit: index % 3 == 0,
                        before: Element(collection: "orders", key: "order-\(index)", version: 1, value: "{}"))))
            if index % 50 == 0 { items.append(.skip(from: 1, through: lsn, isCommit: true)) }
            if index % 25 == 0 {
                checkpoints.append(Checkpoint(lsn: lsn, digests: ["orders": digest, "customers": digest]))
            }
        }
        for includeBefore in [false, true] {
            var writer = JSONWriter()
            for item in items { WireFormat.append(item, to: &writer, includeBefore: includeBefore) }
            for checkpoint in checkpoints { WireFormat.append(checkpoint, to: &writer) }
            let estimate = WireFormat.encodedSize(of: items, includeBefore: includeBefore, checkpoints: checkpoints)
            #expect(estimate >= writer.bytes.count)
            #expect(estimate < writer.bytes.count * 5 / 4)
        }
    }

    /// A stream write is bounded by bytes, not lines: the runs cover every item once, in order,
    /// each written run takes at most `bytes` and could not take the next line, whatever the
    /// values' sizes, and a line longer than `bytes` goes alone.
    @Test func streamRunsAreBoundedByBytes() {
        var items: [StreamItem] = []
        for index in 0..<3000 {
            // Values from a few bytes to 40 KB, one far longer than a run.
            let size = index == 1234 ? 3 << 20 : (index * 7919) % 40_000
            let value = "\"" + String(repeating: "v", count: size) + "\""
            items.append(
                .change(
                    Change(
                        lsn: LSN(index + 1), collection: "c", key: "k\(index)", operation: .upsert, value: value,
                        isCommit: index % 10 == 9)))
            if index % 100 == 0 { items.append(.skip(from: LSN(index + 1), through: LSN(index + 1), isCommit: true)) }
        }
        let bytes = 1 << 20
        let runs = WireFormat.runs(of: items, includeBefore: false, bytes: bytes)
        #expect(runs.first?.lowerBound == 0 && runs.last?.upperBound == items.count)
        #expect(zip(runs, runs.dropFirst()).allSatisfy { $0.upperBound == $1.lowerBound }, "in order, none twice")
        func encoded(_ range: Range<Int>) -> Int {
            var writer = JSONWriter()
            for item in items[range] { WireFormat.append(item, to: &writer) }
            return writer.bytes.count
        }
        let huge = items.firstIndex {
            if case .change(let change) = $0 { return change.key == "k1234" }
            return false
        }
        for run in runs {
            #expect(!run.isEmpty)
            if run.count > 1 { #expect(encoded(run) <= bytes) }
            // Full: the next line would have taken it past the bound (the line sizes are
            // estimated a little above what is written, hence the slack).
            if run.upperBound < items.count {
                #expect(encoded(run.lowerBound..<(run.upperBound + 1)) > bytes - bytes / 32)
            }
        }
        #expect(runs.contains { $0 == huge.map { $0..<($0 + 1) } }, "the longest line goes alone")
        #expect(WireFormat.runs(of: [], includeBefore: false, bytes: bytes).isEmpty)
        let three = Array(items.prefix(3))
        #expect(WireFormat.runs(of: three, includeBefore: false, bytes: bytes) == [0..<3])
    }

    @Test func streamItemsRoundTrip() throws {
        let items: [StreamItem] = [
            .change(
                Change(
                    lsn: 1, collection: "users", key: "k\"1", operation: .upsert, value: #"{"a":[1,2]}"#,
                    isCommit: false)),
            .change(
                Change(
                    lsn: 2, collection: "users", key: "é", operation: .delete, value: nil, isCommit: true,
                    before: Element(collection: "users", key: "é", version: 1, value: "1"))),
            .skip(from: 3, through: 9, isCommit: true),
        ]
        for item in items {
            #expect(try WireFormat.parseStreamLine(line(item)) == .item(item))
        }
        var writer = JSONWriter()
        WireFormat.appendHeartbeat(head: 42, to: &writer)
        #expect(try WireFormat.parseStreamLine(Array(writer.bytes.dropLast())) == .heartbeat(head: 42))
        // A reader that keeps digests gets each change's element computed as the line is parsed.
        for item in items {
            let bytes = line(item)
            let parsed = try WireFormat.parseStreamLine(bytes, range: 0..<bytes.count, hashingAfter: true)
            guard case .item(.change(let change)) = parsed, case .change(let sent) = item else { continue }
            #expect(change.after == Element(sent))
            #expect(change.after != nil || sent.value == nil)
        }
    }

    @Test func refusesStreamLinesThatBreakTheProtocol() {
        for text in [
            #"{"lsn":1,"op":"upsert","collection":"c","key":"k"}"#,  // upsert without value
            #"{"lsn":0,"op":"delete","collection":"c","key":"k"}"#,  // LSN 0
            #"{"lsn":3,"from":5,"op":"skip"}"#,  // empty range
            #"{"lsn":1,"op":"rename","collection":"c","key":"k"}"#,
            #"{"lsn":-1,"op":"delete","collection":"c","key":"k"}"#,
        ] {
            #expect(throws: ConcordError.self) { try WireFormat.parseStreamLine(Array(text.utf8)) }
        }
    }

    @Test func streamLinesAreReadInOnePassWithEveryCheckKept() throws {
        // Member names written with escapes mean the same names; unknown members are skipped.
        let escaped =
            #"{"l\u0073n":4, "collection":"c","k\u0065y":"k","op":"upsert","extra":[1,{"x":null}],"value":{"a":1},"commit":true}"#
        let change = Change(lsn: 4, collection: "c", key: "k", operation: .upsert, value: #"{"a":1}"#, isCommit: true)
        #expect(try WireFormat.parseStreamLine(Array(escaped.utf8)) == .item(.change(change)))
        // A name that only starts like a known one is not it.
        let longer = #"{"lsnx":4,"lsn":5,"collection":"c","key":"k","op":"delete","commit":true}"#
        guard case .item(let item) = try WireFormat.parseStreamLine(Array(longer.utf8)) else {
            Issue.record("not an item")
            return
        }
        #expect(item.lastLSN == 5)
        for text in [
            #"{"lsn":4,"collection":"c","key":"k","op":"upsert","value":{"a":01},"commit":true}"#,  // bad value
            #"{"lsn":4,"collection":"c","key":"k","op":"delete","commit":true} x"#,  // text after
            #"{"lsn":4,"collection":"c","key":"k","op":"delete","commit":true"#,  // unterminated
            #"["lsn",4]"#,  // not an object
            #"{"lsn":4,"collection":"c","key":"k","op":"delete","before":"00","commit":true}"#,  // short before
        ] {
            #expect(throws: ConcordError.self) { try WireFormat.parseStreamLine(Array(text.utf8)) }
        }
    }

    @Test func pagesRoundTripAndTruncationIsDetected() throws {
        let page = SnapshotPage(
            collection: "orders", lsn: 77,
            records: [Record(key: "a", version: 3, value: "{}"), Record(key: "b\n", version: 70, value: "[1]")],
            hasMore: true)
        let bytes = WireFormat.encode(page)
        #expect(try WireFormat.decodePage(bytes) == page)
        let cut = Array(bytes.dropLast(5))
        #expect(throws: ConcordError.self) { try WireFormat.decodePage(cut) }
    }

    @Test func writeRequestsParseAndCompactValues() throws {
        let body =
            #"{"changes":[{"collection":"users","key":"42","op":"upsert","value":{ "n" : 1 }},{"collection":"users","key":"7","op":"delete"}]}"#
        let operations = try WireFormat.decodeWriteRequest(Array(body.utf8))
        #expect(operations == [.upsert("users", "42", json: #"{"n":1}"#), .delete("users", "7")])
        // Parsed and compacted here, so the publisher does not parse it again.
        #expect(operations[0].valueIsChecked)
        #expect(try WireFormat.decodeWriteRequest(WireFormat.encodeWriteRequest(operations)) == operations)
    }

    @Test(arguments: [
        (#"{"changes":[]}"#, "invalid_request"),
        (#"{}"#, "invalid_request"),
        (#"[]"#, "invalid_request"),
        (#"{"changes":[{"collection":"users","key":"1","op":"upsert"}]}"#, "invalid_request"),
        (#"{"changes":[{"collection":"users","key":"1","op":"delete","value":1}]}"#, "invalid_request"),
        (#"{"changes":[{"collection":"users","key":"","op":"delete"}]}"#, "invalid_request"),
        (#"{"changes":[{"collection":"Users","key":"1","op":"delete"}]}"#, "invalid_request"),
        (#"{"changes":[{"collection":"concord_x","key":"1","op":"delete"}]}"#, "invalid_request"),
        (#"{"changes":[{"collection":"users","key":"1","op":"merge","value":1}]}"#, "invalid_request"),
        (#"{"changes":[{"collection":"users","key":1,"op":"delete"}]}"#, "invalid_request"),
        (#"{"changes":[{"collection":"users","key":"1","op":"delete","extra":true}]}"#, "invalid_request"),
    ])
    func refusesBadWriteRequests(body: String, code: String) {
        #expect {
            try WireFormat.decodeWriteRequest(Array(body.utf8))
        } throws: { error in
            (error as? ConcordError)?.code.rawValue == code
        }
    }

    @Test func enforcesBatchKeyAndValueLimits() {
        var limits = WireFormat.Limits()
        limits.maxBatchChanges = 2
        limits.maxKeyBytes = 4
        limits.maxValueBytes = 8
        let tooMany = WireFormat.encodeWriteRequest([.delete("c", "1"), .delete("c", "2"), .delete("c", "3")])
        let longKey = WireFormat.encodeWriteRequest([.delete("c", "12345")])
        let bigValue = WireFormat.encodeWriteRequest([.upsert("c", "1", json: "\"123456789\"")])
        for body in [tooMany, longKey, bigValue] {
            #expect {
                try WireFormat.decodeWriteRequest(body, limits: limits)
            } throws: { error in
                (error as? ConcordError)?.code == .tooLarge
            }
        }
    }

    @Test func errorsRoundTrip() {
        let error = ConcordError(.gone, "changes after 3 are no longer retained")
        #expect(WireFormat.decodeError(WireFormat.encode(error)) == error)
        #expect(WireFormat.decodeError(Array("not json".utf8)) == nil)
    }

    @Test func feedInfoRoundTrips() throws {
        var digest = CollectionDigest.empty
        digest.add(Element(collection: "a", key: "k", version: 1, value: "1"))
        let feed = FeedInfo(
            feedID: "f", head: 9, oldest: 1,
            collections: [.init(name: "a", count: 1, digest: digest), .init(name: "b", count: 0)])
        #expect(try WireFormat.decodeFeed(WireFormat.encode(feed)) == feed)
        var limited = feed
        limited.limit = 100
        #expect(try WireFormat.decodeFeed(WireFormat.encode(limited)) == limited)
        #expect(String(decoding: WireFormat.encode(limited), as: UTF8.self).hasSuffix(#"],"limit":100}"# + "\n"))
        #expect(throws: ConcordError.self) { try WireFormat.decodeFeed(Array(#"{"feed":"f","limit":0}"#.utf8)) }
    }

    @Test func lineSplitterJoinsChunks() {
        var splitter = LineSplitter()
        splitter.append(Array("ab".utf8))
        #expect(splitter.next() == nil)
        splitter.append(Array("c\n\nde\nf".utf8))
        #expect(splitter.next() == Array("abc".utf8))
        #expect(splitter.next() == Array("de".utf8))
        #expect(splitter.next() == nil)
        #expect(Array(splitter.remainder) == Array("f".utf8))
    }

    @Test func collectionNamesAreSafeTableNames() {
        for good in ["users", "_x", "a1_b"] {
            #expect(throws: Never.self) { try CollectionName.validate(good) }
        }
        for bad in [
            "", "1a", "Users", "a-b", "a b", "concord_state", "sqlite_master", String(repeating: "a", count: 64),
            "x\"y",
        ] {
            #expect(throws: ConcordError.self) { try CollectionName.validate(bad) }
        }
    }
}
