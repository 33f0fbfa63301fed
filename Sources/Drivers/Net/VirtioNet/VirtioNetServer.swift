import OutboardRings
import OutboardSession
import OutboardSystem
import SystemPackage
import Virtio

#if canImport(Glibc)
import Glibc
#endif

extension NetServerEndpoint: ServedSession {
    static var deviceClass: DeviceClass { .net }
    static func make(_ a: Attach, _ d: inout ControlDelivery, start: DriverStart,
                     keepDataDescriptor: Bool) throws(SessionSetupError) -> NetServerEndpoint {
        let mtu = start.net?.mtu ?? 1500
        return try NetServerEndpoint(a, queues: d.take(0), data: d.take(1), requestBell: d.take(2), completionBell: d.take(3),
                                     maxFrame: NetInfo(mac: MACAddress(rawValue: 0), mtu: mtu).maxFrame,
                                     keepDataDescriptor: keepDataDescriptor)
    }
    var dataBase: UnsafeMutableRawPointer { data.base }
    var dataSize: Int { data.size }
    var requestBellFD: FileDescriptor { requestBell.fd.raw }
    mutating func producerIdle() {
        // A client waiting for frames or buffers hears of the pause through the manager
        // (the session's generation), not through a ring here.
    }
}

/// Serves net sessions on a virtio-net device reached through a connection the manager
/// opened and handed over (virtio 1.2 §5.1; the device logic is `VirtioNetDevice`), generic
/// over the transport (vhost-user now).
///
/// Zero-copy both ways: every session's data region is exposed to the device at its
/// translation-table IO address, receive chains point at the client's empty buffers and
/// transmit chains at the client's frames. Only the rings and the virtio-net headers live
/// in the driver's own memory (the manager's DMA region).
///
/// Each buffer at the device is a record (session, the client's descriptor) in a slot of
/// its queue. When the device goes away, receive buffers stay recorded and are posted
/// again on the next connection; frames that were being sent are given back to their
/// session as sent (a NIC that resets loses its transmit ring: the frame may or may not
/// have left, and is never sent twice or corrupted).
struct VirtioNetServer<Link: HandedOverTransport & ~Copyable>: ~Copyable, DeviceServer {
    static var deviceClass: DeviceClass { .net }
    static var keepsDataDescriptors: Bool { true }
    static var receiveCallToken: UInt64 { HostToken.deviceFirst }
    static var socketToken: UInt64 { HostToken.deviceFirst + 1 }
    static var configToken: UInt64 { HostToken.deviceFirst + 2 }
    static var transmitCallToken: UInt64 { HostToken.deviceFirst + 3 }

    var device: VirtioNetDevice<Link>
    let dma: DMARegion
    let mode: NotifyMode
    let pollWindow: UInt64
    let parameters: NetParameters
    var connected = false
    var socketFD: CInt = -1
    /// When the last pass received a frame from the device (adaptive mode's window for
    /// reception).
    var lastReceived: UInt64 = 0
    /// The largest frame the device takes (its MTU's), valid while connected.
    var maxFrame: UInt32 = 0

    /// Buffers at the device (or waiting for it after a lost connection), by slot.
    let rxRecords: UnsafeMutablePointer<Record>
    let txRecords: UnsafeMutablePointer<Record>
    let rxFreeSlots: UnsafeMutablePointer<UInt16>
    let txFreeSlots: UnsafeMutablePointer<UInt16>
    var rxFreeCount: Int
    var txFreeCount: Int
    let queueSize: Int
    /// Where each session's region is exposed to the device on this connection.
    var exposedAt: [IOAddress?] = Array(repeating: nil, count: SessionTable.capacity)
    /// Frames given back unsent because the device connection was lost under them.
    var transmitLost: UInt64 = 0

    struct Record {
        var active = false
        var session = 0
        var buffer = BufferDescriptor(offset: RegionOffset(rawValue: 0), length: 0)
    }

    /// The DMA region: kept open (the transport exposes it by descriptor) and mapped.
    struct DMARegion: ~Copyable {
        let region: SharedRegion
        let mapping: SharedMapping
    }

    init(start cfg: DriverStart, memory: consuming OwnedFD, link: consuming Link,
         context: borrowing HostContext) throws(DriverError) {
        guard cfg.virtio != nil else { throw .setup("the virtio-net driver got transport \(cfg.transport)") }
        guard let net = cfg.net else { throw .setup("the virtio-net driver got class parameters \(cfg.deviceClass)") }
        guard cfg.queueSize >= 8, cfg.queueSize <= 1024, cfg.queueSize.nonzeroBitCount == 1 else {
            throw .setup("queue size \(cfg.queueSize): a power of two in 8...1024")
        }
        let region: SharedRegion
        do { region = try SharedRegion(adopting: memory, minimumSize: 1) } catch { throw .setup("DMA region: \(error)") }
        let mapping: SharedMapping
        do { mapping = try region.map(.readWrite) } catch { throw .setup("mapping the DMA region: \(error)") }
        let dev: VirtioNetDevice<Link>
        do {
            dev = try VirtioNetDevice(transport: link, memory: mapping.base, size: mapping.size, ioAddress: cfg.dmaIOAddress,
                                      queueSize: Int(cfg.queueSize))
        } catch {
            throw .setup("\(error)")
        }
        do {
            // Edge-triggered, never read: a wake-up is all a notification means.
            try context.epoll.add(FileDescriptor(rawValue: dev.transport.interruptDescriptor(VirtioNetQueue.receive.rawValue)),
                                  events: [.readable, .edgeTriggered], token: Self.receiveCallToken)
            try context.epoll.add(FileDescriptor(rawValue: dev.transport.interruptDescriptor(VirtioNetQueue.transmit.rawValue)),
                                  events: [.readable, .edgeTriggered], token: Self.transmitCallToken)
            let config = dev.transport.configChangeDescriptor
            if config >= 0 {
                try context.epoll.add(FileDescriptor(rawValue: config), events: [.readable, .edgeTriggered], token: Self.configToken)
            }
        } catch {
            throw .setup("epoll: \(error)")
        }
        device = dev
        dma = DMARegion(region: region, mapping: mapping)
        parameters = net
        mode = cfg.notifyMode
        pollWindow = UInt64(cfg.pollMicroseconds) * 1000
        let size = Int(cfg.queueSize)
        queueSize = size
        rxRecords = .allocate(capacity: size)
        rxRecords.initialize(repeating: Record(), count: size)
        txRecords = .allocate(capacity: size)
        txRecords.initialize(repeating: Record(), count: size)
        rxFreeSlots = .allocate(capacity: size)
        txFreeSlots = .allocate(capacity: size)
        for i in 0..<size {
            rxFreeSlots[i] = UInt16(size - 1 - i)
            txFreeSlots[i] = UInt16(size - 1 - i)
        }
        rxFreeCount = size
        txFreeCount = size
    }

    deinit {
        rxRecords.deallocate()
        txRecords.deallocate()
        rxFreeSlots.deallocate()
        txFreeSlots.deallocate()
    }

    var deviceConnected: Bool { connected }

    // MARK: the device connection

    /// Sets the device up on a fresh connection (§3.1.1 through the transport), exposes
    /// the DMA region and every session's region, starts both queues, posts the receive
    /// buffers recorded and gives back the frames that were being sent.
    mutating func connect(_ fd: consuming OwnedFD, context: inout HostContext) {
        if connected { drop() }
        do {
            try device.transport.connect(fd)
        } catch {
            context.reportDeviceLost("device handshake failed: \(error)", Self.recovery(error))
            return
        }
        let socket = device.transport.connectionDescriptor
        do {
            context.page.beat()
            let info = try device.negotiate(eventIdx: mode != .interrupt, fallbackMAC: parameters.mac.bytes,
                                            fallbackMTU: parameters.mtu)
            context.page.beat()
            try device.transport.expose(device.deviceMemory(fd: dma.region.fd.raw.rawValue))
            for i in 0..<SessionTable.capacity { exposedAt[i] = nil }
            for i in 0..<SessionTable.capacity where context.sessions.isActive(i) {
                if let refusal = try expose(i, context: &context) { context.sessions.drops.append((i, refusal)) }
                context.page.beat()
            }
            try device.start(notificationsOff: mode == .adaptive || mode == .poll)
            if socket >= 0 { try context.epoll.add(FileDescriptor(rawValue: socket), events: .readable, token: Self.socketToken) }
            // Frames the device takes: its MTU's, never more than sessions were sized for.
            maxFrame = UInt32(min(info.maxFrameLength, Int(NetInfo(mac: parameters.mac, mtu: parameters.mtu).maxFrame)))
            let mac = MACAddress(bytes: info.mac) ?? parameters.mac
            try? context.manager.send(.deviceInfo(.net(NetInfo(mac: mac, mtu: min(info.mtu, parameters.mtu),
                                                                linkUp: info.linkUp ?? true))))
        } catch let e as VirtioNetError {
            device.transport.disconnect()
            context.reportDeviceLost("device set-up failed: \(e)", Self.recovery(e))
            return
        } catch let e as VirtioTransportError {
            device.transport.disconnect()
            context.reportDeviceLost("device set-up failed: \(e)", Self.recovery(e))
            return
        } catch {
            device.transport.disconnect()
            context.reportDeviceLost("device set-up failed: \(error)")
            return
        }
        socketFD = socket
        connected = true
        resubmitAll(context: &context)
    }

    static func recovery(_ e: VirtioTransportError) -> Recovery {
        if case .unsupported = e { return .failDevice }
        return .reconnectDevice
    }

    static func recovery(_ e: VirtioNetError) -> Recovery {
        switch e {
        case .unsupported, .setup: return .failDevice
        case .transport(let t): return recovery(t)
        case .device: return .reconnectDevice
        }
    }

    /// Exposes session `i`'s data region at its translation-table IO address. Returns why
    /// the session cannot be served, or throws if the connection failed.
    mutating func expose(_ i: Int, context: inout HostContext) throws(VirtioTransportError) -> String? {
        let ep = context.sessions.net
        guard let e = context.table.readPatiently(ep[i].tableIndex), e.state == .active, e.sessionID == ep[i].sessionID,
              e.length > 0 else {
            return "its region is not active in the translation table"
        }
        do throws(VirtioTransportError) {
            try device.transport.expose(DeviceMemory(ioAddress: e.ioAddress, size: ep[i].data.size, base: ep[i].data.base,
                                                     fd: ep[i].dataFD))
        } catch .noMemorySlot(let limit) {
            return "the device has \(limit) memory slots and one is the driver's: no slot left for this session"
        } catch .refused(let why) {
            return "the device refused its region: \(why)"
        }
        exposedAt[i] = e.ioAddress
        return nil
    }

    /// The connection is unusable: drop it and ask the manager for another. Receive
    /// buffers stay recorded for the next connection.
    mutating func lose(_ reason: String, context: inout HostContext) {
        if connected {
            if socketFD >= 0 { try? context.epoll.remove(FileDescriptor(rawValue: socketFD)) }
            drop()
        }
        context.reportDeviceLost(reason)
    }

    mutating func drop() {
        device.transport.disconnect()
        socketFD = -1
        connected = false
        for i in 0..<SessionTable.capacity { exposedAt[i] = nil }
    }

    /// After (re)connecting: frames that were being sent go back to their sessions as sent
    /// (the old device may or may not have sent them; sending them again could send one
    /// twice), and every recorded receive buffer is posted again.
    mutating func resubmitAll(context: inout HostContext) {
        for k in 0..<queueSize where txRecords[k].active {
            transmitLost &+= 1
            finishTransmit(k, context: &context)
        }
        for k in 0..<queueSize where rxRecords[k].active {
            let i = rxRecords[k].session
            if !context.sessions.isActive(i) || !post(k, context: &context) {
                returnUnused(k, context: &context)
            }
        }
        if device.publish(.receive) { context.page.add(.kicks) }
        flush(context: &context)
    }

    // MARK: data path

    mutating func serve(context: inout HostContext) -> Int {
        guard connected else { return 0 }
        var work = poll(context: &context)
        work += takeFromSessions(context: &context)
        if work > 0 { flush(context: &context) }
        return work
    }

    /// What the device finished: sent frames' buffers and received frames back to their
    /// sessions (staged; `flush` publishes).
    mutating func poll(context: inout HostContext) -> Int {
        var n = 0
        while let k = device.nextTransmitted() {
            guard txRecords[k].active else { continue }
            finishTransmit(k, context: &context)
            n += 1
        }
        var reposted = false
        var received = 0
        while let r = device.nextReceived() {
            let k = r.slot
            guard rxRecords[k].active else { continue }
            n += 1
            received += 1
            let i = rxRecords[k].session
            if r.status == .ok {
                var d = rxRecords[k].buffer
                d.length = r.length
                finishReceive(k, d, context: &context)
            } else if context.sessions.isActive(i) && post(k, context: &context) {
                // Dropped by the device logic (it did not hold to the protocol for this
                // frame): the buffer is the session's still, and goes straight back.
                reposted = true
            } else {
                returnUnused(k, context: &context)
            }
        }
        if reposted, device.publish(.receive) { context.page.add(.kicks) }
        if received > 0 && mode == .adaptive { lastReceived = Clock.monotonicNanoseconds }
        if let e = device.error { lose("device broke a virtqueue: \(e)", context: &context) }
        return n
    }

    mutating func finishTransmit(_ k: Int, context: inout HostContext) {
        let i = txRecords[k].session
        txRecords[k].active = false
        txFreeSlots[txFreeCount] = UInt16(k)
        txFreeCount += 1
        context.sessions.inFlight[i] -= 1
        context.sessions.net[i].txHeld -= 1
        if context.sessions.isActive(i) { context.sessions.net[i].stageSent(txRecords[k].buffer) }
    }

    mutating func finishReceive(_ k: Int, _ d: BufferDescriptor, context: inout HostContext) {
        let i = rxRecords[k].session
        rxRecords[k].active = false
        rxFreeSlots[rxFreeCount] = UInt16(k)
        rxFreeCount += 1
        context.sessions.inFlight[i] -= 1
        context.sessions.net[i].rxHeld -= 1
        if context.sessions.isActive(i) { context.sessions.net[i].stageReceived(d) }
    }

    /// A receive buffer that cannot go to the device (its session is leaving, its region's
    /// translation ended): back to the session empty (length 0).
    mutating func returnUnused(_ k: Int, context: inout HostContext) {
        var d = rxRecords[k].buffer
        d.length = 0
        finishReceive(k, d, context: &context)
    }

    /// Takes frames to send and empty buffers from every session, as far as the device
    /// and the session's depth allow, and publishes both queues once.
    mutating func takeFromSessions(context: inout HostContext) -> Int {
        // Round robin over the occupied slots only.
        let n = context.sessions.span
        guard n > 0 else { return 0 }
        let batch = UnsafeMutableBufferPointer(start: context.sessions.scratch.bindMemory(to: BufferDescriptor.self, capacity: SessionTable.batch),
                                               count: SessionTable.batch)
        let generation = context.generation
        var sent = 0, posted = 0
        for step in 0..<n {
            let i = (context.sessions.next + step) % n
            guard context.sessions.isActive(i), exposedAt[i] != nil else { continue }
            let index = context.sessions.net[i].tableIndex
            if context.sessions.inFlight[i] == 0 { context.page.markInUse(index) }
            // The session's translation, read once for what this pass takes of it (after
            // the in-use mark), when it takes anything.
            var grant: SessionGrant? = nil
            // Empty buffers for the device to fill, before frames go out: an answer (a peer
            // that returns frames at once, as testpmd's macswap does) finds them posted.
            let rxRoom = min(batch.count, device.receiveRoom, rxFreeCount, context.sessions.net[i].receiveAllowance())
            if rxRoom > 0 {
                let got = context.sessions.net[i].rxFree.dequeue(into: UnsafeMutableBufferPointer(rebasing: batch[0..<rxRoom]))
                if got > 0 && grant == nil { grant = context.sessions.grant(i, table: context.table) }
                for k in 0..<got { if receiveInto(i, batch[k], grant: grant!, context: &context) { posted += 1 } }
            } else if context.sessions.net[i].receiveAllowance() == 0 {
                checkOverrun(i, transmit: false, context: &context)
            }
            // Frames to send.
            let txRoom = min(batch.count, device.transmitRoom, txFreeCount, context.sessions.net[i].transmitAllowance())
            if txRoom > 0 {
                let got = context.sessions.net[i].txActive.dequeue(into: UnsafeMutableBufferPointer(rebasing: batch[0..<txRoom]))
                if got > 0 && context.table.abortGeneration == generation { abort() }
                if got > 0 && grant == nil { grant = context.sessions.grant(i, table: context.table) }
                for k in 0..<got { if transmit(i, batch[k], grant: grant!, context: &context) { sent += 1 } }
            } else if context.sessions.net[i].transmitAllowance() == 0 {
                checkOverrun(i, transmit: true, context: &context)
            }
            if context.sessions.net[i].hasFailed, let e = context.sessions.net[i].failure {
                context.sessions.drops.append((i, e.description))
            }
            if context.sessions.inFlight[i] == 0 { context.page.clearInUse(index) }
        }
        context.sessions.next = (context.sessions.next % n + 1) % n
        if posted > 0, device.publish(.receive) { context.page.add(.kicks) }
        if sent > 0, device.publish(.transmit) { context.page.add(.kicks) }
        return sent + posted
    }

    /// A session with no allowance left and an entry waiting has more buffers out than its
    /// depth: dropped (after reading the room once more, as the block class does: the
    /// client takes an entry before it hands back the buffer, so the room shows by then).
    mutating func checkOverrun(_ i: Int, transmit: Bool, context: inout HostContext) {
        let waiting = transmit ? !context.sessions.net[i].txActive.isEmpty() : !context.sessions.net[i].rxFree.isEmpty()
        guard waiting else { return }
        let again = transmit ? context.sessions.net[i].transmitAllowance() : context.sessions.net[i].receiveAllowance()
        if again == 0 {
            let what = transmit ? "frames" : "receive buffers"
            context.sessions.drops.append((i, "more \(what) than the queue depth of \(context.sessions.net[i].queueDepth)"))
        }
    }

    /// One frame of session `i` to the device, its buffer translated right before (by the
    /// session's `grant` for this batch). A frame that cannot go (longer than the device's
    /// MTU allows, outside the grant) comes back at once, unsent, as a NIC drops a frame it
    /// cannot send.
    mutating func transmit(_ i: Int, _ d: BufferDescriptor, grant: SessionGrant, context: inout HostContext) -> Bool {
        var io: IOAddress? = nil
        if d.length <= maxFrame, case .granted(let a, _) = grant.translate(offset: d.offset, length: d.length, deviceWrites: false) {
            io = a
        }
        txFreeCount -= 1
        let k = Int(txFreeSlots[txFreeCount])
        txRecords[k] = Record(active: true, session: i, buffer: d)
        context.sessions.inFlight[i] += 1
        context.sessions.net[i].txHeld += 1
        guard let io, device.transmit(slot: k, buffer: io, length: d.length) else {
            finishTransmit(k, context: &context)
            return false
        }
        context.page.add(.submitted)
        return true
    }

    /// One empty buffer of session `i` to the device (translated by the session's `grant`
    /// for this batch).
    mutating func receiveInto(_ i: Int, _ d: BufferDescriptor, grant: SessionGrant, context: inout HostContext) -> Bool {
        rxFreeCount -= 1
        let k = Int(rxFreeSlots[rxFreeCount])
        rxRecords[k] = Record(active: true, session: i, buffer: d)
        context.sessions.inFlight[i] += 1
        context.sessions.net[i].rxHeld += 1
        guard post(k, grant: grant, context: &context) else {
            returnUnused(k, context: &context)
            return false
        }
        return true
    }

    /// Receive slot `k`'s buffer to the device, translated right before (device writes),
    /// by `grant` when a batch has one for the session, else on its own.
    mutating func post(_ k: Int, grant: SessionGrant? = nil, context: inout HostContext) -> Bool {
        let i = rxRecords[k].session
        let d = rxRecords[k].buffer
        guard exposedAt[i] != nil else { return false }
        let g = grant ?? context.sessions.grant(i, table: context.table)
        guard case .granted(let io, _) = g.translate(offset: d.offset, length: d.length, deviceWrites: true) else { return false }
        return device.postReceive(slot: k, buffer: io, length: d.length)
    }

    /// Publishes what is staged for every session, one batch and at most one doorbell each.
    mutating func flush(context: inout HostContext) {
        for i in 0..<context.sessions.span where context.sessions.occupied[i] {
            guard context.sessions.net[i].stagedRxCount + context.sessions.net[i].stagedTxCount > 0 else { continue }
            guard context.sessions.isActive(i) else {
                context.sessions.net[i].stagedRxCount = 0
                context.sessions.net[i].stagedTxCount = 0
                continue
            }
            let signals = context.sessions.net[i].signalsSent
            if let n = context.sessions.net[i].flush() {
                context.page.addCompleted(n)
            } else {
                context.sessions.drops.append((i, context.sessions.net[i].failure?.description
                    ?? "a queue to the client was full: it had more buffers out than its depth"))
            }
            context.page.add(.signals, context.sessions.net[i].signalsSent &- signals)
        }
    }

    // MARK: sleep rule

    /// Spinning, the driver yields the CPU once 16 polls in a row (a few microseconds) found
    /// nothing after it gave its clients something, not at every idle poll: while the
    /// device keeps finishing frames the driver goes on collecting them, and a client
    /// polling on the same CPU then finds a batch each time it runs, instead of the two
    /// trading the CPU for nothing while the device works.
    static var idlePollsBeforeYield: Int? { 16 }

    /// Adaptive: within the window after the last work, the driver polls while the device
    /// holds frames to send (their completions are due, the device works on its own CPU)
    /// and while frames are arriving; a transmit load with nothing left at the device goes
    /// to sleep at once, for the client's doorbell, instead of spinning through the gap
    /// before its next burst (a paced client's bursts come about as far apart as the
    /// window, and a spin that long costs more than a wake-up).
    func shouldSpin(lastWork: UInt64) -> Bool {
        guard connected else { return false }
        switch mode {
        case .poll: return device.receivePosted > 0 || device.transmitInFlight > 0
        case .adaptive:
            let now = Clock.monotonicNanoseconds
            return (device.transmitInFlight > 0 && now &- lastWork < pollWindow) || now &- lastReceived < pollWindow
        case .interrupt, .eventIndex: return false
        }
    }

    /// Asks for what can be taken now: frames from sessions while the transmit queue has
    /// room, empty buffers while the receive queue has room; from the device, a received
    /// frame (at once) and sent frames (after half of those in flight: their buffers are
    /// not urgent, unless the client is waiting for the last of them).
    mutating func prepareToSleep(context: inout HostContext) -> Bool {
        var sleep = true
        guard connected else { return true }
        let txRoom = device.transmitRoom > 0 && txFreeCount > 0
        let rxRoom = device.receiveRoom > 0 && rxFreeCount > 0
        for i in 0..<context.sessions.span where context.sessions.isActive(i) {
            if txRoom && !context.sessions.net[i].txActive.prepareToSleep() && !context.sessions.net[i].txActive.hasFailed { sleep = false }
            if rxRoom && !context.sessions.net[i].rxFree.prepareToSleep() && !context.sessions.net[i].rxFree.hasFailed { sleep = false }
        }
        if device.receivePosted > 0 && device.enableNotifications(.receive, after: 1) { sleep = false }
        let sending = device.transmitInFlight
        if sending > 0 && device.enableNotifications(.transmit, after: max(1, sending / 2)) { sleep = false }
        return sleep
    }

    mutating func woke(context: inout HostContext) {
        for i in 0..<context.sessions.span where context.sessions.isActive(i) {
            context.sessions.net[i].txActive.cancelSignal()
            context.sessions.net[i].rxFree.cancelSignal()
        }
        if connected && (mode == .adaptive || mode == .poll) {
            device.disableNotifications(.receive)
            device.disableNotifications(.transmit)
        }
    }

    mutating func event(_ token: UInt64, context: inout HostContext) {
        switch token {
        case Self.receiveCallToken, Self.transmitCallToken:
            context.page.add(.interrupts)
        case Self.socketToken:
            if connected { lose("the device closed the connection", context: &context) }
        case Self.configToken:
            guard connected else { break }
            switch Result(catching: { () throws(VirtioTransportError) in try device.transport.status() }) {
            case .success(let s) where s.contains(.deviceNeedsReset):
                lose("the device needs a reset (DEVICE_NEEDS_RESET, status \(s))", context: &context)
            case .success:
                break  // a link status change; sessions keep what they opened with
            case .failure(let e):
                lose("reading the device status after a configuration change: \(e)", context: &context)
            }
        default:
            break
        }
    }

    // MARK: sessions

    mutating func attached(_ i: Int, context: inout HostContext) -> String? {
        guard connected else { return nil }
        do {
            return try expose(i, context: &context)
        } catch {
            lose("exposing session \(context.sessions.net[i].sessionID)'s region: \(error)", context: &context)
            return nil
        }
    }

    /// A session is leaving. Its frames being sent finish by themselves, but its receive
    /// buffers would wait at the device for traffic that may never come, and virtio has no
    /// way to take a posted buffer back short of a reset: the connection is dropped (the
    /// device lets go of everything), the leaving session's buffers are forgotten, and the
    /// others' are posted again on the next connection.
    mutating func detaching(_ i: Int, context: inout HostContext) {
        guard connected, context.sessions.net[i].rxHeld > 0 else { return }
        lose("taking back the receive buffers of a leaving session", context: &context)
    }

    /// Nothing of a leaving session is at the device any more: its region is withdrawn.
    mutating func removing(_ i: Int, context: inout HostContext) {
        guard let io = exposedAt[i] else { return }
        exposedAt[i] = nil
        guard connected else { return }
        do { try device.transport.withdraw(io) } catch {
            lose("withdrawing session \(context.sessions.net[i].sessionID)'s region: \(error)", context: &context)
        }
    }

    mutating func forget(_ i: Int, context: inout HostContext) {
        for k in 0..<queueSize where rxRecords[k].active && rxRecords[k].session == i {
            rxRecords[k].active = false
            rxFreeSlots[rxFreeCount] = UInt16(k)
            rxFreeCount += 1
            context.sessions.net[i].rxHeld -= 1
        }
        for k in 0..<queueSize where txRecords[k].active && txRecords[k].session == i {
            txRecords[k].active = false
            txFreeSlots[txFreeCount] = UInt16(k)
            txFreeCount += 1
            context.sessions.net[i].txHeld -= 1
        }
    }
}
