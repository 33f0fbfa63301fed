import OutboardSystem
// The vhost-user wire format: header, request codes, feature bits and payload layouts.
// No syscalls here: everything can be tested without a socket, and every payload has a
// fixed layout checked by the layout tests (Tests/VhostUserTests/WireTests.swift).
//
// Source: QEMU docs/interop/vhost-user.rst ("Message Specification"). All numbers are in the
// machine's native byte order (little-endian on x86-64, the only target).

/// Requests a frontend sends (vhost-user spec, "Front-end message types").
public enum VhostUserRequest: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    case getFeatures = 1
    case setFeatures = 2
    case setOwner = 3
    case resetOwner = 4
    case setMemTable = 5
    case setLogBase = 6
    case setLogFD = 7
    case setVringNum = 8
    case setVringAddr = 9
    case setVringBase = 10
    case getVringBase = 11
    case setVringKick = 12
    case setVringCall = 13
    case setVringErr = 14
    case getProtocolFeatures = 15
    case setProtocolFeatures = 16
    case getQueueNum = 17
    case setVringEnable = 18
    case sendRARP = 19
    case netSetMTU = 20
    case setBackendReqFD = 21
    case iotlbMessage = 22
    case setVringEndian = 23
    case getConfig = 24
    case setConfig = 25
    case createCryptoSession = 26
    case closeCryptoSession = 27
    case postcopyAdvise = 28
    case postcopyListen = 29
    case postcopyEnd = 30
    case getInflightFD = 31
    case setInflightFD = 32
    case gpuSetSocket = 33
    case resetDevice = 34
    case vringKick = 35
    case getMaxMemSlots = 36
    case addMemoryRegion = 37
    case removeMemoryRegion = 38
    case setStatus = 39
    case getStatus = 40

    /// The spec's name without the VHOST_USER_ prefix, for messages and logs.
    public var description: String {
        switch self {
        case .getFeatures: return "GET_FEATURES"
        case .setFeatures: return "SET_FEATURES"
        case .setOwner: return "SET_OWNER"
        case .resetOwner: return "RESET_OWNER"
        case .setMemTable: return "SET_MEM_TABLE"
        case .setLogBase: return "SET_LOG_BASE"
        case .setLogFD: return "SET_LOG_FD"
        case .setVringNum: return "SET_VRING_NUM"
        case .setVringAddr: return "SET_VRING_ADDR"
        case .setVringBase: return "SET_VRING_BASE"
        case .getVringBase: return "GET_VRING_BASE"
        case .setVringKick: return "SET_VRING_KICK"
        case .setVringCall: return "SET_VRING_CALL"
        case .setVringErr: return "SET_VRING_ERR"
        case .getProtocolFeatures: return "GET_PROTOCOL_FEATURES"
        case .setProtocolFeatures: return "SET_PROTOCOL_FEATURES"
        case .getQueueNum: return "GET_QUEUE_NUM"
        case .setVringEnable: return "SET_VRING_ENABLE"
        case .sendRARP: return "SEND_RARP"
        case .netSetMTU: return "NET_SET_MTU"
        case .setBackendReqFD: return "SET_BACKEND_REQ_FD"
        case .iotlbMessage: return "IOTLB_MSG"
        case .setVringEndian: return "SET_VRING_ENDIAN"
        case .getConfig: return "GET_CONFIG"
        case .setConfig: return "SET_CONFIG"
        case .createCryptoSession: return "CREATE_CRYPTO_SESSION"
        case .closeCryptoSession: return "CLOSE_CRYPTO_SESSION"
        case .postcopyAdvise: return "POSTCOPY_ADVISE"
        case .postcopyListen: return "POSTCOPY_LISTEN"
        case .postcopyEnd: return "POSTCOPY_END"
        case .getInflightFD: return "GET_INFLIGHT_FD"
        case .setInflightFD: return "SET_INFLIGHT_FD"
        case .gpuSetSocket: return "GPU_SET_SOCKET"
        case .resetDevice: return "RESET_DEVICE"
        case .vringKick: return "VRING_KICK"
        case .getMaxMemSlots: return "GET_MAX_MEM_SLOTS"
        case .addMemoryRegion: return "ADD_MEM_REG"
        case .removeMemoryRegion: return "REM_MEM_REG"
        case .setStatus: return "SET_STATUS"
        case .getStatus: return "GET_STATUS"
        }
    }
}

/// Device feature bits that belong to vhost-user itself rather than to virtio
/// (GET_FEATURES / SET_FEATURES). Virtio's own bits (VERSION_1 and the device's) live in
/// the Virtio module.
public enum VhostUserFeature {
    /// VHOST_USER_F_PROTOCOL_FEATURES (bit 30): the backend understands
    /// GET/SET_PROTOCOL_FEATURES; once negotiated, rings start disabled.
    public static let protocolFeatures: UInt64 = 1 << 30
    /// VHOST_F_LOG_ALL (bit 26): dirty logging for live migration.
    public static let logAll: UInt64 = 1 << 26
}

/// Protocol feature bits (GET/SET_PROTOCOL_FEATURES), spec "Protocol features".
public enum VhostUserProtocolFeature {
    public static let multiQueue: UInt64 = 1 << 0
    public static let logShmfd: UInt64 = 1 << 1
    public static let rarp: UInt64 = 1 << 2
    /// REPLY_ACK: the frontend may set NEED_REPLY on any request; the backend then answers
    /// requests without a natural reply with a u64, zero for success.
    public static let replyAck: UInt64 = 1 << 3
    public static let mtu: UInt64 = 1 << 4
    public static let backendRequest: UInt64 = 1 << 5
    public static let crossEndian: UInt64 = 1 << 6
    public static let cryptoSession: UInt64 = 1 << 7
    public static let pagefault: UInt64 = 1 << 8
    /// CONFIG: GET_CONFIG / SET_CONFIG of the virtio device configuration space.
    public static let config: UInt64 = 1 << 9
    public static let backendSendFD: UInt64 = 1 << 10
    public static let hostNotifier: UInt64 = 1 << 11
    public static let inflightShmfd: UInt64 = 1 << 12
    public static let resetDevice: UInt64 = 1 << 13
    public static let inbandNotifications: UInt64 = 1 << 14
    /// CONFIGURE_MEM_SLOTS: GET_MAX_MEM_SLOTS, ADD_MEM_REG and REM_MEM_REG.
    public static let configureMemSlots: UInt64 = 1 << 15
    public static let status: UInt64 = 1 << 16
}

/// The 12-byte message header: request, flags, payload size (spec "Header").
public struct VhostUserHeader: Equatable, Sendable {
    public var request: UInt32
    public var flags: UInt32
    public var size: UInt32

    public static let byteCount = 12
    /// Bits 0-1: protocol version.
    public static let versionMask: UInt32 = 0x3
    /// The only version there is.
    public static let version: UInt32 = 0x1
    /// Bit 2: set on every reply from the backend.
    public static let replyFlag: UInt32 = 0x4
    /// Bit 3: the frontend asks for a REPLY_ACK.
    public static let needReplyFlag: UInt32 = 0x8

    public init(request: UInt32, flags: UInt32, size: UInt32) {
        self.request = request
        self.flags = flags
        self.size = size
    }

    /// Decodes the first 12 bytes of `bytes`; nil if there are fewer.
    public init?(decoding bytes: some Collection<UInt8>) {
        guard bytes.count >= Self.byteCount else { return nil }
        let r = WireReader(Array(bytes.prefix(Self.byteCount)))
        self.init(request: r.u32(at: 0), flags: r.u32(at: 4), size: r.u32(at: 8))
    }

    public func encode(into bytes: inout [UInt8]) {
        bytes.appendNative(request)
        bytes.appendNative(flags)
        bytes.appendNative(size)
    }
}

/// A vring state description {u32 index, u32 num}: SET_VRING_NUM, SET_VRING_BASE,
/// GET_VRING_BASE (request and reply), SET_VRING_ENABLE.
public struct VhostUserVringState: Equatable, Sendable {
    public var index: UInt32
    public var num: UInt32
    public static let byteCount = 8

    public init(index: UInt32, num: UInt32) {
        self.index = index
        self.num = num
    }

    public init?(decoding bytes: [UInt8]) {
        guard bytes.count == Self.byteCount else { return nil }
        let r = WireReader(bytes)
        self.init(index: r.u32(at: 0), num: r.u32(at: 4))
    }

    public var encoded: [UInt8] {
        var b: [UInt8] = []
        b.reserveCapacity(Self.byteCount)
        b.appendNative(index)
        b.appendNative(num)
        return b
    }
}

/// A vring address description (struct vhost_vring_addr): SET_VRING_ADDR.
/// {u32 index, u32 flags, u64 descriptor, u64 used, u64 available, u64 log}, 40 bytes.
/// Without VIRTIO_F_IOMMU_PLATFORM the three ring addresses are the frontend's own virtual
/// addresses, which the backend translates through the memory table's user addresses.
public struct VhostUserVringAddress: Equatable, Sendable {
    public var index: UInt32
    public var flags: UInt32
    public var descriptor: UInt64
    public var used: UInt64
    public var available: UInt64
    public var log: UInt64
    public static let byteCount = 40
    /// VHOST_VRING_F_LOG (bit 0 of flags): log writes to the used ring at `log`.
    public static let logFlag: UInt32 = 1 << 0

    public init(index: UInt32, flags: UInt32, descriptor: UInt64, used: UInt64, available: UInt64, log: UInt64) {
        self.index = index
        self.flags = flags
        self.descriptor = descriptor
        self.used = used
        self.available = available
        self.log = log
    }

    public init?(decoding bytes: [UInt8]) {
        guard bytes.count == Self.byteCount else { return nil }
        let r = WireReader(bytes)
        self.init(index: r.u32(at: 0), flags: r.u32(at: 4), descriptor: r.u64(at: 8), used: r.u64(at: 16),
                  available: r.u64(at: 24), log: r.u64(at: 32))
    }

    public var encoded: [UInt8] {
        var b: [UInt8] = []
        b.reserveCapacity(Self.byteCount)
        b.appendNative(index)
        b.appendNative(flags)
        b.appendNative(descriptor)
        b.appendNative(used)
        b.appendNative(available)
        b.appendNative(log)
        return b
    }
}

/// The u64 payload of SET_VRING_KICK / SET_VRING_CALL / SET_VRING_ERR: bits 0-7 the vring
/// index, bit 8 set when no descriptor is attached (the backend then polls, or for CALL is
/// not signalled).
public struct VhostUserVringFile: Equatable, Sendable {
    public var index: UInt8
    public var hasDescriptor: Bool
    public static let indexMask: UInt64 = 0xff
    public static let noDescriptorFlag: UInt64 = 0x100

    public init(index: UInt8, hasDescriptor: Bool) {
        self.index = index
        self.hasDescriptor = hasDescriptor
    }

    public var value: UInt64 { UInt64(index) | (hasDescriptor ? 0 : Self.noDescriptorFlag) }

    public init?(value: UInt64) {
        guard value & ~(Self.indexMask | Self.noDescriptorFlag) == 0 else { return nil }
        self.init(index: UInt8(value & Self.indexMask), hasDescriptor: value & Self.noDescriptorFlag == 0)
    }
}

/// One memory region {u64 guest address, u64 size, u64 user address, u64 mmap offset}.
/// The backend maps `size` bytes of the region's descriptor from `mmapOffset`; a ring or
/// buffer address `a` is then found at `a - guestPhysicalAddress` (descriptor addresses) or
/// `a - userAddress` (SET_VRING_ADDR's addresses) into that mapping.
public struct VhostUserMemoryRegion: Equatable, Sendable {
    public var guestPhysicalAddress: UInt64
    public var size: UInt64
    public var userAddress: UInt64
    public var mmapOffset: UInt64
    public static let byteCount = 32

    public init(guestPhysicalAddress: UInt64, size: UInt64, userAddress: UInt64, mmapOffset: UInt64) {
        self.guestPhysicalAddress = guestPhysicalAddress
        self.size = size
        self.userAddress = userAddress
        self.mmapOffset = mmapOffset
    }

    init(reading r: WireReader, at offset: Int) {
        self.init(guestPhysicalAddress: r.u64(at: offset), size: r.u64(at: offset + 8),
                  userAddress: r.u64(at: offset + 16), mmapOffset: r.u64(at: offset + 24))
    }

    public func encode(into b: inout [UInt8]) {
        b.appendNative(guestPhysicalAddress)
        b.appendNative(size)
        b.appendNative(userAddress)
        b.appendNative(mmapOffset)
    }

    /// Size nonzero and neither address range wraps around 2^64.
    public var isWellFormed: Bool {
        size > 0 && guestPhysicalAddress <= UInt64.max - (size - 1) && userAddress <= UInt64.max - (size - 1)
            && mmapOffset <= UInt64.max - size
    }
}

/// Memory regions description (SET_MEM_TABLE): {u32 nregions, u32 padding, regions[nregions]}.
/// The C struct holds 8 regions (264 bytes); like QEMU's and rust-vmm's frontends we send only
/// the regions in use (8 + 32 * n bytes), and every backend that interoperates with QEMU reads
/// `nregions` rather than the message size.
public struct VhostUserMemoryTable: Equatable, Sendable {
    public var regions: [VhostUserMemoryRegion]
    /// VHOST_MEMORY_BASELINE_NREGIONS: more need CONFIGURE_MEM_SLOTS.
    public static let maxRegions = 8
    public static let headerByteCount = 8
    /// The C struct's size: the header and all 8 region slots.
    public static let fullByteCount = headerByteCount + maxRegions * VhostUserMemoryRegion.byteCount

    public init(regions: [VhostUserMemoryRegion]) { self.regions = regions }

    /// Decodes `nregions` (at most 8) regions; the payload may be the short or the full form.
    public init?(decoding bytes: [UInt8]) {
        guard bytes.count >= Self.headerByteCount, bytes.count <= Self.fullByteCount else { return nil }
        let r = WireReader(bytes)
        let n = Int(r.u32(at: 0))
        guard n <= Self.maxRegions, bytes.count >= Self.headerByteCount + n * VhostUserMemoryRegion.byteCount else {
            return nil
        }
        regions = (0..<n).map {
            VhostUserMemoryRegion(reading: r, at: Self.headerByteCount + $0 * VhostUserMemoryRegion.byteCount)
        }
    }

    public var encoded: [UInt8] {
        var b: [UInt8] = []
        b.reserveCapacity(Self.headerByteCount + regions.count * VhostUserMemoryRegion.byteCount)
        b.appendNative(UInt32(regions.count))
        b.appendNative(UInt32(0))  // padding
        for region in regions { region.encode(into: &b) }
        return b
    }
}

/// Single memory region description (ADD_MEM_REG / REM_MEM_REG): {u64 padding, region}.
public struct VhostUserSingleMemoryRegion: Equatable, Sendable {
    public var region: VhostUserMemoryRegion
    public static let byteCount = 8 + VhostUserMemoryRegion.byteCount

    public init(_ region: VhostUserMemoryRegion) { self.region = region }

    public init?(decoding bytes: [UInt8]) {
        guard bytes.count == Self.byteCount else { return nil }
        region = VhostUserMemoryRegion(reading: WireReader(bytes), at: 8)
    }

    public var encoded: [UInt8] {
        var b: [UInt8] = []
        b.reserveCapacity(Self.byteCount)
        b.appendNative(UInt64(0))  // padding
        region.encode(into: &b)
        return b
    }
}

/// Virtio device config space (GET_CONFIG / SET_CONFIG): {u32 offset, u32 size, u32 flags,
/// size bytes}.
public struct VhostUserConfigSpace: Equatable, Sendable {
    public var offset: UInt32
    public var flags: UInt32
    public var data: [UInt8]
    public static let headerByteCount = 12
    /// QEMU's VHOST_USER_MAX_CONFIG_SIZE. qemu-storage-daemon 7.2 drops the connection when a
    /// GET_CONFIG payload does not fit its message buffer (a 4096-byte request gets
    /// ECONNRESET), so the frontend refuses larger requests before sending them.
    public static let maxDataSize = 256

    public init(offset: UInt32, flags: UInt32 = 0, data: [UInt8]) {
        self.offset = offset
        self.flags = flags
        self.data = data
    }

    /// Decodes a payload whose size field matches the bytes that follow the header.
    public init?(decoding bytes: [UInt8]) {
        guard bytes.count >= Self.headerByteCount else { return nil }
        let r = WireReader(bytes)
        let size = Int(r.u32(at: 4))
        guard bytes.count == Self.headerByteCount + size else { return nil }
        self.init(offset: r.u32(at: 0), flags: r.u32(at: 8), data: Array(bytes[Self.headerByteCount...]))
    }

    public var encoded: [UInt8] {
        var b: [UInt8] = []
        b.reserveCapacity(Self.headerByteCount + data.count)
        b.appendNative(offset)
        b.appendNative(UInt32(data.count))
        b.appendNative(flags)
        b.append(contentsOf: data)
        return b
    }
}

/// One message: header and payload. Descriptors travel beside it (SCM_RIGHTS), not in it.
public struct VhostUserMessage: Equatable, Sendable {
    public var header: VhostUserHeader
    public var payload: [UInt8]

    /// The largest payload `decode` accepts (the largest payload of any message we know is
    /// a full memory table or a config space of 256 bytes, both under 300 bytes).
    public static let maxPayloadSize = 4096

    /// A request from the frontend: version 1, NEED_REPLY when asked, size from the payload.
    public init(_ request: VhostUserRequest, needReply: Bool = false, payload: [UInt8] = []) {
        header = VhostUserHeader(request: request.rawValue,
                                 flags: VhostUserHeader.version | (needReply ? VhostUserHeader.needReplyFlag : 0),
                                 size: UInt32(payload.count))
        self.payload = payload
    }

    public init(header: VhostUserHeader, payload: [UInt8]) {
        self.header = header
        self.payload = payload
    }

    /// A u64 payload (GET_FEATURES replies, SET_FEATURES, REPLY_ACK, ...).
    public static func u64(_ value: UInt64) -> [UInt8] {
        var b: [UInt8] = []
        b.reserveCapacity(8)
        b.appendNative(value)
        return b
    }

    /// Header followed by payload: what goes into one sendmsg(2).
    public var encoded: [UInt8] {
        var b: [UInt8] = []
        b.reserveCapacity(VhostUserHeader.byteCount + payload.count)
        header.encode(into: &b)
        b.append(contentsOf: payload)
        return b
    }

    /// Decodes one whole message from the start of `bytes`. Returns nil when the bytes are
    /// not yet a whole message or the size field is above `maxPayloadSize`; the caller tells
    /// those apart by `bytes.count`.
    public static func decode(_ bytes: [UInt8], maxPayloadSize: Int = maxPayloadSize) -> (message: VhostUserMessage, consumed: Int)? {
        guard let header = VhostUserHeader(decoding: bytes), Int(header.size) <= maxPayloadSize else { return nil }
        let end = VhostUserHeader.byteCount + Int(header.size)
        guard bytes.count >= end else { return nil }
        return (VhostUserMessage(header: header, payload: Array(bytes[VhostUserHeader.byteCount..<end])), end)
    }
}

/// What a reply to a request must look like, and its checks. Every field of the reply is the
/// backend's word and is checked before use (rust-vmm's `is_valid()` discipline).
public enum VhostUserExpectedReply: Equatable, Sendable {
    /// REPLY_ACK: a u64, zero for success.
    case ack
    /// A u64 value (GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS).
    case u64
    /// A vring state for vring `index` (GET_VRING_BASE).
    case vringState(index: UInt32)
    /// The config space asked for: header echoing `offset` and `size`, then `size` bytes; or
    /// an empty payload, the spec's way of refusing.
    case config(offset: UInt32, size: UInt32)

    /// Checks a reply's header, and the number of descriptors that came with it, against the
    /// request it answers. Returns the number of payload bytes to read next.
    public func check(_ header: VhostUserHeader, answering request: VhostUserRequest, descriptors: Int) throws(VhostUserError) -> Int {
        let name = request.description
        // Replies to our requests never carry descriptors (we negotiate nothing whose reply
        // does: postcopy, inflight tracking). The caller has closed them already.
        guard descriptors == 0 else {
            throw .malformedReply("\(name): reply carried \(descriptors) unexpected descriptor(s)")
        }
        guard header.flags & VhostUserHeader.versionMask == VhostUserHeader.version else {
            throw .malformedReply("\(name): reply has protocol version \(header.flags & VhostUserHeader.versionMask), not 1")
        }
        guard header.flags & VhostUserHeader.replyFlag != 0 else {
            throw .malformedReply("\(name): message without the REPLY flag (flags 0x\(String(header.flags, radix: 16)))")
        }
        // NEED_REPLY may be echoed (libvhost-user keeps the request's flags); nothing else.
        let known = VhostUserHeader.versionMask | VhostUserHeader.replyFlag | VhostUserHeader.needReplyFlag
        guard header.flags & ~known == 0 else {
            throw .malformedReply("\(name): reply has unknown flags 0x\(String(header.flags, radix: 16))")
        }
        guard header.request == request.rawValue else {
            let got = VhostUserRequest(rawValue: header.request).map(\.description) ?? "request \(header.request)"
            throw .malformedReply("\(name): got a reply to \(got)")
        }
        let size = Int(header.size)
        switch self {
        case .ack, .u64:
            guard size == 8 else { throw .malformedReply("\(name): reply of \(size) bytes, a u64 has 8") }
        case .vringState:
            guard size == VhostUserVringState.byteCount else {
                throw .malformedReply("\(name): reply of \(size) bytes, a vring state has \(VhostUserVringState.byteCount)")
            }
        case .config(_, let want):
            let full = VhostUserConfigSpace.headerByteCount + Int(want)
            guard size == full || size == 0 else {
                throw .malformedReply("\(name): reply of \(size) bytes, expected \(full) (or 0 for an error)")
            }
        }
        return size
    }

    /// Decodes a reply payload of exactly the size `check` returned.
    public func decode(_ payload: [UInt8], answering request: VhostUserRequest) throws(VhostUserError) -> VhostUserReplyValue {
        let name = request.description
        switch self {
        case .ack:
            guard payload.count == 8 else { throw .malformedReply("\(name): ack of \(payload.count) bytes") }
            let code = WireReader(payload).u64(at: 0)
            guard code == 0 else { throw .rejected(request: name, code: code) }
            return .none
        case .u64:
            guard payload.count == 8 else { throw .malformedReply("\(name): u64 of \(payload.count) bytes") }
            return .u64(WireReader(payload).u64(at: 0))
        case .vringState(let index):
            guard let state = VhostUserVringState(decoding: payload) else {
                throw .malformedReply("\(name): vring state of \(payload.count) bytes")
            }
            guard state.index == index else {
                throw .malformedReply("\(name): reply for vring \(state.index), asked for \(index)")
            }
            return .vringState(state)
        case .config(let offset, let size):
            if payload.isEmpty { throw .rejected(request: name, code: 0) }
            guard let config = VhostUserConfigSpace(decoding: payload) else {
                throw .malformedReply("\(name): config payload of \(payload.count) bytes does not match its size field")
            }
            guard config.offset == offset, config.data.count == Int(size) else {
                throw .malformedReply("\(name): reply for \(config.data.count) bytes at offset \(config.offset), asked for \(size) at \(offset)")
            }
            return .config(config.data)
        }
    }
}

/// A decoded reply.
public enum VhostUserReplyValue: Equatable, Sendable {
    case none
    case u64(UInt64)
    case vringState(VhostUserVringState)
    case config([UInt8])
}

// MARK: - Native-order byte access

extension [UInt8] {
    @inline(__always)
    mutating func appendNative<T: FixedWidthInteger>(_ value: T) {
        Swift.withUnsafeBytes(of: value) { append(contentsOf: $0) }
    }
}

/// vhost-user's reader. The protocol is native-endian (the spec: "in the host's byte
/// order"), which on the only platform Outboard runs on (x86-64) is little-endian.
typealias WireReader = OutboardSystem.WireReader<VhostUserError>

extension VhostUserError: WireFailure {
    public static func malformed(_ reason: String) -> VhostUserError { .malformedReply(reason) }
}
