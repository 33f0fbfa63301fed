import SystemPackage

/// Everything that can go wrong talking to a vhost-user backend. The backend is another
/// process and not trusted: every reply is checked, and each way it can misbehave has its
/// own case, worded for the log of whoever supervises the driver.
public enum VhostUserError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The backend went away: end of stream, ECONNRESET or EPIPE while sending or waiting.
    /// The string says what we were doing. Reconnect (a new connection, a full handshake).
    case disconnected(String)
    /// No complete reply within the frontend's reply timeout. The connection is abandoned
    /// (a late reply would be taken for the answer to the next request). Reconnect; if it
    /// keeps happening, restart the backend.
    case timeout(String)
    /// The backend answered something the protocol does not allow here: wrong request code,
    /// missing REPLY flag, wrong version, wrong size, descriptors attached, echoed fields that
    /// do not match. The connection is abandoned. Reconnect; a backend that keeps doing it is
    /// broken or hostile.
    case malformedReply(String)
    /// The backend refused a request: a REPLY_ACK with a nonzero value, or a GET_CONFIG reply
    /// without payload (the spec's error indication; `code` is then 0). The connection stays
    /// usable, but retrying the same request is pointless.
    case rejected(request: String, code: UInt64)
    /// The request is not allowed by what was negotiated (or offered), or is outside a limit
    /// of the protocol. Nothing was sent; the connection stays usable. A bug in the caller.
    case unsupported(String)
    /// A system call failed for a reason that is not the peer going away, or an argument was
    /// invalid (`.invalidArgument`: nothing was sent).
    case system(Errno)

    public var description: String {
        switch self {
        case .disconnected(let s): return "vhost-user backend disconnected: \(s)"
        case .timeout(let s): return "vhost-user backend timed out: \(s)"
        case .malformedReply(let s): return "malformed vhost-user reply: \(s)"
        case .rejected(let r, let c): return "vhost-user backend rejected \(r) (code \(c))"
        case .unsupported(let s): return "vhost-user request not allowed: \(s)"
        case .system(let e): return "vhost-user system error: \(e)"
        }
    }

    /// True when the remedy is a new connection (and a new handshake): the backend went away,
    /// hung, or broke the protocol. False when reconnecting would change nothing (the backend
    /// refused the request, the caller asked for something not negotiated, a local failure).
    /// rust-vmm's `Error::should_reconnect` makes the same split.
    public var shouldReconnect: Bool {
        switch self {
        case .disconnected, .timeout, .malformedReply: return true
        case .rejected, .unsupported, .system: return false
        }
    }
}
