import OutboardSystem
import OutboardRings

/// Which queue implementation a worker runs.
public enum RingImplementation: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    case swift = 1, c = 2
    public var description: String { self == .swift ? "outboard" : "c" }
}

/// Busy: both sides poll and never sleep. Sleep: a side whose queue is empty polls
/// `spin` times, then asks for a doorbell and sleeps on it.
public enum RingMode: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    case busy = 0, sleep = 1
    public var description: String { self == .busy ? "busy" : "sleep" }
}

public enum RingRole: UInt8, Sendable, CustomStringConvertible {
    /// The client: fills buffers and enqueues them on the active queue.
    case producer = 1
    /// The server: consumes the active queue, verifies every buffer, returns it on the free queue.
    case consumer = 2
    /// Fault injection: writes random values into the queues' indices and descriptors.
    case hostile = 3
    public var description: String {
        switch self {
        case .producer: return "producer"
        case .consumer: return "consumer"
        case .hostile: return "hostile"
        }
    }
}

/// Everything a worker needs to know, sent by the harness over the worker's socket. The
/// queue layout is derived from these numbers, never from the shared memory.
public struct RingParameters: Sendable, Equatable {
    public var role: RingRole
    public var implementation: RingImplementation
    public var mode: RingMode
    public var batch: Int
    public var count: UInt64
    public var capacity: Int
    public var bufferSize: Int
    public var spin: Int
    /// CPU to pin to, or -1.
    public var cpu: Int
    /// The worker gives up (status `.stalled`) after this long.
    public var timeoutMilliseconds: Int
    public var seed: UInt64
    /// The producer pauses after every `pauseEvery` descriptors (0: never), in both
    /// implementations. A test hook: each pause is a lull in which the consumer finds its
    /// queue empty, so a sleeping-mode test exercises the doorbell protocol however fast
    /// the queue is.
    public var pauseEvery: UInt64
    /// How long: from 100 us, a sleep of that length; below, a busy wait of a random
    /// length up to it (seeded by `seed`), which puts the producer's enqueues at every
    /// distance from the consumer's requests for a signal: the lost wake-up race.
    public var pauseNanoseconds: UInt64
    /// Sleep mode: QueueConsumer.heavyBarrierThreshold for both sides' consumers. A sleep
    /// after at least this many descriptors uses the asymmetric signal ordering (the
    /// sleeper runs membarrier(2), the producer skips its fence); 0 never does (fences
    /// only); 1 always does, as long as something was dequeued since the last sleep.
    public var heavyBarrierThreshold: UInt32
    /// Sleep mode: how long a sleep on the doorbell may last before the worker looks again
    /// by itself (counted as a timeout). A lost wake-up that nothing else rescues then
    /// shows as a timeout of this length rather than a hang.
    public var sleepTimeoutMilliseconds: UInt32
    /// Sleep mode: a sleeping consumer asks to be woken once this many entries wait, or
    /// when the producer goes idle (QueueConsumer.requestSignal(wakeAfter:)); each side
    /// goes idle on the queue it produces on before it sleeps or pauses, and when done.
    /// 1 wakes at the first entry; above the capacity, only the idle flush wakes.
    public var wakeAfter: UInt32
    /// Sleep mode: each side answers a standing request before it pauses or sleeps (the
    /// idle flush; the one when a side is done always runs). Off only in tests of the wake
    /// index alone: a consumer that asks for more entries than then come waits for its
    /// sleep timeout.
    public var idleFlush: Bool

    public init(role: RingRole, implementation: RingImplementation, mode: RingMode, batch: Int, count: UInt64,
                capacity: Int = 512, bufferSize: Int = 2048, spin: Int = 2000, cpu: Int = -1,
                timeoutMilliseconds: Int = 120_000, seed: UInt64 = 1, pauseEvery: UInt64 = 0,
                pauseNanoseconds: UInt64 = 300_000, heavyBarrierThreshold: UInt32 = 4096,
                sleepTimeoutMilliseconds: UInt32 = 100, wakeAfter: UInt32 = 1, idleFlush: Bool = true) {
        self.role = role
        self.implementation = implementation
        self.mode = mode
        self.batch = batch
        self.count = count
        self.capacity = capacity
        self.bufferSize = bufferSize
        self.spin = spin
        self.cpu = cpu
        self.timeoutMilliseconds = timeoutMilliseconds
        self.seed = seed
        self.pauseEvery = pauseEvery
        self.pauseNanoseconds = pauseNanoseconds
        self.heavyBarrierThreshold = heavyBarrierThreshold
        self.sleepTimeoutMilliseconds = sleepTimeoutMilliseconds
        self.wakeAfter = wakeAfter
        self.idleFlush = idleFlush
    }

    /// As many buffers as queue slots: neither queue of the pair can overflow.
    public var bufferCount: Int { capacity }
    public var pairLayout: QueuePairLayout { get throws(QueueError) { try QueuePairLayout(capacity: capacity) } }
    public var dataRegionSize: Int { bufferCount * bufferSize }

    static let magic: UInt32 = 0x5752_424f  // "OBRW"
    static let version: UInt16 = 5

    var encoded: [UInt8] {
        var w = WireWriter()
        w.put(Self.magic); w.put(Self.version)
        w.put(role.rawValue); w.put(implementation.rawValue); w.put(mode.rawValue)
        w.put(UInt32(batch)); w.put(count); w.put(UInt32(capacity)); w.put(UInt32(bufferSize))
        w.put(UInt32(spin)); w.put(Int32(cpu)); w.put(UInt32(timeoutMilliseconds)); w.put(seed)
        w.put(pauseEvery); w.put(pauseNanoseconds); w.put(heavyBarrierThreshold); w.put(sleepTimeoutMilliseconds); w.put(wakeAfter)
        w.put(UInt8(idleFlush ? 1 : 0))
        return w.bytes
    }

    /// Decodes and validates; nil with a reason when anything is off.
    static func decode(_ bytes: [UInt8]) -> Result<RingParameters, RingWorkerFailure> {
        var r = WireReader(bytes)
        guard r.get(UInt32.self) == magic, r.get(UInt16.self) == version,
              let role = r.get(UInt8.self).flatMap(RingRole.init(rawValue:)),
              let impl = r.get(UInt8.self).flatMap(RingImplementation.init(rawValue:)),
              let mode = r.get(UInt8.self).flatMap(RingMode.init(rawValue:)),
              let batch = r.get(UInt32.self), let count = r.get(UInt64.self),
              let capacity = r.get(UInt32.self), let bufferSize = r.get(UInt32.self),
              let spin = r.get(UInt32.self), let cpu = r.get(Int32.self),
              let timeout = r.get(UInt32.self), let seed = r.get(UInt64.self),
              let pauseEvery = r.get(UInt64.self), let pauseNs = r.get(UInt64.self),
              let heavy = r.get(UInt32.self), let sleepTimeout = r.get(UInt32.self),
              let wakeAfter = r.get(UInt32.self), let flush = r.get(UInt8.self), flush <= 1, r.rest.isEmpty
        else { return .failure(.setup("malformed parameter message")) }
        let p = RingParameters(role: role, implementation: impl, mode: mode, batch: Int(batch), count: count,
                               capacity: Int(capacity), bufferSize: Int(bufferSize), spin: Int(spin),
                               cpu: Int(cpu), timeoutMilliseconds: Int(timeout), seed: seed, pauseEvery: pauseEvery,
                               pauseNanoseconds: pauseNs, heavyBarrierThreshold: heavy,
                               sleepTimeoutMilliseconds: sleepTimeout, wakeAfter: wakeAfter,
                               idleFlush: flush == 1)
        if let problem = p.problem { return .failure(.setup(problem)) }
        return .success(p)
    }

    /// Why these parameters cannot run, or nil.
    public var problem: String? {
        if (try? QueueLayout(capacity: capacity)) == nil { return "capacity \(capacity) is not a power of two in 2...2^20" }
        if batch < 1 || batch > capacity { return "batch \(batch) outside 1...\(capacity)" }
        if bufferSize < 8 || bufferSize > 1 << 20 { return "buffer size \(bufferSize) outside 8...1 MiB" }
        if count == 0 { return "count is 0" }
        if wakeAfter == 0 || wakeAfter > QueueConsumer<BufferDescriptor>.maximumWakeAfter {
            return "wake-after \(wakeAfter) outside 1...\(QueueConsumer<BufferDescriptor>.maximumWakeAfter)"
        }
        if pauseNanoseconds > 1_000_000_000 { return "pause of \(pauseNanoseconds) ns is over a second" }
        if sleepTimeoutMilliseconds == 0 || sleepTimeoutMilliseconds > 600_000 {
            return "sleep timeout of \(sleepTimeoutMilliseconds) ms outside 1 ms...10 min"
        }
        return nil
    }
}
