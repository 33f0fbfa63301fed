import Outboard
import OutboardRings
import OutboardSession
import OutboardSystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A network multiplexer (sDDF's virt_rx and virt_tx in one): a virtualizer that holds one
/// net session to a port (through the manager) and serves net sessions of its own to many
/// clients on its own control socket, with the same session protocol, so that a client
/// uses `NetSession.open(socketPath:device:)` against it as it would against the manager.
///
/// Each client port has its own MAC (`Configuration.macs`, or derived from the upstream
/// MAC: `clientMAC(upstream:slot:)`), which its session answer carries.
///
/// - **Receive**: each frame from the port goes by its destination MAC to the client that
///   has it, copied from the upstream receive buffer into one of the client's own empty
///   receive buffers (the client's region is never shared with the device or another
///   client); a broadcast or multicast frame goes to every client. A client with no empty
///   buffer here (it stopped reading) loses that frame, counted as its own
///   (`rxNotReading`); nobody else's frames wait for it.
/// - **Transmit**: round robin over the clients, at most `Configuration.batch` frames of
///   one client per pass. Each frame is copied out of the client's buffer into an upstream
///   transmit buffer first, and only the copy is checked: a frame whose source MAC is not
///   the client's is dropped there (`txSpoofed`). The client's buffer goes back on its
///   txFree either way.
/// - **Checks**: every client entry is copied out of shared memory once and checked
///   against the client's region and the port's frame limits (`NetServerEndpoint`); a
///   client that breaks its queues (an entry outside its region or of an impossible length,
///   indices that jump, more buffers than its depth) is dropped with `sessionFailed` and the
///   reason, and nobody else notices.
/// - **Restarts below**: the upstream `NetSession` moves to a restarted driver by itself;
///   frames in flight then are lost as on a wire, and the clients see a pause.
///
/// No client memory is registered with the device: however many clients there are, the
/// device sees the one upstream session's region (a vhost-user device with 8 memory slots
/// serves any number of clients through it).
///
/// Nothing is allocated per frame: every buffer, record and scratch area is made when the
/// multiplexer or a client session is made. Access: only peers with the multiplexer's own
/// uid, or root, may connect.
public struct NetMultiplexer: ~Copyable {
    public struct Configuration: Sendable {
        /// The device name clients open on the multiplexer's socket (the command uses the
        /// upstream device's).
        public var deviceName: String
        /// Client ports served at once (at most `maxClients`).
        public var clients: Int
        /// The MAC of each client slot, in order; nil: derived from the upstream MAC.
        public var macs: [MACAddress]?
        /// Frames taken from one client per pass.
        public var batch: Int
        /// The largest queue depth and data region a client may ask for.
        public var maxQueueDepth: Int
        public var maxDataBytes: Int

        public init(deviceName: String, clients: Int = 16, macs: [MACAddress]? = nil, batch: Int = 32,
                    maxQueueDepth: Int = 1024, maxDataBytes: Int = 16 << 20) {
            self.deviceName = deviceName; self.clients = clients; self.macs = macs; self.batch = batch
            self.maxQueueDepth = maxQueueDepth; self.maxDataBytes = maxDataBytes
        }
    }

    /// Client slots at most (the derived MACs have room for 63).
    public static let maxClients = 63

    /// One client slot's counters.
    public struct ClientStats: Sendable, Equatable {
        public var slot: Int
        public var mac: MACAddress
        /// A session is open in this slot now.
        public var connected: Bool
        /// Sessions this slot has served (the counters below are summed over them).
        public var sessions: UInt64 = 0
        /// Frames copied into the client's receive buffers.
        public var rxDelivered: UInt64 = 0
        /// Frames for this client dropped because it had no empty receive buffer here.
        public var rxNotReading: UInt64 = 0
        /// Frames of this client handed to the port.
        public var txSent: UInt64 = 0
        /// Frames of this client dropped because their source MAC was not the client's.
        public var txSpoofed: UInt64 = 0
        /// Entries of this client refused (outside its region, impossible lengths, more
        /// than its depth, broken indices): each ended that session.
        public var strayEntries: UInt64 = 0
        /// Why the slot's last session was dropped, if it was.
        public var lastDrop: String?
    }

    public struct Stats: Sendable {
        public var clients: [ClientStats]
        /// Frames received from the port.
        public var rxFrames: UInt64
        /// Unicast frames for no client's MAC, dropped.
        public var rxNoClient: UInt64
        /// Frames longer than the port's largest frame (`NetInfo.maxFrame`), dropped: no
        /// client takes them.
        public var rxOversize: UInt64
        /// Frames sent to the port.
        public var txFrames: UInt64
        /// Connections refused (no slot free, not allowed, a bad open).
        public var refused: UInt64
        /// How many times the upstream session moved to a restarted driver.
        public var upstreamRecoveries: Int
        /// Upstream frames lost to a driver restart (out for transmission when it died).
        public var upstreamTxDropped: UInt64
        /// Upstream entries the driver returned that named no buffer of ours.
        public var upstreamStrayEntries: UInt64
    }

    /// Client `slot`'s derived MAC: the upstream MAC's last five bytes behind a first byte
    /// of `(slot + 1) << 2 | 0x02` (locally administered, unicast; distinct per slot).
    public static func clientMAC(upstream: MACAddress, slot: Int) -> MACAddress {
        precondition(slot >= 0 && slot < maxClients)
        return MACAddress(rawValue: UInt64((slot + 1) << 2 | 0x02) << 40 | upstream.rawValue & 0xFF_FFFF_FFFF)
    }

    var upstream: NetSession
    let configuration: Configuration
    public let macs: [MACAddress]
    let listener: UnixListener
    let epoll: Epoll
    var events = EpollEvents(capacity: 64)
    /// The client slots: `occupied[k]` says whether `slots[k]` holds a client.
    let slots: UnsafeMutablePointer<MuxClient>
    var occupied: [Bool]
    /// Counters of each slot, kept across its sessions.
    var counters: [ClientStats]
    /// Connections accepted and not yet open: descriptor and deadline.
    var pending: [(fd: CInt, deadline: UInt64)] = []
    var nextSessionID: UInt64 = 1
    /// The client served first in the next transmit pass.
    var nextTx = 0
    /// Slots to drop after the pass that found them, with why, and whether the client broke
    /// its queues (counted in `strayEntries`).
    var drops: [(slot: Int, why: String, cause: DropCause)] = []
    let scratch: UnsafeMutableBufferPointer<BufferDescriptor>
    /// MAC of each slot as a raw value, for the receive path; `emptySlot` when the slot
    /// holds no client.
    let slotMACs: UnsafeMutablePointer<UInt64>
    /// Above every 48-bit MAC: no destination read off the wire (00:00:00:00:00:00
    /// included) names an empty slot, whose record is not initialized.
    static let emptySlot = UInt64.max
    var rxFrames: UInt64 = 0
    var rxNoClient: UInt64 = 0
    var rxOversize: UInt64 = 0
    var txFrames: UInt64 = 0
    var refused: UInt64 = 0
    var upstreamArmed = false

    static let listenerToken: UInt64 = 1
    static let upstreamToken: UInt64 = 2
    /// Pending connections: this bit and the descriptor.
    static let pendingBit: UInt64 = 1 << 40
    /// Client slot k: (k + 1) << 8, and 0 for its control socket, 1 for its request doorbell.
    static func token(slot: Int, bell: Bool) -> UInt64 { UInt64(slot + 1) << 8 | (bell ? 1 : 0) }
    /// How long a connection may take to send its open request.
    static let openTimeoutNanoseconds: UInt64 = 2_000_000_000

    /// Serves `upstream` (an open net session on the port) to clients connecting at
    /// `socketPath`.
    public init(upstream: consuming NetSession, socketPath: String, configuration: Configuration) throws(SessionError) {
        let n = configuration.clients
        guard n >= 1, n <= Self.maxClients else { throw .invalidRequest("\(n) clients: 1...\(Self.maxClients)") }
        guard configuration.batch >= 1, configuration.batch <= 256 else { throw .invalidRequest("batch \(configuration.batch): 1...256") }
        let mine = upstream.info.mac
        let macs = configuration.macs ?? (0..<n).map { Self.clientMAC(upstream: mine, slot: $0) }
        guard macs.count >= n else { throw .invalidRequest("\(macs.count) MACs for \(n) clients") }
        guard Set(macs.prefix(n)).count == n else { throw .invalidRequest("client MACs must differ") }
        for m in macs.prefix(n) where m.isMulticast || m.rawValue == 0 {
            throw .invalidRequest("client MAC \(m) is not a unicast address")
        }
        // Noncopyable members are built as locals on one straight path, then stored.
        let e = try Self.system { () throws(Errno) in try Epoll() }
        let l = try Self.system { () throws(Errno) in try UnixListener(path: socketPath) }
        let poll = upstream.pollDescriptor
        try Self.system { () throws(Errno) in
            try e.add(l.fd.raw, events: .readable, token: Self.listenerToken)
            try e.add(FileDescriptor(rawValue: poll), events: .readable, token: Self.upstreamToken)
        }
        listener = l
        epoll = e
        self.macs = Array(macs.prefix(n))
        self.configuration = configuration
        slots = .allocate(capacity: n)
        occupied = Array(repeating: false, count: n)
        counters = (0..<n).map { ClientStats(slot: $0, mac: macs[$0], connected: false) }
        scratch = .allocate(capacity: configuration.batch)
        slotMACs = .allocate(capacity: n)
        slotMACs.initialize(repeating: Self.emptySlot, count: n)
        self.upstream = upstream
    }

    static func system<T: ~Copyable>(_ body: () throws(Errno) -> T) throws(SessionError) -> T {
        do { return try body() } catch { throw .system(error) }
    }

    deinit {
        for k in 0..<occupied.count where occupied[k] {
            Self.end(slots[k], "the multiplexer stopped")
            (slots + k).deinitialize(count: 1)
        }
        for p in pending { close(p.fd) }
        slots.deallocate()
        scratch.deallocate()
        slotMACs.deallocate()
    }

    /// The port as the multiplexer's upstream session sees it.
    public var upstreamInfo: NetInfo { upstream.info }

    public func stats() -> Stats {
        Stats(clients: clientStats(), rxFrames: rxFrames, rxNoClient: rxNoClient, rxOversize: rxOversize, txFrames: txFrames, refused: refused,
                     upstreamRecoveries: upstream.recoveries, upstreamTxDropped: upstream.txDroppedInRecovery,
                     upstreamStrayEntries: upstream.strayEntries)
    }

    // MARK: the loop

    /// Serves for up to `milliseconds`: accepts clients, moves frames both ways, sleeps
    /// when there is nothing to do. Call in a loop (on a thread of its own), or once with
    /// `Int.max`. Throws only when the upstream session ends (the device failed, or the
    /// manager went away): every client's session then fails with the reason.
    public mutating func serve(milliseconds: Int) throws(SessionError) {
        // Saturating: `Int.max` serves until the port fails.
        let (span, over) = UInt64(max(0, milliseconds)).multipliedReportingOverflow(by: 1_000_000)
        let (end, later) = Clock.monotonicNanoseconds.addingReportingOverflow(span)
        let until = over || later ? UInt64.max : end
        repeat {
            do {
                if try pass() == 0 { try sleep(until: until) }
            } catch {
                for k in 0..<occupied.count where occupied[k] { fail(k, "the port failed: \(error)") }
                throw error
            }
        } while Clock.monotonicNanoseconds < until
    }

    /// One pass: frames from the port to the clients, frames from the clients to the port,
    /// then everything staged published. Returns the work done.
    mutating func pass() throws(SessionError) -> Int {
        var work = try receivePass()
        work += try transmitPass()
        for k in 0..<occupied.count where occupied[k] {
            if slots[k].endpoint.flush() == nil {
                drops.append((k, "its rxActive or txFree had no room: it has more buffers out than its depth", .brokeItsQueues))
            } else if slots[k].endpoint.hasFailed, let e = slots[k].endpoint.failure {
                drops.append((k, "\(e)", .brokeItsQueues))
            }
        }
        applyDrops()
        return work
    }

    /// Frames from the port, each copied to the client it is for (all clients for a group
    /// address), into an empty receive buffer the client posted.
    mutating func receivePass() throws(SessionError) -> Int {
        let n = occupied.count
        // Empty buffers first, so that a frame finds every buffer a client has posted.
        for k in 0..<n where occupied[k] { takeReceiveBuffers(k) }
        // Locals for the closure: it runs while `upstream` is being mutated.
        let slots = self.slots
        let macs = slotMACs
        var noClient: UInt64 = 0, oversize: UInt64 = 0
        // What the upstream buffers hold may be longer than a frame the port allows; a
        // client's buffers are sized for the port's frames only.
        let maxFrame = Int(upstream.info.maxFrame)
        let got = try upstream.receive(max: 64) { frame in
            guard frame.count >= NetInfo.headerBytes else { return }
            guard frame.count <= maxFrame else {
                oversize &+= 1
                return
            }
            let destination = MACAddress(bytes: frame.baseAddress!)
            if destination.isMulticast {
                for k in 0..<n where macs[k] != Self.emptySlot { slots[k].deliver(frame) }
                return
            }
            for k in 0..<n where macs[k] == destination.rawValue {
                slots[k].deliver(frame)
                return
            }
            noClient &+= 1
        }
        rxFrames &+= UInt64(got)
        rxNoClient &+= noClient
        rxOversize &+= oversize
        return got
    }

    /// Takes the empty buffers client `k` posted, as many as it may have here.
    mutating func takeReceiveBuffers(_ k: Int) {
        let allowance = slots[k].endpoint.receiveAllowance()
        if allowance == 0 {
            // Nothing may be held, yet a buffer waits: more buffers out than the depth.
            if !slots[k].endpoint.rxFree.isEmpty() && slots[k].endpoint.receiveAllowance() == 0 {
                drops.append((k, "more receive buffers than the queue depth of \(slots[k].endpoint.queueDepth)", .brokeItsQueues))
            }
            return
        }
        let room = min(allowance, slots[k].queueDepth - slots[k].heldCount)
        let got = slots[k].endpoint.rxFree.dequeue(into: UnsafeMutableBufferPointer(start: slots[k].held + slots[k].heldCount, count: room))
        slots[k].heldCount += got
        slots[k].endpoint.rxHeld += got
    }

    /// Frames from the clients to the port, round robin, at most `batch` per client per
    /// pass and never more than the port has transmit buffers free.
    mutating func transmitPass() throws(SessionError) -> Int {
        let n = occupied.count
        _ = try upstream.reclaimTransmitBuffers()
        var sent = 0, work = 0
        for step in 0..<n {
            let k = (nextTx + step) % n
            guard occupied[k] else { continue }
            let room = min(scratch.count, upstream.freeTransmitBuffers, slots[k].endpoint.transmitAllowance())
            if room == 0 {
                if slots[k].endpoint.transmitAllowance() == 0 && !slots[k].endpoint.txActive.isEmpty()
                    && slots[k].endpoint.transmitAllowance() == 0 {
                    drops.append((k, "more frames than the queue depth of \(slots[k].endpoint.queueDepth)", .brokeItsQueues))
                }
                continue
            }
            let got = slots[k].endpoint.txActive.dequeue(into: UnsafeMutableBufferPointer(rebasing: scratch[0..<room]))
            work += got
            for i in 0..<got {
                let d = scratch[i]
                // Checked by the queue: inside the client's region, 14...maxFrame bytes.
                guard let b = try upstream.transmitBuffer() else {
                    // The port took buffers back for a restart's recovery: none is free.
                    slots[k].endpoint.stageSent(d)
                    continue
                }
                let length = Int(d.length)
                b.pointer.copyMemory(from: slots[k].endpoint.data.base + Int(d.offset.rawValue), byteCount: length)
                // The source MAC is read from our copy: the client cannot change it after the check.
                if MACAddress(bytes: b.pointer + 6) == slots[k].mac {
                    try upstream.send(b.index, length: length)
                    slots[k].txSent &+= 1
                    sent += 1
                } else {
                    try upstream.discard(b.index)
                    slots[k].txSpoofed &+= 1
                }
                slots[k].endpoint.stageSent(d)
            }
        }
        nextTx = (nextTx + 1) % n
        try upstream.flush()
        txFrames &+= UInt64(sent)
        return work
    }

    /// Nothing to do: asks every client (and the port) for a doorbell, checks once more,
    /// and sleeps in epoll on them, the listener and the clients' control sockets, at most
    /// until `until` (and 50 ms).
    mutating func sleep(until: UInt64) throws(SessionError) {
        var sleepy = true
        let portHasRoom = upstream.freeTransmitBuffers > 0
        for k in 0..<occupied.count where occupied[k] {
            // Frames waiting while the port has no buffer free wake us through the port.
            if portHasRoom && !slots[k].endpoint.txActive.prepareToSleep() && !slots[k].endpoint.txActive.hasFailed {
                sleepy = false
            }
        }
        if sleepy {
            upstreamArmed = try upstream.armWakeUp()
            sleepy = upstreamArmed
        }
        let now = Clock.monotonicNanoseconds
        let timeout = !sleepy || now >= until ? 0 : Int(min(50, (until - now) / 1_000_000 + 1))
        let ready: Int
        do { ready = try epoll.wait(into: &events, timeoutMilliseconds: timeout) } catch {
            try cancelSignals()
            throw .system(error)
        }
        try cancelSignals()
        for i in 0..<ready { handle(events.token(i)) }
        applyDrops()
        expirePending()
    }

    /// Withdraws the doorbell requests made before sleeping. Throws when the upstream
    /// session ended (the manager went away or failed the session): its descriptor would
    /// stay readable, and every later sleep would return at once.
    mutating func cancelSignals() throws(SessionError) {
        for k in 0..<occupied.count where occupied[k] { slots[k].endpoint.txActive.cancelSignal() }
        if upstreamArmed {
            upstreamArmed = false
            // Drains the port's doorbell and takes new queues if the driver was replaced.
            try upstream.disarm()
        }
    }

    mutating func handle(_ token: UInt64) {
        switch token {
        case Self.listenerToken: accept()
        case Self.upstreamToken: break  // disarm looked
        case let t where t & Self.pendingBit != 0: open(CInt(truncatingIfNeeded: t & 0xFFFF_FFFF))
        default:
            let k = Int(token >> 8) - 1
            guard k >= 0, k < occupied.count, occupied[k] else { return }
            if token & 1 == 1 {
                _ = try? slots[k].endpoint.requestBell.drain()
            } else {
                // Clients send nothing after open: a message or a close ends the session.
                _ = try? slots[k].socket.receiveControl(nonBlocking: true)
                drops.append((k, "the client closed its session", .closed))
            }
        }
    }

    // MARK: clients

    /// Accepts one waiting connection (the listener is readable; it blocks, and stays
    /// readable while more wait); it gets `openTimeoutNanoseconds` to send its open
    /// request, and nobody waits for it meanwhile. With 64 waiting already it is refused
    /// at once (left in the backlog, it would keep the listener readable and the loop awake).
    mutating func accept() {
        let s: UnixSocket
        do { s = try listener.accept() } catch { return }
        guard pending.count < 64 else {
            try? s.send(.failure(.busy, "too many connections waiting to open a session"), nonBlocking: true)
            refused &+= 1
            return
        }
        // Authentication: the multiplexer's own uid or root.
        guard let creds = try? s.peerCredentials(), creds.uid == getuid() || creds.uid == 0 else {
            try? s.send(.failure(.permissionDenied, "not allowed to use this multiplexer"), nonBlocking: true)
            refused &+= 1
            return
        }
        // Kept as a plain descriptor until its open request comes (`open` adopts it again).
        guard let raw = try? s.fd.duplicate().release().rawValue else { return }
        do { try epoll.add(FileDescriptor(rawValue: raw), events: .readable, token: Self.pendingBit | UInt64(UInt32(raw))) } catch {
            close(raw)
            return
        }
        pending.append((raw, Clock.monotonicNanoseconds + Self.openTimeoutNanoseconds))
    }

    mutating func expirePending() {
        guard !pending.isEmpty else { return }
        let now = Clock.monotonicNanoseconds
        for p in pending where p.deadline < now {
            try? epoll.remove(FileDescriptor(rawValue: p.fd))
            close(p.fd)
            refused &+= 1
        }
        pending.removeAll { $0.deadline < now }
    }

    /// A pending connection is readable: its open request, answered with a session or a refusal.
    mutating func open(_ raw: CInt) {
        guard let i = pending.firstIndex(where: { $0.fd == raw }) else { return }
        pending.remove(at: i)
        try? epoll.remove(FileDescriptor(rawValue: raw))
        let s = UnixSocket(adopting: OwnedFD(adopting: raw))
        let d: ControlDelivery
        do { d = try s.receiveControl(nonBlocking: true) } catch {
            try? s.send(.failure(.malformed, "\(error)"), nonBlocking: true)
            refused &+= 1
            return
        }
        guard case .openSession(let m) = d.message else {
            try? s.send(.failure(.malformed, "expected openSession"), nonBlocking: true)
            refused &+= 1
            return
        }
        if let refusal = check(m) {
            try? s.send(.failure(refusal.0, refusal.1), nonBlocking: true)
            refused &+= 1
            return
        }
        guard let k = occupied.firstIndex(of: false) else {
            try? s.send(.failure(.busy, "all \(occupied.count) client ports of this multiplexer are in use"), nonBlocking: true)
            refused &+= 1
            return
        }
        let info = NetInfo(mac: macs[k], mtu: upstream.info.mtu, linkUp: upstream.info.linkUp)
        let id = nextSessionID
        nextSessionID += 1
        do {
            let c = try MuxClient(sessionID: id, socket: s, request: m, info: info)
            try c.socket.send(.sessionOpened(c.opened), descriptors: c.resources.openedDescriptors, nonBlocking: true)
            try epoll.add(c.socket.fd.raw, events: .readable, token: Self.token(slot: k, bell: false))
            try epoll.add(c.endpoint.requestBell.fd.raw, events: .readable, token: Self.token(slot: k, bell: true))
            (slots + k).initialize(to: c)
        } catch {
            refused &+= 1
            return
        }
        occupied[k] = true
        slotMACs[k] = macs[k].rawValue
        counters[k].sessions &+= 1
        counters[k].lastDrop = nil
    }

    /// Why an open request cannot be served, or nil.
    func check(_ m: OpenSession) -> (ErrorCode, String)? {
        guard m.deviceClass == .net else { return (.invalidArgument, "this multiplexer serves net sessions, not \(m.deviceClass)") }
        guard m.device == configuration.deviceName else { return (.unknownDevice, "no device named '\(m.device)' here") }
        guard m.writable else { return (.invalidArgument, "a net session sends frames: open it writable") }
        let depth = Int(m.queueDepth)
        guard depth >= 2, depth <= configuration.maxQueueDepth, depth.nonzeroBitCount == 1 else {
            return (.invalidArgument, "queue depth \(depth): a power of two in 2...\(configuration.maxQueueDepth)")
        }
        guard m.dataBytes > 0, m.dataBytes <= UInt64(configuration.maxDataBytes) else {
            return (.invalidArgument, "data region of \(m.dataBytes) bytes: 1...\(configuration.maxDataBytes)")
        }
        return nil
    }

    mutating func applyDrops() {
        guard !drops.isEmpty else { return }
        for d in drops where occupied[d.slot] { fail(d.slot, d.why, cause: d.cause) }
        drops.removeAll(keepingCapacity: true)
    }

    /// Why a client's session ends: it closed it, it broke its queues (counted in
    /// `strayEntries`), or anything else (the reason is its `lastDrop`).
    enum DropCause { case closed, brokeItsQueues, other }

    /// Ends client `k`'s session: its header says failed, its connection carries the
    /// reason and closes, and its slot is free again.
    mutating func fail(_ k: Int, _ reason: String, cause: DropCause = .other) {
        guard occupied[k] else { return }
        let c = (slots + k).move()
        occupied[k] = false
        slotMACs[k] = Self.emptySlot
        counters[k].rxDelivered &+= c.rxDelivered
        counters[k].rxNotReading &+= c.rxNotReading
        counters[k].txSent &+= c.txSent
        counters[k].txSpoofed &+= c.txSpoofed
        if cause == .brokeItsQueues { counters[k].strayEntries &+= 1 }
        if cause != .closed { counters[k].lastDrop = reason }
        try? epoll.remove(c.socket.fd.raw)
        try? epoll.remove(c.endpoint.requestBell.fd.raw)
        Self.end(c, reason)
    }

    /// Tells a client its session is over: the header says failed, the connection carries
    /// the reason, and the doorbell wakes a client that sleeps.
    static func end(_ c: borrowing MuxClient, _ reason: String) {
        c.resources.publish(generation: c.opened.generation, state: .failed)
        try? c.socket.send(.sessionFailed(reason: String(reason.prefix(ControlProtocol.maxReasonBytes - 16))), nonBlocking: true)
        try? c.endpoint.completionBell.ring()
    }

    /// Counters of every slot, the open sessions' included.
    public func clientStats() -> [ClientStats] {
        var c = counters
        for k in 0..<c.count where occupied[k] {
            c[k].connected = true
            c[k].rxDelivered &+= slots[k].rxDelivered
            c[k].rxNotReading &+= slots[k].rxNotReading
            c[k].txSent &+= slots[k].txSent
            c[k].txSpoofed &+= slots[k].txSpoofed
        }
        return c
    }
}

/// One client session of the multiplexer: its resources are made as the manager makes a
/// session's (`SessionResources`), and it is served through a `NetServerEndpoint`, as a
/// driver serves one. The empty receive buffers it posted wait in `held` for frames.
struct MuxClient: ~Copyable {
    let socket: UnixSocket
    let resources: SessionResources
    var endpoint: NetServerEndpoint
    let opened: SessionOpened
    let mac: MACAddress
    let queueDepth: Int
    /// Empty receive buffers taken off rxFree (a stack), at most the depth.
    let held: UnsafeMutablePointer<BufferDescriptor>
    var heldCount = 0
    var rxDelivered: UInt64 = 0
    var rxNotReading: UInt64 = 0
    var txSent: UInt64 = 0
    var txSpoofed: UInt64 = 0

    init(sessionID: UInt64, socket: consuming UnixSocket, request m: OpenSession, info: NetInfo) throws {
        let r = try SessionResources(name: "outboard-netmux-\(sessionID)", deviceClass: .net, queueDepth: m.queueDepth,
                                     dataBytes: SharedRegion.roundToPage(Int(m.dataBytes)))
        r.publish(generation: 1, state: .serving)
        let dataBytes = UInt64(r.data.size)
        let a = Attach(sessionID: sessionID, tableIndex: 0, queueDepth: m.queueDepth, writable: true, dataBytes: dataBytes)
        endpoint = try NetServerEndpoint(a, queues: r.queues.fd.duplicate(), data: r.data.fd.duplicate(),
                                         requestBell: r.requestBell.fd.duplicate(), completionBell: r.completionBell.fd.duplicate(),
                                         maxFrame: info.maxFrame)
        resources = r
        self.socket = socket
        opened = SessionOpened(sessionID: sessionID, generation: 1, queueDepth: m.queueDepth, writable: true,
                               dataBytes: dataBytes, classInfo: .net(info))
        mac = info.mac
        queueDepth = Int(m.queueDepth)
        held = .allocate(capacity: queueDepth)
    }

    deinit { held.deallocate() }

    /// Copies `frame` into one of the client's empty buffers and stages it on rxActive;
    /// with none here, the frame is the client's loss.
    @inline(__always)
    mutating func deliver(_ frame: UnsafeRawBufferPointer) {
        guard heldCount > 0 else {
            rxNotReading &+= 1
            return
        }
        heldCount -= 1
        var d = held[heldCount]
        endpoint.rxHeld -= 1
        // Buffers are at least maxFrame (the queue's bounds), and `receivePass` passes no
        // frame longer: it fits.
        (endpoint.data.base + Int(d.offset.rawValue)).copyMemory(from: frame.baseAddress!, byteCount: frame.count)
        d.length = UInt32(frame.count)
        endpoint.stageReceived(d)
        rxDelivered &+= 1
    }
}
