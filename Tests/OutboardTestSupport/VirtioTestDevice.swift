import Synchronization
import Testing
import OutboardRings
import Virtio

/// The IO address the virtqueue tests place their area at.
public let testIOAddress: UInt64 = 0x7_0000_0000

/// A chain as the device found it.
public struct DeviceChain: Equatable {
    public var head: UInt16
    public var buffers: [VirtqBuffer]
    public init(head: UInt16, buffers: [VirtqBuffer]) {
        self.head = head
        self.buffers = buffers
    }
    public var writableBytes: UInt32 { buffers.filter(\.deviceWritable).reduce(0) { $0 + $1.length } }
}

/// The device side, written from the spec (§2.7) independently of the driver: reads
/// avail.idx and the avail ring, walks descriptors (direct or indirect), writes used
/// elements and used.idx, and decides used buffer notifications as §2.7.7.2 says.
public struct TestDevice {
    public let memory: UnsafeMutableRawPointer
    public let ioAddress: UInt64
    public let size: Int
    public let eventIdx: Bool
    public var lastAvail: UInt16 = 0
    public var usedIdx: UInt16 = 0
    /// Used buffer notifications the device sent.
    public var notifications = 0

    // Offsets straight from the §2.7 formulas (the layout tests pin SplitQueueLayout to these).
    public var availOffset: Int { 16 * size }
    public var usedOffset: Int { (availOffset + 6 + 2 * size + 4095) / 4096 * 4096 }

    public init(memory: UnsafeMutableRawPointer, ioAddress: UInt64 = testIOAddress, size: Int, eventIdx: Bool) {
        self.memory = memory
        self.ioAddress = ioAddress
        self.size = size
        self.eventIdx = eventIdx
    }

    public func word(_ offset: Int) -> UnsafeMutablePointer<Atomic<UInt16>> {
        (memory + offset).assumingMemoryBound(to: Atomic<UInt16>.self)
    }

    public var availFlags: UInt16 { UInt16(littleEndian: word(availOffset).pointee.load(ordering: .relaxed)) }
    public var availIdx: UInt16 { UInt16(littleEndian: word(availOffset + 2).pointee.load(ordering: .acquiring)) }
    public var usedEvent: UInt16 { UInt16(littleEndian: word(availOffset + 4 + 2 * size).pointee.load(ordering: .relaxed)) }
    public func setUsedFlags(_ v: UInt16) { word(usedOffset).pointee.store(v.littleEndian, ordering: .relaxed) }
    public func setAvailEvent(_ v: UInt16) { word(usedOffset + 4 + 8 * size).pointee.store(v.littleEndian, ordering: .relaxed) }
    public func storeUsedIdx(_ v: UInt16) { word(usedOffset + 2).pointee.store(v.littleEndian, ordering: .releasing) }
    public var sharedUsedIdx: UInt16 { UInt16(littleEndian: word(usedOffset + 2).pointee.load(ordering: .relaxed)) }

    public func descriptor(_ i: Int) -> VirtqDescriptor {
        VirtqDescriptor(littleEndian: memory.load(fromByteOffset: 16 * i, as: VirtqDescriptor.self))
    }

    /// Takes every chain made available since the last call, in ring order.
    public mutating func takeAvailable() -> [DeviceChain] {
        var out: [DeviceChain] = []
        let idx = availIdx
        while lastAvail != idx {
            let head = UInt16(littleEndian: memory.load(fromByteOffset: availOffset + 4 + 2 * Int(lastAvail % UInt16(size)),
                                                        as: UInt16.self))
            out.append(DeviceChain(head: head, buffers: walk(head: head)))
            lastAvail &+= 1
        }
        return out
    }

    /// Follows a chain (§2.7.5, §2.7.5.3), with the checks a careful device makes.
    public func walk(head: UInt16) -> [VirtqBuffer] {
        var buffers: [VirtqBuffer] = []
        #expect(Int(head) < size)
        let first = descriptor(Int(head))
        if first.flags & VirtqDescriptor.flagIndirect != 0 {
            // §2.7.5.3.1: not INDIRECT and NEXT together; table of len/16 entries.
            #expect(first.flags & VirtqDescriptor.flagNext == 0)
            #expect(first.len % 16 == 0 && first.len > 16)
            let table = memory + Int(first.addr - ioAddress)
            let n = Int(first.len / 16)
            var i = 0
            for step in 0..<n {
                let d = VirtqDescriptor(littleEndian: table.load(fromByteOffset: 16 * i, as: VirtqDescriptor.self))
                #expect(d.flags & VirtqDescriptor.flagIndirect == 0)
                buffers.append(VirtqBuffer(address: IOAddress(rawValue: d.addr), length: d.len, deviceWritable: d.flags & VirtqDescriptor.flagWrite != 0))
                if d.flags & VirtqDescriptor.flagNext == 0 {
                    #expect(step == n - 1, "indirect table longer than its chain")
                    break
                }
                #expect(Int(d.next) == i + 1)
                i = Int(d.next)
                #expect(i < n)
                if i >= n { break }
            }
        } else {
            var d = first
            var steps = 0
            while true {
                buffers.append(VirtqBuffer(address: IOAddress(rawValue: d.addr), length: d.len, deviceWritable: d.flags & VirtqDescriptor.flagWrite != 0))
                steps += 1
                if d.flags & VirtqDescriptor.flagNext == 0 { break }
                #expect(Int(d.next) < size && steps < size)
                if Int(d.next) >= size || steps >= size { break }
                d = descriptor(Int(d.next))
            }
        }
        return buffers
    }

    /// Writes a used element and publishes it; then the §2.7.7.2 notification decision.
    public mutating func complete(id: UInt32, len: UInt32) {
        writeUsed(at: usedIdx, id: id, len: len)
        let old = usedIdx
        usedIdx &+= 1
        storeUsedIdx(usedIdx)
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        if eventIdx {
            // Notify when the entry just written sits at index used_event.
            if old == usedEvent { notifications += 1 }
        } else if availFlags & VirtqAvailFlags.noInterrupt == 0 {
            notifications += 1
        }
    }

    public func writeUsed(at index: UInt16, id: UInt32, len: UInt32) {
        let o = usedOffset + 4 + 8 * Int(index % UInt16(size))
        (memory + o).storeBytes(of: VirtqUsedElement(id: id, len: len).littleEndian, as: VirtqUsedElement.self)
    }
}

