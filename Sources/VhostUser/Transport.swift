import OutboardRings
import OutboardSystem
import SystemPackage
import Virtio

/// Virtio over vhost-user, frontend side: the device is a vhost-user backend process
/// (qemu-storage-daemon, DPDK's vhost PMD) reached through a socket the manager connected.
///
/// The link outlives connections: the kick and call eventfds (one pair per queue) are made
/// once, before the driver's sandbox is entered (its filter refuses eventfd2), and a new
/// connection is attached with `connect` after the old one was lost. What the device knows
/// (features, memory table, rings) belongs to one connection and is set up again on the next.
///
/// Mapping of the virtio 1.2 transport operations (vhost-user spec, "Starting and stopping
/// rings" and the message list), in the order QEMU's own frontend sends them:
/// - connect: SET_OWNER, GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES,
///   GET_MAX_MEM_SLOTS.
/// - readConfig: GET_CONFIG (needs the CONFIG protocol feature; §3.1.1 step 4 lets the
///   driver read the configuration space before it accepts features).
/// - FEATURES_OK: SET_FEATURES (with VHOST_USER_F_PROTOCOL_FEATURES kept on).
/// - expose / withdraw: ADD_MEM_REG / REM_MEM_REG with CONFIGURE_MEM_SLOTS, else the whole
///   table again with SET_MEM_TABLE (at most 8 regions).
/// - setUpQueue: SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL.
/// - enableQueue: SET_VRING_ENABLE.
/// - DRIVER_OK: nothing more (backends without the STATUS protocol feature start a ring
///   on its first kick once enabled).
/// - reset: GET_VRING_BASE on every ring set up (stops it); the memory table stays (as
///   `VirtioTransport.reset` promises); a new connection starts from an empty one.
///
/// Memory-slot accounting lives here and only here: every exposed region is remembered
/// exactly as it was sent, and withdrawn with exactly those fields, so the backend's table
/// and ours cannot drift apart whatever happened to the translation table meanwhile.
///
/// Addresses: the driver speaks IO addresses only. SET_VRING_ADDR takes the frontend's own
/// virtual addresses ("user addresses", which the backend resolves through the memory
/// table's userspace_addr); this transport derives them from the exposed region that holds
/// each ring, so no host pointer crosses the seam.
public struct VhostUserTransport: ~Copyable, VirtioTransport {
    /// Queues (vrings) this link has eventfds for.
    public let queueCapacity: Int
    @usableFromInline let kicks: UnsafeMutablePointer<Doorbell>
    let calls: UnsafeMutablePointer<Doorbell>
    var frontend: VhostUserFrontend?
    var regions: [Region] = []
    var ringsSetUp: [Bool]
    var driverFeatures: UInt64 = 0
    /// The backend's GET_FEATURES answer on this connection.
    var offeredFeatures: UInt64 = 0
    /// The connection's socket while it is usable, else -1.
    var socketFD: CInt = -1
    var statusBits: DeviceStatus = []
    /// How long one request to the backend may take.
    public var replyTimeoutMilliseconds: Int
    /// The backend offers CONFIGURE_MEM_SLOTS (regions one by one).
    public private(set) var memorySlots = false
    /// Regions the backend's table takes: GET_MAX_MEM_SLOTS, or 8 with SET_MEM_TABLE.
    public private(set) var memorySlotLimit = VhostUserMemoryTable.maxRegions
    /// The backend's protocol features, as offered on this connection.
    public private(set) var offeredProtocolFeatures: UInt64 = 0

    struct Region {
        var entry: VhostUserMemoryRegion
        var fd: CInt
    }

    /// Makes the link's eventfds (a kick and a call doorbell per queue). Call before the
    /// sandbox is entered.
    public init(queues: Int, replyTimeoutMilliseconds: Int = 100) throws(Errno) {
        precondition(queues >= 1 && queues <= 256, "vhost-user vring indices have 8 bits")
        kicks = .allocate(capacity: queues)
        calls = .allocate(capacity: queues)
        var made = 0
        do {
            while made < queues {
                let k = try Doorbell()
                let c = try Doorbell()
                (kicks + made).initialize(to: k)
                (calls + made).initialize(to: c)
                made += 1
            }
        } catch {
            kicks.deinitialize(count: made)
            calls.deinitialize(count: made)
            kicks.deallocate()
            calls.deallocate()
            throw error
        }
        queueCapacity = queues
        ringsSetUp = Array(repeating: false, count: queues)
        self.replyTimeoutMilliseconds = replyTimeoutMilliseconds
    }

    deinit {
        kicks.deinitialize(count: queueCapacity)
        calls.deinitialize(count: queueCapacity)
        kicks.deallocate()
        calls.deallocate()
    }

    /// Whether a connection is attached and has not failed.
    public var isConnected: Bool { socketFD >= 0 }

    /// Attaches a fresh connection to the backend and runs the session-level handshake.
    /// Whatever the previous connection had set up is forgotten (the backend that had it
    /// is gone). On failure the connection is dropped.
    public mutating func connect(_ socket: consuming OwnedFD) throws(VirtioTransportError) {
        disconnect()
        var f = VhostUserFrontend(socket: socket, replyTimeoutMilliseconds: replyTimeoutMilliseconds)
        do throws(VhostUserError) {
            try f.setOwner()
            let offered = try f.getFeatures()
            guard offered & VhostUserFeature.protocolFeatures != 0 else {
                throw VhostUserError.unsupported("the backend does not offer PROTOCOL_FEATURES")
            }
            let offeredProtocol = try f.getProtocolFeatures()
            let wanted = VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.config
                | VhostUserProtocolFeature.configureMemSlots | VhostUserProtocolFeature.multiQueue
            try f.setProtocolFeatures(offeredProtocol & wanted)
            offeredProtocolFeatures = offeredProtocol
            offeredFeatures = offered
            memorySlots = offeredProtocol & VhostUserProtocolFeature.configureMemSlots != 0
            if memorySlots {
                let slots = try f.getMaxMemSlots()
                guard slots >= 1 else { throw VhostUserError.unsupported("the backend has no memory slots") }
                memorySlotLimit = Int(clamping: slots)
            } else {
                memorySlotLimit = VhostUserMemoryTable.maxRegions
            }
        } catch {
            throw Self.classify(error)
        }
        socketFD = f.fd
        frontend = consume f
    }

    /// Drops the connection (closing the socket). The eventfds stay.
    public mutating func disconnect() {
        frontend = nil
        socketFD = -1
        offeredFeatures = 0
        regions.removeAll()
        for i in 0..<queueCapacity { ringsSetUp[i] = false }
        driverFeatures = 0
        statusBits = []
    }

    static func classify(_ e: VhostUserError) -> VirtioTransportError {
        if e.shouldReconnect || e == .system(.brokenPipe) { return .disconnected(e.description) }
        if case .unsupported = e { return .unsupported(e.description) }
        return .refused(e.description)
    }

    mutating func withFrontend<R>(_ body: (inout VhostUserFrontend) throws(VhostUserError) -> R) throws(VirtioTransportError) -> R {
        guard var f = frontend.take() else { throw .disconnected("no connection to the device") }
        do {
            let r = try body(&f)
            frontend = consume f
            return r
        } catch {
            let broken = f.failure != nil
            frontend = consume f
            if broken {
                frontend = nil
                socketFD = -1
            }
            throw Self.classify(error)
        }
    }

    // MARK: features and status

    /// None: the backend reaches memory through the memory table, not an IOMMU.
    public var transportFeatures: UInt64 { 0 }

    public mutating func deviceFeatures() throws(VirtioTransportError) -> UInt64 {
        guard isConnected else { throw .disconnected("no connection to the device") }
        let offered = offeredFeatures
        // Bit 30 is vhost-user's own (VHOST_USER_F_PROTOCOL_FEATURES), not a device feature.
        return offered & ~VhostUserFeature.protocolFeatures
    }

    public mutating func setDriverFeatures(_ features: UInt64) throws(VirtioTransportError) {
        let offered = try deviceFeatures()
        guard features & ~offered == 0 else {
            throw .refused("features 0x\(String(features & ~offered, radix: 16)) were not offered")
        }
        driverFeatures = features
    }

    public mutating func status() throws(VirtioTransportError) -> DeviceStatus {
        guard isConnected else { throw .disconnected("no connection to the device") }
        return statusBits
    }

    public mutating func setStatus(_ status: DeviceStatus) throws(VirtioTransportError) {
        let new = status.subtracting(statusBits)
        if new.contains(.featuresOK) {
            let f = driverFeatures | VhostUserFeature.protocolFeatures
            try withFrontend { (fe) throws(VhostUserError) in try fe.setFeatures(f) }
        }
        statusBits.formUnion(status)
    }

    public mutating func reset() throws(VirtioTransportError) {
        for i in 0..<queueCapacity where ringsSetUp[i] {
            let index = UInt32(i)
            _ = try withFrontend { (fe) throws(VhostUserError) in try fe.getVringBase(index) }
            ringsSetUp[i] = false
        }
        statusBits = []
    }

    // MARK: configuration space

    public var hasConfigSpace: Bool { offeredProtocolFeatures & VhostUserProtocolFeature.config != 0 }

    public mutating func readConfig(offset: Int, count: Int) throws(VirtioTransportError) -> [UInt8] {
        guard hasConfigSpace else { throw .refused("the backend offers no configuration space (CONFIG)") }
        guard offset >= 0, count > 0, offset <= 256 - count else { throw .refused("config read \(offset)+\(count)") }
        // qemu-storage-daemon 7.2 ignores the offset and answers from 0: read from 0, cut here.
        let all = try withFrontend { (fe) throws(VhostUserError) in
            try fe.getConfig(offset: 0, size: UInt32(offset + count))
        }
        guard all.count == offset + count else { throw .disconnected("GET_CONFIG answered \(all.count) bytes") }
        return Array(all[offset...])
    }

    // MARK: queues

    public mutating func queueCount() throws(VirtioTransportError) -> Int {
        guard offeredProtocolFeatures & VhostUserProtocolFeature.multiQueue != 0 else { return 1 }
        let n = try withFrontend { (fe) throws(VhostUserError) in try fe.getQueueNum() }
        return Int(clamping: n)
    }

    public mutating func setUpQueue(_ index: Int, size: Int, at a: QueueAddresses) throws(VirtioTransportError) {
        guard index >= 0, index < queueCapacity else { throw .refused("queue \(index): this link has \(queueCapacity)") }
        guard let d = userAddress(a.descriptors), let avail = userAddress(a.driverArea), let used = userAddress(a.deviceArea) else {
            throw .refused("queue \(index)'s rings are not in exposed memory")
        }
        let i = UInt32(index)
        let kick = kicks[index].fd.raw.rawValue
        let call = calls[index].fd.raw.rawValue
        try withFrontend { (fe) throws(VhostUserError) in
            try fe.setVringNum(i, UInt32(size))
            try fe.setVringBase(i, 0)
            try fe.setVringAddr(i, descriptors: d, used: used, avail: avail)
            try fe.setVringKick(i, fd: kick)
            try fe.setVringCall(i, fd: call)
        }
        ringsSetUp[index] = true
    }

    public mutating func enableQueue(_ index: Int) throws(VirtioTransportError) {
        guard index >= 0, index < queueCapacity, ringsSetUp[index] else { throw .refused("queue \(index) is not set up") }
        let i = UInt32(index)
        try withFrontend { (fe) throws(VhostUserError) in try fe.setVringEnable(i, true) }
    }

    /// The frontend's address of `io`, through the exposed region that holds it.
    func userAddress(_ io: IOAddress) -> UInt64? {
        for r in regions where io.rawValue >= r.entry.guestPhysicalAddress
            && io.rawValue - r.entry.guestPhysicalAddress < r.entry.size {
            return r.entry.userAddress + (io.rawValue - r.entry.guestPhysicalAddress)
        }
        return nil
    }

    // MARK: notifications (data path)

    @inlinable
    public func notify(_ index: Int) {
        // An eventfd write cannot block with the counter far from its limit; a failure
        // means the descriptor is gone, which only a bug does.
        try? kicks[index].ring()
    }

    public func interruptDescriptor(_ index: Int) -> CInt { calls[index].fd.raw.rawValue }

    public var connectionDescriptor: CInt { socketFD }
    /// None: a vhost-user backend that cannot go on closes the connection instead.
    public var configChangeDescriptor: CInt { -1 }

    // MARK: memory

    public var memoryRegionLimit: Int? { memorySlotLimit }
    public var exposedRegionCount: Int { regions.count }

    public mutating func expose(_ m: DeviceMemory) throws(VirtioTransportError) {
        guard isConnected else { throw .disconnected("no connection to the device") }
        guard !regions.contains(where: { $0.entry.guestPhysicalAddress == m.ioAddress.rawValue }) else {
            throw .refused("a region at \(m.ioAddress) is exposed already")
        }
        guard regions.count < memorySlotLimit else { throw .noMemorySlot(limit: memorySlotLimit) }
        let entry = VhostUserMemoryRegion(guestPhysicalAddress: m.ioAddress.rawValue, size: UInt64(m.size),
                                          userAddress: UInt64(UInt(bitPattern: m.base)), mmapOffset: 0)
        let region = Region(entry: entry, fd: m.fd)
        if memorySlots {
            try withFrontend { (fe) throws(VhostUserError) in try fe.addMemoryRegion(entry, fd: m.fd) }
            regions.append(region)
        } else {
            regions.append(region)
            do { try sendTable() } catch {
                regions.removeLast()
                throw error
            }
        }
    }

    public mutating func withdraw(_ io: IOAddress) throws(VirtioTransportError) {
        guard let k = regions.firstIndex(where: { $0.entry.guestPhysicalAddress == io.rawValue }) else {
            throw .refused("no region is exposed at \(io)")
        }
        let region = regions.remove(at: k)
        guard isConnected else { return }  // the backend that had it is gone
        if memorySlots {
            // Exactly the entry ADD_MEM_REG carried (the backend matches gpa, size and user
            // address).
            let entry = region.entry
            try withFrontend { (fe) throws(VhostUserError) in try fe.removeMemoryRegion(entry) }
        } else {
            try sendTable()
        }
    }

    mutating func sendTable() throws(VirtioTransportError) {
        let entries = regions.map(\.entry)
        let fds = regions.map(\.fd)
        try withFrontend { (fe) throws(VhostUserError) in try fe.setMemTable(entries, fds: fds) }
    }
}
