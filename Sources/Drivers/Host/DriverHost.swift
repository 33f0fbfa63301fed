import OutboardRings
import OutboardSession
import OutboardSystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// One driver process: serves block sessions on one device through `Server`, the device's
/// own logic. Written once for every driver:
/// - the manager socket: start, attach and detach, device connections, exit on close;
/// - the heartbeat on the driver page, and the counters the manager reports;
/// - the session table: requests taken in batches, round robin, each checked against the
///   device's limits; the in-use mark and the translation check right before a transfer;
///   completions published in batches with at most one doorbell per session;
/// - the sleep rule: stay awake only for work that can be taken now (requests while the
///   device has room, completions at the device), otherwise ask every client for a
///   doorbell, double-check, and sleep in epoll;
/// - the fault-injection point (abort inside request handling, as a driver bug would).
///
/// The process is sandboxed before `start`: it holds only what the manager sent it.
struct DriverHost<Server: BlockDeviceServer & ~Copyable>: ~Copyable {
    var context: HostContext
    var server: Server
    var events = EpollEvents(capacity: 64)
    var lastWork: UInt64 = 0
    var exitRequested = false
    var broken: [Int] = []

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
        guard cfg.tableCapacity >= 1, cfg.tableCapacity <= 4096, cfg.heartbeatIntervalMs >= 1,
              cfg.maxTransfer >= UInt32(blockSectorSize), cfg.maxTransfer % UInt32(blockSectorSize) == 0 else {
            throw .setup("bad start parameters \(cfg)")
        }
        let capacity = Int(cfg.tableCapacity)
        let pm = try mapRegion(delivery.take(0), DriverPage.byteCount(tableCapacity: capacity), .readWrite, "driver page")
        let tm = try mapRegion(delivery.take(1), TranslationTable.byteCount(capacity: capacity), .readOnly, "translation table")
        do { try epoll.add(manager.fd.raw, events: .readable, token: HostToken.manager) } catch { throw .setup("epoll: \(error)") }
        let page = DriverPage(pm.base, tableCapacity: capacity)
        let table = TranslationTable(tm.base, capacity: capacity)
        let ctx = HostContext(manager: manager, start: cfg, page: page, table: table, epoll: epoll,
                              sessions: SessionTable(), pageMapping: pm, tableMapping: tm)
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
        while !exitRequested {
            context.page.beat()
            var work = server.poll(context: &context)
            if work > 0 { afterCompletions() }
            work += serveSessions()
            spins &+= 1
            if work > 0 {
                lastWork = Clock.monotonicNanoseconds
                // Under load, look at the manager socket now and then without sleeping.
                if spins & 63 == 0 { try pollEvents(timeoutMs: 0) }
                continue
            }
            if server.shouldSpin(lastWork: lastWork) {
                // Yield rather than pause: with fewer cores than busy processes (client,
                // driver, device), the peer we wait for may need this CPU.
                sched_yield()
                if spins & 1023 == 0 { try pollEvents(timeoutMs: 0) }
                continue
            }
            // Stay awake only for work that can be taken now. Requests are such work only
            // while the device has room: without a device (nothing can serve them until the
            // manager hands over a connection, which only the sleep below receives) or with
            // its queue full (only a completion, which the device's notification reports,
            // makes room), staying awake for them would spin without reading the manager
            // or the device.
            var sleep = true
            let watchSessions = server.room > 0
            if watchSessions {
                for i in 0..<SessionTable.capacity where context.sessions.isActive(i) {
                    if !context.sessions.endpoints[i].requests.prepareToSleep()
                        && !context.sessions.endpoints[i].requests.hasFailed { sleep = false }
                }
            }
            if !server.prepareToSleep() { sleep = false }
            if sleep { try pollEvents(timeoutMs: Int(max(1, context.start.heartbeatIntervalMs / 2))) }
            if watchSessions {
                for i in 0..<SessionTable.capacity where context.sessions.isActive(i) {
                    context.sessions.endpoints[i].requests.cancelSignal()
                }
            }
            server.woke()
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
                let i = Int(token - HostToken.session)
                // Edge-triggered: each ring of the doorbell is one event, and nothing needs
                // reading (an eventfd's counter would take 2^64 rings to fill).
                _ = i
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
                afterCompletions()
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
            let ep = try BlockServerEndpoint(a, queues: d.take(0), data: d.take(1), requestBell: d.take(2),
                                             completionBell: d.take(3), keepDataDescriptor: Server.keepsDataDescriptors)
            try context.epoll.add(ep.requestBell.fd.raw, events: [.readable, .edgeTriggered], token: HostToken.session + UInt64(i))
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
        try? context.manager.send(.attached(sessionID: a.sessionID))
    }

    /// The manager revoked the session: no new requests; once nothing of it is at the
    /// device, the device lets go of it and the session is gone.
    mutating func detach(_ id: UInt64) {
        var known = false
        for i in 0..<SessionTable.capacity where context.sessions.occupied[i] && context.sessions.endpoints[i].sessionID == id {
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
        try? context.epoll.remove(context.sessions.endpoints[i].requestBell.fd.raw)
        // Without a device, what it had of this session is gone with it.
        if !server.deviceConnected && context.sessions.inFlight[i] > 0 {
            server.forget(i, context: &context)
            context.sessions.inFlight[i] = 0
        }
    }

    mutating func finishDetaches() {
        for i in 0..<SessionTable.capacity
        where context.sessions.occupied[i] && context.sessions.detaching[i] && context.sessions.inFlight[i] == 0 {
            let id = context.sessions.endpoints[i].sessionID
            server.removing(i, context: &context)
            context.page.clearInUse(context.sessions.endpoints[i].tableIndex)
            context.sessions.remove(i)
            try? context.manager.send(.detached(sessionID: id))
        }
    }

    /// The client broke its queue protocol (or cannot be served): tell the manager and
    /// stop serving it. The manager revokes the session.
    mutating func drop(_ i: Int, reason: String) {
        guard context.sessions.occupied[i], !context.sessions.detaching[i] else { return }
        try? context.manager.send(.sessionError(sessionID: context.sessions.endpoints[i].sessionID, reason: reason))
        beginDetach(i)
    }

    mutating func dropBroken() {
        // The data path calls this after every batch: nothing to do is one check each.
        guard !context.sessions.refused.isEmpty || !broken.isEmpty else { return }
        if !context.sessions.refused.isEmpty {
            let list = context.sessions.refused
            context.sessions.refused.removeAll()
            for (i, why) in list { drop(i, reason: why) }
        }
        if !broken.isEmpty {
            let list = broken
            broken.removeAll()
            for i in list {
                let why = context.sessions.endpoints[i].failure?.description ?? "completion queue full: client exceeded its queue depth"
                drop(i, reason: why)
            }
        }
        // A dropped session with nothing at the device goes now, not at the next detach.
        finishDetaches()
    }

    // MARK: data path

    /// Takes requests from every session (a batch each, as far as the device has room),
    /// starts them, publishes once, and publishes the completions.
    mutating func serveSessions() -> Int {
        guard let limits = server.limits else { return 0 }
        var total = 0
        var dropped = false
        let n = SessionTable.capacity
        let generation = context.generation
        for step in 0..<n {
            let i = (context.sessions.next + step) % n
            guard context.sessions.isActive(i) else { continue }
            let deviceRoom = min(SessionTable.batch, server.room)
            if deviceRoom == 0 { break }
            // Never more of a session's requests than its depth: what this driver holds of
            // it (at the device, or finished and not yet published) plus what it takes now.
            // A client that obeys its depth cannot have more in its queue; one that does is
            // dropped, here, before it can make the driver hold more than its buffers take.
            let allowance = context.sessions.allowance(i)
            if allowance == 0 {
                // A request waiting is a violation only if the room is still not there once
                // it is seen: a client takes a completion (head store) before it submits the
                // request that reuses its tag (tail store, release); seeing that tail
                // (acquire, in isEmpty) and then reading the head again sees the room.
                if context.sessions.endpoints[i].hasFailed, let e = context.sessions.endpoints[i].failure {
                    drop(i, reason: e.description)
                    dropped = true
                } else if !context.sessions.endpoints[i].requests.isEmpty(), context.sessions.allowance(i) == 0 {
                    drop(i, reason: "more requests than the queue depth of \(context.sessions.endpoints[i].queueDepth)")
                    dropped = true
                }
                continue
            }
            let room = min(deviceRoom, allowance)
            let got = context.sessions.endpoints[i].requests.dequeue(
                into: UnsafeMutableBufferPointer(rebasing: context.sessions.requestBuffer[0..<room]))
            if got == 0 {
                if context.sessions.endpoints[i].hasFailed, let e = context.sessions.endpoints[i].failure {
                    drop(i, reason: e.description)
                    dropped = true
                }
                continue
            }
            total += got
            let index = context.sessions.endpoints[i].tableIndex
            let writable = context.sessions.endpoints[i].writable
            // In use before any translation is read: the manager marks an entry revoking
            // before it reads our mark, so either it sees the mark and waits, or we see the
            // revocation (DriverPage.markInUse).
            if context.sessions.inFlight[i] == 0 { context.page.markInUse(index) }
            for k in 0..<got {
                let r = context.sessions.requestBuffer[k]
                if context.table.abortGeneration == generation {
                    // Fault injection: die inside request handling, as a driver bug would.
                    abort()
                }
                if let status = limits.check(r, writable: writable) {
                    context.sessions.complete(i, tag: r.tag, status: status, generation: generation)
                } else if let status = server.start(r, session: i, context: &context) {
                    context.sessions.complete(i, tag: r.tag, status: status, generation: generation)
                } else {
                    context.sessions.inFlight[i] += 1
                }
            }
            if context.sessions.inFlight[i] == 0 { context.page.clearInUse(index) }
        }
        context.sessions.next = (context.sessions.next + 1) % n
        // A session dropped above with nothing at the device leaves now.
        if dropped { finishDetaches() }
        if total > 0 {
            server.publish(context: &context)
            context.sessions.flush(page: context.page, broken: &broken)
            dropBroken()
        }
        return total
    }

    /// After the device finished requests: publish, clear the in-use marks of sessions
    /// with nothing left at the device, and let go of sessions that were waiting for that.
    mutating func afterCompletions() {
        context.sessions.flush(page: context.page, broken: &broken)
        dropBroken()
        for i in 0..<SessionTable.capacity where context.sessions.occupied[i] && context.sessions.inFlight[i] == 0 {
            context.page.clearInUse(context.sessions.endpoints[i].tableIndex)
        }
        finishDetaches()
    }
}
