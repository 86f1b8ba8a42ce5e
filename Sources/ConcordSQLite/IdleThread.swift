import Foundation
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// One thread, at the lowest scheduling priority, for upkeep that can wait for a free core.
///
/// Folding applied changes into the kept sketches would otherwise hold one of the few threads
/// of Swift's cooperative pool, and take CPU time from reading and applying changes whenever
/// the cores are busy. Its jobs keep each hold of a lock short: a reader that needs their
/// result waits for a thread that may get little CPU time.
package final class IdleThread: Sendable {
    package static let shared = IdleThread()

    private let jobs = Mutex<[@Sendable () -> Void]>([])
    private let wake = DispatchSemaphore(value: 0)

    private init() {
        let thread = Thread { [self] in
            #if canImport(Glibc)
                // Linux keeps a nice value per thread: this lowers only this one. Should it fail,
                // the thread runs at normal priority, which is slower but no less correct.
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
        #if !canImport(Glibc)
            thread.qualityOfService = .background
        #endif
        thread.start()
    }

    /// Runs `job` on the idle thread, after the jobs submitted before it.
    package func submit(_ job: @escaping @Sendable () -> Void) {
        jobs.withLock { $0.append(job) }
        wake.signal()
    }
}
