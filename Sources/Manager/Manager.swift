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
            devices.append(try DeviceState(index: i, config: d))
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

    /// Connections at most, over all clients, and per client uid: an unprivileged user
    /// cannot exhaust the manager's descriptors (and with them, driver restarts). A
    /// session is a connection, so the per-uid limit leaves room for every session of
    /// every device plus a few admin connections: at least 64, and always 64 short of the
    /// total, so that one uid (checked before any access rule) cannot take every slot.
    static let maxConnections = 512
    let maxConnectionsPerUID: Int
    static func connectionsPerUID(_ config: ManagerConfig) -> Int {
        let sessions = config.devices.reduce(0) { $0 + Int($1.limits.maxSessions) }
        return min(maxConnections - 64, max(64, sessions + 8))
    }
    /// Messages handled per connection per wake-up: one chatty peer cannot starve the tick.
    static let messageBudget = 16
    /// Completions after which a restarted driver counts as healthy (see tick).
    static let healthyCompletions: UInt64 = 64
    /// Past a lease's end, before a region still marked in use is freed.
    static let leaseGrace: UInt64 = 100_000_000

    func acceptClients() {
        do {
            let s = try listener.accept()
            let creds = try s.peerCredentials()
            let fromUID = connections.values.reduce(0) { $0 + ($1.credentials.uid == creds.uid ? 1 : 0) }
            guard connections.count < Self.maxConnections, fromUID < maxConnectionsPerUID else {
                logger.warning("connection refused: too many connections", metadata: ["uid": "\(creds.uid)", "pid": "\(creds.pid)"])
                try? s.send(.failure(.limitExceeded, "too many connections"), nonBlocking: true)
                // Read what the client already sent (its open request) before closing:
                // closing a socket with unread messages resets the connection. A request
                // that arrives after this still meets the reset (or, after the close, a
                // broken pipe); UnixSocket.receive and the client library then still find
                // the refusal above, which the kernel keeps queued behind the reset.
                for _ in 0..<4 {
                    guard (try? s.receive(maxBytes: ControlProtocol.maxMessageBytes,
                                          maxDescriptors: ControlProtocol.maxDescriptors, nonBlocking: true)) != nil else { break }
                }
                return
            }
            let id = nextConnection
            nextConnection += 1
            try epoll.add(s.fd.raw, events: .readable, token: Token.connection | id)
            connections[id] = Connection(id: id, socket: s, credentials: creds)
            logger.debug("client connected", metadata: ["pid": "\(creds.pid)", "uid": "\(creds.uid)", "connection": "\(id)"])
        } catch {
            // Out of descriptors, most likely: stop listening for a moment instead of
            // spinning on a listener that stays readable.
            logger.warning("accept failed: \(error); pausing the listener for 100 ms")
            try? epoll.remove(listener.fd.raw)
            listenerPausedUntil = Clock.monotonicNanoseconds + 100_000_000
        }
    }

    func connectionReadable(_ c: Connection) {
        var budget = Self.messageBudget
        while connections[c.id] != nil && budget > 0 {
            budget -= 1
            let d: ControlDelivery
            do {
                d = try c.socket.receiveControl(nonBlocking: true)
            } catch .socket(.system(.wouldBlock)) {
                return
            } catch .socket(.closed) {
                closeConnection(c, reason: "client closed the connection")
                return
            } catch {
                // Malformed, oversized, wrong descriptors: this connection ends, nobody else
                // notices. The client is told why if it still listens.
                let reason = error.description
                logger.warning("closing connection: \(reason)", metadata: c.metadata)
                try? c.socket.send(.failure(.malformed, reason), nonBlocking: true)
                closeConnection(c, reason: "malformed message: \(reason)")
                return
            }
            switch d.message {
            case .openBlock(let m): openSession(c, m)
            case .statusRequest: sendStatus(c)
            case .injectFault(let device, let fault): injectFault(c, device: device, fault: fault)
            default:
                let reason = "\(d.message.type) is not a client request"
                logger.warning("closing connection: \(reason)", metadata: c.metadata)
                try? c.socket.send(.failure(.malformed, reason), nonBlocking: true)
                closeConnection(c, reason: reason)
            }
        }
    }

    func refuse(_ c: Connection, _ code: ErrorCode, _ message: String) {
        logger.notice("refused: \(message)", metadata: c.metadata)
        do { try c.socket.send(.failure(code, message), nonBlocking: true) } catch {
            closeConnection(c, reason: "client not reading its answers")
        }
    }

    func closeConnection(_ c: Connection, reason: String) {
        guard connections.removeValue(forKey: c.id) != nil else { return }
        try? epoll.remove(c.socket.fd.raw)
        if let sid = c.sessionID {
            for d in devices {
                if let s = d.sessions[sid] { beginRevocation(d, s, reason: reason) }
            }
        }
        logger.debug("connection closed: \(reason)", metadata: c.metadata)
    }

    // MARK: sessions

    func openSession(_ c: Connection, _ m: OpenBlock) {
        guard c.sessionID == nil else { return refuse(c, .invalidArgument, "this connection already has a session") }
        guard let d = devices.first(where: { $0.name == m.device }) else {
            return refuse(c, .unknownDevice, "no device named '\(m.device)'")
        }
        // Policy: the first rule that matches the peer's uid or gid decides.
        let creds = c.credentials
        guard let rule = d.config.access.first(where: { $0.uid == creds.uid || $0.gid == creds.gid }) else {
            return refuse(c, .permissionDenied, "uid \(creds.uid) gid \(creds.gid) may not open device '\(d.name)'")
        }
        if m.writable && rule.mode != "rw" {
            return refuse(c, .permissionDenied, "uid \(creds.uid) may open device '\(d.name)' read-only only")
        }
        if case .failed = d.state {
            return refuse(c, .deviceFailed, "device '\(d.name)' has failed: \(d.lastFailure ?? "driver crash loop")")
        }
        guard let blockCount = d.blockCount else {
            return refuse(c, .busy, "device '\(d.name)' is not connected yet (\(d.lastDeviceError ?? "waiting for its driver to reach it"))")
        }
        if m.writable && d.deviceFlags.contains(.readOnly) {
            return refuse(c, .permissionDenied, "device '\(d.name)' is read-only")
        }
        let limits = d.config.limits
        guard m.queueDepth >= 2, m.queueDepth <= limits.maxQueueDepth, m.queueDepth.nonzeroBitCount == 1 else {
            return refuse(c, .invalidArgument, "queue depth \(m.queueDepth) must be a power of two in 2...\(limits.maxQueueDepth)")
        }
        guard m.dataBytes > 0 else { return refuse(c, .invalidArgument, "data region size must be positive") }
        let dataBytes = UInt64(SharedRegion.roundToPage(Int(min(m.dataBytes, UInt64(Int.max / 2)))))
        guard dataBytes <= limits.maxSessionBytes else {
            return refuse(c, .limitExceeded, "session data region of \(m.dataBytes) bytes exceeds the per-session limit of \(limits.maxSessionBytes) bytes on '\(d.name)'")
        }
        guard d.registeredBytes + dataBytes <= limits.maxDeviceBytes else {
            return refuse(c, .limitExceeded, "registering \(dataBytes) more bytes would exceed the device limit of \(limits.maxDeviceBytes) bytes on '\(d.name)' (\(d.registeredBytes) registered)")
        }
        guard d.sessions.count < Int(limits.maxSessions), let slot = d.tableSlots.firstIndex(of: nil) else {
            return refuse(c, .limitExceeded, "device '\(d.name)' has its maximum of \(limits.maxSessions) sessions")
        }
        // All checks passed: only now is anything allocated.
        let session: Session
        do {
            session = try Session(id: nextSession, device: d, connection: c.id, credentials: creds, writable: m.writable,
                                  queueDepth: m.queueDepth, dataBytes: dataBytes, tableIndex: slot,
                                  ioAddress: d.allocateIOAddress(dataBytes), generation: d.generation)
        } catch {
            return refuse(c, .internalError, "cannot create session regions: \(error)")
        }
        nextSession += 1
        let now = Clock.monotonicNanoseconds
        session.leaseEnd = now + UInt64(config.leaseMs) * 1_000_000
        d.tableSlots[slot] = session.id
        d.registeredBytes += dataBytes
        d.table.write(slot, session.translationEntry(state: .active))
        d.sessions[session.id] = session
        c.sessionID = session.id
        let opened = BlockOpened(sessionID: session.id, generation: d.generation, queueDepth: m.queueDepth, writable: m.writable,
                                 blockSize: UInt32(blockSectorSize), blockCount: blockCount, dataBytes: dataBytes,
                                 maxTransfer: d.maxTransfer(limit: limits.maxTransferBytes), deviceFlags: d.deviceFlags)
        do {
            try c.socket.send(.blockOpened(opened), descriptors: [session.header.fd.raw, session.queues.fd.raw, session.data.fd.raw,
                                                                 session.requestBell.fd.raw, session.completionBell.fd.raw], nonBlocking: true)
        } catch {
            logger.warning("cannot send session to client: \(error)", metadata: c.metadata)
            closeConnection(c, reason: "send failed")
            return
        }
        logger.info("session opened", metadata: c.metadata.merging(["session": "\(session.id)", "device": "\(d.name)",
                                                                     "writable": "\(m.writable)", "data_bytes": "\(dataBytes)"]) { a, _ in a })
        if let drv = d.driver, drv.ready { attach(d, drv, session) }
    }

    func attach(_ d: DeviceState, _ drv: DriverProcess, _ s: Session) {
        let a = Attach(sessionID: s.id, tableIndex: UInt32(s.tableIndex), queueDepth: s.queueDepth, writable: s.writable,
                       dataBytes: s.dataBytes)
        do {
            try drv.socket.send(.attach(a), descriptors: [s.queues.fd.raw, s.data.fd.raw, s.requestBell.fd.raw, s.completionBell.fd.raw], nonBlocking: true)
            s.attachSent = true
        } catch {
            // The driver is not reading its socket: it is stuck or hostile.
            logger.warning("cannot attach session \(s.id) to driver of \(d.name): \(error)")
            stopDriver(d, drv, reason: "not reading its control socket")
        }
    }

    /// The session's client is gone (or broke the protocol): stop renewing its lease and
    /// mark its translation revoking. The entry is freed once the driver's in-use mark for
    /// it is clear, or its lease has run out, whichever is first (see `tick`).
    func beginRevocation(_ d: DeviceState, _ s: Session, reason: String) {
        guard s.revokingSince == nil else { return }
        s.revokingSince = Clock.monotonicNanoseconds
        s.publish(generation: d.generation, state: .closed)
        d.table.write(s.tableIndex, s.translationEntry(state: .revoking))
        logger.info("revoking session", metadata: ["session": "\(s.id)", "device": "\(d.name)", "reason": "\(reason)"])
        if d.driver == nil || !(d.driver!.ready) || !s.attachSent {
            finishRevocation(d, s, how: .noDriver)
        } else {
            checkRevocation(d, s, now: s.revokingSince!)
        }
    }

    func checkRevocation(_ d: DeviceState, _ s: Session, now: UInt64) {
        guard s.revokingSince != nil else { return }
        if let drv = d.driver, drv.page.isInUse(s.tableIndex) {
            // The driver checks the lease right before each transfer, with a margin; the
            // grace covers a driver descheduled between its check and its copy.
            if now >= s.leaseEnd + Self.leaseGrace { finishRevocation(d, s, how: .leaseExpired) }
        } else {
            finishRevocation(d, s, how: .idle)
        }
    }

    enum RevocationPath { case idle, leaseExpired, noDriver }

    func finishRevocation(_ d: DeviceState, _ s: Session, how: RevocationPath) {
        d.table.write(s.tableIndex, TranslationTable.Entry(state: .free, sessionID: 0, ioAddress: 0, length: 0, leaseEnd: 0, writable: false))
        d.tableSlots[s.tableIndex] = nil
        d.registeredBytes -= s.dataBytes
        d.sessions.removeValue(forKey: s.id)
        switch how {
        case .idle: d.revokedIdle += 1
        case .leaseExpired: d.revokedAtLeaseEnd += 1
        case .noDriver: d.revokedIdle += 1
        }
        if let drv = d.driver, s.attachSent { try? drv.socket.send(.detach(sessionID: s.id), nonBlocking: true) }
        if let c = connections[s.connection] {
            // The session ended on the manager's side (protocol error, device failure):
            // the client's connection goes with it.
            try? epoll.remove(c.socket.fd.raw)
            connections.removeValue(forKey: c.id)
        }
        logger.info("session revoked", metadata: ["session": "\(s.id)", "device": "\(d.name)", "path": "\(how)"])
        // The manager's fds close with `s`; the memory lives on only in mappings that
        // still exist (the driver unmaps on detach).
    }

    // MARK: drivers

    func spawnDriver(_ d: DeviceState) {
        d.state = .starting
        do {
            let drv = try DriverProcess(device: d, executable: executable, uid: driverUID, gid: driverGID,
                                        sandbox: config.sandbox, logger: logger)
            let start = DriverStart(device: d.name, generation: d.generation, blockSize: UInt32(blockSectorSize),
                                    blockCount: d.blockCount ?? 0, maxTransfer: d.config.limits.maxTransferBytes,
                                    tableCapacity: UInt32(d.tableSlots.count), heartbeatIntervalMs: config.heartbeatIntervalMs,
                                    latencyMicroseconds: d.config.latencyUs, queueSize: d.config.queueSize,
                                    notifyMode: NotifyMode(name: d.config.notify) ?? .adaptive, pollMicroseconds: d.config.pollUs,
                                    dmaIOAddress: DeviceState.dmaIOAddress)
            try drv.socket.send(.driverStart(start), descriptors: [drv.pageRegion.fd.raw, d.tableRegion.fd.raw, d.memory.fd.raw], nonBlocking: true)
            try epoll.add(drv.socket.fd.raw, events: .readable, token: Token.driverSocket | UInt64(d.index))
            try epoll.add(drv.child.pidfd.raw, events: .readable, token: Token.driverExit | UInt64(d.index))
            d.driver = drv
            if d.isVirtio {
                // The driver cannot connect to the device itself: the manager does, now and
                // whenever the driver reports the connection lost.
                d.deviceConnected = false
                d.wantsConnection = true
                d.connectRetryAt = 0
                connectDevice(d)
            }
            logger.info("driver started", metadata: ["device": "\(d.name)", "pid": "\(drv.child.pid)", "generation": "\(d.generation)"])
        } catch {
            // The manager's own failure (out of descriptors or memory), not the driver's:
            // it does not count toward the crash loop. Try again later.
            logger.error("cannot start driver for \(d.name): \(error); retrying in \(config.restart.backoffMaxMs) ms")
            d.lastFailure = "cannot start driver: \(error)"
            d.state = .backoff(until: Clock.monotonicNanoseconds + UInt64(config.restart.backoffMaxMs) * 1_000_000)
        }
    }

    func driverReadable(_ d: DeviceState) {
        guard let drv = d.driver else { return }
        var budget = Self.messageBudget
        while d.driver === drv && budget > 0 {
            budget -= 1
            let m: ControlDelivery
            do {
                m = try drv.socket.receiveControl(nonBlocking: true)
            } catch .socket(.system(.wouldBlock)) {
                return
            } catch .socket(.closed), .socket(.system(.connectionReset)) {
                // Exiting, most likely: the pidfd will say how. If it lingers, it is killed.
                try? epoll.remove(drv.socket.fd.raw)
                drv.socketClosedAt = Clock.monotonicNanoseconds
                return
            } catch {
                // The driver sent garbage: it is broken or hostile. Kill it; its exit (seen
                // on the pidfd) does the rest.
                stopDriver(d, drv, reason: "driver socket: \(error)")
                return
            }
            switch m.message {
            case .driverReady(let pid, let probes):
                guard pid == drv.child.pid, !drv.ready else { stopDriver(d, drv, reason: "bad ready message"); return }
                drv.ready = true
                drv.readyAt = Clock.monotonicNanoseconds
                d.state = .running
                d.probes = probes
                logger.info("driver ready", metadata: ["device": "\(d.name)", "pid": "\(pid)", "generation": "\(d.generation)",
                                                       "sessions": "\(d.sessions.count)"])
                if !probes.isEmpty { logger.info("driver sandbox probes: \(probes.joined(separator: ", "))") }
                for s in d.sessions.values.sorted(by: { $0.id < $1.id }) where s.revokingSince == nil { attach(d, drv, s) }
            case .attached(let id):
                if let s = d.sessions[id], s.revokingSince == nil {
                    s.publish(generation: d.generation, state: .serving)
                }
            case .detached:
                break
            case .deviceInfo(let info):
                guard d.isVirtio, info.blockCount > 0, info.blockCount <= UInt64(1) << 55, info.blockSize >= 512,
                      info.blockSize <= 65536, info.blockSize.nonzeroBitCount == 1, info.maxTransfer >= UInt32(blockSectorSize) else {
                    stopDriver(d, drv, reason: "bad device info \(info)")
                    return
                }
                if let old = d.info, old.blockCount != info.blockCount {
                    logger.warning("device size changed", metadata: ["device": "\(d.name)", "was": "\(old.blockCount)", "now": "\(info.blockCount)"])
                }
                d.info = info
                d.deviceConnected = true
                d.lastDeviceError = nil
                logger.info("device connected", metadata: ["device": "\(d.name)", "sectors": "\(info.blockCount)",
                                                           "block_size": "\(info.blockSize)", "flags": "\(info.flags)"])
            case .deviceLost(let reason):
                guard d.isVirtio else { stopDriver(d, drv, reason: "unexpected deviceLost"); return }
                d.deviceConnected = false
                d.deviceLosses += 1
                d.lastDeviceError = reason
                d.wantsConnection = true
                logger.warning("device connection lost", metadata: ["device": "\(d.name)", "reason": "\(reason)"])
                connectDevice(d)
            case .sessionError(let id, let reason):
                if let s = d.sessions[id] {
                    logger.warning("driver dropped session \(id): \(reason)", metadata: ["device": "\(d.name)"])
                    if let c = connections[s.connection] { try? c.socket.send(.sessionFailed(reason: reason), nonBlocking: true) }
                    s.attachSent = false  // the driver no longer holds it
                    beginRevocation(d, s, reason: "driver: \(reason)")
                }
            default:
                stopDriver(d, drv, reason: "unexpected \(m.message.type) from driver")
                return
            }
        }
    }

    /// Connects to a virtio device's vhost-user socket and hands the connection to the
    /// driver. The manager keeps no copy: when the driver dies, the device sees the
    /// connection close and is free for the next driver. Retried from `tick` while the
    /// device is absent.
    func connectDevice(_ d: DeviceState) {
        guard d.wantsConnection, let drv = d.driver, drv.killReason == nil, let path = d.config.socket else { return }
        let now = Clock.monotonicNanoseconds
        guard now >= d.connectRetryAt else { return }
        d.connectAttempts += 1
        let fd: OwnedFD
        do {
            fd = try UnixSocket.connectStream(path: path)
        } catch {
            let why = "cannot connect to \(path): \(error)"
            if d.lastDeviceError != why { logger.warning("\(why); retrying every \(d.config.reconnectMs) ms", metadata: ["device": "\(d.name)"]) }
            d.lastDeviceError = why
            d.connectRetryAt = now + UInt64(d.config.reconnectMs) * 1_000_000
            return
        }
        d.connectionsMade += 1
        do {
            try drv.socket.send(.deviceConnection(attempt: d.connectionsMade), descriptors: [fd.raw], nonBlocking: true)
            d.wantsConnection = false
        } catch {
            logger.warning("cannot hand the device connection to the driver of \(d.name): \(error)")
            stopDriver(d, drv, reason: "not reading its control socket")
        }
    }

    func stopDriver(_ d: DeviceState, _ drv: DriverProcess, reason: String) {
        if drv.killReason == nil { drv.killReason = reason }
        try? epoll.remove(drv.socket.fd.raw)
        try? drv.child.signal(SIGKILL)
    }

    func driverExited(_ d: DeviceState) {
        guard let drv = d.driver else { return }
        let status = (try? drv.child.wait(timeoutMilliseconds: 0)) ?? nil
        guard let status else { return }
        try? epoll.remove(drv.socket.fd.raw)
        try? epoll.remove(drv.child.pidfd.raw)
        d.driver = nil
        d.deviceConnected = false
        d.wantsConnection = false
        let reason = drv.killReason.map { "\($0) (\(status))" } ?? "\(status)"
        if stopping { return }
        logger.error("driver died", metadata: ["device": "\(d.name)", "pid": "\(drv.child.pid)", "generation": "\(d.generation)",
                                               "reason": "\(reason)"])
        if drv.healthy { d.consecutiveFailures = 0 }
        driverFailed(d, reason: reason)
    }

    /// A driver is gone. Its sessions get fresh queues (a dead driver may have left them
    /// in any state) under the next generation; clients are told and will reissue what
    /// they have not seen complete. Then a restart after backoff, or, after too many
    /// failures in a row, the device is failed and its clients get an error.
    func driverFailed(_ d: DeviceState, reason: String) {
        d.lastFailure = reason
        d.consecutiveFailures += 1
        d.failures += 1
        d.generation += 1
        d.table.setGeneration(d.generation)
        for s in d.sessions.values.sorted(by: { $0.id < $1.id }) {
            s.attachSent = false
            if s.revokingSince != nil {
                // No driver, nothing in flight: the revocation can complete.
                finishRevocation(d, s, how: .idle)
            }
        }
        let limit = config.restart.crashLoopLimit
        if d.consecutiveFailures > Int(limit) {
            d.state = .failed
            let why = "device '\(d.name)' failed: its driver failed \(d.consecutiveFailures) times in a row (last: \(reason))"
            logger.critical("\(why)")
            for s in d.sessions.values.sorted(by: { $0.id < $1.id }) {
                s.publish(generation: d.generation, state: .failed)
                if let c = connections[s.connection] { try? c.socket.send(.sessionFailed(reason: why), nonBlocking: true) }
                s.completionBell.ringIgnoringErrors()
                finishRevocation(d, s, how: .noDriver)
            }
            return
        }
        for s in d.sessions.values.sorted(by: { $0.id < $1.id }) { replaceQueues(d, s) }
        let backoff = min(UInt64(config.restart.backoffInitialMs) << UInt64(min(d.consecutiveFailures - 1, 20)),
                          UInt64(config.restart.backoffMaxMs))
        d.state = .backoff(until: Clock.monotonicNanoseconds + backoff * 1_000_000)
        d.restarts += 1
        logger.info("restarting driver", metadata: ["device": "\(d.name)", "in_ms": "\(backoff)", "generation": "\(d.generation)",
                                                     "consecutive_failures": "\(d.consecutiveFailures)"])
    }

    func replaceQueues(_ d: DeviceState, _ s: Session) {
        do {
            try s.replaceQueues()
        } catch {
            logger.error("cannot create new queues for session \(s.id): \(error)")
            if let c = connections[s.connection] { try? c.socket.send(.sessionFailed(reason: "manager could not renew the session: \(error)"), nonBlocking: true) }
            beginRevocation(d, s, reason: "queue renewal failed")
            return
        }
        if let c = connections[s.connection] {
            // Message first, then the generation: a client that sees the new generation
            // finds the new queues already waiting on its socket.
            do {
                try c.socket.send(.queuesReplaced(generation: d.generation), descriptors: [s.queues.fd.raw], nonBlocking: true)
            } catch {
                // A client that does not read its control socket cannot follow a restart.
                logger.warning("cannot send new queues to client: \(error)", metadata: c.metadata)
                closeConnection(c, reason: "client not reading its control socket")
                return
            }
        }
        s.publish(generation: d.generation, state: .recovering)
        s.completionBell.ringIgnoringErrors()
    }

    // MARK: tick: heartbeats, health, restarts, leases, revocations

    func tick() {
        let now = Clock.monotonicNanoseconds
        let lease = UInt64(config.leaseMs) * 1_000_000
        if let until = listenerPausedUntil, now >= until {
            listenerPausedUntil = nil
            try? epoll.add(listener.fd.raw, events: .readable, token: Token.listener)
        }
        for d in devices {
            if case .backoff(let until) = d.state, now >= until { spawnDriver(d) }
            if d.wantsConnection { connectDevice(d) }
            if let drv = d.driver, drv.killReason == nil, let closed = drv.socketClosedAt, now > closed + 500_000_000 {
                stopDriver(d, drv, reason: "closed its control socket but did not exit")
            }
            if let drv = d.driver, drv.killReason == nil {
                let beat = drv.page.heartbeat
                if beat != drv.lastBeat {
                    drv.lastBeat = beat
                    drv.lastBeatAt = now
                }
                // Before it is ready the driver is still starting (exec, sandbox, mapping):
                // allow it longer.
                let deadline = UInt64(config.heartbeatDeadlineMs) * 1_000_000 * (drv.ready ? 1 : 10)
                let silent = now > drv.lastBeatAt ? now - drv.lastBeatAt : 0
                let starting = now > drv.startedAt ? now - drv.startedAt : 0
                if !drv.ready && starting > UInt64(config.heartbeatDeadlineMs) * 1_000_000 * 10 {
                    stopDriver(d, drv, reason: "not ready \(starting / 1_000_000) ms after start")
                } else if silent > deadline {
                    logger.error("driver hung: no heartbeat", metadata: ["device": "\(d.name)", "pid": "\(drv.child.pid)",
                                                                         "silent_ms": "\(silent / 1_000_000)"])
                    stopDriver(d, drv, reason: "hung: no heartbeat for \(silent / 1_000_000) ms")
                }
                let up = now > drv.readyAt ? now - drv.readyAt : 0
                // Healthy: up for healthy_after_ms, or through a real amount of work. Not one
                // completion: a request that kills every driver is reissued first after each
                // restart, and other sessions' first completions must not hide that loop.
                if drv.ready && !drv.healthy &&
                    (drv.page.completed >= Self.healthyCompletions || up > UInt64(config.restart.healthyAfterMs) * 1_000_000) {
                    drv.healthy = true
                    d.consecutiveFailures = 0
                }
            }
            for s in d.sessions.values {
                if s.revokingSince != nil {
                    checkRevocation(d, s, now: now)
                } else if s.leaseEnd &- now < lease / 2 || now > s.leaseEnd {
                    // Renew at half time: the driver never sees a live session's lease lapse.
                    s.leaseEnd = now + lease
                    d.table.write(s.tableIndex, s.translationEntry(state: .active))
                }
            }
        }
    }

    // MARK: admin

    func isAdmin(_ c: Connection) -> Bool { config.adminUids.contains(c.credentials.uid) }

    func sendStatus(_ c: Connection) {
        guard isAdmin(c) else { return refuse(c, .permissionDenied, "uid \(c.credentials.uid) may not read status") }
        let json = StatusReport(manager: self).json()
        do { try c.socket.send(.statusReport(json), nonBlocking: true) } catch { logger.warning("cannot send status: \(error)") }
    }

    func injectFault(_ c: Connection, device: String, fault: FaultKind) {
        guard isAdmin(c) else { return refuse(c, .permissionDenied, "uid \(c.credentials.uid) may not inject faults") }
        guard let d = devices.first(where: { $0.name == device }) else { return refuse(c, .unknownDevice, "no device named '\(device)'") }
        guard let drv = d.driver, drv.ready, drv.killReason == nil else {
            return refuse(c, .busy, "device '\(device)' has no running driver (state \(d.state))")
        }
        logger.notice("injecting fault", metadata: ["device": "\(device)", "fault": "\(fault)", "pid": "\(drv.child.pid)"])
        switch fault {
        case .kill: try? drv.child.signal(SIGKILL)
        case .segfault: try? drv.child.signal(SIGSEGV)
        case .hang: try? drv.child.signal(SIGSTOP)
        case .abort: d.table.requestAbort(generation: d.generation)
        }
        try? c.socket.send(.faultInjected(generation: d.generation, pid: drv.child.pid), nonBlocking: true)
    }

    // MARK: shutdown

    func shutdown() {
        logger.info("shutting down")
        for d in devices {
            for s in d.sessions.values {
                s.publish(generation: d.generation, state: .failed)
                if let c = connections[s.connection] { try? c.socket.send(.sessionFailed(reason: "manager shutting down"), nonBlocking: true) }
                s.completionBell.ringIgnoringErrors()
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

// SIGINT/SIGTERM ring an eventfd the loop polls (write(2) is async-signal-safe).
nonisolated(unsafe) var shutdownSignalFD: CInt = -1

func installShutdownSignals(_ fd: CInt) {
    shutdownSignalFD = fd
    let handler: @convention(c) (CInt) -> Void = { _ in
        var one: UInt64 = 1
        _ = write(shutdownSignalFD, &one, 8)
    }
    signal(SIGINT, handler)
    signal(SIGTERM, handler)
    signal(SIGPIPE, SIG_IGN)
}
