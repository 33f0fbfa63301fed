import OutboardSystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A qemu-storage-daemon serving one image as vhost-user-blk devices (one export per
/// socket, all on the same block node): the device the demo, the block benchmark and the
/// tests drive. `stop()` ends it with SIGTERM (SIGKILL after 5 s); dropped unstopped, it
/// is killed.
public struct StorageDaemon: ~Copyable {
    public let image: String
    public let sockets: [String]
    var child: ChildProcess

    public var pid: pid_t { child.pid }

    /// The daemon's path: the first on `searchPath` (default: PATH), or Debian's place for it.
    public static func executable(searchPath: String? = nil) -> String? {
        let path = searchPath ?? getenv("PATH").map { String(cString: $0) } ?? "/usr/bin:/bin"
        // Strings, not the Character arrays that `split(...) + [literal]` infers, which
        // interpolate as ["/", "u", ...] and never name a file.
        let dirs: [String] = path.split(separator: ":").map(String.init) + ["/usr/bin"]
        for dir in dirs where !dir.isEmpty {
            let candidate = dir + "/qemu-storage-daemon"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }

    /// Starts the daemon and waits (up to 10 s) until it listens on every socket.
    /// `aio`: "io_uring" or "threads". `failingReadSector`: reads that touch this 512-byte
    /// sector fail with EIO inside the device (QEMU's blkdebug driver between the image file
    /// and the raw format), every time: a real device error, for tests.
    public init(image: String, sockets: [String], writable: Bool = true, aio: String = "io_uring",
                failingReadSector: UInt64? = nil) throws(LabError) {
        guard let exe = Self.executable() else {
            throw LabError("qemu-storage-daemon not found (Debian package qemu-system-common; scripts/setup.sh installs it)")
        }
        for s in sockets { unlink(s) }
        var args = ["--blockdev", "driver=file,node-name=file0,filename=\(image),aio=\(aio),cache.direct=off"]
        if let sector = failingReadSector {
            // raw-format fires blkdebug's read_aio event for every read; the rule then fails
            // the reads that overlap `sector` with errno 5 (EIO), and keeps doing so.
            args += ["--blockdev", "driver=blkdebug,node-name=debug0,image=file0,inject-error.0.event=read_aio,"
                     + "inject-error.0.errno=5,inject-error.0.sector=\(sector),inject-error.0.once=off,inject-error.0.iotype=read",
                     "--blockdev", "driver=raw,node-name=disk0,file=debug0"]
        } else {
            args += ["--blockdev", "driver=raw,node-name=disk0,file=file0"]
        }
        for (i, s) in sockets.enumerated() {
            args += ["--export", "type=vhost-user-blk,id=exp\(i),node-name=disk0,addr.type=unix,addr.path=\(s),writable=\(writable ? "on" : "off"),num-queues=1"]
        }
        var c = try Self.spawn(exe, args)
        try Self.waitForSockets(&c, sockets)
        child = c
        self.image = image
        self.sockets = sockets
    }

    /// Waits until the daemon listens on every socket, so that a connect cannot be refused.
    /// The socket file is not enough: QEMU creates it with bind(2) and only then calls
    /// listen(2) (util/qemu-sockets.c, unix_listen_saddr), and a connect in between gets
    /// ECONNREFUSED. A stalled daemon (two contended CPUs) can sit in that gap for
    /// milliseconds.
    static func waitForSockets(_ child: inout ChildProcess, _ sockets: [String]) throws(LabError) {
        let deadline = Clock.monotonicNanoseconds + 10_000_000_000
        while true {
            if unixSocketsListening(sockets, pid: child.pid) { return }
            if let status = try? child.wait(timeoutMilliseconds: 10) {
                throw LabError("qemu-storage-daemon exited at start: \(status)")
            }
            if Clock.monotonicNanoseconds > deadline {
                try? child.signal(SIGKILL)
                _ = try? child.wait()
                throw LabError("qemu-storage-daemon did not listen on its sockets within 10 s")
            }
        }
    }

    static func spawn(_ exe: String, _ args: [String]) throws(LabError) -> ChildProcess {
        do { return try ChildProcess(executable: exe, arguments: args) } catch {
            throw LabError("cannot start qemu-storage-daemon: \(error)")
        }
    }

    /// Kills the daemon the hard way (a device that vanishes), or stops it politely. A
    /// daemon never stopped is killed when this value goes away (ChildProcess's deinit).
    public mutating func stop(kill hard: Bool = false) {
        child.terminate(hard ? SIGKILL : SIGTERM)
    }
}

/// What went wrong setting up or running a benchmark or test peer (qemu-storage-daemon,
/// an image, fio, the C reference frontend): a sentence for people.
public struct LabError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ s: String) { description = s }
}

/// Creates (or replaces) an image file of `bytes`. `fill`: pseudo-random contents
/// (written, so reads hit real data in the page cache) instead of a sparse file.
public func makeImage(path: String, bytes: Int, fill: Bool, seed: UInt64 = 1) throws(LabError) {
    let fd: OwnedFD
    do { fd = try OwnedFD.open(path, O_WRONLY | O_CREAT | O_TRUNC) } catch { throw LabError("cannot create \(path): \(error)") }
    do { try fd.truncate(to: bytes) } catch { throw LabError("cannot size \(path): \(error)") }
    guard fill else { return }
    let chunk = 1 << 20
    let buf = UnsafeMutableBufferPointer<UInt64>.allocate(capacity: chunk / 8)
    defer { buf.deallocate() }
    var x = seed | 1
    var done = 0
    while done < bytes {
        for i in 0..<buf.count {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            buf[i] = x
        }
        let n = min(chunk, bytes - done)
        do { try fd.writeAll(UnsafeRawBufferPointer(start: buf.baseAddress, count: n), at: done) } catch {
            throw LabError("cannot write \(path): \(error)")
        }
        done += n
    }
}

/// Whether process `pid` holds, for every path in `paths`, a listening Unix stream socket
/// bound to that path, and the path is a socket file: then a connect to it reaches that
/// socket's accept queue and is not refused. Listening is __SO_ACCEPTCON (0x10000) in the
/// Flags column of /proc/net/unix; the socket's inode there must be one of `pid`'s open
/// descriptors (/proc/PID/fd), so that a listener left by an earlier process on a reused
/// path does not count. Sees only sockets of this network namespace.
public func unixSocketsListening(_ paths: [String], pid: pid_t) -> Bool {
    var st = stat()
    guard paths.allSatisfy({ stat($0, &st) == 0 && st.st_mode & S_IFMT == S_IFSOCK }) else { return false }
    // The process's socket inodes: its fd links read "socket:[INODE]".
    var inodes = Set<UInt64>()
    guard let dir = opendir("/proc/\(pid)/fd") else { return false }
    defer { closedir(dir) }
    var link = [CChar](repeating: 0, count: 64)
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        guard name.first?.isNumber == true else { continue }
        let n = readlink("/proc/\(pid)/fd/\(name)", &link, link.count - 1)
        guard n > 9 else { continue }
        let target = String(decoding: link[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        if target.hasPrefix("socket:["), target.hasSuffix("]"), let i = UInt64(target.dropFirst(8).dropLast()) {
            inodes.insert(i)
        }
    }
    guard let table = try? OwnedFD.open("/proc/net/unix", O_RDONLY).readToEnd(limit: 64 << 20) else { return false }
    var listening = Set<String>()
    // "Num: RefCount Protocol Flags Type St Inode Path", the path only for bound sockets.
    for line in table.split(separator: UInt8(ascii: "\n")).dropFirst() {
        let f = line.split(separator: UInt8(ascii: " "), maxSplits: 7, omittingEmptySubsequences: true)
        guard f.count == 8, let flags = UInt32(String(decoding: f[3], as: UTF8.self), radix: 16),
              flags & 0x10000 != 0, let inode = UInt64(String(decoding: f[6], as: UTF8.self)),
              inodes.contains(inode) else { continue }
        listening.insert(String(decoding: f[7], as: UTF8.self))
    }
    return paths.allSatisfy { listening.contains($0) }
}

/// CPU time (user + system) a process has used so far, from /proc/PID/stat; nil when it
/// is gone.
public func processCPUNanoseconds(pid: pid_t) -> UInt64? {
    guard let buf = try? OwnedFD.open("/proc/\(pid)/stat", O_RDONLY).readToEnd(limit: 4096), !buf.isEmpty else { return nil }
    let n = buf.count
    // Fields after the command name (which is in parentheses and may hold spaces).
    guard let close = buf[0..<n].lastIndex(of: UInt8(ascii: ")")) else { return nil }
    let fields = buf[(close + 2)..<n].split(separator: UInt8(ascii: " "))
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    guard fields.count > 13, let u = UInt64(String(decoding: fields[11], as: UTF8.self)),
          let s = UInt64(String(decoding: fields[12], as: UTF8.self)) else { return nil }
    let tick = UInt64(sysconf(Int32(_SC_CLK_TCK)))
    return (u + s) * (1_000_000_000 / max(tick, 1))
}
