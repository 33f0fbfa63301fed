import Synchronization

// Small shared pages with fixed layouts. Who writes each is stated; the other side maps
// it read-only (F_SEAL_FUTURE_WRITE) or treats what it reads as hostile.

/// State of a session, as the manager publishes it.
public enum SessionState: UInt32, Sendable, CustomStringConvertible {
    case serving = 0
    /// The driver died; the queues were replaced and a new driver is on its way.
    case recovering = 1
    /// The device failed for good (crash loop); requests will not complete.
    case failed = 2
    case closed = 3

    public var description: String {
        switch self {
        case .serving: return "serving"
        case .recovering: return "recovering"
        case .failed: return "failed"
        case .closed: return "closed"
        }
    }
}

/// One page per session, written by the manager only, mapped read-only by the client.
/// ```
/// +0  generation  UInt64  driver generation; changes when the driver was restarted
/// +8  state       UInt32  SessionState
/// ```
public struct SessionHeaderPage: @unchecked Sendable {
    public static let byteCount = 4096
    let base: UnsafeMutableRawPointer
    public init(_ base: UnsafeMutableRawPointer) { self.base = base }

    var generationWord: UnsafeMutablePointer<Atomic<UInt64>> { base.assumingMemoryBound(to: Atomic<UInt64>.self) }
    var stateWord: UnsafeMutablePointer<Atomic<UInt32>> { (base + 8).assumingMemoryBound(to: Atomic<UInt32>.self) }

    // Acquire: each pairs with the releasing stores in publish(generation:state:); the
    // state is stored before the generation, so a reader that sees a new generation and
    // then loads the state sees that state or a later one.
    public var generation: UInt64 { generationWord.pointee.load(ordering: .acquiring) }
    public var state: SessionState? { SessionState(rawValue: stateWord.pointee.load(ordering: .acquiring)) }

    /// Manager only.
    public func publish(generation: UInt64, state: SessionState) {
        stateWord.pointee.store(state.rawValue, ordering: .releasing)
        generationWord.pointee.store(generation, ordering: .releasing)
    }
}

/// The page a driver writes and the manager reads (as hostile input):
/// ```
/// +0   heartbeat   UInt64  incremented by the driver at least every heartbeat interval
/// +8   completed   UInt64  requests completed by this driver process
/// +16  kicks       UInt64  notifications the driver sent the device
/// +24  interrupts  UInt64  wake-ups on the device's notifications (one per wake-up, however many it gathered)
/// +32  signals     UInt64  completion doorbells the driver rang for its clients
/// +40  submitted   UInt64  requests the driver handed to the device
/// +64  in-use      UInt32 per translation-table entry: 1 while the driver may have I/O
///                  in flight on that entry's region (advisory; see TranslationTable)
/// ```
public struct DriverPage: @unchecked Sendable {
    public static let inUseOffset = 64
    public static func byteCount(tableCapacity: Int) -> Int { inUseOffset + 4 * tableCapacity }

    let base: UnsafeMutableRawPointer
    public let tableCapacity: Int
    public init(_ base: UnsafeMutableRawPointer, tableCapacity: Int) {
        self.base = base
        self.tableCapacity = tableCapacity
    }

    var heartbeatWord: UnsafeMutablePointer<Atomic<UInt64>> { base.assumingMemoryBound(to: Atomic<UInt64>.self) }
    var completedWord: UnsafeMutablePointer<Atomic<UInt64>> { (base + 8).assumingMemoryBound(to: Atomic<UInt64>.self) }
    func inUseWord(_ index: Int) -> UnsafeMutablePointer<Atomic<UInt32>> {
        (base + DriverPage.inUseOffset + 4 * index).assumingMemoryBound(to: Atomic<UInt32>.self)
    }

    /// Driver statistics (see the layout above), written by the driver only.
    public enum Counter: Int, Sendable { case kicks = 16, interrupts = 24, signals = 32, submitted = 40 }
    func counterWord(_ c: Counter) -> UnsafeMutablePointer<Atomic<UInt64>> {
        (base + c.rawValue).assumingMemoryBound(to: Atomic<UInt64>.self)
    }
    /// Driver: adds to a counter (a plain store: the driver is the only writer).
    @inline(__always)
    public func add(_ c: Counter, _ n: UInt64 = 1) {
        let w = counterWord(c)
        w.pointee.store(w.pointee.load(ordering: .relaxed) &+ n, ordering: .relaxed)
    }
    public func count(_ c: Counter) -> UInt64 { counterWord(c).pointee.load(ordering: .relaxed) }

    public var heartbeat: UInt64 { heartbeatWord.pointee.load(ordering: .relaxed) }
    public var completed: UInt64 { completedWord.pointee.load(ordering: .relaxed) }
    public func beat() { heartbeatWord.pointee.wrappingAdd(1, ordering: .relaxed) }
    public func addCompleted(_ n: Int) { completedWord.pointee.wrappingAdd(UInt64(n), ordering: .relaxed) }

    /// Driver: marks entry `index` in use, then (full fence) the caller re-checks the
    /// entry's state. Manager: marks it revoking, fence, then reads the mark. One of the
    /// two sees the other's store (the same Dekker argument as the queues' signal flag).
    public func markInUse(_ index: Int) {
        guard index >= 0, index < tableCapacity else { return }
        inUseWord(index).pointee.store(1, ordering: .relaxed)
        atomicMemoryFence(ordering: .sequentiallyConsistent)
    }
    public func clearInUse(_ index: Int) {
        guard index >= 0, index < tableCapacity else { return }
        inUseWord(index).pointee.store(0, ordering: .releasing)
    }
    /// Manager: any nonzero value counts as in use.
    public func isInUse(_ index: Int) -> Bool {
        guard index >= 0, index < tableCapacity else { return false }
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        // Acquire: pairs with the releasing store in clearInUse (the driver's last use of
        // the region happened before it cleared the mark); the fence above pairs with the
        // one in markInUse.
        return inUseWord(index).pointee.load(ordering: .acquiring) != 0
    }
}
