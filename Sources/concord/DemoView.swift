import Foundation
import Synchronization

/// The demo's live view: on a terminal, a table of replicas and the latest events redrawn in
/// place; otherwise events as lines and a status line every two seconds; nothing with `--json`.
final class DemoView: Sendable {
    struct Row {
        var name: String
        var collections: String
        var position: UInt64
        var lag: UInt64
        var state: String
        var verified: UInt64
        var repairs: Int
        var bytes: Int
    }

    struct Drawn {
        var events: [String] = []
        /// Lines of the last drawing, which the next one overwrites.
        var lines = 0
        var at = ContinuousClock.now - .seconds(10)
    }

    let silent: Bool
    let terminal = isatty(STDOUT_FILENO) == 1
    let drawn = Mutex(Drawn())

    init(silent: Bool) { self.silent = silent }

    func event(at seconds: Double, _ text: String) {
        let line = String(format: "%6.1f s  ", seconds) + text
        drawn.withLock { $0.events.append(line) }
        guard !silent, !terminal else { return }
        print(line)
        fflush(nil)
    }

    /// Prints a line below the view (which then stops being redrawn over it).
    func say(_ text: String) {
        guard !silent else { return }
        print(text)
        drawn.withLock { $0.lines = 0 }
        fflush(nil)
    }

    func draw(elapsed: Double, total: Double, head: UInt64, rows: [Row]) {
        guard !silent else { return }
        let now = ContinuousClock.now
        let due = drawn.withLock { drawn in
            guard now - drawn.at >= (terminal ? .milliseconds(200) : .seconds(2)) else { return false }
            drawn.at = now
            return true
        }
        guard due else { return }
        if !terminal {
            print(
                String(format: "%6.1f s  head %llu", elapsed, head)
                    + rows.map { " | \($0.name) \($0.position) \($0.state)" }.joined())
            fflush(nil)
            return
        }
        var lines = [
            String(format: "concord demo  %5.1f of %.0f s   source head LSN %llu", min(elapsed, total), total, head),
            "",
            Self.columns(["replica", "follows", "position", "lag", "state", "verified at", "repairs", "received"]),
        ]
        for row in rows {
            lines.append(
                Self.columns([
                    row.name, row.collections, "\(row.position)", "\(row.lag)", row.state,
                    row.verified > 0 ? "\(row.verified)" : "-", "\(row.repairs)", Self.bytes(row.bytes),
                ]))
        }
        lines.append("")
        let text = drawn.withLock { drawn in
            lines += drawn.events.suffix(8)
            var text = drawn.lines > 0 ? "\u{1B}[\(drawn.lines)A" : ""
            for line in lines { text += "\u{1B}[2K" + line + "\n" }
            drawn.lines = lines.count
            return text
        }
        FileHandle.standardOutput.write(Data(text.utf8))
    }

    static let widths = [10, 17, 9, 6, 14, 12, 8, 10]

    static func columns(_ values: [String]) -> String { columnsOf(values, widths) }

    static func columnsOf(_ values: [String], _ widths: [Int]) -> String {
        zip(values, widths).map { value, width in
            value.count >= width ? value + " " : value.padding(toLength: width, withPad: " ", startingAt: 0)
        }.joined()
    }

    static func bytes(_ count: Int) -> String {
        if count >= 10 << 20 { return String(format: "%.1f MB", Double(count) / 1e6) }
        if count >= 10_000 { return String(format: "%.1f KB", Double(count) / 1e3) }
        return "\(count) B"
    }
}
