import CLinux
import OutboardRings
import OutboardSession
import OutboardSystem
import SystemPackage
import VhostUser
import Virtio

#if canImport(Glibc)
import Glibc
#endif

/// The virtio-blk driver: serves block sessions on a vhost-user-blk device (virtio 1.2
/// §5.2) it reaches through a connection the manager opened and handed over.
///
/// Zero-copy: every session's data region is registered in the device's memory table at
/// the IO address the manager's translation table gives it, and request descriptors point
/// straight at client buffers. Only the request header, the discard/write-zeroes segment
/// and the status byte live in the driver's own memory (the manager's DMA region, shared
/// with the device at `DriverStart.dmaIOAddress`), next to the virtqueue.
///
/// Requests are taken from the sessions in batches, validated (op, range, translation and
/// lease, right before they are handed to the device), chained into the virtqueue and
/// published with one kick when the device asks for one. Completions are harvested in
/// batches and go back to each session with one client doorbell when the client asks.
///
/// When the device goes away the driver keeps what was in flight, asks the manager for a
/// new connection, negotiates again, registers every region again and resubmits. The
/// process is sandboxed before `start`: it holds only what the manager sent it.
public struct VirtioBlkDriver: ~Copyable {
    public static let maxSessions = 64
    static let batch = 32
    static let queueIndex: UInt32 = 0
    /// Per request slot in the DMA region: the 16-byte header, then a 16-byte segment.
    static let requestBytes = 32

    let manager: UnixSocket
    let config: DriverStart
    let page: DriverPage
    let table: TranslationTable
    let pageMapping: SharedMapping
    let tableMapping: SharedMapping
    let dmaRegion: SharedRegion
    let dma: SharedMapping
    let epoll: Epoll
    var events = EpollEvents(capacity: 64)
    let kick: Doorbell
    let call: Doorbell
    let mode: NotifyMode
    let layout: SplitQueueLayout
    let requestAreaOffset: Int
    let statusAreaOffset: Int
    var vq: SplitVirtqueue
    var device: VhostUserFrontend?
    var deviceFD: CInt = -1
    var connected = false

    // What the device is (valid while connected, kept across reconnections).
    var features: UInt64 = 0
    var memorySlots = false
    /// Regions the device's memory table takes, ours (the DMA region) included:
    /// GET_MAX_MEM_SLOTS with CONFIGURE_MEM_SLOTS, else 8 (vhost-user's SET_MEM_TABLE limit).
    var memorySlotLimit = 8
    /// Sessions that found no free memory slot at the last registration; dropped with a
    /// clear error once the exchange with the device is over.
    var overSlotLimit: [Int] = []
    var blockCount: UInt64 = 0
    var maxTransfer: UInt32 = 0
    var flags: DeviceFlags = []
    var maxDiscardSectors: UInt32 = 0
    var maxWriteZeroesSectors: UInt32 = 0
    /// Ring descriptors one request may take: 1 with indirect tables, else up to 3.
    var descriptorsPerRequest = 3

    // Sessions.
    let slots: UnsafeMutablePointer<BlockServerEndpoint>
    var occupied: [Bool]
    var detaching: [Bool]
    var registered: [Bool]
    var sessionInFlight: [Int]
    var completionBuffers: [UnsafeMutableBufferPointer<BlockCompletion>]
    var completionCounts: [Int]
    let requestBuffer: UnsafeMutableBufferPointer<BlockRequest>
    var nextSession = 0

    // Requests in flight at the device, by request slot (header/status position).
    let records: UnsafeMutablePointer<InFlight>
    let freeRequestSlots: UnsafeMutablePointer<UInt16>
    var freeRequestCount: Int
    let headToRequest: UnsafeMutablePointer<UInt16>
    let chain: UnsafeMutableBufferPointer<VirtqBuffer>

    var lastWork: UInt64 = 0
    var exitRequested = false

    struct InFlight {
        var active = false
        var slot = 0
        var request = BlockRequest(tag: 0, op: .read, sector: 0, offset: RegionOffset(rawValue: 0), length: 0)
    }

    /// Receives DriverStart, maps the driver page, the translation table (read-only) and
    /// the DMA region, and reports ready. The device connection comes in its own message.
    /// `epoll`, `kick`, `call`: a fresh epoll set and the virtqueue's two doorbells, made
    /// before the sandbox was entered (its filter refuses epoll_create1 and eventfd2).
    public static func start(manager: consuming UnixSocket, epoll ep: consuming Epoll, kick: consuming Doorbell,
                             call: consuming Doorbell, probes: [String]) throws(DriverError) -> VirtioBlkDriver {
        var start: ControlDelivery
        do { start = try manager.receiveControl() } catch { throw .setup("no start message: \(error)") }
        guard case .driverStart(let cfg) = start.message else { throw .setup("expected driverStart, got \(start.message.type)") }
        guard cfg.virtio != nil else { throw .setup("the virtio-blk driver cannot serve transport \(cfg.transport)") }
        guard cfg.tableCapacity >= 1, cfg.tableCapacity <= 4096, cfg.maxTransfer >= UInt32(blockSectorSize),
              cfg.heartbeatIntervalMs >= 1, cfg.queueSize >= 8, cfg.queueSize <= 1024, cfg.queueSize.nonzeroBitCount == 1 else {
            throw .setup("bad start parameters \(cfg)")
        }
        let capacity = Int(cfg.tableCapacity)
        let pm = try mapRegion(start.take(0), DriverPage.byteCount(tableCapacity: capacity), .readWrite, "driver page")
        let tm = try mapRegion(start.take(1), TranslationTable.byteCount(capacity: capacity), .readOnly, "translation table")
        let region: SharedRegion
        do { region = try SharedRegion(adopting: start.take(2), minimumSize: 1) } catch { throw .setup("DMA region: \(error)") }
        let layout: SplitQueueLayout
        do { layout = try SplitQueueLayout(size: Int(cfg.queueSize), indirectSlots: 3) } catch { throw .setup("\(error)") }
        let size = Int(cfg.queueSize)
        let requestArea = (layout.byteCount + 63) & ~63
        let statusArea = requestArea + size * requestBytes
        guard statusArea + size <= region.size else {
            throw .setup("DMA region of \(region.size) bytes is too small for a queue of \(size)")
        }
        let dm: SharedMapping
        do { dm = try region.map(.readWrite) } catch { throw .setup("mapping the DMA region: \(error)") }
        try watchManager(manager, on: ep)
        do { try ep.add(call.fd.raw, events: .readable, token: Token.call) } catch { throw .setup("epoll: \(error)") }
        let vq = SplitVirtqueue(memory: dm.base, ioAddress: cfg.dmaIOAddress, layout: layout, eventIdx: false, indirect: false)
        do {
            try manager.send(.driverReady(pid: getpid(), probes: probes))
        } catch {
            throw .setup("cannot report ready: \(error)")
        }
        return VirtioBlkDriver(manager: manager, config: cfg, pageMapping: pm, tableMapping: tm, dmaRegion: region, dma: dm,
                               epoll: ep, kick: kick, call: call, layout: layout, vq: vq,
                               requestAreaOffset: requestArea, statusAreaOffset: statusArea)
    }

    enum Token {
        static let manager: UInt64 = 0
        static let call: UInt64 = 1
        static let device: UInt64 = 2
        static let session: UInt64 = 16
    }

    init(manager: consuming UnixSocket, config: DriverStart, pageMapping: consuming SharedMapping,
         tableMapping: consuming SharedMapping, dmaRegion: consuming SharedRegion, dma: consuming SharedMapping,
         epoll: consuming Epoll, kick: consuming Doorbell, call: consuming Doorbell, layout: SplitQueueLayout,
         vq: consuming SplitVirtqueue, requestAreaOffset: Int, statusAreaOffset: Int) {
        let capacity = Int(config.tableCapacity)
        page = DriverPage(pageMapping.base, tableCapacity: capacity)
        table = TranslationTable(tableMapping.base, capacity: capacity)
        self.pageMapping = pageMapping
        self.tableMapping = tableMapping
        self.dmaRegion = dmaRegion
        self.dma = dma
        self.epoll = epoll
        self.kick = kick
        self.call = call
        self.manager = manager
        self.config = config
        self.layout = layout
        self.vq = vq
        self.requestAreaOffset = requestAreaOffset
        self.statusAreaOffset = statusAreaOffset
        mode = config.notifyMode
        let n = Self.maxSessions
        slots = .allocate(capacity: n)
        occupied = Array(repeating: false, count: n)
        detaching = Array(repeating: false, count: n)
        registered = Array(repeating: false, count: n)
        sessionInFlight = Array(repeating: 0, count: n)
        completionBuffers = Array(repeating: UnsafeMutableBufferPointer(start: nil, count: 0), count: n)
        completionCounts = Array(repeating: 0, count: n)
        requestBuffer = .allocate(capacity: Self.batch)
        let size = Int(config.queueSize)
        records = .allocate(capacity: size)
        records.initialize(repeating: InFlight(), count: size)
        freeRequestSlots = .allocate(capacity: size)
        for i in 0..<size { freeRequestSlots[i] = UInt16(size - 1 - i) }
        freeRequestCount = size
        headToRequest = .allocate(capacity: size)
        headToRequest.initialize(repeating: 0, count: size)
        chain = .allocate(capacity: 3)
    }

    deinit {
        for i in 0..<Self.maxSessions where occupied[i] {
            (slots + i).deinitialize(count: 1)
            completionBuffers[i].deallocate()
        }
        slots.deallocate()
        requestBuffer.deallocate()
        records.deallocate()
        freeRequestSlots.deallocate()
        headToRequest.deallocate()
        chain.deallocate()
    }

    // MARK: main loop

    /// Serves until the manager closes the socket (then returns) or a fatal error.
    public mutating func run() throws(DriverError) {
        var spins = 0
        let window = UInt64(config.pollMicroseconds) * 1000
        while !exitRequested {
            page.beat()
            var work = 0
            if connected {
                work += harvest()
                work += serveSessions()
                if let e = vq.error { lose("device broke the virtqueue: \(e)") }
            }
            spins &+= 1
            if work > 0 {
                lastWork = Clock.monotonicNanoseconds
                // Under load, look at the manager socket now and then without sleeping.
                if spins & 63 == 0 { try pollManager(timeoutMs: 0) }
                continue
            }
            // Nothing this round. Busy-poll while the mode says so, else sleep.
            if connected && shouldSpin(window: window) {
                // Yield rather than pause: on a machine with fewer cores than busy
                // processes (client, driver, device), the peer we wait for may need this
                // CPU to produce what we are polling for.
                sched_yield()
                if spins & 1023 == 0 { try pollManager(timeoutMs: 0) }
                continue
            }
            // Without a device, waiting requests are no reason to stay awake: nothing can
            // serve them until the manager hands over a new connection, which only the
            // sleep below (epoll on the manager socket) can receive. Staying awake for them
            // would spin forever and never see that connection.
            // Likewise with the virtqueue full: waiting requests cannot be taken until the
            // device completes something, which the used-ring notification below reports
            // (the queue is full, so requests are in flight). Staying awake for them would
            // spin without reading the manager or the device socket.
            var sleep = true
            let watchSessions = connected
                && freeRequestCount > 0 && vq.freeDescriptors >= descriptorsPerRequest
            if watchSessions {
                for i in 0..<Self.maxSessions where occupied[i] && !detaching[i] {
                    if !slots[i].requests.prepareToSleep() && !slots[i].requests.hasFailed { sleep = false }
                }
            }
            if connected && vq.inFlight > 0 && vq.enableNotifications() { sleep = false }
            if sleep { try pollManager(timeoutMs: Int(max(1, config.heartbeatIntervalMs / 2))) }
            if watchSessions {
                for i in 0..<Self.maxSessions where occupied[i] && !detaching[i] { slots[i].requests.cancelSignal() }
            }
            if connected && (mode == .adaptive || mode == .poll) { vq.disableNotifications() }
        }
    }

    /// Busy-polling instead of sleeping: `poll` while requests are at the device;
    /// `adaptive` for a short window after the last work (a client at queue depth 1 submits
    /// its next request within microseconds of a completion).
    func shouldSpin(window: UInt64) -> Bool {
        switch mode {
        case .poll: return vq.inFlight > 0
        case .adaptive: return Clock.monotonicNanoseconds &- lastWork < window
        case .interrupt, .eventIndex: return false
        }
    }

    mutating func pollManager(timeoutMs: Int) throws(DriverError) {
        let n: Int
        do { n = try epoll.wait(into: &events, timeoutMilliseconds: timeoutMs) } catch { throw .fatal("epoll: \(error)") }
        for k in 0..<n {
            switch events.token(k) {
            case Token.manager:
                try handleManagerMessages()
            case Token.call:
                if let c = try? call.drain(), c > 0 { page.add(.interrupts, c) }
            case Token.device:
                // Nothing is expected on the device socket between our own requests: the
                // backend closed it (or sent something unasked for).
                if connected { lose("the device closed the connection") }
            case let t where t >= Token.session && t < Token.session + UInt64(Self.maxSessions):
                let i = Int(t - Token.session)
                if occupied[i] { _ = try? slots[i].requestBell.drain() }
            default:
                break
            }
        }
    }

    mutating func handleManagerMessages() throws(DriverError) {
        while var d = try nextManagerMessage(manager, closed: &exitRequested) {
            switch d.message {
            case .attach(let a):
                attach(a, &d)
            case .detach(let id):
                detach(id)
            case .deviceConnection:
                connect(d.take(0))
            default:
                throw .fatal("unexpected message from manager: \(d.message.type)")
            }
        }
    }

    // MARK: the device

    /// Negotiates with the device on a fresh connection (virtio 1.2 §3.1.1 through the
    /// vhost-user messages), registers memory, sets up the virtqueue and resubmits what was
    /// in flight. Any failure: the connection is dropped and a new one asked for.
    mutating func connect(_ fd: consuming OwnedFD) {
        if connected { lose("replaced by a new connection") }
        let raw = fd.raw.rawValue
        var f = VhostUserFrontend(socket: fd, replyTimeoutMilliseconds: 100)
        do {
            try negotiate(&f)
        } catch {
            // `f` closes the connection as it goes.
            reportLost("device negotiation failed: \(error)")
            return
        }
        do {
            try epoll.add(FileDescriptor(rawValue: raw), events: .readable, token: Token.device)
        } catch {
            reportLost("epoll: \(error)")
            return
        }
        device = consume f
        deviceFD = raw
        connected = true
        let info = ClassInfo.block(BlockInfo(blockSize: 512, blockCount: blockCount, maxTransfer: maxTransfer, flags: flags))
        try? manager.send(.deviceInfo(info))
        dropSessionsOverSlotLimit()
        resubmitAll()
    }

    /// The handshake. Order as QEMU's own frontend: features, protocol features, config,
    /// acknowledged features, memory, then the ring (num, base, addresses, kick, call,
    /// enable). The heartbeat keeps going between steps.
    mutating func negotiate(_ f: inout VhostUserFrontend) throws {
        try f.setOwner()
        let offered = try f.getFeatures()
        let protocolBit: UInt64 = 1 << 30  // VHOST_USER_F_PROTOCOL_FEATURES
        var wanted = VirtioFeature.version1 | protocolBit | VirtioBlkFeature.sizeMax | VirtioBlkFeature.segMax
            | VirtioBlkFeature.blkSize | VirtioBlkFeature.flush | VirtioBlkFeature.readOnly | VirtioBlkFeature.discard
            | VirtioBlkFeature.writeZeroes | VirtioFeature.ringIndirectDesc
        if mode != .interrupt { wanted |= VirtioFeature.ringEventIdx }
        let negotiated = try FeatureNegotiation.negotiate(offered: offered, wanted: wanted, required: VirtioFeature.version1 | protocolBit)
        page.beat()
        let offeredProtocol = try f.getProtocolFeatures()
        let wantedProtocol = VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.config
            | VhostUserProtocolFeature.configureMemSlots | VhostUserProtocolFeature.multiQueue
        guard offeredProtocol & VhostUserProtocolFeature.config != 0 else {
            throw VhostUserError.unsupported("the device does not offer CONFIG (needed for the capacity)")
        }
        try f.setProtocolFeatures(offeredProtocol & wantedProtocol)
        memorySlots = offeredProtocol & VhostUserProtocolFeature.configureMemSlots != 0
        if memorySlots {
            memorySlotLimit = Int(clamping: try f.getMaxMemSlots())
            guard memorySlotLimit >= 2 else {
                throw VhostUserError.unsupported("the device has \(memorySlotLimit) memory slots; the driver needs 2 or more")
            }
        } else {
            memorySlotLimit = 8
        }
        page.beat()
        let cfg = try VirtioBlkConfig.parse(try f.getConfig(offset: 0, size: UInt32(VirtioBlkConfig.byteCount)), features: negotiated)
        try f.setFeatures(negotiated)
        features = negotiated
        blockCount = cfg.capacity
        var transfer = config.maxTransfer
        if let sm = cfg.sizeMax, sm >= UInt32(blockSectorSize) { transfer = min(transfer, sm) }
        maxTransfer = transfer & ~UInt32(blockSectorSize - 1)
        var fl: DeviceFlags = []
        if negotiated & VirtioBlkFeature.flush != 0 { fl.insert(.flush) }
        if negotiated & VirtioBlkFeature.readOnly != 0 { fl.insert(.readOnly) }
        if negotiated & VirtioBlkFeature.discard != 0 { fl.insert(.discard) }
        if negotiated & VirtioBlkFeature.writeZeroes != 0 { fl.insert(.writeZeroes) }
        flags = fl
        maxDiscardSectors = cfg.maxDiscardSectors ?? 0
        maxWriteZeroesSectors = cfg.maxWriteZeroesSectors ?? 0
        page.beat()
        // Memory: our DMA region, then every session's data region at its IO address.
        for i in 0..<Self.maxSessions { registered[i] = false }
        let dmaEntry = VhostUserMemoryRegion(guestPhysicalAddress: config.dmaIOAddress, size: UInt64(dma.size),
                                             userAddress: UInt64(UInt(bitPattern: dma.base)), mmapOffset: 0)
        overSlotLimit.removeAll()
        if memorySlots {
            try f.addMemoryRegion(dmaEntry, fd: dmaRegion.fd.raw.rawValue)
            var used = 1
            for i in 0..<Self.maxSessions where occupied[i] && !detaching[i] {
                if let r = regionEntry(i) {
                    guard used < memorySlotLimit else { overSlotLimit.append(i); continue }
                    try f.addMemoryRegion(r, fd: slots[i].dataFD)
                    registered[i] = true
                    used += 1
                }
                page.beat()
            }
        } else {
            try setMemoryTable(&f, dmaEntry)
        }
        page.beat()
        // The ring (§2.7), fresh: whatever the previous device had is gone with it.
        let eventIdx = negotiated & VirtioFeature.ringEventIdx != 0
        let indirect = negotiated & VirtioFeature.ringIndirectDesc != 0
        descriptorsPerRequest = indirect ? 1 : 3
        vq = SplitVirtqueue(memory: dma.base, ioAddress: config.dmaIOAddress, layout: layout, eventIdx: eventIdx, indirect: indirect)
        try f.setVringNum(Self.queueIndex, UInt32(layout.size))
        try f.setVringBase(Self.queueIndex, 0)
        try f.setVringAddr(Self.queueIndex, descriptors: UInt64(UInt(bitPattern: vq.descriptorTablePointer)),
                           used: UInt64(UInt(bitPattern: vq.usedRingPointer)), avail: UInt64(UInt(bitPattern: vq.availRingPointer)))
        try f.setVringKick(Self.queueIndex, fd: kick.fd.raw.rawValue)
        try f.setVringCall(Self.queueIndex, fd: call.fd.raw.rawValue)
        try f.setVringEnable(Self.queueIndex, true)
        if mode == .adaptive || mode == .poll { vq.disableNotifications() }
        page.beat()
    }

    /// Without CONFIGURE_MEM_SLOTS the whole table is sent at once: at most 8 regions.
    /// Sessions beyond that go to `overSlotLimit`.
    mutating func setMemoryTable(_ f: inout VhostUserFrontend, _ dmaEntry: VhostUserMemoryRegion) throws {
        var regions = [dmaEntry]
        var fds = [dmaRegion.fd.raw.rawValue]
        overSlotLimit.removeAll()
        for i in 0..<Self.maxSessions where occupied[i] && !detaching[i] {
            if let r = regionEntry(i) {
                guard regions.count < memorySlotLimit else { overSlotLimit.append(i); continue }
                regions.append(r)
                fds.append(slots[i].dataFD)
                registered[i] = true
            }
        }
        try f.setMemTable(regions, fds: fds)
    }

    /// Drops the sessions the last registration found no memory slot for: their buffers
    /// are not in the device's table, so none of their requests may reach it.
    mutating func dropSessionsOverSlotLimit() {
        let over = overSlotLimit
        overSlotLimit.removeAll()
        for i in over where occupied[i] && !detaching[i] && !registered[i] { dropSession(i, reason: noSlotReason) }
    }

    var noSlotReason: String {
        "the device has \(memorySlotLimit) memory slots and one is the driver's: no slot left for this session"
    }

    /// Session `i`'s data region as the device should see it: at the IO address of its
    /// translation-table entry, backed by our mapping of it.
    func regionEntry(_ i: Int) -> VhostUserMemoryRegion? {
        guard let e = table.readPatiently(slots[i].tableIndex), e.state == .active, e.sessionID == slots[i].sessionID,
              e.length > 0 else { return nil }
        return VhostUserMemoryRegion(guestPhysicalAddress: e.ioAddress.rawValue, size: UInt64(slots[i].data.size),
                                     userAddress: UInt64(UInt(bitPattern: slots[i].data.base)), mmapOffset: 0)
    }

    /// The connection is unusable: drop it and ask the manager for another. What is in
    /// flight stays recorded and is resubmitted on the next connection.
    mutating func lose(_ reason: String) {
        if connected {
            try? epoll.remove(FileDescriptor(rawValue: deviceFD))
            device = nil
            deviceFD = -1
            connected = false
            for i in 0..<Self.maxSessions { registered[i] = false }
        }
        reportLost(reason)
    }

    func reportLost(_ reason: String) {
        try? manager.send(.deviceLost(reason: String(reason.prefix(ControlProtocol.maxReasonBytes - 16)), recovery: .reconnectDevice))
    }

    /// After (re)connecting: every recorded request goes to the new device, except those of
    /// sessions on their way out, which end as revoked.
    mutating func resubmitAll() {
        let size = Int(config.queueSize)
        for k in 0..<size where records[k].active {
            let i = records[k].slot
            if detaching[i] {
                finish(k, status: .revoked)
            } else if let status = addChain(k) {
                finish(k, status: status)
            }
        }
        publish()
        flushCompletions()
        clearIdleMarks()
        for i in 0..<Self.maxSessions where occupied[i] && detaching[i] && sessionInFlight[i] == 0 { finishDetach(i) }
    }

    // MARK: sessions

    mutating func attach(_ a: Attach, _ d: inout ControlDelivery) {
        guard a.tableIndex < config.tableCapacity, a.queueDepth >= 2, a.queueDepth <= 4096,
              let i = freeSessionSlot() else {
            try? manager.send(.sessionError(sessionID: a.sessionID, reason: "driver has no room for another session"))
            return
        }
        do {
            let ep = try BlockServerEndpoint(a, queues: d.take(0), data: d.take(1), requestBell: d.take(2),
                                             completionBell: d.take(3), keepDataDescriptor: true)
            try epoll.add(ep.requestBell.fd.raw, events: .readable, token: Token.session + UInt64(i))
            (slots + i).initialize(to: ep)
        } catch {
            try? manager.send(.sessionError(sessionID: a.sessionID, reason: "cannot attach: \(error)"))
            return
        }
        occupied[i] = true
        detaching[i] = false
        registered[i] = false
        sessionInFlight[i] = 0
        completionBuffers[i] = .allocate(capacity: Int(a.queueDepth))
        completionCounts[i] = 0
        if connected {
            guard let r = regionEntry(i) else {
                dropSession(i, reason: "its region is not active in the translation table")
                return
            }
            if memorySlots {
                var used = 1  // the DMA region
                for k in 0..<Self.maxSessions where occupied[k] && registered[k] { used += 1 }
                guard used < memorySlotLimit else {
                    dropSession(i, reason: noSlotReason)
                    return
                }
                let fd = slots[i].dataFD
                if withDevice("registering session \(a.sessionID)'s region", { try $0.addMemoryRegion(r, fd: fd) }) {
                    registered[i] = true
                }
            } else if var f = device.take() {
                let dmaEntry = VhostUserMemoryRegion(guestPhysicalAddress: config.dmaIOAddress, size: UInt64(dma.size),
                                                     userAddress: UInt64(UInt(bitPattern: dma.base)), mmapOffset: 0)
                do {
                    try setMemoryTable(&f, dmaEntry)
                    device = consume f
                } catch {
                    device = consume f
                    lose("registering session \(a.sessionID)'s region: \(error)")
                }
                let refused = overSlotLimit.contains(i)
                dropSessionsOverSlotLimit()
                if refused { return }
            }
        }
        try? manager.send(.attached(sessionID: a.sessionID))
    }

    func freeSessionSlot() -> Int? {
        for i in 0..<Self.maxSessions where !occupied[i] { return i }
        return nil
    }

    /// The manager revoked the session: no new requests; once nothing of it is at the
    /// device, its region leaves the device's table and the session is gone.
    mutating func detach(_ id: UInt64) {
        for i in 0..<Self.maxSessions where occupied[i] && slots[i].sessionID == id {
            detaching[i] = true
            try? epoll.remove(slots[i].requestBell.fd.raw)
            if sessionInFlight[i] == 0 || !connected {
                // Disconnected: the device that had its requests is gone; drop them.
                if !connected { dropRecords(of: i) }
                finishDetach(i)
            }
        }
    }

    mutating func dropRecords(of i: Int) {
        for k in 0..<Int(config.queueSize) where records[k].active && records[k].slot == i { release(k) }
        sessionInFlight[i] = 0
    }

    mutating func finishDetach(_ i: Int) {
        let id = slots[i].sessionID
        if connected && registered[i], memorySlots, let r = lastRegion(i) {
            _ = withDevice("removing session \(id)'s region") { try $0.removeMemoryRegion(r) }
        }
        page.clearInUse(slots[i].tableIndex)
        (slots + i).deinitialize(count: 1)
        completionBuffers[i].deallocate()
        completionBuffers[i] = UnsafeMutableBufferPointer(start: nil, count: 0)
        occupied[i] = false
        detaching[i] = false
        registered[i] = false
        try? manager.send(.detached(sessionID: id))
    }

    /// Runs one exchange with the device; a failure drops the connection (and asks for a
    /// new one). Returns whether it succeeded.
    mutating func withDevice(_ what: String, _ body: (inout VhostUserFrontend) throws -> Void) -> Bool {
        guard var f = device.take() else { return false }
        do {
            try body(&f)
            device = consume f
            return true
        } catch {
            device = consume f
            lose("\(what): \(error)")
            return false
        }
    }

    /// The region as it was registered (the table entry may already be revoking).
    func lastRegion(_ i: Int) -> VhostUserMemoryRegion? {
        guard let e = table.readPatiently(slots[i].tableIndex), e.sessionID == slots[i].sessionID else { return nil }
        return VhostUserMemoryRegion(guestPhysicalAddress: e.ioAddress.rawValue, size: UInt64(slots[i].data.size),
                                     userAddress: UInt64(UInt(bitPattern: slots[i].data.base)), mmapOffset: 0)
    }

    /// The client broke its queue protocol: tell the manager and stop serving it.
    mutating func dropSession(_ i: Int, reason: String) {
        let id = slots[i].sessionID
        try? manager.send(.sessionError(sessionID: id, reason: reason))
        detach(id)
    }

    // MARK: data path

    /// Takes requests from every session (a batch each, as far as the virtqueue has room),
    /// hands them to the device, publishes once and kicks if the device asked.
    mutating func serveSessions() -> Int {
        var total = 0
        let n = Self.maxSessions
        for step in 0..<n {
            let i = (nextSession + step) % n
            guard occupied[i], !detaching[i] else { continue }
            let room = min(Self.batch, freeRequestCount, vq.freeDescriptors / descriptorsPerRequest)
            if room == 0 { break }
            let got = slots[i].requests.dequeue(into: UnsafeMutableBufferPointer(rebasing: requestBuffer[0..<room]))
            if got == 0 {
                if let e = slots[i].failure { dropSession(i, reason: e.description) }
                continue
            }
            total += got
            let index = slots[i].tableIndex
            // In use before the translations are read (see DriverPage.markInUse).
            if sessionInFlight[i] == 0 { page.markInUse(index) }
            for k in 0..<got {
                if let status = start(requestBuffer[k], slot: i) {
                    completionBuffers[i][completionCounts[i]] = BlockCompletion(tag: requestBuffer[k].tag, status: status,
                                                                                generation: config.generation)
                    completionCounts[i] += 1
                }
            }
            if sessionInFlight[i] == 0 { page.clearInUse(index) }
        }
        nextSession = (nextSession + 1) % n
        if total > 0 {
            publish()
            flushCompletions()
        }
        return total
    }

    mutating func publish() {
        if connected, vq.publish() {
            try? kick.ring()
            page.add(.kicks)
        }
    }

    /// Validates a request and hands it to the device. Returns nil when it is on its way,
    /// or the status it ends with right now.
    mutating func start(_ r: BlockRequest, slot i: Int) -> BlockStatus? {
        if table.abortGeneration == config.generation {
            // Fault injection: die inside request handling, as a driver bug would.
            abort()
        }
        guard let op = BlockOp(rawValue: r.op) else { return .unsupported }
        let sector = UInt64(blockSectorSize)
        switch op {
        case .flush:
            // Without VIRTIO_BLK_F_FLUSH the device writes through (§5.2.5): nothing to do.
            if !flags.contains(.flush) { return .ok }
        case .read, .write, .discard, .writeZeroes:
            guard r.length > 0, UInt64(r.length) % sector == 0, r.sector <= blockCount,
                  UInt64(r.length) / sector <= blockCount - r.sector else { return .invalid }
            if op != .read && (!slots[i].writable || flags.contains(.readOnly)) { return .readOnly }
            if op.hasBuffer {
                guard r.length <= maxTransfer else { return .invalid }
            } else {
                let limit = op == .discard ? maxDiscardSectors : maxWriteZeroesSectors
                guard flags.contains(op == .discard ? .discard : .writeZeroes) else { return .unsupported }
                guard UInt64(r.length) / sector <= UInt64(limit == 0 ? UInt32.max : limit) else { return .invalid }
            }
        }
        guard freeRequestCount > 0 else { return .ioError }  // cannot happen: room was checked
        freeRequestCount -= 1
        let k = Int(freeRequestSlots[freeRequestCount])
        records[k] = InFlight(active: true, slot: i, request: r)
        sessionInFlight[i] += 1
        if let status = addChain(k) {
            release(k)
            return status
        }
        return nil
    }

    /// Builds request slot `k`'s chain (§5.2.6: header, data, status) and adds it to the
    /// virtqueue. The session's translation is checked here, right before the device gets
    /// the address, with the lease margin. Returns the status to end it with if it cannot go.
    mutating func addChain(_ k: Int) -> BlockStatus? {
        let r = records[k].request
        let i = records[k].slot
        guard let op = BlockOp(rawValue: r.op) else { return .unsupported }
        let headerOffset = requestAreaOffset + k * Self.requestBytes
        let statusOffset = statusAreaOffset + k
        let io = config.dmaIOAddress
        let type: UInt32
        switch op {
        case .read: type = VirtioBlkRequestType.read
        case .write: type = VirtioBlkRequestType.write
        case .flush: type = VirtioBlkRequestType.flush
        case .discard: type = VirtioBlkRequestType.discard
        case .writeZeroes: type = VirtioBlkRequestType.writeZeroes
        }
        (dma.base + headerOffset).storeBytes(of: VirtioBlkRequestHeader(type: type, sector: op == .flush ? 0 : r.sector),
                                             as: VirtioBlkRequestHeader.self)
        (dma.base + statusOffset).storeBytes(of: 0xFF, as: UInt8.self)
        chain[0] = VirtqBuffer(address: io + UInt64(headerOffset), length: 16, deviceWritable: false)
        var count = 1
        if op.hasBuffer {
            guard let entry = table.readPatiently(slots[i].tableIndex) else { return .revoked }
            let now = Clock.monotonicNanoseconds
            guard let address = entry.translate(sessionID: slots[i].sessionID, offset: r.offset, length: UInt64(r.length),
                                                write: op == .read, now: now &+ leaseMargin) else {
                return entry.state == .active && entry.sessionID == slots[i].sessionID && now &+ leaseMargin < entry.leaseEnd
                    ? .invalid : .revoked
            }
            // The device resolves the address through the region we registered, which is
            // our mapping: check against it as well as against the table.
            guard r.offset.rawValue <= UInt64(slots[i].data.size), UInt64(r.length) <= UInt64(slots[i].data.size) - r.offset.rawValue else {
                return .invalid
            }
            chain[1] = VirtqBuffer(address: address.rawValue, length: r.length, deviceWritable: op == .read)
            count = 2
        } else if op != .flush {
            let segment = VirtioBlkDiscardSegment(sector: r.sector, numSectors: r.length / UInt32(blockSectorSize), flags: 0)
            (dma.base + headerOffset + 16).storeBytes(of: segment, as: VirtioBlkDiscardSegment.self)
            chain[1] = VirtqBuffer(address: io + UInt64(headerOffset + 16), length: 16, deviceWritable: false)
            count = 2
        }
        chain[count] = VirtqBuffer(address: io + UInt64(statusOffset), length: 1, deviceWritable: true)
        count += 1
        guard connected else { return nil }  // recorded; goes to the device on reconnection
        do {
            let head = try vq.add(UnsafeBufferPointer(rebasing: chain[0..<count]))
            headToRequest[Int(head)] = UInt16(k)
            page.add(.submitted)
        } catch {
            return .ioError
        }
        return nil
    }

    /// Takes finished chains off the used ring and queues their completions.
    mutating func harvest() -> Int {
        var n = 0
        while let u = vq.popUsed() {
            let k = Int(headToRequest[Int(u.id)])
            guard k < Int(config.queueSize), records[k].active else { continue }
            // The device wrote the status byte: one read, then mapped; anything else than
            // the three defined values is the device's error.
            let raw = (dma.base + statusAreaOffset + k).load(as: UInt8.self)
            let status: BlockStatus
            switch raw {
            case VirtioBlkStatus.ok: status = .ok
            case VirtioBlkStatus.unsupported: status = .unsupported
            default: status = .ioError
            }
            finish(k, status: status)
            n += 1
        }
        if n > 0 {
            page.addCompleted(n)
            flushCompletions()
            clearIdleMarks()
            for i in 0..<Self.maxSessions where occupied[i] && detaching[i] && sessionInFlight[i] == 0 { finishDetach(i) }
        }
        return n
    }

    /// Request slot `k` ended with `status`: its completion is queued for its session.
    mutating func finish(_ k: Int, status: BlockStatus) {
        let i = records[k].slot
        if !detaching[i] {
            completionBuffers[i][completionCounts[i]] = BlockCompletion(tag: records[k].request.tag, status: status,
                                                                        generation: config.generation)
            completionCounts[i] += 1
        }
        release(k)
    }

    mutating func release(_ k: Int) {
        let i = records[k].slot
        records[k].active = false
        freeRequestSlots[freeRequestCount] = UInt16(k)
        freeRequestCount += 1
        sessionInFlight[i] -= 1
    }

    /// Clears the in-use marks of sessions with nothing left at the device.
    func clearIdleMarks() {
        for i in 0..<Self.maxSessions where occupied[i] && sessionInFlight[i] == 0 { page.clearInUse(slots[i].tableIndex) }
    }

    /// Publishes the queued completions, one batch (and at most one doorbell) per session.
    mutating func flushCompletions() {
        for i in 0..<Self.maxSessions where completionCounts[i] > 0 {
            let count = completionCounts[i]
            completionCounts[i] = 0
            guard occupied[i], !detaching[i] else { continue }
            let signals = slots[i].signalsSent
            let ok = slots[i].complete(UnsafeBufferPointer(rebasing: completionBuffers[i][0..<count]))
            page.add(.signals, slots[i].signalsSent &- signals)
            if !ok { dropSession(i, reason: slots[i].failure?.description ?? "completion queue full: client exceeded its queue depth") }
        }
    }
}
