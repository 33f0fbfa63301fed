import OutboardSession
import OutboardSystem

#if canImport(Glibc)
import Glibc
#endif

/// What a device's own logic gives the driver host (`DriverHost`): everything else a
/// driver process does (the manager socket, the epoll loop, the heartbeat, sessions
/// attached and detached with their translation checks, the sleep loop, drops) is the
/// host's, written once for every class. Servers are used through generics, never as
/// existentials: the data path calls are direct.
protocol DeviceServer: ~Copyable {
    /// The class of the sessions served (the host's session type must be of it).
    static var deviceClass: DeviceClass { get }
    /// Whether sessions' data regions must stay open in the driver (a vhost-user device
    /// maps them again after every reconnection).
    static var keepsDataDescriptors: Bool { get }

    /// One pass of the data path: what the device finished, then what the sessions have
    /// for it. Returns the work done (0: nothing). Sessions that broke their protocol go to
    /// `context.sessions.drops`; what the device holds of session i is
    /// `context.sessions.inFlight[i]`.
    mutating func serve(context: inout HostContext) -> Int

    /// Sleep rule. `shouldSpin`: keep polling instead of sleeping (`lastWork`: monotonic ns
    /// of the last work). `prepareToSleep`: ask the device and the sessions for a
    /// notification, for the work that can be taken now; false if there is already work
    /// (do not sleep). `woke`: after the sleep (withdraw what was asked).
    func shouldSpin(lastWork: UInt64) -> Bool
    mutating func prepareToSleep(context: inout HostContext) -> Bool
    mutating func woke(context: inout HostContext)
    /// While spinning with nothing to do: nil, yield the CPU (sched_yield) at every idle
    /// poll. A number N: yield once N polls in a row found nothing after work (what the
    /// driver gave its clients is theirs to take now: the device has paused), 16 N without
    /// work since the last yield; spin (pause) in between, with no system call and no
    /// clock read: the device, on another CPU, is what the driver waits for.
    static var idlePollsBeforeYield: Int? { get }

    /// An event on a descriptor the server registered with `context.epoll` (tokens
    /// `HostToken.device...`).
    mutating func event(_ token: UInt64, context: inout HostContext)
    /// The manager handed over a new connection to the device.
    mutating func connect(_ fd: consuming OwnedFD, context: inout HostContext)

    /// A session was attached; return why it cannot be served, or nil.
    mutating func attached(_ session: Int, context: inout HostContext) -> String?
    /// A session begins to leave: no more of its entries are taken. What the device holds
    /// of it must come back (or be forgotten, with the connection) before it can go.
    mutating func detaching(_ session: Int, context: inout HostContext)
    /// A session is leaving and nothing of it is at the device any more; take back what
    /// the device was given for it.
    mutating func removing(_ session: Int, context: inout HostContext)
    /// What the device held of `session` is gone with the device: forget it.
    mutating func forget(_ session: Int, context: inout HostContext)
    /// Whether what is at the device can still come back (false: forget it instead).
    var deviceConnected: Bool { get }
}

/// Block class: the host takes requests off the sessions' queues, checks them against
/// `limits` (`BlockLimits.check`, the one range check) and hands each to `start`, which
/// either finishes it at once or leaves it at the device; such a request ends later with
/// `SessionTable.finish` from `poll`. The data path (`serve`) and the session half of
/// the sleep rule are written once, below, for every block device.
protocol BlockDeviceServer: DeviceServer, ~Copyable {
    /// The device's limits, nil while there is no usable device.
    var limits: BlockLimits? { get }
    /// Requests the device can take now.
    var room: Int { get }

    /// Starts request `r` of session `session` (already checked against `limits`).
    /// Returns the status it ends with now, or nil when it went to the device (it then
    /// ends through `context.sessions.finish`).
    mutating func start(_ r: BlockRequest, session: Int, context: inout BlockContext) -> BlockStatus?
    /// After a batch of `start`s: make them visible to the device.
    mutating func publish(context: inout BlockContext)
    /// Takes what the device finished; returns how many.
    mutating func poll(context: inout BlockContext) -> Int

    /// The device's half of the sleep rule: ask it for a notification; false if there is
    /// already work. `deviceWoke`: after the sleep.
    mutating func prepareDeviceToSleep() -> Bool
    mutating func deviceWoke()
}

extension BlockDeviceServer where Self: ~Copyable {
    /// A block request at the device always finishes: nothing to do but wait for it.
    mutating func detaching(_ session: Int, context: inout HostContext) {}
}

extension BlockDeviceServer where Self: ~Copyable {
    static var deviceClass: DeviceClass { .block }
    static var idlePollsBeforeYield: Int? { nil }

    mutating func serve(context: inout BlockContext) -> Int {
        var work = poll(context: &context)
        if work > 0 { context.sessions.flush(page: context.page) }
        work += serveSessions(context: &context)
        return work
    }

    /// Takes requests from every session (a batch each, as far as the device has room),
    /// starts them, publishes once, and publishes the completions.
    mutating func serveSessions(context: inout BlockContext) -> Int {
        guard let limits else { return 0 }
        var total = 0
        let n = SessionTable.capacity
        let batch = context.sessions.requestBuffer
        let generation = context.generation
        for step in 0..<n {
            let i = (context.sessions.next + step) % n
            guard context.sessions.isActive(i) else { continue }
            let deviceRoom = min(batch.count, room)
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
                if context.sessions.block[i].hasFailed, let e = context.sessions.block[i].failure {
                    context.sessions.drops.append((i, e.description))
                } else if !context.sessions.block[i].requests.isEmpty(), context.sessions.allowance(i) == 0 {
                    context.sessions.drops.append((i, "more requests than the queue depth of \(context.sessions.block[i].queueDepth)"))
                }
                continue
            }
            let got = context.sessions.block[i].requests.dequeue(into: UnsafeMutableBufferPointer(rebasing: batch[0..<min(deviceRoom, allowance)]))
            if got == 0 {
                if context.sessions.block[i].hasFailed, let e = context.sessions.block[i].failure {
                    context.sessions.drops.append((i, e.description))
                }
                continue
            }
            total += got
            let index = context.sessions.block[i].tableIndex
            let writable = context.sessions.block[i].writable
            // In use before any translation is read: the manager marks an entry revoking
            // before it reads our mark, so either it sees the mark and waits, or we see the
            // revocation (DriverPage.markInUse).
            if context.sessions.inFlight[i] == 0 { context.page.markInUse(index) }
            for k in 0..<got {
                let r = batch[k]
                if context.table.abortGeneration == generation {
                    // Fault injection: die inside request handling, as a driver bug would.
                    abort()
                }
                if let status = limits.check(r, writable: writable) {
                    context.sessions.complete(i, tag: r.tag, status: status, generation: generation)
                } else if let status = start(r, session: i, context: &context) {
                    context.sessions.complete(i, tag: r.tag, status: status, generation: generation)
                } else {
                    context.sessions.inFlight[i] += 1
                }
            }
            if context.sessions.inFlight[i] == 0 { context.page.clearInUse(index) }
        }
        context.sessions.next = (context.sessions.next + 1) % n
        if total > 0 {
            publish(context: &context)
            context.sessions.flush(page: context.page)
        }
        return total
    }

    /// Stay awake only for work that can be taken now. Requests are such work only while
    /// the device has room: without a device (nothing can serve them until the manager
    /// hands over a connection, which only the sleep receives) or with its queue full (only
    /// a completion, which the device's notification reports, makes room), staying awake
    /// for them would spin without reading the manager or the device.
    mutating func prepareToSleep(context: inout BlockContext) -> Bool {
        var sleep = true
        if room > 0 {
            for i in 0..<SessionTable.capacity where context.sessions.isActive(i) {
                if !context.sessions.block[i].requests.prepareToSleep()
                    && !context.sessions.block[i].requests.hasFailed { sleep = false }
            }
        }
        if !prepareDeviceToSleep() { sleep = false }
        return sleep
    }

    mutating func woke(context: inout BlockContext) {
        // Withdrawn everywhere (cheap where none was asked for): `room` may have changed.
        for i in 0..<SessionTable.capacity where context.sessions.isActive(i) {
            context.sessions.block[i].requests.cancelSignal()
        }
        deviceWoke()
    }
}

/// Epoll tokens of a driver process.
enum HostToken {
    static let manager: UInt64 = 0
    /// 1 to 15: the server's own descriptors.
    static let deviceFirst: UInt64 = 1
    static let session: UInt64 = 16
}

/// A block device's limits, which every request is checked against, once, by the host.
struct BlockLimits: Equatable, Sendable {
    /// Size in 512-byte sectors.
    var blockCount: UInt64
    var maxTransfer: UInt32
    var flags: DeviceFlags
    var maxDiscardSectors: UInt32 = 0
    var maxWriteZeroesSectors: UInt32 = 0

    /// Checks what the device cannot check for us: a known op, lengths whole sectors and
    /// within the transfer limit, the whole range on the device (a request that starts
    /// before the end and runs past it is refused, as is one starting at the end), writes
    /// only on writable sessions and devices, and optional operations only where offered.
    /// Returns the status to end the request with, or nil if it may go on.
    func check(_ r: BlockRequest, writable: Bool) -> BlockStatus? {
        guard let op = BlockOp(rawValue: r.op) else { return .unsupported }
        let sector = UInt64(blockSectorSize)
        if op == .flush { return nil }
        guard r.length > 0, UInt64(r.length) % sector == 0, r.sector < blockCount,
              UInt64(r.length) / sector <= blockCount - r.sector else { return .invalid }
        if op != .read && (!writable || flags.contains(.readOnly)) { return .readOnly }
        if op.hasBuffer {
            guard r.length <= maxTransfer else { return .invalid }
        } else {
            guard flags.contains(op == .discard ? .discard : .writeZeroes) else { return .unsupported }
            let limit = op == .discard ? maxDiscardSectors : maxWriteZeroesSectors
            guard UInt64(r.length) / sector <= UInt64(limit == 0 ? UInt32.max : limit) else { return .invalid }
        }
        return nil
    }
}
