import Foundation
import OutboardRings
import OutboardSession
import OutboardSystem

#if canImport(Glibc)
import Glibc
#endif

/// The serving end of one net session, as the double holds it: what the manager keeps (the
/// connection, `SessionResources`, the generation) and what a driver serves it with (a
/// `NetServerEndpoint`), in one value. Tests reach it through `NetPortDouble.withPort`.
public struct NetPort: ~Copyable {
    public let connection: UnixSocket
    public var resources: SessionResources
    public var endpoint: NetServerEndpoint
    public let info: NetInfo
    public let opened: SessionOpened
    public private(set) var generation: UInt64
    /// Receive buffers taken off rxFree and not used yet.
    public var receiveBuffers: [BufferDescriptor] = []
    /// Whether `step` echoes (off: frames stay on txActive, for tests that act as the driver).
    public var echoing = true
    /// Frames echoed.
    public private(set) var echoed = 0

    init(connection: consuming UnixSocket, request m: OpenSession, info: NetInfo, sessionID: UInt64,
         answer: (SessionOpened) -> SessionOpened) throws {
        // As the manager: whole pages, generation 1, serving.
        let r = try SessionResources(name: "outboard-netdouble-\(sessionID)", deviceClass: .net, queueDepth: m.queueDepth,
                                     dataBytes: SharedRegion.roundToPage(Int(m.dataBytes)))
        r.publish(generation: 1, state: .serving)
        let ep = try Self.endpoint(r, sessionID: sessionID, info: info)
        let o = answer(SessionOpened(sessionID: sessionID, generation: 1, queueDepth: m.queueDepth, writable: true,
                                     dataBytes: UInt64(r.data.size), classInfo: .net(info)))
        try connection.send(.sessionOpened(o), descriptors: r.openedDescriptors)
        endpoint = ep
        opened = o
        resources = r
        self.connection = connection
        self.info = info
        generation = 1
    }

    static func endpoint(_ r: borrowing SessionResources, sessionID: UInt64, info: NetInfo) throws -> NetServerEndpoint {
        let a = Attach(sessionID: sessionID, tableIndex: 0, queueDepth: r.queueDepth, writable: true, dataBytes: UInt64(r.data.size))
        return try NetServerEndpoint(a, queues: r.queues.fd.duplicate(), data: r.data.fd.duplicate(),
                                     requestBell: r.requestBell.fd.duplicate(), completionBell: r.completionBell.fd.duplicate(),
                                     maxFrame: info.maxFrame)
    }

    /// Takes every receive buffer the client has posted into `receiveBuffers`.
    public mutating func collectReceiveBuffers() {
        while let b = endpoint.rxFree.dequeue() { receiveBuffers.append(b) }
    }

    /// One receive buffer the client posted (nil: none).
    public mutating func takeReceiveBuffer() -> BufferDescriptor? {
        collectReceiveBuffers()
        return receiveBuffers.isEmpty ? nil : receiveBuffers.removeFirst()
    }

    /// Frames the client sent, taken off txActive and kept (in flight at this port).
    public mutating func takeFrames(max: Int) -> [BufferDescriptor] {
        var out: [BufferDescriptor] = []
        while out.count < max, let d = endpoint.txActive.dequeue() { out.append(d) }
        return out
    }

    /// Puts `entries` on rxActive as they are (a hostile driver's entries) and rings the
    /// client if it asked.
    public mutating func deliverRaw(_ entries: [BufferDescriptor]) {
        let ok = entries.withUnsafeBufferPointer { endpoint.deliver($0) }
        precondition(ok, "rxActive had no room for \(entries.count) raw entries")
        endpoint.signalIfWanted()
    }

    /// Puts `entries` on txFree as they are and rings the client if it asked.
    public mutating func releaseRaw(_ entries: [BufferDescriptor]) {
        let ok = entries.withUnsafeBufferPointer { endpoint.release($0) }
        precondition(ok, "txFree had no room for \(entries.count) raw entries")
        endpoint.signalIfWanted()
    }

    /// The frame bytes of a descriptor the client wrote.
    public func bytes(of d: BufferDescriptor) -> [UInt8] {
        Array(UnsafeRawBufferPointer(start: endpoint.data.base + Int(d.offset.rawValue), count: Int(d.length)))
    }

    /// Echoes what it can: each frame on txActive comes back on rxActive in a receive buffer
    /// of the client's, with destination and source MACs swapped, and its buffer goes back
    /// on txFree; one batch each way and at most one doorbell. Returns the frames echoed.
    mutating func step() -> Int {
        guard echoing else { return 0 }
        collectReceiveBuffers()
        let n = min(receiveBuffers.count, 32)
        guard n > 0 else { return 0 }
        let frames = takeFrames(max: n)
        guard !frames.isEmpty else { return 0 }
        var delivered: [BufferDescriptor] = []
        let base = endpoint.data.base
        for f in frames {
            let rx = receiveBuffers.removeFirst()
            let to = base + Int(rx.offset.rawValue)
            to.copyMemory(from: base + Int(f.offset.rawValue), byteCount: Int(f.length))
            // Swap destination (0..<6) and source (6..<12).
            for i in 0..<6 {
                let a = to.load(fromByteOffset: i, as: UInt8.self)
                to.storeBytes(of: to.load(fromByteOffset: 6 + i, as: UInt8.self), toByteOffset: i, as: UInt8.self)
                to.storeBytes(of: a, toByteOffset: 6 + i, as: UInt8.self)
            }
            delivered.append(BufferDescriptor(offset: rx.offset, length: f.length, cookie: rx.cookie))
        }
        let ok = delivered.withUnsafeBufferPointer { endpoint.deliver($0) } && frames.withUnsafeBufferPointer { endpoint.release($0) }
        precondition(ok, "the client broke the depth rule")
        endpoint.signalIfWanted()
        echoed += frames.count
        return frames.count
    }

    /// Asks the client for a doorbell on what this port waits for and checks once more;
    /// true when it may sleep.
    mutating func prepareToSleep() -> Bool {
        guard echoing else { return true }
        return receiveBuffers.isEmpty ? endpoint.rxFree.prepareToSleep() : endpoint.txActive.prepareToSleep()
    }

    mutating func woke() {
        endpoint.rxFree.cancelSignal()
        endpoint.txActive.cancelSignal()
    }

    /// What the manager does when a driver dies: fresh queues, sent to the client
    /// (`queuesReplaced`), then the new generation published (`recovering`) and the
    /// completion doorbell rung; then, as a new driver's attach, a new endpoint on the new
    /// queues and `serving`. Whatever the old endpoint held is gone with it.
    public mutating func replaceQueues() throws {
        try resources.replaceQueues()
        generation += 1
        try connection.send(.queuesReplaced(generation: generation), descriptors: [resources.queues.fd.raw], nonBlocking: true)
        resources.publish(generation: generation, state: .recovering)
        try? resources.completionBell.ring()
        endpoint = try Self.endpoint(resources, sessionID: opened.sessionID, info: info)
        receiveBuffers = []
        resources.publish(generation: generation, state: .serving)
    }

    /// What the manager does when the device fails: `failed` on the header page,
    /// `sessionFailed` on the socket, the doorbell rung.
    public func fail(reason: String) {
        resources.publish(generation: generation, state: .failed)
        try? connection.send(.sessionFailed(reason: reason), nonBlocking: true)
        try? resources.completionBell.ring()
    }
}

/// An in-process serving end for net sessions (a test double of the manager and a net
/// driver together): a listener that answers `openSession` for class net as the manager
/// does (`SessionResources(deviceClass: .net)`, the five descriptors, one session per
/// port) and serves the session with a `NetServerEndpoint`, on a thread of its own: an
/// echo port, every transmitted frame received back with its MACs swapped. The real peer
/// is the manager with the virtio-net driver; this double lets tests act as a hostile or
/// restarting driver at exact points.
public final class NetPortDouble: @unchecked Sendable {
    public let socketPath: String
    public let info: NetInfo
    let listener: UnixListener
    let answer: @Sendable (SessionOpened) -> SessionOpened
    let lock = NSLock()
    let done = DispatchSemaphore(value: 0)
    var port: NetPort?
    var stopped = false
    /// Opens refused or failed, with why.
    public private(set) var refusals: [String] = []

    /// Listens at `socketPath`. `answer` may change the answer to an open before it goes
    /// out (to test a client's checks of it).
    public init(socketPath: String, info: NetInfo = NetInfo(mac: MACAddress("02:00:00:00:00:01")!, mtu: 1500),
                answer: @escaping @Sendable (SessionOpened) -> SessionOpened = { $0 }) throws {
        self.socketPath = socketPath
        self.info = info
        self.answer = answer
        listener = try UnixListener(path: socketPath)
        Thread { [self] in run() }.start()
    }

    /// Stops the thread and closes the session (the client sees its connection close).
    public func stop() throws {
        lock.withLock { stopped = true }
        try waitSignalled(done, for: "the net port double's thread")
    }

    /// Runs `body` on the session's serving end, with the echo thread held off. Throws when
    /// no session is open.
    public func withPort<T>(_ body: (inout NetPort) throws -> T) throws -> T {
        lock.lock()
        defer { lock.unlock() }
        guard var p = port.take() else { throw DeadlinePassed("an open session at the double (none yet)", seconds: 0) }
        let r: T
        do { r = try body(&p) } catch {
            port = consume p
            throw error
        }
        port = consume p
        return r
    }

    /// Waits until a client has opened its session.
    public func waitForSession(within seconds: Double = testDeadlineSeconds) throws {
        let deadline = Clock.monotonicNanoseconds + UInt64(seconds * 1e9)
        while lock.withLock({ port == nil }) {
            guard Clock.monotonicNanoseconds < deadline else { throw DeadlinePassed("a client's open", seconds: seconds) }
            usleep(1000)
        }
    }

    func run() {
        defer {
            lock.withLock { port = nil }
            done.signal()
        }
        // Accept until the one session is open, then serve it.
        while !lock.withLock({ stopped }) {
            guard (try? listener.fd.waitReadable(until: Clock.monotonicNanoseconds + 10_000_000)) == true,
                  let s = try? listener.accept(), let p = answerOpen(s) else { continue }
            let bell: Doorbell
            do { bell = Doorbell(adopting: try p.resources.requestBell.fd.duplicate()) } catch {
                lock.withLock { refusals.append("\(error)") }
                return
            }
            lock.lock()
            port = consume p
            lock.unlock()
            serve(bell)
            return
        }
    }

    /// Reads a client's open and answers it: a session (returned), or a refusal.
    func answerOpen(_ s: consuming UnixSocket) -> NetPort? {
        guard let d = try? receiveControl(s, within: 5), case .openSession(let m) = d.message else {
            lock.withLock { refusals.append("no open request") }
            return nil
        }
        let refusal: (ErrorCode, String)?
        if m.deviceClass != .net {
            refusal = (.invalidArgument, "'\(m.device)' is a net device, not \(m.deviceClass)")
        } else if lock.withLock({ port != nil }) {
            refusal = (.busy, "net device '\(m.device)' serves one session at a time")
        } else {
            refusal = nil
        }
        if let (code, message) = refusal {
            try? s.send(.failure(code, message), nonBlocking: true)
            lock.withLock { refusals.append(message) }
            return nil
        }
        do {
            let p = try NetPort(connection: s, request: m, info: info, sessionID: 1, answer: answer)
            return p
        } catch {
            lock.withLock { refusals.append("\(error)") }
            return nil
        }
    }

    /// The echo loop: steps while there is work, otherwise asks for a doorbell and sleeps
    /// on it and the listener (a long timeout: a missed doorbell shows as a stall, not as a
    /// busy loop). Later opens are refused: a net port serves one session. The request
    /// doorbell stays the same across queue replacements.
    func serve(_ bell: borrowing Doorbell) {
        while true {
            let (stop, sleep) = lock.withLock { () -> (Bool, Bool) in
                if stopped || port == nil { return (true, false) }
                var p = port.take()!
                let n = p.step()
                let sleep = n == 0 && p.prepareToSleep()
                port = consume p
                return (false, sleep)
            }
            if stop { return }
            var fds = [pollfd(fd: bell.fd.raw.rawValue, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: listener.fd.raw.rawValue, events: Int16(POLLIN), revents: 0)]
            _ = poll(&fds, 2, sleep ? 200 : 0)
            if fds[0].revents != 0 { _ = try? bell.drain() }
            if fds[1].revents != 0, let s = try? listener.accept() { _ = answerOpen(s) }
            if sleep {
                lock.withLock {
                    guard var p = port.take() else { return }
                    p.woke()
                    port = consume p
                }
            }
        }
    }
}
