import OutboardRings
import OutboardSession
import OutboardSystem
import Testing

/// The serving end's half of waking after N completions (BlockServerEndpoint.complete): a
/// client that asks for more completions than the driver will produce is rung as soon as
/// the driver holds none of its requests, not earlier, and once; one whose wake index is
/// reached is rung then. In process, both ends over real shared memory and eventfds.
@Suite struct BlockServerWakeTests {
    @Test func theClientIsRungAtItsWakeIndexOrWhenTheDriverHoldsNoRequests() throws {
        let depth = 8
        let layout = try BlockQueueLayout(queueDepth: depth)
        let queues = try SharedRegion(name: "test-wake-queues", size: layout.byteCount)
        let qm = try queues.map(.readWrite)
        try layout.initialize(memory: qm.base, size: qm.size)
        let data = try SharedRegion(name: "test-wake-data", size: 4096)
        let completionBell = try Doorbell()
        let a = Attach(sessionID: 1, tableIndex: 0, queueDepth: UInt32(depth), writable: true, dataBytes: UInt64(data.size))
        var server = try BlockServerEndpoint(a, queues: queues.fd.duplicate(), data: data.fd.duplicate(),
                                             requestBell: Doorbell().fd.duplicate(), completionBell: completionBell.fd.duplicate())
        // The client's ends.
        var requests = try QueueProducer<BlockRequest>(memory: qm.base, size: qm.size, at: layout.requestOffset,
                                                       layout: layout.requests)
        var completions = try QueueConsumer<BlockCompletion>(memory: qm.base, size: qm.size, at: layout.completionOffset,
                                                             layout: layout.completions, bounds: UInt32(depth))
        func rung() throws -> Bool { try completionBell.drain() > 0 }
        let scratch = UnsafeMutableBufferPointer<BlockRequest>.allocate(capacity: depth)
        defer { scratch.deallocate() }
        func complete(_ tags: [UInt32]) -> Bool {
            let batch = tags.map { BlockCompletion(tag: $0, status: .ok, generation: 1) }
            return batch.withUnsafeBufferPointer { server.complete($0) }
        }

        // Four requests; the driver takes all four; the client waits for 2.
        for t in 0..<4 { _ = requests.enqueue(BlockRequest(tag: UInt32(t), op: .read, sector: 0, offset: RegionOffset(rawValue: 0), length: 512)) }
        do { let ok = server.requests.dequeue(into: scratch) == 4; #expect(ok) }
        do { let ok = completions.prepareToSleep(wakeAfter: 2); #expect(ok) }
        do { let ok = complete([0]); #expect(ok) }
        do { let ok = try !rung(); #expect(ok, "1 of 2, and the driver still holds 3") }
        do { let ok = complete([1]); #expect(ok) }
        do { let ok = try rung(); #expect(ok, "the wake index is reached") }
        completions.cancelSignal()
        do { let ok = completions.dequeue() != nil && completions.dequeue() != nil; #expect(ok) }
        // The client now waits for 4 of the 2 left: rung when the driver holds none.
        do { let ok = completions.prepareToSleep(wakeAfter: 4); #expect(ok) }
        do { let ok = complete([2]); #expect(ok) }
        do { let ok = try !rung(); #expect(ok, "the driver still holds one") }
        do { let ok = !server.holdsNoRequests; #expect(ok) }
        do { let ok = complete([3]); #expect(ok) }
        do { let ok = server.holdsNoRequests; #expect(ok) }
        do { let ok = try rung(); #expect(ok, "the driver holds none: nothing more will come") }
        do { let ok = try !rung(); #expect(ok) }
        completions.cancelSignal()
        do { let ok = completions.dequeue() != nil && completions.dequeue() != nil; #expect(ok) }
        // producerIdle() flushes at once, while requests are still held.
        _ = requests.enqueue(BlockRequest(tag: 4, op: .read, sector: 0, offset: RegionOffset(rawValue: 0), length: 512))
        _ = requests.enqueue(BlockRequest(tag: 5, op: .read, sector: 0, offset: RegionOffset(rawValue: 0), length: 512))
        do { let ok = server.requests.dequeue(into: scratch) == 2; #expect(ok) }
        do { let ok = completions.prepareToSleep(wakeAfter: 2); #expect(ok) }
        do { let ok = complete([4]); #expect(ok) }
        do { let ok = try !rung(); #expect(ok) }
        server.producerIdle()
        do { let ok = try rung(); #expect(ok) }
        do { let ok = server.signalsSent == 3; #expect(ok) }
        do { let ok = server.failure == nil; #expect(ok) }
    }
}
