import ArgumentParser
import Outboard
import OutboardSystem
import Bridges

#if canImport(Glibc)
import Glibc
#endif

/// `outboard net tap --device D --ifname NAME`: a net device as a TAP interface, so that
/// ordinary programs (ping, iperf3, the kernel's whole stack) use it. Runs in the
/// foreground until SIGINT or SIGTERM; needs CAP_NET_ADMIN.
struct NetTapCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tap",
        abstract: "Bridge a net device to a TAP interface with the device's MAC and MTU (needs CAP_NET_ADMIN).",
        discussion: """
            Prints "ready: tap NAME mac MAC mtu MTU ..." once the interface is up, then the counters every \
            --interval seconds and once more on the way out. The interface may be moved to another network \
            namespace (ip link set dev NAME netns NS); the bridge goes on. A driver restart is recovered by \
            the session: traffic pauses and resumes.
            """
    )

    @OptionGroup var address: ManagerAddress

    @Option(help: "The net device.")
    var device: String

    @Option(help: "The TAP interface's name (a \"%d\" pattern lets the kernel number it).")
    var ifname: String

    @Option(help: "Buffers each way (a power of two).")
    var depth: Int = 256

    @Option(help: "Frames moved per direction before turning to the other.")
    var batch: Int = 32

    @Option(help: "Seconds between counter lines (0: only at the end).")
    var interval: Double = 5

    @Option(help: "Milliseconds to wait for a device that is not ready yet.")
    var waitMs: Int = 10_000

    func validate() throws {
        guard ifname.utf8.count <= TapDevice.maxNameLength, !ifname.isEmpty else {
            throw ValidationError("--ifname: 1 to \(TapDevice.maxNameLength) bytes")
        }
        // The interval becomes milliseconds in an Int, then nanoseconds in a UInt64.
        guard interval >= 0, interval <= 86_400 else { throw ValidationError("--interval \(interval): 0...86400 seconds") }
    }

    func run() throws {
        var bridge = try TapBridge(socketPath: address.socketPath(), device: device, ifname: ifname, queueDepth: depth,
                                   batch: batch, waitMilliseconds: waitMs)
        installShutdownSignals(bridge.stopDescriptor)
        let info = bridge.info
        print("ready: tap \(bridge.name) mac \(info.mac) mtu \(info.mtu) (device \(device), driver generation \(bridge.generation))")
        fflush(nil)
        let start = Clock.monotonicNanoseconds
        try bridge.run(reportMilliseconds: Int(interval * 1000)) { c in
            let seconds = Double(Clock.monotonicNanoseconds &- start) / 1e9
            print(pad(fmt(seconds, 1), 7) + " s  " + Self.line(c))
            fflush(nil)
        }
        print("stopped: tap \(bridge.name)")
        fflush(nil)
    }

    /// The counters as `key=value` pairs.
    static func line(_ c: TapBridgeCounters) -> String {
        "to_port_frames=\(c.framesToPort) to_port_bytes=\(c.bytesToPort) to_tap_frames=\(c.framesToTap) "
            + "to_tap_bytes=\(c.bytesToTap) oversize_dropped=\(c.oversizeDropped) short_dropped=\(c.shortDropped) "
            + "tap_write_dropped=\(c.tapWriteDropped) dropped_in_recovery=\(c.droppedInRecovery) "
            + "recoveries=\(c.recoveries) stray_entries=\(c.strayEntries)"
    }
}
