import CLinux
import CRefRing
import OutboardRings
import OutboardSystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// How a worker ended. The raw value is also its exit status.
public enum RingWorkerStatus: UInt32, Sendable, CustomStringConvertible {
    case ok = 0
    case setupFailed = 2
    /// A queue endpoint went into its error state (corrupt indices or descriptors).
    case queueError = 3
    /// A descriptor or buffer did not carry the expected sequence number: loss,
    /// duplication, reordering or corruption.
    case verifyError = 4
    /// No progress before the worker's deadline.
    case stalled = 5
    case systemError = 6

    public var description: String {
        switch self {
        case .ok: return "ok"
        case .setupFailed: return "setup failed"
        case .queueError: return "queue error"
        case .verifyError: return "verification error"
        case .stalled: return "stalled"
        case .systemError: return "system error"
        }
    }
}

public enum RingWorkerFailure: Error, Sendable {
    case setup(String)
}

/// What a worker reports back to the harness.
public struct RingWorkerResult: Sendable, Equatable {
    public var status: RingWorkerStatus
    public var processed: UInt64 = 0
    public var doorbells: UInt64 = 0
    public var sleeps: UInt64 = 0
    /// Sleeps that ended by the wait's timeout (RingParameters.sleepTimeoutMilliseconds)
    /// rather than a doorbell. A lost wake-up that nothing else rescued shows here.
    public var timeouts: UInt64 = 0
    /// Heavy barriers (membarrier(2)) run before sleeps: the asymmetric signal ordering.
    public var heavyBarriers: UInt64 = 0
    public var startNanoseconds: UInt64 = 0
    public var endNanoseconds: UInt64 = 0
    public var cpuNanoseconds: UInt64 = 0
    public var detail: String = ""

    var encoded: [UInt8] {
        var w = WireWriter()
        w.put(status.rawValue); w.put(processed); w.put(doorbells); w.put(sleeps); w.put(timeouts); w.put(heavyBarriers)
        w.put(startNanoseconds); w.put(endNanoseconds); w.put(cpuNanoseconds)
        return w.bytes + Array(detail.utf8.prefix(1024))
    }

    static func decode(_ bytes: [UInt8]) -> RingWorkerResult? {
        var r = WireReader(bytes)
        guard let s = r.get(UInt32.self).flatMap(RingWorkerStatus.init(rawValue:)),
              let processed = r.get(UInt64.self), let doorbells = r.get(UInt64.self), let sleeps = r.get(UInt64.self),
              let timeouts = r.get(UInt64.self), let heavy = r.get(UInt64.self),
              let start = r.get(UInt64.self), let end = r.get(UInt64.self), let cpu = r.get(UInt64.self)
        else { return nil }
        return RingWorkerResult(status: s, processed: processed, doorbells: doorbells, sleeps: sleeps, timeouts: timeouts,
                                heavyBarriers: heavy,
                                startNanoseconds: start, endNanoseconds: end, cpuNanoseconds: cpu,
                                detail: String(decoding: r.rest, as: UTF8.self))
    }
}

/// Descriptor numbers a worker finds its set-up socket at.
public let ringWorkerSocketFD: CInt = 3

/// Entry point of a worker process (`outboard _ring-worker`): receives its parameters and
/// shared memory over the socket at fd 3, reports ready, waits for "go", runs, reports.
/// Returns the exit status.
public func ringWorkerMain() -> Int32 {
    let socket = UnixSocket(adopting: OwnedFD(adopting: ringWorkerSocketFD))
    let result = runWorker(socket)
    try? socket.send(result.encoded)
    return Int32(result.status.rawValue)
}

private func runWorker(_ socket: borrowing UnixSocket) -> RingWorkerResult {
    var message: ReceivedMessage
    do {
        message = try socket.receive(maxBytes: 256, maxDescriptors: 4)
    } catch {
        return RingWorkerResult(status: .setupFailed, detail: "receiving parameters: \(error)")
    }
    let params: RingParameters
    switch RingParameters.decode(message.bytes) {
    case .success(let p): params = p
    case .failure(.setup(let why)): return RingWorkerResult(status: .setupFailed, detail: why)
    }
    guard message.descriptors.count == 4,
          let queuesFD = message.descriptors.take(0), let dataFD = message.descriptors.take(1),
          let activeFD = message.descriptors.take(2), let freeFD = message.descriptors.take(3)
    else { return RingWorkerResult(status: .setupFailed, detail: "expected 4 descriptors, got \(message.descriptors.count)") }
    do {
        let layout = try params.pairLayout
        let queues = try SharedRegion(adopting: queuesFD, minimumSize: layout.endOffset)
        let data = try SharedRegion(adopting: dataFD, minimumSize: params.dataRegionSize)
        let queueMap = try queues.map(.readWrite)
        let dataMap = try data.map(.readWrite)
        let active = Doorbell(adopting: activeFD)
        let free = Doorbell(adopting: freeFD)
        if params.cpu >= 0 { try CPU.pin(to: params.cpu) }
        // Sleep mode: this process produces on one queue and may consume on the other with
        // the asymmetric signal ordering, so it registers for the peer's heavy barrier and
        // checks that it can run one itself.
        let barriers = params.mode == .sleep ? HeavyBarrierUse(threshold: params.heavyBarrierThreshold) : .none

        try socket.send([0x52])  // ready
        _ = try socket.receive(maxBytes: 16)  // go

        let deadline = Clock.monotonicNanoseconds + UInt64(params.timeoutMilliseconds) * 1_000_000
        var result = RingWorkerResult(status: .ok)
        let cpu0 = Clock.processCPUNanoseconds
        result.startNanoseconds = Clock.monotonicNanoseconds
        switch (params.role, params.implementation) {
        case (.hostile, _):
            runHostile(params, queueMap, layout, deadline, &result)
        case (_, .swift):
            let loop = SwiftRingLoop(params: params, layout: layout, deadline: deadline, barriers: barriers)
            if params.role == .producer {
                try loop.produce(queueMap, dataMap, active, free, &result)
            } else {
                try loop.consume(queueMap, dataMap, active, free, &result)
            }
        case (_, .c):
            runC(params, layout, deadline, barriers, queueMap, dataMap, active, free, &result)
        }
        result.endNanoseconds = Clock.monotonicNanoseconds
        result.cpuNanoseconds = Clock.processCPUNanoseconds - cpu0
        return result
    } catch {
        return RingWorkerResult(status: .setupFailed, detail: "\(error)")
    }
}

/// The Swift worker loops. Same work per descriptor as CRefRing's: the producer writes the
/// sequence number into the buffer and the descriptor's cookie; the consumer checks both,
/// so any loss, duplication or reordering stops it with `.verifyError`.
struct SwiftRingLoop {
    let params: RingParameters
    let layout: QueuePairLayout
    let deadline: UInt64
    let barriers: HeavyBarrierUse

    func produce(_ queues: borrowing SharedMapping, _ data: borrowing SharedMapping,
                 _ activeBell: borrowing Doorbell, _ freeBell: borrowing Doorbell, _ r: inout RingWorkerResult) throws(QueueError) {
        // Buffers coming back on the free queue get `bufferSize` bytes written into them,
        // so anything shorter is refused (see DescriptorBounds).
        let bounds = DescriptorBounds(regionSize: data.size, minLength: UInt32(params.bufferSize),
                                      maxLength: UInt32(params.bufferSize))
        var active = try QueueProducer<BufferDescriptor>(memory: queues.base, size: queues.size, at: layout.activeOffset, layout: layout.queue,
                                                         registeredForHeavyBarrier: barriers.registered)
        var freeQ = try QueueConsumer<BufferDescriptor>(memory: queues.base, size: queues.size, at: layout.freeOffset, layout: layout.queue, bounds: bounds)
        freeQ.heavyBarrierThreshold = barriers.threshold
        let bufferCount = params.bufferCount, batch = params.batch, count = params.count
        let bufferSize = UInt32(params.bufferSize)
        let stash = UnsafeMutableBufferPointer<BufferDescriptor>.allocate(capacity: bufferCount)
        let out = UnsafeMutableBufferPointer<BufferDescriptor>.allocate(capacity: batch)
        defer { stash.deallocate(); out.deallocate() }
        for i in 0..<bufferCount {
            stash[i] = BufferDescriptor(offset: RegionOffset(i * params.bufferSize), length: bufferSize)
        }
        var stashCount = bufferCount
        var seq: UInt64 = 0
        var idle: UInt64 = 0
        let base = data.base
        let sleeping = params.mode == .sleep
        let flushing = sleeping && params.idleFlush
        // Loops below count with `while` and wrapping arithmetic: a range `0..<k` or a slice
        // `out[0..<k]` costs a trap check per batch that k is not negative.
        let refill = UnsafeMutableBufferPointer(rebasing: stash[0..<min(batch, bufferCount)])
        // Runs to `stop`: the count, or the next pause (RingParameters.pauseEvery). Pausing
        // only between these runs keeps the check off the per-batch path.
        let pauseEvery = params.pauseEvery
        var jitter = params.seed | 1
        var stop = pauseEvery == 0 ? count : min(count, pauseEvery)
        run: while true {
            while seq < stop {
                if stashCount == 0 {
                    let n = freeQ.dequeue(into: refill)
                    if n == 0 {
                        if let status = waitForWork(&freeQ, freeBell, &idle, &r, idleOn: &active, activeBell) {
                            r.status = status
                            if status == .queueError { r.detail = freeQ.error.map { "free queue: \($0)" } ?? "" }
                            break run
                        }
                        continue
                    }
                    stashCount = n
                }
                let k = min(batch, stashCount, Int(truncatingIfNeeded: min(stop &- seq, UInt64(batch))))
                // The top k buffers of the stash, bottom up (the C worker takes the same ones).
                let first = stashCount &- k
                var j = 0
                while j < k {
                    var b = stash[first &+ j]
                    let s = seq &+ UInt64(truncatingIfNeeded: j)
                    // SAFETY: b came from our own stash or through freeQ, whose bounds checked
                    // offset + length <= data.size and length >= bufferSize >= 8; so the offset
                    // also fits an Int and the conversion needs no overflow check.
                    (base + Int(truncatingIfNeeded: b.offset.rawValue)).storeBytes(of: s, as: UInt64.self)
                    b.cookie = UInt32(truncatingIfNeeded: s)
                    b.length = bufferSize
                    out[j] = b
                    j &+= 1
                }
                stashCount = first
                if active.enqueue(UnsafeBufferPointer(start: out.baseAddress, count: k)) != k {
                    r.status = .queueError
                    r.detail = active.error.map { "active queue: \($0)" } ?? "active queue full"
                    break run
                }
                seq &+= UInt64(truncatingIfNeeded: k)
                if sleeping && active.consumerWantsSignal() { ring(activeBell, &r) }
            }
            if seq >= count { break }
            // Idle for the length of the pause (QueueProducer.consumerWantsSignalBeforeIdle).
            if flushing && active.consumerWantsSignalBeforeIdle() { ring(activeBell, &r) }
            pause(&jitter)
            let (next, overflow) = seq.addingReportingOverflow(pauseEvery)
            stop = overflow ? count : min(count, next)
        }
        // Done producing: the consumer gets what is left without waiting for its wake index.
        if sleeping && active.consumerWantsSignalBeforeIdle() { ring(activeBell, &r) }
        r.processed = seq
    }

    func consume(_ queues: borrowing SharedMapping, _ data: borrowing SharedMapping,
                 _ activeBell: borrowing Doorbell, _ freeBell: borrowing Doorbell, _ r: inout RingWorkerResult) throws(QueueError) {
        let bounds = DescriptorBounds(regionSize: data.size, maxLength: UInt32(params.bufferSize))
        var freeQ = try QueueProducer<BufferDescriptor>(memory: queues.base, size: queues.size, at: layout.freeOffset, layout: layout.queue,
                                                        registeredForHeavyBarrier: barriers.registered)
        var active = try QueueConsumer<BufferDescriptor>(memory: queues.base, size: queues.size, at: layout.activeOffset, layout: layout.queue, bounds: bounds)
        active.heavyBarrierThreshold = barriers.threshold
        let batch = params.batch, count = params.count
        let bufferSize = UInt32(params.bufferSize)
        let buf = UnsafeMutableBufferPointer<BufferDescriptor>.allocate(capacity: batch)
        defer { buf.deallocate() }
        var expected: UInt64 = 0
        var idle: UInt64 = 0
        let base = UnsafeRawPointer(data.base)
        let sleeping = params.mode == .sleep
        outer: while expected < count {
            let n = active.dequeue(into: buf)
            if n == 0 {
                if let stop = waitForWork(&active, activeBell, &idle, &r, idleOn: &freeQ, freeBell) {
                    r.status = stop
                    if stop == .queueError { r.detail = active.error.map { "active queue: \($0)" } ?? "" }
                    break
                }
                continue
            }
            var j = 0
            while j < n {
                // Each field is read where it is compared (buf is private memory, written
                // once by dequeue); the error path reads the descriptor again rather than
                // keeping a copy alive, which would cost a register load per field.
                // Length first: only then is reading 8 bytes at the offset inside the region
                // (the queue's bounds check made offset + length <= data.size, so the offset
                // fits an Int and the conversion needs no overflow check).
                guard buf[j].length == bufferSize, buf[j].cookie == UInt32(truncatingIfNeeded: expected),
                      (base + Int(truncatingIfNeeded: buf[j].offset.rawValue)).loadUnaligned(as: UInt64.self) == expected
                else {
                    r.status = .verifyError
                    r.detail = "expected sequence \(expected), got descriptor \(buf[j])"
                    break outer
                }
                expected &+= 1
                j &+= 1
            }
            if freeQ.enqueue(UnsafeBufferPointer(start: buf.baseAddress, count: n)) != n {
                r.status = .queueError
                r.detail = freeQ.error.map { "free queue: \($0)" } ?? "free queue full"
                break
            }
            if sleeping && freeQ.consumerWantsSignal() { ring(freeBell, &r) }
        }
        if sleeping && freeQ.consumerWantsSignalBeforeIdle() { ring(freeBell, &r) }
        r.processed = expected
    }

    /// Nothing to consume: poll (busy mode), or poll `spin` times and then sleep on the
    /// doorbell after asking for it (sleep mode), going idle first on `other`, the queue
    /// this side produces on. Returns a status to stop with, or nil.
    @inline(__always)
    func waitForWork(_ q: inout QueueConsumer<BufferDescriptor>, _ bell: borrowing Doorbell, _ idle: inout UInt64,
                     _ r: inout RingWorkerResult, idleOn other: inout QueueProducer<BufferDescriptor>,
                     _ otherBell: borrowing Doorbell) -> RingWorkerStatus? {
        if q.hasFailed { return .queueError }
        if params.mode == .busy {
            ob_cpu_relax()
            idle &+= 1
            if idle & 0xffff == 0 && Clock.monotonicNanoseconds > deadline { return .stalled }
            return nil
        }
        for _ in 0..<params.spin {
            if !q.isEmpty() { return nil }
            ob_cpu_relax()
        }
        switch q.prepareToSleep(wakeAfter: params.wakeAfter, heavyBarrier: { () throws(Errno) in try Membarrier.run() }) {
        case .workArrived(let ranHeavyBarrier):
            if ranHeavyBarrier { r.heavyBarriers &+= 1 }
        case .heavyBarrierFailed(let error):
            r.detail = "membarrier: \(error)"
            return .systemError
        case .sleep(let ranHeavyBarrier):
            if ranHeavyBarrier { r.heavyBarriers &+= 1 }
            // Going idle on the queue we produce on, right before blocking (only here: a
            // request that finds work never blocks, so costs no flush).
            if params.idleFlush && other.consumerWantsSignalBeforeIdle() { ring(otherBell, &r) }
            r.sleeps &+= 1
            let rung: Bool
            do { rung = try bell.wait(timeoutMilliseconds: Int(params.sleepTimeoutMilliseconds)) } catch {
                q.cancelSignal()
                r.detail = "doorbell wait: \(error)"
                return .systemError
            }
            q.cancelSignal()
            if !rung { r.timeouts &+= 1 }
            if Clock.monotonicNanoseconds > deadline { return .stalled }
        }
        return q.hasFailed ? .queueError : nil
    }

    /// The producer's pause (RingParameters.pauseNanoseconds): a sleep when long, else a
    /// busy wait of a random length up to it, so the consumer's requests for a signal
    /// keep meeting the producer's enqueues at every distance. The C worker's pause_for
    /// does the same.
    func pause(_ rng: inout UInt64) {
        let ns = params.pauseNanoseconds
        if ns >= 100_000 {
            usleep(UInt32(min(ns / 1000, 1_000_000)))
            return
        }
        rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17
        let end = Clock.monotonicNanoseconds &+ rng % (ns &+ 1)
        while Clock.monotonicNanoseconds < end { ob_cpu_relax() }
    }

    func ring(_ bell: borrowing Doorbell, _ r: inout RingWorkerResult) {
        try? bell.ring()
        r.doorbells &+= 1
    }
}

private func runC(_ p: RingParameters, _ layout: QueuePairLayout, _ deadline: UInt64, _ barriers: HeavyBarrierUse,
                  _ queues: borrowing SharedMapping, _ data: borrowing SharedMapping,
                  _ active: borrowing Doorbell, _ free: borrowing Doorbell, _ r: inout RingWorkerResult) {
    var cp = ref_params(
        mode: p.mode == .busy ? Int32(REF_MODE_BUSY) : Int32(REF_MODE_SLEEP),
        batch: UInt32(p.batch), count: p.count, capacity: UInt32(p.capacity),
        buffer_count: UInt32(p.bufferCount), buffer_size: UInt32(p.bufferSize), spin: UInt32(p.spin),
        deadline_ns: deadline, free_offset: layout.freeOffset, active_offset: layout.activeOffset,
        registered: barriers.registered ? 1 : 0, heavy_threshold: barriers.threshold,
        pause_every: p.pauseEvery, pause_ns: p.pauseNanoseconds, seed: p.seed,
        sleep_timeout_ms: p.sleepTimeoutMilliseconds, wake_after: p.wakeAfter, idle_flush: p.idleFlush ? 1 : 0)
    var cr = ref_result()
    if p.role == .producer {
        ref_run_producer(&cp, queues.base, queues.size, data.base, data.size,
                         active.fd.raw.rawValue, free.fd.raw.rawValue, &cr)
    } else {
        ref_run_consumer(&cp, queues.base, queues.size, data.base, data.size,
                         active.fd.raw.rawValue, free.fd.raw.rawValue, &cr)
    }
    r.status = RingWorkerStatus(rawValue: UInt32(cr.status)) ?? .systemError
    r.processed = cr.processed
    r.doorbells = cr.doorbells
    r.sleeps = cr.sleeps
    r.timeouts = cr.timeouts
    r.heavyBarriers = cr.heavy_barriers
}

/// What a sleeping worker may do about the asymmetric signal ordering: whether its
/// process is registered for the peer's heavy barrier (as a producer), and whether it can
/// and may run one (as a consumer).
struct HeavyBarrierUse {
    var registered: Bool
    /// The consumers' heavyBarrierThreshold: 0 when this process cannot run the barrier.
    var threshold: UInt32
    static let none = HeavyBarrierUse(threshold: 0)

    /// Registers this process; threshold 0 turns the asymmetric ordering off (and makes no
    /// system call).
    init(threshold: UInt32) {
        registered = threshold != 0 && (try? Membarrier.register()) != nil
        self.threshold = threshold != 0 && Membarrier.isUsable ? threshold : 0
    }
}

/// Fault injection: overwrites random words of both queues (indices, signal flags and
/// ordering words, descriptor fields) with random values, one write every 200 us, until its deadline or
/// until it is terminated. The other workers must detect it and stop cleanly.
private func runHostile(_ p: RingParameters, _ queues: borrowing SharedMapping, _ layout: QueuePairLayout,
                        _ deadline: UInt64, _ r: inout RingWorkerResult) {
    var rng = p.seed | 1
    func next() -> UInt64 {
        rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17
        return rng
    }
    usleep(20_000)  // let traffic start
    let queueOffsets = [layout.freeOffset, layout.activeOffset]
    while Clock.monotonicNanoseconds < deadline {
        let q = queues.base + queueOffsets[Int(next() % 2)]
        switch next() % 5 {
        case 0: q.storeBytes(of: UInt32(truncatingIfNeeded: next()), toByteOffset: QueueLayout.tailOffset, as: UInt32.self)
        case 4:
            let word = [QueueLayout.producerBarrierOffset, QueueLayout.signalOffset, QueueLayout.signalOrderingOffset][Int(next() % 3)]
            q.storeBytes(of: UInt32(truncatingIfNeeded: next() % 3), toByteOffset: word, as: UInt32.self)
        case 1: q.storeBytes(of: UInt32(truncatingIfNeeded: next()), toByteOffset: QueueLayout.headOffset, as: UInt32.self)
        case 2:
            let slot = Int(next() % UInt64(layout.queue.capacity))
            q.storeBytes(of: next(), toByteOffset: QueueLayout.entriesOffset + slot * 16, as: UInt64.self)
        default:
            let slot = Int(next() % UInt64(layout.queue.capacity))
            q.storeBytes(of: UInt32(truncatingIfNeeded: next()), toByteOffset: QueueLayout.entriesOffset + slot * 16 + 8, as: UInt32.self)
        }
        r.processed &+= 1
        usleep(200)
    }
}
