// virtio-blk (virtio 1.2 §5.2): configuration space, request header, request types,
// status codes and discard / write-zeroes segments.
//
// Every structure here is little-endian on the wire (§5.2.4, §5.2.6: le16/le32/le64). The
// Swift values hold host-order numbers; `littleEndian` gives the wire image (identity on
// x86-64 and arm64, but spelled out so that the conversion is visibly intended), and the
// configuration parser decodes each field from bytes explicitly.

/// `struct virtio_blk_geometry` (§5.2.4), present with VIRTIO_BLK_F_GEOMETRY.
public struct VirtioBlkGeometry: Equatable, Sendable {
    public var cylinders: UInt16
    public var heads: UInt8
    public var sectors: UInt8
    public init(cylinders: UInt16, heads: UInt8, sectors: UInt8) {
        self.cylinders = cylinders
        self.heads = heads
        self.sectors = sectors
    }
}

/// `struct virtio_blk_topology` (§5.2.4), present with VIRTIO_BLK_F_TOPOLOGY. Hints only:
/// they do not change the protocol's 512-byte units (§5.2.5 step 4).
public struct VirtioBlkTopology: Equatable, Sendable {
    /// log2 of logical blocks per physical block.
    public var physicalBlockExponent: UInt8
    /// Offset of the first aligned logical block.
    public var alignmentOffset: UInt8
    /// Suggested minimum I/O size, in logical blocks.
    public var minIOSize: UInt16
    /// Optimal (suggested maximum) I/O size, in logical blocks.
    public var optIOSize: UInt32
    public init(physicalBlockExponent: UInt8, alignmentOffset: UInt8, minIOSize: UInt16, optIOSize: UInt32) {
        self.physicalBlockExponent = physicalBlockExponent
        self.alignmentOffset = alignmentOffset
        self.minIOSize = minIOSize
        self.optIOSize = optIOSize
    }
}

/// virtio-blk configuration space (§5.2.4): the first 60 bytes of `struct
/// virtio_blk_config` (through `unused1`), as read with vhost-user GET_CONFIG.
///
/// Parsed from a private copy (`[UInt8]`), so the device cannot change a field after it
/// was checked. Every field is validated; an optional field is nil unless the feature that
/// makes it valid was negotiated (§5.2.4: "The availability of the others all depend on
/// various feature bits").
public struct VirtioBlkConfig: Equatable, Sendable {
    /// Bytes parsed: `capacity` (offset 0) through `unused1[3]` (offset 57).
    public static let byteCount = 60
    /// Largest capacity accepted, in 512-byte sectors: the byte size must fit a UInt64.
    public static let maxCapacity: UInt64 = (1 << 55) - 1

    /// Device size in 512-byte sectors (always present).
    public var capacity: UInt64
    /// Maximum bytes in one segment (VIRTIO_BLK_F_SIZE_MAX). nil also when the device
    /// offers the feature with `size_max` 0, meaning "no limit stated" (QEMU's
    /// vhost-user-blk export does exactly that).
    public var sizeMax: UInt32?
    /// Maximum data segments in one request (VIRTIO_BLK_F_SEG_MAX); at least 1.
    public var segMax: UInt32?
    /// Disk geometry (VIRTIO_BLK_F_GEOMETRY).
    public var geometry: VirtioBlkGeometry?
    /// Optimal logical block size in bytes (VIRTIO_BLK_F_BLK_SIZE): a power of two in
    /// 512...65536. Does not change the 512-byte sector unit of requests (§5.2.5 step 2).
    public var blkSize: UInt32?
    /// I/O alignment hints (VIRTIO_BLK_F_TOPOLOGY).
    public var topology: VirtioBlkTopology?
    /// Number of request queues (VIRTIO_BLK_F_MQ); at least 1.
    public var numQueues: UInt16?
    /// Maximum sectors in one discard segment (VIRTIO_BLK_F_DISCARD); at least 1.
    public var maxDiscardSectors: UInt32?
    /// Maximum segments in one discard request (VIRTIO_BLK_F_DISCARD); at least 1.
    public var maxDiscardSeg: UInt32?
    /// Discard alignment in 512-byte sectors (VIRTIO_BLK_F_DISCARD); at least 1.
    public var discardSectorAlignment: UInt32?
    /// Maximum sectors in one write-zeroes segment (VIRTIO_BLK_F_WRITE_ZEROES); at least 1.
    public var maxWriteZeroesSectors: UInt32?
    /// Maximum segments in one write-zeroes request (VIRTIO_BLK_F_WRITE_ZEROES); at least 1.
    public var maxWriteZeroesSeg: UInt32?
    /// The device may deallocate a written-zeroes range when `unmap` is set
    /// (VIRTIO_BLK_F_WRITE_ZEROES); false without the feature.
    public var writeZeroesMayUnmap: Bool
    /// Cache mode (VIRTIO_BLK_F_CONFIG_WCE): 0 writethrough, 1 writeback (§5.2.5 step 5).
    public var writeback: UInt8?

    public init(capacity: UInt64, sizeMax: UInt32? = nil, segMax: UInt32? = nil,
                geometry: VirtioBlkGeometry? = nil, blkSize: UInt32? = nil,
                topology: VirtioBlkTopology? = nil, numQueues: UInt16? = nil,
                maxDiscardSectors: UInt32? = nil, maxDiscardSeg: UInt32? = nil,
                discardSectorAlignment: UInt32? = nil, maxWriteZeroesSectors: UInt32? = nil,
                maxWriteZeroesSeg: UInt32? = nil, writeZeroesMayUnmap: Bool = false,
                writeback: UInt8? = nil) {
        self.capacity = capacity
        self.sizeMax = sizeMax
        self.segMax = segMax
        self.geometry = geometry
        self.blkSize = blkSize
        self.topology = topology
        self.numQueues = numQueues
        self.maxDiscardSectors = maxDiscardSectors
        self.maxDiscardSeg = maxDiscardSeg
        self.discardSectorAlignment = discardSectorAlignment
        self.maxWriteZeroesSectors = maxWriteZeroesSectors
        self.maxWriteZeroesSeg = maxWriteZeroesSeg
        self.writeZeroesMayUnmap = writeZeroesMayUnmap
        self.writeback = writeback
    }

    /// Field offsets in `struct virtio_blk_config` (§5.2.4).
    enum Offset {
        static let capacity = 0             // le64
        static let sizeMax = 8              // le32
        static let segMax = 12              // le32
        static let cylinders = 16           // le16
        static let heads = 18               // u8
        static let sectors = 19             // u8
        static let blkSize = 20             // le32
        static let physicalBlockExp = 24    // u8
        static let alignmentOffset = 25     // u8
        static let minIOSize = 26           // le16
        static let optIOSize = 28           // le32
        static let writeback = 32           // u8
        // 33: u8 unused0
        static let numQueues = 34           // le16 (u16 in the listing; little-endian like the rest)
        static let maxDiscardSectors = 36   // le32
        static let maxDiscardSeg = 40       // le32
        static let discardSectorAlignment = 44 // le32
        static let maxWriteZeroesSectors = 48  // le32
        static let maxWriteZeroesSeg = 52   // le32
        static let writeZeroesMayUnmap = 56 // u8
        // 57...59: u8 unused1[3]
    }

    /// Parses and validates the configuration. `features` are the negotiated features
    /// (a field is read only if its feature is among them). Longer input is accepted (the
    /// secure-erase fields follow at 60), shorter is not.
    public static func parse(_ bytes: [UInt8], features: UInt64) throws(VirtioError) -> VirtioBlkConfig {
        guard bytes.count >= byteCount else {
            throw .invalidConfig("\(bytes.count) bytes, need \(byteCount) (struct virtio_blk_config through unused1)")
        }
        func has(_ f: UInt64) -> Bool { features & f != 0 }
        func u8(_ o: Int) -> UInt8 { bytes[o] }
        func le16(_ o: Int) -> UInt16 { UInt16(bytes[o]) | UInt16(bytes[o + 1]) << 8 }
        func le32(_ o: Int) -> UInt32 { UInt32(le16(o)) | UInt32(le16(o + 2)) << 16 }
        func le64(_ o: Int) -> UInt64 { UInt64(le32(o)) | UInt64(le32(o + 4)) << 32 }
        func atLeastOne(_ o: Int, _ name: String) throws(VirtioError) -> UInt32 {
            let v = le32(o)
            guard v >= 1 else { throw .invalidConfig("\(name) is 0 (do not negotiate the feature with this device)") }
            return v
        }

        // §5.2.4: capacity is always present, in 512-byte sectors. Its byte size must fit
        // a UInt64, so that `capacity * 512` cannot overflow in the driver.
        var c = VirtioBlkConfig(capacity: le64(Offset.capacity))
        guard c.capacity <= maxCapacity else {
            throw .invalidConfig("capacity \(c.capacity) sectors exceeds \(maxCapacity) (byte size overflows 64 bits)")
        }
        // §5.2.3 VIRTIO_BLK_F_SIZE_MAX. 0 means no limit stated (QEMU 7.2's vhost-user-blk
        // export offers the feature with size_max 0).
        if has(VirtioBlkFeature.sizeMax) {
            let v = le32(Offset.sizeMax)
            c.sizeMax = v == 0 ? nil : v
        }
        // §5.2.3 VIRTIO_BLK_F_SEG_MAX: a request with data needs at least one segment.
        if has(VirtioBlkFeature.segMax) {
            c.segMax = try atLeastOne(Offset.segMax, "seg_max")
        }
        // §5.2.3 VIRTIO_BLK_F_GEOMETRY: informational, any value.
        if has(VirtioBlkFeature.geometry) {
            c.geometry = VirtioBlkGeometry(cylinders: le16(Offset.cylinders), heads: u8(Offset.heads),
                                           sectors: u8(Offset.sectors))
        }
        // §5.2.5 step 2: blk_size is a block size: a power of two, at least the 512-byte
        // sector, at most 64 KiB (the largest any OS block layer accepts).
        if has(VirtioBlkFeature.blkSize) {
            let v = le32(Offset.blkSize)
            guard v >= 512, v <= 65536, v & (v - 1) == 0 else {
                throw .invalidConfig("blk_size \(v) is not a power of two in 512...65536")
            }
            c.blkSize = v
        }
        // §5.2.5 step 4: physical block = logical block << physical_block_exp. Bounded so
        // that the physical block stays within 2^31 bytes even with a 64 KiB logical block;
        // the alignment offset lies inside one physical block.
        if has(VirtioBlkFeature.topology) {
            let t = VirtioBlkTopology(physicalBlockExponent: u8(Offset.physicalBlockExp),
                                      alignmentOffset: u8(Offset.alignmentOffset),
                                      minIOSize: le16(Offset.minIOSize), optIOSize: le32(Offset.optIOSize))
            guard t.physicalBlockExponent <= 15 else {
                throw .invalidConfig("topology physical_block_exp \(t.physicalBlockExponent) exceeds 15")
            }
            guard Int(t.alignmentOffset) < 1 << Int(t.physicalBlockExponent) else {
                throw .invalidConfig("topology alignment_offset \(t.alignmentOffset) not below 2^\(t.physicalBlockExponent) blocks")
            }
            c.topology = t
        }
        // §5.2.5 step 5: writeback is 0 (writethrough) or 1 (writeback).
        if has(VirtioBlkFeature.configWCE) {
            let v = u8(Offset.writeback)
            guard v <= 1 else { throw .invalidConfig("writeback \(v) is neither 0 nor 1") }
            c.writeback = v
        }
        // §5.2.2: N request queues, N = num_queues with VIRTIO_BLK_F_MQ; there is at least one.
        if has(VirtioBlkFeature.multiQueue) {
            let v = le16(Offset.numQueues)
            guard v >= 1 else { throw .invalidConfig("num_queues is 0") }
            c.numQueues = v
        }
        // §5.2.5 step 6, §5.2.6.1: a discard request carries 1...max_discard_seg segments of
        // at most max_discard_sectors each; zero limits would forbid every discard.
        if has(VirtioBlkFeature.discard) {
            c.maxDiscardSectors = try atLeastOne(Offset.maxDiscardSectors, "max_discard_sectors")
            c.maxDiscardSeg = try atLeastOne(Offset.maxDiscardSeg, "max_discard_seg")
            c.discardSectorAlignment = try atLeastOne(Offset.discardSectorAlignment, "discard_sector_alignment")
        }
        // §5.2.5 step 7, §5.2.6.1: the same for write zeroes; write_zeroes_may_unmap is a flag.
        if has(VirtioBlkFeature.writeZeroes) {
            c.maxWriteZeroesSectors = try atLeastOne(Offset.maxWriteZeroesSectors, "max_write_zeroes_sectors")
            c.maxWriteZeroesSeg = try atLeastOne(Offset.maxWriteZeroesSeg, "max_write_zeroes_seg")
            let v = u8(Offset.writeZeroesMayUnmap)
            guard v <= 1 else { throw .invalidConfig("write_zeroes_may_unmap \(v) is neither 0 nor 1") }
            c.writeZeroesMayUnmap = v == 1
        }
        return c
    }

    /// The 60-byte wire image (little-endian; absent fields and padding as zeroes), e.g.
    /// for a test device's GET_CONFIG reply. `parse(encoded(), features:)` gives back the
    /// fields the features select.
    public func encoded() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: Self.byteCount)
        func put16(_ v: UInt16, _ o: Int) { b[o] = UInt8(truncatingIfNeeded: v); b[o + 1] = UInt8(truncatingIfNeeded: v >> 8) }
        func put32(_ v: UInt32, _ o: Int) { put16(UInt16(truncatingIfNeeded: v), o); put16(UInt16(truncatingIfNeeded: v >> 16), o + 2) }
        func put64(_ v: UInt64, _ o: Int) { put32(UInt32(truncatingIfNeeded: v), o); put32(UInt32(truncatingIfNeeded: v >> 32), o + 4) }
        put64(capacity, Offset.capacity)
        put32(sizeMax ?? 0, Offset.sizeMax)
        put32(segMax ?? 0, Offset.segMax)
        if let g = geometry {
            put16(g.cylinders, Offset.cylinders)
            b[Offset.heads] = g.heads
            b[Offset.sectors] = g.sectors
        }
        put32(blkSize ?? 0, Offset.blkSize)
        if let t = topology {
            b[Offset.physicalBlockExp] = t.physicalBlockExponent
            b[Offset.alignmentOffset] = t.alignmentOffset
            put16(t.minIOSize, Offset.minIOSize)
            put32(t.optIOSize, Offset.optIOSize)
        }
        b[Offset.writeback] = writeback ?? 0
        put16(numQueues ?? 0, Offset.numQueues)
        put32(maxDiscardSectors ?? 0, Offset.maxDiscardSectors)
        put32(maxDiscardSeg ?? 0, Offset.maxDiscardSeg)
        put32(discardSectorAlignment ?? 0, Offset.discardSectorAlignment)
        put32(maxWriteZeroesSectors ?? 0, Offset.maxWriteZeroesSectors)
        put32(maxWriteZeroesSeg ?? 0, Offset.maxWriteZeroesSeg)
        b[Offset.writeZeroesMayUnmap] = writeZeroesMayUnmap ? 1 : 0
        return b
    }
}

/// Request types (§5.2.6, `virtio_blk_req.type`).
public enum VirtioBlkRequestType {
    /// VIRTIO_BLK_T_IN: read; data is device-writable.
    public static let read: UInt32 = 0
    /// VIRTIO_BLK_T_OUT: write; data is device-readable.
    public static let write: UInt32 = 1
    /// VIRTIO_BLK_T_FLUSH: sector 0, no data (§5.2.6.1).
    public static let flush: UInt32 = 4
    /// VIRTIO_BLK_T_GET_ID: 20 device-writable bytes of NUL-padded ASCII.
    public static let getID: UInt32 = 8
    /// VIRTIO_BLK_T_GET_LIFETIME: a device-writable `struct virtio_blk_lifetime`.
    public static let getLifetime: UInt32 = 10
    /// VIRTIO_BLK_T_DISCARD: device-readable `VirtioBlkDiscardSegment`s.
    public static let discard: UInt32 = 11
    /// VIRTIO_BLK_T_WRITE_ZEROES: device-readable `VirtioBlkDiscardSegment`s.
    public static let writeZeroes: UInt32 = 13
    /// VIRTIO_BLK_T_SECURE_ERASE: device-readable `VirtioBlkDiscardSegment`s.
    public static let secureErase: UInt32 = 14
    /// Length of the GET_ID data (§5.2.6.1: "MUST be 20 bytes").
    public static let getIDByteCount = 20
}

/// The status byte the device writes last (§5.2.6).
public enum VirtioBlkStatus {
    /// VIRTIO_BLK_S_OK
    public static let ok: UInt8 = 0
    /// VIRTIO_BLK_S_IOERR: device or driver error.
    public static let ioError: UInt8 = 1
    /// VIRTIO_BLK_S_UNSUPP: request not supported by the device.
    public static let unsupported: UInt8 = 2
}

/// The request header (§5.2.6, the first 16 bytes of `struct virtio_blk_req`): le32 type,
/// le32 reserved, le64 sector. Device-readable; followed by the data buffers and the
/// device-writable status byte.
public struct VirtioBlkRequestHeader: BitwiseCopyable, Equatable, Sendable {
    /// A `VirtioBlkRequestType` value.
    public var type: UInt32
    /// Zero.
    public var reserved: UInt32
    /// Offset in 512-byte sectors; 0 for requests other than read and write (§5.2.6).
    public var sector: UInt64

    public init(type: UInt32, sector: UInt64) {
        self.type = type
        self.reserved = 0
        self.sector = sector
    }

    /// The wire image: each field little-endian (§5.2.6). Store this, not `self`, into
    /// device-visible memory.
    public var littleEndian: VirtioBlkRequestHeader {
        var h = VirtioBlkRequestHeader(type: type.littleEndian, sector: sector.littleEndian)
        h.reserved = reserved.littleEndian
        return h
    }

    /// Decodes a wire image.
    public init(littleEndian h: VirtioBlkRequestHeader) {
        type = UInt32(littleEndian: h.type)
        reserved = UInt32(littleEndian: h.reserved)
        sector = UInt64(littleEndian: h.sector)
    }
}

/// One discard / write-zeroes / secure-erase segment (§5.2.6, `struct
/// virtio_blk_discard_write_zeroes`): le64 sector, le32 num_sectors, le32 flags.
public struct VirtioBlkDiscardSegment: BitwiseCopyable, Equatable, Sendable {
    /// Flag bit 0, `unmap`: only for write zeroes; MUST be zero for discard (§5.2.6.1).
    public static let unmap: UInt32 = 1

    public var sector: UInt64
    public var numSectors: UInt32
    public var flags: UInt32

    public init(sector: UInt64, numSectors: UInt32, flags: UInt32 = 0) {
        self.sector = sector
        self.numSectors = numSectors
        self.flags = flags
    }

    /// The wire image: each field little-endian (§5.2.6).
    public var littleEndian: VirtioBlkDiscardSegment {
        VirtioBlkDiscardSegment(sector: sector.littleEndian, numSectors: numSectors.littleEndian,
                                flags: flags.littleEndian)
    }

    public init(littleEndian s: VirtioBlkDiscardSegment) {
        sector = UInt64(littleEndian: s.sector)
        numSectors = UInt32(littleEndian: s.numSectors)
        flags = UInt32(littleEndian: s.flags)
    }
}
