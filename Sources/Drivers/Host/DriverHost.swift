import CLinux
import OutboardRings
import OutboardSession
import OutboardSystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// One driver process: serves the sessions of one device through `Server`, the device's
/// own logic (a block or a net device). Written once for every driver:
/// - the manager socket: start, attach and detach, device connections, exit on close;
/// - the heartbeat on the driver page, and the counters the manager reports;
/// - the session table: a record per session, what the device holds of it, the one
///   translation check, sessions dropped when they break their protocol;
/// - the sleep loop: spin while the server says so, otherwise let it ask the device and
///   the sessions for a notification (for the work it can take now), double-check, and
///   sleep in epoll.
/// The data path of a class (taking entries off the session queues, the device's
/// completions, publishing in batches, the fault-injection points) is the server's: the
/// block class writes it once for every block device (`BlockDeviceServer`).
///
/// The process is sandboxed before `start`: it holds only what the manager sent it.
struct DriverHost<Server: DeviceServer & ~Copyable, Session: ServedSession & ~Copyable>: ~Copyable {
    var context: HostContext
    var server: Server
    var events = EpollEvents(capacity: 64)
    var lastWork: UInt64 = 0
    var exitRequested = false

    /// Receives DriverStart, maps the driver page and the translation table (read-only),
    /// makes the server from the rest, and reports ready. `epoll`: a fresh epoll set, made
    /// before the sandbox was entered (its filter refuses epoll_create1).
    init(manager: consuming UnixSocket, epoll: consuming Epoll, probes: [String],
         server make: (DriverStart, consuming OwnedFD, borrowing HostContext) throws(DriverError) -> Server) throws(DriverError) {
        // Taken over before the first check (consumed alike on every path).
        let manager = consume manager
        let epoll = consume epoll
        var delivery: ControlDelivery
        do { delivery = try manager.receiveControl() } catch { throw .setup("no start message: \(error)") }
        guard case .driverStart(let cfg) = delivery.message else {
            throw .setup("expected driverStart, got \(delivery.message.type)")
        }
        guard cfg.tableCapacity >= 1, cfg.tableCapacity <= 4096, cfg.heartbeatIntervalMs >= 1 else {
            throw .setup("bad start parameters \(cfg)")
        }
        let capacity = Int(cfg.tableCapacity)
        let pm = try mapRegion(delivery.take(0), DriverPage.byteCount(tableCapacity: capacity), .readWrite, "driver page")
        let tm = try mapRegion(delivery.take(1), TranslationTable.byteCount(capacity: capacity), .readOnly, "translation table")
        do { try epoll.add(manager.fd.raw, events: .readable, token: HostToken.manager) } catch { throw .setup("epoll: \(error)") }
        let page = DriverPage(pm.base, tableCapacity: capacity)
        let table = TranslationTable(tm.base, capacity: capacity)
        precondition(Server.deviceClass == Session.deviceClass, "a \(Server.deviceClass) server with \(Session.deviceClass) sessions")
        let ctx = HostContext(manager: manager, start: cfg, page: page, table: table, epoll: epoll,
                              sessions: SessionTable(of: Session.self), pageMapping: pm, tableMapping: tm)
        let srv = try make(cfg, delivery.take(2), ctx)
        do {
            try ctx.manager.send(.driverReady(pid: getpid(), probes: probes))
        } catch {
            throw .setup("cannot report ready: \(error)")
        }
        server = srv
        context = ctx
    }

    // MARK: main loop

    /// Serves until the manager closes the socket (then returns) or a fatal error.
    mutating func run() throws(DriverError) {
        var spins = 0
        // Server.idlePollsBeforeYield: idle polls in a row, and whether there was work
        // since the last yield.
        var idlePolls = 0
        var workSinceYield = false
        while !exitRequested {
            context.page.beat()
            let work = server.serve(context: &context)
            spins &+= 1
            if work > 0 || !context.sessions.drops.isEmpty { afterWork() }
            if work > 0 {
                lastWork = Clock.monotonicNanoseconds
                workSinceYield = true
                idlePolls = 0
                // Under load, look at the manager socket now and then without sleeping.
                if spins & 63 == 0 { try pollEvents(timeoutMs: 0) }
                continue
            }
            if server.shouldSpin(lastWork: lastWork) {
                // Yield rather than pause: with fewer cores than busy processes (client,
                // driver, device), the peer we wait for may need this CPU.
                if let polls = Server.idlePollsBeforeYield {
                    idlePolls += 1
                    if idlePolls >= (workSinceYield ? polls : 16 * polls) {
                        sched_yield()
                        idlePolls = 0
                        workSinceYield = false
                    } else {
                        ob_cpu_relax()
                    }
                } else {
                    sched_yield()
                }
                if spins & 1023 == 0 { try pollEvents(timeoutMs: 0) }
                continue
            }
            if server.prepareToSleep(context: &context) {
                try pollEvents(timeoutMs: Int(max(1, context.start.heartbeatIntervalMs / 2)))
            }
            server.woke(context: &context)
        }
    }

    mutating func pollEvents(timeoutMs: Int) throws(DriverError) {
        let n: Int
        do { n = try context.epoll.wait(into: &events, timeoutMilliseconds: timeoutMs) } catch { throw .fatal("epoll: \(error)") }
        for k in 0..<n {
            let token = events.token(k)
            switch token {
            case HostToken.manager:
                try handleManagerMessages()
            case HostToken.session..<(HostToken.session + UInt64(SessionTable.capacity)):
                // Edge-triggered: each ring of the doorbell is one event, and nothing needs
                // reading (an eventfd's counter would take 2^64 rings to fill).
                break
            default:
                server.event(token, context: &context)
            }
        }
    }

    mutating func handleManagerMessages() throws(DriverError) {
        while var d = try nextManagerMessage(context.manager, closed: &exitRequested) {
            switch d.message {
            case .attach(let a):
                attach(a, &d)
            case .detach(let id):
                detach(id)
            case .deviceConnection:
                server.connect(d.take(0), context: &context)
                afterWork()
            default:
                throw .fatal("unexpected message from manager: \(d.message.type)")
            }
        }
    }

    // MARK: sessions

    mutating func attach(_ a: Attach, _ d: inout ControlDelivery) {
        guard a.tableIndex < context.start.tableCapacity, !context.sessions.holds(tableIndex: Int(a.tableIndex)),
              let i = context.sessions.freeSlot() else {
            try? context.manager.send(.sessionError(sessionID: a.sessionID, reason: "driver has no room for another session"))
            return
        }
        do {
            let ep = try Session.make(a, &d, start: context.start, keepDataDescriptor: Server.keepsDataDescriptors)
            try context.epoll.add(ep.requestBellFD, events: [.readable, .edgeTriggered], token: HostToken.session + UInt64(i))
            context.sessions.insert(ep, at: i)
        } catch {
            try? context.manager.send(.sessionError(sessionID: a.sessionID, reason: "cannot attach: \(error)"))
            return
        }
        if let refusal = server.attached(i, context: &context) {
            drop(i, reason: refusal)
            finishDetaches()
            return
        }
        // A server may find others it cannot serve while it sets this one up.
        dropPending()
        try? context.manager.send(.attached(sessionID: a.sessionID))
    }

    /// The manager revoked the session: no new requests; once nothing of it is at the
    /// device, the device lets go of it and the session is gone.
    mutating func detach(_ id: UInt64) {
        var known = false
        for i in 0..<SessionTable.capacity where context.sessions.occupied[i] && context.sessions.sessionIDs[i] == id {
            beginDetach(i)
            known = true
        }
        // A session this driver never took, or let go of already (it dropped it, and the
        // manager revoked it after): nothing of it is here, and the manager waits for this
        // answer before it gives the session's table index to another.
        if !known { try? context.manager.send(.detached(sessionID: id)) }
        finishDetaches()
    }

    mutating func beginDetach(_ i: Int) {
        guard !context.sessions.detaching[i] else { return }
        context.sessions.detaching[i] = true
        try? context.epoll.remove(context.sessions.endpoints(Session.self)[i].requestBellFD)
        server.detaching(i, context: &context)
        // Without a device, what it had of this session is gone with it.
        if !server.deviceConnected && context.sessions.inFlight[i] > 0 {
            server.forget(i, context: &context)
            context.sessions.inFlight[i] = 0
        }
    }

    mutating func finishDetaches() {
        for i in 0..<SessionTable.capacity
        where context.sessions.occupied[i] && context.sessions.detaching[i] && context.sessions.inFlight[i] == 0 {
            let id = context.sessions.sessionIDs[i]
            server.removing(i, context: &context)
            context.page.clearInUse(context.sessions.tableIndices[i])
            context.sessions.remove(i)
            try? context.manager.send(.detached(sessionID: id))
        }
    }

    /// The client broke its queue protocol (or cannot be served): tell the manager and
    /// stop serving it. The manager revokes the session.
    mutating func drop(_ i: Int, reason: String) {
        guard context.sessions.occupied[i], !context.sessions.detaching[i] else { return }
        try? context.manager.send(.sessionError(sessionID: context.sessions.sessionIDs[i], reason: reason))
        beginDetach(i)
    }

    /// Drops the sessions the last pass (or an attach) found unservable.
    mutating func dropPending() {
        // The data path calls this after every pass with work: nothing to do is one check.
        guard !context.sessions.drops.isEmpty else { return }
        let list = context.sessions.drops
        context.sessions.drops.removeAll()
        for (i, why) in list { drop(i, reason: why) }
    }

    /// After a pass with work (or a new device connection): drop the sessions found
    /// broken, clear the in-use marks of sessions with nothing left at the device, and let
    /// go of sessions that were waiting for that.
    mutating func afterWork() {
        dropPending()
        for i in 0..<SessionTable.capacity where context.sessions.occupied[i] && context.sessions.inFlight[i] == 0 {
            context.page.clearInUse(context.sessions.tableIndices[i])
        }
        finishDetaches()
    }
}
