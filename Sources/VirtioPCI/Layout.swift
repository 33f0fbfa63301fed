// Register layouts of a modern virtio-pci device (virtio 1.2 §4.1.4): the vendor-specific
// capabilities in PCI configuration space and the common configuration structure in a BAR.

/// Offsets in PCI configuration space (PCI Local Bus 3.0 §6.1) the transport reads.
public enum PCIConfigOffset {
    public static let vendorID = 0x00
    public static let deviceID = 0x02
    public static let command = 0x04
    public static let status = 0x06
    public static let capabilitiesPointer = 0x34
    /// The end of the configuration space the capability list lives in (the rest is PCIe's).
    public static let legacyConfigEnd = 0x100

    /// Command register bits: memory space decoding and bus mastering (DMA).
    public static let commandMemory: UInt16 = 1 << 1
    public static let commandBusMaster: UInt16 = 1 << 2
    /// Status register bit: the capability list exists.
    public static let statusCapabilityList: UInt16 = 1 << 4
    /// Capability IDs.
    public static let capabilityVendor: UInt8 = 0x09
    public static let capabilityMSIX: UInt8 = 0x11
    /// The Red Hat / virtio vendor ID.
    public static let virtioVendor: UInt16 = 0x1AF4
}

/// virtio_pci_cap.cfg_type (§4.1.4).
public enum VirtioPCICapabilityType: UInt8, Sendable {
    case common = 1
    case notify = 2
    case isr = 3
    case device = 4
    case pciConfigAccess = 5
    case sharedMemory = 8
    case vendor = 9
}

/// One vendor capability as the device describes it (struct virtio_pci_cap, §4.1.4), copied
/// out of configuration space; nothing in it is trusted.
public struct VirtioPCICapability: Equatable, Sendable {
    /// Where it sits in configuration space.
    public var position: Int
    public var type: UInt8
    public var bar: UInt8
    public var offset: UInt32
    public var length: UInt32
    /// notify_off_multiplier (notify capabilities only; 0 otherwise).
    public var notifyOffMultiplier: UInt32
    public init(position: Int, type: UInt8, bar: UInt8, offset: UInt32, length: UInt32, notifyOffMultiplier: UInt32 = 0) {
        self.position = position; self.type = type; self.bar = bar; self.offset = offset; self.length = length
        self.notifyOffMultiplier = notifyOffMultiplier
    }

    /// struct virtio_pci_cap's size; the notify capability adds notify_off_multiplier.
    public static let byteCount = 16
    public static let notifyByteCount = 20
}

/// struct virtio_pci_common_cfg (§4.1.4.3): offsets of its fields.
public enum VirtioPCICommon {
    public static let deviceFeatureSelect = 0x00
    public static let deviceFeature = 0x04
    public static let driverFeatureSelect = 0x08
    public static let driverFeature = 0x0C
    public static let configMSIXVector = 0x10
    public static let numQueues = 0x12
    public static let deviceStatus = 0x14
    public static let configGeneration = 0x15
    public static let queueSelect = 0x16
    public static let queueSize = 0x18
    public static let queueMSIXVector = 0x1A
    public static let queueEnable = 0x1C
    public static let queueNotifyOff = 0x1E
    public static let queueDesc = 0x20
    public static let queueDriver = 0x28
    public static let queueDevice = 0x30
    /// The fields this transport uses end here (queue_notif_config_data and queue_reset,
    /// which follow, belong to features it does not negotiate).
    public static let byteCount = 0x38
    /// VIRTIO_MSI_NO_VECTOR: no vector, or the device refused the one written.
    public static let noVector: UInt16 = 0xFFFF
}
