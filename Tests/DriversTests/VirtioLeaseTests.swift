import Foundation
import Outboard
import OutboardBench
import OutboardSession
import OutboardSystem
import OutboardTestSupport
import Testing

/// The virtio-blk driver's lease margin, against a real qemu-storage-daemon: the driver
/// hands a buffer's address to the device only with its margin (20 ms) of lease left. With
/// the shortest lease the config allows (10 ms, renewed every manager tick) that is never
/// the case: every read and write ends `revoked` before the device sees it, and a read's
/// buffer stays untouched.
@Suite(.serialized) struct VirtioLeaseTests {
    @Test func noBufferReachesTheDeviceWithLessThanTheMarginOfLeaseLeft() throws {
        let directory = NSTemporaryDirectory() + "outboard-vlease-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let image = directory + "/disk.img", socket = directory + "/vblk0.sock"
        try makeImage(path: image, bytes: 16 << 20, fill: true)
        var daemon = try StorageDaemon(image: image, sockets: [socket])
        defer { daemon.stop() }
        do {
            let m = try ManagerFixture(devices: """
                [{"name": "vblk0", "transport": "vhost-user", "class": "block", "socket": "\(socket)", "access": [{"uid": 0, "mode": "rw"}]}]
                """, leaseMs: 10)
            var s = try BlockSession.open(socketPath: m.socketPath, device: "vblk0", writable: true, dataBytes: 16 * 4096,
                                          queueDepth: 16, waitMilliseconds: 20_000)
            // Flush names no buffer: it needs no lease, and shows the device is served.
            #expect(try io(&s, .flush, sector: 0, length: 0) == .ok)
            let sent = try deviceRequests(m)
            for k in 0..<4096 { s.buffer[k] = 0xA5 }
            var served = 0
            for i in 0..<200 {
                let op: BlockOp = i % 2 == 0 ? .read : .write
                let st = try io(&s, op, sector: UInt64(i % 16) * 8, offset: 0, length: 4096)
                if st != .revoked {
                    served += 1
                    if served == 1 { Issue.record("\(op) \(i) with a lease shorter than the margin ended \(st.map { "\($0)" } ?? "unknown")") }
                }
            }
            #expect(served == 0, "\(served) of 200 transfers started with less than the margin of lease left")
            #expect(try deviceRequests(m) == sent, "requests with less than the margin of lease left reached the device")
            let untouched = (0..<4096).allSatisfy { s.buffer[$0] == 0xA5 }
            #expect(untouched, "a read wrote into the region with less than the margin of lease left")
            #expect(try m.device("vblk0").restarts == 0)
        }
    }

    func deviceRequests(_ m: ManagerFixture) throws -> Int {
        let d = (try m.report()["devices"] as! [[String: Any]]).first { $0["name"] as? String == "vblk0" }
        return try #require(d?["device_requests"] as? Int, "no device_requests in the status report")
    }
}
