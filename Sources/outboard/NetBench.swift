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

/// `outboard bench net`: frames through Outboard's sandboxed virtio-net driver against
/// DPDK's own virtio-user driver, on the same dpdk-testpmd vhost-user port, in the same
/// run, alternating; the kernel's own path (a veth pair between two network namespaces,
/// AF_PACKET at both ends) for context.
struct NetBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "net",
        abstract: "Benchmark the virtio-net driver against DPDK's virtio-user on a testpmd vhost-user port (needs root).",
        discussion: """
            For each frame size and direction, one dpdk-testpmd is the device (one vhost-user \
            port; rxonly counts what the driver transmits, txonly at the frame size generates \
            what it receives) and the meter: frames are testpmd's own port counters between two \
            of its reports (once a second), over its own clock. Outboard's side is the manager \
            (started for each run and stopped after it, so that the port is free for the \
            other side), its sandboxed virtio-net driver and a client process (`_net-load`, one \
            net session of depth 256); DPDK's side is a second testpmd whose port is \
            net_virtio_user0 in txonly (it transmits) or rxonly (it receives). The two sides \
            never run at the same time; --repeats runs of each, in adjacent pairs of \
            alternating order, and `mpps_ratio` is the median of the pairs' Outboard / DPDK \
            ratios (the other figures are that pair's). CPU per packet is the driver's plus the \
            client's CPU (/proc/PID/stat) for Outboard, the virtio-user process's for DPDK, \
            over the frames of the window. Placement: testpmd's forwarding lcore on CPU 1 (its \
            main lcore, which sleeps, on CPU 0); everything of the driver side on CPU 0: \
            virtio-user's forwarding lcore, and Outboard's manager, driver and client \
            (this process pins itself there before starting them). \
            Rows "busy": both drivers busy-poll (Outboard's driver in notify mode poll, the \
            client spinning); target: mpps_ratio >= 1.0. Rows "rate" (transmit only): the \
            Outboard client sends at --rate-fraction of the lower of the two sides' busy Mpps (medians) of that row, a \
            rate both sustain (paced, \
            sleeping between bursts; the driver in adaptive mode, --poll-us), DPDK's testpmd has \
            no way to pace txonly (no rate option), so its side runs unpaced and its CPU per \
            packet is the one at its maximum (reference_paced false); target: cpu_ratio <= \
            1.2. testpmd's txonly cannot be paced either, so reception has no rate rows. \
            Kernel: a veth pair between two network namespaces, a sender (AF_PACKET, \
            sendmmsg) in one, a receiver (AF_PACKET, recvmmsg) in the other; its Mpps is what \
            the receiver got, its CPU per packet the sender's (tx rows) or the receiver's (rx \
            rows).
            """
    )

    @Option(help: "Frame sizes in bytes (60...1518), comma separated.") var sizes: ListOption<Int> = [64, 1518]
    @Option(help: "Directions, comma separated: tx (the driver transmits), rx (it receives).") var directions: ListOption<String> = ["tx", "rx"]
    @Option(help: "Measured seconds per run (testpmd's reports, one a second).") var seconds: Int = 3
    @Option(help: "Runs of each side per row (odd), in adjacent pairs of alternating order.") var repeats: Int = 3
    @Option(help: "Rate rows: the Outboard client's offered load as fractions of the lower busy Mpps of the two sides in the same row, comma separated.")
    var rateFraction: ListOption<Double> = [0.5]
    @Flag(help: "Only the busy rows.") var noRate = false
    @Option(help: "Rate rows: the driver's busy-polling after its last work, microseconds (adaptive mode).") var pollUs: Int = 50
    @Flag(help: "Skip the kernel (veth) reference.") var noKernel = false
    @Flag(help: "One JSON object per line.") var json = false

    static let deviceCPU = 1
    static let frontendCPU = 0
    static let mac = MACAddress("02:00:00:00:00:01")!

    func run() throws {
        guard getuid() == 0 else { throw ValidationError("bench net starts the manager and testpmd, which need root") }
        guard sizes.values.allSatisfy({ (60...1518).contains($0) }) else { throw ValidationError("--sizes: 60...1518") }
        guard directions.values.allSatisfy({ $0 == "tx" || $0 == "rx" }) else { throw ValidationError("--directions: tx, rx") }
        guard seconds >= 1, seconds <= 600 else { throw ValidationError("--seconds: 1...600") }
        guard repeats >= 1, repeats <= 99, repeats % 2 == 1 else { throw ValidationError("--repeats: an odd number, 1...99") }
        guard rateFraction.values.allSatisfy({ $0 > 0 && $0 <= 1 }) else { throw ValidationError("--rate-fraction: more than 0, at most 1") }
        guard pollUs >= 0, pollUs <= 100_000 else { throw ValidationError("--poll-us: 0...100000") }
        guard CPU.allowed.contains(Self.deviceCPU), CPU.allowed.contains(Self.frontendCPU) else {
            throw CommandFailure("bench net places testpmd on CPU 1 and the drivers on CPU 0; this process may use \(CPU.allowed)")
        }
        installInterruptFlag()
        let lab = try Lab(name: "benchnet")
        defer { lab.remove() }
        do { try CPU.pin(to: Self.frontendCPU) } catch { throw CommandFailure("cannot pin to CPU \(Self.frontendCPU): \(error)") }
        if !json {
            print("bench net: testpmd vhost-user on CPU \(Self.deviceCPU), drivers on CPU \(Self.frontendCPU), \(seconds) s per run, \(repeats) run(s) per side")
            print("  load  dir  bytes   outboard Mpps   DPDK Mpps   ratio (min-max)   ns/pkt ob (drv+cl) / DPDK   cpu ratio  target  kernel Mpps ns/pkt")
        }
        var kernel: [Int: KernelNetRun] = [:]
        var counter = 0
        for size in sizes.values where !interrupted() {
            if !noKernel {
                do { kernel[size] = try runKernel(size: size, lab: lab) } catch {
                    FileHandleStderr.write("bench net: the kernel reference for \(size)-byte frames failed: \(error)\n")
                }
            }
            for dir in directions.values where !interrupted() {
                let direction: NetDirection = dir == "tx" ? .transmit : .receive
                counter += 1
                var device = try Testpmd(sockets: [lab.dir + "/vnet\(counter).sock"], forwardMode: direction == .transmit ? "rxonly" : "txonly",
                                         filePrefix: "benchnet-\(getpid())-\(counter)", lcores: "0@\(Self.frontendCPU),1@\(Self.deviceCPU)",
                                         statsPeriod: 1, txFrameBytes: direction == .receive ? size : nil, workDirectory: lab.dir)
                defer { _ = device.stop() }
                guard let busy = try pairs(
                    outboard: { try measureOutboard(&device, lab: lab, direction: direction, size: size, rate: 0) },
                    reference: { try measureReference(&device, lab: lab, direction: direction, size: size) })
                else { break }
                var line = NetBenchLine(load: "busy", direction: direction, size: size, runs: busy, byCPU: false)
                line.attachKernel(kernel[size], direction: direction)
                emit(line)
                guard direction == .transmit, !noRate else { continue }
                // A rate both sides sustain: a fraction of the lower of the two busy medians.
                let dpdkMax = busy.dpdk.map(\.window.mpps).sorted()[busy.dpdk.count / 2]
                let outboardMax = busy.outboard.map(\.window.mpps).sorted()[busy.outboard.count / 2]
                let base = min(dpdkMax, outboardMax)
                for fraction in rateFraction.values where !interrupted() {
                    let rate = fraction * base * 1e6
                    guard rate >= 1000 else { throw CommandFailure("the busy rates (\(fmt(base, 3)) Mpps) are too low for a rate row") }
                    guard let paced = try pairs(
                        outboard: { try measureOutboard(&device, lab: lab, direction: direction, size: size, rate: rate) },
                        reference: { try measureReference(&device, lab: lab, direction: direction, size: size) })
                    else { break }
                    var line = NetBenchLine(load: "rate", direction: direction, size: size, runs: paced, byCPU: true)
                    line.offeredMpps = rate / 1e6
                    line.rateFraction = fraction
                    line.rateBaseMpps = base
                    line.attachKernel(kernel[size], direction: direction)
                    emit(line)
                }
            }
        }
    }

    func emit(_ line: NetBenchLine) {
        if json {
            print(line.json())
        } else {
            let ob = line.outboard, d = line.dpdk
            let load = line.load == "rate" ? "rate \(fmt(line.offeredMpps ?? 0, 2))" : "busy"
            print("\(pad(load, 6))  \(pad(line.direction.rawValue, 3))  \(pad("\(line.frameBytes)", 5))  \(pad(fmt(ob.window.mpps, 3), 14))  \(pad(fmt(d.window.mpps, 3), 10))  \(pad(fmt(line.mppsRatio, 2) + " (" + fmt(line.ratioMin, 2) + "-" + fmt(line.ratioMax, 2) + ")", 16))  \(pad(fmt(ob.nsPerPacket, 1) + " (" + fmt(ob.driverNsPerPacket, 1) + "+" + fmt(ob.clientNsPerPacket, 1) + ") / " + fmt(d.nsPerPacket, 1), 26))  \(pad(fmt(line.cpuRatio, 2), 9))  \(pad(line.targetMet ? "met" : "not", 6))  \(pad(line.kernelMpps.map { fmt($0, 3) } ?? "-", 11)) \(line.kernelNsPerPacket.map { fmt($0, 1) } ?? "-")")
        }
        fflush(nil)
    }

    struct Runs {
        var outboard: [SideRun] = []
        var dpdk: [SideRun] = []
    }

    /// One side's measured window and what the side counted itself.
    struct SideRun {
        var window: NetWindow
        /// Frames the side itself counted (sent or received) over its whole run.
        var ownFrames: UInt64
        /// CPU of the driver process and of the client process (Outboard); the reference's (DPDK, `driver`).
        var driverCPUSeconds: Double
        var clientCPUSeconds: Double
        var late: UInt64 = 0
        var frames: Double { window.mpps * 1e6 * window.observedSeconds }
        func perPacket(_ s: Double) -> Double { frames > 0 ? s * 1e9 / frames : 0 }
        var nsPerPacket: Double { perPacket(driverCPUSeconds + clientCPUSeconds) }
        var driverNsPerPacket: Double { perPacket(driverCPUSeconds) }
        var clientNsPerPacket: Double { perPacket(clientCPUSeconds) }
    }

    /// `repeats` runs of each side, in adjacent pairs of alternating order; nil if interrupted first.
    func pairs(outboard: () throws -> SideRun, reference: () throws -> SideRun) throws -> Runs? {
        var r = Runs()
        for k in 0..<repeats where !interrupted() {
            if k % 2 == 0 {
                r.outboard.append(try again(outboard))
                r.dpdk.append(try again(reference))
            } else {
                r.dpdk.append(try again(reference))
                r.outboard.append(try again(outboard))
            }
        }
        return r.outboard.isEmpty || r.outboard.count != r.dpdk.count ? nil : r
    }

    /// `run`, once more (up to 3 tries) when this process could not read testpmd's reports
    /// as they came: it shares its CPU with a busy-polling driver, and on a loaded host the
    /// window's CPU samples would not match the counters.
    func again(_ run: () throws -> SideRun) throws -> SideRun {
        for attempt in 1... {
            do { return try run() } catch where attempt < 3 && "\(error)".contains("could not read testpmd's reports as they came") {
                FileHandleStderr.write("bench net: a run missed testpmd's reports (the host is busy); running it again\n")
            }
        }
        fatalError("unreachable")
    }

    /// One run of Outboard's side: a manager (its virtio-net driver on the device's port;
    /// notify mode poll unpaced, adaptive paced), a `_net-load` client; measured over
    /// `seconds` of the device's reports; then all of it stopped.
    func measureOutboard(_ device: inout Testpmd, lab: Lab, direction: NetDirection, size: Int, rate: Double) throws -> SideRun {
        let config = try writeNetManagerConfig(lab: lab, socket: device.sockets[0], notify: rate > 0 ? "adaptive" : "poll")
        var manager = try ManagerProcess(config: config, socket: lab.controlSocket)
        defer { manager.stop() }
        let admin = try AdminConnection(socketPath: lab.controlSocket)
        let logPath = lab.dir + "/net-load.out"
        let log: OwnedFD
        do { log = try OwnedFD.open(logPath, O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644) } catch { throw CommandFailure("cannot create \(logPath): \(error)") }
        var args = ["_net-load", "--socket", lab.controlSocket, "--device", "vnet0", "--direction", direction.rawValue,
                    "--size", "\(size)", "--seconds", "\(seconds * 4 + 60)"]
        if rate > 0 { args += ["--rate", "\(rate)"] }
        var client = try ChildProcess(executable: currentExecutable(), arguments: args,
                                      descriptors: [(log.raw, 1), (log.raw, 2)])
        // The driver's pid, once a session is open (the client's open waits for the device).
        var driverPid: pid_t = 0
        let deadline = Clock.monotonicNanoseconds + 20_000_000_000
        while driverPid == 0 {
            let st = try StatusReport.decode(admin.status())
            if let p = st.devices.first?.pid, st.sessions.contains(where: { $0.device == "vnet0" }) { driverPid = p; break }
            if let status = try client.wait(timeoutMilliseconds: 20) {
                throw CommandFailure("the net client exited at start (\(status)): \(readText(logPath))")
            }
            guard Clock.monotonicNanoseconds < deadline else { throw CommandFailure("no net session within 20 s: \(readText(logPath))") }
        }
        let window: NetWindow
        do {
            window = try device.measure(counter: direction == .transmit ? .received : .sent, reports: seconds,
                                        driverPIDs: [driverPid, client.pid])
        } catch {
            throw CommandFailure("\(error)\nthe net client's output: \(readText(logPath))")
        }
        try? client.signal(SIGTERM)
        _ = try? client.wait(timeoutMilliseconds: 10_000)
        let out = readText(logPath)
        let fields = out.split(whereSeparator: { $0 == " " || $0 == "\n" })
        func field(_ name: String) -> UInt64? {
            guard let k = fields.firstIndex(where: { $0 == name }), k + 1 < fields.count else { return nil }
            return UInt64(fields[k + 1])
        }
        guard let sent = field("sent"), let received = field("received") else {
            throw CommandFailure("the net client printed no counts: \(out)")
        }
        return SideRun(window: window, ownFrames: direction == .transmit ? sent : received,
                       driverCPUSeconds: window.driverCPUSecondsEach[0], clientCPUSeconds: window.driverCPUSecondsEach[1],
                       late: field("late") ?? 0)
    }

    /// One run of DPDK's side: virtio-user in a second testpmd on the same port.
    func measureReference(_ device: inout Testpmd, lab: Lab, direction: NetDirection, size: Int) throws -> SideRun {
        let run = try VirtioUserReference.run(device: &device, direction: direction, frameBytes: size, seconds: seconds,
                                              filePrefix: "benchnet-vu-\(getpid())", workDirectory: lab.dir)
        return SideRun(window: run.window, ownFrames: direction == .transmit ? run.reference.txPackets : run.reference.rxPackets,
                       driverCPUSeconds: run.window.driverCPUSeconds, clientCPUSeconds: 0)
    }

    func writeNetManagerConfig(lab: Lab, socket: String, notify: String) throws -> String {
        let path = lab.dir + "/outboard-net.json"
        let text = """
            {
              "control_socket": "\(lab.controlSocket)",
              "driver_user": "nobody",
              "heartbeat_interval_ms": 20,
              "heartbeat_deadline_ms": 1000,
              "lease_ms": 2000,
              "devices": [
                {"name": "vnet0", "transport": "vhost-user", "class": "net", "socket": "\(socket)", "mac": "\(Self.mac)",
                 "notify": "\(notify)", "poll_us": \(pollUs), "queue_size": 256, "access": [{"uid": 0, "mode": "rw"}]}
              ]
            }
            """
        do { try OwnedFD.open(path, O_WRONLY | O_CREAT | O_TRUNC).writeAll(Array(text.utf8)) } catch {
            throw CommandFailure("cannot write \(path): \(error)")
        }
        return path
    }

    /// The kernel's path for `size`-byte frames (`KernelNetPath`).
    func runKernel(size: Int, lab: Lab) throws -> KernelNetRun {
        try KernelNetPath.run(frameBytes: size, seconds: Double(seconds), executable: currentExecutable(), workDirectory: lab.dir,
                              senderCPU: Self.frontendCPU, receiverCPU: Self.deviceCPU)
    }
}

func readText(_ path: String) -> String {
    (try? OwnedFD.open(path, O_RDONLY).readToEnd(limit: 1 << 20)).map { String(decoding: $0, as: UTF8.self) } ?? ""
}

/// One row of `bench net`.
struct NetBenchLine {
    var load: String
    var direction: NetDirection
    var frameBytes: Int
    var repeats: Int
    /// The median pair (by Mpps ratio in busy rows, by CPU ratio in rate rows).
    var outboard: NetBench.SideRun
    var dpdk: NetBench.SideRun
    var mppsRatio: Double
    var ratioMin: Double
    var ratioMax: Double
    var cpuRatio: Double
    var cpuRatioMin: Double
    var cpuRatioMax: Double
    var offeredMpps: Double?
    var rateFraction: Double?
    /// What the fraction is of: the lower of the two sides' busy medians.
    var rateBaseMpps: Double?
    var kernelMpps: Double?
    var kernelNsPerPacket: Double?

    init(load: String, direction: NetDirection, size: Int, runs: NetBench.Runs, byCPU: Bool) {
        self.load = load
        self.direction = direction
        frameBytes = size
        repeats = runs.outboard.count
        let ratios = zip(runs.outboard, runs.dpdk).map { $1.window.mpps > 0 ? $0.window.mpps / $1.window.mpps : 0 }
        let cpuRatios = zip(runs.outboard, runs.dpdk).map { $1.nsPerPacket > 0 ? $0.nsPerPacket / $1.nsPerPacket : 0 }
        let key = byCPU ? cpuRatios : ratios
        let middle = key.indices.sorted { key[$0] < key[$1] }[key.count / 2]
        outboard = runs.outboard[middle]
        dpdk = runs.dpdk[middle]
        mppsRatio = ratios[middle]
        ratioMin = ratios.min() ?? 0
        ratioMax = ratios.max() ?? 0
        cpuRatio = cpuRatios[middle]
        cpuRatioMin = cpuRatios.min() ?? 0
        cpuRatioMax = cpuRatios.max() ?? 0
    }

    mutating func attachKernel(_ k: KernelNetRun?, direction: NetDirection) {
        guard let k else { return }
        kernelMpps = k.mpps
        kernelNsPerPacket = direction == .transmit ? k.senderNsPerPacket : k.receiverNsPerPacket
    }

    var target: String { load == "rate" ? "cpu_ratio <= 1.2" : "mpps_ratio >= 1.0" }
    var targetMet: Bool { load == "rate" ? cpuRatio > 0 && cpuRatio <= 1.2 : mppsRatio >= 1.0 }

    func json() -> String {
        var parts = ["\"bench\":\"net\"", "\"load\":\"\(load)\"", "\"direction\":\"\(direction.rawValue)\"", "\"frame_bytes\":\(frameBytes)",
                     "\"device_cpu\":\(NetBench.deviceCPU)", "\"frontend_cpu\":\(NetBench.frontendCPU)", "\"repeats\":\(repeats)"]
        if let r = offeredMpps { parts.append("\"offered_mpps\":\(fmt(r, 4))") }
        if let f = rateFraction { parts.append("\"rate_fraction\":\(fmt(f, 3))") }
        if let b = rateBaseMpps { parts.append("\"rate_base_mpps\":\(fmt(b, 4))") }
        if load == "rate" { parts.append("\"reference_paced\":false") }
        parts += ["\"outboard_mpps\":\(fmt(outboard.window.mpps, 4))", "\"dpdk_mpps\":\(fmt(dpdk.window.mpps, 4))",
                  "\"mpps_ratio\":\(fmt(mppsRatio, 3))", "\"mpps_ratio_min\":\(fmt(ratioMin, 3))", "\"mpps_ratio_max\":\(fmt(ratioMax, 3))",
                  "\"outboard_cpu_ns_per_packet\":\(fmt(outboard.nsPerPacket, 1))",
                  "\"driver_cpu_ns_per_packet\":\(fmt(outboard.driverNsPerPacket, 1))",
                  "\"client_cpu_ns_per_packet\":\(fmt(outboard.clientNsPerPacket, 1))",
                  "\"dpdk_cpu_ns_per_packet\":\(fmt(dpdk.nsPerPacket, 1))",
                  "\"cpu_ratio\":\(fmt(cpuRatio, 3))", "\"cpu_ratio_min\":\(fmt(cpuRatioMin, 3))", "\"cpu_ratio_max\":\(fmt(cpuRatioMax, 3))",
                  "\"outboard_device_packets\":\(outboard.window.packets)", "\"dpdk_device_packets\":\(dpdk.window.packets)",
                  "\"outboard_own_frames\":\(outboard.ownFrames)", "\"dpdk_own_frames\":\(dpdk.ownFrames)",
                  "\"outboard_seconds\":\(fmt(outboard.window.seconds, 3))", "\"dpdk_seconds\":\(fmt(dpdk.window.seconds, 3))",
                  "\"device_cpu_ns_per_packet\":\(fmt(outboard.window.deviceCPUNanosecondsPerPacket, 1))",
                  "\"dpdk_device_cpu_ns_per_packet\":\(fmt(dpdk.window.deviceCPUNanosecondsPerPacket, 1))"]
        if load == "rate", let offered = offeredMpps, dpdk.window.observedSeconds > 0 {
            // What DPDK's side, which cannot be paced, burns per frame at the offered rate:
            // its CPU share over the offered frames.
            let share = dpdk.driverCPUSeconds / dpdk.window.observedSeconds
            parts.append("\"dpdk_cpu_ns_per_packet_at_offered\":\(fmt(share * 1e3 / offered, 1))")
            parts.append("\"outboard_late\":\(outboard.late)")
        }
        if let k = kernelMpps { parts.append("\"kernel_mpps\":\(fmt(k, 4))") }
        if let k = kernelNsPerPacket { parts.append("\"kernel_cpu_ns_per_packet\":\(fmt(k, 1))") }
        parts += ["\"target\":\"\(target)\"", "\"target_met\":\(targetMet)"]
        return "{" + parts.joined(separator: ",") + "}"
    }
}
