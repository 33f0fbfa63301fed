import ArgumentParser
import FoundationEssentials
import Manager
import OutboardBench
import OutboardSession
import OutboardSystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The Outboard device's name in the guest benchmark's manager config.
let guestBenchDeviceName = "ob0"

/// The Outboard device of the guest benchmark, as an entry of the manager config's
/// `devices`: the one place that says how the device is reached. vfio: the disk at `pci`,
/// which the manager binds to vfio-pci and drives with the sandboxed virtio-blk driver
/// over virtio-pci. memory: `sizeMib` of manager-owned memory (the same size as the guest
/// kernel's disk) served by the memory block driver, for development only (no device, no
/// interrupts: not a comparison with the kernel's disk).
func guestBenchDeviceJSON(transport: String, pci: String, notify: String, sizeMib: UInt64) -> String {
    let reach = switch transport {
    case "vfio": "\"transport\": \"vfio\", \"pci\": \"\(pci)\", \"notify\": \"\(notify)\""
    default: "\"transport\": \"memory\", \"size_mib\": \(sizeMib)"
    }
    return """
        { "name": "\(guestBenchDeviceName)", \(reach), "class": "block",
          "access": [ { "uid": 0, "mode": "rw" } ],
          "limits": { "max_queue_depth": 256, "max_session_bytes": 16777216 } }
        """
}

/// What the host part and the in-guest part of `bench guest` share: the in-guest part
/// gets them as the host part was given them (`forwarded`).
struct GuestBenchOptions: ParsableArguments {
    @Option(help: "Queue depths, comma separated.") var qd: ListOption<Int> = [1, 8, 32, 128]
    @Option(help: "Fixed offered loads as fractions of Linux's maximum (the better fio engine, closed loop, same depth and pattern, this run), comma separated.")
    var loads: ListOption<Double> = [0.25, 0.5, 0.75]
    @Flag(help: "Only the maximum (closed-loop) rows.") var noLoads = false
    @Option(help: "Access patterns (fio --rw), comma separated: randread, randwrite.") var rw: ListOption<String> = ["randread", "randwrite"]
    @Option(help: "fio engines on the guest kernel's disk, comma separated: io_uring, libaio.") var engines: ListOption<String> = ["io_uring", "libaio"]
    @Option(help: "Measured seconds per run.") var seconds: Double = 1.5
    @Option(help: "Warm-up seconds per run (fio: --ramp_time).") var warmup: Double = 0.5
    @Option(help: "How the manager reaches Outboard's disk: vfio (the disk at --pci, through vfio-pci) or memory (manager-owned memory of the kernel disk's size; for development).")
    var transport: String = "vfio"
    @Option(help: "vfio: how the driver learns of completions: event-idx (interrupts, batched, as the kernel's driver), adaptive (busy-polls while busy and 50 us after), interrupt, poll.")
    var notify: String = "event-idx"
    @Option(help: "PCI address of Outboard's disk in the guest (vfio).") var pci: String = "0000:00:04.0"
    @Option(help: "PCI address of the guest kernel's disk.") var kernelPci: String = "0000:00:05.0"
    @Option(help: "Serial the guest kernel's disk must have.") var kernelSerial: String = "guest-kernel"
    @Option(help: "Microseconds Outboard's client polls (yielding) before it sleeps in a wait; 0: it sleeps at once.")
    var clientSpinUs: Int = 0

    /// The effective loads (none with --no-loads).
    var fractions: [Double] { noLoads ? [] : loads.values }

    mutating func validate() throws {
        guard qd.values.allSatisfy({ $0 >= 1 && $0 <= 128 }) else { throw ValidationError("--qd: 1...128") }
        guard loads.values.allSatisfy({ $0 > 0 && $0 <= 1 }) else { throw ValidationError("--loads: fractions, more than 0, at most 1") }
        guard rw.values.allSatisfy({ $0 == "randread" || $0 == "randwrite" }) else { throw ValidationError("--rw: randread, randwrite") }
        guard engines.values.allSatisfy({ $0 == "io_uring" || $0 == "libaio" }) else { throw ValidationError("--engines: io_uring, libaio") }
        guard seconds > 0, seconds <= 600, warmup >= 0, warmup <= 600 else { throw ValidationError("--seconds: more than 0; --warmup: at least 0 (each at most 600)") }
        guard transport == "vfio" || transport == "memory" else { throw ValidationError("--transport: vfio or memory") }
        guard NotifyMode(name: notify) != nil else { throw ValidationError("--notify: interrupt, event-idx, adaptive or poll") }
        guard clientSpinUs >= 0, clientSpinUs <= 100_000 else { throw ValidationError("--client-spin-us: 0...100000") }
        for (name, a) in [("--pci", pci), ("--kernel-pci", kernelPci)] {
            guard a.utf8.count == 12, a.allSatisfy({ $0.isHexDigit || $0 == ":" || $0 == "." }) else {
                throw ValidationError("\(name): a PCI address such as 0000:00:04.0")
            }
        }
        guard !kernelSerial.isEmpty, kernelSerial.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" }) else {
            throw ValidationError("--kernel-serial: letters, digits, '-' and '_'")
        }
    }

    /// The same options, spelled for the in-guest command (words without spaces: the lane
    /// joins them for the guest's sh).
    var forwarded: [String] {
        func list<T>(_ l: ListOption<T>) -> String { l.values.map { "\($0)" }.joined(separator: ",") }
        var a = ["--qd", list(qd), "--loads", list(loads), "--rw", list(rw), "--engines", list(engines),
                 "--seconds", "\(seconds)", "--warmup", "\(warmup)", "--transport", transport, "--notify", notify, "--pci", pci,
                 "--kernel-pci", kernelPci, "--kernel-serial", kernelSerial, "--client-spin-us", "\(clientSpinUs)"]
        if noLoads { a.append("--no-loads") }
        return a
    }

    /// Runs in one boot: per depth and pattern, each engine and Outboard at the maximum
    /// and at each load.
    var runCount: (fio: Int, outboard: Int) {
        let cells = qd.values.count * rw.values.count
        let points = 1 + fractions.count
        return (cells * points * engines.values.count, cells * points)
    }
}

/// `outboard bench guest`: the guest kernel's virtio-blk against Outboard's driver, in one
/// boot of the guest lane (scripts/guest-lane.sh, a QEMU TCG guest with an IOMMU). This
/// process runs the lane with `outboard bench _guest-run` (GuestBenchRun) as the guest's
/// command and prints the rows it reports.
struct GuestBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "guest",
        abstract: "Benchmark Outboard's driver against the guest kernel's virtio-blk inside one guest-lane boot.",
        discussion: """
            One boot of scripts/guest-lane.sh. Inside, for each queue depth (--qd) and pattern (--rw): \
            fio on the guest kernel's disk (O_DIRECT, 4 KiB, each of --engines), then Outboard's client \
            (this binary, closed loop) on Outboard's disk, then at each of --loads (fractions of the better \
            engine's IOPS just measured) Outboard paced at that rate (open loop, a deadline schedule) and fio \
            with --rate_iops. Every run is measured over --seconds after --warmup: IOPS, latency p50/p99 \
            (Outboard: submit to completion in the client; fio: completion latency), the whole guest's busy \
            CPU from /proc/stat (total - idle - iowait, all CPUs) and per I/O, and its split: the client's \
            utime and stime (/proc/PID/stat of fio, --thread, or of the client), the driver's and the \
            manager's (Outboard), irq and softirq (/proc/stat), and the rest (other); and the disk's \
            interrupts per I/O (/proc/interrupts, the vectors of its PCI function). Each run row carries \
            the Linux reference of the same run (the engine with more IOPS at the maximum, the one with less \
            CPU per I/O at a fixed load) and the ratios to it; a summary row per depth and pattern says \
            whether Outboard reached Linux's maximum at no more than 0.7 of its CPU per I/O at every load.
            """
    )

    @OptionGroup var options: GuestBenchOptions
    @Flag(help: "Print the guest's JSON lines as they are (one object per line) instead of tables.") var json = false
    @Option(help: "Size of each of the guest's two disks (guest-lane.sh --disk-size).") var diskSize: String = "256M"
    @Option(help: "Guest memory (guest-lane.sh --memory).") var memory: String = "1G"
    @Option(help: "Seconds before the guest is stopped. Default: from the number of runs.") var timeout: Int?
    @Option(help: "The guest lane script. Default: scripts/guest-lane.sh above the working directory or this executable.")
    var lane: String?
    @Option(help: "Hold this lock file (flock(1)) while the guest runs: one guest at a time on a machine.") var lock: String?
    @Option(help: "Use this outboard binary in the guest as it is (guest-lane.sh --outboard) instead of the static build.")
    var guestOutboard: String?

    /// Seconds the whole boot may take: fio's start under TCG costs seconds (84 MB of
    /// libraries), so every fio run counts 4 s on top of its own time.
    var defaultTimeout: Int {
        let (fio, ob) = options.runCount
        let each = options.seconds + options.warmup
        return 120 + Int(2 * (Double(fio) * (each + 0.5 + 4) + Double(ob) * (each + 1)))
    }

    func run() throws {
        let script = try lane ?? findLaneScript()
        let seconds = timeout ?? defaultTimeout
        var arguments = [script, "--disk-size", diskSize, "--memory", memory, "--timeout", "\(seconds)"]
        if let g = guestOutboard { arguments += ["--outboard", g] }
        arguments += ["--", "outboard", "bench", "_guest-run"] + options.forwarded
        var executable = script
        if let lock {
            executable = try findOnPath("flock")
            arguments = [lock] + arguments
        }
        installInterruptFlag()
        let (fioRuns, obRuns) = options.runCount
        writeStderr("bench guest: \(fioRuns) fio runs and \(obRuns) Outboard runs in one guest boot (timeout \(seconds) s)\n")
        // The host's own load over the boot: under TCG a vCPU the host does not run is, for
        // the guest, time its current task took, so a busy host inflates every figure.
        let hostBefore = try? CPUTimes.read()
        let loadBefore = loadAverage()
        if loadBefore > 1 {
            writeStderr("bench guest: the host's load average is \(fmt(loadBefore, 2)): under TCG other work on the host shows in the guest as time its tasks took\n")
        }
        let (status, output) = try runCapturingStdout(executable: executable, arguments: executable == script ? Array(arguments.dropFirst()) : arguments)
        let hostAfter = try? CPUTimes.read()
        var rows: [[String: JSONValue]] = []
        var rawRows: [String] = []
        for line in output.split(separator: "\n", omittingEmptySubsequences: true) {
            if line.hasPrefix("{\"bench\":\"guest\""), let row = try? JSONDecoder().decode([String: JSONValue].self, from: Data(line.utf8)) {
                rows.append(row)
                rawRows.append(String(line))
            } else {
                writeStderr("guest: \(line)\n")
            }
        }
        if let a = hostBefore, let b = hostAfter {
            let d = a.delta(to: b)
            let busy = d.total > 0 ? Double(d.busy) * 100 / Double(d.total) : 0
            let cpus = sysconf(Int32(_SC_NPROCESSORS_ONLN))
            let line = "{\"bench\":\"guest\",\"row\":\"host\",\"host_cpus\":\(cpus),\"host_busy_pct\":\(fmt(busy, 2)),"
                + "\"host_busy_cpus\":\(fmt(busy * Double(cpus) / 100, 2)),\"loadavg_before\":\(fmt(loadBefore, 2)),\"loadavg_after\":\(fmt(loadAverage(), 2))}"
            if let row = try? JSONDecoder().decode([String: JSONValue].self, from: Data(line.utf8)) { rows.append(row) }
            rawRows.append(line)
        }
        if json {
            for r in rawRows { print(r) }
        } else {
            printGuestBenchTables(rows)
        }
        fflush(nil)
        guard status == .exited(0) else { throw CommandFailure("the guest lane \(status)") }
        guard rows.contains(where: { $0["row"]?.string == "summary" }) else { throw CommandFailure("the guest reported no summary row") }
    }

    /// scripts/guest-lane.sh in the working directory or one above it, or above this
    /// executable (.build-*/release/outboard).
    func findLaneScript() throws -> String {
        var starts: [String] = []
        if let cwd = getenv("PWD").map({ String(cString: $0) }), cwd.hasPrefix("/") { starts.append(cwd) }
        starts.append(currentExecutable())
        for start in starts {
            var dir = start
            while !dir.isEmpty && dir != "/" {
                let candidate = dir + "/scripts/guest-lane.sh"
                if access(candidate, X_OK) == 0 { return candidate }
                dir = String(dir[..<(dir.lastIndex(of: "/") ?? dir.startIndex)])
            }
        }
        throw CommandFailure("scripts/guest-lane.sh not found above \(starts.joined(separator: " or ")): give --lane")
    }
}

/// Runs a program with stdin from /dev/null and stdout into a temporary file (stderr
/// inherited), and returns its status and what it wrote. Ctrl-C stops it (SIGTERM).
func runCapturingStdout(executable: String, arguments: [String]) throws -> (ExitStatus, String) {
    let path = "/tmp/outboard-bench-guest.\(getpid()).out"
    defer { unlink(path) }
    var child: ChildProcess
    do {
        let out = try OwnedFD.open(path, O_RDWR | O_CREAT | O_TRUNC, mode: 0o600)
        let null = try OwnedFD.open("/dev/null", O_RDONLY)
        child = try ChildProcess(executable: executable, arguments: arguments, descriptors: [(null.raw, 0), (out.raw, 1), (FileDescriptor.standardError, 2)])
    } catch {
        throw CommandFailure("cannot start \(executable): \(error)")
    }
    var status: ExitStatus?
    while status == nil {
        status = try child.wait(timeoutMilliseconds: 200)
        if status == nil && interrupted() {
            child.terminate(SIGTERM, graceMilliseconds: 20_000)
            throw ExitCode(130)
        }
    }
    let text = String(decoding: try readSmallFile(path, limit: 64 << 20), as: UTF8.self)
    return (status!, text)
}

/// A JSON value, for reading the guest's rows back.
enum JSONValue: Decodable, Equatable {
    case string(String)
    case number(Double)
    case bool(Bool)
    case array([JSONValue])
    case object([String: JSONValue])
    case null

    init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() { self = .null }
        else if let b = try? c.decode(Bool.self) { self = .bool(b) }
        else if let n = try? c.decode(Double.self) { self = .number(n) }
        else if let s = try? c.decode(String.self) { self = .string(s) }
        else if let a = try? c.decode([JSONValue].self) { self = .array(a) }
        else { self = .object(try c.decode([String: JSONValue].self)) }
    }

    var string: String? { if case .string(let s) = self { s } else { nil } }
    var number: Double? { if case .number(let n) = self { n } else { nil } }
    var bool: Bool? { if case .bool(let b) = self { b } else { nil } }
    var array: [JSONValue]? { if case .array(let a) = self { a } else { nil } }
    subscript(_ key: String) -> JSONValue? { if case .object(let o) = self { o[key] } else { nil } }
}

/// The rows as tables: the setup, every run, the CPU profile of every run, the summary.
func printGuestBenchTables(_ rows: [[String: JSONValue]]) {
    func s(_ r: [String: JSONValue], _ k: String) -> String { r[k]?.string ?? r[k]?.number.map { fmt($0, 0) } ?? "-" }
    func n(_ r: [String: JSONValue], _ k: String, _ d: Int) -> String { r[k]?.number.map { fmt($0, d) } ?? "-" }
    if let setup = rows.first(where: { $0["row"]?.string == "setup" }) {
        print("bench guest: transport \(s(setup, "transport")), guest kernel \(s(setup, "kernel")), \(s(setup, "guest_cpus")) vCPUs, "
              + "\(s(setup, "guest_memory_mib")) MiB, disks \(s(setup, "disk_mib")) MiB, \(n(setup, "seconds", 1)) s per run after \(n(setup, "warmup", 1)) s, "
              + "\(s(setup, "fio"))")
    }
    if let host = rows.first(where: { $0["row"]?.string == "host" }) {
        print("host during the boot: \(n(host, "host_busy_cpus", 2)) of \(s(host, "host_cpus")) CPUs busy (QEMU included), load average \(n(host, "loadavg_before", 2)) before, \(n(host, "loadavg_after", 2)) after")
    }
    let runs = rows.filter { $0["row"]?.string == "run" }
    func load(_ r: [String: JSONValue]) -> String { r["load"]?.number.map { fmt($0 * 100, 0) + "%" } ?? "max" }
    print("runs (ratio and cpu ratio: against the Linux reference of the same depth, pattern and load):")
    print("   qd  rw          load  engine        IOPS   ratio   p50 us    p99 us  guest CPU %  CPU us/IO  cpu ratio  irqs/IO  ref")
    for r in runs {
        print("\(pad(s(r, "qd"), 5))  \(padRight(s(r, "rw"), 10))  \(pad(load(r), 4))  \(padRight(s(r, "engine"), 8))  \(pad(n(r, "iops", 0), 8))  "
              + "\(pad(n(r, "iops_ratio", 2), 6))  \(pad(n(r, "p50_us", 1), 7))  \(pad(n(r, "p99_us", 1), 8))  \(pad(n(r, "guest_cpu_pct", 1), 11))  "
              + "\(pad(n(r, "cpu_us_per_io", 1), 9))  \(pad(n(r, "cpu_ratio", 2), 9))  \(pad(n(r, "device_interrupts_per_io", 2), 7))  \(s(r, "ref_engine"))")
    }
    print("CPU per I/O by component, us (client: fio's or Outboard's client process; driver and manager: Outboard's; irq, softirq: /proc/stat; other: the rest of the guest's busy time):")
    print("   qd  rw          load  engine     client usr  client sys  driver usr  driver sys  manager     irq  softirq   other   total")
    for r in runs {
        let p = r["profile_us_per_io"]
        func c(_ k: String, _ w: Int) -> String { pad(p?[k]?.number.map { fmt($0, 1) } ?? "-", w) }
        print("\(pad(s(r, "qd"), 5))  \(padRight(s(r, "rw"), 10))  \(pad(load(r), 4))  \(padRight(s(r, "engine"), 8))  \(c("client_user", 10))  \(c("client_sys", 10))  "
              + "\(c("driver_user", 10))  \(c("driver_sys", 10))  \(c("manager", 7))  \(c("irq", 6))  \(c("softirq", 7))  \(c("other", 6))  \(pad(n(r, "cpu_us_per_io", 1), 6))")
    }
    print("summary (target: IOPS ratio >= 1.0 at the maximum, CPU ratio <= 0.7 at every fixed load):")
    print("   qd  rw          outboard IOPS  linux IOPS  ratio  CPU ratio at the loads        target met")
    for r in rows where r["row"]?.string == "summary" {
        let loads = (r["loads"]?.array ?? []).map { l in
            (l["fraction"]?.number.map { fmt($0 * 100, 0) + "%: " } ?? "") + (l["cpu_ratio"]?.number.map { fmt($0, 2) } ?? "-")
        }.joined(separator: ", ")
        print("\(pad(s(r, "qd"), 5))  \(padRight(s(r, "rw"), 10))  \(pad(n(r, "outboard_max_iops", 0), 13))  \(pad(n(r, "linux_max_iops", 0), 10))  "
              + "\(pad(n(r, "iops_ratio", 2), 5))  \(padRight(loads, 28))  \(r["target_met"]?.bool.map { $0 ? "yes" : "no" } ?? "-")")
    }
}

/// `s` followed by spaces up to `width` characters.
func padRight(_ s: String, _ width: Int) -> String {
    s.count >= width ? s : s + String(repeating: " ", count: width - s.count)
}

/// The host's 1-minute load average (/proc/loadavg), 0 if unreadable.
func loadAverage() -> Double {
    guard let text = try? readSmallFile("/proc/loadavg", limit: 256) else { return 0 }
    return String(decoding: text, as: UTF8.self).split(separator: " ").first.flatMap { Double($0) } ?? 0
}
