import CConcordHash
import ConcordCore
import Crypto
import Testing

/// Concord's one-shot SHA-256 (both the accelerated and the portable compression) against
/// swift-crypto's, on every length around the one- and two-block padding boundaries.
@Suite struct SHA256Tests {
    func reference(_ bytes: [UInt8]) -> [UInt8] { Array(SHA256.hash(data: bytes)) }

    func concord(_ bytes: [UInt8], portable: Bool) -> [UInt8] {
        var digest = [UInt8](repeating: 0, count: 32)
        bytes.withUnsafeBytes { input in
            digest.withUnsafeMutableBufferPointer { out in
                if portable {
                    concord_sha256_portable(input.baseAddress, input.count, out.baseAddress!)
                } else {
                    concord_sha256(input.baseAddress, input.count, out.baseAddress!)
                }
            }
        }
        return digest
    }

    @Test func matchesTheReferenceOnEveryLengthUpTo300() {
        var generator = SystemRandomNumberGenerator()
        for length in 0...300 {
            let bytes = (0..<length).map { _ in UInt8.random(in: 0...255, using: &generator) }
            let expected = reference(bytes)
            #expect(concord(bytes, portable: false) == expected, "length \(length)")
            #expect(concord(bytes, portable: true) == expected, "length \(length), portable")
        }
    }

    func hex(_ bytes: [UInt8]) -> String {
        bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
    }

    @Test func knownAnswers() {
        // FIPS 180-4 examples.
        let abc = concord(Array("abc".utf8), portable: false)
        #expect(hex(abc).hasPrefix("ba7816bf8f01cfea414140de5dae2223"))
        let empty = concord([], portable: true)
        #expect(hex(empty).hasPrefix("e3b0c44298fc1c149afbf4c8996fb924"))
        let long = [UInt8](repeating: 0x61, count: 100_000)
        #expect(concord(long, portable: false) == reference(long))
    }
}
