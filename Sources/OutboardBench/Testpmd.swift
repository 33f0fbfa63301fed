import OutboardSystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Where a testpmd's own memory comes from (its EAL options).
public enum TestpmdMemory: Sendable, Equatable {
    /// `--no-huge -m MB --no-shconf`: anonymous 4 KiB pages, nothing to set up, nothing left
    /// behind. Enough for a vhost-user device: it maps its frontend's memory (the memfds of
    /// SET_MEM_TABLE), and its own mbufs never leave the process.
    case anonymous(megabytes: Int)
    /// `--in-memory --socket-mem MB`: 2 MiB hugepages in hugetlb memfds, which a vhost-user
    /// frontend can share and which go away with the process, also when it is killed. Needs
    /// that many free reserved hugepages and hugetlbfs mounted (scripts/hugepages.sh).
    case hugepages(megabytes: Int)

    var megabytes: Int {
        switch self {
        case .anonymous(let m), .hugepages(let m): return m
        }
    }

    var ealArguments: [String] {
        switch self {
        case .anonymous(let m): return ["--no-huge", "-m", "\(m)", "--no-shconf"]
        case .hugepages(let m): return ["--in-memory", "--socket-mem", "\(m)"]
        }
    }

    /// Throws, saying to run scripts/setup.sh, when hugepage memory cannot be had.
    func checkAvailable() throws(LabError) {
        guard case .hugepages(let megabytes) = self else { return }
        let need = (megabytes + 1) / 2
        let mounted = (try? OwnedFD.open("/proc/mounts", O_RDONLY).readToEnd(limit: 1 << 20))
            .map { String(decoding: $0, as: UTF8.self) }?
            .split(separator: "\n").contains { $0.split(separator: " ").dropFirst(2).first == "hugetlbfs" } ?? false
        let free = hugepagesFree()
        guard mounted, let free, free >= need else {
            throw LabError("dpdk-testpmd needs \(need) free 2 MiB hugepages for \(megabytes) MB and hugetlbfs mounted; "
                           + "/proc/meminfo shows HugePages_Free: \(free.map(String.init) ?? "unknown"), hugetlbfs "
                           + "\(mounted ? "mounted" : "not mounted"): run scripts/setup.sh (it runs scripts/hugepages.sh)")
        }
    }
}

/// HugePages_Free from /proc/meminfo (pages of the default size, 2 MiB here); nil if unreadable.
public func hugepagesFree() -> Int? {
    guard let info = try? OwnedFD.open("/proc/meminfo", O_RDONLY).readToEnd(limit: 1 << 20) else { return nil }
    for line in String(decoding: info, as: UTF8.self).split(separator: "\n") where line.hasPrefix("HugePages_Free:") {
        return line.split(separator: " ").last.flatMap { Int($0) }
    }
    return nil
}

/// One dpdk-testpmd process, not interactive: its stdout and stderr go to a log file (line
/// buffered, through stdbuf, so the log is whole at every line), its stdin is a pipe this
/// process holds open (testpmd without `-i` exits as soon as its stdin ends).
struct TestpmdProcess: ~Copyable {
    var child: ChildProcess
    var input: OwnedFD?
    let logPath: String
    let filePrefix: String
    var status: ExitStatus?

    static func executable(searchPath: String? = nil) -> String? {
        let path = searchPath ?? getenv("PATH").map { String(cString: $0) } ?? "/usr/bin:/bin"
        let dirs: [String] = path.split(separator: ":").map(String.init) + ["/usr/bin"]
        for dir in dirs where !dir.isEmpty {
            let candidate = dir + "/dpdk-testpmd"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }

    /// Starts `dpdk-testpmd EAL... -- APP...` with the EAL options every instance shares.
    init(lcores: String, filePrefix: String, memory: TestpmdMemory, vdevs: [String], app: [String],
         logPath: String) throws(LabError) {
        guard let exe = Self.executable() else {
            throw LabError("dpdk-testpmd not found (Debian package dpdk-dev; scripts/setup.sh installs it)")
        }
        guard !filePrefix.isEmpty, filePrefix.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" }) else {
            throw LabError("testpmd file prefix '\(filePrefix)': letters, digits, '-' and '_' only")
        }
        try memory.checkAvailable()
        var args = ["--lcores", lcores, "-n", "1", "--file-prefix", filePrefix, "--no-pci", "--single-file-segments"]
        args += memory.ealArguments
        for v in vdevs { args += ["--vdev", v] }
        args += ["--"] + app
        let log: OwnedFD, null: PipeEnds
        do { log = try OwnedFD.open(logPath, O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644) } catch {
            throw LabError("cannot create \(logPath): \(error)")
        }
        do { null = try OwnedFD.pipe() } catch { throw LabError("pipe: \(error)") }
        // stdbuf (coreutils) execs testpmd with line-buffered stdout: the pid is testpmd's.
        let (program, argv) = access("/usr/bin/stdbuf", X_OK) == 0
            ? ("/usr/bin/stdbuf", ["-oL", "-eL", exe] + args) : (exe, args)
        do {
            child = try ChildProcess(executable: program, arguments: argv,
                                     descriptors: [(null.read.raw, 0), (log.raw, 1), (log.raw, 2)])
        } catch {
            throw LabError("cannot start dpdk-testpmd: \(error)")
        }
        input = consume null.write
        self.logPath = logPath
        self.filePrefix = filePrefix
    }

    var output: String {
        (try? OwnedFD.open(logPath, O_RDONLY).readToEnd(limit: 256 << 20)).map { String(decoding: $0, as: UTF8.self) } ?? ""
    }

    /// The log's last lines, for error messages.
    var tail: String { output.split(separator: "\n", omittingEmptySubsequences: false).suffix(15).joined(separator: "\n") }

    /// Whether it has ended (reaping it if so).
    mutating func hasExited() -> Bool {
        if status != nil { return true }
        if let s = try? child.wait(timeoutMilliseconds: 0) { status = s; return true }
        return false
    }

    /// SIGINT (testpmd stops forwarding, prints its statistics, closes its ports and exits),
    /// then the end of its stdin, SIGKILL after 10 s. Returns the whole log. Its runtime
    /// directory (empty with --no-shconf and --in-memory) is removed.
    mutating func stop() -> String {
        if status == nil {
            try? child.signal(SIGINT)
            input = nil
            if let s = try? child.wait(timeoutMilliseconds: 10_000) {
                status = s
            } else {
                try? child.signal(SIGKILL)
                status = try? child.wait()
            }
        }
        input = nil
        rmdir("/var/run/dpdk/\(filePrefix)")
        return output
    }
}

/// dpdk-testpmd (DPDK 22.11, Debian package dpdk-dev) as one or more vhost-user-net
/// devices: `net_vhost<i>` on `sockets[i]`, in server mode (testpmd creates and listens on
/// each socket; a frontend may leave and a new one connect), one queue pair each. With one
/// port it forwards on that port (`macswap` returns every frame, MACs swapped); with two,
/// ports 0 and 1 are paired (`io` between them is a wire between two frontends). `rxonly`
/// counts and drops, `txonly` sends 64-byte frames (or `txFrameBytes`) as fast as the
/// frontend takes them. Dropped unstopped, it is killed.
public struct Testpmd: ~Copyable {
    public let sockets: [String]
    public let forwardMode: String
    public let filePrefix: String
    /// testpmd's stdout and stderr.
    public let logPath: String
    /// Seconds between its periodic port statistics, if it prints them.
    public let statsPeriod: Int?
    /// The frame size of `txonly` (testpmd's --txpkts; 64 when nil).
    public let txFrameBytes: Int?
    var process: TestpmdProcess
    var reader: LogReader

    public var pid: pid_t { process.child.pid }

    /// dpdk-testpmd's path: the first on `searchPath` (default: PATH), or Debian's place for it.
    public static func executable(searchPath: String? = nil) -> String? {
        TestpmdProcess.executable(searchPath: searchPath)
    }

    /// Starts testpmd and waits (up to 10 s) until it listens on every socket (an existing
    /// file at a socket path is replaced). Forwarding starts at once (`-a`).
    /// - lcores: EAL's --lcores: lcore 0 is the main one (it sleeps), lcore 1 forwards and
    ///   busy-polls; "0@0,1@1" puts the forwarding core on CPU 1.
    /// - memory: its own memory (anonymous by default: a device needs no hugepages).
    /// - mbufs: --total-num-mbufs.
    /// - statsPeriod: --stats-period, for `nextReport` and `measure`.
    /// - txFrameBytes: --txpkts, for `txonly`.
    /// - workDirectory: where the log goes (`testpmd-PREFIX.log`); default: beside the first socket.
    /// - extra: more testpmd options (after EAL's `--`).
    public init(sockets: [String], forwardMode: String, filePrefix: String, lcores: String = "0@0,1@1",
                memory: TestpmdMemory = .anonymous(megabytes: 64), mbufs: Int = 8192, statsPeriod: Int? = nil,
                txFrameBytes: Int? = nil, workDirectory: String? = nil, extra: [String] = []) throws(LabError) {
        guard (1...2).contains(sockets.count) else { throw LabError("testpmd: 1 or 2 vhost-user sockets, not \(sockets.count)") }
        for s in sockets where s.contains(",") || s.contains("=") || s.utf8.count > 107 {
            throw LabError("testpmd socket path '\(s)': no ',' or '=' (device arguments), at most 107 bytes")
        }
        guard ["io", "macswap", "mac", "rxonly", "txonly"].contains(forwardMode) else {
            throw LabError("testpmd forward mode '\(forwardMode)': io, mac, macswap, rxonly or txonly")
        }
        if let p = statsPeriod, p < 1 { throw LabError("testpmd stats period \(p): at least 1 s") }
        if let f = txFrameBytes, !(60...9000).contains(f) { throw LabError("testpmd frame size \(f): 60 to 9000 bytes") }
        for s in sockets { unlink(s) }
        let dir = workDirectory ?? sockets[0].split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        let log = (dir.isEmpty ? "." : dir) + "/testpmd-\(filePrefix).log"
        var app = ["--forward-mode=\(forwardMode)", "-a", "--total-num-mbufs=\(mbufs)"]
        if let p = statsPeriod { app.append("--stats-period=\(p)") }
        if let f = txFrameBytes { app.append("--txpkts=\(f)") }
        var p = try TestpmdProcess(
            lcores: lcores, filePrefix: filePrefix, memory: memory,
            vdevs: sockets.enumerated().map { "net_vhost\($0.offset),iface=\($0.element),queues=1" },
            app: app + extra, logPath: log)
        let deadline = Clock.monotonicNanoseconds + 10_000_000_000
        while !unixSocketsListening(sockets, pid: p.child.pid) {
            if p.hasExited() {
                throw LabError("dpdk-testpmd exited at start (\(p.status.map { "\($0)" } ?? "")):\n\(p.tail)")
            }
            if Clock.monotonicNanoseconds > deadline {
                let tail = p.tail
                _ = p.stop()
                throw LabError("dpdk-testpmd did not listen on \(sockets) within 10 s:\n\(tail)")
            }
            usleep(2000)
        }
        reader = try LogReader(path: log, ports: sockets.count)
        process = p
        self.sockets = sockets
        self.forwardMode = forwardMode
        self.filePrefix = filePrefix
        self.logPath = log
        self.statsPeriod = statsPeriod
        self.txFrameBytes = txFrameBytes
    }

    /// Stops testpmd with SIGINT (it prints its final forward statistics on the way out;
    /// `TestpmdStatistics.final` reads them) and returns its whole output. SIGKILL if it has
    /// not ended 10 s later.
    public mutating func stop() -> String { process.stop() }

    /// Its output so far.
    public var output: String { process.output }

    /// Whether it is still running.
    public mutating func isRunning() -> Bool { !process.hasExited() }

    /// The next periodic report (needs `statsPeriod`), when this process first reads it
    /// whole. Near the time a report is due the log is read every millisecond.
    public mutating func nextReport(timeoutSeconds: Double = 10) throws(LabError) -> TestpmdReport {
        guard let period = statsPeriod else { throw LabError("testpmd was started without a stats period") }
        let deadline = Clock.monotonicNanoseconds + UInt64(timeoutSeconds * 1e9)
        while true {
            if let r = try reader.poll() { return r }
            if process.hasExited() {
                throw LabError("dpdk-testpmd ended (\(process.status.map { "\($0)" } ?? "")):\n\(process.tail)")
            }
            let now = Clock.monotonicNanoseconds
            if now > deadline { throw LabError("no statistics from dpdk-testpmd within \(timeoutSeconds) s:\n\(process.tail)") }
            // Sleep until shortly before the next report is due, then poll closely.
            let due = reader.lastSeen.map { $0 + UInt64(period) * 1_000_000_000 } ?? 0
            if due > now + 30_000_000 {
                usleep(UInt32((due - now - 30_000_000) / 1000))
            } else {
                usleep(1000)
            }
        }
    }

    /// Measures `reports` periods of traffic at this device (needs `statsPeriod`): the
    /// number of frames `port` received (`.received`: the frontend transmits) or delivered
    /// into the frontend's receive ring (`.sent`: the frontend receives), by testpmd's own
    /// port counters, between two of its periodic reports, and the time between its reads
    /// of them by its own clock (from the pps figure of each report); the CPU time (utime +
    /// stime from /proc/PID/stat) that testpmd and `driverPIDs` used between the moments
    /// this process read those two reports. Start-up is outside the window: it opens at the
    /// first report that counted frames, so traffic was flowing for all of it. Both reports
    /// are fresh (`TestpmdReport.fresh`), so the CPU samples match the counters.
    public mutating func measure(port: Int = 0, counter: DeviceCounter, reports: Int, driverPIDs: [pid_t],
                                 timeoutSeconds: Double = 10) throws(LabError) -> NetWindow {
        guard (0..<sockets.count).contains(port) else { throw LabError("testpmd has no port \(port)") }
        guard reports >= 1 else { throw LabError("a measurement of \(reports) reports") }
        func count(_ r: TestpmdReport) throws(LabError) -> UInt64 {
            guard let s = r.ports.first(where: { $0.port == port }) else { throw LabError("testpmd's report lacks port \(port)") }
            return counter == .received ? s.rxPackets : s.txPackets
        }
        func cpu(_ pids: [pid_t]) throws(LabError) -> [UInt64] {
            var each: [UInt64] = []
            for p in pids {
                guard let c = processCPUNanoseconds(pid: p) else { throw LabError("process \(p) is gone") }
                each.append(c)
            }
            return each
        }
        var start = try nextReport(timeoutSeconds: timeoutSeconds)
        let waitUntil = Clock.monotonicNanoseconds + UInt64(timeoutSeconds * 1e9)
        while try count(start) == 0 || !start.fresh {
            guard Clock.monotonicNanoseconds < waitUntil else {
                throw LabError("no frames \(counter == .received ? "received" : "sent") on testpmd's port \(port) within \(timeoutSeconds) s")
            }
            start = try nextReport(timeoutSeconds: timeoutSeconds)
        }
        let cpu0 = try (device: cpu([pid]), driver: cpu(driverPIDs))
        var previous = start
        var seconds = 0.0
        var periods = 0
        // The window ends at a fresh report: one read late is passed over (at most `reports` times).
        while periods < reports || (!previous.fresh && periods < 2 * reports) {
            let r = try nextReport(timeoutSeconds: timeoutSeconds)
            periods += 1
            let (c0, c1) = try (count(previous), count(r))
            guard c1 >= c0 else { throw LabError("testpmd's counter on port \(port) went back from \(c0) to \(c1)") }
            // The interval by testpmd's clock: its pps figure is these frames over that time.
            let stats = r.ports.first { $0.port == port }
            let pps = (counter == .received ? stats?.rxPPS : stats?.txPPS) ?? 0
            seconds += pps > 0 ? Double(c1 - c0) / Double(pps)
                               : Double(r.seenAtNanoseconds - previous.seenAtNanoseconds) / 1e9
            previous = r
        }
        let cpu1 = try (device: cpu([pid]), driver: cpu(driverPIDs))
        guard previous.fresh else { throw LabError("this process could not read testpmd's reports as they came (the machine is too busy)") }
        let each = zip(cpu0.driver, cpu1.driver).map { Double($1 &- $0) / 1e9 }
        return try NetWindow(seconds: seconds, observedSeconds: Double(previous.seenAtNanoseconds - start.seenAtNanoseconds) / 1e9,
                             packets: count(previous) - count(start),
                             deviceCPUSeconds: Double(cpu1.device[0] - cpu0.device[0]) / 1e9,
                             driverCPUSeconds: each.reduce(0, +), driverCPUSecondsEach: each)
    }
}

/// Which of a device port's counters a measurement reads.
public enum DeviceCounter: Sendable, Equatable {
    /// RX-packets: frames the frontend transmitted and the device took.
    case received
    /// TX-packets: frames the device put into the frontend's receive ring.
    case sent
}

/// A measured window of traffic at a testpmd device.
public struct NetWindow: Sendable, Equatable {
    /// Between testpmd's reads of the counters that bound the window, by its clock.
    public let seconds: Double
    /// Between this process's reads of the two reports, by its monotonic clock: the span of
    /// the CPU samples. Close to `seconds` when this process was not kept off the CPU.
    public let observedSeconds: Double
    /// Frames counted by the device in the window.
    public let packets: UInt64
    public let deviceCPUSeconds: Double
    /// CPU of the driver's processes (summed).
    public let driverCPUSeconds: Double
    /// CPU of each of the driver's processes, in the order `measure` was given them.
    public let driverCPUSecondsEach: [Double]

    public init(seconds: Double, observedSeconds: Double, packets: UInt64, deviceCPUSeconds: Double, driverCPUSeconds: Double,
                driverCPUSecondsEach: [Double]? = nil) {
        self.driverCPUSecondsEach = driverCPUSecondsEach ?? [driverCPUSeconds]
        self.seconds = seconds
        self.observedSeconds = observedSeconds
        self.packets = packets
        self.deviceCPUSeconds = deviceCPUSeconds
        self.driverCPUSeconds = driverCPUSeconds
    }

    public var mpps: Double { seconds > 0 ? Double(packets) / seconds / 1e6 : 0 }
    /// CPU over the frames of the CPU samples' span (the rate times `observedSeconds`).
    public var driverCPUNanosecondsPerPacket: Double { perPacket(driverCPUSeconds) }
    public var deviceCPUNanosecondsPerPacket: Double { perPacket(deviceCPUSeconds) }

    func perPacket(_ cpu: Double) -> Double {
        let frames = mpps * 1e6 * observedSeconds
        return frames > 0 ? cpu * 1e9 / frames : 0
    }
}

/// One periodic report (--stats-period) of testpmd's port counters, and when this process
/// read it whole.
public struct TestpmdReport: Sendable, Equatable {
    public let ports: [TestpmdPortStats]
    public let seenAtNanoseconds: UInt64
    /// Read within a few milliseconds of its printing: the only report a read brought, and
    /// the read before it less than 5 ms earlier. A report that waited in the log (this
    /// process was away) has a `seenAtNanoseconds` later than its counters.
    public let fresh: Bool
}

/// Reads a growing testpmd log from where it last stopped and scans its periodic reports.
struct LogReader: ~Copyable {
    let fd: OwnedFD
    var scanner: TestpmdStatsScanner
    var partial: [UInt8] = []
    var ready: [TestpmdReport] = []
    var lastSeen: UInt64?
    var lastPoll: UInt64?

    init(path: String, ports: Int) throws(LabError) {
        do { fd = try OwnedFD.open(path, O_RDONLY) } catch { throw LabError("cannot read \(path): \(error)") }
        scanner = TestpmdStatsScanner(ports: ports)
    }

    /// The oldest report not yet returned, reading what the log has gained first.
    mutating func poll() throws(LabError) -> TestpmdReport? {
        if !ready.isEmpty { return ready.removeFirst() }
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n: Int
            do { n = try buffer.withUnsafeMutableBytes { b throws(Errno) in try fd.read(into: b) } } catch {
                throw LabError("reading testpmd's log: \(error)")
            }
            if n == 0 { break }
            partial.append(contentsOf: buffer[0..<n])
        }
        let now = Clock.monotonicNanoseconds
        let closely = lastPoll.map { now - $0 < 5_000_000 } ?? false
        lastPoll = now
        var brought: [[TestpmdPortStats]] = []
        while let nl = partial.firstIndex(of: UInt8(ascii: "\n")) {
            let line = String(decoding: partial[..<nl], as: UTF8.self)
            partial.removeSubrange(...nl)
            if let ports = try scanner.feed(line) { brought.append(ports) }
        }
        for ports in brought {
            ready.append(TestpmdReport(ports: ports, seenAtNanoseconds: now, fresh: closely && brought.count == 1))
            lastSeen = now
        }
        return ready.isEmpty ? nil : ready.removeFirst()
    }
}

/// One port's counters in testpmd's output: a periodic "NIC statistics" block
/// (--stats-period) or a final "Forward statistics" block (printed when it stops).
public struct TestpmdPortStats: Sendable, Equatable {
    public var port: Int
    public var rxPackets: UInt64
    /// Frames the port could not take (RX-missed; RX-dropped in the final block).
    public var rxMissed: UInt64
    /// RX-errors (RX-error in the final block, printed only when not zero).
    public var rxErrors: UInt64
    /// Receives without a free mbuf (RX-nombuf; RX-nombufs in the final block, only when not zero).
    public var rxNoMbuf: UInt64
    public var txPackets: UInt64
    /// TX-errors (periodic block only).
    public var txErrors: UInt64
    /// Frames the forwarding engine could not hand to the port, its ring full (TX-dropped,
    /// final block only).
    public var txDropped: UInt64
    /// Packets per second since the previous report, by testpmd's own clock (Rx-pps and
    /// Tx-pps, periodic block only: the difference of the counters over the time between
    /// its two reads of them).
    public var rxPPS: UInt64?
    public var txPPS: UInt64?

    public init(port: Int, rxPackets: UInt64, rxMissed: UInt64 = 0, rxErrors: UInt64 = 0, rxNoMbuf: UInt64 = 0,
                txPackets: UInt64, txErrors: UInt64 = 0, txDropped: UInt64 = 0, rxPPS: UInt64? = nil, txPPS: UInt64? = nil) {
        self.rxPPS = rxPPS
        self.txPPS = txPPS
        self.port = port
        self.rxPackets = rxPackets
        self.rxMissed = rxMissed
        self.rxErrors = rxErrors
        self.rxNoMbuf = rxNoMbuf
        self.txPackets = txPackets
        self.txErrors = txErrors
        self.txDropped = txDropped
    }
}

/// Reads testpmd's statistics out of its output, a line at a time.
public struct TestpmdStatsScanner: Sendable {
    enum Kind { case nic, forward }
    let ports: Int
    var block: (kind: Kind, port: Int, fields: [String: UInt64])?
    var report: [TestpmdPortStats] = []
    /// The last final block seen for each port.
    public private(set) var final: [Int: TestpmdPortStats] = [:]

    /// `ports`: how many ports a periodic report covers.
    public init(ports: Int) { self.ports = ports }

    /// Takes one line (without its newline); returns a periodic report when this line
    /// completes one. Throws on a block that lacks its packet counters.
    public mutating func feed(_ line: String) throws(LabError) -> [TestpmdPortStats]? {
        let text = line.trimmingSpaces
        if text.hasPrefix("Port statistics") { report = []; block = nil; return nil }
        if let (kind, port) = Self.header(text) { block = (kind, port, [:]); return nil }
        guard var b = block else { return nil }
        let border: Character = b.kind == .nic ? "#" : "-"
        if !text.isEmpty, text.allSatisfy({ $0 == border }) {
            block = nil
            let stats = try Self.stats(b.kind, b.port, b.fields)
            switch b.kind {
            case .forward:
                final[b.port] = stats
            case .nic:
                report.append(stats)
                if report.count == ports {
                    defer { report = [] }
                    return report
                }
            }
            return nil
        }
        let tokens = text.split(whereSeparator: { $0 == " " || $0 == "\t" })
        for (i, t) in tokens.enumerated() where t.hasSuffix(":") && i + 1 < tokens.count {
            if let v = UInt64(tokens[i + 1]) { b.fields[String(t.dropLast())] = v }
        }
        block = b
        return nil
    }

    /// "NIC statistics for port N" or "Forward statistics for port N", between borders.
    static func header(_ text: String) -> (Kind, Int)? {
        let kind: Kind
        if text.contains("NIC statistics for port ") { kind = .nic }
        else if text.contains("Forward statistics for port ") { kind = .forward }
        else { return nil }
        guard let r = text.firstRange(of: "statistics for port ") else { return nil }
        guard let port = Int(text[r.upperBound...].prefix(while: { $0.isNumber })) else { return nil }
        return (kind, port)
    }

    static func stats(_ kind: Kind, _ port: Int, _ f: [String: UInt64]) throws(LabError) -> TestpmdPortStats {
        guard let rx = f["RX-packets"], let tx = f["TX-packets"] else {
            throw LabError("testpmd's \(kind == .nic ? "NIC" : "forward") statistics for port \(port) lack RX-packets or TX-packets")
        }
        switch kind {
        case .nic:
            return TestpmdPortStats(port: port, rxPackets: rx, rxMissed: f["RX-missed"] ?? 0, rxErrors: f["RX-errors"] ?? 0,
                                    rxNoMbuf: f["RX-nombuf"] ?? 0, txPackets: tx, txErrors: f["TX-errors"] ?? 0,
                                    rxPPS: f["Rx-pps"], txPPS: f["Tx-pps"])
        case .forward:
            return TestpmdPortStats(port: port, rxPackets: rx, rxMissed: f["RX-dropped"] ?? 0, rxErrors: f["RX-error"] ?? 0,
                                    rxNoMbuf: f["RX-nombufs"] ?? 0, txPackets: tx, txDropped: f["TX-dropped"] ?? 0)
        }
    }
}

/// testpmd's statistics in a whole output.
public enum TestpmdStatistics {
    /// The final forward statistics (printed when testpmd stops), one per port, by port.
    /// Throws if there are none.
    public static func final(_ output: String) throws(LabError) -> [TestpmdPortStats] {
        var s = TestpmdStatsScanner(ports: 1)
        for line in output.split(separator: "\n", omittingEmptySubsequences: false) { _ = try s.feed(String(line)) }
        guard !s.final.isEmpty else { throw LabError("no final statistics in testpmd's output") }
        return s.final.values.sorted { $0.port < $1.port }
    }

    /// Every periodic report (--stats-period) of a testpmd with `ports` ports, in order.
    public static func periodic(_ output: String, ports: Int) throws(LabError) -> [[TestpmdPortStats]] {
        var s = TestpmdStatsScanner(ports: ports)
        var reports: [[TestpmdPortStats]] = []
        for line in output.split(separator: "\n", omittingEmptySubsequences: false) {
            if let r = try s.feed(String(line)) { reports.append(r) }
        }
        return reports
    }
}

extension String {
    fileprivate var trimmingSpaces: String {
        let scalars = unicodeScalars
        guard let first = scalars.firstIndex(where: { $0 != " " && $0 != "\t" && $0 != "\r" }) else { return "" }
        let last = scalars.lastIndex(where: { $0 != " " && $0 != "\t" && $0 != "\r" })!
        return String(scalars[first...last])
    }
}
