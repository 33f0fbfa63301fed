import Foundation
import OutboardBench
import OutboardSystem
import OutboardTestSupport
import Testing

/// The start-up wait the C reference's connect relies on.
@Suite struct BlkBenchTests {
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
}
