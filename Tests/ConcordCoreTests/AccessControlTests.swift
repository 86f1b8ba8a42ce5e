import ConcordCore
import Testing

struct AccessControlTests {
    static let text = """
        # name  role   collections         secret
        ops     admin  *                   ops-secret-0123456789
        billing read   customers,orders    billing-secret-0123456789   # trailing comment
        """

    @Test func parsesTokenLinesWithCommentsAndSemicolons() throws {
        let policy = try AccessPolicy.parse(Self.text, origin: "tokens")
        #expect(policy.tokens.map(\.name) == ["ops", "billing"])
        #expect(policy.tokens[0].collections == nil && policy.tokens[0].role == .admin)
        #expect(policy.tokens[1].collections == ["customers", "orders"])
        let inline = try AccessPolicy.parse(
            "a read * aaaaaaaaaaaaaaaaaaaa; b write x bbbbbbbbbbbbbbbbbbbb", origin: "CONCORD_TOKENS")
        #expect(inline.tokens.map(\.role) == [.read, .write])
    }

    @Test(arguments: [
        ("ops admin *", "NAME ROLE COLLECTIONS SECRET"),
        ("ops owner * ops-secret-0123456789", "role must be"),
        ("ops read Bad-Name ops-secret-0123456789", "collection name"),
        ("ops read * short", "shorter than 16"),
        ("a read * aaaaaaaaaaaaaaaaaaaa\na read * bbbbbbbbbbbbbbbbbbbb", "used twice"),
        ("a read * aaaaaaaaaaaaaaaaaaaa\nb read * aaaaaaaaaaaaaaaaaaaa", "used twice"),
        ("# nothing here\n", "holds no token"),
    ])
    func refusesMalformedLinesWithTheirPlace(text: String, message: String) {
        #expect {
            try AccessPolicy.parse(text, origin: "f")
        } throws: { error in
            let error = error as? ConcordError
            return error?.code == .invalidConfiguration && error?.message.contains(message) == true
        }
    }

    @Test func authenticatesOnlyKnownBearerTokens() throws {
        let policy = try AccessPolicy.parse(Self.text, origin: "tokens")
        #expect(try policy.authenticate("Bearer billing-secret-0123456789").name == "billing")
        #expect(try policy.authenticate("bearer ops-secret-0123456789").name == "ops")
        for header in [
            nil, "", "Bearer", "Basic b3BzOnNlY3JldA==", "Bearer billing-secret-012345678",
            "Bearer billing-secret-01234567890", "Bearer BILLING-secret-0123456789",
        ] as [String?] {
            #expect(throws: ConcordError.self, "\(String(describing: header))") {
                try policy.authenticate(header)
            }
            #expect((try? policy.authenticate(header)) == nil)
            do {
                _ = try policy.authenticate(header)
            } catch {
                #expect(error.code == .unauthorized)
            }
        }
    }

    @Test func rolesAndCollectionsLimitWhatATokenMayDo() throws {
        let policy = try AccessPolicy.parse(Self.text, origin: "tokens")
        let billing = policy.tokens[1]
        #expect(try billing.scope(nil) == ["customers", "orders"])
        #expect(try billing.scope(["orders"]) == ["orders"])
        #expect(throws: ConcordError(.forbidden, "token billing may not read or write payments")) {
            try billing.scope(["orders", "payments"])
        }
        #expect(throws: ConcordError.self) { try billing.require(.write) }
        try billing.require(.read)
        let ops = policy.tokens[0]
        #expect(try ops.scope(nil) == nil)
        try ops.require(.admin)
        #expect(AccessRole.read < .write && AccessRole.write < .admin)
    }
}
