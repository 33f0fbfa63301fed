import FoundationEssentials
import VFIO
import OutboardSession
import OutboardSystem

/// The manager's configuration, read from a JSON file (see `examples/outboard.json`).
/// Keys are snake_case. Everything has a default except the devices.
public struct ManagerConfig: Decodable, Sendable {
    /// Where clients connect (Unix SEQPACKET).
    public var controlSocket: String = "/run/outboard/control.sock"
    /// The unprivileged user and group drivers run as.
    public var driverUser: String = "nobody"
    public var driverGroup: String? = nil
    /// Peers with these uids may read status and inject faults.
    public var adminUids: [UInt32] = [0]
    /// How long the manager guarantees a registered region stays mapped; renewed while the
    /// session lives.
    public var leaseMs: UInt32 = 2000
    /// The driver beats at least this often...
    public var heartbeatIntervalMs: UInt32 = 50
    /// ...and is declared hung when it has not for this long.
    public var heartbeatDeadlineMs: UInt32 = 500
    public var restart: RestartPolicy = RestartPolicy()
    public var sandbox: SandboxConfig = SandboxConfig()
    public var devices: [DeviceConfig]

    public struct RestartPolicy: Decodable, Sendable {
        /// First restart delay; doubles with each consecutive failure.
        public var backoffInitialMs: UInt32 = 10
        public var backoffMaxMs: UInt32 = 2000
        /// Consecutive failures (without a healthy run in between) before the device is
        /// marked failed.
        public var crashLoopLimit: UInt32 = 5
        /// A driver that has reported ready and then served I/O, or stayed up this long,
        /// is healthy again: its failure count starts over.
        public var healthyAfterMs: UInt32 = 1000
        public init() {}
    }

    public struct SandboxConfig: Decodable, Sendable {
        /// New mount (empty root), network and IPC namespaces.
        public var namespaces: Bool = true
        public var maxOpenFiles: UInt64 = 64
        public init() {}
    }

    /// How the driver reaches a device. The driver serving a device follows from its
    /// transport and class (memory + block: the test block driver on manager-owned memory;
    /// vhost-user + block: the virtio-blk driver).
    public enum Transport: String, Sendable, CaseIterable {
        /// Manager-owned memory is the device (`size_mib`, `latency_us`).
        case memory
        /// A vhost-user device at `socket`, which the manager connects to and hands over.
        case vhostUser = "vhost-user"
        /// A virtio-pci device at PCI address `pci`, behind an IOMMU: the manager binds it to
        /// vfio-pci, maps DMA, and hands the driver the device fd.
        case vfio
    }

    public struct DeviceConfig: Decodable, Sendable {
        public var name: String
        public var transport: Transport
        /// The device class: what its sessions carry. "block" (the default) or "net".
        public var deviceClass: DeviceClass = .block
        /// net: the port's MAC address ("02:00:00:00:00:01"), for devices that report none
        /// (DPDK's vhost backend); default: a locally administered address made from the
        /// device's name. A device that reports its own is believed instead.
        public var mac: String? = nil
        /// net: the MTU, for devices that report none (68...9000).
        public var mtu: UInt16 = 1500
        /// Size of the device in MiB (memory transport; a vhost-user device reports its own).
        public var sizeMib: UInt64 = 64
        /// vhost-user: the device's socket. The manager connects to it and hands
        /// the connection to the sandboxed driver (again after every disconnection).
        public var socket: String? = nil
        /// vfio: the device's PCI address (`0000:00:04.0`).
        public var pci: String? = nil
        /// vhost-user and vfio: virtqueue size (a power of two, 8...1024).
        public var queueSize: UInt32 = 256
        /// vhost-user and vfio: how the driver learns of completions: "interrupt" (one per
        /// completion), "event-idx" (once per batch taken), "adaptive" (busy-poll while busy
        /// and for `poll_us` after, event-idx otherwise), "poll" (busy-poll while busy).
        public var notify: String = "adaptive"
        public var pollUs: UInt32 = 50
        /// vhost-user and vfio: how often the manager retries handing an absent device over.
        public var reconnectMs: UInt32 = 50
        public var access: [AccessRule] = []
        public var limits: Limits = Limits()
        /// Emulated device latency per request (memory transport), microseconds.
        public var latencyUs: UInt32 = 0
        /// The driver tries to escape its sandbox at start and reports what it saw
        /// (shown in `outboard status`).
        public var probeSandbox: Bool = false
        /// Test knob: the driver exits right after start (a crash loop).
        public var testExitAtStart: Bool = false
        /// Test knob: the driver exits right after start with the exit status of this
        /// classification ("retry", "reconnect-device", "restart-driver", "fail-device",
        /// "fatal"; see DriverExit).
        public var testExitRecovery: String? = nil
        /// The keys the config file gave (decoded spelling), for the transport check.
        var givenKeys: [String] = []
    }

    /// Who may open a device. A rule matches a client's uid or gid (SO_PEERCRED); the first
    /// matching rule decides. No match: denied.
    public struct AccessRule: Decodable, Sendable {
        public var uid: UInt32? = nil
        public var gid: UInt32? = nil
        /// "rw" or "ro".
        public var mode: String
    }

    public struct Limits: Decodable, Sendable {
        /// Largest data region one session may register.
        public var maxSessionBytes: UInt64 = 64 << 20
        /// Registered bytes over all sessions of the device.
        public var maxDeviceBytes: UInt64 = 256 << 20
        public var maxSessions: UInt32 = 16
        public var maxQueueDepth: UInt32 = 256
        public var maxTransferBytes: UInt32 = 1 << 20
    }

    public static func load(path: String) throws -> ManagerConfig {
        let data: Data
        do { data = try Data(contentsOf: URL(fileURLWithPath: path)) } catch {
            throw ConfigError("cannot read \(path): \(error)")
        }
        return try parse(data, source: path)
    }

    public static func parse(_ data: Data, source: String = "config") throws -> ManagerConfig {
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        let config: ManagerConfig
        do { config = try decoder.decode(ManagerConfig.self, from: data) } catch {
            throw ConfigError("\(source): \(Self.explain(error))")
        }
        try config.validate(source: source)
        return config
    }

    static func explain(_ error: Error) -> String {
        switch error {
        case DecodingError.keyNotFound(let key, let ctx):
            return "missing key '\(key.stringValue)' at \(ctx.codingPath.map(\.stringValue).joined(separator: "."))"
        case DecodingError.typeMismatch(_, let ctx), DecodingError.valueNotFound(_, let ctx),
             DecodingError.dataCorrupted(let ctx):
            return "\(ctx.debugDescription) at '\(ctx.codingPath.map(\.stringValue).joined(separator: "."))'"
        default:
            return "\(error)"
        }
    }

    func validate(source: String) throws {
        func fail(_ s: String) -> ConfigError { ConfigError("\(source): \(s)") }
        guard !devices.isEmpty else { throw fail("no devices") }
        guard leaseMs >= 10 else { throw fail("lease_ms must be at least 10") }
        guard heartbeatIntervalMs >= 1, heartbeatDeadlineMs >= 2 * heartbeatIntervalMs else {
            throw fail("heartbeat_deadline_ms must be at least twice heartbeat_interval_ms")
        }
        guard restart.crashLoopLimit >= 1 else { throw fail("restart.crash_loop_limit must be at least 1") }
        var names = Set<String>()
        for d in devices {
            guard !d.name.isEmpty, d.name.utf8.count <= 64,
                  d.name.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" }) else {
                throw fail("device name '\(d.name)': 1-64 letters, digits, '-' or '_'")
            }
            guard names.insert(d.name).inserted else { throw fail("device '\(d.name)' appears twice") }
            try d.validateTransport(fail)
            if let r = d.testExitRecovery, Recovery(configName: r) == nil {
                throw fail("device '\(d.name)': test_exit_recovery '\(r)' (use \(Recovery.allCases.map(\.configName).joined(separator: ", ")))")
            }
            guard d.sizeMib >= 1, d.sizeMib <= 16384 else { throw fail("device '\(d.name)': size_mib must be in 1...16384") }
            for r in d.access {
                guard r.mode == "rw" || r.mode == "ro" else { throw fail("device '\(d.name)': access mode '\(r.mode)' (use rw or ro)") }
                guard (r.uid == nil) != (r.gid == nil) else { throw fail("device '\(d.name)': each access rule names a uid or a gid") }
            }
            let l = d.limits
            guard l.maxSessions >= 1, l.maxSessions <= 64 else { throw fail("device '\(d.name)': limits.max_sessions must be in 1...64") }
            guard l.maxQueueDepth >= 2, l.maxQueueDepth <= 4096, l.maxQueueDepth.nonzeroBitCount == 1 else {
                throw fail("device '\(d.name)': limits.max_queue_depth must be a power of two in 2...4096")
            }
            guard l.maxTransferBytes >= 512, l.maxTransferBytes % 512 == 0 else {
                throw fail("device '\(d.name)': limits.max_transfer_bytes must be a multiple of 512")
            }
        }
    }
}

extension ManagerConfig.DeviceConfig {
    /// The transport's own keys, checked; a key of another transport is an error, not
    /// silently ignored (a `socket` on a memory device means the config is not what its
    /// author thinks). Every (transport, class) pair is listed, so a new class or transport
    /// must say which pairs exist.
    func validateTransport(_ fail: (String) -> ConfigError) throws {
        switch (transport, deviceClass) {
        case (.memory, .block), (.vhostUser, .block), (.vfio, .block), (.vhostUser, .net):
            break
        case (.memory, .net), (.vfio, .net):
            throw fail("device '\(name)': class net runs over transport vhost-user only")
        }
        for key in givenKeys {
            guard let (written, owners) = Self.classKeys[key], !owners.contains(deviceClass) else { continue }
            throw fail("device '\(name)': '\(written)' is for class \(owners.map(\.description).sorted().joined(separator: " or ")), this device's class is \(deviceClass)")
        }
        if deviceClass == .net {
            if let m = mac, MACAddress(m) == nil || MACAddress(m)!.isMulticast {
                throw fail("device '\(name)': mac '\(m)' is not a unicast address like 02:00:00:00:00:01")
            }
            guard NetInfo.mtuRange.contains(mtu) else { throw fail("device '\(name)': mtu must be in \(NetInfo.mtuRange)") }
        }
        for key in givenKeys {
            guard let (written, owners) = Self.transportKeys[key], !owners.contains(transport) else { continue }
            throw fail("device '\(name)': '\(written)' is for transport \(owners.map(\.rawValue).sorted().joined(separator: " or ")), this device's transport is \(transport.rawValue)")
        }
        switch transport {
        case .memory:
            return
        case .vhostUser:
            guard let path = socket, !path.isEmpty, path.utf8.count < 108 else {
                throw fail("device '\(name)': transport vhost-user needs 'socket', the device's vhost-user socket path (under 108 bytes)")
            }
        case .vfio:
            guard let text = pci, PCIAddress(text) != nil else {
                throw fail("device '\(name)': transport vfio needs 'pci', the device's PCI address (0000:00:04.0)")
            }
        }
        guard queueSize >= 8, queueSize <= 1024, queueSize.nonzeroBitCount == 1 else {
            throw fail("device '\(name)': queue_size must be a power of two in 8...1024")
        }
        guard NotifyMode(name: notify) != nil else {
            throw fail("device '\(name)': notify '\(notify)' (use interrupt, event-idx, adaptive or poll)")
        }
        guard reconnectMs >= 1 else { throw fail("device '\(name)': reconnect_ms must be at least 1") }
    }

    /// Class keys, as `transportKeys`.
    static let classKeys: [String: (String, Set<DeviceClass>)] = [
        "mac": ("mac", [.net]), "mtu": ("mtu", [.net]),
    ]

    /// The port's address: the configured one, or a locally administered unicast address
    /// (02:xx:...) made from the device's name, the same on every start.
    public var macAddress: MACAddress {
        if let m = mac, let a = MACAddress(m) { return a }
        var h: UInt64 = 0xcbf2_9ce4_8422_2325  // FNV-1a
        for b in name.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        return MACAddress(rawValue: 0x02_00_0000_0000 | (h & 0xFF_FFFF_FFFF))
    }

    /// Transport keys: decoded spelling (the decoder converts snake_case) to the key as
    /// written and the transports it belongs to. Keys not listed are common to all.
    static let transportKeys: [String: (String, Set<ManagerConfig.Transport>)] = [
        "sizeMib": ("size_mib", [.memory]), "latencyUs": ("latency_us", [.memory]),
        "socket": ("socket", [.vhostUser]), "pci": ("pci", [.vfio]),
        "queueSize": ("queue_size", [.vhostUser, .vfio]), "notify": ("notify", [.vhostUser, .vfio]),
        "pollUs": ("poll_us", [.vhostUser, .vfio]), "reconnectMs": ("reconnect_ms", [.vhostUser, .vfio]),
    ]
}

extension Recovery {
    /// The spelling in configs and command lines: "fail-device".
    public var configName: String { description.split(separator: " ").joined(separator: "-") }
    public init?(configName: String) {
        guard let r = Recovery.allCases.first(where: { $0.configName == configName }) else { return nil }
        self = r
    }
}

public struct ConfigError: Error, CustomStringConvertible, RecoverableError {
    public let description: String
    public init(_ s: String) { description = s }
    /// A configuration the manager refuses stays refused until it is changed.
    public var recovery: Recovery { .fatal }
}

// Synthesized Decodable would demand every key; these take defaults for missing keys and
// refuse unknown ones (a typo in a config should be an error, not a silent default).

struct AnyKey: CodingKey {
    var stringValue: String
    var intValue: Int? { nil }
    init(stringValue: String) { self.stringValue = stringValue }
    init?(intValue: Int) { nil }
}

extension Decoder {
    func rejectUnknownKeys(_ known: [String]) throws {
        let c = try container(keyedBy: AnyKey.self)
        for k in c.allKeys where !known.contains(k.stringValue) {
            throw DecodingError.dataCorrupted(.init(codingPath: codingPath + [k], debugDescription: "unknown key"))
        }
    }
}

extension KeyedDecodingContainer {
    func value<T: Decodable>(_ key: Key, _ fallback: T) throws -> T { try decodeIfPresent(T.self, forKey: key) ?? fallback }
}

extension ManagerConfig {
    enum CodingKeys: String, CodingKey, CaseIterable {
        case controlSocket, driverUser, driverGroup, adminUids, leaseMs, heartbeatIntervalMs, heartbeatDeadlineMs
        case restart, sandbox, devices
    }
    public init(from decoder: Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let d = ManagerConfig(devices: [])
        controlSocket = try c.value(.controlSocket, d.controlSocket)
        driverUser = try c.value(.driverUser, d.driverUser)
        driverGroup = try c.decodeIfPresent(String.self, forKey: .driverGroup)
        adminUids = try c.value(.adminUids, d.adminUids)
        leaseMs = try c.value(.leaseMs, d.leaseMs)
        heartbeatIntervalMs = try c.value(.heartbeatIntervalMs, d.heartbeatIntervalMs)
        heartbeatDeadlineMs = try c.value(.heartbeatDeadlineMs, d.heartbeatDeadlineMs)
        restart = try c.value(.restart, d.restart)
        sandbox = try c.value(.sandbox, d.sandbox)
        devices = try c.decode([DeviceConfig].self, forKey: .devices)
    }
    public init(devices: [DeviceConfig]) { self.devices = devices }
}

extension ManagerConfig.RestartPolicy {
    enum CodingKeys: String, CodingKey, CaseIterable { case backoffInitialMs, backoffMaxMs, crashLoopLimit, healthyAfterMs }
    public init(from decoder: Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let d = Self()
        backoffInitialMs = try c.value(.backoffInitialMs, d.backoffInitialMs)
        backoffMaxMs = try c.value(.backoffMaxMs, d.backoffMaxMs)
        crashLoopLimit = try c.value(.crashLoopLimit, d.crashLoopLimit)
        healthyAfterMs = try c.value(.healthyAfterMs, d.healthyAfterMs)
    }
}

extension ManagerConfig.SandboxConfig {
    enum CodingKeys: String, CodingKey, CaseIterable { case namespaces, maxOpenFiles }
    public init(from decoder: Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let d = Self()
        namespaces = try c.value(.namespaces, d.namespaces)
        maxOpenFiles = try c.value(.maxOpenFiles, d.maxOpenFiles)
    }
}

extension ManagerConfig.DeviceConfig {
    enum CodingKeys: String, CodingKey, CaseIterable {
        case name, transport, deviceClass = "class", sizeMib, socket, pci, queueSize, notify, pollUs, reconnectMs, access, limits
        case latencyUs, probeSandbox, testExitAtStart, testExitRecovery, mac, mtu
    }
    public init(name: String, transport: ManagerConfig.Transport, deviceClass: DeviceClass = .block) {
        self.name = name; self.transport = transport; self.deviceClass = deviceClass
    }
    public init(from decoder: Decoder) throws {
        let keys = try decoder.container(keyedBy: AnyKey.self).allKeys.map(\.stringValue)
        if keys.contains("driver") {
            throw DecodingError.dataCorrupted(.init(
                codingPath: decoder.codingPath + [AnyKey(stringValue: "driver")],
                debugDescription: "'driver' is not a device key: name a 'transport' (memory, vhost-user, vfio) and a 'class' (block)"))
        }
        try decoder.rejectUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        let c = try decoder.container(keyedBy: CodingKeys.self)
        name = try c.decode(String.self, forKey: .name)
        let t = try c.decode(String.self, forKey: .transport)
        guard let transport = ManagerConfig.Transport(rawValue: t) else {
            throw DecodingError.dataCorrupted(.init(
                codingPath: decoder.codingPath + [CodingKeys.transport],
                debugDescription: "unknown transport '\(t)' (known: \(ManagerConfig.Transport.allCases.map(\.rawValue).joined(separator: ", ")))"))
        }
        self.transport = transport
        let k = try c.decodeIfPresent(String.self, forKey: .deviceClass) ?? DeviceClass.block.description
        guard let deviceClass = DeviceClass(name: k) else {
            throw DecodingError.dataCorrupted(.init(
                codingPath: decoder.codingPath + [CodingKeys.deviceClass],
                debugDescription: "unknown class '\(k)' (known: \(DeviceClass.allCases.map(\.description).joined(separator: ", ")))"))
        }
        self.deviceClass = deviceClass
        givenKeys = keys
        let d = Self(name: name, transport: transport, deviceClass: deviceClass)
        sizeMib = try c.value(.sizeMib, d.sizeMib)
        socket = try c.decodeIfPresent(String.self, forKey: .socket)
        pci = try c.decodeIfPresent(String.self, forKey: .pci)
        queueSize = try c.value(.queueSize, d.queueSize)
        notify = try c.value(.notify, d.notify)
        pollUs = try c.value(.pollUs, d.pollUs)
        reconnectMs = try c.value(.reconnectMs, d.reconnectMs)
        access = try c.value(.access, d.access)
        limits = try c.value(.limits, d.limits)
        latencyUs = try c.value(.latencyUs, d.latencyUs)
        probeSandbox = try c.value(.probeSandbox, d.probeSandbox)
        testExitAtStart = try c.value(.testExitAtStart, d.testExitAtStart)
        testExitRecovery = try c.decodeIfPresent(String.self, forKey: .testExitRecovery)
        mac = try c.decodeIfPresent(String.self, forKey: .mac)
        mtu = try c.value(.mtu, d.mtu)
    }
}

extension ManagerConfig.AccessRule {
    enum CodingKeys: String, CodingKey, CaseIterable { case uid, gid, mode }
    public init(from decoder: Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        let c = try decoder.container(keyedBy: CodingKeys.self)
        uid = try c.decodeIfPresent(UInt32.self, forKey: .uid)
        gid = try c.decodeIfPresent(UInt32.self, forKey: .gid)
        mode = try c.decode(String.self, forKey: .mode)
    }
}

extension ManagerConfig.Limits {
    enum CodingKeys: String, CodingKey, CaseIterable {
        case maxSessionBytes, maxDeviceBytes, maxSessions, maxQueueDepth, maxTransferBytes
    }
    public init(from decoder: Decoder) throws {
        try decoder.rejectUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let d = Self()
        maxSessionBytes = try c.value(.maxSessionBytes, d.maxSessionBytes)
        maxDeviceBytes = try c.value(.maxDeviceBytes, d.maxDeviceBytes)
        maxSessions = try c.value(.maxSessions, d.maxSessions)
        maxQueueDepth = try c.value(.maxQueueDepth, d.maxQueueDepth)
        maxTransferBytes = try c.value(.maxTransferBytes, d.maxTransferBytes)
    }
}
