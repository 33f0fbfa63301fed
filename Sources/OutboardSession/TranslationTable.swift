import OutboardRings
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The translation table of one driver: for each registered buffer region, its IO address
/// (where the device sees it), length, lease and state. The manager writes it; the driver
/// maps it read-only (F_SEAL_FUTURE_WRITE) and translates (region, offset) -> IO address
/// without a system call. The in-use marks the driver may write live elsewhere (DriverPage).
///
/// ```
/// header (64 bytes)
///   +0  magic            UInt32  "OBTT"
///   +4  capacity         UInt32  entries
///   +8  generation       UInt64  driver generation this table serves
///   +16 abortGeneration  UInt64  fault injection: the driver of that generation calls
///                                abort() inside its next request
///   +24 strayDMARequests UInt64  fault injection, a count: each time it grows, the
///                                driver points a descriptor of its next device request
///                                at strayDMAAddress (the IOMMU must stop it)
///   +32 badRingRequests  UInt64  fault injection, a count: each time it grows, the driver
///                                puts a head naming no descriptor in its device queue's
///                                available ring (the device must refuse it)
///   +40 strayDMAAddress  UInt64  where the next stray descriptor points (0: the driver's
///                                own choice, which no grant covers; the manager writes no
///                                address a grant covers)
/// entries at +64, 64 bytes each
///   +0  seq        UInt32  seqlock: odd while the manager rewrites the entry
///   +4  state      UInt32  EntryState
///   +8  sessionID  UInt64
///   +16 ioAddress  UInt64
///   +24 length     UInt64
///   +32 leaseEnd   UInt64  CLOCK_MONOTONIC ns: the manager keeps the mapping at least until then
///   +40 writable   UInt32
/// ```
/// A lease is what the manager guarantees: while `now < leaseEnd` and the entry is active,
/// the region stays mapped for the device. The manager renews leases of live sessions.
/// To revoke, it marks the entry revoking, then waits until the driver's in-use mark for
/// the entry clears or the lease ends, whichever comes first, and only then frees it.
public struct TranslationTable: @unchecked Sendable {
    public static let magic: UInt32 = 0x5454_424F  // "OBTT"
    public static let headerSize = 64
    public static let entrySize = 64
    public static func byteCount(capacity: Int) -> Int { headerSize + entrySize * capacity }

    public enum EntryState: UInt32, Sendable {
        case free = 0
        case active = 1
        case revoking = 2
    }

    public struct Entry: Equatable, Sendable {
        public var state: EntryState
        public var sessionID: UInt64
        /// Where the device sees the region's first byte.
        public var ioAddress: IOAddress
        public var length: UInt64
        public var leaseEnd: UInt64
        public var writable: Bool
        /// A free entry (all zero).
        public static let free = Entry(state: .free, sessionID: 0, ioAddress: IOAddress(rawValue: 0), length: 0, leaseEnd: 0,
                                       writable: false)
        public init(state: EntryState, sessionID: UInt64, ioAddress: IOAddress, length: UInt64, leaseEnd: UInt64, writable: Bool) {
            self.state = state; self.sessionID = sessionID; self.ioAddress = ioAddress
            self.length = length; self.leaseEnd = leaseEnd; self.writable = writable
        }
    }

    let base: UnsafeMutableRawPointer
    /// From our own parameters, never from the shared header.
    public let capacity: Int

    public init(_ base: UnsafeMutableRawPointer, capacity: Int) {
        self.base = base
        self.capacity = capacity
    }

    func u32(_ offset: Int) -> UnsafeMutablePointer<Atomic<UInt32>> { (base + offset).assumingMemoryBound(to: Atomic<UInt32>.self) }
    func u64(_ offset: Int) -> UnsafeMutablePointer<Atomic<UInt64>> { (base + offset).assumingMemoryBound(to: Atomic<UInt64>.self) }

    // MARK: manager side

    /// Writes the header. Manager only, before the driver sees the table.
    public func format(generation: UInt64) {
        base.initializeMemory(as: UInt8.self, repeating: 0, count: Self.byteCount(capacity: capacity))
        u32(0).pointee.store(Self.magic, ordering: .relaxed)
        u32(4).pointee.store(UInt32(capacity), ordering: .relaxed)
        setGeneration(generation)
    }

    public func setGeneration(_ g: UInt64) { u64(8).pointee.store(g, ordering: .releasing) }
    public func requestAbort(generation: UInt64) { u64(16).pointee.store(generation, ordering: .releasing) }
    /// Faults that leave the driver running count up: a driver acts once per increment it
    /// sees after its start, never on requests made before it.
    public func requestStrayDMA(at address: IOAddress) {
        u64(40).pointee.store(address.rawValue, ordering: .relaxed)
        // Release: the address is visible before the count that says to use it.
        u64(24).pointee.store(strayDMARequests &+ 1, ordering: .releasing)
    }
    public func requestBadRing() { u64(32).pointee.store(badRingRequests &+ 1, ordering: .releasing) }

    /// Rewrites entry `index` under its seqlock. Manager only (single writer).
    public func write(_ index: Int, _ e: Entry) {
        precondition(index >= 0 && index < capacity)
        let at = Self.headerSize + index * Self.entrySize
        let seq = u32(at)
        let s = seq.pointee.load(ordering: .relaxed)
        seq.pointee.store(s &+ 1, ordering: .relaxed)
        atomicMemoryFence(ordering: .releasing)
        u32(at + 4).pointee.store(e.state.rawValue, ordering: .relaxed)
        u64(at + 8).pointee.store(e.sessionID, ordering: .relaxed)
        u64(at + 16).pointee.store(e.ioAddress.rawValue, ordering: .relaxed)
        u64(at + 24).pointee.store(e.length, ordering: .relaxed)
        u64(at + 32).pointee.store(e.leaseEnd, ordering: .relaxed)
        u32(at + 40).pointee.store(e.writable ? 1 : 0, ordering: .relaxed)
        seq.pointee.store(s &+ 2, ordering: .releasing)
        // Revocation relies on this store being visible before the manager reads the
        // driver's in-use mark (see DriverPage.markInUse).
        atomicMemoryFence(ordering: .sequentiallyConsistent)
    }

    // MARK: driver side

    // Acquire: pair with the releasing stores in setGeneration and the request* calls.
    public var generation: UInt64 { u64(8).pointee.load(ordering: .acquiring) }
    public var abortGeneration: UInt64 { u64(16).pointee.load(ordering: .acquiring) }
    public var strayDMARequests: UInt64 { u64(24).pointee.load(ordering: .acquiring) }
    public var badRingRequests: UInt64 { u64(32).pointee.load(ordering: .acquiring) }
    /// Read after `strayDMARequests` (whose acquire makes it current).
    public var strayDMAAddress: IOAddress { IOAddress(rawValue: u64(40).pointee.load(ordering: .relaxed)) }

    /// A consistent copy of entry `index`, or nil if it is out of range, being rewritten
    /// (after a few tries), or carries an unknown state.
    public func read(_ index: Int) -> Entry? {
        guard index >= 0, index < capacity else { return nil }
        let at = Self.headerSize + index * Self.entrySize
        for _ in 0..<8 {
            // Seqlock read. Acquire: pairs with the releasing store of the even sequence
            // that ends write(_:_:), so the fields loaded below are at least that write's.
            let s1 = u32(at).pointee.load(ordering: .acquiring)
            if s1 & 1 != 0 { continue }
            let state = u32(at + 4).pointee.load(ordering: .relaxed)
            let sessionID = u64(at + 8).pointee.load(ordering: .relaxed)
            let io = u64(at + 16).pointee.load(ordering: .relaxed)
            let length = u64(at + 24).pointee.load(ordering: .relaxed)
            let lease = u64(at + 32).pointee.load(ordering: .relaxed)
            let writable = u32(at + 40).pointee.load(ordering: .relaxed)
            atomicMemoryFence(ordering: .acquiring)
            guard u32(at).pointee.load(ordering: .relaxed) == s1 else { continue }
            guard let st = EntryState(rawValue: state) else { return nil }
            return Entry(state: st, sessionID: sessionID, ioAddress: IOAddress(rawValue: io), length: length, leaseEnd: lease, writable: writable != 0)
        }
        return nil
    }

    /// As `read`, but a busy seqlock is retried (yielding the CPU) for longer: the manager
    /// rewrites entries rarely and briefly, so a busy one means it was preempted mid-write,
    /// and a live region must not be reported revoked for that. nil only if the entry
    /// stays unreadable or is invalid.
    public func readPatiently(_ index: Int) -> Entry? {
        for _ in 0..<1000 {
            if let e = read(index) { return e }
            sched_yield()
        }
        return nil
    }
}

extension TranslationTable.Entry {
    /// Driver-side check for one transfer: the entry is the session's, active, its lease
    /// running, and `[offset, offset + length)` inside it. Returns the IO address of
    /// `offset`.
    @inlinable
    public func translate(sessionID: UInt64, offset: RegionOffset, length: UInt64, write: Bool, now: UInt64) -> IOAddress? {
        guard state == .active, self.sessionID == sessionID, now < leaseEnd,
              offset.rawValue <= self.length, length <= self.length &- offset.rawValue,
              !write || writable else { return nil }
        return ioAddress.advanced(by: offset)
    }
}
