import Foundation
import Manager
import Outboard
import OutboardRings
import OutboardSession
import OutboardSystem
import OutboardTestSupport
import Testing

/// End to end: a real manager process, sandboxed driver processes, clients in this process.
@Suite(.serialized) struct ManagerTests {
    /// The driver tries to open a file, create a socket, exec a program, ptrace and signal
    /// other processes (and more, see Sandbox.probe); every attempt fails. It then still
    /// serves verified I/O.
    @Test func sandboxedDriverRefusesEscapesAndServesIO() throws {
        let m = try ManagerFixture(devices: "[\(memDevice("m0", extra: #""probe_sandbox": true"#))]")
        let d = try m.device("m0")
        let probes = Dictionary(uniqueKeysWithValues: d.probes.map { p -> (String, Int32) in
            let parts = p.split(separator: " ")
            return (String(parts[0]), Int32(parts[1])!)
        })
        for name in ["open-etc-passwd", "socket-inet-stream", "execve-bin-true", "ptrace-attach-parent", "kill-parent", "clone-fork",
                     "eventfd-create", "epoll-create", "membarrier-global-expedited"] {
            #expect(probes[name] != nil, "probe \(name) missing from \(d.probes)")
        }
        for (name, err) in probes {
            #expect(err == EPERM || err == EACCES, "sandbox probe \(name) got errno \(err): the attempt was not refused")
        }
        var w = VerifiedWorkload(session: try m.open("m0"), blocks: 512, seed: 7)
        try w.prepare()
        try w.run(operations: 3000)
        #expect(w.verifyErrors == 0, "\(w.firstError ?? "")")
        #expect(w.clientErrors == 0, "\(w.firstError ?? "")")
    }

    /// As many sessions as a device may allow (64), with an admin connection of the same
    /// uid open besides (the per-uid connection limit leaves room for both), each holding
    /// the descriptors of its queues, data region and doorbells in the driver: the manager
    /// gives the driver a descriptor limit that fits them (with the default of 64 the
    /// driver ran out after about a dozen, lost an attach's descriptors, and crash-looped
    /// the device).
    @Test func maximumSessionsFitTheDriversDescriptorLimit() throws {
        let m = try ManagerFixture(devices: "[\(memDevice("m0", limits: #"{"max_sessions": 64}"#))]")
        let admin = try m.admin()
        var open = Held<BlockSession>(capacity: 64)
        for _ in 0..<64 { open.append(try m.open("m0", dataBytes: 4096, depth: 2)) }
        for k in 0..<open.count { #expect(try open.with(k) { try io(&$0, .write, sector: UInt64(k * 8)) } == .ok) }
        #expect(try m.device("m0").restarts == 0)
        #expect(try admin.status().contains("\"m0\""))
    }

    /// One uid's connections are capped (here at the floor of 64: one device of 16
    /// sessions), and a connection over the cap gets a clear refusal before it is closed.
    @Test func connectionsPerUIDAreCappedWithAClearRefusal() throws {
        let m = try ManagerFixture(devices: "[\(memDevice("m0"))]")
        var held = Held<UnixSocket>(capacity: 70)
        for _ in 0..<70 { held.append(try UnixSocket.connect(path: m.socketPath)) }
        // The manager takes connections in order, so the last one is over the cap.
        let refusal = try held.with(69) { s -> ControlMessage? in
            guard try s.waitReadable(timeoutMilliseconds: 10_000) else { return nil }
            return try s.receiveControl().message
        }
        #expect(refusal == .failure(.limitExceeded, "too many connections"))
        // Below the cap, connections are served: the first one still gets a status report.
        let status = try held.with(0) { s -> ControlMessage in
            try s.send(.statusRequest)
            return try receiveControl(s, limit: ControlProtocol.maxReportBytes).message
        }
        guard case .statusReport = status else { Issue.record("expected a status report, got \(status)"); return }
    }

    /// Policy by SO_PEERCRED: no matching rule, or a read-only rule, refuses with a clear
    /// error and allocates nothing; a read-only session cannot write.
    @Test func policyDeniesAndLimitsAccess() throws {
        let m = try ManagerFixture(devices: """
            [\(memDevice("locked", access: #"[{"uid": 4242, "mode": "rw"}]"#)),
             \(memDevice("shared", access: #"[{"uid": 4242, "mode": "rw"}, {"uid": 0, "mode": "ro"}]"#))]
            """)
        do { _ = try m.open("locked"); Issue.record("opened a device the policy denies") } catch {
            guard case .refused(.permissionDenied, let message) = error else { Issue.record("wrong error \(error)"); return }
            #expect(message.contains("uid 0"))
        }
        do { _ = try m.open("shared", writable: true); Issue.record("opened read-write against a read-only rule") } catch {
            guard case .refused(.permissionDenied, _) = error else { Issue.record("wrong error \(error)"); return }
        }
        do { _ = try m.open("nonexistent"); Issue.record("opened a device that does not exist") } catch {
            guard case .refused(.unknownDevice, _) = error else { Issue.record("wrong error \(error)"); return }
        }
        #expect(try m.device("locked").registeredBytes == 0)
        #expect(try m.sessions().isEmpty)

        var s = try m.open("shared", writable: false)
        do { let st = try io(&s, .read, sector: 0); #expect(st == .ok) }
        do { let st = try io(&s, .write, sector: 0); #expect(st == .readOnly) }
        // Requests outside the device are refused per request; the session goes on.
        do { let st = try io(&s, .read, sector: UInt64(16 << 20) / 512); #expect(st == .invalid) }
        do { let st = try io(&s, .read, sector: 8); #expect(st == .ok) }
    }

    /// Limits on registered bytes, per session and per device, are clear errors; freeing a
    /// session frees its share.
    @Test func limitsOnRegisteredBytes() throws {
        let m = try ManagerFixture(devices: """
            [\(memDevice("m0", limits: #"{"max_session_bytes": 65536, "max_device_bytes": 131072, "max_sessions": 4}"#))]
            """)
        do { _ = try m.open("m0", dataBytes: 65536 + 4096); Issue.record("session limit not enforced") } catch {
            guard case .refused(.limitExceeded, let message) = error else { Issue.record("wrong error \(error)"); return }
            #expect(message.contains("per-session"))
        }
        var a: BlockSession? = try m.open("m0", dataBytes: 65536)
        let b = try m.open("m0", dataBytes: 65536)
        do { _ = try m.open("m0", dataBytes: 4096); Issue.record("device limit not enforced") } catch {
            guard case .refused(.limitExceeded, let message) = error else { Issue.record("wrong error \(error)"); return }
            #expect(message.contains("device limit"))
        }
        #expect(try m.device("m0").registeredBytes == 131072)
        #expect(a?.opened.dataBytes == 65536)
        a = nil  // closes the session
        try m.waitFor("the closed session's bytes to be released") { try m.device("m0").registeredBytes == 65536 }
        let c = try m.open("m0", dataBytes: 4096)
        #expect(c.opened.dataBytes == 4096 && b.opened.dataBytes == 65536)
        #expect(try m.device("m0").registeredBytes == 65536 + 4096)
    }

    /// Revocation with I/O in flight: a session closed while the driver holds its region in
    /// use stays "revoking" until the lease runs out (the request takes 3 s, the lease is
    /// 1 s); an idle session is revoked at once.
    @Test func revocationWaitsForInUseOrLeaseExpiry() throws {
        let m = try ManagerFixture(devices: """
            [\(memDevice("slow", extra: #""latency_us": 3000000"#)), \(memDevice("fast"))]
            """)
        var s: BlockSession? = try m.open("slow")
        _ = try s!.submit(.read, sector: 0, offset: 0, length: 4096)
        try m.waitFor("the driver to mark the region in use") {
            try m.sessions().first?["in_use"] as? Bool == true
        }
        s = nil  // the client goes away with its request in flight
        let during = try m.sessions()
        #expect(during.count == 1 && during[0]["revoking"] as? Bool == true,
                "the region was revoked while the driver had it in use: \(during)")
        try m.waitFor("revocation at lease expiry") { try m.sessions().isEmpty }
        #expect(try m.device("slow").revokedAtLeaseEnd == 1)
        #expect(try m.device("slow").revokedIdle == 0)

        var f: BlockSession? = try m.open("fast")
        do { let st = try io(&f!, .write, sector: 0); #expect(st == .ok) }
        f = nil
        try m.waitFor("idle revocation") { try m.device("fast").revokedIdle == 1 }
        #expect(try m.device("fast").revokedAtLeaseEnd == 0)
        #expect(try m.device("slow").state == "running")
    }

    /// Continuous verified I/O while the driver is killed, crashed, made to abort: every
    /// fault is recovered, nothing acknowledged is lost, no request fails.
    @Test func driverKilledDuringContinuousIO() throws {
        let m = try ManagerFixture(devices: "[\(memDevice("m0"))]")
        let admin = try m.admin()
        var w = VerifiedWorkload(session: try m.open("m0"), blocks: 1024, seed: 11)
        try w.prepare()
        for fault in [FaultKind.kill, .segfault, .abort, .kill] {
            let hit = try admin.injectFault(device: "m0", fault)
            try w.run { $0.lastCompletionGeneration > hit.generation }
            try w.run(operations: 300)
        }
        try w.finish()
        #expect(w.verifyErrors == 0, "\(w.firstError ?? "")")
        #expect(w.clientErrors == 0, "\(w.firstError ?? "")")
        // At least the four injected faults (a false hang detection on a loaded machine
        // would add one; it must be recovered from just the same).
        #expect(w.session.recoveries >= 4)
        let d = try m.device("m0")
        #expect(d.restarts >= 4)
        #expect(d.generation >= 5)
        #expect(d.state == "running")
    }

    /// A stopped driver still exists, so only the heartbeat can tell: it is found, killed
    /// and replaced, and the I/O it held is reissued.
    @Test func hungDriverIsReplaced() throws {
        let m = try ManagerFixture(devices: "[\(memDevice("m0"))]")
        var w = VerifiedWorkload(session: try m.open("m0"), blocks: 256, seed: 3)
        try w.prepare()
        let hit = try m.admin().injectFault(device: "m0", .hang)
        try w.run { $0.lastCompletionGeneration > hit.generation }
        try w.run(operations: 500)
        #expect(w.verifyErrors == 0, "\(w.firstError ?? "")")
        #expect(w.clientErrors == 0)
        let d = try m.device("m0")
        #expect(d.lastFailure?.contains("hung") == true, "last failure: \(d.lastFailure ?? "none")")
        #expect(d.pid != nil && Int32(d.pid!) != hit.pid)
    }

    /// A driver that keeps dying before it is healthy: after the crash-loop limit the
    /// device is failed, its clients get an error instead of hanging, and new opens are
    /// refused.
    /// A driver's exit status carries its classification (DriverExit): one that gives up
    /// on the device fails it at once, without a crash loop; one that asks for a restart
    /// is restarted as a crash is.
    @Test func theSupervisorActsOnTheDriversClassification() throws {
        let m = try ManagerFixture(
            devices: "[\(memDevice("gaveup", extra: #""test_exit_recovery": "fail-device""#)), \(memDevice("restart", extra: #""test_exit_recovery": "restart-driver""#))]",
            extra: #""restart": {"backoff_initial_ms": 5, "crash_loop_limit": 3, "healthy_after_ms": 600000}"#)
        try m.waitFor("the device whose driver gave up to be failed") { try m.device("gaveup").state == "failed" }
        let gaveUp = try m.device("gaveup")
        #expect(gaveUp.failures == 1 && gaveUp.restarts == 0, "failures \(gaveUp.failures) restarts \(gaveUp.restarts)")
        #expect(gaveUp.lastFailure?.contains("gave up") == true, "\(gaveUp.lastFailure ?? "")")
        do { _ = try m.open("gaveup"); Issue.record("opened a failed device") } catch {
            guard case .refused(.deviceFailed, _) = error else { Issue.record("wrong error \(error)"); return }
            #expect(error.recovery == .failDevice)
        }
        try m.waitFor("the restarting device to crash-loop") { try m.device("restart").state == "failed" }
        #expect(try m.device("restart").failures == 4)
    }

    @Test func crashLoopFailsTheDevice() throws {
        let m = try ManagerFixture(
            devices: "[\(memDevice("m0")), \(memDevice("dead", extra: #""test_exit_at_start": true"#))]",
            extra: #""restart": {"backoff_initial_ms": 5, "crash_loop_limit": 3, "healthy_after_ms": 600000}"#)
        try m.waitFor("the crash-looping device to be failed") { try m.device("dead").state == "failed" }
        #expect(try m.device("dead").failures == 4)
        do { _ = try m.open("dead"); Issue.record("opened a failed device") } catch {
            guard case .refused(.deviceFailed, _) = error else { Issue.record("wrong error \(error)"); return }
        }
        // A session on a device whose driver then crash-loops: kill it before it ever
        // becomes healthy (no I/O, healthy_after_ms far away), past the limit.
        var s = try m.open("m0")
        let admin = try m.admin()
        for _ in 0..<4 {
            try m.waitFor("the driver to be running") { try m.device("m0").state == "running" }
            let hit = try admin.injectFault(device: "m0", .kill)
            try m.waitFor("the driver to die") { try m.device("m0").generation > Int(hit.generation) }
        }
        try m.waitFor("device failed") { try m.device("m0").state == "failed" }
        do {
            _ = try io(&s, .read, sector: 0)
            Issue.record("I/O on a failed device did not fail")
        } catch {
            guard case .failed(let reason) = error else { Issue.record("wrong error \(error)"); return }
            #expect(reason.contains("failed"))
        }
    }

    /// Malformed, oversized, truncated, unknown and misdirected control messages close that
    /// connection with a reason; a session on another connection keeps working, and the
    /// manager keeps accepting.
    @Test func malformedControlMessagesAffectOnlyTheirConnection() throws {
        let m = try ManagerFixture(devices: "[\(memDevice("m0"))]")
        var good = try m.open("m0")
        do { let st = try io(&good, .write, sector: 8); #expect(st == .ok) }

        var valid = ControlMessage.openSession(OpenSession(device: "m0", deviceClass: .block, writable: true, dataBytes: 4096, queueDepth: 8)).encode()
        var cases: [(String, [UInt8])] = []
        cases.append(("garbage", Array("hello manager".utf8)))
        cases.append(("oversized", [UInt8](repeating: 0x41, count: ControlProtocol.maxMessageBytes + 1)))
        cases.append(("truncated", Array(valid.dropLast(3))))
        var badMagic = valid; badMagic[0] ^= 0xFF; cases.append(("bad magic", badMagic))
        var badVersion = valid; badVersion[4] = 99; cases.append(("bad version", badVersion))
        var unknownType = valid; unknownType[6] = 0xEE; cases.append(("unknown type", unknownType))
        var badLength = valid; badLength[8] &+= 1; cases.append(("length mismatch", badLength))
        valid[16] = 0xFF; valid[17] = 0xFF  // device name length 65535
        cases.append(("huge string length", valid))
        cases.append(("driver message from a client", ControlMessage.detach(sessionID: 1).encode()))
        for (name, bytes) in cases {
            let s = try UnixSocket.connect(path: m.socketPath)
            try s.send(bytes)
            #expect(try s.waitReadable(timeoutMilliseconds: 5000), "\(name): no answer")
            var answer: ControlMessage? = nil
            do { answer = try s.receiveControl().message } catch {}
            if let answer {
                guard case .failure(.malformed, _) = answer else {
                    Issue.record("\(name): answered \(answer)")
                    continue
                }
            }
            // ...and the connection is closed.
            var closed = false
            if try s.waitReadable(timeoutMilliseconds: 5000) {
                do { _ = try s.receiveControl() } catch .socket(.closed) { closed = true } catch {}
            }
            #expect(closed, "\(name): connection left open")
        }
        // A message with descriptors it should not carry.
        do {
            let s = try UnixSocket.connect(path: m.socketPath)
            let bell = try Doorbell()
            try s.send(ControlMessage.statusRequest.encode(), descriptors: [bell.fd.raw])
            let reply = try receiveControl(s)
            guard case .failure(.malformed, let reason) = reply.message else { Issue.record("fd case answered \(reply.message)"); return }
            #expect(reason.contains("descriptors"))
        }
        do { let st = try io(&good, .read, sector: 8); #expect(st == .ok) }
        var another = try m.open("m0")
        do { let st = try io(&another, .read, sector: 8); #expect(st == .ok) }
        #expect(try m.device("m0").state == "running")
    }

    /// A client that floods the manager and never reads its answers cannot stall it: the
    /// manager's sends do not block, the flooder loses its connection, others are served.
    @Test func floodingClientDoesNotStallTheManager() throws {
        let m = try ManagerFixture(devices: "[\(memDevice("m0"))]")
        var good = try m.open("m0")
        let flood = try UnixSocket.connect(path: m.socketPath)
        let request = ControlMessage.openSession(OpenSession(device: "nonexistent", deviceClass: .block, writable: true, dataBytes: 4096, queueDepth: 2)).encode()
        var sent = 0
        for _ in 0..<5000 {
            do { try flood.send(request, nonBlocking: true); sent += 1 } catch { break }
        }
        #expect(sent > 100)
        do { let st = try io(&good, .write, sector: 16); #expect(st == .ok) }
        let status = try m.device("m0")
        #expect(status.state == "running")
        var another = try m.open("m0")
        do { let st = try io(&another, .read, sector: 16); #expect(st == .ok) }
    }
}

/// The config names a device's transport and class; what does not fit is refused with an
/// error that says which device and key.
@Suite struct ManagerConfigTests {
    static func parse(_ device: String) throws -> ManagerConfig {
        try ManagerConfig.parse(Data(#"{"devices": [\#(device)]}"#.utf8))
    }

    static func refusal(_ device: String) -> String {
        do {
            _ = try parse(device)
            return "accepted"
        } catch {
            return "\(error)"
        }
    }

    @Test func theExamplesParse() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let memory = try ManagerConfig.load(path: root.appendingPathComponent("examples/outboard.json").path)
        #expect(memory.devices.map(\.transport) == [.memory] && memory.devices.map(\.deviceClass) == [.block])
        let vhost = try ManagerConfig.load(path: root.appendingPathComponent("examples/virtio-blk.json").path)
        #expect(vhost.devices.map(\.transport) == [.vhostUser] && vhost.devices.map(\.deviceClass) == [.block])
        let vfio = try ManagerConfig.load(path: root.appendingPathComponent("examples/virtio-blk-vfio.json").path)
        #expect(vfio.devices.map(\.transport) == [.vfio] && vfio.devices.map(\.pci) == ["0000:00:04.0"])
    }

    @Test func transportAndClass() throws {
        let d = try Self.parse(#"{"name": "m0", "transport": "memory"}"#)
        #expect(d.devices[0].deviceClass == .block, "class defaults to block")
        let v = try Self.parse(#"{"name": "v0", "transport": "vhost-user", "class": "block", "socket": "/run/v0.sock"}"#)
        #expect(v.devices[0].transport == .vhostUser && v.devices[0].socket == "/run/v0.sock")

        let unknownTransport = Self.refusal(#"{"name": "m0", "transport": "pci"}"#)
        #expect(unknownTransport.contains("unknown transport 'pci' (known: memory, vhost-user, vfio)"), "\(unknownTransport)")
        let unknownClass = Self.refusal(#"{"name": "m0", "transport": "memory", "class": "tape"}"#)
        #expect(unknownClass.contains("unknown class 'tape' (known: block, net)"), "\(unknownClass)")
        let netOverMemory = Self.refusal(#"{"name": "m0", "transport": "memory", "class": "net"}"#)
        #expect(netOverMemory.contains("class net runs over transport vhost-user only"), "\(netOverMemory)")
        let n = try Self.parse(#"{"name": "n0", "transport": "vhost-user", "class": "net", "socket": "/run/n0.sock", "mac": "02:00:00:00:00:07", "mtu": 9000}"#)
        #expect(n.devices[0].macAddress == MACAddress("02:00:00:00:00:07") && n.devices[0].mtu == 9000)
        let derived = try Self.parse(#"{"name": "n0", "transport": "vhost-user", "class": "net", "socket": "/run/n0.sock"}"#)
        #expect(!derived.devices[0].macAddress.isMulticast && derived.devices[0].macAddress.rawValue >> 40 == 0x02, "locally administered unicast")
        let multicast = Self.refusal(#"{"name": "n0", "transport": "vhost-user", "class": "net", "socket": "/s", "mac": "01:00:5e:00:00:01"}"#)
        #expect(multicast.contains("is not a unicast address"), "\(multicast)")
        let tiny = Self.refusal(#"{"name": "n0", "transport": "vhost-user", "class": "net", "socket": "/s", "mtu": 60}"#)
        #expect(tiny.contains("mtu must be in 68...9000"), "\(tiny)")
        let macOnBlock = Self.refusal(#"{"name": "v0", "transport": "vhost-user", "socket": "/s", "mac": "02:00:00:00:00:01"}"#)
        #expect(macOnBlock.contains("'mac' is for class net, this device's class is block"), "\(macOnBlock)")
        let missing = Self.refusal(#"{"name": "m0"}"#)
        #expect(missing.contains("missing key 'transport'"), "\(missing)")
        let oldKey = Self.refusal(#"{"name": "m0", "driver": "memblock"}"#)
        #expect(oldKey.contains("'driver' is not a device key: name a 'transport'"), "\(oldKey)")
    }

    @Test func keysOfAnotherTransportAreRefused() {
        let noSocket = Self.refusal(#"{"name": "v0", "transport": "vhost-user"}"#)
        #expect(noSocket.contains("device 'v0': transport vhost-user needs 'socket'"), "\(noSocket)")
        let socketOnMemory = Self.refusal(#"{"name": "m0", "transport": "memory", "socket": "/run/x.sock"}"#)
        #expect(socketOnMemory.contains("device 'm0': 'socket' is for transport vhost-user, this device's transport is memory"),
                "\(socketOnMemory)")
        let queueOnMemory = Self.refusal(#"{"name": "m0", "transport": "memory", "queue_size": 64}"#)
        #expect(queueOnMemory.contains("'queue_size' is for transport vfio or vhost-user, this device's transport is memory"),
                "\(queueOnMemory)")
        let sizeOnVhost = Self.refusal(#"{"name": "v0", "transport": "vhost-user", "socket": "/run/v0.sock", "size_mib": 8}"#)
        #expect(sizeOnVhost.contains("device 'v0': 'size_mib' is for transport memory, this device's transport is vhost-user"),
                "\(sizeOnVhost)")
        let badNotify = Self.refusal(#"{"name": "v0", "transport": "vhost-user", "socket": "/run/v0.sock", "notify": "often"}"#)
        #expect(badNotify.contains("notify 'often'"), "\(badNotify)")

        let pciOnVhost = Self.refusal(#"{"name": "v0", "transport": "vhost-user", "socket": "/run/v0.sock", "pci": "0000:00:04.0"}"#)
        #expect(pciOnVhost.contains("device 'v0': 'pci' is for transport vfio, this device's transport is vhost-user"), "\(pciOnVhost)")
        let socketOnVFIO = Self.refusal(#"{"name": "p0", "transport": "vfio", "pci": "0000:00:04.0", "socket": "/run/x.sock"}"#)
        #expect(socketOnVFIO.contains("device 'p0': 'socket' is for transport vhost-user, this device's transport is vfio"), "\(socketOnVFIO)")
        for bad in [#""pci": "00:04""#, #""pci": "0000:00:20.0""#, #""queue_size": 64"#] {
            let r = Self.refusal(#"{"name": "p0", "transport": "vfio", "# + bad + "}")
            #expect(r.contains("device 'p0': transport vfio needs 'pci', the device's PCI address"), "\(bad): \(r)")
        }
        let badQueue = Self.refusal(#"{"name": "p0", "transport": "vfio", "pci": "0000:00:04.0", "queue_size": 48}"#)
        #expect(badQueue.contains("queue_size must be a power of two"), "\(badQueue)")
    }

    @Test func aVFIODeviceTakesItsPCIAddressAndTheVirtioKnobs() throws {
        let c = try Self.parse(#"{"name": "p0", "transport": "vfio", "pci": "0000:00:04.0", "queue_size": 128, "notify": "event-idx"}"#)
        let d = c.devices[0]
        #expect(d.transport == .vfio && d.pci == "0000:00:04.0" && d.queueSize == 128 && d.notify == "event-idx")
    }
}

/// The client library retries by an error's classification: a server not listening yet
/// (`.unreachable`, `.retry`) is waited for; a refusal that will not change (`.fatal`) ends
/// the wait at once.
@Suite struct ClientRetryTests {
    @Test func openWaitsForAServerAndStopsAtAFinalRefusal() throws {
        let path = NSTemporaryDirectory() + "outboard-late-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        do {
            _ = try BlockSession.open(socketPath: path, device: "d", writable: false, dataBytes: 4096, queueDepth: 2)
            Issue.record("opened a session on a socket nobody listens on")
        } catch {
            guard case .unreachable = error else { Issue.record("wrong error \(error)"); return }
            #expect(error.recovery == .retry)
        }
        // The server comes up while the client waits, answers one open with a final
        // refusal, and goes away (its socket file with it). A client that retried the
        // refusal would find nobody and end with .unreachable at its deadline.
        let served = DispatchSemaphore(value: 0)
        let server = Thread {
            defer { served.signal() }
            usleep(100_000)
            guard let listener = try? UnixListener(path: path), let s = try? listener.accept() else { return }
            guard (try? s.waitReadable(timeoutMilliseconds: 10_000)) == true, (try? s.receiveControl()) != nil else { return }
            try? s.send(.failure(.unknownDevice, "no device named 'd'"))
        }
        server.start()
        #expect(throws: SessionError.refused(.unknownDevice, "no device named 'd'")) {
            _ = try BlockSession.open(socketPath: path, device: "d", writable: false, dataBytes: 4096, queueDepth: 2,
                                      waitMilliseconds: 5000)
        }
        #expect(served.wait(timeout: .now() + 10) == .success, "the server thread did not finish")
    }
}
