import Foundation
import OutboardTestSupport
import Testing

/// `outboard bench guest` does the work it reports: one short boot, one depth, one load;
/// both sides' rows carry real counts from the guest, the profile and the summary are
/// there. No figure is asserted beyond "it moved": targets are the benchmark's business.
extension GuestLaneTests {
    @Test func benchGuestReportsBothSidesAndTheProfile() throws {
        let (status, lines) = try runOutboard(["bench", "guest", "--qd", "8", "--rw", "randread", "--engines", "io_uring",
                                               "--loads", "0.5", "--seconds", "0.5", "--warmup", "0.2", "--json"], seconds: 900)
        #expect(status == 0, "\(lines)")
        let rows = lines.compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
        let setup = try #require(rows.first { $0["row"] as? String == "setup" }, "\(lines)")
        #expect(setup["transport"] as? String == "vfio" && setup["guest_cpus"] as? Int == 2, "\(setup)")
        let runs = rows.filter { $0["row"] as? String == "run" }
        for side in ["linux", "outboard"] {
            for load in ["max", "0.5"] {
                let r = runs.first { $0["side"] as? String == side && "\($0["load"] ?? "")".hasPrefix(load) }
                #expect(r != nil, "\(side) at \(load): \(lines)")
                guard let r else { continue }
                #expect((r["ios"] as? Int ?? 0) > 0 && (r["cpu_us_per_io"] as? Double ?? 0) > 0, "\(r)")
                #expect((r["iops_ratio"] as? Double ?? 0) > 0 && (r["cpu_ratio"] as? Double ?? 0) > 0, "\(r)")
                let profile = r["profile_us_per_io"] as? [String: Any]
                #expect(profile?["client_sys"] != nil && profile?["driver_sys"] != nil && profile?["other"] != nil, "\(r)")
            }
        }
        // The Outboard side went through the device: its driver kicked it and took its interrupts.
        let outboardMax = runs.first { $0["side"] as? String == "outboard" && $0["load"] as? String == "max" }
        #expect((outboardMax?["kicks_per_io"] as? Double ?? 0) > 0, "\(String(describing: outboardMax))")
        #expect(rows.contains { $0["row"] as? String == "summary" && $0["qd"] as? Int == 8 }, "\(lines)")
    }
}
