import OutboardSystem

#if canImport(Glibc)
import Glibc
#endif

/// Which way frames go, seen from the driver (the frontend) being measured.
public enum NetDirection: String, Sendable, CaseIterable {
    /// The driver transmits (virtio-user `txonly`), the device counts what it takes (`rxonly`).
    case transmit = "tx"
    /// The device sends (`txonly`), the driver receives (virtio-user `rxonly`).
    case receive = "rx"
}

/// DPDK's own virtio-user driver (`net_virtio_user0` in a second dpdk-testpmd) as the
/// frontend of a `Testpmd` device: the reference `bench net` measures Outboard's
/// virtio-net driver against. Its memory is 2 MiB hugepages by default, DPDK's own
/// configuration: in hugetlb memfds (`--in-memory`), one segment file each
/// (`--single-file-segments`; without it the memory table has too many regions for the
/// device), shared with the device by SET_MEM_TABLE. Dropped unstopped, it is killed.
public struct VirtioUserReference: ~Copyable {
    public let socket: String
    public let forwardMode: String
    public let filePrefix: String
    public let logPath: String
    var process: TestpmdProcess

    public var pid: pid_t { process.child.pid }

    /// Starts the reference on `socket` (a listening `Testpmd` device) in `forwardMode`
    /// (`txonly` sends `frameBytes`-byte frames, default 64; `rxonly` counts and drops) and
    /// waits (up to 10 s) until it has started forwarding.
    /// - lcores: "0@1,1@0" puts its forwarding core on CPU 0, beside a device whose
    ///   forwarding core is on CPU 1 (`Testpmd`'s default).
    /// - workDirectory: where the log goes (`virtio-user-PREFIX.log`); default: beside the socket.
    public init(socket: String, forwardMode: String, filePrefix: String, frameBytes: Int? = nil,
                lcores: String = "0@1,1@0", memory: TestpmdMemory = .hugepages(megabytes: 64), mbufs: Int = 8192,
                workDirectory: String? = nil, extra: [String] = []) throws(LabError) {
        guard !socket.contains(","), !socket.contains("="), socket.utf8.count <= 107 else {
            throw LabError("virtio-user socket path '\(socket)': no ',' or '=', at most 107 bytes")
        }
        guard ["rxonly", "txonly", "io", "macswap"].contains(forwardMode) else {
            throw LabError("virtio-user forward mode '\(forwardMode)': rxonly, txonly, io or macswap")
        }
        if let f = frameBytes, !(60...9000).contains(f) { throw LabError("virtio-user frame size \(f): 60 to 9000 bytes") }
        let dir = workDirectory ?? socket.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        let log = (dir.isEmpty ? "." : dir) + "/virtio-user-\(filePrefix).log"
        var app = ["--forward-mode=\(forwardMode)", "-a", "--total-num-mbufs=\(mbufs)"]
        if let f = frameBytes { app.append("--txpkts=\(f)") }
        var p = try TestpmdProcess(lcores: lcores, filePrefix: filePrefix, memory: memory,
                                   vdevs: ["net_virtio_user0,path=\(socket),queues=1"], app: app + extra, logPath: log)
        // "Press enter to exit" follows the start of forwarding (without --stats-period).
        let deadline = Clock.monotonicNanoseconds + 10_000_000_000
        while !p.output.contains("Press enter to exit") {
            if p.hasExited() {
                throw LabError("DPDK virtio-user exited at start (\(p.status.map { "\($0)" } ?? "")):\n\(p.tail)")
            }
            if Clock.monotonicNanoseconds > deadline {
                let tail = p.tail
                _ = p.stop()
                throw LabError("DPDK virtio-user did not start forwarding within 10 s:\n\(tail)")
            }
            usleep(5000)
        }
        process = p
        self.socket = socket
        self.forwardMode = forwardMode
        self.filePrefix = filePrefix
        self.logPath = log
    }

    /// Stops it with SIGINT and returns its whole output (with its final statistics).
    public mutating func stop() -> String { process.stop() }

    /// Its output so far.
    public var output: String { process.output }

    /// Runs the reference against `device` in `direction` for a window of `seconds` of the
    /// device's periodic reports (at least that many seconds: testpmd prints every stats
    /// period or a little later) and stops it. The device must run with a stats
    /// period, in `rxonly` to measure transmission and in `txonly` (at `frameBytes`) to
    /// measure reception; `socket` is one of its sockets (default: its first).
    ///
    /// Mpps: frames counted by the device's own port counters (the same meter for every
    /// driver measured against this device) between two of its periodic reports, over the
    /// time between its reads of those counters by its own clock; start-up and shutdown are
    /// outside the window (`Testpmd.measure`). CPU: utime + stime of each process, sampled
    /// when this process read the two reports, within milliseconds of their printing.
    public static func run(device: inout Testpmd, socket: String? = nil, direction: NetDirection, frameBytes: Int = 64,
                           seconds: Int, filePrefix: String, memory: TestpmdMemory = .hugepages(megabytes: 64),
                           workDirectory: String? = nil) throws(LabError) -> NetReferenceRun {
        let socket = socket ?? device.sockets[0]
        guard let port = device.sockets.firstIndex(of: socket) else { throw LabError("\(socket) is not one of the device's sockets") }
        switch direction {
        case .transmit:
            guard device.forwardMode == "rxonly" else {
                throw LabError("measuring transmission needs the device in rxonly, not \(device.forwardMode)")
            }
        case .receive:
            guard device.forwardMode == "txonly", (device.txFrameBytes ?? 64) == frameBytes else {
                throw LabError("measuring reception of \(frameBytes)-byte frames needs the device in txonly at that size, "
                               + "not \(device.forwardMode) at \(device.txFrameBytes ?? 64)")
            }
        }
        var reference = try VirtioUserReference(
            socket: socket, forwardMode: direction == .transmit ? "txonly" : "rxonly", filePrefix: filePrefix,
            frameBytes: direction == .transmit ? frameBytes : nil, memory: memory, workDirectory: workDirectory)
        let window: NetWindow
        do {
            window = try device.measure(port: port, counter: direction == .transmit ? .received : .sent,
                                        reports: seconds, driverPIDs: [reference.pid])
        } catch {
            let tail = reference.process.tail
            _ = reference.stop()
            throw LabError("\(error)\nDPDK virtio-user's output ends:\n\(tail)")
        }
        let out = reference.stop()
        let final = try TestpmdStatistics.final(out)
        guard let own = final.first(where: { $0.port == 0 }) else { throw LabError("DPDK virtio-user's final statistics lack port 0") }
        return NetReferenceRun(direction: direction, frameBytes: frameBytes, window: window, reference: own,
                               logPath: reference.logPath)
    }
}

/// One measured run of DPDK's virtio-user against a testpmd device.
public struct NetReferenceRun: Sendable {
    public let direction: NetDirection
    public let frameBytes: Int
    /// At the device, in the measured window; `driverCPUSeconds` is the reference's.
    public let window: NetWindow
    /// The reference's own final counters, over its whole run (start-up included).
    public let reference: TestpmdPortStats
    public let logPath: String
}
