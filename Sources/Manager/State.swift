import CLinux
import Logging
import OutboardRings
import OutboardSession
import OutboardSystem
import SystemPackage
import VFIO

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
    /// The IO addresses each table index holds (address, region bytes), given back to
    /// `ioAddresses` when the index is free again (`releaseSlot`).
    var slotAddresses: [(IOAddress, UInt64)?]
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
            case .net:
                return nil  // refused by the config check
            }
        case .vhostUser, .vfio:
            return reported
        }
    }

    /// The class info a session is given: the device's, with the manager's transfer limit.
    func sessionInfo() -> ClassInfo? {
        switch classInfo {
        case .block(var b)?:
            b.maxTransfer = min(b.maxTransfer, config.limits.maxTransferBytes)
            return .block(b)
        case .net(var n)?:
            // Receive buffers are sized by the configured MTU (the driver checks them
            // against it); a device that reports a larger one is held to the config's.
            n.mtu = min(n.mtu, config.mtu)
            return .net(n)
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
        case .net:
            return .net(NetParameters(mac: config.macAddress, mtu: config.mtu))
        }
    }

    /// Driver memory of virtio drivers (rings, request headers, status bytes), registered
    /// with the device at `dmaIOAddress`; session regions get IO addresses from 4 GiB up
    /// (IOAddressAllocator), so the two never meet.
    static let virtioDMABytes = 1 << 20
    static let dmaIOAddress = IOAddress(rawValue: 1 << 20)

    /// `stateDirectory`: the control socket's directory, where links keep what must outlive
    /// a manager (the VFIO link: the driver a device had before).
    init(index: Int, config: ManagerConfig.DeviceConfig, stateDirectory: String) throws {
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
        case .vfio:
            // The driver's DMA memory, which the manager maps into the device's IOMMU
            // container. The address was checked with the config.
            memory = try SharedRegion(name: "outboard-\(config.name)-memory", size: DeviceState.virtioDMABytes)
            link = .vfio(VFIOLink(address: PCIAddress(config.pci ?? "")!, reconnectMs: config.reconnectMs,
                                  stateDirectory: stateDirectory))
        }
        let capacity = Int(config.limits.maxSessions)
        tableRegion = try SharedRegion(name: "outboard-\(config.name)-table", size: TranslationTable.byteCount(capacity: capacity))
        tableMapping = try tableRegion.map(.readWrite)
        // From here on nobody can map the table writable: the driver gets it read-only.
        try tableRegion.sealFutureWrites()
        table = TranslationTable(tableMapping.base, capacity: capacity)
        table.format(generation: generation)
        tableSlots = Array(repeating: nil, count: capacity)
        slotAddresses = Array(repeating: nil, count: capacity)
    }

    /// What the device may reach at IO address `a` now, or nil if nothing: the driver's DMA
    /// region, or the span of a session (live, or revoked with its index still held).
    func grantedIOAddress(_ a: UInt64) -> String? {
        let dma = DeviceState.dmaIOAddress.rawValue
        if a >= dma && a - dma < UInt64(memory.size) { return "the driver's DMA region" }
        for (k, span) in slotAddresses.enumerated() {
            guard let (io, bytes) = span else { continue }
            if a >= io.rawValue && a - io.rawValue < bytes { return "the data region at table index \(k)" }
        }
        return nil
    }

    /// Table index `k` is free again: nothing of its last session can be at the device.
    func releaseSlot(_ k: Int) {
        tableSlots[k] = nil
        if let (a, bytes) = slotAddresses[k] { ioAddresses.release(a, bytes) }
        slotAddresses[k] = nil
    }

}

/// IO addresses for session regions, from 4 GiB up to `limit` (the IOMMU's usable range for
/// a VFIO device). Each region gets its own span, 2 MiB aligned, with a 2 MiB gap after it,
/// so an address never belongs to two regions. A span comes back (`release`) only when the
/// table index that held it is free again, after the driver answered the detach or died:
/// no request of the old session can still be at the device when a new one gets its
/// addresses. Released spans are reused first fit, adjacent ones merged.
public struct IOAddressAllocator: Sendable {
    public static let first = IOAddress(rawValue: 1 << 32)
    public static let granule: UInt64 = 2 << 20
    /// End (exclusive) of the addresses handed out.
    public var limit: UInt64
    /// Everything from here to `limit` is unused.
    var next = IOAddressAllocator.first.rawValue
    /// Released spans below `next`, sorted by address, none adjacent.
    var free: [(first: UInt64, size: UInt64)] = []

    public init(limit: UInt64 = .max) { self.limit = limit }

    /// The span a region of `bytes` takes: rounded up to the granule, plus the gap.
    static func span(_ bytes: UInt64) -> UInt64? {
        let (rounded, o) = bytes.addingReportingOverflow(granule - 1)
        guard !o, bytes > 0 else { return nil }
        let (s, o2) = (rounded & ~(granule - 1)).addingReportingOverflow(granule)
        return o2 ? nil : s
    }

    /// The IO address for a region of `bytes`, or nil if no span that large is left.
    public mutating func allocate(_ bytes: UInt64) -> IOAddress? {
        guard let span = Self.span(bytes) else { return nil }
        if let k = free.firstIndex(where: { $0.size >= span }) {
            let a = free[k].first
            if free[k].size == span { free.remove(at: k) } else { free[k] = (a + span, free[k].size - span) }
            return IOAddress(rawValue: a)
        }
        let (end, o) = next.addingReportingOverflow(span)
        guard !o, end <= limit else { return nil }
        defer { next = end }
        return IOAddress(rawValue: next)
    }

    /// Gives back the span of a region of `bytes` at `address` (from `allocate`).
    public mutating func release(_ address: IOAddress, _ bytes: UInt64) {
        guard let span = Self.span(bytes) else { return }
        var a = address.rawValue, size = span
        let k = free.firstIndex(where: { $0.first > a }) ?? free.count
        if k < free.count, a + size == free[k].first { size += free[k].size; free.remove(at: k) }
        if k > 0, free[k - 1].first + free[k - 1].size == a {
            a = free[k - 1].first; size += free[k - 1].size; free.remove(at: k - 1)
            free.insert((a, size), at: k - 1)
        } else {
            free.insert((a, size), at: k)
        }
        // The top span goes back to the unused end.
        if let last = free.last, last.first + last.size == next { next = last.first; free.removeLast() }
    }

    /// The end of the session IO addresses: the usable range that holds the allocator's
    /// first address, cut at the first reserved region in it; the DMA region must lie in a
    /// usable range and clear of reserved regions.
    public static func limit(usable reported: [IOVARange], reserved: [IOVARange], dma: IOVARange) throws(PCIError) -> UInt64 {
        func overlaps(_ a: IOVARange, _ b: IOVARange) -> Bool { a.first <= b.last && b.first <= a.last }
        // Kernels before 5.4 report no IOVA ranges: all of it, less the reserved regions.
        let usable = reported.isEmpty ? [IOVARange(first: 0, last: .max)] : reported
        guard usable.contains(where: { $0.first <= dma.first && dma.last <= $0.last }),
              !reserved.contains(where: { overlaps($0, dma) }) else {
            throw .unsupported("IO addresses 0x\(String(dma.first, radix: 16))-0x\(String(dma.last, radix: 16)) for the driver's memory (the IOMMU's usable ranges: \(usable))")
        }
        let first = IOAddressAllocator.first.rawValue
        guard let range = usable.first(where: { $0.first <= first && first <= $0.last }) else {
            throw .unsupported("IO addresses from 0x\(String(first, radix: 16)) for sessions (the IOMMU's usable ranges: \(usable))")
        }
        var end = range.last == .max ? UInt64.max : range.last + 1
        for r in reserved where r.last >= first && r.first < end { end = max(first, r.first) }
        guard end > first else { throw .unsupported("room for session IO addresses above 0x\(String(first, radix: 16))") }
        return end
    }

    /// Bytes of address space in use (spans, gaps included).
    public var inUse: UInt64 { next - Self.first.rawValue - free.reduce(0) { $0 + $1.size } }
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
