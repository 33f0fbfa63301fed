import CLinux
import Logging
import OutboardSession
import OutboardSystem

#if canImport(Glibc)
import Glibc
#endif

// Supervision: starting drivers, reading what they report, heartbeats and health,
// restarts with backoff, and failing a device for good. What to do about a failure
// follows its classification (Recovery): a driver's exit status (DriverExit), its
// deviceLost report, or the manager's own finding (a hang, a protocol violation: a new
// driver).

extension Manager {
    /// Completions after which a restarted driver counts as healthy (see tick).
    static let healthyCompletions: UInt64 = 64

    func spawnDriver(_ d: DeviceState) {
        d.state = .starting
        do {
            let drv = try DriverProcess(device: d, executable: executable, uid: driverUID, gid: driverGID,
                                        sandbox: config.sandbox, logger: logger)
            let start = DriverStart(device: d.name, generation: d.generation, tableCapacity: UInt32(d.tableSlots.count),
                                    heartbeatIntervalMs: config.heartbeatIntervalMs, transport: transportParameters(d),
                                    deviceClass: d.classParameters)
            try drv.socket.send(.driverStart(start), descriptors: [drv.pageRegion.fd.raw, d.tableRegion.fd.raw, d.memory.fd.raw], nonBlocking: true)
            try epoll.add(drv.socket.fd.raw, events: .readable, token: Token.driverSocket | UInt64(d.index))
            try epoll.add(drv.child.pidfd.raw, events: .readable, token: Token.driverExit | UInt64(d.index))
            d.driver = drv
            // A driver cannot open its device itself (a vhost-user socket): the manager hands
            // it a connection, now and whenever the driver reports it lost.
            d.link.handoff?.driverStarted()
            linkDevice(d)
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
            case .detached(let id):
                // The driver let go of a revoked session: its table index is free again.
                if d.sessions[id] == nil, let k = d.tableSlots.firstIndex(of: id) { d.releaseSlot(k) }
            case .deviceInfo(let info):
                deviceReported(d, drv, info)
            case .deviceLost(let reason, let recovery):
                deviceLost(d, drv, reason: reason, recovery: recovery)
            case .sessionError(let id, let reason):
                if let s = d.sessions[id] {
                    logger.warning("driver dropped session \(id): \(reason)", metadata: ["device": "\(d.name)"])
                    if let c = connections[s.connection] { try? c.socket.send(.sessionFailed(reason: reason), nonBlocking: true) }
                    // The driver may still have the session's requests at the device: the
                    // revocation waits for its in-use mark (or the lease) like any other, and
                    // the table index stays until the driver answers the detach.
                    beginRevocation(d, s, reason: "driver: \(reason)")
                }
            default:
                stopDriver(d, drv, reason: "unexpected \(m.message.type) from driver")
                return
            }
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
        d.link.handoff?.driverGone()
        // Indices kept for detaches the driver never answered: it is gone, and with it
        // everything it had of those sessions.
        for k in d.tableSlots.indices {
            if let id = d.tableSlots[k], d.sessions[id] == nil { d.releaseSlot(k) }
        }
        if stopping { return }
        if case .failed = d.state { return }  // stopped because the device failed
        // A driver the manager killed needs a new one; one that exited says why by its
        // exit status (DriverExit).
        let recovery = drv.killReason == nil ? DriverExit.recovery(status) : .restartDriver
        let reason = drv.killReason.map { "\($0) (\(status))" } ?? "\(status)"
        logger.error("driver died", metadata: ["device": "\(d.name)", "pid": "\(drv.child.pid)", "generation": "\(d.generation)",
                                               "reason": "\(reason)", "recovery": "\(recovery)"])
        if drv.healthy { d.consecutiveFailures = 0 }
        switch recovery {
        case .retry, .reconnectDevice, .restartDriver:
            driverFailed(d, reason: reason)
        case .failDevice, .fatal:
            d.lastFailure = reason
            d.failures += 1
            newGeneration(d)
            failDevice(d, reason: "device '\(d.name)' failed: its driver gave up on it (\(reason))")
        }
    }

    /// A driver is gone. Its sessions get fresh queues (a dead driver may have left them
    /// in any state) under the next generation; clients are told and will reissue what
    /// they have not seen complete. Then a restart after backoff, or, after too many
    /// failures in a row, the device is failed and its clients get an error.
    func driverFailed(_ d: DeviceState, reason: String) {
        d.lastFailure = reason
        d.consecutiveFailures += 1
        d.failures += 1
        newGeneration(d)
        let limit = config.restart.crashLoopLimit
        if d.consecutiveFailures > Int(limit) {
            failDevice(d, reason: "device '\(d.name)' failed: its driver failed \(d.consecutiveFailures) times in a row (last: \(reason))")
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

    /// The driver of the old generation is gone: sessions are no longer attached, and
    /// revocations waiting for it can complete (nothing is in flight without a driver).
    func newGeneration(_ d: DeviceState) {
        d.generation += 1
        d.table.setGeneration(d.generation)
        for s in d.sessions.values.sorted(by: { $0.id < $1.id }) {
            s.attachSent = false
            if s.revokingSince != nil { finishRevocation(d, s, how: .idle) }
        }
    }

    /// The device cannot be used (a crash loop, a device that refused its driver, a
    /// driver that classified its failure as final): its sessions fail, their clients are
    /// told, and no driver is started again.
    func failDevice(_ d: DeviceState, reason: String) {
        if case .failed = d.state { return }
        d.state = .failed
        d.lastFailure = reason
        logger.critical("\(reason)")
        for s in d.sessions.values.sorted(by: { $0.id < $1.id }) {
            s.publish(generation: d.generation, state: .failed)
            if let c = connections[s.connection] { try? c.socket.send(.sessionFailed(reason: reason), nonBlocking: true) }
            s.resources.completionBell.ringIgnoringErrors()
            finishRevocation(d, s, how: .noDriver)
        }
        if let drv = d.driver { stopDriver(d, drv, reason: reason) }
    }

    /// What the driver is told of its transport.
    func transportParameters(_ d: DeviceState) -> TransportParameters {
        switch d.config.transport {
        case .memory:
            return .memory(latencyMicroseconds: d.config.latencyUs)
        case .vhostUser:
            return .vhostUser(virtioParameters(d))
        case .vfio:
            return .vfio(virtioParameters(d))
        }
    }

    func virtioParameters(_ d: DeviceState) -> VirtioParameters {
        VirtioParameters(queueSize: d.config.queueSize, notifyMode: NotifyMode(name: d.config.notify) ?? .adaptive,
                         pollMicroseconds: d.config.pollUs, dmaIOAddress: DeviceState.dmaIOAddress)
    }

    // MARK: tick: heartbeats, health, restarts, leases, revocations

    func tick() {
        let now = Clock.monotonicNanoseconds
        if let until = listenerPausedUntil, now >= until {
            listenerPausedUntil = nil
            try? epoll.add(listener.fd.raw, events: .readable, token: Token.listener)
        }
        for d in devices {
            if case .backoff(let until) = d.state, now >= until { spawnDriver(d) }
            linkDevice(d)
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
            renewLeasesAndRevoke(d, now: now)
        }
    }
}
