/// A log sequence number: starts at 1, grows by one per change, never reused. 0 means "before the first change".
public typealias LSN = UInt64

/// What a change does to its record.
public enum ChangeOperation: String, Sendable, Hashable {
    case upsert
    case delete
}

/// One change in a feed's log: the whole new value of a record, or its deletion.
///
/// `isCommit` marks the last change of a source transaction; a subscriber applies
/// all changes up to and including a commit mark together or not at all.
public struct Change: Sendable, Hashable {
    public var lsn: LSN
    public var collection: String
    public var key: String
    public var operation: ChangeOperation
    /// The record's value as compact JSON text; `nil` for a delete.
    public var value: String?
    public var isCommit: Bool
    /// The element of the record this change replaces (`nil`: there was none), so a reader
    /// can update a digest in O(1) or rewind one.
    public var before: Element?
    /// The element this change makes, when a reader hashed it ahead of writing it, off the
    /// write path; `nil`: not computed (`Element(change)` computes it).
    public var after: Element?

    public init(
        lsn: LSN, collection: String, key: String, operation: ChangeOperation, value: String?, isCommit: Bool,
        before: Element? = nil
    ) {
        self.lsn = lsn
        self.collection = collection
        self.key = key
        self.operation = operation
        self.value = value
        self.isCommit = isCommit
        self.before = before
    }
}

/// One item of a change stream.
///
/// Every item covers a closed range of LSNs ending at `lsn`, so a reader can check
/// that the ranges join without a hole. A `skip` stands for changes the reader did
/// not ask for (collections outside its subset).
public enum StreamItem: Sendable, Hashable {
    case change(Change)
    case skip(from: LSN, through: LSN, isCommit: Bool)

    public var firstLSN: LSN {
        switch self {
        case .change(let change): change.lsn
        case .skip(let from, _, _): from
        }
    }

    public var lastLSN: LSN {
        switch self {
        case .change(let change): change.lsn
        case .skip(_, let through, _): through
        }
    }

    public var isCommit: Bool {
        switch self {
        case .change(let change): change.isCommit
        case .skip(_, _, let isCommit): isCommit
        }
    }
}

/// A record as a snapshot page or a replica table holds it.
public struct Record: Sendable, Hashable {
    public var key: String
    /// The LSN of the change that wrote this value.
    public var version: LSN
    /// Compact JSON text.
    public var value: String

    public init(key: String, version: LSN, value: String) {
        self.key = key
        self.version = version
        self.value = value
    }
}

/// A page of one collection's records, in key order, as the source held them at `lsn`.
public struct SnapshotPage: Sendable, Hashable {
    public var collection: String
    /// The head LSN of the read transaction the page was read in.
    public var lsn: LSN
    public var records: [Record]
    /// Whether records with greater keys remain.
    public var hasMore: Bool

    public init(collection: String, lsn: LSN, records: [Record], hasMore: Bool) {
        self.collection = collection
        self.lsn = lsn
        self.records = records
        self.hasMore = hasMore
    }
}

/// What a publisher says about its feed.
public struct FeedInfo: Sendable, Hashable {
    public struct Collection: Sendable, Hashable {
        public var name: String
        public var count: Int
        /// The collection's digest at the head (`nil` from a publisher that does not send one).
        public var digest: CollectionDigest?
        public init(name: String, count: Int, digest: CollectionDigest? = nil) {
            self.name = name
            self.count = count
            self.digest = digest
        }
    }

    public var feedID: String
    public var head: LSN
    /// The oldest LSN still in the log; `head + 1` when the log is empty.
    public var oldest: LSN
    public var collections: [Collection]
    /// The largest `limit` the publisher takes for changes and snapshot pages (`nil` from a
    /// publisher that does not say): a subscriber asks for no more.
    public var limit: Int?

    public init(feedID: String, head: LSN, oldest: LSN, collections: [Collection]) {
        self.feedID = feedID
        self.head = head
        self.oldest = oldest
        self.collections = collections
    }
}

/// One operation of a write batch.
public struct WriteOperation: Sendable, Hashable {
    public var collection: String
    public var key: String
    public var operation: ChangeOperation
    /// Compact JSON text; `nil` for a delete.
    public var value: String?
    /// The value is JSON that Concord wrote itself or has already parsed and compacted: the
    /// publisher stores it as it is instead of parsing it again. Never set for text from outside.
    package var valueIsChecked = false

    public static func upsert(_ collection: String, _ key: String, json value: String) -> WriteOperation {
        WriteOperation(collection: collection, key: key, operation: .upsert, value: value)
    }

    /// An upsert of `value`, compact JSON that Concord wrote or parsed itself (see ``valueIsChecked``).
    package static func upsert(_ collection: String, _ key: String, checkedJSON value: String) -> WriteOperation {
        var operation = WriteOperation(collection: collection, key: key, operation: .upsert, value: value)
        operation.valueIsChecked = true
        return operation
    }

    public static func delete(_ collection: String, _ key: String) -> WriteOperation {
        WriteOperation(collection: collection, key: key, operation: .delete, value: nil)
    }

    public init(collection: String, key: String, operation: ChangeOperation, value: String?) {
        self.collection = collection
        self.key = key
        self.operation = operation
        self.value = value
    }

    /// Two operations are equal when they write the same thing, checked or not.
    public static func == (left: WriteOperation, right: WriteOperation) -> Bool {
        left.collection == right.collection && left.key == right.key && left.operation == right.operation
            && left.value == right.value
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(collection)
        hasher.combine(key)
        hasher.combine(operation)
        hasher.combine(value)
    }
}
