import OutboardRings
import Virtio

/// A virtio-net device (virtio 1.2 §5.1) over any transport: feature negotiation, the
/// receive and transmit chains, and what comes back on them. Nothing here knows sessions,
/// processes or sockets; the caller decides which buffers to post and where frames go.
///
/// Queues: 0 is receiveq1, 1 is transmitq1; no control queue, one queue pair.
///
/// Memory: one area the caller maps and the device sees at `ioAddress` (exposed by the
/// caller through the transport, or mapped through the IOMMU), laid out as
/// `VirtioNetLayout`: the receive virtqueue, the transmit virtqueue (each with its
/// indirect tables), then one 12-byte virtio-net header per transmit slot and one per
/// receive slot. Frames live in the caller's buffers at the caller's IO addresses
/// (zero-copy both ways): a receive chain is the slot's header and the caller's buffer,
/// both device-writable; a transmit chain is the slot's zeroed header and the caller's
/// frame, both device-readable.
///
/// Features: VERSION_1 is required; accepted where the device offers them: MRG_RXBUF (so
/// that the device states `num_buffers`; a frame that does not fit one buffer is dropped,
/// never merged), EVENT_IDX (if asked), INDIRECT_DESC, and, when the transport has a
/// configuration space, MAC, MTU and STATUS. No offloads: no checksum, TSO, UFO or USO
/// feature is accepted, so every frame carries a full checksum both ways and the header's
/// offload fields are zero. No control queue, no MQ.
///
/// Slots are the caller's, one set per queue: it names receive slot `k` or transmit slot
/// `k` (below `queueSize`) when posting, gets `k` back when the device is done, and may
/// post the same slots again after a reconnection (`start` begins with empty queues).
public struct VirtioNetDevice<Transport: VirtioTransport & ~Copyable>: ~Copyable {
    public var transport: Transport
    public let layout: VirtioNetLayout
    let memory: UnsafeMutableRawPointer
    let ioAddress: IOAddress
    var rx: SplitVirtqueue
    var tx: SplitVirtqueue
    /// rxHeadToSlot[head]: the receive slot whose chain starts at descriptor `head`.
    let rxHeadToSlot: UnsafeMutablePointer<UInt16>
    let txHeadToSlot: UnsafeMutablePointer<UInt16>
    /// rxPosted[slot]: the buffer length posted in the slot, 0 when the slot is not at the
    /// device.
    let rxPosted: UnsafeMutablePointer<UInt32>
    let txBusy: UnsafeMutablePointer<Bool>
    let chain: UnsafeMutableBufferPointer<VirtqBuffer>
    /// Used receive entries still to drop: the later buffers of a frame the device spread
    /// over several (num_buffers > 1).
    var rxContinuations = 0
    /// What negotiation found (valid after `negotiate`).
    public private(set) var info = VirtioNetInfo()
    /// Frames received, delivered and dropped, transmitted.
    public private(set) var counters = VirtioNetCounters()
    /// Ring descriptors one frame takes: 1 with indirect tables, else 2.
    public private(set) var descriptorsPerFrame = 2

    /// `memory`: the area, at least `layout.byteCount` bytes, 4096-aligned, seen by the
    /// device at `ioAddress` (4096-aligned); it must outlive this value.
    public init(transport: consuming Transport, memory: UnsafeMutableRawPointer, size: Int, ioAddress: IOAddress,
                queueSize: Int) throws(VirtioNetError) {
        let l: VirtioNetLayout
        do { l = try VirtioNetLayout(queueSize: queueSize) } catch { throw .setup("\(error)") }
        guard l.byteCount <= size else {
            throw .setup("device memory of \(size) bytes is too small for queues of \(queueSize) (\(l.byteCount) needed)")
        }
        guard Int(bitPattern: memory) % 4096 == 0 else { throw .setup("device memory is not page-aligned") }
        guard ioAddress.rawValue % 4096 == 0, ioAddress.rawValue <= UInt64.max - UInt64(size) else {
            throw .setup("device memory IO address \(ioAddress) is not page-aligned or wraps")
        }
        self.transport = transport
        layout = l
        self.memory = memory
        self.ioAddress = ioAddress
        rx = SplitVirtqueue(memory: memory + l.receiveQueueOffset, ioAddress: ioAddress.advanced(by: l.receiveQueueOffset),
                            layout: l.receiveQueue, eventIdx: false, indirect: false)
        tx = SplitVirtqueue(memory: memory + l.transmitQueueOffset, ioAddress: ioAddress.advanced(by: l.transmitQueueOffset),
                            layout: l.transmitQueue, eventIdx: false, indirect: false)
        rxHeadToSlot = .allocate(capacity: queueSize)
        rxHeadToSlot.initialize(repeating: 0, count: queueSize)
        txHeadToSlot = .allocate(capacity: queueSize)
        txHeadToSlot.initialize(repeating: 0, count: queueSize)
        rxPosted = .allocate(capacity: queueSize)
        rxPosted.initialize(repeating: 0, count: queueSize)
        txBusy = .allocate(capacity: queueSize)
        txBusy.initialize(repeating: false, count: queueSize)
        chain = .allocate(capacity: 2)
        chain.initialize(repeating: VirtqBuffer(address: ioAddress, length: 1, deviceWritable: false))
    }

    deinit {
        rxHeadToSlot.deallocate()
        txHeadToSlot.deallocate()
        rxPosted.deallocate()
        txBusy.deallocate()
        chain.deallocate()
    }

    /// The area as the transport should expose it.
    public func deviceMemory(fd: CInt) -> DeviceMemory {
        DeviceMemory(ioAddress: ioAddress, size: layout.byteCount, base: memory, fd: fd)
    }

    // MARK: initialization (§3.1.1, §5.1.5)

    /// Steps 1 to 6 of §3.1.1: reset, ACKNOWLEDGE, DRIVER, features (the configuration
    /// space read before accepting them, as step 4 allows), FEATURES_OK, and the check
    /// that the device kept it. `eventIdx`: ask for VIRTIO_F_EVENT_IDX.
    ///
    /// The MAC and MTU come from the configuration space when the transport has one and
    /// the device offers VIRTIO_NET_F_MAC / VIRTIO_NET_F_MTU; otherwise from
    /// `fallbackMAC` / `fallbackMTU` (DPDK's vhost backend has no configuration space);
    /// the MTU is 1500 when neither says. No MAC from either is an error. Memory must be
    /// exposed after this, before `start`.
    public mutating func negotiate(eventIdx: Bool, fallbackMAC: [UInt8]?,
                                   fallbackMTU: UInt16?) throws(VirtioNetError) -> VirtioNetInfo {
        if let m = fallbackMAC, m.count != 6 || m[0] & 1 != 0 {
            throw .setup("MAC \(VirtioNetConfig.format(m)) is not a 6-byte unicast address")
        }
        if let m = fallbackMTU, m < VirtioNetConfig.minimumMTU {
            throw .setup("MTU \(m) is below \(VirtioNetConfig.minimumMTU)")
        }
        do {
            try transport.reset()
            try transport.setStatus(.acknowledge)
            try transport.setStatus([.acknowledge, .driver])
            let offered = try transport.deviceFeatures()
            let hasConfig = transport.hasConfigSpace
            var wanted = VirtioFeature.version1 | VirtioNetFeature.mrgRxbuf | VirtioFeature.ringIndirectDesc
            if eventIdx { wanted |= VirtioFeature.ringEventIdx }
            // Fields of a configuration space this transport cannot read are no use.
            if hasConfig { wanted |= VirtioNetFeature.mac | VirtioNetFeature.mtu | VirtioNetFeature.status }
            wanted |= offered & transport.transportFeatures
            let negotiated: UInt64
            do { negotiated = try FeatureNegotiation.negotiate(offered: offered, wanted: wanted, required: VirtioFeature.version1) } catch {
                throw VirtioNetError.unsupported("\(error)")
            }
            var config = VirtioNetConfig()
            let need = VirtioNetConfig.bytesNeeded(features: negotiated)
            if hasConfig && need > 0 {
                do {
                    config = try VirtioNetConfig.parse(try transport.readConfig(offset: 0, count: need), features: negotiated)
                } catch let e as VirtioTransportError {
                    throw e
                } catch {
                    throw VirtioNetError.device("configuration space: \(error)")
                }
            }
            guard let mac = config.mac ?? fallbackMAC else {
                throw VirtioNetError.setup("no MAC address: the device states none and none is configured")
            }
            try transport.setDriverFeatures(negotiated)
            try transport.setStatus([.acknowledge, .driver, .featuresOK])
            guard try transport.status().contains(.featuresOK) else {
                throw VirtioNetError.unsupported("the device did not accept features 0x\(String(negotiated, radix: 16))")
            }
            var i = VirtioNetInfo()
            i.features = negotiated
            i.mac = mac
            i.macFromDevice = config.mac != nil
            i.mtu = config.mtu ?? fallbackMTU ?? VirtioNetInfo.defaultMTU
            i.mtuFromDevice = config.mtu != nil
            i.linkUp = config.status.map { $0 & VirtioNetStatus.linkUp != 0 }
            i.mergeableBuffers = negotiated & VirtioNetFeature.mrgRxbuf != 0
            i.eventIdx = negotiated & VirtioFeature.ringEventIdx != 0
            i.indirect = negotiated & VirtioFeature.ringIndirectDesc != 0
            info = i
            return i
        } catch let e as VirtioTransportError {
            throw .transport(e)
        } catch let e as VirtioNetError {
            throw e
        } catch {
            throw .device("\(error)")
        }
    }

    /// Steps 7 and 8 of §3.1.1: both queues (fresh: whatever a previous device had is gone
    /// with it, and every slot is free), enabled, then DRIVER_OK. Memory must be exposed.
    /// `notificationsOff`: start with used buffer notifications suppressed on both queues
    /// (polling).
    public mutating func start(notificationsOff: Bool) throws(VirtioNetError) {
        descriptorsPerFrame = info.indirect ? 1 : 2
        rx = SplitVirtqueue(memory: memory + layout.receiveQueueOffset,
                            ioAddress: ioAddress.advanced(by: layout.receiveQueueOffset),
                            layout: layout.receiveQueue, eventIdx: info.eventIdx, indirect: info.indirect)
        tx = SplitVirtqueue(memory: memory + layout.transmitQueueOffset,
                            ioAddress: ioAddress.advanced(by: layout.transmitQueueOffset),
                            layout: layout.transmitQueue, eventIdx: info.eventIdx, indirect: info.indirect)
        forgetSlots()
        do {
            try transport.setUpQueue(VirtioNetQueue.receive.rawValue, size: layout.queueSize,
                                     at: QueueAddresses(descriptors: rx.descriptorTableAddress, driverArea: rx.availRingAddress,
                                                        deviceArea: rx.usedRingAddress))
            try transport.setUpQueue(VirtioNetQueue.transmit.rawValue, size: layout.queueSize,
                                     at: QueueAddresses(descriptors: tx.descriptorTableAddress, driverArea: tx.availRingAddress,
                                                        deviceArea: tx.usedRingAddress))
            try transport.enableQueue(VirtioNetQueue.receive.rawValue)
            try transport.enableQueue(VirtioNetQueue.transmit.rawValue)
            if notificationsOff {
                rx.disableNotifications()
                tx.disableNotifications()
            }
            try transport.setStatus([.acknowledge, .driver, .featuresOK, .driverOK])
        } catch {
            throw .transport(error)
        }
    }

    /// Resets the device (§2.4: the transport stops both queues) and forgets every slot:
    /// what was at the device is the caller's again (collect it first with `forEachPosted`
    /// to post it again after the next `start`).
    public mutating func reset() throws(VirtioNetError) {
        do { try transport.reset() } catch { throw .transport(error) }
        rx.reset()
        tx.reset()
        forgetSlots()
    }

    mutating func forgetSlots() {
        rxPosted.update(repeating: 0, count: layout.queueSize)
        txBusy.update(repeating: false, count: layout.queueSize)
        rxContinuations = 0
    }

    /// Calls `body(slot)` for each slot of `queue` at the device (posted and not returned),
    /// for resubmission after a lost connection: before `start`, which forgets them.
    public func forEachPosted(_ queue: VirtioNetQueue, _ body: (Int) -> Void) {
        for slot in 0..<layout.queueSize where queue == .receive ? rxPosted[slot] != 0 : txBusy[slot] {
            body(slot)
        }
    }

    // MARK: data path (no allocation, no throwing)

    /// Receive buffers that can be posted now.
    public var receiveRoom: Int { rx.error == nil ? rx.freeDescriptors / descriptorsPerFrame : 0 }
    /// Frames that can be transmitted now.
    public var transmitRoom: Int { tx.error == nil ? tx.freeDescriptors / descriptorsPerFrame : 0 }
    /// Receive buffers at the device.
    public var receivePosted: Int { rx.inFlight }
    /// Frames at the device.
    public var transmitInFlight: Int { tx.inFlight }
    /// The device broke a virtqueue's protocol (sticky until the next `start` or `reset`):
    /// nothing more is taken from that queue.
    public var error: VirtioError? { rx.error ?? tx.error }
    public var receiveError: VirtioError? { rx.error }
    public var transmitError: VirtioError? { tx.error }

    /// Posts receive slot `slot` with the caller's `length`-byte buffer at `buffer` (an IO
    /// address the device reaches): the chain is the slot's header, then the buffer, both
    /// device-writable. Not visible to the device before `publish(.receive)`. Returns false
    /// if refused: the slot is at the device already, the length is 0 or too large, or the
    /// virtqueue is full or failed.
    public mutating func postReceive(slot: Int, buffer: IOAddress, length: UInt32) -> Bool {
        guard slot >= 0, slot < layout.queueSize, rxPosted[slot] == 0, length > 0,
              length <= UInt32.max - UInt32(VirtioNetHeader.byteCount) else { return false }
        let header = layout.receiveHeaderOffset + slot * VirtioNetLayout.headerStride
        // Zeroed, so that a device which leaves num_buffers unwritten is seen (0 is refused).
        VirtioNetHeader().store(to: memory + header)
        chain[0] = VirtqBuffer(address: ioAddress.advanced(by: header), length: UInt32(VirtioNetHeader.byteCount),
                               deviceWritable: true)
        chain[1] = VirtqBuffer(address: buffer, length: length, deviceWritable: true)
        do {
            let head = try rx.add(UnsafeBufferPointer(chain))
            rxHeadToSlot[Int(head)] = UInt16(slot)
            rxPosted[slot] = length
            return true
        } catch {
            return false
        }
    }

    /// The next receive slot the device returned, or nil. Checked before anything is
    /// believed: the virtqueue checks the used entry (an id not in flight, a length beyond
    /// header + buffer, used.idx past what the device holds: the receive queue stops with
    /// `error`, nothing is delivered); then the frame: at least a header and an Ethernet
    /// header written, a header (read once) with num_buffers 1 and no offload flags or GSO
    /// type. A frame failing those comes back with its slot, a status other than `.ok`
    /// and length 0, is counted in `counters.receiveDropped` and is never delivered.
    public mutating func nextReceived() -> VirtioNetReceived? {
        guard let u = rx.popUsed() else { return nil }
        let slot = Int(rxHeadToSlot[Int(u.id)])
        let posted = rxPosted[slot]
        rxPosted[slot] = 0
        if rxContinuations > 0 {
            rxContinuations -= 1
            return dropped(slot, .continuation)
        }
        let headerBytes = UInt32(VirtioNetHeader.byteCount)
        guard u.len >= headerBytes + UInt32(VirtioNetInfo.ethernetHeaderLength) else { return dropped(slot, .runt) }
        let frame = u.len - headerBytes
        guard frame <= posted else { return dropped(slot, .overlong) }
        let h = VirtioNetHeader(loadingFrom: memory + layout.receiveHeaderOffset + slot * VirtioNetLayout.headerStride)
        guard h.numBuffers == 1 else {
            // §5.1.6.4: the other buffers of the frame follow in the used ring; drop them too
            // (never more than the device holds).
            if info.mergeableBuffers && h.numBuffers > 1 { rxContinuations = min(Int(h.numBuffers) - 1, rx.inFlight) }
            return dropped(slot, .mergedBuffers)
        }
        // §5.1.6.4.1: without GUEST_CSUM the device sets flags to zero; without any GUEST_
        // segmentation feature gso_type is NONE.
        guard h.flags == 0, h.gsoType == VirtioNetHeader.gsoNone else { return dropped(slot, .offload) }
        counters.received &+= 1
        return VirtioNetReceived(slot: slot, length: frame, status: .ok)
    }

    @inline(__always)
    mutating func dropped(_ slot: Int, _ status: VirtioNetReceiveStatus) -> VirtioNetReceived {
        counters.receiveDropped &+= 1
        return VirtioNetReceived(slot: slot, length: 0, status: status)
    }

    /// Transmits the caller's `length`-byte frame at `buffer` from transmit slot `slot`:
    /// the chain is the slot's zeroed header, then the frame, both device-readable. Not
    /// visible to the device before `publish(.transmit)`. Returns false if refused: the
    /// slot is at the device already, the frame is shorter than an Ethernet header or
    /// longer than `info.maxFrameLength`, or the virtqueue is full or failed.
    public mutating func transmit(slot: Int, buffer: IOAddress, length: UInt32) -> Bool {
        guard slot >= 0, slot < layout.queueSize, !txBusy[slot], length >= UInt32(VirtioNetInfo.ethernetHeaderLength),
              length <= UInt32(info.maxFrameLength) else { return false }
        let header = layout.transmitHeaderOffset + slot * VirtioNetLayout.headerStride
        VirtioNetHeader().store(to: memory + header)
        chain[0] = VirtqBuffer(address: ioAddress.advanced(by: header), length: UInt32(VirtioNetHeader.byteCount),
                               deviceWritable: false)
        chain[1] = VirtqBuffer(address: buffer, length: length, deviceWritable: false)
        do {
            let head = try tx.add(UnsafeBufferPointer(chain))
            txHeadToSlot[Int(head)] = UInt16(slot)
            txBusy[slot] = true
            return true
        } catch {
            return false
        }
    }

    /// The next transmit slot the device is done with (its frame sent or dropped by the
    /// device: virtio says which never), or nil. The used entry is checked by the
    /// virtqueue (a violation stops the transmit queue with `error`).
    public mutating func nextTransmitted() -> Int? {
        guard let u = tx.popUsed() else { return nil }
        let slot = Int(txHeadToSlot[Int(u.id)])
        txBusy[slot] = false
        counters.transmitted &+= 1
        return slot
    }

    /// Makes what was posted on `queue` visible and notifies the device if it asked
    /// (§2.7.13.3, §2.7.10). Returns whether it notified.
    public mutating func publish(_ queue: VirtioNetQueue) -> Bool {
        let kick: Bool
        switch queue {
        case .receive: kick = rx.publish()
        case .transmit: kick = tx.publish()
        }
        if kick { transport.notify(queue.rawValue) }
        return kick
    }

    /// Asks for a used buffer notification on `queue` (§2.7.7): with event idx after
    /// `after` more entries; true if entries are already there (poll again instead of
    /// sleeping).
    public mutating func enableNotifications(_ queue: VirtioNetQueue, after: Int = 1) -> Bool {
        switch queue {
        case .receive: return rx.enableNotifications(after: after)
        case .transmit: return tx.enableNotifications(after: after)
        }
    }

    /// Asks the device not to notify on `queue` (a hint, §2.7.7).
    public mutating func disableNotifications(_ queue: VirtioNetQueue) {
        switch queue {
        case .receive: rx.disableNotifications()
        case .transmit: tx.disableNotifications()
        }
    }

    /// Fault injection (`bad-ring`): an available-ring entry naming no descriptor on
    /// `queue`, ahead of the next chains (`SplitVirtqueue.addInvalidHead`). The device
    /// refuses the queue; the driver must reset and post again.
    public mutating func addInvalidHead(_ queue: VirtioNetQueue) {
        switch queue {
        case .receive: rx.addInvalidHead()
        case .transmit: tx.addInvalidHead()
        }
    }
}

/// The virtio-net queues this driver uses (§5.1.2: receiveq1 is 0, transmitq1 is 1).
public enum VirtioNetQueue: Int, Sendable {
    case receive = 0
    case transmit = 1
}

/// Where everything sits in the device memory area.
///
/// ```
/// receiveQueueOffset    0        the receive split virtqueue, indirect tables included
/// transmitQueueOffset            the transmit split virtqueue, likewise (page-aligned)
/// transmitHeaderOffset           queueSize headers, 16 bytes apart (12 used)
/// receiveHeaderOffset            queueSize headers, 16 bytes apart
/// byteCount                      rounded up to 4096
/// ```
public struct VirtioNetLayout: Equatable, Sendable {
    public let receiveQueue: SplitQueueLayout
    public let transmitQueue: SplitQueueLayout
    public let receiveQueueOffset: Int
    public let transmitQueueOffset: Int
    public let transmitHeaderOffset: Int
    public let receiveHeaderOffset: Int
    public let byteCount: Int
    /// Bytes between two slots' headers: 12 rounded up, so each is 16-aligned.
    public static let headerStride = 16

    public init(queueSize: Int) throws(VirtioError) {
        // A chain is a header and one buffer: indirect tables of 2.
        receiveQueue = try SplitQueueLayout(size: queueSize, indirectSlots: 2)
        transmitQueue = try SplitQueueLayout(size: queueSize, indirectSlots: 2)
        receiveQueueOffset = 0
        transmitQueueOffset = receiveQueue.byteCount
        transmitHeaderOffset = transmitQueueOffset + transmitQueue.byteCount
        receiveHeaderOffset = transmitHeaderOffset + queueSize * Self.headerStride
        byteCount = (receiveHeaderOffset + queueSize * Self.headerStride + 4095) & ~4095
    }
    public var queueSize: Int { receiveQueue.size }
}

/// What negotiation found.
public struct VirtioNetInfo: Equatable, Sendable {
    /// The Ethernet MTU when nothing says otherwise.
    public static let defaultMTU: UInt16 = 1500
    /// Destination, source, EtherType.
    public static let ethernetHeaderLength = 14
    /// One 802.1Q tag.
    public static let vlanTagLength = 4

    public var features: UInt64 = 0
    public var mac: [UInt8] = []
    /// The MAC is the device's (VIRTIO_NET_F_MAC), not the fallback.
    public var macFromDevice = false
    public var mtu: UInt16 = VirtioNetInfo.defaultMTU
    /// The MTU is the device's (VIRTIO_NET_F_MTU), not the fallback or the default.
    public var mtuFromDevice = false
    /// The link state (VIRTIO_NET_F_STATUS, read at negotiation); nil when the device does
    /// not say.
    public var linkUp: Bool?
    /// Bytes of the virtio-net header before every frame (VERSION_1).
    public var headerSize = VirtioNetHeader.byteCount
    public var mergeableBuffers = false
    public var eventIdx = false
    public var indirect = false
    public init() {}

    /// The longest frame `transmit` takes: the MTU, an Ethernet header and one VLAN tag.
    public var maxFrameLength: Int { Int(mtu) + Self.ethernetHeaderLength + Self.vlanTagLength }
}

/// How a received frame ended.
public enum VirtioNetReceiveStatus: Equatable, Sendable {
    /// Delivered: `length` bytes of frame in the slot's buffer.
    case ok
    /// Dropped: the device wrote less than a virtio-net header and an Ethernet header.
    case runt
    /// Dropped: the device says it wrote more than the buffer holds.
    case overlong
    /// Dropped: num_buffers is not 1 (a frame spread over several buffers, or a header the
    /// device did not write).
    case mergedBuffers
    /// Dropped: a later buffer of a frame dropped as `.mergedBuffers`.
    case continuation
    /// Dropped: the header has checksum flags or a GSO type, though no offload was negotiated.
    case offload
}

/// A receive slot back from the device.
public struct VirtioNetReceived: Equatable, Sendable {
    public var slot: Int
    /// Bytes of frame in the buffer (the header excluded); 0 unless `status` is `.ok`.
    public var length: UInt32
    public var status: VirtioNetReceiveStatus
    public init(slot: Int, length: UInt32, status: VirtioNetReceiveStatus) {
        self.slot = slot; self.length = length; self.status = status
    }
}

/// Frames counted since the device value was made (they survive `start` and `reset`).
public struct VirtioNetCounters: Equatable, Sendable {
    /// Frames delivered (`.ok`).
    public var received: UInt64 = 0
    /// Receive slots returned without a frame (every status but `.ok`).
    public var receiveDropped: UInt64 = 0
    /// Transmit slots the device is done with.
    public var transmitted: UInt64 = 0
    public init() {}
}

public enum VirtioNetError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Bad parameters from the caller: nothing will help but another configuration.
    case setup(String)
    /// The device lacks what the driver needs.
    case unsupported(String)
    /// The device said something impossible (its configuration space).
    case device(String)
    case transport(VirtioTransportError)

    public var description: String {
        switch self {
        case .setup(let s): return "virtio-net setup: \(s)"
        case .unsupported(let s): return "virtio-net device unsupported: \(s)"
        case .device(let s): return "virtio-net device error: \(s)"
        case .transport(let e): return e.description
        }
    }
}
