import Foundation
import OutboardTestSupport
import Testing

/// `outboard bench net` as a user runs it, briefly: every row is there, each with figures
/// from real runs of both sides, counted by the device and by the side itself (no
/// throughput thresholds: the machine may be contended).
@Suite(.serialized) struct NetBenchTests {
    func number(_ o: [String: Any], _ key: String) -> Double? { (o[key] as? NSNumber)?.doubleValue }

    @Test func rowsHoldFramesCountedOnBothSides() throws {
        let turn = try BusyTurn()
        defer { turn.hold() }
        let (status, lines) = try runOutboard(["bench", "net", "--json", "--seconds", "1", "--repeats", "1"], seconds: 400)
        #expect(status == 0, "\(lines)")
        let rows = try lines.map { line in
            try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], "not a JSON object: \(line)")
        }
        let shape = rows.map { "\($0["load"] as? String ?? "?") \($0["direction"] as? String ?? "?") \(number($0, "frame_bytes") ?? 0)" }
        #expect(shape == ["busy tx 64.0", "rate tx 64.0", "busy rx 64.0", "busy tx 1518.0", "rate tx 1518.0", "busy rx 1518.0"],
                "\(lines)")
        for (row, line) in zip(rows, lines) {
            #expect(row["bench"] as? String == "net", "\(line)")
            // Frames really moved on both sides: at the device, and by each side's own count.
            for key in ["outboard_device_packets", "dpdk_device_packets", "outboard_own_frames", "dpdk_own_frames",
                        "outboard_mpps", "dpdk_mpps", "mpps_ratio", "outboard_cpu_ns_per_packet", "dpdk_cpu_ns_per_packet",
                        "cpu_ratio", "outboard_seconds", "dpdk_seconds"] {
                #expect((number(row, key) ?? 0) > 0, "\(key): \(line)")
            }
            // A side cannot have counted fewer frames of its own than the device saw of it.
            for side in ["outboard", "dpdk"] {
                #expect((number(row, "\(side)_own_frames") ?? 0) >= (number(row, "\(side)_device_packets") ?? 1), "\(side): \(line)")
            }
            // /proc counts CPU in clock ticks: present, maybe 0.
            // The kernel's path moved frames too.
            #expect((number(row, "kernel_mpps") ?? 0) > 0, "kernel_mpps: \(line)")
            for key in ["driver_cpu_ns_per_packet", "client_cpu_ns_per_packet", "kernel_cpu_ns_per_packet"] {
                #expect((number(row, key) ?? -1) >= 0, "\(key): \(line)")
            }
            let mpps = (number(row, "outboard_mpps") ?? 0) / max(number(row, "dpdk_mpps") ?? 1, 1e-9)
            #expect(abs(mpps - (number(row, "mpps_ratio") ?? 0)) < 0.01 * mpps + 0.002, "mpps_ratio: \(line)")
            #expect(row["target_met"] is Bool, "\(line)")
            if row["load"] as? String == "rate" {
                #expect(row["reference_paced"] as? Bool == false, "\(line)")
                #expect((number(row, "offered_mpps") ?? 0) > 0, "\(line)")
                #expect(row["target"] as? String == "cpu_ratio <= 1.2", "\(line)")
            } else {
                #expect(row["target"] as? String == "mpps_ratio >= 1.0", "\(line)")
            }
        }
    }
}
