import OutboardSession
import OutboardSystem

/// A random read/write workload that checks every byte it reads.
///
/// Every block written carries a header (magic, block number, version, checksum) and a
/// payload derived from (block, version). The workload remembers, per block, the version
/// of the last write the device acknowledged, and checks every read against it: an
/// acknowledged write that was lost, a torn or misplaced block, or a stale read is a
/// verify error. At most one request per block is in flight, so the expected content of
/// every read is known exactly.
public struct VerifiedWorkload: ~Copyable {
    public static let blockBytes = 4096
    static let magic: UInt64 = 0x5946_4952_4556_424F  // "OBVERIFY"

    public var session: BlockSession
    public let blocks: Int
    var acked: [UInt32]
    var busy: [Bool]
    var freeSlots: [Int]
    var rng: UInt64
    let results: UnsafeMutableBufferPointer<BlockResult>

    public private(set) var ops = 0
    public private(set) var reads = 0
    public private(set) var writes = 0
    public private(set) var verifyErrors = 0
    public private(set) var clientErrors = 0
    public private(set) var firstError: String?
    /// Highest driver generation seen on a completion.
    public private(set) var lastCompletionGeneration: UInt64 = 0
    /// How long the workload waits with requests in flight and none finishing before it
    /// throws `.failed`: a lost request is an error, not a hang. Recovery from a driver
    /// restart takes well under a second.
    public var stallLimitMilliseconds = 30_000
    /// When a request last finished, or nothing was in flight.
    var lastProgress: UInt64 = 0

    /// Uses the first `blocks` 4 KiB blocks of the device (at most the device's size).
    /// The session's data region must hold `queueDepth` blocks.
    public init(session: consuming BlockSession, blocks: Int, seed: UInt64) {
        let deviceBlocks = Int(session.info.blockCount) / (Self.blockBytes / blockSectorSize)
        let slots = min(session.queueDepth, session.buffer.count / Self.blockBytes)
        self.blocks = max(1, min(blocks, deviceBlocks))
        acked = Array(repeating: 0, count: self.blocks)
        busy = Array(repeating: false, count: self.blocks)
        freeSlots = Array(0..<slots)
        rng = seed | 1
        results = .allocate(capacity: session.queueDepth)
        self.session = session
    }

    deinit { results.deallocate() }

    mutating func next() -> UInt64 {
        // SplitMix64.
        rng &+= 0x9E37_79B9_7F4A_7C15
        var z = rng
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Writes every block once (version 1), so that what the device held before does not
    /// matter: from here on every read has one exact expected content.
    public mutating func prepare() throws(SessionError) {
        lastProgress = Clock.monotonicNanoseconds
        var block = 0
        while block < blocks || session.inFlight > 0 {
            while block < blocks, !freeSlots.isEmpty {
                guard try submit(block: block, write: true) else { break }
                block += 1
            }
            try collect()
        }
    }

    /// Keeps the queue full and handles completions until `stop` returns true (checked
    /// after every completion batch). Session errors (device failed) are thrown.
    public mutating func run(until stop: (borrowing VerifiedWorkload) -> Bool) throws(SessionError) {
        lastProgress = Clock.monotonicNanoseconds
        while !stop(self) {
            try fill()
            try collect()
        }
    }

    /// Runs `count` more operations, then waits for everything in flight.
    public mutating func run(operations count: Int) throws(SessionError) {
        let target = ops + count
        try run { $0.ops >= target }
        try finish()
    }

    /// Waits for everything in flight.
    public mutating func finish() throws(SessionError) {
        lastProgress = Clock.monotonicNanoseconds
        while session.inFlight > 0 {
            try collect()
        }
    }

    /// Waits up to 100 ms for completions and handles them; throws once nothing has
    /// finished for `stallLimitMilliseconds` with requests in flight.
    mutating func collect() throws(SessionError) {
        let n = try session.wait(into: results, timeoutMilliseconds: 100)
        for i in 0..<n { complete(results[i]) }
        let now = Clock.monotonicNanoseconds
        if n > 0 || session.inFlight == 0 { lastProgress = now; return }
        if now &- lastProgress > UInt64(max(stallLimitMilliseconds, 0)) * 1_000_000 {
            throw .failed("no request finished for \(stallLimitMilliseconds) ms with \(session.inFlight) in flight "
                          + "(generation \(session.generation), \(session.recoveries) recoveries, \(session.reissued) reissued)")
        }
    }

    mutating func fill() throws(SessionError) {
        var attempts = 0
        while !freeSlots.isEmpty && attempts < 64 {
            attempts += 1
            let block = Int(next() % UInt64(blocks))
            if busy[block] { continue }
            guard try submit(block: block, write: next() & 1 == 0) else { return }
        }
    }

    /// Reads or writes (the next version of) `block` through a free buffer slot. False
    /// when the session has no room.
    mutating func submit(block: Int, write: Bool) throws(SessionError) -> Bool {
        let slot = freeSlots.removeLast()
        let offset = slot * Self.blockBytes
        let version = write ? acked[block] &+ 1 : 0
        if write { Self.fill(session.buffer.baseAddress! + offset, block: block, version: version) }
        let user = UInt64(slot) | UInt64(block) << 16 | UInt64(version) << 40
        let sector = UInt64(block * (Self.blockBytes / blockSectorSize))
        guard try session.submit(write ? .write : .read, sector: sector, offset: offset, length: Self.blockBytes,
                                 userData: user) != nil else {
            freeSlots.append(slot)
            return false
        }
        busy[block] = true
        return true
    }

    mutating func complete(_ r: BlockResult) {
        let slot = Int(r.userData & 0xFFFF), block = Int((r.userData >> 16) & 0xFF_FFFF), version = UInt32(r.userData >> 40)
        freeSlots.append(slot)
        busy[block] = false
        ops += 1
        lastCompletionGeneration = max(lastCompletionGeneration, r.generation)
        guard r.status == .ok else {
            clientErrors += 1
            if firstError == nil { firstError = "\(r.op) of block \(block) failed: \(r.status.map { "\($0)" } ?? "unknown status")" }
            return
        }
        if r.op == .write {
            writes += 1
            acked[block] = version
        } else {
            reads += 1
            if let problem = Self.verify(session.buffer.baseAddress! + slot * Self.blockBytes, block: block, version: acked[block]) {
                verifyErrors += 1
                if firstError == nil { firstError = "read of block \(block): \(problem)" }
            }
        }
    }

    static func payloadWord(_ block: Int, _ version: UInt32, _ i: Int) -> UInt64 {
        var z = UInt64(block) &* 0x9E37_79B9_7F4A_7C15 ^ UInt64(version) &* 0xC2B2_AE3D_27D4_EB4F ^ UInt64(i) &* 0x1656_67B1_9E37_79F9
        z = (z ^ (z >> 33)) &* 0xFF51_AFD7_ED55_8CCD
        return z ^ (z >> 29)
    }

    static func checksum(_ p: UnsafeRawPointer) -> UInt64 {
        var h: UInt64 = 0xCBF2_9CE4_8422_2325
        for i in 4..<(blockBytes / 8) { h = (h ^ p.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)) &* 0x100_0000_01B3 }
        return h
    }

    static func fill(_ p: UnsafeMutableRawPointer, block: Int, version: UInt32) {
        for i in 4..<(blockBytes / 8) { p.storeBytes(of: payloadWord(block, version, i), toByteOffset: i * 8, as: UInt64.self) }
        p.storeBytes(of: magic, toByteOffset: 0, as: UInt64.self)
        p.storeBytes(of: UInt64(block), toByteOffset: 8, as: UInt64.self)
        p.storeBytes(of: UInt64(version), toByteOffset: 16, as: UInt64.self)
        p.storeBytes(of: checksum(p), toByteOffset: 24, as: UInt64.self)
    }

    /// nil when the block holds exactly what version `version` of `block` wrote (all
    /// zeros for version 0, never written).
    static func verify(_ p: UnsafeRawPointer, block: Int, version: UInt32) -> String? {
        if version == 0 {
            for i in 0..<(blockBytes / 8) where p.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self) != 0 {
                return "expected a never-written (zero) block, found data"
            }
            return nil
        }
        let m = p.loadUnaligned(fromByteOffset: 0, as: UInt64.self)
        let b = p.loadUnaligned(fromByteOffset: 8, as: UInt64.self)
        let v = p.loadUnaligned(fromByteOffset: 16, as: UInt64.self)
        let c = p.loadUnaligned(fromByteOffset: 24, as: UInt64.self)
        guard m == magic else { return "no block header (expected version \(version))" }
        guard b == UInt64(block) else { return "holds block \(b)'s data" }
        guard v == UInt64(version) else { return "holds version \(v), last acknowledged write was version \(version)" }
        guard c == checksum(p) else { return "checksum mismatch (torn write?)" }
        for i in 4..<(blockBytes / 8) where p.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self) != payloadWord(block, version, i) {
            return "payload differs at byte \(i * 8)"
        }
        return nil
    }
}

/// An administrative connection to the manager: status and fault injection.
public struct AdminConnection: ~Copyable {
    let socket: UnixSocket
    /// How long a request waits for the manager's answer before it fails: a stuck
    /// manager is an error, not a hang. After a timeout the connection is shut down (a
    /// late answer must not be taken for the next request's), and later requests fail.
    public let timeoutMilliseconds: Int

    public init(socketPath: String, timeoutMilliseconds: Int = 30_000) throws(SessionError) {
        guard timeoutMilliseconds > 0 else { throw .invalidRequest("admin timeout must be positive, not \(timeoutMilliseconds) ms") }
        do { socket = try UnixSocket.connect(path: socketPath) } catch {
            throw .failed("cannot connect to \(socketPath): \(error)")
        }
        self.timeoutMilliseconds = timeoutMilliseconds
    }

    /// The manager's status report (JSON).
    public func status() throws(SessionError) -> String {
        try request(.statusRequest, limit: ControlProtocol.maxReportBytes) { m throws(SessionError) in
            guard case .statusReport(let json) = m else { throw .protocolError("unexpected \(m.type)") }
            return json
        }
    }

    /// Injects a fault into the driver of `device`; returns the generation it hit.
    public func injectFault(device: String, _ fault: FaultKind, argument: UInt64 = 0) throws(SessionError) -> (generation: UInt64, pid: Int32) {
        try request(.injectFault(device: device, fault: fault, argument: argument), limit: ControlProtocol.maxMessageBytes) { m throws(SessionError) in
            guard case .faultInjected(let g, let pid) = m else { throw .protocolError("unexpected \(m.type)") }
            return (g, pid)
        }
    }

    func request<T>(_ m: ControlMessage, limit: Int, _ decode: (ControlMessage) throws(SessionError) -> T) throws(SessionError) -> T {
        do { try socket.send(m) } catch { throw SessionLink.refusalWaiting(on: socket) ?? .system(error) }
        let answered: Bool
        do { answered = try socket.waitReadable(timeoutMilliseconds: timeoutMilliseconds) } catch { throw .system(error) }
        guard answered else {
            try? socket.shutdown()
            throw .failed("manager did not answer within \(timeoutMilliseconds) ms")
        }
        let d: ControlDelivery
        do { d = try socket.receiveControl(limit: limit) } catch { throw .failed("manager: \(error)") }
        if case .failure(let code, let message) = d.message { throw .refused(code, message) }
        return try decode(d.message)
    }
}
