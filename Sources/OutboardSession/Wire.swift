import OutboardSystem

// The control protocol's errors; its encoding is OutboardSystem's WireWriter and WireReader.


/// Why a control message was refused.
public enum ControlError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The message is malformed: truncated, trailing bytes, a bad field. `reason` says which.
    case malformed(String)
    /// The message is bigger than the protocol allows.
    case tooLarge(size: Int, limit: Int)
    /// A protocol version this build does not speak.
    case unsupportedVersion(UInt16)
    /// A message type this build does not know.
    case unknownType(UInt16)
    /// The message came with the wrong number of file descriptors.
    case wrongDescriptorCount(type: String, expected: Int, received: Int)

    public var description: String {
        switch self {
        case .malformed(let r): return "malformed control message: \(r)"
        case .tooLarge(let s, let l): return "control message of \(s) bytes exceeds the limit of \(l)"
        case .unsupportedVersion(let v): return "control protocol version \(v) not supported (this build speaks \(ControlProtocol.version))"
        case .unknownType(let t): return "unknown control message type \(t)"
        case .wrongDescriptorCount(let t, let e, let r): return "\(t) must carry \(e) file descriptors, it carried \(r)"
        }
    }
}

extension ControlError: WireFailure {}

/// The control protocol's reader: a malformed field is a `ControlError.malformed`.
typealias ControlReader = WireReader<ControlError>
