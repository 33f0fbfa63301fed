import OutboardRings
import OutboardSystem

/// The control protocol: messages between clients, the manager and drivers over Unix
/// SEQPACKET sockets, one message per datagram.
///
/// ```
/// header (16 bytes, little-endian)
///   +0  magic    UInt32  "OBC1"
///   +4  version  UInt16  ControlProtocol.version
///   +6  type     UInt16  MessageType
///   +8  length   UInt32  payload bytes that follow the header
///   +12 reserved UInt32  zero
/// payload: the message's fields in order (see `encode`)
/// ```
/// Integers are little-endian, booleans one byte (0 or 1), strings a UInt32 byte count and
/// UTF-8. Parts that differ by device class or transport are tagged sections:
/// ```
///   +0 tag     UInt8   DeviceClass (class info, class parameters) or transport tag
///   +1 length  UInt16  bytes of the body that follow
///   +3 body    the case's fields; must consume exactly `length`
/// ```
/// An unknown tag, or a body of another length than its tag's, is malformed: a new class or
/// transport is a new tag (and, as every change of a message, a new protocol version).
/// Every message is decoded from a private copy of the datagram, checked field by field,
/// and must consume its payload exactly. Descriptors (SCM_RIGHTS) travel with the
/// messages that need them; the number is fixed per type and checked by the receiver.
public enum ControlProtocol {
    public static let magic: UInt32 = 0x3143_424F  // "OBC1" little-endian
    public static let version: UInt16 = 4
    public static let headerSize = 16
    /// Limit for every message except status reports.
    public static let maxMessageBytes = 4096
    /// Limit for a status report (JSON), manager to client.
    public static let maxReportBytes = 1 << 20
    /// Most descriptors any message carries.
    public static let maxDescriptors = 8
    /// Longest device name.
    public static let maxNameBytes = 64
    /// Longest free-text reason.
    public static let maxReasonBytes = 1024
}

public enum MessageType: UInt16, Sendable, CaseIterable {
    // client -> manager
    case openSession = 1
    case statusRequest = 2
    case injectFault = 3
    // manager -> client
    case sessionOpened = 16
    case queuesReplaced = 17
    case sessionFailed = 18
    case failure = 19
    case statusReport = 20
    case faultInjected = 21
    // manager -> driver
    case driverStart = 32
    case attach = 33
    case detach = 34
    case deviceConnection = 35
    // driver -> manager
    case driverReady = 48
    case attached = 49
    case detached = 50
    case sessionError = 51
    case deviceInfo = 52
    case deviceLost = 53

    /// Descriptors a message of this type carries.
    public var descriptorCount: Int {
        switch self {
        case .sessionOpened: return SessionOpened.descriptorCount
        case .queuesReplaced: return 1
        case .driverStart: return DriverStart.descriptorCount
        case .attach: return Attach.descriptorCount
        case .deviceConnection: return 1
        default: return 0
        }
    }
}

/// Error codes a manager returns to a client.
public enum ErrorCode: UInt16, Sendable, CaseIterable, CustomStringConvertible {
    case malformed = 1
    case unknownDevice = 2
    case permissionDenied = 3
    case limitExceeded = 4
    case deviceFailed = 5
    case invalidArgument = 6
    case busy = 7
    case internalError = 8

    public var description: String {
        switch self {
        case .malformed: return "malformed request"
        case .unknownDevice: return "unknown device"
        case .permissionDenied: return "permission denied"
        case .limitExceeded: return "limit exceeded"
        case .deviceFailed: return "device failed"
        case .invalidArgument: return "invalid argument"
        case .busy: return "busy"
        case .internalError: return "internal error"
        }
    }
}

/// Faults the manager can inject into a driver (for `outboard faults` and tests).
public enum FaultKind: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    case kill = 1      // SIGKILL
    case segfault = 2  // SIGSEGV
    case hang = 3      // SIGSTOP: only the heartbeat deadline finds it
    case abort = 4     // abort() inside request handling
    /// The driver points the status descriptor of its next device request at an IO address
    /// no grant covers: a driver bug the IOMMU must contain (devices behind one only).
    case strayDMA = 5
    /// The driver puts a head naming no descriptor in its device queue's available ring
    /// (virtio devices): a driver bug the device must refuse. A virtio-pci device sets
    /// DEVICE_NEEDS_RESET; a vhost-user backend drops the connection. Either way the driver
    /// resets or reconnects the device and resubmits; nothing is lost.
    case badRing = 6

    /// The faults that end the driver process (what `outboard faults` cycles through by
    /// default).
    public static let crashes: [FaultKind] = [.kill, .segfault, .hang, .abort]

    /// Whether the driver process ends (and a new generation serves the sessions).
    public var endsTheDriver: Bool { FaultKind.crashes.contains(self) }

    /// By its `description` (`segv`, `stray-dma`).
    public init?(name: String) {
        guard let k = FaultKind.allCases.first(where: { $0.description == name }) else { return nil }
        self = k
    }

    public var description: String {
        switch self {
        case .kill: return "kill"
        case .segfault: return "segv"
        case .hang: return "hang"
        case .abort: return "abort"
        case .strayDMA: return "stray-dma"
        case .badRing: return "bad-ring"
        }
    }
}

/// The kind of device a session serves: what its queues carry and what the class info in
/// `SessionOpened`, `DeviceInfo` and `DriverStart` holds. On the wire a UInt8; values
/// not listed are refused (malformed), so a new class (net next) is a new case, never a
/// reinterpretation of an old one.
public enum DeviceClass: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    case block = 1
    case net = 2

    public var description: String {
        switch self {
        case .block: return "block"
        case .net: return "net"
        }
    }
    public init?(name: String) {
        guard let c = DeviceClass.allCases.first(where: { $0.description == name }) else { return nil }
        self = c
    }
}

/// A client asks for a session on a device of a class.
public struct OpenSession: Equatable, Sendable {
    public var device: String
    /// The class the client speaks; the manager refuses a device of another class.
    public var deviceClass: DeviceClass
    public var writable: Bool
    /// Size of the data region the client wants for its buffers.
    public var dataBytes: UInt64
    /// Requests in flight at most; a power of two.
    public var queueDepth: UInt32
    public init(device: String, deviceClass: DeviceClass, writable: Bool, dataBytes: UInt64, queueDepth: UInt32) {
        self.device = device; self.deviceClass = deviceClass; self.writable = writable
        self.dataBytes = dataBytes; self.queueDepth = queueDepth
    }
}

/// A block device as a session sees it (and as a driver found it: `DeviceInfo`).
public struct BlockInfo: Equatable, Sendable {
    /// The device's preferred block size (a hint; addressing is in 512-byte sectors).
    public var blockSize: UInt32
    public var blockCount: UInt64
    /// Largest single transfer the device takes.
    public var maxTransfer: UInt32
    /// What the device can do beyond read and write.
    public var flags: DeviceFlags
    public init(blockSize: UInt32, blockCount: UInt64, maxTransfer: UInt32, flags: DeviceFlags) {
        self.blockSize = blockSize; self.blockCount = blockCount; self.maxTransfer = maxTransfer; self.flags = flags
    }
}

/// A network device as a session sees it (and as a driver found it: `DeviceInfo`).
public struct NetInfo: Equatable, Sendable {
    /// The port's address: the source of every frame the session sends.
    public var mac: MACAddress
    /// Largest payload of a frame (the Ethernet MTU, without the 14-byte header).
    public var mtu: UInt16
    /// Receive buffers must hold this many bytes (a frame of `mtu` with its header and
    /// a VLAN tag); the driver refuses smaller ones.
    public var maxFrame: UInt32 { UInt32(mtu) + 18 }
    /// Whether the link is up (the device's status; up where it reports none).
    public var linkUp: Bool
    public init(mac: MACAddress, mtu: UInt16, linkUp: Bool = true) {
        self.mac = mac; self.mtu = mtu; self.linkUp = linkUp
    }
}

/// What a session's (or a device's) class adds to the common part.
public enum ClassInfo: Equatable, Sendable {
    case block(BlockInfo)
    case net(NetInfo)

    public var deviceClass: DeviceClass {
        switch self {
        case .block: return .block
        case .net: return .net
        }
    }
}

/// The manager's (or a virtualizer's) answer to OpenSession. Descriptors, in order:
/// session header (map read-only), queues, data, request doorbell, completion doorbell;
/// the same for every class.
public struct SessionOpened: Equatable, Sendable {
    public static let descriptorCount = 5
    public var sessionID: UInt64
    public var generation: UInt64
    public var queueDepth: UInt32
    public var writable: Bool
    public var dataBytes: UInt64
    public var classInfo: ClassInfo
    public init(sessionID: UInt64, generation: UInt64, queueDepth: UInt32, writable: Bool, dataBytes: UInt64,
                classInfo: ClassInfo) {
        self.sessionID = sessionID; self.generation = generation; self.queueDepth = queueDepth
        self.writable = writable; self.dataBytes = dataBytes; self.classInfo = classInfo
    }
}

/// Capabilities of a block device, as its driver found them (virtio-blk feature bits).
public struct DeviceFlags: OptionSet, Equatable, Sendable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let flush = DeviceFlags(rawValue: 1 << 0)
    public static let discard = DeviceFlags(rawValue: 1 << 1)
    public static let writeZeroes = DeviceFlags(rawValue: 1 << 2)
    public static let readOnly = DeviceFlags(rawValue: 1 << 3)
    public static let known: DeviceFlags = [.flush, .discard, .writeZeroes, .readOnly]
    public var description: String {
        var names: [String] = []
        if contains(.flush) { names.append("flush") }
        if contains(.discard) { names.append("discard") }
        if contains(.writeZeroes) { names.append("write-zeroes") }
        if contains(.readOnly) { names.append("read-only") }
        return names.isEmpty ? "none" : names.joined(separator: ",")
    }
}

/// How a driver learns that the device finished requests.
public enum NotifyMode: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    /// An interrupt (call eventfd) per completion.
    case interrupt = 1
    /// Event-index suppression: the device signals only when the driver asked, once per
    /// batch the driver has taken.
    case eventIndex = 2
    /// Busy-poll while requests are in flight and for a short window after the last one,
    /// event-index sleeping otherwise.
    case adaptive = 3
    /// Busy-poll whenever anything is in flight.
    case poll = 4

    public var description: String {
        switch self {
        case .interrupt: return "interrupt"
        case .eventIndex: return "event-idx"
        case .adaptive: return "adaptive"
        case .poll: return "poll"
        }
    }
    public init?(name: String) {
        guard let m = NotifyMode.allCases.first(where: { $0.description == name }) else { return nil }
        self = m
    }
}

/// Virtio transports: how the driver runs its virtqueue.
public struct VirtioParameters: Equatable, Sendable {
    /// Virtqueue size: a power of two in 8...1024.
    public var queueSize: UInt32
    public var notifyMode: NotifyMode
    /// Busy-poll window after the last completion (adaptive mode).
    public var pollMicroseconds: UInt32
    /// The IO address at which the driver registers its own memory (the third descriptor
    /// of DriverStart: rings, request headers, status bytes) with the device. Session
    /// regions get theirs from the translation table; the manager keeps the two apart.
    public var dmaIOAddress: IOAddress
    public init(queueSize: UInt32, notifyMode: NotifyMode, pollMicroseconds: UInt32, dmaIOAddress: IOAddress) {
        self.queueSize = queueSize; self.notifyMode = notifyMode; self.pollMicroseconds = pollMicroseconds
        self.dmaIOAddress = dmaIOAddress
    }
}

/// How a driver reaches its device.
public enum TransportParameters: Equatable, Sendable {
    /// The device is manager-owned memory (the third descriptor of DriverStart): the test
    /// device. `latencyMicroseconds`: emulated device time per request (0: none).
    case memory(latencyMicroseconds: UInt32)
    /// A vhost-user device: the manager connects to its socket and hands the connection
    /// over (`deviceConnection`).
    case vhostUser(VirtioParameters)
    /// A virtio-pci device behind an IOMMU: the manager binds it to vfio-pci, holds the
    /// VFIO container (DMA mappings) and hands the driver the device fd only
    /// (`deviceConnection`).
    case vfio(VirtioParameters)

    /// The tag on the wire (TransportTag in `encode`).
    var tag: UInt8 {
        switch self {
        case .memory: return 1
        case .vhostUser: return 2
        case .vfio: return 3
        }
    }

    /// The virtio knobs of a virtio transport (nil for memory).
    public var virtio: VirtioParameters? {
        switch self {
        case .memory: return nil
        case .vhostUser(let v), .vfio(let v): return v
        }
    }
}

/// Block devices: the device as the manager configured it. Memory devices are this size;
/// a virtio device reports its own (`deviceInfo`) and `blockCount` is 0 until then.
public struct BlockParameters: Equatable, Sendable {
    public var blockSize: UInt32
    public var blockCount: UInt64
    /// Largest single transfer sessions may ask for (the manager's limit).
    public var maxTransfer: UInt32
    public init(blockSize: UInt32, blockCount: UInt64, maxTransfer: UInt32) {
        self.blockSize = blockSize; self.blockCount = blockCount; self.maxTransfer = maxTransfer
    }
}

/// Network devices: what the manager's config says of the port, for devices that cannot
/// say it themselves (DPDK's vhost backend has no configuration space); a device that
/// reports its MAC and MTU is believed instead.
public struct NetParameters: Equatable, Sendable {
    public var mac: MACAddress
    public var mtu: UInt16
    public init(mac: MACAddress, mtu: UInt16) { self.mac = mac; self.mtu = mtu }
}

/// What a driver of a device class needs to know of its device.
public enum ClassParameters: Equatable, Sendable {
    case block(BlockParameters)
    case net(NetParameters)

    public var deviceClass: DeviceClass {
        switch self {
        case .block: return .block
        case .net: return .net
        }
    }
}

/// First message to a new driver process: common part, transport, class. Descriptors:
/// driver page (read-write), translation table (read-only), device memory (read-write:
/// the device itself for `.memory`, the driver's DMA memory for `.vhostUser`).
public struct DriverStart: Equatable, Sendable {
    public static let descriptorCount = 3
    public var device: String
    public var generation: UInt64
    public var tableCapacity: UInt32
    public var heartbeatIntervalMs: UInt32
    public var transport: TransportParameters
    public var deviceClass: ClassParameters
    public init(device: String, generation: UInt64, tableCapacity: UInt32, heartbeatIntervalMs: UInt32,
                transport: TransportParameters, deviceClass: ClassParameters) {
        self.device = device; self.generation = generation; self.tableCapacity = tableCapacity
        self.heartbeatIntervalMs = heartbeatIntervalMs; self.transport = transport; self.deviceClass = deviceClass
    }
}

/// A session handed to a driver. Descriptors: queues, data, request doorbell,
/// completion doorbell.
public struct Attach: Equatable, Sendable {
    public static let descriptorCount = 4
    public var sessionID: UInt64
    /// The session's data region entry in the translation table.
    public var tableIndex: UInt32
    public var queueDepth: UInt32
    public var writable: Bool
    public var dataBytes: UInt64
    public init(sessionID: UInt64, tableIndex: UInt32, queueDepth: UInt32, writable: Bool, dataBytes: UInt64) {
        self.sessionID = sessionID; self.tableIndex = tableIndex; self.queueDepth = queueDepth
        self.writable = writable; self.dataBytes = dataBytes
    }
}

public enum ControlMessage: Equatable, Sendable {
    case openSession(OpenSession)
    case statusRequest
    /// `argument`: stray-dma: the IO address the stray descriptor points at (0: the
    /// driver's own choice, outside every grant); 0 for the other faults.
    case injectFault(device: String, fault: FaultKind, argument: UInt64 = 0)
    case sessionOpened(SessionOpened)
    case queuesReplaced(generation: UInt64)
    case sessionFailed(reason: String)
    case failure(ErrorCode, String)
    case statusReport(String)
    case faultInjected(generation: UInt64, pid: Int32)
    case driverStart(DriverStart)
    case attach(Attach)
    case detach(sessionID: UInt64)
    /// A connection to the device (vhost-user socket) the manager opened for the driver,
    /// which cannot open one itself. One descriptor. `attempt` counts connections made.
    case deviceConnection(attempt: UInt64)
    /// The driver is sandboxed and running. `probes`: sandbox self-test results, one
    /// "name errno" string per attempted escape (empty unless asked for).
    case driverReady(pid: Int32, probes: [String])
    case attached(sessionID: UInt64)
    case detached(sessionID: UInt64)
    /// The driver stopped serving a session because its client broke the queue protocol.
    case sessionError(sessionID: UInt64, reason: String)
    /// The driver negotiated with the device: what the device is (its class must be the
    /// device's configured class).
    case deviceInfo(ClassInfo)
    /// The device connection broke or the device refused the driver. `recovery` is the
    /// driver's classification and what the manager does: `.retry` or `.reconnectDevice`,
    /// a new connection (after the device's reconnect delay for `.retry`); `.restartDriver`,
    /// a new driver; `.failDevice` or `.fatal`, the device fails and its clients are told.
    case deviceLost(reason: String, recovery: Recovery)

    public var type: MessageType {
        switch self {
        case .openSession: return .openSession
        case .statusRequest: return .statusRequest
        case .injectFault: return .injectFault
        case .sessionOpened: return .sessionOpened
        case .queuesReplaced: return .queuesReplaced
        case .sessionFailed: return .sessionFailed
        case .failure: return .failure
        case .statusReport: return .statusReport
        case .faultInjected: return .faultInjected
        case .driverStart: return .driverStart
        case .attach: return .attach
        case .detach: return .detach
        case .driverReady: return .driverReady
        case .attached: return .attached
        case .detached: return .detached
        case .sessionError: return .sessionError
        case .deviceConnection: return .deviceConnection
        case .deviceInfo: return .deviceInfo
        case .deviceLost: return .deviceLost
        }
    }

    public func encode() -> [UInt8] {
        var w = WireWriter()
        w.u32(ControlProtocol.magic)
        w.u16(ControlProtocol.version)
        w.u16(type.rawValue)
        w.u32(0)  // length, patched below
        w.u32(0)
        switch self {
        case .openSession(let m):
            w.string(m.device); w.u8(m.deviceClass.rawValue); w.bool(m.writable); w.u64(m.dataBytes); w.u32(m.queueDepth)
        case .statusRequest:
            break
        case .injectFault(let device, let fault, let argument):
            w.string(device); w.u8(fault.rawValue); w.u64(argument)
        case .sessionOpened(let m):
            w.u64(m.sessionID); w.u64(m.generation); w.u32(m.queueDepth); w.bool(m.writable); w.u64(m.dataBytes)
            Self.encode(m.classInfo, &w)
        case .queuesReplaced(let g):
            w.u64(g)
        case .sessionFailed(let reason):
            w.string(reason)
        case .failure(let code, let message):
            w.u16(code.rawValue); w.string(message)
        case .statusReport(let json):
            w.string(json)
        case .faultInjected(let g, let pid):
            w.u64(g); w.i32(pid)
        case .driverStart(let m):
            w.string(m.device); w.u64(m.generation); w.u32(m.tableCapacity); w.u32(m.heartbeatIntervalMs)
            Self.encode(m.transport, &w)
            Self.encode(m.deviceClass, &w)
        case .attach(let m):
            w.u64(m.sessionID); w.u32(m.tableIndex); w.u32(m.queueDepth); w.bool(m.writable); w.u64(m.dataBytes)
        case .detach(let id), .attached(let id), .detached(let id):
            w.u64(id)
        case .driverReady(let pid, let probes):
            w.i32(pid); w.u32(UInt32(probes.count)); for p in probes { w.string(p) }
        case .sessionError(let id, let reason):
            w.u64(id); w.string(reason)
        case .deviceConnection(let attempt):
            w.u64(attempt)
        case .deviceInfo(let i):
            Self.encode(i, &w)
        case .deviceLost(let reason, let recovery):
            w.u8(recovery.rawValue); w.string(reason)
        }
        w.patchU32(at: 8, UInt32(w.bytes.count - ControlProtocol.headerSize))
        return w.bytes
    }

    /// Decodes one datagram. `limit` is the receiver's size limit for this message; the
    /// socket layer has already refused anything longer than the buffer.
    public static func decode(_ bytes: [UInt8], limit: Int = ControlProtocol.maxMessageBytes) throws(ControlError) -> ControlMessage {
        guard bytes.count <= limit else { throw .tooLarge(size: bytes.count, limit: limit) }
        var r = ControlReader(bytes)
        guard try r.u32("magic") == ControlProtocol.magic else { throw .malformed("bad magic") }
        let version = try r.u16("version")
        guard version == ControlProtocol.version else { throw .unsupportedVersion(version) }
        let rawType = try r.u16("type")
        guard let type = MessageType(rawValue: rawType) else { throw .unknownType(rawType) }
        let length = Int(try r.u32("length"))
        guard try r.u32("reserved") == 0 else { throw .malformed("reserved header word not zero") }
        guard length == r.remaining else {
            throw .malformed("header says \(length) payload bytes, datagram has \(r.remaining)")
        }
        let name = ControlProtocol.maxNameBytes, reasonLimit = ControlProtocol.maxReasonBytes
        let m: ControlMessage
        switch type {
        case .openSession:
            m = .openSession(OpenSession(device: try r.string("device", maxBytes: name),
                                         deviceClass: try Self.deviceClass(r.u8("deviceClass")), writable: try r.bool("writable"),
                                         dataBytes: try r.u64("dataBytes"), queueDepth: try r.u32("queueDepth")))
        case .statusRequest:
            m = .statusRequest
        case .injectFault:
            let device = try r.string("device", maxBytes: name)
            let raw = try r.u8("fault")
            guard let fault = FaultKind(rawValue: raw) else { throw .malformed("fault: unknown kind \(raw)") }
            m = .injectFault(device: device, fault: fault, argument: try r.u64("argument"))
        case .sessionOpened:
            m = .sessionOpened(SessionOpened(
                sessionID: try r.u64("sessionID"), generation: try r.u64("generation"), queueDepth: try r.u32("queueDepth"),
                writable: try r.bool("writable"), dataBytes: try r.u64("dataBytes"), classInfo: try Self.classInfo(&r)))
        case .queuesReplaced:
            m = .queuesReplaced(generation: try r.u64("generation"))
        case .sessionFailed:
            m = .sessionFailed(reason: try r.string("reason", maxBytes: reasonLimit))
        case .failure:
            let raw = try r.u16("code")
            guard let code = ErrorCode(rawValue: raw) else { throw .malformed("code: unknown error code \(raw)") }
            m = .failure(code, try r.string("message", maxBytes: reasonLimit))
        case .statusReport:
            m = .statusReport(try r.string("report", maxBytes: ControlProtocol.maxReportBytes, allowControl: true))
        case .faultInjected:
            m = .faultInjected(generation: try r.u64("generation"), pid: try r.i32("pid"))
        case .driverStart:
            m = .driverStart(DriverStart(
                device: try r.string("device", maxBytes: name), generation: try r.u64("generation"),
                tableCapacity: try r.u32("tableCapacity"), heartbeatIntervalMs: try r.u32("heartbeatIntervalMs"),
                transport: try Self.transport(&r), deviceClass: try Self.classParameters(&r)))
        case .attach:
            m = .attach(Attach(sessionID: try r.u64("sessionID"), tableIndex: try r.u32("tableIndex"),
                               queueDepth: try r.u32("queueDepth"), writable: try r.bool("writable"),
                               dataBytes: try r.u64("dataBytes")))
        case .detach:
            m = .detach(sessionID: try r.u64("sessionID"))
        case .attached:
            m = .attached(sessionID: try r.u64("sessionID"))
        case .detached:
            m = .detached(sessionID: try r.u64("sessionID"))
        case .driverReady:
            let pid = try r.i32("pid")
            let n = try r.u32("probe count")
            guard n <= 64 else { throw .malformed("probe count \(n), limit 64") }
            var probes: [String] = []
            for _ in 0..<n { probes.append(try r.string("probe", maxBytes: 128)) }
            m = .driverReady(pid: pid, probes: probes)
        case .sessionError:
            m = .sessionError(sessionID: try r.u64("sessionID"), reason: try r.string("reason", maxBytes: reasonLimit))
        case .deviceConnection:
            m = .deviceConnection(attempt: try r.u64("attempt"))
        case .deviceInfo:
            m = .deviceInfo(try Self.classInfo(&r))
        case .deviceLost:
            let raw = try r.u8("recovery")
            guard let recovery = Recovery(rawValue: raw) else { throw .malformed("recovery: unknown \(raw)") }
            m = .deviceLost(reason: try r.string("reason", maxBytes: reasonLimit), recovery: recovery)
        }
        try r.finish(String(describing: type))
        return m
    }

    static func flags(_ raw: UInt32) throws(ControlError) -> DeviceFlags {
        let f = DeviceFlags(rawValue: raw)
        guard DeviceFlags.known.isSuperset(of: f) else { throw .malformed("device flags: unknown bits \(raw)") }
        return f
    }

    static func notifyMode(_ raw: UInt8) throws(ControlError) -> NotifyMode {
        guard let m = NotifyMode(rawValue: raw) else { throw .malformed("notify mode: unknown \(raw)") }
        return m
    }

    static func mac(_ raw: UInt64) throws(ControlError) -> MACAddress {
        guard raw >> 48 == 0 else { throw .malformed("MAC address: bits above 48 set in \(raw)") }
        return MACAddress(rawValue: raw)
    }

    static func mtu(_ raw: UInt16) throws(ControlError) -> UInt16 {
        guard NetInfo.mtuRange.contains(raw) else { throw .malformed("MTU \(raw) outside \(NetInfo.mtuRange)") }
        return raw
    }

    static func deviceClass(_ raw: UInt8) throws(ControlError) -> DeviceClass {
        guard let c = DeviceClass(rawValue: raw) else { throw .malformed("device class: unknown \(raw)") }
        return c
    }

    // MARK: tagged sections

    /// Body sizes per tag: a body of any other length is refused before it is read.
    static let blockInfoBytes = 4 + 8 + 4 + 4
    static let blockParametersBytes = 4 + 8 + 4
    static let netInfoBytes = 8 + 2 + 1
    static let netParametersBytes = 8 + 2
    static let memoryTransportBytes = 4
    static let virtioParametersBytes = 4 + 1 + 4 + 8

    static func section(_ w: inout WireWriter, tag: UInt8, _ body: (inout WireWriter) -> Void) {
        var b = WireWriter()
        body(&b)
        w.u8(tag); w.u16(UInt16(b.bytes.count)); w.append(b.bytes)
    }

    /// Reads a section's header: the tag, and a reader limited to the body (checked to be
    /// `expected(tag)` bytes; nil from `expected` means an unknown tag).
    static func section(_ r: inout ControlReader, _ what: String,
                        expected: (UInt8) -> Int?) throws(ControlError) -> (tag: UInt8, body: ControlReader) {
        let tag = try r.u8(what + " tag")
        guard let size = expected(tag) else { throw .malformed("\(what): unknown tag \(tag)") }
        let length = Int(try r.u16(what + " length"))
        guard length == size else { throw .malformed("\(what) \(tag): body of \(length) bytes, expected \(size)") }
        return (tag, try r.sub(length, what))
    }

    static func encode(_ i: ClassInfo, _ w: inout WireWriter) {
        switch i {
        case .block(let b):
            section(&w, tag: DeviceClass.block.rawValue) { w in
                w.u32(b.blockSize); w.u64(b.blockCount); w.u32(b.maxTransfer); w.u32(b.flags.rawValue)
            }
        case .net(let n):
            section(&w, tag: DeviceClass.net.rawValue) { w in w.u64(n.mac.rawValue); w.u16(n.mtu); w.u8(n.linkUp ? 1 : 0) }
        }
    }

    static func classInfo(_ r: inout ControlReader) throws(ControlError) -> ClassInfo {
        var (tag, b) = try section(&r, "class info") { DeviceClass(rawValue: $0).map { c in
            switch c { case .block: return blockInfoBytes; case .net: return netInfoBytes } } }
        let info: ClassInfo
        switch DeviceClass(rawValue: tag)! {
        case .block:
            info = .block(BlockInfo(blockSize: try b.u32("blockSize"), blockCount: try b.u64("blockCount"),
                                    maxTransfer: try b.u32("maxTransfer"), flags: try flags(b.u32("flags"))))
        case .net:
            info = .net(NetInfo(mac: try mac(b.u64("mac")), mtu: try mtu(b.u16("mtu")), linkUp: try b.bool("linkUp")))
        }
        try b.finish("class info")
        return info
    }

    static func encode(_ p: ClassParameters, _ w: inout WireWriter) {
        switch p {
        case .block(let b):
            section(&w, tag: DeviceClass.block.rawValue) { w in w.u32(b.blockSize); w.u64(b.blockCount); w.u32(b.maxTransfer) }
        case .net(let n):
            section(&w, tag: DeviceClass.net.rawValue) { w in w.u64(n.mac.rawValue); w.u16(n.mtu) }
        }
    }

    static func classParameters(_ r: inout ControlReader) throws(ControlError) -> ClassParameters {
        var (tag, b) = try section(&r, "class parameters") { DeviceClass(rawValue: $0).map { c in
            switch c { case .block: return blockParametersBytes; case .net: return netParametersBytes } } }
        let p: ClassParameters
        switch DeviceClass(rawValue: tag)! {
        case .block:
            p = .block(BlockParameters(blockSize: try b.u32("blockSize"), blockCount: try b.u64("blockCount"),
                                       maxTransfer: try b.u32("maxTransfer")))
        case .net:
            p = .net(NetParameters(mac: try mac(b.u64("mac")), mtu: try mtu(b.u16("mtu"))))
        }
        try b.finish("class parameters")
        return p
    }

    static func encode(_ t: TransportParameters, _ w: inout WireWriter) {
        switch t {
        case .memory(let latency):
            section(&w, tag: t.tag) { w in w.u32(latency) }
        case .vhostUser(let v), .vfio(let v):
            section(&w, tag: t.tag) { w in
                w.u32(v.queueSize); w.u8(v.notifyMode.rawValue); w.u32(v.pollMicroseconds); w.u64(v.dmaIOAddress.rawValue)
            }
        }
    }

    static func transport(_ r: inout ControlReader) throws(ControlError) -> TransportParameters {
        var (tag, b) = try section(&r, "transport") { tag in
            switch tag {
            case 1: return memoryTransportBytes
            case 2, 3: return virtioParametersBytes
            default: return nil
            }
        }
        let t: TransportParameters
        if tag == 1 {
            t = .memory(latencyMicroseconds: try b.u32("latencyMicroseconds"))
        } else {
            let v = VirtioParameters(queueSize: try b.u32("queueSize"), notifyMode: try notifyMode(b.u8("notifyMode")),
                                     pollMicroseconds: try b.u32("pollMicroseconds"),
                                     dmaIOAddress: IOAddress(rawValue: try b.u64("dmaIOAddress")))
            t = tag == 2 ? .vhostUser(v) : .vfio(v)
        }
        try b.finish("transport")
        return t
    }
}
