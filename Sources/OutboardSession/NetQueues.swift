import OutboardRings
import OutboardSystem
import SystemPackage

/// An Ethernet address, the 48 bits in network order in the low six bytes of `rawValue`
/// (byte 0 of the address is bits 40...47). Any value below 2^48 is one.
@frozen
public struct MACAddress: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue & 0xFFFF_FFFF_FFFF }

    /// From six bytes as they appear on the wire.
    @inlinable public init(bytes p: UnsafeRawPointer) {
        var v: UInt64 = 0
        for i in 0..<6 { v = v << 8 | UInt64(p.load(fromByteOffset: i, as: UInt8.self)) }
        rawValue = v
    }

    public init?(bytes: [UInt8]) {
        guard bytes.count == 6 else { return nil }
        self = bytes.withUnsafeBytes { MACAddress(bytes: $0.baseAddress!) }
    }

    /// "02:00:00:00:00:01".
    public init?(_ text: String) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 6 else { return nil }
        var v: UInt64 = 0
        for p in parts {
            guard p.count == 2, let b = UInt8(p, radix: 16) else { return nil }
            v = v << 8 | UInt64(b)
        }
        rawValue = v
    }

    /// Writes the six bytes in wire order at `p`.
    @inlinable public func store(to p: UnsafeMutableRawPointer) {
        for i in 0..<6 { p.storeBytes(of: UInt8(truncatingIfNeeded: rawValue >> (40 - 8 * UInt64(i))), toByteOffset: i, as: UInt8.self) }
    }

    public var bytes: [UInt8] { (0..<6).map { UInt8(truncatingIfNeeded: rawValue >> (40 - 8 * UInt64($0))) } }
    /// Group bit: multicast and broadcast.
    @inlinable public var isMulticast: Bool { rawValue & (1 << 40) != 0 }
    @inlinable public var isBroadcast: Bool { rawValue == 0xFFFF_FFFF_FFFF }
    public static let broadcast = MACAddress(rawValue: 0xFFFF_FFFF_FFFF)

    public var description: String { bytes.map { $0 < 16 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined(separator: ":") }
}

extension NetInfo {
    /// MTUs the protocol carries: IPv4's minimum to a jumbo frame.
    public static let mtuRange: ClosedRange<UInt16> = 68...9000
    /// Ethernet header bytes (destination, source, type).
    public static let headerBytes = 14
}

/// The queue region of a net session (sDDF's net queues): four queues of `BufferDescriptor`s,
/// each naming a buffer of the session's data region by offset and length, with the
/// client's `cookie` handed back unchanged.
/// ```
/// txActive  client -> driver  frames to send (length: the frame's)
/// txFree    driver -> client  sent (or dropped) frames' buffers back
/// rxFree    client -> driver  empty buffers for received frames (length: the buffer's)
/// rxActive  driver -> client  received frames (length: the frame's)
/// ```
/// Every queue has `queueDepth` slots, and a client never has more than `queueDepth`
/// buffers out in either direction, so no queue can overflow.
public struct NetQueueLayout: Equatable, Sendable {
    public let queue: QueueLayout
    public let txActiveOffset: Int
    public let txFreeOffset: Int
    public let rxFreeOffset: Int
    public let rxActiveOffset: Int
    public let byteCount: Int

    public init(queueDepth: Int) throws(QueueError) {
        queue = try QueueLayout(capacity: queueDepth, entry: BufferDescriptor.self)
        txActiveOffset = 0
        txFreeOffset = queue.byteCount
        rxFreeOffset = 2 * queue.byteCount
        rxActiveOffset = 3 * queue.byteCount
        byteCount = 4 * queue.byteCount
    }

    public func initialize(memory: UnsafeMutableRawPointer, size: Int) throws(QueueError) {
        for offset in [txActiveOffset, txFreeOffset, rxFreeOffset, rxActiveOffset] {
            try queue.initialize(memory: memory, size: size, at: offset)
        }
    }
}

/// The serving end of one net session (a driver's, or a multiplexer's for each of its
/// clients): the session's queues and data region mapped, the doorbells owned. Entries come
/// out copied and checked against the region (and, for receive buffers, against the
/// session's largest frame); frames and buffers go back in batches, and the client's
/// doorbell is rung only when it asked.
public struct NetServerEndpoint: ~Copyable {
    public let sessionID: UInt64
    public let tableIndex: Int
    public let queueDepth: Int
    public let queues: SharedMapping
    public let data: SharedMapping
    /// The data region's descriptor when asked to keep it (a vhost-user device maps it again
    /// after every reconnection); else -1.
    public let dataFD: CInt
    let dataRegion: SharedRegion?
    public let requestBell: Doorbell
    public let completionBell: Doorbell
    public var txActive: QueueConsumer<BufferDescriptor>
    public var txFree: QueueProducer<BufferDescriptor>
    public var rxFree: QueueConsumer<BufferDescriptor>
    public var rxActive: QueueProducer<BufferDescriptor>
    /// Doorbells rung for the client.
    public private(set) var signalsSent: UInt64 = 0
    /// Received frames and sent buffers finished and not yet published (`flush` publishes
    /// them in one batch each): room for the depth, which bounds what the server holds.
    public let stagedRx: UnsafeMutableBufferPointer<BufferDescriptor>
    public let stagedTx: UnsafeMutableBufferPointer<BufferDescriptor>
    public var stagedRxCount = 0
    public var stagedTxCount = 0
    /// Buffers of this session the server has at the device, by direction.
    public var rxHeld = 0
    public var txHeld = 0
    /// The largest frame this session may send and the smallest receive buffer it may
    /// post (the configured MTU's frame).
    public let maxFrame: UInt32

    /// From an Attach and its four descriptors (queues, data, request doorbell, completion
    /// doorbell). Frames to send must be `minFrame...maxFrame` bytes; receive buffers at
    /// least `maxFrame` (a frame never spans buffers).
    public init(_ attach: Attach, queues queuesFD: consuming OwnedFD, data dataFD: consuming OwnedFD,
                requestBell: consuming OwnedFD, completionBell: consuming OwnedFD,
                minFrame: UInt32 = UInt32(NetInfo.headerBytes), maxFrame: UInt32,
                keepDataDescriptor: Bool = false) throws(SessionSetupError) {
        let depthOK = attach.queueDepth.nonzeroBitCount == 1 && attach.queueDepth >= 2 && attach.queueDepth <= 4096
        let layout = depthOK ? try? NetQueueLayout(queueDepth: Int(attach.queueDepth)) : nil
        let dataOK = attach.dataBytes > 0 && attach.dataBytes <= UInt64(Int.max / 2)
        let qm = try BlockServerEndpoint.map(queuesFD, minimumSize: layout?.byteCount ?? 1)
        let region = try BlockServerEndpoint.adopt(dataFD, minimumSize: dataOK ? Int(attach.dataBytes) : 1)
        let dm: SharedMapping
        do { dm = try region.map(.readWrite) } catch { throw .system(error) }
        let rawData = keepDataDescriptor ? region.fd.raw.rawValue : -1
        var kept: SharedRegion? = nil
        if keepDataDescriptor { kept = consume region }
        let rb = Doorbell(adopting: requestBell)
        let cb = Doorbell(adopting: completionBell)
        guard let layout else { throw .invalid("queue depth \(attach.queueDepth) is not a power of two in 2...4096") }
        guard dataOK else { throw .invalid("data size \(attach.dataBytes)") }
        guard minFrame <= maxFrame else { throw .invalid("frame sizes \(minFrame)...\(maxFrame)") }
        let size = Int(attach.dataBytes)
        let txBounds = DescriptorBounds(regionSize: size, minLength: minFrame, maxLength: maxFrame)
        let rxBounds = DescriptorBounds(regionSize: size, minLength: maxFrame)
        let heavy = Membarrier.isRegistered
        let ta = try Self.consumer(qm, at: layout.txActiveOffset, layout.queue, txBounds)
        let tf = try Self.producer(qm, at: layout.txFreeOffset, layout.queue, heavy)
        let rf = try Self.consumer(qm, at: layout.rxFreeOffset, layout.queue, rxBounds)
        let ra = try Self.producer(qm, at: layout.rxActiveOffset, layout.queue, heavy)
        txActive = ta
        txFree = tf
        rxFree = rf
        rxActive = ra
        self.requestBell = rb
        self.completionBell = cb
        sessionID = attach.sessionID
        tableIndex = Int(attach.tableIndex)
        queueDepth = Int(attach.queueDepth)
        queues = qm
        data = dm
        self.dataFD = rawData
        self.dataRegion = kept
        self.maxFrame = maxFrame
        stagedRx = .allocate(capacity: Int(attach.queueDepth))
        stagedTx = .allocate(capacity: Int(attach.queueDepth))
    }

    deinit {
        stagedRx.deallocate()
        stagedTx.deallocate()
    }

    /// Receive buffers this session may still hand the server: room in rxActive (its
    /// depth less what the client has not taken) less what the server holds of its
    /// receive buffers. A client that keeps its depth never has one waiting when it is 0.
    @inlinable public mutating func receiveAllowance() -> Int {
        max(0, rxActive.freeSlots() - rxHeld - stagedRxCount)
    }

    /// Frames this session may still hand the server, as `receiveAllowance`.
    @inlinable public mutating func transmitAllowance() -> Int {
        max(0, txFree.freeSlots() - txHeld - stagedTxCount)
    }

    /// Stages a received frame (`d`: the client's buffer with the frame's length).
    @inline(__always) public mutating func stageReceived(_ d: BufferDescriptor) {
        precondition(stagedRxCount < stagedRx.count, "a session holds no more than its depth")
        stagedRx[stagedRxCount] = d
        stagedRxCount += 1
    }

    /// Stages a sent (or dropped) frame's buffer.
    @inline(__always) public mutating func stageSent(_ d: BufferDescriptor) {
        precondition(stagedTxCount < stagedTx.count, "a session holds no more than its depth")
        stagedTx[stagedTxCount] = d
        stagedTxCount += 1
    }

    /// Publishes what is staged, one batch per queue, and rings the client once if it
    /// asked. Returns the entries published, or nil if a queue took fewer (the client
    /// broke the protocol).
    public mutating func flush() -> Int? {
        var ok = true
        let n = stagedRxCount + stagedTxCount
        if stagedRxCount > 0 {
            ok = deliver(UnsafeBufferPointer(rebasing: stagedRx[0..<stagedRxCount])) && ok
            stagedRxCount = 0
        }
        if stagedTxCount > 0 {
            ok = release(UnsafeBufferPointer(rebasing: stagedTx[0..<stagedTxCount])) && ok
            stagedTxCount = 0
        }
        if n > 0 { signalIfWanted() }
        return ok ? n : nil
    }

    static func consumer(_ m: borrowing SharedMapping, at offset: Int, _ layout: QueueLayout,
                         _ bounds: DescriptorBounds) throws(SessionSetupError) -> QueueConsumer<BufferDescriptor> {
        do { return try QueueConsumer(memory: m.base, size: m.size, at: offset, layout: layout, bounds: bounds) } catch { throw .queue(error) }
    }

    static func producer(_ m: borrowing SharedMapping, at offset: Int, _ layout: QueueLayout,
                         _ heavy: Bool) throws(SessionSetupError) -> QueueProducer<BufferDescriptor> {
        do {
            return try QueueProducer(memory: m.base, size: m.size, at: offset, layout: layout, registeredForHeavyBarrier: heavy)
        } catch {
            throw .queue(error)
        }
    }

    /// Publishes received frames; false if the queue took fewer (the client broke the
    /// protocol: it cannot have more buffers out than the depth).
    public mutating func deliver(_ batch: UnsafeBufferPointer<BufferDescriptor>) -> Bool {
        let n = rxActive.enqueue(batch)
        return n == batch.count
    }

    /// Publishes transmitted frames' buffers; false as `deliver`.
    public mutating func release(_ batch: UnsafeBufferPointer<BufferDescriptor>) -> Bool {
        let n = txFree.enqueue(batch)
        return n == batch.count
    }

    /// After a batch of `deliver`s and `release`s: rings the client once if it asked on
    /// either queue. A client waiting for frames asks on rxActive, one out of transmit
    /// buffers on txFree.
    public mutating func signalIfWanted() {
        let rx = rxActive.consumerWantsSignal()
        let tx = txFree.consumerWantsSignal()
        if rx || tx {
            try? completionBell.ring()
            signalsSent &+= 1
        }
    }

    @inlinable public var hasFailed: Bool { txActive.hasFailed || rxFree.hasFailed || txFree.hasFailed || rxActive.hasFailed }
    public var failure: QueueError? { txActive.error ?? rxFree.error ?? txFree.error ?? rxActive.error }
}
