/// Rateless Invertible Bloom Lookup Tables (Yang, Gilad, Alizadeh, SIGCOMM 2024):
/// a sketch of a set of ``Element``s whose first m coded symbols let a peer holding a
/// similar set recover the difference, for any m. About 1.35 symbols per differing
/// element suffice once the difference is more than a few dozen.

/// What a sketch holds of an ``Element``: its key hash and the first 64 bits of its content
/// hash. Sixteen bytes name the record (by key hash) and tell two versions of it apart, while
/// a coded symbol on the wire shrinks from 41 to 25 bytes against carrying the whole element.
/// A peeled item whose content hash collides with another version's (2^-64) is caught by the
/// digest check that follows every repair.
public struct SketchItem: Sendable, Hashable {
    public var keyHash: UInt64
    public var contentHash: UInt64

    public static let zero = SketchItem(keyHash: 0, contentHash: 0)

    public init(keyHash: UInt64, contentHash: UInt64) {
        self.keyHash = keyHash
        self.contentHash = contentHash
    }

    @inline(__always)
    public init(_ element: Element) {
        keyHash = element.words.0
        contentHash = element.words.1
    }

    public var isZero: Bool { keyHash == 0 && contentHash == 0 }

    @inline(__always)
    static func xor(_ a: SketchItem, _ b: SketchItem) -> SketchItem {
        SketchItem(keyHash: a.keyHash ^ b.keyHash, contentHash: a.contentHash ^ b.contentHash)
    }
}

/// One coded symbol: the XOR of the items mapped to it, the XOR of their checksums and
/// their number (a difference of counts once a peer's symbol is subtracted).
public struct CodedSymbol: Sendable, Hashable {
    public var sum: SketchItem
    public var checksum: UInt64
    public var count: Int64

    public static let empty = CodedSymbol(sum: .zero, checksum: 0, count: 0)

    public init(sum: SketchItem, checksum: UInt64, count: Int64) {
        self.sum = sum
        self.checksum = checksum
        self.count = count
    }

    public var isEmpty: Bool { count == 0 && checksum == 0 && sum.isZero }

    /// Adds (`direction` +1) or removes (-1) `item`, whose checksum is `checksum`.
    @inline(__always)
    public mutating func apply(_ item: SketchItem, checksum: UInt64, direction: Int64) {
        sum = SketchItem.xor(sum, item)
        self.checksum ^= checksum
        count += direction
    }

    /// This symbol minus `other` (XOR the sums and checksums, subtract the counts).
    public func subtracting(_ other: CodedSymbol) -> CodedSymbol {
        CodedSymbol(
            sum: SketchItem.xor(sum, other.sum), checksum: checksum ^ other.checksum, count: count - other.count)
    }
}

public enum RatelessMapping {
    /// A 64-bit hash of an item, independent of its bits as they are XORed into sums.
    @inline(__always)
    public static func checksum(_ item: SketchItem) -> UInt64 {
        mix(mix(0x243F_6A88_85A3_08D3 ^ item.keyHash) ^ item.contentHash)
    }

    @inline(__always)
    static func mix(_ value: UInt64) -> UInt64 {
        var z = value &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// The symbol indices an element maps to, in increasing order: 0 first, then gaps drawn
    /// so that symbol i holds an element with probability about 1 / (1 + i/2).
    public struct Indices: Sendable {
        var state: UInt64
        public private(set) var current: UInt64 = 0

        public init(checksum: UInt64) {
            state = checksum
        }

        /// Moves to the next index and returns it.
        @inline(__always)
        public mutating func advance() -> UInt64 {
            state = state &* 0xDA94_2042_E4DD_58B5
            let gap = (Double(current) + 1.5) * (4_294_967_296.0 / (Double(state) + 1).squareRoot() - 1)
            // `gap` is finite and at least 0: truncating and stepping up where it had a fraction
            // is its ceiling, without the call to the C library's `ceil` the generic target makes.
            let whole = UInt64(gap)
            current &+= Double(whole) == gap ? whole : whole &+ 1
            return current
        }
    }
}

/// The first `capacity` coded symbols of a set, kept up to date as elements come and go.
///
/// Adding or removing an element touches about 2·ln(capacity/2) symbols.
public struct RatelessSketch: Sendable {
    public let capacity: Int
    public private(set) var symbols: [CodedSymbol]

    public init(capacity: Int) {
        self.capacity = capacity
        symbols = Array(repeating: .empty, count: capacity)
    }

    public mutating func add(_ element: Element) { apply(SketchItem(element), direction: 1) }
    public mutating func remove(_ element: Element) { apply(SketchItem(element), direction: -1) }

    /// Replaces `before` (if any) by `after` (if any).
    public mutating func apply(before: Element?, after: Element?) {
        switch (before, after) {
        case (let before?, let after?): replace(before, with: after)
        case (let before?, nil): remove(before)
        case (nil, let after?): add(after)
        case (nil, nil): break
        }
    }

    /// Removes `old` and adds `new` in one pass: the two index chains are independent, so
    /// the processor overlaps their arithmetic. This is what a change costs.
    public mutating func replace(_ old: Element, with new: Element) {
        let old = SketchItem(old)
        let new = SketchItem(new)
        let oldChecksum = RatelessMapping.checksum(old)
        let newChecksum = RatelessMapping.checksum(new)
        var oldIndices = RatelessMapping.Indices(checksum: oldChecksum)
        var newIndices = RatelessMapping.Indices(checksum: newChecksum)
        var oldIndex: UInt64 = 0
        var newIndex: UInt64 = 0
        symbols.withUnsafeMutableBufferPointer { symbols in
            let end = UInt64(symbols.count)
            while oldIndex < end || newIndex < end {
                if oldIndex < end {
                    symbols[Int(oldIndex)].apply(old, checksum: oldChecksum, direction: -1)
                    oldIndex = oldIndices.advance()
                }
                if newIndex < end {
                    symbols[Int(newIndex)].apply(new, checksum: newChecksum, direction: 1)
                    newIndex = newIndices.advance()
                }
            }
        }
    }

    @inline(__always)
    mutating func apply(_ element: SketchItem, direction: Int64) {
        let checksum = RatelessMapping.checksum(element)
        var indices = RatelessMapping.Indices(checksum: checksum)
        var index: UInt64 = 0
        symbols.withUnsafeMutableBufferPointer { symbols in
            while index < UInt64(symbols.count) {
                symbols[Int(index)].apply(element, checksum: checksum, direction: direction)
                index = indices.advance()
            }
        }
    }

    /// Symbols `range` of a set, computed from its items (for symbols past the kept capacity).
    public static func symbols<Items: Sequence<SketchItem>>(of elements: Items, range: Range<Int>) -> [CodedSymbol] {
        var symbols = Array(repeating: CodedSymbol.empty, count: range.count)
        for element in elements {
            let checksum = RatelessMapping.checksum(element)
            var indices = RatelessMapping.Indices(checksum: checksum)
            var index: UInt64 = 0
            while index < UInt64(range.upperBound) {
                if index >= UInt64(range.lowerBound) {
                    symbols[Int(index) - range.lowerBound].apply(element, checksum: checksum, direction: 1)
                }
                index = indices.advance()
            }
        }
        return symbols
    }
}

/// Recovers the difference between a remote set and the local one from the remote set's
/// coded symbols, received in order, minus the local set's symbols at the same indices.
public struct RatelessDecoder: Sendable {
    /// Items only the remote set holds, and items only the local set holds.
    public private(set) var remoteOnly: [SketchItem] = []
    public private(set) var localOnly: [SketchItem] = []

    private var differences: [CodedSymbol] = []
    private var pure: [Int] = []
    private var decodedRemainders = 0

    private struct Decoded {
        var element: SketchItem
        var checksum: UInt64
        var direction: Int64
        var indices: RatelessMapping.Indices
        /// The next symbol index this element maps to that has not been received yet.
        var next: UInt64
    }

    private var decoded: [Decoded] = []

    public init() {}

    /// Number of symbols received so far.
    public var symbolCount: Int { differences.count }

    /// Whether every received symbol has been peeled to nothing: the difference is known.
    public var isDecoded: Bool { !differences.isEmpty && decodedRemainders == differences.count }

    /// Adds the next symbol: `remote` from the peer, `local` the local set's symbol at the same index.
    public mutating func add(remote: CodedSymbol, local: CodedSymbol) {
        var symbol = remote.subtracting(local)
        let index = UInt64(differences.count)
        // Elements already recovered also sit in the new symbol if they map to it.
        for position in decoded.indices where decoded[position].next == index {
            symbol.apply(
                decoded[position].element, checksum: decoded[position].checksum, direction: -decoded[position].direction
            )
            decoded[position].next = decoded[position].indices.advance()
        }
        differences.append(symbol)
        if symbol.isEmpty {
            decodedRemainders += 1
        } else if Self.isPure(symbol) {
            pure.append(differences.count - 1)
        }
        peel()
    }

    @inline(__always)
    static func isPure(_ symbol: CodedSymbol) -> Bool {
        (symbol.count == 1 || symbol.count == -1) && RatelessMapping.checksum(symbol.sum) == symbol.checksum
    }

    private mutating func peel() {
        while let position = pure.popLast() {
            let symbol = differences[position]
            guard Self.isPure(symbol) else { continue }
            let element = symbol.sum
            let checksum = symbol.checksum
            let direction = symbol.count
            if direction == 1 { remoteOnly.append(element) } else { localOnly.append(element) }
            var indices = RatelessMapping.Indices(checksum: checksum)
            var index: UInt64 = 0
            while index < UInt64(differences.count) {
                let wasEmpty = differences[Int(index)].isEmpty
                differences[Int(index)].apply(element, checksum: checksum, direction: -direction)
                let nowEmpty = differences[Int(index)].isEmpty
                if nowEmpty, !wasEmpty { decodedRemainders += 1 }
                if !nowEmpty, wasEmpty { decodedRemainders -= 1 }
                if !nowEmpty, Self.isPure(differences[Int(index)]) { pure.append(Int(index)) }
                index = indices.advance()
            }
            decoded.append(
                Decoded(element: element, checksum: checksum, direction: direction, indices: indices, next: index))
        }
    }
}

/// The first coded symbols of each collection's sketch, kept up to date change by change
/// like the digests, so a reconciliation can start without scanning the records.
public struct SketchSet: Sendable {
    public let capacity: Int
    public private(set) var sketches: [String: RatelessSketch] = [:]

    public init(capacity: Int) {
        self.capacity = capacity
    }

    /// Replaces `before` (if any) by `after` (if any) in `collection`'s sketch.
    public mutating func apply(_ collection: String, before: Element?, after: Element?) {
        modify(collection) { $0.apply(before: before, after: after) }
    }

    /// Runs `body` on `collection`'s sketch, taken out of the dictionary so it is not copied.
    ///
    /// Callers with many changes to one collection look it up once, not twice per change.
    public mutating func modify(_ collection: String, _ body: (inout RatelessSketch) -> Void) {
        var sketch = sketches.removeValue(forKey: collection) ?? RatelessSketch(capacity: capacity)
        body(&sketch)
        sketches[collection] = sketch
    }

    public func sketch(of collection: String) -> RatelessSketch {
        sketches[collection] ?? RatelessSketch(capacity: capacity)
    }
}

extension SketchSet {
    /// Replaces `collection`'s sketch, e.g. by one rebuilt from the stored rows.
    public mutating func set(_ collection: String, _ sketch: RatelessSketch) {
        sketches[collection] = sketch
    }
}
