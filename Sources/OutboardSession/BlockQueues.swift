import OutboardRings

/// Block operations.
public enum BlockOp: UInt8, Sendable {
    case read = 1
    case write = 2
    case flush = 3
    /// The device may forget the range (`length` bytes from `sector`; no buffer).
    case discard = 4
    /// The range reads back as zeroes afterwards (no buffer).
    case writeZeroes = 5

    /// Whether the request moves data through the session's buffer.
    @inlinable public var hasBuffer: Bool { self == .read || self == .write }
}

/// How a block request ended.
public enum BlockStatus: UInt32, Sendable, CustomStringConvertible {
    case ok = 0
    case ioError = 1
    case unsupported = 2
    /// Misaligned, out of the device's range, or outside the data region.
    case invalid = 3
    /// A write on a read-only session.
    case readOnly = 4
    /// The data region's translation was revoked or its lease expired.
    case revoked = 5

    public var description: String {
        switch self {
        case .ok: return "ok"
        case .ioError: return "I/O error"
        case .unsupported: return "unsupported operation"
        case .invalid: return "invalid request"
        case .readOnly: return "read-only session"
        case .revoked: return "buffer region revoked"
        }
    }
}

/// A block request on a session's request queue (client to driver). 32 bytes:
/// `tag` +0, `op` +4, `flags` +5, `reserved` +6, `sector` +8 (512-byte units),
/// `offset` +16 (into the session's data region), `length` +24 (bytes), `reserved2` +28.
@frozen
public struct BlockRequest: Equatable, QueueEntry {
    public var tag: UInt32
    public var op: UInt8
    public var flags: UInt8 = 0
    public var reserved: UInt16 = 0
    public var sector: UInt64
    /// Into the session's data region; the driver checks it against the region (RegionOffset
    /// is a UInt64 wrapper: any bit pattern is a value, as QueueEntry requires).
    public var offset: RegionOffset
    public var length: UInt32
    public var reserved2: UInt32 = 0

    @inlinable
    public init(tag: UInt32, op: BlockOp, sector: UInt64, offset: RegionOffset, length: UInt32) {
        self.tag = tag
        self.op = op.rawValue
        self.sector = sector
        self.offset = offset
        self.length = length
    }

    /// What the queue itself checks: the tag names an in-flight slot (a completion must be
    /// routable). Everything else about a request is checked by the driver, which answers
    /// a bad request with an error completion instead of stopping the queue.
    public typealias Bounds = UInt32  // queue depth
    @inlinable
    public static func admits(_ entry: Self, within depth: UInt32) -> Bool { entry.tag < depth }
    public static func rejection(_ entry: Self, within depth: UInt32) -> QueueError {
        .entryRejected("request tag \(entry.tag) outside the queue depth \(depth)")
    }
}

/// A completion on a session's completion queue (driver to client). 16 bytes:
/// `tag` +0, `status` +4, `generation` +8 (the driver generation that completed it).
@frozen
public struct BlockCompletion: Equatable, QueueEntry {
    public var tag: UInt32
    public var status: UInt32
    public var generation: UInt64

    @inlinable
    public init(tag: UInt32, status: BlockStatus, generation: UInt64) {
        self.tag = tag
        self.status = status.rawValue
        self.generation = generation
    }

    public typealias Bounds = UInt32  // queue depth
    @inlinable
    public static func admits(_ entry: Self, within depth: UInt32) -> Bool { entry.tag < depth }
    public static func rejection(_ entry: Self, within depth: UInt32) -> QueueError {
        .entryRejected("completion tag \(entry.tag) outside the queue depth \(depth)")
    }
}

/// The queue region of a block session: the request queue, then the completion queue.
/// Both have `queueDepth` slots, and a client never has more than `queueDepth` requests in
/// flight, so neither queue can overflow.
public struct BlockQueueLayout: Equatable, Sendable {
    public let requests: QueueLayout
    public let completions: QueueLayout
    public let requestOffset: Int
    public let completionOffset: Int
    public let byteCount: Int

    public init(queueDepth: Int) throws(QueueError) {
        requests = try QueueLayout(capacity: queueDepth, entry: BlockRequest.self)
        completions = try QueueLayout(capacity: queueDepth, entry: BlockCompletion.self)
        requestOffset = 0
        completionOffset = requests.byteCount
        byteCount = completionOffset + completions.byteCount
    }

    public func initialize(memory: UnsafeMutableRawPointer, size: Int) throws(QueueError) {
        try requests.initialize(memory: memory, size: size, at: requestOffset)
        try completions.initialize(memory: memory, size: size, at: completionOffset)
    }
}

/// Sector size of the block protocol; lengths and buffer offsets are multiples of it.
public let blockSectorSize = 512
