import ArgumentParser
import FoundationEssentials
import Manager
import Outboard
import OutboardBench
import OutboardSession
import OutboardSystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// `outboard bench _guest-run`: the part of `bench guest` that runs inside the guest lane's
/// guest, as root. It finds the guest kernel's disk, starts a manager with the Outboard
/// device (`guestBenchDeviceJSON`), and for each queue depth and each access pattern runs
/// fio on the kernel's disk (each engine), then Outboard's client at the maximum, then at
/// each fixed load Outboard first and fio after, printing one JSON line per run and a
/// summary line per depth and pattern. Progress goes to stderr.
struct GuestBenchRun: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "_guest-run", abstract: "The in-guest part of `bench guest` (run by it).", shouldDisplay: false)

    @OptionGroup var options: GuestBenchOptions
    @Option(help: "fio executable.") var fio: String?

    func run() throws {
        guard getuid() == 0 else { throw ValidationError("bench _guest-run starts the manager, which needs root") }
        installInterruptFlag()
        let kernelDisk = try findBlockDevice(pci: options.kernelPci, serial: options.kernelSerial)
        let diskBytes = try diskSize(kernelDisk)
        let fioPath = try fio ?? findOnPath("fio")
        let lab = try Lab(name: "guest-bench")
        defer { lab.remove() }
        let sizeMib = diskBytes >> 20
        let device = guestBenchDeviceJSON(transport: options.transport, pci: options.pci, notify: options.notify, sizeMib: sizeMib)
        let config = try writeGuestBenchConfig(lab: lab, device: device)
        var manager = try ManagerProcess(config: config, socket: lab.controlSocket)
        defer { manager.stop() }
        let admin = try AdminConnection(socketPath: lab.controlSocket)
        var bench = GuestBenchRunner(options: options, socket: lab.controlSocket, managerPid: manager.pid,
                                     kernelDisk: kernelDisk, fio: fioPath, outputFile: lab.dir + "/fio.json")
        let cpus = sysconf(Int32(_SC_NPROCESSORS_ONLN))
        let memory = (try? readSmallFile("/proc/meminfo", limit: 1 << 16)).flatMap(memTotalKib) ?? 0
        print("{\"bench\":\"guest\",\"row\":\"setup\",\"transport\":\"\(options.transport)\",\"notify\":\"\(options.notify)\",\"outboard_pci\":\"\(options.pci)\","
              + "\"kernel_pci\":\"\(options.kernelPci)\",\"kernel_disk\":\"\(kernelDisk)\",\"disk_mib\":\(sizeMib),"
              + "\"guest_cpus\":\(cpus),\"guest_memory_mib\":\(memory / 1024),\"kernel\":\"\(kernelRelease())\","
              + "\"user_hz\":\(userHz),\"seconds\":\(fmt(options.seconds, 3)),\"warmup\":\(fmt(options.warmup, 3)),"
              + "\"client_spin_us\":\(options.clientSpinUs),\"fio\":\"\(fioVersion(fioPath))\"}")
        fflush(nil)
        progress("bench guest: kernel disk /dev/\(kernelDisk) (\(sizeMib) MiB), Outboard device over \(options.transport), \(cpus) CPUs")
        for depth in options.qd.values where !interrupted() {
            for op in options.rw.values where !interrupted() {
                try bench.measure(admin: admin, depth: depth, op: op)
            }
        }
        if interrupted() { throw ExitCode(130) }
    }
}

/// The manager config of the guest benchmark: one device (`device`, a `devices` entry),
/// root allowed to open it; the driver runs as outboard-driver. Checked with the
/// manager's own parser before the manager starts, so a key the manager does not know is
/// reported here.
func writeGuestBenchConfig(lab: Lab, device: String) throws -> String {
    let path = lab.dir + "/outboard.json"
    let text = """
        {
          "control_socket": "\(lab.controlSocket)",
          "driver_user": "outboard-driver",
          "driver_group": "outboard-driver",
          "heartbeat_interval_ms": 20,
          "heartbeat_deadline_ms": 200,
          "lease_ms": 2000,
          "devices": [ \(device) ]
        }
        """
    do { _ = try ManagerConfig.parse(Data(text.utf8), source: "the bench's manager config") } catch {
        throw CommandFailure("\(error)\n\(text)")
    }
    do { try OwnedFD.open(path, O_WRONLY | O_CREAT | O_TRUNC).writeAll(Array(text.utf8)) } catch {
        throw CommandFailure("cannot write \(path): \(error)")
    }
    return path
}

/// One measured run of one side, and what it cost over its measured interval.
struct GuestRun {
    /// "outboard", or the fio engine ("io_uring", "libaio").
    var engine: String
    var op: String
    var qd: Int
    /// nil: closed loop (the maximum); else the fraction of Linux's maximum offered.
    var fraction: Double?
    var offeredIops: Double?
    /// Completions in the measured interval and its length.
    var ios: UInt64
    var seconds: Double
    var p50Us: Double
    var p99Us: Double
    /// The whole guest's CPU time over the interval (all CPUs).
    var cpu: CPUTimes
    /// The client process: fio (its job threads too: --thread), or this process.
    var client: ProcessTimes
    /// Outboard only: the driver and the manager.
    var driver: ProcessTimes?
    var manager: ProcessTimes?
    /// fio's own IOPS figure (its runtime after the ramp), beside the interval's.
    var fioIops: Double?
    /// Outboard only: the driver's signals over the interval, per I/O.
    var signals: (clientBells: Double, kicks: Double, interrupts: Double, clientSignals: Double)?
    /// Outboard only: the client's heavy barriers (membarrier(2) before a sleeping wait),
    /// per I/O.
    var heavyBarriers: Double?
    /// Outboard at a fixed load: submitted in the interval, and late (fell due with every
    /// slot busy, or due by the end and never issued).
    var issued: Int?
    var late: Int?
    /// Interrupts from the run's PCI function (/proc/interrupts) over the interval.
    var deviceInterrupts: UInt64 = 0
    /// All CPUs' function-call IPIs, rescheduling IPIs and TLB shootdowns over the interval.
    var ipis: (call: UInt64, resched: UInt64, tlb: UInt64) = (0, 0, 0)

    var iops: Double { seconds > 0 ? Double(ios) / seconds : 0 }
    var isLinux: Bool { engine != "outboard" }
    func us(_ ticks: UInt64) -> Double { Double(ticks) * 1e6 / Double(userHz) }
    var perIo: Double { Double(max(ios, 1)) }
    /// Busy CPU of the whole guest per completed I/O, microseconds.
    var cpuUsPerIo: Double { us(cpu.busy) / perIo }
    /// Busy share of all the guest's CPUs, percent (100: every CPU busy all the time).
    var guestCpuPct: Double { cpu.total > 0 ? Double(cpu.busy) * 100 / Double(cpu.total) : 0 }
    /// Busy CPU in CPUs (1.0: one CPU's worth).
    var guestCpus: Double { seconds > 0 ? us(cpu.busy) / 1e6 / seconds : 0 }
}

/// Runs the measurements of `_guest-run`.
struct GuestBenchRunner {
    let options: GuestBenchOptions
    let socket: String
    let managerPid: pid_t
    let kernelDisk: String
    let fio: String
    let outputFile: String

    /// One depth and pattern: the maximum of each side (fio's engines first, Outboard
    /// after), then each fixed load (Outboard first, fio's engines after), a row after each
    /// run and a summary row at the end.
    mutating func measure(admin: borrowing AdminConnection, depth: Int, op: String) throws {
        var maxRuns: [GuestRun] = []
        for engine in options.engines.values where !interrupted() {
            progress("qd \(depth) \(op): fio \(engine), maximum")
            maxRuns.append(try runFio(engine: engine, op: op, depth: depth, rate: nil))
        }
        if interrupted() { return }
        progress("qd \(depth) \(op): outboard, maximum")
        let obMax = try runOutboard(admin: admin, op: op, depth: depth, rate: nil)
        guard let linuxMax = maxRuns.max(by: { $0.iops < $1.iops }) else { return }
        for r in maxRuns + [obMax] { printRow(r, reference: linuxMax) }
        var atLoads: [(fraction: Double, outboard: GuestRun, reference: GuestRun)] = []
        for fraction in options.fractions where !interrupted() {
            let rate = fraction * linuxMax.iops
            guard rate >= 1 else { throw CommandFailure("qd \(depth) \(op): \(fmt(fraction, 2)) of Linux's maximum (\(fmt(linuxMax.iops, 0)) IOPS) is below 1 request per second") }
            progress("qd \(depth) \(op): outboard at \(fmt(rate, 0)) IOPS (\(fmt(fraction * 100, 0))% of Linux's maximum)")
            var ob = try runOutboard(admin: admin, op: op, depth: depth, rate: rate)
            ob.fraction = fraction
            var runs: [GuestRun] = []
            for engine in options.engines.values where !interrupted() {
                progress("qd \(depth) \(op): fio \(engine) at \(fmt(rate, 0)) IOPS")
                var r = try runFio(engine: engine, op: op, depth: depth, rate: rate)
                r.fraction = fraction
                runs.append(r)
            }
            // At an equal load the reference is the engine that spent the least CPU per I/O.
            guard let reference = runs.min(by: { $0.cpuUsPerIo < $1.cpuUsPerIo }) else { break }
            for r in runs + [ob] { printRow(r, reference: reference, linuxMaxIops: linuxMax.iops) }
            atLoads.append((fraction, ob, reference))
        }
        printSummary(depth: depth, op: op, outboard: obMax, linux: linuxMax, atLoads: atLoads)
    }

    func printRow(_ r: GuestRun, reference ref: GuestRun, linuxMaxIops: Double? = nil) {
        print(guestRunJSON(r, reference: ref, linuxMaxIops: linuxMaxIops, transport: options.transport))
        fflush(nil)
    }

    /// The target of the issue: at least Linux's throughput at the maximum, at most 0.7 of
    /// its CPU per I/O at every fixed load.
    func printSummary(depth: Int, op: String, outboard ob: GuestRun, linux: GuestRun,
                      atLoads: [(fraction: Double, outboard: GuestRun, reference: GuestRun)]) {
        let ratio = linux.iops > 0 ? ob.iops / linux.iops : 0
        var parts = ["\"bench\":\"guest\"", "\"row\":\"summary\"", "\"transport\":\"\(options.transport)\"", "\"rw\":\"\(op)\"", "\"qd\":\(depth)",
                     "\"outboard_max_iops\":\(fmt(ob.iops, 0))", "\"linux_max_iops\":\(fmt(linux.iops, 0))", "\"linux_max_engine\":\"\(linux.engine)\"",
                     "\"iops_ratio\":\(fmt(ratio, 3))",
                     "\"outboard_max_cpu_us_per_io\":\(fmt(ob.cpuUsPerIo, 2))", "\"linux_max_cpu_us_per_io\":\(fmt(linux.cpuUsPerIo, 2))"]
        var loads: [String] = []
        var worst = 0.0
        for l in atLoads {
            let cpuRatio = l.reference.cpuUsPerIo > 0 ? l.outboard.cpuUsPerIo / l.reference.cpuUsPerIo : 0
            worst = max(worst, cpuRatio)
            loads.append("{\"fraction\":\(fmt(l.fraction, 4)),\"offered_iops\":\(fmt(l.outboard.offeredIops ?? 0, 0)),"
                         + "\"outboard_iops\":\(fmt(l.outboard.iops, 0)),\"linux_iops\":\(fmt(l.reference.iops, 0)),\"linux_engine\":\"\(l.reference.engine)\","
                         + "\"outboard_guest_cpu_pct\":\(fmt(l.outboard.guestCpuPct, 2)),\"linux_guest_cpu_pct\":\(fmt(l.reference.guestCpuPct, 2)),"
                         + "\"outboard_cpu_us_per_io\":\(fmt(l.outboard.cpuUsPerIo, 2)),\"linux_cpu_us_per_io\":\(fmt(l.reference.cpuUsPerIo, 2)),"
                         + "\"cpu_ratio\":\(fmt(cpuRatio, 3))}")
        }
        parts.append("\"loads\":[" + loads.joined(separator: ",") + "]")
        if !atLoads.isEmpty { parts.append("\"worst_cpu_ratio\":\(fmt(worst, 3))") }
        parts.append("\"target_met\":\(ratio >= 1.0 && !atLoads.isEmpty && worst <= 0.7)")
        print("{" + parts.joined(separator: ",") + "}")
        fflush(nil)
    }

    // MARK: fio on the guest kernel's disk

    /// fio on /dev/`kernelDisk`: O_DIRECT 4 KiB `op` at `depth`, one job in fio's own
    /// process (--thread), closed loop or at `rate` (--rate_iops). The measured interval
    /// starts `warmup` after the disk's first completion (its /sys/block counters), when
    /// fio's ramp ends as well, and lasts `seconds`; fio runs half a second past it so that
    /// the interval holds only steady state. IOPS are the disk's completions in the
    /// interval; the latencies are fio's (completion latency, after its ramp).
    func runFio(engine: String, op: String, depth: Int, rate: Double?) throws -> GuestRun {
        let write = op == "randwrite"
        let ms = { (s: Double) in max(1, Int((s * 1000).rounded())) }
        var arguments = [
            "--name=guest", "--filename=/dev/\(kernelDisk)", "--rw=\(op)", "--bs=4k", "--direct=1",
            "--ioengine=\(engine)", "--iodepth=\(depth)", "--thread", "--norandommap", "--randrepeat=0",
            "--time_based", "--ramp_time=\(ms(options.warmup))ms", "--runtime=\(ms(options.seconds + 0.5))ms",
            "--output-format=json", "--output=\(outputFile)",
        ]
        if let rate { arguments.append("--rate_iops=\(max(1, Int(rate.rounded())))") }
        unlink(outputFile)
        let before = try DiskCounters.read(disk: kernelDisk)
        let null = try OwnedFD.open("/dev/null", O_RDWR)
        var child = try ChildProcess(executable: fio, arguments: arguments, descriptors: [(null.raw, 0), (null.raw, 1), (FileDescriptor.standardError, 2)])
        let started = Clock.monotonicNanoseconds
        let deadline = started + UInt64((options.seconds + options.warmup + 60) * 1e9)
        func done(_ c: DiskCounters) -> UInt64 { write ? c.writesCompleted : c.readsCompleted }
        // The first completion: fio is up and doing I/O.
        while done(try DiskCounters.read(disk: kernelDisk)) == done(before) {
            if let status = try child.wait(timeoutMilliseconds: 2) {
                throw CommandFailure("fio \(status) before its first I/O (\(arguments.joined(separator: " ")))")
            }
            if Clock.monotonicNanoseconds > deadline || interrupted() {
                child.terminate(SIGKILL)
                throw CommandFailure("fio did no I/O within \(Int(options.seconds + options.warmup + 60)) s")
            }
        }
        let first = Clock.monotonicNanoseconds
        sleepUntil(first + UInt64(options.warmup * 1e9))
        let pid = child.pid
        let a = try FioEdge(pid: pid, disk: kernelDisk, pci: options.kernelPci, ending: false)
        sleepUntil(a.time + UInt64(options.seconds * 1e9))
        let b = try FioEdge(pid: pid, disk: kernelDisk, pci: options.kernelPci, ending: true)
        let remaining = Int((deadline - min(deadline, Clock.monotonicNanoseconds)) / 1_000_000)
        guard let status = try child.wait(timeoutMilliseconds: max(remaining, 1000)) else {
            child.terminate(SIGKILL)
            throw CommandFailure("fio did not finish in time")
        }
        guard status == .exited(0) else { throw CommandFailure("fio \(status) (\(arguments.joined(separator: " ")))") }
        let report = try FioJobReport.parse(try readSmallFile(outputFile, limit: 16 << 20), write: write)
        return GuestRun(
            engine: engine, op: op, qd: depth, fraction: nil, offeredIops: rate,
            ios: done(b.disk) &- done(a.disk), seconds: Double(b.time - a.time) / 1e9,
            p50Us: report.clatP50Us, p99Us: report.clatP99Us, cpu: a.cpu.delta(to: b.cpu), client: a.fio.delta(to: b.fio),
            driver: nil, manager: nil, fioIops: report.iops, signals: nil, heavyBarriers: nil, issued: nil, late: nil,
            deviceInterrupts: b.interrupts.device &- a.interrupts.device,
            ipis: (b.interrupts.call &- a.interrupts.call, b.interrupts.resched &- a.interrupts.resched, b.interrupts.tlb &- a.interrupts.tlb))
    }

    /// The counters at one edge of fio's measured interval: at its start the clock last,
    /// at its end first.
    struct FioEdge {
        var time: UInt64
        var cpu: CPUTimes
        var fio: ProcessTimes
        var disk: DiskCounters
        var interrupts: (device: UInt64, call: UInt64, resched: UInt64, tlb: UInt64)
        init(pid: pid_t, disk name: String, pci: String, ending: Bool) throws {
            let early = Clock.monotonicNanoseconds
            disk = try DiskCounters.read(disk: name)
            interrupts = InterruptCounts.read(pci: pci)
            cpu = try CPUTimes.read()
            guard let f = ProcessTimes.read(pid: pid) else { throw CommandFailure("fio (pid \(pid)) ended inside its measured interval") }
            fio = f
            time = ending ? early : Clock.monotonicNanoseconds
        }
    }

    // MARK: Outboard's client

    /// The counters at one edge of Outboard's measured interval. At its start the status
    /// report comes first (a round trip to the manager) and the clocks last; at its end the
    /// clocks first.
    struct OutboardEdge {
        var time: UInt64
        var cpu: CPUTimes
        var client: ProcessTimes
        var driver: ProcessTimes?
        var manager: ProcessTimes?
        var counters: DriverCounters
        var bells: Int
        var barriers: Int
        var interrupts: (device: UInt64, call: UInt64, resched: UInt64, tlb: UInt64)
        init(admin: borrowing AdminConnection, session: borrowing BlockSession, driverPid: pid_t, managerPid: pid_t, pci: String,
             ending: Bool) throws {
            let me = getpid()
            if ending {
                time = Clock.monotonicNanoseconds
                cpu = try CPUTimes.read()
                interrupts = InterruptCounts.read(pci: pci)
                client = ProcessTimes.read(pid: me) ?? ProcessTimes(user: 0, system: 0)
                driver = ProcessTimes.read(pid: driverPid)
                manager = ProcessTimes.read(pid: managerPid)
                bells = session.doorbellsRung
                barriers = session.heavyBarriers
                counters = DriverCounters(try StatusReport.decode(admin.status()))
            } else {
                counters = DriverCounters(try StatusReport.decode(admin.status()))
                bells = session.doorbellsRung
                barriers = session.heavyBarriers
                manager = ProcessTimes.read(pid: managerPid)
                driver = ProcessTimes.read(pid: driverPid)
                client = ProcessTimes.read(pid: me) ?? ProcessTimes(user: 0, system: 0)
                interrupts = InterruptCounts.read(pci: pci)
                cpu = try CPUTimes.read()
                time = Clock.monotonicNanoseconds
            }
        }

        func run(to end: OutboardEdge, op: String, depth: Int, rate: Double?, ios: Int, p50: Double, p99: Double) throws -> GuestRun {
            guard let d0 = driver, let d1 = end.driver else {
                throw CommandFailure("the driver process changed or ended inside the measured interval")
            }
            let io = Double(max(ios, 1))
            return GuestRun(
                engine: "outboard", op: op, qd: depth, fraction: nil, offeredIops: rate, ios: UInt64(ios),
                seconds: Double(end.time - time) / 1e9, p50Us: p50, p99Us: p99, cpu: cpu.delta(to: end.cpu),
                client: client.delta(to: end.client), driver: d0.delta(to: d1),
                manager: manager.flatMap { m in end.manager.map { m.delta(to: $0) } }, fioIops: nil,
                signals: (Double(end.bells - bells) / io, Double(end.counters.kicks &- counters.kicks) / io,
                          Double(end.counters.interrupts &- counters.interrupts) / io,
                          Double(end.counters.clientSignals &- counters.clientSignals) / io),
                heavyBarriers: Double(end.barriers - barriers) / io,
                issued: nil, late: nil, deviceInterrupts: end.interrupts.device &- interrupts.device,
                ipis: (end.interrupts.call &- interrupts.call, end.interrupts.resched &- interrupts.resched, end.interrupts.tlb &- interrupts.tlb))
        }
    }

    /// Outboard's client in this process (`BlockLoad`, the same as `bench blk`'s), 4 KiB
    /// random `op` on the whole device: closed loop (`rate` nil) or open loop at `rate`.
    /// Waits sleep on the session's doorbell after `--client-spin-us` of polling.
    func runOutboard(admin: borrowing AdminConnection, op: String, depth: Int, rate: Double?) throws -> GuestRun {
        let write = op == "randwrite"
        var s = try BlockSession.open(socketPath: socket, device: guestBenchDeviceName, writable: write, dataBytes: depth * 4096,
                                      queueDepth: max(2, depth.nextPowerOfTwo), waitMilliseconds: 20_000)
        let status = try StatusReport.decode(admin.status())
        guard let driverPid = status.devices.first?.pid, driverPid > 0 else {
            throw CommandFailure("the device has no driver process (state \(status.devices.first?.state ?? "?"))")
        }
        let bop: BlockOp = write ? .write : .read
        if write {
            // Something other than zeroes, written once.
            let b = s.buffer
            for i in 0..<b.count { b[i] = UInt8(truncatingIfNeeded: i &* 31 &+ 7) }
        }
        let load = BlockLoad(op: bop, depth: depth, rate: rate, warmup: options.warmup, seconds: options.seconds,
                             spinMicroseconds: options.clientSpinUs, seed: UInt64(depth) ^ (write ? 0x5555 : 0))
        var first: OutboardEdge?
        let out = try load.run(&s) { s in
            first = try OutboardEdge(admin: admin, session: s, driverPid: driverPid, managerPid: managerPid, pci: options.pci, ending: false)
            return first!.time
        }
        let last = try OutboardEdge(admin: admin, session: s, driverPid: driverPid, managerPid: managerPid, pci: options.pci, ending: true)
        _ = try s.drainAll()
        guard out.errors == 0 else { throw CommandFailure("\(out.errors) Outboard requests failed") }
        var run = try first!.run(to: last, op: op, depth: depth, rate: rate, ios: out.ios, p50: out.p50Us, p99: out.p99Us)
        if rate != nil {
            run.issued = out.issued
            run.late = out.late
        }
        return run
    }
}

/// One row of `bench guest`: a run, with the Linux reference of the same run (the
/// engine with the most IOPS at the maximum, the least CPU per I/O at a fixed load) and
/// the run's CPU by component, per I/O.
func guestRunJSON(_ r: GuestRun, reference ref: GuestRun, linuxMaxIops: Double?, transport: String) -> String {
    var parts = ["\"bench\":\"guest\"", "\"row\":\"run\"", "\"transport\":\"\(transport)\"", "\"side\":\"\(r.isLinux ? "linux" : "outboard")\"",
                 "\"engine\":\"\(r.engine)\"", "\"rw\":\"\(r.op)\"", "\"qd\":\(r.qd)",
                 "\"load\":" + (r.fraction.map { fmt($0, 4) } ?? "\"max\"")]
    if let o = r.offeredIops { parts.append("\"offered_iops\":\(fmt(o, 0))") }
    if let m = linuxMaxIops { parts.append("\"linux_max_iops\":\(fmt(m, 0))") }
    parts += ["\"iops\":\(fmt(r.iops, 0))", "\"ios\":\(r.ios)", "\"seconds\":\(fmt(r.seconds, 3))",
              "\"p50_us\":\(fmt(r.p50Us, 1))", "\"p99_us\":\(fmt(r.p99Us, 1))"]
    if let f = r.fioIops { parts.append("\"fio_iops\":\(fmt(f, 0))") }
    if let n = r.issued { parts.append("\"issued\":\(n)") }
    if let n = r.late { parts.append("\"late\":\(n)") }
    parts += ["\"guest_cpu_pct\":\(fmt(r.guestCpuPct, 2))", "\"guest_cpus_busy\":\(fmt(r.guestCpus, 3))",
              "\"cpu_us_per_io\":\(fmt(r.cpuUsPerIo, 2))",
              "\"ref_engine\":\"\(ref.engine)\"", "\"ref_iops\":\(fmt(ref.iops, 0))",
              "\"iops_ratio\":\(fmt(ref.iops > 0 ? r.iops / ref.iops : 0, 3))",
              "\"ref_guest_cpu_pct\":\(fmt(ref.guestCpuPct, 2))", "\"ref_cpu_us_per_io\":\(fmt(ref.cpuUsPerIo, 2))",
              "\"cpu_ratio\":\(fmt(ref.cpuUsPerIo > 0 ? r.cpuUsPerIo / ref.cpuUsPerIo : 0, 3))"]
    // The profile: CPU per I/O by where /proc says it went. Their sum with `other_us` is
    // cpu_us_per_io.
    let io = r.perIo
    let clientUser = r.us(r.client.user) / io, clientSys = r.us(r.client.system) / io
    let driverUser = r.driver.map { r.us($0.user) / io } ?? 0, driverSys = r.driver.map { r.us($0.system) / io } ?? 0
    let manager = r.manager.map { r.us($0.user + $0.system) / io } ?? 0
    let irq = r.us(r.cpu.irq) / io, softirq = r.us(r.cpu.softirq) / io
    let other = r.cpuUsPerIo - clientUser - clientSys - driverUser - driverSys - manager - irq - softirq
    parts.append("\"profile_us_per_io\":{\"client_user\":\(fmt(clientUser, 2)),\"client_sys\":\(fmt(clientSys, 2)),"
                 + "\"driver_user\":\(fmt(driverUser, 2)),\"driver_sys\":\(fmt(driverSys, 2)),\"manager\":\(fmt(manager, 2)),"
                 + "\"irq\":\(fmt(irq, 2)),\"softirq\":\(fmt(softirq, 2)),\"other\":\(fmt(other, 2))}")
    parts.append("\"device_interrupts_per_io\":\(fmt(Double(r.deviceInterrupts) / io, 4))")
    parts.append("\"ipi_call_per_io\":\(fmt(Double(r.ipis.call) / io, 4)),\"ipi_resched_per_io\":\(fmt(Double(r.ipis.resched) / io, 4)),"
                 + "\"tlb_shootdowns_per_io\":\(fmt(Double(r.ipis.tlb) / io, 4))")
    if let s = r.signals {
        parts += ["\"client_bells_per_io\":\(fmt(s.clientBells, 4))", "\"kicks_per_io\":\(fmt(s.kicks, 4))",
                  "\"interrupts_per_io\":\(fmt(s.interrupts, 4))", "\"client_signals_per_io\":\(fmt(s.clientSignals, 4))"]
    }
    if let b = r.heavyBarriers { parts.append("\"client_heavy_barriers_per_io\":\(fmt(b, 4))") }
    return "{" + parts.joined(separator: ",") + "}"
}

// MARK: the guest's facts

/// The block device (its name under /sys/block, e.g. "vdb") of the virtio disk at PCI
/// address `pci`, checked against its serial.
func findBlockDevice(pci: String, serial: String) throws -> String {
    let base = "/sys/bus/pci/devices/\(pci)"
    guard let entries = listDirectory(base) else { throw CommandFailure("no PCI device at \(pci)") }
    for v in entries where v.hasPrefix("virtio") {
        for name in listDirectory("\(base)/\(v)/block") ?? [] {
            let s = (try? readSmallFile("/sys/block/\(name)/serial", limit: 256)).map { String(decoding: $0, as: UTF8.self) } ?? ""
            let found = trimmed(s)
            guard found == serial else { throw CommandFailure("/dev/\(name) at \(pci) has serial '\(found)', not '\(serial)'") }
            return name
        }
    }
    throw CommandFailure("the PCI device \(pci) has no block device (is it bound to virtio-pci and virtio_blk?)")
}

/// The names in a directory (without . and ..); nil if it cannot be opened.
func listDirectory(_ path: String) -> [String]? {
    guard let d = opendir(path) else { return nil }
    defer { closedir(d) }
    var names: [String] = []
    while let e = readdir(d) {
        let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
        if name != "." && name != ".." { names.append(name) }
    }
    return names.sorted()
}

/// A disk's size in bytes (/sys/block/NAME/size counts 512-byte sectors).
func diskSize(_ name: String) throws -> UInt64 {
    let text = String(decoding: try readSmallFile("/sys/block/\(name)/size", limit: 64), as: UTF8.self)
    guard let sectors = UInt64(trimmed(text)), sectors >= 8 else {
        throw CommandFailure("/sys/block/\(name)/size: '\(text)'")
    }
    return sectors * 512
}

/// MemTotal of /proc/meminfo, KiB.
func memTotalKib(_ text: [UInt8]) -> UInt64? {
    for line in String(decoding: text, as: UTF8.self).split(separator: "\n") where line.hasPrefix("MemTotal:") {
        return line.split(separator: " ").dropFirst().first.flatMap { UInt64($0) }
    }
    return nil
}

func kernelRelease() -> String {
    var u = utsname()
    guard uname(&u) == 0 else { return "?" }
    return withUnsafeBytes(of: u.release) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
}

/// The first line of `fio --version`, or "?".
func fioVersion(_ fio: String) -> String {
    let path = "/tmp/outboard-fio-version.\(getpid())"
    defer { unlink(path) }
    guard let out = try? OwnedFD.open(path, O_WRONLY | O_CREAT | O_TRUNC) else { return "?" }
    guard var child = try? ChildProcess(executable: fio, arguments: ["--version"], descriptors: [(out.raw, 1), (FileDescriptor.standardError, 2)]),
          (try? child.wait(timeoutMilliseconds: 30_000)) != nil else { return "?" }
    let text = (try? readSmallFile(path, limit: 4096)).map { String(decoding: $0, as: UTF8.self) } ?? "?"
    return String(text.split(separator: "\n").first ?? "?").filter { $0 != "\"" && $0 != "\\" }
}

/// The first executable `name` on PATH.
func findOnPath(_ name: String) throws -> String {
    let path = getenv("PATH").map { String(cString: $0) } ?? "/usr/bin:/bin"
    for dir in path.split(separator: ":") where access("\(dir)/\(name)", X_OK) == 0 {
        return "\(dir)/\(name)"
    }
    throw CommandFailure("\(name) is not on PATH (\(path)); the guest lane leaves fio out with --no-fio")
}

/// A progress line on stderr (stdout carries only the JSON rows).
func progress(_ s: String) {
    writeStderr(s + "\n")
}

/// `s` without the spaces, tabs and newlines around it.
func trimmed(_ s: String) -> String {
    let isSpace = { (c: Character) in c == " " || c == "\n" || c == "\t" || c == "\r" }
    return String(s.drop(while: isSpace).reversed().drop(while: isSpace).reversed())
}
