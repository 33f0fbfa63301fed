import Foundation
import Outboard
import OutboardSession
import OutboardSystem
import OutboardTestSupport
import Testing

/// What the memory driver promises about the device's end and about leases, end to end: a
/// real manager, its sandboxed driver, a client in this process.
@Suite(.serialized) struct GuardTests {
    /// A request that starts inside the device and runs past its end is refused as a whole
    /// (not served, nothing past the end read or written); so are a request at the end, one
    /// whose end overflows, and 32 KiB from the last sector. The session and
    /// the driver go on.
    @Test func requestsRunningPastTheEndOfTheDeviceAreRefused() throws {
        let m = try ManagerFixture(devices: "[\(memDevice("m0", sizeMib: 1))]")
        var s = try m.open("m0", dataBytes: 16 * 4096)
        let end = s.info.blockCount
        #expect(end == UInt64(1 << 20) / 512)
        // The last 4 KiB of the device holds a known pattern, to see that nothing changes it.
        let last = end - 8
        for k in 0..<4096 { s.buffer[k] = UInt8(truncatingIfNeeded: k &* 7 &+ 1) }
        #expect(try io(&s, .write, sector: last, offset: 0, length: 4096) == .ok)
        let tooFar: [(sector: UInt64, length: Int, what: String)] = [
            (end, 512, "one sector at the end"),
            (end - 1, 1024, "two sectors from the last one"),
            (end - 4, 4096, "4 KiB from 4 sectors before the end"),
            (last, 8192, "8 KiB from 8 sectors before the end"),
            (end - 1, 32768, "32 KiB from the last sector"),
            (UInt64.max - 3, 4096, "a sector whose end overflows"),
        ]
        for op in [BlockOp.read, .write] {
            for c in tooFar {
                // A read would land here: marked, to see that it stays untouched.
                for k in 8192..<(8192 + c.length) { s.buffer[k] = 0xA5 }
                let st: BlockStatus?
                do { st = try io(&s, op, sector: c.sector, offset: 8192, length: c.length) } catch {
                    Issue.record("\(op) of \(c.what) (sector \(c.sector)): \(error)")
                    return
                }
                #expect(st == .invalid, "\(op) of \(c.what) (sector \(c.sector)) ended \(st.map { "\($0)" } ?? "unknown status")")
                let untouched = (8192..<(8192 + c.length)).allSatisfy { s.buffer[$0] == 0xA5 }
                #expect(untouched, "\(op) of \(c.what): the refused request wrote into the data region")
            }
        }
        // The last sectors still hold the pattern; the driver was never restarted.
        for k in 0..<4096 { s.buffer[k] = 0 }
        #expect(try io(&s, .read, sector: last, offset: 0, length: 4096) == .ok)
        let intact = (0..<4096).allSatisfy { s.buffer[$0] == UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) }
        #expect(intact, "a request past the end changed the device's last 4 KiB")
        let d = try m.device("m0")
        #expect(d.restarts == 0 && d.state == "running", "the driver did not survive: \(d.state), \(d.restarts) restarts, \(d.lastFailure ?? "")")
    }

    /// A slow request whose lease ends while it is in the device's wait: the driver checks
    /// the lease right before the transfer, so the read ends `revoked` and the client's
    /// buffer stays untouched. The lease ends with the client alive because the manager,
    /// stopped (SIGSTOP), renews nothing. After the manager continues, the session works.
    @Test func aLeaseThatEndsDuringASlowRequestStopsItsTransfer() throws {
        // Lease 300 ms (renewed at half time: 150 to 300 ms left at any moment); the device
        // takes 3 s per request, so the lease ends well inside the wait of a request taken
        // while it ran.
        let m = try ManagerFixture(devices: "[\(memDevice("slow", extra: #""latency_us": 3000000"#))]", leaseMs: 300,
                                   heartbeatDeadlineMs: 10_000)
        var s = try m.open("slow")
        for k in 0..<4096 { s.buffer[k] = 0xA5 }  // the device holds zeros: a read would show
        #expect(try s.submit(.read, sector: 0, offset: 0, length: 4096) != nil)
        try m.waitFor("the driver to take the request (region in use)") { try m.sessions().first?["in_use"] as? Bool == true }
        try m.pause()
        defer { try? m.resume() }  // also when the wait below throws
        var status: BlockStatus?? = nil
        try drain(&s) { status = $0.status }
        try m.resume()
        #expect(status == .some(.revoked), "a transfer ran after its lease ended: \(String(describing: status))")
        let untouched = (0..<4096).allSatisfy { s.buffer[$0] == 0xA5 }
        #expect(untouched, "the driver wrote into the region after its lease ended")
        // The manager renews the lease again: the next read is served.
        try m.waitFor("the lease to be renewed") { (try m.sessions().first?["lease_expires_in_ms"] as? Int ?? -1) > 0 }
        #expect(try io(&s, .read, sector: 0, offset: 0, length: 4096) == .ok)
        #expect(s.buffer[0] == 0)
    }

    /// A slow write whose client goes away while it is in the device's wait: the manager
    /// marks the region revoking and frees it when the lease ends (the driver still has
    /// it in use). The driver checks the translation right before the transfer, so the
    /// write's data never reaches the device, as another session's read of the sector shows
    /// once the driver has finished the request.
    @Test func aSlowWriteWhoseClientLeftNeverReachesTheDevice() throws {
        let m = try ManagerFixture(devices: "[\(memDevice("slow", extra: #""latency_us": 2000000"#))]", leaseMs: 300,
                                   heartbeatDeadlineMs: 10_000)
        func completed() throws -> Int {
            let d = (try m.report()["devices"] as! [[String: Any]]).first { $0["name"] as? String == "slow" }
            return try #require(d?["requests_completed"] as? Int, "no requests_completed in the status report")
        }
        var client = try m.open("slow")
        for k in 0..<4096 { client.buffer[k] = 0xA5 }
        let before = try completed()
        #expect(try client.submit(.write, sector: 64, offset: 0, length: 4096) != nil)
        var a: BlockSession? = consume client
        try m.waitFor("the driver to take the write (region in use)") { try m.sessions().first?["in_use"] as? Bool == true }
        a = nil  // the client goes away with its write in the device's wait
        try m.waitFor("revocation at the lease's end") { try m.device("slow").revokedAtLeaseEnd == 1 }
        try m.waitFor("the driver to finish the write") { try completed() > before }
        var b = try m.open("slow")
        for k in 0..<4096 { b.buffer[k] = 0x5A }
        #expect(try io(&b, .read, sector: 64, offset: 0, length: 4096) == .ok)
        let zeros = (0..<4096).allSatisfy { b.buffer[$0] == 0 }
        #expect(zeros, "the write of a revoked region reached the device (sector 64 holds \(b.buffer[0]), \(b.buffer[4095]) ...)")
    }

    /// A transfer starts only with the driver's margin (20 ms) of lease left. The shortest
    /// lease the config allows, 10 ms, is shorter than that: the manager renews it every
    /// tick, it never lapses for long, and still no transfer may start. Every read ends
    /// `revoked` with its buffer untouched, and nothing is written to the device.
    @Test func noTransferStartsWithLessThanTheMarginOfLeaseLeft() throws {
        let m = try ManagerFixture(devices: "[\(memDevice("m0"))]", leaseMs: 10)
        var s = try m.open("m0")
        for k in 0..<4096 { s.buffer[k] = 0xA5 }
        var served = 0
        for i in 0..<200 {
            let op: BlockOp = i % 2 == 0 ? .read : .write
            let st = try io(&s, op, sector: UInt64(i % 16) * 8, offset: 0, length: 4096)
            if st != .revoked { served += 1 }
            if st != .revoked && served == 1 { Issue.record("\(op) \(i) with a lease shorter than the margin ended \(st.map { "\($0)" } ?? "unknown")") }
        }
        #expect(served == 0, "\(served) of 200 transfers started with less than the margin of lease left")
        let untouched = (0..<4096).allSatisfy { s.buffer[$0] == 0xA5 }
        #expect(untouched, "a read wrote into the region with less than the margin of lease left")
        #expect(try m.device("m0").restarts == 0)
    }
}
