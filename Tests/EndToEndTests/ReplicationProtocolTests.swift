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

    /// The log's writer sleeps until the reader queues a transaction or the server asks for a
    /// reply, or until its timeout: it neither polls nor misses work queued just before it waits.
    @Test func theCaptureWriterWakesForWorkAndOnlyForIt() async throws {
        let queue = CapturedTransactions(limit: 100)
        func timed(_ work: () async throws -> Void) async rethrows -> Duration {
            let started = ContinuousClock.now
            try await work()
            return ContinuousClock.now - started
        }
        // Nothing queued: the wait lasts its timeout.
        #expect(await timed { await queue.waitForWork(timeout: .milliseconds(200)) } >= .milliseconds(200))
        // Queued before the wait: it returns at once, far within its timeout.
        try await queue.push([.delete("c", "k1")], commit: 10, number: 1)
        #expect(await timed { await queue.waitForWork(timeout: .seconds(30)) } < .seconds(5))
        // Taken: the next wait waits again.
        #expect(queue.takeAll().lastCommit == 10)
        #expect(await timed { await queue.waitForWork(timeout: .milliseconds(200)) } >= .milliseconds(200))
        // A transaction queued, a reply asked for, or a cancellation wakes a waiting writer.
        let wakers: [@Sendable (Task<Duration, Never>) async throws -> Void] = [
            { _ in try await queue.push([.delete("c", "k2")], commit: 20, number: 2) },
            { _ in queue.requestReply() },
            { waiting in waiting.cancel() },
        ]
        for wake in wakers {
            _ = queue.takeAll()
            let waiting = Task {
                let started = ContinuousClock.now
                await queue.waitForWork(timeout: .seconds(30))
                return ContinuousClock.now - started
            }
            try await Task.sleep(for: .milliseconds(100))
            try await wake(waiting)
            #expect(await waiting.value < .seconds(5))
        }
    }
}
