import CLinux
import Glibc
import COrdering
import OutboardRings
import OutboardSystem
import VFIO
import Virtio

/// Virtio over PCI (virtio 1.2 §4.1), modern devices only: the device's registers are in
/// its BARs, found through the vendor capabilities of its configuration space, and reached
/// with volatile MMIO loads and stores; used buffer notifications arrive as MSI-X
/// interrupts on eventfds.
///
/// Generic over `PCIFunction`, so it runs over a VFIO device (the driver's device fd) and
/// over an in-process double. The function is used at `attach` (configuration space, BAR
/// mappings, MSI-X routing) and `detach`; every register access after that is a load or
/// store into a mapped BAR, and `notify` is one 16-bit store.
///
/// Mapping of the transport operations (§4.1.4.3 common configuration, §4.1.5):
/// - deviceFeatures / setDriverFeatures: device_feature_select and device_feature,
///   driver_feature_select and driver_feature, two 32-bit words each. The driver's features
///   must include VIRTIO_F_ACCESS_PLATFORM (`transportFeatures`): the addresses it gives
///   are IO virtual addresses the IOMMU translates, and a device without the feature
///   would use them as physical addresses.
/// - status / setStatus: device_status. reset: device_status = 0, then device_status is
///   read until it reads 0, for at most `resetTimeoutMilliseconds` (§4.1.4.3.2); then
///   config_msix_vector = 0 (a reset forgets it). The PCI function-level reset is not used:
///   QEMU's virtio devices offer none; the driver host may use `PCIFunction.resetFunction`.
/// - readConfig: the device configuration capability, between two equal reads of
///   config_generation (§2.5.1, §4.1.4.3.1).
/// - setUpQueue: queue_select, queue_size (the device's maximum as it reads after a reset;
///   the driver's size must not exceed it), queue_desc, queue_driver, queue_device,
///   queue_msix_vector = index + 1 (read back), queue_notify_off (the notify address).
///   enableQueue: queue_enable = 1.
/// - notify: the queue's index, stored as 16 bits at its notify address (§4.1.5.2).
/// - expose / withdraw: nothing reaches the device (the manager maps DMA through the
///   IOMMU); the regions are counted so that the driver host sees what it did.
///
/// MSI-X: vector 0 is the configuration change vector (`configChangeDescriptor`; a device
/// that sets DEVICE_NEEDS_RESET signals it there), vector i + 1 is queue i's
/// (`interruptDescriptor(i)`). The eventfds are made by `init`, before any device exists
/// (and before the driver's sandbox, which refuses eventfd2), and outlive devices.
///
/// Everything the device says is hostile: capability offsets and lengths are checked
/// against the BARs they name, notify addresses against the notify window, and reads of
/// all-ones (a device that vanished from the bus) are reported as `.disconnected`.
public struct VirtioPCITransport<Function: PCIFunction & ~Copyable>: ~Copyable, VirtioTransport {
    /// Queues this transport has eventfds (and MSI-X vectors) for.
    public let queueCapacity: Int
    /// How long `reset` waits for device_status to read 0.
    public let resetTimeoutMilliseconds: Int
    /// doorbells[0]: the configuration change vector; doorbells[1 + i]: queue i's.
    let doorbells: UnsafeMutablePointer<Doorbell>
    /// Queue i's notify address once it is set up; nil otherwise (notify does nothing).
    @usableFromInline let notifyAddresses: UnsafeMutablePointer<UnsafeMutableRawPointer?>
    var function: Function?
    var registers: Registers?
    /// The device's features as last read (setDriverFeatures checks against them).
    var offered: UInt64?
    /// The status bits the driver has set since the last reset.
    var written: DeviceStatus = []
    var queueSetUp: [Bool]
    var exposed: [IOAddress] = []

    /// Attempts at a configuration read before a device whose config_generation keeps
    /// changing is given up on.
    public static var configReadAttempts: Int { 16 }

    /// Where the device's structures are mapped (all inside mapped BARs, checked).
    struct Registers {
        var common: UnsafeMutableRawPointer
        var isr: UnsafeMutableRawPointer
        var device: UnsafeMutableRawPointer?
        var deviceLength: Int
        var notify: UnsafeMutableRawPointer
        var notifyLength: Int
        var notifyMultiplier: UInt32
    }

    /// Makes the eventfds: one per queue and one for configuration changes. Call before
    /// the sandbox is entered.
    public init(queues: Int, resetTimeoutMilliseconds: Int = 1000) throws(VirtioTransportError) {
        precondition(queues >= 1 && queues < 0x800, "MSI-X has at most 2048 vectors, one is the config vector")
        precondition(resetTimeoutMilliseconds >= 0)
        doorbells = .allocate(capacity: queues + 1)
        var made = 0
        do {
            while made <= queues {
                (doorbells + made).initialize(to: try Doorbell())
                made += 1
            }
        } catch {
            doorbells.deinitialize(count: made)
            doorbells.deallocate()
            throw .refused("cannot make the interrupt eventfds: \(error)")
        }
        notifyAddresses = .allocate(capacity: queues)
        notifyAddresses.initialize(repeating: nil, count: queues)
        queueCapacity = queues
        self.resetTimeoutMilliseconds = resetTimeoutMilliseconds
        queueSetUp = Array(repeating: false, count: queues)
    }

    deinit {
        doorbells.deinitialize(count: queueCapacity + 1)
        doorbells.deallocate()
        notifyAddresses.deallocate()
    }

    /// Whether a device is attached.
    public var isAttached: Bool { registers != nil }

    /// The eventfd of MSI-X vector 0, the configuration change vector (§4.1.5.3): readable
    /// when the device changed its configuration space or set DEVICE_NEEDS_RESET.
    public var configChangeDescriptor: CInt { doorbells[0].fd.raw.rawValue }

    // MARK: attach and detach

    /// Attaches a device: reads its configuration space, walks the vendor capabilities
    /// (§4.1.4) for the common, notify, ISR and (if present) device configuration
    /// structures, maps the BARs they name and checks every offset and length against the
    /// BAR's size, checks the MSI-X vector count, turns on memory decoding and bus
    /// mastering, and routes vector 0 to the configuration change eventfd and vector i + 1
    /// to queue i's. Any device attached before is detached first. On failure the function
    /// is dropped.
    public mutating func attach(_ function: consuming Function) throws(VirtioTransportError) {
        detach()
        var f = function
        let header = try Self.pci("reading configuration space") { () throws(PCIError) in
            try f.readConfig(offset: 0, count: PCIConfigOffset.legacyConfigEnd)
        }
        let caps = try VirtioPCICapabilities.parse(header)
        guard let commonCap = caps.first(.common) else {
            throw .unsupported("no common configuration capability (not a modern virtio-pci device)")
        }
        guard let notifyCap = caps.first(.notify) else { throw .unsupported("no notification capability") }
        guard let isrCap = caps.first(.isr) else { throw .unsupported("no ISR status capability") }
        let deviceCap = caps.first(.device)

        var bars: [MappedBAR] = []
        for cap in [commonCap, notifyCap, isrCap] + (deviceCap.map { [$0] } ?? [])
        where !bars.contains(where: { $0.index == Int(cap.bar) }) {
            let index = Int(cap.bar)
            bars.append(try Self.pci("mapping BAR \(index)") { () throws(PCIError) in try f.mapBAR(index) })
        }
        func window(_ cap: VirtioPCICapability, _ what: String, minimum: Int, alignment: UInt32) throws(VirtioTransportError)
            -> UnsafeMutableRawPointer {
            guard cap.offset % alignment == 0 else {
                throw .refused("the \(what) capability's offset 0x\(String(cap.offset, radix: 16)) is not \(alignment)-byte aligned")
            }
            guard Int(cap.length) >= minimum else {
                throw .refused("the \(what) capability's length \(cap.length) is below \(minimum)")
            }
            guard let bar = bars.first(where: { $0.index == Int(cap.bar) }), bar.index == Int(cap.bar) else {
                throw .refused("BAR \(cap.bar) was not mapped")
            }
            guard UInt64(cap.offset) + UInt64(cap.length) <= UInt64(max(0, bar.size)) else {
                throw .refused("the \(what) capability (offset 0x\(String(cap.offset, radix: 16)), length \(cap.length)) "
                               + "lies beyond BAR \(cap.bar)'s \(bar.size) bytes")
            }
            return bar.base + Int(cap.offset)
        }
        let common = try window(commonCap, "common configuration", minimum: VirtioPCICommon.byteCount, alignment: 4)
        // §4.1.4.4: the offset 2-aligned, the multiplier an even power of 2 or 0.
        let notify = try window(notifyCap, "notification", minimum: 2, alignment: 2)
        let m = notifyCap.notifyOffMultiplier
        guard m == 0 || (m & (m - 1) == 0 && m % 2 == 0) else {
            throw .refused("notify_off_multiplier \(m) is not an even power of 2")
        }
        let isr = try window(isrCap, "ISR status", minimum: 1, alignment: 1)
        var device: UnsafeMutableRawPointer?
        if let d = deviceCap { device = try window(d, "device configuration", minimum: 0, alignment: 4) }

        let vectors = try Self.pci("reading the MSI-X vector count") { () throws(PCIError) in try f.msixVectorCount() }
        guard vectors >= queueCapacity + 1 else {
            throw .unsupported("the device has \(vectors) MSI-X vectors; \(queueCapacity) queue(s) and the "
                               + "configuration change need \(queueCapacity + 1)")
        }
        // Memory space first, bus mastering only after the reset below: a device a dead
        // driver left with requests in flight (vfio-pci disables it, and resets it only if
        // it has a reset method: QEMU's virtio devices have none) must not DMA into
        // memory that may already belong to someone else.
        let command = UInt16(header[PCIConfigOffset.command]) | UInt16(header[PCIConfigOffset.command + 1]) << 8
        let memoryOnly = (command | PCIConfigOffset.commandMemory) & ~PCIConfigOffset.commandBusMaster
        if memoryOnly != command {
            try Self.pci("enabling memory space") { () throws(PCIError) in
                try f.writeConfig(offset: PCIConfigOffset.command, bytes: [UInt8(memoryOnly & 0xFF), UInt8(memoryOnly >> 8)])
            }
        }
        var fds: [CInt] = []
        for i in 0...queueCapacity { fds.append(doorbells[i].fd.raw.rawValue) }
        try Self.pci("routing MSI-X") { () throws(PCIError) in try f.routeMSIX(to: fds) }

        registers = Registers(common: common, isr: isr, device: device, deviceLength: Int(deviceCap?.length ?? 0),
                              notify: notify, notifyLength: Int(notifyCap.length), notifyMultiplier: m)
        self.function = consume f
        forgetDevice()
        // §2.4 reset through device_status, then bus mastering: from here the device
        // holds nothing of its previous life.
        try reset()
        let busMaster = memoryOnly | PCIConfigOffset.commandBusMaster
        guard var g = self.function.take() else { return }
        let enabled = Result { () throws(PCIError) in
            try g.writeConfig(offset: PCIConfigOffset.command, bytes: [UInt8(busMaster & 0xFF), UInt8(busMaster >> 8)])
        }
        self.function = consume g
        if case .failure(let e) = enabled { try Self.pci("enabling bus mastering") { () throws(PCIError) in throw e } }
    }

    /// Detaches the device: MSI-X off (errors ignored: the device may be gone) and the
    /// function dropped, with its BAR mappings. The eventfds stay.
    public mutating func detach() {
        forgetDevice()
        // The next device starts with nothing exposed (a reset keeps the exposures).
        exposed.removeAll()
        registers = nil
        if var f = function.take() {
            try? f.routeMSIX(to: [])
        }
    }

    /// Forgets what belonged to the device's previous life (after a reset, an attach).
    mutating func forgetDevice() {
        for i in 0..<queueCapacity {
            notifyAddresses[i] = nil
            queueSetUp[i] = false
        }
        offered = nil
        written = []
    }

    static func pci<R>(_ what: String, _ body: () throws(PCIError) -> R) throws(VirtioTransportError) -> R {
        do {
            return try body()
        } catch {
            switch error {
            case .system: throw .disconnected("\(what): \(error)")
            case .unsupported: throw .unsupported("\(what): \(error)")
            case .malformed: throw .refused("\(what): \(error)")
            }
        }
    }

    // MARK: register access (control path)

    func attached() throws(VirtioTransportError) -> Registers {
        guard let r = registers else { throw .disconnected("no device attached") }
        return r
    }

    static func read8(_ p: UnsafeMutableRawPointer, _ offset: Int) -> UInt8 { ob_mmio_read8(p + offset) }
    static func read16(_ p: UnsafeMutableRawPointer, _ offset: Int) -> UInt16 { UInt16(littleEndian: ob_mmio_read16(p + offset)) }
    static func read32(_ p: UnsafeMutableRawPointer, _ offset: Int) -> UInt32 { UInt32(littleEndian: ob_mmio_read32(p + offset)) }
    static func write8(_ p: UnsafeMutableRawPointer, _ offset: Int, _ v: UInt8) {
        ob_compiler_barrier()
        ob_mmio_write8(p + offset, v)
    }
    static func write16(_ p: UnsafeMutableRawPointer, _ offset: Int, _ v: UInt16) {
        ob_compiler_barrier()
        ob_mmio_write16(p + offset, v.littleEndian)
    }
    static func write32(_ p: UnsafeMutableRawPointer, _ offset: Int, _ v: UInt32) {
        ob_compiler_barrier()
        ob_mmio_write32(p + offset, v.littleEndian)
    }
    /// A 64-bit field as two 32-bit stores, low word first (§4.1.3.1).
    static func write64(_ p: UnsafeMutableRawPointer, _ offset: Int, _ v: UInt64) {
        write32(p, offset, UInt32(truncatingIfNeeded: v))
        write32(p, offset + 4, UInt32(truncatingIfNeeded: v >> 32))
    }

    /// device_status; all-ones means the device is gone (no defined status has bits 4
    /// and 5 set together with FAILED).
    func readStatus(_ r: Registers) throws(VirtioTransportError) -> UInt8 {
        let s = Self.read8(r.common, VirtioPCICommon.deviceStatus)
        guard s != 0xFF else { throw .disconnected("the device reads all-ones (it left the bus)") }
        return s
    }

    // MARK: features and status

    public var transportFeatures: UInt64 { VirtioFeature.accessPlatform }

    public mutating func deviceFeatures() throws(VirtioTransportError) -> UInt64 {
        let r = try attached()
        Self.write32(r.common, VirtioPCICommon.deviceFeatureSelect, 0)
        let low = Self.read32(r.common, VirtioPCICommon.deviceFeature)
        Self.write32(r.common, VirtioPCICommon.deviceFeatureSelect, 1)
        let high = Self.read32(r.common, VirtioPCICommon.deviceFeature)
        _ = try readStatus(r)
        let features = UInt64(high) << 32 | UInt64(low)
        offered = features
        return features
    }

    public mutating func setDriverFeatures(_ features: UInt64) throws(VirtioTransportError) {
        let r = try attached()
        let offer: UInt64
        if let o = offered { offer = o } else { offer = try deviceFeatures() }
        guard features & ~offer == 0 else {
            throw .refused("features 0x\(String(features & ~offer, radix: 16)) were not offered")
        }
        guard features & VirtioFeature.accessPlatform != 0 else {
            throw .unsupported(offer & VirtioFeature.accessPlatform == 0
                ? "the device does not offer VIRTIO_F_ACCESS_PLATFORM: it would bypass the IOMMU, and the driver's addresses are IO virtual addresses"
                : "VIRTIO_F_ACCESS_PLATFORM is offered but not accepted (the transport needs it: the driver's addresses are IO virtual addresses)")
        }
        Self.write32(r.common, VirtioPCICommon.driverFeatureSelect, 0)
        Self.write32(r.common, VirtioPCICommon.driverFeature, UInt32(truncatingIfNeeded: features))
        Self.write32(r.common, VirtioPCICommon.driverFeatureSelect, 1)
        Self.write32(r.common, VirtioPCICommon.driverFeature, UInt32(truncatingIfNeeded: features >> 32))
    }

    public mutating func status() throws(VirtioTransportError) -> DeviceStatus {
        DeviceStatus(rawValue: try readStatus(try attached()))
    }

    /// Writes the bits set since the last reset together with `status` (device_status
    /// takes the whole byte). Clearing bits is `reset`'s business.
    public mutating func setStatus(_ status: DeviceStatus) throws(VirtioTransportError) {
        let r = try attached()
        let value = written.union(status)
        Self.write8(r.common, VirtioPCICommon.deviceStatus, value.rawValue)
        written = value
    }

    public mutating func reset() throws(VirtioTransportError) {
        let r = try attached()
        forgetDevice()
        Self.write8(r.common, VirtioPCICommon.deviceStatus, 0)
        let deadline = ob_monotonic_ns() + UInt64(resetTimeoutMilliseconds) * 1_000_000
        var polls = 0
        while try readStatus(r) != 0 {
            guard ob_monotonic_ns() < deadline else {
                let s = Self.read8(r.common, VirtioPCICommon.deviceStatus)
                throw .refused("device_status still reads 0x\(String(s, radix: 16)) \(resetTimeoutMilliseconds) ms "
                               + "after the reset (§4.1.4.3.2)")
            }
            polls += 1
            // Devices normally finish at once; a slow one is polled every 100 µs.
            if polls > 16 {
                var t = timespec(tv_sec: 0, tv_nsec: 100_000)
                _ = nanosleep(&t, nil)
            }
        }
        Self.write16(r.common, VirtioPCICommon.configMSIXVector, 0)
        guard Self.read16(r.common, VirtioPCICommon.configMSIXVector) == 0 else {
            _ = try readStatus(r)
            throw .refused("the device refused MSI-X vector 0 for configuration changes")
        }
    }

    // MARK: configuration space

    public var hasConfigSpace: Bool { registers?.device != nil }

    /// Reads at the field's width when `count` is 1, 2 or 4 and `offset` is a multiple of
    /// it, byte by byte otherwise; retried until config_generation reads the same before
    /// and after (§2.5.1), at most `configReadAttempts` times.
    public mutating func readConfig(offset: Int, count: Int) throws(VirtioTransportError) -> [UInt8] {
        let r = try attached()
        guard let base = r.device else { throw .refused("the device has no device configuration capability") }
        guard offset >= 0, count >= 0, offset <= r.deviceLength, count <= r.deviceLength - offset else {
            throw .refused("configuration read \(offset)+\(count) beyond the device's \(r.deviceLength) bytes")
        }
        var bytes = [UInt8](repeating: 0, count: count)
        for _ in 0..<Self.configReadAttempts {
            let before = Self.read8(r.common, VirtioPCICommon.configGeneration)
            switch count {
            case 1:
                bytes[0] = Self.read8(base, offset)
            case 2 where offset % 2 == 0:
                let v = Self.read16(base, offset)
                bytes[0] = UInt8(v & 0xFF); bytes[1] = UInt8(v >> 8)
            case 4 where offset % 4 == 0:
                let v = Self.read32(base, offset)
                for k in 0..<4 { bytes[k] = UInt8(truncatingIfNeeded: v >> (8 * k)) }
            default:
                for k in 0..<count { bytes[k] = Self.read8(base, offset + k) }
            }
            let after = Self.read8(r.common, VirtioPCICommon.configGeneration)
            if before == after {
                if after == 0xFF { _ = try readStatus(r) }
                return bytes
            }
        }
        _ = try readStatus(r)
        throw .refused("config_generation changed during each of \(Self.configReadAttempts) configuration reads")
    }

    // MARK: queues

    public mutating func queueCount() throws(VirtioTransportError) -> Int {
        let r = try attached()
        let n = Self.read16(r.common, VirtioPCICommon.numQueues)
        if n == 0xFFFF { _ = try readStatus(r) }
        return Int(n)
    }

    public mutating func setUpQueue(_ index: Int, size: Int, at a: QueueAddresses) throws(VirtioTransportError) {
        let r = try attached()
        guard index >= 0, index < queueCapacity else { throw .refused("queue \(index): this transport has \(queueCapacity)") }
        let count = try queueCount()
        guard index < count else { throw .refused("queue \(index): the device has \(count)") }
        guard size >= 1, size <= 32768, size & (size - 1) == 0 else {
            throw .refused("queue size \(size) is not a power of 2 up to 32768")
        }
        guard a.descriptors.rawValue % 16 == 0, a.driverArea.rawValue % 2 == 0, a.deviceArea.rawValue % 4 == 0 else {
            throw .refused("queue \(index)'s rings are misaligned (§2.7: 16, 2 and 4 bytes)")
        }
        Self.write16(r.common, VirtioPCICommon.queueSelect, UInt16(index))
        let maximum = Int(Self.read16(r.common, VirtioPCICommon.queueSize))
        if maximum == 0xFFFF { _ = try readStatus(r) }
        guard maximum != 0 else { throw .refused("queue \(index) is not available (queue_size 0)") }
        guard size <= maximum else { throw .refused("queue \(index): size \(size) is above the device's \(maximum)") }
        let notifyOff = Self.read16(r.common, VirtioPCICommon.queueNotifyOff)
        // 16 × 32 bits: no overflow in 64.
        let notifyOffset = UInt64(notifyOff) * UInt64(r.notifyMultiplier)
        guard notifyOffset + 2 <= UInt64(r.notifyLength) else {
            throw .refused("queue \(index)'s notify address (queue_notify_off \(notifyOff) × \(r.notifyMultiplier)) "
                           + "lies beyond the \(r.notifyLength)-byte notification window")
        }
        Self.write16(r.common, VirtioPCICommon.queueSize, UInt16(size))
        Self.write64(r.common, VirtioPCICommon.queueDesc, a.descriptors.rawValue)
        Self.write64(r.common, VirtioPCICommon.queueDriver, a.driverArea.rawValue)
        Self.write64(r.common, VirtioPCICommon.queueDevice, a.deviceArea.rawValue)
        let vector = UInt16(index + 1)
        Self.write16(r.common, VirtioPCICommon.queueMSIXVector, vector)
        let got = Self.read16(r.common, VirtioPCICommon.queueMSIXVector)
        guard got == vector else {
            _ = try readStatus(r)
            throw got == VirtioPCICommon.noVector
                ? .refused("the device refused MSI-X vector \(vector) for queue \(index) (NO_VECTOR)")
                : .refused("queue \(index)'s MSI-X vector reads \(got), not \(vector)")
        }
        notifyAddresses[index] = r.notify + Int(notifyOffset)
        queueSetUp[index] = true
    }

    public mutating func enableQueue(_ index: Int) throws(VirtioTransportError) {
        let r = try attached()
        guard index >= 0, index < queueCapacity, queueSetUp[index] else { throw .refused("queue \(index) is not set up") }
        Self.write16(r.common, VirtioPCICommon.queueSelect, UInt16(index))
        Self.write16(r.common, VirtioPCICommon.queueEnable, 1)
    }

    // MARK: notifications (data path)

    /// One 16-bit store of the queue's index at its notify address; nothing for a queue
    /// not set up. The compiler barrier keeps the ring's stores before it (x86 orders the
    /// uncached store after earlier write-back stores).
    @inlinable
    public func notify(_ index: Int) {
        guard index >= 0, index < queueCapacity, let a = notifyAddresses[index] else { return }
        ob_compiler_barrier()
        ob_mmio_write16(a, UInt16(truncatingIfNeeded: index).littleEndian)
    }

    public func interruptDescriptor(_ index: Int) -> CInt {
        guard index >= 0, index < queueCapacity else { return -1 }
        return doorbells[index + 1].fd.raw.rawValue
    }

    public var connectionDescriptor: CInt { -1 }

    // MARK: memory

    /// Counted only: the device reaches memory through the IOMMU mappings the manager made.
    public mutating func expose(_ m: DeviceMemory) throws(VirtioTransportError) {
        guard !exposed.contains(m.ioAddress) else { throw .refused("a region at \(m.ioAddress) is exposed already") }
        exposed.append(m.ioAddress)
    }

    public mutating func withdraw(_ io: IOAddress) throws(VirtioTransportError) {
        guard let k = exposed.firstIndex(of: io) else { throw .refused("no region is exposed at \(io)") }
        exposed.remove(at: k)
    }

    public var memoryRegionLimit: Int? { nil }
    public var exposedRegionCount: Int { exposed.count }
}

/// The vendor capabilities of a virtio-pci device's configuration space (§4.1.4).
public struct VirtioPCICapabilities: Equatable, Sendable {
    /// In list order, the ones with a reserved BAR number (above 5) left out (§4.1.4: the
    /// driver ignores them).
    public var all: [VirtioPCICapability]

    /// The first capability of `type` (§4.1.4: the device may offer several; the driver
    /// uses the first it can).
    public func first(_ type: VirtioPCICapabilityType) -> VirtioPCICapability? {
        all.first { $0.type == type.rawValue }
    }

    /// Walks the capability list in `config` (the first 256 bytes of configuration space,
    /// copied). A list that loops or points outside, or a vendor capability too short for
    /// its type, is refused; all-ones (a vanished device) is `.disconnected`.
    public static func parse(_ config: [UInt8]) throws(VirtioTransportError) -> VirtioPCICapabilities {
        guard config.count >= PCIConfigOffset.legacyConfigEnd else {
            throw .refused("configuration space of \(config.count) bytes (256 needed)")
        }
        func u16(_ o: Int) -> UInt16 { UInt16(config[o]) | UInt16(config[o + 1]) << 8 }
        func u32(_ o: Int) -> UInt32 {
            UInt32(config[o]) | UInt32(config[o + 1]) << 8 | UInt32(config[o + 2]) << 16 | UInt32(config[o + 3]) << 24
        }
        let vendor = u16(PCIConfigOffset.vendorID)
        guard vendor != 0xFFFF else { throw .disconnected("configuration space reads all-ones (the device left the bus)") }
        guard vendor == PCIConfigOffset.virtioVendor else {
            throw .unsupported("vendor 0x\(String(vendor, radix: 16)) is not virtio's (0x1af4)")
        }
        guard u16(PCIConfigOffset.status) & PCIConfigOffset.statusCapabilityList != 0 else {
            throw .unsupported("the device has no capability list")
        }
        // The list itself is walked (and checked) once, by the VFIO module's walk.
        let list: PCICapabilities
        do { list = try PCICapabilities(config: Array(config.prefix(PCIConfigOffset.legacyConfigEnd))) } catch {
            throw .refused("the capability list: \(error)")
        }
        var caps: [VirtioPCICapability] = []
        for entry in list.entries(withID: PCIConfigOffset.capabilityVendor) {
            let at = entry.offset
            do {
                guard at + 3 < PCIConfigOffset.legacyConfigEnd else { throw .refused("a vendor capability at 0x\(String(at, radix: 16)) is cut off") }
                let length = Int(config[at + 2])
                let type = config[at + 3]
                let needed = type == VirtioPCICapabilityType.notify.rawValue ? VirtioPCICapability.notifyByteCount
                    : VirtioPCICapability.byteCount
                guard length >= needed, at + needed <= PCIConfigOffset.legacyConfigEnd else {
                    throw .refused("the vendor capability at 0x\(String(at, radix: 16)) (type \(type)) has length "
                                   + "\(length), \(needed) needed")
                }
                let bar = config[at + 4]
                if bar <= 5 {
                    caps.append(VirtioPCICapability(
                        position: at, type: type, bar: bar, offset: u32(at + 8), length: u32(at + 12),
                        notifyOffMultiplier: type == VirtioPCICapabilityType.notify.rawValue ? u32(at + 16) : 0))
                }
            }
        }
        return VirtioPCICapabilities(all: caps)
    }
}
