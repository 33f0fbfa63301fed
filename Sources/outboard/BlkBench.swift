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
/// kernel's own path (fio, io_uring, on the image file) for context. Each queue depth has
/// a closed-loop row (as many requests in flight as the queue depth allows: the maximum)
/// and rows at fixed offered rates (open loop: both sides issue on the same deadline
/// schedule), where CPU is compared at the same throughput.
struct BlkBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "blk",
        abstract: "Benchmark the virtio-blk path against a C vhost-user-blk frontend (needs root).",
        discussion: """
            One daemon serves the image on two sockets: one for Outboard's driver, one for the C \
            reference, which never run at the same time. For each queue depth: Outboard, then the \
            C reference, then fio, each for --seconds after --warmup, closed loop (the queue kept \
            full). `ratio` is Outboard IOPS over C IOPS; CPU per I/O is the client's plus the \
            driver's for Outboard, the frontend's for C (the daemon's CPU is reported apart, not \
            counted). doorbells_per_io counts every eventfd signal on the path: client to driver, \
            driver to device, device to driver, driver to client (each also reported alone). \
            Then, for each rate of --rate and each fraction of --rate-fraction (of the C \
            reference's closed-loop IOPS at that queue depth, this run; default 0.5), both sides \
            again, open loop: request k is due at k / rate from the start, issued as soon as it is \
            due and a slot is free (at most the queue depth in flight); one that falls due with \
            every slot busy counts as late. With requests in flight each side waits for a \
            completion or the next deadline (the timeout in whole milliseconds), with none it \
            sleeps until the deadline (poll mode: spins). cpu_ratio there is Outboard's CPU per \
            I/O over C's at that rate. The device runs on --device-cpu, everything else on the \
            next CPU. In adaptive mode (the default, the driver's default) the driver and the C \
            reference keep polling for --poll-us after their last work, and the client for up to \
            --poll-us in each wait, before they sleep (the driver and the client yield the CPU \
            between polls); in event-idx mode nothing busy-polls. Lists are comma separated.
            """
    )

    @Option(help: "Queue depths, comma separated.") var qd: ListOption<Int> = [1, 8, 32, 128]
    @Option(help: "Fixed offered loads, requests per second, comma separated: rows with both sides paced at each.")
    var rate: ListOption<Double>?
    @Option(help: "Fixed offered loads as fractions of the C reference's closed-loop IOPS at the same queue depth in this run, comma separated. Default: 0.5 unless --rate is given.")
    var rateFraction: ListOption<Double>?
    @Flag(help: "Only the closed-loop rows.") var noRate = false
    @Option(help: "Measured seconds per run.") var seconds: Double = 2
    @Option(help: "Runs of each side per row (odd), in adjacent pairs of alternating order.") var repeats: Int = 3
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

    /// The offered loads of the rate rows at one queue depth: (rate, the fraction it came from).
    func offeredLoads(cMaxIops: Double) -> [(iops: Double, fraction: Double?)] {
        if noRate { return [] }
        let fractions = rateFraction?.values ?? (rate == nil ? [0.5] : [])
        return (rate?.values ?? []).map { ($0, nil) } + fractions.map { ($0 * cMaxIops, $0) }
    }

    func run() throws {
        guard getuid() == 0 else { throw ValidationError("bench blk starts the manager, which needs root") }
        guard refBlkModes.contains(mode) else { throw ValidationError("--mode: one of \(refBlkModes.joined(separator: ", "))") }
        guard qd.values.allSatisfy({ $0 >= 1 && $0 <= 128 }) else { throw ValidationError("--qd: 1...128") }
        guard (rate?.values ?? []).allSatisfy({ $0 >= 1 && $0 <= 10_000_000 }) else { throw ValidationError("--rate: 1...10000000 requests per second") }
        guard (rateFraction?.values ?? []).allSatisfy({ $0 > 0 && $0 <= 4 }) else { throw ValidationError("--rate-fraction: more than 0, at most 4") }
        if noRate && (rate != nil || rateFraction != nil) { throw ValidationError("--no-rate with --rate or --rate-fraction") }
        // Odd, so that the median pair ratio is one pair's, whose figures are shown.
        guard repeats >= 1, repeats <= 99, repeats % 2 == 1 else { throw ValidationError("--repeats: an odd number, 1...99") }
        guard pollUs >= 0, pollUs <= 100_000 else { throw ValidationError("--poll-us: 0...100000") }
        guard seconds > 0, seconds <= 3600, warmup >= 0, warmup <= 3600 else { throw ValidationError("--seconds: more than 0; --warmup: at least 0 (each at most 3600)") }
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
        let daemonPid = daemon.pid
        let refSocket = daemon.sockets[1]
        if !json {
            print("bench blk: 4 KiB random reads, \(imageMib) MiB image in the page cache, qemu-storage-daemon aio=io_uring, mode \(mode), \(fmt(seconds, 1)) s per run, "
                  + (placement.map { "device on CPU \($0.device), frontends on CPU \($0.frontend)" } ?? "not pinned"))
            print("closed loop (the queue kept full):")
            print("   qd   outboard IOPS    C IOPS  ratio (min-max)   CPU us/IO (ob / C)  p50 us  p99 us  doorbells/IO (ob / C)  kernel IOPS")
        }
        var rateTable: [String] = []
        for depth in qd.values where !interrupted() {
            // Adjacent pairs in alternating order (Outboard first, then C first, ...): this
            // machine's speed drifts between runs, so `ratio` is the median of the pair
            // ratios, with their spread; every other figure is that pair's (the median pair:
            // --repeats is odd), so the IOPS columns give the ratio shown.
            guard let closed = try pairs(
                outboard: { try measureOutboard(admin: admin, socket: lab.controlSocket, depth: depth, daemonPid: daemonPid) },
                reference: { try measureReference(socket: refSocket, depth: depth, rate: 0, daemonPid: daemonPid) })
            else { break }
            let (obs, cs) = closed
            let ratios = zip(obs, cs).map { $1.iops > 0 ? $0.iops / $1.iops : 0 }
            let cpuRatios = zip(obs, cs).map { $1.cpuUsPerIo > 0 ? ($0.clientCpuUs + $0.driverCpuUs) / $1.cpuUsPerIo : 0 }
            let middle = ratios.indices.sorted { ratios[$0] < ratios[$1] }[ratios.count / 2]
            let k = noKernel ? nil : try? runKernelReference(file: image, queueDepth: depth, seconds: seconds)
            var line = BlkBenchLine(depth: depth, mode: mode, placement: placement, outboard: obs[middle], c: cs[middle],
                                    ratios: ratios, cpuRatios: cpuRatios, middle: middle)
            line.kernelIops = k?.iops
            line.kernelCpuUsPerIo = k?.cpuUsPerIo
            line.kernelP50Us = k?.p50Us
            let ob = obs[middle], c = cs[middle]
            if json {
                print(line.json())
            } else {
                print("\(pad("\(depth)", 5))  \(pad("\(Int(ob.iops))", 13))  \(pad("\(Int(c.iops))", 8))  \(pad(fmt(line.ratio, 2) + " (" + fmt(line.ratioMin, 2) + "-" + fmt(line.ratioMax, 2) + ")", 16))  \(pad(fmt(line.outboardCpuUsPerIo, 1) + " / " + fmt(c.cpuUsPerIo, 1), 18))  \(pad(fmt(ob.p50, 1), 6))  \(pad(fmt(ob.p99, 1), 6))  \(pad(fmt(ob.doorbells, 3) + " / " + fmt(line.cDoorbellsPerIo, 3), 21))  \(pad(k.map { "\(Int($0.iops))" } ?? "-", 11))")
            }
            fflush(nil)
            // The C reference's maximum at this depth, for --rate-fraction: the median run.
            let cMax = cs.map(\.iops).sorted()[cs.count / 2]
            for load in offeredLoads(cMaxIops: cMax) where !interrupted() {
                guard load.iops >= 1 else { throw CommandFailure("offered load \(fmt(load.iops, 1)) per second at qd \(depth): the C reference's maximum (\(fmt(cMax, 0))) is too low for the fraction") }
                guard let paced = try pairs(
                    outboard: { try measureOutboardPaced(admin: admin, socket: lab.controlSocket, depth: depth, rate: load.iops, daemonPid: daemonPid) },
                    reference: { try measureReference(socket: refSocket, depth: depth, rate: load.iops, daemonPid: daemonPid) })
                else { break }
                let (obs, cs) = paced
                // At a fixed rate the figure of interest is CPU: the median pair by CPU ratio.
                let ratios = zip(obs, cs).map { $1.iops > 0 ? $0.iops / $1.iops : 0 }
                let cpuRatios = zip(obs, cs).map { $1.cpuUsPerIo > 0 ? ($0.clientCpuUs + $0.driverCpuUs) / $1.cpuUsPerIo : 0 }
                let middle = cpuRatios.indices.sorted { cpuRatios[$0] < cpuRatios[$1] }[cpuRatios.count / 2]
                var line = BlkBenchLine(depth: depth, mode: mode, placement: placement, outboard: obs[middle], c: cs[middle],
                                        ratios: ratios, cpuRatios: cpuRatios, middle: middle)
                line.load = "rate"
                line.offeredIops = load.iops
                line.rateFraction = load.fraction
                line.cMaxIops = load.fraction == nil ? nil : cMax
                line.cpuRatioMin = cpuRatios.min()
                line.cpuRatioMax = cpuRatios.max()
                line.outboardLate = obs[middle].late
                line.cLate = Int(cs[middle].late)
                line.outboardIssued = obs[middle].issued
                line.cIssued = Int(cs[middle].issued)
                if json {
                    print(line.json())
                    fflush(nil)
                } else {
                    let ob = obs[middle], c = cs[middle]
                    rateTable.append("\(pad("\(depth)", 5))  \(pad("\(Int(load.iops))", 8))  \(pad("\(Int(ob.iops)) / \(Int(c.iops))", 17))  \(pad("\(ob.late) / \(c.late)", 11))  \(pad(fmt(ob.clientCpuPercent, 1) + " + " + fmt(ob.driverCpuPercent, 1) + " / " + fmt(c.cpuPercent, 1), 20))  \(pad(fmt(line.outboardCpuUsPerIo, 2) + " / " + fmt(c.cpuUsPerIo, 2), 13))  \(pad(fmt(line.cpuRatio, 2) + " (" + fmt(cpuRatios.min() ?? 0, 2) + "-" + fmt(cpuRatios.max() ?? 0, 2) + ")", 16))  \(pad((ob.daemonCpuPercent.map { fmt($0, 1) } ?? "-") + " / " + (c.peerCpuPercent.map { fmt($0, 1) } ?? "-"), 13))  \(pad(fmt(ob.p50, 1) + " / " + fmt(c.p50Us, 1), 13))  \(pad(fmt(ob.p99, 1) + " / " + fmt(c.p99Us, 1), 13))")
                }
            }
        }
        if !json && !rateTable.isEmpty {
            print("fixed offered load (open loop, the same deadline schedule on both sides):")
            print("   qd   offered   IOPS (ob / C)  late (ob/C)  CPU % (cl + drv / C)  us/IO (ob/C)  cpu ratio (min-max)  daemon CPU %   p50 us ob / C   p99 us ob / C")
            for l in rateTable { print(l) }
        }
    }

    /// `repeats` runs of each side in adjacent pairs of alternating order; nil when
    /// interrupted before a pair. Throws on I/O errors.
    func pairs(outboard: () throws -> OutboardRun, reference: () throws -> RefBlkResult) throws -> ([OutboardRun], [RefBlkResult])? {
        var obs: [OutboardRun] = [], cs: [RefBlkResult] = []
        for r in 0..<repeats where !interrupted() {
            if r % 2 == 0 {
                obs.append(try outboard())
                cs.append(try reference())
            } else {
                cs.append(try reference())
                obs.append(try outboard())
            }
            let errors = (obs.last?.errors ?? 0) + Int(cs.last?.errors ?? 0)
            if errors > 0 { throw CommandFailure("I/O errors during the run: outboard \(obs.last?.errors ?? 0), C \(cs.last?.errors ?? 0)") }
        }
        guard !obs.isEmpty, obs.count == cs.count else { return nil }
        return (obs, cs)
    }

    struct OutboardRun {
        var iops: Double
        /// Completions and length of the measured interval.
        var ios: Int
        var seconds: Double
        /// CPU (user + sys) over the measured interval, nanoseconds: this process (the
        /// client), the driver process, the device daemon (nil if it could not be read).
        var clientCpuNs: Double
        var driverCpuNs: Double
        var daemonCpuNs: Double?
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
        /// Open loop: requests submitted in the measured interval, and those late (fell due
        /// with every slot busy, or due by the end and never issued).
        var issued = 0
        var late = 0

        var perIo: Double { 1e3 * Double(max(ios, 1)) }
        var clientCpuUs: Double { clientCpuNs / perIo }
        var driverCpuUs: Double { driverCpuNs / perIo }
        var daemonCpuUs: Double? { daemonCpuNs.map { $0 / perIo } }
        func percent(_ ns: Double) -> Double { seconds > 0 ? ns / seconds / 1e7 : 0 }
        var clientCpuPercent: Double { percent(clientCpuNs) }
        var driverCpuPercent: Double { percent(driverCpuNs) }
        var daemonCpuPercent: Double? { daemonCpuNs.map(percent) }
    }

    /// The counters at one edge of a measured interval.
    struct Snapshot {
        var time: UInt64
        var clientCpu: UInt64
        var driverCpu: UInt64
        var daemonCpu: UInt64?
        var bells: Int
        var counters: DriverCounters

        /// At an interval's start the status report comes first (a round trip to the
        /// manager) and the clocks last; at its end (`ending`) the clocks first: the round
        /// trip stays outside the interval.
        init(admin: borrowing AdminConnection, session: borrowing BlockSession, driverPid: inout Int32, daemonPid: pid_t,
             ending: Bool = false) throws {
            if ending {
                time = Clock.monotonicNanoseconds
                clientCpu = Clock.processCPUNanoseconds
                driverCpu = processCPUNanoseconds(pid: driverPid) ?? 0
                daemonCpu = processCPUNanoseconds(pid: daemonPid)
                bells = session.doorbellsRung
                counters = DriverCounters(try StatusReport.decode(admin.status()))
            } else {
                let st = try StatusReport.decode(admin.status())
                if driverPid == 0 { driverPid = st.devices.first?.pid ?? 0 }
                counters = DriverCounters(st)
                driverCpu = processCPUNanoseconds(pid: driverPid) ?? 0
                daemonCpu = processCPUNanoseconds(pid: daemonPid)
                bells = session.doorbellsRung
                clientCpu = Clock.processCPUNanoseconds
                time = Clock.monotonicNanoseconds
            }
        }

        /// Closes the interval from `self` to `end`.
        func run(to end: Snapshot, ios: Int, errors: Int, p50: Double, p99: Double) -> OutboardRun {
            let io = Double(max(ios, 1))
            let seconds = Double(end.time - time) / 1e9
            let daemon: Double? = if let a = daemonCpu, let b = end.daemonCpu, b >= a { Double(b - a) } else { nil }
            return OutboardRun(
                iops: seconds > 0 ? Double(ios) / seconds : 0, ios: ios, seconds: seconds,
                clientCpuNs: Double(end.clientCpu - clientCpu), driverCpuNs: Double(end.driverCpu &- driverCpu), daemonCpuNs: daemon,
                p50: p50, p99: p99, clientBells: Double(end.bells - bells) / io,
                kicks: Double(end.counters.kicks &- counters.kicks) / io,
                interrupts: Double(end.counters.interrupts &- counters.interrupts) / io,
                clientSignals: Double(end.counters.clientSignals &- counters.clientSignals) / io, errors: errors)
        }
    }

    func openSession(socket: String, depth: Int) throws -> BlockSession {
        try BlockSession.open(socketPath: socket, device: "vblk0", writable: false, dataBytes: depth * 4096,
                              queueDepth: max(2, depth.nextPowerOfTwo), waitMilliseconds: 20_000)
    }

    /// Keeps `depth` random 4 KiB reads in flight from this process for warm-up plus
    /// `seconds`, resubmitting each batch of completions with one batch submit
    /// (`BlockLoad`, closed loop).
    func measureOutboard(admin: borrowing AdminConnection, socket: String, depth: Int, daemonPid: pid_t) throws -> OutboardRun {
        try measure(admin: admin, socket: socket, depth: depth, rate: nil, daemonPid: daemonPid)
    }

    /// Open loop at `rate` requests per second (`BlockLoad`): request k is due at start +
    /// k / rate, issued as soon as it is due and one of the `depth` slots is free; the same
    /// schedule and waits as the C reference's (CRefBlk.h, rate_iops).
    func measureOutboardPaced(admin: borrowing AdminConnection, socket: String, depth: Int, rate: Double, daemonPid: pid_t) throws -> OutboardRun {
        try measure(admin: admin, socket: socket, depth: depth, rate: rate, daemonPid: daemonPid)
    }

    func measure(admin: borrowing AdminConnection, socket: String, depth: Int, rate: Double?, daemonPid: pid_t) throws -> OutboardRun {
        var s = try openSession(socket: socket, depth: depth)
        let load = BlockLoad(op: .read, depth: depth, rate: rate, warmup: warmup, seconds: seconds,
                             spinMicroseconds: mode == "adaptive" ? pollUs : 0, busyPoll: mode == "poll", seed: UInt64(depth))
        var first: Snapshot?
        var driverPid: Int32 = 0
        let out = try load.run(&s) { s in
            first = try Snapshot(admin: admin, session: s, driverPid: &driverPid, daemonPid: daemonPid)
            return first!.time
        }
        let last = try Snapshot(admin: admin, session: s, driverPid: &driverPid, daemonPid: daemonPid, ending: true)
        _ = try s.drainAll()
        var run = first!.run(to: last, ios: out.ios, errors: out.errors, p50: out.p50Us, p99: out.p99Us)
        if rate != nil {
            run.issued = out.issued
            run.late = out.late
        }
        return run
    }

    /// The C reference runs in this process (it is one process by design); the manager
    /// and the driver sleep meanwhile, and the reference's CPU is this process's own.
    /// `rate` > 0: open loop at that rate.
    func measureReference(socket: String, depth: Int, rate: Double, daemonPid: pid_t) throws -> RefBlkResult {
        try runRefBlk(socket: socket, queueDepth: depth, warmupSeconds: warmup, seconds: seconds, mode: mode,
                      seed: UInt64(depth), queueSize: 512, pollMicroseconds: UInt32(clamping: pollUs), rateIops: rate,
                      measuringAlso: daemonPid)
    }
}

/// Sleeps until `deadline` (Clock.monotonicNanoseconds, i.e. CLOCK_MONOTONIC).
func sleepUntil(_ deadline: UInt64) {
    var ts = timespec(tv_sec: Int(deadline / 1_000_000_000), tv_nsec: Int(deadline % 1_000_000_000))
    while clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nil) == EINTR {}
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

/// One row of `bench blk`: a closed-loop row (load "closed") or a fixed-rate row (load
/// "rate", with the offered load and the late counts).
struct BlkBenchLine {
    var load = "closed"
    var qd: Int
    var mode: String
    /// -1: not pinned.
    var deviceCpu: Int
    var frontendCpu: Int
    var repeats: Int
    var outboardIops: Double
    var cIops: Double
    /// Median over the pairs of Outboard IOPS / C IOPS (closed loop; at a fixed rate, the
    /// pair with the median CPU ratio), and the spread.
    var ratio: Double
    var ratioMin: Double
    var ratioMax: Double
    var outboardCpuUsPerIo: Double
    var driverCpuUsPerIo: Double
    var clientCpuUsPerIo: Double
    var cCpuUsPerIo: Double
    /// Outboard CPU per I/O (client + driver) over the C reference's.
    var cpuRatio: Double
    /// The device daemon's CPU per I/O during Outboard's run and during C's.
    var daemonCpuUsPerIo: Double?
    var cDaemonCpuUsPerIo: Double?
    /// CPU in percent of one CPU over the measured interval.
    var clientCpuPct: Double
    var driverCpuPct: Double
    var cCpuPct: Double
    var daemonCpuPct: Double?
    var cDaemonCpuPct: Double?
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
    // Fixed-rate rows only.
    var offeredIops: Double?
    var rateFraction: Double?
    var cMaxIops: Double?
    var cpuRatioMin: Double?
    var cpuRatioMax: Double?
    var outboardIssued: Int?
    var cIssued: Int?
    var outboardLate: Int?
    var cLate: Int?

    init(depth: Int, mode: String, placement: (device: Int, frontend: Int)?, outboard ob: BlkBench.OutboardRun, c: RefBlkResult,
         ratios: [Double], cpuRatios: [Double], middle: Int) {
        qd = depth
        self.mode = mode
        deviceCpu = placement?.device ?? -1
        frontendCpu = placement?.frontend ?? -1
        repeats = ratios.count
        outboardIops = ob.iops
        cIops = c.iops
        ratio = ratios[middle]
        ratioMin = ratios.min() ?? 0
        ratioMax = ratios.max() ?? 0
        outboardCpuUsPerIo = ob.clientCpuUs + ob.driverCpuUs
        driverCpuUsPerIo = ob.driverCpuUs
        clientCpuUsPerIo = ob.clientCpuUs
        cCpuUsPerIo = c.cpuUsPerIo
        cpuRatio = cpuRatios[middle]
        daemonCpuUsPerIo = ob.daemonCpuUs
        cDaemonCpuUsPerIo = c.peerCpuUsPerIo
        clientCpuPct = ob.clientCpuPercent
        driverCpuPct = ob.driverCpuPercent
        cCpuPct = c.cpuPercent
        daemonCpuPct = ob.daemonCpuPercent
        cDaemonCpuPct = c.peerCpuPercent
        p50Us = ob.p50
        p99Us = ob.p99
        cP50Us = c.p50Us
        cP99Us = c.p99Us
        doorbellsPerIo = ob.doorbells
        cDoorbellsPerIo = c.kicksPerIo + c.callsPerIo
        clientBellsPerIo = ob.clientBells
        kicksPerIo = ob.kicks
        interruptsPerIo = ob.interrupts
        clientSignalsPerIo = ob.clientSignals
        cKicksPerIo = c.kicksPerIo
        cCallsPerIo = c.callsPerIo
    }

    func json() -> String {
        var parts = ["\"bench\":\"blk\"", "\"load\":\"\(load)\"", "\"qd\":\(qd)", "\"mode\":\"\(mode)\"", "\"device_cpu\":\(deviceCpu)", "\"frontend_cpu\":\(frontendCpu)"]
        if let r = offeredIops { parts.append("\"offered_iops\":\(fmt(r, 0))") }
        if let f = rateFraction { parts.append("\"rate_fraction\":\(fmt(f, 4))") }
        if let m = cMaxIops { parts.append("\"c_max_iops\":\(fmt(m, 0))") }
        parts += ["\"outboard_iops\":\(fmt(outboardIops, 0))", "\"c_iops\":\(fmt(cIops, 0))", "\"ratio\":\(fmt(ratio, 3))",
                  "\"ratio_min\":\(fmt(ratioMin, 3))", "\"ratio_max\":\(fmt(ratioMax, 3))", "\"repeats\":\(repeats)"]
        if let n = outboardIssued { parts.append("\"outboard_issued\":\(n)") }
        if let n = cIssued { parts.append("\"c_issued\":\(n)") }
        if let n = outboardLate { parts.append("\"outboard_late\":\(n)") }
        if let n = cLate { parts.append("\"c_late\":\(n)") }
        parts += ["\"outboard_cpu_us_per_io\":\(fmt(outboardCpuUsPerIo, 2))", "\"driver_cpu_us_per_io\":\(fmt(driverCpuUsPerIo, 2))",
                  "\"client_cpu_us_per_io\":\(fmt(clientCpuUsPerIo, 2))", "\"c_cpu_us_per_io\":\(fmt(cCpuUsPerIo, 2))",
                  "\"cpu_ratio\":\(fmt(cpuRatio, 3))"]
        if let m = cpuRatioMin { parts.append("\"cpu_ratio_min\":\(fmt(m, 3))") }
        if let m = cpuRatioMax { parts.append("\"cpu_ratio_max\":\(fmt(m, 3))") }
        parts += ["\"client_cpu_pct\":\(fmt(clientCpuPct, 2))", "\"driver_cpu_pct\":\(fmt(driverCpuPct, 2))",
                  "\"outboard_cpu_pct\":\(fmt(clientCpuPct + driverCpuPct, 2))", "\"c_cpu_pct\":\(fmt(cCpuPct, 2))"]
        if let d = daemonCpuUsPerIo { parts.append("\"daemon_cpu_us_per_io\":\(fmt(d, 2))") }
        if let d = cDaemonCpuUsPerIo { parts.append("\"c_daemon_cpu_us_per_io\":\(fmt(d, 2))") }
        if let d = daemonCpuPct { parts.append("\"daemon_cpu_pct\":\(fmt(d, 2))") }
        if let d = cDaemonCpuPct { parts.append("\"c_daemon_cpu_pct\":\(fmt(d, 2))") }
        parts += ["\"p50_us\":\(fmt(p50Us, 1))", "\"p99_us\":\(fmt(p99Us, 1))", "\"c_p50_us\":\(fmt(cP50Us, 1))", "\"c_p99_us\":\(fmt(cP99Us, 1))",
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
