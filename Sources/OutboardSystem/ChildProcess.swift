import CLinux
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// How a child process ended.
public enum ExitStatus: Equatable, Sendable, CustomStringConvertible {
    case exited(CInt)
    case signalled(CInt)

    public var description: String {
        switch self {
        case .exited(let c): return "exited with status \(c)"
        case .signalled(let s): return "killed by signal \(s)"
        }
    }
}

/// A child process started with posix_spawn(2), watched through a pidfd (pidfd_open(2)):
/// the pidfd can be polled for exit and signalled without the pid-reuse race.
public struct ChildProcess: ~Copyable, Sendable {
    public let pid: pid_t
    public let pidfd: OwnedFD
    private var reaped = false

    /// Starts `executable` with `arguments`. Only the descriptors in `descriptors` are
    /// inherited, each at the number given as `target` (numbers from 3 up); every other
    /// descriptor is closed in the child before exec.
    public init(
        executable: String, arguments: [String],
        descriptors: [(source: FileDescriptor, target: CInt)] = [],
        environment: [String]? = nil
    ) throws(Errno) {
        // A source may already sit at another mapping's target number; dup every source
        // above all targets first so the dup2 sequence in the child cannot clobber one.
        let floor = (descriptors.map(\.target).max() ?? 2) + 1
        var from: [CInt] = []
        defer { for fd in from { close(fd) } }
        for d in descriptors {
            let src = d.source.rawValue
            from.append(try sys { fcntl(src, F_DUPFD_CLOEXEC, floor) })
        }
        let to = descriptors.map { $0.target }
        let argv = [executable] + arguments
        let env = environment ?? Self.currentEnvironment()
        var pid: pid_t = 0
        try Self.withCStrings(argv) { (cargv) throws(Errno) in
            try Self.withCStrings(env) { (cenv) throws(Errno) in
                try sysReturningErrno { ob_spawn(&pid, executable, cargv, cenv, from, to, from.count, floor) }
            }
        }
        let pidfdRaw: CInt
        do {
            let p = pid
            pidfdRaw = try sys { ob_pidfd_open(p, 0) }
        } catch {
            let p = pid
            _ = try? sys { kill(p, SIGKILL) }
            var st: CInt = 0
            _ = try? sys { waitpid(p, &st, 0) }
            throw error
        }
        self.pid = pid
        self.pidfd = OwnedFD(adopting: pidfdRaw)
    }

    deinit {
        if !reaped {
            // Never leave a zombie or an orphan behind: a child still running when its
            // owner goes away is killed and reaped.
            let raw = pidfd.raw.rawValue, p = pid
            _ = try? sys { ob_pidfd_send_signal(raw, SIGKILL) }
            var st: CInt = 0
            _ = try? sys { waitpid(p, &st, 0) }  // retried on EINTR: a signal must not leave a zombie
        }
    }

    /// Sends `signal` through the pidfd (pidfd_send_signal(2)).
    public func signal(_ signal: CInt) throws(Errno) {
        let raw = pidfd.raw.rawValue
        _ = try sys { ob_pidfd_send_signal(raw, signal) }
    }

    /// Ends the child: sends `signal`, and SIGKILL if it has not ended `graceMilliseconds`
    /// later; reaps it. Nothing happens if it was already reaped.
    public mutating func terminate(_ signal: CInt = SIGTERM, graceMilliseconds: Int = 5000) {
        guard !reaped else { return }
        try? self.signal(signal)
        if (try? wait(timeoutMilliseconds: graceMilliseconds)) == nil {
            try? self.signal(SIGKILL)
            _ = try? wait()
        }
    }

    /// Waits for the child to end, at most `timeoutMilliseconds` (negative: forever).
    /// Returns nil on timeout; the child is reaped when it returns a status.
    public mutating func wait(timeoutMilliseconds: Int = -1) throws(Errno) -> ExitStatus? {
        if reaped { throw Errno.noChildProcess }
        var pfd = pollfd(fd: pidfd.raw.rawValue, events: Int16(POLLIN), revents: 0)
        let n = try sysWaiting(timeoutMilliseconds: timeoutMilliseconds) { poll(&pfd, 1, $0) }
        if n == 0 { return nil }
        var st: CInt = 0
        let p = pid
        _ = try sys { waitpid(p, &st, 0) }
        reaped = true
        if st & 0x7f == 0 { return .exited((st >> 8) & 0xff) }
        return .signalled(st & 0x7f)
    }

    static func currentEnvironment() -> [String] {
        var result: [String] = []
        var p = environ
        while let s = p.pointee {
            result.append(String(cString: s))
            p += 1
        }
        return result
    }

    static func withCStrings<R>(_ strings: [String], _ body: ([UnsafeMutablePointer<CChar>?]) throws(Errno) -> R) throws(Errno) -> R {
        let ptrs: [UnsafeMutablePointer<CChar>?] = strings.map { strdup($0) } + [nil]
        defer { for p in ptrs { free(p) } }
        return try body(ptrs)
    }
}
