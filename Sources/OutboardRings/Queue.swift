import Synchronization

// Single-producer/single-consumer queue endpoints over shared memory.
//
// Model: swift-system's IORing (indices as `Atomic<UInt32>` over mapped memory, the peer's
// index loaded with acquire, our own stored with release and cached privately) and
// sDDF's queues (free-running indices, consumer_signalled protocol).
//
// Trust: everything in the shared memory may be written at any moment by a hostile peer.
// So (1) our own index lives in private memory and is only *published* to shared memory,
// never read back; (2) the peer's index is range-checked against ours and the capacity
// before it is used; (3) a descriptor is copied out of its slot once, and the copy is
// validated and handed on, so the peer cannot change it after the check (no double fetch);
// (4) the capacity and the data region's bounds come from our private parameters.
// Violations put the endpoint into a sticky error state; nothing is read or written
// outside the queue's slots, nothing traps, nothing loops on peer-controlled counts.

/// An endpoint's sticky error state, kept as plain bits: what went wrong and the values
/// that showed it. The `QueueError` (which may carry a String) is only built when asked
/// for. Being trivial matters on the hot path: recording a failure needs no out-of-line
/// call, copy or destroy, and the optimizer makes much shorter code around each batch
/// (callgrind: the producer at batch 1 from 165 to 143 instructions per descriptor,
/// against an out-of-line mutating `record(_ error: QueueError)`).
@usableFromInline @frozen
struct QueueFailure<Entry: QueueEntry>: BitwiseCopyable {
    @usableFromInline @frozen enum Kind: UInt8, BitwiseCopyable { case none, peerIndex, entry }
    @usableFromInline var kind = Kind.none
    @usableFromInline var peer: UInt32 = 0
    @usableFromInline var own: UInt32 = 0
    /// The copy of the entry that was refused (`.entry`).
    @usableFromInline var entry: Entry? = nil

    @usableFromInline init() {}

    @inlinable var failed: Bool { kind != .none }

    @inlinable
    static func peerIndex(_ peer: UInt32, own: UInt32) -> QueueFailure {
        var f = QueueFailure()
        f.kind = .peerIndex
        f.peer = peer
        f.own = own
        return f
    }

    @inlinable
    static func refused(_ entry: Entry) -> QueueFailure {
        var f = QueueFailure()
        f.kind = .entry
        f.entry = entry
        return f
    }

    /// The error for a queue of `capacity` entries whose consumer checks within `bounds`.
    func error(capacity: UInt32, bounds: Entry.Bounds?) -> QueueError? {
        switch kind {
        case .none: return nil
        case .peerIndex: return .peerIndexOutOfRange(peer: peer, own: own, capacity: Int(capacity))
        case .entry:
            guard let entry, let bounds else { return nil }
            return Entry.rejection(entry, within: bounds)
        }
    }
}

extension QueueEntry {
    /// Reads one slot once, as 8-byte words with relaxed atomic loads, which the compiler
    /// may neither repeat nor put off: the copy that is validated is the copy that is
    /// used, by construction and not by the optimizer's choice (a plain load of the struct
    /// may legally be re-read from shared memory after the check). Words may come from
    /// different moments of a racing peer's writes; that only makes a garbled entry, which
    /// the check sees like any other. The slot must be 8-aligned and the entry a whole
    /// number of words (QueueLayout.supports; checked here too, for direct callers).
    @inlinable @inline(__always)
    public static func fetchOnce(_ slot: UnsafePointer<Self>) -> Self {
        precondition(QueueLayout.supports(Self.self), "queue entries must be whole 8-byte words")
        return fetchWords(slot)
    }
}

@inlinable @inline(__always)
func fetchWords<Entry: QueueEntry>(_ slot: UnsafePointer<Entry>) -> Entry {
    let w = UnsafeRawPointer(slot).assumingMemoryBound(to: Atomic<UInt64>.self)
    switch MemoryLayout<Entry>.size {
    case 16:
        return unsafeBitCast((w[0].load(ordering: .relaxed), w[1].load(ordering: .relaxed)), to: Entry.self)
    case 32:
        return unsafeBitCast((w[0].load(ordering: .relaxed), w[1].load(ordering: .relaxed),
                              w[2].load(ordering: .relaxed), w[3].load(ordering: .relaxed)), to: Entry.self)
    default:
        // SAFETY: Entry is exactly `words` 8-byte words, and every bit pattern is a valid
        // value (QueueEntry's contract), so the bytes written here make a valid value to
        // load; the buffer has the entry's own alignment.
        let words = MemoryLayout<Entry>.size / 8
        return withUnsafeTemporaryAllocation(byteCount: words * 8, alignment: max(8, MemoryLayout<Entry>.alignment)) { buf in
            for i in 0..<words {
                buf.storeBytes(of: w[i].load(ordering: .relaxed), toByteOffset: i * 8, as: UInt64.self)
            }
            return buf.baseAddress!.load(as: Entry.self)
        }
    }
}

@usableFromInline
struct QueueWords<Entry: QueueEntry> {
    @usableFromInline let tail: UnsafeMutablePointer<Atomic<UInt32>>
    @usableFromInline let head: UnsafeMutablePointer<Atomic<UInt32>>
    @usableFromInline let signal: UnsafeMutablePointer<Atomic<UInt32>>
    @usableFromInline let entries: UnsafeMutablePointer<Entry>

    init(_ base: UnsafeMutableRawPointer) {
        // SAFETY: the layout check in the endpoint initializers guarantees these lie inside
        // the mapping; each word is 4-byte aligned (64-aligned base + multiple of 64), and
        // Atomic<UInt32> has the size and alignment of UInt32.
        tail = (base + QueueLayout.tailOffset).assumingMemoryBound(to: Atomic<UInt32>.self)
        head = (base + QueueLayout.headOffset).assumingMemoryBound(to: Atomic<UInt32>.self)
        signal = (base + QueueLayout.signalOffset).assumingMemoryBound(to: Atomic<UInt32>.self)
        entries = (base + QueueLayout.entriesOffset).assumingMemoryBound(to: Entry.self)
    }
}

/// The producing end of a queue: enqueues descriptors, and tells its owner when the
/// consumer asked to be woken.
///
/// The endpoint does not own the memory: the mapping must outlive it.
@frozen
public struct QueueProducer<Entry: QueueEntry>: ~Copyable {
    @usableFromInline let words: QueueWords<Entry>
    @usableFromInline let mask: UInt32
    @usableFromInline let capacity: UInt32
    /// Our index: the next slot to fill. Authoritative copy; shared memory only gets copies.
    @usableFromInline var tail: UInt32 = 0
    /// Last head read from the consumer, validated.
    @usableFromInline var headCache: UInt32 = 0
    @usableFromInline var failure = QueueFailure<Entry>()
    /// Set once, never cleared.
    public var error: QueueError? { failure.error(capacity: capacity, bounds: nil) }
    /// True once the endpoint is in its error state (cheap: no copy of the details).
    @inlinable public var hasFailed: Bool { failure.failed }

    /// The producer of the queue at `offset` in `memory` (`size` bytes mapped), starting at
    /// `startIndex`, the index the queue was initialized with (QueueLayout.initialize).
    public init(memory: UnsafeMutableRawPointer, size: Int, at offset: Int, layout: QueueLayout,
                startIndex: UInt32 = 0) throws(QueueError) {
        try layout.checkFits(size: size, at: offset, entry: Entry.self)
        tail = startIndex
        headCache = startIndex
        words = QueueWords(memory + offset)
        capacity = UInt32(layout.capacity)
        mask = capacity - 1
    }

    /// Descriptors that can be enqueued now (refreshes the consumer's head).
    @inlinable
    public mutating func freeSlots() -> Int {
        refreshHead()
        return !failure.failed ? Int(capacity &- (tail &- headCache)) : 0
    }

    /// Enqueues as many of `batch` as fit, in order, and publishes them with one release
    /// store. Returns how many were enqueued (0 when full or in the error state).
    /// Always inlined: without it the optimizer leaves a call per batch on the hot path
    /// (seen with callgrind, scripts/ring-instructions.sh).
    @inlinable @inline(__always)
    public mutating func enqueue(_ batch: UnsafeBufferPointer<Entry>) -> Int {
        guard !failure.failed else { return 0 }
        var space = capacity &- (tail &- headCache)
        if space < UInt32(truncatingIfNeeded: batch.count) {
            refreshHead()
            if failure.failed { return 0 }
            space = capacity &- (tail &- headCache)
        }
        let n = min(Int(space), batch.count)
        let t = tail
        var i = 0
        while i < n {  // not `for i in 0..<n`: the range would check n >= 0 every batch
            words.entries[Int((t &+ UInt32(truncatingIfNeeded: i)) & mask)] = batch[i]
            i &+= 1
        }
        publish(t &+ UInt32(truncatingIfNeeded: n))
        return n
    }

    /// Enqueues one descriptor; false when full or in the error state.
    @inlinable
    public mutating func enqueue(_ d: Entry) -> Bool {
        guard !failure.failed else { return false }
        if capacity &- (tail &- headCache) == 0 {
            refreshHead()
            if failure.failed || capacity &- (tail &- headCache) == 0 { return false }
        }
        words.entries[Int(tail & mask)] = d
        publish(tail &+ 1)
        return true
    }

    @inlinable
    mutating func publish(_ t: UInt32) {
        tail = t
        // Release: the descriptors written above become visible before the new tail.
        // Pairs with the acquiring load of `tail` in QueueConsumer.refreshTail().
        words.tail.pointee.store(t, ordering: .releasing)
    }

    @inlinable
    mutating func refreshHead() {
        // Acquire: the consumer has finished copying the slots it released before we
        // overwrite them. Pairs with the releasing store of `head` in QueueConsumer.dequeue.
        let h = words.head.pointee.load(ordering: .acquiring)
        // The consumer's head only moves forward, and never past our tail:
        // headCache <= h <= tail (modulo 2^32).
        guard h &- headCache <= tail &- headCache else {
            failure = .peerIndex(h, own: tail)
            return
        }
        headCache = h
    }

    /// Call after enqueueing: true when the consumer asked to be woken, in which case the
    /// caller must ring the consumer's doorbell. Clears the request, so each request is
    /// answered by one doorbell.
    ///
    /// The full fence orders our tail store before the load of the request flag; the
    /// consumer's fence in `QueueConsumer.prepareToSleep()` orders its flag store before
    /// its reload of tail. Of two processes that each store then load, at least one sees
    /// the other's store (Dekker): either the consumer sees the new descriptors and does
    /// not sleep, or we see its request and ring. Without the fences both can miss, and
    /// the consumer sleeps on a non-empty queue: the lost wake-up.
    @inlinable
    public mutating func consumerWantsSignal() -> Bool {
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        // Pairs with the sequentially consistent fence in QueueConsumer.prepareToSleep().
        guard words.signal.pointee.load(ordering: .relaxed) != 0 else { return false }
        return words.signal.pointee.exchange(0, ordering: .relaxed) != 0
    }
}

/// The consuming end of a queue: dequeues descriptors, validated against the data
/// region's bounds, and asks for a doorbell before sleeping.
///
/// The endpoint does not own the memory: the mapping must outlive it.
@frozen
public struct QueueConsumer<Entry: QueueEntry>: ~Copyable {
    @usableFromInline let words: QueueWords<Entry>
    @usableFromInline let mask: UInt32
    @usableFromInline let capacity: UInt32
    public let bounds: Entry.Bounds
    /// Our index: the next slot to read. Authoritative copy.
    @usableFromInline var head: UInt32 = 0
    /// Last tail read from the producer, validated.
    @usableFromInline var tailCache: UInt32 = 0
    @usableFromInline var failure = QueueFailure<Entry>()
    /// Set once, never cleared.
    public var error: QueueError? { failure.error(capacity: capacity, bounds: bounds) }
    /// True once the endpoint is in its error state (cheap: no copy of the details).
    @inlinable public var hasFailed: Bool { failure.failed }

    /// The consumer of the queue at `offset` in `memory`; every descriptor it hands on
    /// lies inside `bounds`. Starts at `startIndex`, the index the queue was initialized with.
    public init(memory: UnsafeMutableRawPointer, size: Int, at offset: Int, layout: QueueLayout,
                bounds: Entry.Bounds, startIndex: UInt32 = 0) throws(QueueError) {
        try layout.checkFits(size: size, at: offset, entry: Entry.self)
        head = startIndex
        tailCache = startIndex
        words = QueueWords(memory + offset)
        capacity = UInt32(layout.capacity)
        mask = capacity - 1
        self.bounds = bounds
    }

    /// Copies up to `out.count` descriptors out of the queue, validating each copy, and
    /// releases their slots with one store. Returns how many were dequeued. A descriptor
    /// outside `bounds` stops the queue: the ones before it are returned, it stays unread.
    /// Always inlined, like enqueue: the optimizer otherwise leaves a call per batch.
    @inlinable @inline(__always)
    public mutating func dequeue(into out: UnsafeMutableBufferPointer<Entry>) -> Int {
        guard !failure.failed else { return 0 }
        var available = tailCache &- head
        if available == 0 {
            refreshTail()
            available = tailCache &- head
            if available == 0 { return 0 }
        }
        let n = min(Int(available), out.count)
        var h = head
        var i = 0
        while i < n {
            // One copy out of shared memory; only the copy is checked and used.
            let d = Entry.fetchOnce(words.entries + Int(h & mask))
            guard Entry.admits(d, within: bounds) else {
                failure = .refused(d)
                break
            }
            out[i] = d
            h &+= 1
            i += 1
        }
        if i > 0 {
            head = h
            // Release: our copies of the slots are complete before the producer may reuse
            // them. Pairs with the acquiring load of `head` in QueueProducer.refreshHead().
            words.head.pointee.store(h, ordering: .releasing)
        }
        return i
    }

    /// Dequeues one descriptor, or nil when empty or in the error state.
    @inlinable
    public mutating func dequeue() -> Entry? {
        // SAFETY: Entry is BitwiseCopyable, so the uninitialized slot is valid storage; it
        // is only read back after dequeue(into:) has written it.
        return withUnsafeTemporaryAllocation(of: Entry.self, capacity: 1) { buf in
            dequeue(into: buf) == 1 ? buf[0] : nil
        }
    }

    /// True when nothing is waiting (refreshes the producer's tail if needed).
    @inlinable
    public mutating func isEmpty() -> Bool {
        if tailCache != head { return false }
        refreshTail()
        return tailCache == head
    }

    @inlinable
    mutating func refreshTail() {
        // Acquire: the descriptors the producer wrote before publishing this tail are
        // visible. Pairs with the releasing store of `tail` in QueueProducer.publish(_:).
        let t = words.tail.pointee.load(ordering: .acquiring)
        // The producer's tail only moves forward, and never more than `capacity` ahead of
        // our head: tailCache - head <= t - head <= capacity (modulo 2^32).
        let ahead = t &- head
        guard ahead <= capacity, ahead >= tailCache &- head else {
            failure = .peerIndex(t, own: head)
            return
        }
        tailCache = t
    }

    /// Asks the producer for a doorbell and checks once more for work. Returns true when
    /// the queue is still empty: the caller may now sleep on its doorbell, and the producer
    /// will ring it after its next enqueue. Returns false when work arrived (the request is
    /// withdrawn): dequeue instead of sleeping. See QueueProducer.consumerWantsSignal() for
    /// the race this double check closes.
    @inlinable
    public mutating func prepareToSleep() -> Bool {
        guard !failure.failed else { return false }
        words.signal.pointee.store(1, ordering: .relaxed)
        // Pairs with the sequentially consistent fence in QueueProducer.consumerWantsSignal():
        // our flag store is globally visible before we reload the producer's tail.
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        if isEmpty() && !failure.failed { return true }
        cancelSignal()
        return false
    }

    /// Withdraws a request for a doorbell (after waking, or when work arrived).
    @inlinable
    public mutating func cancelSignal() {
        words.signal.pointee.store(0, ordering: .relaxed)
    }
}
