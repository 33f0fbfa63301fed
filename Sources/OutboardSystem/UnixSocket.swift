import CLinux
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The credentials the kernel recorded for a socket's peer when it connected
/// (getsockopt(2) SO_PEERCRED). The peer cannot forge them.
public struct PeerCredentials: Sendable, Equatable {
    public var pid: pid_t
    public var uid: uid_t
    public var gid: gid_t
}

/// Descriptors received with a message (SCM_RIGHTS). Each one is owned here until taken;
/// those never taken are closed when this value goes away, so a peer that sends more than
/// expected cannot make us leak descriptors.
public struct ReceivedDescriptors: ~Copyable, Sendable {
    private var fds: [CInt]

    init(_ fds: [CInt]) { self.fds = fds }
    deinit { for fd in fds where fd >= 0 { close(fd) } }

    public var count: Int { fds.count }

    /// Takes ownership of the descriptor at `index`; nil if out of range or already taken.
    public mutating func take(_ index: Int) -> OwnedFD? {
        guard index >= 0, index < fds.count, fds[index] >= 0 else { return nil }
        defer { fds[index] = -1 }
        return OwnedFD(adopting: fds[index])
    }
}

/// One received datagram.
@frozen
public struct ReceivedMessage: ~Copyable, Sendable {
    /// Payload bytes (at most the buffer size asked for).
    public var bytes: [UInt8]
    public var descriptors: ReceivedDescriptors
}

/// Why a receive did not produce a usable message.
public enum SocketError: Error, Equatable, Sendable {
    /// A system call failed.
    case system(Errno)
    /// The peer closed the connection (orderly end of stream).
    case closed
    /// The datagram was larger than the receiver's limit; it was discarded (MSG_TRUNC).
    case messageTooLarge(limit: Int)
    /// The peer sent more descriptors than the receiver's limit; all were closed (MSG_CTRUNC).
    case tooManyDescriptors(limit: Int)
}

/// A connected Unix SOCK_SEQPACKET socket: reliable, ordered, message boundaries kept,
/// and a read of 0 bytes means the peer went away. unix(7).
public struct UnixSocket: ~Copyable, Sendable {
    public let fd: OwnedFD

    public init(adopting fd: consuming OwnedFD) { self.fd = fd }

    /// Both ends of a connected pair.
    @frozen
    public struct Pair: ~Copyable, Sendable {
        public var first: UnixSocket
        public var second: UnixSocket
    }

    /// A connected pair (socketpair(2)).
    public static func pair() throws(Errno) -> Pair {
        var fds: [CInt] = [-1, -1]
        _ = try sys { socketpair(AF_UNIX, OB_SOCK_SEQPACKET | OB_SOCK_CLOEXEC, 0, &fds) }
        return Pair(first: UnixSocket(adopting: OwnedFD(adopting: fds[0])),
                    second: UnixSocket(adopting: OwnedFD(adopting: fds[1])))
    }

    /// Connects to a listening socket at `path` (connect(2)).
    public static func connect(path: String) throws(Errno) -> UnixSocket {
        let fd = OwnedFD(adopting: try sys { socket(AF_UNIX, OB_SOCK_SEQPACKET | OB_SOCK_CLOEXEC, 0) })
        let raw = fd.raw.rawValue
        _ = try sys { ob_connect_unix(raw, path) }
        return UnixSocket(adopting: fd)
    }

    /// A connected Unix STREAM socket (a vhost-user device's socket, for instance), as a
    /// plain descriptor: the protocol on it is the caller's. socket(2) + connect(2).
    public static func connectStream(path: String) throws(Errno) -> OwnedFD {
        let fd = OwnedFD(adopting: try sys { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | OB_SOCK_CLOEXEC, 0) })
        let raw = fd.raw.rawValue
        _ = try sys { ob_connect_unix(raw, path) }
        return fd
    }

    /// Sends one message with `descriptors` attached (sendmsg(2), SCM_RIGHTS). The
    /// descriptors stay owned by the caller; the peer receives its own duplicates.
    /// `nonBlocking`: fail with `.wouldBlock` instead of waiting when the peer's receive
    /// queue is full (a server must not let one slow peer stall it).
    public func send(_ bytes: [UInt8], descriptors: [FileDescriptor] = [], nonBlocking: Bool = false) throws(Errno) {
        let raw = fd.raw.rawValue
        let fds = descriptors.map(\.rawValue)
        let flags = nonBlocking ? OB_MSG_DONTWAIT : 0
        let sent = try sys {
            bytes.withUnsafeBytes { buf in ob_send_with_fds(raw, buf.baseAddress, buf.count, fds, fds.count, flags) }
        }
        guard sent == bytes.count else { throw Errno.messageTooLong }
    }

    /// Receives one message of at most `maxBytes` bytes and `maxDescriptors` descriptors.
    /// A larger message or more descriptors are an error, with nothing leaked.
    /// `nonBlocking`: return `.system(.wouldBlock)` instead of waiting.
    ///
    /// A peer that closed with messages of ours still unread makes the kernel report
    /// ECONNRESET once, ahead of the messages the peer sent before it closed (a server
    /// refusing a client, for instance, and closing before it read the client's request).
    /// Those messages are what the caller needs, so the reset is passed over once: the
    /// next receive returns them, and then the end of the connection (`.closed`).
    public func receive(maxBytes: Int, maxDescriptors: Int = 0, nonBlocking: Bool = false) throws(SocketError) -> ReceivedMessage {
        do {
            return try receiveOnce(maxBytes: maxBytes, maxDescriptors: maxDescriptors, nonBlocking: nonBlocking)
        } catch .system(.connectionReset) {
            // The peer is gone, so this cannot block: its last messages, or the end.
            return try receiveOnce(maxBytes: maxBytes, maxDescriptors: maxDescriptors, nonBlocking: true)
        }
    }

    private func receiveOnce(maxBytes: Int, maxDescriptors: Int, nonBlocking: Bool) throws(SocketError) -> ReceivedMessage {
        var bytes = [UInt8](repeating: 0, count: maxBytes)
        var fds = [CInt](repeating: -1, count: max(maxDescriptors, 1))
        var nfds = 0
        var flags: CInt = 0
        let raw = fd.raw.rawValue
        let maxFDs = maxDescriptors
        let n: Int
        do {
            n = try sys {
                bytes.withUnsafeMutableBytes { buf in
                    ob_recv_with_fds(raw, buf.baseAddress, buf.count, &fds, maxFDs, &nfds, &flags,
                                     OB_MSG_TRUNC | (nonBlocking ? OB_MSG_DONTWAIT : 0))
                }
            }
        } catch {
            throw .system(error)
        }
        let received = ReceivedDescriptors(Array(fds.prefix(nfds)))
        if flags & OB_MSG_CTRUNC != 0 { throw .tooManyDescriptors(limit: maxDescriptors) }
        // With MSG_TRUNC in the call flags, recvmsg returns the datagram's real length.
        if n > maxBytes || flags & OB_MSG_TRUNC != 0 { throw .messageTooLarge(limit: maxBytes) }
        if n == 0 && nfds == 0 { throw .closed }
        bytes.removeSubrange(n...)
        return ReceivedMessage(bytes: bytes, descriptors: received)
    }

    /// Shuts the connection down both ways (shutdown(2)): later sends fail with EPIPE and
    /// receives see the end of the stream; the peer sees the close. The descriptor stays
    /// open until its owner goes away.
    public func shutdown() throws(Errno) {
        let raw = fd.raw.rawValue
        _ = try sys { Glibc.shutdown(raw, CInt(SHUT_RDWR)) }
    }

    /// The peer's credentials (SO_PEERCRED).
    public func peerCredentials() throws(Errno) -> PeerCredentials {
        var pid: pid_t = 0, uid: uid_t = 0, gid: gid_t = 0
        let raw = fd.raw.rawValue
        _ = try sys { ob_peer_credentials(raw, &pid, &uid, &gid) }
        return PeerCredentials(pid: pid, uid: uid, gid: gid)
    }
}

/// A listening Unix SOCK_SEQPACKET socket bound to a path. The path is removed again
/// when the listener goes away.
public struct UnixListener: ~Copyable, Sendable {
    public let fd: OwnedFD
    public let path: String

    /// Binds and listens at `path`; a stale socket file at `path` is replaced.
    public init(path: String, backlog: Int = 64) throws(Errno) {
        let fd = OwnedFD(adopting: try sys { socket(AF_UNIX, OB_SOCK_SEQPACKET | OB_SOCK_CLOEXEC, 0) })
        let raw = fd.raw.rawValue
        unlink(path)
        _ = try sys { ob_bind_unix(raw, path) }
        _ = try sys { listen(raw, CInt(backlog)) }
        self.fd = fd
        self.path = path
    }

    deinit { unlink(path) }

    /// Accepts one connection (accept4(2), SOCK_CLOEXEC).
    public func accept() throws(Errno) -> UnixSocket {
        let raw = fd.raw.rawValue
        return UnixSocket(adopting: OwnedFD(adopting: try sys { ob_accept(raw) }))
    }
}

extension UnixSocket {
    /// Waits until a message (or the peer's close) can be read, at most
    /// `timeoutMilliseconds` (negative: no limit). Returns false on timeout. poll(2).
    public func waitReadable(timeoutMilliseconds: Int) throws(Errno) -> Bool {
        var pfd = pollfd(fd: fd.raw.rawValue, events: Int16(POLLIN), revents: 0)
        return try sysWaiting(timeoutMilliseconds: timeoutMilliseconds) { poll(&pfd, 1, $0) } > 0
    }
}
