import Foundation
import Outboard
import OutboardSession
import OutboardSystem
import OutboardTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The kernel on both ends of a wire made of Outboard: testpmd forwards between its two
/// vhost-user ports (`io`), a sandboxed virtio-net driver drives each, an
/// `outboard net tap` bridge (the real command) turns each port into a TAP interface, and
/// each TAP lives in a network namespace of its own with an address on one subnet.
final class BridgedPair {
    let fixture: NetFixture
    let names: [String]
    /// The addresses on the two sides (the namespaces are the test's own).
    static let address = ["10.77.0.1", "10.77.0.2"]
    var bridge0: BackgroundCommand?
    var bridge1: BackgroundCommand?
    let ns0: NetworkNamespace
    let ns1: NetworkNamespace

    init() throws {
        let f = try NetFixture(ports: 2, forwardMode: "io")
        let n = [uniqueLinkName("b"), uniqueLinkName("b")]
        let exe = try outboardExecutable()
        func start(_ k: Int) throws -> BackgroundCommand {
            let b = try BackgroundCommand(exe, ["net", "tap", "--socket", f.manager.socketPath, "--device", NetFixture.name(k),
                                                "--ifname", n[k], "--interval", "1", "--wait-ms", "20000"], seconds: 120)
            guard b.waitForOutput("ready: tap \(n[k]) mac \(NetFixture.mac(k)) mtu 1500") else {
                throw DeadlinePassed("bridge \(k) to say it is ready (it printed: \(b.output))", seconds: testDeadlineSeconds)
            }
            return b
        }
        fixture = f
        names = n
        bridge0 = try start(0)
        bridge1 = try start(1)
        ns0 = try NetworkNamespace()
        ns1 = try NetworkNamespace()
        try Self.place(names[0], in: ns0, address: Self.address[0])
        try Self.place(names[1], in: ns1, address: Self.address[1])
    }

    deinit {
        // The bridges go first (killed), then the namespaces, then testpmd and the manager.
        bridge0 = nil
        bridge1 = nil
    }

    /// Moves the TAP into `ns`, gives it its address and brings it up there.
    static func place(_ link: String, in ns: borrowing NetworkNamespace, address: String) throws {
        try ns.moveLink(link)
        try ns.runChecked(["ip", "address", "add", "\(address)/24", "dev", link])
        try ns.runChecked(["ip", "link", "set", "dev", link, "up"])
    }

    /// Stops bridge `k` with SIGTERM and returns what it printed; it must stop cleanly.
    func stop(_ k: Int) -> CommandResult? {
        let b = k == 0 ? bridge0.take() : bridge1.take()
        guard let b else { return nil }
        b.signal(SIGTERM)
        let deadline = Date().addingTimeInterval(testDeadlineSeconds)
        while b.isRunning && Date() < deadline { usleep(10_000) }
        if b.isRunning {
            Issue.record("bridge \(k) still running \(testDeadlineSeconds) s after SIGTERM")
            b.signal(SIGKILL)
        }
        let r = b.finish()
        #expect(r.succeeded && r.output.contains("stopped: tap \(names[k])"), "bridge \(k) did not stop cleanly: \(r)")
        return r
    }
}

/// The counters of a bridge's last counter line (`key=value` pairs).
func bridgeCounters(_ output: String) -> [String: UInt64] {
    guard let line = output.split(separator: "\n").last(where: { $0.contains("to_port_frames=") }) else { return [:] }
    var out: [String: UInt64] = [:]
    for pair in line.split(separator: " ") {
        let kv = pair.split(separator: "=")
        if kv.count == 2, let v = UInt64(kv[1]) { out[String(kv[0])] = v }
    }
    return out
}

/// The packets received, of `count`, in `ping -c count`'s summary.
func pingReceived(_ output: String) -> Int? {
    guard let line = output.split(separator: "\n").first(where: { $0.contains("packets transmitted") }) else { return nil }
    let parts = line.split(separator: ",")
    guard parts.count >= 2 else { return nil }
    return Int(parts[1].split(separator: " ").first ?? "")
}

/// Waits until iperf3's server listens on its port in `ns`.
func waitForListener(in ns: borrowing NetworkNamespace, port: Int = 5201) throws {
    let deadline = Date().addingTimeInterval(testDeadlineSeconds)
    while Date() < deadline {
        if try ns.run(["ss", "-ltnH"]).output.contains(":\(port) ") { return }
        usleep(20_000)
    }
    throw DeadlinePassed("iperf3's server to listen on port \(port) in \(ns.name)", seconds: testDeadlineSeconds)
}

/// One iperf3 TCP run from `client` to a one-off server in `server` at `address`:
/// the client's JSON, and both results.
func iperf3TCP(from client: borrowing NetworkNamespace, to server: borrowing NetworkNamespace, address: String,
               seconds: Int) throws -> (json: [String: Any], client: CommandResult, server: CommandResult) {
    let s = try server.start(["iperf3", "-s", "-1", "-B", address], seconds: Double(seconds) + 60)
    try waitForListener(in: server)
    let c = try client.run(["iperf3", "-c", address, "-t", "\(seconds)", "--json", "--connect-timeout", "5000"],
                           seconds: Double(seconds) + 40)
    let sr = s.finish()
    let json = (try? JSONSerialization.jsonObject(with: Data(c.output.utf8))) as? [String: Any] ?? [:]
    return (json, c, sr)
}

@Suite(.serialized, .enabled(if: canUseNetworkNamespaces && getuid() == 0))
struct TapBridgeTests {
    static var verbose: Bool { ProcessInfo.processInfo.environment["OUTBOARD_TEST_VERBOSE"] != nil }

    /// Ping and an iperf3 TCP stream cross the wire both ways: kernel, TAP, bridge, net
    /// session, sandboxed driver, testpmd, and back up the other side.
    @Test func pingAndIperf3CrossTheBridges() throws {
        let p = try BridgedPair()
        let ping = try p.ns0.run(["ping", "-n", "-c", "20", "-i", "0.05", "-W", "5", BridgedPair.address[1]], seconds: 60)
        #expect(ping.succeeded && pingReceived(ping.output) == 20, "every echo answered: \(ping)")
        let r = try iperf3TCP(from: p.ns0, to: p.ns1, address: BridgedPair.address[1], seconds: 4)
        #expect(r.client.succeeded && r.json["error"] == nil, "iperf3 client: \(r.client)")
        #expect(r.server.succeeded, "iperf3 server: \(r.server)")
        let end = r.json["end"] as? [String: Any] ?? [:]
        let sent = (end["sum_sent"] as? [String: Any])?["bytes"] as? Int ?? 0
        let received = (end["sum_received"] as? [String: Any])?["bytes"] as? Int ?? 0
        #expect(sent > 0 && received > 0, "bytes moved: sent \(sent), received \(received)")
        #expect(received <= sent)
        if Self.verbose {
            print(figures("bridges", ping: ping, iperf3: r.json))
            try Self.kernelPathForComparison()
        }
        let c0 = bridgeCounters(p.stop(0)?.output ?? "")
        let c1 = bridgeCounters(p.stop(1)?.output ?? "")
        // Every TCP byte went through both bridges, one way each.
        #expect((c0["to_port_bytes"] ?? 0) > UInt64(received) && (c1["to_tap_bytes"] ?? 0) > UInt64(received), "\(c0) \(c1)")
        #expect((c1["to_port_frames"] ?? 0) > 0 && (c0["to_tap_frames"] ?? 0) > 0, "acknowledgements came back: \(c0) \(c1)")
        #expect(c0["oversize_dropped"] == 0 && c1["oversize_dropped"] == 0)
    }

    /// The same ping and iperf3 over the kernel's own path, a veth pair between two
    /// namespaces, for the figures in docs/benchmarks/net-tap.md (OUTBOARD_TEST_VERBOSE).
    static func kernelPathForComparison() throws {
        let a = try NetworkNamespace(), b = try NetworkNamespace()
        let left = uniqueLinkName("v"), right = uniqueLinkName("v")
        try runChecked(ipTool!, ["link", "add", left, "type", "veth", "peer", "name", right])
        try BridgedPair.place(left, in: a, address: "10.78.0.1")
        try BridgedPair.place(right, in: b, address: "10.78.0.2")
        let ping = try a.runChecked(["ping", "-n", "-c", "20", "-i", "0.05", "-W", "5", "10.78.0.2"], seconds: 60)
        let r = try iperf3TCP(from: a, to: b, address: "10.78.0.2", seconds: 4)
        print(figures("veth", ping: ping, iperf3: r.json))
    }

    /// A frame longer than the port's maxFrame (the TAP's MTU raised past the port's in the
    /// namespace) is dropped and counted; the bridge carries on.
    @Test func anOversizedFrameIsDroppedAndTheBridgeCarriesOn() throws {
        let p = try BridgedPair()
        let warm = try p.ns0.run(["ping", "-n", "-c", "2", "-i", "0.1", "-W", "5", BridgedPair.address[1]])
        #expect(warm.succeeded, "\(warm)")
        try p.ns0.runChecked(["ip", "link", "set", "dev", p.names[0], "mtu", "4000"])
        let big = try p.ns0.run(["ping", "-n", "-c", "2", "-i", "0.1", "-W", "1", "-M", "do", "-s", "3000", BridgedPair.address[1]])
        #expect(pingReceived(big.output) == 0, "a 3042-byte frame cannot cross a 1500-byte port: \(big)")
        let after = try p.ns0.run(["ping", "-n", "-c", "5", "-i", "0.1", "-W", "5", BridgedPair.address[1]])
        #expect(after.succeeded && pingReceived(after.output) == 5, "the bridge carries on: \(after)")
        let c0 = bridgeCounters(p.stop(0)?.output ?? "")
        #expect(c0["oversize_dropped"] == 2, "\(c0)")
    }

    /// The driver under one bridge is killed: the session moves to the new driver and
    /// ping gets answers again through the same bridge process.
    @Test func theBridgeCarriesOnAcrossADriverRestart() throws {
        let p = try BridgedPair()
        let before = try p.ns0.run(["ping", "-n", "-c", "3", "-i", "0.1", "-W", "5", BridgedPair.address[1]])
        #expect(before.succeeded, "\(before)")
        _ = try p.fixture.manager.admin().injectFault(device: NetFixture.name(0), .kill)
        // Until the new driver serves, echoes are lost; then every one is answered.
        let deadline = Date().addingTimeInterval(testDeadlineSeconds)
        var answered = false
        while !answered && Date() < deadline {
            answered = try p.ns0.run(["ping", "-n", "-c", "1", "-W", "1", BridgedPair.address[1]]).succeeded
        }
        #expect(answered, "no echo answered within \(testDeadlineSeconds) s of the kill")
        let after = try p.ns0.run(["ping", "-n", "-c", "10", "-i", "0.05", "-W", "5", BridgedPair.address[1]])
        #expect(pingReceived(after.output) == 10, "\(after)")
        let c0 = bridgeCounters(p.stop(0)?.output ?? "")
        #expect((c0["recoveries"] ?? 0) >= 1, "\(c0)")
    }
}

/// One line of figures: ping's average round trip, iperf3's received rate and retransmits.
func figures(_ path: String, ping: CommandResult, iperf3 json: [String: Any]) -> String {
    let end = json["end"] as? [String: Any] ?? [:]
    let rate = (end["sum_received"] as? [String: Any])?["bits_per_second"] as? Double ?? 0
    let retransmits = (end["sum_sent"] as? [String: Any])?["retransmits"] as? Int ?? -1
    let rtt = ping.output.split(separator: "\n").first(where: { $0.contains("min/avg/max") }).map(String.init) ?? "no rtt line"
    return "\(path): ping \(rtt); iperf3 TCP \(String(format: "%.2f", rate / 1e9)) Gb/s, retransmits \(retransmits)"
}
