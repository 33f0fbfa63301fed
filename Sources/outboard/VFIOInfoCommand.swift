import ArgumentParser
import CLinux
import OutboardRings
import OutboardSystem
import VFIO

#if canImport(Glibc)
import Glibc
#endif

/// `outboard vfio-info BDF [--bind] [--json] [--exercise]`: opens a PCI function through
/// VFIO (container, group, device) and prints what VFIO says about it: device flags,
/// regions, interrupt indexes, the capability list, MSI-X, the IOMMU's page sizes and IOVA
/// ranges, the group's reserved regions. With --bind it binds the function to vfio-pci
/// first and restores its driver afterwards (after every VFIO descriptor is closed: the
/// kernel's unbind waits for them). With --exercise it also maps the memory BARs, maps one
/// page for DMA and unmaps it, routes every MSI-X vector to an eventfd and disables MSI-X
/// again. Needs root. Text lines (one fact each):
///
///     device BDF group N driver D previous-driver D|none
///     config vendor 0xV device 0xD class 0xC command 0xC status 0xS
///     info flags 0xF pci true reset true|false regions N irqs N
///     region I NAME size 0xS offset 0xO flags 0xF read|write|mmap... [sparse A+S,...] [msix-mappable]
///     irq I NAME count N flags 0xF [eventfd] [maskable] [automasked] [noresize]
///     capability 0xOFF id 0xID NAME [cfg-type T bar B offset 0xO length 0xL]
///     msix vectors N table-bar B table-offset 0xO pba-bar B pba-offset 0xO enabled E
///     iommu type TYPE1v2|TYPE1 page-sizes 0xP
///     iova-range 0xFIRST-0xLAST
///     reserved-region 0xFIRST-0xLAST
///     exercise ... ok   (--exercise)
struct VFIOInfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vfio-info",
        abstract: "Open a PCI function through VFIO and print its regions, interrupts, capabilities and IOMMU (needs root)."
    )

    @Argument(help: "The PCI function, e.g. 0000:00:04.0.")
    var bdf: String

    @Flag(help: "Bind the function to vfio-pci first, and restore its driver afterwards.")
    var bind = false

    @Flag(help: "One JSON object instead of text lines.")
    var json = false

    @Flag(help: "Also map the BARs, map and unmap a DMA page, route MSI-X to eventfds and disable it.")
    var exercise = false

    func run() throws {
        guard let address = PCIAddress(bdf) else { throw ValidationError("not a PCI address: \(bdf) (e.g. 0000:00:04.0)") }
        let sysfs = PCISysfs()
        var previous: String?? = .none
        if bind { previous = .some(try sysfs.bindToVFIO(address)) }
        var out = Report()
        let result = Result { () throws(PCIError) in try inspect(address, sysfs, previous: previous, into: &out) }
        // Every VFIO descriptor is closed here: restoring may unbind from vfio-pci now.
        var restoreError: PCIError?
        if case .some(let p) = previous, p != "vfio-pci" {
            do throws(PCIError) { try sysfs.restore(address, previousDriver: p) } catch { restoreError = error }
        }
        switch result {
        case .success:
            print(json ? out.json() : out.text(), terminator: json ? "\n" : "")
        case .failure(let e):
            if !json { print(out.text(), terminator: "") }
            throw e
        }
        if let restoreError { throw restoreError }
    }

    private func inspect(_ address: PCIAddress, _ sysfs: PCISysfs, previous: String??, into out: inout Report) throws(PCIError) {
        let group = try sysfs.iommuGroup(of: address)
        var line = Line("device", address.description)
        line.add("group", group)
        line.add("driver", sysfs.driver(of: address) ?? "none")
        if case .some(let p) = previous { line.add("previous-driver", p ?? "none") }
        out.append(line)

        var container = try VFIOContainer()
        let vfioGroup = try VFIOGroup(number: group)
        try container.attach(vfioGroup)
        var device = try vfioGroup.openDevice(address)

        let header = try device.readConfig(offset: 0, count: 0x40)
        func u16(_ o: Int) -> UInt16 { UInt16(header[o]) | UInt16(header[o + 1]) << 8 }
        var config = Line("config")
        config.add("vendor", hex(u16(0)))
        config.add("device", hex(u16(2)))
        let classCode = String(UInt32(header[9]) | UInt32(header[10]) << 8 | UInt32(header[11]) << 16, radix: 16)
        config.add("class", "0x" + String(repeating: "0", count: max(0, 6 - classCode.count)) + classCode)
        config.add("command", hex(u16(4)))
        config.add("status", hex(u16(6)))
        out.append(config)

        var info = Line("info")
        info.add("flags", hex(device.flags))
        info.add("pci", device.flags & UInt32(VFIO_DEVICE_FLAGS_PCI) != 0)
        info.add("reset", device.canReset)
        info.add("regions", device.regionCount)
        info.add("irqs", device.irqCount)
        out.append(info)

        let regionNames = ["BAR0", "BAR1", "BAR2", "BAR3", "BAR4", "BAR5", "ROM", "config", "VGA"]
        for i in 0..<device.regionCount {
            // vfio-pci refuses the info of the VGA region (8) of a device that is no VGA device.
            let r: VFIORegion
            do throws(PCIError) { r = try device.regionInfo(i) } catch {
                if i >= Int(VFIO_PCI_VGA_REGION_INDEX) { continue }
                throw error
            }
            guard r.size > 0 else { continue }
            var l = Line("region", i)
            l.add("name", i < regionNames.count ? regionNames[i] : "device-specific")
            l.add("size", hex(r.size))
            l.add("offset", hex(r.offset))
            l.add("flags", hex(r.flags))
            l.add("read", r.readable)
            l.add("write", r.writable)
            l.add("mmap", r.mappable)
            if let areas = r.sparseAreas { l.add("sparse", areas.map { "\(hex($0.offset))+\(hex($0.size))" }.joined(separator: ",")) }
            if r.msixMappable { l.add("msix-mappable", true) }
            out.append(l)
        }
        let irqNames = ["INTx", "MSI", "MSI-X", "ERR", "REQ"]
        for i in 0..<device.irqCount {
            // vfio-pci refuses ERR (3) on functions without PCIe AER, and REQ (4) where unsupported.
            let q: VFIOIRQInfo
            do throws(PCIError) { q = try device.irqInfo(i) } catch {
                if i >= Int(VFIO_PCI_ERR_IRQ_INDEX) { continue }
                throw error
            }
            var l = Line("irq", i)
            l.add("name", i < irqNames.count ? irqNames[i] : "other")
            l.add("count", q.count)
            l.add("flags", hex(q.flags))
            l.add("eventfd", q.eventfd)
            l.add("maskable", q.maskable)
            l.add("automasked", q.automasked)
            l.add("noresize", q.noResize)
            out.append(l)
        }

        let caps = try device.capabilities()
        let vendor = u16(0)
        for c in caps.entries {
            var l = Line("capability", hex(c.offset))
            l.add("id", hex(c.id))
            l.add("name", capabilityName(c.id))
            // virtio-pci's vendor capability (virtio 1.2 §4.1.4): cfg_type, bar, offset, length.
            if c.id == PCICapabilities.vendorSpecific, vendor == 0x1af4, c.offset + 16 <= caps.config.count {
                let b = caps.config
                l.add("cfg-type", Int(b[c.offset + 3]))
                l.add("bar", Int(b[c.offset + 4]))
                l.add("offset", hex(le32(b, c.offset + 8)))
                l.add("length", hex(le32(b, c.offset + 12)))
            }
            out.append(l)
        }
        if let m = caps.msix() {
            var l = Line("msix")
            l.add("vectors", m.tableSize)
            l.add("irq-count", try device.msixVectorCount())
            l.add("table-bar", m.tableBAR)
            l.add("table-offset", hex(m.tableOffset))
            l.add("pba-bar", m.pbaBAR)
            l.add("pba-offset", hex(m.pbaOffset))
            l.add("enabled", m.enabled)
            out.append(l)
        }

        let iommu = try container.info()
        var il = Line("iommu")
        il.add("type", container.iommuType == VFIO_TYPE1v2_IOMMU ? "TYPE1v2" : "TYPE1")
        il.add("page-sizes", hex(iommu.pageSizes))
        out.append(il)
        for r in iommu.iovaRanges { out.append(Line("iova-range", r.description)) }
        for r in try sysfs.reservedRegions(group: group) { out.append(Line("reserved-region", r.description)) }

        if exercise { try exerciseDevice(&device, container, iommu, caps, into: &out) }
    }

    /// BAR maps, a DMA map and unmap of one page, MSI-X routed to eventfds and disabled.
    private func exerciseDevice(_ device: inout VFIODevice, _ container: borrowing VFIOContainer, _ iommu: VFIOIOMMUInfo,
                                _ caps: PCICapabilities, into out: inout Report) throws(PCIError) {
        try device.enableMemoryAndBusMaster()
        let command = try device.readConfig(offset: 4, count: 2)
        var el = Line("exercise", "command")
        el.add("value", hex(UInt16(command[0]) | UInt16(command[1]) << 8))
        el.add("ok", true)
        out.append(el)

        for i in 0...5 {
            let r = try device.regionInfo(i)
            guard r.size > 0, r.mappable else { continue }
            let bar = try device.mapBAR(i)
            var l = Line("exercise", "bar")
            l.add("index", i)
            l.add("size", hex(bar.size))
            if bar.size >= 4 { l.add("first-dword", hex(ob_mmio_read32(bar.base))) }
            l.add("ok", true)
            out.append(l)
        }

        // One page of anonymous memory at the first page-aligned IOVA of at least 1 MiB.
        let page = iommu.pageSizes != 0 ? Int(1 << UInt64(iommu.pageSizes.trailingZeroBitCount)) : 4096
        let pageSize = max(page, Int(sysconf(Int32(_SC_PAGESIZE))))
        var iova: UInt64?
        for r in iommu.iovaRanges.isEmpty ? [IOVARange(first: 0, last: UInt64.max)] : iommu.iovaRanges {
            let start = max(r.first, 1 << 20)
            let aligned = (start + UInt64(pageSize) - 1) & ~(UInt64(pageSize) - 1)
            if aligned >= start, r.contains(aligned, size: UInt64(pageSize)) { iova = aligned; break }
        }
        guard let iova else { throw .unsupported("an IOVA range with room for one page above 1 MiB") }
        guard let mem = mmap(nil, pageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), mem != MAP_FAILED else {
            throw .system("mmap of one DMA page: \(String(cString: strerror(errno)))")
        }
        defer { munmap(mem, pageSize) }
        memset(mem, 0, pageSize)
        try container.map(hostAddress: mem, ioAddress: IOAddress(rawValue: iova), size: pageSize, writable: true)
        var ml = Line("exercise", "dma-map")
        ml.add("iova", hex(iova))
        ml.add("size", hex(pageSize))
        ml.add("ok", true)
        out.append(ml)
        try container.unmap(ioAddress: IOAddress(rawValue: iova), size: pageSize)
        var ul = Line("exercise", "dma-unmap")
        ul.add("ok", true)
        out.append(ul)

        let vectors = try device.msixVectorCount()
        if vectors > 0 {
            // Raw eventfds (an array of owners cannot hold ~Copyable values), closed below.
            var eventfds: [CInt] = []
            defer { for f in eventfds { close(f) } }
            for _ in 0..<vectors {
                let f = ob_eventfd(0, OB_EFD_CLOEXEC | OB_EFD_NONBLOCK)
                guard f >= 0 else { throw .system("eventfd: \(String(cString: strerror(errno)))") }
                eventfds.append(f)
            }
            try device.routeMSIX(to: eventfds)
            var rl = Line("exercise", "msix-route")
            rl.add("vectors", vectors)
            let after = try device.capabilities().msix()
            rl.add("enabled", after?.enabled ?? false)
            rl.add("ok", true)
            out.append(rl)
            try device.routeMSIX(to: [])
            var dl = Line("exercise", "msix-disable")
            dl.add("enabled", try device.capabilities().msix()?.enabled ?? false)
            dl.add("ok", true)
            out.append(dl)
        }
        var reset = Line("exercise", "reset")
        reset.add("done", try device.resetFunction())
        reset.add("ok", true)
        out.append(reset)
    }
}

private func le32(_ b: [UInt8], _ o: Int) -> UInt32 {
    UInt32(b[o]) | UInt32(b[o + 1]) << 8 | UInt32(b[o + 2]) << 16 | UInt32(b[o + 3]) << 24
}

private func hex<T: BinaryInteger>(_ v: T) -> String { "0x" + String(v, radix: 16) }

private func capabilityName(_ id: UInt8) -> String {
    switch id {
    case 0x01: return "power-management"
    case 0x05: return "MSI"
    case 0x09: return "vendor-specific"
    case 0x10: return "PCI-Express"
    case 0x11: return "MSI-X"
    case 0x12: return "SATA"
    case 0x13: return "advanced-features"
    default: return "other"
    }
}

/// One fact of the report: a kind, an optional subject, then named values. Text: the kind,
/// the subject and `name value` pairs on one line; JSON: an object in the kind's array.
private struct Line {
    enum Value {
        case string(String), int(Int), bool(Bool)
        var text: String {
            switch self { case .string(let s): return s; case .int(let i): return String(i); case .bool(let b): return String(b) }
        }
        var json: String {
            switch self { case .string(let s): return jsonString(s); case .int(let i): return String(i); case .bool(let b): return String(b) }
        }
    }
    var kind: String
    var subject: Value?
    var fields: [(String, Value)] = []
    init(_ kind: String) { self.kind = kind }
    init(_ kind: String, _ subject: String) { self.kind = kind; self.subject = .string(subject) }
    init(_ kind: String, _ subject: Int) { self.kind = kind; self.subject = .int(subject) }
    mutating func add(_ name: String, _ v: String) { fields.append((name, .string(v))) }
    mutating func add(_ name: String, _ v: Int) { fields.append((name, .int(v))) }
    mutating func add(_ name: String, _ v: Bool) { fields.append((name, .bool(v))) }
}

private struct Report {
    var lines: [Line] = []
    mutating func append(_ l: Line) { lines.append(l) }

    func text() -> String {
        var s = ""
        for l in lines {
            s += l.kind
            if let subject = l.subject { s += " " + subject.text }
            for (n, v) in l.fields { s += " \(n) \(v.text)" }
            s += "\n"
        }
        return s
    }

    /// {"kind": [ {"subject": ..., fields...}, ... ], ...}, kinds in order of first use.
    func json() -> String {
        var kinds: [String] = []
        for l in lines where !kinds.contains(l.kind) { kinds.append(l.kind) }
        let parts = kinds.map { kind in
            let objects = lines.filter { $0.kind == kind }.map { l in
                var f: [String] = []
                if let subject = l.subject { f.append("\"subject\":\(subject.json)") }
                for (n, v) in l.fields { f.append("\(jsonString(n)):\(v.json)") }
                return "{" + f.joined(separator: ",") + "}"
            }
            return "\(jsonString(kind)):[\(objects.joined(separator: ","))]"
        }
        return "{" + parts.joined(separator: ",") + "}"
    }
}

private func jsonString(_ s: String) -> String {
    var out = "\""
    for u in s.unicodeScalars {
        switch u {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        case "\n": out += "\\n"
        default:
            if u.value < 0x20 { out += "\\u00" + (u.value < 0x10 ? "0" : "") + String(u.value, radix: 16) } else { out.unicodeScalars.append(u) }
        }
    }
    return out + "\""
}
