/// An error Concord reports to a caller: a stable code and a human message.
///
/// The code is what programs match on; the message is for people and may change.
public struct ConcordError: Error, Sendable, Hashable, CustomStringConvertible {
    public struct Code: Sendable, Hashable, CustomStringConvertible {
        public let rawValue: String
        public init(_ rawValue: String) { self.rawValue = rawValue }
        public var description: String { rawValue }

        /// The request is malformed (bad JSON, bad parameter, wrong shape).
        public static let invalidRequest = Code("invalid_request")
        /// The request body or one of its parts is larger than allowed.
        public static let tooLarge = Code("too_large")
        /// A collection name that does not exist or is not allowed.
        public static let unknownCollection = Code("unknown_collection")
        /// An LSN past the feed's head.
        public static let beyondHead = Code("lsn_beyond_head")
        /// An LSN older than the log's retention.
        public static let gone = Code("gone")
        /// No such route.
        public static let notFound = Code("not_found")
        /// The replica belongs to another feed than the source it is pointed at.
        public static let feedMismatch = Code("feed_mismatch")
        /// The stream broke the protocol: an LSN hole, a repeat, an unknown item.
        public static let protocolViolation = Code("protocol_violation")
        /// The source could not be reached or answered with a server error.
        public static let unavailable = Code("unavailable")
        /// This publisher takes no writes over HTTP: its records are captured from a database.
        public static let writesRefused = Code("writes_refused")
        /// A configuration file or environment variable is malformed or names an unknown option.
        public static let invalidConfiguration = Code("invalid_configuration")
        /// No bearer token, or one the publisher does not know (HTTP 401).
        public static let unauthorized = Code("unauthorized")
        /// A known token without the role or the collection the request needs (HTTP 403).
        public static let forbidden = Code("forbidden")
        /// Too many streams open for one token, or in all (HTTP 429); retry later.
        public static let tooManyRequests = Code("too_many_requests")
        /// The client sent its request too slowly (HTTP 408).
        public static let timeout = Code("timeout")
        /// A local store failed.
        public static let storage = Code("storage")
        /// Anything else.
        public static let `internal` = Code("internal")
    }

    public let code: Code
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code): \(message)" }
}
