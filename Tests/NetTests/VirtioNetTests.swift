import Foundation
import Outboard
import OutboardBench
import OutboardSession
import OutboardSystem
import OutboardTestSupport
import Synchronization
import Testing

@Suite(.serialized) struct VirtioNetTests {
    static func openError(_ socket: String) -> SessionError? {
        do {
            let s = try NetSession.open(socketPath: socket, device: "vnet0")
            _ = consume s
            return nil
        } catch {
            return error
        }
    }

    /// Frames of every size from the minimum to the MTU go out through the sandboxed
    /// driver, come back from testpmd with their addresses swapped, and arrive whole.
    @Test func framesComeBackFromMacswapWhole() throws {
        let f = try NetFixture()
        var s = try f.open()
        #expect(s.info.mac == NetFixture.mac && s.info.mtu == 1500)
        let r = try roundTrip(&s, count: 2000, sizes: [60, 64, 128, 511, 1024, 1514, 1518])
        #expect(r.damaged == 0)
        #expect(r.seen.count == 2000, "came back: \(r.seen.count) of 2000; received \(s.framesReceived), stray \(s.strayEntries), sent \(s.framesSent)")
        #expect(s.strayEntries == 0)
        let status = try f.manager.report()
        let device = (status["devices"] as? [[String: Any]])?.first ?? [:]
        #expect(device["device_class"] as? String == "net" && device["mac"] as? String == "\(NetFixture.mac)"
                && device["mtu"] as? Int == 1500, "\(device)")
        #expect((device["requests_completed"] as? Int ?? 0) >= 4000, "frames sent and received, counted by the driver: \(device)")
    }

    /// A net device has one owner: a second session is refused while the first lives, and
    /// granted once it has gone.
    @Test func aPortServesOneSessionAtATime() throws {
        let f = try NetFixture()
        var first: NetSession? = try f.open()
        let refusal = Self.openError(f.manager.socketPath)
        #expect(refusal?.description.contains("one session at a time") == true, "\(String(describing: refusal))")
        if case .refused(let code, _)? = refusal { #expect(code == .busy) }
        first = nil
        _ = first
        var second = try f.open()
        let r = try roundTrip(&second, count: 100, sizes: [64])
        #expect(r.seen.count == 100 && r.damaged == 0)
    }

    /// The driver is killed under traffic: the manager starts another, the session moves
    /// to it (receive buffers posted again, frames in flight dropped), and traffic resumes.
    @Test func trafficResumesAfterTheDriverIsKilled() throws {
        let f = try NetFixture()
        var s = try f.open()
        let before = try roundTrip(&s, count: 500, sizes: [64, 1518])
        #expect(before.seen.count == 500)
        let admin = try f.manager.admin()
        _ = try admin.injectFault(device: "vnet0", .kill)
        let after = try roundTrip(&s, count: 500, sizes: [64, 1518], first: 10_000, seconds: 20)
        #expect(after.damaged == 0)
        // Frames sent while no driver ran are lost as on a wire; most come back.
        #expect(after.seen.count >= 400, "came back after the restart: \(after.seen.count) of 500")
        #expect(s.recoveries >= 1)
        let late = try roundTrip(&s, count: 200, sizes: [128], first: 20_000)
        #expect(late.seen.count == 200, "after recovery: \(late.seen.count) of 200")
    }
}
