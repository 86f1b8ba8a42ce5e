import Testing

@testable import ConcordCore

@Suite struct DigestTests {
    @Test func hexParsingAcceptsExactlyLowercaseHexDigits() {
        let digits = Array("0123456789abcdef".utf8)
        var generator = SeededGenerator(seed: 7)
        for _ in 0..<200 {
            let text = (0..<64).map { _ in digits[Int.random(in: 0..<16, using: &generator)] }
            let expected = (0..<4).map { word in
                text[(word * 16)..<(word * 16 + 16)].reduce(UInt64(0)) { value, digit in
                    value << 4 | UInt64(digit <= 0x39 ? digit - 0x30 : digit - 0x61 + 10)
                }
            }
            let parsed = text.withUnsafeBytes { Element.parseHex($0) }
            #expect(parsed.map { [$0.0, $0.1, $0.2, $0.3] } == expected)
        }
        // Every byte that is not a lowercase hex digit, at every position, is refused.
        let valid = Array(repeating: UInt8(ascii: "7"), count: 64)
        var accepted: [(position: Int, byte: UInt8)] = []
        for position in 0..<64 {
            for byte in UInt8.min...UInt8.max where !digits.contains(byte) {
                var text = valid
                text[position] = byte
                if text.withUnsafeBytes({ Element.parseHex($0) }) != nil { accepted.append((position, byte)) }
            }
        }
        #expect(accepted.isEmpty, "accepted \(accepted.prefix(5))")
    }

    @Test func theElementEncodingIsPinned() {
        // Changing the hashed encoding would break every stored digest: this pins it.
        let element = Element(collection: "users", key: "42", version: 7, value: #"{"name":"Ada"}"#)
        // Computed independently (Python hashlib) from the encoding documented in the README.
        #expect(element.description == "c18e5937adb44c408efa790c7d7255c1daf5e077abf68dae37888c401d8c574e")
        #expect(Element(hex: element.description) == element)
        let same = Element(collection: "users", key: "42", version: 7, value: #"{"name":"Ada"}"#)
        #expect(element == same)
        #expect(Element(collection: "users", key: "42", version: 8, value: #"{"name":"Ada"}"#) != element)
        #expect(Element(collection: "users", key: "42", version: 7, value: #"{"name":"Ad"}"#) != element)
        // Length prefixes keep field boundaries: ("ab","c") and ("a","bc") differ.
        #expect(
            Element(collection: "ab", key: "c", version: 1, value: "1")
                != Element(collection: "a", key: "bc", version: 1, value: "1"))
        // The key hash depends on collection and key only.
        #expect(Element(collection: "users", key: "42", version: 9, value: "0").keyHash == element.keyHash)
    }

    @Test func aChangesElementTakesTheKeyHashOfTheElementItReplaces() {
        var generator = SeededGenerator(seed: 11)
        for index in 0..<300 {
            let value = String(repeating: "v", count: Int.random(in: 0..<400, using: &generator))
            let old = Element(collection: "orders", key: "k\(index)", version: 1, value: "0")
            let change = Change(
                lsn: UInt64(index + 2), collection: "orders", key: "k\(index)", operation: .upsert, value: value,
                isCommit: true)
            // One SHA-256 saved, the same element: the key hash depends on collection and key only.
            #expect(Element(change, replacing: old) == Element(change))
            #expect(Element(change, replacing: nil) == Element(change))
        }
        let delete = Change(lsn: 9, collection: "orders", key: "k1", operation: .delete, value: nil, isCommit: true)
        #expect(Element(delete, replacing: Element(collection: "orders", key: "k1", version: 1, value: "0")) == nil)
    }

    @Test func digestsAreOrderIndependentAndSubtractionUndoesAddition() {
        let elements = (0..<200).map {
            Element(collection: "c", key: "k\($0)", version: UInt64($0 + 1), value: "\($0)")
        }
        var forward = CollectionDigest.empty
        for element in elements { forward.add(element) }
        var backward = CollectionDigest.empty
        for element in elements.reversed() { backward.add(element) }
        #expect(forward == backward)
        #expect(forward.count == 200)
        for element in elements.prefix(150) { forward.remove(element) }
        var rest = CollectionDigest.empty
        for element in elements.dropFirst(150) { rest.add(element) }
        #expect(forward == rest)
        for element in elements.dropFirst(150) { forward.remove(element) }
        #expect(forward == .empty)
        #expect(CollectionDigest(count: rest.count, sumHex: rest.sumHex) == rest)
    }

    @Test func aChangeUpdatesTheDigestLikeARescan() {
        var digest = CollectionDigest.empty
        let first = Change(lsn: 1, collection: "c", key: "a", operation: .upsert, value: "1", isCommit: true)
        digest.apply(first, replacing: nil)
        let second = Change(lsn: 2, collection: "c", key: "a", operation: .upsert, value: "2", isCommit: true)
        digest.apply(second, replacing: Element(first))
        var rescanned = CollectionDigest.empty
        rescanned.add(Element(collection: "c", key: "a", version: 2, value: "2"))
        #expect(digest == rescanned)
        let delete = Change(lsn: 3, collection: "c", key: "a", operation: .delete, value: nil, isCommit: true)
        digest.apply(delete, replacing: Element(second))
        #expect(digest == .empty)
    }
}

@Suite struct RatelessSketchTests {
    func elements(_ range: Range<Int>, version: UInt64 = 1) -> [Element] {
        range.map { Element(collection: "c", key: "k\($0)", version: version, value: "\($0)") }
    }

    /// Decodes remote minus local by streaming remote symbols; returns the symbols used.
    func reconcile(remote: RatelessSketch, local: RatelessSketch) -> (RatelessDecoder, Int) {
        var decoder = RatelessDecoder()
        for index in 0..<remote.capacity {
            decoder.add(remote: remote.symbols[index], local: local.symbols[index])
            if decoder.isDecoded { return (decoder, index + 1) }
        }
        return (decoder, remote.capacity)
    }

    /// The index chain is part of the protocol: both peers must draw the same symbols. Its
    /// integer ceiling must agree with the floating-point one the mapping is defined by.
    @Test func indexChainTakesTheCeilingOfEachGap() {
        for seed in 0..<2_000 as Range<UInt64> {
            let checksum = RatelessMapping.checksum(SketchItem(keyHash: seed &* 0x9E37_79B9, contentHash: ~seed))
            var chain = RatelessMapping.Indices(checksum: checksum)
            var state = checksum
            var current: UInt64 = 0
            while current < 1 << 20 {
                state = state &* 0xDA94_2042_E4DD_58B5
                let gap = (Double(current) + 1.5) * (4_294_967_296.0 / (Double(state) + 1).squareRoot() - 1)
                current &+= UInt64(gap.rounded(.up))
                #expect(chain.advance() == current)
                if chain.current != current { return }
            }
        }
    }

    @Test(arguments: [1, 3, 30, 300, 999])
    func recoversExactlyTheDifference(differences: Int) {
        let shared = elements(0..<5000)
        let remoteExtra = elements(10_000..<(10_000 + differences / 3 + differences % 3))
        let localExtra = elements(20_000..<(20_000 + differences / 3))
        // Stale: same key, other version, on each side.
        let staleRemote = elements(30_000..<(30_000 + differences / 3), version: 2)
        let staleLocal = elements(30_000..<(30_000 + differences / 3), version: 1)
        var remote = RatelessSketch(capacity: 4096)
        var local = RatelessSketch(capacity: 4096)
        for element in shared + remoteExtra + staleRemote { remote.add(element) }
        for element in shared + localExtra + staleLocal { local.add(element) }
        let (decoder, used) = reconcile(remote: remote, local: local)
        #expect(decoder.isDecoded)
        #expect(Set(decoder.remoteOnly) == Set((remoteExtra + staleRemote).map(SketchItem.init)))
        #expect(Set(decoder.localOnly) == Set((localExtra + staleLocal).map(SketchItem.init)))
        let total = remoteExtra.count + localExtra.count + 2 * staleRemote.count
        // The paper's overhead: about 1.35 symbols per difference for large differences, more for tiny ones.
        #expect(used <= max(8, total * 2), "used \(used) symbols for \(total) differences")
    }

    @Test func aSketchSetAppliesChangesLikeEachSketchAlone() {
        let old = elements(0..<200)
        let new = elements(0..<200, version: 2)
        var set = SketchSet(capacity: 256)
        var users = RatelessSketch(capacity: 256)
        var orders = RatelessSketch(capacity: 256)
        for (index, element) in old.enumerated() {
            set.apply(index % 3 == 0 ? "users" : "orders", before: nil, after: element)
            if index % 3 == 0 { users.add(element) } else { orders.add(element) }
        }
        // Updates to "orders" in one run, as a batch of changes to one collection applies them.
        set.modify("orders") { sketch in
            for index in old.indices where index % 3 != 0 { sketch.apply(before: old[index], after: new[index]) }
        }
        for index in old.indices where index % 3 != 0 { orders.replace(old[index], with: new[index]) }
        set.apply("users", before: old[0], after: nil)
        users.remove(old[0])
        #expect(set.sketch(of: "users").symbols == users.symbols)
        #expect(set.sketch(of: "orders").symbols == orders.symbols)
        #expect(set.sketch(of: "none").symbols == RatelessSketch(capacity: 256).symbols)
    }

    @Test func equalSetsDecodeAtTheFirstSymbol() {
        var remote = RatelessSketch(capacity: 64)
        var local = RatelessSketch(capacity: 64)
        for element in elements(0..<100) {
            remote.add(element)
            local.add(element)
        }
        let (decoder, used) = reconcile(remote: remote, local: local)
        #expect(decoder.isDecoded && used == 1)
        #expect(decoder.remoteOnly.isEmpty && decoder.localOnly.isEmpty)
    }

    @Test func removingUndoesAddingAndSymbolsPastTheCapacityMatchAScan() {
        let all = elements(0..<300)
        var sketch = RatelessSketch(capacity: 128)
        for element in all { sketch.add(element) }
        for element in all.prefix(50) { sketch.remove(element) }
        for (old, new) in zip(all[50..<100], all[250..<300]) {
            sketch.replace(old, with: new)  // removes 50..<100, and 250..<300 go in twice...
            sketch.remove(new)  // ...so take the second copy out again
        }
        let items = all.map(SketchItem.init)
        let scanned = RatelessSketch.symbols(of: items.dropFirst(100), range: 0..<128)
        #expect(sketch.symbols == scanned)
        let tail = RatelessSketch.symbols(of: items, range: 100..<200)
        let whole = RatelessSketch.symbols(of: items, range: 0..<200)
        #expect(Array(whole[100..<200]) == tail)
    }
}

@Suite struct CheckpointWireTests {
    @Test func checkpointLinesRoundTrip() throws {
        var digest = CollectionDigest.empty
        digest.add(Element(collection: "users", key: "1", version: 3, value: "{}"))
        let checkpoint = Checkpoint(lsn: 42, digests: ["users": digest, "orders": .empty])
        var writer = JSONWriter()
        WireFormat.append(checkpoint, to: &writer)
        let line = Array(writer.bytes.dropLast())
        #expect(try WireFormat.parseStreamLine(line) == .checkpoint(checkpoint))
        #expect(checkpoint.restricted(to: ["users"]).digests.keys.sorted() == ["users"])
    }

    @Test func symbolsRoundTripInTheBinaryForm() throws {
        var sketch = RatelessSketch(capacity: 64)
        for index in 0..<20 { sketch.add(Element(collection: "c", key: "\(index)", version: 1, value: "1")) }
        sketch.remove(Element(collection: "c", key: "x", version: 1, value: "1"))
        var bytes: [UInt8] = []
        SymbolCodec.encode(sketch.symbols, into: &bytes)
        #expect(try SymbolCodec.decode(bytes) == sketch.symbols)
        #expect(bytes.count <= 64 * 26)
        #expect(throws: ConcordError.self) { try SymbolCodec.decode(Array(bytes.dropLast())) }
    }

    @Test func lookupRecordsRoundTripInTheBinaryForm() throws {
        let records = [
            Record(key: "a", version: 1, value: "{}"),
            Record(key: "ключ \u{1F600}", version: 1 << 40, value: String(repeating: "x", count: 300)),
        ]
        let bytes = RecordCodec.encode(lsn: 77, records: records)
        let decoded = try RecordCodec.decode(bytes)
        #expect(decoded.lsn == 77 && decoded.records == records)
        // Framing beyond key and value: the 8-byte header and a few bytes per record.
        let payload = records.reduce(0) { $0 + $1.key.utf8.count + $1.value.utf8.count }
        #expect(bytes.count - payload <= 8 + 2 * 12)
        let boundaries: Set = [8, 8 + 1 + 1 + 1 + 1 + 2]
        for cut in 1..<bytes.count where !boundaries.contains(cut) {
            // Every truncation but those at a record boundary is refused.
            #expect(throws: ConcordError.self) { try RecordCodec.decode(Array(bytes.prefix(cut))) }
        }
        var broken = bytes
        broken[9] = 0xFF  // the first key is no longer UTF-8
        #expect(throws: ConcordError.self) { try RecordCodec.decode(broken) }
    }

    @Test func keyHashIsTheElementsFirstWord() {
        let element = Element(collection: "users", key: "42", version: 7, value: "{\"a\":1}")
        #expect(Element.keyHash(collection: "users", key: "42") == element.keyHash)
    }

    @Test func checkpointPolicyCountsBoundaries() {
        var policy = CheckpointPolicy()
        policy.everyChanges = 100
        #expect(policy.crossesBoundary(from: 99, to: 100))
        #expect(!policy.crossesBoundary(from: 100, to: 199))
        #expect(policy.crossesBoundary(from: 150, to: 420))
    }
}
