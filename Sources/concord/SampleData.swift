import ConcordCore

/// Rows shaped like the peer benchmarks' (`shared/bench/peer_setup.sql`): JSON objects of a chosen size.
enum SampleData {
    private static let hexDigits = Array("0123456789abcdef".utf8)

    static func hex(_ seed: UInt64, count: Int) -> String {
        var generator = SeededGenerator(seed: seed)
        var bytes: [UInt8] = []
        bytes.reserveCapacity(count)
        while bytes.count < count {
            var word = generator.next()
            for _ in 0..<16 where bytes.count < count {
                bytes.append(hexDigits[Int(word & 0xF)])
                word >>= 4
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// A JSON object of about `size` bytes for record `id`; `revision` changes its content.
    static func value(id: Int, revision: Int = 0, size: Int = 225) -> String {
        let seed = UInt64(id) &* 31 &+ UInt64(revision)
        let head =
            "{\"id\":\(id),\"rev\":\(revision),\"name\":\"\(hex(seed, count: 32))\",\"email\":\"\(hex(seed &+ 7, count: 24))@example.com\",\"bio\":\""
        let bioLength = max(8, size - head.utf8.count - 2)
        return head + hex(seed &+ 13, count: bioLength) + "\"}"
    }

    /// Keys that sort like numbers of the same width.
    static func key(_ id: Int) -> String {
        let digits = String(id)
        return String(repeating: "0", count: max(0, 10 - digits.count)) + digits
    }
}
