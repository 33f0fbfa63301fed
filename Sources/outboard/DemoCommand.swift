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

/// `outboard demo`: the whole framework in one run; with no part named, the block demo
/// (`outboard demo blk`), whose options it takes; `outboard demo net` is the network's.
struct DemoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "Run a demo: the block demo (the default, `demo blk`) or the network's (`demo net`); needs root.",
        subcommands: [DemoBlock.self, DemoNet.self],
        defaultSubcommand: DemoBlock.self
    )
}

/// `outboard demo [blk]`: a disk image, qemu-storage-daemon as the vhost-user-blk device,
/// the manager with the virtio-blk driver sandboxed, a verified random read/write workload
/// from this process, and the driver killed part-way through.
struct DemoBlock: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "blk",
        abstract: "Run the virtio-blk demo: device, manager, sandboxed driver, verified workload, a driver kill (needs root).",
        discussion: """
            Makes a disk image in a temporary directory, starts qemu-storage-daemon on it, starts \
            the manager with a sandboxed virtio-blk driver, and runs a verified random 4 KiB \
            read/write workload with a live progress line. Half-way through it kills the driver \
            with SIGKILL; the manager restarts it and the workload carries on, reissuing what \
            had not completed. Ends with a summary; everything started is stopped, also on Ctrl-C.
            """
    )

    @Option(help: "Seconds of workload.") var seconds: Double = 10
    @Option(help: "Size of the disk image in MiB.") var imageMib: Int = 256
    @Option(help: "4 KiB blocks the workload uses.") var blocks: Int = 16384
    @Option(help: "Requests in flight.") var depth: Int = 32
    @Option(help: "Driver kills during the run (evenly spaced).") var kills: Int = 1
    @Option(help: "Driver notification mode: interrupt, event-idx, adaptive, poll.") var notify: String = "adaptive"
    @Option(help: "Random seed.") var seed: UInt64 = 1
    @Flag(help: "Print the summary as one JSON object (progress goes to stderr).") var json = false

    func run() throws {
        guard getuid() == 0 else { throw ValidationError("the demo starts the manager, which needs root (it drops drivers to 'nobody')") }
        guard NotifyMode(name: notify) != nil else { throw ValidationError("unknown --notify '\(notify)'") }
        installInterruptFlag()
        let lab = try Lab(name: "demo")
        defer { lab.remove() }
        let image = lab.dir + "/disk.img"
        let say = Say(json: json)
        say.line("outboard demo: image \(image) (\(imageMib) MiB)")
        try makeImage(path: image, bytes: imageMib << 20, fill: false)
        var daemon = try StorageDaemon(image: image, sockets: [lab.dir + "/vblk0.sock"])
        defer { daemon.stop() }
        say.line("device: qemu-storage-daemon pid \(daemon.pid), vhost-user-blk at \(daemon.sockets[0])")
        let configPath = try lab.writeManagerConfig(device: "vblk0", socket: daemon.sockets[0], notify: notify)
        var manager = try ManagerProcess(config: configPath, socket: lab.controlSocket)
        defer { manager.stop() }
        say.line("manager pid \(manager.pid), control socket \(lab.controlSocket)")
        let admin = try AdminConnection(socketPath: lab.controlSocket)
        let session = try BlockSession.open(socketPath: lab.controlSocket, device: "vblk0", writable: true,
                                            dataBytes: depth * VerifiedWorkload.blockBytes, queueDepth: depth,
                                            waitMilliseconds: 20_000)
        guard UInt64(blocks) * 8 <= session.info.blockCount else {
            throw ValidationError("\(blocks) blocks of 4 KiB do not fit the \(session.info.blockCount)-sector device")
        }
        var status = try StatusReport.decode(admin.status())
        let dev0 = status.devices.first { $0.name == "vblk0" }
        // Each probe is "name errno"; errno 0 means the attempt succeeded.
        let probes = dev0?.sandboxProbes ?? []
        let refused = probes.filter { ($0.split(separator: " ").last.flatMap { Int32($0) } ?? 0) != 0 }.count
        let probeText = refused == probes.count ? "all \(probes.count) refused" : "\(probes.count - refused) of \(probes.count) NOT refused"
        say.line("driver pid \(dev0?.pid.map { "\($0)" } ?? "-") (uid nobody, sandboxed: escape attempts \(probeText)), device \(session.info.blockCount) sectors, \(session.info.flags)")
        var w = VerifiedWorkload(session: session, blocks: blocks, seed: seed)
        say.line("writing every block once (\(blocks * 4 / 1024) MiB)...")
        try w.prepare()

        // The measured run.
        var cpu = DriverCPU()
        cpu.sample(status)
        let clientCPU0 = Clock.processCPUNanoseconds
        var lastClientCPU = clientCPU0
        let ops0 = w.ops, reads0 = w.reads, writes0 = w.writes
        let t0 = Clock.monotonicNanoseconds
        let end = t0 + UInt64(seconds * 1e9)
        let killTimes = (0..<kills).map { t0 + UInt64(Double($0 + 1) * seconds * 1e9 / Double(kills + 1)) }
        var nextKill = 0
        var pendingKill: (at: UInt64, generation: UInt64, pid: Int32)? = nil
        var recoveries: [Double] = []
        var lastTick = t0, lastOps = w.ops
        var failure: String? = nil
        while Clock.monotonicNanoseconds < end && !interrupted() {
            let sliceEnd = min(end, Clock.monotonicNanoseconds + 100_000_000)
            do {
                try w.run { w in
                    if let k = pendingKill, w.lastCompletionGeneration > k.generation { return true }
                    return Clock.monotonicNanoseconds >= sliceEnd || interrupted()
                }
            } catch {
                failure = "\(error)"
                break
            }
            let now = Clock.monotonicNanoseconds
            if let k = pendingKill, w.lastCompletionGeneration > k.generation {
                let ms = Double(now - k.at) / 1e6
                recoveries.append(ms)
                pendingKill = nil
                status = (try? StatusReport.decode(admin.status())) ?? status
                cpu.sample(status)
                let newPid = status.devices.first { $0.name == "vblk0" }?.pid.map { "\($0)" } ?? "-"
                say.clear()
                say.line("driver restarted: pid \(newPid), first completion \(fmt(ms, 1)) ms after the kill; the workload carried on (\(w.session.reissued) requests reissued so far)")
            }
            if nextKill < killTimes.count, now >= killTimes[nextKill], pendingKill == nil {
                nextKill += 1
                status = (try? StatusReport.decode(admin.status())) ?? status
                cpu.sample(status)
                do {
                    let hit = try admin.injectFault(device: "vblk0", .kill)
                    pendingKill = (now, hit.generation, hit.pid)
                    say.clear()
                    say.line("killing the driver (pid \(hit.pid), SIGKILL)")
                } catch {
                    failure = "cannot kill the driver: \(error)"
                    break
                }
            }
            if now - lastTick >= 500_000_000 {
                status = (try? StatusReport.decode(admin.status())) ?? status
                cpu.sample(status)
                let dt = Double(now - lastTick) / 1e9
                let iops = Double(w.ops - lastOps) / dt
                let elapsed = Double(now - t0) / 1e9
                // Over the last tick, as the driver's figure.
                let clientNow = Clock.processCPUNanoseconds
                let clientPct = Double(clientNow &- lastClientCPU) / Double(now - lastTick) * 100
                lastClientCPU = clientNow
                say.progress("\(pad(fmt(elapsed, 1), 5)) s  \(pad("\(Int(iops))", 7)) IOPS  \(pad(fmt(iops * 4096 / 1e6, 1), 6)) MB/s  driver CPU \(pad(fmt(cpu.recentPercent, 1), 5))%  client CPU \(pad(fmt(clientPct, 1), 5))%  ops \(w.ops)  verify errors \(w.verifyErrors)")
                lastTick = now
                lastOps = w.ops
            }
        }
        if failure == nil {
            do { try w.finish() } catch { failure = "finishing: \(error)" }
        }
        let wall = Double(Clock.monotonicNanoseconds - t0) / 1e9
        let clientCPU = Clock.processCPUNanoseconds - clientCPU0
        status = (try? StatusReport.decode(admin.status())) ?? status
        cpu.sample(status)
        say.clear()
        let ops = w.ops - ops0
        let dev = status.devices.first { $0.name == "vblk0" }
        let summary = DemoSummary(
            ops: ops, iops: Double(ops) / wall, mbPerS: Double(ops) * 4096 / wall / 1e6, seconds: wall,
            reads: w.reads - reads0, writes: w.writes - writes0, verifyErrors: w.verifyErrors, clientErrors: w.clientErrors,
            driverRestarts: dev?.restarts ?? 0, recoveryMs: recoveries.max() ?? 0, recoveriesMs: recoveries,
            reissued: w.session.reissued,
            driverCpuUsPerOp: Double(cpu.total) / 1000 / Double(max(ops, 1)),
            clientCpuUsPerOp: Double(clientCPU) / 1000 / Double(max(ops, 1)),
            deviceSectors: w.session.info.blockCount, notify: notify, queueDepth: depth,
            firstError: w.firstError, failure: failure ?? (interrupted() ? "interrupted" : nil))
        if json {
            try printJSONObject(summary)
        } else {
            print("""

                summary
                  operations         \(summary.ops) (\(summary.reads) reads, \(summary.writes) writes, 4 KiB, queue depth \(depth))
                  throughput         \(Int(summary.iops)) IOPS, \(fmt(summary.mbPerS, 1)) MB/s over \(fmt(wall, 1)) s
                  verify errors      \(summary.verifyErrors)
                  client errors      \(summary.clientErrors)
                  driver restarts    \(summary.driverRestarts)
                  recovery           \(nextKill == 0 ? "none (no driver was killed)" : recoveries.isEmpty ? "not seen before the end" : recoveries.map { "\(fmt($0, 1)) ms" }.joined(separator: ", ") + " (kill to first completion by the new driver)")
                  reissued requests  \(summary.reissued)
                  driver CPU         \(fmt(summary.driverCpuUsPerOp, 1)) us/op
                  client CPU         \(fmt(summary.clientCpuUsPerOp, 1)) us/op
                """)
            if let e = summary.firstError { print("  first error        \(e)") }
            if let f = summary.failure { print("  stopped            \(f)") }
        }
        if summary.failure != nil || summary.verifyErrors > 0 || summary.clientErrors > 0 { throw ExitCode(1) }
    }
}

struct DemoSummary: Codable {
    var ops: Int
    var iops: Double
    var mbPerS: Double
    var seconds: Double
    var reads: Int
    var writes: Int
    var verifyErrors: Int
    var clientErrors: Int
    var driverRestarts: Int
    /// Longest kill-to-first-completion time.
    var recoveryMs: Double
    var recoveriesMs: [Double]
    var reissued: Int
    var driverCpuUsPerOp: Double
    var clientCpuUsPerOp: Double
    var deviceSectors: UInt64
    var notify: String
    var queueDepth: Int
    var firstError: String?
    var failure: String?
}

/// CPU of the driver processes over a run, across restarts (each pid's last reading).
struct DriverCPU {
    var firstSeen: [Int32: UInt64] = [:]
    var last: [Int32: UInt64] = [:]
    var recentPercent = 0.0
    var lastTotal: UInt64 = 0
    var lastAt: UInt64 = 0

    mutating func sample(_ s: StatusReport) {
        for d in s.devices {
            guard let pid = d.pid, let ns = processCPUNanoseconds(pid: pid) else { continue }
            if firstSeen[pid] == nil { firstSeen[pid] = ns }
            last[pid] = ns
        }
        let now = Clock.monotonicNanoseconds
        let t = total
        if lastAt != 0, now > lastAt { recentPercent = Double(t &- lastTotal) / Double(now - lastAt) * 100 }
        lastTotal = t
        lastAt = now
    }

    /// Used since each pid was first seen.
    var total: UInt64 { last.reduce(0) { $0 + ($1.value &- (firstSeen[$1.key] ?? $1.value)) } }
}

/// Output for people: progress lines overwrite each other on a terminal; with --json they
/// go to stderr so stdout holds only the summary.
struct Say {
    let json: Bool
    let tty = isatty(1) != 0
    func line(_ s: String) {
        if json { writeStderr(s + "\n") } else { print(s) }
    }
    func progress(_ s: String) {
        if json { writeStderr(s + "\n") } else if tty { print("\r" + s, terminator: ""); fflush(nil) } else { print(s) }
    }
    func clear() {
        if !json && tty { print("\r\u{1B}[K", terminator: "") }
    }
}



// Ctrl-C: a flag the loops check, so that everything started is stopped on the way out.
nonisolated(unsafe) var interruptFlag: Int32 = 0

func installInterruptFlag() {
    signal(SIGINT) { _ in interruptFlag = 1 }
    signal(SIGTERM) { _ in interruptFlag = 1 }
    unblockStopSignals()
}

func interrupted() -> Bool { interruptFlag != 0 }

/// A temporary directory for a run's image, sockets and config; removed afterwards.
struct Lab {
    let dir: String
    var controlSocket: String { dir + "/control.sock" }

    init(name: String) throws {
        var template = Array("/tmp/outboard-\(name)-XXXXXX".utf8CString)
        guard let p = mkdtemp(&template) else { throw CommandFailure("cannot create a temporary directory: \(Errno(rawValue: errno))") }
        dir = String(cString: p)
        chmod(dir, 0o755)
    }

    func remove() {
        if let d = opendir(dir) {
            while let e = readdir(d) {
                let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
                if name != "." && name != ".." { unlink(dir + "/" + name) }
            }
            closedir(d)
        }
        rmdir(dir)
    }

    /// A manager config with one vhost-user block device, root allowed to open it.
    func writeManagerConfig(device: String, socket: String, notify: String, queueSize: Int = 256,
                            maxQueueDepth: Int = 256, pollUs: Int = 50) throws -> String {
        let path = dir + "/outboard.json"
        let text = """
            {
              "control_socket": "\(controlSocket)",
              "driver_user": "nobody",
              "heartbeat_interval_ms": 20,
              "heartbeat_deadline_ms": 200,
              "lease_ms": 2000,
              "devices": [
                {
                  "name": "\(device)",
                  "transport": "vhost-user",
                  "class": "block",
                  "socket": "\(socket)",
                  "queue_size": \(queueSize),
                  "notify": "\(notify)",
                  "poll_us": \(pollUs),
                  "access": [ { "uid": 0, "mode": "rw" } ],
                  "limits": { "max_queue_depth": \(maxQueueDepth), "max_session_bytes": 67108864 },
                  "probe_sandbox": true
                }
              ]
            }
            """
        do { try OwnedFD.open(path, O_WRONLY | O_CREAT | O_TRUNC).writeAll(Array(text.utf8)) } catch {
            throw CommandFailure("cannot write \(path): \(error)")
        }
        return path
    }
}

/// `outboard run` as a child process: `stop()` ends it with SIGTERM; dropped unstopped, it is killed.
/// Runs `body` with the control socket of the manager `config` names: the one already
/// listening there, or one started from the config for the call and stopped after it.
func withManager<R>(config: String, _ body: (String) throws -> R) throws -> R {
    let socket = try ManagerConfig.load(path: config).controlSocket
    if (try? UnixSocket.connect(path: socket)) != nil { return try body(socket) }
    var manager = try ManagerProcess(config: config, socket: socket)
    defer { manager.stop() }
    return try body(socket)
}

struct ManagerProcess: ~Copyable {
    var child: ChildProcess
    var pid: pid_t { child.pid }

    init(config: String, socket: String, logLevel: String = "warning") throws {
        var c = try ChildProcess(executable: currentExecutable(), arguments: ["run", "--config", config, "--log-level", logLevel])
        try Self.waitForSocket(&c, socket)
        child = c
    }

    static func waitForSocket(_ child: inout ChildProcess, _ socket: String) throws {
        let deadline = Clock.monotonicNanoseconds + 20_000_000_000
        while Clock.monotonicNanoseconds < deadline {
            if (try? UnixSocket.connect(path: socket)) != nil { return }
            if let status = try child.wait(timeoutMilliseconds: 20) {
                throw CommandFailure("the manager exited at start: \(status)")
            }
        }
        try? child.signal(SIGKILL)
        _ = try? child.wait()
        throw CommandFailure("the manager did not open \(socket) within 20 s")
    }

    /// SIGTERM (the manager stops its drivers and removes its socket), SIGKILL after 5 s.
    /// A manager never stopped is killed when this value goes away (ChildProcess's deinit).
    mutating func stop() {
        child.terminate(SIGTERM)
    }
}
