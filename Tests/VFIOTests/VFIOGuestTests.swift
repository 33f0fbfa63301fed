import Foundation
import OutboardTestSupport
import Testing

/// The VFIO module on a real vfio-pci device: `outboard vfio-info` in the guest lane (the
/// outboard disk, a virtio-blk-pci function behind the emulated Intel IOMMU). One boot for
/// all of it. OUTBOARD_SKIP_GUEST_LANE=1 skips it.
@Suite(.serialized, .disabled(if: getenv("OUTBOARD_SKIP_GUEST_LANE") != nil, "OUTBOARD_SKIP_GUEST_LANE is set"))
struct VFIOGuestTests {
    @Test func vfioInfoOnTheOutboardDisk() throws {
        let bdf = GuestLane.outboardDisk.address
        let driver = "basename $(readlink /sys/bus/pci/devices/\(bdf)/driver)"
        let run = try GuestLane.run(checks: [
            ("unbound", "modprobe vfio-pci && outboard vfio-info \(bdf)"),
            ("exercise", "outboard vfio-info \(bdf) --bind --exercise"),
            ("restored", "\(driver); cat /sys/bus/pci/devices/\(bdf)/driver_override"),
            ("json", "outboard vfio-info \(bdf) --bind --json"),
        ], includingFio: false)

        // Without --bind the function is still with virtio-pci: VFIO has no group for it.
        let unbound = try #require(run["unbound"], "\(run)")
        #expect(unbound.status != 0)
        #expect(unbound.output.contains("no device of IOMMU group"), "\(unbound)")

        let ex = try #require(run["exercise"], "\(run)")
        #expect(ex.status == 0, "\(ex)")
        let lines = ex.lines
        func has(_ prefix: String, _ parts: String...) -> Bool {
            lines.contains { l in l.hasPrefix(prefix) && parts.allSatisfy { l.contains($0) } }
        }
        #expect(has("device \(bdf)", "driver vfio-pci", "previous-driver virtio-pci"), "\(ex)")
        #expect(has("config vendor 0x1af4 device 0x1042"), "\(ex)")
        #expect(has("region 1 name BAR1", "mmap true"), "\(ex)")
        #expect(has("region 4 name BAR4", "mmap true"), "\(ex)")
        #expect(has("irq 2 name MSI-X count 3"), "\(ex)")
        #expect(has("msix vectors 3 irq-count 3 table-bar 1"), "\(ex)")
        // virtio-pci's vendor capabilities: common (1), notify (2), ISR (3), device (4), PCI access (5).
        for t in 1...5 { #expect(has("capability", "id 0x9 name vendor-specific cfg-type \(t) "), "cfg-type \(t)\n\(ex)") }
        #expect(has("iommu type TYPE1v2 page-sizes 0x"), "\(ex)")
        #expect(lines.filter { $0.hasPrefix("iova-range ") }.count >= 1, "\(ex)")
        #expect(lines.contains("reserved-region 0xfee00000-0xfeefffff"), "\(ex)")
        // The IOVA ranges leave out the MSI window.
        #expect(!lines.contains { $0.hasPrefix("iova-range ") && $0.contains("0x0-0xffffffffffffffff") }, "\(ex)")
        for step in ["command", "bar index 1", "bar index 4", "dma-map", "dma-unmap", "msix-route vectors 3 enabled true", "msix-disable enabled false"] {
            #expect(has("exercise \(step)", "ok true"), "\(step)\n\(ex)")
        }

        let restored = try #require(run["restored"], "\(run)")
        #expect(restored.lines.prefix(2) == ["virtio-pci", "(null)"], "\(restored)")

        let json = try #require(run["json"], "\(run)")
        #expect(json.status == 0, "\(json)")
        let object = try JSONSerialization.jsonObject(with: Data(json.output.utf8)) as? [String: Any]
        let ranges = object?["reserved-region"] as? [[String: Any]]
        #expect(ranges?.first?["subject"] as? String == "0xfee00000-0xfeefffff", "\(json)")
        #expect((object?["capability"] as? [[String: Any]])?.count == 6, "\(json)")
    }
}
