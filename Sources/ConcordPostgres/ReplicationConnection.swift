import ConcordCore
import Crypto
import Foundation
import Logging
import NIOCore
import NIOPosix

/// A logical replication connection: PostgreSQL's streaming replication protocol, which
/// PostgresNIO does not speak.
///
/// The server decodes the slot's WAL once, as it is written, and sends each change as it goes;
/// the client says how far its changes are durable, and the slot lets go of the WAL up to
/// there. Polling the slot with SQL instead decodes its WAL from the slot's restart point on
/// every poll, and again to advance it.
enum ReplicationConnection {
    /// What the server sends while streaming.
    enum Message: Sendable {
        /// One output of the decoding plugin: one wal2json line.
        case data(ByteBuffer)
        /// The server has sent everything up to `walEnd`; `replyRequested`: it wants a status
        /// update now, or it will time the connection out.
        case keepalive(walEnd: UInt64, replyRequested: Bool)
    }

    /// Connects to the server `url` names in replication mode, starts streaming the logical slot `slot` with the plugin's `options`, and
    /// runs `body` on the stream; the connection closes when `body` returns or throws.
    static func stream<Result: Sendable>(
        url: String, slot: String, options: [(String, String)], logger: Logger,
        _ body: @Sendable (Stream) async throws -> Result
    ) async throws -> Result {
        let endpoint = try PostgresSource.Endpoint(url: url)
        let channel: NIOAsyncChannel<BackendMessage, ByteBuffer>
        do {
            channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .connectTimeout(.seconds(10))
                // A peer gone without a word (a host lost behind a firewall) is noticed too.
                .channelOption(.socketOption(.so_keepalive), value: 1)
                .connect(host: endpoint.host, port: endpoint.port) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(BackendMessageDecoder()))
                        return try NIOAsyncChannel<BackendMessage, ByteBuffer>(wrappingChannelSynchronously: channel)
                    }
                }
        } catch {
            throw ConcordError(
                .unavailable, "cannot connect to PostgreSQL at \(PostgresSource.redacted(url)): \(error)")
        }
        // A server that accepts the connection but never answers is given up on.
        let handshakeTimeout = channel.channel.eventLoop.scheduleTask(in: .seconds(30)) {
            channel.channel.close(promise: nil)
        }
        return try await channel.executeThenClose { inbound, outbound in
            var messages = inbound.makeAsyncIterator()
            // The settings that fix how wal2json writes values travel as session parameters.
            let parameters =
                [("user", endpoint.user), ("database", endpoint.database), ("replication", "database")]
                + [("application_name", "concord")] + PostgresSource.settings
            try await outbound.write(FrontendMessage.startup(parameters))
            try await authenticate(&messages, outbound: outbound, user: endpoint.user, password: endpoint.password)
            // Session parameters, the key for cancelling, notices: until the server is ready.
            while try await next(&messages).type != UInt8(ascii: "Z") {}
            let optionList = options.map {
                "\(PostgresSource.quote($0.0)) '\($0.1.replacingOccurrences(of: "'", with: "''"))'"
            }
            try await outbound.write(
                FrontendMessage.query(
                    "START_REPLICATION SLOT \(PostgresSource.quote(slot)) LOGICAL 0/0 (\(optionList.joined(separator: ", ")))"
                ))
            while true {
                let message = try await next(&messages)
                if message.type == UInt8(ascii: "W") { break }
                guard message.type == UInt8(ascii: "N") || message.type == UInt8(ascii: "S") else {
                    throw ConcordError(.unavailable, "PostgreSQL answered START_REPLICATION with \(message.type)")
                }
            }
            handshakeTimeout.cancel()
            logger.debug("streaming the replication slot", metadata: ["slot": "\(slot)"])
            return try await body(Stream(inbound: InboundMessages(messages), outbound: outbound))
        }
    }

    /// The next message; an error the server sends becomes a ``CaptureError`` with its SQLSTATE.
    static func next(_ messages: inout NIOAsyncChannelInboundStream<BackendMessage>.AsyncIterator) async throws
        -> BackendMessage
    {
        guard let message = try await messages.next() else {
            throw ConcordError(.unavailable, "PostgreSQL closed the replication connection")
        }
        if message.type == UInt8(ascii: "E") { throw message.error }
        return message
    }

    /// Answers the server's authentication request: none, a password in clear, MD5 or SCRAM-SHA-256.
    static func authenticate(
        _ messages: inout NIOAsyncChannelInboundStream<BackendMessage>.AsyncIterator,
        outbound: NIOAsyncChannelOutboundWriter<ByteBuffer>, user: String, password: String?
    ) async throws {
        var scram: SCRAMSHA256?
        var serverVerified = false
        while true {
            var message = try await next(&messages)
            if message.type == UInt8(ascii: "N") { continue }
            guard message.type == UInt8(ascii: "R"), let code = message.body.readInteger(as: Int32.self) else {
                throw ConcordError(.unavailable, "PostgreSQL sent \(message.type) before authenticating")
            }
            func required() throws -> String {
                guard let password else {
                    throw ConcordError(
                        .invalidConfiguration,
                        "PostgreSQL asks for a password for \(user): give it in the URL, postgres://USER:PASSWORD@HOST/DB"
                    )
                }
                return password
            }
            switch code {
            case 0:
                // A SCRAM exchange ends only once the server has proven it knows the password.
                guard scram == nil || serverVerified else {
                    throw ConcordError(.unavailable, "PostgreSQL ended SCRAM without its proof")
                }
                return
            case 3:
                try await outbound.write(FrontendMessage.password(Array(try required().utf8) + [0]))
            case 5:
                guard let salt = message.body.readBytes(length: 4) else {
                    throw ConcordError(.unavailable, "PostgreSQL's MD5 request lacks its salt")
                }
                let inner = Self.hex(Insecure.MD5.hash(data: Array((try required() + user).utf8)))
                let outer = Self.hex(Insecure.MD5.hash(data: Array(inner.utf8) + salt))
                try await outbound.write(FrontendMessage.password(Array("md5\(outer)".utf8) + [0]))
            case 10:
                let mechanisms = message.body.readBytes(length: message.body.readableBytes) ?? []
                guard mechanisms.split(separator: 0).contains(where: { $0.elementsEqual("SCRAM-SHA-256".utf8) }) else {
                    throw ConcordError(
                        .invalidConfiguration, "PostgreSQL offers no SASL mechanism Concord knows (SCRAM-SHA-256)")
                }
                var exchange = SCRAMSHA256(user: "", password: try required())
                var body = Array("SCRAM-SHA-256".utf8) + [0]
                let first = exchange.clientFirstMessage()
                var length = ByteBuffer()
                length.writeInteger(Int32(first.count))
                body += length.readableBytesView + first
                try await outbound.write(FrontendMessage.password(body))
                scram = exchange
            case 11:
                guard var exchange = scram else { throw ConcordError(.unavailable, "SASL out of order") }
                let final = try exchange.clientFinalMessage(
                    serverFirst: String(decoding: message.body.readableBytesView, as: UTF8.self))
                try await outbound.write(FrontendMessage.password(final))
                scram = exchange
            case 12:
                guard let exchange = scram else { throw ConcordError(.unavailable, "SASL out of order") }
                try exchange.verify(serverFinal: String(decoding: message.body.readableBytesView, as: UTF8.self))
                serverVerified = true
            default:
                throw ConcordError(
                    .invalidConfiguration, "PostgreSQL asks for an authentication Concord does not speak (\(code))")
            }
        }
    }

    static func hex(_ digest: some Sequence<UInt8>) -> String {
        digest.map { String(format: "%02x", $0) }.joined()
    }

    /// The connection's one iterator over what the server sends (NIO allows one): used by the
    /// handshake, then handed to the one task that reads the stream.
    final class InboundMessages: @unchecked Sendable {
        var iterator: NIOAsyncChannelInboundStream<BackendMessage>.AsyncIterator

        init(_ iterator: NIOAsyncChannelInboundStream<BackendMessage>.AsyncIterator) {
            self.iterator = iterator
        }
    }

    /// A started stream: its messages, and the way to confirm what is durable.
    struct Stream: Sendable {
        let inbound: InboundMessages
        let outbound: NIOAsyncChannelOutboundWriter<ByteBuffer>

        /// The streamed messages, in order. Iterate them once, from one task.
        var messages: Messages { Messages(inbound: inbound) }

        /// Tells the server that every change up to `flushed` is durable: the slot may let it go.
        /// `replyRequested`: the server answers at once, which proves the connection alive.
        func confirm(flushed: UInt64, replyRequested: Bool = false) async throws {
            var buffer = ByteBuffer()
            buffer.writeInteger(UInt8(ascii: "d"))
            buffer.writeInteger(Int32(4 + 1 + 8 * 4 + 1))
            buffer.writeInteger(UInt8(ascii: "r"))
            buffer.writeInteger(flushed)  // written
            buffer.writeInteger(flushed)  // flushed
            buffer.writeInteger(flushed)  // applied
            buffer.writeInteger(Int64((Date().timeIntervalSince1970 - 946_684_800) * 1_000_000))  // since 2000
            buffer.writeInteger(UInt8(replyRequested ? 1 : 0))
            try await outbound.write(buffer)
        }
    }

    struct Messages: AsyncSequence {
        typealias Element = Message
        let inbound: InboundMessages

        func makeAsyncIterator() -> Iterator { Iterator(inbound: inbound) }

        struct Iterator: AsyncIteratorProtocol {
            let inbound: InboundMessages

            mutating func next() async throws -> Message? {
                while true {
                    var message = try await ReplicationConnection.next(&inbound.iterator)
                    switch message.type {
                    case UInt8(ascii: "d"):
                        switch message.body.readInteger(as: UInt8.self) {
                        case UInt8(ascii: "w"):
                            // The WAL start and end, and the server's clock, then the plugin's output.
                            guard message.body.readableBytes >= 24 else { break }
                            message.body.moveReaderIndex(forwardBy: 24)
                            return .data(message.body)
                        case UInt8(ascii: "k"):
                            guard let end = message.body.readInteger(as: UInt64.self),
                                message.body.readInteger(as: Int64.self) != nil,
                                let reply = message.body.readInteger(as: UInt8.self)
                            else { break }
                            return .keepalive(walEnd: end, replyRequested: reply != 0)
                        default:
                            break
                        }
                        throw ConcordError(.unavailable, "PostgreSQL sent a malformed replication message")
                    case UInt8(ascii: "c"):
                        throw ConcordError(.unavailable, "PostgreSQL ended the replication stream")
                    default:
                        // Notices and parameter changes.
                        continue
                    }
                }
            }
        }
    }
}

/// A message from the server: its type byte and its body.
struct BackendMessage: Sendable {
    var type: UInt8
    var body: ByteBuffer

    /// An ErrorResponse as a ``CaptureError``: its SQLSTATE and its message.
    var error: CaptureError {
        var body = self.body
        var state = ""
        var text = ""
        while let field = body.readInteger(as: UInt8.self), field != 0 {
            guard let end = body.readableBytesView.firstIndex(of: 0) else { break }
            let value = body.readString(length: end - body.readerIndex) ?? ""
            body.moveReaderIndex(forwardBy: 1)
            if field == UInt8(ascii: "C") { state = value }
            if field == UInt8(ascii: "M") { text = value }
        }
        return CaptureError(sqlState: state, message: text.isEmpty ? "PostgreSQL error \(state)" : text)
    }
}

/// Splits the server's bytes into messages: a type byte, then a length that counts itself.
struct BackendMessageDecoder: ByteToMessageDecoder {
    typealias InboundOut = BackendMessage

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let type = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self),
            let length = buffer.getInteger(at: buffer.readerIndex + 1, as: Int32.self)
        else { return .needMoreData }
        guard length >= 4 else {
            throw ConcordError(.unavailable, "PostgreSQL sent a message of length \(length)")
        }
        guard buffer.readableBytes >= 1 + Int(length) else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: 5)
        let body = buffer.readSlice(length: Int(length) - 4)!
        context.fireChannelRead(wrapInboundOut(BackendMessage(type: type, body: body)))
        return .continue
    }
}

/// The messages Concord sends on a replication connection.
enum FrontendMessage {
    static func startup(_ parameters: [(String, String)]) -> ByteBuffer {
        var body: [UInt8] = []
        for (name, value) in parameters {
            body += Array(name.utf8) + [0] + Array(value.utf8) + [0]
        }
        body.append(0)
        var buffer = ByteBuffer()
        buffer.writeInteger(Int32(8 + body.count))
        buffer.writeInteger(Int32(196_608))  // protocol 3.0
        buffer.writeBytes(body)
        return buffer
    }

    static func query(_ sql: String) -> ByteBuffer {
        message(UInt8(ascii: "Q"), Array(sql.utf8) + [0])
    }

    /// A password, or a SASL message: the same message type.
    static func password(_ body: [UInt8]) -> ByteBuffer {
        message(UInt8(ascii: "p"), body)
    }

    static func message(_ type: UInt8, _ body: [UInt8]) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeInteger(type)
        buffer.writeInteger(Int32(4 + body.count))
        buffer.writeBytes(body)
        return buffer
    }
}

/// The client's side of SCRAM-SHA-256 (RFC 5802, RFC 7677), as PostgreSQL asks for it.
struct SCRAMSHA256 {
    let user: String
    let password: String
    let clientNonce: String
    private var clientFirstBare = ""
    private var authMessage = ""
    private var saltedPassword: [UInt8] = []

    init(user: String, password: String, clientNonce: String? = nil) {
        self.user = user
        self.password = password
        self.clientNonce =
            clientNonce ?? Data((0..<18).map { _ in UInt8.random(in: 0...255) }).base64EncodedString()
    }

    mutating func clientFirstMessage() -> [UInt8] {
        clientFirstBare = "n=\(user),r=\(clientNonce)"
        return Array("n,,\(clientFirstBare)".utf8)
    }

    mutating func clientFinalMessage(serverFirst: String) throws -> [UInt8] {
        var fields: [Character: String] = [:]
        for part in serverFirst.split(separator: ",") where part.count >= 2 && part.dropFirst().first == "=" {
            fields[part.first!] = String(part.dropFirst(2))
        }
        guard let nonce = fields["r"], nonce.hasPrefix(clientNonce), let saltText = fields["s"],
            let salt = Data(base64Encoded: saltText), let iterations = fields["i"].flatMap({ Int($0) }), iterations > 0
        else {
            throw ConcordError(.unavailable, "PostgreSQL's SCRAM challenge is malformed")
        }
        saltedPassword = Self.pbkdf2(password: Array(password.utf8), salt: Array(salt), iterations: iterations)
        let withoutProof = "c=biws,r=\(nonce)"
        authMessage = "\(clientFirstBare),\(serverFirst),\(withoutProof)"
        let clientKey = Self.hmac(saltedPassword, Array("Client Key".utf8))
        let storedKey = Array(SHA256.hash(data: clientKey))
        let signature = Self.hmac(storedKey, Array(authMessage.utf8))
        let proof = zip(clientKey, signature).map { $0 ^ $1 }
        return Array("\(withoutProof),p=\(Data(proof).base64EncodedString())".utf8)
    }

    func verify(serverFinal: String) throws {
        let serverKey = Self.hmac(saltedPassword, Array("Server Key".utf8))
        let expected = Self.hmac(serverKey, Array(authMessage.utf8))
        guard serverFinal == "v=\(Data(expected).base64EncodedString())" else {
            throw ConcordError(.unavailable, "PostgreSQL's SCRAM signature does not match: not the server asked")
        }
    }

    static func hmac(_ key: [UInt8], _ data: [UInt8]) -> [UInt8] {
        Array(HMAC<SHA256>.authenticationCode(for: data, using: SymmetricKey(data: key)))
    }

    /// PBKDF2 with HMAC-SHA-256, one block: the length of SHA-256's output.
    static func pbkdf2(password: [UInt8], salt: [UInt8], iterations: Int) -> [UInt8] {
        var block = hmac(password, salt + [0, 0, 0, 1])
        var result = block
        for _ in 1..<iterations {
            block = hmac(password, block)
            for index in result.indices { result[index] ^= block[index] }
        }
        return result
    }
}
