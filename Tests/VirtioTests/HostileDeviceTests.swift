import OutboardTestSupport
import OutboardRings
import Testing
import Virtio

/// A device that breaks the ring protocol: the queue must notice, set its sticky error,
/// and never read or write outside its area (a `GuardedArea` of exactly the layout size:
/// a stray access kills the test process).
@Suite struct HostileDeviceTests {
    enum Violation: CaseIterable {
        case idxTooFarAhead, idxBackwards, idxWild, idOutOfRange, idHuge, idFreeDescriptor,
             idNonHead, idDuplicate, lenTooLarge, lenOnReadOnlyChain, idNotYetPublished
    }

    /// Three published chains (A: readable 16 + writable 512 + 1, B: readable 16, C:
    /// writable 4096) and one added but unpublished (D), in a direct queue of 8.
    struct Setup: ~Copyable {
        var h: Harness
        let a: UInt16, b: UInt16, c: UInt16, d: UInt16
        init() throws {
            var h = try Harness(size: 8)
            let a = try h.queue.add([r(0x1000, 16), w(0x2000, 512), w(0x3000, 1)])
            let b = try h.queue.add([r(0x4000, 16)])
            let c = try h.queue.add([w(0x5000, 4096)])
            _ = h.queue.publish()
            let d = try h.queue.add([w(0x6000, 8)])
            _ = h.device.takeAvailable()
            (self.a, self.b, self.c, self.d) = (a, b, c, d)
            self.h = h
        }
    }

    @Test(arguments: Violation.allCases)
    func violationSetsTheStickyError(_ v: Violation) throws {
        var s = try Setup()
        var good: [VirtqUsedElement] = []  // elements the driver may legitimately return first
        switch v {
        case .idxTooFarAhead:
            for (i, id) in [s.a, s.b, s.c].enumerated() { s.h.device.writeUsed(at: UInt16(i), id: UInt32(id), len: 0) }
            s.h.device.storeUsedIdx(4)  // only 3 chains are with the device
        case .idxBackwards:
            s.h.device.complete(id: UInt32(s.a), len: 0)
            good = [VirtqUsedElement(id: UInt32(s.a), len: 0)]
            check(s.h.queue.popUsed() == good[0])
            good = []
            s.h.device.storeUsedIdx(0)
        case .idxWild:
            s.h.device.storeUsedIdx(0x8001)
        case .idOutOfRange:
            s.h.device.complete(id: 8, len: 0)
        case .idHuge:
            s.h.device.complete(id: .max, len: 0)
        case .idFreeDescriptor:
            s.h.device.complete(id: 7, len: 0)
        case .idNonHead:
            // A holds descriptors 0, 1, 2 (head 0); 1 is inside the chain, not a head.
            #expect(s.a == 0)
            s.h.device.complete(id: 1, len: 0)
        case .idDuplicate:
            s.h.device.complete(id: UInt32(s.c), len: 4096)
            s.h.device.complete(id: UInt32(s.c), len: 4096)
            good = [VirtqUsedElement(id: UInt32(s.c), len: 4096)]
        case .lenTooLarge:
            s.h.device.complete(id: UInt32(s.a), len: 514)
        case .lenOnReadOnlyChain:
            s.h.device.complete(id: UInt32(s.b), len: 1)
        case .idNotYetPublished:
            s.h.device.complete(id: UInt32(s.d), len: 0)
        }
        for g in good { check(s.h.queue.popUsed() == g) }
        check(s.h.queue.popUsed() == nil)
        let sticky = s.h.queue.error
        let e = try #require(sticky)
        guard case .deviceProtocol = e else { Issue.record("wrong error \(e)"); return }
        #expect(e.remedy == .resetQueue)

        // Sticky: a "repaired" ring is not trusted again.
        s.h.device.complete(id: UInt32(s.b), len: 0)
        check(s.h.queue.popUsed() == nil)
        check(s.h.queue.error == e)
        #expect(throws: e) { try s.h.queue.add([w(1, 1)]) }
        check(!s.h.queue.canAdd(1))
        check(!s.h.queue.publish())
        check(s.h.queue.enableNotifications(), "in the error state: poll and find the error")

        // Only a reset clears it.
        s.h.queue.reset()
        check(s.h.queue.error == nil)
        s.h.device = TestDevice(memory: s.h.area.base, size: 8, eventIdx: false)
        let head = try s.h.queue.add([w(0x1000, 512)])
        check(s.h.queue.publish())
        _ = s.h.device.takeAvailable()
        s.h.device.complete(id: UInt32(head), len: 512)
        check(s.h.queue.popUsed() == VirtqUsedElement(id: UInt32(head), len: 512))
    }

    /// A used.idx that runs ahead of the elements is caught when it exceeds the chains
    /// held; within that bound, each element is checked on its own.
    @Test func usedIdxAheadOfWrittenElementsIsCaughtByTheElementCheck() throws {
        var s = try Setup()
        // Claims 2 completions but only wrote one; slot 1 is still zero: id 0 = A again.
        s.h.device.writeUsed(at: 0, id: UInt32(s.a), len: 0)
        s.h.device.storeUsedIdx(2)
        check(s.h.queue.popUsed() == VirtqUsedElement(id: UInt32(s.a), len: 0))
        check(s.h.queue.popUsed() == nil)
        check(s.h.queue.error != nil)
    }

    /// Random garbage from a device, against a model of what the driver may return.
    /// Runs with and without indirect tables and event idx, areas of the exact size.
    @Test(arguments: [false, true], [false, true])
    func randomGarbageNeverEscapes(indirect: Bool, eventIdx: Bool) throws {
        let size = 8
        var h = try Harness(size: size, slots: indirect ? 3 : 0, eventIdx: eventIdx, indirect: indirect)
        var rng = SplitMix(seed: 0xBAD + (indirect ? 1 : 0) + (eventIdx ? 2 : 0))
        var errors = 0, validPops = 0
        let l = h.queue.layout
        for _ in 0..<600 {
            h.queue.reset()
            h.device = TestDevice(memory: h.area.base, size: size, eventIdx: eventIdx)
            // The model: in-flight heads -> (writable bytes, ring descriptors, published).
            var model: [UInt16: (writable: UInt32, descriptors: Int, published: Bool)] = [:]
            var completedByDevice: Set<UInt16> = []
            for _ in 0..<40 {
                switch Int.random(in: 0..<10, using: &rng) {
                case 0...2:
                    let n = Int.random(in: 1...3, using: &rng)
                    guard h.queue.canAdd(n) else { break }
                    let bufs = randomChain(n, using: &rng)
                    let head = try h.queue.add(bufs)
                    #expect(model[head] == nil)
                    let writable = bufs.filter(\.deviceWritable).reduce(UInt32(0)) { $0 + $1.length }
                    model[head] = (writable, indirect && n > 1 ? 1 : n, false)
                case 3:
                    _ = h.queue.publish()
                    for k in model.keys { model[k]!.published = true }
                case 4:
                    // Honest completion of a published chain the device has not completed yet
                    // (chosen from the model: the avail ring may have been scribbled on).
                    let candidates = model.filter { $0.value.published && !completedByDevice.contains($0.key) }
                    if let (head, m) = candidates.randomElement(using: &rng) {
                        completedByDevice.insert(head)
                        h.device.complete(id: UInt32(head), len: UInt32.random(in: 0...m.writable, using: &rng))
                    }
                case 5:
                    // Garbage elements somewhere in the used ring.
                    for _ in 0..<Int.random(in: 1...3, using: &rng) {
                        let id: UInt32 = Bool.random(using: &rng) ? UInt32.random(in: 0..<UInt32(size + 2), using: &rng) : rng.next32()
                        let len: UInt32 = Bool.random(using: &rng) ? UInt32.random(in: 0...600, using: &rng) : rng.next32()
                        h.device.writeUsed(at: UInt16.random(in: 0...UInt16.max, using: &rng), id: id, len: len)
                    }
                case 6:
                    // used.idx: a little ahead, or anything.
                    let v = Bool.random(using: &rng)
                        ? h.queue.lastUsedIndex &+ UInt16.random(in: 0...3, using: &rng)
                        : UInt16.random(in: 0...UInt16.max, using: &rng)
                    h.device.storeUsedIdx(v)
                case 7:
                    // Scribble anywhere in the area, including the driver's own parts.
                    for _ in 0..<Int.random(in: 1...16, using: &rng) {
                        let o = Int.random(in: 0..<l.byteCount, using: &rng)
                        h.area.base.storeBytes(of: UInt8.random(in: 0...255, using: &rng), toByteOffset: o, as: UInt8.self)
                    }
                case 8:
                    _ = h.queue.enableNotifications(after: Int.random(in: -2...10, using: &rng))
                default:
                    h.queue.disableNotifications()
                }
                // Drain: everything returned must be a published chain in flight, len in bounds.
                while let u = h.queue.popUsed() {
                    #expect(u.id < UInt32(size))
                    let head = UInt16(truncatingIfNeeded: u.id)
                    let removed = model.removeValue(forKey: head)
                    let m = try #require(removed, "returned \(u.id), not in flight")
                    completedByDevice.remove(head)
                    #expect(m.published, "returned \(u.id) before it was published")
                    #expect(u.len <= m.writable)
                    validPops += 1
                }
                if h.queue.error != nil {
                    errors += 1
                    check(h.queue.popUsed() == nil)
                    #expect(throws: VirtioError.self) { try h.queue.add([w(1, 1)]) }
                    break
                }
                // Private bookkeeping stays consistent whatever the device wrote.
                check(h.queue.inFlight == model.count)
                check(h.queue.freeDescriptors + model.values.reduce(0) { $0 + $1.descriptors } == size)
            }
        }
        #expect(errors > 100, "the garbage was noticed")
        #expect(validPops > 100, "honest completions still went through")
    }
}

extension SplitMix {
    mutating func next32() -> UInt32 { UInt32(truncatingIfNeeded: next()) }
}
