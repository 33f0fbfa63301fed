import ArgumentParser
import Outboard
import OutboardSession
import OutboardSystem
import Virtualizers

#if canImport(Glibc)
import Glibc
#endif

/// `outboard net ...`: tools on an Outboard NIC.
struct NetCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "net",
        abstract: "Network tools on an Outboard NIC",
        subcommands: [NetMuxCommand.self, NetTapCommand.self]
    )
}

/// `outboard net mux`: one port shared by many clients (`NetMultiplexer`), until SIGINT
/// or SIGTERM.
struct NetMuxCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mux",
        abstract: "Share a net device among clients: each gets a port with its own MAC on the listening socket.",
        discussion: """
            Clients open sessions on --listen exactly as on the manager (NetSession.open, device name --device). \
            Frames go to clients by destination MAC (broadcast and multicast to all); a client's frames go out \
            only with its own source MAC.
            """
    )

    @OptionGroup var address: ManagerAddress

    @Option(help: "The net device (on the manager); clients open it by the same name here.")
    var device: String

    @Option(help: "The multiplexer's own control socket, for its clients.")
    var listen: String

    @Option(help: "Client ports served at once (1...\(NetMultiplexer.maxClients)).")
    var clients: Int = 8

    @Option(help: "The clients' MACs, in slot order, comma separated (default: derived from the device's MAC).")
    var mac: ListOption<String>?

    @Option(help: "Buffers each way of the upstream session (a power of two).")
    var depth: Int = 256

    @Option(help: "Seconds between counter lines (0: none).")
    var interval: Double = 2

    @Option(help: "Milliseconds to wait for a device that is not ready yet.")
    var waitMs: Int = 10_000

    func validate() throws {
        // The interval becomes nanoseconds in a UInt64.
        guard interval >= 0, interval <= 86_400 else { throw ValidationError("--interval \(interval): 0...86400 seconds") }
    }

    func run() throws {
        var macs: [MACAddress]? = nil
        if let mac {
            macs = try mac.values.map { text in
                guard let m = MACAddress(text) else { throw ValidationError("'\(text)' is not a MAC address (02:00:00:00:00:01)") }
                return m
            }
        }
        installInterruptFlag()
        let upstream = try NetSession.open(socketPath: address.socketPath(), device: device, queueDepth: depth, waitMilliseconds: waitMs)
        let info = upstream.info
        var mux = try NetMultiplexer(upstream: upstream, socketPath: listen,
                                     configuration: .init(deviceName: device, clients: clients, macs: macs))
        say("net mux: \(device) (MAC \(info.mac), MTU \(info.mtu)) shared on \(listen), \(clients) client ports")
        for (k, m) in mux.macs.enumerated() { say("  client \(k): \(m)") }
        let start = Clock.monotonicNanoseconds
        var nextLine = start + UInt64(interval * 1e9)
        while !interrupted() {
            try mux.serve(milliseconds: 100)
            let now = Clock.monotonicNanoseconds
            if interval > 0 && now >= nextLine {
                nextLine = now + UInt64(interval * 1e9)
                say(Self.line(mux.stats(), seconds: Double(now - start) / 1e9))
            }
        }
        say(Self.line(mux.stats(), seconds: Double(Clock.monotonicNanoseconds - start) / 1e9))
        say("net mux: stopped")
    }

    /// A line out at once (stdout may be a pipe, which the C library buffers).
    func say(_ line: String) {
        print(line)
        fflush(nil)
    }

    /// One line of counters: the port's, then each client slot that has served a session.
    static func line(_ s: NetMultiplexer.Stats, seconds: Double) -> String {
        var out = "\(Int(seconds)) s  rx \(s.rxFrames) (no client \(s.rxNoClient), oversize \(s.rxOversize))  tx \(s.txFrames)  refused \(s.refused)"
            + "  upstream recoveries \(s.upstreamRecoveries) (tx lost \(s.upstreamTxDropped))"
        for c in s.clients where c.sessions > 0 {
            out += "\n  client \(c.slot) \(c.mac)\(c.connected ? "" : " (closed)"): rx \(c.rxDelivered) not reading \(c.rxNotReading)"
                + " tx \(c.txSent) spoofed \(c.txSpoofed) stray \(c.strayEntries)"
            if let why = c.lastDrop { out += " dropped: \(why)" }
        }
        return out
    }
}
