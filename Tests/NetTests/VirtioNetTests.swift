import Foundation
import Outboard
import OutboardBench
import OutboardSession
import OutboardSystem
import OutboardTestSupport
import Synchronization
import Testing

/// DPDK's dpdk-testpmd (Debian package dpdk-dev, set up by scripts/setup.sh) as a
/// vhost-user-net device, and a manager whose virtio-net driver (sandboxed, as in
/// production) drives it; clients use `NetSession`.
final class NetFixture {
    let directory: String
    let socket: String
    var device: Testpmd?
    var manager: ManagerFixture!
    static let mac = MACAddress("02:00:00:00:00:01")!
    /// Where test frames are addressed (macswap returns them from there).
    static let peer = MACAddress("02:00:00:00:00:fe")!

    init(forwardMode: String = "macswap", notify: String = "event-idx", heartbeatDeadlineMs: Int = 1000) throws {
        directory = NSTemporaryDirectory() + "outboard-vnet-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        socket = directory + "/vnet0.sock"
        device = try Testpmd(sockets: [socket], forwardMode: forwardMode, filePrefix: "vnet-\(getpid())-\(Self.next())",
                             workDirectory: directory)
        manager = try ManagerFixture(devices: """
            [{"name": "vnet0", "transport": "vhost-user", "class": "net", "socket": "\(socket)", "mac": "\(Self.mac)",
              "notify": "\(notify)", "queue_size": 256, "access": [{"uid": 0, "mode": "rw"}]}]
            """, heartbeatDeadlineMs: heartbeatDeadlineMs)
    }

    static let counter = Atomic<Int>(0)
    static func next() -> Int { counter.add(1, ordering: .relaxed).newValue }

    deinit {
        manager = nil
        if var d = device.take() {
            let out = d.stop()
            if ProcessInfo.processInfo.environment["OUTBOARD_TEST_VERBOSE"] != nil { print(out.suffix(3000)) }
        }
        try? FileManager.default.removeItem(atPath: directory)
    }

    func open(depth: Int = 64) throws -> NetSession {
        try NetSession.open(socketPath: manager.socketPath, device: "vnet0", queueDepth: depth, waitMilliseconds: 20_000)
    }
}

/// A test frame: to `NetFixture.peer` from `source`, EtherType 0x88b5 (local
/// experimental), then the sequence number and a pattern made from it.
func writeFrame(_ p: UnsafeMutableRawPointer, length: Int, source: MACAddress, sequence: UInt32) {
    NetFixture.peer.store(to: p)
    source.store(to: p + 6)
    p.storeBytes(of: UInt8(0x88), toByteOffset: 12, as: UInt8.self)
    p.storeBytes(of: UInt8(0xb5), toByteOffset: 13, as: UInt8.self)
    p.storeBytes(of: sequence, toByteOffset: 14, as: UInt32.self)
    for k in 18..<length { p.storeBytes(of: UInt8(truncatingIfNeeded: Int(sequence) &* 31 &+ k), toByteOffset: k, as: UInt8.self) }
}

/// The sequence number of a frame that came back from macswap whole (addresses swapped,
/// payload intact), or nil.
func checkReturned(_ f: UnsafeRawBufferPointer, source: MACAddress) -> UInt32? {
    guard f.count >= 18, MACAddress(bytes: f.baseAddress!) == source, MACAddress(bytes: f.baseAddress! + 6) == NetFixture.peer,
          f[12] == 0x88, f[13] == 0xb5 else { return nil }
    let sequence = f.loadUnaligned(fromByteOffset: 14, as: UInt32.self)
    for k in 18..<f.count where f[k] != UInt8(truncatingIfNeeded: Int(sequence) &* 31 &+ k) { return nil }
    return sequence
}

/// Sends `count` frames of the given sizes and collects what comes back, within
/// `seconds`, with at most `window` frames out at once (more than the session has receive
/// buffers and testpmd drops the rest, as a wire would). Returns the sequence numbers seen
/// (each once) and the number of frames that came back damaged.
func roundTrip(_ s: inout NetSession, count: Int, sizes: [Int], first: UInt32 = 0, seconds: Double = 10,
               window: Int = 32) throws -> (seen: Set<UInt32>, damaged: Int) {
    var seen = Set<UInt32>()
    var damaged = 0
    var sent = 0
    // Frames given up on: out for 300 ms with nothing coming back (lost while the driver
    // restarted), so that the window opens again.
    var writtenOff = 0
    var lastProgress = Date()
    let deadline = Date().addingTimeInterval(seconds)
    let mac = s.info.mac
    while seen.count < count && Date() < deadline {
        if Date().timeIntervalSince(lastProgress) > 0.3 {
            writtenOff = sent - seen.count
            lastProgress = Date()
        }
        let room = window - (sent - seen.count - writtenOff)
        if sent < count && room > 0 {
            var next = sent
            sent += try s.transmit(max: min(16, count - sent, room)) { b in
                let n = sizes[next % sizes.count]
                writeFrame(b.pointer, length: n, source: mac, sequence: first + UInt32(next))
                next += 1
                return n
            }
        }
        let before = seen.count
        defer { if seen.count > before { lastProgress = Date() } }
        _ = try s.receive(max: 32) { f in
            if let q = checkReturned(f, source: mac) { seen.insert(q) } else { damaged += 1 }
        }
        if sent == count || room <= 0 { try s.wait(timeoutMilliseconds: 50) }
    }
    return (seen, damaged)
}

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
