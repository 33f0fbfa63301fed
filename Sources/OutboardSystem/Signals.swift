#if canImport(Glibc)
import Glibc
#endif

// SIGINT/SIGTERM ring an eventfd the loop polls (write(2) is async-signal-safe).
nonisolated(unsafe) var shutdownSignalFD: CInt = -1

/// Makes SIGINT and SIGTERM ring the eventfd `fd` (an event loop polls it), and ignores
/// SIGPIPE. One such descriptor per process. Unblocks both (`unblockStopSignals`).
public func installShutdownSignals(_ fd: CInt) {
    shutdownSignalFD = fd
    let handler: @convention(c) (CInt) -> Void = { _ in
        var one: UInt64 = 1
        _ = write(shutdownSignalFD, &one, 8)
    }
    signal(SIGINT, handler)
    signal(SIGTERM, handler)
    signal(SIGPIPE, SIG_IGN)
    unblockStopSignals()
}

/// Unblocks SIGINT and SIGTERM in the calling thread. A process started by a thread that
/// blocks them (a test runner's worker, Foundation's `Process`) inherits the mask across
/// exec, and must still stop when told.
public func unblockStopSignals() {
    var set = sigset_t()
    sigemptyset(&set)
    sigaddset(&set, SIGINT)
    sigaddset(&set, SIGTERM)
    pthread_sigmask(SIG_UNBLOCK, &set, nil)
}
