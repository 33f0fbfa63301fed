import Foundation
import Outboard
import OutboardRings
import OutboardSession
import OutboardSystem
import OutboardTestSupport
import Testing
import Virtualizers

/// The block partitioner against a real manager process and its sandboxed memory driver.
@Suite(.serialized) struct PartitionerTests {
    /// Chaining: a partitioner holds one session to the driver and serves a session per
    /// partition; each client sees its own device from sector 0 and cannot leave it.
    @Test func partitionerChainsSessions() throws {
        let m = try ManagerFixture(devices: "[\(memDevice("m0", sizeMib: 16))]")
        let upstream = try m.open("m0", dataBytes: 32 * 65536, depth: 32)
        let half = UInt64(8 << 20) / 512
        let path = m.directory + "/partitions.sock"
        let box = PartitionerBox(try BlockPartitioner(
            upstream: upstream,
            partitions: [.init(name: "p0", firstSector: 0, sectorCount: half), .init(name: "p1", firstSector: half, sectorCount: half)],
            socketPath: path))
        let thread = Thread { box.run() }
        thread.start()
        defer { box.stop() }

        var a = VerifiedWorkload(session: try BlockSession.open(socketPath: path, device: "p0", writable: true, dataBytes: 16 * 4096, queueDepth: 16),
                                 blocks: 2048, seed: 1)
        var b = VerifiedWorkload(session: try BlockSession.open(socketPath: path, device: "p1", writable: true, dataBytes: 16 * 4096, queueDepth: 16),
                                 blocks: 2048, seed: 2)
        #expect(a.session.info.blockCount == half)
        try a.prepare()
        try b.prepare()
        try a.run(operations: 2000)
        try b.run(operations: 2000)
        // Both wrote their block 0 (version >= 1): the partitions do not overlap, so a's
        // reads never saw b's data (a block header names its block and version).
        try a.run(operations: 1000)
        #expect(a.verifyErrors == 0 && b.verifyErrors == 0, "\(a.firstError ?? "") \(b.firstError ?? "")")
        #expect(a.clientErrors == 0 && b.clientErrors == 0, "\(a.firstError ?? "") \(b.firstError ?? "")")
        // Outside the partition: refused per request.
        var s = try BlockSession.open(socketPath: path, device: "p0", writable: true, dataBytes: 4096, queueDepth: 2)
        do { let st = try io(&s, .read, sector: half); #expect(st == .invalid) }
        do { let st = try io(&s, .read, sector: half - 8); #expect(st == .ok) }
        // A driver restart under the partitioner is invisible to its clients.
        let hit = try m.admin().injectFault(device: "m0", .kill)
        try a.run { $0.lastCompletionGeneration > hit.generation }
        try a.run(operations: 500)
        #expect(a.verifyErrors == 0 && a.clientErrors == 0, "\(a.firstError ?? "")")
        // A client that reuses a tag still in flight loses its session; the others go on.
        // (A raw client: the library would never do this.)
        do {
            let sock = try UnixSocket.connect(path: path)
            try sock.send(.openSession(OpenSession(device: "p1", deviceClass: .block, writable: true, dataBytes: 8192, queueDepth: 2)))
            var d = try sock.receiveControl()
            guard case .sessionOpened = d.message else { Issue.record("open refused: \(d.message)"); return }
            let layout = try BlockQueueLayout(queueDepth: 2)
            let queues = try SharedRegion(adopting: d.take(1), minimumSize: layout.byteCount).map(.readWrite)
            let bell = Doorbell(adopting: d.take(3))
            var producer = try QueueProducer<BlockRequest>(memory: queues.base, size: queues.size, at: layout.requestOffset,
                                                           layout: layout.requests)
            let r = BlockRequest(tag: 0, op: .read, sector: 0, offset: RegionOffset(0), length: 512)
            #expect(producer.enqueue(r) && producer.enqueue(r))
            try bell.ring()
            var closed = false
            if try sock.waitReadable(timeoutMilliseconds: 5000) {
                do { _ = try sock.receiveControl() } catch .socket(.closed) { closed = true } catch {}
            }
            #expect(closed, "a client reusing an in-flight tag kept its session")
        }
        try a.run(operations: 200)
        #expect(a.verifyErrors == 0 && a.clientErrors == 0, "\(a.firstError ?? "")")
        box.stop()
        #expect(box.error == nil, "\(box.error.map { "\($0)" } ?? "")")
    }
}

/// Runs a partitioner on its own thread.
final class PartitionerBox: @unchecked Sendable {
    let partitioner: BlockPartitioner
    let lock = NSLock()
    let done = DispatchSemaphore(value: 0)
    var stopped = false
    var failure: SessionError?
    init(_ p: BlockPartitioner) { partitioner = p }
    func run() {
        defer { done.signal() }
        while !lock.withLock({ stopped }) {
            do { try partitioner.serve(milliseconds: 50) } catch {
                lock.withLock { failure = error }
                return
            }
        }
    }
    var error: SessionError? { lock.withLock { failure } }
    /// Stops the loop and waits (up to the test deadline) for the thread to leave it (once).
    func stop() {
        let first = lock.withLock { () -> Bool in
            defer { stopped = true }
            return !stopped
        }
        if first, done.wait(timeout: .now() + testDeadlineSeconds) != .success {
            Issue.record("the partitioner's thread did not leave its loop within \(testDeadlineSeconds) s")
        }
    }
}
