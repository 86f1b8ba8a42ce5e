import ConcordCore
import Foundation
import NIOCore
import Testing

@testable import ConcordPostgres

/// The pieces of the replication protocol that need no server: SCRAM's arithmetic, message
/// framing and the errors the server sends.
@Suite struct ReplicationProtocolTests {
    /// RFC 7677's example exchange, byte for byte.
    @Test func scramMatchesTheRFCExample() throws {
        var exchange = SCRAMSHA256(user: "user", password: "pencil", clientNonce: "rOprNGfwEbeRWgbNEkqO")
        #expect(String(decoding: exchange.clientFirstMessage(), as: UTF8.self) == "n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
        let final = try exchange.clientFinalMessage(
            serverFirst: "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
        #expect(
            String(decoding: final, as: UTF8.self)
                == "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        )
        try exchange.verify(serverFinal: "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
        #expect(throws: ConcordError.self) {
            try exchange.verify(serverFinal: "v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
        }
    }

    @Test func aChallengeThatDoesNotContinueTheClientsNonceIsRefused() {
        var exchange = SCRAMSHA256(user: "", password: "pencil", clientNonce: "abc")
        _ = exchange.clientFirstMessage()
        #expect(throws: ConcordError.self) {
            try exchange.clientFinalMessage(serverFirst: "r=xyz123,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
        }
        #expect(throws: ConcordError.self) { try exchange.clientFinalMessage(serverFirst: "r=abc123,i=4096") }
    }

    @Test func anErrorResponseCarriesItsSQLStateAndMessage() {
        var body = ByteBuffer()
        for (field, value) in [("S", "ERROR"), ("C", "55006"), ("M", "replication slot \"s\" is active for PID 7")] {
            body.writeString(field)
            body.writeString(value)
            body.writeInteger(UInt8(0))
        }
        body.writeInteger(UInt8(0))
        let error = BackendMessage(type: UInt8(ascii: "E"), body: body).error
        #expect(error.sqlState == "55006")
        #expect(error.message == "replication slot \"s\" is active for PID 7")
    }

    @Test func frontendMessagesAreFramedWithTheirLength() {
        var query = FrontendMessage.query("SELECT 1")
        #expect(query.readInteger(as: UInt8.self) == UInt8(ascii: "Q"))
        #expect(query.readInteger(as: Int32.self) == Int32(4 + 9))
        #expect(query.readString(length: 9) == "SELECT 1\0")
        var startup = FrontendMessage.startup([("user", "u"), ("replication", "database")])
        let length = startup.readInteger(as: Int32.self)
        #expect(length == Int32(startup.readableBytes + 4))
        #expect(startup.readInteger(as: Int32.self) == 196_608)
        #expect(startup.readString(length: startup.readableBytes) == "user\0u\0replication\0database\0\0")
    }
}
