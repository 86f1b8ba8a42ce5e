import ConcordCore
import Foundation

/// The dashboard page (`GET /`): plain HTML that reloads itself every few seconds, so it
/// works in any browser, with no script at all.
enum Dashboard {
    static func render(_ overview: PublisherOverview, refreshSeconds: Int = 2) -> String {
        let feed = overview.feed
        var html = """
            <!doctype html>
            <html lang="en"><head><meta charset="utf-8">
            <meta http-equiv="refresh" content="\(refreshSeconds)">
            <meta name="viewport" content="width=device-width, initial-scale=1">
            <title>Concord · \(escape(feed.feedID))</title>
            <style>
            body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2330;background:#f7f8fa}
            h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}
            .sub{color:#5b6475;margin-bottom:16px}
            .cards{display:flex;gap:12px;flex-wrap:wrap}
            .card{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:10px 14px;min-width:150px}
            .card b{display:block;font-size:20px}
            table{border-collapse:collapse;background:#fff;border:1px solid #dde1e8;min-width:60%}
            th,td{padding:6px 10px;border-bottom:1px solid #eceff3;text-align:right;white-space:nowrap}
            th:first-child,td:first-child{text-align:left}th{background:#eef1f5;font-weight:600}
            .ok{color:#1a7f37}.warn{color:#b35900}.bad{color:#c62828}.muted{color:#8a93a3}
            </style></head><body>
            <h1>Concord publisher</h1>
            <div class="sub">feed <code>\(escape(feed.feedID))</code> · \(statusText(overview.ready)) · \
            updated \(timestamp(overview.takenAt))</div>
            <div class="cards">
            <div class="card">head LSN<b id="head">\(feed.head)</b></div>
            <div class="card">log retains<b id="retained">\(overview.retainedChanges)</b>changes from LSN \(feed.oldest)</div>
            <div class="card">oldest retained change<b id="oldest-age">\(overview.oldestAge.map(duration) ?? "–")</b>old</div>
            <div class="card">open streams<b id="streams">\(overview.openStreams)</b></div>
            <div class="card">subscribers<b id="subscriber-count">\(overview.subscribers.count)</b></div>
            </div>

            """
        html += "<h2>Subscribers</h2>\n"
        if overview.subscribers.isEmpty {
            html += "<p class=\"muted\" id=\"no-subscribers\">No subscriber has connected yet.</p>\n"
        } else {
            html += """
                <table id="subscribers"><thead><tr><th>subscriber</th><th>state</th><th>position</th>\
                <th>lag (changes)</th><th>lag</th><th>verified at</th><th>repairs</th>\
                <th>records repaired</th><th>last seen</th></tr></thead><tbody>

                """
            for subscriber in overview.subscribers {
                let entry = subscriber.entry
                let state = subscriber.connected ? entry.activity : "disconnected"
                let stateClass =
                    !subscriber.connected ? "bad" : ["following", "verifying"].contains(entry.activity) ? "ok" : "warn"
                let verified =
                    entry.verifiedLSN == 0
                    ? "<span class=\"muted\">never</span>"
                    : "\(entry.verifiedLSN)\(entry.verifiedLSN == entry.position ? " ✓" : "")"
                let lagClass = subscriber.lagSeconds > 60 ? "bad" : subscriber.lagChanges > 0 ? "warn" : "ok"
                html += """
                    <tr data-subscriber="\(escape(entry.name))"><td>\(escape(entry.name))</td>\
                    <td class="\(stateClass)">\(escape(state))</td><td>\(entry.position)</td>\
                    <td class="\(lagClass)">\(subscriber.lagChanges)</td><td>\(duration(subscriber.lagSeconds))</td>\
                    <td>\(verified)</td><td>\(entry.repairs)</td><td>\(entry.repairedRecords)</td>\
                    <td>\(entry.openStreams > 0 ? "streaming now" : duration(overview.takenAt.timeIntervalSince(entry.lastSeen)) + " ago")</td></tr>

                    """
            }
            html += "</tbody></table>\n"
        }
        html += "<h2>Collections</h2>\n"
        html +=
            "<table id=\"collections\"><thead><tr><th>collection</th><th>records</th><th>digest</th></tr></thead><tbody>\n"
        for collection in feed.collections {
            let digest = collection.digest.map { String($0.sumHex.prefix(16)) + "…" } ?? ""
            html +=
                "<tr><td>\(escape(collection.name))</td><td>\(collection.count)</td><td><code>\(digest)</code></td></tr>\n"
        }
        html += "</tbody></table>\n</body></html>\n"
        return html
    }

    static func statusText(_ notReady: String?) -> String {
        guard let notReady else { return "<span class=\"ok\" id=\"ready\">ready</span>" }
        return "<span class=\"warn\" id=\"ready\">not ready: \(escape(notReady))</span>"
    }

    static func escape(_ text: String) -> String {
        var out = ""
        out.reserveCapacity(text.utf8.count)
        for character in text {
            switch character {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            case "'": out += "&#39;"
            default: out.append(character)
            }
        }
        return out
    }

    /// `0.4 s`, `12 s`, `3 min 4 s`, `2 h 5 min`, `3 d 2 h`.
    static func duration(_ seconds: Double) -> String {
        if seconds < 10 { return String(format: "%.1f s", max(0, seconds)) }
        let whole = Int(seconds)
        if whole < 60 { return "\(whole) s" }
        if whole < 3600 { return "\(whole / 60) min \(whole % 60) s" }
        if whole < 86400 { return "\(whole / 3600) h \(whole % 3600 / 60) min" }
        return "\(whole / 86400) d \(whole % 86400 / 3600) h"
    }

    static func timestamp(_ date: Date) -> String {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime]
        return formatter.string(from: date)
    }
}
