import Outboard
import OutboardSession
import OutboardSystem
import SystemPackage

/// What a TAP bridge has moved and dropped, each way.
public struct TapBridgeCounters: Sendable, Equatable {
    /// Frames read from the TAP and sent on the session (their bytes).
    public var framesToPort: UInt64 = 0
    public var bytesToPort: UInt64 = 0
    /// Frames received on the session and written to the TAP (their bytes).
    public var framesToTap: UInt64 = 0
    public var bytesToTap: UInt64 = 0
    /// Frames from the TAP longer than the session's `maxFrame`: dropped.
    public var oversizeDropped: UInt64 = 0
    /// Frames from the TAP shorter than an Ethernet header: dropped.
    public var shortDropped: UInt64 = 0
    /// Frames from the session the kernel did not take (the TAP is down, or its queue is
    /// full): dropped, as a NIC drops what its host does not take.
    public var tapWriteDropped: UInt64 = 0
    /// Frames sent while the driver restarted and lost with its transmit ring
    /// (`NetSession.txDroppedInRecovery`).
    public var droppedInRecovery: UInt64 = 0
    /// How many times the session moved to a restarted driver.
    public var recoveries: Int = 0
    /// Entries from the driver the session skipped (`NetSession.strayEntries`).
    public var strayEntries: UInt64 = 0

    public init() {}
}

/// A TAP bridge: an Outboard net port as an ordinary Linux interface, so that the kernel's
/// network stack, and every program on it, uses the port.
///
/// It holds one net session on the device (through the manager) and a TAP interface with
/// the session's MAC and MTU, and moves frames between them on one thread:
/// - TAP to port: each frame is read from the TAP descriptor straight into a transmit
///   buffer of the session's data region (no copy in this process), a burst of up to
///   `batch` sent with one flush. A frame longer than the session's `maxFrame` is dropped
///   and counted. With every transmit buffer out, the bridge stops reading the TAP until
///   the driver gives some back; the kernel queues, then drops, meanwhile.
/// - Port to TAP: each received frame is written to the TAP from its receive buffer; a
///   frame the kernel does not take is dropped and counted.
/// - Idle: the session asks the driver for a doorbell (`armWakeUp`) and the thread sleeps
///   in epoll on the TAP descriptor, the session's `pollDescriptor` and the stop doorbell.
///   Nothing is allocated per frame; nothing spins.
///
/// A driver restart is the session's business: it moves to the new driver's queues by
/// itself (frames out for transmission are lost, as on a NIC that resets), and the bridge
/// goes on. The session ending (the device failed, the manager went away) ends `run`.
public struct TapBridge: ~Copyable {
    var session: NetSession
    /// The TAP interface, open in the namespace the bridge was created in; it may be moved
    /// to another one (`ip link set dev NAME netns NS`) and the bridge goes on.
    public let tap: TapDevice
    let epoll: Epoll
    var events: EpollEvents
    /// Ring it (from any thread, or a signal handler: `stopDescriptor`) to end `run`.
    public let stopBell: Doorbell
    /// Frames moved per direction before looking at the other one.
    public let batch: Int
    /// Whether the TAP descriptor is in the epoll set's interest (off while no transmit
    /// buffer is free, so that a waiting frame does not wake the thread for nothing).
    var watchingTap = true
    public private(set) var counters = TapBridgeCounters()

    enum Token {
        static let tap: UInt64 = 1
        static let session: UInt64 = 2
        static let stop: UInt64 = 3
    }

    /// The port as the session sees it.
    public var info: NetInfo { session.info }
    /// The interface's name.
    public var name: String { tap.name }
    /// The session's driver generation.
    public var generation: UInt64 { session.generation }
    /// The stop doorbell's descriptor, for a signal handler (write 8 bytes to it).
    public var stopDescriptor: CInt { stopBell.fd.raw.rawValue }

    /// Opens a net session on `device` through the manager (or a virtualizer) at
    /// `socketPath`, waiting up to `waitMilliseconds` for it to be ready, and creates the
    /// TAP interface `ifname` (a name, a "%d" pattern, or nil for the kernel's choice) with
    /// the session's MAC and MTU, brought up. `queueDepth` buffers of `bufferBytes` each
    /// way; a buffer must be longer than the port's `maxFrame`. Needs CAP_NET_ADMIN.
    public init(socketPath: String, device: String, ifname: String?, queueDepth: Int = 256, bufferBytes: Int = 2048,
                batch: Int = 32, waitMilliseconds: Int = 10_000) throws(SessionError) {
        guard batch >= 1, batch <= queueDepth else { throw .invalidRequest("batch \(batch) outside 1...\(queueDepth)") }
        let s = try NetSession.open(socketPath: socketPath, device: device, queueDepth: queueDepth, bufferBytes: bufferBytes,
                                    waitMilliseconds: waitMilliseconds)
        // A TAP read that fills its buffer is a frame cut short (TapDevice.read): each
        // read is given maxFrame + 1 bytes of a transmit buffer.
        guard Int(s.info.maxFrame) < bufferBytes else {
            throw .invalidRequest("buffers of \(bufferBytes) bytes for frames of up to \(s.info.maxFrame) (MTU \(s.info.mtu)): "
                                  + "they need at least \(s.info.maxFrame + 1)")
        }
        let mac = s.info.mac, mtu = Int(s.info.mtu), pollFD = FileDescriptor(rawValue: s.pollDescriptor)
        let t = try Self.system { () throws(Errno) in
            let t = try TapDevice(name: ifname)
            try t.setMACAddress(mac)
            try t.setMTU(mtu)
            try t.setUp()
            return t
        }
        let e = try Self.system { () throws(Errno) in try Epoll() }
        let bell = try Self.system { () throws(Errno) in try Doorbell() }
        try Self.system { () throws(Errno) in
            try e.add(t.descriptor, events: .readable, token: Token.tap)
            try e.add(pollFD, events: .readable, token: Token.session)
            try e.add(bell.fd.raw, events: .readable, token: Token.stop)
        }
        session = s
        tap = t
        epoll = e
        stopBell = bell
        events = EpollEvents(capacity: 4)
        self.batch = batch
    }

    /// `body`'s system error as a session error (the one error of this library's callers).
    static func system<T: ~Copyable>(_ body: () throws(Errno) -> T) throws(SessionError) -> T {
        do { return try body() } catch { throw .system(error) }
    }

    /// Moves frames until the stop doorbell rings or the session ends (which throws).
    /// `report` is called with the counters every `reportMilliseconds` (not at all when 0)
    /// and once at the end.
    public mutating func run(reportMilliseconds: Int = 0, _ report: (TapBridgeCounters) -> Void = { _ in }) throws(SessionError) {
        let period = UInt64(max(reportMilliseconds, 0)) * 1_000_000
        var nextReport = period > 0 ? Clock.monotonicNanoseconds &+ period : UInt64.max
        // Under steady traffic the thread does not sleep; the stop doorbell is looked at
        // every few milliseconds then.
        var nextStopCheck = Clock.monotonicNanoseconds &+ 20_000_000
        defer {
            refreshSessionCounters()
            report(counters)
        }
        while true {
            let sent = try Self.tapToPort(&session, tap, batch: batch, &counters)
            let received = try Self.portToTap(&session, tap, batch: batch, &counters)
            let now = Clock.monotonicNanoseconds
            if now >= nextReport {
                refreshSessionCounters()
                report(counters)
                nextReport = now &+ period
            }
            if sent > 0 || received > 0 {
                if now >= nextStopCheck {
                    nextStopCheck = now &+ 20_000_000
                    if try stopRequested() { return }
                }
                continue
            }
            // Idle: ask for a doorbell and sleep, unless work came in meanwhile.
            guard try session.armWakeUp() else { continue }
            try watchTap(session.freeTransmitBuffers > 0)
            let timeout = nextReport == UInt64.max ? -1 : Int((nextReport &- min(now, nextReport)) / 1_000_000) + 1
            let n: Int
            do { n = try epoll.wait(into: &events, timeoutMilliseconds: timeout) } catch {
                try session.disarm()
                throw .system(error)
            }
            try session.disarm()
            for i in 0..<n where events.token(i) == Token.stop {
                _ = try? stopBell.drain()
                return
            }
        }
    }

    /// Whether the stop doorbell rang (consuming it).
    mutating func stopRequested() throws(SessionError) -> Bool {
        do { return try stopBell.drain() > 0 } catch { throw .system(error) }
    }

    mutating func watchTap(_ on: Bool) throws(SessionError) {
        guard on != watchingTap else { return }
        do { try epoll.modify(tap.descriptor, events: on ? .readable : [], token: Token.tap) } catch { throw .system(error) }
        watchingTap = on
    }

    mutating func refreshSessionCounters() {
        counters.droppedInRecovery = session.txDroppedInRecovery
        counters.recoveries = session.recoveries
        counters.strayEntries = session.strayEntries
    }

    /// Reads up to `batch` frames from the TAP, each into a transmit buffer, and sends them
    /// with one flush. Returns how many frames were read (sent or dropped): 0 when the TAP
    /// had none or no transmit buffer is free.
    static func tapToPort(_ s: inout NetSession, _ tap: borrowing TapDevice, batch: Int,
                          _ c: inout TapBridgeCounters) throws(SessionError) -> Int {
        var read = 0
        let readLength = Int(s.info.maxFrame) + 1
        while read < batch {
            guard let b = try s.transmitBuffer() else { break }
            // The buffer is `bufferBytes` long, more than maxFrame: the extra byte tells a
            // frame that fits from one the kernel would cut.
            let into = UnsafeMutableRawBufferPointer(start: b.pointer, count: readLength)
            let n: Int?
            do { n = try tap.read(into: into) } catch {
                // EMSGSIZE: longer than maxFrame (the TAP's MTU was raised past the
                // port's). The frame is gone; the next read gives the next one.
                try s.discard(b.index)
                if error == .messageTooLong {
                    c.oversizeDropped &+= 1
                    read += 1
                    continue
                }
                throw .system(error)
            }
            guard let n else {
                try s.discard(b.index)
                break
            }
            read += 1
            guard n >= NetInfo.headerBytes else {
                try s.discard(b.index)
                c.shortDropped &+= 1
                continue
            }
            try s.send(b.index, length: n)
            c.framesToPort &+= 1
            c.bytesToPort &+= UInt64(n)
        }
        try s.flush()
        return read
    }

    /// Writes up to `batch` received frames to the TAP. Returns how many frames came.
    static func portToTap(_ s: inout NetSession, _ tap: borrowing TapDevice, batch: Int,
                          _ c: inout TapBridgeCounters) throws(SessionError) -> Int {
        return try s.receive(max: batch) { frame in
            // The frame is in shared memory the driver can still write: the kernel copies
            // it in the write and checks what it parses, as it does for any received frame.
            do {
                try tap.write(frame)
                c.framesToTap &+= 1
                c.bytesToTap &+= UInt64(frame.count)
            } catch {
                c.tapWriteDropped &+= 1
            }
        }
    }
}
