// Feature bits and their negotiation.
//
// virtio 1.2 §2.2 (Feature Bits): the device offers a set, the driver accepts a subset;
// accepting a bit the device did not offer is a driver error (§2.2.1: "The driver MUST NOT
// accept a feature which the device did not offer"). All bits are UInt64 masks, so a
// 64-bit vhost-user GET_FEATURES/SET_FEATURES word can be masked directly.

/// Device-independent feature bits (virtio 1.2 §6, Reserved Feature Bits), as UInt64 masks.
public enum VirtioFeature {
    /// VIRTIO_F_NOTIFY_ON_EMPTY (24), legacy (§6.3): notify when the available ring empties.
    public static let notifyOnEmpty: UInt64 = 1 << 24
    /// VIRTIO_F_ANY_LAYOUT (27), legacy (§6.3, §2.7.4.3): any descriptor framing.
    public static let anyLayout: UInt64 = 1 << 27
    /// VIRTIO_F_INDIRECT_DESC (28): indirect descriptor tables (§2.7.5.3).
    public static let ringIndirectDesc: UInt64 = 1 << 28
    /// VIRTIO_F_EVENT_IDX (29): used_event / avail_event notification suppression
    /// (§2.7.7, §2.7.10).
    public static let ringEventIdx: UInt64 = 1 << 29
    /// VIRTIO_F_VERSION_1 (32): a modern (non-legacy) device; little-endian rings.
    public static let version1: UInt64 = 1 << 32
    /// VIRTIO_F_ACCESS_PLATFORM (33): the device accesses memory through an IOMMU.
    public static let accessPlatform: UInt64 = 1 << 33
    /// VIRTIO_F_RING_PACKED (34): the packed virtqueue layout (§2.8). Not implemented here.
    public static let ringPacked: UInt64 = 1 << 34
    /// VIRTIO_F_IN_ORDER (35): buffers are used in the order they were made available (§2.7.9).
    public static let inOrder: UInt64 = 1 << 35
    /// VIRTIO_F_ORDER_PLATFORM (36): memory accesses must be ordered as the platform requires.
    public static let orderPlatform: UInt64 = 1 << 36
    /// VIRTIO_F_SR_IOV (37): single root I/O virtualization.
    public static let srIOV: UInt64 = 1 << 37
    /// VIRTIO_F_NOTIFICATION_DATA (38): extra data in available buffer notifications.
    public static let notificationData: UInt64 = 1 << 38
    /// VIRTIO_F_NOTIF_CONFIG_DATA (39): notification data supplied by the device.
    public static let notifConfigData: UInt64 = 1 << 39
    /// VIRTIO_F_RING_RESET (40): individual virtqueues can be reset.
    public static let ringReset: UInt64 = 1 << 40
}

/// virtio-blk feature bits (virtio 1.2 §5.2.3), as UInt64 masks.
public enum VirtioBlkFeature {
    /// VIRTIO_BLK_F_BARRIER (0), legacy (§5.2.3.1).
    public static let barrier: UInt64 = 1 << 0
    /// VIRTIO_BLK_F_SIZE_MAX (1): maximum size of one segment is in `size_max`.
    public static let sizeMax: UInt64 = 1 << 1
    /// VIRTIO_BLK_F_SEG_MAX (2): maximum number of segments in a request is in `seg_max`.
    public static let segMax: UInt64 = 1 << 2
    /// VIRTIO_BLK_F_GEOMETRY (4): disk-style geometry in `geometry`.
    public static let geometry: UInt64 = 1 << 4
    /// VIRTIO_BLK_F_RO (5): the device is read-only.
    public static let readOnly: UInt64 = 1 << 5
    /// VIRTIO_BLK_F_BLK_SIZE (6): block size of the disk is in `blk_size`.
    public static let blkSize: UInt64 = 1 << 6
    /// VIRTIO_BLK_F_SCSI (7), legacy (§5.2.3.1).
    public static let scsi: UInt64 = 1 << 7
    /// VIRTIO_BLK_F_FLUSH (9): VIRTIO_BLK_T_FLUSH is supported.
    public static let flush: UInt64 = 1 << 9
    /// VIRTIO_BLK_F_TOPOLOGY (10): optimal I/O alignment in `topology`.
    public static let topology: UInt64 = 1 << 10
    /// VIRTIO_BLK_F_CONFIG_WCE (11): the cache mode can be read and set in `writeback`.
    public static let configWCE: UInt64 = 1 << 11
    /// VIRTIO_BLK_F_MQ (12): several request queues; their number is in `num_queues`.
    public static let multiQueue: UInt64 = 1 << 12
    /// VIRTIO_BLK_F_DISCARD (13): VIRTIO_BLK_T_DISCARD, limits in `max_discard_*`.
    public static let discard: UInt64 = 1 << 13
    /// VIRTIO_BLK_F_WRITE_ZEROES (14): VIRTIO_BLK_T_WRITE_ZEROES, limits in `max_write_zeroes_*`.
    public static let writeZeroes: UInt64 = 1 << 14
    /// VIRTIO_BLK_F_LIFETIME (15): VIRTIO_BLK_T_GET_LIFETIME.
    public static let lifetime: UInt64 = 1 << 15
    /// VIRTIO_BLK_F_SECURE_ERASE (16): VIRTIO_BLK_T_SECURE_ERASE (its limits lie beyond the
    /// 60 bytes `VirtioBlkConfig` parses).
    public static let secureErase: UInt64 = 1 << 16
}

/// Feature negotiation, driver side (virtio 1.2 §3.1.1 steps 4-5, §2.2.1).
public enum FeatureNegotiation {
    /// The features to accept: `offered & (wanted | required)`. Throws
    /// `.missingFeatures(mask)` with the bits of `required` the device did not offer. The
    /// result never has bits outside `offered` (§2.2.1: the driver MUST NOT accept a
    /// feature the device did not offer).
    public static func negotiate(offered: UInt64, wanted: UInt64, required: UInt64) throws(VirtioError) -> UInt64 {
        let missing = required & ~offered
        guard missing == 0 else { throw .missingFeatures(missing) }
        return offered & (wanted | required)
    }
}
