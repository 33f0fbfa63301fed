import OutboardRings
import OutboardSystem
import SystemPackage

/// The serving end of one block session: what a driver (or a virtualizer serving its own
/// clients) holds per session. It maps the session's queues and data region and owns the
/// doorbells; requests come out copied and tag-checked, completions go back in batches,
/// and the client's doorbell is rung only when the client asked for it.
public struct BlockServerEndpoint: ~Copyable {
    public let sessionID: UInt64
    public let tableIndex: Int
    public let writable: Bool
    public let queueDepth: Int
    public let queues: SharedMapping
    public let data: SharedMapping
    /// The data region's descriptor, when asked to keep it (a virtio driver registers the
    /// region in the device's memory table, again after every reconnection); else -1.
    public let dataFD: CInt
    let dataRegion: SharedRegion?
    public let requestBell: Doorbell
    public let completionBell: Doorbell
    public var requests: QueueConsumer<BlockRequest>
    public var completions: QueueProducer<BlockCompletion>
    /// Completion doorbells rung for the client.
    public private(set) var signalsSent: UInt64 = 0
    /// Completions finished and not yet published (`complete` publishes them in one batch):
    /// room for the session's depth, so everything the server holds of the session fits.
    public let staged: UnsafeMutableBufferPointer<BlockCompletion>
    public var stagedCount = 0

    /// Sets up from an Attach (or the equivalent parameters) and its four descriptors:
    /// queues, data, request doorbell, completion doorbell. Sizes come from `attach`, and
    /// the regions must carry the size seals and be at least that large.
    ///
    /// If this process registered with `Membarrier.register()`, a client that waits rarely
    /// may take the cost of the completion queue's wake-up check, which spares us a fence
    /// per completion batch (QueueProducer.consumerWantsSignal). Requests are checked with
    /// fences: a driver's sandbox does not let it run the heavy barrier.
    public init(_ attach: Attach, queues queuesFD: consuming OwnedFD, data dataFD: consuming OwnedFD,
                requestBell: consuming OwnedFD, completionBell: consuming OwnedFD,
                keepDataDescriptor: Bool = false) throws(SessionSetupError) {
        // Every descriptor is taken over first (a noncopyable value must be consumed on
        // every path alike); the checks follow.
        let depthOK = attach.queueDepth.nonzeroBitCount == 1 && attach.queueDepth >= 2 && attach.queueDepth <= 4096
        let layout = depthOK ? try? BlockQueueLayout(queueDepth: Int(attach.queueDepth)) : nil
        let dataOK = attach.dataBytes > 0 && attach.dataBytes <= UInt64(Int.max / 2)
        let qm = try Self.map(queuesFD, minimumSize: layout?.byteCount ?? 1)
        let dataRegion = try Self.adopt(dataFD, minimumSize: dataOK ? Int(attach.dataBytes) : 1)
        let dm: SharedMapping
        do { dm = try dataRegion.map(.readWrite) } catch { throw .system(error) }
        let rawData = keepDataDescriptor ? dataRegion.fd.raw.rawValue : -1
        var kept: SharedRegion? = nil
        if keepDataDescriptor { kept = consume dataRegion }
        let rb = Doorbell(adopting: requestBell)
        let cb = Doorbell(adopting: completionBell)
        guard let layout else { throw .invalid("queue depth \(attach.queueDepth) is not a power of two in 2...4096") }
        guard dataOK else { throw .invalid("data size \(attach.dataBytes)") }
        let rq: QueueConsumer<BlockRequest>, cq: QueueProducer<BlockCompletion>
        do {
            rq = try QueueConsumer<BlockRequest>(memory: qm.base, size: qm.size, at: layout.requestOffset,
                                                 layout: layout.requests, bounds: attach.queueDepth)
        } catch {
            throw .queue(error)
        }
        do {
            cq = try QueueProducer<BlockCompletion>(memory: qm.base, size: qm.size, at: layout.completionOffset,
                                                    layout: layout.completions,
                                                    registeredForHeavyBarrier: Membarrier.isRegistered)
        } catch {
            throw .queue(error)
        }
        requests = rq
        completions = cq
        self.requestBell = rb
        self.completionBell = cb
        sessionID = attach.sessionID
        tableIndex = Int(attach.tableIndex)
        writable = attach.writable
        queueDepth = Int(attach.queueDepth)
        queues = qm
        data = dm
        self.dataFD = rawData
        self.dataRegion = kept
        staged = .allocate(capacity: Int(attach.queueDepth))
    }

    deinit { staged.deallocate() }

    static func adopt(_ fd: consuming OwnedFD, minimumSize: Int) throws(SessionSetupError) -> SharedRegion {
        do {
            return try SharedRegion(adopting: fd, minimumSize: minimumSize)
        } catch {
            throw .system(error)
        }
    }

    static func map(_ fd: consuming OwnedFD, minimumSize: Int) throws(SessionSetupError) -> SharedMapping {
        do {
            return try SharedRegion(adopting: fd, minimumSize: minimumSize).map(.readWrite)
        } catch {
            throw .system(error)
        }
    }

    /// Publishes `batch` and rings the client if it is waiting for it. Completions never
    /// overflow (at most `queueDepth` requests are in flight), so a short enqueue means the
    /// client broke the protocol or the queue failed: the caller reports the session.
    ///
    /// A waiting client asks to be woken after N completions (BlockSession.wait's
    /// `wakeAfter`): it is rung when the completion queue's tail reaches its wake index, or
    /// when this driver goes idle on the session, which is when it holds none of the
    /// session's requests any more (every request taken from the queue has its completion
    /// published): nothing more will come until the client submits again, so it gets what
    /// there is (QueueProducer.consumerWantsSignalBeforeIdle). That is decided here, per
    /// session, so a driver kept busy by other sessions never leaves this one waiting, and
    /// a driver that sleeps while the device still holds requests does not wake the client
    /// for each device interrupt.
    public mutating func complete(_ batch: UnsafeBufferPointer<BlockCompletion>) -> Bool {
        let n = completions.enqueue(batch)
        if n > 0, completions.consumerWantsSignal() || (holdsNoRequests && completions.consumerWantsSignalBeforeIdle()) {
            try? completionBell.ring()
            signalsSent &+= 1
        }
        return n == batch.count
    }

    /// True when every request taken from the request queue has had its completion
    /// published: both counts are our own private indices (never read from shared memory),
    /// which start equal. Signed: completions ahead of requests (a driver answering twice)
    /// also count as holding none.
    public var holdsNoRequests: Bool { Int32(bitPattern: completions.index &- requests.index) >= 0 }

    /// Rings the client if it waits for completions already published (its wake index not
    /// reached). complete() does this by itself once the driver holds none of the
    /// session's requests; call this when the driver stops producing completions for a
    /// while although it still holds requests (the device connection was lost, the
    /// driver detaches). Cheap when nobody waits: one load.
    public mutating func producerIdle() {
        if completions.consumerWantsSignalBeforeIdle() {
            try? completionBell.ring()
            signalsSent &+= 1
        }
    }

    /// Whether either queue has failed: one flag each, for the data path (`failure` builds
    /// the error, the cold path).
    @inlinable public var hasFailed: Bool { requests.hasFailed || completions.hasFailed }

    /// Why the session cannot be served any more, if so.
    public var failure: QueueError? { requests.error ?? completions.error }
}

public enum SessionSetupError: Error, Equatable, Sendable, CustomStringConvertible {
    case invalid(String)
    case queue(QueueError)
    case system(Errno)

    public var description: String {
        switch self {
        case .invalid(let s): return "invalid session parameters: \(s)"
        case .queue(let q): return q.description
        case .system(let e): return "cannot map session regions: \(e)"
        }
    }
}
