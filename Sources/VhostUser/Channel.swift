import CLinux
import OutboardSystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Sending and receiving vhost-user messages on a connected Unix STREAM socket, every wait
/// bounded by a deadline.
///
/// Only sendmsg(2), recvmsg(2) and poll(2) are used: the sandboxed driver may make no other
/// call on the socket (it cannot open, create sockets, or change the descriptor's flags).
/// Every call is non-blocking (MSG_DONTWAIT) and waits go through poll, so no call can block
/// past the deadline whatever the backend does, and the descriptor's own O_NONBLOCK setting
/// does not matter. MSG_NOSIGNAL (set by ob_send_with_fds) turns a vanished backend into
/// EPIPE instead of SIGPIPE.
struct Channel {
    let fd: CInt

    /// Most descriptors one received chunk may carry into our table before they are closed;
    /// any beyond are closed by ob_recv_with_fds (and the kernel, past its control buffer) and
    /// reported as MSG_CTRUNC.
    static let receiveDescriptorSlots = 8

    /// Sends `bytes` with `descriptors` attached to the first byte, handling short sends
    /// (a stream socket may take part of a message; the rest follows without descriptors).
    /// The descriptors are borrowed: the kernel gives the backend its own copies.
    func send(_ bytes: [UInt8], descriptors: [CInt], deadline: UInt64, context: String) throws(VhostUserError) {
        var sent = 0
        while sent < bytes.count {
            let attach = sent == 0 ? descriptors : []
            let result = bytes.withUnsafeBytes { buf in
                attach.withUnsafeBufferPointer { fds in
                    callReturningErrno {
                        ob_send_with_fds(fd, buf.baseAddress! + sent, buf.count - sent, fds.baseAddress, fds.count,
                                         OB_MSG_DONTWAIT)
                    }
                }
            }
            switch result {
            case .success(let n):
                sent += n
            case .failure(let e) where e == .interrupted:
                continue
            case .failure(let e) where e == .resourceTemporarilyUnavailable:
                guard try wait(for: Int16(POLLOUT), deadline: deadline) else {
                    throw .timeout("\(context): the backend is not reading its socket (send buffer full)")
                }
            case .failure(let e):
                throw Self.classify(e, context: context, sending: true)
            }
        }
    }

    /// Receives exactly `count` bytes, handling short reads. Descriptors that arrive with any
    /// of the bytes are closed at once; their number is returned (a reply never has any).
    func receive(count: Int, deadline: UInt64, context: String, part: String) throws(VhostUserError) -> (bytes: [UInt8], strayDescriptors: Int) {
        var bytes = [UInt8](repeating: 0, count: count)
        var got = 0
        var stray = 0
        var fds = [CInt](repeating: -1, count: Self.receiveDescriptorSlots)
        while got < count {
            var nfds = 0
            var msgFlags: CInt = 0
            let result = bytes.withUnsafeMutableBytes { buf in
                callReturningErrno {
                    ob_recv_with_fds(fd, buf.baseAddress! + got, count - got, &fds, fds.count, &nfds, &msgFlags,
                                     OB_MSG_DONTWAIT)
                }
            }
            // Whatever happened, descriptors that arrived are ours to close: never leak one.
            for i in 0..<nfds where fds[i] >= 0 {
                close(fds[i])
                fds[i] = -1
            }
            stray += nfds
            if msgFlags & OB_MSG_CTRUNC != 0 { stray += 1 }  // more were sent than we took
            switch result {
            case .success(0):
                let detail = got == 0 && part == "header" ? "" : " in the middle of a reply (\(part): \(got) of \(count) bytes)"
                throw .disconnected("\(context): backend closed the connection\(detail)")
            case .success(let n):
                got += n
            case .failure(let e) where e == .interrupted:
                continue
            case .failure(let e) where e == .resourceTemporarilyUnavailable:
                guard try wait(for: Int16(POLLIN), deadline: deadline) else {
                    throw .timeout(got == 0 && part == "header"
                        ? "\(context): no reply"
                        : "\(context): reply incomplete (\(part): \(got) of \(count) bytes)")
                }
            case .failure(let e):
                throw Self.classify(e, context: context, sending: false)
            }
        }
        return (bytes, stray)
    }

    /// poll(2) until `events` (or hang-up/error, which the next call reports): true; or
    /// until the deadline: false.
    private func wait(for events: Int16, deadline: UInt64) throws(VhostUserError) -> Bool {
        while true {
            let now = Clock.monotonicNanoseconds
            guard now < deadline else { return false }
            // Round up so we never spin on a 0 ms poll just before the deadline.
            let remaining = deadline - now
            let ms = CInt(clamping: remaining / 1_000_000 + (remaining % 1_000_000 == 0 ? 0 : 1))
            var pfd = pollfd(fd: fd, events: events, revents: 0)
            switch callReturningErrno({ Int(poll(&pfd, 1, ms)) }) {
            case .success(0), .failure(.interrupted):
                continue
            case .success:
                if pfd.revents & Int16(POLLNVAL) != 0 { throw .system(.badFileDescriptor) }
                return true
            case .failure(let e):
                throw .system(e)
            }
        }
    }

    /// Errors that mean the backend is gone become `.disconnected`.
    static func classify(_ e: Errno, context: String, sending: Bool) -> VhostUserError {
        switch e {
        case .brokenPipe, .connectionReset, .socketNotConnected, .connectionAbort:
            return .disconnected("\(context): \(sending ? "send" : "receive") failed: \(e)")
        default:
            return .system(e)
        }
    }
}

/// Runs a call that returns -1 and sets errno on failure, reading errno right after it.
/// `@inline(never)` for the same reason as OutboardSystem's `sys`: nothing (ARC, an
/// allocation) may run between the call and the errno read. EINTR and EAGAIN are left to
/// the caller, which must treat them differently from other errors.
@inline(never)
func callReturningErrno<T: FixedWidthInteger>(_ call: () -> T) -> Result<Int, Errno> {
    let r = call()
    if r == -1 { return .failure(Errno(rawValue: errno)) }
    return .success(Int(r))
}
