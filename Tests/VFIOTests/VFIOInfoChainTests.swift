import CLinux
import Testing
import VFIO

/// Little-endian bytes, for building INFO answers as the kernel writes them.
struct Bytes {
    var b: [UInt8]
    init(count: Int) { b = [UInt8](repeating: 0, count: count) }
    mutating func put<T: FixedWidthInteger>(_ v: T, at o: Int) {
        for i in 0..<MemoryLayout<T>.size { b[o + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) }
    }
}

/// A VFIO_IOMMU_GET_INFO answer: the 24-byte struct, then one IOVA-range capability at
/// `capAt` with `ranges` (nr_iovas `count`, or ranges.count).
func iommuInfo(pageSizes: UInt64 = 0x4020_1000, capAt: UInt32 = 24, next: UInt32 = 0, version: UInt16 = 1,
               ranges: [(UInt64, UInt64)], count: UInt32? = nil, caps: Bool = true, extra: Int = 0) -> [UInt8] {
    let total = Int(max(capAt, 24)) + 16 + 16 * ranges.count + extra
    var x = Bytes(count: total)
    x.put(UInt32(total), at: 0)
    x.put(UInt32(VFIO_IOMMU_INFO_PGSIZES) | (caps ? UInt32(VFIO_IOMMU_INFO_CAPS) : 0), at: 4)
    x.put(pageSizes, at: 8)
    x.put(capAt, at: 16)
    let c = Int(capAt)
    if c + 16 <= total {
        x.put(UInt16(VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE), at: c)
        x.put(version, at: c + 2)
        x.put(next, at: c + 4)
        x.put(count ?? UInt32(ranges.count), at: c + 8)
        for (i, r) in ranges.enumerated() where c + 16 + 16 * i + 16 <= total {
            x.put(r.0, at: c + 16 + 16 * i)
            x.put(r.1, at: c + 24 + 16 * i)
        }
    }
    return x.b
}

@Suite struct VFIOInfoChainTests {
    @Test func layoutsAreTheKernels() {
        #expect(MemoryLayout<vfio_iommu_type1_info>.size == 24)
        #expect(ob_vfio_iova_range_cap_ranges_offset() == 16)
        #expect(ob_vfio_sparse_mmap_cap_areas_offset() == 16)
        #expect(ob_vfio_irq_set_data_offset() == 20)
        #expect(MemoryLayout<vfio_region_info>.size == 32)
    }

    @Test func parsesPageSizesAndRanges() throws {
        let info = try VFIOInfoChain.iommuInfo(iommuInfo(ranges: [(0, 0xfedf_ffff), (0xfef0_0000, 0xff_ffff_ffff)]))
        #expect(info == VFIOIOMMUInfo(pageSizes: 0x4020_1000, iovaRanges: [IOVARange(first: 0, last: 0xfedf_ffff),
                                                                            IOVARange(first: 0xfef0_0000, last: 0xff_ffff_ffff)]))
        #expect(try VFIOInfoChain.iommuInfo(iommuInfo(ranges: [(0, 1)], caps: false)).iovaRanges.isEmpty)
    }

    @Test func findsTheRangesAfterAnotherCapability() throws {
        // A capability of id 2 at 24 (8-byte header and 8 bytes of body), the ranges at 40.
        var x = Bytes(count: 40 + 16 + 16)
        x.put(UInt32(72), at: 0)
        x.put(UInt32(VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS), at: 4)
        x.put(UInt64(0x1000), at: 8)
        x.put(UInt32(24), at: 16)
        x.put(UInt16(2), at: 24); x.put(UInt16(1), at: 26); x.put(UInt32(40), at: 28)
        x.put(UInt16(1), at: 40); x.put(UInt16(1), at: 42); x.put(UInt32(0), at: 44)
        x.put(UInt32(1), at: 48)
        x.put(UInt64(0x1000), at: 56); x.put(UInt64(0xffff_ffff), at: 64)
        let info = try VFIOInfoChain.iommuInfo(x.b)
        #expect(info.iovaRanges == [IOVARange(first: 0x1000, last: 0xffff_ffff)])
    }

    @Test func refusesHostileChains() {
        func message(_ b: [UInt8]) -> String {
            do throws(PCIError) { _ = try VFIOInfoChain.iommuInfo(b); return "accepted" } catch { return error.description }
        }
        // The chain comes back to its own capability.
        #expect(message(iommuInfo(next: 24, ranges: [(0, 1)])).contains("goes back"))
        // A capability inside the fixed struct, past the answer, misaligned.
        var inHeader = iommuInfo(ranges: [(0, 1)]); inHeader[16] = 8
        #expect(message(inHeader).contains("inside the 24-byte info header"))
        var past = iommuInfo(ranges: [(0, 1)]); past[16] = 200
        #expect(message(past).contains("runs past"))
        var odd = iommuInfo(ranges: [(0, 1)], extra: 8); odd[16] = 26
        #expect(message(odd).contains("not 4-byte aligned"))
        // More ranges than the capability holds (also a count that would overflow).
        #expect(message(iommuInfo(ranges: [(0, 1)], count: 2)).contains("hold fewer"))
        #expect(message(iommuInfo(ranges: [(0, 1)], count: UInt32.max)).contains("hold fewer"))
        // Ranges backwards, overlapping, out of order.
        #expect(message(iommuInfo(ranges: [(5, 4)])).contains("ends before it starts"))
        #expect(message(iommuInfo(ranges: [(0, 10), (10, 20)])).contains("not above"))
        #expect(message(iommuInfo(ranges: [(100, 200), (0, 10)])).contains("not above"))
        // A version this code does not know, a truncated answer.
        #expect(message(iommuInfo(version: 2, ranges: [(0, 1)])).contains("version 2"))
        #expect(message([1, 2, 3]).contains("too short"))
        // A capability whose header fits but whose count does not.
        var cut = Bytes(count: 24 + 10)
        cut.put(UInt32(VFIO_IOMMU_INFO_CAPS), at: 4); cut.put(UInt32(24), at: 16); cut.put(UInt16(1), at: 24); cut.put(UInt16(1), at: 26)
        #expect(message(cut.b).contains("truncated"))
    }

    @Test func chainsOfEveryShapeEnd() {
        // Every first offset and every next value over a small answer: never traps or loops.
        for first in stride(from: 0, through: 64, by: 4) {
            for next in stride(from: 0, through: 64, by: 4) {
                var b = iommuInfo(ranges: [(0, 1)], extra: 16)
                b[16] = UInt8(first)
                if first + 8 <= b.count { b[first + 4] = UInt8(next) }
                do throws(PCIError) { _ = try VFIOInfoChain.iommuInfo(b) } catch {}
            }
        }
    }

    /// A VFIO_DEVICE_GET_REGION_INFO answer with one sparse-mmap capability.
    func regionInfo(size: UInt64, areas: [(UInt64, UInt64)], count: UInt32? = nil) -> [UInt8] {
        var x = Bytes(count: 32 + 16 + 16 * areas.count)
        x.put(UInt32(x.b.count), at: 0)
        x.put(UInt32(VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE | VFIO_REGION_INFO_FLAG_MMAP | VFIO_REGION_INFO_FLAG_CAPS), at: 4)
        x.put(UInt32(32), at: 12)
        x.put(size, at: 16)
        x.put(UInt16(VFIO_REGION_INFO_CAP_SPARSE_MMAP), at: 32); x.put(UInt16(1), at: 34)
        x.put(count ?? UInt32(areas.count), at: 40)
        for (i, a) in areas.enumerated() { x.put(a.0, at: 48 + 16 * i); x.put(a.1, at: 56 + 16 * i) }
        return x.b
    }

    @Test func sparseMmapAreas() throws {
        let caps = try VFIOInfoChain.regionCapabilities(regionInfo(size: 0x4000, areas: [(0, 0x1000), (0x2000, 0x2000)]), regionSize: 0x4000)
        #expect(caps.sparseAreas == [VFIORegion.Area(offset: 0, size: 0x1000), VFIORegion.Area(offset: 0x2000, size: 0x2000)])
        let flags = UInt32(VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_MMAP)
        let holed = VFIORegion(index: 0, offset: 0, size: 0x4000, flags: flags, sparseAreas: caps.sparseAreas)
        #expect(!holed.fullyMappable)
        #expect(VFIORegion(index: 0, offset: 0, size: 0x4000, flags: flags,
                           sparseAreas: [.init(offset: 0x2000, size: 0x2000), .init(offset: 0, size: 0x2000)]).fullyMappable)
        #expect(VFIORegion(index: 0, offset: 0, size: 0x4000, flags: flags).fullyMappable)
        #expect(!VFIORegion(index: 0, offset: 0, size: 0x4000, flags: UInt32(VFIO_REGION_INFO_FLAG_READ)).fullyMappable)
        #expect(VFIORegion(index: 0, offset: 0, size: 0x4000, flags: flags, sparseAreas: []).mappableAreas.isEmpty)

        func message(_ b: [UInt8], _ size: UInt64) -> String {
            do throws(PCIError) { _ = try VFIOInfoChain.regionCapabilities(b, regionSize: size); return "accepted" } catch { return error.description }
        }
        #expect(message(regionInfo(size: 0x4000, areas: [(0x3000, 0x2000)]), 0x4000).contains("runs past"))
        #expect(message(regionInfo(size: 0x4000, areas: [(UInt64.max, 2)]), 0x4000).contains("runs past"))
        #expect(message(regionInfo(size: 0x4000, areas: [(0, 0x1000)], count: 1000), 0x4000).contains("hold fewer"))
    }

    @Test func ioRangeContains() {
        let r = IOVARange(first: 0x1000, last: 0x1fff)
        #expect(r.contains(0x1000, size: 0x1000))
        #expect(!r.contains(0x1000, size: 0x1001))
        #expect(!r.contains(0x1fff, size: 0))
        #expect(!r.contains(0xfff, size: 1))
        #expect(IOVARange(first: 0, last: UInt64.max).contains(UInt64.max, size: 1))
    }

    @Test func configAccessBounds() {
        func ok(_ offset: Int, _ count: Int, _ size: UInt64 = 256) -> Bool {
            do throws(PCIError) { try VFIODevice.checkConfigRange(offset: offset, count: count, size: size); return true } catch { return false }
        }
        #expect(ok(0, 256)); #expect(ok(255, 1)); #expect(ok(256, 0)); #expect(ok(0, 4096, 4096))
        #expect(!ok(0, 257)); #expect(!ok(256, 1)); #expect(!ok(-1, 1)); #expect(!ok(0, -1))
        #expect(!ok(Int.max, 2)); #expect(!ok(2, Int.max)); #expect(!ok(257, 0))
    }
}
