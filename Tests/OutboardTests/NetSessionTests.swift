import Foundation
import Outboard
import OutboardRings
import OutboardSession
import OutboardSystem
import OutboardTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The net session client (NetSession) against an in-process serving end (NetPortDouble):
/// an echo port, a driver that writes hostile entries, a driver that is replaced. The real
/// peer is the manager with the virtio-net driver against DPDK (the net driver's tests).
@Suite(.serialized) struct NetSessionTests {
    static func socketPath() -> String {
        NSTemporaryDirectory() + "outboard-netdouble-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
    }

    static let peer = MACAddress("02:00:00:00:00:99")!

    /// Writes a test frame of `length` bytes at `p`: destination `peer`, source `mac`, an
    /// experimental EtherType, then the sequence number and a pattern derived from it.
    static func writeFrame(_ p: UnsafeMutableRawPointer, length: Int, seq: UInt32, mac: MACAddress) {
        peer.store(to: p)
        mac.store(to: p + 6)
        p.storeBytes(of: UInt16(0x88B5).bigEndian, toByteOffset: 12, as: UInt16.self)
        for i in 14..<length { p.storeBytes(of: pattern(seq, i), toByteOffset: i, as: UInt8.self) }
        if length >= 18 { p.storeBytes(of: seq.bigEndian, toByteOffset: 14, as: UInt32.self) }
    }

    static func pattern(_ seq: UInt32, _ i: Int) -> UInt8 { UInt8(truncatingIfNeeded: Int(seq) &* 31 &+ i &* 7) }

    /// What the echo port returns for frame `seq`: the MACs swapped, the rest unchanged.
    static func checkEcho(_ f: UnsafeRawBufferPointer, length: Int, seq: UInt32, mac: MACAddress) -> String? {
        guard f.count == length else { return "frame \(seq): \(f.count) bytes, sent \(length)" }
        guard MACAddress(bytes: f.baseAddress!) == mac, MACAddress(bytes: f.baseAddress! + 6) == peer else {
            return "frame \(seq): MACs not swapped"
        }
        guard f.loadUnaligned(fromByteOffset: 12, as: UInt16.self) == UInt16(0x88B5).bigEndian else { return "frame \(seq): EtherType" }
        var expected = [UInt8](repeating: 0, count: length)
        expected.withUnsafeMutableBytes { writeFrame($0.baseAddress!, length: length, seq: seq, mac: mac) }
        for i in 14..<length where f[i] != expected[i] { return "frame \(seq): byte \(i) is \(f[i]), sent \(expected[i])" }
        return nil
    }

    /// Receives until `count` frames came (waiting between), handing each to `body`.
    static func receive(_ s: inout NetSession, count: Int, _ body: (UnsafeRawBufferPointer) -> Void) throws {
        let deadline = Clock.monotonicNanoseconds + UInt64(testDeadlineSeconds * 1e9)
        var got = 0
        while got < count {
            guard Clock.monotonicNanoseconds < deadline else { throw DeadlinePassed("\(count - got) of \(count) frames", seconds: testDeadlineSeconds) }
            got += try s.receive(max: 32, body)
            if got < count { try s.wait(timeoutMilliseconds: 1000) }
        }
    }

    /// A transmit buffer, waiting for one to come back if none is free.
    static func buffer(_ s: inout NetSession) throws -> TransmitBuffer {
        let deadline = Clock.monotonicNanoseconds + UInt64(testDeadlineSeconds * 1e9)
        while true {
            if let b = try s.transmitBuffer() { return b }
            guard Clock.monotonicNanoseconds < deadline else { throw DeadlinePassed("a free transmit buffer", seconds: testDeadlineSeconds) }
            try s.wait(timeoutMilliseconds: 1000)
        }
    }

    /// Frames of every size the port carries (60...1518: the minimum frame without its FCS
    /// to the MTU with header and VLAN tag), one at a time and in bursts of 32, come back
    /// from the echo port byte for byte with the MACs swapped; every buffer comes home.
    @Test func framesRoundTripThroughAnEchoPort() throws {
        let path = Self.socketPath()
        let port = try NetPortDouble(socketPath: path)
        defer { try? port.stop() }
        var s = try NetSession.open(socketPath: path, device: "n0", queueDepth: 64, bufferBytes: 2048)
        #expect(s.info == port.info && s.info.maxFrame == 1518)
        #expect(s.queueDepth == 64 && s.bufferBytes == 2048 && s.opened.dataBytes >= 2 * 64 * 2048)
        #expect(s.freeTransmitBuffers == 64 && s.transmitInFlight == 0)
        let mac = s.info.mac
        var failures: [String] = []
        // One at a time, every size from 60 to 1518 in steps of 41, and the ends.
        var sizes = Array(stride(from: 60, through: 1518, by: 41))
        sizes += [61, 64, 1514, 1517, 1518]
        var seq: UInt32 = 0
        for length in sizes {
            let b = try Self.buffer(&s)
            #expect(b.capacity == 1518)
            Self.writeFrame(b.pointer, length: length, seq: seq, mac: mac)
            try s.send(b.index, length: length)
            try s.flush()
            let want = seq
            try Self.receive(&s, count: 1) { f in
                if let e = Self.checkEcho(f, length: length, seq: want, mac: mac) { failures.append(e) }
            }
            seq += 1
        }
        // Bursts of 32, sizes cycling through the range, received in order.
        var sentLengths: [Int] = []
        var sent = 0
        var received = 0
        let total = 32 * 40
        let first = seq
        let deadline0 = Clock.monotonicNanoseconds + UInt64(testDeadlineSeconds * 1e9)
        while received < total {
            guard Clock.monotonicNanoseconds < deadline0 else { throw DeadlinePassed("the echoed bursts", seconds: testDeadlineSeconds) }
            var n = 0
            if sent < total {
                n = try s.transmit(max: min(32, total - sent)) { b in
                    let length = 60 + (sent * 97) % (1518 - 60 + 1)
                    Self.writeFrame(b.pointer, length: length, seq: first + UInt32(sent), mac: mac)
                    sentLengths.append(length)
                    sent += 1
                    return length
                }
            }
            var next = received
            let got = try s.receive(max: 32) { f in
                if let e = Self.checkEcho(f, length: sentLengths[next], seq: first + UInt32(next), mac: mac) { failures.append(e) }
                next += 1
            }
            received += got
            if n == 0 && got == 0 { try s.wait(timeoutMilliseconds: 1000) }
        }
        #expect(failures.isEmpty, "\(failures.prefix(5))")
        #expect(s.framesSent == UInt64(sizes.count + total) && s.framesReceived == s.framesSent)
        #expect(s.strayEntries == 0 && s.recoveries == 0 && s.txDroppedInRecovery == 0)
        // Every transmit buffer comes back.
        let deadline = Clock.monotonicNanoseconds + UInt64(testDeadlineSeconds * 1e9)
        while s.transmitInFlight > 0 && Clock.monotonicNanoseconds < deadline {
            if try s.reclaimTransmitBuffers() == 0 { try s.wait(timeoutMilliseconds: 100) }
        }
        #expect(s.transmitInFlight == 0 && s.freeTransmitBuffers == 64)
    }

    /// What `send` and `transmit` refuse: frames shorter than an Ethernet header or longer
    /// than the port's largest frame, buffers the session did not hand out; a refused frame
    /// leaves its buffer with the caller (`discard` gives it back).
    @Test func sendRefusesWhatThePortCannotCarry() throws {
        let path = Self.socketPath()
        let port = try NetPortDouble(socketPath: path)
        defer { try? port.stop() }
        var s = try NetSession.open(socketPath: path, device: "n0", queueDepth: 8)
        let b = try #require(try s.transmitBuffer())
        #expect(s.freeTransmitBuffers == 7)
        #expect(throws: SessionError.self) { try s.send(b.index, length: 13) }
        #expect(throws: SessionError.self) { try s.send(b.index, length: Int(s.info.maxFrame) + 1) }
        #expect(throws: SessionError.self) { try s.send((b.index + 1) % 8, length: 60) }  // not handed out
        #expect(throws: SessionError.self) { try s.send(8, length: 60) }
        try s.discard(b.index)
        #expect(s.freeTransmitBuffers == 8)
        #expect(throws: SessionError.self) { try s.send(b.index, length: 60) }  // given back
        #expect(throws: SessionError.self) { try s.discard(b.index) }
        // A burst stops at a bad length, after sending what came before it.
        var k = 0
        let mac = s.info.mac
        #expect(throws: SessionError.self) {
            _ = try s.transmit(max: 4) { b in
                k += 1
                Self.writeFrame(b.pointer, length: 60, seq: UInt32(k), mac: mac)
                return k == 3 ? 5000 : 60
            }
        }
        #expect(s.framesSent == 2 && s.freeTransmitBuffers + s.transmitInFlight == 8)
        try Self.receive(&s, count: 2) { _ in }
        #expect(s.strayEntries == 0)
    }

    /// The client checks the answer before it sizes anything by it: the class, the depth it
    /// asked for, a data region that holds its buffers, buffers that hold the port's largest
    /// frame. And the double, as the manager, refuses what a net port does not serve.
    @Test func theOpenAnswerIsChecked() throws {
        let cases: [(String, @Sendable (SessionOpened) -> SessionOpened)] = [
            ("class", { o in var o = o; o.classInfo = .block(BlockInfo(blockSize: 512, blockCount: 8, maxTransfer: 4096, flags: [])); return o }),
            ("depth", { o in var o = o; o.queueDepth *= 2; return o }),
            ("data", { o in var o = o; o.dataBytes = 4096; return o }),
            ("mtu", { o in var o = o; o.classInfo = .net(NetInfo(mac: MACAddress(rawValue: 2), mtu: 9000)); return o }),
        ]
        for (what, answer) in cases {
            let path = Self.socketPath()
            let port = try NetPortDouble(socketPath: path, answer: answer)
            do {
                _ = try NetSession.open(socketPath: path, device: "n0", queueDepth: 16)
                Issue.record("an answer with another \(what) was taken")
            } catch {
                guard case .protocolError = error else { Issue.record("\(what): \(error)"); continue }
            }
            try port.stop()
        }
        #expect(throws: SessionError.self) { _ = try NetSession.open(socketPath: Self.socketPath(), device: "n0", queueDepth: 3) }
        #expect(throws: SessionError.self) { _ = try NetSession.open(socketPath: Self.socketPath(), device: "n0", bufferBytes: 32) }
        let path = Self.socketPath()
        let port = try NetPortDouble(socketPath: path)
        defer { try? port.stop() }
        // A block client on a net port, and a second session on a port that has one.
        do {
            _ = try BlockSession.open(socketPath: path, device: "n0", writable: true, dataBytes: 4096, queueDepth: 2)
            Issue.record("a block session on a net port")
        } catch {
            guard case .refused(.invalidArgument, _) = error else { Issue.record("\(error)"); return }
        }
        let s = try NetSession.open(socketPath: path, device: "n0", queueDepth: 16)
        do {
            _ = try NetSession.open(socketPath: path, device: "n0", queueDepth: 16)
            Issue.record("a second session on a net port")
        } catch {
            guard case .refused(.busy, _) = error else { Issue.record("\(error)"); return }
        }
        #expect(s.info.mtu == 1500)
    }

    /// A hostile driver's rxActive entries: foreign offsets (misaligned, in the transmit
    /// area, past the region, at the end of the address space), wrong cookies, a buffer
    /// delivered twice, lengths over the buffer or under a header. Each is skipped and
    /// counted; only the one good frame reaches the closure; every buffer the driver named
    /// correctly comes back to it exactly once (a duplicate never puts a buffer out twice);
    /// the session goes on echoing.
    @Test func hostileReceiveEntriesAreCountedAndIgnored() throws {
        let path = Self.socketPath()
        let port = try NetPortDouble(socketPath: path)
        defer { try? port.stop() }
        let depth = 16, size = 2048
        var s = try NetSession.open(socketPath: path, device: "n0", queueDepth: depth, bufferBytes: size)
        try port.waitForSession()
        let mac = s.info.mac
        let entries: [BufferDescriptor] = try port.withPort { p in
            p.echoing = false
            let b = p.takeReceiveBuffer()!, b2 = p.takeReceiveBuffer()!, b3 = p.takeReceiveBuffer()!
            // The good frame: written into b as a driver would.
            Self.writeFrame(p.endpoint.data.base + Int(b.offset.rawValue), length: 100, seq: 7, mac: mac)
            func d(_ offset: UInt64, _ length: UInt32, _ cookie: UInt32) -> BufferDescriptor {
                BufferDescriptor(offset: RegionOffset(rawValue: offset), length: length, cookie: cookie)
            }
            let o = b.offset.rawValue
            return [
                d(o + 1, 100, b.cookie),                       // misaligned
                d(UInt64(depth * size), 100, 0),               // a transmit buffer
                d(UInt64(2 * depth * size) + 4096, 100, 0),    // past the region
                d(UInt64.max - 10, 100, b.cookie),             // the end of the address space
                d(o, 100, b.cookie ^ 1),                       // another buffer's cookie
                d(o, 100, 0xFFFF_FFFF),                        // no buffer's cookie
                d(o, 100, b.cookie),                           // good
                d(o, 100, b.cookie),                           // the same buffer again
                d(b2.offset.rawValue, UInt32(size + 1), b2.cookie),  // longer than the buffer
                d(b3.offset.rawValue, 5, b3.cookie),           // shorter than a header
            ]
        }
        try port.withPort { p in p.deliverRaw(entries) }
        var frames: [String?] = []
        var seen = 0
        let deadline = Clock.monotonicNanoseconds + UInt64(testDeadlineSeconds * 1e9)
        // Wait until every entry was looked at (the good one delivered, 9 counted).
        while s.strayEntries + s.framesReceived < UInt64(entries.count) {
            guard Clock.monotonicNanoseconds < deadline else { throw DeadlinePassed("the hostile entries", seconds: testDeadlineSeconds) }
            seen += try s.receive(max: 4) { f in
                // The driver wrote the frame as sent (no echo swap): check it as sent.
                frames.append(f.count == 100 && MACAddress(bytes: f.baseAddress! + 6) == mac
                              && f.loadUnaligned(fromByteOffset: 14, as: UInt32.self) == UInt32(7).bigEndian ? nil : "the good frame was altered")
            }
            if s.strayEntries + s.framesReceived < UInt64(entries.count) { try s.wait(timeoutMilliseconds: 100) }
        }
        #expect(seen == 1 && frames.count == 1 && frames[0] == nil)
        #expect(s.strayEntries == 9 && s.framesReceived == 1)
        // b, b2 and b3 came back once each: the driver holds every buffer exactly once.
        let cookies: [UInt32] = try port.withPort { p in
            p.collectReceiveBuffers()
            return p.receiveBuffers.map(\.cookie).sorted()
        }
        #expect(cookies == (0..<UInt32(depth)).map { $0 }, "the driver holds \(cookies)")
        // The session goes on.
        try port.withPort { p in p.echoing = true }
        let b = try Self.buffer(&s)
        Self.writeFrame(b.pointer, length: 60, seq: 1, mac: mac)
        try s.send(b.index, length: 60)
        try s.flush()
        var failure: String? = "nothing came"
        try Self.receive(&s, count: 1) { f in failure = Self.checkEcho(f, length: 60, seq: 1, mac: mac) }
        #expect(failure == nil)
        #expect(s.strayEntries == 9)
    }

    /// A hostile driver's txFree entries: a buffer of the receive area, another buffer's
    /// cookie, one returned twice, one that was never sent. Each is skipped and counted;
    /// only buffers that were out come back free.
    @Test func hostileTransmitReturnsAreCountedAndIgnored() throws {
        let path = Self.socketPath()
        let port = try NetPortDouble(socketPath: path)
        defer { try? port.stop() }
        var s = try NetSession.open(socketPath: path, device: "n0", queueDepth: 8)
        try port.waitForSession()
        try port.withPort { p in p.echoing = false }
        for k in 0..<2 {
            let b = try #require(try s.transmitBuffer())
            Self.writeFrame(b.pointer, length: 60, seq: UInt32(k), mac: s.info.mac)
            try s.send(b.index, length: 60)
        }
        try s.flush()
        #expect(s.transmitInFlight == 2 && s.freeTransmitBuffers == 6)
        let frames = try port.withPort { p in p.takeFrames(max: 2) }
        try #require(frames.count == 2)
        let (f0, f1) = (frames[0], frames[1])
        let unsent = (0..<UInt32(8)).first { $0 != f0.cookie && $0 != f1.cookie }!
        try port.withPort { p in
            p.releaseRaw([
                BufferDescriptor(offset: RegionOffset(rawValue: UInt64(f0.cookie) * 2048), length: 60, cookie: f0.cookie),  // rx area
                BufferDescriptor(offset: f1.offset, length: 60, cookie: f0.cookie),  // f1's buffer, f0's cookie
                f0, f0,  // twice
                BufferDescriptor(offset: RegionOffset(rawValue: UInt64(8 + unsent) * 2048), length: 60, cookie: unsent),  // never sent
            ])
        }
        var back = 0
        let deadline = Clock.monotonicNanoseconds + UInt64(testDeadlineSeconds * 1e9)
        while s.strayEntries + UInt64(back) < 5 {
            guard Clock.monotonicNanoseconds < deadline else { throw DeadlinePassed("the hostile returns", seconds: testDeadlineSeconds) }
            back += try s.reclaimTransmitBuffers()
        }
        #expect(back == 1 && s.strayEntries == 4)
        #expect(s.transmitInFlight == 1 && s.freeTransmitBuffers == 7)
        try port.withPort { p in p.releaseRaw([f1]) }
        while s.transmitInFlight > 0 && Clock.monotonicNanoseconds < deadline { try s.reclaimTransmitBuffers() }
        #expect(s.transmitInFlight == 0 && s.freeTransmitBuffers == 8 && s.strayEntries == 4)
        #expect(s.framesReceived == 0)
    }

    /// The driver is replaced, as the manager does it (new queues on the control socket,
    /// the new generation on the header page, the doorbell): the client takes the new
    /// queues, gives every receive buffer to the new driver, and drops the frames that were
    /// out for transmission (taken by the old driver or still on its queue), whose buffers
    /// are free again; a frame sent but not flushed goes to the new driver; traffic goes on.
    @Test func recoveryRepostsReceiveBuffersAndDropsTransmitsInFlight() throws {
        let path = Self.socketPath()
        let port = try NetPortDouble(socketPath: path)
        defer { try? port.stop() }
        let depth = 16
        var s = try NetSession.open(socketPath: path, device: "n0", queueDepth: depth)
        try port.waitForSession()
        let mac = s.info.mac
        try port.withPort { p in p.echoing = false }
        for k in 0..<5 {
            let b = try #require(try s.transmitBuffer())
            Self.writeFrame(b.pointer, length: 60 + k, seq: UInt32(k), mac: mac)
            try s.send(b.index, length: 60 + k)
        }
        try s.flush()
        // The old driver took three of the five, and some receive buffers.
        try port.withPort { p in
            #expect(p.takeFrames(max: 3).count == 3)
            _ = p.takeReceiveBuffer()
        }
        // One more, sent but not flushed.
        let staged = try #require(try s.transmitBuffer())
        Self.writeFrame(staged.pointer, length: 200, seq: 99, mac: mac)
        try s.send(staged.index, length: 200)
        #expect(s.transmitInFlight == 5 && s.freeTransmitBuffers == depth - 6)
        try port.withPort { p in try p.replaceQueues() }
        // The next call sees the new generation.
        #expect(try s.reclaimTransmitBuffers() == 0)
        #expect(s.recoveries == 1 && s.generation == 2)
        #expect(s.txDroppedInRecovery == 5 && s.transmitInFlight == 0 && s.freeTransmitBuffers == depth - 1)
        // Every receive buffer is at the new driver, once.
        let cookies: [UInt32] = try port.withPort { p in
            p.collectReceiveBuffers()
            return p.receiveBuffers.map(\.cookie).sorted()
        }
        #expect(cookies == (0..<UInt32(depth)).map { $0 })
        // The staged frame goes to the new driver, and comes back unaltered.
        try port.withPort { p in p.echoing = true }
        try s.flush()
        var failure: String? = "nothing came"
        try Self.receive(&s, count: 1) { f in failure = Self.checkEcho(f, length: 200, seq: 99, mac: mac) }
        #expect(failure == nil)
        // Traffic goes on, and the stale frames never show up.
        var failures: [String] = []
        for k in 0..<64 {
            let b = try Self.buffer(&s)
            Self.writeFrame(b.pointer, length: 1000, seq: UInt32(1000 + k), mac: mac)
            try s.send(b.index, length: 1000)
            try s.flush()
            try Self.receive(&s, count: 1) { f in
                if let e = Self.checkEcho(f, length: 1000, seq: UInt32(1000 + k), mac: mac) { failures.append(e) }
            }
        }
        #expect(failures.isEmpty, "\(failures.prefix(3))")
        #expect(s.strayEntries == 0 && s.recoveries == 1)
        // A second replacement while idle: caught by a waiting client (the doorbell wakes it).
        try port.withPort { p in try p.replaceQueues() }
        try s.wait(timeoutMilliseconds: 5000)
        #expect(s.recoveries == 2 && s.generation == 3 && s.txDroppedInRecovery == 5)
    }

    /// For a caller's own event loop: armed, the session's descriptor becomes readable when
    /// a frame arrives, and, when it is out of transmit buffers, when one comes back; after
    /// `disarm` the work is there. Arming with work waiting says so instead.
    @Test func thePollDescriptorWakesAnEventLoop() throws {
        let path = Self.socketPath()
        let port = try NetPortDouble(socketPath: path)
        defer { try? port.stop() }
        let depth = 4
        var s = try NetSession.open(socketPath: path, device: "n0", queueDepth: depth)
        try port.waitForSession()
        let mac = s.info.mac
        try port.withPort { p in p.echoing = false }
        #expect(s.pollDescriptor >= 0)
        func pollReadable() -> Bool {
            var pfd = pollfd(fd: s.pollDescriptor, events: Int16(POLLIN), revents: 0)
            return poll(&pfd, 1, Int32(testDeadlineSeconds * 1000)) == 1
        }
        // Out of transmit buffers: every one is out at the driver.
        for k in 0..<depth {
            let b = try #require(try s.transmitBuffer())
            Self.writeFrame(b.pointer, length: 60, seq: UInt32(k), mac: mac)
            try s.send(b.index, length: 60)
        }
        #expect(try s.transmitBuffer() == nil)
        #expect(try s.armWakeUp())  // flushes, then asks for rx and txFree doorbells
        #expect(s.transmitInFlight == depth)
        let frames = try port.withPort { p in p.takeFrames(max: depth) }
        #expect(frames.count == depth)
        try port.withPort { p in p.releaseRaw([frames[0]]) }
        #expect(pollReadable(), "a transmit buffer came back and the descriptor stayed quiet")
        try s.disarm()
        #expect(try s.reclaimTransmitBuffers() == 1)
        // A frame arrives.
        #expect(try s.armWakeUp())
        try port.withPort { p in
            let rx = p.takeReceiveBuffer()!
            Self.writeFrame(p.endpoint.data.base + Int(rx.offset.rawValue), length: 64, seq: 5, mac: mac)
            p.deliverRaw([BufferDescriptor(offset: rx.offset, length: 64, cookie: rx.cookie)])
        }
        #expect(pollReadable(), "a frame arrived and the descriptor stayed quiet")
        try s.disarm()
        // Work waiting: arming says so.
        #expect(try s.armWakeUp() == false)
        var lengths: [Int] = []
        #expect(try s.receive { f in lengths.append(f.count) } == 1)
        #expect(lengths == [64])
        try port.withPort { p in p.releaseRaw(Array(frames[1...])) }
        let deadline = Clock.monotonicNanoseconds + UInt64(testDeadlineSeconds * 1e9)
        while s.transmitInFlight > 0 && Clock.monotonicNanoseconds < deadline { try s.reclaimTransmitBuffers() }
        #expect(s.transmitInFlight == 0 && s.strayEntries == 0)
    }

    /// The device fails: the manager publishes `failed` and says why; the client's next call
    /// throws that instead of waiting.
    @Test func aFailedPortEndsTheSessionWithItsReason() throws {
        let path = Self.socketPath()
        let port = try NetPortDouble(socketPath: path)
        defer { try? port.stop() }
        var s = try NetSession.open(socketPath: path, device: "n0", queueDepth: 8)
        try port.waitForSession()
        try port.withPort { p in p.fail(reason: "device 'n0' failed: test") }
        #expect(throws: SessionError.failed("device 'n0' failed: test")) { _ = try s.receive { _ in } }
    }
}
