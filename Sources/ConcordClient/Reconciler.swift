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
    /// Where the time went: receiving and peeling symbols, looking the differing records up at
    /// the source, naming the keys only the replica holds, and writing the repair.
    public var symbolSeconds = 0.0
    public var lookupSeconds = 0.0
    public var localKeySeconds = 0.0
    public var repairSeconds = 0.0

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
        /// A difference that needs more symbols than this share of the larger side's record
        /// count is copied again instead: about a third of the records differ by then.
        public var maxSymbolsPerRecord = 0.5
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
        _ collection: String, at lsn: LSN, local: RatelessSketch, store: any ReplicaStoring, repair: Bool
    ) async throws -> ReconciliationReport {
        let started = ContinuousClock.now
        var report = ReconciliationReport(collection: collection, lsn: lsn)
        var decoder = RatelessDecoder()
        var received = 0
        var limit = local.capacity
        // Past the kept symbols the replica computes its own from its rows, read once.
        var localItems: [SketchItem]?
        var localSymbols = local.symbols
        while !decoder.isDecoded {
            guard received < limit else {
                report.tooLarge = true
                break
            }
            var batch = max(configuration.firstBatch, received / 8)
            if received < local.capacity { batch = min(batch, local.capacity - received) }
            let (symbols, bytes) = try await client.symbols(
                collection: collection, at: lsn, range: received..<(received + batch))
            report.symbolBytes += bytes
            if received == 0, let first = symbols.first {
                // Symbol 0 holds every item, so its count is the size of the set.
                let records = max(Int(first.count), Int(local.symbols.first?.count ?? 0))
                limit = max(local.capacity, Int(Double(records) * configuration.maxSymbolsPerRecord))
            }
            if received + symbols.count > localSymbols.count {
                if localItems == nil { localItems = try await store.sketchItems(of: collection) }
                localSymbols += RatelessSketch.symbols(
                    of: localItems!, range: localSymbols.count..<(received + symbols.count))
            }
            for (offset, symbol) in symbols.enumerated() {
                decoder.add(remote: symbol, local: localSymbols[received + offset])
                if decoder.isDecoded { break }
            }
            received += symbols.count
        }
        report.symbols = decoder.symbolCount
        report.symbolSeconds = Self.seconds(since: started)
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
        var phase = ContinuousClock.now
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
        report.lookupSeconds = Self.seconds(since: phase)
        phase = .now
        let unresolved = localHashes.subtracting(fetchedHashes)
        let localKeys = try await store.keys(of: collection, keyHashes: unresolved)
        report.localKeySeconds = Self.seconds(since: phase)
        phase = .now
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
        report.repairSeconds = Self.seconds(since: phase)
        report.seconds = Self.seconds(since: started)
        return report
    }

    static func seconds(since start: ContinuousClock.Instant) -> Double {
        let elapsed = ContinuousClock.now - start
        return Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
    }
}
