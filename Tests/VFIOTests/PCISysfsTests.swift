import Foundation
import Testing
import VFIO

/// A fake sysfs tree in a temporary folder: PCI functions with `driver`, `iommu_group` and
/// `driver_override`, drivers with bind and unbind files, IOMMU groups with their device
/// links and reserved regions. `FakeKernel` plays the kernel's part after each write.
final class FakeSysfs {
    let root: String
    let fm = FileManager.default

    init() throws {
        root = NSTemporaryDirectory() + "outboard-sysfs-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        for d in ["bus/pci/devices", "bus/pci/drivers", "kernel/iommu_groups"] {
            try fm.createDirectory(atPath: "\(root)/\(d)", withIntermediateDirectories: true)
        }
        try file("bus/pci/drivers_probe")
    }

    deinit { try? fm.removeItem(atPath: root) }

    func file(_ path: String, _ text: String = "") throws {
        try text.write(toFile: "\(root)/\(path)", atomically: false, encoding: .utf8)
    }
    func text(_ path: String) -> String { (try? String(contentsOfFile: "\(root)/\(path)", encoding: .utf8)) ?? "<missing>" }

    func addDriver(_ name: String) throws {
        try fm.createDirectory(atPath: "\(root)/bus/pci/drivers/\(name)", withIntermediateDirectories: true)
        try file("bus/pci/drivers/\(name)/bind")
        try file("bus/pci/drivers/\(name)/unbind")
    }

    func addDevice(_ bdf: String, group: Int, driver: String?) throws {
        let dev = "bus/pci/devices/\(bdf)"
        try fm.createDirectory(atPath: "\(root)/\(dev)", withIntermediateDirectories: true)
        try file("\(dev)/driver_override", "(null)\n")
        try fm.createDirectory(atPath: "\(root)/kernel/iommu_groups/\(group)/devices", withIntermediateDirectories: true)
        try fm.createSymbolicLink(atPath: "\(root)/\(dev)/iommu_group", withDestinationPath: "../../../../kernel/iommu_groups/\(group)")
        try fm.createSymbolicLink(atPath: "\(root)/kernel/iommu_groups/\(group)/devices/\(bdf)",
                                  withDestinationPath: "../../../../bus/pci/devices/\(bdf)")
        if let driver { try link(bdf, to: driver) }
    }

    func link(_ bdf: String, to driver: String?) throws {
        let path = "\(root)/bus/pci/devices/\(bdf)/driver"
        try? fm.removeItem(atPath: path)
        if let driver { try fm.createSymbolicLink(atPath: path, withDestinationPath: "../../../../bus/pci/drivers/\(driver)") }
    }
}

/// What the kernel does after a write to the fake tree, and the writes in order (paths
/// relative to the root).
final class FakeKernel {
    let tree: FakeSysfs
    /// The driver drivers_probe picks for a function without an override.
    var native: [String: String] = [:]
    /// Whether drivers_probe honours driver_override (false: only an explicit bind works).
    var probeHonoursOverride = true
    /// Whether vfio-pci accepts a device at all.
    var vfioAccepts = true
    var writes: [String] = []

    init(_ tree: FakeSysfs) { self.tree = tree }

    var sysfs: PCISysfs {
        PCISysfs(root: tree.root) { [self] path, text in react(String(path.dropFirst(tree.root.count + 1)), text) }
    }

    func react(_ path: String, _ text: String) {
        writes.append("\(path) \(text == "\n" ? "\\n" : text)")
        let parts = path.split(separator: "/").map(String.init)
        func override(_ bdf: String) -> String {
            tree.text("bus/pci/devices/\(bdf)/driver_override").trimmingCharacters(in: .whitespacesAndNewlines)
        }
        func attach(_ bdf: String, _ driver: String) {
            if driver == "vfio-pci" && !vfioAccepts { return }
            try? tree.link(bdf, to: driver)
        }
        if path == "bus/pci/drivers_probe" {
            let o = override(text)
            if o != "(null)" && !o.isEmpty {
                if probeHonoursOverride { attach(text, o) }
            } else if let n = native[text] {
                attach(text, n)
            }
        } else if parts.count == 5, parts[2] == "drivers", parts[4] == "unbind" {
            try? tree.link(text, to: nil)
        } else if parts.count == 5, parts[2] == "drivers", parts[4] == "bind" {
            let o = override(text)
            if o == "(null)" || o.isEmpty || o == parts[3] { attach(text, parts[3]) }
        }
    }
}

@Suite struct PCISysfsTests {
    let a = PCIAddress("0000:00:04.0")!

    func tree() throws -> (FakeSysfs, FakeKernel) {
        let t = try FakeSysfs()
        try t.addDriver("virtio-pci")
        try t.addDriver("vfio-pci")
        try t.addDevice("0000:00:04.0", group: 3, driver: "virtio-pci")
        let k = FakeKernel(t)
        k.native["0000:00:04.0"] = "virtio-pci"
        return (t, k)
    }

    @Test func bindsAndRestoresInOrder() throws {
        let (t, k) = try tree()
        let s = k.sysfs
        #expect(s.driver(of: a) == "virtio-pci")
        #expect(try s.bindToVFIO(a) == "virtio-pci")
        #expect(k.writes == ["bus/pci/devices/0000:00:04.0/driver_override vfio-pci",
                             "bus/pci/drivers/virtio-pci/unbind 0000:00:04.0",
                             "bus/pci/drivers_probe 0000:00:04.0"])
        #expect(s.driver(of: a) == "vfio-pci")
        #expect(t.text("bus/pci/devices/0000:00:04.0/driver_override") == "vfio-pci")

        k.writes = []
        try s.restore(a, previousDriver: "virtio-pci")
        #expect(k.writes == ["bus/pci/drivers/vfio-pci/unbind 0000:00:04.0",
                             "bus/pci/devices/0000:00:04.0/driver_override \\n",
                             "bus/pci/drivers/virtio-pci/bind 0000:00:04.0"])
        #expect(s.driver(of: a) == "virtio-pci")
    }

    @Test func alreadyBoundIsANoOp() throws {
        let (t, k) = try tree()
        try t.link("0000:00:04.0", to: "vfio-pci")
        #expect(try k.sysfs.bindToVFIO(a) == "vfio-pci")
        try k.sysfs.restore(a, previousDriver: "vfio-pci")
        #expect(k.writes.isEmpty)
    }

    @Test func unboundFunctionIsBoundAndLeftUnboundOnRestore() throws {
        let (t, k) = try tree()
        try t.link("0000:00:04.0", to: nil)
        #expect(k.sysfs.driver(of: a) == nil)
        #expect(try k.sysfs.bindToVFIO(a) == nil)
        #expect(k.writes == ["bus/pci/devices/0000:00:04.0/driver_override vfio-pci", "bus/pci/drivers_probe 0000:00:04.0"])
        k.writes = []
        try k.sysfs.restore(a, previousDriver: nil)
        #expect(k.writes == ["bus/pci/drivers/vfio-pci/unbind 0000:00:04.0", "bus/pci/devices/0000:00:04.0/driver_override \\n"])
        #expect(k.sysfs.driver(of: a) == nil)
    }

    @Test func bindsExplicitlyWhenTheProbeDoesNotTake() throws {
        let (_, k) = try tree()
        k.probeHonoursOverride = false
        #expect(try k.sysfs.bindToVFIO(a) == "virtio-pci")
        #expect(k.writes.last == "bus/pci/drivers/vfio-pci/bind 0000:00:04.0")
        #expect(k.sysfs.driver(of: a) == "vfio-pci")
    }

    @Test func failedBindRestoresThePreviousDriver() throws {
        let (_, k) = try tree()
        k.vfioAccepts = false
        #expect(throws: PCIError.self) { _ = try k.sysfs.bindToVFIO(a) }
        #expect(k.sysfs.driver(of: a) == "virtio-pci")
        #expect(k.writes.contains("bus/pci/devices/0000:00:04.0/driver_override \\n"))
    }

    @Test func refusesWithoutTheVFIODriver() throws {
        let (t, k) = try tree()
        try FileManager.default.removeItem(atPath: "\(t.root)/bus/pci/drivers/vfio-pci")
        do throws(PCIError) {
            _ = try k.sysfs.bindToVFIO(a)
            Issue.record("bound without vfio-pci")
        } catch {
            #expect(error.description.contains("modprobe vfio-pci"))
        }
        #expect(k.writes.isEmpty)
        #expect(throws: PCIError.self) { _ = try k.sysfs.bindToVFIO(PCIAddress("0000:00:09.0")!) }
    }

    @Test func groupsMembersAndBlockers() throws {
        let (t, k) = try tree()
        for d in ["e1000e", "pcieport", "pci-stub"] { try t.addDriver(d) }
        try t.addDevice("0000:00:04.1", group: 3, driver: "vfio-pci")
        try t.addDevice("0000:00:04.2", group: 3, driver: "pcieport")
        try t.addDevice("0000:00:04.3", group: 3, driver: nil)
        try t.addDevice("0000:00:04.4", group: 3, driver: "e1000e")
        try t.addDevice("0000:00:04.5", group: 3, driver: "pci-stub")
        try t.addDevice("0000:00:05.0", group: 4, driver: "virtio-pci")
        let s = k.sysfs
        #expect(try s.iommuGroup(of: a) == 3)
        #expect(try s.iommuGroup(of: PCIAddress("0000:00:05.0")!) == 4)
        #expect(try s.groupMembers(of: a).map(\.description) == (0...5).map { "0000:00:04.\($0)" })
        #expect(try s.groupBlockers(of: a).map(\.description) == ["0000:00:04.0", "0000:00:04.4"])
        #expect(try s.groupBlockers(of: PCIAddress("0000:00:05.0")!).map(\.description) == ["0000:00:05.0"])
    }

    @Test func refusesBadGroupLinks() throws {
        let (t, k) = try tree()
        try FileManager.default.createDirectory(atPath: "\(t.root)/bus/pci/devices/0000:00:06.0", withIntermediateDirectories: true)
        try FileManager.default.createSymbolicLink(atPath: "\(t.root)/bus/pci/devices/0000:00:06.0/iommu_group",
                                                   withDestinationPath: "../../../../kernel/iommu_groups/x7")
        try FileManager.default.createDirectory(atPath: "\(t.root)/bus/pci/devices/0000:00:07.0", withIntermediateDirectories: true)
        func message(_ bdf: String) -> String {
            do throws(PCIError) { return "group \(try k.sysfs.iommuGroup(of: PCIAddress(bdf)!))" } catch { return error.description }
        }
        #expect(message("0000:00:06.0").contains("not to an IOMMU group"))
        #expect(message("0000:00:07.0").contains("iommu_group is missing"))
        #expect(message("0000:00:08.0").contains("does not exist"))
    }

    @Test func reservedRegions() throws {
        let (t, k) = try tree()
        try t.file("kernel/iommu_groups/3/reserved_regions",
                   "0x00000000fee00000 0x00000000feefffff msi\n0x0000000000000000 0x0000000000ffffff direct-relaxable\n")
        #expect(try k.sysfs.reservedRegions(group: 3) == [IOVARange(first: 0xfee0_0000, last: 0xfeef_ffff),
                                                           IOVARange(first: 0, last: 0xff_ffff)])
        #expect(try PCISysfs.parseReservedRegions("") == [])
        for bad in ["0xfee00000\n", "fee00000 feefffff msi\n", "0x10 0x5 msi\n", "0x 0x5 msi\n", "0x10000000000000000 0x1 msi\n", "0xzz 0x1 x\n"] {
            #expect(throws: PCIError.self, "\(bad)") { _ = try PCISysfs.parseReservedRegions(bad) }
        }
        #expect(throws: PCIError.self) { _ = try k.sysfs.reservedRegions(group: 9) }
    }
}
