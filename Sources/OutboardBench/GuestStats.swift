import FoundationEssentials
import OutboardSystem

#if canImport(Glibc)
import Glibc
#endif

// What `outboard bench guest` reads inside the guest: the whole machine's CPU time
// (/proc/stat), a process's (/proc/PID/stat), a disk's completion counters
// (/sys/block/NAME/stat) and fio's JSON report. The parsers take the files' text and are
// pure (tested on their own); the readers beside them open the files.

/// The aggregate "cpu" line of /proc/stat: time of all CPUs, in USER_HZ ticks
/// (sysconf(_SC_CLK_TCK), 100 on Linux), by state.
public struct CPUTimes: Sendable, Equatable {
    public var user: UInt64 = 0
    public var nice: UInt64 = 0
    public var system: UInt64 = 0
    public var idle: UInt64 = 0
    public var iowait: UInt64 = 0
    public var irq: UInt64 = 0
    public var softirq: UInt64 = 0
    public var steal: UInt64 = 0
    public init() {}

    /// Every state (guest and guest_nice are already inside user and nice).
    public var total: UInt64 { user &+ nice &+ system &+ idle &+ iowait &+ irq &+ softirq &+ steal }
    /// Time a CPU was doing something: total minus idle minus iowait (iowait is idle time
    /// with I/O outstanding).
    public var busy: UInt64 { total &- idle &- iowait }

    /// `later` minus `self`, state by state (the kernel's counters only grow; a counter
    /// that went backwards gives 0).
    public func delta(to later: CPUTimes) -> CPUTimes {
        func d(_ a: UInt64, _ b: UInt64) -> UInt64 { b >= a ? b - a : 0 }
        var r = CPUTimes()
        r.user = d(user, later.user); r.nice = d(nice, later.nice); r.system = d(system, later.system)
        r.idle = d(idle, later.idle); r.iowait = d(iowait, later.iowait); r.irq = d(irq, later.irq)
        r.softirq = d(softirq, later.softirq); r.steal = d(steal, later.steal)
        return r
    }

    /// Parses the first line of /proc/stat ("cpu  user nice system idle iowait irq softirq
    /// steal guest guest_nice"; kernels before 2.6.11 stop earlier, missing fields are 0).
    public static func parse(procStat text: [UInt8]) throws(LabError) -> CPUTimes {
        let line = text.split(separator: UInt8(ascii: "\n"), maxSplits: 1, omittingEmptySubsequences: false).first ?? []
        let fields = line.split(separator: UInt8(ascii: " "))
        guard fields.first.map({ String(decoding: $0, as: UTF8.self) }) == "cpu" else {
            throw LabError("/proc/stat does not start with the aggregate cpu line: \(String(decoding: line.prefix(80), as: UTF8.self))")
        }
        var values: [UInt64] = []
        for f in fields.dropFirst() {
            guard let v = UInt64(String(decoding: f, as: UTF8.self)) else {
                throw LabError("/proc/stat: '\(String(decoding: f, as: UTF8.self))' is not a tick count")
            }
            values.append(v)
        }
        guard values.count >= 4 else { throw LabError("/proc/stat: the cpu line has \(values.count) fields, at least 4 expected") }
        func at(_ i: Int) -> UInt64 { i < values.count ? values[i] : 0 }
        var t = CPUTimes()
        t.user = at(0); t.nice = at(1); t.system = at(2); t.idle = at(3); t.iowait = at(4)
        t.irq = at(5); t.softirq = at(6); t.steal = at(7)
        return t
    }

    /// Reads /proc/stat now.
    public static func read() throws(LabError) -> CPUTimes {
        try parse(procStat: try readSmallFile("/proc/stat", limit: 1 << 20))
    }
}

/// A process's CPU time from /proc/PID/stat (fields 14 and 15, utime and stime, summed
/// over the process's threads), in USER_HZ ticks.
public struct ProcessTimes: Sendable, Equatable {
    public var user: UInt64
    public var system: UInt64
    public init(user: UInt64, system: UInt64) { self.user = user; self.system = system }

    public func delta(to later: ProcessTimes) -> ProcessTimes {
        ProcessTimes(user: later.user >= user ? later.user - user : 0, system: later.system >= system ? later.system - system : 0)
    }

    /// Parses /proc/PID/stat. The command name (field 2) is in parentheses and may hold
    /// spaces and parentheses itself: the fields after it start after the last ")".
    public static func parse(procPidStat text: [UInt8]) throws(LabError) -> ProcessTimes {
        guard let close = text.lastIndex(of: UInt8(ascii: ")")) else {
            throw LabError("/proc/PID/stat has no command name: \(String(decoding: text.prefix(80), as: UTF8.self))")
        }
        let fields = text[(close + 1)...].split(whereSeparator: { $0 == UInt8(ascii: " ") || $0 == UInt8(ascii: "\n") })
        // fields[0] is the state (field 3): utime (14) and stime (15) are at 11 and 12.
        guard fields.count > 12, let u = UInt64(String(decoding: fields[11], as: UTF8.self)),
              let s = UInt64(String(decoding: fields[12], as: UTF8.self)) else {
            throw LabError("/proc/PID/stat: no utime and stime after the command name")
        }
        return ProcessTimes(user: u, system: s)
    }

    /// Reads /proc/PID/stat now; nil when the process is gone.
    public static func read(pid: pid_t) -> ProcessTimes? {
        guard let text = try? readSmallFile("/proc/\(pid)/stat", limit: 4096) else { return nil }
        return try? parse(procPidStat: text)
    }
}

/// A block device's completion counters, from /sys/block/NAME/stat (the kernel's
/// Documentation/block/stat.rst: field 1 reads completed, field 5 writes completed).
public struct DiskCounters: Sendable, Equatable {
    public var readsCompleted: UInt64
    public var writesCompleted: UInt64
    public init(readsCompleted: UInt64, writesCompleted: UInt64) {
        self.readsCompleted = readsCompleted; self.writesCompleted = writesCompleted
    }

    public static func parse(sysBlockStat text: [UInt8]) throws(LabError) -> DiskCounters {
        let fields = text.split(whereSeparator: { $0 == UInt8(ascii: " ") || $0 == UInt8(ascii: "\n") || $0 == UInt8(ascii: "\t") })
        guard fields.count >= 5, let r = UInt64(String(decoding: fields[0], as: UTF8.self)),
              let w = UInt64(String(decoding: fields[4], as: UTF8.self)) else {
            throw LabError("/sys/block/*/stat: not a disk's counters: \(String(decoding: text.prefix(120), as: UTF8.self))")
        }
        return DiskCounters(readsCompleted: r, writesCompleted: w)
    }

    public static func read(disk: String) throws(LabError) -> DiskCounters {
        try parse(sysBlockStat: try readSmallFile("/sys/block/\(disk)/stat", limit: 4096))
    }
}

/// Interrupts taken so far from one PCI function, summed over its MSI and MSI-X vectors
/// and every CPU, whoever handles them (virtio_blk, vfio-pci): the rows of
/// /proc/interrupts whose IRQ numbers /sys/bus/pci/devices/ADDRESS/msi_irqs lists (with
/// interrupt remapping the rows do not name the function).
public enum InterruptCounts {
    public static func parse(procInterrupts text: [UInt8], irqs: Set<Int>) -> UInt64 {
        var total: UInt64 = 0
        let lines = String(decoding: text, as: UTF8.self).split(separator: "\n")
        guard let header = lines.first else { return 0 }
        let cpus = header.split(separator: " ").filter { $0.hasPrefix("CPU") }.count
        for line in lines.dropFirst() {
            let fields = line.split(separator: " ")
            // "NN:", then one count per CPU, then the chip and the handlers.
            guard fields.count > cpus, fields[0].hasSuffix(":"), let irq = Int(fields[0].dropLast()), irqs.contains(irq) else { continue }
            for f in fields[1...cpus] { total &+= UInt64(f) ?? 0 }
        }
        return total
    }

    /// The per-CPU counts of one named row of /proc/interrupts ("CAL": function-call
    /// IPIs, "RES": rescheduling IPIs, "TLB": TLB shootdowns), summed; 0 if absent.
    public static func parse(procInterrupts text: [UInt8], row: String) -> UInt64 {
        let lines = String(decoding: text, as: UTF8.self).split(separator: "\n")
        guard let header = lines.first else { return 0 }
        let cpus = header.split(separator: " ").filter { $0.hasPrefix("CPU") }.count
        for line in lines.dropFirst() {
            let fields = line.split(separator: " ")
            guard fields.count > cpus, fields[0] == row + ":" else { continue }
            return fields[1...cpus].reduce(0) { $0 &+ (UInt64($1) ?? 0) }
        }
        return 0
    }

    /// The IRQ numbers of a PCI function's MSI and MSI-X vectors (none when it has none
    /// enabled, or no such function).
    public static func irqs(pci: String) -> Set<Int> {
        guard let d = opendir("/sys/bus/pci/devices/\(pci)/msi_irqs") else { return [] }
        defer { closedir(d) }
        var out = Set<Int>()
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            if let n = Int(name) { out.insert(n) }
        }
        return out
    }

    /// Now: the PCI function's interrupts, and the function-call IPIs, rescheduling IPIs
    /// and TLB shootdowns of all CPUs.
    public static func read(pci: String) -> (device: UInt64, call: UInt64, resched: UInt64, tlb: UInt64) {
        guard let text = try? readSmallFile("/proc/interrupts", limit: 4 << 20) else { return (0, 0, 0, 0) }
        let numbers = irqs(pci: pci)
        return (numbers.isEmpty ? 0 : parse(procInterrupts: text, irqs: numbers), parse(procInterrupts: text, row: "CAL"),
                parse(procInterrupts: text, row: "RES"), parse(procInterrupts: text, row: "TLB"))
    }
}

/// One job of a fio JSON report (--output-format=json), the side (read or write) it ran.
public struct FioJobReport: Sendable, Equatable {
    public var ios: UInt64
    public var iops: Double
    /// fio's runtime of the side, seconds (after --ramp_time).
    public var seconds: Double
    /// Completion latency (clat: submission to completion), microseconds.
    public var clatP50Us: Double
    public var clatP99Us: Double
    /// fio's own CPU use over the job, percent of one CPU.
    public var usrCpuPct: Double
    public var sysCpuPct: Double

    public init(ios: UInt64, iops: Double, seconds: Double, clatP50Us: Double, clatP99Us: Double, usrCpuPct: Double, sysCpuPct: Double) {
        self.ios = ios; self.iops = iops; self.seconds = seconds; self.clatP50Us = clatP50Us; self.clatP99Us = clatP99Us
        self.usrCpuPct = usrCpuPct; self.sysCpuPct = sysCpuPct
    }

    /// Parses fio's report: the first job, its `write` side if `write`, else its `read`
    /// side. fio may print warnings before the JSON object; they are skipped. A job that
    /// reports an error, or a side with no I/O, is an error.
    public static func parse(_ output: [UInt8], write: Bool) throws(LabError) -> FioJobReport {
        guard let start = output.firstIndex(of: UInt8(ascii: "{")) else {
            throw LabError("fio printed no JSON report: \(String(decoding: output.prefix(300), as: UTF8.self))")
        }
        struct Report: Decodable { var jobs: [Job] }
        struct Job: Decodable {
            var error: Int?
            var read: Side
            var write: Side
            var usr_cpu: Double
            var sys_cpu: Double
        }
        struct Side: Decodable {
            var iops: Double
            var runtime: Double // ms
            var total_ios: UInt64
            var clat_ns: Clat?
        }
        struct Clat: Decodable { var percentile: [String: Double]? }
        let report: Report
        do {
            report = try JSONDecoder().decode(Report.self, from: Data(output[start...]))
        } catch {
            throw LabError("cannot parse fio's report: \(error)")
        }
        guard let job = report.jobs.first else { throw LabError("fio's report has no job") }
        if let e = job.error, e != 0 { throw LabError("fio's job failed with error \(e)") }
        let side = write ? job.write : job.read
        guard side.total_ios > 0, side.runtime > 0 else { throw LabError("fio completed no \(write ? "writes" : "reads")") }
        guard side.iops.isFinite, side.iops >= 0, job.usr_cpu.isFinite, job.sys_cpu.isFinite else {
            throw LabError("fio's report holds impossible figures")
        }
        func percentile(_ key: String) -> Double { (side.clat_ns?.percentile?[key] ?? 0) / 1000 }
        return FioJobReport(ios: side.total_ios, iops: side.iops, seconds: side.runtime / 1000,
                            clatP50Us: percentile("50.000000"), clatP99Us: percentile("99.000000"),
                            usrCpuPct: job.usr_cpu, sysCpuPct: job.sys_cpu)
    }
}

/// USER_HZ: the unit of /proc/stat and /proc/PID/stat.
public var userHz: UInt64 { UInt64(max(sysconf(Int32(_SC_CLK_TCK)), 1)) }

/// The contents of a small file (procfs and sysfs files report size 0: read to the end).
public func readSmallFile(_ path: String, limit: Int) throws(LabError) -> [UInt8] {
    do {
        return try OwnedFD.open(path, O_RDONLY).readToEnd(limit: limit)
    } catch {
        throw LabError("cannot read \(path): \(error)")
    }
}
