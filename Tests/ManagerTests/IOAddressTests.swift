import Manager
import OutboardRings
import Testing
import VFIO

/// The session IO address allocator and the IOMMU window it is bounded by.
@Suite struct IOAddressTests {
    static let mib: UInt64 = 1 << 20

    @Test func spansAreAlignedGappedAndReusedOnlyAfterRelease() {
        var a = IOAddressAllocator()
        let first = a.allocate(64 * Self.mib)!
        let second = a.allocate(4096)!
        #expect(first == IOAddressAllocator.first)
        // 64 MiB rounded to 2 MiB, plus a 2 MiB gap.
        #expect(second.rawValue == first.rawValue + 66 * Self.mib)
        let third = a.allocate(3 * Self.mib)!
        #expect(third.rawValue == second.rawValue + 4 * Self.mib)
        // Released in the middle: the next region that fits takes the lowest free span,
        // one that does not fit goes above everything live.
        a.release(first, 64 * Self.mib)
        let small = a.allocate(8 * Self.mib)!
        #expect(small == first)
        let big = a.allocate(128 * Self.mib)!
        #expect(big.rawValue == third.rawValue + 6 * Self.mib)
        // Adjacent releases merge: two halves make room for the whole again.
        let rest = a.allocate(54 * Self.mib)!
        #expect(rest.rawValue == small.rawValue + 10 * Self.mib)
        a.release(small, 8 * Self.mib)
        a.release(rest, 54 * Self.mib)
        #expect(a.allocate(64 * Self.mib) == first)
        #expect(a.allocate(0) == nil)
        #expect(a.allocate(.max) == nil)
    }

    @Test func churnNeverOverlapsLiveRegionsAndStaysBounded() {
        var a = IOAddressAllocator(limit: IOAddressAllocator.first.rawValue + 256 * Self.mib)
        var live: [(IOAddress, UInt64)] = []
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<20_000 {
            if live.count < 6, Bool.random(using: &rng) {
                let bytes = UInt64.random(in: 1...(16 * Self.mib), using: &rng)
                guard let io = a.allocate(bytes) else { continue }
                for (o, ob) in live {
                    #expect(io.rawValue + bytes + IOAddressAllocator.granule <= o.rawValue || o.rawValue + ob + IOAddressAllocator.granule <= io.rawValue,
                            "\(io) overlaps \(o)")
                }
                #expect(io.rawValue + bytes <= a.limit)
                live.append((io, bytes))
            } else if !live.isEmpty {
                let (io, bytes) = live.remove(at: Int.random(in: 0..<live.count, using: &rng))
                a.release(io, bytes)
            }
        }
        for (io, bytes) in live { a.release(io, bytes) }
        #expect(a.inUse == 0, "every span came back")
        #expect(a.allocate(252 * Self.mib) == IOAddressAllocator.first)  // a 254 MiB span of 256
        #expect(a.allocate(Self.mib) == nil, "the limit holds")
    }

    @Test func theIOMMUWindowBoundsSessionsAndKeepsTheDriverMemoryClear() throws {
        let dma = IOVARange(first: 1 << 20, last: (2 << 20) - 1)
        // The guest lane's intel-iommu: one range up to 39 bits, the interrupt window reserved.
        let usable = [IOVARange(first: 0, last: 0x7F_FFFF_FFFF)]
        let msi = [IOVARange(first: 0xFEE0_0000, last: 0xFEEF_FFFF)]
        #expect(try IOAddressAllocator.limit(usable: usable, reserved: msi, dma: dma) == 0x80_0000_0000)
        // A reserved region above 4 GiB cuts the window there.
        let high = msi + [IOVARange(first: 0x10_0000_0000, last: 0x10_0FFF_FFFF)]
        #expect(try IOAddressAllocator.limit(usable: usable, reserved: high, dma: dma) == 0x10_0000_0000)
        // Ranges split at the interrupt window (how AMD and some kernels report it).
        let split = [IOVARange(first: 0, last: 0xFEDF_FFFF), IOVARange(first: 0xFEF0_0000, last: .max)]
        #expect(try IOAddressAllocator.limit(usable: split, reserved: [], dma: dma) == .max)
        // No ranges reported (kernels before 5.4): everything, less the reserved regions.
        #expect(try IOAddressAllocator.limit(usable: [], reserved: msi, dma: dma) == .max)
        #expect(throws: PCIError.self) {
            try IOAddressAllocator.limit(usable: [IOVARange(first: 4 << 20, last: .max)], reserved: [], dma: dma)
        }
        #expect(throws: PCIError.self) {
            try IOAddressAllocator.limit(usable: usable, reserved: [IOVARange(first: 0x10_0000, last: 0x10_0FFF)], dma: dma)
        }
        #expect(throws: PCIError.self) {
            try IOAddressAllocator.limit(usable: [IOVARange(first: 0, last: 0xFFFF_FFFF)], reserved: [], dma: dma)
        }
    }
}
