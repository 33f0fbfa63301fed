import OutboardRings
import Synchronization
import Virtio

/// A virtio-blk device (virtio 1.2 §5.2) over any transport: feature negotiation, the
/// request chains, and completions. Nothing here knows sessions, processes or sockets;
/// the driver host (`VirtioBlkServer`) decides what to submit and where results go.
///
/// Memory: one area the caller maps and the device sees at `ioAddress` (exposed by the
/// caller through the transport, or mapped by the manager through the IOMMU), laid out as
/// `VirtioBlkLayout`: the split virtqueue (with its indirect tables), then one
/// request slot per queue entry (a 16-byte header and a 16-byte discard/write-zeroes
/// segment), then one status byte per slot. Data buffers are the caller's IO addresses
/// (client buffers, zero-copy).
///
/// Request slots are the caller's: it names slot `k` (below `queueSize`) on submit, gets
/// `k` back on completion, and may submit the same slots again after a reconnection.
public struct VirtioBlkDevice<Transport: VirtioTransport & ~Copyable>: ~Copyable {
    public var transport: Transport
    public let layout: VirtioBlkLayout
    let memory: UnsafeMutableRawPointer
    let ioAddress: IOAddress
    var vq: SplitVirtqueue
    /// headToSlot[head]: the request slot whose chain starts at descriptor `head`.
    let headToSlot: UnsafeMutablePointer<UInt16>
    let chain: UnsafeMutableBufferPointer<VirtqBuffer>
    /// Fault injection (`stray-dma`): the next chain's status descriptor points here
    /// instead of at its slot, as a driver bug would. Behind an IOMMU the device's write is
    /// blocked, the slot keeps the 0xFF the driver put there, and the request ends with an
    /// I/O error, alone.
    public var strayStatusAddress: IOAddress?
    /// What negotiation found (valid after `negotiate`).
    public private(set) var info = VirtioBlkInfo()
    /// Ring descriptors one request takes: 1 with indirect tables, else up to 3.
    public private(set) var descriptorsPerRequest = 3

    /// `memory`: the area, at least `layout.byteCount` bytes, 4096-aligned, seen by the
    /// device at `ioAddress` (16-aligned); it must outlive this value.
    public init(transport: consuming Transport, memory: UnsafeMutableRawPointer, size: Int, ioAddress: IOAddress,
                queueSize: Int) throws(VirtioBlkError) {
        let l: VirtioBlkLayout
        do { l = try VirtioBlkLayout(queueSize: queueSize) } catch { throw .setup("\(error)") }
        guard l.byteCount <= size else {
            throw .setup("device memory of \(size) bytes is too small for a queue of \(queueSize) (\(l.byteCount) needed)")
        }
        guard ioAddress.rawValue % 4096 == 0, ioAddress.rawValue <= UInt64.max - UInt64(size) else {
            throw .setup("device memory IO address \(ioAddress) is not page-aligned or wraps")
        }
        self.transport = transport
        layout = l
        self.memory = memory
        self.ioAddress = ioAddress
        vq = SplitVirtqueue(memory: memory, ioAddress: ioAddress, layout: l.queue, eventIdx: false, indirect: false)
        headToSlot = .allocate(capacity: queueSize)
        headToSlot.initialize(repeating: 0, count: queueSize)
        chain = .allocate(capacity: 3)
    }

    deinit {
        headToSlot.deallocate()
        chain.deallocate()
    }

    /// The area as the transport should expose it.
    public func deviceMemory(fd: CInt) -> DeviceMemory {
        DeviceMemory(ioAddress: ioAddress, size: layout.byteCount, base: memory, fd: fd)
    }

    // MARK: initialization (§3.1.1)

    /// Steps 1 to 6 of §3.1.1: reset, ACKNOWLEDGE, DRIVER, features (read the device's,
    /// read the configuration space, §3.1.1 step 4 allows it before accepting), write ours,
    /// FEATURES_OK, and check the device kept it. `maxTransfer`: the largest transfer the
    /// driver allows (the device's size_max lowers it). `eventIdx`: ask for
    /// VIRTIO_F_EVENT_IDX. Memory must be exposed after this, before `start`.
    public mutating func negotiate(eventIdx: Bool, maxTransfer: UInt32) throws(VirtioBlkError) -> VirtioBlkInfo {
        do {
            try transport.reset()
            try transport.setStatus(.acknowledge)
            try transport.setStatus([.acknowledge, .driver])
            let offered = try transport.deviceFeatures()
            var wanted = VirtioFeature.version1 | VirtioBlkFeature.sizeMax | VirtioBlkFeature.segMax
                | VirtioBlkFeature.blkSize | VirtioBlkFeature.flush | VirtioBlkFeature.readOnly | VirtioBlkFeature.discard
                | VirtioBlkFeature.writeZeroes | VirtioFeature.ringIndirectDesc
            if eventIdx { wanted |= VirtioFeature.ringEventIdx }
            wanted |= offered & transport.transportFeatures
            let negotiated: UInt64
            do { negotiated = try FeatureNegotiation.negotiate(offered: offered, wanted: wanted, required: VirtioFeature.version1) } catch {
                throw VirtioBlkError.unsupported("\(error)")
            }
            guard transport.hasConfigSpace else {
                throw VirtioBlkError.unsupported("the transport offers no configuration space (the capacity is in it)")
            }
            let config: VirtioBlkConfig
            do {
                config = try VirtioBlkConfig.parse(try transport.readConfig(offset: 0, count: VirtioBlkConfig.byteCount),
                                                   features: negotiated)
            } catch let e as VirtioTransportError {
                throw e
            } catch {
                throw VirtioBlkError.device("configuration space: \(error)")
            }
            try transport.setDriverFeatures(negotiated)
            try transport.setStatus([.acknowledge, .driver, .featuresOK])
            // §3.1.1 step 6: re-read the status; a device that refused the features clears it.
            guard try transport.status().contains(.featuresOK) else {
                throw VirtioBlkError.unsupported("the device did not accept features 0x\(String(negotiated, radix: 16))")
            }
            var i = VirtioBlkInfo()
            i.features = negotiated
            i.capacity = config.capacity
            var transfer = maxTransfer
            if let sm = config.sizeMax, sm >= UInt32(VirtioBlkInfo.sectorSize) { transfer = min(transfer, sm) }
            i.maxTransfer = transfer & ~UInt32(VirtioBlkInfo.sectorSize - 1)
            i.flush = negotiated & VirtioBlkFeature.flush != 0
            i.readOnly = negotiated & VirtioBlkFeature.readOnly != 0
            i.discard = negotiated & VirtioBlkFeature.discard != 0
            i.writeZeroes = negotiated & VirtioBlkFeature.writeZeroes != 0
            i.maxDiscardSectors = config.maxDiscardSectors ?? 0
            i.maxWriteZeroesSectors = config.maxWriteZeroesSectors ?? 0
            info = i
            return i
        } catch let e as VirtioTransportError {
            throw .transport(e)
        } catch let e as VirtioBlkError {
            throw e
        } catch {
            throw .device("\(error)")
        }
    }

    /// Steps 7 and 8 of §3.1.1: the request queue (fresh: whatever a previous device had
    /// is gone with it), enabled, then DRIVER_OK. Memory must be exposed.
    /// `notificationsOff`: start with used buffer notifications suppressed (polling modes).
    public mutating func start(notificationsOff: Bool) throws(VirtioBlkError) {
        let eventIdx = info.features & VirtioFeature.ringEventIdx != 0
        let indirect = info.features & VirtioFeature.ringIndirectDesc != 0
        descriptorsPerRequest = indirect ? 1 : 3
        vq = SplitVirtqueue(memory: memory, ioAddress: ioAddress, layout: layout.queue, eventIdx: eventIdx, indirect: indirect)
        let addresses = QueueAddresses(descriptors: vq.descriptorTableAddress, driverArea: vq.availRingAddress,
                                       deviceArea: vq.usedRingAddress)
        do {
            try transport.setUpQueue(0, size: layout.queueSize, at: addresses)
            try transport.enableQueue(0)
            if notificationsOff { vq.disableNotifications() }
            try transport.setStatus([.acknowledge, .driver, .featuresOK, .driverOK])
        } catch {
            throw .transport(error)
        }
    }

    // MARK: data path (no allocation, no throwing)

    /// Requests that fit in the virtqueue now.
    public var room: Int { vq.error == nil ? vq.freeDescriptors / descriptorsPerRequest : 0 }
    /// Requests at the device.
    public var inFlight: Int { vq.inFlight }
    /// The device broke the virtqueue's protocol (sticky until the next `start`).
    public var error: VirtioError? { vq.error }

    /// Builds slot `slot`'s chain (§5.2.6: header, data or segment, status) and adds it to
    /// the virtqueue; not visible to the device before `publish`. The request must have been
    /// checked against `info` (range, limits, features) and its buffer translated. Returns
    /// false if the virtqueue refused it (full or failed): the caller ends it with an error.
    public mutating func submit(slot: Int, _ r: VirtioBlkRequest) -> Bool {
        precondition(slot >= 0 && slot < layout.queueSize)
        let header = layout.requestAreaOffset + slot * VirtioBlkLayout.requestBytes
        let status = layout.statusAreaOffset + slot
        // §5.2.6: the header's sector is for read and write only, 0 for the others
        // (discard and write zeroes carry theirs in the segment).
        let sector = r.op == .read || r.op == .write ? r.sector : 0
        (memory + header).storeBytes(of: VirtioBlkRequestHeader(type: r.op.requestType, sector: sector),
                                      as: VirtioBlkRequestHeader.self)
        (memory + status).storeBytes(of: 0xFF, as: UInt8.self)
        chain[0] = VirtqBuffer(address: ioAddress.advanced(by: header), length: 16, deviceWritable: false)
        var count = 1
        switch r.op {
        case .read, .write:
            chain[1] = VirtqBuffer(address: r.buffer, length: r.length, deviceWritable: r.op == .read)
            count = 2
        case .discard, .writeZeroes:
            let segment = VirtioBlkDiscardSegment(sector: r.sector,
                                                  numSectors: r.length / UInt32(VirtioBlkInfo.sectorSize), flags: 0)
            (memory + header + 16).storeBytes(of: segment, as: VirtioBlkDiscardSegment.self)
            chain[1] = VirtqBuffer(address: ioAddress.advanced(by: header + 16), length: 16, deviceWritable: false)
            count = 2
        case .flush:
            break
        }
        let statusAddress = strayStatusAddress ?? ioAddress.advanced(by: status)
        strayStatusAddress = nil
        chain[count] = VirtqBuffer(address: statusAddress, length: 1, deviceWritable: true)
        count += 1
        do {
            let head = try vq.add(UnsafeBufferPointer(rebasing: chain[0..<count]))
            headToSlot[Int(head)] = UInt16(slot)
            return true
        } catch {
            return false
        }
    }

    /// Fault injection (`bad-ring`): an available-ring entry naming no descriptor, ahead of
    /// the next chains (`SplitVirtqueue.addInvalidHead`). The device refuses the queue;
    /// the driver must reset it and resubmit.
    public mutating func addInvalidHead() { vq.addInvalidHead() }

    /// Makes submitted chains visible and notifies the device if it asked (§2.7.13.3,
    /// §2.7.10). Returns whether it notified.
    public mutating func publish() -> Bool {
        guard vq.publish() else { return false }
        transport.notify(0)
        return true
    }

    /// The next finished request: its slot and the status the device wrote, or nil. The
    /// used element was checked by the virtqueue (id, length); the status byte is the
    /// device's and is read once, and anything but the three defined values is an error.
    public mutating func nextCompletion() -> VirtioBlkCompletion? {
        guard let u = vq.popUsed() else { return nil }
        let slot = Int(headToSlot[Int(u.id)])
        let raw = UnsafeRawPointer(memory + layout.statusAreaOffset + slot)
            .assumingMemoryBound(to: Atomic<UInt8>.self).pointee.load(ordering: .relaxed)
        let status: VirtioBlkResult
        switch raw {
        case VirtioBlkStatus.ok: status = .ok
        case VirtioBlkStatus.unsupported: status = .unsupported
        default: status = .ioError
        }
        return VirtioBlkCompletion(slot: slot, status: status)
    }

    /// Asks for a used buffer notification (§2.7.7); true if completions are already there
    /// (poll again instead of sleeping).
    public mutating func enableNotifications(after: Int = 1) -> Bool { vq.enableNotifications(after: after) }
    /// Asks the device not to notify (a hint, §2.7.7).
    public mutating func disableNotifications() { vq.disableNotifications() }
}

/// Where everything sits in the device memory area.
public struct VirtioBlkLayout: Equatable, Sendable {
    public let queue: SplitQueueLayout
    public let requestAreaOffset: Int
    public let statusAreaOffset: Int
    public let byteCount: Int
    /// Per request slot: the header, then a segment.
    public static let requestBytes = 32

    public init(queueSize: Int) throws(VirtioError) {
        queue = try SplitQueueLayout(size: queueSize, indirectSlots: 3)
        requestAreaOffset = (queue.byteCount + 63) & ~63
        statusAreaOffset = requestAreaOffset + queueSize * Self.requestBytes
        byteCount = statusAreaOffset + queueSize
    }
    public var queueSize: Int { queue.size }
}

/// What negotiation found.
public struct VirtioBlkInfo: Equatable, Sendable {
    public static let sectorSize = 512
    public var features: UInt64 = 0
    /// Size in 512-byte sectors.
    public var capacity: UInt64 = 0
    public var maxTransfer: UInt32 = 0
    public var flush = false
    public var readOnly = false
    public var discard = false
    public var writeZeroes = false
    /// 0: no limit given.
    public var maxDiscardSectors: UInt32 = 0
    public var maxWriteZeroesSectors: UInt32 = 0
    public init() {}
}

/// Request kinds (§5.2.6).
public enum VirtioBlkOp: UInt8, Sendable {
    case read, write, flush, discard, writeZeroes

    var requestType: UInt32 {
        switch self {
        case .read: return VirtioBlkRequestType.read
        case .write: return VirtioBlkRequestType.write
        case .flush: return VirtioBlkRequestType.flush
        case .discard: return VirtioBlkRequestType.discard
        case .writeZeroes: return VirtioBlkRequestType.writeZeroes
        }
    }
}

/// One request: for read and write, `length` bytes at `buffer` (an IO address the device
/// resolves); for discard and write zeroes, `length` bytes from `sector`, no buffer.
public struct VirtioBlkRequest: Equatable, Sendable {
    public var op: VirtioBlkOp
    public var sector: UInt64
    public var buffer: IOAddress
    public var length: UInt32
    public init(op: VirtioBlkOp, sector: UInt64, buffer: IOAddress = IOAddress(rawValue: 0), length: UInt32) {
        self.op = op; self.sector = sector; self.buffer = buffer; self.length = length
    }
}

public enum VirtioBlkResult: Equatable, Sendable {
    case ok, ioError, unsupported
}

public struct VirtioBlkCompletion: Equatable, Sendable {
    public var slot: Int
    public var status: VirtioBlkResult
}

public enum VirtioBlkError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Bad parameters from the manager: nothing will help but another configuration.
    case setup(String)
    /// The device lacks what the driver needs.
    case unsupported(String)
    /// The device said something impossible (its configuration space).
    case device(String)
    case transport(VirtioTransportError)

    public var description: String {
        switch self {
        case .setup(let s): return "virtio-blk setup: \(s)"
        case .unsupported(let s): return "virtio-blk device unsupported: \(s)"
        case .device(let s): return "virtio-blk device error: \(s)"
        case .transport(let e): return e.description
        }
    }
}
