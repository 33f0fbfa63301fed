import ArgumentParser
import FoundationEssentials
import Manager
import Outboard
import OutboardBench
import OutboardSession
import OutboardSystem

#if canImport(Glibc)
import Glibc
#endif

/// `outboard bench blk`: 4 KiB random reads through the whole path (this process as the
/// client -> the sandboxed virtio-blk driver -> qemu-storage-daemon, aio=io_uring, image in
/// the page cache), and in the same run the C reference frontend (one process, straight to
/// the same daemon and image) at the same queue depth and notification mode, and the
/// kernel's own path (fio, io_uring, on the image file) for context.
struct BlkBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "blk",
        abstract: "Benchmark the virtio-blk path against a C vhost-user-blk frontend (needs root).",
        discussion: """
            One daemon serves the image on two sockets: one for Outboard's driver, one for the C \
            reference, which never run at the same time. For each queue depth: Outboard, then the \
            C reference, then fio, each for --seconds after --warmup. `ratio` is Outboard IOPS \
            over C IOPS; CPU per I/O is the client's plus the driver's for Outboard, the frontend's \
            for C (the daemon's own CPU is the same device work in both and is not counted). \
            doorbells_per_io counts every eventfd signal on the path: client to driver, driver to \
            device, device to driver, driver to client (each also reported alone). The device runs \
            on --device-cpu, everything else on the next CPU. In adaptive mode (the default, the \
            driver's default) the driver and the C reference keep polling for --poll-us after their \
            last work, and the client for up to --poll-us in each wait, before they sleep (the driver \
            and the client yield the CPU between polls); in event-idx mode nothing busy-polls.
            """
    )

    @Option(help: "Queue depths.") var qd: [Int] = [1, 8, 32, 128]
    @Option(help: "Measured seconds per run.") var seconds: Double = 2
    @Option(help: "Runs of each side per queue depth (odd), in adjacent pairs of alternating order.") var repeats: Int = 3
    @Option(help: "Warm-up seconds per run.") var warmup: Double = 0.5
    @Option(help: "Notification mode, the same for the driver and the C reference: interrupt, event-idx, adaptive, poll.")
    var mode: String = "adaptive"
    @Option(help: "adaptive: microseconds of busy-polling after the last work, the same for the driver and the C reference.")
    var pollUs: Int = 50
    @Option(help: "Image size in MiB (filled, so reads hit cached data).") var imageMib: Int = 256
    @Option(help: "CPU for the device (qemu-storage-daemon and its threads); this process, the manager, the driver, the C reference and fio run on the next CPU this process may use after it. Default: the first CPU it may use. -1: no pinning.")
    var deviceCpu: Int?
    @Flag(help: "Skip the kernel (fio) reference.") var noKernel = false
    @Flag(help: "One JSON object per line.") var json = false

    func run() throws {
        guard getuid() == 0 else { throw ValidationError("bench blk starts the manager, which needs root") }
        guard refBlkModes.contains(mode) else { throw ValidationError("--mode: one of \(refBlkModes.joined(separator: ", "))") }
        guard qd.allSatisfy({ $0 >= 1 && $0 <= 128 }) else { throw ValidationError("--qd: 1...128") }
        // Odd, so that the median pair ratio is one pair's, whose figures are shown.
        guard repeats >= 1, repeats <= 99, repeats % 2 == 1 else { throw ValidationError("--repeats: an odd number, 1...99") }
        guard pollUs >= 0, pollUs <= 100_000 else { throw ValidationError("--poll-us: 0...100000") }
        installInterruptFlag()
        let lab = try Lab(name: "bench")
        defer { lab.remove() }
        let image = lab.dir + "/disk.img"
        try makeImage(path: image, bytes: imageMib << 20, fill: true)
        // Placement, the same for Outboard and the C reference: the device on one CPU, the
        // frontend side (client and driver, or the C reference) on another. Children
        // inherit the placement of the thread that spawns them. Unpinned, the scheduler
        // moves a busy-polling frontend onto the device's CPU now and then, and both lose.
        let allowed = CPU.allowed
        let device = deviceCpu ?? allowed.first ?? -1
        if device >= 0 && !allowed.contains(device) {
            throw CommandFailure("--device-cpu \(device) is not among the CPUs this process may use (\(allowed.map(String.init).joined(separator: ",")))")
        }
        // The frontend CPU: the next allowed one after the device's, wrapping around.
        let frontend = allowed.first(where: { $0 > device }) ?? allowed.first(where: { $0 != device })
        let placement: (device: Int, frontend: Int)? = device >= 0 && allowed.count >= 2 ? frontend.map { (device, $0) } : nil
        if let placement {
            do { try CPU.pin(to: placement.device) } catch { throw CommandFailure("cannot pin to CPU \(placement.device): \(error)") }
        }
        var daemon = try StorageDaemon(image: image, sockets: [lab.dir + "/outboard.sock", lab.dir + "/ref.sock"])
        defer { daemon.stop() }
        if let placement {
            do { try CPU.pin(to: placement.frontend) } catch { throw CommandFailure("cannot pin to CPU \(placement.frontend): \(error)") }
        }
        let config = try lab.writeManagerConfig(device: "vblk0", socket: daemon.sockets[0], notify: mode, queueSize: 512, pollUs: pollUs)
        var manager = try ManagerProcess(config: config, socket: lab.controlSocket)
        defer { manager.stop() }
        let admin = try AdminConnection(socketPath: lab.controlSocket)
        if !json {
            print("bench blk: 4 KiB random reads, \(imageMib) MiB image in the page cache, qemu-storage-daemon aio=io_uring, mode \(mode), \(fmt(seconds, 1)) s per run, "
                  + (placement.map { "device on CPU \($0.device), frontends on CPU \($0.frontend)" } ?? "not pinned"))
            print("   qd   outboard IOPS    C IOPS  ratio (min-max)   CPU us/IO (ob / C)  p50 us  p99 us  doorbells/IO (ob / C)  kernel IOPS")
        }
        for depth in qd where !interrupted() {
            // Adjacent pairs in alternating order (Outboard first, then C first, ...): this
            // machine's speed drifts between runs, so `ratio` is the median of the pair
            // ratios, with their spread; every other figure is that pair's (the median pair:
            // --repeats is odd), so the IOPS columns give the ratio shown.
            var obs: [OutboardRun] = [], cs: [RefBlkResult] = []
            for r in 0..<repeats where !interrupted() {
                if r % 2 == 0 {
                    obs.append(try measureOutboard(admin: admin, socket: lab.controlSocket, depth: depth))
                    cs.append(try measureReference(socket: daemon.sockets[1], depth: depth))
                } else {
                    cs.append(try measureReference(socket: daemon.sockets[1], depth: depth))
                    obs.append(try measureOutboard(admin: admin, socket: lab.controlSocket, depth: depth))
                }
                let errors = (obs.last?.errors ?? 0) + Int(cs.last?.errors ?? 0)
                if errors > 0 { throw CommandFailure("I/O errors during the run: outboard \(obs.last?.errors ?? 0), C \(cs.last?.errors ?? 0)") }
            }
            guard !obs.isEmpty, obs.count == cs.count else { break }
            let ratios = zip(obs, cs).map { $1.iops > 0 ? $0.iops / $1.iops : 0 }
            let cpuRatios = zip(obs, cs).map { $1.cpuUsPerIo > 0 ? ($0.clientCpuUs + $0.driverCpuUs) / $1.cpuUsPerIo : 0 }
            let middle = ratios.indices.sorted { ratios[$0] < ratios[$1] }[ratios.count / 2]
            let ob = obs[middle], c = cs[middle]
            let k = noKernel ? nil : try? runKernelReference(file: image, queueDepth: depth, seconds: seconds)
            let line = BlkBenchLine(
                qd: depth, mode: mode, deviceCpu: placement?.device ?? -1, frontendCpu: placement?.frontend ?? -1,
                repeats: ratios.count, outboardIops: ob.iops, cIops: c.iops, ratio: ratios[middle],
                ratioMin: ratios.min() ?? 0, ratioMax: ratios.max() ?? 0,
                outboardCpuUsPerIo: ob.clientCpuUs + ob.driverCpuUs, driverCpuUsPerIo: ob.driverCpuUs,
                clientCpuUsPerIo: ob.clientCpuUs, cCpuUsPerIo: c.cpuUsPerIo, cpuRatio: cpuRatios[middle],
                p50Us: ob.p50, p99Us: ob.p99, cP50Us: c.p50Us, cP99Us: c.p99Us,
                doorbellsPerIo: ob.doorbells, cDoorbellsPerIo: c.kicksPerIo + c.callsPerIo,
                clientBellsPerIo: ob.clientBells, kicksPerIo: ob.kicks, interruptsPerIo: ob.interrupts,
                clientSignalsPerIo: ob.clientSignals, cKicksPerIo: c.kicksPerIo, cCallsPerIo: c.callsPerIo,
                kernelIops: k?.iops, kernelCpuUsPerIo: k?.cpuUsPerIo, kernelP50Us: k?.p50Us)
            if json {
                print(line.json())
            } else {
                print("\(pad("\(depth)", 5))  \(pad("\(Int(ob.iops))", 13))  \(pad("\(Int(c.iops))", 8))  \(pad(fmt(line.ratio, 2) + " (" + fmt(line.ratioMin, 2) + "-" + fmt(line.ratioMax, 2) + ")", 16))  \(pad(fmt(line.outboardCpuUsPerIo, 1) + " / " + fmt(c.cpuUsPerIo, 1), 18))  \(pad(fmt(ob.p50, 1), 6))  \(pad(fmt(ob.p99, 1), 6))  \(pad(fmt(ob.doorbells, 3) + " / " + fmt(line.cDoorbellsPerIo, 3), 21))  \(pad(k.map { "\(Int($0.iops))" } ?? "-", 11))")
            }
            fflush(nil)
        }
    }

    struct OutboardRun {
        var iops: Double
        var clientCpuUs: Double
        var driverCpuUs: Double
        var p50: Double
        var p99: Double
        /// The four kinds of signal on the path, per I/O: client -> driver, driver -> device,
        /// device -> driver, driver -> client.
        var clientBells: Double
        var kicks: Double
        var interrupts: Double
        var clientSignals: Double
        var doorbells: Double { clientBells + kicks + interrupts + clientSignals }
        var errors: Int
    }

    /// Keeps `depth` random 4 KiB reads in flight from this process for warm-up plus
    /// `seconds`, resubmitting each batch of completions with one batch submit.
    func measureOutboard(admin: borrowing AdminConnection, socket: String, depth: Int) throws -> OutboardRun {
        var s = try BlockSession.open(socketPath: socket, device: "vblk0", writable: false, dataBytes: depth * 4096,
                                      queueDepth: max(2, depth.nextPowerOfTwo), waitMilliseconds: 20_000)
        let blocks = s.info.blockCount / 8
        let poll = mode == "poll"
        let results = UnsafeMutableBufferPointer<BlockResult>.allocate(capacity: s.queueDepth)
        let batch = UnsafeMutableBufferPointer<BlockSubmission>.allocate(capacity: s.queueDepth)
        let started = UnsafeMutablePointer<UInt64>.allocate(capacity: depth)
        let latencies = UnsafeMutableBufferPointer<UInt32>.allocate(capacity: 1 << 23)
        defer { results.deallocate(); batch.deallocate(); started.deallocate(); latencies.deallocate() }
        var rng: UInt64 = 0x9E37_79B9_7F4A_7C15 ^ UInt64(depth)
        func next() -> UInt64 { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng }
        let now0 = Clock.monotonicNanoseconds
        for b in 0..<depth {
            batch[b] = BlockSubmission(.read, sector: (next() % blocks) * 8, offset: b * 4096, length: 4096, userData: UInt64(b))
            started[b] = now0
        }
        guard try s.submit(batch: UnsafeBufferPointer(rebasing: batch[0..<depth])) == depth else {
            throw CommandFailure("could not submit \(depth) requests")
        }
        let warmEnd = now0 + UInt64(warmup * 1e9)
        let end = warmEnd + UInt64(seconds * 1e9)
        var measuring = false
        var ios = 0, errors = 0, lat = 0
        var cpu0: UInt64 = 0, drv0: UInt64 = 0, t0: UInt64 = 0, bells0 = 0
        var counters0 = DriverCounters()
        var driverPid: Int32 = 0
        while true {
            let n = poll ? try s.poll(into: results)
                : try s.wait(into: results, timeoutMilliseconds: 100, spinMicroseconds: mode == "adaptive" ? pollUs : 0)
            let now = Clock.monotonicNanoseconds
            if !measuring && now >= warmEnd {
                measuring = true
                let st = try StatusReport.decode(admin.status())
                driverPid = st.devices.first?.pid ?? 0
                counters0 = DriverCounters(st)
                drv0 = processCPUNanoseconds(pid: driverPid) ?? 0
                bells0 = s.doorbellsRung
                cpu0 = Clock.processCPUNanoseconds
                t0 = Clock.monotonicNanoseconds
            }
            if measuring && now >= end { break }
            if interrupted() { throw ExitCode(130) }
            for i in 0..<n {
                let r = results[i]
                let b = Int(r.userData)
                if r.status != .ok { errors += 1 }
                if measuring {
                    ios += 1
                    if lat < latencies.count {
                        latencies[lat] = UInt32(clamping: (now - started[b]) / 100)  // 0.1 us units
                        lat += 1
                    }
                }
                batch[i] = BlockSubmission(.read, sector: (next() % blocks) * 8, offset: b * 4096, length: 4096, userData: UInt64(b))
                started[b] = now
            }
            if n > 0 { _ = try s.submit(batch: UnsafeBufferPointer(rebasing: batch[0..<n])) }
        }
        let t1 = Clock.monotonicNanoseconds
        let cpu1 = Clock.processCPUNanoseconds
        let drv1 = processCPUNanoseconds(pid: driverPid) ?? drv0
        let counters1 = DriverCounters(try StatusReport.decode(admin.status()))
        let bells = s.doorbellsRung - bells0
        _ = try s.drainAll()
        var sorted = UnsafeMutableBufferPointer(rebasing: latencies[0..<lat])
        sorted.sort()
        func pct(_ p: Double) -> Double { lat == 0 ? 0 : Double(sorted[min(lat - 1, Int(Double(lat) * p))]) / 10 }
        let io = Double(max(ios, 1))
        return OutboardRun(iops: Double(ios) / (Double(t1 - t0) / 1e9), clientCpuUs: Double(cpu1 - cpu0) / 1e3 / io,
                           driverCpuUs: Double(drv1 - drv0) / 1e3 / io, p50: pct(0.5), p99: pct(0.99),
                           clientBells: Double(bells) / io,
                           kicks: Double(counters1.kicks - counters0.kicks) / io,
                           interrupts: Double(counters1.interrupts - counters0.interrupts) / io,
                           clientSignals: Double(counters1.clientSignals - counters0.clientSignals) / io, errors: errors)
    }

    /// The C reference runs in this process (it is one process by design); the manager
    /// and the driver sleep meanwhile, and the reference's CPU is this process's own.
    func measureReference(socket: String, depth: Int) throws -> RefBlkResult {
        try runRefBlk(socket: socket, queueDepth: depth, warmupSeconds: warmup, seconds: seconds, mode: mode,
                      seed: UInt64(depth), queueSize: 512, pollMicroseconds: UInt32(clamping: pollUs))
    }
}

/// The driver's eventfd signals: kicks to the device, interrupts from it, doorbells to
/// its clients.
struct DriverCounters {
    var kicks: UInt64 = 0
    var interrupts: UInt64 = 0
    var clientSignals: UInt64 = 0
    init() {}
    init(_ s: StatusReport) {
        guard let d = s.devices.first else { return }
        kicks = d.deviceKicks ?? 0
        interrupts = d.deviceInterrupts ?? 0
        clientSignals = d.clientSignals ?? 0
    }
}

struct BlkBenchLine: Codable {
    var bench = "blk"
    var qd: Int
    var mode: String
    /// -1: not pinned.
    var deviceCpu: Int
    var frontendCpu: Int
    var repeats: Int
    var outboardIops: Double
    var cIops: Double
    /// Median over the pairs of Outboard IOPS / C IOPS, and the spread.
    var ratio: Double
    var ratioMin: Double
    var ratioMax: Double
    var outboardCpuUsPerIo: Double
    var driverCpuUsPerIo: Double
    var clientCpuUsPerIo: Double
    var cCpuUsPerIo: Double
    /// Outboard CPU per I/O over the C reference's (target: at most 1.5).
    var cpuRatio: Double
    var p50Us: Double
    var p99Us: Double
    var cP50Us: Double
    var cP99Us: Double
    var doorbellsPerIo: Double
    var cDoorbellsPerIo: Double
    var clientBellsPerIo: Double
    var kicksPerIo: Double
    var interruptsPerIo: Double
    var clientSignalsPerIo: Double
    var cKicksPerIo: Double
    var cCallsPerIo: Double
    var kernelIops: Double?
    var kernelCpuUsPerIo: Double?
    var kernelP50Us: Double?

    func json() -> String {
        var parts = ["\"bench\":\"blk\"", "\"qd\":\(qd)", "\"mode\":\"\(mode)\"", "\"device_cpu\":\(deviceCpu)", "\"frontend_cpu\":\(frontendCpu)",
                     "\"outboard_iops\":\(fmt(outboardIops, 0))", "\"c_iops\":\(fmt(cIops, 0))", "\"ratio\":\(fmt(ratio, 3))",
                     "\"ratio_min\":\(fmt(ratioMin, 3))", "\"ratio_max\":\(fmt(ratioMax, 3))", "\"repeats\":\(repeats)",
                     "\"outboard_cpu_us_per_io\":\(fmt(outboardCpuUsPerIo, 2))", "\"driver_cpu_us_per_io\":\(fmt(driverCpuUsPerIo, 2))",
                     "\"client_cpu_us_per_io\":\(fmt(clientCpuUsPerIo, 2))", "\"c_cpu_us_per_io\":\(fmt(cCpuUsPerIo, 2))",
                     "\"cpu_ratio\":\(fmt(cpuRatio, 3))",
                     "\"p50_us\":\(fmt(p50Us, 1))", "\"p99_us\":\(fmt(p99Us, 1))", "\"c_p50_us\":\(fmt(cP50Us, 1))", "\"c_p99_us\":\(fmt(cP99Us, 1))",
                     "\"doorbells_per_io\":\(fmt(doorbellsPerIo, 4))", "\"c_doorbells_per_io\":\(fmt(cDoorbellsPerIo, 4))",
                     "\"client_bells_per_io\":\(fmt(clientBellsPerIo, 4))", "\"kicks_per_io\":\(fmt(kicksPerIo, 4))",
                     "\"interrupts_per_io\":\(fmt(interruptsPerIo, 4))", "\"client_signals_per_io\":\(fmt(clientSignalsPerIo, 4))",
                     "\"c_kicks_per_io\":\(fmt(cKicksPerIo, 4))", "\"c_calls_per_io\":\(fmt(cCallsPerIo, 4))"]
        if let k = kernelIops { parts.append("\"kernel_iops\":\(fmt(k, 0))") }
        if let k = kernelCpuUsPerIo { parts.append("\"kernel_cpu_us_per_io\":\(fmt(k, 2))") }
        if let k = kernelP50Us { parts.append("\"kernel_p50_us\":\(fmt(k, 1))") }
        return "{" + parts.joined(separator: ",") + "}"
    }
}

extension Int {
    var nextPowerOfTwo: Int { self <= 1 ? 1 : 1 << (Int.bitWidth - (self - 1).leadingZeroBitCount) }
}

extension BlockSession {
    /// Waits for everything in flight; returns how many finished.
    mutating func drainAll() throws -> Int {
        var n = 0
        try drain { _ in n += 1 }
        return n
    }
}
