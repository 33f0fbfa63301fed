import OutboardRings
import OutboardSession
import OutboardSystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The part of a client session that every device class shares, written once: the open
/// handshake (with its refusals and its time limit), the regions and doorbells of the
/// answer mapped, the epoll set a session sleeps in (completion doorbell and control
/// socket), and the control side of recovery: the generation on the read-only header page,
/// new queues from `queuesReplaced`, the end of the session from `sessionFailed`.
///
/// A session (`BlockSession`, `NetSession`) holds one and lays its own queues over
/// `queueMapping`. When the driver was replaced, `nextQueues()` hands it the new queue
/// region, mapped; the session builds its queue ends on it and calls `adopt`.
struct SessionLink: ~Copyable {
    /// The session as the server opened it (common part).
    let opened: SessionOpened
    let control: UnixSocket
    let headerMapping: SharedMapping
    let header: SessionHeaderPage
    /// The queue region of the generation in use (replaced by `adopt`).
    var queueMapping: SharedMapping
    let dataMapping: SharedMapping
    let requestBell: Doorbell
    let completionBell: Doorbell
    /// Watches the completion doorbell (token 1) and the control socket (token 2).
    let epoll: Epoll
    var events = EpollEvents(capacity: 4)
    /// Bytes a queue region must have (the class's layout for the session's depth).
    let queueBytes: Int
    /// Driver generation of the queues in use.
    private(set) var generation: UInt64
    /// How many times the session moved to a restarted driver.
    private(set) var recoveries = 0

    /// The server's answer to an open, before anything is mapped: the session's parameters,
    /// the connection, and the five descriptors.
    struct Answer: ~Copyable {
        let opened: SessionOpened
        let control: UnixSocket
        var delivery: ControlDelivery
    }

    /// New queues of a later generation, mapped (`nextQueues`, `controlMessage`).
    struct NewQueues: ~Copyable {
        let mapping: SharedMapping
        let generation: UInt64
    }

    /// How long `open` waits for the server's answer.
    static let answerTimeoutMilliseconds = 30_000

    /// Connects to the manager (or a virtualizer) at `socketPath`, sends `request` and
    /// returns the `sessionOpened` answer, checked for the class asked for and the common
    /// parameters (a power-of-two depth in 2...4096, a data region that can be mapped);
    /// a refusal is `.refused`, anything else a protocol error.
    static func open(socketPath: String, _ request: OpenSession) throws(SessionError) -> Answer {
        let socket: UnixSocket
        do { socket = try UnixSocket.connect(path: socketPath) } catch {
            throw .unreachable(path: socketPath, error)
        }
        do { try socket.send(.openSession(request)) } catch {
            throw refusalWaiting(on: socket) ?? .system(error)
        }
        var reply: ControlDelivery
        do {
            // A server that never answers is an error, not a hang (as AdminConnection's requests).
            guard try socket.waitReadable(timeoutMilliseconds: answerTimeoutMilliseconds) else {
                throw SessionError.failed("\(socketPath) did not answer the open within \(answerTimeoutMilliseconds) ms")
            }
            reply = try socket.receiveControl()
        } catch let e as SessionError {
            throw e
        } catch {
            throw .protocolError("no answer to open: \(error)")
        }
        switch reply.message {
        case .sessionOpened(let opened):
            guard opened.classInfo.deviceClass == request.deviceClass else {
                throw .protocolError("asked for a \(request.deviceClass) session, got \(opened.classInfo.deviceClass)")
            }
            // The server's numbers are checked before anything is sized by them.
            guard opened.queueDepth >= 2, opened.queueDepth <= 4096, opened.queueDepth.nonzeroBitCount == 1,
                  opened.dataBytes > 0, opened.dataBytes <= UInt64(Int.max / 2) else {
                throw .protocolError("session parameters out of range: \(opened)")
            }
            return Answer(opened: opened, control: socket, delivery: reply)
        case .failure(let code, let message):
            throw .refused(code, message)
        default:
            throw .protocolError("unexpected \(reply.message.type) in answer to open")
        }
    }

    /// A server that refuses a connection (the manager at its connection cap) answers and
    /// closes at once, possibly before our request went out, which then fails (EPIPE):
    /// its answer is still queued for us, and says more than the failed send.
    static func refusalWaiting(on socket: borrowing UnixSocket) -> SessionError? {
        guard let d = try? socket.receiveControl(nonBlocking: true), case .failure(let code, let message) = d.message else {
            return nil
        }
        return .refused(code, message)
    }

    /// Runs `open` again while its failure is one to retry (the manager is not listening
    /// yet, or the device is not ready: its driver is starting or has not reached the
    /// device), for up to `waitMilliseconds`.
    static func retrying<T: ~Copyable>(waitMilliseconds: Int, _ open: () throws(SessionError) -> T) throws(SessionError) -> T {
        let deadline = Clock.monotonicNanoseconds + UInt64(max(0, waitMilliseconds)) * 1_000_000
        while true {
            do {
                return try open()
            } catch let e where e.recovery == .retry {
                if Clock.monotonicNanoseconds > deadline { throw e }
            }
            usleep(20_000)
        }
    }

    /// Maps the answer's regions: the header read-only, the queues (at least `queueBytes`)
    /// and the data region (at least the answer's `dataBytes`) read-write; adopts the
    /// doorbells and builds the epoll set.
    init(_ answer: consuming Answer, queueBytes: Int) throws(SessionError) {
        var d = answer.delivery
        let opened = answer.opened
        // Noncopyable members are built as locals on one straight path, then stored.
        let hm = try Self.map(d.take(0), minimumSize: SessionHeaderPage.byteCount, .readOnly)
        let qm = try Self.map(d.take(1), minimumSize: queueBytes, .readWrite)
        let dm = try Self.map(d.take(2), minimumSize: Int(opened.dataBytes), .readWrite)
        let rb = Doorbell(adopting: d.take(3))
        let cb = Doorbell(adopting: d.take(4))
        let control = answer.control
        let ep = try Self.epoll(cb, control)
        headerMapping = hm
        queueMapping = qm
        dataMapping = dm
        requestBell = rb
        completionBell = cb
        epoll = ep
        self.control = control
        self.opened = opened
        self.queueBytes = queueBytes
        header = SessionHeaderPage(headerMapping.base)
        generation = opened.generation
    }

    static func map(_ fd: consuming OwnedFD, minimumSize: Int, _ access: SharedMapping.Access) throws(SessionError) -> SharedMapping {
        do { return try SharedRegion(adopting: fd, minimumSize: minimumSize).map(access) } catch { throw .system(error) }
    }

    static func epoll(_ bell: borrowing Doorbell, _ control: borrowing UnixSocket) throws(SessionError) -> Epoll {
        do {
            let e = try Epoll()
            try e.add(bell.fd.raw, events: .readable, token: 1)
            try e.add(control.fd.raw, events: .readable, token: 2)
            return e
        } catch {
            throw .system(error)
        }
    }

    /// Rings the driver's request doorbell.
    func ringRequest() { try? requestBell.ring() }

    // MARK: recovery

    /// Checks the header page: when the generation moved forward, the driver was replaced,
    /// and this returns the new queues (taken from the control socket, superseded ones
    /// skipped) for the session to adopt; call again until nil. A session the manager
    /// failed or closed throws `.failed` with its reason.
    @inline(__always)
    mutating func nextQueues() throws(SessionError) -> NewQueues? {
        let g = header.generation
        // Only forward: new queues may be adopted from the socket (controlMessage) just
        // before the manager publishes their generation.
        if g > generation { return try queues(of: g) }
        // Failed (device) or closed (the manager ended the session): terminal.
        if let st = header.state, st == .failed || st == .closed { try failFromControl() }
        return nil
    }

    /// The session built its queue ends on `q`: they are the ones in use now.
    mutating func adopt(_ q: consuming NewQueues) {
        generation = q.generation
        queueMapping = q.mapping
        recoveries += 1
    }

    /// Reads the control socket until the queues of generation `target` (or a later one).
    mutating func queues(of target: UInt64) throws(SessionError) -> NewQueues {
        while true {
            var d: ControlDelivery
            do {
                guard try control.waitReadable(timeoutMilliseconds: 5000) else {
                    throw SessionError.protocolError("generation \(target) published without new queues")
                }
                d = try control.receiveControl()
            } catch let e as SessionError {
                throw e
            } catch {
                throw .failed("manager connection: \(error)")
            }
            switch d.message {
            case .queuesReplaced(let g) where g < target:
                continue  // superseded: the driver died again; its fd is closed with `d`
            case .queuesReplaced(let g):
                return NewQueues(mapping: try Self.map(d.take(0), minimumSize: queueBytes, .readWrite), generation: g)
            case .sessionFailed(let reason):
                throw .failed(reason)
            default:
                throw .protocolError("unexpected \(d.message.type) during recovery")
            }
        }
    }

    /// Something arrived on the control socket while we slept: the manager went away, told
    /// us the session failed, or sent new queues before publishing their generation (then
    /// returned, to adopt).
    mutating func controlMessage() throws(SessionError) -> NewQueues? {
        if header.generation > generation || header.state == .failed || header.state == .closed { return nil }
        do {
            guard try control.waitReadable(timeoutMilliseconds: 0) else { return nil }
        } catch {
            throw .system(error)
        }
        // Only sessionFailed or a close can be pending while the generation is unchanged
        // (new queues always come with a new generation, which is checked first), or new
        // queues whose generation is not published yet.
        var d: ControlDelivery
        do { d = try control.receiveControl(nonBlocking: true) } catch .socket(.system(.wouldBlock)) { return nil } catch {
            throw .failed("manager connection: \(error)")
        }
        switch d.message {
        case .sessionFailed(let reason): throw .failed(reason)
        case .queuesReplaced(let g):
            guard g > generation else { return nil }  // stale: its fd is closed with `d`
            return NewQueues(mapping: try Self.map(d.take(0), minimumSize: queueBytes, .readWrite), generation: g)
        default: throw .protocolError("unexpected \(d.message.type) from manager")
        }
    }

    mutating func failFromControl() throws(SessionError) -> Never {
        while true {
            var d: ControlDelivery
            do {
                guard try control.waitReadable(timeoutMilliseconds: 1000) else { throw SessionError.failed("device failed") }
                d = try control.receiveControl()
            } catch let e as SessionError {
                throw e
            } catch {
                throw .failed("device failed (\(error))")
            }
            // Anything else (queues of a generation that will not serve) is dropped with
            // its descriptors.
            if case .sessionFailed(let reason) = d.message { throw .failed(reason) }
        }
    }

    // MARK: sleeping

    /// Sleeps in epoll on the completion doorbell and the control socket for up to
    /// `timeoutMilliseconds` (negative: no limit); drains the doorbell if it rang. Returns
    /// whether the control socket is readable (then call `controlMessage`). The caller
    /// withdraws its requests for a doorbell afterwards, whatever woke it.
    mutating func sleep(timeoutMilliseconds: Int) throws(Errno) -> Bool {
        let n = try epoll.wait(into: &events, timeoutMilliseconds: timeoutMilliseconds)
        var controlReady = false
        for k in 0..<n {
            let token = events.token(k)
            if token == 1 { _ = try? completionBell.drain() }
            if token == 2 { controlReady = true }
        }
        return controlReady
    }
}
