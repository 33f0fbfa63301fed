import Foundation
import Outboard
import OutboardSession
import OutboardSystem
import OutboardTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Requests that never complete (here: the driver is stopped and hang detection is far
/// away, as a request lost in recovery would look to the client) fail the waits of tests
/// and of the verified workload with a message, instead of hanging them.
@Suite(.serialized) struct DeadlineTests {
    @Test func waitsForLostRequestsEndWithAnError() throws {
        let m = try ManagerFixture(devices: "[\(memDevice("m0"))]", heartbeatDeadlineMs: 60_000)
        var w = VerifiedWorkload(session: try m.open("m0"), blocks: 64, seed: 5)
        try w.prepare()
        let hit = try m.admin().injectFault(device: "m0", .hang)
        defer { kill(hit.pid, SIGCONT) }
        try waitUntilStopped(pid: hit.pid)

        w.stallLimitMilliseconds = 300
        do {
            try w.run(operations: 100)
            Issue.record("the workload finished with its driver stopped")
        } catch {
            guard case .failed(let reason) = error else { Issue.record("wrong error \(error)"); return }
            #expect(reason.contains("no request finished for 300 ms"), "\(reason)")
        }
        #expect(w.session.inFlight > 0)

        // The tests' own waits: io and drain within a deadline.
        kill(hit.pid, SIGCONT)
        try w.finish()
        var s = try m.open("m0")
        #expect(try io(&s, .read, sector: 0) == .ok)
        let again = try m.admin().injectFault(device: "m0", .hang)
        defer { kill(again.pid, SIGCONT) }
        try waitUntilStopped(pid: again.pid)
        do {
            _ = try io(&s, .read, sector: 0, within: 0.3)
            Issue.record("a read completed with its driver stopped")
        } catch {
            guard case .failed(let reason) = error else { Issue.record("wrong error \(error)"); return }
            #expect(reason.contains("1 request(s) still in flight after 0.3 s"), "\(reason)")
        }
        kill(again.pid, SIGCONT)
        try drain(&s) { #expect($0.status == .ok) }
        #expect(w.verifyErrors == 0 && w.clientErrors == 0, "\(w.firstError ?? "")")
    }
}
