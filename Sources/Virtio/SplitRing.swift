import OutboardRings
// The split virtqueue's shared structures (virtio 1.2 §2.7) and where they lie.
//
// All fields are little-endian in memory (§2.7: le16/le32/le64; §2.7.3: only legacy
// devices use native endianness). The Swift values hold host-order numbers; the queue
// stores `littleEndian` images and decodes with `init(littleEndian:)`, which is the
// identity on x86-64 but states the intent.

/// A descriptor (§2.7.5, `struct virtq_desc`), 16 bytes: le64 addr, le32 len, le16 flags,
/// le16 next.
public struct VirtqDescriptor: BitwiseCopyable, Equatable, Sendable {
    /// VIRTQ_DESC_F_NEXT: the chain continues in `next`.
    public static let flagNext: UInt16 = 1
    /// VIRTQ_DESC_F_WRITE: the buffer is device-writable (otherwise device-readable).
    public static let flagWrite: UInt16 = 2
    /// VIRTQ_DESC_F_INDIRECT: `addr`/`len` locate a table of descriptors (§2.7.5.3).
    public static let flagIndirect: UInt16 = 4

    /// Device-visible ("guest physical") address of the buffer.
    public var addr: UInt64
    /// Length of the buffer in bytes.
    public var len: UInt32
    public var flags: UInt16
    /// Index of the next descriptor when `flags` has VIRTQ_DESC_F_NEXT.
    public var next: UInt16

    public init(addr: UInt64, len: UInt32, flags: UInt16, next: UInt16) {
        self.addr = addr
        self.len = len
        self.flags = flags
        self.next = next
    }

    /// The in-memory image: each field little-endian.
    public var littleEndian: VirtqDescriptor {
        VirtqDescriptor(addr: addr.littleEndian, len: len.littleEndian, flags: flags.littleEndian,
                        next: next.littleEndian)
    }

    public init(littleEndian d: VirtqDescriptor) {
        addr = UInt64(littleEndian: d.addr)
        len = UInt32(littleEndian: d.len)
        flags = UInt16(littleEndian: d.flags)
        next = UInt16(littleEndian: d.next)
    }
}

/// A used ring element (§2.7.8, `struct virtq_used_elem`), 8 bytes: le32 id, le32 len.
public struct VirtqUsedElement: BitwiseCopyable, Equatable, Sendable {
    /// Head of the completed chain.
    public var id: UInt32
    /// Bytes the device wrote into the chain's device-writable buffers (at least; §2.7.8.2).
    public var len: UInt32

    public init(id: UInt32, len: UInt32) {
        self.id = id
        self.len = len
    }

    public var littleEndian: VirtqUsedElement {
        VirtqUsedElement(id: id.littleEndian, len: len.littleEndian)
    }

    public init(littleEndian e: VirtqUsedElement) {
        id = UInt32(littleEndian: e.id)
        len = UInt32(littleEndian: e.len)
    }
}

/// `flags` of the available ring (§2.7.6).
public enum VirtqAvailFlags {
    /// VIRTQ_AVAIL_F_NO_INTERRUPT: the driver needs no used buffer notifications (§2.7.7).
    public static let noInterrupt: UInt16 = 1
}

/// `flags` of the used ring (§2.7.8).
public enum VirtqUsedFlags {
    /// VIRTQ_USED_F_NO_NOTIFY: the device needs no available buffer notifications (§2.7.10).
    public static let noNotify: UInt16 = 1
}

/// One buffer of a chain, as the caller describes it to `SplitVirtqueue.add`.
public struct VirtqBuffer: Equatable, Sendable {
    /// Device-visible address.
    public var address: IOAddress
    public var length: UInt32
    /// Device-writable (VIRTQ_DESC_F_WRITE) rather than device-readable.
    public var deviceWritable: Bool

    public init(address: IOAddress, length: UInt32, deviceWritable: Bool) {
        self.address = address
        self.length = length
        self.deviceWritable = deviceWritable
    }
}

/// Where the parts of one split virtqueue, and its indirect tables, lie in one memory area
/// the driver owns. Offsets are from the start of the area, which must be 4096-aligned in
/// both the driver's and the device's view.
///
/// ```
/// descriptorOffset  0                      desc[size], 16 bytes each        (§2.7: align 16)
/// availOffset       16*size                flags, idx, ring[size], used_event  (align 2)
/// usedOffset        next 4096 boundary     flags, idx, ring[size] of 8 bytes, avail_event (align 4)
/// indirectOffset    next 16 boundary       size tables of indirectSlots*16 bytes (table i: head i)
/// byteCount         rounded up to 4096
/// ```
/// Putting the used ring on its own page keeps the device's writes off the driver's
/// cache lines (and matches the legacy layout, §2.7.2). The layout is computed from the
/// creator's own parameters only, never from anything in shared memory.
public struct SplitQueueLayout: Equatable, Sendable {
    /// §2.7: "The maximum Queue Size value is 32768."
    public static let maximumSize = 32768
    /// Largest indirect table accepted (entries).
    public static let maximumIndirectSlots = 1024
    public static let pageSize = 4096
    public static let descriptorSize = 16
    public static let usedElementSize = 8

    /// Queue Size: descriptors, and entries in each ring.
    public let size: Int
    /// Entries per indirect table; 0 = no indirect tables.
    public let indirectSlots: Int
    public let descriptorOffset: Int
    /// `struct virtq_avail`: le16 flags, le16 idx, le16 ring[size], le16 used_event.
    public let availOffset: Int
    /// `struct virtq_used`: le16 flags, le16 idx, virtq_used_elem ring[size], le16 avail_event.
    public let usedOffset: Int
    /// `size` indirect tables of `indirectSlots` descriptors each.
    public let indirectOffset: Int
    /// Total bytes, a multiple of 4096.
    public let byteCount: Int

    /// `size`: a power of two in 2...32768 (§2.7). `indirectSlots`: 0, or 1...1024.
    public init(size: Int, indirectSlots: Int) throws(VirtioError) {
        guard size >= 2, size <= Self.maximumSize, size & (size - 1) == 0 else {
            throw .invalidLayout("queue size \(size) is not a power of two in 2...\(Self.maximumSize)")
        }
        guard indirectSlots >= 0, indirectSlots <= Self.maximumIndirectSlots else {
            throw .invalidLayout("indirect table of \(indirectSlots) entries, allowed 0...\(Self.maximumIndirectSlots)")
        }
        self.size = size
        self.indirectSlots = indirectSlots
        // §2.7 table: descriptor table alignment 16, size 16 * Queue Size.
        descriptorOffset = 0
        // Available ring alignment 2, size 6 + 2 * Queue Size; 16 * size is 16-aligned.
        availOffset = descriptorOffset + Self.descriptorSize * size
        let availEnd = availOffset + 6 + 2 * size
        // Used ring alignment 4, size 6 + 8 * Queue Size; we use a page boundary.
        usedOffset = Self.roundUp(availEnd, Self.pageSize)
        let usedEnd = usedOffset + 6 + Self.usedElementSize * size
        // Indirect tables are descriptors: 16-byte alignment (§2.7.5.3).
        indirectOffset = Self.roundUp(usedEnd, Self.descriptorSize)
        byteCount = Self.roundUp(indirectOffset + size * indirectSlots * Self.descriptorSize, Self.pageSize)
    }

    /// Bytes of one indirect table.
    public var indirectTableBytes: Int { indirectSlots * Self.descriptorSize }
    /// Offset of the indirect table belonging to head `head`.
    public func indirectTableOffset(head: Int) -> Int { indirectOffset + head * indirectTableBytes }

    /// Offset of avail.idx, avail.ring[0], avail.used_event; used.idx, used.ring[0],
    /// used.avail_event (§2.7.6, §2.7.8).
    public var availFlagsOffset: Int { availOffset }
    public var availIdxOffset: Int { availOffset + 2 }
    public var availRingOffset: Int { availOffset + 4 }
    public var usedEventOffset: Int { availOffset + 4 + 2 * size }
    public var usedFlagsOffset: Int { usedOffset }
    public var usedIdxOffset: Int { usedOffset + 2 }
    public var usedRingOffset: Int { usedOffset + 4 }
    public var availEventOffset: Int { usedOffset + 4 + Self.usedElementSize * size }

    static func roundUp(_ x: Int, _ a: Int) -> Int { (x + a - 1) & ~(a - 1) }
}
