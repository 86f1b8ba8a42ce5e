import Foundation
import Synchronization

/// Progress of long work on standard error: a bar with rate and ETA redrawn in place on a
/// terminal, a plain line every 10% otherwise, nothing with `--quiet`.
final class ProgressLine: Sendable {
    let label: String
    /// What is counted: records, rows, collections.
    let unit: String
    let quiet: Bool
    let terminal = isatty(STDERR_FILENO) == 1
    let start = ContinuousClock.now
    private let last = Mutex<(drawn: ContinuousClock.Instant, decile: Int)>((.now - .seconds(1), -1))

    init(_ label: String, unit: String = "records", quiet: Bool) {
        self.label = label
        self.unit = unit
        self.quiet = quiet
    }

    func update(_ done: Int, _ total: Int) {
        guard !quiet else { return }
        let now = ContinuousClock.now
        let fraction = total > 0 ? min(1, Double(done) / Double(total)) : 1
        let shouldDraw = last.withLock { last -> Bool in
            if terminal {
                guard now - last.drawn >= .milliseconds(100) || done >= total else { return false }
                last.drawn = now
                return true
            }
            let decile = Int(fraction * 10)
            guard decile > last.decile else { return false }
            last.decile = decile
            return true
        }
        guard shouldDraw else { return }
        let seconds = max(0.001, (now - start).seconds)
        let rate = Double(done) / seconds
        let eta = rate > 0 ? Double(max(0, total - done)) / rate : 0
        let figures = String(
            format: "%3.0f%% %d/%d %@, %.0f/s, ETA %.0f s", fraction * 100, done, total, unit, rate, eta)
        if terminal {
            let width = 24
            let filled = Int(fraction * Double(width))
            let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
            FileHandle.standardError.write(Data("\r\(label) [\(bar)] \(figures)\u{1B}[K".utf8))
        } else {
            FileHandle.standardError.write(Data("\(label): \(figures)\n".utf8))
        }
    }

    /// Ends the redrawn line on a terminal.
    func finish() {
        guard !quiet, terminal else { return }
        FileHandle.standardError.write(Data("\n".utf8))
    }
}

/// One progress line per collection, for work that goes through collections in turn.
final class CollectionProgress: Sendable {
    let label: String
    let quiet: Bool
    private let current = Mutex<(collection: String, line: ProgressLine)?>(nil)

    init(label: String, quiet: Bool) {
        self.label = label
        self.quiet = quiet
    }

    func update(_ collection: String, _ done: Int, _ total: Int) {
        let line = current.withLock { current -> ProgressLine in
            if let current, current.collection == collection { return current.line }
            current?.line.finish()
            let line = ProgressLine("\(label) \(collection)", quiet: quiet)
            current = (collection, line)
            return line
        }
        line.update(done, total)
        if done >= total { line.finish() }
    }
}
