import CLinux
import OutboardSystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The frontend (driver-role) side of vhost-user over an already connected Unix STREAM socket.
///
/// The manager connects to the backend and hands the socket to the sandboxed driver, which
/// owns it through this value. One request is in flight at a time: each call sends one
/// message (descriptors attached with SCM_RIGHTS) and, when the request has a reply or
/// REPLY_ACK is negotiated, waits for the reply within `replyTimeoutMilliseconds`.
///
/// Replies are hostile input and are checked completely (`VhostUserExpectedReply`). After a
/// failure that leaves the byte stream in an unknown state (`.disconnected`, `.timeout`,
/// `.malformedReply`, `.system`) the connection is abandoned, as the spec asks ("If front-end
/// is unable to send the full message or receives a wrong reply it will close the
/// connection"): every later call fails at once with `.disconnected`, and the caller
/// reconnects with a new frontend. `.rejected` and `.unsupported` leave it usable.
public struct VhostUserFrontend: ~Copyable, Sendable {
    private let socket: OwnedFD
    /// How long each request may take, its send and its whole reply together.
    public var replyTimeoutMilliseconds: Int

    /// What setFeatures sent (and the backend acknowledged when REPLY_ACK is negotiated).
    public private(set) var features: UInt64 = 0
    /// What setProtocolFeatures sent. REPLY_ACK is used iff this contains `replyAck`.
    public private(set) var protocolFeatures: UInt64 = 0
    /// The backend's GET_FEATURES answer, once asked.
    public private(set) var offeredFeatures: UInt64?
    /// The backend's GET_PROTOCOL_FEATURES answer, once asked.
    public private(set) var offeredProtocolFeatures: UInt64?
    /// The failure that made this connection unusable, if any.
    public private(set) var failure: VhostUserError?

    /// Takes ownership of a connected SOCK_STREAM socket; it is closed when this value goes.
    public init(socket: consuming OwnedFD, replyTimeoutMilliseconds: Int = 2000) {
        self.socket = socket
        self.replyTimeoutMilliseconds = replyTimeoutMilliseconds
    }

    /// The socket, for the caller's epoll set: EPOLLRDHUP / EPOLLHUP on it means the backend
    /// is gone. The caller must not read or write it while this frontend is in use.
    public var fd: CInt { socket.raw.rawValue }

    /// Whether REPLY_ACK was negotiated: requests without a natural reply then carry
    /// NEED_REPLY and wait for the backend's u64 verdict.
    public var usesReplyAck: Bool { protocolFeatures & VhostUserProtocolFeature.replyAck != 0 }

    // MARK: - Session and features

    /// Marks this connection as the backend's owner: the first message of a session.
    /// VHOST_USER_SET_OWNER (3).
    public mutating func setOwner() throws(VhostUserError) {
        try command(.setOwner)
    }

    /// The device features the backend offers (virtio bits plus PROTOCOL_FEATURES, bit 30).
    /// VHOST_USER_GET_FEATURES (1).
    public mutating func getFeatures() throws(VhostUserError) -> UInt64 {
        let f = try queryU64(.getFeatures)
        offeredFeatures = f
        return f
    }

    /// Enables device features; only bits the backend offered (call getFeatures first).
    /// VHOST_USER_SET_FEATURES (2).
    public mutating func setFeatures(_ f: UInt64) throws(VhostUserError) {
        guard let offered = offeredFeatures else {
            throw .unsupported("SET_FEATURES before GET_FEATURES: the offered features are not known")
        }
        guard f & ~offered == 0 else {
            throw .unsupported("SET_FEATURES: bits 0x\(String(f & ~offered, radix: 16)) were not offered")
        }
        try command(.setFeatures, payload: VhostUserMessage.u64(f))
        features = f
    }

    /// The protocol features the backend offers. Only legal when GET_FEATURES offered
    /// PROTOCOL_FEATURES (bit 30); SET_FEATURES is not needed first.
    /// VHOST_USER_GET_PROTOCOL_FEATURES (15).
    public mutating func getProtocolFeatures() throws(VhostUserError) -> UInt64 {
        try requireOffered(VhostUserFeature.protocolFeatures, for: .getProtocolFeatures)
        let f = try queryU64(.getProtocolFeatures)
        offeredProtocolFeatures = f
        return f
    }

    /// Enables protocol features; only bits the backend offered. Sent without NEED_REPLY
    /// (REPLY_ACK is not in force until the backend has processed this message).
    /// VHOST_USER_SET_PROTOCOL_FEATURES (16).
    public mutating func setProtocolFeatures(_ f: UInt64) throws(VhostUserError) {
        try requireOffered(VhostUserFeature.protocolFeatures, for: .setProtocolFeatures)
        guard let offered = offeredProtocolFeatures else {
            throw .unsupported("SET_PROTOCOL_FEATURES before GET_PROTOCOL_FEATURES: the offered protocol features are not known")
        }
        guard f & ~offered == 0 else {
            throw .unsupported("SET_PROTOCOL_FEATURES: bits 0x\(String(f & ~offered, radix: 16)) were not offered")
        }
        // With REPLY_ACK already negotiated (a second call) this one is acknowledged too.
        try command(.setProtocolFeatures, payload: VhostUserMessage.u64(f))
        protocolFeatures = f
    }

    /// How many queues the backend supports. Needs MQ negotiated.
    /// VHOST_USER_GET_QUEUE_NUM (17).
    public mutating func getQueueNum() throws(VhostUserError) -> UInt64 {
        try requireNegotiated(VhostUserProtocolFeature.multiQueue, "MQ", for: .getQueueNum)
        return try queryU64(.getQueueNum)
    }

    /// How many memory slots the backend has for ADD_MEM_REG. Needs CONFIGURE_MEM_SLOTS.
    /// VHOST_USER_GET_MAX_MEM_SLOTS (36).
    public mutating func getMaxMemSlots() throws(VhostUserError) -> UInt64 {
        try requireNegotiated(VhostUserProtocolFeature.configureMemSlots, "CONFIGURE_MEM_SLOTS", for: .getMaxMemSlots)
        return try queryU64(.getMaxMemSlots)
    }

    /// `size` bytes of the virtio device configuration space from `offset`. Needs CONFIG;
    /// at most 256 bytes (QEMU's VHOST_USER_MAX_CONFIG_SIZE). A backend that refuses answers
    /// with an empty payload: `.rejected(request: "GET_CONFIG", code: 0)`.
    /// Note: qemu-storage-daemon 7.2 ignores `offset` and always returns the space from 0
    /// (with `offset` echoed); read from offset 0.
    /// VHOST_USER_GET_CONFIG (24).
    public mutating func getConfig(offset: UInt32, size: UInt32) throws(VhostUserError) -> [UInt8] {
        try requireNegotiated(VhostUserProtocolFeature.config, "CONFIG", for: .getConfig)
        guard size > 0, Int(size) <= VhostUserConfigSpace.maxDataSize else {
            throw .unsupported("GET_CONFIG of \(size) bytes: must be 1...\(VhostUserConfigSpace.maxDataSize)")
        }
        guard UInt64(offset) + UInt64(size) <= UInt64(UInt32.max) else {
            throw .unsupported("GET_CONFIG: offset \(offset) + size \(size) overflows")
        }
        let request = VhostUserConfigSpace(offset: offset, data: [UInt8](repeating: 0, count: Int(size)))
        let value = try transact(.getConfig, payload: request.encoded, descriptors: [],
                                 reply: .config(offset: offset, size: size))
        guard case .config(let bytes) = value else { preconditionFailure("decode returns the shape asked for") }
        return bytes
    }

    // MARK: - Memory

    /// Replaces the backend's memory table. At most 8 regions (more need addMemoryRegion),
    /// one descriptor per region in the same order. The descriptors are borrowed: the
    /// backend receives its own copies, ours stay open.
    /// VHOST_USER_SET_MEM_TABLE (5).
    public mutating func setMemTable(_ regions: [VhostUserMemoryRegion], fds: [CInt]) throws(VhostUserError) {
        guard regions.count <= VhostUserMemoryTable.maxRegions else {
            throw .unsupported("SET_MEM_TABLE of \(regions.count) regions: at most \(VhostUserMemoryTable.maxRegions); use addMemoryRegion (CONFIGURE_MEM_SLOTS)")
        }
        guard fds.count == regions.count, fds.allSatisfy({ $0 >= 0 }), regions.allSatisfy(\.isWellFormed) else {
            throw .system(.invalidArgument)
        }
        try command(.setMemTable, payload: VhostUserMemoryTable(regions: regions).encoded, descriptors: fds)
    }

    /// Adds one region to the backend's memory table; `fd` is borrowed. Needs
    /// CONFIGURE_MEM_SLOTS. VHOST_USER_ADD_MEM_REG (37).
    public mutating func addMemoryRegion(_ r: VhostUserMemoryRegion, fd: CInt) throws(VhostUserError) {
        try requireNegotiated(VhostUserProtocolFeature.configureMemSlots, "CONFIGURE_MEM_SLOTS", for: .addMemoryRegion)
        guard fd >= 0, r.isWellFormed else { throw .system(.invalidArgument) }
        try command(.addMemoryRegion, payload: VhostUserSingleMemoryRegion(r).encoded, descriptors: [fd])
    }

    /// Removes a region added before, identified by guest address, user address and size
    /// (the spec says the mmap offset is ignored). Sent without a descriptor, as the spec
    /// asks. Needs CONFIGURE_MEM_SLOTS. Note: qemu-storage-daemon 7.2 answers a region it
    /// does not know with an ack of 0 and then drops the connection.
    /// VHOST_USER_REM_MEM_REG (38).
    public mutating func removeMemoryRegion(_ r: VhostUserMemoryRegion) throws(VhostUserError) {
        try requireNegotiated(VhostUserProtocolFeature.configureMemSlots, "CONFIGURE_MEM_SLOTS", for: .removeMemoryRegion)
        guard r.isWellFormed else { throw .system(.invalidArgument) }
        try command(.removeMemoryRegion, payload: VhostUserSingleMemoryRegion(r).encoded)
    }

    // MARK: - Vrings

    /// Sets the size (number of descriptors) of vring `index`. VHOST_USER_SET_VRING_NUM (8).
    public mutating func setVringNum(_ index: UInt32, _ num: UInt32) throws(VhostUserError) {
        try command(.setVringNum, payload: VhostUserVringState(index: index, num: num).encoded)
    }

    /// Sets the addresses of vring `index`'s descriptor table, used ring and available ring.
    /// Addresses are the FRONTEND's virtual addresses (the backend translates them through
    /// the memory table's userAddress), not guest physical addresses.
    /// VHOST_USER_SET_VRING_ADDR (9).
    public mutating func setVringAddr(_ index: UInt32, descriptors: UInt64, used: UInt64, avail: UInt64,
                                      flags: UInt32 = 0, log: UInt64 = 0) throws(VhostUserError) {
        let addr = VhostUserVringAddress(index: index, flags: flags, descriptor: descriptors, used: used,
                                         available: avail, log: log)
        try command(.setVringAddr, payload: addr.encoded)
    }

    /// Sets the next available-ring index the backend will read for vring `index`.
    /// VHOST_USER_SET_VRING_BASE (10).
    public mutating func setVringBase(_ index: UInt32, _ base: UInt32) throws(VhostUserError) {
        try command(.setVringBase, payload: VhostUserVringState(index: index, num: base).encoded)
    }

    /// Stops vring `index` and returns the next available-ring index the backend would have
    /// read. VHOST_USER_GET_VRING_BASE (11).
    public mutating func getVringBase(_ index: UInt32) throws(VhostUserError) -> UInt32 {
        let value = try transact(.getVringBase, payload: VhostUserVringState(index: index, num: 0).encoded,
                                 descriptors: [], reply: .vringState(index: index))
        guard case .vringState(let state) = value else { preconditionFailure("decode returns the shape asked for") }
        return state.num
    }

    /// Sets the eventfd the frontend writes to kick vring `index` (`index` at most 255, the
    /// field has 8 bits); `fd` is borrowed. `fd < 0` sends none, with the spec's no-descriptor
    /// flag: the backend then polls the ring. The ring starts on the first kick.
    /// VHOST_USER_SET_VRING_KICK (12).
    public mutating func setVringKick(_ index: UInt32, fd: CInt) throws(VhostUserError) {
        try vringFile(.setVringKick, index, fd)
    }

    /// Sets the eventfd the backend writes when it has used buffers of vring `index`; `fd`
    /// is borrowed; `fd < 0`: no notifications. The backend may signal it once at once.
    /// VHOST_USER_SET_VRING_CALL (13).
    public mutating func setVringCall(_ index: UInt32, fd: CInt) throws(VhostUserError) {
        try vringFile(.setVringCall, index, fd)
    }

    /// Enables or disables vring `index`. With PROTOCOL_FEATURES negotiated rings start
    /// disabled, so this is needed before the backend processes anything; without it the
    /// message is not allowed. VHOST_USER_SET_VRING_ENABLE (18).
    public mutating func setVringEnable(_ index: UInt32, _ enable: Bool) throws(VhostUserError) {
        guard features & VhostUserFeature.protocolFeatures != 0 else {
            throw .unsupported("SET_VRING_ENABLE needs PROTOCOL_FEATURES negotiated with SET_FEATURES")
        }
        try command(.setVringEnable, payload: VhostUserVringState(index: index, num: enable ? 1 : 0).encoded)
    }

    // MARK: - Internals

    private mutating func vringFile(_ request: VhostUserRequest, _ index: UInt32, _ fd: CInt) throws(VhostUserError) {
        guard index <= UInt32(VhostUserVringFile.indexMask) else { throw .system(.invalidArgument) }
        let file = VhostUserVringFile(index: UInt8(index), hasDescriptor: fd >= 0)
        try command(request, payload: VhostUserMessage.u64(file.value), descriptors: fd >= 0 ? [fd] : [])
    }

    private func requireOffered(_ bit: UInt64, for request: VhostUserRequest) throws(VhostUserError) {
        guard let offered = offeredFeatures else {
            throw .unsupported("\(request) before GET_FEATURES: whether the backend offers PROTOCOL_FEATURES is not known")
        }
        guard offered & bit != 0 else {
            throw .unsupported("\(request): the backend does not offer PROTOCOL_FEATURES")
        }
    }

    private func requireNegotiated(_ bit: UInt64, _ name: String, for request: VhostUserRequest) throws(VhostUserError) {
        guard protocolFeatures & bit != 0 else {
            throw .unsupported("\(request) needs protocol feature \(name) negotiated")
        }
    }

    /// A request without a natural reply: acknowledged when REPLY_ACK is negotiated,
    /// otherwise done once sent.
    private mutating func command(_ request: VhostUserRequest, payload: [UInt8] = [], descriptors: [CInt] = []) throws(VhostUserError) {
        _ = try transact(request, payload: payload, descriptors: descriptors, reply: usesReplyAck ? .ack : nil)
    }

    private mutating func queryU64(_ request: VhostUserRequest) throws(VhostUserError) -> UInt64 {
        guard case .u64(let v) = try transact(request, payload: [], descriptors: [], reply: .u64) else {
            preconditionFailure("decode returns the shape asked for")
        }
        return v
    }

    /// Sends one request and reads and checks its reply, all before one deadline. Any
    /// failure but a rejection abandons the connection.
    private mutating func transact(_ request: VhostUserRequest, payload: [UInt8], descriptors: [CInt],
                                   reply: VhostUserExpectedReply?) throws(VhostUserError) -> VhostUserReplyValue {
        if let failure {
            throw .disconnected("\(request): connection abandoned after an earlier failure (\(failure))")
        }
        do {
            return try exchange(request, payload: payload, descriptors: descriptors, reply: reply)
        } catch {
            switch error {
            case .rejected, .unsupported: break
            default: failure = error
            }
            throw error
        }
    }

    private func exchange(_ request: VhostUserRequest, payload: [UInt8], descriptors: [CInt],
                          reply: VhostUserExpectedReply?) throws(VhostUserError) -> VhostUserReplyValue {
        let (limit, overflow) = UInt64(max(0, replyTimeoutMilliseconds)).multipliedReportingOverflow(by: 1_000_000)
        let now = Clock.monotonicNanoseconds
        let deadline = overflow || limit > UInt64.max - now ? UInt64.max : now + limit
        let channel = Channel(fd: fd)
        let context = request.description
        // NEED_REPLY only for the ack: requests with a natural reply get exactly that reply.
        let message = VhostUserMessage(request, needReply: reply == .ack, payload: payload)
        try channel.send(message.encoded, descriptors: descriptors, deadline: deadline, context: context)
        guard let reply else { return .none }

        let head = try channel.receive(count: VhostUserHeader.byteCount, deadline: deadline, context: context, part: "header")
        let header = VhostUserHeader(decoding: head.bytes)!
        // The size field is checked against the exact size this reply must have before
        // anything is read or allocated for it.
        let size = try reply.check(header, answering: request, descriptors: head.strayDescriptors)
        let body = try channel.receive(count: size, deadline: deadline, context: context, part: "payload")
        guard body.strayDescriptors == 0 else {
            throw .malformedReply("\(context): reply carried \(body.strayDescriptors) unexpected descriptor(s)")
        }
        return try reply.decode(body.bytes, answering: request)
    }
}
