/// What a bearer token may do. Each role includes the ones below it.
public enum AccessRole: String, Sendable, Hashable, Comparable, CaseIterable {
    /// Read the feed, changes, pages and symbols of its collections.
    case read
    /// And write to its collections (`POST /v1/write`).
    case write
    /// And everything else an operator needs.
    case admin

    public static func < (lhs: AccessRole, rhs: AccessRole) -> Bool {
        allCases.firstIndex(of: lhs)! < allCases.firstIndex(of: rhs)!
    }
}

/// A bearer token a publisher accepts.
public struct AccessToken: Sendable, Hashable {
    /// A name for logs and errors; never the secret.
    public var name: String
    public var role: AccessRole
    /// The collections it may read or write; `nil`: all.
    public var collections: Set<String>?
    public var secret: String

    public init(name: String, role: AccessRole, collections: Set<String>?, secret: String) {
        self.name = name
        self.role = role
        self.collections = collections
        self.secret = secret
    }

    /// The collections a request may touch: those asked for (`nil`: whatever the token may), all
    /// of which the token must allow.
    public func scope(_ requested: Set<String>?) throws(ConcordError) -> Set<String>? {
        guard let allowed = collections else { return requested }
        guard let requested else { return allowed }
        let refused = requested.subtracting(allowed)
        guard refused.isEmpty else {
            throw ConcordError(
                .forbidden, "token \(name) may not read or write \(refused.sorted().joined(separator: ","))")
        }
        return requested
    }

    /// Throws unless the token's role is at least `role`.
    public func require(_ role: AccessRole) throws(ConcordError) {
        guard self.role >= role else {
            throw ConcordError(.forbidden, "token \(name) has role \(self.role.rawValue); this needs \(role.rawValue)")
        }
    }
}

/// The tokens a publisher accepts, parsed from lines of `NAME ROLE COLLECTIONS SECRET`
/// (`COLLECTIONS` is a comma-separated list or `*`; `#` starts a comment):
///
/// ```
/// billing   read   customers,orders   3f9a0c…
/// ops       admin  *                  77aa41…
/// ```
public struct AccessPolicy: Sendable, Hashable {
    public var tokens: [AccessToken]

    public init(tokens: [AccessToken]) {
        self.tokens = tokens
    }

    /// Secrets shorter than this are refused: a token is all that stands between a client and the data.
    public static let minimumSecretLength = 16

    /// Parses the token lines of `text`; `origin` names it in errors (a file, or a variable).
    /// Lines may also be separated by `;`, for an environment variable.
    public static func parse(_ text: String, origin: String) throws(ConcordError) -> AccessPolicy {
        var tokens: [AccessToken] = []
        var names = Set<String>()
        var secrets = Set<String>()
        let lines = text.split(omittingEmptySubsequences: false) { $0 == "\n" || $0 == ";" }
        for (index, raw) in lines.enumerated() {
            let line = raw.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\r" }).map(String.init)
            if fields.isEmpty { continue }
            let place = "\(origin):\(index + 1)"
            guard fields.count == 4 else {
                throw ConcordError(
                    .invalidConfiguration,
                    "\(place): a token line is NAME ROLE COLLECTIONS SECRET, got \(fields.count) fields")
            }
            guard let role = AccessRole(rawValue: fields[1]) else {
                throw ConcordError(
                    .invalidConfiguration, "\(place): role must be read, write or admin, not \(fields[1])")
            }
            var collections: Set<String>?
            if fields[2] != "*" {
                var listed = Set<String>()
                for name in fields[2].split(separator: ",") {
                    do {
                        try CollectionName.validate(String(name))
                    } catch {
                        throw ConcordError(.invalidConfiguration, "\(place): \(error.message)")
                    }
                    listed.insert(String(name))
                }
                collections = listed
            }
            let secret = fields[3]
            guard secret.utf8.count >= minimumSecretLength else {
                throw ConcordError(
                    .invalidConfiguration,
                    "\(place): token \(fields[0])'s secret is shorter than \(minimumSecretLength) characters")
            }
            guard names.insert(fields[0]).inserted, secrets.insert(secret).inserted else {
                throw ConcordError(.invalidConfiguration, "\(place): token name or secret used twice")
            }
            tokens.append(AccessToken(name: fields[0], role: role, collections: collections, secret: secret))
        }
        guard !tokens.isEmpty else { throw ConcordError(.invalidConfiguration, "\(origin) holds no token") }
        return AccessPolicy(tokens: tokens)
    }

    /// The token an `Authorization: Bearer …` header carries.
    ///
    /// Every secret is compared in full, so the time taken says nothing about how close a guess was.
    public func authenticate(_ authorization: String?) throws(ConcordError) -> AccessToken {
        guard let authorization else {
            throw ConcordError(.unauthorized, "this publisher needs a bearer token (Authorization: Bearer …)")
        }
        let prefix = "bearer "
        guard authorization.count > prefix.count, authorization.lowercased().hasPrefix(prefix) else {
            throw ConcordError(.unauthorized, "the Authorization header must be Bearer TOKEN")
        }
        let presented = Array(authorization.utf8.dropFirst(prefix.count))
        var found: AccessToken?
        for token in tokens where Self.equalInConstantTime(Array(token.secret.utf8), presented) {
            found = token
        }
        guard let found else { throw ConcordError(.unauthorized, "unknown token") }
        return found
    }

    /// The token of a dashboard request: `Bearer SECRET`, or `Basic` with the secret as the
    /// password (what a browser sends after prompting; the user name is ignored).
    public func authenticate(dashboardCredentials authorization: String?) throws(ConcordError) -> AccessToken {
        let prefix = "basic "
        guard let authorization, authorization.lowercased().hasPrefix(prefix) else {
            return try authenticate(authorization)
        }
        guard let decoded = Self.base64Decoded(authorization.utf8.dropFirst(prefix.count)),
            let colon = decoded.firstIndex(of: UInt8(ascii: ":"))
        else {
            throw ConcordError(.unauthorized, "the Authorization header must be Basic base64(NAME:TOKEN)")
        }
        return try authenticate("Bearer " + String(decoding: decoded[(colon + 1)...], as: UTF8.self))
    }

    /// Standard base64 with padding; `nil` for anything else.
    static func base64Decoded(_ text: some Collection<UInt8>) -> [UInt8]? {
        func sextet(_ byte: UInt8) -> UInt32? {
            switch byte {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"): UInt32(byte - UInt8(ascii: "A"))
            case UInt8(ascii: "a")...UInt8(ascii: "z"): UInt32(byte - UInt8(ascii: "a") + 26)
            case UInt8(ascii: "0")...UInt8(ascii: "9"): UInt32(byte - UInt8(ascii: "0") + 52)
            case UInt8(ascii: "+"): 62
            case UInt8(ascii: "/"): 63
            default: nil
            }
        }
        let bytes = Array(text)
        guard bytes.count % 4 == 0, bytes.count <= 4096 else { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count / 4 * 3)
        for start in stride(from: 0, to: bytes.count, by: 4) {
            let group = bytes[start..<(start + 4)]
            let padding = group.reversed().prefix { $0 == UInt8(ascii: "=") }.count
            guard padding <= 2, start + 4 == bytes.count || padding == 0 else { return nil }
            var word: UInt32 = 0
            for byte in group.dropLast(padding) {
                guard let value = sextet(byte) else { return nil }
                word = word << 6 | value
            }
            word <<= UInt32(6 * padding)
            let decoded = [UInt8(word >> 16 & 0xFF), UInt8(word >> 8 & 0xFF), UInt8(word & 0xFF)]
            out += decoded.prefix(3 - padding)
        }
        return out
    }

    static func equalInConstantTime(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        var difference = UInt(bitPattern: a.count ^ b.count)
        for index in 0..<max(a.count, b.count) {
            let x = index < a.count ? a[index] : 0
            let y = index < b.count ? b[index] : 0
            difference |= UInt(x ^ y)
        }
        return difference == 0
    }
}
