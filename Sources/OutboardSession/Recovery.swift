import OutboardSystem
import SystemPackage

// How the session layer's errors and reports map to a Recovery (OutboardSystem), so that
// the manager's supervisor and the client library act on a classification, never on text.

extension ErrorCode {
    /// What a client should do about a refusal with this code.
    public var recovery: Recovery {
        switch self {
        // Wait: the device is not reachable yet, or the manager is short of memory or
        // descriptors for the moment.
        case .busy, .internalError: return .retry
        case .deviceFailed: return .failDevice
        // The request or the caller is wrong, or a limit of the config: asking again
        // changes nothing.
        case .malformed, .unknownDevice, .permissionDenied, .limitExceeded, .invalidArgument: return .fatal
        }
    }
}

extension ControlError: RecoverableError {
    /// A peer that sent what the protocol refuses will send it again: the connection (or
    /// the driver process behind it) is not worth another message.
    public var recovery: Recovery { .fatal }
}

extension ChannelError: RecoverableError {
    public var recovery: Recovery {
        switch self {
        case .socket(.system(.wouldBlock)), .socket(.system(.interrupted)): return .retry
        // The peer is gone or the connection broke: a new connection may work.
        case .socket(.closed), .socket(.system): return .reconnectDevice
        case .socket(.messageTooLarge), .socket(.tooManyDescriptors), .control: return .fatal
        }
    }
}

extension SessionSetupError: RecoverableError {
    public var recovery: Recovery {
        switch self {
        // Out of memory or descriptors, most likely: the same set-up may work later.
        case .system: return .retry
        case .invalid, .queue: return .fatal
        }
    }
}

/// How a driver process tells the manager, by its exit status, what to do about the
/// failure that ended it (reports the driver can still send go in `deviceLost`).
/// Exit status `base + recovery.rawValue` carries a classification; 0 (the manager closed
/// the socket), any other status and death by a signal mean a new driver (`.restartDriver`).
public enum DriverExit {
    public static let base: CInt = 64

    public static func status(for recovery: Recovery) -> CInt { base + CInt(recovery.rawValue) }

    /// The classification an exit carries.
    public static func recovery(_ status: ExitStatus) -> Recovery {
        if case .exited(let code) = status, code > base, code <= base + 255,
           let r = Recovery(rawValue: UInt8(code - base)) {
            return r
        }
        return .restartDriver
    }
}
