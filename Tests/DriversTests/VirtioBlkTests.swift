import Foundation
@_spi(Testing) import Outboard
import OutboardBench
import OutboardSession
import OutboardSystem
import OutboardTestSupport
import Testing

/// A real qemu-storage-daemon serving an image file as a vhost-user-blk device, and a
/// manager whose virtio-blk driver (sandboxed, as in production) drives it.
final class VirtioFixture {
    let directory: String
    let image: String
    let socket: String
    var daemon: StorageDaemon?
    var manager: ManagerFixture!
    static let imageBytes = 64 << 20

    init(notify: String = "adaptive", probeSandbox: Bool = false, writable: Bool = true,
         failingReadSector: UInt64? = nil, queueSize: Int = 256, maxSessions: Int = 16) throws {
        directory = NSTemporaryDirectory() + "outboard-vblk-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        image = directory + "/disk.img"
        socket = directory + "/vblk0.sock"
        try makeImage(path: image, bytes: Self.imageBytes, fill: false)
        daemon = try StorageDaemon(image: image, sockets: [socket], writable: writable, failingReadSector: failingReadSector)
        manager = try ManagerFixture(devices: """
            [{"name": "vblk0", "transport": "vhost-user", "socket": "\(socket)", "notify": "\(notify)", "queue_size": \(queueSize),
              "access": [{"uid": 0, "mode": "rw"}], "probe_sandbox": \(probeSandbox),
              "limits": {"max_sessions": \(maxSessions)}}]
            """)
    }

    deinit {
        manager = nil
        if var d = daemon.take() { d.stop() }
        try? FileManager.default.removeItem(atPath: directory)
    }

    func open(dataBytes: Int = 16 * 4096, depth: Int = 16) throws -> BlockSession {
        try BlockSession.open(socketPath: manager.socketPath, device: "vblk0", writable: true, dataBytes: dataBytes,
                              queueDepth: depth, waitMilliseconds: 20_000)
    }

    /// The image file's bytes, read past the device.
    func imageBytes(at offset: Int, count: Int) throws -> [UInt8] {
        let fd = Foundation.open(image, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw FixtureError("cannot open the image") }
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: count)
        let n = buf.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
        guard n == count else { throw FixtureError("short read of the image") }
        return buf
    }

    func writeImage(_ bytes: [UInt8], at offset: Int) throws {
        let fd = Foundation.open(image, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw FixtureError("cannot open the image") }
        defer { close(fd) }
        let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) }
        guard n == bytes.count else { throw FixtureError("short write of the image") }
    }

    var daemonPID: pid_t? { daemon?.pid }

    /// Waits (up to 10 s) until the status report shows the device connection `connected`;
    /// throws if it does not.
    func waitForDeviceConnected(_ connected: Bool) throws {
        try manager.waitFor("device_connected == \(connected)", seconds: 10) {
            try device()["device_connected"] as? Bool == connected
        }
    }

    /// The device entry of the status report.
    func device() throws -> [String: Any] {
        (try manager.report()["devices"] as! [[String: Any]]).first { $0["name"] as? String == "vblk0" }!
    }
}

/// Collects completions until `count` have arrived or `seconds` have passed; every one
/// must be `ok`. Returns how many arrived.
func collect(_ s: inout BlockSession, _ count: Int, within seconds: Double = 20,
             spinMicroseconds: Int = 0) throws -> Int {
    let results = UnsafeMutableBufferPointer<BlockResult>.allocate(capacity: s.queueDepth)
    defer { results.deallocate() }
    var done = 0
    let deadline = Date().addingTimeInterval(seconds)
    while done < count && Date() < deadline {
        let n = try s.wait(into: results, timeoutMilliseconds: 100, spinMicroseconds: spinMicroseconds)
        for r in results[0..<n] { #expect(r.status == .ok, "\(r)") }
        done += n
    }
    return done
}

func pattern(_ seed: UInt8, _ count: Int) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) } }

@Suite(.serialized) struct VirtioBlkTests {
    /// Reads, writes and flush through client -> sandboxed driver -> qemu-storage-daemon,
    /// checked against the image file itself in both directions.
    @Test func readWriteFlushVerifiedThroughTheImage() throws {
        let f = try VirtioFixture(probeSandbox: true)
        // The sandboxed virtio driver refuses escapes too.
        for p in try f.manager.device("vblk0").probes {
            let err = Int32(p.split(separator: " ")[1])!
            #expect(err == EPERM || err == EACCES, "virtio driver sandbox probe \(p) was not refused")
        }
        var s = try f.open()
        #expect(s.info.blockCount == UInt64(VirtioFixture.imageBytes / 512))
        #expect(s.info.flags.contains(.flush))
        // Device -> client: bytes written into the image file are what a read returns.
        let before = pattern(7, 8192)
        try f.writeImage(before, at: 1 << 20)
        #expect(try io(&s, .read, sector: UInt64(1 << 20) / 512, offset: 0, length: 8192) == .ok)
        #expect(Array(s.buffer[0..<8192]) == before)
        // Client -> device: a write (zero-copy from the session's buffer) lands in the file.
        let data = pattern(42, 16384)
        data.withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: s.buffer[4096..<(4096 + 16384)]).copyMemory(from: $0) }
        #expect(try io(&s, .write, sector: 2048, offset: 4096, length: 16384) == .ok)
        #expect(try io(&s, .flush, sector: 0, length: 0) == .ok)
        #expect(try f.imageBytes(at: 2048 * 512, count: 16384) == data)
        // A verified workload on top.
        var w = VerifiedWorkload(session: s, blocks: 1024, seed: 3)
        try w.prepare()
        try w.run(operations: 5000)
        try w.finish()
        #expect(w.verifyErrors == 0, "\(w.firstError ?? "")")
        #expect(w.clientErrors == 0, "\(w.firstError ?? "")")
    }

    /// Write-zeroes zeroes the range on the device (seen in the image file); discard
    /// succeeds. Both are forwarded only because the device offered them.
    @Test func discardAndWriteZeroes() throws {
        let f = try VirtioFixture()
        var s = try f.open()
        #expect(s.info.flags.contains(.discard))
        #expect(s.info.flags.contains(.writeZeroes))
        let data = pattern(9, 65536)
        try f.writeImage(data, at: 4 << 20)
        #expect(try f.imageBytes(at: 4 << 20, count: 65536) == data)
        #expect(try io(&s, .writeZeroes, sector: UInt64(4 << 20) / 512 + 16, length: 16384) == .ok)
        #expect(try io(&s, .flush, sector: 0, length: 0) == .ok)
        let after = try f.imageBytes(at: 4 << 20, count: 65536)
        #expect(Array(after[0..<8192]) == Array(data[0..<8192]))
        #expect(after[8192..<(8192 + 16384)].allSatisfy { $0 == 0 })
        #expect(Array(after[(8192 + 16384)...]) == Array(data[(8192 + 16384)...]))
        #expect(try io(&s, .read, sector: UInt64(4 << 20) / 512 + 16, length: 4096) == .ok)
        #expect(s.buffer[0..<4096].allSatisfy { $0 == 0 })
        #expect(try io(&s, .discard, sector: UInt64(8 << 20) / 512, length: 1 << 20) == .ok)
    }

    /// A request beyond the capacity gets a clear error; the device and driver go on.
    /// `outboard check` as a user runs it on a running manager: every check passes on a
    /// virtio-blk device that offers flush, write-zeroes and discard, and the pattern it
    /// wrote is in the image file, read past the device.
    @Test func checkCommandPassesAndItsPatternIsInTheImage() throws {
        let f = try VirtioFixture()
        let (status, lines) = try runOutboard(["check", "--config", f.manager.configPath, "--device", "vblk0", "--json",
                                               "--blocks", "512", "--operations", "1000", "--seed", "7"])
        #expect(status == 0, "\(lines)")
        let o = try JSONSerialization.jsonObject(with: Data((lines.last ?? "").utf8)) as? [String: Any]
        let checks = (o?["checks"] as? [[String: Any]]) ?? []
        let outcomes = Dictionary(uniqueKeysWithValues: checks.map { ($0["name"] as? String ?? "", $0["outcome"] as? String ?? "") })
        #expect(outcomes == ["verified-workload": "ok", "pattern": "ok", "flush": "ok", "write-zeroes": "ok", "discard": "ok",
                             "beyond-capacity": "ok"], "\(lines)")
        #expect(o?["failed"] as? Int == 0)
        // The check's documented pattern at its default offset (16 MiB), 64 KiB long.
        let expected = (0..<(64 << 10)).map { UInt8(truncatingIfNeeded: UInt64($0) &* 0x9E37_79B9 &+ 7 &* 131 &+ UInt64($0 >> 12)) }
        #expect(try f.imageBytes(at: 16 << 20, count: 64 << 10) == expected)
    }

    /// The driver puts an available-ring entry naming no descriptor (fault bad-ring) under a
    /// verified workload: the daemon refuses the queue and drops the connection, the same
    /// driver reconnects and resubmits, and nothing acknowledged is lost.
    @Test func aBadRingEntryCostsAReconnectionNotData() throws {
        let f = try VirtioFixture()
        let (status, lines) = try runOutboard(["faults", "--config", f.manager.configPath, "--device", "vblk0", "--kinds", "bad-ring",
                                               "--faults", "3", "--ops-between", "300", "--json"], seconds: 120)
        #expect(status == 0, "\(lines)")
        let o = try JSONSerialization.jsonObject(with: Data((lines.last ?? "").utf8)) as? [String: Any]
        #expect(o?["faults_injected"] as? Int == 3 && o?["recovered"] as? Int == 3, "\(lines)")
        #expect(o?["verify_errors"] as? Int == 0 && o?["client_errors"] as? Int == 0, "\(lines)")
        let d = try f.device()
        #expect(d["restarts"] as? Int == 0, "the driver stayed: \(d)")
        #expect((d["device_losses"] as? Int ?? 0) >= 3 && d["device_connected"] as? Bool == true, "\(d)")
        // stray-dma is not among them: it fails its request on purpose (check --dma-isolation).
        let stray = try runOutboard(["faults", "--config", f.manager.configPath, "--device", "vblk0", "--kinds", "stray-dma"], seconds: 30)
        #expect(stray.status == 64, "a usage error: \(stray)")
    }

    @Test func requestBeyondCapacity() throws {
        let f = try VirtioFixture()
        var s = try f.open()
        let end = s.info.blockCount
        #expect(try io(&s, .read, sector: end, length: 4096) == .invalid)
        #expect(try io(&s, .read, sector: end - 4, length: 4096) == .invalid)  // straddles the end
        #expect(try io(&s, .writeZeroes, sector: end - 1, length: 1024) == .invalid)
        #expect(try io(&s, .read, sector: end - 8, length: 4096) == .ok)
        #expect(try io(&s, .write, sector: 0, length: 4096) == .ok)
        let d = try f.device()
        #expect(d["state"] as? String == "running")
        #expect(d["restarts"] as? Int == 0)
        #expect(d["device_connected"] as? Bool == true)
    }

    /// A request whose buffer lies outside the client's data region (written raw, past
    /// the library's own checks) is rejected by the driver and never reaches the device.
    @Test func bufferOutsideTheRegionIsRejected() throws {
        let f = try VirtioFixture()
        var s = try f.open(dataBytes: 8 * 4096, depth: 8)
        #expect(try io(&s, .read, sector: 0, length: 4096) == .ok)
        let sent = try f.device()["device_requests"] as! Int
        for (offset, length) in [(UInt64(8 * 4096), UInt32(4096)), (UInt64(7 * 4096), UInt32(8192)), (UInt64.max - 100, UInt32(4096)),
                                 (0, UInt32(1) << 31)] {
            guard try s.submitUnchecked(.read, sector: 0, offset: offset, length: length) != nil else { Issue.record("no tag"); return }
            var status: BlockStatus?? = nil
            try drain(&s) { status = $0.status }
            #expect(status == .some(.invalid), "offset \(offset) length \(length): \(String(describing: status))")
            #expect(try f.device()["device_requests"] as! Int == sent, "a request outside the region reached the device")
        }
        #expect(try io(&s, .read, sector: 0, length: 4096) == .ok)
    }

    /// The device process is killed under load and a new one started on the same socket:
    /// the driver (not restarted) reconnects, registers its memory again, resubmits what
    /// was in flight, and the workload sees no error.
    @Test func daemonKilledAndRestartedUnderTheDriver() throws {
        let f = try VirtioFixture()
        var w = VerifiedWorkload(session: try f.open(dataBytes: 32 * 4096, depth: 32), blocks: 2048, seed: 11)
        try w.prepare()
        try w.run(operations: 3000)
        let driverPid = try f.manager.device("vblk0").pid
        for round in 0..<2 {
            if var d = f.daemon.take() { d.stop(kill: true) }
            // Requests submitted now wait for the device.
            let stalled = w.ops
            usleep(100_000)
            f.daemon = try StorageDaemon(image: f.image, sockets: [f.socket])
            try w.run(operations: 3000)
            #expect(w.ops >= stalled + 3000)
            let d = try f.device()
            #expect(d["device_losses"] as! Int >= round + 1)
            #expect(d["device_connected"] as? Bool == true)
        }
        try w.finish()
        #expect(w.verifyErrors == 0, "\(w.firstError ?? "")")
        #expect(w.clientErrors == 0, "\(w.firstError ?? "")")
        #expect(try f.manager.device("vblk0").pid == driverPid, "the driver was restarted instead of reconnecting")
        #expect(try f.manager.device("vblk0").restarts == 0)
    }

    /// Requests a client submits while the device is gone wait in the session queue; they
    /// must not keep the driver awake (it would then never read the manager's new
    /// connection), and they are served once the device is back.
    @Test func requestsQueuedWhileTheDeviceIsGoneAreServedWhenItReturns() throws {
        let f = try VirtioFixture()
        var s = try f.open(dataBytes: 16 * 4096, depth: 16)
        let data = pattern(9, 4096)
        data.withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: s.buffer[0..<4096]).copyMemory(from: $0) }
        #expect(try io(&s, .write, sector: 80, offset: 0, length: 4096) == .ok)
        if var d = f.daemon.take() { d.stop(kill: true) }
        try f.waitForDeviceConnected(false)
        #expect(try f.device()["device_connected"] as? Bool == false, "the driver did not notice the device going away")
        for k in 1..<9 { #expect(try s.submit(.read, sector: 80, offset: k * 4096, length: 4096) != nil) }
        usleep(100_000)
        f.daemon = try StorageDaemon(image: f.image, sockets: [f.socket])
        let done = try collect(&s, 8)
        #expect(done == 8, "requests queued while the device was gone were not served after it came back")
        for k in 1..<9 where done == 8 {
            #expect(Array(s.buffer[(k * 4096)..<((k + 1) * 4096)]) == data, "read \(k) returned other bytes than were written")
        }
        #expect(try f.device()["device_connected"] as? Bool == true)
        #expect(try f.manager.device("vblk0").restarts == 0)
    }

    /// More requests than the virtqueue holds, and the device stops answering: the driver
    /// must not spin on the requests it cannot take, or it would never read the device's
    /// hang-up. When the device process dies, the loss is seen; when a new one comes, every
    /// request completes.
    @Test(arguments: ["event-idx", "adaptive"]) func fullVirtqueueAndADeadDevice(notify: String) throws {
        let f = try VirtioFixture(notify: notify, queueSize: 8)
        var s = try f.open(dataBytes: 32 * 4096, depth: 32)
        #expect(try io(&s, .read, sector: 0, length: 4096) == .ok)
        let pid = try #require(f.daemonPID)
        kill(pid, SIGSTOP)  // the device stops answering: 8 requests at it, 24 left queued
        for k in 0..<32 { #expect(try s.submit(.read, sector: UInt64(k * 8), offset: k * 4096, length: 4096) != nil) }
        usleep(100_000)
        if var d = f.daemon.take() { d.stop(kill: true) }
        try f.waitForDeviceConnected(false)
        #expect(try f.device()["device_connected"] as? Bool == false, "the driver did not see the device die")
        f.daemon = try StorageDaemon(image: f.image, sockets: [f.socket])
        #expect(try collect(&s, 32) == 32)
        #expect(try f.manager.device("vblk0").restarts == 0)
    }

    /// Every session's buffers take one slot of the device's memory table (qemu-storage-
    /// daemon reports how many with GET_MAX_MEM_SLOTS; the driver's own region takes one).
    /// Sessions past that get a clear error; the device connection and the sessions that
    /// have a slot go on as before.
    @Test func sessionsBeyondTheDevicesMemorySlots() throws {
        let f = try VirtioFixture(maxSessions: 64)
        var open = Held<BlockSession>(capacity: 64)
        var refusal: String? = nil
        for _ in 0..<64 {
            do {
                var s = try f.open(dataBytes: 4096, depth: 2)
                guard try io(&s, .read, sector: 0, length: 4096) == .ok else { Issue.record("a read failed"); break }
                open.append(s)
            } catch {
                refusal = "\(error)"
                break
            }
        }
        let reason = try #require(refusal, "64 sessions fit: the device's slot limit was not reached")
        #expect(reason.contains("memory slots"), "\(reason)")
        #expect(open.count >= 7, "only \(open.count) sessions before the refusal")
        for k in 0..<open.count {
            #expect(try open.with(k) { try io(&$0, .read, sector: UInt64(k * 8), length: 4096) } == .ok)
        }
        let d = try f.device()
        #expect(d["device_losses"] as? Int == 0)
        #expect(d["device_connected"] as? Bool == true)
    }

    /// The driver is killed again and again under a verified workload; each new driver
    /// negotiates with the device again and the client reissues what had not completed.
    @Test func driverKilledUnderLoad() throws {
        let f = try VirtioFixture(notify: "event-idx")
        var w = VerifiedWorkload(session: try f.open(dataBytes: 32 * 4096, depth: 32), blocks: 2048, seed: 5)
        try w.prepare()
        let admin = try f.manager.admin()
        for kind in [FaultKind.kill, .segfault, .abort, .kill] {
            try w.run(operations: 2000)
            let hit = try admin.injectFault(device: "vblk0", kind)
            let deadline = Date().addingTimeInterval(20)
            try w.run { w in w.lastCompletionGeneration > hit.generation || Date() > deadline }
            #expect(w.lastCompletionGeneration > hit.generation, "no completion from a new driver after \(kind)")
        }
        try w.finish()
        #expect(w.verifyErrors == 0, "\(w.firstError ?? "")")
        #expect(w.clientErrors == 0, "\(w.firstError ?? "")")
        #expect(try f.manager.device("vblk0").restarts >= 4)
        #expect(w.session.reissued > 0)
    }

    /// A device error (EIO inside qemu-storage-daemon, from QEMU's blkdebug) reaches the
    /// client as an I/O error on that request only: the device and the driver keep serving,
    /// nothing is restarted or reconnected.
    @Test func deviceErrorReachesTheClient() throws {
        let f = try VirtioFixture(failingReadSector: 4096)
        var s = try f.open()
        #expect(try io(&s, .read, sector: 4096, length: 4096) == .ioError)
        #expect(try io(&s, .read, sector: 4088, length: 8192) == .ioError, "a read overlapping the bad sector")
        #expect(try io(&s, .read, sector: 0, length: 4096) == .ok)
        #expect(try io(&s, .write, sector: 4096, length: 4096) == .ok, "only reads are made to fail")
        var w = VerifiedWorkload(session: s, blocks: 256, seed: 9)  // blocks 0..<256: sectors below 2048
        try w.prepare()
        try w.run(operations: 2000)
        try w.finish()
        #expect(w.verifyErrors == 0 && w.clientErrors == 0, "\(w.firstError ?? "")")
        let d = try f.device()
        #expect(d["device_losses"] as? Int == 0)
        #expect(try f.manager.device("vblk0").restarts == 0)
    }

    /// A read-only export: the driver reports it, the manager refuses writable sessions
    /// with a clear reason, and a read-only session reads; its writes end as `readOnly`
    /// before the device sees them.
    @Test func readOnlyDevice() throws {
        let f = try VirtioFixture(writable: false)
        let before = pattern(3, 4096)
        try f.writeImage(before, at: 64 * 512)
        do {
            _ = try f.open()
            Issue.record("a writable session was opened on a read-only device")
        } catch {
            #expect("\(error)".contains("read-only"), "\(error)")
        }
        var s = try BlockSession.open(socketPath: f.manager.socketPath, device: "vblk0", writable: false,
                                      dataBytes: 4 * 4096, queueDepth: 4, waitMilliseconds: 20_000)
        #expect(s.info.flags.contains(.readOnly))
        let sent = try f.device()["device_requests"] as! Int
        #expect(try io(&s, .write, sector: 64, length: 4096) == .readOnly)
        #expect(try io(&s, .writeZeroes, sector: 64, length: 4096) == .readOnly)
        #expect(try f.device()["device_requests"] as! Int == sent, "a write reached a read-only device")
        #expect(try io(&s, .read, sector: 64, length: 4096) == .ok)
        #expect(Array(s.buffer[0..<4096]) == before)
        #expect(try f.imageBytes(at: 64 * 512, count: 4096) == before)
    }

    /// A writable session whose device comes back read-only (the export restarted with
    /// writing off): the driver itself answers the session's writes with `readOnly`, the
    /// device never sees them, and reads go on.
    @Test func deviceThatComesBackReadOnly() throws {
        let f = try VirtioFixture()
        let before = pattern(5, 4096)
        try f.writeImage(before, at: 64 * 512)
        var s = try f.open(dataBytes: 4 * 4096, depth: 4)
        #expect(try io(&s, .write, sector: 128, length: 4096) == .ok)
        if var d = f.daemon.take() { d.stop() }
        try f.waitForDeviceConnected(false)
        f.daemon = try StorageDaemon(image: f.image, sockets: [f.socket], writable: false)
        try f.waitForDeviceConnected(true)
        #expect(try f.device()["device_connected"] as? Bool == true)
        let sent = try f.device()["device_requests"] as! Int
        pattern(6, 4096).withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: s.buffer[0..<4096]).copyMemory(from: $0) }
        #expect(try io(&s, .write, sector: 64, length: 4096) == .readOnly)
        #expect(try io(&s, .writeZeroes, sector: 64, length: 4096) == .readOnly)
        #expect(try f.device()["device_requests"] as! Int == sent, "a write reached a read-only device")
        #expect(try f.imageBytes(at: 64 * 512, count: 4096) == before)
        #expect(try io(&s, .read, sector: 64, length: 4096) == .ok)
        #expect(Array(s.buffer[0..<4096]) == before)
    }

    /// Adaptive waiting on the client side (poll with yields for a window, then sleep):
    /// every request completes with the data the device holds, under an adaptive and an
    /// event-idx driver, with a 50 us and a 1 us window (so both the polling and the
    /// sleeping path run; which one catches a given completion depends on timing and is
    /// not asserted).
    @Test(arguments: ["adaptive", "event-idx"]) func adaptiveClientWait(notify: String) throws {
        let f = try VirtioFixture(notify: notify)
        var s = try f.open(dataBytes: 16 * 4096, depth: 16)
        let data = pattern(77, 4096)
        try f.writeImage(data, at: 96 * 512)
        for round in 0..<50 {
            for k in 0..<16 { #expect(try s.submit(.read, sector: 96, offset: k * 4096, length: 4096) != nil) }
            #expect(try collect(&s, 16, within: 10, spinMicroseconds: round % 2 == 0 ? 50 : 1) == 16)
        }
        for k in 0..<16 where Array(s.buffer[(k * 4096)..<((k + 1) * 4096)]) != data {
            Issue.record("buffer \(k) does not hold what the device holds")
        }
    }

    /// The C reference frontend of `bench blk` in each notification mode, against its own
    /// qemu-storage-daemon: it completes I/O, reads the capacity, kicks the device and
    /// finishes without errors (a smoke test; the modes' signal counts are timing-dependent).
    @Test(arguments: refBlkModes) func cReferenceRunsInEveryMode(mode: String) throws {
        let dir = NSTemporaryDirectory() + "outboard-refblk-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try makeImage(path: dir + "/disk.img", bytes: 16 << 20, fill: true)
        var daemon = try StorageDaemon(image: dir + "/disk.img", sockets: [dir + "/ref.sock"])
        defer { daemon.stop() }
        let r = try runRefBlk(socket: dir + "/ref.sock", queueDepth: 8, warmupSeconds: 0.05, seconds: 0.2, mode: mode, seed: 1)
        #expect(r.errors == 0)
        #expect(r.ios > 0)
        #expect(r.capacitySectors == UInt64((16 << 20) / 512))
        #expect(r.kicksPerIo > 0, "no kick at all in \(mode) mode")
    }

    /// The async/await API over the same path.
    @Test func asyncAPI() async throws {
        let f = try VirtioFixture()
        let dev = try AsyncBlockDevice.open(socketPath: f.manager.socketPath, device: "vblk0", writable: true,
                                            chunkBytes: 64 << 10, queueDepth: 8, waitMilliseconds: 20_000)
        #expect(dev.sectorCount == UInt64(VirtioFixture.imageBytes / 512))
        try await withThrowingTaskGroup(of: Void.self) { group in
            for i in 0..<16 {
                group.addTask {
                    let data = pattern(UInt8(i), 8192)
                    try await dev.write(sector: UInt64(i * 64), data)
                    #expect(try await dev.read(sector: UInt64(i * 64), bytes: 8192) == data)
                }
            }
            try await group.waitForAll()
        }
        try await dev.flush()
        #expect(try f.imageBytes(at: 5 * 64 * 512, count: 8192) == pattern(5, 8192))
        do {
            _ = try await dev.read(sector: dev.sectorCount, bytes: 4096)
            Issue.record("a read past the end succeeded")
        } catch let e as BlockIOError {
            #expect(e.status == .invalid)
        }
    }
}
