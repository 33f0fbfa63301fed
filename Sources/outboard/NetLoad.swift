import ArgumentParser
import Outboard
import OutboardSession
import CLinux
import OutboardSystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// `outboard _net-load`: the Outboard client of `bench net`, a process of its own so that
/// the bench can read testpmd's reports while it runs. One net session; it sends frames
/// of `--size` bytes (`tx`) or takes every frame the device delivers (`rx`) until SIGTERM
/// or SIGINT (or `--seconds`, a bound), then prints one line: `sent N received M late L`.
///
/// Transmit: each frame gets a 42-byte Ethernet + IPv4 + UDP header written into its
/// buffer (what testpmd's txonly writes into each of its mbufs), the rest of the frame is
/// left as it is. Unpaced (`--rate 0`) it spins: a burst of up to `--burst` whenever
/// transmit buffers are free. Paced, frame k is due at start + k / rate; it sends what is
/// due (at most `--burst` at a time) and sleeps until `--burst` more are due (a deadline
/// schedule: a late wake-up sends more at once, and the rate holds); a wait shorter than
/// 20 us (`shortestSleep`) it spends yielding the CPU instead (sleeping between bursts
/// 12 us apart, the client fell behind on the benchmark's VM; 20 us apart, it held). A frame due while no transmit buffer is free counts as late.
///
/// Receive: it spins on `receive`, every buffer going straight back to the driver.
///
/// Spinning, it yields the CPU (sched_yield) whenever a call made no progress: the driver
/// busy-polls on the same CPU, and the work it waits for is the driver's.
struct NetLoadCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "_net-load", shouldDisplay: false)

    @Option var socket: String
    @Option var device: String
    @Option var direction: String
    @Option var size: Int = 64
    @Option(help: "Frames per second to send, 0: as fast as the driver takes them.") var rate: Double = 0
    @Option var burst: Int = 32
    @Option var depth: Int = 256
    @Option(help: "The longest it runs.") var seconds: Double = 120

    /// Paced, gaps shorter than this (ns) are spent yielding the CPU, not sleeping.
    static let shortestSleep: Int64 = 20_000

    func run() throws {
        guard direction == "tx" || direction == "rx" else { throw ValidationError("--direction: tx or rx") }
        guard (60...1518).contains(size) else { throw ValidationError("--size: 60...1518") }
        guard burst >= 1, burst <= depth, rate >= 0 else { throw ValidationError("--burst: 1...depth; --rate: at least 0") }
        installInterruptFlag()
        // Sleeps end within a microsecond of their deadline (the default slack is 50 us).
        _ = ob_timer_slack(1000)
        var s = try NetSession.open(socketPath: socket, device: device, queueDepth: depth, waitMilliseconds: 20_000)
        // The options as plain values: an @Option's getter looks up generic metadata at
        // every read, too slow for the loops below.
        let rate = rate, burst = burst, depth = depth
        let end = Clock.monotonicNanoseconds + UInt64(seconds * 1e9)
        var sent: UInt64 = 0, received: UInt64 = 0, late: UInt64 = 0
        if direction == "rx" {
            var spins = 0
            while !interrupted() {
                let n = try s.receive(max: burst) { _ in }
                received &+= UInt64(n)
                // Yield rather than spin on: the driver polls on this CPU too.
                if n == 0 { sched_yield() }
                spins &+= 1
                if spins & 1023 == 0 && Clock.monotonicNanoseconds > end { break }
            }
        } else {
            let header = Self.header(frameBytes: size, source: s.info.mac)
            let length = size
            let fill: (TransmitBuffer) -> Int = { b in
                header.withUnsafeBytes { b.pointer.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
                return length
            }
            let start = Clock.monotonicNanoseconds
            var spins = 0
            while !interrupted() {
                if rate == 0 {
                    let n = try s.transmit(max: burst, fill)
                    sent &+= UInt64(n)
                    if n == 0 { sched_yield() }
                    spins &+= 1
                    if spins & 1023 == 0 && Clock.monotonicNanoseconds > end { break }
                    continue
                }
                let now = Clock.monotonicNanoseconds
                if now > end { break }
                let due = UInt64(Double(now - start) * rate / 1e9) + 1
                var owed = Int(min(due &- min(due, sent &+ late), UInt64(depth)))
                while owed > 0 {
                    let n = try s.transmit(max: min(owed, burst), fill)
                    sent &+= UInt64(n)
                    owed -= n
                    if n == 0 { break }
                }
                if owed > 0 {
                    // No buffer free for what is due: late, not sent later.
                    try s.reclaimTransmitBuffers()
                    if s.freeTransmitBuffers == 0 { late &+= UInt64(owed) }
                }
                let next = start &+ UInt64(Double(sent &+ late &+ UInt64(burst)) * 1e9 / rate)
                let wait = Int64(bitPattern: next &- Clock.monotonicNanoseconds)
                if wait >= Self.shortestSleep {
                    sleepUntil(next)
                } else if wait > 0 {
                    // Too short to sleep: a sleep and its wake-up cost about as much on a
                    // vCPU, and the next burst would go late. The driver may need the CPU.
                    sched_yield()
                }
            }
        }
        print("sent \(sent) received \(received) late \(late)")
        fflush(nil)
    }

    /// An Ethernet + IPv4 + UDP header for a frame of `frameBytes` (as testpmd's txonly
    /// makes: to a locally administered unicast address, 198.18.0.1 to 198.18.0.2, port 9
    /// to 9), with the IPv4 checksum.
    static func header(frameBytes: Int, source: MACAddress) -> [UInt8] {
        var h = [UInt8](repeating: 0, count: 42)
        h.withUnsafeMutableBytes { p in
            MACAddress("02:00:00:00:00:fe")!.store(to: p.baseAddress!)
            source.store(to: p.baseAddress! + 6)
        }
        h[12] = 0x08; h[13] = 0x00
        let ipLength = frameBytes - 14
        let ip: [UInt8] = [0x45, 0, UInt8(ipLength >> 8), UInt8(ipLength & 0xff), 0, 0, 0, 0, 64, 17, 0, 0,
                           198, 18, 0, 1, 198, 18, 0, 2]
        var sum: UInt32 = 0
        for k in stride(from: 0, to: 20, by: 2) { sum += UInt32(ip[k]) << 8 | UInt32(ip[k + 1]) }
        while sum > 0xffff { sum = (sum & 0xffff) + (sum >> 16) }
        let check = ~UInt16(sum)
        for k in 0..<20 { h[14 + k] = ip[k] }
        h[24] = UInt8(check >> 8); h[25] = UInt8(check & 0xff)
        let udpLength = ipLength - 20
        h[34] = 0; h[35] = 9; h[36] = 0; h[37] = 9
        h[38] = UInt8(udpLength >> 8); h[39] = UInt8(udpLength & 0xff)
        return h
    }
}

/// `outboard _net-kernel`: one end of the kernel reference of `bench net`, run inside a
/// network namespace: an AF_PACKET socket on `--ifname`, sending `--size`-byte frames
/// (sendmmsg, 32 a call, as fast as the kernel takes them) or receiving (recvmmsg, 32 a
/// call, blocking). It counts frames and its own CPU only inside the window
/// [`--window-start`, `--window-end`) of CLOCK_MONOTONIC (one clock for every namespace),
/// then exits, printing `frames N cpu_ns C window_ns W`.
struct NetKernelCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "_net-kernel", shouldDisplay: false)

    @Option var ifname: String
    @Option var direction: String
    @Option var size: Int = 64
    @Option var windowStart: UInt64
    @Option var windowEnd: UInt64

    func run() throws {
        guard direction == "tx" || direction == "rx" else { throw ValidationError("--direction: tx or rx") }
        guard windowEnd > windowStart else { throw ValidationError("--window-end after --window-start") }
        let control = ob_if_control_socket()
        guard control >= 0 else { throw CommandFailure("socket: \(Errno(rawValue: errno))") }
        var index: CInt = 0
        guard ob_if_get_index(control, ifname, &index) == 0 else { throw CommandFailure("interface \(ifname): \(Errno(rawValue: errno))") }
        close(control)
        let fd = ob_packet_socket(index, direction == "rx" ? 10 : 0)
        guard fd >= 0 else { throw CommandFailure("AF_PACKET socket on \(ifname): \(Errno(rawValue: errno))") }
        defer { close(fd) }
        let stride = 2048
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 32 * stride, alignment: 64)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: 32 * stride)
        let header = NetLoadCommand.header(frameBytes: size, source: MACAddress("02:00:00:00:00:02")!)
        header.withUnsafeBytes { buffer.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        // The options as plain values (an @Option's getter is slow, see NetLoadCommand).
        let sending = direction == "tx", size = size, windowStart = windowStart, windowEnd = windowEnd
        var frames: UInt64 = 0, inWindow = false, cpu0: UInt64 = 0, counted: UInt64 = 0
        while true {
            let now = Clock.monotonicNanoseconds
            if now >= windowEnd { break }
            if !inWindow && now >= windowStart {
                inWindow = true
                cpu0 = Clock.processCPUNanoseconds
                counted = frames
            }
            let n = sending ? ob_packet_send(fd, buffer, size, 32) : ob_packet_receive(fd, buffer, stride, 32)
            if n > 0 { frames &+= UInt64(n) }
            else if errno != EAGAIN && errno != EINTR && errno != ENOBUFS { throw CommandFailure("\(direction) on \(ifname): \(Errno(rawValue: errno))") }
        }
        let cpu = inWindow ? Clock.processCPUNanoseconds - cpu0 : 0
        print("frames \(inWindow ? frames - counted : 0) cpu_ns \(cpu) window_ns \(windowEnd - windowStart)")
        fflush(nil)
    }
}

/// The kernel's own path for `bench net`: two network namespaces joined by a veth pair,
/// a `_net-kernel` sender in one and a receiver in the other, over the same window.
struct KernelNetRun {
    var mpps: Double
    var sent: UInt64
    var received: UInt64
    var senderNsPerPacket: Double
    var receiverNsPerPacket: Double
}

enum KernelNetPath {
    /// Sender pinned to `senderCPU`, receiver to `receiverCPU`; `seconds` measured after 0.5 s.
    static func run(frameBytes: Int, seconds: Double, executable: String, workDirectory: String,
                    senderCPU: Int, receiverCPU: Int) throws -> KernelNetRun {
        let ip = try findTool("ip", package: "iproute2")
        let a = try LabNamespace(ip: ip, name: "obnb-\(getpid())-a")
        let b = try LabNamespace(ip: ip, name: "obnb-\(getpid())-b")
        defer { _ = (a.name, b.name) }  // both live until the run is over
        try LabNamespace.run(ip, ["link", "add", "nbva", "netns", a.name, "type", "veth", "peer", "name", "nbvb", "netns", b.name])
        // Room for the longest frame (1518 bytes: 1500 and a VLAN tag's worth) on both ends.
        try LabNamespace.run(ip, ["-n", a.name, "link", "set", "nbva", "mtu", "1600", "up"])
        try LabNamespace.run(ip, ["-n", b.name, "link", "set", "nbvb", "mtu", "1600", "up"])
        let start = Clock.monotonicNanoseconds + 500_000_000
        let end = start + UInt64(seconds * 1e9)
        func output(_ dir: String) -> String { workDirectory + "/kernel-\(dir).out" }
        func spawn(_ ns: borrowing LabNamespace, _ ifname: String, _ dir: String, cpu: Int) throws -> ChildProcess {
            try CPU.pin(to: cpu)
            return try ns.start([executable, "_net-kernel", "--ifname", ifname, "--direction", dir, "--size", "\(frameBytes)",
                                 "--window-start", "\(start)", "--window-end", "\(end)"], output: output(dir))
        }
        defer { try? CPU.pin(to: NetBench.frontendCPU) }
        var receiver = try spawn(b, "nbvb", "rx", cpu: receiverCPU)
        var sender = try spawn(a, "nbva", "tx", cpu: senderCPU)
        let rxOut = output("rx"), txOut = output("tx")
        let timeout = Int(seconds * 1000) + 10_000
        let ss = try sender.wait(timeoutMilliseconds: timeout)
        let rs = try receiver.wait(timeoutMilliseconds: timeout)
        func parse(_ path: String, _ status: ExitStatus?) throws -> (frames: UInt64, cpu: UInt64, window: UInt64) {
            let text = readText(path)
            let f = text.split(whereSeparator: { $0 == " " || $0 == "\n" })
            guard status == .exited(0), f.count >= 6, let n = UInt64(f[1]), let c = UInt64(f[3]), let w = UInt64(f[5]) else {
                throw CommandFailure("the kernel reference's \(path) (\(status.map { "\($0)" } ?? "still running")): \(text)")
            }
            return (n, c, w)
        }
        let tx = try parse(txOut, ss), rx = try parse(rxOut, rs)
        let s = Double(rx.window) / 1e9
        return KernelNetRun(mpps: s > 0 ? Double(rx.frames) / s / 1e6 : 0, sent: tx.frames, received: rx.frames,
                            senderNsPerPacket: tx.frames > 0 ? Double(tx.cpu) / Double(tx.frames) : 0,
                            receiverNsPerPacket: rx.frames > 0 ? Double(rx.cpu) / Double(rx.frames) : 0)
    }
}
