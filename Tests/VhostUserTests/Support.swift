import CLinux
import Foundation
import OutboardSystem
import Synchronization
import SystemPackage
import Testing
import VhostUser

#if canImport(Glibc)
import Glibc
#endif

// Virtio device feature bits the tests negotiate (virtio 1.2 section 6: VERSION_1 is bit 32).
let virtioVersion1: UInt64 = 1 << 32

/// Every protocol feature the frontend's users rely on with qemu-storage-daemon.
let wantedProtocolFeatures = VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.config
    | VhostUserProtocolFeature.multiQueue | VhostUserProtocolFeature.configureMemSlots

/// A watchdog for one test: if the body has not finished after `seconds`, the process is
/// aborted with a message, so a bug that makes a call hang fails CI instead of stalling it.
/// (Every wait in the tests is bounded anyway; this is the backstop.)
func withWatchdog<R>(_ seconds: Int, _ name: String, _ body: () throws -> R) rethrows -> R {
    let done = Watchdog(seconds: seconds, name: name)
    defer { done.finish() }
    return try body()
}

/// The pids of the qemu-storage-daemon processes the tests started and have not finished
/// with, for the watchdog to kill before it aborts.
let runningDaemons = Mutex<Set<pid_t>>([])

final class Watchdog: Sendable {
    private let finished = Atomic<Bool>(false)

    init(seconds: Int, name: String) {
        let start = Clock.monotonicNanoseconds
        let limit = UInt64(seconds) * 1_000_000_000
        Thread { [self] in
            while !finished.load(ordering: .acquiring) {
                if Clock.monotonicNanoseconds - start > limit {
                    // abort() runs no deinit: kill the daemons the tests started first, so
                    // none outlives the test process.
                    for pid in runningDaemons.withLock({ $0 }) { kill(pid, SIGKILL) }
                    let message = "watchdog: test \(name) ran longer than \(seconds) s; aborting\n"
                    _ = message.withCString { write(2, $0, strlen($0)) }
                    abort()
                }
                usleep(20_000)
            }
        }.start()
    }

    func finish() { finished.store(true, ordering: .releasing) }
}

/// True the first time `take` is called, false after: for scripts that misbehave once.
final class Once: Sendable {
    private let taken = Atomic<Bool>(false)
    func take() -> Bool { !taken.exchange(true, ordering: .relaxed) }
}

/// How many of this process's descriptors refer to a memfd whose name starts with `prefix`.
/// Tests run in parallel, so counting all of /proc/self/fd would race with other tests;
/// descriptors that a backend double sends are memfds with a name unique to the test.
func descriptorsReferring(toMemfdPrefix prefix: String) -> Int {
    guard let d = opendir("/proc/self/fd") else { return -1 }
    defer { closedir(d) }
    var n = 0
    while let e = readdir(d) {
        let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
        var buf = [CChar](repeating: 0, count: 512)
        let len = readlink("/proc/self/fd/\(name)", &buf, 511)
        if len > 0, buf.withUnsafeBufferPointer({ String(cString: $0.baseAddress!) }).hasPrefix("/memfd:\(prefix)") { n += 1 }
    }
    return n
}

/// A connected Unix STREAM socket pair: the frontend's end and the backend double's end.
struct StreamPair: ~Copyable {
    var frontend: OwnedFD
    var backend: OwnedFD
}

func streamPair() throws -> StreamPair {
    var fds: [CInt] = [-1, -1]
    guard socketpair(AF_UNIX, CInt(SOCK_STREAM.rawValue) | OB_SOCK_CLOEXEC, 0, &fds) == 0 else {
        throw Errno(rawValue: errno)
    }
    return StreamPair(frontend: OwnedFD(adopting: fds[0]), backend: OwnedFD(adopting: fds[1]))
}

/// Connects a SOCK_STREAM | SOCK_CLOEXEC socket to `path`, retrying while the socket does
/// not exist yet or nobody listens, for at most `timeoutMilliseconds`.
func connectStream(path: String, timeoutMilliseconds: Int = 10_000) throws -> OwnedFD {
    let deadline = Clock.monotonicNanoseconds + UInt64(timeoutMilliseconds) * 1_000_000
    while true {
        let s = socket(AF_UNIX, CInt(SOCK_STREAM.rawValue) | OB_SOCK_CLOEXEC, 0)
        guard s >= 0 else { throw Errno(rawValue: errno) }
        let fd = OwnedFD(adopting: s)
        if ob_connect_unix(s, path) == 0 { return fd }
        let e = Errno(rawValue: errno)
        guard e == .noSuchFileOrDirectory || e == .connectionRefused, Clock.monotonicNanoseconds < deadline else {
            throw e
        }
        usleep(10_000)
    }
}

/// A private directory under /tmp, removed with its files when this goes away.
final class TemporaryDirectory {
    let path: String

    init() throws {
        var template = Array("/tmp/vhu-XXXXXX".utf8CString)
        guard let p = mkdtemp(&template) else { throw Errno(rawValue: errno) }
        path = String(cString: p)
    }

    deinit {
        if let d = opendir(path) {
            while let e = readdir(d) {
                let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
                if name != "." && name != ".." { unlink("\(path)/\(name)") }
            }
            closedir(d)
        }
        rmdir(path)
    }
}

/// Milliseconds since `start` (a Clock.monotonicNanoseconds value).
func millisecondsSince(_ start: UInt64) -> UInt64 { (Clock.monotonicNanoseconds - start) / 1_000_000 }
