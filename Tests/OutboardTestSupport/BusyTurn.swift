import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A turn at the machine's CPUs for a test that busy-polls them or measures: dpdk-testpmd
/// (its forwarding lcore spins on a CPU for as long as it runs), and the benchmarks' own
/// tests. Swift Testing runs suites in parallel; on a machine of two CPUs, two such tests at
/// once starve each other's peers (a measured side gets no CPU in its window) and stretch
/// each other's waits. Holding a turn, a test runs alone among them; the others wait for
/// theirs. The turn is an exclusive `flock` on one file (close-on-exec, so that no child
/// keeps it), held until the value is dropped, so test processes share it as well.
public struct BusyTurn: ~Copyable {
    let fd: CInt
    public static let path = "/tmp/outboard-busy-turn.lock"

    /// Waits for the turn, at most `waitSeconds` (the other turns' tests are bounded by
    /// their own deadlines).
    public init(waitSeconds: Double = 1200) throws {
        let fd = open(Self.path, O_CREAT | O_RDWR | O_CLOEXEC, 0o666)
        guard fd >= 0 else { throw FixtureError("open \(Self.path): errno \(errno)") }
        let deadline = Date().addingTimeInterval(waitSeconds)
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            guard errno == EWOULDBLOCK || errno == EINTR, Date() < deadline else {
                let e = errno
                close(fd)
                throw FixtureError("no turn at the CPUs within \(waitSeconds) s (flock \(Self.path): errno \(e))")
            }
            usleep(20_000)
        }
        self.fd = fd
    }

    /// A use of the turn: `defer { turn.hold() }` keeps it to the end of the scope.
    public func hold() {}

    deinit { close(fd) }
}
