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

/// `outboard demo net`: the network class in one run. dpdk-testpmd with two vhost-user
/// ports forwarding between them (a wire), the manager with a sandboxed virtio-net driver
/// on each, an `outboard net tap` bridge on each port with its TAP in a network namespace
/// of its own, and an iperf3 TCP stream from one namespace to the other, while the driver
/// of one port is killed and restarted.
struct DemoNet: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "net",
        abstract: "Run the net demo: a TCP stream through two TAP bridges while a net driver is killed (needs root).",
        discussion: """
            Starts dpdk-testpmd as two vhost-user-net ports in io mode, the manager with a sandboxed \
            virtio-net driver on each, two `outboard net tap` bridges, each TAP in a network namespace \
            of its own (10.79.0.1 and 10.79.0.2), and an iperf3 TCP stream between them. Half-way \
            through it kills the driver of port vnet0 with SIGKILL; the manager starts another, the \
            bridge's session moves to it, and the stream carries on. The summary says how long \
            traffic stopped (the longest run of iperf3 intervals that moved nothing) and whether \
            the stream survived. Needs iproute2 and iperf3 (scripts/setup.sh).
            """
    )

    @Option(help: "Seconds of TCP stream.") var seconds: Int = 10
    @Option(help: "Seconds per iperf3 report interval (the resolution of the stop).") var interval: Double = 0.1
    @Option(help: "Driver kills during the run (evenly spaced).") var kills: Int = 1
    @Option(help: "Buffers each way: the bridges' session depth and the drivers' virtqueue size (a power of two, 8...1024).")
    var depth: Int = 1024
    @Flag(help: "Print the summary as one JSON object (progress goes to stderr).") var json = false

    static let addresses = ["10.79.0.1", "10.79.0.2"]

    func validate() throws {
        guard seconds >= 2, seconds <= 600 else { throw ValidationError("--seconds: 2 to 600") }
        guard interval >= 0.1, interval <= 10 else { throw ValidationError("--interval: 0.1 to 10 s (iperf3's range)") }
        guard kills >= 0 else { throw ValidationError("--kills must not be negative") }
        guard (8...1024).contains(depth), depth.nonzeroBitCount == 1 else { throw ValidationError("--depth: a power of two in 8...1024") }
    }

    func run() throws {
        guard getuid() == 0 else { throw ValidationError("the demo starts the manager and makes TAP interfaces and namespaces: it needs root") }
        let ip = try findTool("ip", package: "iproute2"), iperf3 = try findTool("iperf3", package: "iperf3")
        guard Testpmd.executable() != nil else { throw CommandFailure("dpdk-testpmd not found (Debian package dpdk-dev; scripts/setup.sh installs it)") }
        installInterruptFlag()
        let lab = try Lab(name: "demo-net")
        defer { lab.remove() }
        let say = Say(json: json)
        say.line("outboard demo net: working directory \(lab.dir)")

        let sockets = [lab.dir + "/vnet0.sock", lab.dir + "/vnet1.sock"]
        var device = try Testpmd(sockets: sockets, forwardMode: "io", filePrefix: "demo-net-\(getpid())", workDirectory: lab.dir)
        defer { _ = device.stop() }
        say.line("device: dpdk-testpmd pid \(device.pid), two vhost-user-net ports forwarding to each other (io)")
        let configPath = try writeNetManagerConfig(lab, sockets: sockets, depth: depth)
        var manager = try ManagerProcess(config: configPath, socket: lab.controlSocket)
        defer { manager.stop() }
        let admin = try AdminConnection(socketPath: lab.controlSocket)
        say.line("manager pid \(manager.pid), control socket \(lab.controlSocket)")

        // The bridges, then their TAPs in namespaces of their own.
        let tag = String(getpid(), radix: 16)
        let links = ["obdemo\(tag)a", "obdemo\(tag)b"]
        var bridge0 = try BridgeProcess(lab: lab, device: "vnet0", ifname: links[0], depth: depth)
        defer { bridge0.stop() }
        var bridge1 = try BridgeProcess(lab: lab, device: "vnet1", ifname: links[1], depth: depth)
        defer { bridge1.stop() }
        let ns0 = try LabNamespace(ip: ip, name: "obdemo-\(getpid())-0")
        let ns1 = try LabNamespace(ip: ip, name: "obdemo-\(getpid())-1")
        try ns0.take(links[0], address: Self.addresses[0])
        try ns1.take(links[1], address: Self.addresses[1])
        var status = try StatusReport.decode(admin.status())
        for (k, b) in [bridge0.ready, bridge1.ready].enumerated() {
            let pid = status.devices.first { $0.name == "vnet\(k)" }?.pid.map { "\($0)" } ?? "-"
            say.line("bridge \(k): \(b.dropFirst("ready: ".count)), driver pid \(pid); in namespace \(k == 0 ? ns0.name : ns1.name) as \(Self.addresses[k])/24")
        }

        // The stream.
        var server = try ns1.start([iperf3, "-s", "-1", "-B", Self.addresses[1], "-i", fmt(interval, 2), "--json"], output: lab.dir + "/iperf3-server.log")
        defer { server.terminate(SIGTERM, graceMilliseconds: 2000) }
        try ns1.waitForListener(port: 5201)
        let resultPath = lab.dir + "/iperf3.json"
        var client = try ns0.start([iperf3, "-c", Self.addresses[1], "-t", "\(seconds)", "-i", fmt(interval, 2), "--json",
                                    "--get-server-output", "--connect-timeout", "5000"], output: resultPath)
        defer { client.terminate(SIGTERM, graceMilliseconds: 2000) }
        say.line("iperf3: TCP from \(Self.addresses[0]) to \(Self.addresses[1]) for \(seconds) s, reports every \(fmt(interval, 2)) s")

        let t0 = Clock.monotonicNanoseconds
        let killTimes = (0..<kills).map { t0 + UInt64(Double($0 + 1) * Double(seconds) * 1e9 / Double(kills + 1)) }
        var nextKill = 0
        var pendingKill: (at: UInt64, generation: UInt64)? = nil
        var restartsMs: [Double] = []
        var clientStatus: ExitStatus? = nil
        var lastTick = t0, lastBytes: UInt64 = 0
        var failure: String? = nil
        while clientStatus == nil {
            if interrupted() { failure = "interrupted"; break }
            clientStatus = try client.wait(timeoutMilliseconds: 50)
            let now = Clock.monotonicNanoseconds
            if nextKill < killTimes.count, now >= killTimes[nextKill], pendingKill == nil {
                nextKill += 1
                do {
                    let hit = try admin.injectFault(device: "vnet0", .kill)
                    pendingKill = (now, hit.generation)
                    say.clear()
                    say.line("killing the driver of vnet0 (pid \(hit.pid), SIGKILL)")
                } catch {
                    failure = "cannot kill the driver: \(error)"
                    break
                }
            }
            if let k = pendingKill {
                status = (try? StatusReport.decode(admin.status())) ?? status
                if let d = status.devices.first(where: { $0.name == "vnet0" }), d.generation > k.generation, d.state == "running" {
                    let ms = Double(now - k.at) / 1e6
                    restartsMs.append(ms)
                    pendingKill = nil
                    say.clear()
                    say.line("driver restarted: pid \(d.pid.map { "\($0)" } ?? "-"), running \(fmt(ms, 1)) ms after the kill")
                }
            }
            if now - lastTick >= 500_000_000 {
                let c = bridge0.counters()
                let bytes = c["to_port_bytes"] ?? lastBytes
                let gbps = Double(bytes &- lastBytes) * 8 / (Double(now - lastTick) / 1e9) / 1e9
                say.progress("\(pad(fmt(Double(now - t0) / 1e9, 1), 5)) s  \(pad(fmt(gbps, 2), 6)) Gb/s through bridge 0  "
                             + "frames to port \(c["to_port_frames"] ?? 0), to tap \(c["to_tap_frames"] ?? 0), "
                             + "lost in recovery \(c["dropped_in_recovery"] ?? 0)")
                lastTick = now
                lastBytes = bytes
            }
        }
        say.clear()
        if clientStatus == nil { client.terminate(SIGTERM, graceMilliseconds: 2000) }
        let serverStatus = try? server.wait(timeoutMilliseconds: 5000)
        let final0 = bridge0.stop(), final1 = bridge1.stop()
        status = (try? StatusReport.decode(admin.status())) ?? status
        let text = String(decoding: (try? readSmallFile(resultPath, limit: 64 << 20)) ?? [], as: UTF8.self)
        let firstKill = killTimes.first.map { Double($0 &- t0) / 1e9 }
        var summary = DemoNetSummary(iperf3JSON: text, interval: interval, firstKillS: nextKill > 0 ? firstKill : nil)
        summary.iperf3Exit = clientStatus.map { "\($0)" } ?? "not finished"
        summary.iperf3ServerExit = serverStatus.map { "\($0)" } ?? "not finished"
        summary.driverRestarts = status.devices.first { $0.name == "vnet0" }?.restarts ?? 0
        summary.restartMs = restartsMs
        summary.kills = nextKill
        summary.bridge0 = final0
        summary.bridge1 = final1
        summary.survived = failure == nil && clientStatus == .exited(0) && summary.iperf3Error == nil
            && summary.bytesLastSecond > 0
        summary.failure = failure
        if json {
            try printJSONObject(summary)
        } else {
            print(summary.text)
        }
        if !summary.survived { throw ExitCode(1) }
    }
}

/// The demo's summary (`--json`: one object, snake_case keys).
struct DemoNetSummary: Codable {
    var bytesSent: UInt64 = 0
    var bytesReceived: UInt64 = 0
    var seconds: Double = 0
    var gbPerS: Double = 0
    var retransmits: Int = 0
    /// The longest run of consecutive iperf3 intervals that moved no byte, in ms (how long
    /// traffic stopped), and when it began (seconds into the stream).
    var longestStopMs: Double = 0
    var longestStopStartS: Double = 0
    /// When the first driver kill was (seconds after the client started, which is within a
    /// few milliseconds of the stream's start), and the longest stop that began within a
    /// second of it (from the interval before): what the kill cost, apart from stalls of
    /// the machine elsewhere in the run.
    var firstKillAtS: Double?
    var stopAfterKillMs: Double = 0
    /// The slowest interval within a second of the first kill, in percent of the run's
    /// median interval.
    var slowestAfterKillPercent: Double?
    /// Bytes the intervals of the stream's last second moved: it was flowing at the end,
    /// after the kills.
    var bytesLastSecond: UInt64 = 0
    /// Whose intervals the stop is measured in: "receiver" (iperf3's server), or "sender"
    /// when the server's were not in the output.
    var stopSeenBy = ""
    var intervalS: Double
    var kills = 0
    var driverRestarts = 0
    /// Kill to the new driver running, per kill (the manager's view).
    var restartMs: [Double] = []
    var iperf3Exit = ""
    var iperf3ServerExit = ""
    var iperf3Error: String?
    var survived = false
    /// Each bridge's final counters.
    var bridge0: [String: UInt64] = [:]
    var bridge1: [String: UInt64] = [:]
    var failure: String?

    /// Reads iperf3's JSON: totals from "end", the stop from "intervals".
    init(iperf3JSON text: String, interval: Double, firstKillS: Double?) {
        intervalS = interval
        firstKillAtS = firstKillS
        guard let v = try? JSONDecoder().decode(JSONValue.self, from: Data(text.utf8)) else {
            iperf3Error = text.isEmpty ? "no output from iperf3" : "iperf3's output is not JSON"
            return
        }
        iperf3Error = v["error"]?.string
        let end = v["end"]
        bytesSent = UInt64(end?["sum_sent"]?["bytes"]?.number ?? 0)
        bytesReceived = UInt64(end?["sum_received"]?["bytes"]?.number ?? 0)
        seconds = end?["sum_received"]?["seconds"]?.number ?? 0
        gbPerS = (end?["sum_received"]?["bits_per_second"]?.number ?? 0) / 1e9
        retransmits = Int(end?["sum_sent"]?["retransmits"]?.number ?? 0)
        var run = 0.0, runStart = 0.0
        // The receiver's intervals (the server's, through --get-server-output): the
        // sender's go on filling its socket buffer for a while after the wire stopped.
        let received = v["server_output_json"]?["intervals"]?.array
        stopSeenBy = received == nil ? "sender" : "receiver"
        let intervals = received ?? v["intervals"]?.array ?? []
        for x in intervals {
            let sum = x["sum"]
            let bytes = sum?["bytes"]?.number ?? 0, start = sum?["start"]?.number ?? 0, length = sum?["seconds"]?.number ?? 0
            if bytes == 0 {
                if run == 0 { runStart = start }
                run += length
                if run * 1000 > longestStopMs {
                    longestStopMs = run * 1000
                    longestStopStartS = runStart
                }
                if let k = firstKillS, runStart >= k - interval, runStart < k + 1, run * 1000 > stopAfterKillMs { stopAfterKillMs = run * 1000 }
            } else {
                run = 0
            }
        }
        // The slowest interval within a second of the kill, against the run's median: a stop
        // shorter than two intervals can fall across two and leave no empty one.
        let bytes = intervals.map { $0["sum"]?["bytes"]?.number ?? 0 }
        let sorted = bytes.sorted()
        let median = sorted.isEmpty ? 0 : sorted[sorted.count / 2]
        if let k = firstKillS, median > 0 {
            let near = intervals.filter { x in
                let start = x["sum"]?["start"]?.number ?? 0
                return start >= k - interval && start < k + 1
            }
            slowestAfterKillPercent = (near.map { ($0["sum"]?["bytes"]?.number ?? 0) / median }.min() ?? 1) * 100
        }
        let last = intervals.last?["sum"]?["end"]?.number ?? 0
        bytesLastSecond = UInt64(intervals.filter { ($0["sum"]?["start"]?.number ?? 0) >= last - 1 }
            .reduce(0.0) { $0 + ($1["sum"]?["bytes"]?.number ?? 0) })
    }

    var text: String {
        var s = """

            summary
              TCP stream         \(bytesReceived) bytes received (\(bytesSent) sent) in \(fmt(seconds, 1)) s, \(fmt(gbPerS, 2)) Gb/s
              retransmits        \(retransmits)
              traffic stopped    \(firstKillAtS.map { "\(stopAfterKillMs == 0 ? "not for a whole interval" : "\(fmt(stopAfterKillMs, 0)) ms") after the kill at \(fmt($0, 1)) s (slowest interval within 1 s of it: \(fmt(slowestAfterKillPercent ?? 100, 0))% of the median); " } ?? "")\(longestStopMs == 0 ? "never for a whole interval" : "the longest stop in the run \(fmt(longestStopMs, 0)) ms (from \(fmt(longestStopStartS, 1)) s)") (\(stopSeenBy)'s intervals of \(fmt(intervalS * 1000, 0)) ms with no byte)
              driver kills       \(kills), restarts \(driverRestarts)\(restartMs.isEmpty ? "" : " (running again " + restartMs.map { "\(fmt($0, 1)) ms" }.joined(separator: ", ") + " after the kill)")
              lost in recovery   \(bridge0["dropped_in_recovery"] ?? 0) frames (bridge 0, out for transmission when its driver died)
              iperf3             client \(iperf3Exit), server \(iperf3ServerExit)\(iperf3Error.map { ", error: \($0)" } ?? "")
              stream survived    \(survived ? "yes" : "no")
            """
        if let f = failure { s += "\n  stopped            \(f)" }
        return s
    }
}

/// An `outboard net tap` child process with its output in a log file.
struct BridgeProcess: ~Copyable {
    var child: ChildProcess
    let log: String
    /// Its "ready: ..." line.
    let ready: String
    var final: [String: UInt64]? = nil

    init(lab: Lab, device: String, ifname: String, depth: Int) throws {
        log = lab.dir + "/tap-\(device).log"
        var c: ChildProcess
        do {
            let out = try OwnedFD.open(log, O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644)
            let null = try OwnedFD.open("/dev/null", O_RDONLY)
            c = try ChildProcess(executable: currentExecutable(),
                                 arguments: ["net", "tap", "--socket", lab.controlSocket, "--device", device, "--ifname", ifname,
                                             "--depth", "\(depth)", "--interval", "0.5", "--wait-ms", "20000"],
                                 descriptors: [(null.raw, 0), (out.raw, 1), (out.raw, 2)])
        } catch {
            throw CommandFailure("cannot start the bridge for \(device): \(error)")
        }
        let deadline = Clock.monotonicNanoseconds + 30_000_000_000
        var line: String? = nil
        while line == nil {
            line = Self.lines(log).first { $0.hasPrefix("ready: ") }
            if line != nil { break }
            if let s = try c.wait(timeoutMilliseconds: 20) {
                throw CommandFailure("the bridge for \(device) \(s) at start: \(Self.lines(log).suffix(5).joined(separator: "\n"))")
            }
            if Clock.monotonicNanoseconds > deadline {
                throw CommandFailure("the bridge for \(device) was not ready within 30 s: \(Self.lines(log).suffix(5).joined(separator: "\n"))")
            }
        }
        child = c
        ready = line!
    }

    static func lines(_ path: String) -> [String] {
        String(decoding: (try? readSmallFile(path, limit: 64 << 20)) ?? [], as: UTF8.self).split(separator: "\n").map(String.init)
    }

    /// Its last counter line.
    func counters() -> [String: UInt64] {
        guard let line = Self.lines(log).last(where: { $0.contains("to_port_frames=") }) else { return [:] }
        var out: [String: UInt64] = [:]
        for pair in line.split(separator: " ") {
            let kv = pair.split(separator: "=")
            if kv.count == 2, let v = UInt64(kv[1]) { out[String(kv[0])] = v }
        }
        return out
    }

    /// Stops it (SIGTERM: it prints its counters once more) and returns its final counters.
    @discardableResult
    mutating func stop() -> [String: UInt64] {
        if let f = final { return f }
        child.terminate(SIGTERM, graceMilliseconds: 5000)
        let f = counters()
        final = f
        return f
    }
}

/// A network namespace of a run's own (`ip netns add`, its loopback up), deleted when it
/// goes away: the net demo's two ends, `bench net`'s kernel path.
struct LabNamespace: ~Copyable {
    let ip: String
    let name: String

    init(ip: String, name: String) throws {
        self.ip = ip
        self.name = name
        if access("/run/netns/\(name)", F_OK) == 0 { _ = try? runCapturingStdout(executable: ip, arguments: ["netns", "del", name]) }
        try Self.run(ip, ["netns", "add", name])
        try Self.run(ip, ["-n", name, "link", "set", "lo", "up"])
    }

    deinit { _ = try? runCapturingStdout(executable: ip, arguments: ["netns", "del", name]) }

    static func run(_ program: String, _ arguments: [String]) throws {
        let (status, _) = try runCapturingStdout(executable: program, arguments: arguments)
        guard status == .exited(0) else { throw CommandFailure("\(program) \(arguments.joined(separator: " ")): \(status)") }
    }

    /// Moves `link` into this namespace, gives it `address`/24 and brings it up.
    func take(_ link: String, address: String) throws {
        try Self.run(ip, ["link", "set", "dev", link, "netns", name])
        try Self.run(ip, ["-n", name, "address", "add", "\(address)/24", "dev", link])
        try Self.run(ip, ["-n", name, "link", "set", "dev", link, "up"])
    }

    /// Starts `command` in this namespace with its stdout and stderr in `output`.
    func start(_ command: [String], output: String) throws -> ChildProcess {
        do {
            let out = try OwnedFD.open(output, O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644)
            let null = try OwnedFD.open("/dev/null", O_RDONLY)
            return try ChildProcess(executable: ip, arguments: ["netns", "exec", name] + command,
                                    descriptors: [(null.raw, 0), (out.raw, 1), (out.raw, 2)])
        } catch {
            throw CommandFailure("cannot start \(command[0]) in \(name): \(error)")
        }
    }

    /// Waits (up to 10 s) until something listens on TCP `port` in this namespace.
    func waitForListener(port: Int) throws {
        let deadline = Clock.monotonicNanoseconds + 10_000_000_000
        while Clock.monotonicNanoseconds < deadline {
            let (_, out) = try runCapturingStdout(executable: ip, arguments: ["netns", "exec", name, "ss", "-ltnH"])
            if out.contains(":\(port) ") { return }
            usleep(20_000)
        }
        throw CommandFailure("nothing listened on port \(port) in \(name) within 10 s")
    }
}

/// A program on PATH, or an error naming the package that has it.
func findTool(_ name: String, package: String) throws -> String {
    let path = getenv("PATH").map { String(cString: $0) } ?? "/usr/bin:/bin"
    let dirs = path.split(separator: ":").map(String.init) + ["/usr/bin", "/usr/sbin", "/sbin"]
    for dir in dirs where access(dir + "/" + name, X_OK) == 0 { return dir + "/" + name }
    throw CommandFailure("\(name) not found (Debian package \(package); scripts/setup.sh installs it)")
}

/// A manager config with the two ports of a testpmd as net devices vnet0 and vnet1, root
/// allowed to open them. A killed driver is seen at once (its exit); the heartbeat
/// deadline only catches hangs, and is long enough for a driver starting on a busy
/// machine.
func writeNetManagerConfig(_ lab: Lab, sockets: [String], depth: Int) throws -> String {
    let path = lab.dir + "/outboard.json"
    let devices = sockets.enumerated().map { k, socket in
        """
            {
              "name": "vnet\(k)", "transport": "vhost-user", "class": "net", "socket": "\(socket)",
              "mac": "02:00:00:00:00:0\(k + 1)", "queue_size": \(depth), "notify": "event-idx",
              "access": [ { "uid": 0, "mode": "rw" } ], "limits": { "max_queue_depth": \(depth) }
            }
        """
    }
    let text = """
        {
          "control_socket": "\(lab.controlSocket)",
          "driver_user": "nobody",
          "heartbeat_interval_ms": 20,
          "heartbeat_deadline_ms": 1000,
          "devices": [
        \(devices.joined(separator: ",\n"))
          ]
        }
        """
    do { try OwnedFD.open(path, O_WRONLY | O_CREAT | O_TRUNC).writeAll(Array(text.utf8)) } catch {
        throw CommandFailure("cannot write \(path): \(error)")
    }
    return path
}

/// Prints `value` as one JSON object on one line: snake_case keys, sorted.
func printJSONObject<T: Encodable>(_ value: T) throws {
    let e = JSONEncoder()
    e.keyEncodingStrategy = .convertToSnakeCase
    e.outputFormatting = [.sortedKeys]
    print(String(decoding: try e.encode(value), as: UTF8.self))
}
