import COrdering
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
    @usableFromInline let producerBarrier: UnsafeMutablePointer<Atomic<UInt32>>
    @usableFromInline let head: UnsafeMutablePointer<Atomic<UInt32>>
    @usableFromInline let signal: UnsafeMutablePointer<Atomic<UInt32>>
    @usableFromInline let signalOrdering: UnsafeMutablePointer<Atomic<UInt32>>
    @usableFromInline let wakeIndex: UnsafeMutablePointer<Atomic<UInt32>>
    @usableFromInline let entries: UnsafeMutablePointer<Entry>

    init(_ base: UnsafeMutableRawPointer) {
        // SAFETY: the layout check in the endpoint initializers guarantees these lie inside
        // the mapping; each word is 4-byte aligned (64-aligned base + multiple of 64), and
        // Atomic<UInt32> has the size and alignment of UInt32.
        tail = (base + QueueLayout.tailOffset).assumingMemoryBound(to: Atomic<UInt32>.self)
        producerBarrier = (base + QueueLayout.producerBarrierOffset).assumingMemoryBound(to: Atomic<UInt32>.self)
        head = (base + QueueLayout.headOffset).assumingMemoryBound(to: Atomic<UInt32>.self)
        signal = (base + QueueLayout.signalOffset).assumingMemoryBound(to: Atomic<UInt32>.self)
        signalOrdering = (base + QueueLayout.signalOrderingOffset).assumingMemoryBound(to: Atomic<UInt32>.self)
        wakeIndex = (base + QueueLayout.wakeIndexOffset).assumingMemoryBound(to: Atomic<UInt32>.self)
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
    /// Our process is registered for the consumer's heavy barrier (see consumerWantsSignal).
    @usableFromInline let registeredForHeavyBarrier: Bool
    @usableFromInline var failure = QueueFailure<Entry>()
    /// Set once, never cleared.
    public var error: QueueError? { failure.error(capacity: capacity, bounds: nil) }
    /// Our index: entries enqueued since the start, plus `startIndex`, modulo 2^32. Private
    /// state, never read from shared memory.
    @inlinable public var index: UInt32 { tail }
    /// True once the endpoint is in its error state (cheap: no copy of the details).
    @inlinable public var hasFailed: Bool { failure.failed }

    /// The producer of the queue at `offset` in `memory` (`size` bytes mapped), starting at
    /// `startIndex`, the index the queue was initialized with (QueueLayout.initialize).
    ///
    /// `registeredForHeavyBarrier`: this process has registered for membarrier(2)
    /// `MEMBARRIER_CMD_GLOBAL_EXPEDITED` (OutboardSystem's `Membarrier.register()`), so a
    /// consumer that sleeps rarely may take the whole cost of the wake-up check and spare
    /// us a fence per batch. It is published to the consumer in the queue.
    public init(memory: UnsafeMutableRawPointer, size: Int, at offset: Int, layout: QueueLayout,
                startIndex: UInt32 = 0, registeredForHeavyBarrier: Bool = false) throws(QueueError) {
        try layout.checkFits(size: size, at: offset, entry: Entry.self)
        tail = startIndex
        headCache = startIndex
        words = QueueWords(memory + offset)
        capacity = UInt32(layout.capacity)
        mask = capacity - 1
        self.registeredForHeavyBarrier = registeredForHeavyBarrier
        words.producerBarrier.pointee.store(registeredForHeavyBarrier ? 1 : 0, ordering: .relaxed)
    }

    /// Descriptors that can be enqueued now (refreshes the consumer's head); 0 once the
    /// endpoint has failed, without reading the peer's index again (the error recorded
    /// first stays the one reported).
    @inlinable
    public mutating func freeSlots() -> Int {
        guard !failure.failed else { return 0 }
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

    /// Call after enqueueing: true when the consumer asked to be woken and our tail has
    /// reached the wake index it asked with (QueueConsumer.requestSignal(wakeAfter:)), in
    /// which case the caller must ring the consumer's doorbell. Clears the request, so each
    /// request is answered by one doorbell. A request whose wake index is not reached yet
    /// stands: a later enqueue that reaches it answers it, or, at the latest,
    /// consumerWantsSignalBeforeIdle(), which the caller must call before it stops
    /// producing for now.
    ///
    /// The wake-up check is a store-then-load on each side: we store the tail and load the
    /// request flag; the consumer, before it sleeps, stores the flag and loads the tail. Of
    /// two such sides, at least one must see the other's store (Dekker): either the consumer
    /// sees the new descriptors and does not sleep, or we see its request and ring. Without
    /// a barrier between each side's store and load, both can miss, and the consumer sleeps
    /// on a non-empty queue: the lost wake-up. The barrier comes in one of two forms, chosen
    /// by the consumer (QueueConsumer.requestSignal) and published in `signalOrdering`:
    ///
    /// - Fence (the default): a full fence here, paired with the consumer's full fence in
    ///   requestSignal. It costs us a fence per batch, which waits until the batch's stores
    ///   have left for the other core.
    /// - Asymmetric: only program order here (a compiler barrier, no instruction), paired
    ///   with the consumer's heavy barrier, membarrier(2) GLOBAL_EXPEDITED, which makes every
    ///   running thread of our (registered) process execute a full barrier at some point P
    ///   before it returns. If our tail store comes before P, it is visible when the
    ///   consumer reloads the tail; if it comes after P, so do our loads, which then see the
    ///   consumer's flag. The consumer chooses this when it sleeps rarely, so the cost moves
    ///   from every batch to every (rare) sleep. We honour it only if our process registered
    ///   (a consumer that claims it otherwise would lose only its own wake-ups).
    ///
    /// The consumer drops the asymmetric ordering with a heavy barrier (requestSignal), after
    /// which any load of `signalOrdering` here sees the fence ordering; the old value can
    /// only be seen by a batch whose tail store preceded that barrier (the compiler barrier
    /// keeps the tail store before the load of `signalOrdering` too) and is therefore
    /// visible to the consumer. It takes it up without a barrier (QueueConsumer.dequeue):
    /// from then on each of its sleeps runs the heavy barrier, which covers us in either
    /// ordering.
    @inlinable
    public mutating func consumerWantsSignal() -> Bool {
        // Program order: the tail store (publish) stays before both loads below. Pairs with
        // the consumer's heavy barrier in QueueConsumer.requestSignal (asymmetric ordering);
        // without it the compiler could move the load of `signalOrdering` above the tail
        // store, and a batch could skip its fence on an old value after that barrier.
        ob_compiler_barrier()
        if !registeredForHeavyBarrier || words.signalOrdering.pointee.load(ordering: .relaxed) != 1 {
            // Pairs with the sequentially consistent fence in QueueConsumer.requestSignal.
            atomicMemoryFence(ordering: .sequentiallyConsistent)
        }
        guard words.signal.pointee.load(ordering: .relaxed) != 0 else { return false }
        return Self.answerIfWakeIndexReached(signal: words.signal, wakeIndex: words.wakeIndex, tail: tail)
    }

    /// The consumer asked: answer if our tail has reached its wake index. Off the inlined
    /// path, which sees only the load of the request word (nearly always 0 while the
    /// consumer is busy). Static, with the words and the tail as arguments: a method would
    /// take the endpoint's address, and keep the caller from holding it in registers
    /// across its loop (callgrind: 6 to 13 instructions per descriptor at batch 1).
    @usableFromInline @inline(never)
    static func answerIfWakeIndexReached(signal: UnsafeMutablePointer<Atomic<UInt32>>,
                                         wakeIndex: UnsafeMutablePointer<Atomic<UInt32>>, tail: UInt32) -> Bool {
        // Acquire, as a fence after the relaxed load of `signal` in consumerWantsSignal: the
        // wake index stored before the request we saw is visible (a later one may be, too:
        // that of a newer request, which is the one standing). Pairs with the releasing
        // store of `signal` in QueueConsumer.requestSignal(wakeAfter:).
        atomicMemoryFence(ordering: .acquiring)
        let wake = wakeIndex.pointee.load(ordering: .relaxed)
        // Reached: the tail is at or past the wake index, within the half of the index space
        // that lies ahead of it (an honest consumer asks for at most 2^31 - 1 more entries
        // than its head, and our tail is never more than `capacity` ahead of that head).
        // Any value is safe: it is only compared, and a request it never lets us answer
        // here is answered before we go idle.
        guard Int32(bitPattern: tail &- wake) >= 0 else { return false }
        return signal.pointee.exchange(0, ordering: .relaxed) != 0
    }

    /// Call before going idle (before sleeping or blocking, before a pause, when done): true
    /// when the consumer asked to be woken and has not consumed everything we published, in
    /// which case the caller must ring its doorbell. Answers a request whose wake index
    /// (QueueConsumer.requestSignal(wakeAfter:)) our tail has not reached: nothing more is
    /// coming for now, so the consumer gets what there is. Clears the request, as
    /// consumerWantsSignal() does.
    ///
    /// No fence: every enqueue was followed by consumerWantsSignal(), whose barrier (fence
    /// or compiler barrier, see there) put our tail store before its load of `signal`; the
    /// loads here come after that load in program order, so (read-read coherence) see the
    /// request it saw or a newer value: our own clearing, the consumer's withdrawal (it is
    /// awake), or a newer request. See docs/rings.md, "Waking after N entries", for the
    /// whole argument.
    @inlinable
    public mutating func consumerWantsSignalBeforeIdle() -> Bool {
        guard words.signal.pointee.load(ordering: .relaxed) != 0 else { return false }
        // The consumer's head is only compared: a head equal to our tail says it has taken
        // everything (it may be awake, or asleep on an empty queue, which needs no doorbell);
        // any other value, even an impossible one, costs at most this one doorbell, as a
        // request does. A stale head (an older, smaller value) only rings needlessly.
        guard words.head.pointee.load(ordering: .relaxed) != tail else { return false }
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
    /// What we last published in `signalOrdering`: true while the producer may skip its fence.
    @usableFromInline var asymmetric = false
    /// `head` when we last asked for a signal (or last found the producer unregistered).
    @usableFromInline var headAtLastRequest: UInt32 = 0
    /// dequeue switches to the asymmetric ordering once `head - headAtLastRequest` reaches
    /// this: the threshold while the fence ordering is published, otherwise UInt32.max
    /// (one compare per batch; the switch itself is off the inlined path).
    @usableFromInline var upgradeAfter: UInt32 = .max
    @usableFromInline var threshold: UInt32 = 0
    /// requestSignal asked for the heavy barrier and confirmSleep has not confirmed it ran:
    /// the next request asks again (a barrier that failed is still owed).
    @usableFromInline var barrierOwed = false

    /// The asymmetric signal ordering (QueueProducer.consumerWantsSignal) is used while
    /// at least this many descriptors pass between our requests for a signal, that is,
    /// while we sleep rarely: the producer then skips its fence per batch, and each of our
    /// sleeps costs a heavy barrier instead (see requestSignal). 0, the default: never,
    /// for a consumer that cannot run the heavy barrier (membarrier(2), which a sandbox
    /// may refuse). A heavy barrier costs about 11 us on a 2-vCPU KVM guest (an interrupt
    /// to the producer's CPU; less on bare metal) and a producer's fence about 100 ns per
    /// batch of 32, so 4096 is about where it starts to pay. Set it before the first
    /// dequeue; set to 0 while the asymmetric ordering is published, it takes effect at the
    /// next requestSignal, which still asks for the heavy barrier once, to drop it.
    public var heavyBarrierThreshold: UInt32 {
        get { threshold }
        set {
            threshold = newValue
            headAtLastRequest = head  // count from here
            upgradeAfter = !asymmetric && newValue != 0 ? newValue : .max
        }
    }
    @usableFromInline var failure = QueueFailure<Entry>()
    /// Set once, never cleared.
    public var error: QueueError? { failure.error(capacity: capacity, bounds: bounds) }
    /// Our index: entries dequeued since the start, plus `startIndex`, modulo 2^32. Private
    /// state, never read from shared memory.
    @inlinable public var index: UInt32 { head }
    /// True once the endpoint is in its error state (cheap: no copy of the details).
    @inlinable public var hasFailed: Bool { failure.failed }

    /// The consumer of the queue at `offset` in `memory`; every descriptor it hands on
    /// lies inside `bounds`. Starts at `startIndex`, the index the queue was initialized with.
    public init(memory: UnsafeMutableRawPointer, size: Int, at offset: Int, layout: QueueLayout,
                bounds: Entry.Bounds, startIndex: UInt32 = 0) throws(QueueError) {
        try layout.checkFits(size: size, at: offset, entry: Entry.self)
        head = startIndex
        tailCache = startIndex
        headAtLastRequest = startIndex
        words = QueueWords(memory + offset)
        // Ours to write: we start with the fence ordering, and say so. (A consumer taking
        // over a live queue whose previous consumer had published the asymmetric ordering
        // would need a heavy barrier after this store; queues are not handed over so.)
        words.signalOrdering.pointee.store(0, ordering: .relaxed)
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
            if h &- headAtLastRequest >= upgradeAfter { useAsymmetricOrdering() }
        }
        return i
    }

    /// Publishes the asymmetric ordering after `heavyBarrierThreshold` descriptors without
    /// a request for a signal, if the producer registered for the heavy barrier. Needs no
    /// barrier: the producer may skip its fences from now on, and every sleep of ours runs
    /// the heavy barrier, which covers a producer in either ordering.
    @usableFromInline @inline(never)
    mutating func useAsymmetricOrdering() {
        guard !asymmetric, threshold != 0, words.producerBarrier.pointee.load(ordering: .relaxed) == 1 else {
            headAtLastRequest = head  // look again after another threshold's worth
            return
        }
        asymmetric = true
        upgradeAfter = .max
        words.signalOrdering.pointee.store(1, ordering: .relaxed)
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

    /// True when nothing can be dequeued: nothing is waiting (refreshes the producer's
    /// tail if needed), or the endpoint has failed (check `hasFailed`), so that a caller
    /// polling this before dequeue cannot spin on a descriptor that was refused. A failed
    /// endpoint does not read the peer's index again: the error recorded first stays.
    @inlinable
    public mutating func isEmpty() -> Bool {
        guard !failure.failed else { return true }
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

    /// The largest `wakeAfter` a request may carry: the producer compares its tail with the
    /// wake index within half the index space (QueueProducer.consumerWantsSignal). Anything
    /// above the capacity means "when the producer goes idle" in effect.
    public static var maximumWakeAfter: UInt32 { UInt32(Int32.max) }

    /// Asks the producer for a doorbell and checks once more for work. Returns true when
    /// the queue is still empty: the caller may now sleep on its doorbell, and the producer
    /// will ring it once `wakeAfter` entries are waiting, or earlier if it goes idle first.
    /// Returns false when work arrived (the request is withdrawn): dequeue instead of
    /// sleeping. See QueueProducer.consumerWantsSignal() for the race this double check
    /// closes. For a consumer that runs no heavy barrier (`heavyBarrierThreshold` 0); one
    /// that does uses prepareToSleep(wakeAfter:heavyBarrier:).
    @inlinable
    public mutating func prepareToSleep(wakeAfter n: UInt32 = 1) -> Bool {
        let heavy = requestSignal(wakeAfter: n)
        precondition(!heavy, "prepareToSleep() is for consumers without a heavy barrier (heavyBarrierThreshold 0)")
        return confirmSleep()
    }

    /// The sleep protocol, written once: asks for a doorbell after `wakeAfter` entries (or
    /// when the producer goes idle), runs `heavyBarrier` if the ordering of the wake-up
    /// check needs it (membarrier(2) `MEMBARRIER_CMD_GLOBAL_EXPEDITED`, which this module,
    /// having no system calls, leaves to the caller), and checks once more for work. The
    /// caller then acts on the answer:
    ///
    /// - `.sleep`: sleep on the doorbell; the producer will ring it. Call cancelSignal()
    ///   after waking, whatever woke it.
    /// - `.workArrived`: dequeue; no request stands.
    ///
    /// Both report whether the heavy barrier ran (for the caller's counts).
    /// - `.heavyBarrierFailed`: the request is withdrawn and no doorbell is guaranteed; do
    ///   not sleep on the doorbell, or only briefly (when isEmpty()). The barrier stays
    ///   owed: the next request asks for it again.
    ///
    /// A generic closure, not an existential: the call inlines.
    @inlinable
    public mutating func prepareToSleep<Failure: Error>(wakeAfter n: UInt32 = 1,
                                                        heavyBarrier: () throws(Failure) -> Void) -> SleepDecision<Failure> {
        let heavy = requestSignal(wakeAfter: n)
        if heavy {
            do { try heavyBarrier() } catch {
                cancelSignal()
                return .heavyBarrierFailed(error)
            }
        }
        return confirmSleep() ? .sleep(ranHeavyBarrier: heavy) : .workArrived(ranHeavyBarrier: heavy)
    }

    /// First half of going to sleep: asks the producer for a doorbell and orders that
    /// request before the re-check in confirmSleep(). Returns true when the caller must now
    /// run the heavy barrier, membarrier(2) `MEMBARRIER_CMD_GLOBAL_EXPEDITED`, before
    /// confirmSleep(); false when the endpoint has run a full fence itself.
    ///
    /// The heavy barrier is asked for while the asymmetric ordering is published, and when
    /// it is switched, either way: it is kept (or taken up) when at least
    /// `heavyBarrierThreshold` descriptors were dequeued since the previous request and the
    /// producer registered for it, and dropped otherwise, since frequent sleeps make the
    /// heavy barrier dearer than the producer's fences. After dropping it, any later load
    /// of the ordering by the producer sees the fence ordering (the heavy barrier put our
    /// store before it); dequeue takes it up again, without a barrier, once sleeps are
    /// rare again.
    ///
    /// If the heavy barrier cannot run, call cancelSignal() instead of confirmSleep() and do
    /// not sleep on the doorbell (at most with a short timeout): the barrier stays owed, and
    /// the next request asks for it again.
    ///
    /// `wakeAfter` (1 to maximumWakeAfter; clamped): the producer rings once that many
    /// entries are waiting, counted from our head (virtio's used_event), or when it goes
    /// idle, whichever comes first (QueueProducer.consumerWantsSignalBeforeIdle()).
    @inlinable
    public mutating func requestSignal(wakeAfter n: UInt32 = 1) -> Bool {
        guard !failure.failed else { return false }
        // The wake index first, then the request it belongs to. Release: the producer that
        // sees this request sees this wake index (or a newer one); pairs with the acquiring
        // fence in QueueProducer.answerIfWakeIndexReached().
        words.wakeIndex.pointee.store(head &+ min(max(n, 1), Self.maximumWakeAfter), ordering: .relaxed)
        words.signal.pointee.store(1, ordering: .releasing)
        if threshold == 0 && !asymmetric && !barrierOwed {
            // Pairs with the sequentially consistent fence in QueueProducer.consumerWantsSignal():
            // our flag store is globally visible before we reload the producer's tail.
            atomicMemoryFence(ordering: .sequentiallyConsistent)
            return false
        }
        return chooseOrderingBeforeSleep()
    }

    @usableFromInline
    mutating func chooseOrderingBeforeSleep() -> Bool {
        let rare = threshold != 0 && head &- headAtLastRequest >= threshold
        headAtLastRequest = head
        let wanted = rare && words.producerBarrier.pointee.load(ordering: .relaxed) == 1
        let heavy = wanted || asymmetric || barrierOwed
        barrierOwed = heavy
        if wanted != asymmetric {
            asymmetric = wanted
            words.signalOrdering.pointee.store(wanted ? 1 : 0, ordering: .relaxed)
        }
        upgradeAfter = !asymmetric && threshold != 0 ? threshold : .max
        if heavy {
            // The caller's membarrier(2) puts our stores above before its reload of the tail
            // and makes the producer execute a full barrier; pairs with the compiler barrier
            // in QueueProducer.consumerWantsSignal().
            return true
        }
        // As in requestSignal: pairs with the fence in QueueProducer.consumerWantsSignal().
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        return false
    }

    /// Second half of going to sleep, after requestSignal and, if it asked for one, a heavy
    /// barrier that ran: true when the queue is still empty and the caller may sleep; false
    /// when work arrived (the request is withdrawn) or the endpoint has failed.
    @inlinable
    public mutating func confirmSleep() -> Bool {
        barrierOwed = false
        if !failure.failed && isEmpty() && !failure.failed { return true }
        cancelSignal()
        return false
    }

    /// True while the producer may skip its per-batch fence (the consumer last chose the
    /// asymmetric ordering).
    public var usesAsymmetricOrdering: Bool { asymmetric }

    /// Withdraws a request for a doorbell (after waking, or when work arrived).
    @inlinable
    public mutating func cancelSignal() {
        words.signal.pointee.store(0, ordering: .relaxed)
    }
}

/// What a consumer about to sleep does next (QueueConsumer.prepareToSleep(wakeAfter:heavyBarrier:)).
@frozen
public enum SleepDecision<Failure: Error> {
    /// The queue is still empty and the request stands: sleep on the doorbell, then call
    /// cancelSignal(). `ranHeavyBarrier`: the heavy barrier ran for this request.
    case sleep(ranHeavyBarrier: Bool)
    /// Work arrived (or the endpoint failed; check hasFailed): dequeue, do not sleep. The
    /// request is withdrawn.
    case workArrived(ranHeavyBarrier: Bool)
    /// The heavy barrier failed: the request is withdrawn, no doorbell is guaranteed.
    case heavyBarrierFailed(Failure)
}
