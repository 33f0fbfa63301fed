import CLinux
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

// Plain files and pipes, for the tools around the drivers (disk images, configs, the
// output of programs the benchmarks run): every call through `sys`, every descriptor
// close-on-exec and owned.

extension OwnedFD {
    /// Opens `path` (open(2), always with O_CLOEXEC); `flags` as open(2)'s, e.g.
    /// `O_WRONLY | O_CREAT | O_TRUNC`; `mode` for a file it creates.
    public static func open(_ path: String, _ flags: CInt, mode: mode_t = 0o644) throws(Errno) -> OwnedFD {
        OwnedFD(adopting: try sys { Glibc.open(path, flags | O_CLOEXEC, mode) })
    }

    /// Both ends of a new pipe (pipe2(2), O_CLOEXEC).
    public static func pipe() throws(Errno) -> PipeEnds {
        var fds: [CInt] = [-1, -1]
        _ = try sys { ob_pipe_cloexec(&fds) }
        return PipeEnds(read: OwnedFD(adopting: fds[0]), write: OwnedFD(adopting: fds[1]))
    }

    /// Reads what is there, up to `buffer.count` bytes (read(2)); 0 at the end.
    public func read(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
        let fd = raw.rawValue
        return try sys { Glibc.read(fd, buffer.baseAddress, buffer.count) }
    }

    /// Everything up to the end of the file (or pipe), at most `limit` bytes: more is an
    /// error (EFBIG), not a silent cut.
    public func readToEnd(limit: Int = 1 << 30) throws(Errno) -> [UInt8] {
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = try chunk.withUnsafeMutableBytes { b in Result { () throws(Errno) in try read(into: b) } }.get()
            if n == 0 { return out }
            guard out.count + n <= limit else { throw Errno.fileTooLarge }
            out.append(contentsOf: chunk[0..<n])
        }
    }

    /// Writes all of `bytes` (write(2), or pwrite(2) at `offset`), resuming after short
    /// writes.
    public func writeAll(_ bytes: UnsafeRawBufferPointer, at offset: Int? = nil) throws(Errno) {
        let fd = raw.rawValue
        var done = 0
        while done < bytes.count {
            let p = bytes.baseAddress! + done, n = bytes.count - done
            let wrote: Int
            if let offset {
                let at = off_t(offset + done)
                wrote = try sys { pwrite(fd, p, n, at) }
            } else {
                wrote = try sys { Glibc.write(fd, p, n) }
            }
            guard wrote > 0 else { throw Errno.ioError }
            done += wrote
        }
    }

    /// As writeAll(_:at:), for an array.
    public func writeAll(_ bytes: [UInt8], at offset: Int? = nil) throws(Errno) {
        try bytes.withUnsafeBytes { b in Result { () throws(Errno) in try writeAll(b, at: offset) } }.get()
    }

    /// Waits until there is something to read (or the end), true; false once `deadline`
    /// (Clock.monotonicNanoseconds) has passed. poll(2).
    public func waitReadable(until deadline: UInt64) throws(Errno) -> Bool {
        try pollUntil(raw.rawValue, Int16(POLLIN), deadline: deadline)
    }

    /// Sets the file's size (ftruncate(2)).
    public func truncate(to size: Int) throws(Errno) {
        let fd = raw.rawValue
        _ = try sys { ftruncate(fd, off_t(size)) }
    }
}

/// Paths.
public enum FileSystem {
    /// Creates the directory `path` (mkdir(2)); one that exists already is fine.
    public static func makeDirectory(_ path: String, mode: mode_t = 0o755) throws(Errno) {
        do { _ = try sys { mkdir(path, mode) } } catch .fileExists { return }
    }

    /// Sets the permission bits of `path` (chmod(2)).
    public static func setMode(_ path: String, _ mode: mode_t) throws(Errno) {
        _ = try sys { chmod(path, mode) }
    }
}

/// The two ends of a pipe, each owned.
@frozen
public struct PipeEnds: ~Copyable, Sendable {
    public var read: OwnedFD
    public var write: OwnedFD
}

/// poll(2) on one descriptor for `events` until `deadline` (Clock.monotonicNanoseconds):
/// true when ready, or on hang-up or error (which the next call on it reports); false
/// once the deadline has passed. A closed descriptor is EBADF.
func pollUntil(_ fd: CInt, _ events: Int16, deadline: UInt64) throws(Errno) -> Bool {
    while true {
        let now = Clock.monotonicNanoseconds
        guard now < deadline else { return false }
        // Round up, so as never to spin on a 0 ms poll just before the deadline.
        let remaining = deadline - now
        let ms = Int(clamping: remaining / 1_000_000 + (remaining % 1_000_000 == 0 ? 0 : 1))
        var pfd = pollfd(fd: fd, events: events, revents: 0)
        if try sysWaiting(timeoutMilliseconds: ms, { poll(&pfd, 1, $0) }) == 0 { continue }
        if pfd.revents & Int16(POLLNVAL) != 0 { throw Errno.badFileDescriptor }
        return true
    }
}
