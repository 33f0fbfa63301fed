import OutboardTestSupport
import Testing
import OutboardRings
import Virtio

/// A queue over a guarded area of exactly its layout size, and a spec-following device on
/// the same memory.
struct Harness: ~Copyable {
    let area: GuardedArea
    var queue: SplitVirtqueue
    var device: TestDevice

    init(size: Int, slots: Int = 0, eventIdx: Bool = false, indirect: Bool = false) throws {
        let layout = try SplitQueueLayout(size: size, indirectSlots: slots)
        let area = GuardedArea(byteCount: layout.byteCount)
        queue = SplitVirtqueue(memory: area.base, ioAddress: IOAddress(rawValue: testIOAddress), layout: layout,
                               eventIdx: eventIdx, indirect: indirect)
        device = TestDevice(memory: area.base, size: size, eventIdx: eventIdx)
        self.area = area
    }
}

func randomChain(_ n: Int, using rng: inout SplitMix) -> [VirtqBuffer] {
    let readable = Int.random(in: 0...n, using: &rng)
    return (0..<n).map { i in
        VirtqBuffer(address: IOAddress(rawValue: UInt64.random(in: 0...(1 << 40), using: &rng) & ~511),
                    length: UInt32.random(in: 1...65536, using: &rng), deviceWritable: i >= readable)
    }
}

func r(_ a: UInt64, _ l: UInt32) -> VirtqBuffer { VirtqBuffer(address: IOAddress(rawValue: a), length: l, deviceWritable: false) }
func w(_ a: UInt64, _ l: UInt32) -> VirtqBuffer { VirtqBuffer(address: IOAddress(rawValue: a), length: l, deviceWritable: true) }

@Suite struct VirtqueueTests {
    @Test func initZeroesTheAreaAndReportsAddresses() throws {
        let h = try Harness(size: 64, slots: 4, indirect: true)
        let raw = UnsafeRawBufferPointer(start: h.area.base, count: h.area.byteCount)
        #expect(raw.allSatisfy { $0 == 0 })
        let l = h.queue.layout
        check(h.queue.descriptorTableAddress.rawValue == testIOAddress)
        check(h.queue.availRingAddress.rawValue == testIOAddress + UInt64(l.availOffset))
        check(h.queue.usedRingAddress.rawValue == testIOAddress + UInt64(l.usedOffset))
        check(h.queue.descriptorTablePointer == h.area.base)
        check(h.queue.availRingPointer == h.area.base + l.availOffset)
        check(h.queue.usedRingPointer == h.area.base + l.usedOffset)
        check(h.queue.freeDescriptors == 64 && h.queue.inFlight == 0 && h.queue.error == nil)
        check(h.queue.maxChainLength == 4)
    }

    /// §2.7.13.1: direct chains use NEXT/WRITE and `next`; §2.7.4.2 order.
    @Test func directChainIsLaidOutAsTheSpecSays() throws {
        var h = try Harness(size: 8)
        let bufs = [r(0x1000, 16), w(0x2000, 512), w(0x3000, 1)]
        let head = try h.queue.add(bufs)
        #expect(head == 0)
        check(h.queue.freeDescriptors == 5 && h.queue.inFlight == 1)
        // Not visible before publish.
        check(h.device.availIdx == 0)
        check(h.queue.publish())
        check(h.device.availIdx == 1)
        let d0 = h.device.descriptor(0), d1 = h.device.descriptor(Int(d0.next)), d2 = h.device.descriptor(Int(d1.next))
        #expect(d0 == VirtqDescriptor(addr: 0x1000, len: 16, flags: VirtqDescriptor.flagNext, next: d0.next))
        #expect(d1 == VirtqDescriptor(addr: 0x2000, len: 512, flags: VirtqDescriptor.flagNext | VirtqDescriptor.flagWrite, next: d1.next))
        #expect(d2.addr == 0x3000 && d2.len == 1 && d2.flags == VirtqDescriptor.flagWrite)
        #expect(Set([0, d0.next, d1.next]).count == 3)
        let chains = h.device.takeAvailable()
        #expect(chains == [DeviceChain(head: 0, buffers: bufs)])
        h.device.complete(id: 0, len: 513)
        check(h.queue.popUsed() == VirtqUsedElement(id: 0, len: 513))
        check(h.queue.popUsed() == nil)
        check(h.queue.freeDescriptors == 8 && h.queue.inFlight == 0)
    }

    /// §2.7.5.3: one INDIRECT ring descriptor pointing at the head's table; a single
    /// buffer stays direct.
    @Test func indirectChainUsesTheHeadsTable() throws {
        var h = try Harness(size: 8, slots: 4, indirect: true)
        let single = try h.queue.add([w(0x9000, 4096)])
        check(h.device.descriptor(Int(single)) == VirtqDescriptor(addr: 0x9000, len: 4096, flags: VirtqDescriptor.flagWrite, next: 0))
        let bufs = [r(0x1000, 16), w(0x2000, 4096), w(0x3000, 1)]
        let head = try h.queue.add(bufs)
        check(h.queue.freeDescriptors == 6)
        let l = h.queue.layout
        let ring = h.device.descriptor(Int(head))
        #expect(ring == VirtqDescriptor(addr: testIOAddress + UInt64(l.indirectOffset + Int(head) * 4 * 16),
                                        len: 48, flags: VirtqDescriptor.flagIndirect, next: 0))
        let table = h.area.base + l.indirectOffset + Int(head) * 64
        for i in 0..<3 {
            let d = VirtqDescriptor(littleEndian: table.load(fromByteOffset: 16 * i, as: VirtqDescriptor.self))
            #expect(d.addr == bufs[i].address.rawValue && d.len == bufs[i].length)
            #expect(d.flags & VirtqDescriptor.flagNext == (i < 2 ? VirtqDescriptor.flagNext : 0))
            #expect(d.flags & VirtqDescriptor.flagWrite == (i > 0 ? VirtqDescriptor.flagWrite : 0))
            if i < 2 { #expect(d.next == UInt16(i + 1)) }
        }
        check(h.queue.publish())
        check(h.device.takeAvailable() == [DeviceChain(head: single, buffers: [w(0x9000, 4096)]),
                                             DeviceChain(head: head, buffers: bufs)])
        // A full table (4) is accepted, 5 is not.
        _ = try h.queue.add([r(1, 1), r(2, 1), w(3, 1), w(4, 1)])
        #expect(throws: VirtioError.self) { try h.queue.add([r(1, 1), r(2, 1), w(3, 1), w(4, 1), w(5, 1)]) }
    }

    @Test func invalidChainsAreRejectedAndLeaveTheQueueUnchanged() throws {
        var h = try Harness(size: 4)
        _ = try h.queue.add([r(0x1000, 8)])
        func rejected(_ bufs: [VirtqBuffer], _ note: Comment) {
            do {
                _ = try h.queue.add(bufs)
                Issue.record("accepted: \(note)")
            } catch {
                guard case .invalidChain = error else { Issue.record("\(note): \(error)"); return }
            }
            check(h.queue.freeDescriptors == 3 && h.queue.inFlight == 1 && h.queue.nextAvailIndex == 1, note)
        }
        rejected([], "empty chain")
        rejected([r(0x1000, 0)], "zero length")
        rejected([r(0x1000, 8), w(0x2000, 0)], "zero length writable")
        rejected([w(0x1000, 8), r(0x2000, 8)], "readable after writable (§2.7.4.2)")
        rejected([r(0, 1), r(0, 1), r(0, 1), r(0, 1), r(0, 1)], "longer than the queue size")
        rejected([r(UInt64.max - 10, 12)], "address range wraps")
        rejected([r(0, .max), r(0, .max)], "more than 2^32 bytes (§2.7.5.2)")
        // The boundaries themselves are fine.
        _ = try h.queue.add([r(UInt64.max - 11, 12)])
        _ = try h.queue.add([r(0, .max), w(0, 1)])
        check(h.queue.freeDescriptors == 0 && h.queue.inFlight == 3)
    }

    @Test func queueFullWithoutIndirect() throws {
        var h = try Harness(size: 4)
        check(!h.queue.canAdd(0) && !h.queue.canAdd(5) && h.queue.canAdd(4))
        let a = try h.queue.add([r(1, 1), w(2, 1)])
        _ = try h.queue.add([r(1, 1), w(2, 1)])
        check(!h.queue.canAdd(1))
        #expect(throws: VirtioError.queueFull) { try h.queue.add([w(1, 1)]) }
        check(h.queue.freeDescriptors == 0 && h.queue.inFlight == 2 && h.queue.nextAvailIndex == 2)
        check(h.queue.publish())
        _ = h.device.takeAvailable()
        h.device.complete(id: UInt32(a), len: 1)
        check(h.queue.popUsed()?.id == UInt32(a))
        check(h.queue.canAdd(2) && !h.queue.canAdd(3))
        _ = try h.queue.add([r(1, 1), w(2, 1)])
    }

    @Test func queueFullWithIndirect() throws {
        var h = try Harness(size: 4, slots: 8, indirect: true)
        check(h.queue.maxChainLength == 4)  // never longer than the queue size (§2.7.5.3.1)
        for _ in 0..<4 { _ = try h.queue.add([r(1, 1), w(2, 1), w(3, 1)]) }
        check(!h.queue.canAdd(1) && !h.queue.canAdd(3))
        #expect(throws: VirtioError.queueFull) { try h.queue.add([r(1, 1), w(2, 1), w(3, 1)]) }
        check(h.queue.publish())
        let chains = h.device.takeAvailable()
        #expect(Set(chains.map(\.head)) == [0, 1, 2, 3])
        #expect(chains.allSatisfy { $0.buffers == [r(1, 1), w(2, 1), w(3, 1)] })
    }

    /// Many random chains, completed out of order, for more than 65536 requests so both
    /// 16-bit indices wrap.
    @Test(arguments: [false, true], [false, true])
    func randomChainsOutOfOrderAcrossIndexWrap(indirect: Bool, eventIdx: Bool) throws {
        let size = 16
        var h = try Harness(size: size, slots: indirect ? 6 : 0, eventIdx: eventIdx, indirect: indirect)
        var rng = SplitMix(seed: indirect ? (eventIdx ? 1 : 2) : (eventIdx ? 3 : 4))
        var expected: [UInt16: [VirtqBuffer]] = [:]
        var lens: [UInt16: UInt32] = [:]
        var held: [DeviceChain] = []
        let total = 70_000
        var submitted = 0, completed = 0, rounds = 0, fulls = 0
        while completed < total && rounds < 10 * total {
            rounds += 1
            for _ in 0..<Int.random(in: 0...4, using: &rng) where submitted < total {
                let n = Int.random(in: 1...min(h.queue.maxChainLength, 5), using: &rng)
                let bufs = randomChain(n, using: &rng)
                guard h.queue.canAdd(n) else {
                    #expect(throws: VirtioError.queueFull) { try h.queue.add(bufs) }
                    fulls += 1
                    break
                }
                let head = try h.queue.add(bufs)
                #expect(expected[head] == nil, "head \(head) handed out twice")
                expected[head] = bufs
                submitted += 1
            }
            _ = h.queue.publish()
            for c in h.device.takeAvailable() {
                #expect(expected[c.head] == c.buffers)
                held.append(c)
            }
            held.shuffle(using: &rng)
            let k = Int.random(in: 0...held.count, using: &rng)
            for c in held.prefix(k) {
                let len = UInt32.random(in: 0...c.writableBytes, using: &rng)
                lens[c.head] = len
                h.device.complete(id: UInt32(c.head), len: len)
            }
            held.removeFirst(k)
            while let u = h.queue.popUsed() {
                let head = UInt16(u.id)
                #expect(expected.removeValue(forKey: head) != nil)
                #expect(lens.removeValue(forKey: head) == u.len)
                completed += 1
            }
            try #require(h.queue.error == nil)
            check(h.queue.inFlight == expected.count)
        }
        #expect(completed == total)
        #expect(fulls > 0)
        check(h.queue.nextAvailIndex == UInt16(truncatingIfNeeded: total))
        check(h.queue.lastUsedIndex == UInt16(truncatingIfNeeded: total))
        check(h.queue.freeDescriptors == size && h.queue.inFlight == 0)
    }

    /// §2.7.10: without event idx, kick unless the device set VIRTQ_USED_F_NO_NOTIFY.
    @Test func kickFollowsUsedFlagsWithoutEventIdx() throws {
        var h = try Harness(size: 8)
        check(!h.queue.publish(), "nothing added")
        _ = try h.queue.add([w(1, 1)])
        check(h.queue.publish())
        check(!h.queue.publish(), "nothing added since")
        h.device.setUsedFlags(VirtqUsedFlags.noNotify)
        _ = try h.queue.add([w(1, 1)])
        check(!h.queue.publish())
        h.device.setUsedFlags(0)
        _ = try h.queue.add([w(1, 1)])
        check(h.queue.publish())
        check(h.device.availIdx == 3)
    }

    /// §2.7.10.1 with event idx: kick iff one of the indices published now equals
    /// avail_event; checked against that sentence directly, across the 16-bit wrap.
    @Test func eventIdxKickDecisionAcrossWrap() throws {
        var h = try Harness(size: 64, eventIdx: true)
        var rng = SplitMix(seed: 11)
        var published = 0, kicks = 0
        h.device.setUsedFlags(VirtqUsedFlags.noNotify)  // must be ignored with event idx
        while published < 70_000 {
            let old = h.queue.nextAvailIndex
            let batch = Int.random(in: 1...8, using: &rng)
            for _ in 0..<batch { _ = try h.queue.add([w(0x1000, 512)]) }
            let event = old &+ UInt16(bitPattern: Int16(Int.random(in: -4...12, using: &rng)))
            h.device.setAvailEvent(event)
            let expected = (0..<batch).contains { old &+ UInt16($0) == event }
            let kick = h.queue.publish()
            #expect(kick == expected, "old \(old) batch \(batch) avail_event \(event)")
            if kick { kicks += 1 }
            for c in h.device.takeAvailable() { h.device.complete(id: UInt32(c.head), len: 0) }
            while h.queue.popUsed() != nil {}
            published += batch
        }
        #expect(kicks > 1000 && kicks < published)
        check(h.queue.error == nil)
    }

    /// §2.7.7 with event idx: enableNotifications(after: k) sets used_event so that the
    /// device notifies exactly at the k-th completion; checked over the 16-bit wrap.
    @Test func usedEventMakesTheDeviceNotifyAtTheKthCompletion() throws {
        var h = try Harness(size: 32, eventIdx: true)
        var rng = SplitMix(seed: 12)
        var popped = 0
        while popped < 70_000 {
            let m = Int.random(in: 1...32, using: &rng)
            for _ in 0..<m { _ = try h.queue.add([w(0x1000, 512)]) }
            _ = h.queue.publish()
            let chains = h.device.takeAvailable()
            let k = Int.random(in: 1...m, using: &rng)
            let before = h.device.notifications
            check(!h.queue.enableNotifications(after: k), "nothing pending yet")
            check(h.device.usedEvent == h.queue.lastUsedIndex &+ UInt16(k - 1))
            check(h.device.availFlags == 0, "flags MUST stay 0 with event idx (§2.7.7.1)")
            for (i, c) in chains.enumerated() {
                h.device.complete(id: UInt32(c.head), len: 0)
                check(h.device.notifications - before == (i + 1 >= k ? 1 : 0), "after \(i + 1) of \(m), k \(k)")
            }
            while h.queue.popUsed() != nil { popped += 1 }
        }
        check(h.queue.lastUsedIndex == UInt16(truncatingIfNeeded: popped))
    }

    @Test func enableNotificationsClampsAndRechecks() throws {
        var h = try Harness(size: 16, eventIdx: true)
        check(!h.queue.enableNotifications(after: 5))
        check(h.device.usedEvent == 0, "nothing in flight: clamped to 1")
        for _ in 0..<3 { _ = try h.queue.add([w(0x1000, 512)]) }
        _ = h.queue.publish()
        check(!h.queue.enableNotifications(after: 100))
        check(h.device.usedEvent == 2, "clamped to the 3 in flight")
        check(!h.queue.enableNotifications(after: 0))
        check(h.device.usedEvent == 0)
        check(!h.queue.enableNotifications(after: -7))
        check(h.device.usedEvent == 0)
        let chains = h.device.takeAvailable()
        h.device.complete(id: UInt32(chains[0].head), len: 0)
        check(h.queue.enableNotifications(), "a completion is pending: poll, do not sleep")
        check(h.queue.popUsed() != nil)
        check(!h.queue.enableNotifications())
        check(h.device.usedEvent == 1)
        // Disabled: used_event half the index space behind, no notification for the rest.
        h.queue.disableNotifications()
        check(h.device.usedEvent == 1 &- 0x8000)
        let before = h.device.notifications
        for c in chains.dropFirst() { h.device.complete(id: UInt32(c.head), len: 0) }
        check(h.device.notifications == before)
        check(h.device.availFlags == 0)
        while h.queue.popUsed() != nil {}
        check(h.queue.inFlight == 0)
    }

    /// §2.7.7 without event idx: VIRTQ_AVAIL_F_NO_INTERRUPT.
    @Test func notificationFlagsWithoutEventIdx() throws {
        var h = try Harness(size: 8)
        for _ in 0..<4 { _ = try h.queue.add([w(0x1000, 512)]) }
        _ = h.queue.publish()
        let chains = h.device.takeAvailable()
        h.queue.disableNotifications()
        check(h.device.availFlags == VirtqAvailFlags.noInterrupt)
        h.device.complete(id: UInt32(chains[0].head), len: 0)
        check(h.device.notifications == 0)
        check(h.queue.enableNotifications(), "one completion pending")
        check(h.device.availFlags == 0)
        _ = h.queue.popUsed()
        check(!h.queue.enableNotifications())
        h.device.complete(id: UInt32(chains[1].head), len: 0)
        check(h.device.notifications == 1)
        h.queue.disableNotifications()
        h.device.complete(id: UInt32(chains[2].head), len: 0)
        check(h.device.notifications == 1)
        check(h.queue.popUsed() != nil && h.queue.popUsed() != nil && h.queue.popUsed() == nil)
    }

    @Test(arguments: [false, true])
    func resetAndResubmit(indirect: Bool) throws {
        var h = try Harness(size: 16, slots: indirect ? 4 : 0, indirect: indirect)
        var rng = SplitMix(seed: 21)
        var submitted: [UInt16: [VirtqBuffer]] = [:]
        for _ in 0..<4 {
            let bufs = randomChain(2, using: &rng)
            submitted[try h.queue.add(bufs)] = bufs
        }
        _ = h.queue.publish()
        let unpublished = randomChain(1, using: &rng)
        submitted[try h.queue.add(unpublished)] = unpublished
        let chains = h.device.takeAvailable()
        #expect(chains.count == 4)
        h.device.complete(id: UInt32(chains[0].head), len: 0)
        h.device.complete(id: UInt32(chains[1].head), len: 0)
        check(h.queue.popUsed() != nil && h.queue.popUsed() != nil)
        submitted[chains[0].head] = nil
        submitted[chains[1].head] = nil
        h.device.complete(id: UInt32(chains[2].head), len: 0)  // completed, never popped
        check(h.queue.inFlight == 3)

        var heads: [UInt16] = []
        h.queue.forEachInFlight { heads.append($0) }
        #expect(Set(heads) == Set(submitted.keys))
        #expect(heads.count == 3)

        h.queue.reset()
        check(h.queue.inFlight == 0 && h.queue.freeDescriptors == 16 && h.queue.error == nil)
        check(h.queue.nextAvailIndex == 0 && h.queue.lastUsedIndex == 0)
        check(UnsafeRawBufferPointer(start: h.area.base, count: h.area.byteCount).allSatisfy { $0 == 0 })
        var none = 0
        h.queue.forEachInFlight { _ in none += 1 }
        #expect(none == 0)
        check(h.queue.popUsed() == nil)

        // The restarted device starts from index 0; resubmit.
        h.device = TestDevice(memory: h.area.base, size: 16, eventIdx: false)
        var again: [UInt16: [VirtqBuffer]] = [:]
        for old in heads { again[try h.queue.add(submitted[old]!)] = submitted[old]! }
        check(h.queue.publish())
        let redone = h.device.takeAvailable()
        #expect(redone.count == 3)
        for c in redone {
            #expect(again[c.head] == c.buffers)
            h.device.complete(id: UInt32(c.head), len: c.writableBytes)
        }
        var n = 0
        while let u = h.queue.popUsed() {
            #expect(again.removeValue(forKey: UInt16(u.id)) != nil)
            n += 1
        }
        check(n == 3 && h.queue.inFlight == 0 && h.queue.freeDescriptors == 16)
    }

    /// The device may scribble on avail.idx, the avail ring and the descriptor table; the
    /// driver never reads them back.
    @Test func driverNeverReadsBackWhatItPublished() throws {
        var h = try Harness(size: 8)
        _ = try h.queue.add([w(0x1000, 512)])
        _ = try h.queue.add([w(0x2000, 512)])
        _ = h.queue.publish()
        let chains = h.device.takeAvailable()
        let l = h.queue.layout
        // Scribble over the descriptor table and the whole available ring.
        h.area.base.initializeMemory(as: UInt8.self, repeating: 0xEE, count: l.availOffset + 6 + 2 * 8)
        _ = try h.queue.add([w(0x3000, 512)])
        _ = h.queue.publish()
        check(h.device.availIdx == 3)
        check(h.device.descriptor(2) == VirtqDescriptor(addr: 0x3000, len: 512, flags: VirtqDescriptor.flagWrite, next: 0))
        for c in chains { h.device.complete(id: UInt32(c.head), len: 512) }
        check(h.queue.popUsed() != nil && h.queue.popUsed() != nil && h.queue.popUsed() == nil)
        check(h.queue.error == nil && h.queue.inFlight == 1 && h.queue.freeDescriptors == 7)
    }
}
