import Foundation
import OutboardTestSupport
import Testing

/// The virtio-blk driver over virtio-pci through VFIO, in the guest lane: the manager binds
/// 0000:00:04.0 to vfio-pci, maps DMA, and runs the same sandboxed driver it runs over
/// vhost-user. One boot for all of it; part of the serialized `GuestLaneTests` suite, so
/// boots never run side by side.
extension GuestLaneTests {
    static let vfioConfig = """
        {"control_socket": "/scratch/ob/control.sock", "driver_user": "nobody", "heartbeat_deadline_ms": 1000,
         "devices": [{"name": "vblk", "transport": "vfio", "pci": "\(GuestLane.outboardDisk.address)",
                      "notify": "event-idx", "access": [{"uid": 0, "mode": "rw"}]}]}
        """

    /// Verified reads and writes, the pattern in the host's image file afterwards, flush,
    /// write-zeroes and discard, a request beyond the end; a stray DMA contained by the
    /// IOMMU; kill, segv, hang and abort of the driver, and a bad available-ring entry
    /// (the device sets DEVICE_NEEDS_RESET, the driver resets it and resubmits), under a
    /// verified workload with nothing acknowledged lost; and the device given back to the
    /// guest kernel's virtio-pci driver whenever the manager stops.
    @Test func theVirtioBlkDriverRunsOverVFIO() throws {
        let work = NSTemporaryDirectory() + "outboard-guest-vfio-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: work) }
        let config = Self.vfioConfig.replacingOccurrences(of: "\n", with: " ")
        let driverOf = "basename \"$(readlink /sys/bus/pci/devices/\(GuestLane.outboardDisk.address)/driver)\" 2>/dev/null"
        let run = try GuestLane.run(checks: [
            ("config", "mkdir -p /scratch/ob && printf '%s\\n' '\(config)' > /scratch/ob/outboard.json && echo written"),
            ("check", "outboard check --config /scratch/ob/outboard.json --device vblk --json --blocks 512 --operations 2000 --seed 7"),
            ("given-back", driverOf),
            ("isolation", "outboard check --config /scratch/ob/outboard.json --device vblk --json --blocks 64 --operations 200 --seed 7 --dma-isolation"),
            ("dmar", "dmesg | grep 'DMAR' | grep 'fault addr'"),
            ("faults", "outboard faults --config /scratch/ob/outboard.json --device vblk --faults 5 --kinds kill,segv,hang,abort,bad-ring --ops-between 300 --json"),
            ("given-back-again", driverOf),
            // A manager killed while it holds the device: the next one gives it back.
            ("crash", """
                outboard run --config /scratch/ob/outboard.json --log-level error 2>/dev/null & pid=$!
                i=0; while [ "$(\(driverOf))" != vfio-pci ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
                kill -9 $pid; wait $pid 2>/dev/null; sleep 0.3
                echo "after the crash: $(\(driverOf))"
                outboard check --config /scratch/ob/outboard.json --device vblk --blocks 16 --operations 50 --seed 7 >/dev/null; echo "check $?"
                echo "after the next manager: $(\(driverOf))"
                """),
        ], includingFio: false, workDirectory: work)

        #expect(run["config"]?.lines.first == "written", "\(run)")
        let check = try #require(run["check"], "\(run)")
        #expect(check.status == 0, "\(check)")
        let o = try JSONSerialization.jsonObject(with: Data((check.lines.last { !$0.isEmpty } ?? "").utf8)) as? [String: Any]
        let checks = (o?["checks"] as? [[String: Any]]) ?? []
        let outcomes = Dictionary(uniqueKeysWithValues: checks.map { ($0["name"] as? String ?? "", $0["outcome"] as? String ?? "") })
        #expect(outcomes == ["verified-workload": "ok", "pattern": "ok", "flush": "ok", "write-zeroes": "ok", "discard": "ok",
                             "beyond-capacity": "ok"], "\(check)")
        // The pattern went through the IOMMU to the disk image QEMU serves from this host.
        let expected = (0..<(64 << 10)).map { UInt8(truncatingIfNeeded: UInt64($0) &* 0x9E37_79B9 &+ 7 &* 131 &+ UInt64($0 >> 12)) }
        let image = try #require(FileHandle(forReadingAtPath: work + "/outboard.img"))
        try image.seek(toOffset: 16 << 20)
        #expect(image.readData(ofLength: 64 << 10) == Data(expected), "the pattern is not in the image")
        #expect(run["given-back"]?.lines.first == "virtio-pci", "\(run)")

        // DMA isolation: the stray descriptor's request fails alone, another session's data
        // is untouched, and the guest kernel's IOMMU driver logged the blocked write.
        let isolation = try #require(run["isolation"], "\(run)")
        #expect(isolation.status == 0, "\(isolation)")
        let i = try JSONSerialization.jsonObject(with: Data((isolation.lines.last { !$0.isEmpty } ?? "").utf8)) as? [String: Any]
        let dma = ((i?["checks"] as? [[String: Any]]) ?? []).first { $0["name"] as? String == "dma-isolation" }
        #expect(dma?["outcome"] as? String == "ok", "\(isolation)")
        let dmar = try #require(run["dmar"], "\(run)")
        let short = String(GuestLane.outboardDisk.address.dropFirst(5))  // 00:04.0
        #expect(dmar.lines.contains { $0.contains("[\(short)]") && $0.contains("fault addr 0xc0000000") }, "\(dmar)")
        // The revoked session's region was out of the IOMMU when the stray aimed at it.
        let detail = dma?["detail"] as? String ?? ""
        let revoked = detail.range(of: "stray at 0x").map { detail[$0.upperBound...].prefix { $0.isHexDigit } } ?? ""
        #expect(!revoked.isEmpty, "\(detail)")
        #expect(dmar.lines.contains { $0.contains("[\(short)]") && $0.contains("fault addr 0x\(revoked)") }, "0x\(revoked): \(dmar)")

        let faults = try #require(run["faults"], "\(run)")
        #expect(faults.status == 0, "\(faults)")
        let f = try JSONSerialization.jsonObject(with: Data((faults.lines.last { !$0.isEmpty } ?? "").utf8)) as? [String: Any]
        #expect(f?["faults_injected"] as? Int == 5 && f?["recovered"] as? Int == 5, "\(faults)")
        #expect((f?["recovery_ms_p50_by_fault"] as? [String: Any])?.keys.sorted() == ["abort", "bad-ring", "hang", "kill", "segv"], "\(faults)")
        #expect(f?["verify_errors"] as? Int == 0 && f?["client_errors"] as? Int == 0, "\(faults)")
        #expect(f?["failure"] == nil, "\(faults)")
        #expect(run["given-back-again"]?.lines.first == "virtio-pci", "\(run)")
        let crash = try #require(run["crash"], "\(run)")
        #expect(crash.lines.filter { !$0.isEmpty } == ["after the crash: vfio-pci", "check 0", "after the next manager: virtio-pci"], "\(crash)")
    }
}
