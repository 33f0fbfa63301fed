import Testing
import Virtio

/// virtio-blk configuration space (§5.2.4), built by hand byte by byte.
@Suite struct ConfigTests {
    static let allFeatures = VirtioBlkFeature.sizeMax | VirtioBlkFeature.segMax | VirtioBlkFeature.geometry
        | VirtioBlkFeature.blkSize | VirtioBlkFeature.topology | VirtioBlkFeature.configWCE
        | VirtioBlkFeature.multiQueue | VirtioBlkFeature.discard | VirtioBlkFeature.writeZeroes

    /// A config like QEMU 7.2's vhost-user-blk export sends, with every field distinct.
    static func handBuilt() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 60)
        func put(_ v: UInt64, at o: Int, bytes n: Int) {
            for i in 0..<n { b[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) }
        }
        put(0x0000_0012_3456_7800, at: 0, bytes: 8)  // capacity
        put(65536, at: 8, bytes: 4)                  // size_max
        put(126, at: 12, bytes: 4)                   // seg_max
        put(1023, at: 16, bytes: 2)                  // geometry.cylinders
        b[18] = 16                                   // geometry.heads
        b[19] = 63                                   // geometry.sectors
        put(512, at: 20, bytes: 4)                   // blk_size
        b[24] = 3                                    // physical_block_exp
        b[25] = 1                                    // alignment_offset
        put(8, at: 26, bytes: 2)                     // min_io_size
        put(256, at: 28, bytes: 4)                   // opt_io_size
        b[32] = 1                                    // writeback
        put(4, at: 34, bytes: 2)                     // num_queues
        put(32768, at: 36, bytes: 4)                 // max_discard_sectors
        put(1, at: 40, bytes: 4)                     // max_discard_seg
        put(8, at: 44, bytes: 4)                     // discard_sector_alignment
        put(65535, at: 48, bytes: 4)                 // max_write_zeroes_sectors
        put(2, at: 52, bytes: 4)                     // max_write_zeroes_seg
        b[56] = 1                                    // write_zeroes_may_unmap
        return b
    }

    static let expected = VirtioBlkConfig(
        capacity: 0x12_3456_7800, sizeMax: 65536, segMax: 126,
        geometry: VirtioBlkGeometry(cylinders: 1023, heads: 16, sectors: 63), blkSize: 512,
        topology: VirtioBlkTopology(physicalBlockExponent: 3, alignmentOffset: 1, minIOSize: 8, optIOSize: 256),
        numQueues: 4, maxDiscardSectors: 32768, maxDiscardSeg: 1, discardSectorAlignment: 8,
        maxWriteZeroesSectors: 65535, maxWriteZeroesSeg: 2, writeZeroesMayUnmap: true, writeback: 1)

    @Test func handBuiltConfigRoundTrips() throws {
        let c = try VirtioBlkConfig.parse(Self.handBuilt(), features: Self.allFeatures)
        #expect(c == Self.expected)
        #expect(c.encoded() == Self.handBuilt())
        #expect(try VirtioBlkConfig.parse(c.encoded(), features: Self.allFeatures) == c)
    }

    @Test func optionalFieldsAreNilWithoutTheirFeatures() throws {
        let c = try VirtioBlkConfig.parse(Self.handBuilt(), features: 0)
        #expect(c == VirtioBlkConfig(capacity: 0x12_3456_7800))
        #expect(c.sizeMax == nil && c.segMax == nil && c.blkSize == nil && c.numQueues == nil)
        #expect(c.maxDiscardSectors == nil && c.maxDiscardSeg == nil && c.discardSectorAlignment == nil)
        #expect(c.maxWriteZeroesSectors == nil && c.maxWriteZeroesSeg == nil && !c.writeZeroesMayUnmap)
        #expect(c.writeback == nil && c.geometry == nil && c.topology == nil)
        // Each feature alone unlocks its own fields only.
        let d = try VirtioBlkConfig.parse(Self.handBuilt(), features: VirtioBlkFeature.discard | VirtioBlkFeature.segMax)
        #expect(d == VirtioBlkConfig(capacity: 0x12_3456_7800, segMax: 126, maxDiscardSectors: 32768,
                                     maxDiscardSeg: 1, discardSectorAlignment: 8))
    }

    @Test func shortBuffersAreRejected() {
        for n in [0, 8, 36, 56, 59] {
            #expect(throws: VirtioError.self) {
                try VirtioBlkConfig.parse(Array(Self.handBuilt().prefix(n)), features: 0)
            }
        }
    }

    @Test func longerBuffersAreAccepted() throws {
        let c = try VirtioBlkConfig.parse(Self.handBuilt() + [UInt8](repeating: 0xFF, count: 12),
                                          features: Self.allFeatures)
        #expect(c == Self.expected)
    }

    @Test(arguments: [UInt32(0), 1, 256, 511, 513, 1000, 3072, 131072, 0x8000_0000, .max])
    func badBlockSizesAreRejected(blkSize: UInt32) {
        var c = Self.expected
        c.blkSize = blkSize
        #expect(throws: VirtioError.self) { try VirtioBlkConfig.parse(c.encoded(), features: Self.allFeatures) }
        // Without VIRTIO_BLK_F_BLK_SIZE the field is not read at all.
        #expect((try? VirtioBlkConfig.parse(c.encoded(), features: VirtioBlkFeature.segMax))?.blkSize == nil)
    }

    @Test(arguments: [UInt32(512), 1024, 4096, 65536])
    func goodBlockSizesAreAccepted(blkSize: UInt32) throws {
        var c = Self.expected
        c.blkSize = blkSize
        #expect(try VirtioBlkConfig.parse(c.encoded(), features: Self.allFeatures).blkSize == blkSize)
    }

    @Test func impossibleValuesAreRejected() {
        func rejects(_ change: (inout VirtioBlkConfig) -> Void, _ note: Comment) {
            var c = Self.expected
            change(&c)
            #expect(throws: VirtioError.self, note) { try VirtioBlkConfig.parse(c.encoded(), features: Self.allFeatures) }
        }
        rejects({ $0.segMax = 0 }, "seg_max 0")
        rejects({ $0.capacity = 1 << 55 }, "capacity whose byte size overflows")
        rejects({ $0.capacity = .max }, "capacity max")
        rejects({ $0.numQueues = 0 }, "num_queues 0")
        rejects({ $0.writeback = 2 }, "writeback 2")
        rejects({ $0.maxDiscardSectors = 0 }, "max_discard_sectors 0")
        rejects({ $0.maxDiscardSeg = 0 }, "max_discard_seg 0")
        rejects({ $0.discardSectorAlignment = 0 }, "discard_sector_alignment 0")
        rejects({ $0.maxWriteZeroesSectors = 0 }, "max_write_zeroes_sectors 0")
        rejects({ $0.maxWriteZeroesSeg = 0 }, "max_write_zeroes_seg 0")
        rejects({ $0.topology?.physicalBlockExponent = 16 }, "physical_block_exp 16")
        rejects({ $0.topology?.alignmentOffset = 8 }, "alignment_offset beyond the physical block")
        var bytes = Self.handBuilt()
        bytes[56] = 2
        #expect(throws: VirtioError.self) { try VirtioBlkConfig.parse(bytes, features: Self.allFeatures) }
    }

    @Test func largestCapacityIsAccepted() throws {
        var c = VirtioBlkConfig(capacity: VirtioBlkConfig.maxCapacity)
        #expect(try VirtioBlkConfig.parse(c.encoded(), features: 0) == c)
        c.capacity += 1
        #expect(throws: VirtioError.self) { try VirtioBlkConfig.parse(c.encoded(), features: 0) }
    }

    /// QEMU's vhost-user-blk export offers VIRTIO_BLK_F_SIZE_MAX with size_max 0: no limit.
    @Test func zeroSizeMaxMeansNoLimit() throws {
        var c = Self.expected
        c.sizeMax = nil
        let parsed = try VirtioBlkConfig.parse(c.encoded(), features: Self.allFeatures)
        #expect(parsed.sizeMax == nil)
        #expect(parsed.segMax == 126)
    }
}
