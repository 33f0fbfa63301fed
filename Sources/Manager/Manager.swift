import CLinux
import Logging
import OutboardRings
import OutboardSession
import OutboardSystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The manager (`outboard run`): the one privileged process. It owns the devices' memory,
/// every session's regions and doorbells and the translation tables; it spawns one
/// sandboxed driver per device, authenticates clients, creates and revokes sessions, and
/// restarts drivers that crash or hang. It is never on the data path.
///
/// Single-threaded: one epoll loop over the control socket, the client connections, the
/// drivers' sockets and pidfds and a shutdown doorbell, with a short tick for heartbeats,
/// leases, revocations and restart backoff. The control plane may allocate; the data path
/// (client <-> driver queues) never comes through here.
///
/// The jobs, a file each: this file, the loop, events and shutdown; Clients.swift, clients
/// and policy; Sessions.swift, sessions, leases and revocation; Supervision.swift, driver
/// processes, health, restarts and failing a device; DeviceLinks.swift, the link to each
/// device, one per transport; Admin.swift, status and fault injection. State.swift holds
/// what the manager keeps per device, driver and session.
public final class Manager {
    let config: ManagerConfig
    let logger: Logger
    let executable: String
    let driverUID: UInt32
    let driverGID: UInt32
    let epoll: Epoll
    let listener: UnixListener
    let shutdownBell: Doorbell
    var devices: [DeviceState] = []
    var connections: [UInt64: Connection] = [:]
    var nextConnection: UInt64 = 1
    var nextSession: UInt64 = 1
    var stopping = false
    var listenerPausedUntil: UInt64?
    /// Connections one client uid may hold (Clients.swift).
    let maxConnectionsPerUID: Int
    static let tickMs = 10

    enum Token {
        static let listener: UInt64 = 1 << 48
        static let shutdown: UInt64 = 2 << 48
        static let connection: UInt64 = 3 << 48
        static let driverSocket: UInt64 = 4 << 48
        static let driverExit: UInt64 = 5 << 48
        static let mask: UInt64 = (1 << 48) - 1
    }

    /// `executable`: the `outboard` binary to start drivers from (`outboard _driver`).
    public init(config: ManagerConfig, executable: String, logger: Logger) throws {
        self.config = config
        self.logger = logger
        self.executable = executable
        maxConnectionsPerUID = Self.connectionsPerUID(config)
        // The sandbox's own lookup (getpwnam_r), which also refuses uid or gid 0.
        let identity: SandboxPolicy
        do { identity = try SandboxPolicy.resolve(user: config.driverUser, group: config.driverGroup) } catch {
            throw ConfigError("driver_user/driver_group: \(error)")
        }
        guard identity.uid != 0, identity.gid != 0 else {
            throw ConfigError("drivers must not run as root (driver_user '\(config.driverUser)')")
        }
        driverUID = identity.uid
        driverGID = identity.gid
        epoll = try Epoll()
        let dir = config.controlSocket.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        if !dir.isEmpty {
            do { try FileSystem.makeDirectory(dir) } catch { throw ConfigError("cannot create \(dir): \(error)") }
        }
        if let probe = try? UnixSocket.connect(path: config.controlSocket) {
            _ = probe
            throw ConfigError("another manager is already listening on \(config.controlSocket)")
        }
        listener = try UnixListener(path: config.controlSocket)
        // Clients of any uid may connect; the policy decides what they get.
        do { try FileSystem.setMode(config.controlSocket, 0o666) } catch {
            throw ConfigError("cannot open \(config.controlSocket) to every user: \(error)")
        }
        shutdownBell = try Doorbell()
        try epoll.add(listener.fd.raw, events: .readable, token: Token.listener)
        try epoll.add(shutdownBell.fd.raw, events: .readable, token: Token.shutdown)
        for (i, d) in config.devices.enumerated() {
            devices.append(try DeviceState(index: i, config: d, stateDirectory: dir.isEmpty ? "." : dir))
        }
    }

    /// Serves until SIGINT or SIGTERM, then shuts down cleanly: clients are told, drivers
    /// stopped, the socket removed.
    public func run() throws {
        installShutdownSignals(shutdownBell.fd.raw.rawValue)
        logger.info("manager listening", metadata: ["socket": "\(config.controlSocket)", "devices": "\(devices.map(\.name))",
                                                   "driver_uid": "\(driverUID)", "driver_gid": "\(driverGID)"])
        for d in devices { spawnDriver(d) }
        while !stopping {
            let events = try epoll.wait(maxEvents: 64, timeoutMilliseconds: Self.tickMs)
            for e in events { handle(e) }
            tick()
        }
        shutdown()
    }

    // MARK: events

    func handle(_ e: Epoll.Event) {
        let kind = e.token & ~Token.mask, id = e.token & Token.mask
        switch kind {
        case Token.listener: acceptClients()
        case Token.shutdown:
            logger.info("shutdown requested")
            stopping = true
        case Token.connection: if let c = connections[id] { connectionReadable(c) }
        case Token.driverSocket: driverReadable(devices[Int(id)])
        case Token.driverExit: driverExited(devices[Int(id)])
        default: logger.error("unknown epoll token \(e.token)")
        }
    }

    // MARK: shutdown

    func shutdown() {
        logger.info("shutting down")
        for d in devices {
            for s in d.sessions.values {
                s.publish(generation: d.generation, state: .failed)
                if let c = connections[s.connection] { try? c.socket.send(.sessionFailed(reason: "manager shutting down"), nonBlocking: true) }
                s.resources.completionBell.ringIgnoringErrors()
            }
            if let drv = d.driver {
                try? drv.child.signal(SIGTERM)
                if (try? drv.child.wait(timeoutMilliseconds: 1000)) == nil {
                    try? drv.child.signal(SIGKILL)
                    _ = try? drv.child.wait()
                }
                d.driver = nil
            }
            d.sessions.removeAll()
            d.link.vfio?.release(logger: logger)
        }
        connections.removeAll()
        logger.info("stopped")
    }
}

/// One client connection; at most one session.
final class Connection {
    let id: UInt64
    let socket: UnixSocket
    let credentials: PeerCredentials
    var sessionID: UInt64?

    init(id: UInt64, socket: consuming UnixSocket, credentials: PeerCredentials) {
        self.id = id
        self.socket = socket
        self.credentials = credentials
    }

    var metadata: Logger.Metadata {
        ["connection": "\(id)", "pid": "\(credentials.pid)", "uid": "\(credentials.uid)"]
    }
}

extension Doorbell {
    func ringIgnoringErrors() { try? ring() }
}
