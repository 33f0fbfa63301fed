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
        let dir = try NetPeerDirectory()
        let sockets = [dir.path + "/a.sock", dir.path + "/b.sock"]
        var device = try Testpmd(sockets: sockets, forwardMode: "io", filePrefix: uniquePrefix("wire"))
        #expect(unixSocketsListening(sockets, pid: device.pid))
        let final = try TestpmdStatistics.final(device.stop())
        #expect(final.map(\.port) == [0, 1])
    }
}
