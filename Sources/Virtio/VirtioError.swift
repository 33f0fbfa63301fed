/// Everything that can go wrong in the Virtio module. One enum for the module; each case
/// says what went wrong, `recovery` says what the owner does about it.
public enum VirtioError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The device does not offer these required feature bits (a mask). The device cannot be
    /// used with this driver.
    case missingFeatures(UInt64)
    /// The device's configuration space is short or holds an impossible value. The device
    /// cannot be used (or not with the feature the field belongs to).
    case invalidConfig(String)
    /// The requested virtqueue layout is impossible (queue size, indirect table size). A
    /// caller bug.
    case invalidLayout(String)
    /// Not enough free descriptors for the chain now. Transient: pop completions, retry.
    case queueFull
    /// The chain is malformed (no buffers, too many, a zero length, device-readable after
    /// device-writable, too many bytes). A caller bug; the queue is unchanged.
    case invalidChain(String)
    /// The device broke the ring protocol (impossible used.idx, unknown or duplicate id,
    /// impossible length). Sticky: the queue moves nothing more until it is reset and the
    /// device reconnected.
    case deviceProtocol(String)

    /// What the owner of a queue or device does about an error, at the virtqueue's level
    /// (a driver maps it to the process-level `Recovery` its supervisor acts on).
    public enum Remedy: Equatable, Sendable {
        /// Wait for completions and try again (`queueFull`).
        case retryLater
        /// The caller passed something impossible; fix the caller.
        case fixCaller
        /// Reset the queue (and reconnect the device), then resubmit what was in flight.
        case resetQueue
        /// The device is unusable as configured: do not use it (or drop the feature).
        case rejectDevice
    }

    public var remedy: Remedy {
        switch self {
        case .queueFull: return .retryLater
        case .invalidChain, .invalidLayout: return .fixCaller
        case .deviceProtocol: return .resetQueue
        case .missingFeatures, .invalidConfig: return .rejectDevice
        }
    }

    public var description: String {
        switch self {
        case .missingFeatures(let mask):
            return "device does not offer required feature bits 0x\(String(mask, radix: 16))"
        case .invalidConfig(let why):
            return "invalid device configuration: \(why)"
        case .invalidLayout(let why):
            return "invalid virtqueue layout: \(why)"
        case .queueFull:
            return "virtqueue full: not enough free descriptors for the chain"
        case .invalidChain(let why):
            return "invalid descriptor chain: \(why)"
        case .deviceProtocol(let why):
            return "device broke the virtqueue protocol (queue must be reset): \(why)"
        }
    }
}
