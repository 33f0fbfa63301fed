import CLinux
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A doorbell: an eventfd one process rings and another waits on.
///
/// Non-blocking (EFD_NONBLOCK) so that it can sit in an epoll set; `wait(timeoutMilliseconds:)`
/// polls first. Rings accumulate in the eventfd counter, and one wait consumes them all:
/// a doorbell says "look at the queue", never "one item arrived". eventfd(2).
public struct Doorbell: ~Copyable, Sendable {
    public let fd: OwnedFD

    /// A new doorbell, not rung.
    public init() throws(Errno) {
        fd = OwnedFD(adopting: try sys { ob_eventfd(0, OB_EFD_CLOEXEC | OB_EFD_NONBLOCK) })
    }

    /// A doorbell received from a peer. The fd is not checked to be an eventfd here;
    /// a wrong kind of fd makes ring/wait fail with an error, not misbehave.
    public init(adopting fd: consuming OwnedFD) { self.fd = fd }

    /// Rings the doorbell: adds 1 to the eventfd counter (write(2) of 8 bytes).
    /// EAGAIN (the counter is at its maximum) means a wake-up is already pending: success.
    @inline(never)
    public func ring() throws(Errno) {
        var one: UInt64 = 1
        let raw = fd.raw.rawValue
        do {
            _ = try sys { write(raw, &one, 8) }
        } catch let e where e == .resourceTemporarilyUnavailable {}
    }

    /// Consumes pending rings without blocking. Returns how many rings were pending.
    @discardableResult
    @inline(never)
    public func drain() throws(Errno) -> UInt64 {
        var value: UInt64 = 0
        let raw = fd.raw.rawValue
        do {
            _ = try sys { read(raw, &value, 8) }
            return value
        } catch let e where e == .resourceTemporarilyUnavailable {
            return 0
        }
    }

    /// Blocks until the doorbell rings or the timeout passes (negative: no timeout), then
    /// consumes the pending rings. Returns false on timeout. poll(2) + read(2).
    @inline(never)
    public func wait(timeoutMilliseconds: Int) throws(Errno) -> Bool {
        var pfd = pollfd(fd: fd.raw.rawValue, events: Int16(POLLIN), revents: 0)
        let n = try sysWaiting(timeoutMilliseconds: timeoutMilliseconds) { poll(&pfd, 1, $0) }
        if n == 0 { return false }
        try drain()
        return true
    }
}
