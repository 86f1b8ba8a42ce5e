import ConcordCore
import ConcordSQLite
import Foundation

/// The publisher's state as the dashboard and the metrics show it: the head, the log's
/// retention window, the collections and every known subscriber with its lag.
public struct PublisherOverview: Sendable {
    public struct Subscriber: Sendable {
        public var entry: SubscriberRegistry.Entry
        /// Changes the publisher holds beyond the subscriber's position.
        public var lagChanges: UInt64
        /// Age of the oldest change it has not applied yet (0 when at the head).
        public var lagSeconds: Double
        /// Whether it has an open stream or was heard from within the last 30 seconds.
        public var connected: Bool
    }

    public var feed: FeedInfo
    /// Changes the log holds, and the age in seconds of the oldest one (`nil`: empty log).
    public var retainedChanges: UInt64
    public var oldestAge: Double?
    public var openStreams: Int
    public var subscribers: [Subscriber]
    public var ready: String?
    public var takenAt: Date

    static func gather(
        store: PublisherStore, registry: SubscriberRegistry, openStreams: Int, readiness: String?, now: Date = Date()
    ) async throws -> PublisherOverview {
        let feed = try await store.feedInfo()
        let retained = feed.head >= feed.oldest ? feed.head - feed.oldest + 1 : 0
        let oldestAge = try await retained > 0 ? store.committedAt(feed.oldest).map { now.timeIntervalSince($0) } : nil
        var subscribers: [Subscriber] = []
        for entry in registry.snapshot(now: now) {
            let position = min(entry.position, feed.head)
            var lagSeconds = 0.0
            if position < feed.head, let since = try await store.committedAt(max(position + 1, feed.oldest)) {
                lagSeconds = max(0, now.timeIntervalSince(since))
            }
            subscribers.append(
                Subscriber(
                    entry: entry, lagChanges: feed.head - position, lagSeconds: lagSeconds,
                    connected: entry.openStreams > 0 || now.timeIntervalSince(entry.lastSeen) < 30))
        }
        return PublisherOverview(
            feed: feed, retainedChanges: retained, oldestAge: oldestAge, openStreams: openStreams,
            subscribers: subscribers, ready: readiness, takenAt: now)
    }
}
