import Foundation
import OutboardBench
import OutboardSystem
import OutboardTestSupport
import Testing

/// `outboard bench blk` as a user runs it, briefly: the rows are there and hold figures
/// from real runs of both sides (no timing assertions: the machine may be contended), and
/// the start-up wait the C reference's connect relies on.
@Suite struct BlkBenchTests {
    func run(_ arguments: [String], seconds: Double = 180) throws -> (status: Int32, lines: [String]) {
        try runOutboard(arguments, seconds: seconds)
    }

    func number(_ o: [String: Any], _ key: String) -> Double? { (o[key] as? NSNumber)?.doubleValue }

    /// One closed-loop row and one row per offered load: an absolute --rate and a
    /// --rate-fraction of the C reference's closed-loop IOPS in the same run. Both sides did
    /// I/O near the offered rate, not at their maximum (the bounds are wide: a stalled
    /// process catches up on the schedule, and a backlog at the interval's start counts in
    /// it), and every CPU field is there. Both offered loads are far below either side's
    /// maximum at this depth (the fraction is small because C's maximum can be many times
    /// Outboard's at a low depth).
    @Test func fixedRateRowsHoldBothSides() throws {
        let turn = try BusyTurn()
        defer { turn.hold() }
        let (status, lines) = try run(["bench", "blk", "--json", "--qd", "4", "--rate", "2000", "--rate-fraction", "0.02",
                                       "--seconds", "0.25", "--warmup", "0.05", "--repeats", "1", "--no-kernel",
                                       "--image-mib", "16", "--mode", "event-idx"])
        #expect(status == 0)
        let rows = try lines.map { line in
            try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], "not a JSON object: \(line)")
        }
        #expect(rows.map { $0["load"] as? String ?? "?" } == ["closed", "rate", "rate"], "\(lines)")
        guard rows.count == 3 else { return }
        let closed = rows[0]
        #expect((number(closed, "c_iops") ?? 0) > 0, "\(closed)")
        #expect((number(closed, "outboard_iops") ?? 0) > 0, "\(closed)")
        for (row, line) in zip(rows.dropFirst(), lines.dropFirst()) {
            #expect(row["bench"] as? String == "blk" && number(row, "qd") == 4 && row["mode"] as? String == "event-idx", "\(line)")
            let offered = try #require(number(row, "offered_iops"), "\(line)")
            for side in ["outboard", "c"] {
                let iops = number(row, "\(side)_iops") ?? 0
                #expect(iops > offered * 0.4 && iops < offered * 1.6, "\(side)_iops \(iops) at \(offered) offered: \(line)")
                let issued = number(row, "\(side)_issued") ?? -1
                #expect(issued > 0, "\(side)_issued: \(line)")
                let late = number(row, "\(side)_late") ?? -1
                #expect(late >= 0, "\(side)_late: \(line)")
            }
            for key in ["client_cpu_us_per_io", "c_cpu_us_per_io", "outboard_cpu_us_per_io", "cpu_ratio",
                        "client_cpu_pct", "c_cpu_pct", "outboard_cpu_pct", "p50_us", "c_p50_us", "p99_us", "c_p99_us"] {
                #expect((number(row, key) ?? 0) > 0, "\(key): \(line)")
            }
            // The driver's and the daemon's CPU come from /proc in clock ticks: present, maybe 0.
            for key in ["driver_cpu_us_per_io", "driver_cpu_pct", "daemon_cpu_us_per_io", "c_daemon_cpu_us_per_io",
                        "daemon_cpu_pct", "c_daemon_cpu_pct", "cpu_ratio_min", "cpu_ratio_max"] {
                #expect((number(row, key) ?? -1) >= 0, "\(key): \(line)")
            }
            #expect((number(row, "p99_us") ?? 0) >= (number(row, "p50_us") ?? 0), "\(line)")
            let cpu = (number(row, "outboard_cpu_us_per_io") ?? 0) / max(number(row, "c_cpu_us_per_io") ?? 1, 1e-9)
            #expect(abs(cpu - (number(row, "cpu_ratio") ?? 0)) < 0.02 * cpu + 0.01, "cpu_ratio is not the CPU per I/O ratio: \(line)")
        }
        #expect(number(rows[1], "offered_iops") == 2000 && rows[1]["rate_fraction"] == nil, "\(lines[1])")
        // The fraction is of this run's C maximum at the same depth (one run: the closed row's).
        #expect(number(rows[2], "rate_fraction") == 0.02, "\(lines[2])")
        #expect(number(rows[2], "c_max_iops") == number(closed, "c_iops"), "\(lines[2])")
        let expected = 0.02 * (number(closed, "c_iops") ?? 0)
        #expect(abs((number(rows[2], "offered_iops") ?? 0) - expected) <= 1, "\(lines[2])")
    }

    /// Lists take one spelling, comma separated, in every bench; an entry that does not
    /// parse is refused before anything runs.
    @Test func listOptionsAreCommaSeparatedAndStrict() throws {
        #expect(try run(["bench", "blk", "--qd", "1,x"], seconds: 30).status != 0)
        #expect(try run(["bench", "blk", "--rate", "1000,", "--qd", "1"], seconds: 30).status != 0)
        #expect(try run(["bench", "ring", "--batches", "1,x"], seconds: 30).status != 0)
        #expect(try run(["bench", "ring", "--modes", "busy,nap"], seconds: 30).status != 0)
    }

    /// The daemon's socket file exists from bind(2) on, but a connect is refused until
    /// listen(2): the start-up wait must see the listening socket itself, in the process
    /// that holds it.
    @Test func listeningCheckWaitsForListenNotForTheFile() throws {
        let path = NSTemporaryDirectory() + "outboard-listen-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        defer { unlink(path) }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        try #require(fd >= 0)
        defer { close(fd) }
        var sa = sockaddr_un()
        sa.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        try #require(bytes.count < MemoryLayout.size(ofValue: sa.sun_path))
        withUnsafeMutableBytes(of: &sa.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let bound = withUnsafePointer(to: &sa) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        try #require(bound == 0)
        #expect(!unixSocketsListening([path], pid: getpid()), "bound, not listening yet")
        try #require(listen(fd, 4) == 0)
        #expect(unixSocketsListening([path], pid: getpid()))
        // Another process does not hold this socket: a listener on a reused path is not its.
        #expect(!unixSocketsListening([path], pid: 1))
        #expect(!unixSocketsListening([path, path + ".missing"], pid: getpid()))
    }

    /// The daemon is looked up on PATH first (a daemon installed elsewhere than /usr/bin),
    /// through a search path given here, so that no other test's PATH changes.
    @Test func daemonIsFoundOnTheSearchPath() throws {
        let dir = NSTemporaryDirectory() + "outboard-path-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let exe = dir + "/qemu-storage-daemon"
        try #require(FileManager.default.createFile(atPath: exe, contents: Data("#!/bin/sh\n".utf8),
                                                    attributes: [.posixPermissions: 0o755]))
        #expect(StorageDaemon.executable(searchPath: "/nonexistent:" + dir) == exe)
        #expect(StorageDaemon.executable(searchPath: "/nonexistent") == (access("/usr/bin/qemu-storage-daemon", X_OK) == 0 ? "/usr/bin/qemu-storage-daemon" : nil))
    }
}
