import OutboardRings

/// Device status bits (virtio 1.2 §2.1).
public struct DeviceStatus: OptionSet, Equatable, Sendable, CustomStringConvertible {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    public static let acknowledge = DeviceStatus(rawValue: 1)
    public static let driver = DeviceStatus(rawValue: 2)
    public static let driverOK = DeviceStatus(rawValue: 4)
    public static let featuresOK = DeviceStatus(rawValue: 8)
    public static let deviceNeedsReset = DeviceStatus(rawValue: 64)
    public static let failed = DeviceStatus(rawValue: 128)
    public var description: String { "0x" + String(rawValue, radix: 16) }
}

/// Where a queue's three parts are, as the device addresses them (§2.7: descriptor
/// table, driver area = available ring, device area = used ring).
public struct QueueAddresses: Equatable, Sendable {
    public var descriptors: IOAddress
    public var driverArea: IOAddress
    public var deviceArea: IOAddress
    public init(descriptors: IOAddress, driverArea: IOAddress, deviceArea: IOAddress) {
        self.descriptors = descriptors; self.driverArea = driverArea; self.deviceArea = deviceArea
    }
}

/// Memory the driver shows the device: `size` bytes seen by the device at `ioAddress`,
/// mapped in the driver at `base`, backed by the file descriptor `fd` (borrowed: the
/// caller keeps it open while the region is exposed). Transports that need no exposure
/// (VFIO: the manager maps DMA through the IOMMU) ignore it.
public struct DeviceMemory: Equatable {
    public var ioAddress: IOAddress
    public var size: Int
    public var base: UnsafeMutableRawPointer
    public var fd: CInt
    public init(ioAddress: IOAddress, size: Int, base: UnsafeMutableRawPointer, fd: CInt) {
        self.ioAddress = ioAddress; self.size = size; self.base = base; self.fd = fd
    }
}

/// What a transport could not do, and what that means for the caller.
public enum VirtioTransportError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The connection to the device is unusable; a new one may work (the caller
    /// reconnects and sets the device up again).
    case disconnected(String)
    /// The device refused or cannot do what was asked (a missing feature, a refused
    /// request): the same request will fail again.
    case refused(String)
    /// No room left in the device's memory table (vhost-user memory slots).
    case noMemorySlot(limit: Int)
    /// The device lacks what the transport itself needs (vhost-user without
    /// PROTOCOL_FEATURES): no connection to it will do better.
    case unsupported(String)

    public var description: String {
        switch self {
        case .disconnected(let s): return "device connection lost: \(s)"
        case .refused(let s): return "device refused: \(s)"
        case .noMemorySlot(let limit):
            return "the device has \(limit) memory slots and none is free"
        case .unsupported(let s): return "device unsupported: \(s)"
        }
    }
}

/// What a virtio driver asks of the bus its device sits on (virtio 1.2 §2 and §4): feature
/// bits, the §3.1.1 status sequence, the configuration space, queue set-up at IO
/// addresses, notifications both ways, the memory the device may reach, and reset.
/// One driver source runs over any conforming transport (sDDF's virtio/transport/common.h):
/// vhost-user (`VhostUserTransport`), virtio-pci over VFIO, an in-process loopback for tests.
///
/// Used through generics (`VirtioBlkDevice<T>`), never as an existential, so that the data
/// path calls (`notify`) are direct. Control calls may block for a bounded time and throw;
/// data path calls neither block nor throw.
public protocol VirtioTransport: ~Copyable {
    /// Feature bits the transport itself needs accepted when the device offers them, which
    /// the driver adds to its own: VIRTIO_F_ACCESS_PLATFORM for a device behind an IOMMU
    /// (virtio-pci over VFIO); 0 for transports that need none.
    var transportFeatures: UInt64 { get }
    /// The device's feature bits (§2.2), all 64.
    mutating func deviceFeatures() throws(VirtioTransportError) -> UInt64
    /// Writes the features the driver accepts, a subset of `deviceFeatures()` (§2.2).
    mutating func setDriverFeatures(_ features: UInt64) throws(VirtioTransportError)
    /// The device status (§2.1). Transports without a status register report what the
    /// driver set, with FEATURES_OK only if the device accepted the features.
    mutating func status() throws(VirtioTransportError) -> DeviceStatus
    /// Sets status bits (§3.1.1). Setting DRIVER_OK makes the device live.
    mutating func setStatus(_ status: DeviceStatus) throws(VirtioTransportError)
    /// Resets the device (§2.4): status 0, queues forgotten, memory exposures kept.
    mutating func reset() throws(VirtioTransportError)

    /// Whether the device-specific configuration space (§2.5) can be read. DPDK's
    /// vhost backend offers none; the device's facts then come from the manager's config.
    var hasConfigSpace: Bool { get }
    /// `count` bytes of the configuration space from `offset` (§4.1.4.6 for PCI).
    mutating func readConfig(offset: Int, count: Int) throws(VirtioTransportError) -> [UInt8]

    /// Queues the device has (for devices with several; 1 when the transport cannot tell).
    mutating func queueCount() throws(VirtioTransportError) -> Int
    /// Tells the device where queue `index` of `size` entries lies (§4.1.5.1.3).
    mutating func setUpQueue(_ index: Int, size: Int, at addresses: QueueAddresses) throws(VirtioTransportError)
    /// Enables queue `index` (§4.1.4.3 queue_enable; vhost-user SET_VRING_ENABLE). Call
    /// after setUpQueue, before DRIVER_OK.
    mutating func enableQueue(_ index: Int) throws(VirtioTransportError)

    /// An available buffer notification for queue `index` (§2.7.13.3). Data path: never
    /// blocks, never throws; a notification that cannot be delivered is lost the way a
    /// posted write to a removed device is, and the connection's loss is seen elsewhere.
    func notify(_ index: Int)
    /// The descriptor that becomes readable when the device sends a used buffer
    /// notification for queue `index` (an eventfd: the vhost-user call fd, a VFIO MSI-X
    /// vector), for the caller's epoll set; -1 if the transport has none (loopback). The
    /// caller may watch it edge-triggered and never read it: a notification means only
    /// "look at the used ring".
    func interruptDescriptor(_ index: Int) -> CInt
    /// A descriptor on which the device's going away shows (vhost-user: the socket), or -1.
    var connectionDescriptor: CInt { get }
    /// The descriptor that becomes readable when the device signals a configuration change
    /// (§2.5.2, §4.1.5.3: virtio-pci's MSI-X configuration vector), which is also how it
    /// says it set DEVICE_NEEDS_RESET (§2.1.2); -1 if the transport has none. Watched like
    /// `interruptDescriptor`: edge-triggered, never read.
    var configChangeDescriptor: CInt { get }

    /// Lets the device reach `memory` (vhost-user: an entry in its memory table). Returns
    /// when the device can use it.
    mutating func expose(_ memory: DeviceMemory) throws(VirtioTransportError)
    /// Takes back a region exposed before, identified by its IO address. Only when no
    /// request on it is at the device.
    mutating func withdraw(_ ioAddress: IOAddress) throws(VirtioTransportError)
    /// Regions the device can be shown at once (nil: no limit of the transport's own).
    var memoryRegionLimit: Int? { get }
    /// Regions exposed now.
    var exposedRegionCount: Int { get }
}
