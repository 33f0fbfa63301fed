import Synchronization

// virtio-net (virtio 1.2 §5.1): feature bits, configuration space and the per-packet
// header.
//
// Little-endian on the wire (§5.1.4, §5.1.6: le16); the Swift values hold host-order
// numbers and are encoded and decoded field by field.

/// virtio-net feature bits (virtio 1.2 §5.1.3), as UInt64 masks.
public enum VirtioNetFeature {
    /// VIRTIO_NET_F_CSUM (0): the device takes packets with a partial checksum.
    public static let csum: UInt64 = 1 << 0
    /// VIRTIO_NET_F_GUEST_CSUM (1): the driver takes packets with a partial checksum.
    public static let guestCsum: UInt64 = 1 << 1
    /// VIRTIO_NET_F_CTRL_GUEST_OFFLOADS (2): offloads reconfigured on the control queue.
    public static let ctrlGuestOffloads: UInt64 = 1 << 2
    /// VIRTIO_NET_F_MTU (3): the device's maximum MTU is in `mtu`.
    public static let mtu: UInt64 = 1 << 3
    /// VIRTIO_NET_F_MAC (5): the device's MAC address is in `mac`.
    public static let mac: UInt64 = 1 << 5
    /// VIRTIO_NET_F_GUEST_TSO4 (7): the driver takes TSOv4.
    public static let guestTSO4: UInt64 = 1 << 7
    /// VIRTIO_NET_F_GUEST_TSO6 (8): the driver takes TSOv6.
    public static let guestTSO6: UInt64 = 1 << 8
    /// VIRTIO_NET_F_GUEST_ECN (9): the driver takes TSO with ECN.
    public static let guestECN: UInt64 = 1 << 9
    /// VIRTIO_NET_F_GUEST_UFO (10): the driver takes UFO.
    public static let guestUFO: UInt64 = 1 << 10
    /// VIRTIO_NET_F_HOST_TSO4 (11): the device takes TSOv4.
    public static let hostTSO4: UInt64 = 1 << 11
    /// VIRTIO_NET_F_HOST_TSO6 (12): the device takes TSOv6.
    public static let hostTSO6: UInt64 = 1 << 12
    /// VIRTIO_NET_F_HOST_ECN (13): the device takes TSO with ECN.
    public static let hostECN: UInt64 = 1 << 13
    /// VIRTIO_NET_F_HOST_UFO (14): the device takes UFO.
    public static let hostUFO: UInt64 = 1 << 14
    /// VIRTIO_NET_F_MRG_RXBUF (15): the driver can merge receive buffers (`num_buffers`).
    public static let mrgRxbuf: UInt64 = 1 << 15
    /// VIRTIO_NET_F_STATUS (16): `status` holds the link state.
    public static let status: UInt64 = 1 << 16
    /// VIRTIO_NET_F_CTRL_VQ (17): a control queue.
    public static let ctrlVQ: UInt64 = 1 << 17
    /// VIRTIO_NET_F_CTRL_RX (18): rx mode control on the control queue.
    public static let ctrlRx: UInt64 = 1 << 18
    /// VIRTIO_NET_F_CTRL_VLAN (19): VLAN filtering on the control queue.
    public static let ctrlVLAN: UInt64 = 1 << 19
    /// VIRTIO_NET_F_GUEST_ANNOUNCE (21): the driver can send gratuitous packets.
    public static let guestAnnounce: UInt64 = 1 << 21
    /// VIRTIO_NET_F_MQ (22): several queue pairs, `max_virtqueue_pairs` of them.
    public static let multiQueue: UInt64 = 1 << 22
    /// VIRTIO_NET_F_CTRL_MAC_ADDR (23): the MAC set on the control queue.
    public static let ctrlMACAddr: UInt64 = 1 << 23
    /// VIRTIO_NET_F_HOST_USO (56): the device takes USO.
    public static let hostUSO: UInt64 = 1 << 56
    /// VIRTIO_NET_F_HASH_REPORT (57): the device reports a hash (a longer header).
    public static let hashReport: UInt64 = 1 << 57
    /// VIRTIO_NET_F_GUEST_HDRLEN (59): the driver gives an exact `hdr_len`.
    public static let guestHdrLen: UInt64 = 1 << 59
    /// VIRTIO_NET_F_RSS (60): receive-side scaling.
    public static let rss: UInt64 = 1 << 60
    /// VIRTIO_NET_F_RSC_EXT (61): receive segment coalescing details in the header.
    public static let rscExt: UInt64 = 1 << 61
    /// VIRTIO_NET_F_STANDBY (62): the device is a standby for a primary one.
    public static let standby: UInt64 = 1 << 62
    /// VIRTIO_NET_F_SPEED_DUPLEX (63): `speed` and `duplex` are valid.
    public static let speedDuplex: UInt64 = 1 << 63
}

/// `status` bits of the configuration space (§5.1.4).
public enum VirtioNetStatus {
    /// VIRTIO_NET_S_LINK_UP
    public static let linkUp: UInt16 = 1
    /// VIRTIO_NET_S_ANNOUNCE
    public static let announce: UInt16 = 2
}

/// The virtio-net configuration space (§5.1.4): `mac`, `status`, `max_virtqueue_pairs`
/// and `mtu`, the first 12 bytes of `struct virtio_net_config`.
///
/// Parsed from a private copy; a field is non-nil only if the feature that makes it valid
/// was negotiated, and every field present is checked.
public struct VirtioNetConfig: Equatable, Sendable {
    /// Bytes through `mtu`.
    public static let byteCount = 12
    /// §5.1.4.1: "The device MUST set mtu to between 68 and 65535 inclusive."
    public static let minimumMTU: UInt16 = 68
    /// §5.1.4: max_virtqueue_pairs is between 1 and 0x8000.
    public static let maximumQueuePairs: UInt16 = 0x8000

    /// VIRTIO_NET_F_MAC: the device's address; a unicast address.
    public var mac: [UInt8]?
    /// VIRTIO_NET_F_STATUS: `VirtioNetStatus` bits.
    public var status: UInt16?
    /// VIRTIO_NET_F_MQ: queue pairs the device has.
    public var maxQueuePairs: UInt16?
    /// VIRTIO_NET_F_MTU: the largest MTU the driver may use.
    public var mtu: UInt16?

    public init(mac: [UInt8]? = nil, status: UInt16? = nil, maxQueuePairs: UInt16? = nil, mtu: UInt16? = nil) {
        self.mac = mac; self.status = status; self.maxQueuePairs = maxQueuePairs; self.mtu = mtu
    }

    enum Offset {
        static let mac = 0           // u8[6]
        static let status = 6        // le16
        static let maxQueuePairs = 8 // le16
        static let mtu = 10          // le16
    }

    /// Bytes of the configuration space the fields of `features` need (the space is
    /// shorter on devices without the later fields).
    public static func bytesNeeded(features: UInt64) -> Int {
        if features & VirtioNetFeature.mtu != 0 { return 12 }
        if features & VirtioNetFeature.multiQueue != 0 { return 10 }
        if features & VirtioNetFeature.status != 0 { return 8 }
        if features & VirtioNetFeature.mac != 0 { return 6 }
        return 0
    }

    /// Parses and checks the fields `features` (the negotiated ones) make valid.
    public static func parse(_ bytes: [UInt8], features: UInt64) throws(VirtioError) -> VirtioNetConfig {
        let need = bytesNeeded(features: features)
        guard bytes.count >= need else {
            throw .invalidConfig("virtio-net: \(bytes.count) configuration bytes, the features need \(need)")
        }
        func le16(_ o: Int) -> UInt16 { UInt16(bytes[o]) | UInt16(bytes[o + 1]) << 8 }
        var c = VirtioNetConfig()
        if features & VirtioNetFeature.mac != 0 {
            let m = Array(bytes[Offset.mac..<(Offset.mac + 6)])
            // The I/G bit: a group address cannot be a station's own.
            guard m[0] & 1 == 0 else {
                throw .invalidConfig("virtio-net: mac \(VirtioNetConfig.format(m)) is a group address")
            }
            c.mac = m
        }
        if features & VirtioNetFeature.status != 0 {
            let s = le16(Offset.status)
            guard s & ~(VirtioNetStatus.linkUp | VirtioNetStatus.announce) == 0 else {
                throw .invalidConfig("virtio-net: status 0x\(String(s, radix: 16)) has undefined bits")
            }
            c.status = s
        }
        if features & VirtioNetFeature.multiQueue != 0 {
            let n = le16(Offset.maxQueuePairs)
            guard n >= 1, n <= maximumQueuePairs else {
                throw .invalidConfig("virtio-net: max_virtqueue_pairs \(n) is not in 1...\(maximumQueuePairs)")
            }
            c.maxQueuePairs = n
        }
        if features & VirtioNetFeature.mtu != 0 {
            let m = le16(Offset.mtu)
            guard m >= minimumMTU else {
                throw .invalidConfig("virtio-net: mtu \(m) is below \(minimumMTU)")
            }
            c.mtu = m
        }
        return c
    }

    /// The 12-byte wire image (absent fields as zeroes), e.g. for a test device.
    public func encoded() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: Self.byteCount)
        if let mac { for i in 0..<min(6, mac.count) { b[i] = mac[i] } }
        func put16(_ v: UInt16, _ o: Int) { b[o] = UInt8(truncatingIfNeeded: v); b[o + 1] = UInt8(truncatingIfNeeded: v >> 8) }
        put16(status ?? 0, Offset.status)
        put16(maxQueuePairs ?? 0, Offset.maxQueuePairs)
        put16(mtu ?? 0, Offset.mtu)
        return b
    }

    /// "52:54:00:12:34:56".
    public static func format(_ mac: [UInt8]) -> String {
        mac.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined(separator: ":")
    }
}

/// `struct virtio_net_hdr` (§5.1.6) as it is with VIRTIO_F_VERSION_1: 12 bytes, `num_buffers`
/// included whether or not VIRTIO_NET_F_MRG_RXBUF was negotiated. It precedes every
/// packet on both queues.
public struct VirtioNetHeader: Equatable, Sendable {
    /// Bytes of the header with VERSION_1 (and without HASH_REPORT).
    public static let byteCount = 12

    /// VIRTIO_NET_HDR_F_NEEDS_CSUM: the checksum at csum_start + csum_offset is partial.
    public static let flagNeedsCsum: UInt8 = 1
    /// VIRTIO_NET_HDR_F_DATA_VALID: the checksum was validated (receive, GUEST_CSUM).
    public static let flagDataValid: UInt8 = 2
    /// VIRTIO_NET_HDR_F_RSC_INFO: the csum fields carry coalescing information (RSC_EXT).
    public static let flagRSCInfo: UInt8 = 4
    /// VIRTIO_NET_HDR_GSO_NONE: not a segmentation offload packet.
    public static let gsoNone: UInt8 = 0
    public static let gsoTCPv4: UInt8 = 1
    public static let gsoUDP: UInt8 = 3
    public static let gsoTCPv6: UInt8 = 4
    public static let gsoUDPL4: UInt8 = 5
    /// VIRTIO_NET_HDR_GSO_ECN, or'ed into the type.
    public static let gsoECN: UInt8 = 0x80

    public var flags: UInt8
    public var gsoType: UInt8
    public var hdrLen: UInt16
    public var gsoSize: UInt16
    public var csumStart: UInt16
    public var csumOffset: UInt16
    /// Buffers (descriptor chains) the packet spans: 1 unless VIRTIO_NET_F_MRG_RXBUF.
    public var numBuffers: UInt16

    public init(flags: UInt8 = 0, gsoType: UInt8 = VirtioNetHeader.gsoNone, hdrLen: UInt16 = 0, gsoSize: UInt16 = 0,
                csumStart: UInt16 = 0, csumOffset: UInt16 = 0, numBuffers: UInt16 = 0) {
        self.flags = flags; self.gsoType = gsoType; self.hdrLen = hdrLen; self.gsoSize = gsoSize
        self.csumStart = csumStart; self.csumOffset = csumOffset; self.numBuffers = numBuffers
    }

    /// Reads the header at `address` (4-aligned) once: three 32-bit loads the compiler may
    /// not repeat, so a device writing the memory meanwhile cannot make two readings of a
    /// field differ. Ordered after the used index that announced it by that index's
    /// acquire load.
    @inline(__always)
    public init(loadingFrom address: UnsafeRawPointer) {
        let w = address.assumingMemoryBound(to: Atomic<UInt32>.self)
        let w0 = UInt32(littleEndian: w[0].load(ordering: .relaxed))
        let w1 = UInt32(littleEndian: w[1].load(ordering: .relaxed))
        let w2 = UInt32(littleEndian: w[2].load(ordering: .relaxed))
        flags = UInt8(truncatingIfNeeded: w0)
        gsoType = UInt8(truncatingIfNeeded: w0 >> 8)
        hdrLen = UInt16(truncatingIfNeeded: w0 >> 16)
        gsoSize = UInt16(truncatingIfNeeded: w1)
        csumStart = UInt16(truncatingIfNeeded: w1 >> 16)
        csumOffset = UInt16(truncatingIfNeeded: w2)
        numBuffers = UInt16(truncatingIfNeeded: w2 >> 16)
    }

    /// Writes the 12-byte wire image at `address` (4-aligned).
    @inline(__always)
    public func store(to address: UnsafeMutableRawPointer) {
        let w0 = UInt32(flags) | UInt32(gsoType) << 8 | UInt32(hdrLen) << 16
        let w1 = UInt32(gsoSize) | UInt32(csumStart) << 16
        let w2 = UInt32(csumOffset) | UInt32(numBuffers) << 16
        address.storeBytes(of: w0.littleEndian, toByteOffset: 0, as: UInt32.self)
        address.storeBytes(of: w1.littleEndian, toByteOffset: 4, as: UInt32.self)
        address.storeBytes(of: w2.littleEndian, toByteOffset: 8, as: UInt32.self)
    }

    /// The wire image as bytes (tests, devices written in Swift).
    public var encoded: [UInt8] {
        var b = [UInt8](repeating: 0, count: Self.byteCount)
        b.withUnsafeMutableBytes { store(to: $0.baseAddress!) }
        return b
    }
}
