import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// A plain TCP connection on loopback, for requests no HTTP client would send: malformed
/// request lines, truncated or slow bodies, a reader that never reads.
///
/// Its reads block until the receive timeout: call them through ``Harness/onOwnThread(_:)``,
/// never on the cooperative pool. One task uses a connection at a time.
final class RawConnection: @unchecked Sendable {
    let socket: Int32

    init(port: Int, receiveTimeout: Duration = .seconds(5)) throws {
        socket = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard socket >= 0 else { throw POSIXError(.EMFILE) }
        var small: Int32 = 4096
        // A small receive buffer (set before connecting, so the window is small too): a reader
        // that stops reading is felt by the server soon.
        setsockopt(socket, SOL_SOCKET, SO_RCVBUF, &small, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let connected = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(socket, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard connected == 0 else {
            close(socket)
            throw POSIXError(.ECONNREFUSED)
        }
        var timeout = timeval(
            tv_sec: Int(receiveTimeout.components.seconds),
            tv_usec: Int(receiveTimeout.components.attoseconds / 1_000_000_000_000))
        setsockopt(socket, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Sends all of `bytes`; false if the peer has closed.
    @discardableResult
    func send(_ bytes: [UInt8]) -> Bool {
        var offset = 0
        while offset < bytes.count {
            let sent = bytes[offset...].withUnsafeBytes {
                Glibc.send(socket, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL))
            }
            if sent <= 0 { return false }
            offset += sent
        }
        return true
    }

    @discardableResult
    func send(_ text: String) -> Bool { send(Array(text.utf8)) }

    /// Reads until the peer closes, `limit` bytes arrive, or the receive timeout passes.
    func receive(limit: Int = 1 << 20) -> [UInt8] {
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 16384)
        while received.count < limit {
            let count = buffer.withUnsafeMutableBytes { recv(socket, $0.baseAddress, $0.count, 0) }
            if count <= 0 { break }
            received += buffer[0..<count]
        }
        return received
    }

    /// Reads until `marker` has arrived, the peer closes, or the receive timeout passes.
    func read(until marker: String) -> String {
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while !String(decoding: received, as: UTF8.self).contains(marker) {
            let count = buffer.withUnsafeMutableBytes { recv(socket, $0.baseAddress, $0.count, 0) }
            if count <= 0 { break }
            received += buffer[0..<count]
        }
        return String(decoding: received, as: UTF8.self)
    }

    /// Reads at about `bytesPerSecond` until `marker` has arrived, the peer closes, or the
    /// receive timeout passes; returns what arrived and whether the peer closed.
    func readSlowly(bytesPerSecond: Int, until marker: String) -> (received: [UInt8], closed: Bool) {
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        let started = ContinuousClock.now
        let target = Array(marker.utf8)
        while true {
            let count = buffer.withUnsafeMutableBytes { recv(socket, $0.baseAddress, $0.count, 0) }
            if count <= 0 { return (received, count == 0) }
            received += buffer[0..<count]
            // The marker may straddle two reads: look in the last read and the line before it.
            let tail = received.suffix(count + target.count)
            if tail.firstRange(of: target) != nil { return (received, false) }
            let elapsed = (ContinuousClock.now - started).components
            let ahead =
                Double(received.count) / Double(bytesPerSecond) - Double(elapsed.seconds)
                - Double(elapsed.attoseconds) * 1e-18
            if ahead > 0 { Thread.sleep(forTimeInterval: ahead) }
        }
    }

    /// The status code of the first response read, if one arrives.
    func status() -> Int? {
        let text = String(read(until: "\n").prefix(64))
        guard text.hasPrefix("HTTP/1.1 ") else { return nil }
        return Int(text.dropFirst(9).prefix(3))
    }

    /// Whether the peer has closed the connection: reads what it sent until the end of file
    /// (true) or until nothing more comes within the receive timeout (false).
    var peerClosed: Bool {
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = buffer.withUnsafeMutableBytes { recv(socket, $0.baseAddress, $0.count, 0) }
            if count > 0 { continue }
            return count == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)
        }
    }

    deinit { close(socket) }
}

/// Reads a Prometheus exposition text into `name{labels}` → value.
func parseMetrics(_ text: String) -> [String: Double] {
    var values: [String: Double] = [:]
    for line in text.split(separator: "\n") where !line.hasPrefix("#") {
        guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else {
            continue
        }
        values[String(line[..<space])] = value
    }
    return values
}

/// The resident memory of a process, in bytes (Linux).
func residentBytes(of pid: Int32) -> Int? {
    guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
    for line in status.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        let kilobytes = line.split(separator: " ").dropFirst().first.flatMap { Int($0) }
        return kilobytes.map { $0 * 1024 }
    }
    return nil
}
