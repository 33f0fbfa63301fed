import CLinux
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The one place where EINTR is retried (swift-system's layering: a raw call, a helper that
/// maps -1 to `Errno` and alone retries EINTR, and typed public APIs on top).
///
/// `@inline(never)`: errno must be read right after the call, before ARC or anything else
/// can run and clobber it (the same reason swift-nio's syscall wrappers are not inlined).
@inline(never)
@usableFromInline
func sys<T: FixedWidthInteger>(_ call: () -> T) throws(Errno) -> T {
    while true {
        let r = call()
        if r != -1 { return r }
        let e = Errno(rawValue: errno)
        if e == .interrupted { continue }
        throw e
    }
}

/// As `sys`, for calls that wait at most a timeout in milliseconds (negative: no limit),
/// which `call` gets as its argument: poll(2), epoll_wait(2). A call interrupted by a signal
/// is retried with what is left of the timeout, not the whole of it again, so signals that
/// keep coming cannot stretch the wait.
@inline(never)
@usableFromInline
func sysWaiting<T: FixedWidthInteger>(timeoutMilliseconds: Int, _ call: (CInt) -> T) throws(Errno) -> T {
    let start = timeoutMilliseconds > 0 ? Clock.monotonicNanoseconds : 0
    var timeout = CInt(clamping: timeoutMilliseconds)
    while true {
        let r = call(timeout)
        if r != -1 { return r }
        let e = Errno(rawValue: errno)
        if e != .interrupted { throw e }
        if timeoutMilliseconds > 0 {
            let elapsed = Int(clamping: (Clock.monotonicNanoseconds &- start) / 1_000_000)
            timeout = CInt(clamping: max(0, timeoutMilliseconds - elapsed))
        }
    }
}

/// As `sys`, for calls that return 0 or an errno value directly (posix_spawn).
@inline(never)
func sysReturningErrno(_ call: () -> CInt) throws(Errno) {
    while true {
        let r = call()
        if r == 0 { return }
        if r == EINTR { continue }
        throw Errno(rawValue: r)
    }
}

/// An owned file descriptor: exactly one owner, closed when the owner goes away.
/// Use `borrow`-style access through `raw` for calls; `take()` hands ownership on.
public struct OwnedFD: ~Copyable, Sendable {
    public let raw: FileDescriptor

    /// Takes ownership of `fd`; it will be closed by this value.
    public init(adopting fd: FileDescriptor) { raw = fd }
    public init(adopting fd: CInt) { raw = FileDescriptor(rawValue: fd) }

    deinit { _ = try? raw.close() }

    /// Gives up ownership without closing: the caller now owns the descriptor.
    public consuming func release() -> FileDescriptor {
        let fd = raw
        discard self
        return fd
    }

    /// dup(2) with FD_CLOEXEC: a second owner of the same open file.
    public func duplicate() throws(Errno) -> OwnedFD {
        let fd = raw.rawValue
        return OwnedFD(adopting: try sys { fcntl(fd, F_DUPFD_CLOEXEC, 3) })
    }
}

/// Monotonic and CPU clocks used for deadlines and CPU-per-operation figures.
public enum Clock {
    /// CLOCK_MONOTONIC in nanoseconds (clock_gettime(2)).
    @inlinable public static var monotonicNanoseconds: UInt64 { ob_monotonic_ns() }
    /// CLOCK_PROCESS_CPUTIME_ID in nanoseconds: CPU used by all threads of this process.
    public static var processCPUNanoseconds: UInt64 { ob_process_cpu_ns() }
}

/// CPU placement (sched_setaffinity(2)).
public enum CPU {
    /// The CPUs the calling thread may run on (its affinity mask, which threads and child
    /// processes inherit), ascending: under a cpuset they need not start at 0 or be
    /// contiguous. CPUs numbered 1024 and up are not seen (glibc's cpu_set_t); empty when
    /// the mask cannot be read.
    public static var allowed: [Int] {
        var cpus = [CInt](repeating: 0, count: 1024)
        let n = ob_cpu_allowed(&cpus, CInt(cpus.count))
        return n > 0 ? cpus.prefix(Int(n)).map(Int.init) : []
    }
    /// Two CPUs for a pair of busy processes (a producer and a consumer): the first two
    /// allowed, or nil when fewer than two are allowed (then neither is pinned).
    public static var firstTwoAllowed: (Int, Int)? {
        let a = allowed
        return a.count >= 2 ? (a[0], a[1]) : nil
    }
    /// Pins the calling thread to `cpu`.
    public static func pin(to cpu: Int) throws(Errno) {
        _ = try sys { ob_pin_to_cpu(CInt(cpu)) }
    }
}
