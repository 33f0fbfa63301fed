import OutboardSession
import OutboardSystem
import SystemPackage

/// Why a session call failed (block or net): the `Outboard` library's one error.
/// `recovery` says what a caller can do about it.
public enum SessionError: Error, Equatable, Sendable, CustomStringConvertible, RecoverableError {
    /// Nobody listens on the socket (yet): the manager is starting, or not running.
    case unreachable(path: String, Errno)
    /// The manager (or virtualizer) refused the request.
    case refused(ErrorCode, String)
    /// The session ended: the device failed, the manager went away or shut down.
    case failed(String)
    /// A peer broke the protocol.
    case protocolError(String)
    /// A request this session cannot express (outside the data region, misaligned).
    case invalidRequest(String)
    case system(Errno)

    public var description: String {
        switch self {
        case .unreachable(let path, let e): return "cannot connect to \(path): \(e)"
        case .refused(let code, let m): return "refused (\(code)): \(m)"
        case .failed(let m): return "session failed: \(m)"
        case .protocolError(let m): return "protocol error: \(m)"
        case .invalidRequest(let m): return "invalid request: \(m)"
        case .system(let e): return "system error: \(e)"
        }
    }

    public var recovery: Recovery {
        switch self {
        case .unreachable: return .retry
        case .refused(let code, _): return code.recovery
        // The session is over (the device failed, the manager went away or shut down):
        // open a new one; if the device is gone for good, that open is refused with a
        // code that says so (deviceFailed: fail device).
        case .failed: return .reconnectDevice
        case .protocolError, .invalidRequest: return .fatal
        case .system(let e): return e == .wouldBlock || e == .interrupted ? .retry : .fatal
        }
    }
}
