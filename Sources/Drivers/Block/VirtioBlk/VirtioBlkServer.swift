import OutboardRings
import OutboardSession
import OutboardSystem
import SystemPackage
import VhostUser
import Virtio

/// Serves block sessions on a virtio-blk device reached through a connection the manager
/// opened and handed over (virtio 1.2 §5.2; the device logic is `VirtioBlkDevice`), generic
/// over the transport (`HandedOverTransport`: vhost-user now).
///
/// Zero-copy: every session's data region is exposed to the device at the IO address the
/// manager's translation table gives it (vhost-user: in the device's memory table), and
/// request descriptors point straight at client buffers. Only the request headers,
/// segments and status bytes live in the driver's own memory (the manager's DMA region,
/// seen by the device at `dmaIOAddress`), next to the virtqueue.
///
/// When the device goes away the server keeps what was in flight, asks the manager for a
/// new connection, sets the device up again, exposes every region again and resubmits in
/// the order the requests first went to the device.
struct VirtioBlkServer<Link: HandedOverTransport & ~Copyable>: ~Copyable, BlockDeviceServer {
    static var keepsDataDescriptors: Bool { true }
    static var callToken: UInt64 { HostToken.deviceFirst }
    static var socketToken: UInt64 { HostToken.deviceFirst + 1 }
    static var configToken: UInt64 { HostToken.deviceFirst + 2 }

    var device: VirtioBlkDevice<Link>
    let dma: DMARegion
    let mode: NotifyMode
    let pollWindow: UInt64
    let maxTransfer: UInt32
    var connected = false
    var socketFD: CInt = -1
    var limits: BlockLimits?

    /// Requests at the device or waiting for it, by request slot.
    let records: UnsafeMutablePointer<Record>
    let freeSlots: UnsafeMutablePointer<UInt16>
    var freeCount: Int
    var sequence: UInt64 = 0
    /// Where each session's region is exposed to the device on this connection.
    var exposedAt: [IOAddress?] = Array(repeating: nil, count: SessionTable.capacity)
    /// The stray-dma and bad-ring requests (translation table counts) this driver has
    /// acted on; those before its start are not its own.
    var strayDMASeen: UInt64
    var badRingSeen: UInt64
    /// Where an injected stray descriptor points: above the driver's DMA region, below the
    /// first session address (4 GiB) and the x86 interrupt window (0xfee00000), so no grant
    /// covers it.
    static var strayIOAddress: IOAddress { IOAddress(rawValue: 0xC000_0000) }

    struct Record {
        var active = false
        var session = 0
        var sequence: UInt64 = 0
        var request = BlockRequest(tag: 0, op: .read, sector: 0, offset: RegionOffset(rawValue: 0), length: 0)
    }

    /// `link`: the transport, its eventfds made before the sandbox was entered.
    init(start cfg: DriverStart, memory: consuming OwnedFD, link: consuming Link,
         context: borrowing BlockContext) throws(DriverError) {
        guard cfg.virtio != nil else { throw .setup("the virtio-blk driver got transport \(cfg.transport)") }
        guard cfg.queueSize >= 8, cfg.queueSize <= 1024, cfg.queueSize.nonzeroBitCount == 1 else {
            throw .setup("queue size \(cfg.queueSize): a power of two in 8...1024")
        }
        let region = try Self.adoptDMA(memory)
        let dev = try Self.makeDevice(link, region.mapping, cfg)
        do {
            // Edge-triggered, never read: a wake-up is all a notification means (the used
            // ring says what finished), and each read would be a system call per wake-up.
            try context.epoll.add(FileDescriptor(rawValue: dev.transport.interruptDescriptor(0)), events: [.readable, .edgeTriggered],
                                  token: Self.callToken)
            let config = dev.transport.configChangeDescriptor
            if config >= 0 {
                try context.epoll.add(FileDescriptor(rawValue: config), events: [.readable, .edgeTriggered], token: Self.configToken)
            }
        } catch {
            throw .setup("epoll: \(error)")
        }
        device = dev
        dma = region
        strayDMASeen = context.table.strayDMARequests
        badRingSeen = context.table.badRingRequests
        mode = cfg.notifyMode
        pollWindow = UInt64(cfg.pollMicroseconds) * 1000
        maxTransfer = cfg.maxTransfer
        let size = Int(cfg.queueSize)
        records = .allocate(capacity: size)
        records.initialize(repeating: Record(), count: size)
        freeSlots = .allocate(capacity: size)
        for i in 0..<size { freeSlots[i] = UInt16(size - 1 - i) }
        freeCount = size
    }

    /// The DMA region: kept open (the transport exposes it by descriptor) and mapped.
    struct DMARegion: ~Copyable {
        let region: SharedRegion
        let mapping: SharedMapping
    }

    static func adoptDMA(_ memory: consuming OwnedFD) throws(DriverError) -> DMARegion {
        let region: SharedRegion
        do { region = try SharedRegion(adopting: memory, minimumSize: 1) } catch { throw .setup("DMA region: \(error)") }
        let mapping: SharedMapping
        do { mapping = try region.map(.readWrite) } catch { throw .setup("mapping the DMA region: \(error)") }
        return DMARegion(region: region, mapping: mapping)
    }

    static func makeDevice(_ link: consuming Link, _ mapping: borrowing SharedMapping,
                           _ cfg: DriverStart) throws(DriverError) -> VirtioBlkDevice<Link> {
        do {
            return try VirtioBlkDevice(transport: link, memory: mapping.base, size: mapping.size,
                                       ioAddress: cfg.dmaIOAddress, queueSize: Int(cfg.queueSize))
        } catch {
            throw .setup("\(error)")
        }
    }

    deinit {
        records.deallocate()
        freeSlots.deallocate()
    }

    var deviceConnected: Bool { connected }
    var room: Int { connected ? min(freeCount, device.room) : 0 }

    // MARK: the device connection

    /// Sets the device up on a fresh connection (§3.1.1 through the transport), exposes
    /// the DMA region and every session's region, starts the queue and resubmits what was
    /// in flight. Any failure: the connection is dropped and a new one asked for.
    mutating func connect(_ fd: consuming OwnedFD, context: inout BlockContext) {
        // A connection the manager replaces is simply dropped: reporting it lost would ask
        // for yet another.
        if connected { drop() }
        do {
            try device.transport.connect(fd)
        } catch {
            context.reportDeviceLost("device handshake failed: \(error)", Self.recovery(error))
            return
        }
        let socket = device.transport.connectionDescriptor
        do {
            context.page.beat()
            let info = try device.negotiate(eventIdx: mode != .interrupt, maxTransfer: maxTransfer)
            context.page.beat()
            try device.transport.expose(device.deviceMemory(fd: dma.region.fd.raw.rawValue))
            for i in 0..<SessionTable.capacity { exposedAt[i] = nil }
            for i in 0..<SessionTable.capacity where context.sessions.isActive(i) {
                if let refusal = try expose(i, context: &context) { context.sessions.drops.append((i, refusal)) }
                context.page.beat()
            }
            try device.start(notificationsOff: mode == .adaptive || mode == .poll)
            if socket >= 0 { try context.epoll.add(FileDescriptor(rawValue: socket), events: .readable, token: Self.socketToken) }
            var flags: DeviceFlags = []
            if info.flush { flags.insert(.flush) }
            if info.readOnly { flags.insert(.readOnly) }
            if info.discard { flags.insert(.discard) }
            if info.writeZeroes { flags.insert(.writeZeroes) }
            limits = BlockLimits(blockCount: info.capacity, maxTransfer: info.maxTransfer, flags: flags,
                                 maxDiscardSectors: info.maxDiscardSectors, maxWriteZeroesSectors: info.maxWriteZeroesSectors)
            try? context.manager.send(.deviceInfo(.block(BlockInfo(blockSize: 512, blockCount: info.capacity,
                                                                     maxTransfer: info.maxTransfer, flags: flags))))
        } catch let e as VirtioBlkError {
            device.transport.disconnect()
            context.reportDeviceLost("device set-up failed: \(e)", Self.recovery(e))
            return
        } catch let e as VirtioTransportError {
            device.transport.disconnect()
            context.reportDeviceLost("device set-up failed: \(e)", Self.recovery(e))
            return
        } catch {
            device.transport.disconnect()
            context.reportDeviceLost("device set-up failed: \(error)")
            return
        }
        socketFD = socket
        connected = true
        resubmitAll(context: &context)
    }

    /// A device that lacks what the driver needs (VERSION_1, a configuration space,
    /// PROTOCOL_FEATURES) will lack it on the next connection too: fail it, with the reason
    /// in the manager's status. Everything else may work on a new connection.
    static func recovery(_ e: VirtioTransportError) -> Recovery {
        if case .unsupported = e { return .failDevice }
        return .reconnectDevice
    }

    static func recovery(_ e: VirtioBlkError) -> Recovery {
        switch e {
        case .unsupported: return .failDevice
        case .transport(let t): return recovery(t)
        case .setup, .device: return .reconnectDevice
        }
    }

    /// Exposes session `i`'s data region at its translation-table IO address. Returns why
    /// the session cannot be served (no slot, no active entry), or throws if the
    /// connection failed.
    mutating func expose(_ i: Int, context: inout BlockContext) throws(VirtioTransportError) -> String? {
        let ep = context.sessions.block
        guard let e = context.table.readPatiently(ep[i].tableIndex), e.state == .active, e.sessionID == ep[i].sessionID,
              e.length > 0 else {
            return "its region is not active in the translation table"
        }
        let io = e.ioAddress
        do throws(VirtioTransportError) {
            try device.transport.expose(DeviceMemory(ioAddress: io, size: ep[i].data.size, base: ep[i].data.base,
                                                     fd: ep[i].dataFD))
        } catch .noMemorySlot(let limit) {
            return "the device has \(limit) memory slots and one is the driver's: no slot left for this session"
        } catch .refused(let why) {
            return "the device refused its region: \(why)"
        }
        exposedAt[i] = io
        return nil
    }

    /// The connection is unusable: drop it and ask the manager for another. What is in
    /// flight stays recorded and is resubmitted on the next connection.
    mutating func lose(_ reason: String, context: inout BlockContext) {
        if connected {
            if socketFD >= 0 { try? context.epoll.remove(FileDescriptor(rawValue: socketFD)) }
            drop()
        }
        // Nothing more comes from the device until a new connection: a client waiting for
        // a wake index it will not reach gets what is already published.
        for i in 0..<SessionTable.capacity where context.sessions.isActive(i) { context.sessions.block[i].producerIdle() }
        context.reportDeviceLost(reason)
    }

    /// Closes the connection (the epoll set forgets a closed descriptor by itself).
    mutating func drop() {
        device.transport.disconnect()
        socketFD = -1
        connected = false
        limits = nil
        for i in 0..<SessionTable.capacity { exposedAt[i] = nil }
    }

    /// After (re)connecting: every recorded request goes to the new device in the order it
    /// first went to a device, except those of sessions on their way out, which end as
    /// revoked.
    mutating func resubmitAll(context: inout BlockContext) {
        let size = device.layout.queueSize
        var waiting: [(UInt64, Int)] = []
        for k in 0..<size where records[k].active { waiting.append((records[k].sequence, k)) }
        waiting.sort { $0.0 < $1.0 }
        for (_, k) in waiting {
            let i = records[k].session
            if !context.sessions.isActive(i) {
                finish(k, .revoked, context: &context)
            } else if let status = submit(k, context: &context) {
                finish(k, status, context: &context)
            }
        }
        publish(context: &context)
    }

    // MARK: data path

    mutating func start(_ r: BlockRequest, session i: Int, context: inout BlockContext) -> BlockStatus? {
        // Without VIRTIO_BLK_F_FLUSH the device writes through (§5.2.5): nothing to do.
        if r.op == BlockOp.flush.rawValue && !(limits?.flags.contains(.flush) ?? false) { return .ok }
        guard freeCount > 0 else { return .ioError }  // cannot happen: the host checked `room`
        freeCount -= 1
        let k = Int(freeSlots[freeCount])
        sequence &+= 1
        records[k] = Record(active: true, session: i, sequence: sequence, request: r)
        if let status = submit(k, context: &context) {
            release(k)
            return status
        }
        return nil
    }

    /// Request slot `k` to the device: its buffer translated right before the device gets
    /// the address. Returns the status to end it with if it cannot go.
    mutating func submit(_ k: Int, context: inout BlockContext) -> BlockStatus? {
        let r = records[k].request
        let i = records[k].session
        guard let op = BlockOp(rawValue: r.op) else { return .unsupported }
        var request = VirtioBlkRequest(op: VirtioBlkOp.flush, sector: r.sector, length: r.length)
        switch op {
        case .read, .write:
            // Only into memory the device was shown on this connection: a session it
            // refused a slot to is on its way out, and an address outside the device's
            // table would cost the connection.
            guard exposedAt[i] != nil else { return .revoked }
            switch context.sessions.translate(i, offset: r.offset, length: r.length, deviceWrites: op == .read,
                                              table: context.table) {
            case .refused(let status): return status
            case .granted(let io, _):
                request = VirtioBlkRequest(op: op == .read ? .read : .write, sector: r.sector, buffer: io, length: r.length)
            }
        case .flush: request.op = VirtioBlkOp.flush
        case .discard: request.op = VirtioBlkOp.discard
        case .writeZeroes: request.op = VirtioBlkOp.writeZeroes
        }
        let stray = context.table.strayDMARequests
        if stray != strayDMASeen {
            strayDMASeen = stray
            let at = context.table.strayDMAAddress
            device.strayStatusAddress = at.rawValue == 0 ? Self.strayIOAddress : at
        }
        let bad = context.table.badRingRequests
        if bad != badRingSeen {
            badRingSeen = bad
            device.addInvalidHead()
        }
        guard device.submit(slot: k, request) else { return .ioError }
        context.page.add(.submitted)
        return nil
    }

    mutating func publish(context: inout BlockContext) {
        if connected, device.publish() { context.page.add(.kicks) }
    }

    /// Takes finished chains off the used ring and queues their completions.
    mutating func poll(context: inout BlockContext) -> Int {
        guard connected else { return 0 }
        var n = 0
        while let c = device.nextCompletion() {
            guard records[c.slot].active else { continue }
            let status: BlockStatus
            switch c.status {
            case .ok: status = .ok
            case .unsupported: status = .unsupported
            case .ioError: status = .ioError
            }
            finish(c.slot, status, context: &context)
            n += 1
        }
        if let e = device.error { lose("device broke the virtqueue: \(e)", context: &context) }
        return n
    }

    mutating func finish(_ k: Int, _ status: BlockStatus, context: inout BlockContext) {
        context.sessions.finish(records[k].session, tag: records[k].request.tag, status: status, generation: context.generation)
        release(k)
    }

    mutating func release(_ k: Int) {
        records[k].active = false
        freeSlots[freeCount] = UInt16(k)
        freeCount += 1
    }

    // MARK: sleep rule

    /// Busy-polling instead of sleeping: `poll` while requests are at the device;
    /// `adaptive` for a short window after the last work (a client at queue depth 1 submits
    /// its next request within microseconds of a completion).
    func shouldSpin(lastWork: UInt64) -> Bool {
        guard connected else { return false }
        switch mode {
        case .poll: return device.inFlight > 0
        case .adaptive: return Clock.monotonicNanoseconds &- lastWork < pollWindow
        case .interrupt, .eventIndex: return false
        }
    }

    /// Interrupt hold-off: how many of the requests at the device should have finished
    /// before the device notifies (event idx, used_event): a third. The rest keeps the
    /// device busy meanwhile, and clients (which ask to be woken after a quarter of what
    /// they have in flight) get theirs in one batch. At least one, never more than is at
    /// the device: every request finishes, so the wait always ends. Measured against a
    /// quarter and a half (docs/benchmarks/blk.md): a quarter wakes more, a half lets the
    /// device run dry at QD32.
    static func holdOff(inFlight: Int) -> Int { max(1, inFlight / 3) }

    mutating func prepareDeviceToSleep() -> Bool {
        !(connected && device.inFlight > 0 && device.enableNotifications(after: Self.holdOff(inFlight: device.inFlight)))
    }

    mutating func deviceWoke() {
        if connected && (mode == .adaptive || mode == .poll) { device.disableNotifications() }
    }

    mutating func event(_ token: UInt64, context: inout BlockContext) {
        switch token {
        case Self.callToken:
            // One edge per wake-up, however many notifications it gathered.
            context.page.add(.interrupts)
        case Self.socketToken:
            // Nothing is expected on the device socket between our own requests: the
            // backend closed it (or sent something unasked for).
            if connected { lose("the device closed the connection", context: &context) }
        case Self.configToken:
            // A configuration change, or the device stopped (§2.1.2: DEVICE_NEEDS_RESET,
            // after an error it found in what the driver gave it). The manager hands the
            // device over again at once (reconnect-device): a reset, the queue set up
            // again, and every request in flight resubmitted in its first order.
            guard connected else { break }
            switch Result(catching: { () throws(VirtioTransportError) in try device.transport.status() }) {
            case .success(let s) where s.contains(.deviceNeedsReset):
                lose("the device needs a reset (DEVICE_NEEDS_RESET, status \(s))", context: &context)
            case .success:
                // A change of the configuration space (virtio-blk: the capacity). Sessions
                // keep the size they opened with; the next connection reports the new one.
                break
            case .failure(let e):
                lose("reading the device status after a configuration change: \(e)", context: &context)
            }
        default:
            break
        }
    }

    // MARK: sessions

    mutating func attached(_ i: Int, context: inout BlockContext) -> String? {
        guard connected else { return nil }  // exposed on the next connection
        do {
            return try expose(i, context: &context)
        } catch {
            lose("exposing session \(context.sessions.block[i].sessionID)'s region: \(error)", context: &context)
            return nil
        }
    }

    mutating func removing(_ i: Int, context: inout BlockContext) {
        guard let io = exposedAt[i] else { return }
        exposedAt[i] = nil
        guard connected else { return }
        do { try device.transport.withdraw(io) } catch {
            lose("withdrawing session \(context.sessions.block[i].sessionID)'s region: \(error)", context: &context)
        }
    }

    mutating func forget(_ i: Int, context: inout BlockContext) {
        for k in 0..<device.layout.queueSize where records[k].active && records[k].session == i { release(k) }
    }
}
