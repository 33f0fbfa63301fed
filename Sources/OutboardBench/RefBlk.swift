import CRefBlk

#if canImport(Glibc)
import Glibc
#endif

/// One run of the C reference vhost-user-blk frontend (CRefBlk): 4 KiB random reads at a
/// fixed queue depth (closed loop) or at a fixed rate with at most that many in flight
/// (open loop), against a vhost-user-blk backend, single process, single thread.
/// Per-I/O figures are over the measured interval only.
public struct RefBlkResult: Codable, Sendable, Equatable {
    /// Completions in the measured interval.
    public var ios: UInt64
    /// Length of the measured interval.
    public var seconds: Double
    public var iops: Double
    /// This process's CPU (user + sys) per I/O, microseconds.
    public var cpuUsPerIo: Double
    /// Submit-to-harvest latency, microseconds.
    public var p50Us: Double
    public var p99Us: Double
    public var maxUs: Double
    /// Eventfd writes to the device per I/O.
    public var kicksPerIo: Double
    /// Wake-ups on the call eventfd per I/O (0 in poll mode).
    public var callsPerIo: Double
    /// Completions whose status byte was not VIRTIO_BLK_S_OK, warm-up included.
    public var errors: UInt64
    /// Device capacity in 512-byte sectors (GET_CONFIG).
    public var capacitySectors: UInt64
    /// The offered rate, requests per second; 0 for the closed loop.
    public var offeredIops: Double
    /// Requests submitted in the measured interval.
    public var issued: UInt64
    /// Open loop: requests that fell due with every slot busy, or were due by the end and
    /// never issued (measured interval).
    public var late: UInt64
    /// This process's CPU over the measured interval, percent of one CPU.
    public var cpuPercent: Double
    /// The CPU (user + sys, all threads) of `measuringAlso`'s process over the same
    /// interval, per I/O, microseconds, and in percent of one CPU; nil without it.
    public var peerCpuUsPerIo: Double?
    public var peerCpuPercent: Double?

    enum CodingKeys: String, CodingKey {
        case ios, seconds, iops, errors
        case cpuUsPerIo = "cpu_us_per_io"
        case p50Us = "p50_us"
        case p99Us = "p99_us"
        case maxUs = "max_us"
        case kicksPerIo = "kicks_per_io"
        case callsPerIo = "calls_per_io"
        case capacitySectors = "capacity_sectors"
        case offeredIops = "offered_iops"
        case issued, late
        case cpuPercent = "cpu_percent"
        case peerCpuUsPerIo = "peer_cpu_us_per_io"
        case peerCpuPercent = "peer_cpu_percent"
    }
}

/// Notification modes of the reference, by the names `bench blk` uses.
public let refBlkModes = ["interrupt", "event-idx", "adaptive", "poll"]

/// Runs the C reference frontend in this process. `mode`: "interrupt" (a signal per
/// completion), "event-idx" (VIRTIO_F_RING_EVENT_IDX, used_event = last used index after
/// every harvest), "adaptive" (busy-polls `pollMicroseconds` after the last completion with
/// notifications off, then sleeps as event-idx: the driver's adaptive mode), "poll"
/// (interrupts suppressed, spins on used.idx). `rateIops` > 0: open loop at that rate
/// (CRefBlk.h: a deadline schedule, at most `queueDepth` in flight). `measuringAlso`: a
/// process (the device daemon) whose CPU is read at the measured interval's edges.
public func runRefBlk(
    socket: String, queueDepth: Int, warmupSeconds: Double, seconds: Double, mode: String, seed: UInt64,
    ioBytes: UInt32 = 4096, queueSize: Int = 256, pollMicroseconds: UInt32 = 50, rateIops: Double = 0,
    measuringAlso peer: pid_t? = nil
) throws -> RefBlkResult {
    let cmode: CInt
    switch mode {
    case "interrupt": cmode = CInt(OB_REFBLK_INTERRUPT.rawValue)
    case "event-idx": cmode = CInt(OB_REFBLK_EVENT_IDX.rawValue)
    case "adaptive": cmode = CInt(OB_REFBLK_ADAPTIVE.rawValue)
    case "poll": cmode = CInt(OB_REFBLK_POLL.rawValue)
    default: throw LabError("unknown mode \(mode) (\(refBlkModes.joined(separator: ", ")))")
    }
    guard let qd = CInt(exactly: queueDepth), qd >= 1 else { throw LabError("queue depth \(queueDepth) out of range") }
    guard rateIops >= 0, rateIops <= 1e9 else { throw LabError("rate \(rateIops) out of range (0 or up to 1e9 per second)") }
    var r = ob_refblk_result()
    // The peer's CPU at the interval's edges: [pid, CPU at edge 0, CPU at edge 1].
    var peerCPU: [Int64] = [Int64(peer ?? 0), -1, -1]
    let rc = socket.withCString { path -> CInt in
        peerCPU.withUnsafeMutableBufferPointer { marks -> CInt in
            var p = ob_refblk_params(
                socket_path: path, queue_depth: qd, warmup_seconds: warmupSeconds, seconds: seconds, mode: cmode,
                io_bytes: ioBytes, seed: seed, queue_size: CInt(clamping: queueSize), poll_us: pollMicroseconds,
                rate_iops: rateIops, on_interval: nil, context: UnsafeMutableRawPointer(marks.baseAddress))
            if peer != nil {
                p.on_interval = { context, edge in
                    guard let m = context?.assumingMemoryBound(to: Int64.self), edge == 0 || edge == 1 else { return }
                    m[1 + Int(edge)] = processCPUNanoseconds(pid: pid_t(m[0])).map { Int64(clamping: $0) } ?? -1
                }
            }
            return ob_refblk_run(&p, &r)
        }
    }
    if rc != 0 { throw LabError(refBlkMessage(&r.error)) }
    let ios = Double(max(r.ios, 1))
    let peerNs: Double? = peer != nil && peerCPU[1] >= 0 && peerCPU[2] >= peerCPU[1] ? Double(peerCPU[2] - peerCPU[1]) : nil
    return RefBlkResult(
        ios: r.ios, seconds: r.seconds, iops: r.seconds > 0 ? Double(r.ios) / r.seconds : 0,
        cpuUsPerIo: Double(r.cpu_ns) / 1e3 / ios,
        p50Us: Double(r.p50_ns) / 1e3, p99Us: Double(r.p99_ns) / 1e3, maxUs: Double(r.max_ns) / 1e3,
        kicksPerIo: Double(r.kicks) / ios, callsPerIo: Double(r.calls) / ios,
        errors: r.errors, capacitySectors: r.capacity_sectors,
        offeredIops: rateIops, issued: r.issued, late: r.late,
        cpuPercent: r.seconds > 0 ? Double(r.cpu_ns) / r.seconds / 1e7 : 0,
        peerCpuUsPerIo: peerNs.map { $0 / 1e3 / ios },
        peerCpuPercent: peerNs.map { r.seconds > 0 ? $0 / r.seconds / 1e7 : 0 })
}

/// For tests: reads `bytes` (a multiple of 512, at most 1 MiB) at `sector` through a fresh
/// connection with the C reference. Returns the data and the device capacity in sectors.
public func refBlkReadOnce(socket: String, sector: UInt64, bytes: Int = 4096) throws -> (data: [UInt8], capacitySectors: UInt64) {
    guard let n = UInt32(exactly: bytes) else { throw LabError("bad length \(bytes)") }
    var data = [UInt8](repeating: 0, count: bytes)
    var capacity: UInt64 = 0
    var err = [CChar](repeating: 0, count: 256)
    let rc = data.withUnsafeMutableBytes { buf in
        ob_refblk_read_once(socket, sector, buf.baseAddress, n, &capacity, &err)
    }
    if rc != 0 { throw LabError(String(decoding: err.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)) }
    return (data, capacity)
}

private func refBlkMessage<T>(_ tuple: inout T) -> String {
    withUnsafeBytes(of: &tuple) { raw in
        String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
    }
}
