import CLinux
import Logging
import OutboardRings
import OutboardSession
import OutboardSystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A device and everything the manager keeps for it across driver restarts: its memory
/// (the "hardware" of the test block driver), its translation table, its sessions.
final class DeviceState {
    let index: Int
    let config: ManagerConfig.DeviceConfig
    let memory: SharedRegion
    let tableRegion: SharedRegion
    let tableMapping: SharedMapping
    let table: TranslationTable
    var tableSlots: [UInt64?]
    var generation: UInt64 = 1
    var driver: DriverProcess?
    var state: State = .starting
    var consecutiveFailures = 0
    var failures = 0
    var restarts = 0
    var lastFailure: String?
    var sessions: [UInt64: Session] = [:]
    var registeredBytes: UInt64 = 0
    var nextIOAddress: UInt64 = 1 << 32
    var revokedIdle = 0
    var revokedAtLeaseEnd = 0
    var probes: [String] = []
    /// Virtio devices: what the driver found the device to be (nil until the first
    /// negotiation), and the connection the manager keeps handing the driver.
    var info: DeviceInfo?
    var deviceConnected = false
    /// The current driver wants a (new) device connection; retried at `connectRetryAt`.
    var wantsConnection = false
    var connectRetryAt: UInt64 = 0
    var connectAttempts: UInt64 = 0
    var connectionsMade: UInt64 = 0
    var deviceLosses = 0
    var lastDeviceError: String?

    enum State: CustomStringConvertible {
        case starting, running, backoff(until: UInt64), failed
        var description: String {
            switch self {
            case .starting: return "starting"
            case .running: return "running"
            case .backoff: return "restarting"
            case .failed: return "failed"
            }
        }
    }

    var name: String { config.name }
    var isVirtio: Bool { config.driver == "virtio-blk" }
    /// The device as clients see it; nil while a virtio device has never been reached.
    var blockCount: UInt64? { isVirtio ? info?.blockCount : config.sizeMib << 20 / UInt64(blockSectorSize) }
    var deviceFlags: DeviceFlags { isVirtio ? info?.flags ?? [] : [.flush] }
    func maxTransfer(limit: UInt32) -> UInt32 { min(limit, isVirtio ? info?.maxTransfer ?? limit : limit) }
    /// Driver memory of virtio drivers (rings, request headers, status bytes), registered
    /// with the device at `dmaIOAddress`; session regions get IO addresses from 4 GiB up.
    static let virtioDMABytes = 1 << 20
    static let dmaIOAddress: UInt64 = 1 << 20

    init(index: Int, config: ManagerConfig.DeviceConfig) throws {
        self.index = index
        self.config = config
        // memblock: the device itself. virtio: the driver's DMA memory (rings, headers).
        memory = try SharedRegion(name: "outboard-\(config.name)-memory",
                                  size: config.driver == "virtio-blk" ? DeviceState.virtioDMABytes : Int(config.sizeMib << 20))
        let capacity = Int(config.limits.maxSessions)
        tableRegion = try SharedRegion(name: "outboard-\(config.name)-table", size: TranslationTable.byteCount(capacity: capacity))
        tableMapping = try tableRegion.map(.readWrite)
        // From here on nobody can map the table writable: the driver gets it read-only.
        try tableRegion.sealFutureWrites()
        table = TranslationTable(tableMapping.base, capacity: capacity)
        table.format(generation: generation)
        tableSlots = Array(repeating: nil, count: capacity)
    }

    /// IO addresses: each registered region gets its own range, 2 MiB aligned, with a
    /// gap, so an address never belongs to two regions (an IOVA allocator in miniature;
    /// the vhost-user and VFIO transports assign theirs the same way).
    func allocateIOAddress(_ bytes: UInt64) -> UInt64 {
        let a = nextIOAddress
        nextIOAddress += ((bytes + (2 << 20) - 1) & ~((2 << 20) - 1)) + (2 << 20)
        return a
    }
}

/// One driver process: the child, its control socket and its driver page.
final class DriverProcess {
    var child: ChildProcess
    let socket: UnixSocket
    let pageRegion: SharedRegion
    let pageMapping: SharedMapping
    let page: DriverPage
    let startedAt: UInt64
    var ready = false
    var readyAt: UInt64 = 0
    var healthy = false
    var lastBeat: UInt64 = 0
    var lastBeatAt: UInt64
    /// Set when the manager killed it (hang, protocol violation): the reason it died.
    var killReason: String?
    var socketClosedAt: UInt64?

    /// RLIMIT_NOFILE a driver needs for `sessions` sessions: stdio, the manager socket,
    /// epoll, its own regions and doorbells, the device connection (16 in all, with room to
    /// spare), and per session the 4 descriptors of an attach (queues, data, two doorbells),
    /// which it may keep (a virtio driver keeps the data region's to register it again).
    static func descriptorsNeeded(sessions: Int) -> UInt64 {
        UInt64(16 + 4 * max(sessions, 0))
    }

    init(device d: DeviceState, executable: String, uid: UInt32, gid: UInt32, sandbox: ManagerConfig.SandboxConfig,
         logger: Logger) throws {
        let capacity = d.tableSlots.count
        pageRegion = try SharedRegion(name: "outboard-\(d.name)-driver", size: DriverPage.byteCount(tableCapacity: capacity))
        pageMapping = try pageRegion.map(.readWrite)
        page = DriverPage(pageMapping.base, tableCapacity: capacity)
        let pair = try UnixSocket.pair()
        // Enough descriptors for every session the device may have: a driver that ran out
        // would lose the descriptors of an attach in flight (the kernel truncates
        // SCM_RIGHTS) and could only exit, and every restart would hit the same wall.
        let openFiles = max(sandbox.maxOpenFiles, Self.descriptorsNeeded(sessions: Int(d.config.limits.maxSessions)))
        var args = ["_driver", "--kind", d.config.driver, "--device", d.name, "--uid", "\(uid)", "--gid", "\(gid)",
                    "--max-open-files", "\(openFiles)"]
        if !sandbox.namespaces { args.append("--no-namespaces") }
        if d.config.probeSandbox { args.append("--probe-sandbox") }
        if d.config.testExitAtStart { args.append("--test-exit-at-start") }
        // A crashing driver should die at once: no backtracer (it would try to exec a helper
        // the sandbox forbids, and slow every restart).
        let env = ["SWIFT_BACKTRACE=enable=no", "PATH=/usr/bin:/bin"]
        let second = pair.second
        child = try ChildProcess(executable: executable, arguments: args, descriptors: [(second.fd.raw, 3)], environment: env)
        socket = pair.first
        startedAt = Clock.monotonicNanoseconds
        lastBeatAt = startedAt
    }
}

/// A block session: the manager owns every region and doorbell, so a restarted driver
/// gets the same session back.
final class Session {
    let id: UInt64
    let connection: UInt64
    let credentials: PeerCredentials
    let writable: Bool
    let queueDepth: UInt32
    let dataBytes: UInt64
    let header: SharedRegion
    let headerMapping: SharedMapping
    let headerPage: SessionHeaderPage
    var queues: SharedRegion
    let data: SharedRegion
    let requestBell: Doorbell
    let completionBell: Doorbell
    let tableIndex: Int
    let ioAddress: UInt64
    let deviceName: String
    var leaseEnd: UInt64 = 0
    var attachSent = false
    var revokingSince: UInt64?

    init(id: UInt64, device: DeviceState, connection: UInt64, credentials: PeerCredentials, writable: Bool,
         queueDepth: UInt32, dataBytes: UInt64, tableIndex: Int, ioAddress: UInt64, generation: UInt64) throws {
        self.id = id
        self.connection = connection
        self.credentials = credentials
        self.writable = writable
        self.queueDepth = queueDepth
        self.dataBytes = dataBytes
        self.tableIndex = tableIndex
        self.ioAddress = ioAddress
        self.deviceName = device.name
        header = try SharedRegion(name: "outboard-session-\(id)-header", size: SessionHeaderPage.byteCount)
        headerMapping = try header.map(.readWrite)
        try header.sealFutureWrites()
        headerPage = SessionHeaderPage(headerMapping.base)
        queues = try Session.makeQueues(id: id, depth: queueDepth)
        data = try SharedRegion(name: "outboard-session-\(id)-data", size: Int(dataBytes))
        requestBell = try Doorbell()
        completionBell = try Doorbell()
        let driverUp: Bool
        if case .running = device.state { driverUp = true } else { driverUp = false }
        publish(generation: generation, state: driverUp ? .serving : .recovering)
    }

    static func makeQueues(id: UInt64, depth: UInt32) throws -> SharedRegion {
        let layout = try BlockQueueLayout(queueDepth: Int(depth))
        let region = try SharedRegion(name: "outboard-session-\(id)-queues", size: layout.byteCount)
        let m = try region.map(.readWrite)
        try layout.initialize(memory: m.base, size: m.size)
        return region
    }

    func replaceQueues() throws {
        queues = try Session.makeQueues(id: id, depth: queueDepth)
    }

    func publish(generation: UInt64, state: SessionState) {
        headerPage.publish(generation: generation, state: state)
    }

    func translationEntry(state: TranslationTable.EntryState) -> TranslationTable.Entry {
        // Block sessions: the device writes into the client's buffers on reads.
        TranslationTable.Entry(state: state, sessionID: id, ioAddress: ioAddress, length: dataBytes, leaseEnd: leaseEnd, writable: true)
    }
}
