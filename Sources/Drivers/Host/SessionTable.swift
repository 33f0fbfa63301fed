import OutboardRings
import OutboardSession
import OutboardSystem

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

/// The sessions a driver serves: a record per session (its serving end, whether it is
/// leaving, its requests at the device, its completions not yet published), and the one
/// translation check every transfer goes through.
struct SessionTable: ~Copyable {
    static let capacity = 64
    static let batch = 32

    let endpoints: UnsafeMutablePointer<BlockServerEndpoint>
    var occupied: [Bool]
    var detaching: [Bool]
    /// Requests at the device (started and not finished).
    var inFlight: [Int]
    var completionBuffers: [UnsafeMutableBufferPointer<BlockCompletion>]
    var completionCounts: [Int]
    let requestBuffer: UnsafeMutableBufferPointer<BlockRequest>
    var next = 0
    /// Sessions the device logic cannot serve (no memory slot at the device), with why:
    /// the host drops them once the exchange with the device is over.
    var refused: [(Int, String)] = []

    init() {
        let n = Self.capacity
        endpoints = .allocate(capacity: n)
        occupied = Array(repeating: false, count: n)
        detaching = Array(repeating: false, count: n)
        inFlight = Array(repeating: 0, count: n)
        completionBuffers = Array(repeating: UnsafeMutableBufferPointer(start: nil, count: 0), count: n)
        completionCounts = Array(repeating: 0, count: n)
        requestBuffer = .allocate(capacity: Self.batch)
    }

    deinit {
        for i in 0..<Self.capacity where occupied[i] {
            (endpoints + i).deinitialize(count: 1)
            completionBuffers[i].deallocate()
        }
        endpoints.deallocate()
        requestBuffer.deallocate()
    }

    /// Whether session `i` is served (attached and not leaving).
    @inline(__always) func isActive(_ i: Int) -> Bool { occupied[i] && !detaching[i] }

    func freeSlot() -> Int? {
        for i in 0..<Self.capacity where !occupied[i] { return i }
        return nil
    }

    mutating func insert(_ endpoint: consuming BlockServerEndpoint, at i: Int) {
        let depth = endpoint.queueDepth
        (endpoints + i).initialize(to: endpoint)
        occupied[i] = true
        detaching[i] = false
        inFlight[i] = 0
        completionBuffers[i] = .allocate(capacity: depth)
        completionCounts[i] = 0
    }

    mutating func remove(_ i: Int) {
        (endpoints + i).deinitialize(count: 1)
        completionBuffers[i].deallocate()
        completionBuffers[i] = UnsafeMutableBufferPointer(start: nil, count: 0)
        occupied[i] = false
        detaching[i] = false
        inFlight[i] = 0
        completionCounts[i] = 0
    }

    /// Requests session `i` may still hand this driver: room in its completion queue (its
    /// depth less what the client has not taken yet) less what the driver holds of it (at
    /// the device, or finished and not yet published). Everything taken within it has
    /// room for its completion, in the driver's buffer and in the client's queue; a client
    /// that keeps its depth never has a request waiting when it is 0.
    @inline(__always) mutating func allowance(_ i: Int) -> Int {
        max(0, endpoints[i].completions.freeSlots() - inFlight[i] - completionCounts[i])
    }

    /// Whether a session this driver still has (serving or leaving) uses `tableIndex`.
    func holds(tableIndex: Int) -> Bool {
        for i in 0..<Self.capacity where occupied[i] && endpoints[i].tableIndex == tableIndex { return true }
        return false
    }

    /// Queues a completion for session `i` (published by `flush`). Dropped if the session
    /// is leaving: its client will not read it. The buffer holds the session's depth, and
    /// `allowance` keeps what the driver holds within it.
    @inline(__always) mutating func complete(_ i: Int, tag: UInt32, status: BlockStatus, generation: UInt64) {
        guard isActive(i) else { return }
        precondition(completionCounts[i] < completionBuffers[i].count, "a session holds no more than its depth")
        completionBuffers[i][completionCounts[i]] = BlockCompletion(tag: tag, status: status, generation: generation)
        completionCounts[i] += 1
    }

    /// A request of session `i` that was at the device ended.
    @inline(__always) mutating func finish(_ i: Int, tag: UInt32, status: BlockStatus, generation: UInt64) {
        inFlight[i] -= 1
        complete(i, tag: tag, status: status, generation: generation)
    }

    /// Translates `length` bytes at `offset` of session `i`'s data region for a transfer
    /// that starts now: the entry must be active, the session's, cover the range, allow
    /// the access, and have at least `leaseMargin` of its lease left; and the range must
    /// lie in the region as mapped here (the table is the manager's, the mapping is what
    /// the device reaches). Called right before the device is given the address, never
    /// before a wait.
    func translate(_ i: Int, offset: RegionOffset, length: UInt32, deviceWrites: Bool, table: TranslationTable) -> Translation {
        let sessionID = endpoints[i].sessionID
        guard let entry = table.readPatiently(endpoints[i].tableIndex) else { return .refused(.revoked) }
        let now = Clock.monotonicNanoseconds
        guard let io = entry.translate(sessionID: sessionID, offset: offset, length: UInt64(length),
                                       write: deviceWrites, now: now &+ leaseMargin) else {
            let live = entry.state == .active && entry.sessionID == sessionID && now &+ leaseMargin < entry.leaseEnd
            return .refused(live ? .invalid : .revoked)
        }
        let size = UInt64(endpoints[i].data.size)
        let regionOffset = io.rawValue &- entry.ioAddress.rawValue
        guard regionOffset <= size, UInt64(length) <= size - regionOffset else { return .refused(.invalid) }
        return .granted(io: io, regionOffset: Int(regionOffset))
    }

    /// Publishes the queued completions, one batch (and at most one doorbell) per session,
    /// and counts them on the driver page. Adds the sessions that broke their queue
    /// protocol to `broken`.
    mutating func flush(page: DriverPage, broken: inout [Int]) {
        for i in 0..<Self.capacity where completionCounts[i] > 0 {
            let count = completionCounts[i]
            completionCounts[i] = 0
            guard isActive(i) else { continue }
            let signals = endpoints[i].signalsSent
            let ok = endpoints[i].complete(UnsafeBufferPointer(rebasing: completionBuffers[i][0..<count]))
            page.add(.signals, endpoints[i].signalsSent &- signals)
            // What the manager's health rule counts ("healthy after N completions").
            page.addCompleted(count)
            if !ok { broken.append(i) }
        }
    }
}

enum Translation {
    case granted(io: IOAddress, regionOffset: Int)
    case refused(BlockStatus)
}
