import ArgumentParser
import AsyncHTTPClient
import ConcordClient
import ConcordCore
import ConcordPostgres
import ConcordSQLite
import Foundation
import Logging

struct Status: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show a publisher's feed, a replica's position and lag, or both.",
        discussion: """
            With --source: the feed's head, retention and collections. With --db (or --postgres and \
            --schema): the replica's state.
            """)

    @Option(help: "A publisher's URL.")
    var source: String?

    @OptionGroup var place: ReplicaPlace

    @OptionGroup var access: SourceAccessOptions
    @OptionGroup var output: OutputOptions
    @OptionGroup var global: GlobalOptions

    func validate() throws {
        if source == nil, place.db == nil, place.postgres == nil {
            throw ValidationError("give --source URL, a replica (--db PATH or --postgres URL), or both")
        }
    }

    func run() async throws {
        var feed: FeedInfo?
        if let source {
            let http = try access.makeHTTPClient()
            do {
                feed = try await SourceClient(
                    baseURL: source, http: http, configuration: try access.clientConfiguration
                ).feed()
                try await http.shutdown()
            } catch {
                try? await http.shutdown()
                FileHandle.printError("error: \(error)")
                throw ExitCode(1)
            }
        }
        var replica: ReplicaState?
        var location = ""
        if place.db != nil || place.postgres != nil {
            let store = try await place.open(logger: Logger(label: "concord.status"))
            location = store.location
            replica = try await store.state()
            await (store as? PostgresReplicaStore)?.close()
        }
        let head = feed?.head ?? replica?.sourceHead
        if output.json {
            var object: [String: Any] = [:]
            if let feed {
                object["feed"] = [
                    "id": feed.feedID, "head": feed.head, "oldest": feed.oldest,
                    "collections": feed.collections.map { ["name": $0.name, "count": $0.count] },
                ]
            }
            if let replica {
                var entry: [String: Any] = [
                    "feed": replica.feedID, "source": replica.source, "position": replica.position,
                    "phase": replica.progress.phase.rawValue, "appliedChanges": replica.appliedChanges,
                    "updatedAt": ISO8601DateFormatter().string(from: replica.updatedAt),
                    "verifiedLSN": replica.verifiedLSN, "repairs": replica.repairs,
                    "repairedRecords": replica.repairedRecords, "mismatches": replica.mismatches,
                ]
                if let at = replica.verifiedAt { entry["verifiedAt"] = ISO8601DateFormatter().string(from: at) }
                if let head { entry["lag"] = head > replica.position ? head - replica.position : 0 }
                object["replica"] = entry
            }
            let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
            return
        }
        if let feed {
            print("feed        \(feed.feedID)")
            print("head        \(feed.head)")
            print("oldest      \(feed.oldest)")
            for collection in feed.collections {
                print(
                    "collection  \(collection.name.padding(toLength: 24, withPad: " ", startingAt: 0)) \(collection.count) records"
                )
            }
        }
        if let replica {
            if feed != nil { print("") }
            print("replica     \(location)")
            print(
                "feed        \(replica.feedID)\(feed.map { $0.feedID == replica.feedID ? "" : "  (differs from the source!)" } ?? "")"
            )
            print("source      \(replica.source)")
            print("phase       \(replica.progress.phase.rawValue)")
            print("position    \(replica.position)")
            if let head {
                let lag = head > replica.position ? head - replica.position : 0
                print("lag         \(lag) changes\(feed == nil ? " (against the head last seen)" : "")")
            }
            print("applied     \(replica.appliedChanges) changes")
            if let at = replica.verifiedAt {
                print("verified    at LSN \(replica.verifiedLSN), \(ISO8601DateFormatter().string(from: at))")
            } else {
                print("verified    not yet")
            }
            print(
                "repairs     \(replica.repairs) (\(replica.repairedRecords) records); \(replica.mismatches) mismatches found"
            )
            print("updated     \(ISO8601DateFormatter().string(from: replica.updatedAt))")
        }
    }
}
