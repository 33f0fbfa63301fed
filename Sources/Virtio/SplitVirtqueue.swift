import OutboardRings
import Synchronization

// The driver side of a split virtqueue (virtio 1.2 §2.7), over memory the driver maps and
// the device sees at `ioAddress`.
//
// Models: Linux's drivers/virtio/virtio_ring.c (shadow indices, event-index arithmetic)
// and our own OutboardRings queues (private authoritative indices, one copy of anything
// the peer wrote, sticky error state).
//
// Trust: the device may write anything into the shared area at any moment, including the
// parts only the driver is supposed to write. So:
//  1. Our indices (avail idx, last used idx), the avail flags, the free descriptor list
//     and the record of every chain live in private memory. Shared memory only receives
//     copies; we never read back avail.idx, the avail ring, the descriptor table or the
//     indirect tables (the device "MUST NOT write to any descriptor table entry",
//     §2.7.5.1, but a broken one might, and it would only hurt itself).
//  2. used.idx is range-checked against the number of chains the device holds; a used
//     element is copied once into a local and only the copy is checked and used.
//  3. Every offset comes from the private `SplitQueueLayout`, never from shared memory.
// A violation puts the queue into a sticky error state: nothing more is popped, nothing
// is read or written outside the area, nothing traps, nothing loops on device-controlled
// counts.
//
// No syscalls, no classes, no allocation after init: the private records are allocated
// once, and the data path (add, publish, popUsed, notifications) touches only them and
// the shared area.

/// What the driver remembers about a chain, by head id (private memory).
struct ChainRecord {
    /// The chain was added and has not been returned by popUsed.
    var inFlight: Bool
    /// Descriptors of the ring's table it holds: 1 with an indirect table, else its length.
    var ringDescriptors: UInt16
    /// The available ring index it was placed at (tells published from not yet published).
    var availPosition: UInt16
    /// Sum of its device-writable lengths: the most the device may report in used.len.
    var writableBytes: UInt64

    static let free = ChainRecord(inFlight: false, ringDescriptors: 0, availPosition: 0, writableBytes: 0)
}

/// The driver side of one split virtqueue (§2.7).
///
/// The queue does not own the shared memory: the mapping must outlive it and be at least
/// `layout.byteCount` bytes. It owns its private bookkeeping, allocated once in `init`.
/// One owner, one thread: methods are not synchronized with each other (the device is the
/// only concurrent party, through the shared memory).
public struct SplitVirtqueue: ~Copyable {
    public let layout: SplitQueueLayout
    /// Start of the area in the driver's address space.
    public let memory: UnsafeMutableRawPointer
    /// Start of the area as the device addresses it (the "guest physical" address the
    /// driver registered in the device's memory table).
    public let ioAddress: IOAddress
    /// VIRTIO_F_EVENT_IDX was negotiated (§2.7.7, §2.7.10).
    public let usesEventIdx: Bool
    /// Chains of more than one buffer go into indirect tables (§2.7.5.3).
    public let usesIndirect: Bool

    // Shared words. SAFETY: each lies inside the area (offsets from the private layout);
    // each is 2- or 4-aligned because the area is 16-aligned and the offsets are even
    // (avail), multiples of 4 (used); Atomic<UIntN> has the size and alignment of UIntN.
    let availFlags: UnsafeMutablePointer<Atomic<UInt16>>
    let availIdx: UnsafeMutablePointer<Atomic<UInt16>>
    let usedEvent: UnsafeMutablePointer<Atomic<UInt16>>
    let usedFlags: UnsafeMutablePointer<Atomic<UInt16>>
    let usedIdx: UnsafeMutablePointer<Atomic<UInt16>>
    let availEvent: UnsafeMutablePointer<Atomic<UInt16>>
    /// used.ring as 32-bit words: element i is words 2i (id) and 2i+1 (len).
    let usedWords: UnsafeMutablePointer<Atomic<UInt32>>
    let mask: UInt16

    // Private state.
    let records: UnsafeMutablePointer<ChainRecord>
    /// links[d]: the descriptor after d in its chain (our copy of `next`; never read back
    /// from the shared table).
    let links: UnsafeMutablePointer<UInt16>
    /// Free descriptor ids; the top is freeStack[freeCount - 1].
    let freeStack: UnsafeMutablePointer<UInt16>
    var freeCount: Int
    var inFlightCount: Int
    /// Next available ring index to fill: the authoritative avail.idx (§2.7.13.2).
    var availShadow: UInt16
    /// The avail.idx last stored to shared memory.
    var publishedAvail: UInt16
    /// Next used ring index to read.
    var lastUsed: UInt16
    /// The last used.idx read from the device, validated.
    var usedCache: UInt16
    /// The authoritative avail.flags.
    var availFlagsShadow: UInt16
    /// Sticky error: the flag for the hot path, the details for the owner.
    var failed: Bool
    var failure: VirtioError?

    /// Zeroes the area and builds the free descriptor list.
    ///
    /// - `memory`: the area in the driver's address space, `layout.byteCount` bytes,
    ///   16-byte aligned (4096 recommended).
    /// - `ioAddress`: the area's address as the device sees it; 16-byte aligned (§2.7).
    /// - `eventIdx`: VIRTIO_F_EVENT_IDX was negotiated (§2.7.7, §2.7.10).
    /// - `indirect`: put chains of more than one buffer into the head's indirect table
    ///   (§2.7.5.3); needs VIRTIO_F_INDIRECT_DESC and `layout.indirectSlots > 0`.
    public init(memory: UnsafeMutableRawPointer, ioAddress: IOAddress, layout: SplitQueueLayout,
                eventIdx: Bool, indirect: Bool) {
        precondition(Int(bitPattern: memory) % 16 == 0, "virtqueue memory must be 16-byte aligned")
        // §2.7 / §2.7.1: the device-visible descriptor table is 16-aligned, the rings follow.
        precondition(ioAddress.rawValue % 16 == 0, "virtqueue ioAddress must be 16-byte aligned")
        precondition(ioAddress.rawValue <= UInt64.max - UInt64(layout.byteCount), "virtqueue ioAddress range overflows")
        precondition(!indirect || layout.indirectSlots > 0, "indirect descriptors need layout.indirectSlots > 0")
        self.layout = layout
        self.memory = memory
        self.ioAddress = ioAddress
        usesEventIdx = eventIdx
        usesIndirect = indirect
        availFlags = (memory + layout.availFlagsOffset).assumingMemoryBound(to: Atomic<UInt16>.self)
        availIdx = (memory + layout.availIdxOffset).assumingMemoryBound(to: Atomic<UInt16>.self)
        usedEvent = (memory + layout.usedEventOffset).assumingMemoryBound(to: Atomic<UInt16>.self)
        usedFlags = (memory + layout.usedFlagsOffset).assumingMemoryBound(to: Atomic<UInt16>.self)
        usedIdx = (memory + layout.usedIdxOffset).assumingMemoryBound(to: Atomic<UInt16>.self)
        availEvent = (memory + layout.availEventOffset).assumingMemoryBound(to: Atomic<UInt16>.self)
        usedWords = (memory + layout.usedRingOffset).assumingMemoryBound(to: Atomic<UInt32>.self)
        mask = UInt16(layout.size - 1)
        records = .allocate(capacity: layout.size)
        records.initialize(repeating: .free, count: layout.size)
        links = .allocate(capacity: layout.size)
        links.initialize(repeating: 0, count: layout.size)
        freeStack = .allocate(capacity: layout.size)
        freeStack.initialize(repeating: 0, count: layout.size)
        freeCount = 0
        inFlightCount = 0
        availShadow = 0
        publishedAvail = 0
        lastUsed = 0
        usedCache = 0
        availFlagsShadow = 0
        failed = false
        failure = nil
        reset()
    }

    deinit {
        records.deallocate()
        links.deallocate()
        freeStack.deallocate()
    }

    /// Back to the freshly initialized state: the area zeroed, all descriptors free, all
    /// indices 0, no error. For reconnecting to a restarted device (vhost-user
    /// SET_VRING_BASE 0); the caller resubmits what was in flight (`forEachInFlight`,
    /// before the reset).
    public mutating func reset() {
        // §2.7.13.3: avail.idx starts at 0; §2.7.10.1: the driver MUST initialize used.flags
        // to 0. Zeroing the whole area does both, and clears used_event and the tables.
        memory.initializeMemory(as: UInt8.self, repeating: 0, count: layout.byteCount)
        records.update(repeating: .free, count: layout.size)
        // Free list top first: ids 0, 1, 2, ... are handed out first.
        for i in 0..<layout.size { freeStack[i] = UInt16(layout.size - 1 - i) }
        freeCount = layout.size
        inFlightCount = 0
        availShadow = 0
        publishedAvail = 0
        lastUsed = 0
        usedCache = 0
        availFlagsShadow = 0
        failed = false
        failure = nil
    }

    // MARK: Addresses (vhost-user SET_VRING_ADDR, virtio-pci queue_desc/driver/device)

    /// Device-visible address of the descriptor table.
    public var descriptorTableAddress: IOAddress { ioAddress.advanced(by: layout.descriptorOffset) }
    /// Device-visible address of the available ring (the "driver area").
    public var availRingAddress: IOAddress { ioAddress.advanced(by: layout.availOffset) }
    /// Device-visible address of the used ring (the "device area").
    public var usedRingAddress: IOAddress { ioAddress.advanced(by: layout.usedOffset) }
    /// The descriptor table in the driver's address space.
    public var descriptorTablePointer: UnsafeMutableRawPointer { memory + layout.descriptorOffset }
    /// The available ring in the driver's address space.
    public var availRingPointer: UnsafeMutableRawPointer { memory + layout.availOffset }
    /// The used ring in the driver's address space.
    public var usedRingPointer: UnsafeMutableRawPointer { memory + layout.usedOffset }

    // MARK: State

    /// Chains added and not yet returned by popUsed (published or not).
    public var inFlight: Int { inFlightCount }
    /// Descriptors of the ring's table not held by a chain.
    public var freeDescriptors: Int { freeCount }
    /// The next available ring index (the avail.idx the next publish stores, if nothing
    /// more is added).
    public var nextAvailIndex: UInt16 { availShadow }
    /// The next used ring index popUsed reads.
    public var lastUsedIndex: UInt16 { lastUsed }
    /// The sticky error: the device broke the ring protocol. The queue must be reset.
    public var error: VirtioError? { failure }

    /// The longest chain `add` accepts: never more than Queue Size (§2.7.5.3.1: "A driver
    /// MUST NOT create a descriptor chain longer than the Queue Size"), and with indirect
    /// tables no more than a table holds.
    public var maxChainLength: Int {
        usesIndirect ? min(layout.size, layout.indirectSlots) : layout.size
    }

    /// Whether a chain of `count` buffers can be added now.
    public func canAdd(_ count: Int) -> Bool {
        guard !failed, count >= 1, count <= maxChainLength else { return false }
        return freeCount >= (usesIndirect && count > 1 ? 1 : count)
    }

    // MARK: Supplying buffers (§2.7.13)

    /// Writes the chain into free descriptors (or, with indirect tables and more than one
    /// buffer, into the head's indirect table) and places its head in the next available
    /// ring slot. Not visible to the device until `publish()`. Returns the head id: the id
    /// the device returns in the used ring.
    ///
    /// Throws `.invalidChain` (no buffers, more than `maxChainLength`, a zero length, an
    /// address range that wraps, a device-readable buffer after a device-writable one,
    /// more than 2^32 bytes in all), `.queueFull`, or the sticky `.deviceProtocol` error.
    /// The queue is unchanged when it throws. No allocation.
    public mutating func add(_ buffers: UnsafeBufferPointer<VirtqBuffer>) throws(VirtioError) -> UInt16 {
        if failed, let e = failure { throw e }
        let count = buffers.count
        guard count >= 1 else { throw .invalidChain("a chain needs at least one buffer") }
        guard count <= maxChainLength else {
            throw .invalidChain("\(count) buffers, at most \(maxChainLength)")
        }
        var writable: UInt64 = 0
        var total: UInt64 = 0
        var sawWritable = false
        for b in buffers {
            guard b.length > 0 else { throw .invalidChain("zero-length buffer") }
            guard b.address.rawValue <= UInt64.max - UInt64(b.length - 1) else {
                throw .invalidChain("buffer at 0x\(String(b.address.rawValue, radix: 16)) wraps the address space")
            }
            if b.deviceWritable {
                sawWritable = true
                writable += UInt64(b.length)
            } else if sawWritable {
                // §2.7.4.2: "The driver MUST place any device-writable descriptor elements
                // after any device-readable descriptor elements."
                throw .invalidChain("device-readable buffer after a device-writable one")
            }
            total += UInt64(b.length)
        }
        // §2.7.5.2: "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total."
        guard total <= 1 << 32 else { throw .invalidChain("\(total) bytes, at most 2^32") }

        let viaTable = usesIndirect && count > 1
        let needed = viaTable ? 1 : count
        guard freeCount >= needed else { throw .queueFull }

        // §2.7.13.1: place the buffers into free descriptors, chaining with NEXT.
        let head = freeStack[freeCount - 1]
        if viaTable {
            freeCount -= 1
            // §2.7.5.3: the table's entries are chained by `next` from index 0; the last
            // has no NEXT. INDIRECT is never set inside a table (§2.7.5.3.1).
            let tableOffset = layout.indirectTableOffset(head: Int(head))
            let table = memory + tableOffset
            for i in 0..<count {
                let b = buffers[i]
                let last = i == count - 1
                let d = VirtqDescriptor(
                    addr: b.address.rawValue, len: b.length,
                    flags: (b.deviceWritable ? VirtqDescriptor.flagWrite : 0) | (last ? 0 : VirtqDescriptor.flagNext),
                    next: last ? 0 : UInt16(i + 1))
                table.storeBytes(of: d.littleEndian, toByteOffset: i * SplitQueueLayout.descriptorSize,
                                 as: VirtqDescriptor.self)
            }
            // §2.7.5.3: the ring descriptor has INDIRECT, addr/len locate the table; not
            // NEXT as well (§2.7.5.3.1); the device ignores WRITE on it (§2.7.5.3.2).
            let d = VirtqDescriptor(addr: ioAddress.advanced(by: tableOffset).rawValue,
                                    len: UInt32(count * SplitQueueLayout.descriptorSize),
                                    flags: VirtqDescriptor.flagIndirect, next: 0)
            storeDescriptor(d, at: head)
            links[Int(head)] = 0
        } else {
            // Take `count` ids off the free stack: head, then the ones below it.
            for i in 0..<count {
                let id = freeStack[freeCount - 1 - i]
                let b = buffers[i]
                let last = i == count - 1
                let next = last ? 0 : freeStack[freeCount - 2 - i]
                let d = VirtqDescriptor(
                    addr: b.address.rawValue, len: b.length,
                    flags: (b.deviceWritable ? VirtqDescriptor.flagWrite : 0) | (last ? 0 : VirtqDescriptor.flagNext),
                    next: next)
                storeDescriptor(d, at: id)
                links[Int(id)] = next
            }
            freeCount -= count
        }
        records[Int(head)] = ChainRecord(inFlight: true, ringDescriptors: UInt16(needed),
                                         availPosition: availShadow, writableBytes: writable)
        // §2.7.13.2: avail->ring[(avail->idx + added++) % qsz] = head, with our private idx.
        (memory + layout.availRingOffset).storeBytes(
            of: head.littleEndian, toByteOffset: 2 * Int(availShadow & mask), as: UInt16.self)
        availShadow &+= 1
        inFlightCount += 1
        return head
    }

    /// Fault injection: puts a head that names no descriptor (Queue Size, one past the
    /// table) in the next available-ring slot, as a driver bug would; the next `publish`
    /// shows it to the device, which must refuse it (§2.1.2: a device that finds an error
    /// sets DEVICE_NEEDS_RESET). The queue's own accounting does not count it: the queue is
    /// usable again after `reset`.
    public mutating func addInvalidHead() {
        (memory + layout.availRingOffset).storeBytes(
            of: UInt16(layout.size).littleEndian, toByteOffset: 2 * Int(availShadow & mask), as: UInt16.self)
        availShadow &+= 1
    }

    @inline(__always)
    func storeDescriptor(_ d: VirtqDescriptor, at id: UInt16) {
        (memory + layout.descriptorOffset).storeBytes(
            of: d.littleEndian, toByteOffset: Int(id) * SplitQueueLayout.descriptorSize, as: VirtqDescriptor.self)
    }

    /// Makes every chain added since the last publish visible to the device, and says
    /// whether the device must be notified (kicked). Returns false if nothing was added
    /// (or the queue is in its error state).
    public mutating func publish() -> Bool {
        guard !failed else { return false }
        let new = availShadow
        let old = publishedAvail
        guard new != old else { return false }
        // §2.7.13.3: avail.idx += added, wrapping at 65536, after a barrier (§2.7.13.3.1).
        // One aligned 16-bit store: byte-wise writes could let the device read a torn
        // index. Release: the descriptors, indirect tables and ring slots written by add()
        // are visible before the new index. Pairs with the device's read barrier after it
        // loads avail.idx (QEMU: smp_rmb() in virtqueue_num_heads / vu_queue_pop).
        availIdx.pointee.store(new.littleEndian, ordering: .releasing)
        publishedAvail = new
        // §2.7.13.4.1: a full barrier between storing avail.idx and reading used.flags /
        // avail_event. Pairs with the device's full barrier between writing avail_event (or
        // clearing NO_NOTIFY) and re-reading avail.idx: of the two store-then-load
        // sequences at least one sees the other's store, so either the device sees our
        // chains or we see its request and kick (no lost notification).
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        if usesEventIdx {
            // §2.7.10.1: notify iff one of the indices old..<new equals avail_event:
            // vring_need_event(avail_event, new, old), in wrapping 16-bit arithmetic.
            let event = UInt16(littleEndian: availEvent.pointee.load(ordering: .relaxed))
            return new &- event &- 1 < new &- old
        } else {
            // §2.7.10.1: flags 0 -> MUST notify; 1 (NO_NOTIFY) -> SHOULD NOT.
            let flags = UInt16(littleEndian: usedFlags.pointee.load(ordering: .relaxed))
            return flags & VirtqUsedFlags.noNotify == 0
        }
    }

    // MARK: Receiving used buffers (§2.7.14)

    /// The next completed chain, or nil if none (or the queue is in its error state). The
    /// chain's descriptors are free again when this returns.
    ///
    /// Checks: used.idx moves forward by at most the number of published chains not yet
    /// returned; the element's id is below Queue Size and is the head of a published chain
    /// in flight; its len is at most that chain's device-writable bytes (§2.7.8.2). A
    /// violation sets the sticky `error` and returns nil from then on.
    public mutating func popUsed() -> VirtqUsedElement? {
        guard !failed else { return nil }
        if usedCache == lastUsed {
            // Acquire: the used elements the device wrote before publishing this index are
            // visible (§2.7.8.2: "The device MUST set len prior to updating the used idx").
            // Pairs with the device's write barrier before its store of used.idx (QEMU:
            // smp_wmb() in virtqueue_flush / vu_queue_flush).
            let idx = UInt16(littleEndian: usedIdx.pointee.load(ordering: .acquiring))
            let ahead = idx &- lastUsed
            if ahead == 0 { return nil }
            // The device can only return chains it was given: published and not returned.
            // A backwards step shows up here too, as a huge wrapped distance.
            let withDevice = inFlightCount - Int(availShadow &- publishedAvail)
            guard Int(ahead) <= withDevice else {
                fail("used.idx \(idx) is \(ahead) past the last seen \(lastUsed), but the device holds \(withDevice) chains")
                return nil
            }
            usedCache = idx
        }
        // One copy of the element (two 32-bit loads, each untearable); only the copy is
        // checked and used. Relaxed suffices: ordered by the acquire load of used.idx.
        let slot = 2 * Int(lastUsed & mask)
        let id = UInt32(littleEndian: (usedWords + slot).pointee.load(ordering: .relaxed))
        let len = UInt32(littleEndian: (usedWords + slot + 1).pointee.load(ordering: .relaxed))
        guard id < UInt32(layout.size) else {
            fail("used id \(id) at used index \(lastUsed) is not below the queue size \(layout.size)")
            return nil
        }
        let rec = records[Int(id)]
        guard rec.inFlight else {
            fail("used id \(id) at used index \(lastUsed) is not the head of a chain in flight")
            return nil
        }
        // Added but not yet published: the device cannot have seen it.
        guard rec.availPosition &- publishedAvail >= availShadow &- publishedAvail else {
            fail("used id \(id) at used index \(lastUsed) names a chain not yet made available")
            return nil
        }
        guard UInt64(len) <= rec.writableBytes else {
            fail("used len \(len) for id \(id) exceeds the chain's \(rec.writableBytes) device-writable bytes")
            return nil
        }
        // Free the chain's ring descriptors by following our private links.
        var d = UInt16(truncatingIfNeeded: id)
        for _ in 0..<Int(rec.ringDescriptors) {
            freeStack[freeCount] = d
            freeCount += 1
            d = links[Int(d)]
        }
        records[Int(id)] = .free
        inFlightCount -= 1
        lastUsed &+= 1
        return VirtqUsedElement(id: id, len: len)
    }

    @inline(never)
    mutating func fail(_ why: String) {
        failed = true
        failure = .deviceProtocol(why)
    }

    // MARK: Used buffer notifications (§2.7.7)

    /// Asks the device for a used buffer notification when the next chain completes or,
    /// with event idx, when `after` more have completed (used_event = lastUsed + after - 1,
    /// `after` clamped to 1...max(1, inFlight)). Without event idx: clears
    /// VIRTQ_AVAIL_F_NO_INTERRUPT.
    ///
    /// Then re-checks used.idx: returns true if completions are already pending, in which
    /// case the caller must poll again instead of sleeping. Also returns true in the error
    /// state (popUsed then returns nil: check `error`).
    public mutating func enableNotifications(after: Int = 1) -> Bool {
        guard !failed else { return true }
        if usesEventIdx {
            // §2.7.7.1: notifications are unnecessary until the device writes the used
            // entry with index used_event.
            let n = min(max(after, 1), max(1, inFlightCount))
            let event = lastUsed &+ UInt16(truncatingIfNeeded: n - 1)
            usedEvent.pointee.store(event.littleEndian, ordering: .relaxed)
        } else {
            // §2.7.7.1: flags 0 asks for a notification after every used entry.
            availFlagsShadow &= ~VirtqAvailFlags.noInterrupt
            availFlags.pointee.store(availFlagsShadow.littleEndian, ordering: .relaxed)
        }
        // Full barrier between our store (used_event / flags) and reloading used.idx.
        // Pairs with the device's full barrier between storing used.idx and reading
        // used_event / avail.flags (QEMU: smp_mb() in virtio_should_notify / vu_should_notify):
        // either the device sees our request and notifies, or we see its completion here.
        // The §2.7.14 note's mb() in the re-enable loop.
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        if usedCache != lastUsed { return true }
        let idx = UInt16(littleEndian: usedIdx.pointee.load(ordering: .acquiring))
        return idx != lastUsed
    }

    /// Asks the device not to send used buffer notifications. A hint only (§2.7.7: "Neither
    /// of these notification suppression methods are reliable"): spurious notifications
    /// must still be tolerated.
    ///
    /// Without event idx: sets VIRTQ_AVAIL_F_NO_INTERRUPT. With event idx (§2.7.7.1: flags
    /// MUST stay 0): moves used_event half the index space behind lastUsed. The device
    /// notifies when used_event lies in (old, new], where old is the used index at its
    /// *last notification check* (§2.7.10: vring_need_event), not our lastUsed; that check
    /// can lag behind what we have already harvested, so lastUsed - 1 could still fall in
    /// the window and draw a notification. 2^15 behind cannot, for any queue size (at most
    /// 2^15 entries are ever outstanding).
    public mutating func disableNotifications() {
        guard !failed else { return }
        if usesEventIdx {
            usedEvent.pointee.store((lastUsed &- 0x8000).littleEndian, ordering: .relaxed)
        } else {
            availFlagsShadow |= VirtqAvailFlags.noInterrupt
            availFlags.pointee.store(availFlagsShadow.littleEndian, ordering: .relaxed)
        }
    }

    // MARK: Resubmission

    /// Calls `body(head)` for each chain in flight (added and not returned, published or
    /// not), in head-id order, not submission order. For resubmission: collect what is
    /// needed, then `reset()`, then add again.
    public func forEachInFlight<E: Error>(_ body: (UInt16) throws(E) -> Void) throws(E) {
        for i in 0..<layout.size where records[i].inFlight {
            try body(UInt16(i))
        }
    }
}
