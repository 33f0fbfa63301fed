import Foundation
@_spi(Testing) import Outboard
import OutboardRings
import OutboardSession
import OutboardSystem
import OutboardTestSupport
import Testing

/// The client library (BlockSession, AdminConnection) against a real
/// manager process and its sandboxed drivers, or a silent peer.
@Suite(.serialized) struct ClientLibraryTests {
    /// The completion queue's asymmetric ordering, end to end: the driver registers for
    /// membarrier(2) before it enters its sandbox, so a client that waits rarely (here: it
    /// polls 5,000 requests without waiting once) spares the driver its per-batch fence,
    /// and its next wait runs the heavy barrier instead. The next wait, close after it,
    /// drops back to fences with one more heavy barrier; waits close together then run
    /// none. Every request completes either way.
    ///
    /// A wait that finds its completion already there returns without going to sleep, and
    /// only a wait that goes to sleep runs a barrier: a driver that is always quicker than
    /// the client (it is woken by the doorbell and may run at once on the client's CPU)
    /// would leave every wait without one. So the driver is stopped (the manager's hang
    /// fault, SIGSTOP, with hang detection far away) while the waits that must sleep are
    /// made, and continued after them.
    @Test func completionsTakeTheAsymmetricOrderingWhileTheClientWaitsRarely() throws {
        let m = try ManagerFixture(devices: "[\(memDevice("m0"))]", heartbeatDeadlineMs: 60_000)
        var s = try m.open("m0")
        let out = UnsafeMutableBufferPointer<BlockResult>.allocate(capacity: 16)
        defer { out.deallocate() }
        let deadline = Clock.monotonicNanoseconds + 60_000_000_000
        var completed = 0
        for i in 0..<5000 {
            #expect(try s.submit(.read, sector: UInt64(i % 64) * 8, offset: 0, length: 4096) != nil)
            var n = 0
            while n == 0 && Clock.monotonicNanoseconds < deadline { n = try s.poll(into: out) }
            completed += n
            for k in 0..<n { #expect(out[k].status == .ok) }
        }
        #expect(completed == 5000)
        // 5,000 completions without a wait: dequeue took the asymmetric ordering up, which
        // it does only if the driver registered.
        do { let ok = s.completionsUseAsymmetricOrdering; #expect(ok, "the driver's completion queue never took the asymmetric ordering") }
        let admin = try m.admin()
        // The first wait after them sleeps rarely: it runs the heavy barrier and keeps the ordering.
        try Self.sleepingWait(&s, admin, out)
        #expect(s.heavyBarriers == 1 && s.heavyBarrierFailures == 0,
                "\(s.heavyBarriers) heavy barriers, \(s.heavyBarrierFailures) failed: the wait after 5,000 polls did not run one")
        do { let ok = s.completionsUseAsymmetricOrdering; #expect(ok, "a rare wait dropped the asymmetric ordering") }
        // The next one comes one request later: one more heavy barrier drops the ordering.
        try Self.sleepingWait(&s, admin, out)
        #expect(s.heavyBarriers == 2 && s.heavyBarrierFailures == 0,
                "\(s.heavyBarriers) heavy barriers, \(s.heavyBarrierFailures) failed: dropping the ordering ran none")
        do { let ok = !s.completionsUseAsymmetricOrdering; #expect(ok, "waits close together kept the asymmetric ordering") }
        // Waits close together: fences, and no more heavy barriers, whether they sleep or not.
        for i in 0..<200 { #expect(try io(&s, .write, sector: UInt64(i % 64) * 8) == .ok) }
        for i in 0..<200 { #expect(try io(&s, .read, sector: UInt64(i % 64) * 8) == .ok) }
        #expect(s.heavyBarriers == 2)
        do { let ok = !s.completionsUseAsymmetricOrdering; #expect(ok) }
        #expect(s.recoveries == 0, "the driver was restarted during the test (\(s.recoveries) recoveries): its queue state was reset")
    }

    /// One wait that finds nothing and goes to sleep (for 20 ms): the driver is stopped
    /// (the hang fault) while it is made. Then the driver continues and the completion is
    /// polled for, without another wait.
    static func sleepingWait(_ s: inout BlockSession, _ admin: borrowing AdminConnection,
                             _ out: UnsafeMutableBufferPointer<BlockResult>) throws {
        let hit = try admin.injectFault(device: "m0", .hang)
        defer { kill(hit.pid, SIGCONT) }  // also when something below throws
        try waitUntilStopped(pid: hit.pid)
        #expect(try s.submit(.read, sector: 0, offset: 0, length: 4096) != nil)
        #expect(try s.wait(into: out, timeoutMilliseconds: 20) == 0, "a stopped driver completed a request")
        kill(hit.pid, SIGCONT)
        let deadline = Clock.monotonicNanoseconds + UInt64(testDeadlineSeconds * 1e9)
        while s.inFlight > 0 {
            guard Clock.monotonicNanoseconds < deadline else { throw DeadlinePassed("the continued driver's completion", seconds: testDeadlineSeconds) }
            for k in 0..<(try s.poll(into: out)) { #expect(out[k].status == .ok) }
        }
    }
}

/// The admin client against a manager that accepts the connection and never answers:
/// the request fails after its timeout instead of hanging.
@Suite struct AdminConnectionTests {
    @Test func aSilentManagerIsAnErrorNotAHang() throws {
        let path = NSTemporaryDirectory() + "outboard-silent-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        let listener = try UnixListener(path: path)
        let admin = try AdminConnection(socketPath: path, timeoutMilliseconds: 200)
        let peer = try listener.accept()  // connected, reads nothing, sends nothing
        #expect(throws: SessionError.failed("manager did not answer within 200 ms")) { _ = try admin.status() }
        // The connection is done: a late answer cannot be mistaken for the next reply.
        try? peer.send(.statusReport("{}"))
        #expect(throws: (any Error).self) { _ = try admin.status() }
        _ = peer
    }
}

/// A server that refuses a client answers and closes at once (the manager at its
/// connection cap). Either the client's request is still unread when it closes, and the
/// client's receive meets a reset first, or the request goes out after the close, and the
/// send fails: either way the client reports the refusal, not the reset or the broken pipe.
@Suite struct RefusalTests {
    static func socketPath() -> String {
        NSTemporaryDirectory() + "outboard-refusing-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
    }

    /// The request arrives before the close and stays unread: the reset path.
    @Test func aRefusalAfterTheRequestReachesTheClient() throws {
        let path = Self.socketPath()
        let listener = try UnixListener(path: path)
        let served = DispatchSemaphore(value: 0)
        let server = Thread {
            defer { served.signal() }
            guard let s = try? listener.accept() else { return }
            _ = try? s.waitReadable(timeoutMilliseconds: 10_000)  // the open request, left unread
            try? s.send(.failure(.limitExceeded, "too many connections"), nonBlocking: true)
        }  // s closes here, with the request unread
        server.start()
        #expect(throws: SessionError.refused(.limitExceeded, "too many connections")) {
            _ = try BlockSession.open(socketPath: path, device: "d", writable: false, dataBytes: 4096, queueDepth: 2)
        }
        try waitSignalled(served, for: "the refusing server's thread")
        _ = listener
    }

    /// The close comes before the request: the send fails (EPIPE), the refusal is queued.
    @Test func aRefusalBeforeTheRequestReachesTheClient() throws {
        let path = Self.socketPath()
        let listener = try UnixListener(path: path)
        let admin = try AdminConnection(socketPath: path, timeoutMilliseconds: 10_000)
        do {
            let s = try listener.accept()
            try s.send(.failure(.limitExceeded, "too many connections"))
        }  // closed before the client sends anything
        #expect(throws: SessionError.refused(.limitExceeded, "too many connections")) { _ = try admin.status() }
    }
}
