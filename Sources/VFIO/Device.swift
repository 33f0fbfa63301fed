import CLinux
import OutboardSystem

#if canImport(Glibc)
import Glibc
#endif

/// A vfio-pci device: the descriptor VFIO_GROUP_GET_DEVICE_FD gave (the manager opens it,
/// a driver adopts it from SCM_RIGHTS), owned here. Config space is read and written through
/// the config region of the descriptor, BARs are mmapped from it, MSI-X vectors are routed
/// to eventfds with VFIO_DEVICE_SET_IRQS. BAR mappings live until the device goes away.
public struct VFIODevice: ~Copyable, PCIFunction {
    let fd: OwnedFD
    /// VFIO_DEVICE_GET_INFO's flags (VFIO_DEVICE_FLAGS_PCI, _RESET, ...).
    public let flags: UInt32
    public let regionCount: Int
    public let irqCount: Int
    /// The configuration space region (VFIO_PCI_CONFIG_REGION_INDEX).
    public let configRegion: VFIORegion
    private var mappings: [MappedBAR] = []
    /// MSI-X vectors routed by routeMSIX (0: MSI-X not enabled through this value).
    public private(set) var msixRouted = 0

    /// The descriptor, for sending over SCM_RIGHTS (it stays owned here).
    public var descriptor: CInt { fd.raw.rawValue }
    /// Whether the device offers VFIO_DEVICE_RESET.
    public var canReset: Bool { flags & UInt32(VFIO_DEVICE_FLAGS_RESET) != 0 }

    /// Adopts a device descriptor and reads what it is (VFIO_DEVICE_GET_INFO): it must be a
    /// vfio-pci device with a configuration region.
    public init(adopting fd: consuming OwnedFD) throws(PCIError) {
        let raw = fd.raw.rawValue
        var info = vfio_device_info()
        info.argsz = UInt32(MemoryLayout<vfio_device_info>.size)
        _ = try vfioCall("VFIO_DEVICE_GET_INFO") { ob_vfio_ioctl_ptr(raw, ob_vfio_req_device_get_info(), &info) }
        guard info.flags & UInt32(VFIO_DEVICE_FLAGS_PCI) != 0 else {
            throw .unsupported("a vfio-pci device: VFIO_DEVICE_GET_INFO flags \(hex(info.flags)) do not say PCI")
        }
        let configIndex = Int(VFIO_PCI_CONFIG_REGION_INDEX)
        guard Int(info.num_regions) > configIndex else {
            throw .malformed("vfio-pci device with \(info.num_regions) regions (the config region is \(configIndex))")
        }
        let config = try Self.regionInfo(raw, configIndex)
        guard config.size >= 0x40, config.readable else {
            throw .malformed("config region of \(hex(config.size)) bytes, flags \(hex(config.flags))")
        }
        flags = info.flags
        regionCount = Int(info.num_regions)
        irqCount = Int(info.num_irqs)
        configRegion = config
        self.fd = fd
    }

    deinit {
        for m in mappings { _ = munmap(m.base, m.size) }
    }

    // MARK: Regions and interrupts

    /// Region `index` (VFIO_DEVICE_GET_REGION_INFO, with its capability chain: sparse mmap,
    /// MSI-X mappable). BARs are 0...5, the ROM 6, config space 7.
    public func regionInfo(_ index: Int) throws(PCIError) -> VFIORegion {
        guard index >= 0, index < regionCount else {
            throw .unsupported("region \(index) (the device has \(regionCount))")
        }
        return try Self.regionInfo(fd.raw.rawValue, index)
    }

    static func regionInfo(_ raw: CInt, _ index: Int) throws(PCIError) -> VFIORegion {
        var size = MemoryLayout<vfio_region_info>.size
        for _ in 0..<3 {
            var b = argszBuffer(size)
            b.storeLE(UInt32(index), at: 8)
            _ = try vfioCall("VFIO_DEVICE_GET_REGION_INFO \(index)") {
                b.withUnsafeMutableBytes { ob_vfio_ioctl_ptr(raw, ob_vfio_req_device_get_region_info(), $0.baseAddress) }
            }
            let wanted = Int(b.loadLE(UInt32.self, at: 0)!)
            let flags = b.loadLE(UInt32.self, at: 4)!
            if wanted > size && flags & UInt32(VFIO_REGION_INFO_FLAG_CAPS) != 0 {
                guard wanted <= 1 << 16 else { throw .malformed("region \(index) info asks for a \(wanted)-byte buffer") }
                size = wanted
                continue
            }
            let regionSize = b.loadLE(UInt64.self, at: 16)!, offset = b.loadLE(UInt64.self, at: 24)!
            guard regionSize <= UInt64.max - offset else {
                throw .malformed("region \(index) at \(hex(offset)) + \(hex(regionSize)) wraps past 2^64")
            }
            let caps = wanted > size ? (sparseAreas: nil, msixMappable: false)
                                     : try VFIOInfoChain.regionCapabilities(b, regionSize: regionSize)
            return VFIORegion(index: index, offset: offset, size: regionSize, flags: flags,
                              sparseAreas: caps.sparseAreas, msixMappable: caps.msixMappable)
        }
        throw .malformed("region \(index) info keeps asking for a larger buffer")
    }

    /// Interrupt index `index` (VFIO_DEVICE_GET_IRQ_INFO): INTx 0, MSI 1, MSI-X 2, ERR 3, REQ 4.
    public func irqInfo(_ index: Int) throws(PCIError) -> VFIOIRQInfo {
        guard index >= 0, index < irqCount else {
            throw .unsupported("interrupt index \(index) (the device has \(irqCount))")
        }
        var info = vfio_irq_info()
        info.argsz = UInt32(MemoryLayout<vfio_irq_info>.size)
        info.index = UInt32(index)
        let raw = fd.raw.rawValue
        _ = try vfioCall("VFIO_DEVICE_GET_IRQ_INFO \(index)") { ob_vfio_ioctl_ptr(raw, ob_vfio_req_device_get_irq_info(), &info) }
        return VFIOIRQInfo(index: index, count: Int(info.count), flags: info.flags)
    }

    // MARK: Configuration space

    /// Throws unless `offset ..< offset + count` lies inside a configuration space of
    /// `size` bytes (count 0 is allowed at any offset up to `size`).
    public static func checkConfigRange(offset: Int, count: Int, size: UInt64) throws(PCIError) {
        guard offset >= 0, count >= 0, UInt64(offset) <= size, UInt64(count) <= size - UInt64(offset) else {
            throw .unsupported("config space access at \(offset) of \(count) bytes (the config space has \(size))")
        }
    }

    public mutating func readConfig(offset: Int, count: Int) throws(PCIError) -> [UInt8] {
        try Self.checkConfigRange(offset: offset, count: count, size: configRegion.size)
        var out = [UInt8](repeating: 0, count: count)
        let raw = fd.raw.rawValue, base = configRegion.offset
        var done = 0
        while done < count {
            let n = try vfioCall("config read at \(offset + done)") {
                out.withUnsafeMutableBytes { pread(raw, $0.baseAddress! + done, count - done, off_t(base) + off_t(offset + done)) }
            }
            guard n > 0 else { throw .system("config read at \(offset + done): end of region") }
            done += n
        }
        return out
    }

    public mutating func writeConfig(offset: Int, bytes: [UInt8]) throws(PCIError) {
        try Self.checkConfigRange(offset: offset, count: bytes.count, size: configRegion.size)
        guard configRegion.writable else { throw .unsupported("a writable config region") }
        let raw = fd.raw.rawValue, base = configRegion.offset
        var done = 0
        while done < bytes.count {
            let n = try vfioCall("config write at \(offset + done)") {
                bytes.withUnsafeBytes { pwrite(raw, $0.baseAddress! + done, bytes.count - done, off_t(base) + off_t(offset + done)) }
            }
            guard n > 0 else { throw .system("config write at \(offset + done): nothing written") }
            done += n
        }
    }

    /// Sets Memory Space (bit 1) and Bus Master (bit 2) in the command register.
    public mutating func enableMemoryAndBusMaster() throws(PCIError) {
        let b = try readConfig(offset: 4, count: 2)
        let command = (UInt16(b[0]) | UInt16(b[1]) << 8) | 0x6
        try writeConfig(offset: 4, bytes: [UInt8(command & 0xff), UInt8(command >> 8)])
    }

    /// The standard capability list, from a copy of the first 256 bytes of config space.
    public mutating func capabilities() throws(PCIError) -> PCICapabilities {
        try PCICapabilities(config: readConfig(offset: 0, count: Int(min(configRegion.size, 256))))
    }

    // MARK: BARs, MSI-X, reset

    public mutating func mapBAR(_ index: Int) throws(PCIError) -> MappedBAR {
        guard (0...5).contains(index) else { throw .unsupported("BAR \(index) (BARs are 0 to 5)") }
        if let m = mappings.first(where: { $0.index == index }) { return m }
        let r = try regionInfo(index)
        guard r.size > 0 else { throw .unsupported("BAR \(index) (the device does not implement it)") }
        guard r.mappable else {
            throw .unsupported("an mmappable BAR \(index): VFIO offers no mmap of it (an I/O-port BAR, or one the kernel will not map)")
        }
        guard r.fullyMappable else {
            let areas = r.mappableAreas.map { "\(hex($0.offset))+\(hex($0.size))" }.joined(separator: ", ")
            throw .unsupported("a fully mmappable BAR \(index) of \(hex(r.size)) bytes: VFIO maps only [\(areas)] of it "
                               + "(the MSI-X table lies in it and the kernel keeps it unmapped)")
        }
        guard r.size <= UInt64(Int.max), r.offset <= UInt64(off_t.max) else {
            throw .malformed("BAR \(index) of \(hex(r.size)) bytes at \(hex(r.offset))")
        }
        let prot = PROT_READ | (r.writable ? PROT_WRITE : 0)
        guard let p = mmap(nil, Int(r.size), prot, MAP_SHARED, fd.raw.rawValue, off_t(r.offset)), p != MAP_FAILED else {
            throw .system("mmap BAR \(index) (\(hex(r.size)) bytes): \(errnoText(errno))")
        }
        let m = MappedBAR(index: index, base: p, size: Int(r.size))
        mappings.append(m)
        return m
    }

    public mutating func msixVectorCount() throws(PCIError) -> Int {
        let index = Int(VFIO_PCI_MSIX_IRQ_INDEX)
        guard index < irqCount else { return 0 }
        return try irqInfo(index).count
    }

    public mutating func routeMSIX(to eventfds: [CInt]) throws(PCIError) {
        let index = UInt32(VFIO_PCI_MSIX_IRQ_INDEX)
        if eventfds.isEmpty {
            guard msixRouted > 0 else { return }
            try setIRQs(index: index, flags: UInt32(VFIO_IRQ_SET_DATA_NONE) | UInt32(VFIO_IRQ_SET_ACTION_TRIGGER), fds: [])
            msixRouted = 0
            return
        }
        let vectors = try msixVectorCount()
        guard eventfds.count <= vectors else {
            throw .unsupported("\(eventfds.count) MSI-X vectors (the device has \(vectors))")
        }
        for fd in eventfds where fd < 0 { throw .unsupported("an MSI-X route to descriptor \(fd)") }
        // The kernel sizes MSI-X at the first enable; a different count needs a new enable.
        if msixRouted > 0 && msixRouted != eventfds.count {
            try setIRQs(index: index, flags: UInt32(VFIO_IRQ_SET_DATA_NONE) | UInt32(VFIO_IRQ_SET_ACTION_TRIGGER), fds: [])
            msixRouted = 0
        }
        try setIRQs(index: index, flags: UInt32(VFIO_IRQ_SET_DATA_EVENTFD) | UInt32(VFIO_IRQ_SET_ACTION_TRIGGER), fds: eventfds)
        msixRouted = eventfds.count
    }

    private func setIRQs(index: UInt32, flags: UInt32, fds: [CInt]) throws(PCIError) {
        let data = Int(ob_vfio_irq_set_data_offset())
        var b = argszBuffer(data + 4 * fds.count)
        b.storeLE(flags, at: 4)
        b.storeLE(index, at: 8)
        b.storeLE(UInt32(0), at: 12)
        b.storeLE(UInt32(fds.count), at: 16)
        for (i, f) in fds.enumerated() { b.storeLE(f, at: data + 4 * i) }
        let raw = fd.raw.rawValue
        let what = fds.isEmpty ? "disable" : "\(fds.count) eventfds"
        _ = try vfioCall("VFIO_DEVICE_SET_IRQS index \(index) (\(what))") {
            b.withUnsafeMutableBytes { ob_vfio_ioctl_ptr(raw, ob_vfio_req_device_set_irqs(), $0.baseAddress) }
        }
    }

    public mutating func resetFunction() throws(PCIError) -> Bool {
        guard canReset else { return false }
        let raw = fd.raw.rawValue
        _ = try vfioCall("VFIO_DEVICE_RESET") { ob_vfio_ioctl_none(raw, ob_vfio_req_device_reset()) }
        return true
    }
}
