import CLinux
import OutboardRings
import OutboardSystem

#if canImport(Glibc)
import Glibc
#endif

/// A VFIO container (/dev/vfio/vfio): one IOMMU address space that groups are attached to,
/// and where DMA mappings are made. Its descriptor is owned here and closed with it (which
/// drops every mapping and detaches its groups).
public struct VFIOContainer: ~Copyable {
    let fd: OwnedFD
    /// The IOMMU model: VFIO_TYPE1v2_IOMMU where the kernel offers it, else VFIO_TYPE1_IOMMU.
    public let iommuType: Int32
    /// Set once the first group is attached and the IOMMU model chosen (VFIO_SET_IOMMU).
    public private(set) var iommuSet = false

    /// The descriptor, for calls the container does not wrap (it stays owned here).
    public var descriptor: CInt { fd.raw.rawValue }

    /// Opens the container at `path` and checks the API version (VFIO_API_VERSION) and that
    /// a type-1 IOMMU is offered (type 1 v2, else type 1).
    public init(path: String = "/dev/vfio/vfio") throws(PCIError) {
        let (r, e) = vfioCallErrno { Glibc.open(path, O_RDWR | O_CLOEXEC) }
        guard r >= 0 else {
            if e == ENOENT { throw .unsupported("a VFIO container: \(path) does not exist (is the vfio module loaded?)") }
            throw .system("open \(path): \(errnoText(e))")
        }
        let owned = OwnedFD(adopting: r)
        let raw = owned.raw.rawValue
        let version = try vfioCall("VFIO_GET_API_VERSION on \(path)") { ob_vfio_ioctl_none(raw, ob_vfio_req_get_api_version()) }
        guard version == VFIO_API_VERSION else {
            throw .unsupported("VFIO API version \(VFIO_API_VERSION) (the kernel speaks \(version))")
        }
        func offers(_ type: Int32) throws(PCIError) -> Bool {
            try vfioCall("VFIO_CHECK_EXTENSION \(type)") { ob_vfio_ioctl_int(raw, ob_vfio_req_check_extension(), UInt(type)) } > 0
        }
        if try offers(VFIO_TYPE1v2_IOMMU) {
            iommuType = VFIO_TYPE1v2_IOMMU
        } else if try offers(VFIO_TYPE1_IOMMU) {
            iommuType = VFIO_TYPE1_IOMMU
        } else {
            throw .unsupported("a type-1 IOMMU in the VFIO container (neither TYPE1v2 nor TYPE1 is offered)")
        }
        fd = owned
    }

    /// Attaches `group` (VFIO_GROUP_SET_CONTAINER); the first group also sets the IOMMU
    /// model (VFIO_SET_IOMMU), after which mappings can be made.
    public mutating func attach(_ group: borrowing VFIOGroup) throws(PCIError) {
        var container = fd.raw.rawValue
        let g = group.descriptor, n = group.number
        _ = try vfioCall("VFIO_GROUP_SET_CONTAINER for group \(n)") {
            ob_vfio_ioctl_ptr(g, ob_vfio_req_group_set_container(), &container)
        }
        if !iommuSet {
            let raw = fd.raw.rawValue, type = iommuType
            _ = try vfioCall("VFIO_SET_IOMMU \(type == VFIO_TYPE1v2_IOMMU ? "TYPE1v2" : "TYPE1")") {
                ob_vfio_ioctl_int(raw, ob_vfio_req_set_iommu(), UInt(type))
            }
            iommuSet = true
        }
    }

    /// Maps `size` bytes at `hostAddress` at `ioAddress` of the container's IOMMU space
    /// (VFIO_IOMMU_MAP_DMA): devices may read them, and write them when `writable`. The
    /// kernel pins the pages; addresses and size must be multiples of the IOMMU page size.
    public func map(hostAddress: UnsafeRawPointer, ioAddress: IOAddress, size: Int, writable: Bool) throws(PCIError) {
        try checkRange(ioAddress, size, "map")
        var m = vfio_iommu_type1_dma_map()
        m.argsz = UInt32(MemoryLayout<vfio_iommu_type1_dma_map>.size)
        m.flags = UInt32(VFIO_DMA_MAP_FLAG_READ) | (writable ? UInt32(VFIO_DMA_MAP_FLAG_WRITE) : 0)
        m.vaddr = UInt64(UInt(bitPattern: hostAddress))
        m.iova = ioAddress.rawValue
        m.size = UInt64(size)
        let raw = fd.raw.rawValue
        _ = try vfioCall("VFIO_IOMMU_MAP_DMA \(ioAddress) + \(hex(size))") { ob_vfio_ioctl_ptr(raw, ob_vfio_req_iommu_map_dma(), &m) }
    }

    /// Removes the mappings of `ioAddress ..< ioAddress + size` (VFIO_IOMMU_UNMAP_DMA). The
    /// kernel unmaps whole mappings only; when what it unmapped is not exactly `size`
    /// bytes, this throws (the mappings it did remove are gone).
    public func unmap(ioAddress: IOAddress, size: Int) throws(PCIError) {
        try checkRange(ioAddress, size, "unmap")
        var u = vfio_iommu_type1_dma_unmap()
        u.argsz = UInt32(MemoryLayout<vfio_iommu_type1_dma_unmap>.size)
        u.iova = ioAddress.rawValue
        u.size = UInt64(size)
        let raw = fd.raw.rawValue
        _ = try vfioCall("VFIO_IOMMU_UNMAP_DMA \(ioAddress) + \(hex(size))") { ob_vfio_ioctl_ptr(raw, ob_vfio_req_iommu_unmap_dma(), &u) }
        guard u.size == UInt64(size) else {
            throw .malformed("VFIO_IOMMU_UNMAP_DMA \(ioAddress) + \(hex(size)) unmapped \(hex(u.size)) bytes")
        }
    }

    /// The IOMMU's page sizes and usable IOVA ranges (VFIO_IOMMU_GET_INFO with its
    /// capability chain). Needs an attached group.
    public func info() throws(PCIError) -> VFIOIOMMUInfo {
        let raw = fd.raw.rawValue
        var size = MemoryLayout<vfio_iommu_type1_info>.size
        for _ in 0..<3 {
            var buffer = argszBuffer(size)
            _ = try vfioCall("VFIO_IOMMU_GET_INFO") {
                buffer.withUnsafeMutableBytes { ob_vfio_ioctl_ptr(raw, ob_vfio_req_iommu_get_info(), $0.baseAddress) }
            }
            let wanted = Int(buffer.loadLE(UInt32.self, at: 0)!)
            if wanted <= size { return try VFIOInfoChain.iommuInfo(buffer) }
            guard wanted <= 1 << 20 else { throw .malformed("VFIO_IOMMU_GET_INFO asks for a \(wanted)-byte buffer") }
            size = wanted
        }
        throw .malformed("VFIO_IOMMU_GET_INFO keeps asking for a larger buffer")
    }

    private func checkRange(_ ioAddress: IOAddress, _ size: Int, _ what: String) throws(PCIError) {
        guard size > 0 else { throw .unsupported("a DMA \(what) of \(size) bytes") }
        guard UInt64(size) - 1 <= UInt64.max - ioAddress.rawValue else {
            throw .unsupported("a DMA \(what) of \(hex(size)) bytes at \(ioAddress): it wraps past 2^64")
        }
    }
}
