import Logging
import OutboardSession
import OutboardSystem

// Clients and policy: accepting connections (with per-uid limits), reading client
// requests, and deciding what a client may have (access rules, limits) before anything
// is allocated for it.

extension Manager {
    /// Connections at most, over all clients, and per client uid: an unprivileged user
    /// cannot exhaust the manager's descriptors (and with them, driver restarts). A
    /// session is a connection, so the per-uid limit leaves room for every session of
    /// every device plus a few admin connections: at least 64, and always 64 short of the
    /// total, so that one uid (checked before any access rule) cannot take every slot.
    static let maxConnections = 512
    static func connectionsPerUID(_ config: ManagerConfig) -> Int {
        let sessions = config.devices.reduce(0) { $0 + Int($1.limits.maxSessions) }
        return min(maxConnections - 64, max(64, sessions + 8))
    }
    /// Messages handled per connection per wake-up: one chatty peer cannot starve the tick.
    static let messageBudget = 16

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
            case .openSession(let m): openSession(c, m)
            case .statusRequest: sendStatus(c)
            case .injectFault(let device, let fault, let argument): injectFault(c, device: device, fault: fault, argument: argument)
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

    /// A client's open request: every check of policy and limits first; only when all
    /// pass is anything allocated (`createSession`).
    func openSession(_ c: Connection, _ m: OpenSession) {
        guard c.sessionID == nil else { return refuse(c, .invalidArgument, "this connection already has a session") }
        guard let d = devices.first(where: { $0.name == m.device }) else {
            return refuse(c, .unknownDevice, "no device named '\(m.device)'")
        }
        guard m.deviceClass == d.config.deviceClass else {
            return refuse(c, .invalidArgument, "device '\(d.name)' is a \(d.config.deviceClass) device, not \(m.deviceClass)")
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
        guard let info = d.sessionInfo() else {
            return refuse(c, .busy, "device '\(d.name)' is not connected yet (\(d.lastDeviceError ?? "waiting for its driver to reach it"))")
        }
        switch info {
        case .block(let b):
            if m.writable && b.flags.contains(.readOnly) {
                return refuse(c, .permissionDenied, "device '\(d.name)' is read-only")
            }
        case .net:
            // A port has one owner: frames land in whoever's receive buffers come next,
            // so two sessions would see each other's traffic. Sharing a port is a
            // multiplexer's job (one session here, its own clients below).
            if !d.sessions.isEmpty {
                return refuse(c, .busy, "net device '\(d.name)' serves one session at a time (share it through a multiplexer)")
            }
            if !m.writable { return refuse(c, .invalidArgument, "a net session sends frames: open it writable") }
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
        createSession(c, d, m, dataBytes: dataBytes, slot: slot, info: info)
    }
}
