import ConcordCore
import ConcordSQLite
import Logging

/// What one collection's reconciliation found and cost.
public struct ReconciliationReport: Sendable, Hashable {
    public var collection: String
    /// The source LSN both sides were compared at.
    public var lsn: LSN
    /// Keys the source holds and the replica does not, keys only the replica holds, and
    /// keys both hold with different content.
    public var missing: [String] = []
    public var extra: [String] = []
    public var stale: [String] = []
    /// Coded symbols received, and bytes exchanged for symbols, for key lookups, and in all.
    public var symbols = 0
    public var symbolBytes = 0
    public var lookupBytes = 0
    /// Bytes of the differing records themselves (key, version and value of each fetched record).
    public var recordBytes = 0
    /// Whether the difference was too large for the sketch: the collection is copied again instead.
    public var tooLarge = false
    public var repaired = false
    public var seconds = 0.0

    public var isEqual: Bool { missing.isEmpty && extra.isEmpty && stale.isEmpty && !tooLarge }
    public var differences: Int { missing.count + extra.count + stale.count }
    public var totalBytes: Int { symbolBytes + lookupBytes }

    public init(collection: String, lsn: LSN) {
        self.collection = collection
        self.lsn = lsn
    }
}

/// Finds the records in which a replica differs from its source at one LSN with a rateless
/// IBLT: the source sends coded symbols in growing batches until the difference peels, then
/// only the differing records travel.
public struct Reconciler: Sendable {
    public struct Configuration: Sendable {
        /// Symbols in the first batch; each further batch adds an eighth of those received,
        /// so at most about 12% more symbols are sent than the difference needs.
        public var firstBatch = 16
        /// Symbols the source keeps; a difference that needs more is copied again instead.
        public var maxSymbols = ReplicaStore.sketchCapacity
        public init() {}
    }

    let client: SourceClient
    let configuration: Configuration
    let logger: Logger

    public init(client: SourceClient, configuration: Configuration = Configuration(), logger: Logger) {
        self.client = client
        self.configuration = configuration
        self.logger = logger
    }

    /// Compares `local` (the replica's sketch of `collection`) with the source at `lsn`, and
    /// with `repair` writes the differences into `store`.
    public func reconcile(
        _ collection: String, at lsn: LSN, local: RatelessSketch, store: ReplicaStore, repair: Bool
    ) async throws -> ReconciliationReport {
        let started = ContinuousClock.now
        var report = ReconciliationReport(collection: collection, lsn: lsn)
        var decoder = RatelessDecoder()
        var received = 0
        let limit = min(configuration.maxSymbols, local.capacity)
        while !decoder.isDecoded {
            guard received < limit else {
                report.tooLarge = true
                break
            }
            let batch = min(limit - received, max(configuration.firstBatch, received / 8))
            let (symbols, bytes) = try await client.symbols(
                collection: collection, at: lsn, range: received..<(received + batch))
            report.symbolBytes += bytes
            for (offset, symbol) in symbols.enumerated() {
                decoder.add(remote: symbol, local: local.symbols[received + offset])
                if decoder.isDecoded { break }
            }
            received += symbols.count
        }
        report.symbols = decoder.symbolCount
        if report.tooLarge {
            report.seconds = Self.seconds(since: started)
            if repair {
                logger.warning(
                    "too many differences to reconcile, copying the collection again",
                    metadata: ["collection": "\(collection)", "symbols": "\(received)"])
                try await store.startRecopy(collection)
                report.repaired = true
            }
            return report
        }
        let remoteHashes = Set(decoder.remoteOnly.map(\.keyHash))
        let localHashes = Set(decoder.localOnly.map(\.keyHash))
        var fetched: [Record] = []
        var fetchedHashes = Set<UInt64>()
        if !remoteHashes.isEmpty {
            // Keys only the replica holds are not looked up: the source did not hold them at the
            // LSN, and a later write of one reaches the replica through the log.
            let (page, bytes) = try await client.records(
                collection: collection, keyHashes: Array(remoteHashes).sorted())
            fetched = page.records
            for record in fetched {
                fetchedHashes.insert(Element.keyHash(collection: collection, key: record.key))
                report.recordBytes += record.key.utf8.count + record.value.utf8.count + 8
            }
            report.lookupBytes = bytes - report.recordBytes
        }
        let unresolved = localHashes.subtracting(fetchedHashes)
        let localKeys = try await store.keys(of: collection, keyHashes: unresolved)
        for record in fetched {
            let hash = Element.keyHash(collection: collection, key: record.key)
            if localHashes.contains(hash) { report.stale.append(record.key) } else { report.missing.append(record.key) }
        }
        report.extra = unresolved.compactMap { localKeys[$0] }.sorted()
        report.missing.sort()
        report.stale.sort()
        if repair, !report.isEqual {
            try await store.repair(collection, at: lsn, writing: fetched, deleting: report.extra)
            report.repaired = true
        }
        report.seconds = Self.seconds(since: started)
        return report
    }

    static func seconds(since start: ContinuousClock.Instant) -> Double {
        let elapsed = ContinuousClock.now - start
        return Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
    }
}
