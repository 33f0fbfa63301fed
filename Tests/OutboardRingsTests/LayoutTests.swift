import Synchronization
import Testing
import OutboardRings

/// Every struct that lives in shared memory has its layout pinned here; the C reference
/// (CRefRing) pins the same numbers with _Static_assert.
@Suite struct LayoutTests {
    @Test func bufferDescriptorIs16BytesWithFixedOffsets() {
        #expect(MemoryLayout<BufferDescriptor>.size == 16)
        #expect(MemoryLayout<BufferDescriptor>.stride == 16)
        #expect(MemoryLayout<BufferDescriptor>.alignment == 8)
        #expect(MemoryLayout<BufferDescriptor>.offset(of: \.offset) == 0)
        #expect(MemoryLayout<BufferDescriptor>.offset(of: \.length) == 8)
        #expect(MemoryLayout<BufferDescriptor>.offset(of: \.cookie) == 12)
        #expect(MemoryLayout<RegionOffset>.size == 8)
    }

    @Test func atomicWordsHaveThePlainLayout() {
        #expect(MemoryLayout<Atomic<UInt32>>.size == 4)
        #expect(MemoryLayout<Atomic<UInt32>>.alignment == 4)
    }

    @Test func queueHeaderPutsEachControlWordOnItsOwnCacheLine() {
        #expect(QueueLayout.tailOffset == 0)
        #expect(QueueLayout.headOffset == 64)
        #expect(QueueLayout.signalOffset == 128)
        #expect(QueueLayout.entriesOffset == 192)
    }

    @Test(arguments: [2, 8, 512, 4096, 1 << 20])
    func queueSizeFollowsCapacity(capacity: Int) throws {
        let l = try QueueLayout(capacity: capacity)
        #expect(l.byteCount == (192 + capacity * 16 + 63) / 64 * 64)
        #expect(l.byteCount % 64 == 0)
        let pair = try QueuePairLayout(capacity: capacity)
        #expect(pair.freeOffset == 0)
        #expect(pair.activeOffset == l.byteCount)
        #expect(pair.endOffset == 2 * l.byteCount)
    }

    @Test(arguments: [0, 1, 3, 100, (1 << 20) + 1, 1 << 21, -4])
    func badCapacitiesAreRejected(capacity: Int) {
        #expect(throws: QueueError.invalidCapacity(capacity)) { try QueueLayout(capacity: capacity) }
    }

    @Test func queueMustFitItsRegionAndBeAligned() throws {
        let l = try QueueLayout(capacity: 8)
        let mem = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 64)
        defer { mem.deallocate() }
        #expect(throws: QueueError.self) { try QueueProducer<BufferDescriptor>(memory: mem, size: 4096, at: 4096 - 64, layout: l) }
        #expect(throws: QueueError.self) { try QueueProducer<BufferDescriptor>(memory: mem, size: 4096, at: 32, layout: l) }
        #expect(throws: QueueError.self) { try QueueProducer<BufferDescriptor>(memory: mem, size: 4096, at: -64, layout: l) }
        _ = try QueueProducer<BufferDescriptor>(memory: mem, size: 4096, at: 4096 - l.byteCount, layout: l)
    }
}
