import ConcordCore
import Foundation
import Synchronization

/// What the publisher knows of its subscribers, for the dashboard and the metrics.
///
/// A subscriber is known by the name it sends in `Concord-Subscriber` (``SubscriberRegistry/nameField``)
/// with its requests and in its reports. The publisher learns its position from what it serves
/// and from its reports, and its proof and repairs from its reports alone. Nothing here is
/// persisted: after a restart the publisher relearns its subscribers as they reconnect.
public final class SubscriberRegistry: Sendable {
    public struct Entry: Sendable, Hashable {
        public var name: String
        public var activity = "connected"
        /// The last LSN it has applied (reported) or been sent (served), whichever is later.
        public var position: LSN = 0
        public var verifiedLSN: LSN = 0
        public var repairs = 0
        public var repairedRecords = 0
        public var mismatches = 0
        public var openStreams = 0
        public var changesServed = 0
        public var lastSeen: Date
    }

    /// The request header naming the subscriber.
    public static let nameField = "Concord-Subscriber"

    private let entries = Mutex<[String: Entry]>([:])
    /// Subscribers not heard from for this long, with no open stream, are forgotten.
    let forgetAfter: TimeInterval
    /// At most this many subscribers are kept; the one heard from least recently goes first.
    let capacity: Int

    public init(forgetAfter: Duration = .seconds(600), capacity: Int = 10_000) {
        self.forgetAfter = Double(forgetAfter.components.seconds)
        self.capacity = capacity
    }

    func update(_ name: String, now: Date = Date(), _ change: (inout Entry) -> Void) {
        entries.withLock { entries in
            var entry = entries[name] ?? Entry(name: name, lastSeen: now)
            entry.lastSeen = now
            change(&entry)
            entries[name] = entry
            if entries.count > capacity,
                let stalest = entries.values.filter({ $0.openStreams == 0 }).min(by: {
                    $0.lastSeen < $1.lastSeen
                })
            {
                entries[stalest.name] = nil
            }
        }
    }

    public func reported(_ report: SubscriberReport) {
        update(report.name) { entry in
            entry.activity = report.activity
            entry.position = max(entry.position, report.position)
            entry.verifiedLSN = report.verifiedLSN
            entry.repairs = report.repairs
            entry.repairedRecords = report.repairedRecords
            entry.mismatches = report.mismatches
        }
    }

    func streamOpened(_ name: String, after: LSN) {
        update(name) { entry in
            entry.openStreams += 1
            entry.position = max(entry.position, after)
        }
    }

    func streamClosed(_ name: String) {
        update(name) { $0.openStreams = max(0, $0.openStreams - 1) }
    }

    /// Changes sent through `through` (a stream batch or a pull's answer).
    func served(_ name: String, after: LSN, through: LSN, changes: Int) {
        update(name) { entry in
            entry.position = max(entry.position, after, through)
            entry.changesServed += changes
        }
    }

    /// The subscribers known now, by name, forgetting those long gone.
    public func snapshot(now: Date = Date()) -> [Entry] {
        entries.withLock { entries in
            entries = entries.filter {
                $0.value.openStreams > 0 || now.timeIntervalSince($0.value.lastSeen) < forgetAfter
            }
            return entries.values.sorted { $0.name < $1.name }
        }
    }
}

/// Counts open change streams, per token and in all, so that one client cannot hold every
/// connection the publisher can serve.
final class StreamSlots: Sendable {
    private let open = Mutex<(total: Int, byToken: [String: Int])>((0, [:]))
    let perToken: Int
    let total: Int

    init(perToken: Int, total: Int) {
        self.perToken = perToken
        self.total = total
    }

    /// Takes a slot for `token` (`""`: requests without tokens, which only the total limits)
    /// or throws `too_many_requests`.
    func take(for token: String) throws(ConcordError) {
        let refusal: String? = open.withLock { open in
            if open.total >= total { return "the publisher serves at most \(total) streams at once" }
            let held = open.byToken[token, default: 0]
            if !token.isEmpty, held >= perToken {
                return "token \(token) already holds \(perToken) open streams, its limit"
            }
            open.total += 1
            open.byToken[token] = held + 1
            return nil
        }
        if let refusal { throw ConcordError(.tooManyRequests, refusal + "; close one or retry later") }
    }

    func release(for token: String) {
        open.withLock { open in
            open.total -= 1
            let held = open.byToken[token, default: 1] - 1
            open.byToken[token] = held > 0 ? held : nil
        }
    }

    var openCount: Int { open.withLock { $0.total } }
}
