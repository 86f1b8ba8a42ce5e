import Foundation
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// One thread, at the lowest scheduling priority, for upkeep that can wait for a free core.
///
/// Work that no reader waits for (folding applied changes into the kept sketches) would
/// otherwise hold one of the few threads of Swift's cooperative pool, and take CPU time from
/// the reading and applying of changes whenever the cores are busy.
package final class IdleThread: Sendable {
    package static let shared = IdleThread()

    private let jobs = Mutex<[@Sendable () -> Void]>([])
    private let wake = DispatchSemaphore(value: 0)

    private init() {
        let thread = Thread { [self] in
            #if os(Linux)
                // Linux keeps a nice value per thread: this lowers only this one.
                _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, 19)
            #endif
            while true {
                wake.wait()
                for job in jobs.withLock({ jobs in
                    defer { jobs.removeAll() }
                    return jobs
                }) {
                    job()
                }
            }
        }
        thread.name = "concord-idle"
        thread.start()
    }

    /// Runs `job` on the idle thread, after the jobs submitted before it.
    package func submit(_ job: @escaping @Sendable () -> Void) {
        jobs.withLock { $0.append(job) }
        wake.signal()
    }
}
