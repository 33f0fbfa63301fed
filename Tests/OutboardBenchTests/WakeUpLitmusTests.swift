import Foundation
import OutboardRings
import OutboardSystem
import OutboardTestSupport
import Synchronization
import Testing

/// The lost wake-up race as a litmus test: the wake-up check is a store-buffering pattern
/// (each side stores, then loads what the other stored), so it is run the way litmus tools
/// run one, in lock-step, many times, between two threads of this process on two CPUs.
///
/// Each round, the consumer (one thread) finds its queue empty and runs the sleep protocol
/// (QueueConsumer.prepareToSleep(wakeAfter:heavyBarrier:): the request, its fence or heavy
/// barrier, the re-check), while the producer (a second thread) enqueues one descriptor and checks for a request
/// (consumerWantsSignal, then consumerWantsSignalBeforeIdle when it goes idle). Both start
/// on the same signal, each after its own random delay, so that the two sequences meet at
/// every distance. The outcome "the consumer decides to sleep and the producer decides not
/// to ring" is the lost wake-up, and must never happen. Nothing else rescues it here, so
/// one is enough to fail, and the test needs no timing at all.
///
/// On x86 a store may wait in the store buffer while a later load runs, which is exactly
/// this outcome when a fence is missing. The rounds also count how often the two overlapped
/// (each saw the other's store), and a control runs the same pattern on two plain words
/// without fences, whose forbidden outcome shows that this machine reorders in this
/// harness; the run goes on (up to its round and time budget) until the control has shown
/// it often enough, so that a missing fence gets as many chances to show. A delay that
/// centres itself keeps the two sides meeting (CentringDelay).
///
/// Checked against the mutations: with only the producer's fence removed from
/// consumerWantsSignal, about 1 round in 150 lost its wake-up (3,056 of 460,602 at wake
/// after 1, 2,135 of 246,610 at wake after 2, on a loaded 2-vCPU VM).
@Suite(.serialized) struct WakeUpLitmusTests {
    /// Fences (threshold 0), waking at the first entry: the mutation "only the producer's
    /// fence removed from the wake-up check" (QueueProducer.consumerWantsSignal) fails here,
    /// as does the consumer's (QueueConsumer.requestSignal).
    /// Wake after 2 entries with one published: only the idle flush may answer, so dropping
    /// it (or reading the wake index as reached too early or never) fails too.
    /// Asymmetric: the consumer runs membarrier(2) each round and the producer no fence; a
    /// consumer that skipped the heavy barrier would fail.
    @Test(arguments: [(LitmusOrdering.fence, UInt32(1)), (.fence, 2), (.asymmetric, 1), (.asymmetric, 2)])
    func noRoundLosesAWakeUp(ordering: LitmusOrdering, wakeAfter: UInt32) throws {
        if ordering == .asymmetric {
            guard Membarrier.isUsable, (try? Membarrier.register()) != nil else {
                Issue.record("membarrier(2) GLOBAL_EXPEDITED is not available here")
                return
            }
        }
        let r = try runLitmus(ordering: ordering, wakeAfter: wakeAfter,
                              maxRounds: ordering == .asymmetric ? 200_000 : 2_000_000,
                              budgetNanoseconds: 8_000_000_000)
        let summary = "\(r.rounds) rounds: \(r.lost) lost, \(r.overlaps) overlaps, \(r.slept) sleeps; control: \(r.controlReorders) reorderings in \(r.controlRounds)"
        print("litmus \(ordering) wakeAfter \(wakeAfter): \(summary)")
        #expect(r.lost == 0, "lost wake-ups: \(summary)")
        #expect(r.slept > 0 && r.slept < r.rounds, "both outcomes must occur: \(summary)")
        #expect(!r.timedOut, "a thread did not answer within 10 s: \(summary)")
        #expect(!r.barrierFailed && !r.lostDescriptor, "\(summary)")
    }
}

enum LitmusOrdering: Sendable, CustomStringConvertible {
    case fence, asymmetric
    var description: String { self == .fence ? "fence" : "asymmetric" }
}

struct LitmusResult {
    var rounds = 0, lost = 0, overlaps = 0, slept = 0
    var controlRounds = 0, controlReorders = 0
    var timedOut = false, barrierFailed = false, lostDescriptor = false
}

struct LitmusTimeout: Error {}

/// Control words, each on its own cache line: 0 go (the round number), 1 done (the round
/// the producer finished), 2 the producer's answer, 3 stop, 4 and 5 the control pattern's
/// two words, 6 the control's second load, 7 the producer thread has ended, 8 the
/// consumer thread has ended, 9 the producer's delay for the round. Shared by the threads of a run (hence unchecked Sendable:
/// the words are atomics, and the memory outlives the threads).
struct LitmusControl: @unchecked Sendable {
    let base: UnsafeMutableRawPointer
    init() {
        base = .allocate(byteCount: 64 * 10, alignment: 64)
        for i in 0..<10 { (base + 64 * i).initializeMemory(as: UInt32.self, repeating: 0, count: 1) }
    }
    func word(_ i: Int) -> UnsafeMutablePointer<Atomic<UInt32>> {
        (base + 64 * i).assumingMemoryBound(to: Atomic<UInt32>.self)
    }
}

/// A busy delay of `n` steps (relaxed loads, which the compiler may not drop).
@inline(never)
func litmusDelay(_ n: UInt32, _ w: UnsafeMutablePointer<Atomic<UInt32>>) {
    var i: UInt32 = 0
    while i < n { _ = w.pointee.load(ordering: .relaxed); i &+= 1 }
}

/// Waits for `word` to leave `value` (or, with `until`, to become it), yielding now and then so
/// that a peer that shares this CPU can run; false after `deadline`.
func litmusAwait(_ word: UnsafeMutablePointer<Atomic<UInt32>>, equal value: UInt32, deadline: UInt64) -> Bool {
    var spins: UInt32 = 0
    while word.pointee.load(ordering: .acquiring) != value {
        spins &+= 1
        if spins & 0x3ff == 0 {
            if Clock.monotonicNanoseconds > deadline { return false }
            sched_yield()
        }
    }
    return true
}

/// A delay that centres itself on the point where the two sides meet: after a round in
/// which the consumer came first (the producer had not published by its re-check) the
/// consumer starts a little later, otherwise a little earlier (a negative offset delays
/// the producer instead), plus a random spread. So the rounds keep landing where the
/// stores and loads of the two sides overlap, whatever this machine's latency between the
/// CPUs or the length of a heavy barrier.
struct CentringDelay {
    var offset: Int32 = 64
    var rng: UInt64
    /// The consumer's delay and the producer's.
    mutating func next() -> (consumer: UInt32, producer: UInt32) {
        rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17
        let spread = UInt32(truncatingIfNeeded: rng % 32)
        return offset >= 0 ? (UInt32(offset) + spread, 0) : (spread, UInt32(-offset))
    }
    mutating func consumerWasFirst(_ first: Bool) {
        // Steps grow with the distance from 0, so that a heavy barrier's ~10 us is found in
        // a few hundred rounds, and stay single near 0, where a fence's few ns are.
        let step = 1 + abs(offset) >> 5
        offset = first ? min(offset + step, 1 << 20) : max(offset - step, -(1 << 20))
    }
}

struct LitmusShared: @unchecked Sendable {
    let ctl: LitmusControl
    let memory: UnsafeMutableRawPointer
    let size: Int
    let layout: QueueLayout
    let result: UnsafeMutablePointer<LitmusResult>
}

func runLitmus(ordering: LitmusOrdering, wakeAfter: UInt32, maxRounds: Int, budgetNanoseconds: UInt64) throws -> LitmusResult {
    let layout = try QueueLayout(capacity: 8)
    // Plain allocations, freed only once both threads have ended.
    let memory = UnsafeMutableRawPointer.allocate(byteCount: layout.byteCount, alignment: QueueLayout.alignment)
    try layout.initialize(memory: memory, size: layout.byteCount, at: 0)
    let ctl = LitmusControl()
    let result = UnsafeMutablePointer<LitmusResult>.allocate(capacity: 1)
    result.initialize(to: LitmusResult())
    let shared = LitmusShared(ctl: ctl, memory: memory, size: layout.byteCount, layout: layout, result: result)
    let asymmetric = ordering == .asymmetric
    let cpus = CPU.firstTwoAllowed
    let start = Clock.monotonicNanoseconds
    // A thread that stops answering (never scheduled, or a bug) ends the run as timed out.
    let giveUp = start + budgetNanoseconds + 10_000_000_000

    // The producer: one descriptor per protocol round, then its wake-up checks; in control
    // rounds (odd), store y and load x.
    let producer = Thread {
        let ctl = shared.ctl
        defer { ctl.word(7).pointee.store(1, ordering: .releasing) }
        if let cpus { try? CPU.pin(to: cpus.1) }
        let go = ctl.word(0), done = ctl.word(1), answer = ctl.word(2), stop = ctl.word(3)
        let x = ctl.word(4), y = ctl.word(5), controlLoad = ctl.word(6)
        var p = try! QueueProducer<BufferDescriptor>(memory: shared.memory, size: shared.size, at: 0, layout: shared.layout,
                                                     registeredForHeavyBarrier: asymmetric)
        var rng: UInt64 = 0x2545_F491_4F6C_DD1D
        var seen: UInt32 = 0
        var spins: UInt32 = 0
        while stop.pointee.load(ordering: .relaxed) == 0 {
            let g = go.pointee.load(ordering: .acquiring)
            if g == seen {
                spins &+= 1
                if spins & 0x3ff == 0 { sched_yield() }
                continue
            }
            seen = g
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17
            litmusDelay(ctl.word(9).pointee.load(ordering: .relaxed) &+ UInt32(truncatingIfNeeded: rng % 16), x)
            if g & 1 == 1 {
                y.pointee.store(1, ordering: .relaxed)
                controlLoad.pointee.store(x.pointee.load(ordering: .relaxed), ordering: .relaxed)
            } else {
                _ = p.enqueue(BufferDescriptor(offset: RegionOffset(0), length: 64))
                var rang = p.consumerWantsSignal()
                if !rang { rang = p.consumerWantsSignalBeforeIdle() }
                answer.pointee.store(rang ? 1 : 0, ordering: .relaxed)
            }
            // Release: pairs with the consumer's acquiring load of `done` (litmusAwait).
            done.pointee.store(g, ordering: .releasing)
        }
    }

    // The consumer: a control round, then a protocol round, until the budgets run out.
    let consumer = Thread {
        let ctl = shared.ctl
        defer { ctl.word(8).pointee.store(1, ordering: .releasing) }
        if let cpus { try? CPU.pin(to: cpus.0) }
        let go = ctl.word(0), done = ctl.word(1), answer = ctl.word(2)
        let x = ctl.word(4), y = ctl.word(5), controlLoad = ctl.word(6)
        var c = try! QueueConsumer<BufferDescriptor>(memory: shared.memory, size: shared.size, at: 0, layout: shared.layout,
                                                     bounds: DescriptorBounds(regionSize: 4096))
        // Threshold 1: every request after a dequeue takes (or keeps) the asymmetric ordering.
        if asymmetric { c.heavyBarrierThreshold = 1 }
        var r = LitmusResult()
        var controlDelay = CentringDelay(rng: 0x9E37_79B9_7F4A_7C15)
        var protocolDelay = CentringDelay(rng: 0xD1B5_4A32_D192_ED03)
        var round: UInt32 = 0
        // Enough rounds that the control has shown the reordering many times, within the
        // budgets: a missing fence then had as many chances to show.
        while r.rounds < maxRounds && Clock.monotonicNanoseconds - start < budgetNanoseconds
                && (r.rounds < 20_000 || r.controlReorders < 5_000) {
            // Control: store x, load y, no fence on either side; both loads seeing 0 is
            // the store-buffering reordering.
            round &+= 1
            x.pointee.store(0, ordering: .relaxed)
            y.pointee.store(0, ordering: .relaxed)
            var delay = controlDelay.next()
            ctl.word(9).pointee.store(delay.producer, ordering: .relaxed)
            go.pointee.store(round, ordering: .releasing)
            litmusDelay(delay.consumer, x)
            x.pointee.store(1, ordering: .relaxed)
            let seenY = y.pointee.load(ordering: .relaxed)
            guard litmusAwait(done, equal: round, deadline: giveUp) else { r.timedOut = true; break }
            let seenX = controlLoad.pointee.load(ordering: .relaxed)
            r.controlRounds += 1
            if seenY == 0 && seenX == 0 { r.controlReorders += 1 }
            controlDelay.consumerWasFirst(seenY == 0)

            // The protocol.
            round &+= 1
            delay = protocolDelay.next()
            ctl.word(9).pointee.store(delay.producer, ordering: .relaxed)
            go.pointee.store(round, ordering: .releasing)
            litmusDelay(delay.consumer, x)
            // The sleep protocol as the library's callers run it.
            var sleeps = false
            switch c.prepareToSleep(wakeAfter: wakeAfter, heavyBarrier: { try Membarrier.run() }) {
            case .sleep: sleeps = true
            case .workArrived: break
            case .heavyBarrierFailed: r.barrierFailed = true
            }
            if r.barrierFailed { break }
            guard litmusAwait(done, equal: round, deadline: giveUp) else { r.timedOut = true; break }
            let rang = answer.pointee.load(ordering: .relaxed) == 1
            r.rounds += 1
            if sleeps { r.slept += 1 }
            if sleeps && !rang { r.lost += 1 }
            if !sleeps && rang { r.overlaps += 1 }
            protocolDelay.consumerWasFirst(sleeps)
            c.cancelSignal()
            guard c.dequeue() != nil, c.isEmpty() else { r.lostDescriptor = true; break }
        }
        shared.result.pointee = r
    }
    producer.stackSize = 1 << 20
    consumer.stackSize = 1 << 20
    producer.start()
    consumer.start()
    // The consumer ends by itself (budget or timeout); then the producer is stopped.
    let joinBy = giveUp + 5_000_000_000
    while ctl.word(8).pointee.load(ordering: .acquiring) == 0 && Clock.monotonicNanoseconds < joinBy { usleep(1000) }
    ctl.word(3).pointee.store(1, ordering: .relaxed)
    while ctl.word(7).pointee.load(ordering: .acquiring) == 0 && Clock.monotonicNanoseconds < joinBy { usleep(1000) }
    guard ctl.word(7).pointee.load(ordering: .acquiring) == 1, ctl.word(8).pointee.load(ordering: .acquiring) == 1 else {
        // The threads still use the memory: leave it (a leak in a failing test) rather than free it under them.
        throw LitmusTimeout()
    }
    let r = result.pointee
    memory.deallocate()
    ctl.base.deallocate()
    result.deallocate()
    return r
}
