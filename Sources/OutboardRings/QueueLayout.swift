/// Where a single-producer/single-consumer queue sits in shared memory.
///
/// ```
/// +0    tail            UInt32, written by the producer only
/// +4    producerBarrier UInt32, written by the producer: 1 when its process is registered
///                       for the consumer's heavy barrier (membarrier(2) GLOBAL_EXPEDITED)
/// +64   head            UInt32, written by the consumer only
/// +128  consumerSignal  UInt32, set by the consumer ("wake me"), cleared by the producer
/// +132  signalOrdering  UInt32, written by the consumer: 1 when it pays for the wake-up
///                       check with a heavy barrier and the producer may skip its fence
/// +136  wakeIndex       UInt32, written by the consumer with each request: ring once the
///                       tail reaches it (or when going idle), like virtio's used_event
/// +192  entries         capacity x entry (BufferDescriptor: 16 bytes; other QueueEntry types: their stride)
/// ```
/// Each side writes its own 64-byte cache lines only (the signal line is written by the
/// producer only to clear a request it answers), so there is no false sharing. Indices run freely over UInt32 and wrap; a slot is
/// `index & (capacity - 1)`, so the capacity is a power of two.
///
/// The layout is derived only from `capacity`, which both sides take from their own
/// private parameters (given by the manager over a trusted socket), never from the
/// shared memory itself.
@frozen
public struct QueueLayout: Equatable, Sendable {
    public static let tailOffset = 0
    public static let producerBarrierOffset = 4
    public static let headOffset = 64
    public static let signalOffset = 128
    public static let signalOrderingOffset = 132
    public static let wakeIndexOffset = 136
    public static let entriesOffset = 192
    public static let alignment = 64
    public static let maximumCapacity = 1 << 20

    public let capacity: Int
    /// Bytes per entry: the stride of the entry type the endpoints are created with.
    public let entryStride: Int

    /// Fails unless `capacity` is a power of two in 2...2^20, and the entry's size a
    /// multiple of 8 bytes (a consumer reads a slot as 8-byte words, each once).
    public init<Entry: QueueEntry>(capacity: Int, entry: Entry.Type) throws(QueueError) {
        guard capacity >= 2, capacity <= Self.maximumCapacity, capacity & (capacity - 1) == 0 else {
            throw .invalidCapacity(capacity)
        }
        guard Self.supports(entry) else { throw .unsupportedEntry(size: MemoryLayout<Entry>.size) }
        self.capacity = capacity
        self.entryStride = MemoryLayout<Entry>.stride
    }

    /// A queue of `BufferDescriptor`s.
    public init(capacity: Int) throws(QueueError) {
        try self.init(capacity: capacity, entry: BufferDescriptor.self)
    }

    /// Bytes the queue occupies, a multiple of 64.
    public var byteCount: Int {
        let raw = Self.entriesOffset + capacity * entryStride
        return (raw + Self.alignment - 1) & ~(Self.alignment - 1)
    }

    /// Resets the queue at `offset` in `memory`: empty, both indices at `startIndex`, no
    /// signal requested. Only the creator does this, before any peer sees the region; the
    /// endpoints are then created with the same `startIndex`.
    public func initialize(memory: UnsafeMutableRawPointer, size: Int, at offset: Int,
                           startIndex: UInt32 = 0) throws(QueueError) {
        try checkFits(size: size, at: offset)
        (memory + offset).initializeMemory(as: UInt8.self, repeating: 0, count: byteCount)
        (memory + offset + Self.tailOffset).storeBytes(of: startIndex, as: UInt32.self)
        (memory + offset + Self.headOffset).storeBytes(of: startIndex, as: UInt32.self)
    }

    /// Entries are read as whole 8-byte words: a size that is a multiple of 8, with the
    /// stride equal to the size, so every slot is 8-aligned (entries start at +192 of a
    /// 64-aligned queue).
    @inlinable
    static func supports<Entry: QueueEntry>(_: Entry.Type) -> Bool {
        let size = MemoryLayout<Entry>.size
        return size > 0 && size % 8 == 0 && MemoryLayout<Entry>.stride == size
    }

    func checkFits<Entry: QueueEntry>(size: Int, at offset: Int, entry: Entry.Type) throws(QueueError) {
        guard Self.supports(entry) else { throw .unsupportedEntry(size: MemoryLayout<Entry>.size) }
        guard MemoryLayout<Entry>.stride == entryStride, MemoryLayout<Entry>.alignment <= Self.alignment else {
            throw .entryTypeMismatch(layoutStride: entryStride, entryStride: MemoryLayout<Entry>.stride)
        }
        try checkFits(size: size, at: offset)
    }

    func checkFits(size: Int, at offset: Int) throws(QueueError) {
        guard offset >= 0, offset % Self.alignment == 0, offset <= size, byteCount <= size - offset else {
            throw .doesNotFit(offset: offset, byteCount: byteCount, regionSize: size)
        }
    }
}

/// A free/active queue pair, as in sDDF: the client takes empty buffers from `free`,
/// fills them and puts them on `active`; the server consumes `active` and returns the
/// buffers on `free`. With no more buffers in circulation than `capacity`, neither queue
/// can fill up, so a producer never waits for space, only a consumer for work.
@frozen
public struct QueuePairLayout: Equatable, Sendable {
    public let queue: QueueLayout
    public let freeOffset: Int
    public let activeOffset: Int

    public init(capacity: Int, at offset: Int = 0) throws(QueueError) {
        try self.init(capacity: capacity, entry: BufferDescriptor.self, at: offset)
    }

    public init<Entry: QueueEntry>(capacity: Int, entry: Entry.Type, at offset: Int = 0) throws(QueueError) {
        queue = try QueueLayout(capacity: capacity, entry: entry)
        freeOffset = offset
        activeOffset = offset + queue.byteCount
    }

    /// End of the pair: where the next structure may start.
    public var endOffset: Int { activeOffset + queue.byteCount }

    public func initialize(memory: UnsafeMutableRawPointer, size: Int) throws(QueueError) {
        try queue.initialize(memory: memory, size: size, at: freeOffset)
        try queue.initialize(memory: memory, size: size, at: activeOffset)
    }
}

/// Why a queue stopped. Once an endpoint has an error it stays in that state and moves
/// nothing more: the owner reports it and tears the session down.
public enum QueueError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The capacity is not a power of two in 2...2^20.
    case invalidCapacity(Int)
    /// The queue does not fit the region at that offset, or the offset is not 64-aligned.
    case doesNotFit(offset: Int, byteCount: Int, regionSize: Int)
    /// The index the peer published is impossible: the peer is broken or hostile, or the
    /// shared memory was overwritten. `peer` is the value read, `own` our index.
    case peerIndexOutOfRange(peer: UInt32, own: UInt32, capacity: Int)
    /// A descriptor names memory outside the data region, or its length is not allowed.
    /// It was not handed on; the descriptors before it were.
    case descriptorOutOfBounds(BufferDescriptor, bounds: DescriptorBounds)
    /// An entry of another type failed its check; `reason` says which.
    case entryRejected(String)
    /// The endpoint's entry type does not match the layout's entry stride.
    case entryTypeMismatch(layoutStride: Int, entryStride: Int)
    /// The entry type's size is not a whole number of 8-byte words (or it has tail padding).
    case unsupportedEntry(size: Int)

    public var description: String {
        switch self {
        case .invalidCapacity(let c):
            return "queue capacity \(c) is not a power of two in 2...\(QueueLayout.maximumCapacity)"
        case .doesNotFit(let o, let n, let s):
            return "queue of \(n) bytes at offset \(o) does not fit a region of \(s) bytes (or offset not 64-aligned)"
        case .peerIndexOutOfRange(let p, let own, let c):
            return "peer published index \(p), impossible with our index \(own) and capacity \(c): queue corrupted"
        case .descriptorOutOfBounds(let d, let b):
            return "descriptor offset \(d.offset) length \(d.length) outside region of \(b.regionSize) bytes or length outside \(b.minLength)...\(b.maxLength)"
        case .entryRejected(let reason):
            return "queue entry rejected: \(reason)"
        case .entryTypeMismatch(let l, let e):
            return "queue laid out for \(l)-byte entries, endpoint uses \(e)-byte entries"
        case .unsupportedEntry(let size):
            return "queue entries must be a whole number of 8-byte words with no tail padding, not \(size) bytes"
        }
    }
}
