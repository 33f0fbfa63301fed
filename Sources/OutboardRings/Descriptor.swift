import Synchronization

/// An offset into a shared region. Regions are mapped at different addresses in each
/// process, so shared memory carries offsets, never pointers (sDDF's `io_or_offset`).
@frozen
public struct RegionOffset: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public init(_ value: Int) { rawValue = UInt64(value) }
    @inlinable public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }
    public var description: String { "0x" + String(rawValue, radix: 16) }
}

/// An address the device resolves (vhost-user: a "guest physical" address of the memory
/// table; VFIO: an IOVA the IOMMU maps). Never a pointer of this process: the driver puts
/// these in descriptors, the device turns them into memory through a table the driver
/// cannot write (the manager's translation table, the vhost-user memory table, the IOMMU).
@frozen
public struct IOAddress: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }
    /// The address `bytes` further on (the caller checked the range).
    @inlinable public func advanced(by bytes: Int) -> IOAddress { IOAddress(rawValue: rawValue &+ UInt64(bytes)) }
    @inlinable public func advanced(by offset: RegionOffset) -> IOAddress { IOAddress(rawValue: rawValue &+ offset.rawValue) }
    public var description: String { "io:0x" + String(rawValue, radix: 16) }
}

/// What a queue carries: a fixed-layout value (no references, no padding that matters),
/// copied whole into and out of shared memory, and the rule a consumer checks every
/// copy against before handing it on. The rule's parameters (`Bounds`) come from the
/// consumer's private state, never from shared memory.
///
/// Contract: every bit pattern must be a valid value of the type (integers and structs
/// of integers; no Bool, enum or non-optional pointer fields), because a hostile peer
/// chooses the bits; and the size must be a whole number of 8-byte words with no tail
/// padding (QueueLayout refuses other types).
public protocol QueueEntry: BitwiseCopyable, Sendable {
    associatedtype Bounds: Sendable
    /// Reads the entry out of a shared slot, each byte once, with loads the compiler may
    /// neither repeat nor put off (relaxed atomics). The default reads whole 8-byte words;
    /// a type may read field by field instead, when that makes shorter code, and must
    /// then keep the same guarantee (never a plain `slot.pointee`).
    static func fetchOnce(_ slot: UnsafePointer<Self>) -> Self
    /// True when `entry` may be handed on by a consumer working within `bounds`.
    static func admits(_ entry: Self, within bounds: Bounds) -> Bool
    /// The error recorded when `admits` said no (cold path).
    static func rejection(_ entry: Self, within bounds: Bounds) -> QueueError
}

/// One queue entry: a buffer in a data region, by offset and length, and a cookie the
/// producer chooses (a request id, a sequence number) that the consumer hands back.
///
/// Fixed layout, 16 bytes, as it sits in shared memory:
/// `offset` at 0 (8 bytes), `length` at 8 (4), `cookie` at 12 (4). The C reference
/// (`Sources/CRefRing`) uses the same layout; `DescriptorLayoutTests` pins it.
@frozen
public struct BufferDescriptor: Equatable, QueueEntry {
    public typealias Bounds = DescriptorBounds
    @inlinable
    public static func admits(_ entry: Self, within bounds: DescriptorBounds) -> Bool { bounds.admits(entry) }
    public static func rejection(_ entry: Self, within bounds: DescriptorBounds) -> QueueError {
        .descriptorOutOfBounds(entry, bounds: bounds)
    }
    /// Field by field, as the C reference does: the checks and the copy then use the
    /// loaded registers directly (word by word costs two shifts and a move more).
    @inlinable @inline(__always)
    public static func fetchOnce(_ slot: UnsafePointer<Self>) -> Self {
        let raw = UnsafeRawPointer(slot)
        let offset = raw.assumingMemoryBound(to: Atomic<UInt64>.self).pointee.load(ordering: .relaxed)
        let length = (raw + 8).assumingMemoryBound(to: Atomic<UInt32>.self).pointee.load(ordering: .relaxed)
        let cookie = (raw + 12).assumingMemoryBound(to: Atomic<UInt32>.self).pointee.load(ordering: .relaxed)
        return BufferDescriptor(offset: RegionOffset(rawValue: offset), length: length, cookie: cookie)
    }

    public var offset: RegionOffset
    public var length: UInt32
    public var cookie: UInt32

    @inlinable
    public init(offset: RegionOffset, length: UInt32, cookie: UInt32 = 0) {
        self.offset = offset
        self.length = length
        self.cookie = cookie
    }
}

/// What a consumer accepts from a producer: buffers inside the data region, with a length
/// in `minLength...maxLength`. All numbers come from the consumer's own (private)
/// parameters.
///
/// `minLength` matters whenever the receiver then touches the buffer by its own idea of
/// the size rather than by the descriptor's length: a client that writes a header into
/// every free buffer it gets back must refuse a buffer shorter than that header, or a
/// hostile server could hand it `{offset: regionSize, length: 0}` and make it write past
/// the region.
@frozen
public struct DescriptorBounds: Equatable, Sendable {
    public let regionSize: UInt64
    public let minLength: UInt32
    public let maxLength: UInt32

    @inlinable
    public init(regionSize: Int, minLength: UInt32 = 0, maxLength: UInt32 = .max) {
        self.regionSize = UInt64(regionSize)
        self.minLength = minLength
        self.maxLength = maxLength
    }

    /// True when `[offset, offset + length)` lies inside the region and the length is
    /// allowed. `regionSize - offset` borrows exactly when offset > regionSize, so one
    /// subtraction both checks the offset and gives the room left (no overflow possible).
    @inlinable
    public func admits(_ d: BufferDescriptor) -> Bool {
        let (room, offsetPastEnd) = regionSize.subtractingReportingOverflow(d.offset.rawValue)
        return d.length >= minLength && d.length <= maxLength && !offsetPastEnd && UInt64(d.length) <= room
    }
}
