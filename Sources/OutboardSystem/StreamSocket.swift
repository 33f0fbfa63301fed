import CLinux
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Non-blocking I/O on a connected Unix STREAM socket (a vhost-user device's, for
/// instance), for a caller that runs its own protocol and deadlines on it. A stream may
/// take or give only part of what was asked, so each call returns how much moved, and
/// waiting is the caller's (`wait(for:until:)`). Every call is non-blocking (MSG_DONTWAIT),
/// whatever the descriptor's own O_NONBLOCK setting, and only sendmsg(2), recvmsg(2) and
/// poll(2) are used: a sandboxed driver may make no other call on such a socket. EINTR is
/// retried as everywhere (`sys`); a full or empty socket throws `.resourceTemporarilyUnavailable`.
/// The descriptor stays the caller's.
public enum StreamSocket {
    /// Sends what it can of `bytes` with `descriptors` attached to the first byte
    /// (sendmsg(2), SCM_RIGHTS, MSG_NOSIGNAL: a vanished peer is EPIPE, not SIGPIPE).
    /// Returns how many bytes went. The descriptors are borrowed: the peer gets its own
    /// copies.
    public static func send(_ fd: FileDescriptor, _ bytes: UnsafeRawBufferPointer,
                            descriptors: [FileDescriptor] = []) throws(Errno) -> Int {
        let raw = fd.rawValue
        let fds = descriptors.map(\.rawValue)
        return try sys { ob_send_with_fds(raw, bytes.baseAddress, bytes.count, fds, fds.count, OB_MSG_DONTWAIT) }
    }

    /// What one receive brought.
    public struct Received: Sendable, Equatable {
        /// Bytes received; 0 means the peer closed the connection.
        public var count: Int
        /// Descriptors that came with the bytes. They were closed at once (never leaked):
        /// a caller that expects none reports them; one more is counted when the kernel
        /// dropped some (MSG_CTRUNC).
        public var strayDescriptors: Int
    }

    /// Receives what is there, up to `buffer.count` bytes (recvmsg(2)).
    public static func receive(_ fd: FileDescriptor, into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Received {
        let raw = fd.rawValue
        let slots = 8
        var fds = [CInt](repeating: -1, count: slots)
        var nfds = 0
        var flags: CInt = 0
        let n = try sys {
            ob_recv_with_fds(raw, buffer.baseAddress, buffer.count, &fds, slots, &nfds, &flags, OB_MSG_DONTWAIT)
        }
        for i in 0..<nfds where fds[i] >= 0 { close(fds[i]) }
        return Received(count: n, strayDescriptors: nfds + (flags & OB_MSG_CTRUNC != 0 ? 1 : 0))
    }

    /// Waits until `events` (POLLIN, POLLOUT) are ready, or the peer hung up or the socket
    /// failed, which the next send or receive reports: true. False once `deadline`
    /// (Clock.monotonicNanoseconds) has passed. poll(2).
    public static func wait(_ fd: FileDescriptor, for events: Int16, until deadline: UInt64) throws(Errno) -> Bool {
        try pollUntil(fd.rawValue, events, deadline: deadline)
    }
}
