import FoundationEssentials
import OutboardSession
import OutboardSystem

/// What `outboard status` shows: the manager's view of devices, drivers and sessions.
public struct StatusReport: Codable, Sendable {
    public struct Device: Codable, Sendable {
        public var name: String
        /// "memory" or "vhost-user" (the config's `transport`).
        public var transport: String
        /// "block" or "net" (the config's `class`).
        public var deviceClass: String
        public var state: String
        public var pid: Int32?
        public var generation: UInt64
        public var restarts: Int
        public var failures: Int
        public var consecutiveFailures: Int
        public var lastFailure: String?
        public var registeredBytes: UInt64
        public var maxDeviceBytes: UInt64
        public var revokedIdle: Int
        public var revokedAtLeaseEnd: Int
        public var requestsCompleted: UInt64?
        public var sandboxProbes: [String]
        /// Block devices: the size as sessions see it. Vhost-user devices: the device as
        /// negotiated, and the connection's history.
        public var blockCount: UInt64?
        public var deviceFlags: String?
        /// Net devices: the port as sessions see it.
        public var mac: String?
        public var mtu: UInt16?
        public var linkUp: Bool?
        public var deviceConnected: Bool?
        public var deviceConnections: UInt64?
        public var deviceLosses: Int?
        public var lastDeviceError: String?
        /// The current driver's counters: device notifications sent and received, client
        /// doorbells rung.
        public var deviceKicks: UInt64?
        public var deviceInterrupts: UInt64?
        public var clientSignals: UInt64?
        public var deviceRequests: UInt64?
    }
    public struct Session: Codable, Sendable {
        public var id: UInt64
        public var device: String
        public var clientPid: Int32
        public var clientUid: UInt32
        public var writable: Bool
        public var state: String
        public var registeredBytes: UInt64
        public var queueDepth: UInt32
        public var ioAddress: UInt64
        public var leaseExpiresInMs: Int64
        public var revoking: Bool
        /// The driver's advisory in-use mark for the session's region.
        public var inUse: Bool
    }
    public var socket: String
    public var managerPid: Int32
    public var devices: [Device]
    public var sessions: [Session]

    init(manager m: Manager) {
        let now = Clock.monotonicNanoseconds
        socket = m.config.controlSocket
        managerPid = getpid()
        devices = m.devices.map { d in
            let link = d.link.handoff
            var blockCount: UInt64? = nil, flags: String? = nil
            var mac: String? = nil, mtu: UInt16? = nil, linkUp: Bool? = nil
            switch d.sessionInfo() {
            case .block(let b)?:
                blockCount = b.blockCount
                if link != nil { flags = "\(b.flags)" }
            case .net(let n)?:
                mac = "\(n.mac)"; mtu = n.mtu; linkUp = n.linkUp
            case nil:
                break
            }
            return Device(name: d.name, transport: d.config.transport.rawValue, deviceClass: d.config.deviceClass.description, state: d.state.description, pid: d.driver?.child.pid,
                   generation: d.generation, restarts: d.restarts, failures: d.failures,
                   consecutiveFailures: d.consecutiveFailures, lastFailure: d.lastFailure,
                   registeredBytes: d.registeredBytes, maxDeviceBytes: d.config.limits.maxDeviceBytes,
                   revokedIdle: d.revokedIdle, revokedAtLeaseEnd: d.revokedAtLeaseEnd,
                   requestsCompleted: d.driver?.page.completed, sandboxProbes: d.probes,
                   blockCount: blockCount, deviceFlags: flags, mac: mac, mtu: mtu, linkUp: linkUp, deviceConnected: link?.connected,
                   deviceConnections: link?.made, deviceLosses: link?.losses,
                   lastDeviceError: d.lastDeviceError, deviceKicks: d.driver?.page.count(.kicks),
                   deviceInterrupts: d.driver?.page.count(.interrupts), clientSignals: d.driver?.page.count(.signals),
                   deviceRequests: d.driver?.page.count(.submitted))
        }
        sessions = m.devices.flatMap { d in
            d.sessions.values.sorted { $0.id < $1.id }.map { s in
                Session(id: s.id, device: d.name, clientPid: s.credentials.pid, clientUid: s.credentials.uid,
                        writable: s.writable, state: s.revokingSince != nil ? "revoking" : s.resources.headerPage.state?.description ?? "unknown",
                        registeredBytes: s.dataBytes, queueDepth: s.queueDepth, ioAddress: s.ioAddress.rawValue,
                        leaseExpiresInMs: (Int64(bitPattern: s.leaseEnd) - Int64(bitPattern: now)) / 1_000_000,
                        revoking: s.revokingSince != nil, inUse: d.driver?.page.isInUse(s.tableIndex) ?? false)
            }
        }
    }

    public static let encoder: JSONEncoder = {
        let e = JSONEncoder()
        e.keyEncodingStrategy = .convertToSnakeCase
        e.outputFormatting = [.sortedKeys]
        return e
    }()

    public func json() -> String {
        (try? String(decoding: Self.encoder.encode(self), as: UTF8.self)) ?? "{}"
    }

    public static func decode(_ json: String) throws -> StatusReport {
        let d = JSONDecoder()
        d.keyDecodingStrategy = .convertFromSnakeCase
        return try d.decode(StatusReport.self, from: Data(json.utf8))
    }
}

#if canImport(Glibc)
import Glibc
#endif
