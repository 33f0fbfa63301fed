import Foundation
import Glibc
import OutboardSystem
import OutboardTestSupport
import Synchronization
import SystemPackage
import Testing

/// A device the virtio-blk driver cannot drive fails at once, with its reason, and is not
/// reconnected to again and again: the driver classifies the failure (Recovery.failDevice)
/// and the manager acts on the classification, not on text. The device is a minimal
/// vhost-user backend that offers neither VERSION_1 nor PROTOCOL_FEATURES.
@Suite(.serialized) struct DeviceClassificationTests {
    /// Serves vhost-user connections: GET_FEATURES answers 0, everything else is read and
    /// dropped. Counts the connections it accepted.
    final class FeaturelessBackend: @unchecked Sendable {
        let path: String
        let listener: CInt
        let accepted = Atomic<Int>(0)
        let stopping = Atomic<Bool>(false)

        init(path: String) throws {
            self.path = path
            listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard listener >= 0 else { throw Errno(rawValue: errno) }
            var addr = sockaddr_un()
            addr.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &addr.sun_path) { p in
                for (i, b) in path.utf8.enumerated() where i < p.count - 1 { p[i] = b }
            }
            let ok = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            guard ok == 0, listen(listener, 8) == 0 else { throw Errno(rawValue: errno) }
            Thread { [self] in serve() }.start()
        }

        func stop() {
            stopping.store(true, ordering: .releasing)
            shutdown(listener, Int32(SHUT_RDWR))
            close(listener)
            unlink(path)
        }

        func serve() {
            while !stopping.load(ordering: .acquiring) {
                var p = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
                guard poll(&p, 1, 100) >= 0 else { return }
                guard p.revents & Int16(POLLIN) != 0 else { continue }
                let c = accept(listener, nil, nil)
                guard c >= 0 else { continue }
                accepted.wrappingAdd(1, ordering: .relaxed)
                answer(c)
                close(c)
            }
        }

        /// One connection: header (request, flags, size), payload; GET_FEATURES (1) gets a
        /// u64 of 0 with the reply flag; the rest get nothing. Ends when the peer closes.
        func answer(_ c: CInt) {
            var header = [UInt32](repeating: 0, count: 3)
            while true {
                let n = header.withUnsafeMutableBytes { recv(c, $0.baseAddress, 12, Int32(MSG_WAITALL)) }
                guard n == 12 else { return }
                var payload = [UInt8](repeating: 0, count: Int(min(header[2], 4096)))
                if !payload.isEmpty {
                    guard payload.withUnsafeMutableBytes({ recv(c, $0.baseAddress, $0.count, Int32(MSG_WAITALL)) }) == payload.count else { return }
                }
                if header[0] == 1 {
                    var reply: [UInt32] = [1, 0x1 | 0x4, 8, 0, 0]
                    _ = reply.withUnsafeMutableBytes { send(c, $0.baseAddress, 20, Int32(MSG_NOSIGNAL)) }
                }
            }
        }
    }

    @Test func aDeviceTheDriverCannotDriveFailsOnceWithItsReason() throws {
        let directory = NSTemporaryDirectory() + "outboard-featureless-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let backend = try FeaturelessBackend(path: directory + "/vblk0.sock")
        defer { backend.stop() }
        let m = try ManagerFixture(devices: """
            [{"name": "vblk0", "transport": "vhost-user", "class": "block", "socket": "\(backend.path)", "reconnect_ms": 10,
              "access": [{"uid": 0, "mode": "rw"}]}]
            """)
        try m.waitFor("the device to fail", seconds: testDeadlineSeconds) { try m.device("vblk0").state == "failed" }
        let d = try m.device("vblk0")
        #expect(d.lastFailure?.contains("PROTOCOL_FEATURES") == true, "\(d.lastFailure ?? "no reason")")
        #expect(d.restarts == 0, "a device that cannot be driven is not a reason for a new driver")
        // Reconnecting (every 10 ms here) would change nothing; the manager does not.
        usleep(300_000)
        #expect(backend.accepted.load(ordering: .relaxed) == 1, "the manager connected \(backend.accepted.load(ordering: .relaxed)) times")
    }
}
