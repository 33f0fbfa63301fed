import OutboardRings
import Virtio

/// An in-process virtio-net device behind a `VirtioTransport`, for deterministic tests of
/// `VirtioNetDevice`: the device works only when the test calls it, and the test can make
/// it misbehave.
///
/// Queue 0 (receiveq) and queue 1 (transmitq) are each a `TestDevice` (§2.7, written from
/// the spec); the net side (§5.1.6) writes received frames, header first, across a receive
/// chain's device-writable buffers and gathers transmitted frames from a transmit chain's
/// device-readable ones, resolving every address through the regions the driver exposed
/// (as a vhost-user backend resolves them through its memory table).
public struct LoopbackNetTransport: ~Copyable, VirtioTransport {
    public var offeredFeatures: UInt64
    /// nil: no configuration space (DPDK's vhost backend has none).
    public var configSpace: [UInt8]?
    public private(set) var driverFeatures: UInt64 = 0
    public private(set) var deviceStatus: DeviceStatus = []
    /// The device clears FEATURES_OK instead of accepting features (§3.1.1 step 6).
    public var refusesFeatures = false
    public private(set) var regions: [(io: UInt64, size: Int, base: UnsafeMutableRawPointer)] = []
    public private(set) var queues: [TestDevice?] = [nil, nil]
    public private(set) var enabled: [Bool] = [false, false]
    /// Receive chains taken from the ring and not yet used.
    public private(set) var receiveChains: [DeviceChain] = []

    public init(features: UInt64, config: VirtioNetConfig?) {
        offeredFeatures = features
        configSpace = config?.encoded()
    }

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
        queues = [nil, nil]
        enabled = [false, false]
        receiveChains = []
    }
    public var hasConfigSpace: Bool { configSpace != nil }
    public mutating func readConfig(offset: Int, count: Int) throws(VirtioTransportError) -> [UInt8] {
        guard let c = configSpace else { throw .refused("no configuration space") }
        guard offset >= 0, count >= 0, offset + count <= c.count else { throw .refused("config range") }
        return Array(c[offset..<(offset + count)])
    }
    public mutating func queueCount() throws(VirtioTransportError) -> Int { 2 }
    public mutating func setUpQueue(_ index: Int, size: Int, at a: QueueAddresses) throws(VirtioTransportError) {
        guard index == 0 || index == 1, let base = resolve(a.descriptors.rawValue, 1) else {
            throw .refused("queue \(index) or its memory")
        }
        queues[index] = TestDevice(memory: base, ioAddress: a.descriptors.rawValue, size: size,
                                   eventIdx: driverFeatures & VirtioFeature.ringEventIdx != 0)
        if index == 0 { receiveChains = [] }
    }
    public mutating func enableQueue(_ index: Int) throws(VirtioTransportError) {
        guard index == 0 || index == 1, queues[index] != nil else { throw .refused("queue \(index) is not set up") }
        enabled[index] = true
    }
    public func notify(_ index: Int) {}
    public func interruptDescriptor(_ index: Int) -> CInt { -1 }
    public var connectionDescriptor: CInt { -1 }
    public var configChangeDescriptor: CInt { -1 }
    public mutating func expose(_ m: DeviceMemory) throws(VirtioTransportError) {
        regions.append((m.ioAddress.rawValue, m.size, m.base))
    }
    public mutating func withdraw(_ io: IOAddress) throws(VirtioTransportError) {
        guard let k = regions.firstIndex(where: { $0.io == io.rawValue }) else { throw .refused("not exposed") }
        regions.remove(at: k)
    }
    public var memoryRegionLimit: Int? { nil }
    public var exposedRegionCount: Int { regions.count }

    // MARK: the device at work

    /// The memory behind `length` bytes at IO address `io`, if one exposed region holds them.
    public func resolve(_ io: UInt64, _ length: Int) -> UnsafeMutableRawPointer? {
        for r in regions where io >= r.io && io - r.io <= UInt64(r.size) && UInt64(length) <= UInt64(r.size) - (io - r.io) {
            return r.base + Int(io - r.io)
        }
        return nil
    }

    /// Used buffer notifications the device sent on `queue`.
    public func notifications(_ queue: Int) -> Int { queues[queue]?.notifications ?? 0 }

    /// Receive chains the driver has made available and the device has not used.
    public mutating func receiveBuffersAvailable() -> Int {
        takeReceiveChains()
        return receiveChains.count
    }

    mutating func takeReceiveChains() {
        guard var q = queues[0].take() else { return }
        receiveChains += q.takeAvailable()
        queues[0] = q
    }

    /// Receives `frame` from the wire: writes `header` (num_buffers 1 unless the test
    /// says) and the frame across the next receive chain, and returns the chain used with
    /// `reportedLength` (default: the bytes written). False if there is no receive chain,
    /// or it is too small (the frame is dropped, as a NIC drops it, and the chain stays).
    @discardableResult
    public mutating func receive(_ frame: [UInt8], header: VirtioNetHeader = VirtioNetHeader(numBuffers: 1),
                                 reportedLength: UInt32? = nil) -> Bool {
        takeReceiveChains()
        guard let c = receiveChains.first else { return false }
        let bytes = header.encoded + frame
        guard c.buffers.allSatisfy(\.deviceWritable), Int(c.writableBytes) >= bytes.count else { return false }
        var at = 0
        for b in c.buffers where at < bytes.count {
            let n = min(Int(b.length), bytes.count - at)
            guard let p = resolve(b.address.rawValue, n) else { return false }
            bytes.withUnsafeBytes { p.copyMemory(from: $0.baseAddress! + at, byteCount: n) }
            at += n
        }
        receiveChains.removeFirst()
        queues[0]!.complete(id: UInt32(c.head), len: reportedLength ?? UInt32(bytes.count))
        return true
    }

    /// Takes every transmit chain and returns each frame (the bytes after the 12-byte
    /// header) with its header, completing each chain (len 0: the device writes nothing).
    public mutating func transmitted() -> [(header: VirtioNetHeader, frame: [UInt8])] {
        guard var q = queues[1].take() else { return [] }
        var out: [(header: VirtioNetHeader, frame: [UInt8])] = []
        for c in q.takeAvailable() {
            var bytes: [UInt8] = []
            for b in c.buffers where !b.deviceWritable {
                guard let p = resolve(b.address.rawValue, Int(b.length)) else { continue }
                bytes += UnsafeRawBufferPointer(start: p, count: Int(b.length))
            }
            if bytes.count >= VirtioNetHeader.byteCount {
                let h = bytes.withUnsafeBytes { VirtioNetHeader(loadingFrom: $0.baseAddress!) }
                out.append((h, Array(bytes[VirtioNetHeader.byteCount...])))
            }
            q.complete(id: UInt32(c.head), len: 0)
        }
        queues[1] = q
        return out
    }

    /// Takes the available chains of `queue` without using them.
    public mutating func takeChains(_ queue: Int) -> [DeviceChain] {
        if queue == 0 {
            takeReceiveChains()
            defer { receiveChains = [] }
            return receiveChains
        }
        guard var q = queues[queue].take() else { return [] }
        let chains = q.takeAvailable()
        queues[queue] = q
        return chains
    }

    /// The heads made available on `queue` since the device last looked, without walking
    /// them (an invalid head cannot be walked).
    public mutating func takeHeads(_ queue: Int) -> [UInt16] {
        guard var q = queues[queue].take() else { return [] }
        var heads: [UInt16] = []
        let idx = q.availIdx
        while q.lastAvail != idx {
            heads.append(UInt16(littleEndian: q.memory.load(fromByteOffset: q.availOffset + 4 + 2 * Int(q.lastAvail % UInt16(q.size)),
                                                              as: UInt16.self)))
            q.lastAvail &+= 1
        }
        queues[queue] = q
        return heads
    }

    /// Writes a used element on `queue` as the test says (hostile devices) and publishes it.
    public mutating func completeRaw(_ queue: Int, id: UInt32, len: UInt32) {
        queues[queue]?.complete(id: id, len: len)
    }

    /// Publishes used.idx on `queue` as the test says, without writing elements.
    public mutating func setUsedIndex(_ queue: Int, _ v: UInt16) {
        queues[queue]?.storeUsedIdx(v)
    }
}
