import CLinux
import OutboardRings
import OutboardSession
import OutboardSystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The test block driver. Its "device" is a memory region the manager owns, so the
/// device's contents survive driver restarts as a real disk's do. It serves block sessions
/// through the whole path (client queues -> translation table -> "DMA" into the device)
/// and is what the manager's supervision, revocation and fault tests run against before
/// the virtio drivers exist.
///
/// The process is already sandboxed when `run` is called; it holds only the socket to
/// the manager and what the manager sends on it.
public struct MemBlockDriver: ~Copyable {
    public static let maxSessions = 64
    static let batch = 32

    let manager: UnixSocket
    let config: DriverStart
    let page: DriverPage
    let table: TranslationTable
    let pageMapping: SharedMapping
    let tableMapping: SharedMapping
    let device: SharedMapping
    let epoll: Epoll
    let slots: UnsafeMutablePointer<BlockServerEndpoint>
    var occupied: [Bool]
    var slotCount = 0
    let requestBuffer: UnsafeMutableBufferPointer<BlockRequest>
    let completionBuffer: UnsafeMutableBufferPointer<BlockCompletion>
    var exitRequested = false
    var events = EpollEvents(capacity: 64)

    /// Receives DriverStart from the manager, maps the driver page, the translation table
    /// (read-only) and the device, and reports ready with the sandbox probe results.
    /// `epoll`: a fresh epoll set, made before the sandbox was entered.
    public static func start(manager: consuming UnixSocket, epoll ep: consuming Epoll, probes: [String]) throws(DriverError) -> MemBlockDriver {
        var start: ControlDelivery
        do { start = try manager.receiveControl() } catch { throw .setup("no start message: \(error)") }
        guard case .driverStart(let cfg) = start.message else { throw .setup("expected driverStart, got \(start.message.type)") }
        guard case .memory = cfg.transport else { throw .setup("the memory driver cannot serve transport \(cfg.transport)") }
        guard cfg.tableCapacity >= 1, cfg.tableCapacity <= 4096, cfg.blockSize == UInt32(blockSectorSize),
              cfg.maxTransfer > 0, cfg.maxTransfer % UInt32(blockSectorSize) == 0,
              cfg.heartbeatIntervalMs >= 1 else {
            throw .setup("bad start parameters \(cfg)")
        }
        let capacity = Int(cfg.tableCapacity)
        let deviceBytes = cfg.blockCount.multipliedReportingOverflow(by: UInt64(blockSectorSize))
        guard !deviceBytes.overflow, deviceBytes.partialValue <= UInt64(Int.max / 2) else { throw .setup("device size overflows") }
        let pm = try mapRegion(start.take(0), DriverPage.byteCount(tableCapacity: capacity), .readWrite, "driver page")
        let tm = try mapRegion(start.take(1), TranslationTable.byteCount(capacity: capacity), .readOnly, "translation table")
        let dm = try mapRegion(start.take(2), Int(deviceBytes.partialValue), .readWrite, "device memory")
        try watchManager(manager, on: ep)
        do {
            try manager.send(.driverReady(pid: getpid(), probes: probes))
        } catch {
            throw .setup("cannot report ready: \(error)")
        }
        return MemBlockDriver(manager: manager, config: cfg, pageMapping: pm, tableMapping: tm, device: dm, epoll: ep)
    }

    init(manager: consuming UnixSocket, config: DriverStart, pageMapping: consuming SharedMapping,
         tableMapping: consuming SharedMapping, device: consuming SharedMapping, epoll: consuming Epoll) {
        let capacity = Int(config.tableCapacity)
        page = DriverPage(pageMapping.base, tableCapacity: capacity)
        table = TranslationTable(tableMapping.base, capacity: capacity)
        self.pageMapping = pageMapping
        self.tableMapping = tableMapping
        self.device = device
        self.epoll = epoll
        self.manager = manager
        self.config = config
        slots = .allocate(capacity: Self.maxSessions)
        occupied = Array(repeating: false, count: Self.maxSessions)
        requestBuffer = .allocate(capacity: Self.batch)
        completionBuffer = .allocate(capacity: Self.batch)
    }

    deinit {
        for i in 0..<Self.maxSessions where occupied[i] { (slots + i).deinitialize(count: 1) }
        slots.deallocate()
        requestBuffer.deallocate()
        completionBuffer.deallocate()
    }

    /// Serves until the manager closes the socket (then returns) or a fatal error.
    public mutating func run() throws(DriverError) {
        var spins = 0
        while !exitRequested {
            page.beat()
            var work = 0
            for i in 0..<Self.maxSessions where occupied[i] { work += serve(slot: i) }
            if work > 0 {
                spins += 1
                // Under load, look at the manager socket now and then without sleeping.
                if spins & 63 == 0 { try pollManager(timeoutMs: 0) }
                continue
            }
            // Idle: ask every client for a doorbell, double-check, then sleep.
            var sleep = true
            for i in 0..<Self.maxSessions where occupied[i] {
                if !slots[i].requests.prepareToSleep() && !slots[i].requests.hasFailed { sleep = false }
            }
            if sleep {
                try pollManager(timeoutMs: Int(max(1, config.heartbeatIntervalMs / 2)))
            }
            for i in 0..<Self.maxSessions where occupied[i] { slots[i].requests.cancelSignal() }
        }
    }

    mutating func pollManager(timeoutMs: Int) throws(DriverError) {
        let n: Int
        do { n = try epoll.wait(into: &events, timeoutMilliseconds: timeoutMs) } catch { throw .fatal("epoll: \(error)") }
        for k in 0..<n {
            let token = events.token(k)
            if token == 0 {
                try handleManagerMessages()
            } else {
                let i = Int(token - 1)
                if i < Self.maxSessions, occupied[i] { _ = try? slots[i].requestBell.drain() }
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
                try? manager.send(.detached(sessionID: id))
            default:
                throw .fatal("unexpected message from manager: \(d.message.type)")
            }
        }
    }

    mutating func attach(_ a: Attach, _ d: inout ControlDelivery) {
        guard let i = occupied.firstIndex(of: false), a.tableIndex < config.tableCapacity else {
            try? manager.send(.sessionError(sessionID: a.sessionID, reason: "driver has no room for another session"))
            return
        }
        do {
            let ep = try BlockServerEndpoint(a, queues: d.take(0), data: d.take(1), requestBell: d.take(2), completionBell: d.take(3))
            try epoll.add(ep.requestBell.fd.raw, events: .readable, token: UInt64(i + 1))
            (slots + i).initialize(to: ep)
            occupied[i] = true
            slotCount += 1
            try? manager.send(.attached(sessionID: a.sessionID))
        } catch {
            try? manager.send(.sessionError(sessionID: a.sessionID, reason: "cannot attach: \(error)"))
        }
    }

    mutating func detach(_ id: UInt64) {
        for i in 0..<Self.maxSessions where occupied[i] && slots[i].sessionID == id {
            try? epoll.remove(slots[i].requestBell.fd.raw)
            page.clearInUse(slots[i].tableIndex)
            (slots + i).deinitialize(count: 1)
            occupied[i] = false
            slotCount -= 1
        }
    }

    /// Serves one batch of one session. Returns the number of requests handled.
    mutating func serve(slot i: Int) -> Int {
        let n = slots[i].requests.dequeue(into: requestBuffer)
        if n == 0 {
            if let e = slots[i].failure { failSession(i, e.description) }
            return 0
        }
        let index = slots[i].tableIndex
        // Mark the region in use, then read its translation: the manager marks an entry
        // revoking before it reads our mark, so either it sees the mark and waits, or we
        // see the revocation here.
        page.markInUse(index)
        for k in 0..<n {
            let r = requestBuffer[k]
            let status = handle(r, slot: i)
            completionBuffer[k] = BlockCompletion(tag: r.tag, status: status, generation: config.generation)
        }
        page.clearInUse(index)
        let signals = slots[i].signalsSent
        defer { page.add(.signals, slots[i].signalsSent &- signals) }
        if !slots[i].complete(UnsafeBufferPointer(rebasing: completionBuffer[0..<n])) {
            failSession(i, slots[i].failure?.description ?? "completion queue full: client exceeded its queue depth")
        }
        page.addCompleted(n)
        return n
    }

    func handle(_ r: BlockRequest, slot i: Int) -> BlockStatus {
        if table.abortGeneration == config.generation {
            // Fault injection: die inside request handling, as a driver bug would.
            abort()
        }
        guard let op = BlockOp(rawValue: r.op) else { return .unsupported }
        if op == .flush { return .ok }
        let sector = UInt64(blockSectorSize)
        guard r.length > 0, r.length <= config.maxTransfer, UInt64(r.length) % sector == 0,
              r.sector <= config.blockCount, UInt64(r.length) / sector <= config.blockCount - r.sector else {
            return .invalid
        }
        if op == .write && !slots[i].writable { return .readOnly }
        // The device's own time first; the translation is checked after it, right before
        // the transfer, so a lease that ends meanwhile is seen.
        if config.latencyMicroseconds > 0 { emulateLatency() }
        // Translate (session region, offset) to an IO address: the device writes into the
        // client's buffer on a read.
        guard let entry = table.readPatiently(slots[i].tableIndex) else { return .revoked }
        let now = Clock.monotonicNanoseconds
        guard let io = entry.translate(sessionID: slots[i].sessionID, offset: r.offset, length: UInt64(r.length),
                                       write: op == .read, now: now &+ leaseMargin) else {
            return entry.state == .active && entry.sessionID == slots[i].sessionID && now &+ leaseMargin < entry.leaseEnd
                ? .invalid : .revoked
        }
        // "DMA": the IO address resolves to our mapping of that region. Check against the
        // mapping as well as the table: the table is the manager's, the mapping is real.
        let regionOffset = io.rawValue &- entry.ioAddress.rawValue
        guard regionOffset <= UInt64(slots[i].data.size), UInt64(r.length) <= UInt64(slots[i].data.size) - regionOffset else {
            return .invalid
        }
        let buffer = slots[i].data.base + Int(regionOffset)
        let disk = device.base + Int(r.sector * sector)
        if op == .read {
            buffer.copyMemory(from: disk, byteCount: Int(r.length))
        } else {
            disk.copyMemory(from: buffer, byteCount: Int(r.length))
        }
        return .ok
    }

    /// Device latency, in slices short enough to keep the heartbeat going: a slow device
    /// is not a hung driver.
    func emulateLatency() {
        var left = Int(config.latencyMicroseconds)
        let slice = max(1000, Int(config.heartbeatIntervalMs) * 250)
        while left > 0 {
            let step = min(left, slice)
            usleep(UInt32(step))
            left -= step
            page.beat()
        }
    }

    mutating func failSession(_ i: Int, _ reason: String) {
        let id = slots[i].sessionID
        try? manager.send(.sessionError(sessionID: id, reason: reason))
        detach(id)
    }
}
