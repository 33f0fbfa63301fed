import Glibc
import OutboardRings
import Virtio

/// An in-process virtio-blk device behind a `VirtioTransport`: the driver's code runs
/// unchanged against it, deterministically (the device works only when the test calls
/// `process()`), and the test can make the device misbehave (`completeRaw`).
///
/// The queue side is `TestDevice` (written from the spec, §2.7, independently of the
/// driver); the block side executes §5.2.6 requests against memory, resolving every
/// address through the regions the driver exposed, as a vhost-user backend resolves them
/// through its memory table. An address outside them fails the request (IOERR), as a
/// device behind an IOMMU would.
public struct LoopbackBlkTransport: ~Copyable, VirtioTransport {
    public var offeredFeatures: UInt64
    public var configSpace: [UInt8]
    public let disk: UnsafeMutableRawBufferPointer
    /// Features the driver wrote, as the device saw them.
    public private(set) var driverFeatures: UInt64 = 0
    public private(set) var deviceStatus: DeviceStatus = []
    /// The device clears FEATURES_OK instead of accepting features (§3.1.1 step 6).
    public var refusesFeatures = false
    public var regionLimit: Int? = nil
    public private(set) var regions: [(io: UInt64, size: Int, base: UnsafeMutableRawPointer)] = []
    public private(set) var queue: TestDevice?
    public private(set) var kicks = 0
    var interrupts = 0

    /// A disk of `sectors` 512-byte sectors, filled with `fill`.
    public init(sectors: Int, features: UInt64, config: VirtioBlkConfig, fill: UInt8 = 0) {
        disk = .allocate(byteCount: sectors * 512, alignment: 4096)
        disk.initializeMemory(as: UInt8.self, repeating: fill)
        offeredFeatures = features
        configSpace = config.encoded()
    }

    deinit { disk.deallocate() }

    // MARK: VirtioTransport

    public var transportFeatures: UInt64 { 0 }
    public mutating func deviceFeatures() throws(VirtioTransportError) -> UInt64 { offeredFeatures }
    public mutating func setDriverFeatures(_ f: UInt64) throws(VirtioTransportError) {
        guard f & ~offeredFeatures == 0 else { throw .refused("features not offered") }
        driverFeatures = f
    }
    public mutating func status() throws(VirtioTransportError) -> DeviceStatus { deviceStatus }
    public mutating func setStatus(_ s: DeviceStatus) throws(VirtioTransportError) {
        deviceStatus = s
        if refusesFeatures { deviceStatus.remove(.featuresOK) }
    }
    public mutating func reset() throws(VirtioTransportError) {
        deviceStatus = []
        queue = nil
    }
    public var hasConfigSpace: Bool { true }
    public mutating func readConfig(offset: Int, count: Int) throws(VirtioTransportError) -> [UInt8] {
        guard offset >= 0, count >= 0, offset + count <= configSpace.count else { throw .refused("config range") }
        return Array(configSpace[offset..<(offset + count)])
    }
    public mutating func queueCount() throws(VirtioTransportError) -> Int { 1 }
    public mutating func setUpQueue(_ index: Int, size: Int, at a: QueueAddresses) throws(VirtioTransportError) {
        guard index == 0, let base = resolve(a.descriptors.rawValue, 1) else { throw .refused("queue memory not exposed") }
        queue = TestDevice(memory: base, ioAddress: a.descriptors.rawValue, size: size,
                           eventIdx: driverFeatures & VirtioFeature.ringEventIdx != 0)
    }
    public mutating func enableQueue(_ index: Int) throws(VirtioTransportError) {}
    public func notify(_ index: Int) {}
    public func interruptDescriptor(_ index: Int) -> CInt { -1 }
    public var connectionDescriptor: CInt { -1 }
    public var configChangeDescriptor: CInt { -1 }
    public mutating func expose(_ m: DeviceMemory) throws(VirtioTransportError) {
        if let limit = regionLimit, regions.count >= limit { throw .noMemorySlot(limit: limit) }
        regions.append((m.ioAddress.rawValue, m.size, m.base))
    }
    public mutating func withdraw(_ io: IOAddress) throws(VirtioTransportError) {
        guard let k = regions.firstIndex(where: { $0.io == io.rawValue }) else { throw .refused("not exposed") }
        regions.remove(at: k)
    }
    public var memoryRegionLimit: Int? { regionLimit }
    public var exposedRegionCount: Int { regions.count }

    // MARK: the device at work

    /// The memory behind `length` bytes at IO address `io`, if one exposed region holds them.
    public func resolve(_ io: UInt64, _ length: Int) -> UnsafeMutableRawPointer? {
        for r in regions where io >= r.io && io - r.io <= UInt64(r.size) && UInt64(length) <= UInt64(r.size) - (io - r.io) {
            return r.base + Int(io - r.io)
        }
        return nil
    }

    /// Takes every available chain and executes it (§5.2.6); returns how many.
    public mutating func process() -> Int {
        guard var q = queue.take() else { return 0 }
        let chains = q.takeAvailable()
        for c in chains {
            let written = execute(c)
            q.complete(id: UInt32(c.head), len: written)
        }
        queue = q
        return chains.count
    }

    /// Takes the available chains without executing them (for a test that answers itself).
    public mutating func takeChains() -> [DeviceChain] {
        guard var q = queue.take() else { return [] }
        let chains = q.takeAvailable()
        queue = q
        return chains
    }

    /// Writes a used element as the test says (hostile devices) and publishes it.
    public mutating func completeRaw(id: UInt32, len: UInt32) {
        guard var q = queue.take() else { return }
        q.complete(id: id, len: len)
        queue = q
    }

    /// Publishes used.idx as the test says, without writing elements.
    public mutating func setUsedIndex(_ v: UInt16) {
        queue?.storeUsedIdx(v)
    }

    /// Runs one request: header, data or segments, status. Returns the bytes written.
    func execute(_ c: DeviceChain) -> UInt32 {
        guard c.buffers.count >= 2, let status = c.buffers.last, status.deviceWritable, status.length >= 1,
              let statusByte = resolve(status.address.rawValue, 1) else { return 0 }
        func finish(_ s: UInt8, _ written: UInt32) -> UInt32 {
            statusByte.storeBytes(of: s, as: UInt8.self)
            return written + 1
        }
        let head = c.buffers[0]
        guard !head.deviceWritable, head.length >= 16, let h = resolve(head.address.rawValue, 16) else {
            return finish(VirtioBlkStatus.ioError, 0)
        }
        let type = UInt32(littleEndian: h.load(as: UInt32.self))
        let sector = UInt64(littleEndian: h.load(fromByteOffset: 8, as: UInt64.self))
        let middle = c.buffers[1..<(c.buffers.count - 1)]
        let diskSectors = UInt64(disk.count / 512)
        switch type {
        case VirtioBlkRequestType.read, VirtioBlkRequestType.write:
            var at = sector * 512
            var moved: UInt32 = 0
            for b in middle {
                guard b.deviceWritable == (type == VirtioBlkRequestType.read), b.length % 512 == 0,
                      at / 512 + UInt64(b.length / 512) <= diskSectors,
                      let p = resolve(b.address.rawValue, Int(b.length)) else { return finish(VirtioBlkStatus.ioError, 0) }
                if type == VirtioBlkRequestType.read {
                    p.copyMemory(from: disk.baseAddress! + Int(at), byteCount: Int(b.length))
                    moved += b.length
                } else {
                    (disk.baseAddress! + Int(at)).copyMemory(from: p, byteCount: Int(b.length))
                }
                at += UInt64(b.length)
            }
            return finish(VirtioBlkStatus.ok, moved)
        case VirtioBlkRequestType.flush:
            return finish(VirtioBlkStatus.ok, 0)
        case VirtioBlkRequestType.discard, VirtioBlkRequestType.writeZeroes:
            for b in middle {
                guard !b.deviceWritable, b.length % 16 == 0, let p = resolve(b.address.rawValue, Int(b.length)) else {
                    return finish(VirtioBlkStatus.ioError, 0)
                }
                for k in 0..<Int(b.length / 16) {
                    let start = UInt64(littleEndian: p.load(fromByteOffset: 16 * k, as: UInt64.self))
                    let count = UInt64(UInt32(littleEndian: p.load(fromByteOffset: 16 * k + 8, as: UInt32.self)))
                    guard start <= diskSectors, count <= diskSectors - start else { return finish(VirtioBlkStatus.ioError, 0) }
                    // This model forgets discarded sectors as zeroes (§5.2.6.2 lets it).
                    (disk.baseAddress! + Int(start * 512)).initializeMemory(as: UInt8.self, repeating: 0, count: Int(count * 512))
                }
            }
            return finish(VirtioBlkStatus.ok, 0)
        default:
            return finish(VirtioBlkStatus.unsupported, 0)
        }
    }
}
