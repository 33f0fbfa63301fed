import Synchronization
import Testing
import Virtio

/// Every structure the device reads or writes has its layout pinned here (§2.7.5, §2.7.8,
/// §5.2.6), as ixy pins its DMA structs with static asserts.
@Suite struct StructLayoutTests {
    @Test func descriptorIs16BytesLikeVirtqDesc() {
        #expect(MemoryLayout<VirtqDescriptor>.size == 16)
        #expect(MemoryLayout<VirtqDescriptor>.stride == 16)
        #expect(MemoryLayout<VirtqDescriptor>.alignment == 8)
        #expect(MemoryLayout<VirtqDescriptor>.offset(of: \.addr) == 0)
        #expect(MemoryLayout<VirtqDescriptor>.offset(of: \.len) == 8)
        #expect(MemoryLayout<VirtqDescriptor>.offset(of: \.flags) == 12)
        #expect(MemoryLayout<VirtqDescriptor>.offset(of: \.next) == 14)
        #expect(VirtqDescriptor.flagNext == 1 && VirtqDescriptor.flagWrite == 2 && VirtqDescriptor.flagIndirect == 4)
    }

    @Test func usedElementIs8BytesLikeVirtqUsedElem() {
        #expect(MemoryLayout<VirtqUsedElement>.size == 8)
        #expect(MemoryLayout<VirtqUsedElement>.stride == 8)
        #expect(MemoryLayout<VirtqUsedElement>.alignment == 4)
        #expect(MemoryLayout<VirtqUsedElement>.offset(of: \.id) == 0)
        #expect(MemoryLayout<VirtqUsedElement>.offset(of: \.len) == 4)
    }

    @Test func blkRequestHeaderIs16Bytes() {
        #expect(MemoryLayout<VirtioBlkRequestHeader>.size == 16)
        #expect(MemoryLayout<VirtioBlkRequestHeader>.stride == 16)
        #expect(MemoryLayout<VirtioBlkRequestHeader>.offset(of: \.type) == 0)
        #expect(MemoryLayout<VirtioBlkRequestHeader>.offset(of: \.reserved) == 4)
        #expect(MemoryLayout<VirtioBlkRequestHeader>.offset(of: \.sector) == 8)
    }

    @Test func blkDiscardSegmentIs16Bytes() {
        #expect(MemoryLayout<VirtioBlkDiscardSegment>.size == 16)
        #expect(MemoryLayout<VirtioBlkDiscardSegment>.stride == 16)
        #expect(MemoryLayout<VirtioBlkDiscardSegment>.offset(of: \.sector) == 0)
        #expect(MemoryLayout<VirtioBlkDiscardSegment>.offset(of: \.numSectors) == 8)
        #expect(MemoryLayout<VirtioBlkDiscardSegment>.offset(of: \.flags) == 12)
    }

    @Test func atomicIndexWordsHaveThePlainLayout() {
        #expect(MemoryLayout<Atomic<UInt16>>.size == 2)
        #expect(MemoryLayout<Atomic<UInt16>>.alignment == 2)
        #expect(MemoryLayout<Atomic<UInt32>>.size == 4)
        #expect(MemoryLayout<Atomic<UInt32>>.alignment == 4)
    }

    /// The wire images are little-endian byte for byte (§5.2.6, §2.7.5).
    @Test func wireImagesAreLittleEndian() {
        func bytes<T: BitwiseCopyable>(_ v: T) -> [UInt8] {
            withUnsafeBytes(of: v) { Array($0) }
        }
        let h = VirtioBlkRequestHeader(type: VirtioBlkRequestType.writeZeroes, sector: 0x0102_0304_0506_0708)
        #expect(bytes(h.littleEndian) == [13, 0, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1])
        #expect(VirtioBlkRequestHeader(littleEndian: h.littleEndian) == h)
        #expect(h.reserved == 0)
        let s = VirtioBlkDiscardSegment(sector: 0x1122, numSectors: 0x3344_5566, flags: VirtioBlkDiscardSegment.unmap)
        #expect(bytes(s.littleEndian) == [0x22, 0x11, 0, 0, 0, 0, 0, 0, 0x66, 0x55, 0x44, 0x33, 1, 0, 0, 0])
        #expect(VirtioBlkDiscardSegment(littleEndian: s.littleEndian) == s)
        let d = VirtqDescriptor(addr: 0xAABB, len: 0x200, flags: 3, next: 0x0102)
        #expect(bytes(d.littleEndian) == [0xBB, 0xAA, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 3, 0, 2, 1])
        #expect(VirtqDescriptor(littleEndian: d.littleEndian) == d)
        let u = VirtqUsedElement(id: 5, len: 0x0102_0304)
        #expect(bytes(u.littleEndian) == [5, 0, 0, 0, 4, 3, 2, 1])
    }
}

@Suite struct QueueLayoutTests {
    /// §2.7: descriptor table align 16 size 16q; avail ring align 2 size 6+2q; used ring
    /// align 4 size 6+8q (we put it on a page); indirect tables 16-aligned after it.
    @Test(arguments: [2, 4, 8, 64, 128, 256, 1024, 4096, 32768], [0, 1, 3, 32, 1024])
    func offsetsFollowTheSpec(size: Int, slots: Int) throws {
        let l = try SplitQueueLayout(size: size, indirectSlots: slots)
        #expect(l.size == size && l.indirectSlots == slots)
        #expect(l.descriptorOffset == 0)
        #expect(l.availOffset == 16 * size)
        #expect(l.availOffset % 2 == 0)
        #expect(l.usedOffset % 4096 == 0)
        #expect(l.usedOffset >= l.availOffset + 6 + 2 * size)
        #expect(l.usedOffset < l.availOffset + 6 + 2 * size + 4096)
        #expect(l.indirectOffset % 16 == 0)
        #expect(l.indirectOffset >= l.usedOffset + 6 + 8 * size)
        #expect(l.indirectOffset < l.usedOffset + 6 + 8 * size + 16)
        #expect(l.byteCount % 4096 == 0)
        #expect(l.byteCount >= l.indirectOffset + size * slots * 16)
        #expect(l.byteCount < l.indirectOffset + size * slots * 16 + 4096)
        #expect(l.usedEventOffset == l.availOffset + 4 + 2 * size)
        #expect(l.availEventOffset == l.usedOffset + 4 + 8 * size)
        #expect(l.indirectTableOffset(head: size - 1) + slots * 16 <= l.byteCount)
    }

    @Test func concreteNumbersForCommonSizes() throws {
        let a = try SplitQueueLayout(size: 256, indirectSlots: 0)
        #expect([a.descriptorOffset, a.availOffset, a.usedOffset, a.indirectOffset, a.byteCount]
                == [0, 4096, 8192, 10256, 12288])
        let b = try SplitQueueLayout(size: 128, indirectSlots: 128)
        // avail 2048..2310 -> used 4096..5126 -> indirect 5136, + 128*128*16 = 267280 -> 270336
        #expect([b.descriptorOffset, b.availOffset, b.usedOffset, b.indirectOffset, b.byteCount]
                == [0, 2048, 4096, 5136, 270336])
        let c = try SplitQueueLayout(size: 2, indirectSlots: 1)
        #expect([c.availOffset, c.usedOffset, c.indirectOffset, c.byteCount] == [32, 4096, 4128, 8192])
    }

    @Test(arguments: [0, 1, 3, 6, 100, 32769, 65536, -2, -32768])
    func invalidSizesAreRejected(size: Int) {
        #expect(throws: VirtioError.self) { try SplitQueueLayout(size: size, indirectSlots: 0) }
    }

    @Test(arguments: [-1, 1025, 4096])
    func invalidIndirectSlotsAreRejected(slots: Int) {
        #expect(throws: VirtioError.self) { try SplitQueueLayout(size: 8, indirectSlots: slots) }
    }

    @Test func errorsSayWhatToDo() throws {
        do {
            _ = try SplitQueueLayout(size: 3, indirectSlots: 0)
            Issue.record("size 3 accepted")
        } catch {
            guard case .invalidLayout = error else { Issue.record("wrong error \(error)"); return }
            #expect(error.remedy == .fixCaller)
            #expect(error.description.contains("power of two"))
        }
        #expect(VirtioError.queueFull.remedy == .retryLater)
        #expect(VirtioError.deviceProtocol("x").remedy == .resetQueue)
        #expect(VirtioError.missingFeatures(1).remedy == .rejectDevice)
    }
}
