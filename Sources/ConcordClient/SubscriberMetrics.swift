import ConcordCore
import Foundation
import Prometheus
import Synchronization

/// A subscriber's Prometheus metrics: position and lag, proof, repairs, bytes, errors.
///
/// What the replica store keeps (position, verification, repairs) is read when the metrics
/// are scraped, so it is never stale and survives restarts of the process.
public final class SubscriberMetrics: Sendable {
    public let registry = PrometheusCollectorRegistry()
    let verifications: Counter
    private let position: Gauge
    private let sourceHead: Gauge
    private let lagChanges: Gauge
    private let lagSeconds: Gauge
    private let verified: Gauge
    private let verifiedAge: Gauge
    private let totals: [String: Counter]
    /// The last value each total was brought to, so counters only ever grow by the difference.
    private let reported = Mutex<[String: Int]>([:])
    /// When the replica was last seen at the source's head.
    private let lastAtHead = Mutex(ContinuousClock.now)

    public init() {
        func descriptor(_ name: String, _ unit: String, _ help: String) -> MetricNameDescriptor {
            MetricNameDescriptor(
                namespace: "concord", subsystem: "replica", metricName: name, unitName: unit, helpText: help)
        }
        verifications = registry.makeCounter(
            descriptor: descriptor("verifications", "total", "Checkpoints at which the replica was proved equal."))
        position = registry.makeGauge(descriptor: descriptor("position", "lsn", "The last LSN applied."))
        sourceHead = registry.makeGauge(
            descriptor: descriptor("source_head", "lsn", "The source's head LSN last seen."))
        lagChanges = registry.makeGauge(
            descriptor: descriptor("lag", "changes", "Changes the source holds beyond the position."))
        lagSeconds = registry.makeGauge(
            descriptor: descriptor(
                "lag", "seconds", "Seconds since the replica was last at the source's head (0 when there)."))
        verified = registry.makeGauge(
            descriptor: descriptor("verified", "lsn", "The last LSN at which the replica was proved equal."))
        verifiedAge = registry.makeGauge(
            descriptor: descriptor("verified_age", "seconds", "Seconds since the replica was last proved equal."))
        var totals: [String: Counter] = [:]
        for (name, help) in [
            ("changes_applied", "Changes applied since the replica was created."),
            ("differences_found", "Checkpoints or scrubs that found the replica different."),
            ("repairs", "Reconciliations that changed the replica."),
            ("records_repaired", "Records the reconciliations wrote or deleted."),
            ("reconciliation_bytes", "Bytes the reconciliations moved."),
            ("bytes_received", "Bytes received from the publisher."),
        ] {
            totals[name] = registry.makeCounter(descriptor: descriptor(name, "total", help))
        }
        self.totals = totals
    }

    func failed(_ code: ConcordError.Code) {
        registry.makeCounter(
            descriptor: MetricNameDescriptor(
                namespace: "concord", subsystem: "replica", metricName: "errors", unitName: "total",
                helpText: "Failures the subscriber retried or stopped on, by code."),
            labels: [("code", code.rawValue)]
        ).increment()
    }

    /// Records where the replica stands against the source's head; returns the lag in seconds.
    @discardableResult
    func noteLag(position: LSN, head: LSN) -> Double {
        lastAtHead.withLock { last in
            if position >= head {
                last = .now
                return 0
            }
            let behind = ContinuousClock.now - last
            return Double(behind.components.seconds) + Double(behind.components.attoseconds) / 1e18
        }
    }

    /// The exposition text, with the store's figures brought up to date.
    public func render(_ subscriber: Subscriber) async -> [UInt8] {
        if let state = try? await subscriber.store.state() {
            position.set(Double(state.position))
            sourceHead.set(Double(state.sourceHead))
            lagChanges.set(Double(state.sourceHead > state.position ? state.sourceHead - state.position : 0))
            lagSeconds.set(noteLag(position: state.position, head: state.sourceHead))
            verified.set(Double(state.verifiedLSN))
            verifiedAge.set(state.verifiedAt.map { Date().timeIntervalSince($0) } ?? -1)
            advance("changes_applied", to: state.appliedChanges)
            advance("differences_found", to: state.mismatches)
            advance("repairs", to: state.repairs)
            advance("records_repaired", to: state.repairedRecords)
        }
        advance("reconciliation_bytes", to: subscriber.reconciliationBytes)
        advance("bytes_received", to: subscriber.bytesReceived)
        return registry.emitToBuffer()
    }

    private func advance(_ name: String, to value: Int) {
        let delta = reported.withLock { reported in
            // A store restarted from zero (a new replica) starts the difference afresh.
            let previous = reported[name] ?? 0
            reported[name] = value
            return value >= previous ? value - previous : value
        }
        if delta > 0 { totals[name]?.increment(by: Int64(delta)) }
    }
}
