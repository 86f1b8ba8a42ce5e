import CZlib
import ConcordCore
import Foundation

/// What an export file says about itself: which feed, at which LSN, which collections with
/// how many records and what digest.
public struct SnapshotHeader: Sendable, Equatable {
    public struct Collection: Sendable, Equatable {
        public var name: String
        public var digest: CollectionDigest
        public init(name: String, digest: CollectionDigest) {
            self.name = name
            self.digest = digest
        }
    }

    public var feedID: String
    public var source: String
    /// Every collection is as the source held it after this LSN.
    public var lsn: LSN
    /// The collections a replica made from the file follows (`nil`: all).
    public var filter: [String]?
    public var collections: [Collection]
    public var createdAt: Date

    public init(
        feedID: String, source: String, lsn: LSN, filter: [String]?, collections: [Collection], createdAt: Date = Date()
    ) {
        self.feedID = feedID
        self.source = source
        self.lsn = lsn
        self.filter = filter
        self.collections = collections
        self.createdAt = createdAt
    }

    public var recordCount: Int64 { collections.reduce(0) { $0 + $1.digest.count } }

    func encoded() throws -> [UInt8] {
        var object: [String: Any] = [
            "format": "concord-export", "version": 1, "feed": feedID, "source": source, "lsn": lsn,
            "created_at": createdAt.timeIntervalSince1970,
            "collections": collections.map {
                ["name": $0.name, "count": $0.digest.count, "digest": $0.digest.sumHex] as [String: Any]
            },
        ]
        if let filter { object["filter"] = filter }
        return Array(try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]))
    }

    static func decode(_ bytes: [UInt8]) throws(ConcordError) -> SnapshotHeader {
        let refused = ConcordError(.invalidRequest, "the export file's header is not a Concord export header")
        guard let object = try? JSONSerialization.jsonObject(with: Data(bytes)) as? [String: Any],
            object["format"] as? String == "concord-export", object["version"] as? Int == 1,
            let feed = object["feed"] as? String, let source = object["source"] as? String,
            let lsn = (object["lsn"] as? NSNumber)?.uint64Value,
            let created = object["created_at"] as? Double,
            let list = object["collections"] as? [[String: Any]]
        else { throw refused }
        var collections: [Collection] = []
        for entry in list {
            guard let name = entry["name"] as? String, let count = (entry["count"] as? NSNumber)?.int64Value,
                let sum = entry["digest"] as? String, let digest = CollectionDigest(count: count, sumHex: sum)
            else { throw refused }
            collections.append(Collection(name: name, digest: digest))
        }
        return SnapshotHeader(
            feedID: feed, source: source, lsn: lsn, filter: object["filter"] as? [String], collections: collections,
            createdAt: Date(timeIntervalSince1970: created))
    }
}

/// The export file: a self-describing, compressed, checksummed snapshot.
///
/// Layout: the magic `CONCORD-EXPORT\n`, a 4-byte big-endian format version (1), the header
/// (4-byte length, JSON, its SHA-256), then blocks of records (4-byte compressed length,
/// 4-byte raw length, zlib data, SHA-256 of the raw bytes), then a zero length and the
/// SHA-256 of the header's and every block's digest in order. Every byte is covered by a
/// check: a flipped byte, a truncation, a spliced block or a foreign file is refused. A
/// block's raw bytes are records: varint collection index (into the header's list), varint
/// key length, key, varint version, varint value length, value.
public enum SnapshotFile {
    static let magic = Array("CONCORD-EXPORT\n".utf8)
    static let version: UInt32 = 1
    /// Raw bytes per block before compression.
    static let blockSize = 1 << 20
    static let maxBlockSize = 64 << 20

    /// Writes a snapshot file, block by block.
    public struct Writer {
        let handle: FileHandle
        var chain: [UInt8] = []
        var block: [UInt8] = []
        public private(set) var records = 0
        public private(set) var bytesWritten = 0
        let collectionIndex: [String: Int]

        /// Creates `path` (which must not exist) and writes the header.
        public init(path: String, header: SnapshotHeader) throws {
            guard FileManager.default.createFile(atPath: path, contents: nil) else {
                throw ConcordError(.invalidRequest, "cannot create \(path)")
            }
            handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
            collectionIndex = Dictionary(
                uniqueKeysWithValues: header.collections.enumerated().map { ($0.element.name, $0.offset) })
            var start = SnapshotFile.magic
            SnapshotFile.appendUInt32(SnapshotFile.version, to: &start)
            let encoded = try header.encoded()
            SnapshotFile.appendUInt32(UInt32(encoded.count), to: &start)
            start += encoded
            let digest = SnapshotFile.sha256(encoded)
            start += digest
            chain += digest
            try write(start)
            block.reserveCapacity(SnapshotFile.blockSize + 4096)
        }

        public mutating func append(_ record: ConcordCore.Record, collection: String) throws {
            guard let index = collectionIndex[collection] else {
                throw ConcordError(.internal, "collection \(collection) is not in the export header")
            }
            BinaryWire.appendVarint(UInt64(index), to: &block)
            BinaryWire.appendVarint(UInt64(record.key.utf8.count), to: &block)
            block.append(contentsOf: record.key.utf8)
            BinaryWire.appendVarint(record.version, to: &block)
            BinaryWire.appendVarint(UInt64(record.value.utf8.count), to: &block)
            block.append(contentsOf: record.value.utf8)
            records += 1
            if block.count >= SnapshotFile.blockSize { try flush() }
        }

        mutating func flush() throws {
            guard !block.isEmpty else { return }
            let compressed = try SnapshotFile.deflate(block)
            var frame: [UInt8] = []
            frame.reserveCapacity(compressed.count + 40)
            SnapshotFile.appendUInt32(UInt32(compressed.count), to: &frame)
            SnapshotFile.appendUInt32(UInt32(block.count), to: &frame)
            frame += compressed
            let digest = SnapshotFile.sha256(block)
            frame += digest
            chain += digest
            try write(frame)
            block.removeAll(keepingCapacity: true)
        }

        /// Writes the last block and the end, and makes the file durable.
        public mutating func finish() throws {
            try flush()
            var end: [UInt8] = []
            SnapshotFile.appendUInt32(0, to: &end)
            end += SnapshotFile.sha256(chain)
            try write(end)
            try handle.synchronize()
            try handle.close()
        }

        mutating func write(_ bytes: [UInt8]) throws {
            try handle.write(contentsOf: bytes)
            bytesWritten += bytes.count
        }
    }

    /// Reads a snapshot file, checking every byte; a problem is a `ConcordError` that says what.
    public struct Reader {
        let handle: FileHandle
        let path: String
        public let header: SnapshotHeader
        public let fileSize: Int
        public private(set) var bytesRead = 0
        var chain: [UInt8] = []
        var finished = false

        public init(path: String) throws {
            self.path = path
            guard let handle = FileHandle(forReadingAtPath: path) else {
                throw ConcordError(.invalidRequest, "cannot open \(path)")
            }
            self.handle = handle
            fileSize = Int((try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? 0)
            var bytesRead = 0
            let magic = try Self.read(
                handle, SnapshotFile.magic.count + 4, path: path, what: "the file start", &bytesRead)
            guard Array(magic.prefix(SnapshotFile.magic.count)) == SnapshotFile.magic else {
                throw ConcordError(.invalidRequest, "\(path) is not a Concord export file")
            }
            let version = SnapshotFile.readUInt32(magic, SnapshotFile.magic.count)
            guard version == SnapshotFile.version else {
                throw ConcordError(.invalidRequest, "\(path) has export format \(version); this Concord reads 1")
            }
            let length = Int(
                SnapshotFile.readUInt32(try Self.read(handle, 4, path: path, what: "the header", &bytesRead), 0))
            guard length <= SnapshotFile.maxBlockSize else {
                throw ConcordError(.invalidRequest, "\(path) is corrupt: header length \(length)")
            }
            let encoded = try Self.read(handle, length, path: path, what: "the header", &bytesRead)
            let digest = try Self.read(handle, 32, path: path, what: "the header checksum", &bytesRead)
            guard SnapshotFile.sha256(encoded) == digest else {
                throw ConcordError(.invalidRequest, "\(path) is corrupt: the header fails its checksum")
            }
            header = try SnapshotHeader.decode(encoded)
            chain = digest
            self.bytesRead = bytesRead
        }

        /// The next block's records as (collection index, record), or `nil` after the verified end.
        public mutating func nextBlock() throws -> [(collection: Int, record: ConcordCore.Record)]? {
            guard !finished else { return nil }
            let lengths = try Self.read(handle, 4, path: path, what: "a block", &bytesRead)
            let compressedLength = Int(SnapshotFile.readUInt32(lengths, 0))
            if compressedLength == 0 {
                let end = try Self.read(handle, 32, path: path, what: "the end checksum", &bytesRead)
                guard SnapshotFile.sha256(chain) == end else {
                    throw ConcordError(.invalidRequest, "\(path) is corrupt: the end checksum does not match")
                }
                guard try handle.read(upToCount: 1)?.isEmpty ?? true else {
                    throw ConcordError(.invalidRequest, "\(path) is corrupt: bytes after the end")
                }
                finished = true
                return nil
            }
            let rawLength = Int(
                SnapshotFile.readUInt32(try Self.read(handle, 4, path: path, what: "a block", &bytesRead), 0))
            guard compressedLength <= SnapshotFile.maxBlockSize, rawLength <= SnapshotFile.maxBlockSize else {
                throw ConcordError(.invalidRequest, "\(path) is corrupt: a block length is out of range")
            }
            let compressed = try Self.read(handle, compressedLength, path: path, what: "a block", &bytesRead)
            let digest = try Self.read(handle, 32, path: path, what: "a block checksum", &bytesRead)
            guard let raw = SnapshotFile.inflate(compressed, rawLength: rawLength), SnapshotFile.sha256(raw) == digest
            else {
                throw ConcordError(
                    .invalidRequest, "\(path) is corrupt: a block at byte \(bytesRead) fails its checksum")
            }
            chain += digest
            return try Self.records(raw, collections: header.collections.count, path: path)
        }

        static func records(_ raw: [UInt8], collections: Int, path: String) throws(ConcordError)
            -> [(collection: Int, record: ConcordCore.Record)]
        {
            var offset = 0
            var records: [(collection: Int, record: ConcordCore.Record)] = []
            while offset < raw.count {
                let collection = try BinaryWire.readVarint(raw, &offset)
                guard collection < UInt64(collections) else {
                    throw ConcordError(.invalidRequest, "\(path) is corrupt: a record names no collection")
                }
                let key = try RecordCodec.text(raw, &offset, what: "key")
                let version = try BinaryWire.readVarint(raw, &offset)
                let value = try RecordCodec.text(raw, &offset, what: "value")
                records.append((Int(collection), ConcordCore.Record(key: key, version: version, value: value)))
            }
            return records
        }

        static func read(_ handle: FileHandle, _ count: Int, path: String, what: String, _ total: inout Int) throws
            -> [UInt8]
        {
            guard count > 0 else { return [] }
            let data = try handle.read(upToCount: count) ?? Data()
            guard data.count == count else {
                throw ConcordError(.invalidRequest, "\(path) is truncated in \(what)")
            }
            total += count
            return Array(data)
        }

        public func close() { try? handle.close() }
    }

    // MARK: Pieces

    static func appendUInt32(_ value: UInt32, to bytes: inout [UInt8]) {
        bytes += [UInt8(value >> 24), UInt8(value >> 16 & 0xFF), UInt8(value >> 8 & 0xFF), UInt8(value & 0xFF)]
    }

    static func readUInt32(_ bytes: [UInt8], _ offset: Int) -> UInt32 {
        bytes[offset..<(offset + 4)].reduce(0) { $0 << 8 | UInt32($1) }
    }

    static func sha256(_ bytes: [UInt8]) -> [UInt8] {
        let words = bytes.withUnsafeBytes { Element.sha256($0) }
        var out: [UInt8] = []
        out.reserveCapacity(32)
        for word in [words.0, words.1, words.2, words.3] { BinaryWire.appendWord(word, to: &out) }
        return out
    }

    static func deflate(_ raw: [UInt8]) throws -> [UInt8] {
        var capacity = compressBound(uLong(raw.count))
        var out = [UInt8](repeating: 0, count: Int(capacity))
        let status = raw.withUnsafeBufferPointer { input in
            out.withUnsafeMutableBufferPointer { output in
                compress2(output.baseAddress, &capacity, input.baseAddress, uLong(input.count), 1)
            }
        }
        guard status == Z_OK else { throw ConcordError(.internal, "compression failed (zlib \(status))") }
        out.removeSubrange(Int(capacity)...)
        return out
    }

    static func inflate(_ compressed: [UInt8], rawLength: Int) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: rawLength)
        var length = uLong(rawLength)
        let status = compressed.withUnsafeBufferPointer { input in
            out.withUnsafeMutableBufferPointer { output in
                uncompress(output.baseAddress, &length, input.baseAddress, uLong(input.count))
            }
        }
        guard status == Z_OK, length == uLong(rawLength) else { return nil }
        return out
    }
}
