import CLinux
import OutboardSystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Sending and receiving vhost-user messages on a connected Unix STREAM socket, every wait
/// bounded by a deadline, over OutboardSystem's StreamSocket: only sendmsg(2), recvmsg(2)
/// and poll(2), each non-blocking, so no call can block past the deadline whatever the
/// backend does (the sandboxed driver may make no other call on the socket).
struct Channel {
    let fd: CInt

    /// Sends `bytes` with `descriptors` attached to the first byte, handling short sends
    /// (a stream socket may take part of a message; the rest follows without descriptors).
    /// The descriptors are borrowed: the kernel gives the backend its own copies.
    func send(_ bytes: [UInt8], descriptors: [CInt], deadline: UInt64, context: String) throws(VhostUserError) {
        let socket = FileDescriptor(rawValue: fd)
        let attached = descriptors.map { FileDescriptor(rawValue: $0) }
        var sent = 0
        while sent < bytes.count {
            let result = bytes.withUnsafeBytes { buf in
                Result { () throws(Errno) in
                    try StreamSocket.send(socket, UnsafeRawBufferPointer(rebasing: buf[sent...]),
                                          descriptors: sent == 0 ? attached : [])
                }
            }
            switch result {
            case .success(let n):
                sent += n
            case .failure(.resourceTemporarilyUnavailable):
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
        let socket = FileDescriptor(rawValue: fd)
        var bytes = [UInt8](repeating: 0, count: count)
        var got = 0
        var stray = 0
        while got < count {
            let result = bytes.withUnsafeMutableBytes { buf in
                Result { () throws(Errno) in
                    try StreamSocket.receive(socket, into: UnsafeMutableRawBufferPointer(rebasing: buf[got...]))
                }
            }
            switch result {
            case .success(let r) where r.count == 0:
                stray += r.strayDescriptors
                let detail = got == 0 && part == "header" ? "" : " in the middle of a reply (\(part): \(got) of \(count) bytes)"
                throw .disconnected("\(context): backend closed the connection\(detail)")
            case .success(let r):
                got += r.count
                stray += r.strayDescriptors
            case .failure(.resourceTemporarilyUnavailable):
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

    /// Until `events` (or hang-up/error, which the next call reports): true; or until the
    /// deadline: false.
    private func wait(for events: Int16, deadline: UInt64) throws(VhostUserError) -> Bool {
        do { return try StreamSocket.wait(FileDescriptor(rawValue: fd), for: events, until: deadline) } catch {
            throw .system(error)
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
