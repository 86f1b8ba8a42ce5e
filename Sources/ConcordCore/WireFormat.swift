/// The NDJSON lines and JSON bodies of Concord's HTTP protocol (version 1).
///
/// Values travel as raw JSON inside the line (never re-escaped), so a person with
/// `curl` reads them as they were written and a subscriber stores them byte for byte.
public enum WireFormat {
    /// Limits on what a peer may send.
    public struct Limits: Sendable, Hashable {
        public var maxKeyBytes = 1024
        public var maxValueBytes = 1 << 20
        public var maxBatchChanges = 10_000
        public var maxDepth = JSONScanner.defaultMaxDepth
        public init() {}
    }

    // MARK: Stream items

    /// `{"lsn":7,"collection":"users","key":"42","op":"upsert","value":{...},"commit":true}`,
    /// `{"lsn":9,"from":8,"op":"skip","commit":true}`, each followed by a newline.
    ///
    /// `includeBefore` adds `"before":"<64 hex>"`, the element the change replaces, for readers
    /// that keep digests; it is opt-in because it adds about 75 bytes per change.
    public static func append(_ item: StreamItem, to writer: inout JSONWriter, includeBefore: Bool = true) {
        switch item {
        case .change(let change):
            writer.raw("{\"lsn\":")
            writer.number(change.lsn)
            writer.raw(",")
            appendOperation(collection: change.collection, key: change.key, value: change.value, to: &writer)
            if includeBefore, let before = change.before {
                writer.raw(",\"before\":\"")
                Element.appendHex(before.words, to: &writer.bytes)
                writer.raw("\"")
            }
        case .skip(let from, let through, _):
            writer.raw("{\"lsn\":")
            writer.number(through)
            writer.raw(",\"from\":")
            writer.number(from)
            writer.raw(",\"op\":\"skip\"")
        }
        writer.raw(item.isCommit ? ",\"commit\":true}\n" : ",\"commit\":false}\n")
    }

    /// About how many bytes `append` writes for `items` and the checkpoint lines among them: a
    /// writer sized by it seldom grows, where a guess per item would copy a stream batch again
    /// (and fault in fresh pages) whenever values are longer or `before` elements come along.
    public static func encodedSize(
        of items: some Collection<StreamItem>, includeBefore: Bool, checkpoints: [Checkpoint] = []
    ) -> Int {
        var size = 0
        for item in items { size += lineSize(of: item, includeBefore: includeBefore) }
        for checkpoint in checkpoints {
            size += 48
            for (collection, _) in checkpoint.digests { size += collection.utf8.count + 96 }
        }
        // Escapes.
        return size + size / 16 + 256
    }

    /// About how many bytes `item`'s line takes, escapes left out.
    static func lineSize(of item: StreamItem, includeBefore: Bool) -> Int {
        switch item {
        case .change(let change):
            // The members' names and punctuation, with a 20-digit LSN.
            var size = 92 + change.collection.utf8.count + change.key.utf8.count + (change.value?.utf8.count ?? 0)
            if includeBefore, change.before != nil { size += 76 }
            return size
        case .skip:
            return 80
        }
    }

    /// Cuts `items` into runs of consecutive items whose lines take at most about `bytes` each,
    /// and as many as fit: a line longer than `bytes` is a run of its own.
    ///
    /// A stream writes a run at a time. The publisher judges a reader stalled by how long its
    /// connection stays full, and a write is taken whole into that backlog: a write of a bounded
    /// size drains in bounded time for any reader that reads at all.
    public static func runs(of items: [StreamItem], includeBefore: Bool, bytes: Int) -> [Range<Int>] {
        var runs: [Range<Int>] = []
        var start = items.startIndex
        var size = 0
        for index in items.indices {
            let line = lineSize(of: items[index], includeBefore: includeBefore)
            if size + line > bytes, index > start {
                runs.append(start..<index)
                start = index
                size = 0
            }
            size += line
        }
        if start < items.endIndex { runs.append(start..<items.endIndex) }
        return runs
    }

    /// `"collection":…,"key":…,"op":"upsert","value":…` (or `"op":"delete"`): the members a
    /// change line and a write request share.
    static func appendOperation(collection: String, key: String, value: String?, to writer: inout JSONWriter) {
        writer.raw("\"collection\":")
        writer.string(collection)
        writer.raw(",\"key\":")
        writer.string(key)
        if let value {
            writer.raw(",\"op\":\"upsert\",\"value\":")
            writer.raw(value)
        } else {
            writer.raw(",\"op\":\"delete\"")
        }
    }

    /// `{"op":"heartbeat","head":N}`: keeps an idle stream open and tells the reader the head.
    public static func appendHeartbeat(head: LSN, to writer: inout JSONWriter) {
        writer.raw("{\"op\":\"heartbeat\",\"head\":")
        writer.number(head)
        writer.raw("}\n")
    }

    /// `{"op":"checkpoint","lsn":P,"digests":{"users":"<count>:<64 hex>"}}`: the source's
    /// digests after the transaction that ends at P; it follows that transaction's last item.
    public static func append(_ checkpoint: Checkpoint, to writer: inout JSONWriter) {
        writer.raw("{\"op\":\"checkpoint\",\"lsn\":")
        writer.number(checkpoint.lsn)
        writer.raw(",\"digests\":{")
        for (index, (name, digest)) in checkpoint.digests.sorted(by: { $0.key < $1.key }).enumerated() {
            if index > 0 { writer.raw(",") }
            writer.string(name)
            writer.raw(":\"")
            writer.raw(digest.description)
            writer.raw("\"")
        }
        writer.raw("}}\n")
    }

    /// A line of a change stream as a reader sees it.
    public enum StreamLine: Sendable, Hashable {
        case item(StreamItem)
        case heartbeat(head: LSN)
        case checkpoint(Checkpoint)
    }

    public static func parseStreamLine(_ line: [UInt8]) throws(ConcordError) -> StreamLine {
        try parseStreamLine(line, range: 0..<line.count)
    }

    /// Parses the line at `range` of `bytes` (no newline).
    ///
    /// `hashingAfter` also computes a change's ``Change/after`` element, for a reader that keeps
    /// digests: done while the change is built, it is not copied again to be filled in.
    public static func parseStreamLine(
        _ bytes: [UInt8], range: Range<Int>, hashingAfter: Bool = false
    ) throws(ConcordError) -> StreamLine {
        let scanner = JSONScanner(bytes)
        var lsn: LSN?
        var from: LSN?
        var head: LSN?
        var collection: String?
        var key: String?
        var op: String?
        var value: String?
        var isCommit = false
        var before: Element?
        var digests: [String: CollectionDigest]?
        // One pass over the line; names are compared as bytes, in the order a change line has them.
        try scanner.forEachMember(ofDocumentIn: range) { (name, member) throws(ConcordError) in
            if scanner.nameIs(name, "lsn") {
                lsn = try scanner.decodeUInt64(member)
            } else if scanner.nameIs(name, "collection") {
                collection = try scanner.decodeString(member)
            } else if scanner.nameIs(name, "key") {
                key = try scanner.decodeString(member)
            } else if scanner.nameIs(name, "op") {
                op = try scanner.decodeString(member)
            } else if scanner.nameIs(name, "value") {
                value = String(decoding: scanner.bytes[member.range], as: UTF8.self)
            } else if scanner.nameIs(name, "before") {
                // 64 hex digits between the quotes: no escapes to decode.
                let range = member.range
                let words = scanner.bytes.withUnsafeBytes { bytes in
                    member.kind == .string && range.count == 66
                        ? Element.parseHex(
                            UnsafeRawBufferPointer(rebasing: bytes[(range.lowerBound + 1)..<(range.upperBound - 1)]))
                        : nil
                }
                guard let words else {
                    throw ConcordError(.protocolViolation, "\"before\" must be 64 hex digits")
                }
                before = Element(words: words)
            } else if scanner.nameIs(name, "commit") {
                isCommit = try scanner.decodeBool(member)
            } else if scanner.nameIs(name, "from") {
                from = try scanner.decodeUInt64(member)
            } else if scanner.nameIs(name, "head") {
                head = try scanner.decodeUInt64(member)
            } else if scanner.nameIs(name, "digests") {
                var parsed: [String: CollectionDigest] = [:]
                try scanner.forEachMember(of: member) { (collection, text) throws(ConcordError) in
                    let description = try scanner.decodeString(text)
                    guard let digest = CollectionDigest(description: description) else {
                        throw ConcordError(.protocolViolation, "digest must be <count>:<64 hex>")
                    }
                    parsed[collection] = digest
                }
                digests = parsed
            }
            // Unknown members are for newer readers.
        }
        switch op {
        case "checkpoint":
            guard let lsn, let digests else {
                throw ConcordError(.protocolViolation, "checkpoint without lsn or digests")
            }
            return .checkpoint(Checkpoint(lsn: lsn, digests: digests))
        case "heartbeat":
            guard let head else { throw ConcordError(.protocolViolation, "heartbeat without head") }
            return .heartbeat(head: head)
        case "skip":
            guard let lsn, let from, from >= 1, from <= lsn else {
                throw ConcordError(.protocolViolation, "skip without a valid range")
            }
            return .item(.skip(from: from, through: lsn, isCommit: isCommit))
        case "upsert", "delete":
            guard let lsn, lsn >= 1, let collection, let key else {
                throw ConcordError(.protocolViolation, "change without lsn, collection or key")
            }
            let operation: ChangeOperation = op == "upsert" ? .upsert : .delete
            if operation == .upsert, value == nil {
                throw ConcordError(.protocolViolation, "upsert without a value")
            }
            var change = Change(
                lsn: lsn, collection: collection, key: key, operation: operation,
                value: operation == .upsert ? value : nil, isCommit: isCommit, before: before)
            if hashingAfter { change.after = Element(change, replacing: before) }
            return .item(.change(change))
        default:
            throw ConcordError(.protocolViolation, "unknown stream item \(op ?? "without op")")
        }
    }

    // MARK: Snapshot pages

    /// First line: `{"collection":"users","lsn":N,"count":n,"more":true}`, then one
    /// `{"key":"k","version":v,"value":{...}}` line per record.
    public static func encode(_ page: SnapshotPage) -> [UInt8] {
        var writer = JSONWriter(capacity: 64 + page.records.count * 64)
        writer.raw("{\"collection\":")
        writer.string(page.collection)
        writer.raw(",\"lsn\":")
        writer.number(page.lsn)
        writer.raw(",\"count\":")
        writer.number(page.records.count)
        writer.raw(page.hasMore ? ",\"more\":true}\n" : ",\"more\":false}\n")
        for record in page.records {
            writer.raw("{\"key\":")
            writer.string(record.key)
            writer.raw(",\"version\":")
            writer.number(record.version)
            writer.raw(",\"value\":")
            writer.raw(record.value)
            writer.raw("}\n")
        }
        return writer.bytes
    }

    public static func decodePage(_ bytes: [UInt8]) throws(ConcordError) -> SnapshotPage {
        // Lines are parsed where they lie in the body; nothing is copied but the fields kept.
        let scanner = JSONScanner(bytes)
        var lines = LineRanges(bytes)
        guard let header = lines.next() else { throw ConcordError(.protocolViolation, "empty snapshot page") }
        var page = SnapshotPage(collection: "", lsn: 0, records: [], hasMore: false)
        var count = 0
        try scanner.forEachMember(of: try scanner.document(in: header)) { (name, member) throws(ConcordError) in
            switch name {
            case "collection": page.collection = try scanner.decodeString(member)
            case "lsn": page.lsn = try scanner.decodeUInt64(member)
            case "count": count = Int(try scanner.decodeUInt64(member))
            case "more": page.hasMore = try scanner.decodeBool(member)
            default: break
            }
        }
        page.records.reserveCapacity(min(count, 100_000))
        while let line = lines.next() {
            var key: String?
            var version: LSN?
            var value: String?
            try scanner.forEachMember(of: try scanner.document(in: line)) { (name, member) throws(ConcordError) in
                switch name {
                case "key": key = try scanner.decodeString(member)
                case "version": version = try scanner.decodeUInt64(member)
                case "value": value = String(decoding: scanner.bytes[member.range], as: UTF8.self)
                default: break
                }
            }
            guard let key, let version, let value else {
                throw ConcordError(.protocolViolation, "snapshot record without key, version or value")
            }
            page.records.append(Record(key: key, version: version, value: value))
        }
        guard lines.isAtEnd, page.records.count == count else {
            throw ConcordError(.protocolViolation, "truncated snapshot page: \(page.records.count) of \(count) records")
        }
        return page
    }

    // MARK: Feed

    public static func encode(_ feed: FeedInfo) -> [UInt8] {
        var writer = JSONWriter()
        writer.raw("{\"feed\":")
        writer.string(feed.feedID)
        writer.raw(",\"head\":")
        writer.number(feed.head)
        writer.raw(",\"oldest\":")
        writer.number(feed.oldest)
        writer.raw(",\"collections\":[")
        for (index, collection) in feed.collections.enumerated() {
            if index > 0 { writer.raw(",") }
            writer.raw("{\"name\":")
            writer.string(collection.name)
            writer.raw(",\"count\":")
            writer.number(collection.count)
            if let digest = collection.digest {
                writer.raw(",\"digest\":\"")
                writer.raw(digest.sumHex)
                writer.raw("\"")
            }
            writer.raw("}")
        }
        writer.raw("]")
        if let limit = feed.limit {
            writer.raw(",\"limit\":")
            writer.number(limit)
        }
        writer.raw("}\n")
        return writer.bytes
    }

    public static func decodeFeed(_ bytes: [UInt8]) throws(ConcordError) -> FeedInfo {
        let scanner = JSONScanner(bytes)
        var feed = FeedInfo(feedID: "", head: 0, oldest: 1, collections: [])
        try scanner.forEachMember(of: try scanner.document()) { (name, member) throws(ConcordError) in
            switch name {
            case "feed": feed.feedID = try scanner.decodeString(member)
            case "head": feed.head = try scanner.decodeUInt64(member)
            case "oldest": feed.oldest = try scanner.decodeUInt64(member)
            case "limit":
                let limit = try scanner.decodeUInt64(member)
                guard limit >= 1, limit <= UInt64(Int.max) else {
                    throw ConcordError(.protocolViolation, "a feed's limit must be at least 1")
                }
                feed.limit = Int(limit)
            case "collections":
                try scanner.forEachElement(of: member) { (element) throws(ConcordError) in
                    var collection = FeedInfo.Collection(name: "", count: 0)
                    var sum: String?
                    try scanner.forEachMember(of: element) { (field, value) throws(ConcordError) in
                        switch field {
                        case "name": collection.name = try scanner.decodeString(value)
                        case "count": collection.count = Int(try scanner.decodeUInt64(value))
                        case "digest": sum = try scanner.decodeString(value)
                        default: break
                        }
                    }
                    if let sum {
                        guard let digest = CollectionDigest(count: Int64(collection.count), sumHex: sum) else {
                            throw ConcordError(.protocolViolation, "a digest must be 64 hex digits")
                        }
                        collection.digest = digest
                    }
                    feed.collections.append(collection)
                }
            default: break
            }
        }
        guard !feed.feedID.isEmpty else { throw ConcordError(.protocolViolation, "feed info without a feed id") }
        return feed
    }

    // MARK: Write requests

    /// Parses `{"changes":[{"collection":"c","key":"k","op":"upsert","value":...}, ...]}`.
    public static func decodeWriteRequest(_ bytes: [UInt8], limits: Limits = Limits()) throws(ConcordError)
        -> [WriteOperation]
    {
        let scanner = JSONScanner(bytes, maxDepth: limits.maxDepth)
        let document = try scanner.document()
        guard document.kind == .object else { throw ConcordError(.invalidRequest, "the body must be a JSON object") }
        var operations: [WriteOperation] = []
        var sawChanges = false
        try scanner.forEachMember(of: document) { (name, member) throws(ConcordError) in
            guard name == "changes" else { throw ConcordError(.invalidRequest, "unknown member \"\(name)\"") }
            sawChanges = true
            guard member.kind == .array else { throw ConcordError(.invalidRequest, "\"changes\" must be an array") }
            try scanner.forEachElement(of: member) { (element) throws(ConcordError) in
                guard operations.count < limits.maxBatchChanges else {
                    throw ConcordError(.tooLarge, "a batch holds at most \(limits.maxBatchChanges) changes")
                }
                let position = operations.count
                guard element.kind == .object else {
                    throw ConcordError(.invalidRequest, "changes[\(position)] must be an object")
                }
                var collection: String?
                var key: String?
                var op: String?
                var value: JSONScanner.Value?
                try scanner.forEachMember(of: element) { (field, fieldValue) throws(ConcordError) in
                    switch field {
                    case "collection": collection = try scanner.decodeString(fieldValue)
                    case "key": key = try scanner.decodeString(fieldValue)
                    case "op": op = try scanner.decodeString(fieldValue)
                    case "value": value = fieldValue
                    default:
                        throw ConcordError(.invalidRequest, "changes[\(position)]: unknown member \"\(field)\"")
                    }
                }
                guard let collection else {
                    throw ConcordError(.invalidRequest, "changes[\(position)]: missing \"collection\"")
                }
                try CollectionName.validate(collection)
                guard let key, !key.isEmpty else {
                    throw ConcordError(.invalidRequest, "changes[\(position)]: missing or empty \"key\"")
                }
                guard key.utf8.count <= limits.maxKeyBytes else {
                    throw ConcordError(.tooLarge, "changes[\(position)]: key longer than \(limits.maxKeyBytes) bytes")
                }
                switch op {
                case "upsert":
                    guard let value else {
                        throw ConcordError(.invalidRequest, "changes[\(position)]: an upsert needs a \"value\"")
                    }
                    guard value.range.count <= limits.maxValueBytes else {
                        throw ConcordError(
                            .tooLarge, "changes[\(position)]: value larger than \(limits.maxValueBytes) bytes")
                    }
                    operations.append(.upsert(collection, key, checkedJSON: scanner.compactText(value)))
                case "delete":
                    guard value == nil else {
                        throw ConcordError(.invalidRequest, "changes[\(position)]: a delete takes no \"value\"")
                    }
                    operations.append(.delete(collection, key))
                default:
                    throw ConcordError(
                        .invalidRequest, "changes[\(position)]: \"op\" must be \"upsert\" or \"delete\"")
                }
            }
        }
        guard sawChanges else { throw ConcordError(.invalidRequest, "missing \"changes\"") }
        guard !operations.isEmpty else { throw ConcordError(.invalidRequest, "\"changes\" is empty") }
        return operations
    }

    public static func encodeWriteRequest(_ operations: [WriteOperation]) -> [UInt8] {
        var writer = JSONWriter(capacity: operations.count * 128)
        writer.raw("{\"changes\":[")
        for (index, operation) in operations.enumerated() {
            writer.raw(index > 0 ? ",{" : "{")
            appendOperation(collection: operation.collection, key: operation.key, value: operation.value, to: &writer)
            writer.raw("}")
        }
        writer.raw("]}")
        return writer.bytes
    }

    // MARK: Errors

    /// `{"error":{"code":"...","message":"..."}}`
    public static func encode(_ error: ConcordError) -> [UInt8] {
        var writer = JSONWriter()
        writer.raw("{\"error\":{\"code\":")
        writer.string(error.code.rawValue)
        writer.raw(",\"message\":")
        writer.string(error.message)
        writer.raw("}}\n")
        return writer.bytes
    }

    /// The error a peer sent, or `nil` when the body is not one.
    public static func decodeError(_ bytes: [UInt8]) -> ConcordError? {
        let scanner = JSONScanner(bytes)
        guard let document = try? scanner.document() else { return nil }
        var result: ConcordError?
        try? scanner.forEachMember(of: document) { (name, member) throws(ConcordError) in
            guard name == "error" else { return }
            var code = ""
            var message = ""
            try scanner.forEachMember(of: member) { (field, value) throws(ConcordError) in
                if field == "code" { code = try scanner.decodeString(value) }
                if field == "message" { message = try scanner.decodeString(value) }
            }
            result = ConcordError(.init(code), message)
        }
        return result
    }
}

/// Collection names become SQL table names on replicas, so they are restricted to a safe alphabet.
public enum CollectionName {
    public static func validate(_ name: String) throws(ConcordError) {
        let bytes = Array(name.utf8)
        guard !bytes.isEmpty, bytes.count <= 63 else {
            throw ConcordError(.invalidRequest, "collection name must be 1 to 63 characters: \"\(name)\"")
        }
        for (index, byte) in bytes.enumerated() {
            let isLetter = (byte >= 0x61 && byte <= 0x7A) || byte == 0x5F
            let isDigit = byte >= 0x30 && byte <= 0x39
            guard isLetter || (isDigit && index > 0) else {
                throw ConcordError(
                    .invalidRequest,
                    "collection name \"\(name)\" must start with a-z or _ and hold only a-z, 0-9 and _")
            }
        }
        guard !name.hasPrefix("concord_"), !name.hasPrefix("sqlite_") else {
            throw ConcordError(.invalidRequest, "collection names starting with concord_ or sqlite_ are reserved")
        }
    }
}

/// The newline-terminated lines of a complete body, as ranges into it.
public struct LineRanges {
    let bytes: [UInt8]
    var start = 0

    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    /// The next non-empty line without its newline.
    public mutating func next() -> Range<Int>? {
        while let newline = Self.newline(in: bytes, from: start) {
            let line = start..<newline
            start = newline + 1
            if !line.isEmpty { return line }
        }
        return nil
    }

    /// Whether every byte was consumed (the body ended with a newline).
    public var isAtEnd: Bool { start == bytes.count }

    @inline(__always)
    static func newline(in bytes: [UInt8], from start: Int) -> Int? {
        bytes.withUnsafeBufferPointer { buffer in
            var position = start
            while position < buffer.count {
                if buffer[position] == 0x0A { return position }
                position += 1
            }
            return nil
        }
    }
}

/// Splits bytes arriving in arbitrary chunks into newline-terminated lines.
public struct LineSplitter: Sendable {
    /// The bytes received; ranges from ``nextRange()`` index into it until the next ``append(_:)``.
    public private(set) var buffer: [UInt8] = []
    private var start = 0

    public init() {}

    public mutating func append<Bytes: Sequence<UInt8>>(_ bytes: Bytes) {
        if start > 0, start == buffer.count {
            buffer.removeAll(keepingCapacity: true)
            start = 0
        } else if start > 65536, start * 2 > buffer.count {
            buffer.removeSubrange(0..<start)
            start = 0
        }
        buffer.append(contentsOf: bytes)
    }

    /// The range in ``buffer`` of the next complete line without its newline; empty lines are skipped.
    public mutating func nextRange() -> Range<Int>? {
        while let newline = LineRanges.newline(in: buffer, from: start) {
            let line = start..<newline
            start = newline + 1
            if !line.isEmpty { return line }
        }
        return nil
    }

    /// The next complete line without its newline; empty lines are skipped.
    public mutating func next() -> [UInt8]? {
        nextRange().map { Array(buffer[$0]) }
    }

    /// Bytes received after the last newline.
    public var remainder: ArraySlice<UInt8> { buffer[start...] }
}
