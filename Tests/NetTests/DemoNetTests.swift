import Foundation
import OutboardTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `outboard demo net` as a user runs it: testpmd, the manager, two bridges in two
/// namespaces, an iperf3 TCP stream, the driver of one port killed half-way.
@Suite(.serialized, .enabled(if: canUseNetworkNamespaces && getuid() == 0))
struct DemoNetTests {
    @Test func theStreamSurvivesTheDriverKill() throws {
        let turn = try BusyTurn()
        defer { turn.hold() }
        let r = try runOutboard(["demo", "net", "--seconds", "5", "--json"], seconds: 120)
        let line = r.lines.last ?? ""
        let summary = (try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: Any] ?? [:]
        #expect(r.status == 0, "exit status \(r.status): \(r.lines.suffix(5))")
        #expect(summary["survived"] as? Bool == true, "\(summary)")
        #expect(summary["kills"] as? Int == 1 && (summary["driver_restarts"] as? Int ?? 0) >= 1, "\(summary)")
        #expect((summary["bytes_received"] as? Int ?? 0) > 0 && (summary["bytes_last_second"] as? Int ?? 0) > 0, "\(summary)")
        #expect(summary["stop_seen_by"] as? String == "receiver", "\(summary)")
        #expect(summary["iperf3_exit"] as? String == "exited with status 0", "\(summary)")
        let bridge0 = summary["bridge0"] as? [String: Any] ?? [:]
        #expect((bridge0["recoveries"] as? Int ?? 0) >= 1, "the bridge's session moved to the new driver: \(bridge0)")
        // The first part, `outboard demo` with no argument, is still the block demo.
        let help = try runOutboard(["demo", "--help"], seconds: 30)
        #expect(help.lines.contains { $0.contains("blk (default)") }, "\(help.lines)")
    }
}
