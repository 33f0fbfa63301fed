import Foundation
import Outboard
import OutboardBench
import OutboardSession
import OutboardSystem
import Synchronization

/// DPDK's dpdk-testpmd (Debian package dpdk-dev, set up by scripts/setup.sh) as a
/// vhost-user-net device, and a manager whose virtio-net driver (sandboxed, as in
/// production) drives it; clients use `NetSession`.
///
/// `ports` 2: testpmd has two vhost-user ports (`vnet0`, `vnet1`, MACs `mac(0)`, `mac(1)`),
/// and forward mode `io` makes it a wire between them.
public final class NetFixture {
    public let directory: String
    /// The vhost-user socket of each port.
    public let sockets: [String]
    public var socket: String { sockets[0] }
    public var device: Testpmd?
    public var manager: ManagerFixture!
    /// Held for the fixture's life: testpmd busy-polls a CPU (`BusyTurn`).
    let turn: BusyTurn
    public static let mac = MACAddress("02:00:00:00:00:01")!
    /// Where test frames are addressed (macswap returns them from there).
    public static let peer = MACAddress("02:00:00:00:00:fe")!
    /// The MAC of port `k` (port 0: `mac`).
    public static func mac(_ k: Int) -> MACAddress { MACAddress("02:00:00:00:00:0\(k + 1)")! }
    /// The device name of port `k` in the manager's config.
    public static func name(_ k: Int) -> String { "vnet\(k)" }

    public init(ports: Int = 1, forwardMode: String = "macswap", notify: String = "event-idx", heartbeatDeadlineMs: Int = 1000,
                managerExtra: String = "") throws {
        turn = try BusyTurn()
        directory = NSTemporaryDirectory() + "outboard-vnet-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let dir = directory
        sockets = (0..<ports).map { dir + "/vnet\($0).sock" }
        device = try Testpmd(sockets: sockets, forwardMode: forwardMode, filePrefix: "vnet-\(getpid())-\(Self.next())",
                             workDirectory: directory)
        let devices = sockets.enumerated().map { k, socket in
            """
            {"name": "\(Self.name(k))", "transport": "vhost-user", "class": "net", "socket": "\(socket)", "mac": "\(Self.mac(k))",
             "notify": "\(notify)", "queue_size": 256, "access": [{"uid": 0, "mode": "rw"}]}
            """
        }
        manager = try ManagerFixture(devices: "[" + devices.joined(separator: ",\n") + "]", extra: managerExtra,
                                     heartbeatDeadlineMs: heartbeatDeadlineMs)
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

    /// A session on port `port`.
    public func open(depth: Int = 64, port: Int = 0) throws -> NetSession {
        try NetSession.open(socketPath: manager.socketPath, device: Self.name(port), queueDepth: depth, waitMilliseconds: 20_000)
    }
}

/// A test frame: to `NetFixture.peer` from `source`, EtherType 0x88b5 (local
/// experimental), then the sequence number and a pattern made from it.
public func writeFrame(_ p: UnsafeMutableRawPointer, length: Int, source: MACAddress, sequence: UInt32) {
    NetFixture.peer.store(to: p)
    source.store(to: p + 6)
    p.storeBytes(of: UInt8(0x88), toByteOffset: 12, as: UInt8.self)
    p.storeBytes(of: UInt8(0xb5), toByteOffset: 13, as: UInt8.self)
    p.storeBytes(of: sequence, toByteOffset: 14, as: UInt32.self)
    for k in 18..<length { p.storeBytes(of: UInt8(truncatingIfNeeded: Int(sequence) &* 31 &+ k), toByteOffset: k, as: UInt8.self) }
}

/// The sequence number of a frame that came back from macswap whole (addresses swapped,
/// payload intact), or nil.
public func checkReturned(_ f: UnsafeRawBufferPointer, source: MACAddress) -> UInt32? {
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
public func roundTrip(_ s: inout NetSession, count: Int, sizes: [Int], first: UInt32 = 0, seconds: Double = 10,
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

