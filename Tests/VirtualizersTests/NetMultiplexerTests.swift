import Foundation
import Outboard
import OutboardRings
import OutboardSession
import OutboardSystem
import OutboardTestSupport
import Testing
import Virtualizers

/// The network multiplexer against a real dpdk-testpmd and the real manager with its
/// sandboxed virtio-net driver: macswap sends every frame back to its source MAC, so each
/// client's frames come back to it, and only to it, through the multiplexer.
@Suite(.serialized) struct NetMultiplexerTests {
    /// Several clients at once, each getting back exactly its own frames, verified; the
    /// frames a client reads are all addressed to it.
    @Test func eachClientGetsOnlyItsOwnFrames() throws {
        let f = try NetFixture()
        let mux = try MuxBox(f, clients: 4)
        defer { mux.stop() }
        let ports = try (0..<4).map { _ in try ClientPort(mux.path) }
        #expect(Set(ports.map(\.mac)).count == 4)
        for (k, p) in ports.enumerated() {
            #expect(p.mac == NetMultiplexer.clientMAC(upstream: NetFixture.mac, slot: k) && p.session.info.mtu == 1500)
        }
        try pump(ports, count: 1000, sizes: [60, 64, 511, 1514, 1518])
        for p in ports {
            #expect(p.damaged == 0 && p.seen.count == 1000, "\(p.mac): \(p.seen.count) of 1000 back, \(p.damaged) not its own or damaged")
            #expect(p.session.strayEntries == 0)
        }
        let s = mux.stop()
        for c in s.clients.prefix(4) {
            #expect(c.rxDelivered == 1000 && c.txSent == 1000 && c.txSpoofed == 0 && c.rxNotReading == 0, "\(c)")
        }
        #expect(s.rxNoClient == 0)
    }

    /// Two ports wired together by testpmd (io forwarding): a peer on the other port sends
    /// unicast frames to one client, a broadcast and a multicast frame (every client gets
    /// those), and a frame to nobody's MAC (counted, delivered to no one); a client's frame
    /// reaches the peer with the client's MAC.
    @Test func broadcastAndMulticastReachEveryClient() throws {
        let f = try NetFixture(ports: 2, forwardMode: "io")
        let mux = try MuxBox(f, clients: 3)
        defer { mux.stop() }
        let ports = try (0..<3).map { _ in try ClientPort(mux.path) }
        var peer = try f.open(depth: 64, port: 1)
        // The wire is up both ways once a frame has crossed each way (until both drivers
        // have posted receive buffers, testpmd drops what it forwards); every client's
        // frame reaches the peer from the client's MAC.
        try ports[0].exchange(with: &peer)
        for p in ports {
            let from = try p.sendUntilReceived(by: &peer)
            #expect(from == p.mac)
        }
        let multicast = MACAddress("01:00:5e:00:00:fb")!
        let destinations = [MACAddress.broadcast, multicast, ports[1].mac, MACAddress("02:00:00:00:77:77")!]
        var next = 0
        let sent = try peer.transmit(max: destinations.count) { b in
            let d = destinations[next]
            writeFrame(b.pointer, length: 128, source: NetFixture.mac(1), sequence: UInt32(next))
            d.store(to: b.pointer)
            next += 1
            return 128
        }
        #expect(sent == 4)
        // Every client: the broadcast and the multicast frame; client 1 also its own.
        for (k, p) in ports.enumerated() {
            let want = k == 1 ? 3 : 2
            let got = try p.collect(count: want)
            #expect(got.map(\.destination).sorted { $0.rawValue < $1.rawValue }
                    == (k == 1 ? [ports[1].mac, multicast, .broadcast] : [multicast, .broadcast]).sorted { $0.rawValue < $1.rawValue },
                    "client \(k) got \(got)")
            #expect(got.allSatisfy { $0.source == NetFixture.mac(1) })
        }
        // Nothing else arrived anywhere.
        for p in ports { #expect(try p.collect(count: 0, settleMilliseconds: 200).isEmpty) }
        let s = mux.stop()
        #expect(s.rxNoClient == 1, "\(s)")
    }

    /// A frame for 00:00:00:00:00:00 from the wire, with a slot free that served a client
    /// (whose receive buffers the multiplexer held) and one never used: it is nobody's, no
    /// free slot is taken for the address, and the client still there gets only its own.
    @Test func aFrameForTheZeroAddressReachesNobody() throws {
        let f = try NetFixture(ports: 2, forwardMode: "io")
        let mux = try MuxBox(f, clients: 3)
        defer { mux.stop() }
        let a = try ClientPort(mux.path)
        var b: ClientPort? = try ClientPort(mux.path)
        var peer = try f.open(depth: 64, port: 1)
        try a.exchange(with: &peer)
        // b has had a frame: the multiplexer holds b's receive buffers when b goes.
        try b!.exchange(with: &peer)
        b = nil
        try mux.waitFor("client 1's session closed") { !$0.clients[1].connected }
        var next = 0
        let sent = try peer.transmit(max: 2) { p in
            writeFrame(p.pointer, length: 128, source: NetFixture.mac(1), sequence: UInt32(next))
            (next == 0 ? MACAddress(rawValue: 0) : a.mac).store(to: p.pointer)
            next += 1
            return 128
        }
        #expect(sent == 2)
        let got = try a.collect(count: 1, settleMilliseconds: 200)
        #expect(got.map(\.destination) == [a.mac], "\(got)")
        try mux.waitFor("the zero-address frame counted") { $0.rxNoClient >= 1 }
        let s = mux.stop()
        #expect(s.rxNoClient == 1 && s.clients[1].rxDelivered == 1 && s.clients[2].sessions == 0, "\(s)")
    }

    /// An idle multiplexer sleeps: with a client connected and nothing moving, its thread
    /// uses well under a tenth of a CPU over a second (a loop that polled would use it all).
    @Test func anIdleMultiplexerSleeps() throws {
        let f = try NetFixture()
        let mux = try MuxBox(f, clients: 2)
        defer { mux.stop() }
        let p = try ClientPort(mux.path)
        try pump([p], count: 50, sizes: [64])
        let cpu = mux.cpuNanoseconds, wall = Clock.monotonicNanoseconds
        usleep(1_000_000)  // the window measured
        let used = mux.cpuNanoseconds - cpu, elapsed = Clock.monotonicNanoseconds - wall
        print("net mux: idle with a client, \(used / 1000) us of CPU in \(elapsed / 1000) us")
        #expect(used * 10 < elapsed, "the idle multiplexer used \(used / 1000) us of CPU in \(elapsed / 1000) us")
    }

    /// The manager dies (SIGKILL): the upstream session's connection is gone for good, so
    /// `serve` (asked to serve for ever) throws instead of waking on the dead connection
    /// again and again, and the client's session fails.
    @Test func theManagerGoneEndsTheClients() throws {
        let f = try NetFixture()
        let mux = try MuxBox(f, clients: 2, milliseconds: .max)
        let p = try ClientPort(mux.path)
        try pump([p], count: 50, sizes: [64])
        try f.manager.kill()
        let failure = try mux.awaitFailure()
        guard case .failed = failure else {
            Issue.record("serve threw \(failure)")
            return
        }
        let deadline = Date().addingTimeInterval(testDeadlineSeconds)
        var ended: SessionError? = nil
        while ended == nil && Date() < deadline {
            do { try p.session.wait(timeoutMilliseconds: 100) } catch { ended = error }
        }
        guard case .failed(let reason) = ended else {
            Issue.record("the client's session did not fail: \(String(describing: ended))")
            return
        }
        #expect(reason.contains("the port failed"), "\(reason)")
    }

    /// Clients that come and go, closing, being dropped for a bad entry, or never sending
    /// their open request, leave no descriptor behind in the multiplexer's process.
    @Test func clientsComingAndGoingLeaveNoDescriptors() throws {
        let f = try NetFixture()
        let mux = try MuxBox(f, clients: 2)
        defer { mux.stop() }
        let keep = try ClientPort(mux.path)
        try pump([keep], count: 20, sizes: [64])
        func descriptors() throws -> Int { try FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count }
        let before = try descriptors()
        for round in 0..<20 {
            do {
                let p = try ClientPort(mux.path)
                try pump([p], count: 5, sizes: [64], first: UInt32(round * 10))
            }
            var c = try RawClient(mux.path)
            try c.send(BufferDescriptor(offset: RegionOffset(1 << 30), length: 64, cookie: 0))
            #expect(try c.awaitFailure() != nil)
            _ = try UnixSocket.connect(path: mux.path)  // closed at once, with no open request
        }
        try mux.waitFor("every session but one ended, the silent connections refused") { s in
            s.clients.filter(\.connected).count == 1 && s.clients[1].sessions == 40 && s.refused == 20
        }
        let after = try descriptors()
        #expect(after == before, "\(after - before) descriptors more after 40 sessions")
    }

    /// Raw clients of depth 2 that hand the multiplexer a third buffer while it holds their
    /// two (receive buffers it keeps for frames; sent frames back on a txFree the client
    /// never reads) lose their sessions for it, counted in `strayEntries`, and a good client
    /// round-trips meanwhile.
    @Test func moreBuffersThanTheDepthEndTheSession() throws {
        let f = try NetFixture()
        let mux = try MuxBox(f, clients: 2)
        defer { mux.stop() }
        let good = try ClientPort(mux.path)
        var rx = try RawClient(mux.path)
        try rx.post(BufferDescriptor(offset: RegionOffset(0), length: 2048, cookie: 0))
        try rx.post(BufferDescriptor(offset: RegionOffset(2048), length: 2048, cookie: 1))
        try rx.awaitTaken(txActive: false, 2)
        try rx.post(BufferDescriptor(offset: RegionOffset(4096), length: 2048, cookie: 2))
        let rxReason = try rx.awaitFailure()
        #expect(rxReason?.contains("more receive buffers than the queue depth") == true, "\(String(describing: rxReason))")
        try pump([good], count: 100, sizes: [64, 1518])
        var tx = try RawClient(mux.path)
        try tx.send(BufferDescriptor(offset: RegionOffset(0), length: 64, cookie: 0))
        try tx.send(BufferDescriptor(offset: RegionOffset(2048), length: 64, cookie: 1))
        try tx.awaitTaken(txActive: true, 2)
        try tx.send(BufferDescriptor(offset: RegionOffset(4096), length: 64, cookie: 2))
        let txReason = try tx.awaitFailure()
        #expect(txReason?.contains("more frames than the queue depth") == true, "\(String(describing: txReason))")
        try pump([good], count: 100, sizes: [64, 1518], first: 1000)
        #expect(good.seen.count == 200 && good.damaged == 0)
        let s = mux.stop()
        #expect(s.clients[1].sessions == 2 && s.clients[1].strayEntries == 2, "\(s.clients[1])")
    }

    /// A client sending with another client's source MAC: those frames are dropped and
    /// counted at the multiplexer (had they gone out, macswap would have returned them to
    /// the other client), and the other client's traffic is untouched.
    @Test func spoofedFramesAreDroppedAndCounted() throws {
        let f = try NetFixture()
        let mux = try MuxBox(f, clients: 2)
        defer { mux.stop() }
        let a = try ClientPort(mux.path)
        let b = try ClientPort(mux.path)
        var spoofed = 0
        while spoofed < 200 {
            spoofed += try a.session.transmit(max: min(16, 200 - spoofed)) { t in
                writeFrame(t.pointer, length: 64, source: b.mac, sequence: 50_000 + UInt32(spoofed))
                return 64
            }
            _ = try a.session.reclaimTransmitBuffers()
        }
        try mux.waitFor("200 spoofed frames counted") { $0.clients[0].txSpoofed == 200 }
        try pump([b, a], count: 300, sizes: [64, 1518])
        #expect(b.seen.count == 300 && b.damaged == 0, "b: \(b.seen.count) of 300, \(b.damaged) damaged or not its own")
        #expect(a.seen.count == 300 && a.damaged == 0)
        let s = mux.stop()
        #expect(s.clients[0].txSpoofed == 200 && s.clients[0].txSent == 300, "\(s.clients[0])")
        #expect(s.clients[1].txSpoofed == 0 && s.clients[1].rxDelivered == 300, "\(s.clients[1])")
    }

    /// Hostile clients cannot stop another client's traffic: one that stops reading loses
    /// its own frames (counted); raw clients that write an entry outside their region, a
    /// receive buffer too small for a frame, or an index that jumps past their queue lose
    /// their sessions with the reason, and the good client round-trips throughout.
    @Test func hostileClientsDisturbNobodyElse() throws {
        let f = try NetFixture()
        let mux = try MuxBox(f, clients: 6)
        defer { mux.stop() }
        let good = try ClientPort(mux.path)
        let deaf = try ClientPort(mux.path)
        // The deaf client sends three times its receive buffers' worth and never reads.
        var sent = 0, expected = 0
        while sent < 3 * 32 {
            let mac = deaf.mac
            sent += try deaf.session.transmit(max: 16) { t in
                writeFrame(t.pointer, length: 64, source: mac, sequence: UInt32(sent))
                return 64
            }
            try pump([good], count: 20, sizes: [64], first: 1000 + UInt32(expected))
            expected += 20
        }
        try mux.waitFor("the deaf client's losses") { $0.clients[1].rxNotReading >= 32 }
        try pump([good], count: 500, sizes: [64, 1518], first: 100_000)
        expected += 500
        #expect(good.damaged == 0)
        let hostile: [(String, (inout RawClient) throws -> Void)] = [
            ("a frame outside its region", { c in try c.send(BufferDescriptor(offset: RegionOffset(1 << 30), length: 64, cookie: 0)) }),
            ("a frame of 3 bytes", { c in try c.send(BufferDescriptor(offset: RegionOffset(0), length: 3, cookie: 0)) }),
            ("a receive buffer too small", { c in try c.post(BufferDescriptor(offset: RegionOffset(0), length: 100, cookie: 0)) }),
            ("a tail index past the queue", { c in try c.writeTail(txActive: true, 1000) }),
        ]
        for (what, act) in hostile {
            var c = try RawClient(mux.path)
            try act(&c)
            let reason = try c.awaitFailure()
            #expect(reason != nil, "a client that wrote \(what) kept its session")
            try pump([good], count: 200, sizes: [64, 1518], first: 200_000 + UInt32(expected))
            expected += 200
        }
        #expect(good.damaged == 0 && good.session.strayEntries == 0)
        #expect(good.seen.count == expected, "good client: \(good.seen.count) of \(expected) back")
        let s = mux.stop()
        #expect(s.clients[1].rxNotReading >= 32 && s.clients[0].rxNotReading == 0, "\(s.clients[0]) \(s.clients[1])")
        let drops = s.clients.compactMap(\.lastDrop)
        #expect(drops.count == 1 && s.clients[2].strayEntries == 4, "\(s.clients[2]): \(drops)")
    }

    /// More clients than the device has memory slots (testpmd: 8): the clients' memory is
    /// never the device's, so ten clients all round-trip through the one upstream session.
    @Test func moreClientsThanTheDeviceHasMemorySlots() throws {
        let f = try NetFixture()
        let mux = try MuxBox(f, clients: 10)
        defer { mux.stop() }
        var opens: [Double] = []
        let ports = try (0..<10).map { _ in
            let t = Date()
            defer { opens.append(Date().timeIntervalSince(t) * 1000) }
            return try ClientPort(mux.path)
        }
        print("net mux: client opens took \(opens.map { String(format: "%.1f", $0) }.joined(separator: " ")) ms")
        // Ten windows of 12: what is out stays well below the upstream's 256 receive buffers
        // (beyond them testpmd drops, as a wire would).
        try pump(ports, count: 300, sizes: [64, 1518], window: 12)
        let s = mux.stop()
        for (k, p) in ports.enumerated() {
            #expect(p.seen.count == 300 && p.damaged == 0, "\(p.mac): \(p.seen.count) of 300, \(p.damaged) damaged; \(s.clients[k])")
        }
        #expect(s.clients.allSatisfy { $0.rxDelivered == 300 && $0.txSent == 300 }, "\(s)")
    }

    /// The upstream driver is killed under traffic: the upstream session moves to the new
    /// driver by itself, the multiplexer keeps its clients, and their traffic resumes.
    @Test func clientTrafficResumesAfterTheDriverIsKilled() throws {
        let f = try NetFixture()
        let mux = try MuxBox(f, clients: 3)
        defer { mux.stop() }
        let ports = try (0..<3).map { _ in try ClientPort(mux.path) }
        try pump(ports, count: 300, sizes: [64, 1518])
        #expect(ports.allSatisfy { $0.seen.count == 300 })
        for p in ports { p.reset() }
        // Killed half-way through the traffic.
        var hit: (generation: UInt64, pid: Int32)? = nil
        try pump(ports, count: 600, sizes: [64, 1518], first: 10_000, seconds: 30) {
            hit = try f.manager.admin().injectFault(device: NetFixture.name(0), .kill)
        }
        #expect(hit != nil)
        try mux.waitFor("the upstream session's recovery") { $0.upstreamRecoveries >= 1 }
        for p in ports {
            // Frames out while no driver ran are lost, as on a wire: a few windows' worth.
            #expect(p.damaged == 0 && p.seen.count >= 450, "\(p.mac): \(p.seen.count) of 600 across the restart")
            p.reset()
        }
        try pump(ports, count: 200, sizes: [128], first: 20_000)
        for p in ports { #expect(p.seen.count == 200 && p.damaged == 0, "\(p.mac): \(p.seen.count) of 200 after recovery") }
        for p in ports { #expect(p.session.recoveries == 0, "a client saw the restart below: \(p.session.recoveries)") }
        let s = mux.stop()
        #expect(s.upstreamRecoveries >= 1 && s.clients.prefix(3).allSatisfy { $0.connected && $0.sessions == 1 && $0.lastDrop == nil },
                "\(s)")
        // The clients' sessions stay open until the counters are taken (Swift may end an
        // object's life at its last use).
        withExtendedLifetime(ports) {}
    }

    /// `outboard net mux` as a process: it prints the client MACs, serves a client that
    /// round-trips through it, and stops on SIGINT with its counters.
    @Test func theMuxCommandServesClients() throws {
        let f = try NetFixture()
        let path = f.directory + "/mux.sock"
        let process = Process()
        process.executableURL = URL(fileURLWithPath: try outboardExecutable())
        process.arguments = ["net", "mux", "--socket", f.manager.socketPath, "--device", NetFixture.name(0), "--listen", path,
                             "--clients", "2", "--interval", "0.2"]
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = FileHandle.nullDevice
        try process.run()
        defer { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }
        var s: NetSession = try NetSession.open(socketPath: path, device: NetFixture.name(0), queueDepth: 64,
                                                waitMilliseconds: Int(testDeadlineSeconds * 1000))
        #expect(s.info.mac == NetMultiplexer.clientMAC(upstream: NetFixture.mac, slot: 0))
        let r = try roundTrip(&s, count: 300, sizes: [64, 1518])
        #expect(r.seen.count == 300 && r.damaged == 0)
        kill(process.processIdentifier, SIGINT)
        let deadline = Date().addingTimeInterval(testDeadlineSeconds)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        #expect(!process.isRunning, "outboard net mux did not stop on SIGINT within \(testDeadlineSeconds) s")
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        let out = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(process.terminationStatus == 0, "\(out)")
        #expect(out.contains("client 0: \(s.info.mac)") && out.contains("client 1: "), "\(out)")
        #expect(out.contains("client 0 \(s.info.mac): rx 300") && out.contains("net mux: stopped"), "\(out)")
    }
}

// MARK: support

/// A multiplexer on the fixture's port 0, served by a thread of its own.
final class MuxBox: @unchecked Sendable {
    var mux: NetMultiplexer
    let path: String
    let lock = NSLock()
    let done = DispatchSemaphore(value: 0)
    var stopped = false
    var failure: SessionError?
    var snapshot: NetMultiplexer.Stats
    var final: NetMultiplexer.Stats?
    /// The serving thread's CPU time, as of its last return from `serve`.
    var cpu: UInt64 = 0
    /// How long each `serve` call is asked to run.
    let milliseconds: Int

    init(_ f: NetFixture, clients: Int, milliseconds: Int = 20) throws {
        self.milliseconds = milliseconds
        path = f.directory + "/mux-\(UInt32.random(in: 0...UInt32.max)).sock"
        mux = try NetMultiplexer(upstream: try f.open(depth: 256), socketPath: path,
                                 configuration: .init(deviceName: NetFixture.name(0), clients: clients))
        snapshot = mux.stats()
        let t = Thread { [self] in run() }
        t.start()
    }

    func run() {
        defer { done.signal() }
        while !lock.withLock({ stopped }) {
            do { try mux.serve(milliseconds: milliseconds) } catch {
                lock.withLock { failure = error }
                return
            }
            let s = mux.stats()
            var t = timespec()
            clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t)
            lock.withLock {
                snapshot = s
                cpu = UInt64(t.tv_sec) * 1_000_000_000 + UInt64(t.tv_nsec)
            }
        }
    }

    var stats: NetMultiplexer.Stats { lock.withLock { snapshot } }
    var cpuNanoseconds: UInt64 { lock.withLock { cpu } }

    /// Waits (up to the test deadline) for the loop to end with an error, and returns it.
    func awaitFailure() throws -> SessionError {
        guard done.wait(timeout: .now() + testDeadlineSeconds) == .success, let e = lock.withLock({ failure }) else {
            throw DeadlinePassed("the multiplexer's loop to fail", seconds: testDeadlineSeconds)
        }
        lock.withLock { stopped = true }
        return e
    }

    /// Waits (up to the test deadline) until `condition` holds of the counters.
    func waitFor(_ what: String, _ condition: (NetMultiplexer.Stats) -> Bool) throws {
        let deadline = Date().addingTimeInterval(testDeadlineSeconds)
        while !condition(stats) {
            guard Date() < deadline else { throw DeadlinePassed("\(what) (\(stats))", seconds: testDeadlineSeconds) }
            usleep(5000)
        }
    }

    /// Stops the loop, waits (up to the test deadline) for the thread to leave it (once),
    /// checks it did not fail, and returns the final counters.
    @discardableResult
    func stop() -> NetMultiplexer.Stats {
        let first = lock.withLock { () -> Bool in
            defer { stopped = true }
            return !stopped
        }
        if first {
            if done.wait(timeout: .now() + testDeadlineSeconds) != .success {
                Issue.record("the multiplexer's thread did not leave its loop within \(testDeadlineSeconds) s")
                return stats
            }
            if let e = lock.withLock({ failure }) { Issue.record("the multiplexer failed: \(e)") }
            final = mux.stats()
        }
        return final ?? stats
    }
}

/// One client of the multiplexer with what came back to it.
final class ClientPort {
    var session: NetSession
    var seen = Set<UInt32>()
    /// Frames that were damaged, or not addressed to this client.
    var damaged = 0
    /// Frames of this client's that came back whole but from an earlier `pump`.
    var late = 0
    var sent = 0
    var mac: MACAddress { session.info.mac }

    init(_ path: String) throws {
        session = try NetSession.open(socketPath: path, device: NetFixture.name(0), queueDepth: 32, waitMilliseconds: 5000)
    }

    func reset() {
        seen = []
        damaged = 0
        late = 0
        sent = 0
    }

    /// Sends frames to `peer` (the port's MAC 1), one each 100 ms, until one arrives there;
    /// returns its source MAC.
    func sendUntilReceived(by peer: inout NetSession) throws -> MACAddress {
        let mac = self.mac
        let deadline = Date().addingTimeInterval(testDeadlineSeconds)
        while Date() < deadline {
            _ = try session.transmit(max: 1) { b in
                writeFrame(b.pointer, length: 64, source: mac, sequence: 99)
                NetFixture.mac(1).store(to: b.pointer)
                return 64
            }
            var from: MACAddress? = nil
            let wait = Date().addingTimeInterval(0.1)
            while from == nil && Date() < wait {
                _ = try peer.receive { f in from = MACAddress(bytes: f.baseAddress! + 6) }
                if from == nil { try peer.wait(timeoutMilliseconds: 10) }
            }
            if let from { return from }
        }
        throw DeadlinePassed("a frame from \(mac) at the peer", seconds: testDeadlineSeconds)
    }

    /// Has `peer` send frames to this client, one each 100 ms, until one arrives, then
    /// drains what else came.
    func exchange(with peer: inout NetSession) throws {
        let mac = self.mac
        let deadline = Date().addingTimeInterval(testDeadlineSeconds)
        var got = 0
        while got == 0 {
            guard Date() < deadline else { throw DeadlinePassed("a frame from the peer at \(mac)", seconds: testDeadlineSeconds) }
            _ = try peer.transmit(max: 1) { b in
                writeFrame(b.pointer, length: 64, source: NetFixture.mac(1), sequence: 98)
                mac.store(to: b.pointer)
                return 64
            }
            got = try collect(count: 0, settleMilliseconds: 100).count
        }
    }

    /// Frames received within the deadline until `count` came, then for `settleMilliseconds`
    /// more (what else arrives): their addresses.
    func collect(count: Int, settleMilliseconds: Int = 0) throws -> [(destination: MACAddress, source: MACAddress)] {
        var got: [(destination: MACAddress, source: MACAddress)] = []
        let deadline = Date().addingTimeInterval(testDeadlineSeconds)
        while got.count < count {
            guard Date() < deadline else { throw DeadlinePassed("\(count - got.count) of \(count) frames at \(mac)", seconds: testDeadlineSeconds) }
            _ = try session.receive { f in got.append((MACAddress(bytes: f.baseAddress!), MACAddress(bytes: f.baseAddress! + 6))) }
            if got.count < count { try session.wait(timeoutMilliseconds: 100) }
        }
        let settle = Date().addingTimeInterval(Double(settleMilliseconds) / 1000)
        while Date() < settle {
            _ = try session.receive { f in got.append((MACAddress(bytes: f.baseAddress!), MACAddress(bytes: f.baseAddress! + 6))) }
            try session.wait(timeoutMilliseconds: 20)
        }
        return got
    }
}

/// Every client sends `count` frames (sequence numbers from `first`, at most `window` out
/// at once) and collects what comes back, all interleaved, until each has all back (or the
/// rest written off) or `seconds` passed. A frame that comes back damaged or addressed to
/// anyone else counts in `damaged`. Frames out for 300 ms with nothing coming back are
/// written off (lost while a driver restarted), so that the window opens again.
/// `halfWay` runs once, when half of all the frames are back.
func pump(_ ports: [ClientPort], count: Int, sizes: [Int], first: UInt32 = 0, seconds: Double = 15, window: Int = 24,
          halfWay: (() throws -> Void)? = nil) throws {
    var halfWay = halfWay
    for p in ports { p.sent = 0 }
    let start = ports.map(\.seen.count)
    var writtenOff = Array(repeating: 0, count: ports.count)
    var progress = Array(repeating: Date(), count: ports.count)
    let deadline = Date().addingTimeInterval(seconds)
    // All back, or all sent and the rest written off.
    func done(_ k: Int) -> Bool {
        let back = ports[k].seen.count - start[k]
        return back >= count || (ports[k].sent == count && back + writtenOff[k] >= count)
    }
    while !(0..<ports.count).allSatisfy(done) && Date() < deadline {
        var moved = false
        for (k, p) in ports.enumerated() where !done(k) {
            let back = p.seen.count - start[k]
            if Date().timeIntervalSince(progress[k]) > 0.3 {
                writtenOff[k] = p.sent - back
                progress[k] = Date()
            }
            let room = window - (p.sent - back - writtenOff[k])
            let mac = p.mac
            if p.sent < count && room > 0 {
                var next = p.sent
                p.sent += try p.session.transmit(max: min(16, count - p.sent, room)) { b in
                    let n = sizes[next % sizes.count]
                    writeFrame(b.pointer, length: n, source: mac, sequence: first + UInt32(next))
                    next += 1
                    return n
                }
            }
            let got = try p.session.receive(max: 32) { f in
                if let q = checkReturned(f, source: mac) {
                    // Another range: an earlier frame written off, come back late.
                    if q >= first && q < first + UInt32(count) { p.seen.insert(q) } else { p.late += 1 }
                } else {
                    p.damaged += 1
                }
            }
            if got > 0 {
                moved = true
                progress[k] = Date()
            }
        }
        if let h = halfWay, (0..<ports.count).reduce(0, { $0 + ports[$1].seen.count - start[$1] }) >= count * ports.count / 2 {
            halfWay = nil
            try h()
        }
        if !moved, let k = (0..<ports.count).first(where: { !done($0) }) { try ports[k].session.wait(timeoutMilliseconds: 5) }
    }
}

/// A client that speaks the session protocol by hand, to write what `NetSession` never
/// would: its queues are mapped and written directly.
struct RawClient: ~Copyable {
    let socket: UnixSocket
    let queues: SharedMapping
    let bell: Doorbell
    let layout: NetQueueLayout
    var txActive: QueueProducer<BufferDescriptor>
    var rxFree: QueueProducer<BufferDescriptor>

    init(_ path: String) throws {
        let s = try UnixSocket.connect(path: path)
        try s.send(.openSession(OpenSession(device: NetFixture.name(0), deviceClass: .net, writable: true, dataBytes: 2 * 2 * 2048,
                                            queueDepth: 2)))
        var d = try receiveControl(s)
        guard case .sessionOpened = d.message else { throw CommandRefused(description: "open refused: \(d.message)") }
        let l = try NetQueueLayout(queueDepth: 2)
        let q = try SharedRegion(adopting: d.take(1), minimumSize: l.byteCount).map(.readWrite)
        let b = Doorbell(adopting: d.take(3))
        let ta = try QueueProducer<BufferDescriptor>(memory: q.base, size: q.size, at: l.txActiveOffset, layout: l.queue)
        let rf = try QueueProducer<BufferDescriptor>(memory: q.base, size: q.size, at: l.rxFreeOffset, layout: l.queue)
        txActive = ta
        rxFree = rf
        socket = s
        queues = q
        bell = b
        layout = l
    }

    mutating func send(_ d: BufferDescriptor) throws {
        let ok = txActive.enqueue(d)
        #expect(ok)
        try bell.ring()
    }

    mutating func post(_ d: BufferDescriptor) throws {
        let ok = rxFree.enqueue(d)
        #expect(ok)
        try bell.ring()
    }

    /// Waits (up to the test deadline) until the multiplexer has taken `count` entries off
    /// txActive (or rxFree), all of what was there.
    mutating func awaitTaken(txActive: Bool, _ count: Int) throws {
        let deadline = Date().addingTimeInterval(testDeadlineSeconds)
        while (txActive ? self.txActive.freeSlots() : rxFree.freeSlots()) < count {
            guard Date() < deadline else { throw DeadlinePassed("the multiplexer to take \(count) entries", seconds: testDeadlineSeconds) }
            usleep(1000)
        }
    }

    func writeTail(txActive: Bool, _ value: UInt32) throws {
        let offset = (txActive ? layout.txActiveOffset : layout.rxFreeOffset) + QueueLayout.tailOffset
        (queues.base + offset).assumingMemoryBound(to: UInt32.self).pointee = value
        try bell.ring()
    }

    /// The multiplexer's `sessionFailed` reason, or nil if the session stayed open.
    func awaitFailure() throws -> String? {
        guard try socket.waitReadable(timeoutMilliseconds: Int(testDeadlineSeconds * 1000)) else { return nil }
        let d = try socket.receiveControl()
        guard case .sessionFailed(let reason) = d.message else { return nil }
        return reason
    }
}

struct CommandRefused: Error, CustomStringConvertible { let description: String }
