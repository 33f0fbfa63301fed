import CLinux
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// An epoll instance: one thread waits for many descriptors (doorbells, sockets, pidfds).
/// epoll(7).
public struct Epoll: ~Copyable, Sendable {
    public let fd: OwnedFD

    /// Readiness a registration asks for or an event reports.
    public struct Events: OptionSet, Sendable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        public static let readable = Events(rawValue: OB_EPOLLIN)
        public static let writable = Events(rawValue: OB_EPOLLOUT)
        public static let hangup = Events(rawValue: OB_EPOLLHUP)
        public static let error = Events(rawValue: OB_EPOLLERR)
        public static let edgeTriggered = Events(rawValue: OB_EPOLLET)
    }

    /// One ready descriptor: the `token` given when it was added, and what is ready.
    public struct Event: Sendable {
        public var token: UInt64
        public var events: Events
    }

    /// epoll_create1(2) with EPOLL_CLOEXEC.
    public init() throws(Errno) {
        fd = OwnedFD(adopting: try sys { ob_epoll_create() })
    }

    /// Watches `descriptor` for `events`; `token` comes back in each event (EPOLL_CTL_ADD).
    public func add(_ descriptor: FileDescriptor, events: Events, token: UInt64) throws(Errno) {
        try control(OB_EPOLL_CTL_ADD, descriptor, events, token)
    }

    /// Changes what `descriptor` is watched for (EPOLL_CTL_MOD).
    public func modify(_ descriptor: FileDescriptor, events: Events, token: UInt64) throws(Errno) {
        try control(OB_EPOLL_CTL_MOD, descriptor, events, token)
    }

    /// Stops watching `descriptor` (EPOLL_CTL_DEL).
    public func remove(_ descriptor: FileDescriptor) throws(Errno) {
        try control(OB_EPOLL_CTL_DEL, descriptor, [], 0)
    }

    private func control(_ op: CInt, _ descriptor: FileDescriptor, _ events: Events, _ token: UInt64) throws(Errno) {
        let raw = fd.raw.rawValue
        _ = try sys { ob_epoll_ctl(raw, op, descriptor.rawValue, events.rawValue, token) }
    }

    /// Waits up to `timeoutMilliseconds` (negative: forever) and returns the ready events,
    /// at most `maxEvents` (epoll_wait(2)). An empty array means the timeout passed.
    public func wait(maxEvents: Int = 32, timeoutMilliseconds: Int) throws(Errno) -> [Event] {
        let count = min(max(maxEvents, 1), 64)
        var events = [UInt32](repeating: 0, count: count)
        var tokens = [UInt64](repeating: 0, count: count)
        let raw = fd.raw.rawValue
        let n = try sysWaiting(timeoutMilliseconds: timeoutMilliseconds) { ob_epoll_wait(raw, &events, &tokens, CInt(count), $0) }
        return (0..<Int(n)).map { Event(token: tokens[$0], events: Events(rawValue: events[$0])) }
    }
}

/// Space for the results of `Epoll.wait(into:)`, allocated once, so that waiting on the
/// data path allocates nothing.
public struct EpollEvents: ~Copyable {
    let events: UnsafeMutablePointer<UInt32>
    let tokens: UnsafeMutablePointer<UInt64>
    public let capacity: Int
    /// Events the last wait returned.
    public internal(set) var count = 0

    public init(capacity: Int) {
        self.capacity = min(max(capacity, 1), 64)
        events = .allocate(capacity: self.capacity)
        tokens = .allocate(capacity: self.capacity)
    }

    deinit {
        events.deallocate()
        tokens.deallocate()
    }

    public func token(_ i: Int) -> UInt64 { tokens[i] }
    public func events(_ i: Int) -> Epoll.Events { Epoll.Events(rawValue: events[i]) }
}

extension Epoll {
    /// As `wait(maxEvents:timeoutMilliseconds:)`, into preallocated space. Returns the
    /// number of events (0: the timeout passed).
    @discardableResult
    public func wait(into out: inout EpollEvents, timeoutMilliseconds: Int) throws(Errno) -> Int {
        let raw = fd.raw.rawValue
        let events = out.events, tokens = out.tokens, capacity = CInt(out.capacity)
        let n = try sysWaiting(timeoutMilliseconds: timeoutMilliseconds) { ob_epoll_wait(raw, events, tokens, capacity, $0) }
        out.count = Int(n)
        return Int(n)
    }
}
