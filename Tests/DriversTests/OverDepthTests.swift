import Foundation
@_spi(Testing) import Outboard
import OutboardRings
import OutboardSession
import OutboardSystem
import OutboardTestSupport
import Testing

/// A client that ignores its queue depth (it keeps refilling its request queue and takes
/// every completion at once, so its completion queue never fills) cannot make the virtio-blk driver hold more of its requests than the
/// depth its buffers were sized for: the driver drops that session, and the device, the
/// driver and a verified client beside it carry on.
@Suite(.serialized) struct OverDepthTests {
    @Test func aClientBeyondItsDepthIsDroppedAndNobodyElseNotices() throws {
        let f = try VirtioFixture(notify: "event-idx", queueSize: 256)
        var good = VerifiedWorkload(session: try f.open(dataBytes: 8 * 4096, depth: 8), blocks: 1024, seed: 7)
        try good.prepare()
        var bad = try f.open(dataBytes: 4096, depth: 2)
        // Flood: the same tag (within the depth, so the queue itself admits it) as fast as
        // the driver takes them, far more than 2 at a time; completions are taken at once.
        let deadline = Clock.monotonicNanoseconds + UInt64(testDeadlineSeconds * 1e9)
        var sent = 0
        var refused = 0
        // Until the queue stops draining (the driver no longer takes from it: dropped).
        while Clock.monotonicNanoseconds < deadline, refused < 2000 {
            if bad.enqueueRaw(BlockRequest(tag: 0, op: .read, sector: 0, offset: RegionOffset(rawValue: 0), length: 4096)) {
                sent += 1
                refused = 0
            } else {
                refused += 1
                usleep(100)
            }
            _ = bad.dequeueRawCompletions()
            if sent % 256 == 255 { try good.run(operations: 16) }
        }
        try f.manager.waitFor("the over-depth session to be dropped", seconds: testDeadlineSeconds) {
            (try f.manager.sessions()).count == 1
        }
        // Dropped at intake, for its depth: not later, when its completions would no longer
        // fit (which needs more of them finished in one pass than its queue holds, and
        // before that, more than its depth in the driver's completion buffer).
        let out = UnsafeMutableBufferPointer<BlockResult>.allocate(capacity: 4)
        defer { out.deallocate() }
        var reason = ""
        let until = Clock.monotonicNanoseconds + UInt64(testDeadlineSeconds * 1e9)
        while reason.isEmpty, Clock.monotonicNanoseconds < until {
            do { _ = try bad.wait(into: out, timeoutMilliseconds: 50) } catch { reason = "\(error)" }
        }
        #expect(reason.contains("more requests than the queue depth of 2"), "\(reason)")
        try good.run(operations: 512)
        try good.finish()
        #expect(good.verifyErrors == 0 && good.clientErrors == 0)
        let d = try f.manager.device("vblk0")
        #expect(d.restarts == 0, "the driver was restarted: \(d.lastFailure ?? "")")
        #expect(try f.device()["device_losses"] as? Int == 0, "the device connection was lost")
        #expect(sent > 2, "the flood never got going")
    }
}
