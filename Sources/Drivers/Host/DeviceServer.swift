import OutboardSession
import OutboardSystem

/// What a device's own logic gives the driver host (`DriverHost`): everything else a
/// driver process does (the manager socket, the epoll loop, the heartbeat, sessions and
/// their translation checks, the sleep rule, fault injection) is the host's, written once.
///
/// Block class: the host takes requests off the sessions' queues, checks them against
/// `limits` (`BlockLimits.check`, the one range check) and hands each to `start`, which
/// either finishes it at once or leaves it at the device; such a request ends later with
/// `SessionTable.finish` from `poll`. Servers are used through generics, never as
/// existentials: the data path calls are direct.
protocol BlockDeviceServer: ~Copyable {
    /// Whether sessions' data regions must stay open in the driver (a vhost-user device
    /// maps them again after every reconnection).
    static var keepsDataDescriptors: Bool { get }

    /// The device's limits, nil while there is no usable device.
    var limits: BlockLimits? { get }
    /// Requests the device can take now.
    var room: Int { get }

    /// Starts request `r` of session `session` (already checked against `limits`; the
    /// host's fault-injection point is passed). Returns the status it ends with now, or nil
    /// when it went to the device (it then ends through `context.sessions.finish`).
    mutating func start(_ r: BlockRequest, session: Int, context: inout HostContext) -> BlockStatus?
    /// After a batch of `start`s: make them visible to the device.
    mutating func publish(context: inout HostContext)
    /// Takes what the device finished; returns how many.
    mutating func poll(context: inout HostContext) -> Int

    /// Sleep rule. `shouldSpin`: keep polling instead of sleeping (`lastWork`: monotonic ns
    /// of the last work). `prepareToSleep`: ask the device for a notification; false if
    /// there is already work (do not sleep). `woke`: after the sleep.
    func shouldSpin(lastWork: UInt64) -> Bool
    mutating func prepareToSleep() -> Bool
    mutating func woke()

    /// An event on a descriptor the server registered with `context.epoll` (tokens
    /// `HostToken.device...`).
    mutating func event(_ token: UInt64, context: inout HostContext)
    /// The manager handed over a new connection to the device.
    mutating func connect(_ fd: consuming OwnedFD, context: inout HostContext)

    /// A session was attached; return why it cannot be served, or nil.
    mutating func attached(_ session: Int, context: inout HostContext) -> String?
    /// A session is leaving and nothing of it is at the device any more; take back what
    /// the device was given for it.
    mutating func removing(_ session: Int, context: inout HostContext)
    /// Requests of `session` held for the device (none reach it any more): forget them.
    mutating func forget(_ session: Int, context: inout HostContext)
    /// Whether requests at the device can still come back (false: forget them instead).
    var deviceConnected: Bool { get }
}

/// Epoll tokens of a driver process.
enum HostToken {
    static let manager: UInt64 = 0
    /// 1 to 15: the server's own descriptors.
    static let deviceFirst: UInt64 = 1
    static let session: UInt64 = 16
}

/// A block device's limits, which every request is checked against, once, by the host.
struct BlockLimits: Equatable, Sendable {
    /// Size in 512-byte sectors.
    var blockCount: UInt64
    var maxTransfer: UInt32
    var flags: DeviceFlags
    var maxDiscardSectors: UInt32 = 0
    var maxWriteZeroesSectors: UInt32 = 0

    /// Checks what the device cannot check for us: a known op, lengths whole sectors and
    /// within the transfer limit, the whole range on the device (a request that starts
    /// before the end and runs past it is refused, as is one starting at the end), writes
    /// only on writable sessions and devices, and optional operations only where offered.
    /// Returns the status to end the request with, or nil if it may go on.
    func check(_ r: BlockRequest, writable: Bool) -> BlockStatus? {
        guard let op = BlockOp(rawValue: r.op) else { return .unsupported }
        let sector = UInt64(blockSectorSize)
        if op == .flush { return nil }
        guard r.length > 0, UInt64(r.length) % sector == 0, r.sector < blockCount,
              UInt64(r.length) / sector <= blockCount - r.sector else { return .invalid }
        if op != .read && (!writable || flags.contains(.readOnly)) { return .readOnly }
        if op.hasBuffer {
            guard r.length <= maxTransfer else { return .invalid }
        } else {
            guard flags.contains(op == .discard ? .discard : .writeZeroes) else { return .unsupported }
            let limit = op == .discard ? maxDiscardSectors : maxWriteZeroesSectors
            guard UInt64(r.length) / sector <= UInt64(limit == 0 ? UInt32.max : limit) else { return .invalid }
        }
        return nil
    }
}
