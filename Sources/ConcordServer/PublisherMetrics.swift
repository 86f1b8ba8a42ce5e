import ConcordCore
import Foundation
import Prometheus
import Synchronization

/// The publisher's Prometheus metrics, served on `/metrics`.
///
/// Counters of what the server does are kept as it serves; the head, the retention window
/// and each subscriber's position and lag are read when the metrics are scraped, so they are
/// never stale.
public final class PublisherMetrics: Sendable {
    public let registry = PrometheusCollectorRegistry()
    let changesServed: Counter
    let bytesServed: Counter
    let reconciliationBytes: Counter
    let requests: Counter
    let changesWritten: Counter
    let head: Gauge
    let oldest: Gauge
    let retained: Gauge
    let oldestAge: Gauge
    let streams: Gauge
    let subscriberCount: Gauge
    private let lastHead: Mutex<LSN?>
    private let labelled = Mutex<[String: [Gauge]]>([:])

    public init() {
        func descriptor(_ name: String, _ unit: String, _ help: String) -> MetricNameDescriptor {
            MetricNameDescriptor(
                namespace: "concord", subsystem: "publisher", metricName: name, unitName: unit, helpText: help)
        }
        changesServed = registry.makeCounter(
            descriptor: descriptor("changes_served", "total", "Changes sent to subscribers (pulls and streams)."))
        bytesServed = registry.makeCounter(
            descriptor: descriptor("bytes_served", "total", "Response bytes of changes, pages and reconciliation."))
        reconciliationBytes = registry.makeCounter(
            descriptor: descriptor(
                "reconciliation_bytes", "total", "Bytes of sketch symbols and looked-up records sent."))
        requests = registry.makeCounter(descriptor: descriptor("requests", "total", "HTTP requests answered."))
        changesWritten = registry.makeCounter(
            descriptor: descriptor(
                "changes_written", "total", "Changes appended to the log since the publisher started."))
        head = registry.makeGauge(descriptor: descriptor("head", "lsn", "The log's last LSN."))
        oldest = registry.makeGauge(descriptor: descriptor("oldest", "lsn", "The oldest LSN the log retains."))
        retained = registry.makeGauge(descriptor: descriptor("retained_changes", "", "Changes the log retains."))
        oldestAge = registry.makeGauge(
            descriptor: descriptor("oldest_change_age", "seconds", "Age of the oldest retained change."))
        streams = registry.makeGauge(descriptor: descriptor("open_streams", "", "Change streams open now."))
        subscriberCount = registry.makeGauge(descriptor: descriptor("subscribers", "", "Subscribers known now."))
        lastHead = Mutex(nil)
    }

    /// Changes written from now on are counted from `head`.
    func countWrites(from head: LSN) {
        lastHead.withLock { $0 = $0 ?? head }
    }

    /// Counts a refused or failed request by its error code.
    func failed(_ code: ConcordError.Code) {
        registry.makeCounter(
            descriptor: MetricNameDescriptor(
                namespace: "concord", subsystem: "publisher", metricName: "errors", unitName: "total",
                helpText: "Requests answered with an error, by code."),
            labels: [("code", code.rawValue)]
        ).increment()
    }

    /// The exposition text for `overview`, with the scrape-time gauges brought up to date.
    func render(_ overview: PublisherOverview) -> [UInt8] {
        let feed = overview.feed
        let written = lastHead.withLock { last in
            defer { last = feed.head }
            return last.map { feed.head > $0 ? feed.head - $0 : 0 } ?? 0
        }
        changesWritten.increment(by: Int64(clamping: written))
        head.set(Double(feed.head))
        oldest.set(Double(feed.oldest))
        retained.set(Double(overview.retainedChanges))
        oldestAge.set(overview.oldestAge ?? 0)
        streams.set(Double(overview.openStreams))
        subscriberCount.set(Double(overview.subscribers.count))
        labelled.withLock { labelled in
            let current = Set(overview.subscribers.map(\.entry.name))
            for (name, gauges) in labelled where !current.contains(name) {
                gauges.forEach(registry.unregisterGauge)
                labelled[name] = nil
            }
            for subscriber in overview.subscribers {
                let entry = subscriber.entry
                let values: [(String, String, String, Double)] = [
                    ("position", "lsn", "The subscriber's last applied (or sent) LSN.", Double(entry.position)),
                    ("lag", "changes", "Changes beyond the subscriber's position.", Double(subscriber.lagChanges)),
                    (
                        "lag", "seconds", "Age of the oldest change the subscriber has not applied.",
                        subscriber.lagSeconds
                    ),
                    (
                        "verified", "lsn", "The last LSN the subscriber proved equal (reported).",
                        Double(entry.verifiedLSN)
                    ),
                    ("repairs", "", "Reconciliations that changed the replica (reported).", Double(entry.repairs)),
                    (
                        "repaired_records", "", "Records the reconciliations wrote or deleted (reported).",
                        Double(entry.repairedRecords)
                    ),
                    (
                        "differences_found", "", "Checkpoints or scrubs that found a difference (reported).",
                        Double(entry.mismatches)
                    ),
                    ("open_streams", "", "The subscriber's open change streams.", Double(entry.openStreams)),
                    (
                        "changes_served", "", "Changes sent to the subscriber since the publisher started.",
                        Double(entry.changesServed)
                    ),
                ]
                var gauges: [Gauge] = []
                for (name, unit, help, value) in values {
                    let gauge = registry.makeGauge(
                        descriptor: MetricNameDescriptor(
                            namespace: "concord", subsystem: "subscriber", metricName: name, unitName: unit,
                            helpText: help),
                        labels: [("subscriber", entry.name)])
                    gauge.set(value)
                    gauges.append(gauge)
                }
                labelled[entry.name] = gauges
            }
        }
        return registry.emitToBuffer()
    }
}
