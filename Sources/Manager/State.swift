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
    var ioAddresses = IOAddressAllocator()
    var revokedIdle = 0
    var revokedAtLeaseEnd = 0
    var probes: [String] = []
    /// How the manager links the device to its driver (one case per transport).
    let link: DeviceLink
    /// What the driver found the device to be at its last negotiation (devices that report
    /// themselves; nil until the first).
    var reported: ClassInfo?
    /// Why the device cannot be reached, while it cannot.
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

    /// The device as sessions see it: from the config for a memory device, as reported for
    /// one that reports itself (nil until it has).
    var classInfo: ClassInfo? {
        switch config.transport {
        case .memory:
            let limit = config.limits.maxTransferBytes
            switch config.deviceClass {
            case .block:
                return .block(BlockInfo(blockSize: UInt32(blockSectorSize), blockCount: config.sizeMib << 20 / UInt64(blockSectorSize),
                                        maxTransfer: limit, flags: [.flush]))
            }
        case .vhostUser:
            return reported
        }
    }

    /// The class info a session is given: the device's, with the manager's transfer limit.
    func sessionInfo() -> ClassInfo? {
        switch classInfo {
        case .block(var b)?:
            b.maxTransfer = min(b.maxTransfer, config.limits.maxTransferBytes)
            return .block(b)
        case nil:
            return nil
        }
    }

    /// What the driver is told of the device's class at start.
    var classParameters: ClassParameters {
        switch config.deviceClass {
        case .block:
            let blockCount: UInt64
            if case .block(let b)? = classInfo { blockCount = b.blockCount } else { blockCount = 0 }
            return .block(BlockParameters(blockSize: UInt32(blockSectorSize), blockCount: blockCount,
                                          maxTransfer: config.limits.maxTransferBytes))
        }
    }

    /// Driver memory of virtio drivers (rings, request headers, status bytes), registered
    /// with the device at `dmaIOAddress`; session regions get IO addresses from 4 GiB up
    /// (IOAddressAllocator), so the two never meet.
    static let virtioDMABytes = 1 << 20
    static let dmaIOAddress = IOAddress(rawValue: 1 << 20)

    init(index: Int, config: ManagerConfig.DeviceConfig) throws {
        self.index = index
        self.config = config
        // Memory transport: the device itself. Vhost-user: the driver's DMA memory (rings,
        // headers), which the driver registers with the device.
        switch config.transport {
        case .memory:
            memory = try SharedRegion(name: "outboard-\(config.name)-memory", size: Int(config.sizeMib << 20))
            link = .memory
        case .vhostUser:
            memory = try SharedRegion(name: "outboard-\(config.name)-memory", size: DeviceState.virtioDMABytes)
            link = .vhostUser(VhostUserLink(path: config.socket ?? "", reconnectMs: config.reconnectMs))
        }
        let capacity = Int(config.limits.maxSessions)
        tableRegion = try SharedRegion(name: "outboard-\(config.name)-table", size: TranslationTable.byteCount(capacity: capacity))
        tableMapping = try tableRegion.map(.readWrite)
        // From here on nobody can map the table writable: the driver gets it read-only.
        try tableRegion.sealFutureWrites()
        table = TranslationTable(tableMapping.base, capacity: capacity)
        table.format(generation: generation)
        tableSlots = Array(repeating: nil, count: capacity)
    }

}

/// IO addresses for session regions: each registered region gets its own range, 2 MiB
/// aligned, with a gap, so an address never belongs to two regions (an IOVA allocator in
/// miniature; the vhost-user and VFIO transports assign theirs the same way). Addresses are
/// not reused: 2^64 bytes of address space outlast any session churn.
struct IOAddressAllocator {
    static let first = IOAddress(rawValue: 1 << 32)
    static let granule: UInt64 = 2 << 20
    var next = IOAddressAllocator.first

    mutating func allocate(_ bytes: UInt64) -> IOAddress {
        let a = next
        next = next.advanced(by: Int(((bytes + Self.granule - 1) & ~(Self.granule - 1)) + Self.granule))
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
        var args = ["_driver", "--transport", d.config.transport.rawValue, "--class", d.config.deviceClass.description,
                    "--device", d.name, "--uid", "\(uid)", "--gid", "\(gid)",
                    "--max-open-files", "\(openFiles)"]
        if !sandbox.namespaces { args.append("--no-namespaces") }
        if d.config.probeSandbox { args.append("--probe-sandbox") }
        if d.config.testExitAtStart { args.append("--test-exit-at-start") }
        if let r = d.config.testExitRecovery { args += ["--test-exit-recovery", r] }
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

/// A session: the manager owns every region and doorbell (SessionResources), so a
/// restarted driver gets the same session back.
final class Session {
    let id: UInt64
    let connection: UInt64
    let credentials: PeerCredentials
    let writable: Bool
    let queueDepth: UInt32
    let dataBytes: UInt64
    var resources: SessionResources
    let tableIndex: Int
    let ioAddress: IOAddress
    let deviceName: String
    var leaseEnd: UInt64 = 0
    var attachSent = false
    var revokingSince: UInt64?

    init(id: UInt64, device: DeviceState, connection: UInt64, credentials: PeerCredentials, writable: Bool,
         queueDepth: UInt32, dataBytes: UInt64, tableIndex: Int, ioAddress: IOAddress, generation: UInt64) throws(SessionSetupError) {
        self.id = id
        self.connection = connection
        self.credentials = credentials
        self.writable = writable
        self.queueDepth = queueDepth
        self.dataBytes = dataBytes
        self.tableIndex = tableIndex
        self.ioAddress = ioAddress
        self.deviceName = device.name
        resources = try SessionResources(name: "outboard-session-\(id)", deviceClass: device.config.deviceClass,
                                         queueDepth: queueDepth, dataBytes: Int(dataBytes))
        let driverUp: Bool
        if case .running = device.state { driverUp = true } else { driverUp = false }
        publish(generation: generation, state: driverUp ? .serving : .recovering)
    }

    func publish(generation: UInt64, state: SessionState) {
        resources.publish(generation: generation, state: state)
    }

    func translationEntry(state: TranslationTable.EntryState) -> TranslationTable.Entry {
        // Block sessions: the device writes into the client's buffers on reads.
        TranslationTable.Entry(state: state, sessionID: id, ioAddress: ioAddress, length: dataBytes, leaseEnd: leaseEnd, writable: true)
    }
}
