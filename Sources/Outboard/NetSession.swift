import OutboardRings
import OutboardSession
import OutboardSystem
import SystemPackage

/// A transmit buffer this session handed out (`NetSession.transmitBuffer()`,
/// `transmit(max:_:)`): fill `bytes` from the start with one Ethernet frame, then send it by
/// `index`. A plain value: no allocation, no reference counting.
@frozen
public struct TransmitBuffer {
    /// The transmit buffer's number, 0..<queueDepth.
    public let index: Int
    /// Where the frame goes: inside the session's data region.
    public let pointer: UnsafeMutableRawPointer
    /// The largest frame the session sends (`NetInfo.maxFrame`), at most the buffer's size.
    public let capacity: Int

    @inlinable public var bytes: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: pointer, count: capacity) }
}

/// A buffer descriptor as this client reads it from txFree and rxActive. The queue admits
/// whatever the driver wrote; the session checks every entry against its own record of
/// which of its buffers are out, a stricter rule than any region bounds, so that a bad
/// entry is counted and skipped instead of stopping the queue.
struct ReturnedDescriptor: QueueEntry {
    typealias Bounds = Int  // unused: every entry is admitted
    var descriptor: BufferDescriptor

    @inline(__always)
    static func fetchOnce(_ slot: UnsafePointer<Self>) -> Self {
        // Same layout (one stored BufferDescriptor): read as BufferDescriptor reads itself.
        ReturnedDescriptor(descriptor: BufferDescriptor.fetchOnce(UnsafeRawPointer(slot).assumingMemoryBound(to: BufferDescriptor.self)))
    }
    static func admits(_ entry: Self, within bounds: Int) -> Bool { true }
    static func rejection(_ entry: Self, within bounds: Int) -> QueueError { .entryRejected("never refused") }
}

/// A client's net session: the `Outboard` library's network API, one Ethernet port.
///
/// The data region holds `queueDepth` receive buffers, then `queueDepth` transmit buffers,
/// `bufferBytes` each; it is registered with the device once, and frames never leave it.
/// Four queues (`NetQueueLayout`) move the buffers between this client and the driver:
/// receive buffers go out empty on rxFree and come back holding a frame on rxActive;
/// transmit buffers go out holding a frame on txActive and come back on txFree. Every
/// buffer is either here or out at the driver, so no queue can overflow.
///
/// Sending: take a buffer (`transmitBuffer()`), write a frame into it, `send` it (staged,
/// checked: 14...`info.maxFrame` bytes), then `flush()` publishes what is staged with one
/// store and rings the driver only if it asked. `transmit(max:_:)` does all three for a
/// burst. Sent buffers come back on txFree and are free again.
///
/// Receiving: `receive(max:_:)` hands each frame to a closure as a view of its buffer, then
/// gives the buffers back to the driver in one batch.
///
/// Everything read from the queues is hostile: an rxActive entry must name a receive buffer
/// of this session that is out at the driver (offset `index x bufferBytes`, cookie `index`)
/// and hold 14...`bufferBytes` bytes; a txFree entry must name a transmit buffer that is out
/// (offset `(queueDepth + index) x bufferBytes`, cookie `index`). Anything else is skipped
/// and counted in `strayEntries` (an rxActive entry that names a buffer that is out but
/// holds an impossible length gives that buffer back with its frame dropped).
///
/// Recovery: when the driver was replaced (the generation on the header page moves and the
/// manager sends new queues), the session takes the new queues, gives every receive buffer
/// to the new driver, and drops the frames that were out for transmission and not given
/// back on the old txFree, as a NIC loses its transmit ring when it resets: their buffers
/// are free again, counted in `txDroppedInRecovery`. A frame is never sent twice, and never
/// altered. Frames sent but
/// not yet flushed are still here and go to the new driver at the next flush.
public struct NetSession: ~Copyable {
    /// The port as this session sees it: MAC, MTU, link.
    public let info: NetInfo
    var link: SessionLink
    var txActive: QueueProducer<BufferDescriptor>
    var txFree: QueueConsumer<ReturnedDescriptor>
    var rxFree: QueueProducer<BufferDescriptor>
    var rxActive: QueueConsumer<ReturnedDescriptor>
    /// Buffers per direction.
    public let queueDepth: Int
    /// Bytes per buffer.
    public let bufferBytes: Int

    /// Frames published on txActive.
    public private(set) var framesSent: UInt64 = 0
    /// Frames handed to `receive`'s closure.
    public private(set) var framesReceived: UInt64 = 0
    /// Transmitted frames dropped because the driver was replaced while they were out (not
    /// given back on the old txFree).
    public private(set) var txDroppedInRecovery: UInt64 = 0
    /// Queue entries from the driver that named no buffer of ours that was out (or held an
    /// impossible length): skipped.
    public private(set) var strayEntries: UInt64 = 0
    /// Request doorbells this session rang (the driver asked for each, or was new).
    public private(set) var doorbellsRung: UInt64 = 0

    /// The session as the server opened it (common part).
    public var opened: SessionOpened { link.opened }
    /// Driver generation of the queues in use.
    public var generation: UInt64 { link.generation }
    /// How many times the session moved to a restarted driver.
    public var recoveries: Int { link.recoveries }

    // Private records, preallocated: nothing is allocated per frame.
    /// Per receive buffer: 1 while it is out at the driver.
    let rxOut: UnsafeMutablePointer<UInt8>
    /// Per transmit buffer: a TxState.
    let txState: UnsafeMutablePointer<UInt8>
    /// Free transmit buffers (a stack of indices).
    let txFreeList: UnsafeMutablePointer<Int32>
    var txFreeCount: Int
    var txOutCount = 0
    /// Sent but not yet flushed, in send order.
    let staged: UnsafeMutablePointer<BufferDescriptor>
    var stagedCount = 0
    let scratch: UnsafeMutableBufferPointer<ReturnedDescriptor>
    let reposts: UnsafeMutablePointer<BufferDescriptor>
    /// `armWakeUp` asked for doorbells that `disarm` withdraws.
    var armed = false

    enum TxState: UInt8 { case free = 0, held = 1, staged = 2, out = 3 }

    /// Connects to the manager (or a virtualizer) at `socketPath` and opens a session on
    /// the net device `device`: `queueDepth` buffers each way (a power of two) of
    /// `bufferBytes` each (at least the port's `maxFrame`, at most 64 KiB).
    public static func open(socketPath: String, device: String, queueDepth: Int = 256,
                            bufferBytes: Int = 2048) throws(SessionError) -> NetSession {
        guard queueDepth >= 2, queueDepth <= 4096, queueDepth.nonzeroBitCount == 1 else {
            throw .invalidRequest("queue depth \(queueDepth) is not a power of two in 2...4096")
        }
        guard bufferBytes >= 64, bufferBytes <= 1 << 16 else {
            throw .invalidRequest("buffer size \(bufferBytes) outside 64...65536 bytes")
        }
        let answer = try SessionLink.open(socketPath: socketPath, OpenSession(
            device: device, deviceClass: .net, writable: true, dataBytes: UInt64(2 * queueDepth * bufferBytes),
            queueDepth: UInt32(queueDepth)))
        return try NetSession(answer, queueDepth: queueDepth, bufferBytes: bufferBytes)
    }

    /// As `open`, but while the failure is one to retry (the manager is not listening yet,
    /// or the device is not ready) it tries again, for up to `waitMilliseconds`.
    public static func open(socketPath: String, device: String, queueDepth: Int = 256, bufferBytes: Int = 2048,
                            waitMilliseconds: Int) throws(SessionError) -> NetSession {
        try SessionLink.retrying(waitMilliseconds: waitMilliseconds) { () throws(SessionError) in
            try open(socketPath: socketPath, device: device, queueDepth: queueDepth, bufferBytes: bufferBytes)
        }
    }

    init(_ answer: consuming SessionLink.Answer, queueDepth depth: Int, bufferBytes: Int) throws(SessionError) {
        let opened = answer.opened
        // The server's numbers are checked before anything is sized by them.
        guard case .net(let info) = opened.classInfo else { throw .protocolError("not a net session: \(opened)") }
        guard opened.queueDepth == UInt32(depth), opened.dataBytes >= UInt64(2 * depth * bufferBytes),
              UInt64(bufferBytes) >= UInt64(info.maxFrame) else {
            throw .protocolError("net session parameters do not fit what was asked (depth \(depth), \(bufferBytes)-byte buffers): \(opened)")
        }
        let layout: NetQueueLayout
        do { layout = try NetQueueLayout(queueDepth: depth) } catch { throw .protocolError("\(error)") }
        // Noncopyable members are built as locals on one straight path, then stored.
        let l = try SessionLink(answer, queueBytes: layout.byteCount)
        let ta = try Self.producer(l.queueMapping, at: layout.txActiveOffset, layout)
        let tf = try Self.consumer(l.queueMapping, at: layout.txFreeOffset, layout)
        let rf = try Self.producer(l.queueMapping, at: layout.rxFreeOffset, layout)
        let ra = try Self.consumer(l.queueMapping, at: layout.rxActiveOffset, layout)
        link = l
        txActive = ta
        txFree = tf
        rxFree = rf
        rxActive = ra
        self.info = info
        queueDepth = depth
        self.bufferBytes = bufferBytes
        rxOut = .allocate(capacity: depth)
        rxOut.initialize(repeating: 0, count: depth)
        txState = .allocate(capacity: depth)
        txState.initialize(repeating: TxState.free.rawValue, count: depth)
        txFreeList = .allocate(capacity: depth)
        for i in 0..<depth { txFreeList[i] = Int32(depth - 1 - i) }
        txFreeCount = depth
        staged = .allocate(capacity: depth)
        scratch = .allocate(capacity: depth)
        reposts = .allocate(capacity: depth)
        // Every receive buffer goes to the driver.
        postAllReceiveBuffers()
    }

    static func producer(_ m: borrowing SharedMapping, at offset: Int, _ layout: NetQueueLayout) throws(SessionError)
        -> QueueProducer<BufferDescriptor> {
        do { return try QueueProducer(memory: m.base, size: m.size, at: offset, layout: layout.queue) } catch {
            throw .protocolError("\(error)")
        }
    }

    static func consumer(_ m: borrowing SharedMapping, at offset: Int, _ layout: NetQueueLayout) throws(SessionError)
        -> QueueConsumer<ReturnedDescriptor> {
        do { return try QueueConsumer(memory: m.base, size: m.size, at: offset, layout: layout.queue, bounds: 0) } catch {
            throw .protocolError("\(error)")
        }
    }

    deinit {
        rxOut.deallocate()
        txState.deallocate()
        txFreeList.deallocate()
        staged.deallocate()
        scratch.deallocate()
        reposts.deallocate()
    }

    /// Transmit buffers free to take now (without looking at txFree).
    public var freeTransmitBuffers: Int { txFreeCount }
    /// Transmit buffers out at the driver (published, not yet back).
    public var transmitInFlight: Int { txOutCount }

    /// The epoll set the session sleeps in (its completion doorbell and control socket), for
    /// a caller with its own event loop: the descriptor is readable when the session has
    /// something to look at. Use it as `armWakeUp`, poll, `disarm` describe. Owned by the
    /// session: do not close it.
    public var pollDescriptor: CInt { link.epoll.fd.raw.rawValue }

    // MARK: transmit

    /// A free transmit buffer, taking sent ones back from txFree first if none is free; nil
    /// when all are out or taken. Send it with `send(_:length:)` or give it back with
    /// `discard(_:)`.
    public mutating func transmitBuffer() throws(SessionError) -> TransmitBuffer? {
        try checkGeneration()
        if txFreeCount == 0 { try reclaim() }
        guard txFreeCount > 0 else { return nil }
        return take()
    }

    @inline(__always)
    mutating func take() -> TransmitBuffer {
        txFreeCount -= 1
        let i = Int(txFreeList[txFreeCount])
        txState[i] = TxState.held.rawValue
        return TransmitBuffer(index: i, pointer: link.dataMapping.base + (queueDepth + i) * bufferBytes,
                              capacity: Int(info.maxFrame))
    }

    @inline(__always)
    mutating func free(_ i: Int) {
        txState[i] = TxState.free.rawValue
        txFreeList[txFreeCount] = Int32(i)
        txFreeCount += 1
    }

    /// Gives back a transmit buffer taken and not sent.
    public mutating func discard(_ index: Int) throws(SessionError) {
        guard index >= 0, index < queueDepth, txState[index] == TxState.held.rawValue else {
            throw .invalidRequest("transmit buffer \(index) is not one this session handed out")
        }
        free(index)
    }

    /// Stages the frame of `length` bytes in transmit buffer `index` (one handed out by
    /// `transmitBuffer`) for the next `flush`. The frame must be 14...`info.maxFrame` bytes.
    public mutating func send(_ index: Int, length: Int) throws(SessionError) {
        guard index >= 0, index < queueDepth, txState[index] == TxState.held.rawValue else {
            throw .invalidRequest("transmit buffer \(index) is not one this session handed out")
        }
        guard length >= NetInfo.headerBytes, length <= Int(info.maxFrame) else {
            throw .invalidRequest("a frame of \(length) bytes: outside \(NetInfo.headerBytes)...\(info.maxFrame)")
        }
        txState[index] = TxState.staged.rawValue
        staged[stagedCount] = BufferDescriptor(offset: RegionOffset((queueDepth + index) * bufferBytes),
                                               length: UInt32(length), cookie: UInt32(index))
        stagedCount += 1
    }

    /// Publishes every staged frame on txActive with one store, and rings the driver's
    /// request doorbell only if it asked for one.
    public mutating func flush() throws(SessionError) {
        try checkGeneration()
        guard stagedCount > 0 else { return }
        let n = txActive.enqueue(UnsafeBufferPointer(start: staged, count: stagedCount))
        for k in 0..<n { txState[Int(staged[k].cookie)] = TxState.out.rawValue }
        txOutCount += n
        framesSent &+= UInt64(n)
        if n < stagedCount {
            // Never full (at most queueDepth buffers are out): the queue failed.
            for k in n..<stagedCount { staged[k - n] = staged[k] }
        }
        stagedCount -= n
        if n > 0, txActive.consumerWantsSignal() { ringRequest() }
        if stagedCount > 0 { try queueFailed() }
    }

    /// A burst: takes up to `max` free transmit buffers (taking sent ones back first when
    /// fewer are free), calls `fill` with each, which writes a frame and returns its length
    /// (0: no more frames; that buffer stays free), stages them and flushes. Returns how
    /// many frames were sent. A length outside 14...`info.maxFrame` throws, after what was
    /// staged before it is flushed.
    public mutating func transmit(max: Int, _ fill: (TransmitBuffer) -> Int) throws(SessionError) -> Int {
        try checkGeneration()
        if txFreeCount < max { try reclaim() }
        var n = 0
        var bad: Int? = nil
        while n < max, txFreeCount > 0 {
            let b = take()
            let length = fill(b)
            if length == 0 { free(b.index); break }
            guard length >= NetInfo.headerBytes, length <= b.capacity else {
                free(b.index)
                bad = length
                break
            }
            try send(b.index, length: length)
            n += 1
        }
        try flush()
        if let bad { throw .invalidRequest("a frame of \(bad) bytes: outside \(NetInfo.headerBytes)...\(info.maxFrame)") }
        return n
    }

    /// Takes sent buffers back from txFree. Returns how many came back.
    @discardableResult
    public mutating func reclaimTransmitBuffers() throws(SessionError) -> Int {
        try checkGeneration()
        return try reclaim()
    }

    @discardableResult
    mutating func reclaim() throws(SessionError) -> Int {
        let n = harvest()
        if n == 0 && txFree.hasFailed { try queueFailed() }
        return n
    }

    /// Takes what is on txFree: each entry that names a transmit buffer that is out frees
    /// it; anything else is counted and skipped. Returns how many came back.
    mutating func harvest() -> Int {
        let n = txFree.dequeue(into: scratch)
        let txBase = queueDepth * bufferBytes
        var back = 0
        for k in 0..<n {
            let d = scratch[k].descriptor
            let i = Int(d.cookie)
            guard i < queueDepth, d.offset.rawValue == UInt64(txBase + i * bufferBytes),
                  txState[i] == TxState.out.rawValue else {
                strayEntries &+= 1
                continue
            }
            free(i)
            txOutCount -= 1
            back += 1
        }
        return back
    }

    // MARK: receive

    /// Takes up to `max` received frames off rxActive, hands each to `body` as a view of
    /// its buffer, and then gives the buffers back to the driver (rxFree, one batch; a
    /// doorbell only if the driver asked). Returns how many frames `body` got.
    ///
    /// The view is valid only during the call: the buffer goes back to the driver right
    /// after, and `body` must not keep it. It is shared memory the driver can still write:
    /// copy what you check before acting on it.
    public mutating func receive(max: Int = 32, _ body: (UnsafeRawBufferPointer) -> Void) throws(SessionError) -> Int {
        try checkGeneration()
        let want = Swift.min(max, queueDepth)
        guard want > 0 else { return 0 }
        let n = rxActive.dequeue(into: UnsafeMutableBufferPointer(rebasing: scratch[0..<want]))
        if n == 0 {
            if rxActive.hasFailed { try queueFailed() }
            return 0
        }
        let base = link.dataMapping.base
        var delivered = 0
        var back = 0
        for k in 0..<n {
            let d = scratch[k].descriptor
            let i = Int(d.cookie)
            // Ours and out: the buffer is back (a duplicate finds it back already).
            guard i < queueDepth, d.offset.rawValue == UInt64(i * bufferBytes), rxOut[i] == 1 else {
                strayEntries &+= 1
                continue
            }
            rxOut[i] = 0
            reposts[back] = BufferDescriptor(offset: RegionOffset(i * bufferBytes), length: UInt32(bufferBytes), cookie: UInt32(i))
            back += 1
            // Length 0: the server gives the buffer back unused (it could not post it to
            // the device: its region's translation ended). Anything else this short, or
            // longer than the buffer, is a frame not to be believed.
            if d.length == 0 { continue }
            guard d.length >= UInt32(NetInfo.headerBytes), d.length <= UInt32(bufferBytes) else {
                strayEntries &+= 1  // the frame is dropped; the buffer goes back
                continue
            }
            body(UnsafeRawBufferPointer(start: base + i * bufferBytes, count: Int(d.length)))
            delivered += 1
        }
        framesReceived &+= UInt64(delivered)
        try post(back)
        return delivered
    }

    /// Publishes the first `count` of `reposts` on rxFree and marks them out.
    mutating func post(_ count: Int) throws(SessionError) {
        guard count > 0 else { return }
        let n = rxFree.enqueue(UnsafeBufferPointer(start: reposts, count: count))
        for k in 0..<n { rxOut[Int(reposts[k].cookie)] = 1 }
        if n > 0, rxFree.consumerWantsSignal() { ringRequest() }
        // Never full (at most queueDepth buffers are out): the queue failed. Buffers not
        // posted stay here; recovery posts every buffer again.
        if n < count { try queueFailed() }
    }

    mutating func postAllReceiveBuffers() {
        for i in 0..<queueDepth {
            reposts[i] = BufferDescriptor(offset: RegionOffset(i * bufferBytes), length: UInt32(bufferBytes), cookie: UInt32(i))
        }
        let n = rxFree.enqueue(UnsafeBufferPointer(start: reposts, count: queueDepth))
        for k in 0..<n { rxOut[k] = 1 }
    }

    // MARK: waiting

    /// Sleeps up to `timeoutMilliseconds` (negative: no limit) until a frame arrives, or,
    /// when no transmit buffer is free, until a sent one comes back; returns at once when
    /// there is such work already. Staged frames are flushed first. Returns true when there
    /// is work (a frame waits, or a sent buffer is back), false on the timeout.
    @discardableResult
    public mutating func wait(timeoutMilliseconds: Int) throws(SessionError) -> Bool {
        if try armWakeUp() {
            let controlReady: Bool
            do { controlReady = try link.sleep(timeoutMilliseconds: timeoutMilliseconds) } catch {
                cancelSignals()
                throw .system(error)
            }
            try finishWake(controlReady: controlReady)
        }
        try checkGeneration()
        return hasWork()
    }

    /// For a caller with its own event loop: flushes staged frames, asks the driver for a
    /// doorbell on rxActive (and, when no transmit buffer is free, on txFree), and checks
    /// once more. True: nothing is there yet; poll `pollDescriptor` (readable) with your own
    /// descriptors, then call `disarm()` whatever woke you. False: work is already there
    /// (nothing is armed): call `receive` or `reclaimTransmitBuffers` instead of polling.
    public mutating func armWakeUp() throws(SessionError) -> Bool {
        if armed { cancelSignals() }
        try flush()
        // We go idle as the producer of txActive and rxFree: a driver waiting for more than
        // we published gets what there is (QueueProducer.consumerWantsSignalBeforeIdle).
        let idleTx = txActive.consumerWantsSignalBeforeIdle()
        let idleRx = rxFree.consumerWantsSignalBeforeIdle()
        if idleTx || idleRx { ringRequest() }
        guard rxActive.prepareToSleep() else { return false }
        if txFreeCount == 0 && txOutCount > 0 {
            guard txFree.prepareToSleep() else {
                rxActive.cancelSignal()
                return false
            }
        }
        armed = true
        return true
    }

    /// After `armWakeUp` returned true and the poll returned: withdraws the requests for a
    /// doorbell, drains the doorbell (so that `pollDescriptor` is quiet again) and handles
    /// what came on the control socket (new queues, the end of the session).
    public mutating func disarm() throws(SessionError) {
        let controlReady: Bool
        do { controlReady = try link.sleep(timeoutMilliseconds: 0) } catch {
            cancelSignals()
            throw .system(error)
        }
        try finishWake(controlReady: controlReady)
    }

    mutating func finishWake(controlReady: Bool) throws(SessionError) {
        cancelSignals()
        if controlReady, let q = try link.controlMessage() { try adopt(q) }
        try checkGeneration()
    }

    mutating func cancelSignals() {
        rxActive.cancelSignal()
        txFree.cancelSignal()
        armed = false
    }

    /// Whether a frame waits on rxActive or a sent buffer on txFree (a failed queue counts:
    /// the next call reports it).
    mutating func hasWork() -> Bool {
        !rxActive.isEmpty() || rxActive.hasFailed || !txFree.isEmpty() || txFree.hasFailed
    }

    @inline(__always)
    mutating func ringRequest() {
        link.ringRequest()
        doorbellsRung &+= 1
    }

    // MARK: recovery

    @inline(__always)
    mutating func checkGeneration() throws(SessionError) {
        while let q = try link.nextQueues() { try adopt(q) }
    }

    /// A queue stopped (the driver broke its indices): if the driver was replaced
    /// meanwhile, recovery brings new queues; otherwise the session cannot go on.
    mutating func queueFailed() throws(SessionError) {
        try checkGeneration()
        if let e = txActive.error ?? txFree.error ?? rxFree.error ?? rxActive.error {
            throw .protocolError("net queue: \(e)")
        }
    }

    /// Moves to the queues of a restarted driver: every receive buffer goes to it; of the
    /// frames that were out for transmission, those the old driver gave back on its txFree
    /// are free as usual, the others are dropped (their buffers are free again).
    mutating func adopt(_ q: consuming SessionLink.NewQueues) throws(SessionError) {
        let layout: NetQueueLayout
        do { layout = try NetQueueLayout(queueDepth: queueDepth) } catch { throw .protocolError("\(error)") }
        let ta = try Self.producer(q.mapping, at: layout.txActiveOffset, layout)
        let tf = try Self.consumer(q.mapping, at: layout.txFreeOffset, layout)
        let rf = try Self.producer(q.mapping, at: layout.rxFreeOffset, layout)
        let ra = try Self.consumer(q.mapping, at: layout.rxActiveOffset, layout)
        // What the old driver gave back before it went is free (checked as ever); the rest
        // of what was out is dropped.
        _ = harvest()
        txActive = ta
        txFree = tf
        rxFree = rf
        rxActive = ra
        link.adopt(q)
        armed = false
        for i in 0..<queueDepth where txState[i] == TxState.out.rawValue {
            free(i)
            txDroppedInRecovery &+= 1
        }
        txOutCount = 0
        rxOut.update(repeating: 0, count: queueDepth)
        postAllReceiveBuffers()
        // Staged frames go out at the next flush. A new driver has not asked for a
        // doorbell yet: ring once, for the receive buffers.
        ringRequest()
    }
}
