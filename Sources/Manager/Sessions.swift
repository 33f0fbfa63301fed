import Logging
import OutboardSession
import OutboardSystem
import VFIO

// Sessions and revocation: creating a session's resources and translation entry, handing
// sessions to drivers, renewing leases, renewing queues after a driver restart, and
// revoking a session's region without pulling it from under a transfer in flight.

extension Manager {
    /// Past a lease's end, before a region still marked in use is freed.
    static let leaseGrace: UInt64 = 100_000_000

    /// Allocates what `openSession` admitted and answers the client.
    func createSession(_ c: Connection, _ d: DeviceState, _ m: OpenSession, dataBytes: UInt64, slot: Int, info: ClassInfo) {
        guard let ioAddress = d.ioAddresses.allocate(dataBytes) else {
            return refuse(c, .limitExceeded, "no IO addresses left for \(dataBytes) bytes on '\(d.name)' (\(d.ioAddresses.inUse) bytes of address space in use)")
        }
        let session: Session
        do {
            session = try Session(id: nextSession, device: d, connection: c.id, credentials: c.credentials, writable: m.writable,
                                  queueDepth: m.queueDepth, dataBytes: dataBytes, tableIndex: slot,
                                  ioAddress: ioAddress, generation: d.generation)
        } catch {
            d.ioAddresses.release(ioAddress, dataBytes)
            return refuse(c, .internalError, "cannot create session regions: \(error)")
        }
        if case .vfio(let link) = d.link {
            // The IOMMU lets the device reach the region from here until the revocation.
            do { try link.map(session) } catch {
                d.ioAddresses.release(ioAddress, dataBytes)
                return refuse(c, .internalError, "cannot map the session's data for the device: \(error)")
            }
        }
        nextSession += 1
        let now = Clock.monotonicNanoseconds
        session.leaseEnd = now + UInt64(config.leaseMs) * 1_000_000
        d.tableSlots[slot] = session.id
        d.slotAddresses[slot] = (ioAddress, dataBytes)
        d.registeredBytes += dataBytes
        d.table.write(slot, session.translationEntry(state: .active))
        d.sessions[session.id] = session
        c.sessionID = session.id
        let opened = SessionOpened(sessionID: session.id, generation: d.generation, queueDepth: m.queueDepth, writable: m.writable,
                                   dataBytes: dataBytes, classInfo: info)
        do {
            try c.socket.send(.sessionOpened(opened), descriptors: session.resources.openedDescriptors, nonBlocking: true)
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
            try drv.socket.send(.attach(a), descriptors: s.resources.attachDescriptors, nonBlocking: true)
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
        d.table.write(s.tableIndex, .free)
        // A driver that was given the session keeps its table index (and the in-use mark
        // at that index) until it answers the detach: a new session at the same index
        // before that would share the mark with the old one's requests still at the
        // device. Without a driver, nothing of it is left anywhere.
        // The in-use mark is clear or the lease is over: from here on the IOMMU refuses the
        // device any access to the region. An unmap the kernel refuses leaves the region
        // reachable by a device whose table no longer lists it: its addresses stay taken,
        // and the device fails once the session is gone.
        var unmapFailure: PCIError? = nil
        if case .vfio(let link) = d.link {
            do { try link.unmap(s) } catch { unmapFailure = error }
        }
        let draining = d.driver != nil && s.attachSent
        if unmapFailure != nil {
            d.tableSlots[s.tableIndex] = s.id
        } else if !draining {
            d.releaseSlot(s.tableIndex)
        }
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
        if let e = unmapFailure {
            failDevice(d, reason: "device '\(d.name)': cannot take session \(s.id)'s data out of the IOMMU: \(e)")
        }
        // The manager's fds close with `s`; the memory lives on only in mappings that
        // still exist (the driver unmaps on detach).
    }

    func replaceQueues(_ d: DeviceState, _ s: Session) {
        do {
            try s.resources.replaceQueues()
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
                try c.socket.send(.queuesReplaced(generation: d.generation), descriptors: [s.resources.queues.fd.raw], nonBlocking: true)
            } catch {
                // A client that does not read its control socket cannot follow a restart.
                logger.warning("cannot send new queues to client: \(error)", metadata: c.metadata)
                closeConnection(c, reason: "client not reading its control socket")
                return
            }
        }
        s.publish(generation: d.generation, state: .recovering)
        s.resources.completionBell.ringIgnoringErrors()
    }

    /// Renews live sessions' leases at half time (the driver never sees a live session's
    /// lease lapse) and moves revocations on.
    func renewLeasesAndRevoke(_ d: DeviceState, now: UInt64) {
        let lease = UInt64(config.leaseMs) * 1_000_000
        for s in d.sessions.values {
            if s.revokingSince != nil {
                checkRevocation(d, s, now: now)
            } else if s.leaseEnd &- now < lease / 2 || now > s.leaseEnd {
                s.leaseEnd = now + lease
                d.table.write(s.tableIndex, s.translationEntry(state: .active))
            }
        }
    }
}
