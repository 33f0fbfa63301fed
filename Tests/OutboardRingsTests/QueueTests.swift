import Testing
import OutboardRings
import OutboardTestSupport

/// A queue in private memory between guard pages, both ends in this process: the deterministic half of the
/// queue tests (the cross-process half is in OutboardBenchTests).
struct TestQueue: ~Copyable {
    let memory: UnsafeMutableRawPointer
    let layout: QueueLayout
    /// Where the queue lives: flush against an inaccessible page, so that a byte read or
    /// written past the queue on that side kills the test process.
    let area: GuardedArea
    var producer: QueueProducer<BufferDescriptor>
    var consumer: QueueConsumer<BufferDescriptor>

    init(capacity: Int, regionSize: Int = 1 << 20, maxLength: UInt32 = .max, startIndex: UInt32 = 0,
         registeredForHeavyBarrier: Bool = false, flush: GuardedArea.Flush = .atEnd) throws {
        let l = try QueueLayout(capacity: capacity)
        let a = GuardedArea(byteCount: l.byteCount, flush: flush)
        let m = a.base
        // Exactly sized and a fresh layout: these cannot fail.
        try! l.initialize(memory: m, size: l.byteCount, at: 0, startIndex: startIndex)
        let p = try! QueueProducer<BufferDescriptor>(memory: m, size: l.byteCount, at: 0, layout: l, startIndex: startIndex,
                                                     registeredForHeavyBarrier: registeredForHeavyBarrier)
        let c = try! QueueConsumer<BufferDescriptor>(memory: m, size: l.byteCount, at: 0, layout: l,
                                   bounds: DescriptorBounds(regionSize: regionSize, maxLength: maxLength),
                                   startIndex: startIndex)
        layout = l
        memory = m
        area = a
        producer = p
        consumer = c
    }

    func poke<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        memory.storeBytes(of: value, toByteOffset: offset, as: T.self)
    }

    func peek(at offset: Int) -> UInt32 { memory.load(fromByteOffset: offset, as: UInt32.self) }

    /// Moves `n` descriptors through the queue.
    mutating func pass(_ n: Int) {
        for i in 0..<n {
            let moved = producer.enqueue(desc(i % 100)) && consumer.dequeue() == desc(i % 100)
            #expect(moved)
        }
    }
}

func desc(_ i: Int, length: UInt32 = 64) -> BufferDescriptor {
    BufferDescriptor(offset: RegionOffset(i * 64), length: length, cookie: UInt32(truncatingIfNeeded: i))
}

@Suite struct QueueTests {
    @Test func fifoAcrossManyWrapArounds() throws {
        var q = try TestQueue(capacity: 8)
        var next = 0, expected = 0
        var out = [BufferDescriptor](repeating: desc(0), count: 5)
        for round in 0..<10_000 {
            let batch = (0..<(round % 7 + 1)).map { desc((next + $0) % 1000) }
            let n = batch.withUnsafeBufferPointer { q.producer.enqueue($0) }
            next += n
            let m = out.withUnsafeMutableBufferPointer { q.consumer.dequeue(into: $0) }
            for d in out.prefix(m) {
                #expect(d == desc(expected % 1000))
                expected += 1
            }
        }
        while let d = q.consumer.dequeue() { #expect(d == desc(expected % 1000)); expected += 1 }
        #expect(expected == next)
        #expect(next > 30_000)  // indices wrapped the 8-slot ring thousands of times
        do { let ok = q.producer.error == nil && q.consumer.error == nil; #expect(ok) }
    }

    @Test func enqueueStopsAtCapacityWithoutError() throws {
        var q = try TestQueue(capacity: 4)
        let batch = (0..<6).map { desc($0) }
        do { let ok = batch.withUnsafeBufferPointer { q.producer.enqueue($0) } == 4; #expect(ok) }
        do { let ok = !q.producer.enqueue(desc(9)); #expect(ok) }
        do { let ok = q.producer.freeSlots() == 0; #expect(ok) }
        do { let ok = q.consumer.dequeue() == desc(0); #expect(ok) }
        do { let ok = q.producer.freeSlots() == 1; #expect(ok) }
        do { let ok = q.producer.enqueue(desc(4)); #expect(ok) }
        do { let ok = q.producer.error == nil; #expect(ok) }
    }

    @Test func unsignedIndexWrapAroundIsNotAnError() throws {
        // Start both ends just below 2^32, as after a long uptime.
        var q = try TestQueue(capacity: 4, startIndex: .max - 1)
        for i in 0..<20 {
            do { let ok = q.producer.enqueue(desc(i)); #expect(ok) }
            do { let ok = q.consumer.dequeue() == desc(i); #expect(ok) }
        }
        do { let ok = q.producer.error == nil && q.consumer.error == nil; #expect(ok) }
    }

    @Test func descriptorOutsideTheRegionStopsTheConsumer() throws {
        var q = try TestQueue(capacity: 8, regionSize: 4096, maxLength: 1024)
        let good = BufferDescriptor(offset: RegionOffset(4096 - 64), length: 64)
        let past = BufferDescriptor(offset: RegionOffset(4096 - 63), length: 64)
        let overflow = BufferDescriptor(offset: RegionOffset(rawValue: .max - 10), length: 64)
        do { let ok = q.producer.enqueue(good); #expect(ok) }
        do { let ok = q.producer.enqueue(past); #expect(ok) }
        do { let ok = q.producer.enqueue(good); #expect(ok) }
        var out = [BufferDescriptor](repeating: desc(0), count: 8)
        do { let ok = out.withUnsafeMutableBufferPointer { q.consumer.dequeue(into: $0) } == 1; #expect(ok) }
        #expect(out[0] == good)
        do { let ok = q.consumer.error == .descriptorOutOfBounds(past, bounds: q.consumer.bounds); #expect(ok) }
        do { let ok = q.consumer.dequeue() == nil; #expect(ok) }  // sticky
        var q2 = try TestQueue(capacity: 8, regionSize: 4096, maxLength: 1024)
        do { let ok = q2.producer.enqueue(overflow); #expect(ok) }
        do { let ok = q2.consumer.dequeue() == nil; #expect(ok) }
        do { let ok = q2.consumer.hasFailed; #expect(ok) }
        var q3 = try TestQueue(capacity: 8, regionSize: 4096, maxLength: 1024)
        do { let ok = q3.producer.enqueue(BufferDescriptor(offset: RegionOffset(0), length: 1025)); #expect(ok) }
        do { let ok = q3.consumer.dequeue() == nil; #expect(ok) }
        do { let ok = q3.consumer.hasFailed; #expect(ok) }
    }

    /// Once failed, an endpoint stays failed with the error it recorded first: isEmpty()
    /// and freeSlots() neither report work nor space, nor read the peer's index again.
    @Test func theFirstErrorStaysAndAFailedEndpointOffersNothing() throws {
        var q = try TestQueue(capacity: 8, regionSize: 4096, maxLength: 1024)
        let past = BufferDescriptor(offset: RegionOffset(4096 - 63), length: 64)
        do { let ok = q.producer.enqueue(past); #expect(ok) }
        do { let ok = q.producer.enqueue(desc(1)); #expect(ok) }
        do { let ok = q.consumer.dequeue() == nil; #expect(ok) }
        let refused = QueueError.descriptorOutOfBounds(past, bounds: q.consumer.bounds)
        do { let ok = q.consumer.error == refused; #expect(ok) }
        // Work is waiting, but none can be dequeued: a caller polling isEmpty() must not
        // be sent back to dequeue for ever.
        do { let ok = q.consumer.isEmpty(); #expect(ok) }
        q.poke(UInt32(1000), at: QueueLayout.tailOffset)  // an impossible tail on top
        do { let ok = q.consumer.isEmpty(); #expect(ok) }
        do { let ok = q.consumer.error == refused; #expect(ok) }
        do { let ok = !q.consumer.requestSignal() && !q.consumer.confirmSleep(); #expect(ok) }

        var p = try TestQueue(capacity: 4)
        p.poke(UInt32(7), at: QueueLayout.headOffset)
        do { let ok = p.producer.freeSlots() == 0; #expect(ok) }
        let first = QueueError.peerIndexOutOfRange(peer: 7, own: 0, capacity: 4)
        do { let ok = p.producer.error == first; #expect(ok) }
        p.poke(UInt32(9), at: QueueLayout.headOffset)
        do { let ok = p.producer.freeSlots() == 0 && !p.producer.enqueue(desc(0)); #expect(ok) }
        do { let ok = p.producer.error == first; #expect(ok) }
    }

    /// A buffer the receiver will write `minLength` bytes into cannot sit at the very end
    /// of the region with a short length.
    @Test func shortBuffersAreRefusedWhenAMinimumIsSet() throws {
        var q = try TestQueue(capacity: 8, regionSize: 4096, maxLength: 2048)
        let atEnd = BufferDescriptor(offset: RegionOffset(4096), length: 0)
        do { let ok = q.producer.enqueue(atEnd); #expect(ok) }
        do { let ok = q.consumer.dequeue() == atEnd; #expect(ok) }  // no minimum: an empty buffer is fine
        let strict = DescriptorBounds(regionSize: 4096, minLength: 2048, maxLength: 2048)
        #expect(!strict.admits(atEnd))
        #expect(!strict.admits(BufferDescriptor(offset: RegionOffset(4090), length: 6)))
        #expect(!strict.admits(BufferDescriptor(offset: RegionOffset(0), length: 2047)))
        #expect(strict.admits(BufferDescriptor(offset: RegionOffset(2048), length: 2048)))
        #expect(!strict.admits(BufferDescriptor(offset: RegionOffset(2049), length: 2048)))
    }

    @Test func impossibleTailIsReportedNotFollowed() throws {
        var q = try TestQueue(capacity: 8)
        q.poke(UInt32(9), at: QueueLayout.tailOffset)  // 9 > capacity ahead of head 0
        do { let ok = q.consumer.dequeue() == nil; #expect(ok) }
        do { let ok = q.consumer.error == .peerIndexOutOfRange(peer: 9, own: 0, capacity: 8); #expect(ok) }
        var q2 = try TestQueue(capacity: 8)
        do { let ok = q2.producer.enqueue(desc(1)); #expect(ok) }
        do { let ok = q2.producer.enqueue(desc(2)); #expect(ok) }
        do { let ok = q2.consumer.dequeue() == desc(1); #expect(ok) }
        q2.poke(UInt32(1), at: QueueLayout.tailOffset)  // tail moved backwards behind what we saw
        do { let ok = q2.consumer.dequeue() == desc(2); #expect(ok) }  // already known to be published: fine
        do { let ok = q2.consumer.dequeue() == nil; #expect(ok) }
        do { let ok = q2.consumer.hasFailed; #expect(ok) }
    }

    @Test func impossibleHeadIsReportedNotFollowed() throws {
        var q = try TestQueue(capacity: 4)
        for i in 0..<4 { let ok = q.producer.enqueue(desc(i)); #expect(ok) }
        q.poke(UInt32(7), at: QueueLayout.headOffset)  // consumer "consumed" more than was produced
        do { let ok = !q.producer.enqueue(desc(5)); #expect(ok) }
        do { let ok = q.producer.error == .peerIndexOutOfRange(peer: 7, own: 4, capacity: 4); #expect(ok) }
        do { let ok = q.producer.freeSlots() == 0; #expect(ok) }
    }

    @Test func ourOwnIndexInSharedMemoryIsNeverReadBack() throws {
        var q = try TestQueue(capacity: 8)
        do { let ok = q.producer.enqueue(desc(0)); #expect(ok) }
        q.poke(UInt32(12345), at: QueueLayout.headOffset)  // the consumer's own published head
        do { let ok = q.consumer.dequeue() == desc(0); #expect(ok) }  // consumer uses its private head
        do { let ok = q.consumer.error == nil; #expect(ok) }
    }

    @Test func signalProtocol() throws {
        var q = try TestQueue(capacity: 8)
        // Nobody asked: no doorbell.
        do { let ok = q.producer.enqueue(desc(0)); #expect(ok) }
        do { let ok = !q.producer.consumerWantsSignal(); #expect(ok) }
        // Work present: the consumer must not sleep and withdraws its request.
        do { let ok = !q.consumer.prepareToSleep(); #expect(ok) }
        do { let ok = !q.producer.consumerWantsSignal(); #expect(ok) }
        do { let ok = q.consumer.dequeue() == desc(0); #expect(ok) }
        // Empty: the consumer may sleep; the next enqueue asks for exactly one doorbell.
        do { let ok = q.consumer.prepareToSleep(); #expect(ok) }
        do { let ok = q.producer.enqueue(desc(1)); #expect(ok) }
        do { let ok = q.producer.consumerWantsSignal(); #expect(ok) }
        do { let ok = !q.producer.consumerWantsSignal(); #expect(ok) }
        do { let ok = q.consumer.dequeue() == desc(1); #expect(ok) }
        // A request withdrawn after waking is not answered.
        do { let ok = q.consumer.prepareToSleep(); #expect(ok) }
        q.consumer.cancelSignal()
        do { let ok = q.producer.enqueue(desc(2)); #expect(ok) }
        do { let ok = !q.producer.consumerWantsSignal(); #expect(ok) }
    }

    /// The choice between the fence and the asymmetric ordering of the wake-up check, as
    /// published in the queue: taken up by dequeue after `heavyBarrierThreshold`
    /// descriptors without a request (no barrier needed), kept by a request that comes at
    /// least that far apart (heavy barrier), dropped by one that comes sooner (heavy
    /// barrier, for the switch), and never used without a registered producer.
    @Test func signalOrderingFollowsHowOftenTheConsumerSleeps() throws {
        var q = try TestQueue(capacity: 8, registeredForHeavyBarrier: true)
        #expect(q.peek(at: QueueLayout.producerBarrierOffset) == 1)
        // Threshold 0 (the default): fences only, whatever the traffic.
        q.pass(100)
        #expect(q.peek(at: QueueLayout.signalOrderingOffset) == 0)
        do { let heavy = q.consumer.requestSignal(); #expect(!heavy) }
        do { let ok = q.consumer.confirmSleep(); #expect(ok) }
        q.consumer.cancelSignal()

        q.consumer.heavyBarrierThreshold = 16
        q.pass(15)
        #expect(q.peek(at: QueueLayout.signalOrderingOffset) == 0)
        q.pass(1)  // 16 descriptors since the last request: asymmetric, without a sleep
        #expect(q.peek(at: QueueLayout.signalOrderingOffset) == 1)
        do { let ok = q.consumer.usesAsymmetricOrdering; #expect(ok) }
        // A rare sleep keeps it, and needs the heavy barrier.
        do { let heavy = q.consumer.requestSignal(); #expect(heavy) }
        do { let ok = q.consumer.confirmSleep(); #expect(ok) }
        q.consumer.cancelSignal()
        #expect(q.peek(at: QueueLayout.signalOrderingOffset) == 1)
        // A sleep 3 descriptors later drops it: the switch takes the heavy barrier too.
        q.pass(3)
        do { let heavy = q.consumer.requestSignal(); #expect(heavy) }
        #expect(q.peek(at: QueueLayout.signalOrderingOffset) == 0)
        do { let ok = q.consumer.confirmSleep(); #expect(ok) }
        q.consumer.cancelSignal()
        // Frequent sleeps from now on: fences only.
        for _ in 0..<5 {
            q.pass(3)
            do { let heavy = q.consumer.requestSignal(); #expect(!heavy) }
            do { let ok = q.consumer.confirmSleep(); #expect(ok) }
            q.consumer.cancelSignal()
        }
        // Work that arrives between request and re-check is still found.
        do { let heavy = q.consumer.requestSignal(); #expect(!heavy) }
        do { let ok = q.producer.enqueue(desc(7)); #expect(ok) }
        do { let ok = !q.consumer.confirmSleep(); #expect(ok) }
        do { let ok = q.consumer.dequeue() == desc(7); #expect(ok) }
        // Sleeps become rare again: asymmetric once more.
        q.pass(16)
        #expect(q.peek(at: QueueLayout.signalOrderingOffset) == 1)
        // The request signal protocol is the same in both orderings.
        do { let heavy = q.consumer.requestSignal(); #expect(heavy) }
        do { let ok = q.consumer.confirmSleep(); #expect(ok) }
        do { let ok = q.producer.enqueue(desc(8)); #expect(ok) }
        do { let ok = q.producer.consumerWantsSignal(); #expect(ok) }
        do { let ok = !q.producer.consumerWantsSignal(); #expect(ok) }
    }

    /// A heavy barrier that could not run is still owed: the consumer withdraws its request
    /// (cancelSignal, no confirmSleep), and its next request asks for the barrier again,
    /// even though the ordering was already dropped. Turning the threshold off while the
    /// asymmetric ordering is published costs one more heavy barrier, to drop it.
    @Test func aHeavyBarrierThatFailedIsStillOwed() throws {
        var q = try TestQueue(capacity: 8, registeredForHeavyBarrier: true)
        q.consumer.heavyBarrierThreshold = 16
        q.pass(16)
        #expect(q.peek(at: QueueLayout.signalOrderingOffset) == 1)
        do { let heavy = q.consumer.requestSignal(); #expect(heavy) }  // a rare sleep
        do { let ok = q.consumer.confirmSleep(); #expect(ok) }
        q.consumer.cancelSignal()
        q.pass(3)  // a close sleep: drop the ordering, with a heavy barrier...
        do { let heavy = q.consumer.requestSignal(); #expect(heavy) }
        #expect(q.peek(at: QueueLayout.signalOrderingOffset) == 0)
        q.consumer.cancelSignal()  // ...which failed
        do { let heavy = q.consumer.requestSignal(); #expect(heavy, "the failed barrier is still owed") }
        do { let ok = q.consumer.confirmSleep(); #expect(ok) }  // this one ran
        q.consumer.cancelSignal()
        do { let heavy = q.consumer.requestSignal(); #expect(!heavy) }
        do { let ok = q.consumer.confirmSleep(); #expect(ok) }
        q.consumer.cancelSignal()

        q.pass(16)
        #expect(q.peek(at: QueueLayout.signalOrderingOffset) == 1)
        q.consumer.heavyBarrierThreshold = 0
        do { let heavy = q.consumer.requestSignal(); #expect(heavy, "dropping the published ordering takes a heavy barrier") }
        #expect(q.peek(at: QueueLayout.signalOrderingOffset) == 0)
        do { let ok = q.consumer.confirmSleep(); #expect(ok) }
        q.consumer.cancelSignal()
        // Fences only from here (requestSignal, not prepareToSleep, whose precondition
        // would stop the whole test process if this regressed).
        do { let heavy = q.consumer.requestSignal(); #expect(!heavy) }
        do { let ok = q.consumer.confirmSleep(); #expect(ok) }
    }

    @Test func noAsymmetricOrderingWithoutARegisteredProducer() throws {
        var q = try TestQueue(capacity: 8, registeredForHeavyBarrier: false)
        #expect(q.peek(at: QueueLayout.producerBarrierOffset) == 0)
        q.consumer.heavyBarrierThreshold = 4
        q.pass(64)
        #expect(q.peek(at: QueueLayout.signalOrderingOffset) == 0)
        do { let heavy = q.consumer.requestSignal(); #expect(!heavy) }
        do { let ok = q.consumer.confirmSleep(); #expect(ok) }
        do { let ok = !q.consumer.usesAsymmetricOrdering; #expect(ok) }
        // A consumer claiming the asymmetric ordering (hostile, or the word overwritten)
        // does not make an unregistered producer skip its fence; it still answers requests.
        q.poke(UInt32(1), at: QueueLayout.signalOrderingOffset)
        do { let ok = q.producer.enqueue(desc(1)); #expect(ok) }
        do { let ok = q.producer.consumerWantsSignal(); #expect(ok) }
    }

    /// Random garbage written between operations, as by a hostile peer: the endpoints
    /// either keep working or stop with an error; every descriptor handed on is in bounds,
    /// and nothing outside the queue's bytes is touched: each queue sits flush against an
    /// inaccessible page (before it in half the rounds, after it in the other half), so a
    /// read or write of a single byte beyond it would kill the test process.
    @Test func randomCorruptionNeverEscapesTheBounds() throws {
        var rng = SystemRandomNumberGenerator()
        var failures = 0
        for round in 0..<2_000 {
            var q = try TestQueue(capacity: 16, regionSize: 1 << 16, maxLength: 4096,
                                  flush: round % 2 == 0 ? .atStart : .atEnd)
            var out = [BufferDescriptor](repeating: desc(0), count: 16)
            for step in 0..<50 {
                let batch = (0..<Int.random(in: 1...8, using: &rng)).map { _ in
                    BufferDescriptor(offset: RegionOffset(Int.random(in: 0..<(1 << 16) - 4096, using: &rng)),
                                     length: UInt32.random(in: 0...4096, using: &rng))
                }
                _ = batch.withUnsafeBufferPointer { q.producer.enqueue($0) }
                if step % 5 == 0 {
                    let where_ = [QueueLayout.tailOffset, QueueLayout.headOffset, QueueLayout.signalOffset,
                                  QueueLayout.producerBarrierOffset, QueueLayout.signalOrderingOffset, QueueLayout.wakeIndexOffset,
                                  QueueLayout.entriesOffset + 16 * Int.random(in: 0..<16, using: &rng),
                                  QueueLayout.entriesOffset + 16 * Int.random(in: 0..<16, using: &rng) + 8]
                        .randomElement(using: &rng)!
                    q.poke(UInt32.random(in: 0...UInt32.max, using: &rng), at: where_)
                }
                let n = out.withUnsafeMutableBufferPointer { q.consumer.dequeue(into: $0) }
                let bounds = q.consumer.bounds
                for d in out.prefix(n) { #expect(bounds.admits(d)) }
                _ = q.producer.consumerWantsSignal()
                _ = q.producer.consumerWantsSignalBeforeIdle()
            }
            if q.consumer.hasFailed || q.producer.hasFailed { failures += 1 }
        }
        #expect(failures > 100)  // the corruption is detected, not silently absorbed
    }
}

/// Waking after N entries (the wake index) and the producer's idle flush, step by step;
/// hostile wake indices; the producer's check of the consumer's head at its edges.
@Suite struct WakeIndexTests {
    /// A request with wakeAfter 3 is answered by the enqueue that brings the third entry,
    /// not by the first two, and only once; across the 2^32 wrap of the indices too.
    @Test(arguments: [UInt32(0), UInt32.max - 1, UInt32(Int32.max) - 1])
    func aRequestIsAnsweredWhenTheTailReachesTheWakeIndex(start: UInt32) throws {
        var q = try TestQueue(capacity: 8, startIndex: start)
        for round in 0..<20 {  // the wake index moves with the head
            do { let ok = q.consumer.prepareToSleep(wakeAfter: 3); #expect(ok) }
            #expect(q.peek(at: QueueLayout.wakeIndexOffset) == q.consumer.index &+ 3)
            do { let ok = q.producer.enqueue(desc(round)); #expect(ok) }
            do { let ok = !q.producer.consumerWantsSignal(); #expect(ok, "1 of 3 entries: no doorbell yet") }
            do { let ok = q.producer.enqueue(desc(round + 1)); #expect(ok) }
            do { let ok = !q.producer.consumerWantsSignal(); #expect(ok, "2 of 3 entries: no doorbell yet") }
            do { let ok = q.producer.enqueue(desc(round + 2)); #expect(ok) }
            do { let ok = q.producer.consumerWantsSignal(); #expect(ok, "the third entry reaches the wake index") }
            do { let ok = !q.producer.consumerWantsSignal() && !q.producer.consumerWantsSignalBeforeIdle(); #expect(ok, "answered once") }
            q.consumer.cancelSignal()
            for k in 0..<3 { let ok = q.consumer.dequeue() == desc(round + k); #expect(ok) }
        }
        // A batch that jumps past the wake index answers it too.
        do { let ok = q.consumer.prepareToSleep(wakeAfter: 2); #expect(ok) }
        let batch = (0..<5).map { desc($0) }
        do { let ok = batch.withUnsafeBufferPointer { q.producer.enqueue($0) } == 5; #expect(ok) }
        do { let ok = q.producer.consumerWantsSignal(); #expect(ok) }
        // wakeAfter 1 (the default) and 0 (clamped to 1): the first entry.
        while q.consumer.dequeue() != nil {}
        for n in [UInt32(1), 0] {
            do { let ok = q.consumer.prepareToSleep(wakeAfter: n); #expect(ok) }
            do { let ok = q.producer.enqueue(desc(9)); #expect(ok) }
            do { let ok = q.producer.consumerWantsSignal(); #expect(ok, "wakeAfter \(n)") }
            q.consumer.cancelSignal()
            do { let ok = q.consumer.dequeue() == desc(9); #expect(ok) }
        }
        do { let ok = q.producer.error == nil && q.consumer.error == nil; #expect(ok) }
    }

    /// Before going idle, the producer answers a standing request whose wake index it has
    /// not reached, if the consumer has not taken everything; not otherwise.
    @Test func theIdleFlushAnswersWhatTheWakeIndexLeftStanding() throws {
        var q = try TestQueue(capacity: 8)
        // Nobody asked: nothing to flush.
        do { let ok = q.producer.enqueue(desc(0)); #expect(ok) }
        do { let ok = !q.producer.consumerWantsSignal() && !q.producer.consumerWantsSignalBeforeIdle(); #expect(ok) }
        do { let ok = q.consumer.dequeue() == desc(0); #expect(ok) }
        // Asked for 4, got 1, producer goes idle: rung once.
        do { let ok = q.consumer.prepareToSleep(wakeAfter: 4); #expect(ok) }
        do { let ok = !q.producer.consumerWantsSignalBeforeIdle(); #expect(ok, "nothing published since the request") }
        do { let ok = q.producer.enqueue(desc(1)); #expect(ok) }
        do { let ok = !q.producer.consumerWantsSignal(); #expect(ok) }
        do { let ok = q.producer.consumerWantsSignalBeforeIdle(); #expect(ok, "idle with an entry the consumer waits for") }
        do { let ok = !q.producer.consumerWantsSignalBeforeIdle() && !q.producer.consumerWantsSignal(); #expect(ok, "answered once") }
        q.consumer.cancelSignal()
        do { let ok = q.consumer.dequeue() == desc(1); #expect(ok) }
        // The consumer took everything and asks again: an idle producer does not wake it.
        do { let ok = q.consumer.prepareToSleep(wakeAfter: 4); #expect(ok) }
        do { let ok = !q.producer.consumerWantsSignalBeforeIdle(); #expect(ok) }
        // A request withdrawn is not answered by the flush either.
        do { let ok = q.producer.enqueue(desc(2)); #expect(ok) }
        q.consumer.cancelSignal()
        do { let ok = !q.producer.consumerWantsSignal() && !q.producer.consumerWantsSignalBeforeIdle(); #expect(ok) }
        // "Only when idle": a wake index beyond the capacity is never reached by enqueueing.
        do { let ok = q.consumer.dequeue() == desc(2); #expect(ok) }
        do { let ok = q.consumer.prepareToSleep(wakeAfter: QueueConsumer<BufferDescriptor>.maximumWakeAfter); #expect(ok) }
        for i in 0..<8 {
            do { let ok = q.producer.enqueue(desc(i)); #expect(ok) }
            do { let ok = !q.producer.consumerWantsSignal(); #expect(ok, "entry \(i)") }
        }
        do { let ok = q.producer.consumerWantsSignalBeforeIdle(); #expect(ok) }
        do { let ok = q.producer.error == nil && q.consumer.error == nil; #expect(ok) }
    }

    /// The producer and consumer of this queue in one process: each enqueue of one entry
    /// and each flush counted as a doorbell. A hostile consumer that writes a request and
    /// any wake index before every step costs the producer at most one doorbell per step
    /// (each answer clears the request), never an error, and never a read or write outside
    /// the queue (it sits against an inaccessible page).
    @Test func aHostileWakeIndexCostsTheProducerAtMostOneDoorbellPerRequest() throws {
        let values: [UInt32] = [0, 1, 2, 7, 8, 9, 1 << 31, (1 << 31) - 1, (1 << 31) + 1, .max, .max - 1, 0x8000_0007, 12345]
        for flush in [GuardedArea.Flush.atStart, .atEnd] {
            var q = try TestQueue(capacity: 8, flush: flush)
            var rings = 0, steps = 0
            for round in 0..<200 {
                for v in values {
                    let value = round % 2 == 0 ? v : v &+ q.producer.index  // relative to the tail, too
                    q.poke(value, at: QueueLayout.wakeIndexOffset)
                    q.poke(UInt32(round % 3 == 2 ? 7 : 1), at: QueueLayout.signalOffset)  // any nonzero is a request
                    do { let ok = q.producer.enqueue(desc(steps)); #expect(ok) }
                    steps += 1
                    if q.producer.consumerWantsSignal() { rings += 1 }
                    if q.producer.consumerWantsSignalBeforeIdle() { rings += 1 }
                    #expect(q.peek(at: QueueLayout.signalOffset) == 0, "answered: the request is cleared")
                    do { let ok = q.consumer.dequeue() == desc(steps - 1); #expect(ok) }
                }
            }
            #expect(rings == steps, "exactly one doorbell per request with something unconsumed")
            do { let ok = q.producer.error == nil && q.consumer.error == nil; #expect(ok) }
            // A request with nothing unconsumed and an unreachable wake index: no doorbell at all.
            q.poke(q.producer.index &+ 5, at: QueueLayout.wakeIndexOffset)
            q.poke(UInt32(1), at: QueueLayout.signalOffset)
            do { let ok = !q.producer.consumerWantsSignal() && !q.producer.consumerWantsSignalBeforeIdle(); #expect(ok) }
            // A hostile head makes the flush ring at most once, and is not taken as an index.
            q.poke(q.producer.index &+ 1000, at: QueueLayout.headOffset)
            do { let ok = q.producer.consumerWantsSignalBeforeIdle() && !q.producer.consumerWantsSignalBeforeIdle(); #expect(ok) }
        }
    }

    /// The consumer never reads the request or the wake index back: a hostile producer
    /// writing them changes nothing the consumer decides (each request writes both anew).
    @Test func theConsumerNeverReadsTheWakeIndexBack() throws {
        var q = try TestQueue(capacity: 8)
        for v: UInt32 in [0, 1, .max, 1 << 31] {
            q.poke(v, at: QueueLayout.wakeIndexOffset)
            q.poke(v, at: QueueLayout.signalOffset)
            do { let ok = q.consumer.prepareToSleep(wakeAfter: 2); #expect(ok) }
            #expect(q.peek(at: QueueLayout.wakeIndexOffset) == q.consumer.index &+ 2)
            #expect(q.peek(at: QueueLayout.signalOffset) == 1)
            q.consumer.cancelSignal()
        }
        do { let ok = q.consumer.error == nil; #expect(ok) }
    }

    /// The producer accepts a consumer head only in headCache...tail: one past its tail is
    /// as impossible as three past (a consumer claiming an entry that was never published),
    /// whether the queue is full or not; so is a head that moved backwards.
    @Test(arguments: [0, 1, 2, 3, 4])
    func aHeadOnePastTheTailIsRefused(published: Int) throws {
        var q = try TestQueue(capacity: 4)
        for i in 0..<published { let ok = q.producer.enqueue(desc(i)); #expect(ok) }
        q.poke(UInt32(published + 1), at: QueueLayout.headOffset)
        do { let ok = q.producer.freeSlots() == 0; #expect(ok) }
        do { let ok = q.producer.error == .peerIndexOutOfRange(peer: UInt32(published + 1), own: UInt32(published), capacity: 4); #expect(ok) }

        var fine = try TestQueue(capacity: 4)
        for i in 0..<published { let ok = fine.producer.enqueue(desc(i)); #expect(ok) }
        fine.poke(UInt32(published), at: QueueLayout.headOffset)  // everything consumed: allowed
        do { let ok = fine.producer.freeSlots() == 4 && fine.producer.error == nil; #expect(ok) }
        if published > 0 {
            fine.poke(UInt32(published - 1), at: QueueLayout.headOffset)  // backwards
            do { let ok = fine.producer.freeSlots() == 0 && fine.producer.hasFailed; #expect(ok) }
        }
    }

    /// The sleep protocol as written once (prepareToSleep(wakeAfter:heavyBarrier:)): the
    /// heavy barrier runs exactly when the ordering needs it, a failed one withdraws the
    /// request and stays owed, work found by the re-check withdraws it too.
    @Test func theSleepProtocolRunsTheHeavyBarrierOnlyWhenNeeded() throws {
        struct BarrierFailed: Error {}
        var q = try TestQueue(capacity: 8, registeredForHeavyBarrier: true)
        var barriers = 0
        func decide(_ q: inout TestQueue, fail: Bool = false) -> String {
            switch q.consumer.prepareToSleep(wakeAfter: 2, heavyBarrier: { () throws(BarrierFailed) in
                barriers += 1
                if fail { throw BarrierFailed() }
            }) {
            case .sleep(let heavy): return heavy ? "sleep heavy" : "sleep"
            case .workArrived(let heavy): return heavy ? "work heavy" : "work"
            case .heavyBarrierFailed: return "failed"
            }
        }
        // Fences only (threshold 0): no barrier.
        #expect(decide(&q) == "sleep")
        #expect(q.peek(at: QueueLayout.signalOffset) == 1 && q.peek(at: QueueLayout.wakeIndexOffset) == 2)
        q.consumer.cancelSignal()
        do { let ok = q.producer.enqueue(desc(0)); #expect(ok) }
        #expect(decide(&q) == "work")
        #expect(q.peek(at: QueueLayout.signalOffset) == 0, "withdrawn")
        #expect(barriers == 0)
        // Asymmetric ordering: the barrier runs; a failure withdraws and stays owed.
        do { let ok = q.consumer.dequeue() == desc(0); #expect(ok) }
        q.consumer.heavyBarrierThreshold = 4
        q.pass(8)
        #expect(q.peek(at: QueueLayout.signalOrderingOffset) == 1)
        #expect(decide(&q, fail: true) == "failed")
        #expect(q.peek(at: QueueLayout.signalOffset) == 0, "withdrawn")
        #expect(decide(&q) == "sleep heavy", "still owed")
        q.consumer.cancelSignal()
        q.pass(8)  // rare sleeps again: asymmetric
        #expect(q.peek(at: QueueLayout.signalOrderingOffset) == 1)
        do { let ok = q.producer.enqueue(desc(1)); #expect(ok) }
        #expect(decide(&q) == "work heavy")
        #expect(barriers == 3)
    }
}
