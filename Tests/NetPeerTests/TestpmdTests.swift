import OutboardTestSupport
import OutboardBench
import OutboardSystem
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

// Against DPDK 22.11's dpdk-testpmd (Debian package dpdk-dev, installed by
// scripts/setup.sh): the vhost-user-net device the network class is tested and measured
// against, and DPDK's own virtio-user driver as the reference of `bench net`. The
// reference's memory is hugepages (scripts/setup.sh reserves them); without them its
// tests fail, saying so.

/// A temporary directory for sockets and logs, removed with what is in it.
final class NetPeerDirectory {
    let path: String

    init() throws {
        var template = Array("/tmp/netpeer-XXXXXX".utf8CString)
        guard let p = mkdtemp(&template) else { throw LabError("mkdtemp: errno \(errno)") }
        path = String(cString: p)
    }

    deinit {
        if let d = opendir(path) {
            while let e = readdir(d) {
                let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
                if name != "." && name != ".." { unlink("\(path)/\(name)") }
            }
            closedir(d)
        }
        rmdir(path)
    }
}

private let instances = Atomic<Int>(0)

/// A testpmd file prefix no other instance of this test run uses.
func uniquePrefix(_ what: String) -> String {
    "\(what)-\(getpid())-\(instances.add(1, ordering: .relaxed).newValue)"
}

@Suite(.serialized) struct TestpmdTests {
    @Test func deviceListensOnItsSocketAndStops() throws {
        let turn = try BusyTurn()
        defer { turn.hold() }
        let dir = try NetPeerDirectory()
        let socket = dir.path + "/vhu.sock"
        var device = try Testpmd(sockets: [socket], forwardMode: "macswap", filePrefix: uniquePrefix("dev"))
        #expect(device.pid > 0)
        #expect(unixSocketsListening([socket], pid: device.pid))
        #expect(device.logPath.hasPrefix(dir.path + "/"))
        let out = device.stop()
        let final = try TestpmdStatistics.final(out)
        #expect(final.map(\.port) == [0])
        #expect(final[0].rxPackets == 0 && final[0].txPackets == 0)
    }

    @Test func twoPortsListenOnTwoSockets() throws {
        let turn = try BusyTurn()
        defer { turn.hold() }
        let dir = try NetPeerDirectory()
        let sockets = [dir.path + "/a.sock", dir.path + "/b.sock"]
        var device = try Testpmd(sockets: sockets, forwardMode: "io", filePrefix: uniquePrefix("wire"))
        #expect(unixSocketsListening(sockets, pid: device.pid))
        let final = try TestpmdStatistics.final(device.stop())
        #expect(final.map(\.port) == [0, 1])
    }

    @Test func referenceTransmitsAndTheDeviceCountsIt() throws {
        let turn = try BusyTurn()
        defer { turn.hold() }
        let dir = try NetPeerDirectory()
        var device = try Testpmd(sockets: [dir.path + "/vhu.sock"], forwardMode: "rxonly", filePrefix: uniquePrefix("rx"),
                                 statsPeriod: 1)
        let run = try VirtioUserReference.run(device: &device, direction: .transmit, seconds: 1, filePrefix: uniquePrefix("vu"))
        let final = try TestpmdStatistics.final(device.stop())
        #expect(run.window.packets > 0)
        #expect(run.window.seconds > 0 && run.window.mpps > 0)
        #expect(run.window.driverCPUSeconds > 0 && run.window.deviceCPUSeconds > 0)
        #expect(run.reference.txPackets >= run.window.packets)
        // The device took no more than the reference sent, and at least the window's frames.
        #expect(final[0].rxPackets <= run.reference.txPackets)
        #expect(final[0].rxPackets >= run.window.packets)
        #expect(final[0].txPackets == 0)
    }

    @Test func referenceReceivesWhatTheDeviceSends() throws {
        let turn = try BusyTurn()
        defer { turn.hold() }
        let dir = try NetPeerDirectory()
        var device = try Testpmd(sockets: [dir.path + "/vhu.sock"], forwardMode: "txonly", filePrefix: uniquePrefix("tx"),
                                 statsPeriod: 1, txFrameBytes: 1518)
        let run = try VirtioUserReference.run(device: &device, direction: .receive, frameBytes: 1518, seconds: 1,
                                              filePrefix: uniquePrefix("vu"))
        let final = try TestpmdStatistics.final(device.stop())
        #expect(run.window.packets > 0)
        #expect(run.window.driverCPUSeconds > 0 && run.window.deviceCPUSeconds > 0)
        // What the device put into the reference's ring, the reference received.
        #expect(run.reference.rxPackets >= run.window.packets)
        #expect(final[0].txPackets >= run.reference.rxPackets)
    }

    @Test func aMismatchedDeviceModeIsRefused() throws {
        let turn = try BusyTurn()
        defer { turn.hold() }
        let dir = try NetPeerDirectory()
        var device = try Testpmd(sockets: [dir.path + "/vhu.sock"], forwardMode: "macswap", filePrefix: uniquePrefix("ms"),
                                 statsPeriod: 1)
        #expect(throws: LabError.self) {
            _ = try VirtioUserReference.run(device: &device, direction: .transmit, seconds: 1, filePrefix: uniquePrefix("vu"))
        }
        _ = device.stop()
    }

    @Test func missingHugepagesAreReportedWithTheFix() throws {
        let turn = try BusyTurn()
        defer { turn.hold() }
        let dir = try NetPeerDirectory()
        let socket = dir.path + "/vhu.sock"
        var device = try Testpmd(sockets: [socket], forwardMode: "rxonly", filePrefix: uniquePrefix("hp"))
        // More than the machine has: the same refusal as on a machine without reserved hugepages.
        let pages = (hugepagesFree() ?? 0) + 1
        do {
            _ = try VirtioUserReference(socket: socket, forwardMode: "txonly", filePrefix: uniquePrefix("vu"),
                                        memory: .hugepages(megabytes: 2 * pages))
            Issue.record("a reference with more hugepages than are free started")
        } catch {
            #expect(error.description.contains("run scripts/setup.sh"))
            #expect(error.description.contains("HugePages_Free"))
        }
        _ = device.stop()
    }

    /// macswap returns every frame: the reference forwards in io mode and sends a first burst
    /// (--tx-first), so the same frames go round between the two.
    @Test func macswapReturnsFrames() throws {
        let turn = try BusyTurn()
        defer { turn.hold() }
        let dir = try NetPeerDirectory()
        let socket = dir.path + "/vhu.sock"
        var device = try Testpmd(sockets: [socket], forwardMode: "macswap", filePrefix: uniquePrefix("ms"), statsPeriod: 1)
        var reference = try VirtioUserReference(socket: socket, forwardMode: "io", filePrefix: uniquePrefix("vu"),
                                                extra: ["--tx-first"])
        _ = try device.measure(counter: .sent, reports: 1, driverPIDs: [reference.pid])
        let own = try TestpmdStatistics.final(reference.stop())[0]
        let dev = try TestpmdStatistics.final(device.stop())[0]
        #expect(dev.rxPackets > 0 && dev.txPackets > 0)
        // Every frame the device sent back, the reference received; every frame the device took, it had sent.
        // (a burst the reference had not read when it stopped may be missing from its count).
        #expect(own.rxPackets <= dev.txPackets && own.rxPackets > 0)
        #expect(dev.rxPackets <= own.txPackets)
        #expect(dev.txPackets <= dev.rxPackets)
    }

    /// Two ports in io mode are a wire: what one frontend sends on port 0 reaches the other on port 1.
    @Test func twoPortsInIOModeAreAWire() throws {
        let turn = try BusyTurn()
        defer { turn.hold() }
        let dir = try NetPeerDirectory()
        let sockets = [dir.path + "/a.sock", dir.path + "/b.sock"]
        var device = try Testpmd(sockets: sockets, forwardMode: "io", filePrefix: uniquePrefix("wire"), statsPeriod: 1)
        var receiver = try VirtioUserReference(socket: sockets[1], forwardMode: "rxonly", filePrefix: uniquePrefix("b"))
        var sender = try VirtioUserReference(socket: sockets[0], forwardMode: "txonly", filePrefix: uniquePrefix("a"))
        let window = try device.measure(port: 1, counter: .sent, reports: 1, driverPIDs: [sender.pid, receiver.pid])
        let sent = try TestpmdStatistics.final(sender.stop())[0]
        let received = try TestpmdStatistics.final(receiver.stop())[0]
        let dev = try TestpmdStatistics.final(device.stop())
        #expect(window.packets > 0)
        #expect(dev[0].rxPackets > 0 && dev[0].rxPackets <= sent.txPackets)
        #expect(dev[1].txPackets <= dev[0].rxPackets)
        #expect(received.rxPackets <= dev[1].txPackets && received.rxPackets > 0)
        #expect(dev[1].rxPackets == 0 && dev[0].txPackets == 0)
    }
}

/// The parser against testpmd 22.11's own output.
@Suite struct TestpmdStatisticsTests {
    static let periodic = """
        \u{1B}[2J\u{1B}[1;1H
        Port statistics ====================================
          ######################## NIC statistics for port 0  ########################
          RX-packets: 1075552    RX-missed: 3          RX-bytes:  68835328
          RX-errors: 2
          RX-nombuf:  1         
          TX-packets: 7          TX-errors: 4          TX-bytes:  448

          Throughput (since last show)
          Rx-pps:       536767          Rx-bps:    274825192
          Tx-pps:            0          Tx-bps:            0
          ############################################################################
        """
    static let final = """
          ---------------------- Forward statistics for port 0  ----------------------
          RX-packets: 30610848       RX-dropped: 5             RX-total: 30610853
          RX-error: 6
          RX-nombufs: 8             
          TX-packets: 9              TX-dropped: 6545728       TX-total: 6545737
          ----------------------------------------------------------------------------

          +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
          RX-packets: 30610848       RX-dropped: 5             RX-total: 30610853
          TX-packets: 9              TX-dropped: 6545728       TX-total: 6545737
          ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++
        """

    @Test func periodicReports() throws {
        let r = try TestpmdStatistics.periodic(Self.periodic + "\n" + Self.periodic, ports: 1)
        #expect(r.count == 2)
        #expect(r[0] == [TestpmdPortStats(port: 0, rxPackets: 1075552, rxMissed: 3, rxErrors: 2, rxNoMbuf: 1,
                                          txPackets: 7, txErrors: 4, rxPPS: 536767, txPPS: 0)])
    }

    @Test func finalStatistics() throws {
        #expect(try TestpmdStatistics.final(Self.final)
                == [TestpmdPortStats(port: 0, rxPackets: 30610848, rxMissed: 5, rxErrors: 6, rxNoMbuf: 8,
                                     txPackets: 9, txDropped: 6545728)])
    }

    @Test func aBlockWithoutItsCountersIsAnError() {
        let cut = Self.final.split(separator: "\n").filter { !$0.contains("TX-packets") }.joined(separator: "\n")
        #expect(throws: LabError.self) { try TestpmdStatistics.final(cut) }
        #expect(throws: LabError.self) { try TestpmdStatistics.final("no statistics here") }
    }
}
