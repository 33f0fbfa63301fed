import Foundation
@_spi(Testing) import Outboard
import OutboardSession
import OutboardSystem
import OutboardTestSupport
import Testing

/// Session churn as a hostile user does it (issue 13, item 7): clients open and close
/// sessions quickly, at queue depths 2 to 256, some closing with requests in flight, beside
/// a well-behaved client whose every read is checked. Sessions come and go without costing
/// the device connection: each closed session's region leaves the device's memory table,
/// so the table never fills with the regions of sessions that are gone.
@Suite(.serialized) struct ChurnTests {
    /// Churn sessions to open: over three times the 32 memory slots qemu-storage-daemon
    /// 7.2 has (libvhost-user's VHOST_USER_MAX_RAM_SLOTS), so a region left behind per
    /// closed session would fill the device's table three times over.
    static let churnSessions = 100
    /// Churn sessions open at once (plus the verified client): under the device's
    /// `max_sessions` of 16, so that the manager's own limit is not what is tested.
    static let openAtOnce = 8
    static let depths = [2, 4, 8, 16, 32, 64, 128, 256]
    /// Churn sessions read anywhere, but write only from here on (byte 8 MiB): the
    /// verified client owns the blocks below.
    static let churnFirstSector: UInt64 = 16384
    static let churnSectors: UInt64 = 65536

    /// What the churn sessions saw.
    struct Outcome {
        var opened = 0
        var closedInFlight = 0
        var completed = 0
        /// Clear refusals from the manager (its session limit while closed sessions are
        /// still being revoked, or busy while the device reconnects).
        var refusals: [String] = []
        /// Anything else: a session that failed, a request that did not end `ok`, a
        /// completion that did not come in time.
        var failures: [String] = []
    }

    /// One churn session: open it, then by `kind` leave it idle (0), fill its queue and
    /// close it as soon as the first completion is back, the rest in flight (1), write and
    /// read and wait for each (2), or fill its queue and leave the completions unread (3).
    static func churn(_ f: VirtioFixture, _ k: Int, _ outcome: inout Outcome, deadline: Date) -> BlockSession? {
        let depth = depths[k % depths.count]
        var s: BlockSession
        do {
            s = try f.open(dataBytes: depth * 4096, depth: depth)
        } catch SessionError.refused(let code, let why) where code == .limitExceeded || code == .busy {
            outcome.refusals.append("session \(k) (depth \(depth)): \(code): \(why)")
            return nil
        } catch {
            outcome.failures.append("session \(k) (depth \(depth)): open: \(error)")
            return nil
        }
        outcome.opened += 1
        let kind = k % 4
        if kind == 0 { return s }
        let count = kind == 2 ? min(depth, 8) : depth
        do {
            for i in 0..<count {
                let sector = churnFirstSector + UInt64(k * 256 + i) * 8 % churnSectors
                let write = kind == 2 ? i % 2 == 0 : i % 3 == 0
                if write {
                    let bytes = pattern(UInt8(truncatingIfNeeded: k &+ i), 4096)
                    s.buffer.baseAddress!.advanced(by: i * 4096).copyMemory(from: bytes, byteCount: bytes.count)
                }
                guard try s.submit(write ? .write : .read, sector: sector, offset: i * 4096, length: 4096) != nil else {
                    outcome.failures.append("session \(k) (depth \(depth)): queue full after \(i) of \(depth) requests")
                    return nil
                }
            }
            switch kind {
            case 1:
                // One completion shows the driver serving the session; the rest are still
                // at the driver or the device when it closes here.
                try reap(&s, 1, k, &outcome, deadline: deadline)
                #expect(s.inFlight == count - 1)
                outcome.closedInFlight += 1
                return nil
            case 2:
                try reap(&s, count, k, &outcome, deadline: deadline)
                return s
            default:
                return s
            }
        } catch {
            outcome.failures.append("session \(k) (depth \(depth)): \(error)")
            return nil
        }
    }

    /// Takes `count` completions of churn session `k` (no more), waiting for them until
    /// `deadline`; each must be `ok`.
    static func reap(_ s: inout BlockSession, _ count: Int, _ k: Int, _ outcome: inout Outcome,
                     deadline: Date) throws(SessionError) {
        let results = UnsafeMutableBufferPointer<BlockResult>.allocate(capacity: count)
        defer { results.deallocate() }
        var done = 0
        while done < count {
            guard Date() < deadline else {
                outcome.failures.append("session \(k): \(done) of \(count) completions before the deadline")
                return
            }
            // No more than asked for: the rest stay in flight for the caller.
            let n = try s.wait(into: UnsafeMutableBufferPointer(rebasing: results[0..<(count - done)]), timeoutMilliseconds: 100)
            for r in results[0..<n] where r.status != .ok {
                outcome.failures.append("session \(k): \(r.op) at sector \(r.sector) ended \(r.status.map { "\($0)" } ?? "without a status")")
            }
            done += n
        }
        outcome.completed += done
    }

    /// Before a held churn session closes: what it has completed must be `ok`, and it
    /// must not have been failed by the driver or the manager.
    static func check(_ s: inout BlockSession, _ k: Int, _ outcome: inout Outcome) {
        let results = UnsafeMutableBufferPointer<BlockResult>.allocate(capacity: s.queueDepth)
        defer { results.deallocate() }
        do {
            let n = try s.poll(into: results)
            for r in results[0..<n] where r.status != .ok {
                outcome.failures.append("session \(k): \(r.op) at sector \(r.sector) ended \(r.status.map { "\($0)" } ?? "without a status")")
            }
            outcome.completed += n
        } catch {
            outcome.failures.append("session \(k): \(error)")
        }
    }

    /// The slot accounting alone, without load: sessions opened one after another, each
    /// served one read and closed, three times as many as the device has memory slots. Each
    /// closed session's region must leave the device's table (REM_MEM_REG with what
    /// ADD_MEM_REG carried), or the device refuses a later one and the connection ends.
    @Test func closedSessionsGiveTheirMemorySlotBack() throws {
        let f = try VirtioFixture(maxSessions: 16)
        try f.waitForDeviceConnected(true)
        for k in 0..<Self.churnSessions {
            var s = try f.open(dataBytes: 4096, depth: 2)
            #expect(try io(&s, .read, sector: UInt64(k) * 8, length: 4096) == .ok, "session \(k)")
            _ = consume s
            // The next session opens once this one is gone from the manager: one session's
            // region at a time, beside the driver's own.
            try f.manager.waitFor("session \(k) to be revoked", seconds: 10) { try f.manager.sessions().isEmpty }
        }
        let d = try f.device()
        #expect(d["device_losses"] as? Int == 0, "\(d["last_device_error"] as? String ?? "")")
        #expect(d["device_connections"] as? Int == 1)
    }

    /// The churn of the issue beside a verified client: no device reconnection, no error
    /// and no wrong byte for the verified client, and every churn session opened, served
    /// and closed (or refused with a clear reason).
    @Test func sessionChurnBesideAVerifiedClientKeepsTheDevice() throws {
        let f = try VirtioFixture(notify: "event-idx", maxSessions: 16)
        try f.waitForDeviceConnected(true)
        let connectionsBefore = try #require(f.device()["device_connections"] as? Int)
        // The image starts as zeros: every block of the verified client has a known content
        // (version 0) without a preparing pass.
        var good = VerifiedWorkload(session: try f.open(dataBytes: 32 * 4096, depth: 32), blocks: 1024, seed: 13)
        let deadline = Date().addingTimeInterval(60)
        let held = UnsafeMutablePointer<BlockSession?>.allocate(capacity: Self.openAtOnce)
        for slot in 0..<Self.openAtOnce { (held + slot).initialize(to: nil) }
        defer {
            held.deinitialize(count: Self.openAtOnce)
            held.deallocate()
        }
        var outcome = Outcome()
        var k = 0
        while outcome.opened < Self.churnSessions && Date() < deadline {
            // A slice of verified work, then one churn step: the oldest held session
            // closes and a new one opens in its place.
            let target = good.ops + 32
            try good.run { $0.ops >= target || Date() > deadline }
            let slot = k % Self.openAtOnce
            if var old = (held + slot).move() { Self.check(&old, k - Self.openAtOnce, &outcome) }
            (held + slot).initialize(to: Self.churn(f, k, &outcome, deadline: deadline))
            k += 1
        }
        for slot in 0..<Self.openAtOnce {
            // The session in `slot` is the last one opened there.
            let last = k - 1 - (k - 1 - slot) % Self.openAtOnce
            if var old = (held + slot).move() { Self.check(&old, last, &outcome) }
            (held + slot).initialize(to: nil)
        }
        // The verified client goes on after the churn.
        let after = good.ops + 512
        try good.run { $0.ops >= after || Date() > deadline }
        try f.manager.waitFor("the churn sessions to be revoked", seconds: 10) { try f.manager.sessions().count == 1 }

        let d = try f.device()
        let losses = d["device_losses"] as? Int
        #expect(losses == 0, "the device connection was lost \(losses ?? -1) times: \(d["last_device_error"] as? String ?? "")")
        #expect(d["device_connections"] as? Int == connectionsBefore, "the driver reconnected to the device")
        #expect(d["device_connected"] as? Bool == true)
        #expect(try f.manager.device("vblk0").restarts == 0)
        #expect(outcome.opened == Self.churnSessions, "only \(outcome.opened) churn sessions opened in 60 s")
        #expect(outcome.failures.isEmpty, "\(outcome.failures.count) churn failures, first: \(outcome.failures.first ?? "")")
        #expect(outcome.closedInFlight > 0 && outcome.completed > 0)
        #expect(good.ops >= after, "the verified client stalled at \(good.ops) operations")
        #expect(good.verifyErrors == 0, "\(good.firstError ?? "")")
        #expect(good.clientErrors == 0, "\(good.firstError ?? "")")
        print("churn: \(outcome.opened) sessions opened, \(outcome.closedInFlight) closed with requests in flight, "
              + "\(outcome.completed) churn completions, \(outcome.refusals.count) refusals \(outcome.refusals.prefix(3)); verified client \(good.ops) ops "
              + "(\(good.reads) reads checked); device losses \(losses ?? -1)")
    }
}
