import Dispatch
import Outboard
import OutboardSession
import OutboardSystem

#if canImport(Glibc)
import Glibc
#endif

// Every wait of a test has a deadline and fails with a message when it passes: a request
// lost after a restart, a peer that never answers or a process that never stops fails
// the test that met it instead of hanging the suite.

/// How long a test waits for one thing (a completion, an answer, a process state) before
/// it fails. Far above what any of them takes on a loaded machine.
public let testDeadlineSeconds: Double = 30

/// A wait of a test that ran out of time.
public struct DeadlinePassed: Error, CustomStringConvertible {
    public let description: String
    public init(_ what: String, seconds: Double) { description = "timed out after \(seconds) s waiting for \(what)" }
}

func nanoseconds(_ seconds: Double) -> UInt64 { UInt64(max(0, seconds) * 1e9) }

/// Waits until every request in flight on `s` has finished, handing each to `body`, for at
/// most `seconds`; then throws `.failed` naming what is still in flight (BlockSession's own
/// `drain` waits as long as it takes).
public func drain(_ s: inout BlockSession, within seconds: Double = testDeadlineSeconds,
                  _ body: (BlockResult) throws(SessionError) -> Void) throws(SessionError) {
    let out = UnsafeMutableBufferPointer<BlockResult>.allocate(capacity: s.queueDepth)
    defer { out.deallocate() }
    let deadline = Clock.monotonicNanoseconds + nanoseconds(seconds)
    while s.inFlight > 0 {
        guard Clock.monotonicNanoseconds < deadline else {
            throw .failed("test deadline: \(s.inFlight) request(s) still in flight after \(seconds) s "
                          + "(generation \(s.generation), \(s.recoveries) recoveries, \(s.reissued) reissued)")
        }
        let n = try s.wait(into: out, timeoutMilliseconds: 100)
        for i in 0..<n { try body(out[i]) }
    }
}

/// The next control message on `socket`, waiting at most `seconds` for it.
public func receiveControl(_ socket: borrowing UnixSocket, within seconds: Double = testDeadlineSeconds,
                           limit: Int = ControlProtocol.maxMessageBytes) throws -> ControlDelivery {
    guard try socket.waitReadable(timeoutMilliseconds: Int(seconds * 1000)) else {
        throw DeadlinePassed("a control message", seconds: seconds)
    }
    return try socket.receiveControl(limit: limit)
}

/// Waits on `semaphore` for at most `seconds`; throws if it was not signalled.
public func waitSignalled(_ semaphore: DispatchSemaphore, for what: String, within seconds: Double = testDeadlineSeconds) throws {
    guard semaphore.wait(timeout: .now() + seconds) == .success else { throw DeadlinePassed(what, seconds: seconds) }
}

/// Waits until process `pid` is stopped (state T in /proc/PID/stat): a SIGSTOP sent to it
/// has taken effect, so it runs nothing more until SIGCONT.
public func waitUntilStopped(pid: pid_t, within seconds: Double = testDeadlineSeconds) throws {
    let deadline = Clock.monotonicNanoseconds + nanoseconds(seconds)
    while Clock.monotonicNanoseconds < deadline {
        if processState(pid) == "T" { return }
        usleep(1000)
    }
    throw DeadlinePassed("process \(pid) to stop (state \(processState(pid).map { String($0) } ?? "gone"))", seconds: seconds)
}

/// The state letter of process `pid` (the field after the command name in /proc/PID/stat).
func processState(_ pid: pid_t) -> Character? {
    let fd = open("/proc/\(pid)/stat", O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var buf = [UInt8](repeating: 0, count: 512)
    let n = read(fd, &buf, buf.count)
    guard n > 0 else { return nil }
    let text = String(decoding: buf[0..<n], as: UTF8.self)
    // The command name is in parentheses and may itself contain them: take the last ")".
    guard let name = text.lastIndex(of: ")") else { return nil }
    return text[text.index(after: name)...].first { $0 != " " }
}
