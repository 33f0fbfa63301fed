import OutboardRings
import OutboardSession
import OutboardSystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// One request of a batch (`BlockSession.submit(batch:)`).
public struct BlockSubmission: Sendable, Equatable {
    public var op: BlockOp
    public var sector: UInt64
    /// Buffer offset in the data region (reads and writes).
    public var offset: Int
    /// Bytes: a multiple of 512 (0 for flush).
    public var length: Int
    public var userData: UInt64
    public init(_ op: BlockOp, sector: UInt64, offset: Int = 0, length: Int, userData: UInt64 = 0) {
        self.op = op; self.sector = sector; self.offset = offset; self.length = length; self.userData = userData
    }
}

/// A finished request, with what was asked.
public struct BlockResult: Sendable, Equatable {
    public var tag: UInt32
    /// nil: the driver returned a status this library does not know (treat as an error).
    public var status: BlockStatus?
    public var op: BlockOp
    public var sector: UInt64
    public var offset: RegionOffset
    public var length: UInt32
    /// The caller's value from `submit`.
    public var userData: UInt64
    /// Driver generation that completed it.
    public var generation: UInt64
    public init(tag: UInt32, status: BlockStatus?, op: BlockOp, sector: UInt64, offset: RegionOffset, length: UInt32,
                userData: UInt64, generation: UInt64) {
        self.tag = tag; self.status = status; self.op = op; self.sector = sector; self.offset = offset
        self.length = length; self.userData = userData; self.generation = generation
    }
}

/// A client's block session: the `Outboard` library's block API.
///
/// Buffers live in the session's data region (`buffer`), registered with the device once;
/// requests name them by offset. Submitting and completing are shared-memory operations:
/// no system call unless the driver asked for a doorbell, or the client sleeps.
///
/// Recovery: the session header carries the driver generation. When it changes, the
/// driver was restarted and the manager has sent fresh queues; the session switches to
/// them and reissues, in submission order, every request it has not seen complete (block
/// reads and writes are idempotent). Callers see a pause, not an error. If the device
/// fails for good, calls throw `.failed` instead of hanging.
public struct BlockSession: ~Copyable {
    /// The block device as this session sees it.
    public let info: BlockInfo
    /// Control socket, header page, regions, doorbells: shared with every session class.
    var link: SessionLink
    var requests: QueueProducer<BlockRequest>
    var completions: QueueConsumer<BlockCompletion>
    /// The session as the server opened it (common part).
    public var opened: SessionOpened { link.opened }
    /// Driver generation of the queues in use.
    public var generation: UInt64 { link.generation }
    /// How many times the session moved to a restarted driver.
    public var recoveries: Int { link.recoveries }
    /// Requests reissued after restarts.
    public private(set) var reissued = 0
    /// Request doorbells this session rang (the driver asked for each).
    public private(set) var doorbellsRung = 0
    /// Heavy barriers (membarrier(2)) run before waiting: the completion queue's asymmetric
    /// ordering, used while waits are rare.
    public private(set) var heavyBarriers = 0
    /// Heavy barriers that failed; each such wait slept at most 1 ms.
    public private(set) var heavyBarrierFailures = 0

    let depth: Int
    let inflight: UnsafeMutablePointer<BlockRequest>
    let inflightSeq: UnsafeMutablePointer<UInt64>  // 0: tag free
    let inflightUser: UnsafeMutablePointer<UInt64>
    let freeTags: UnsafeMutablePointer<UInt32>
    var freeCount: Int
    var nextSeq: UInt64 = 1
    let scratch: UnsafeMutableBufferPointer<BlockCompletion>
    let order: UnsafeMutablePointer<UInt32>
    let submitScratch: UnsafeMutablePointer<BlockRequest>

    /// Connects to the manager (or a virtualizer) at `socketPath` and opens a session on
    /// `device`, with a data region of `dataBytes` and at most `queueDepth` requests in
    /// flight (a power of two).
    public static func open(socketPath: String, device: String, writable: Bool, dataBytes: Int,
                            queueDepth: Int = 32) throws(SessionError) -> BlockSession {
        let answer = try SessionLink.open(socketPath: socketPath, OpenSession(
            device: device, deviceClass: .block, writable: writable, dataBytes: UInt64(max(dataBytes, 0)),
            queueDepth: UInt32(clamping: queueDepth)))
        return try BlockSession(answer)
    }

    /// How long `open` waits for the server's answer.
    public static var answerTimeoutMilliseconds: Int { SessionLink.answerTimeoutMilliseconds }

    /// As `open`, but while the failure is one to retry (the manager is not listening yet,
    /// or the device is not ready: its driver is starting or has not reached the device) it
    /// tries again, for up to `waitMilliseconds`.
    public static func open(socketPath: String, device: String, writable: Bool, dataBytes: Int, queueDepth: Int = 32,
                            waitMilliseconds: Int) throws(SessionError) -> BlockSession {
        try SessionLink.retrying(waitMilliseconds: waitMilliseconds) { () throws(SessionError) in
            try open(socketPath: socketPath, device: device, writable: writable, dataBytes: dataBytes, queueDepth: queueDepth)
        }
    }

    init(_ answer: consuming SessionLink.Answer) throws(SessionError) {
        let opened = answer.opened
        guard case .block(let info) = opened.classInfo, info.blockSize == UInt32(blockSectorSize),
              info.maxTransfer >= UInt32(blockSectorSize) else {
            throw .protocolError("block parameters out of range: \(opened)")
        }
        let layout: BlockQueueLayout
        do { layout = try BlockQueueLayout(queueDepth: Int(opened.queueDepth)) } catch { throw .protocolError("\(error)") }
        // Noncopyable members are built as locals on one straight path, then stored.
        let l = try SessionLink(answer, queueBytes: layout.byteCount)
        let rq = try Self.requestQueue(l.queueMapping, layout)
        let cq = try Self.completionQueue(l.queueMapping, layout, depth: opened.queueDepth)
        link = l
        requests = rq
        completions = cq
        self.info = info
        depth = Int(opened.queueDepth)
        inflight = .allocate(capacity: depth)
        inflightSeq = .allocate(capacity: depth)
        inflightSeq.initialize(repeating: 0, count: depth)
        inflightUser = .allocate(capacity: depth)
        freeTags = .allocate(capacity: depth)
        for i in 0..<depth { freeTags[i] = UInt32(depth - 1 - i) }
        freeCount = depth
        scratch = .allocate(capacity: depth)
        order = .allocate(capacity: depth)
        submitScratch = .allocate(capacity: depth)
    }

    static func requestQueue(_ m: borrowing SharedMapping, _ layout: BlockQueueLayout) throws(SessionError) -> QueueProducer<BlockRequest> {
        do {
            return try QueueProducer<BlockRequest>(memory: m.base, size: m.size, at: layout.requestOffset, layout: layout.requests)
        } catch {
            throw .protocolError("\(error)")
        }
    }

    /// Completions between waits from which the asymmetric ordering pays (QueueConsumer).
    static let heavyBarrierThreshold: UInt32 = 4096

    static func completionQueue(_ m: borrowing SharedMapping, _ layout: BlockQueueLayout, depth: UInt32) throws(SessionError)
        -> QueueConsumer<BlockCompletion> {
        do {
            var q = try QueueConsumer<BlockCompletion>(memory: m.base, size: m.size, at: layout.completionOffset,
                                                       layout: layout.completions, bounds: depth)
            // While we wait rarely, we take the cost of the wake-up check with a heavy
            // barrier before each sleep, and the driver checks without a fence per batch
            // (QueueConsumer.requestSignal). Only where this process may run membarrier(2).
            q.heavyBarrierThreshold = Membarrier.isUsable ? Self.heavyBarrierThreshold : 0
            return q
        } catch {
            throw .protocolError("\(error)")
        }
    }

    deinit {
        inflight.deallocate()
        inflightSeq.deallocate()
        inflightUser.deallocate()
        freeTags.deallocate()
        scratch.deallocate()
        order.deallocate()
        submitScratch.deallocate()
    }

    /// The session's data region: put write data here, find read data here, by offset.
    public var buffer: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: link.dataMapping.base, count: link.dataMapping.size)
    }

    public var inFlight: Int { depth - freeCount }
    public var queueDepth: Int { depth }

    /// Submits one request on the buffer at `offset`. Returns the tag, or nil when
    /// `queueDepth` requests are already in flight. Discard and write-zeroes name a range
    /// (`sector`, `length` bytes) and no buffer; flush names neither.
    public mutating func submit(_ op: BlockOp, sector: UInt64, offset: Int, length: Int,
                                userData: UInt64 = 0) throws(SessionError) -> UInt32? {
        try checkGeneration()
        guard freeCount > 0 else { return nil }
        let r = try stage(BlockSubmission(op, sector: sector, offset: offset, length: length, userData: userData))
        // Never more than `depth` in flight: the queue has room.
        _ = requests.enqueue(r)
        if requests.consumerWantsSignal() {
            link.ringRequest()
            doorbellsRung += 1
        }
        return r.tag
    }

    /// Submits as many of `batch` as there are free tags, in order, with one publication
    /// and at most one doorbell for all of them. Returns how many were submitted. A
    /// request this session cannot express throws before anything of the batch is sent.
    public mutating func submit(batch: UnsafeBufferPointer<BlockSubmission>) throws(SessionError) -> Int {
        try checkGeneration()
        let n = min(batch.count, freeCount)
        guard n > 0 else { return 0 }
        for k in 0..<n { try validate(batch[k]) }
        let staged = UnsafeMutableBufferPointer(start: submitScratch, count: n)
        for k in 0..<n { staged[k] = try stage(batch[k]) }
        _ = requests.enqueue(UnsafeBufferPointer(staged))
        if requests.consumerWantsSignal() {
            link.ringRequest()
            doorbellsRung += 1
        }
        return n
    }

    /// Tests only: whether the completion queue has published the asymmetric ordering of
    /// its wake-up check (the driver skips its fence per completion batch).
    @_spi(Testing)
    public var completionsUseAsymmetricOrdering: Bool { completions.usesAsymmetricOrdering }

    /// Tests only: puts `request` on the queue as it is, skipping this library's checks, to
    /// see what a driver does with a request a hostile client could write. The tag is taken
    /// as usual.
    @_spi(Testing)
    /// `offset` is the raw bit pattern a hostile client would write.
    public mutating func submitUnchecked(_ op: BlockOp, sector: UInt64, offset: UInt64, length: UInt32) throws(SessionError) -> UInt32? {
        try checkGeneration()
        guard freeCount > 0 else { return nil }
        freeCount -= 1
        let tag = freeTags[freeCount]
        let r = BlockRequest(tag: tag, op: op, sector: sector, offset: RegionOffset(rawValue: offset), length: length)
        inflight[Int(tag)] = r
        inflightSeq[Int(tag)] = nextSeq
        inflightUser[Int(tag)] = 0
        nextSeq &+= 1
        _ = requests.enqueue(r)
        link.ringRequest()
        return tag
    }

    /// Tests only: puts `request` on the request queue with no bookkeeping at all (no tag
    /// taken, no depth kept), as a client that ignores its queue depth would. Returns
    /// whether the queue had room.
    @_spi(Testing)
    public mutating func enqueueRaw(_ request: BlockRequest) -> Bool {
        let sent = requests.enqueue(request)
        link.ringRequest()
        return sent
    }

    /// Tests only: takes every completion off the completion queue with no bookkeeping
    /// (the other half of `enqueueRaw`). Returns how many.
    @_spi(Testing)
    public mutating func dequeueRawCompletions() -> Int {
        var total = 0
        while true {
            let n = completions.dequeue(into: UnsafeMutableBufferPointer(rebasing: scratch[0..<scratch.count]))
            if n == 0 { return total }
            total += n
        }
    }

    func validate(_ b: BlockSubmission) throws(SessionError) {
        switch b.op {
        case .flush:
            break
        case .read, .write:
            guard b.length > 0, b.length % blockSectorSize == 0, b.length <= Int(info.maxTransfer),
                  b.offset >= 0, b.offset <= link.dataMapping.size, b.length <= link.dataMapping.size - b.offset else {
                throw .invalidRequest("\(b.op) of \(b.length) bytes at buffer offset \(b.offset): outside the \(link.dataMapping.size)-byte data region, misaligned, or over the \(info.maxTransfer)-byte transfer limit")
            }
        case .discard, .writeZeroes:
            guard b.length > 0, b.length % blockSectorSize == 0, b.length <= Int(UInt32.max) else {
                throw .invalidRequest("\(b.op) of \(b.length) bytes: not a positive multiple of \(blockSectorSize)")
            }
        }
    }

    /// Takes a tag and records the request (validated first).
    mutating func stage(_ b: BlockSubmission) throws(SessionError) -> BlockRequest {
        try validate(b)
        freeCount -= 1
        let tag = freeTags[freeCount]
        let r = BlockRequest(tag: tag, op: b.op, sector: b.op == .flush ? 0 : b.sector,
                             offset: RegionOffset(b.op.hasBuffer ? b.offset : 0), length: UInt32(b.op == .flush ? 0 : b.length))
        inflight[Int(tag)] = r
        inflightSeq[Int(tag)] = nextSeq
        inflightUser[Int(tag)] = b.userData
        nextSeq &+= 1
        return r
    }

    /// Collects finished requests without blocking. Returns how many were written to `out`.
    public mutating func poll(into out: UnsafeMutableBufferPointer<BlockResult>) throws(SessionError) -> Int {
        try checkGeneration()
        let want = min(out.count, depth)
        guard want > 0 else { return 0 }
        let n = completions.dequeue(into: UnsafeMutableBufferPointer(rebasing: scratch[0..<want]))
        if n == 0, let e = completions.error {
            // A broken completion queue: if the driver died meanwhile, recovery replaces it.
            try checkGeneration()
            if completions.hasFailed { throw .protocolError("completion queue: \(e)") }
        }
        var k = 0
        for i in 0..<n {
            let c = scratch[i]
            let tag = Int(c.tag)
            guard inflightSeq[tag] != 0 else { continue }  // not in flight: a stray completion, ignored
            let r = inflight[tag]
            out[k] = BlockResult(tag: c.tag, status: BlockStatus(rawValue: c.status), op: BlockOp(rawValue: r.op) ?? .flush,
                                 sector: r.sector, offset: r.offset, length: r.length, userData: inflightUser[tag],
                                 generation: c.generation)
            inflightSeq[tag] = 0
            freeTags[freeCount] = c.tag
            freeCount += 1
            k += 1
        }
        return k
    }

    /// As `poll`, but sleeps up to `timeoutMilliseconds` when nothing has finished.
    ///
    /// `spinMicroseconds` > 0 (at most 1 s) polls for that long first, yielding the CPU between polls
    /// (sched_yield(2)), and sleeps only if nothing finished meanwhile: adaptive polling.
    /// A completion that arrives within the window then costs no doorbell and no wake-up
    /// (about 60 us of CPU and latency on a virtual machine), and the yield lets a driver
    /// that shares this CPU run. It trades CPU for latency, as the driver's adaptive mode.
    ///
    /// `wakeAfter`: a sleep asks the driver to ring once that many completions wait, or
    /// when it has none of this session's requests left in flight, whichever comes first
    /// (QueueConsumer.requestSignal(wakeAfter:); the driver's side is
    /// BlockServerEndpoint.complete). nil, the default: a quarter of what is in flight,
    /// rounded up, so that a client resubmitting what completed refills in batches and is
    /// woken about once per quarter queue instead of once per completion batch, while the
    /// device keeps three quarters of the requests; 1 for the first completion as soon as
    /// it is there. A larger share wakes less often still but leaves the device fewer
    /// requests between wake-ups (at QD32 on virtio-blk, half: about 0.05 wake-ups per I/O
    /// instead of 0.08, and about a fifth fewer IOPS).
    public mutating func wait(into out: UnsafeMutableBufferPointer<BlockResult>,
                              timeoutMilliseconds: Int, spinMicroseconds: Int = 0,
                              wakeAfter: Int? = nil) throws(SessionError) -> Int {
        let n = try poll(into: out)
        if n > 0 || inFlight == 0 { return n }
        if spinMicroseconds > 0 {
            let end = Clock.monotonicNanoseconds &+ UInt64(min(spinMicroseconds, 1_000_000)) * 1000
            repeat {
                sched_yield()
                let n = try poll(into: out)
                if n > 0 { return n }
            } while Clock.monotonicNanoseconds < end
        }
        let after = UInt32(clamping: max(1, min(wakeAfter ?? (inFlight + 3) / 4, inFlight)))
        switch completions.prepareToSleep(wakeAfter: after, heavyBarrier: { () throws(Errno) in try Membarrier.run() }) {
        case .sleep(let ranHeavyBarrier):
            if ranHeavyBarrier { heavyBarriers += 1 }
            try sleep(timeoutMilliseconds: timeoutMilliseconds)
        case .workArrived(let ranHeavyBarrier):
            if ranHeavyBarrier { heavyBarriers += 1 }
        case .heavyBarrierFailed:
            // Rare (ENOMEM, or a seccomp filter installed since the session opened): no
            // doorbell is guaranteed, so wait at most 1 ms, with the request withdrawn; the
            // next wait asks for the barrier again.
            heavyBarrierFailures += 1
            if !completions.hasFailed && completions.isEmpty() {
                try sleep(timeoutMilliseconds: timeoutMilliseconds < 0 ? 1 : min(timeoutMilliseconds, 1))
            }
        }
        return try poll(into: out)
    }

    /// Sleeps on the completion doorbell and the control socket, then withdraws the request
    /// for a doorbell (whatever woke us) and handles what woke us.
    mutating func sleep(timeoutMilliseconds: Int) throws(SessionError) {
        // We go idle as the requests' producer: a driver waiting for more than one request
        // gets what we submitted (QueueProducer.consumerWantsSignalBeforeIdle).
        if requests.consumerWantsSignalBeforeIdle() {
            link.ringRequest()
            doorbellsRung += 1
        }
        let controlReady: Bool
        do { controlReady = try link.sleep(timeoutMilliseconds: timeoutMilliseconds) } catch {
            completions.cancelSignal()
            throw .system(error)
        }
        completions.cancelSignal()
        if controlReady, let q = try link.controlMessage() { try adopt(q) }
    }

    /// Blocks until every request in flight has finished, handing each to `body`.
    public mutating func drain(_ body: (BlockResult) throws(SessionError) -> Void) throws(SessionError) {
        let out = UnsafeMutableBufferPointer<BlockResult>.allocate(capacity: depth)
        defer { out.deallocate() }
        while inFlight > 0 {
            let n = try wait(into: out, timeoutMilliseconds: 1000)
            for i in 0..<n { try body(out[i]) }
        }
    }

    // MARK: recovery

    @inline(__always)
    mutating func checkGeneration() throws(SessionError) {
        while let q = try link.nextQueues() { try adopt(q) }
    }

    /// Moves to the queues of a restarted driver and reissues what is in flight.
    mutating func adopt(_ q: consuming SessionLink.NewQueues) throws(SessionError) {
        let layout: BlockQueueLayout
        do { layout = try BlockQueueLayout(queueDepth: depth) } catch { throw .protocolError("\(error)") }
        let rq = try Self.requestQueue(q.mapping, layout)
        let cq = try Self.completionQueue(q.mapping, layout, depth: UInt32(depth))
        requests = rq
        completions = cq
        link.adopt(q)
        // Reissue in submission order.
        var n = 0
        for t in 0..<depth where inflightSeq[t] != 0 {
            order[n] = UInt32(t)
            n += 1
        }
        let seq = inflightSeq
        var pending = UnsafeMutableBufferPointer(start: order, count: n)
        pending.sort { seq[Int($0)] < seq[Int($1)] }
        for i in 0..<n { _ = requests.enqueue(inflight[Int(order[i])]) }
        reissued += n
        if n > 0 { link.ringRequest() }
    }
}
