import CLinux

/// An inclusive range of IO virtual addresses, `first...last`.
public struct IOVARange: Equatable, Sendable, CustomStringConvertible {
    public var first: UInt64
    public var last: UInt64
    public init(first: UInt64, last: UInt64) { self.first = first; self.last = last }
    /// Whether `first...first+size-1` lies inside (false for size 0 and on overflow).
    public func contains(_ start: UInt64, size: UInt64) -> Bool {
        guard size > 0, start >= first, start <= last else { return false }
        return size - 1 <= last - start
    }
    public var description: String { "\(hex(first))-\(hex(last))" }
}

/// What VFIO_IOMMU_GET_INFO reports for a container.
public struct VFIOIOMMUInfo: Equatable, Sendable {
    /// Bitmap of the IOMMU page sizes (bit n: 2^n bytes); 0 when the kernel did not say.
    public var pageSizes: UInt64
    /// The IOVA ranges DMA may be mapped in (the IOVA-range capability), ascending and
    /// disjoint; empty when the kernel did not report the capability.
    public var iovaRanges: [IOVARange]
    public init(pageSizes: UInt64, iovaRanges: [IOVARange]) { self.pageSizes = pageSizes; self.iovaRanges = iovaRanges }
}

/// One region of a VFIO device (VFIO_DEVICE_GET_REGION_INFO): a BAR, the ROM, the
/// configuration space; its bytes are at `offset` of the device fd.
public struct VFIORegion: Equatable, Sendable {
    /// A part of the region that may be mmapped (the sparse-mmap capability).
    public struct Area: Equatable, Sendable {
        public var offset: UInt64
        public var size: UInt64
        public init(offset: UInt64, size: UInt64) { self.offset = offset; self.size = size }
    }
    public var index: Int
    public var offset: UInt64
    public var size: UInt64
    public var flags: UInt32
    /// The areas the sparse-mmap capability names (nil: the region has no such capability,
    /// so all of it is mappable when `mappable`).
    public var sparseAreas: [Area]?
    /// The region has the MSIX_MAPPABLE capability: the MSI-X table in it may be mmapped.
    public var msixMappable: Bool

    public init(index: Int, offset: UInt64, size: UInt64, flags: UInt32, sparseAreas: [Area]? = nil, msixMappable: Bool = false) {
        self.index = index; self.offset = offset; self.size = size; self.flags = flags
        self.sparseAreas = sparseAreas; self.msixMappable = msixMappable
    }

    public var readable: Bool { flags & UInt32(VFIO_REGION_INFO_FLAG_READ) != 0 }
    public var writable: Bool { flags & UInt32(VFIO_REGION_INFO_FLAG_WRITE) != 0 }
    public var mappable: Bool { flags & UInt32(VFIO_REGION_INFO_FLAG_MMAP) != 0 }
    /// The parts that may be mmapped.
    public var mappableAreas: [Area] {
        guard mappable, size > 0 else { return [] }
        return sparseAreas ?? [Area(offset: 0, size: size)]
    }
    /// Whether the whole region may be mmapped in one piece.
    public var fullyMappable: Bool {
        guard mappable, size > 0 else { return false }
        guard let areas = sparseAreas else { return true }
        // Covered when the areas, sorted, leave no gap from 0 to size.
        var end: UInt64 = 0
        for a in areas.sorted(by: { $0.offset < $1.offset }) {
            if a.offset > end { return false }
            end = max(end, a.offset + a.size)
        }
        return end >= size
    }
}

/// One interrupt index of a VFIO device (VFIO_DEVICE_GET_IRQ_INFO).
public struct VFIOIRQInfo: Equatable, Sendable {
    public var index: Int
    public var count: Int
    public var flags: UInt32
    public init(index: Int, count: Int, flags: UInt32) { self.index = index; self.count = count; self.flags = flags }
    public var eventfd: Bool { flags & UInt32(VFIO_IRQ_INFO_EVENTFD) != 0 }
    public var maskable: Bool { flags & UInt32(VFIO_IRQ_INFO_MASKABLE) != 0 }
    public var automasked: Bool { flags & UInt32(VFIO_IRQ_INFO_AUTOMASKED) != 0 }
    public var noResize: Bool { flags & UInt32(VFIO_IRQ_INFO_NORESIZE) != 0 }
}

/// One capability in the chain of a VFIO INFO answer: its id, version, and where its header
/// starts in the answer, up to `end` (the next capability or the end of the answer).
public struct VFIOInfoCapability: Equatable, Sendable {
    public var id: UInt16
    public var version: UInt16
    public var offset: Int
    public var end: Int
}

/// Parsers of VFIO INFO answers (the bytes the kernel wrote into the caller's buffer).
/// The answers are checked as if hostile: every offset inside the buffer, the chain strictly
/// ascending (so it cannot loop), every count within its capability.
public enum VFIOInfoChain {
    /// Size of struct vfio_info_cap_header.
    static let capHeaderSize = MemoryLayout<vfio_info_cap_header>.size

    /// The capability chain of `buffer` starting at `first` (0: none). `fixedSize` is the
    /// size of the INFO struct before the chain; no capability may start inside it.
    public static func capabilities(in buffer: [UInt8], first: Int, fixedSize: Int) throws(PCIError) -> [VFIOInfoCapability] {
        var offsets: [(Int, UInt16, UInt16)] = []
        var at = first
        while at != 0 {
            guard at >= fixedSize else {
                throw .malformed("VFIO info capability at \(at) lies inside the \(fixedSize)-byte info header")
            }
            guard at % 4 == 0 else { throw .malformed("VFIO info capability at \(at) is not 4-byte aligned") }
            guard at <= buffer.count - capHeaderSize else {
                throw .malformed("VFIO info capability at \(at) runs past the \(buffer.count)-byte answer")
            }
            if let last = offsets.last?.0, at < last + capHeaderSize {
                throw .malformed("VFIO info capability chain goes back from \(last) to \(at) (a loop or overlap)")
            }
            let id = buffer.loadLE(UInt16.self, at: at)!
            let version = buffer.loadLE(UInt16.self, at: at + 2)!
            offsets.append((at, id, version))
            at = Int(buffer.loadLE(UInt32.self, at: at + 4)!)
        }
        var out: [VFIOInfoCapability] = []
        for (i, (off, id, version)) in offsets.enumerated() {
            let end = i + 1 < offsets.count ? offsets[i + 1].0 : buffer.count
            out.append(VFIOInfoCapability(id: id, version: version, offset: off, end: end))
        }
        return out
    }

    /// The page sizes and IOVA ranges of a VFIO_IOMMU_GET_INFO answer (struct
    /// vfio_iommu_type1_info and its capability chain).
    public static func iommuInfo(_ buffer: [UInt8]) throws(PCIError) -> VFIOIOMMUInfo {
        let fixed = MemoryLayout<vfio_iommu_type1_info>.size
        guard let flags = buffer.loadLE(UInt32.self, at: 4), let pgsizes = buffer.loadLE(UInt64.self, at: 8) else {
            throw .malformed("VFIO_IOMMU_GET_INFO answer of \(buffer.count) bytes is too short")
        }
        let pageSizes = flags & UInt32(VFIO_IOMMU_INFO_PGSIZES) != 0 ? pgsizes : 0
        var ranges: [IOVARange] = []
        if flags & UInt32(VFIO_IOMMU_INFO_CAPS) != 0, let first = buffer.loadLE(UInt32.self, at: 16) {
            var seen = false
            for cap in try capabilities(in: buffer, first: Int(first), fixedSize: fixed)
            where cap.id == UInt16(VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE) {
                guard !seen else { throw .malformed("VFIO_IOMMU_GET_INFO has two IOVA-range capabilities") }
                seen = true
                ranges = try iovaRanges(buffer, cap)
            }
        }
        return VFIOIOMMUInfo(pageSizes: pageSizes, iovaRanges: ranges)
    }

    static func iovaRanges(_ buffer: [UInt8], _ cap: VFIOInfoCapability) throws(PCIError) -> [IOVARange] {
        guard cap.version == 1 else { throw .unsupported("IOVA-range capability version \(cap.version) (only 1 is known)") }
        let base = Int(ob_vfio_iova_range_cap_ranges_offset())
        guard let n = buffer.loadLE(UInt32.self, at: cap.offset + capHeaderSize), cap.offset + base <= cap.end else {
            throw .malformed("IOVA-range capability at \(cap.offset) is truncated")
        }
        let entry = MemoryLayout<vfio_iova_range>.size
        guard UInt64(n) <= UInt64(cap.end - cap.offset - base) / UInt64(entry) else {
            throw .malformed("IOVA-range capability says \(n) ranges, its \(cap.end - cap.offset) bytes hold fewer")
        }
        var out: [IOVARange] = []
        for i in 0..<Int(n) {
            let at = cap.offset + base + i * entry
            let r = IOVARange(first: buffer.loadLE(UInt64.self, at: at)!, last: buffer.loadLE(UInt64.self, at: at + 8)!)
            guard r.first <= r.last else { throw .malformed("IOVA range \(i) ends before it starts (\(r))") }
            if let prev = out.last, r.first <= prev.last {
                throw .malformed("IOVA range \(i) (\(r)) is not above the one before (\(prev))")
            }
            out.append(r)
        }
        return out
    }

    /// The sparse-mmap areas and the MSIX_MAPPABLE mark of a VFIO_DEVICE_GET_REGION_INFO
    /// answer (struct vfio_region_info and its chain) for a region of `regionSize` bytes.
    public static func regionCapabilities(_ buffer: [UInt8], regionSize: UInt64) throws(PCIError) -> (sparseAreas: [VFIORegion.Area]?, msixMappable: Bool) {
        let fixed = MemoryLayout<vfio_region_info>.size
        guard let flags = buffer.loadLE(UInt32.self, at: 4), let first = buffer.loadLE(UInt32.self, at: 12), buffer.count >= fixed else {
            throw .malformed("VFIO_DEVICE_GET_REGION_INFO answer of \(buffer.count) bytes is too short")
        }
        guard flags & UInt32(VFIO_REGION_INFO_FLAG_CAPS) != 0 else { return (nil, false) }
        var sparse: [VFIORegion.Area]?
        var msix = false
        for cap in try capabilities(in: buffer, first: Int(first), fixedSize: fixed) {
            switch Int32(cap.id) {
            case VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                guard sparse == nil else { throw .malformed("region has two sparse-mmap capabilities") }
                sparse = try sparseAreas(buffer, cap, regionSize: regionSize)
            case VFIO_REGION_INFO_CAP_MSIX_MAPPABLE:
                msix = true
            default:
                continue
            }
        }
        return (sparse, msix)
    }

    static func sparseAreas(_ buffer: [UInt8], _ cap: VFIOInfoCapability, regionSize: UInt64) throws(PCIError) -> [VFIORegion.Area] {
        let base = Int(ob_vfio_sparse_mmap_cap_areas_offset())
        guard let n = buffer.loadLE(UInt32.self, at: cap.offset + capHeaderSize), cap.offset + base <= cap.end else {
            throw .malformed("sparse-mmap capability at \(cap.offset) is truncated")
        }
        let entry = MemoryLayout<vfio_region_sparse_mmap_area>.size
        guard UInt64(n) <= UInt64(cap.end - cap.offset - base) / UInt64(entry) else {
            throw .malformed("sparse-mmap capability says \(n) areas, its \(cap.end - cap.offset) bytes hold fewer")
        }
        var out: [VFIORegion.Area] = []
        for i in 0..<Int(n) {
            let at = cap.offset + base + i * entry
            let a = VFIORegion.Area(offset: buffer.loadLE(UInt64.self, at: at)!, size: buffer.loadLE(UInt64.self, at: at + 8)!)
            guard a.offset <= regionSize, a.size <= regionSize - a.offset else {
                throw .malformed("sparse-mmap area \(i) (\(hex(a.offset)) + \(hex(a.size))) runs past the \(hex(regionSize))-byte region")
            }
            out.append(a)
        }
        return out
    }
}
