import OutboardRings
import OutboardSession
import OutboardSystem
import SystemPackage

/// What a driver's device logic may use of its process: the manager socket, the driver
/// page (heartbeat, counters, in-use marks), the translation table (read-only), the epoll
/// set, the start parameters, and the sessions.
struct HostContext: ~Copyable {
    let manager: UnixSocket
    let start: DriverStart
    let page: DriverPage
    let table: TranslationTable
    let epoll: Epoll
    var sessions: SessionTable
    // Keep the mappings alive as long as `page` and `table` point into them.
    let pageMapping: SharedMapping
    let tableMapping: SharedMapping

    var generation: UInt64 { start.generation }

    /// Tells the manager the device connection is unusable, and what to do about it
    /// (`.reconnectDevice`: hand over a new connection; `.failDevice`: this device cannot
    /// be driven with this configuration).
    func reportDeviceLost(_ reason: String, _ recovery: Recovery = .reconnectDevice) {
        try? manager.send(.deviceLost(reason: String(reason.prefix(ControlProtocol.maxReasonBytes - 16)), recovery: recovery))
    }
}

/// The serving end of one session, as the driver host keeps it: made from an Attach, with
/// what the host needs of every class (its identity, region, request doorbell, failure).
/// The class's queues are the device logic's.
protocol ServedSession: ~Copyable {
    /// The class whose queues this serves.
    static var deviceClass: DeviceClass { get }
    /// From an Attach and its four descriptors (queues, data, request doorbell, completion
    /// doorbell), checked against what the driver was started with.
    static func make(_ a: Attach, _ d: inout ControlDelivery, start: DriverStart,
                     keepDataDescriptor: Bool) throws(SessionSetupError) -> Self
    var sessionID: UInt64 { get }
    var tableIndex: Int { get }
    var queueDepth: Int { get }
    var dataBase: UnsafeMutableRawPointer { get }
    var dataSize: Int { get }
    /// The data region's descriptor, if kept (else -1).
    var dataFD: CInt { get }
    var requestBellFD: FileDescriptor { get }
    /// Whether a queue of the session has failed (one flag each; `failure` says why).
    var hasFailed: Bool { get }
    var failure: QueueError? { get }
    /// Rings the client if it waits for what is already published: the driver stops
    /// producing for a while (the device connection was lost).
    mutating func producerIdle()
}

/// The sessions a driver serves: a record per session (its serving end, whether it is
/// leaving, what of it is at the device), sessions to drop with why, and the one
/// translation check every transfer goes through.
///
/// The serving ends are of the driver's class (`block` or `net` view them; the host's
/// generic code, `endpoints(_:)`); the table keeps what the host needs of every session
/// (identity, table index, region size) in plain arrays beside them.
struct SessionTable: ~Copyable {
    static let capacity = 64
    /// Entries taken from one session's queue at a time.
    static let batch = 32

    let deviceClass: DeviceClass
    let storage: UnsafeMutableRawPointer
    let deinitializeSlot: (UnsafeMutableRawPointer, Int) -> Void
    var occupied: [Bool]
    var detaching: [Bool]
    /// What the device holds of each session (requests, buffers): a session leaves only
    /// when this is 0.
    var inFlight: [Int]
    var sessionIDs: [UInt64]
    var tableIndices: [Int]
    var dataSizes: [Int]
    var next = 0
    /// One past the highest occupied slot: every session is below it (a pass over the
    /// sessions need look no further).
    var span = 0
    /// Sessions to stop serving, with why (a broken queue protocol, no memory slot at the
    /// device): the host drops them after the pass that found them.
    var drops: [(Int, String)] = []
    /// Scratch for one batch of entries taken from a queue (`batch` entries of up to 64 bytes).
    let scratch: UnsafeMutableRawPointer

    init<S: ServedSession & ~Copyable>(of: S.Type) {
        let n = Self.capacity
        deviceClass = S.deviceClass
        storage = .allocate(byteCount: n * MemoryLayout<S>.stride, alignment: MemoryLayout<S>.alignment)
        storage.bindMemory(to: S.self, capacity: n)
        deinitializeSlot = { raw, i in (raw.assumingMemoryBound(to: S.self) + i).deinitialize(count: 1) }
        occupied = Array(repeating: false, count: n)
        detaching = Array(repeating: false, count: n)
        inFlight = Array(repeating: 0, count: n)
        sessionIDs = Array(repeating: 0, count: n)
        tableIndices = Array(repeating: -1, count: n)
        dataSizes = Array(repeating: 0, count: n)
        scratch = .allocate(byteCount: Self.batch * 64, alignment: 64)
    }

    deinit {
        for i in 0..<Self.capacity where occupied[i] { deinitializeSlot(storage, i) }
        storage.deallocate()
        scratch.deallocate()
    }

    /// The serving ends, as the class they are (the table was made `of:` that type).
    @inline(__always) func endpoints<S: ServedSession & ~Copyable>(_: S.Type) -> UnsafeMutablePointer<S> {
        storage.assumingMemoryBound(to: S.self)
    }
    /// Block sessions' serving ends (a block driver's table).
    @inline(__always) var block: UnsafeMutablePointer<BlockServerEndpoint> { storage.assumingMemoryBound(to: BlockServerEndpoint.self) }
    /// Net sessions' serving ends (a net driver's table).
    @inline(__always) var net: UnsafeMutablePointer<NetServerEndpoint> { storage.assumingMemoryBound(to: NetServerEndpoint.self) }

    /// Whether session `i` is served (attached and not leaving).
    @inline(__always) func isActive(_ i: Int) -> Bool { occupied[i] && !detaching[i] }

    func freeSlot() -> Int? {
        for i in 0..<Self.capacity where !occupied[i] { return i }
        return nil
    }

    mutating func insert<S: ServedSession & ~Copyable>(_ endpoint: consuming S, at i: Int) {
        precondition(S.deviceClass == deviceClass, "a \(S.deviceClass) session in a \(deviceClass) table")
        sessionIDs[i] = endpoint.sessionID
        tableIndices[i] = endpoint.tableIndex
        dataSizes[i] = endpoint.dataSize
        (endpoints(S.self) + i).initialize(to: endpoint)
        occupied[i] = true
        detaching[i] = false
        inFlight[i] = 0
        span = max(span, i + 1)
    }

    mutating func remove(_ i: Int) {
        deinitializeSlot(storage, i)
        occupied[i] = false
        detaching[i] = false
        inFlight[i] = 0
        tableIndices[i] = -1
        while span > 0 && !occupied[span - 1] { span -= 1 }
    }

    /// Whether a session this driver still has (serving or leaving) uses `tableIndex`.
    func holds(tableIndex: Int) -> Bool {
        for i in 0..<Self.capacity where occupied[i] && tableIndices[i] == tableIndex { return true }
        return false
    }

    /// Translates `length` bytes at `offset` of session `i`'s data region for a transfer
    /// that starts now: the entry must be active, the session's, cover the range, allow
    /// the access, and have at least `leaseMargin` of its lease left; and the range must
    /// lie in the region as mapped here (the table is the manager's, the mapping is what
    /// the device reaches). Called right before the device is given the address, never
    /// before a wait.
    func translate(_ i: Int, offset: RegionOffset, length: UInt32, deviceWrites: Bool, table: TranslationTable) -> Translation {
        grant(i, table: table).translate(offset: offset, length: length, deviceWrites: deviceWrites)
    }

    /// Session `i`'s translation for one batch of transfers that start now: its entry read
    /// once and the clock read once, so that each transfer of the batch is checked
    /// (`SessionGrant.translate`) without touching the table or the clock. The rules are
    /// `translate`'s; the batch must go to the device right after (it is at most
    /// `batch` entries, microseconds against the 20 ms `leaseMargin`), never after a wait,
    /// and while the session's in-use mark is set (DriverPage.markInUse), so that a
    /// revocation that begins during the batch waits for the mark.
    @inline(__always)
    func grant(_ i: Int, table: TranslationTable) -> SessionGrant {
        SessionGrant(sessionID: sessionIDs[i], entry: table.readPatiently(tableIndices[i]),
                     deadline: Clock.monotonicNanoseconds &+ leaseMargin, regionSize: UInt64(dataSizes[i]))
    }
}

/// One session's translation entry and the time, read once for a batch (`SessionTable.grant`).
struct SessionGrant {
    let sessionID: UInt64
    /// nil: the entry could not be read (revoked, for the transfer).
    let entry: TranslationTable.Entry?
    /// The clock at the read plus `leaseMargin`: the lease must run past it.
    let deadline: UInt64
    /// The data region as mapped here.
    let regionSize: UInt64

    @inline(__always)
    func translate(offset: RegionOffset, length: UInt32, deviceWrites: Bool) -> Translation {
        guard let entry else { return .refused(.revoked) }
        guard let io = entry.translate(sessionID: sessionID, offset: offset, length: UInt64(length),
                                       write: deviceWrites, now: deadline) else {
            let live = entry.state == .active && entry.sessionID == sessionID && deadline < entry.leaseEnd
            return .refused(live ? .invalid : .revoked)
        }
        let regionOffset = io.rawValue &- entry.ioAddress.rawValue
        guard regionOffset <= regionSize, UInt64(length) <= regionSize - regionOffset else { return .refused(.invalid) }
        return .granted(io: io, regionOffset: Int(regionOffset))
    }
}

enum Translation {
    case granted(io: IOAddress, regionOffset: Int)
    case refused(BlockStatus)
}

// MARK: block sessions

extension BlockServerEndpoint: ServedSession {
    static var deviceClass: DeviceClass { .block }
    static func make(_ a: Attach, _ d: inout ControlDelivery, start: DriverStart,
                     keepDataDescriptor: Bool) throws(SessionSetupError) -> BlockServerEndpoint {
        try BlockServerEndpoint(a, queues: d.take(0), data: d.take(1), requestBell: d.take(2), completionBell: d.take(3),
                                keepDataDescriptor: keepDataDescriptor)
    }
    var dataBase: UnsafeMutableRawPointer { data.base }
    var dataSize: Int { data.size }
    var requestBellFD: FileDescriptor { requestBell.fd.raw }
}

typealias BlockContext = HostContext

/// The block class's view of the table (a block driver's table only).
extension SessionTable {
    /// The scratch as a batch of requests.
    var requestBuffer: UnsafeMutableBufferPointer<BlockRequest> {
        UnsafeMutableBufferPointer(start: scratch.bindMemory(to: BlockRequest.self, capacity: Self.batch), count: Self.batch)
    }

    /// Requests session `i` may still hand this driver: room in its completion queue (its
    /// depth less what the client has not taken yet) less what the driver holds of it (at
    /// the device, or finished and not yet published). Everything taken within it has
    /// room for its completion, in the driver's buffer and in the client's queue; a client
    /// that keeps its depth never has a request waiting when it is 0.
    @inline(__always) mutating func allowance(_ i: Int) -> Int {
        max(0, block[i].completions.freeSlots() - inFlight[i] - block[i].stagedCount)
    }

    /// Queues a completion for session `i` (published by `flush`). Dropped if the session
    /// is leaving: its client will not read it. The buffer holds the session's depth, and
    /// `allowance` keeps what the driver holds within it.
    @inline(__always) mutating func complete(_ i: Int, tag: UInt32, status: BlockStatus, generation: UInt64) {
        guard isActive(i) else { return }
        let n = block[i].stagedCount
        precondition(n < block[i].staged.count, "a session holds no more than its depth")
        block[i].staged[n] = BlockCompletion(tag: tag, status: status, generation: generation)
        block[i].stagedCount = n + 1
    }

    /// A request of session `i` that was at the device ended.
    @inline(__always) mutating func finish(_ i: Int, tag: UInt32, status: BlockStatus, generation: UInt64) {
        inFlight[i] -= 1
        complete(i, tag: tag, status: status, generation: generation)
    }

    /// Publishes the queued completions, one batch (and at most one doorbell) per session,
    /// and counts them on the driver page. Sessions that broke their queue protocol go to
    /// `drops`.
    mutating func flush(page: DriverPage) {
        for i in 0..<Self.capacity where occupied[i] && block[i].stagedCount > 0 {
            let count = block[i].stagedCount
            block[i].stagedCount = 0
            guard isActive(i) else { continue }
            let signals = block[i].signalsSent
            let ok = block[i].complete(UnsafeBufferPointer(rebasing: block[i].staged[0..<count]))
            page.add(.signals, block[i].signalsSent &- signals)
            // What the manager's health rule counts ("healthy after N completions").
            page.addCompleted(count)
            if !ok {
                drops.append((i, block[i].failure?.description ?? "completion queue full: client exceeded its queue depth"))
            }
        }
    }
}
