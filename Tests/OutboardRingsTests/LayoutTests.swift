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
        #expect(QueueLayout.producerBarrierOffset == 4)
        #expect(QueueLayout.signalOffset == 128)
        #expect(QueueLayout.signalOrderingOffset == 132)
        #expect(QueueLayout.wakeIndexOffset == 136)
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
        #expect(throws: QueueError.self) { _ = try QueueProducer<BufferDescriptor>(memory: mem, size: 4096, at: 4096 - 64, layout: l) }
        #expect(throws: QueueError.self) { _ = try QueueProducer<BufferDescriptor>(memory: mem, size: 4096, at: 32, layout: l) }
        #expect(throws: QueueError.self) { _ = try QueueProducer<BufferDescriptor>(memory: mem, size: 4096, at: -64, layout: l) }
        _ = try QueueProducer<BufferDescriptor>(memory: mem, size: 4096, at: 4096 - l.byteCount, layout: l)
    }
}

/// Entries of other sizes: a consumer reads a slot as whole 8-byte words, each once.
struct Entry12: QueueEntry {  // 12 bytes and 4 of tail padding: refused
    var a: UInt64, b: UInt32
    static func admits(_ entry: Self, within bounds: Int) -> Bool { true }
    static func rejection(_ entry: Self, within bounds: Int) -> QueueError { .entryRejected("never") }
}

struct Entry24: QueueEntry, Equatable {  // three words: read by the generic word loop
    var a: UInt64, b: UInt64, c: UInt64
    static func admits(_ entry: Self, within limit: UInt64) -> Bool { entry.a < limit }
    static func rejection(_ entry: Self, within limit: UInt64) -> QueueError { .entryRejected("a = \(entry.a)") }
}

@Suite struct EntrySizeTests {
    @Test func entriesThatAreNotWholeWordsAreRefused() {
        #expect(throws: QueueError.unsupportedEntry(size: 12)) { try QueueLayout(capacity: 8, entry: Entry12.self) }
        // Nor can an endpoint use such a type on a layout made for another of the same stride.
        let l = try! QueueLayout(capacity: 8)
        let mem = UnsafeMutableRawPointer.allocate(byteCount: l.byteCount, alignment: 64)
        defer { mem.deallocate() }
        #expect(throws: QueueError.unsupportedEntry(size: 12)) {
            _ = try QueueProducer<Entry12>(memory: mem, size: l.byteCount, at: 0, layout: l)
        }
    }

    @Test func threeWordEntriesRoundTripAndAreChecked() throws {
        let l = try QueueLayout(capacity: 4, entry: Entry24.self)
        let mem = UnsafeMutableRawPointer.allocate(byteCount: l.byteCount, alignment: 64)
        defer { mem.deallocate() }
        try l.initialize(memory: mem, size: l.byteCount, at: 0)
        var p = try QueueProducer<Entry24>(memory: mem, size: l.byteCount, at: 0, layout: l)
        var c = try QueueConsumer<Entry24>(memory: mem, size: l.byteCount, at: 0, layout: l, bounds: 1000)
        for i in UInt64(0)..<10 {  // across wrap-arounds of the 4 slots
            let e = Entry24(a: i, b: ~i, c: i &* 0x9e37_79b9_7f4a_7c15)
            do { let ok = p.enqueue(e); #expect(ok) }
            do { let got = c.dequeue(); #expect(got == e) }
        }
        do { let ok = p.enqueue(Entry24(a: 1000, b: 0, c: 0)); #expect(ok) }
        do { let got = c.dequeue(); #expect(got == nil) }
        do { let error = c.error; #expect(error == .entryRejected("a = 1000")) }
    }
}
