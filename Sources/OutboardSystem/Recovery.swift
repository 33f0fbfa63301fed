/// What a supervisor or a client should do about an error, from least to most drastic.
/// Every module's error type says which applies to each of its cases (`recovery`), so
/// that no caller decides by an error's text.
public enum Recovery: UInt8, Sendable, Comparable, CaseIterable, CustomStringConvertible {
    /// Transient: the same operation may succeed if tried again (a peer not yet
    /// listening, a full queue, EAGAIN).
    case retry = 1
    /// The connection to the device is unusable; a new one may work (a vhost-user backend
    /// that closed or answered out of protocol).
    case reconnectDevice = 2
    /// The driver process is in a state it cannot leave by itself; start a new one.
    case restartDriver = 3
    /// The device cannot be used with this configuration; stop trying until told.
    case failDevice = 4
    /// Nothing to retry: a bug, a bad configuration, or a refusal that will not change.
    case fatal = 5

    public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }

    public var description: String {
        switch self {
        case .retry: return "retry"
        case .reconnectDevice: return "reconnect device"
        case .restartDriver: return "restart driver"
        case .failDevice: return "fail device"
        case .fatal: return "fatal"
        }
    }
}

/// An error that says how to recover from it.
public protocol RecoverableError: Error {
    var recovery: Recovery { get }
}
