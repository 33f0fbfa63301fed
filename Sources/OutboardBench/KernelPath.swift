import FoundationEssentials
import OutboardSystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The kernel's own path on the same image file, for context in `bench blk`: fio, 4 KiB
/// random reads through io_uring, buffered (the page cache), at the same queue depth.
public struct KernelReferenceResult: Codable, Sendable, Equatable {
    public var ios: UInt64
    public var seconds: Double
    public var iops: Double
    /// fio's CPU (user + sys) per I/O, microseconds: (usr% + sys%) * runtime / ios.
    public var cpuUsPerIo: Double
    /// Completion latency (fio clat), microseconds.
    public var p50Us: Double
    public var p99Us: Double

    enum CodingKeys: String, CodingKey {
        case ios, seconds, iops
        case cpuUsPerIo = "cpu_us_per_io"
        case p50Us = "p50_us"
        case p99Us = "p99_us"
    }
}

/// Runs `fio --name=ref --filename=FILE --rw=randread --bs=4k --ioengine=io_uring
/// --iodepth=N --direct=0 --invalidate=0 --time_based --runtime=S --output-format=json`
/// and parses its report. fio's stderr goes to ours; it is killed if it has not finished
/// `seconds` + 60 s after it started.
public func runKernelReference(file: String, queueDepth: Int, seconds: Double, fio: String = "/usr/bin/fio") throws -> KernelReferenceResult {
    guard queueDepth >= 1, seconds > 0 else { throw LabError("queue depth and seconds must be positive") }
    let runtimeMs = max(1, Int((seconds * 1000).rounded()))
    let arguments = [
        "--name=ref", "--filename=\(file)", "--rw=randread", "--bs=4k", "--ioengine=io_uring",
        "--iodepth=\(queueDepth)", "--direct=0", "--invalidate=0", "--time_based", "--runtime=\(runtimeMs)ms",
        "--output-format=json",
    ]
    let output = try captureStdout(executable: fio, arguments: arguments, timeoutMilliseconds: runtimeMs + 60_000)
    return try parseFioReport(output)
}

/// Parses fio's JSON report (the first job's read side, `FioJobReport.parse`). Exposed
/// for tests.
public func parseFioReport(_ output: [UInt8]) throws -> KernelReferenceResult {
    let r = try FioJobReport.parse(output, write: false)
    return KernelReferenceResult(
        ios: r.ios, seconds: r.seconds, iops: r.iops,
        cpuUsPerIo: (r.usrCpuPct + r.sysCpuPct) / 100 * r.seconds * 1e6 / Double(r.ios),
        p50Us: r.clatP50Us, p99Us: r.clatP99Us)
}

/// Runs a program with stdin from /dev/null, stdout into a pipe, stderr inherited, and
/// returns everything it wrote to stdout. Throws if it does not exit 0 in time.
func captureStdout(executable: String, arguments: [String], timeoutMilliseconds: Int) throws -> [UInt8] {
    let pipe: PipeEnds
    do { pipe = try OwnedFD.pipe() } catch { throw LabError("pipe: \(error)") }
    var child: ChildProcess
    do {
        let writeEnd = pipe.write
        let null: OwnedFD
        do { null = try OwnedFD.open("/dev/null", O_RDONLY) } catch { throw LabError("open /dev/null: \(error)") }
        do {
            child = try ChildProcess(
                executable: executable, arguments: arguments,
                descriptors: [(null.raw, 0), (writeEnd.raw, 1), (FileDescriptor.standardError, 2)])
        } catch {
            throw LabError("cannot start \(executable): \(error)")
        }
        // writeEnd closes here: EOF on the read end when the child exits.
    }
    let readEnd = pipe.read
    let deadline = OutboardSystem.Clock.monotonicNanoseconds + UInt64(timeoutMilliseconds) * 1_000_000
    var output: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let ready: Bool
        do { ready = try readEnd.waitReadable(until: deadline) } catch { throw LabError("poll: \(error)") }
        guard ready else {
            try? child.signal(SIGKILL)
            _ = try? child.wait()
            throw LabError("\(executable) did not finish within \(timeoutMilliseconds) ms")
        }
        let n: Int
        do {
            n = try buffer.withUnsafeMutableBytes { b in Result { () throws(Errno) in try readEnd.read(into: b) } }.get()
        } catch {
            throw LabError("read: \(error)")
        }
        if n == 0 { break }
        output.append(contentsOf: buffer[0..<n])
    }
    let remaining = Int(clamping: (deadline &- min(deadline, OutboardSystem.Clock.monotonicNanoseconds)) / 1_000_000)
    guard let status = try child.wait(timeoutMilliseconds: max(remaining, 1000)) else {
        try? child.signal(SIGKILL)
        _ = try? child.wait()
        throw LabError("\(executable) closed its stdout but did not exit")
    }
    guard status == .exited(0) else { throw LabError("\(executable) \(status)") }
    return output
}
