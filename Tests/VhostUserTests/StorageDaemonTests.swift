import CLinux
import Foundation
import OutboardSystem
import Synchronization
import SystemPackage
import Testing
import VhostUser

#if canImport(Glibc)
import Glibc
#endif

// Against a real qemu-storage-daemon (QEMU 7.2, Debian package qemu-system-common), the
// vhost-user-blk backend the notes in /work/shared/notes/vhost-user.md describe.

let storageDaemonPath = "/usr/bin/qemu-storage-daemon"
let imageSize = 16 << 20
/// Where the test pattern sits in the image: sector 2048.
let patternOffset = 1 << 20
func pattern(_ i: Int) -> UInt8 { UInt8(truncatingIfNeeded: i &* 31 &+ 7) }

struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ s: String) { description = s }
}

/// A temporary directory with a 16 MiB image holding a known 4 KiB pattern at 1 MiB, and
/// the path where the daemon's socket goes.
final class DaemonFixture {
    let dir: TemporaryDirectory
    let socketPath: String
    let imagePath: String
    /// Daemons started from here; each ChildProcess kills and reaps its own.
    private var pids: [pid_t] = []

    deinit {
        let mine = pids
        runningDaemons.withLock { for pid in mine { $0.remove(pid) } }
    }

    init() throws {
        dir = try TemporaryDirectory()
        socketPath = dir.path + "/blk.sock"
        imagePath = dir.path + "/disk.img"
        let fd = open(imagePath, O_CREAT | O_RDWR | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw Errno(rawValue: errno) }
        defer { close(fd) }
        guard ftruncate(fd, off_t(imageSize)) == 0 else { throw Errno(rawValue: errno) }
        let bytes = (0..<4096).map(pattern)
        guard pwrite(fd, bytes, bytes.count, off_t(patternOffset)) == bytes.count else { throw Errno(rawValue: errno) }
    }

    /// Starts qemu-storage-daemon exporting the image as vhost-user-blk at `socketPath`
    /// (the command from the notes). The returned ChildProcess kills and reaps the daemon
    /// when it goes away, whatever way the test ends.
    func startDaemon() throws -> ChildProcess {
        guard access(storageDaemonPath, X_OK) == 0 else {
            throw TestFailure("\(storageDaemonPath) is not installed (scripts/setup.sh installs qemu-system-common)")
        }
        let daemon = try ChildProcess(executable: storageDaemonPath, arguments: [
            "--blockdev", "driver=file,node-name=file0,filename=\(imagePath),aio=io_uring",
            "--blockdev", "driver=raw,node-name=disk0,file=file0",
            "--export", "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=\(socketPath),writable=on,num-queues=1",
        ])
        let pid = daemon.pid
        runningDaemons.withLock { _ = $0.insert(pid) }
        pids.append(pid)
        return daemon
    }

    /// Connects to the daemon's socket, retrying until it exists and listens (10 s at most),
    /// and failing at once if the daemon has exited.
    func connect(to daemon: inout ChildProcess, timeoutMilliseconds: Int = 5000) throws -> VhostUserFrontend {
        let deadline = Clock.monotonicNanoseconds + 10_000_000_000
        while true {
            if let status = try daemon.wait(timeoutMilliseconds: 0) {
                throw TestFailure("qemu-storage-daemon \(status) before accepting a connection")
            }
            do {
                let fd = try connectStream(path: socketPath, timeoutMilliseconds: 50)
                return VhostUserFrontend(socket: fd, replyTimeoutMilliseconds: timeoutMilliseconds)
            } catch let e as Errno where e == .noSuchFileOrDirectory || e == .connectionRefused {
                if Clock.monotonicNanoseconds > deadline { throw e }
            }
        }
    }
}

/// The handshake a virtio-blk driver does, checking what the daemon answers.
func handshake(_ fe: inout VhostUserFrontend) throws {
    try fe.setOwner()
    let offered = try fe.getFeatures()
    #expect(offered & (virtioVersion1 | VhostUserFeature.protocolFeatures) == virtioVersion1 | VhostUserFeature.protocolFeatures,
            "features 0x\(String(offered, radix: 16))")
    let protocolOffered = try fe.getProtocolFeatures()
    #expect(protocolOffered & wantedProtocolFeatures == wantedProtocolFeatures,
            "protocol features 0x\(String(protocolOffered, radix: 16))")
    try fe.setProtocolFeatures(wantedProtocolFeatures)
    let fe_usesReplyAck = fe.usesReplyAck
    #expect(fe_usesReplyAck)
    #expect(try fe.getQueueNum() == 1)
    let config = try fe.getConfig(offset: 0, size: 60)
    #expect(config.count == 60)
    // virtio 1.2 section 5.2.4: capacity (le64, 512-byte sectors) at 0, seg_max at 12,
    // blk_size at 20.
    let capacity = config.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 0, as: UInt64.self) }
    let segMax = config.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 12, as: UInt32.self) }
    let blockSize = config.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 20, as: UInt32.self) }
    #expect(capacity == UInt64(imageSize / 512))
    #expect(segMax == 126)
    #expect(blockSize == 512)
    #expect(try fe.getMaxMemSlots() >= 8)
    try fe.setFeatures(virtioVersion1 | VhostUserFeature.protocolFeatures)
}

/// A split virtqueue of 16 entries, hand-rolled for the test (virtio 1.2 section 2.7) in a
/// shared memfd region: descriptor table at 0, available ring at 0x1000, used ring at
/// 0x2000, the request header at 0x3000 and the status byte at 0x3010.
struct TinyRing {
    static let size = 16
    static let availOffset = 0x1000
    static let usedOffset = 0x2000
    static let headerOffset = 0x3000
    static let statusOffset = 0x3010
    let base: UnsafeMutableRawPointer

    func setDescriptor(_ i: Int, address: UInt64, length: UInt32, flags: UInt16, next: UInt16) {
        let d = base + 16 * i
        d.storeBytes(of: address.littleEndian, toByteOffset: 0, as: UInt64.self)
        d.storeBytes(of: length.littleEndian, toByteOffset: 8, as: UInt32.self)
        d.storeBytes(of: flags.littleEndian, toByteOffset: 12, as: UInt16.self)
        d.storeBytes(of: next.littleEndian, toByteOffset: 14, as: UInt16.self)
    }

    /// Publishes `head` as available entry `index`: the ring slot first, then idx with a
    /// single 16-bit release store (notes, gotcha 1: torn index writes hang the queue). The
    /// device's acquire load of avail->idx pairs with this store.
    func publish(head: UInt16, index: UInt16) {
        (base + Self.availOffset + 4 + 2 * Int(index % UInt16(Self.size))).storeBytes(of: head.littleEndian, as: UInt16.self)
        (base + Self.availOffset + 2).assumingMemoryBound(to: Atomic<UInt16>.self).pointee
            .store((index &+ 1).littleEndian, ordering: .releasing)
    }

    /// used->idx, loaded with acquire: pairs with the device's release of it, so the used
    /// element and the data it describes are visible once the index is.
    var usedIndex: UInt16 {
        UInt16(littleEndian: (base + Self.usedOffset + 2).assumingMemoryBound(to: Atomic<UInt16>.self).pointee
            .load(ordering: .acquiring))
    }

    func usedElement(_ i: Int) -> (id: UInt32, length: UInt32) {
        let e = base + Self.usedOffset + 4 + 8 * (i % Self.size)
        return (UInt32(littleEndian: e.load(as: UInt32.self)), UInt32(littleEndian: e.load(fromByteOffset: 4, as: UInt32.self)))
    }
}

func userAddress(_ p: UnsafeMutableRawPointer) -> UInt64 { UInt64(UInt(bitPattern: p)) }

@Suite(.serialized) struct StorageDaemonTests {
    /// Handshake, memory, the vring messages, and one real 4 KiB read through a hand-rolled
    /// split ring whose data buffer lives in a region added with ADD_MEM_REG (so the read
    /// proves that region was mapped), then REM_MEM_REG. The ring's region comes with
    /// SET_MEM_TABLE, or (`onlyAddMemReg`) with ADD_MEM_REG as well, on an empty table, the
    /// way QEMU's own frontend does it once CONFIGURE_MEM_SLOTS is negotiated.
    @Test(arguments: [false, true])
    func handshakeMemoryAndOneRead(onlyAddMemReg: Bool) throws {
        try withWatchdog(60, "handshakeMemoryAndOneRead") {
            let fixture = try DaemonFixture()
            var daemon = try fixture.startDaemon()
            var fe = try fixture.connect(to: &daemon)
            try handshake(&fe)

            // GET_CONFIG beyond the 60 bytes of struct virtio_blk_config this daemon has: it
            // answers with an empty payload, the spec's refusal, and the connection stays.
            #expect(caught { _ = try fe.getConfig(offset: 0, size: 72) } == .rejected(request: "GET_CONFIG", code: 0))
            #expect(try fe.getQueueNum() == 1)

            let ringRegion = try SharedRegion(name: "vhu-ring", size: 64 << 10)
            let ringMap = try ringRegion.map(.readWrite)
            let dataRegion = try SharedRegion(name: "vhu-data", size: 64 << 10)
            let dataMap = try dataRegion.map(.readWrite)
            let ringGPA: UInt64 = 0
            let dataGPA: UInt64 = 1 << 32
            let ringMemory = VhostUserMemoryRegion(guestPhysicalAddress: ringGPA, size: UInt64(ringRegion.size),
                                                   userAddress: userAddress(ringMap.base), mmapOffset: 0)
            let dataMemory = VhostUserMemoryRegion(guestPhysicalAddress: dataGPA, size: UInt64(dataRegion.size),
                                                   userAddress: userAddress(dataMap.base), mmapOffset: 0)
            if onlyAddMemReg {
                try fe.addMemoryRegion(ringMemory, fd: ringRegion.fd.raw.rawValue)
            } else {
                try fe.setMemTable([ringMemory], fds: [ringRegion.fd.raw.rawValue])
            }
            try fe.addMemoryRegion(dataMemory, fd: dataRegion.fd.raw.rawValue)

            let kick = try Doorbell()
            let call = try Doorbell()
            let ring = TinyRing(base: ringMap.base)
            try fe.setVringNum(0, UInt32(TinyRing.size))
            try fe.setVringBase(0, 0)
            try fe.setVringAddr(0, descriptors: userAddress(ringMap.base), used: userAddress(ringMap.base + TinyRing.usedOffset),
                                avail: userAddress(ringMap.base + TinyRing.availOffset))
            try fe.setVringKick(0, fd: kick.fd.raw.rawValue)
            try fe.setVringCall(0, fd: call.fd.raw.rawValue)
            try fe.setVringEnable(0, true)

            // virtio-blk read (virtio 1.2 section 5.2.6): header {type IN = 0, reserved, sector},
            // 4 KiB device-writable data, 1 device-writable status byte.
            let header = ringMap.base + TinyRing.headerOffset
            header.storeBytes(of: UInt32(0), toByteOffset: 0, as: UInt32.self)
            header.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)
            header.storeBytes(of: UInt64(patternOffset / 512).littleEndian, toByteOffset: 8, as: UInt64.self)
            ringMap.base.storeBytes(of: UInt8(0xff), toByteOffset: TinyRing.statusOffset, as: UInt8.self)
            let next: UInt16 = 1, write: UInt16 = 2
            ring.setDescriptor(0, address: ringGPA + UInt64(TinyRing.headerOffset), length: 16, flags: next, next: 1)
            ring.setDescriptor(1, address: dataGPA, length: 4096, flags: next | write, next: 2)
            ring.setDescriptor(2, address: ringGPA + UInt64(TinyRing.statusOffset), length: 1, flags: write, next: 0)
            ring.publish(head: 0, index: 0)
            try kick.ring()

            // The call eventfd is signalled once when SET_VRING_CALL arrives (notes, gotcha 2):
            // wait for the used index, not for a wake-up.
            let deadline = Clock.monotonicNanoseconds + 10_000_000_000
            while ring.usedIndex != 1 && Clock.monotonicNanoseconds < deadline {
                _ = try call.wait(timeoutMilliseconds: 50)
            }
            #expect(ring.usedIndex == 1)
            let used = ring.usedElement(0)
            #expect(used.id == 0)
            #expect(used.length == 4097)  // bytes written: data and status
            #expect(ringMap.base.load(fromByteOffset: TinyRing.statusOffset, as: UInt8.self) == 0)  // VIRTIO_BLK_S_OK
            let data = UnsafeRawBufferPointer(start: dataMap.base, count: 4096)
            let firstDifference = (0..<4096).first { data[$0] != pattern($0) }
            #expect(firstDifference == nil, "the data read differs from the image from byte \(firstDifference ?? 0)")

            // GET_VRING_BASE stops the ring and reports the next available index it would read.
            #expect(try fe.getVringBase(0) == 1)
            try fe.removeMemoryRegion(dataMemory)
            let fe_failure = fe.failure
            #expect(fe_failure == nil)
        }
    }

    /// A daemon killed between calls: the next call fails with `.disconnected` at once, and
    /// the socket shows the hang-up a caller's epoll would see. A daemon restarted on the
    /// same socket path (the killed one left its socket file behind) serves a new frontend
    /// on a new connection. A daemon killed while we wait for a reply: `.disconnected` as
    /// soon as it dies, not after the timeout.
    @Test func killedDaemonIsDisconnectedAndARestartedOneServesANewFrontend() throws {
        try withWatchdog(90, "killedDaemon") {
            let fixture = try DaemonFixture()
            var daemon = try fixture.startDaemon()
            var fe = try fixture.connect(to: &daemon)
            try handshake(&fe)

            try daemon.signal(SIGKILL)
            #expect(try daemon.wait(timeoutMilliseconds: 5000) == .signalled(SIGKILL))
            var pfd = pollfd(fd: fe.fd, events: Int16(POLLIN), revents: 0)
            #expect(poll(&pfd, 1, 1000) == 1 && pfd.revents & Int16(POLLHUP) != 0)

            var start = Clock.monotonicNanoseconds
            let e = caught { try fe.setVringNum(0, 16) }
            #expect(kind(of: e) == .disconnected, "\(String(describing: e))")
            #expect(e?.shouldReconnect == true)
            #expect(millisecondsSince(start) < 1000)
            #expect(kind(of: caught { _ = try fe.getFeatures() }) == .disconnected)
            _ = consume fe

            // Reconnection: a new daemon on the same path, a new connection, a new handshake.
            var second = try fixture.startDaemon()
            var fe2 = try fixture.connect(to: &second)
            try handshake(&fe2)
            let fe2_failure = fe2.failure
            #expect(fe2_failure == nil)

            // Killed while a reply is awaited: stop the daemon so the request stays
            // unanswered, then kill it 300 ms later from another thread.
            try second.signal(SIGSTOP)
            let pid = second.pid
            Thread {
                usleep(300_000)
                kill(pid, SIGKILL)  // not reaped yet, so the pid cannot have been reused
            }.start()
            start = Clock.monotonicNanoseconds
            let waiting = caught { _ = try fe2.getFeatures() }
            let elapsed = millisecondsSince(start)
            #expect(kind(of: waiting) == .disconnected, "\(String(describing: waiting))")
            #expect(elapsed >= 250 && elapsed < 3000, "\(elapsed) ms")
            #expect(try second.wait(timeoutMilliseconds: 5000) == .signalled(SIGKILL))
            _ = consume fe2

            var third = try fixture.startDaemon()
            var fe3 = try fixture.connect(to: &third)
            try handshake(&fe3)
            let fe3_failure = fe3.failure
            #expect(fe3_failure == nil)
        }
    }

    /// A daemon that stops answering (SIGSTOP) gives `.timeout` within the limit; the
    /// abandoned connection stays abandoned even when the late reply comes; and the daemon,
    /// resumed, serves a new frontend once the old one has closed its connection.
    @Test func stoppedDaemonTimesOutAndServesTheNextFrontend() throws {
        try withWatchdog(60, "stoppedDaemon") {
            let fixture = try DaemonFixture()
            var daemon = try fixture.startDaemon()
            var fe = try fixture.connect(to: &daemon)
            try handshake(&fe)

            try daemon.signal(SIGSTOP)
            fe.replyTimeoutMilliseconds = 300
            let start = Clock.monotonicNanoseconds
            let e = caught { _ = try fe.getFeatures() }
            let elapsed = millisecondsSince(start)
            #expect(kind(of: e) == .timeout, "\(String(describing: e))")
            #expect(elapsed >= 290 && elapsed < 2000, "\(elapsed) ms")
            try daemon.signal(SIGCONT)
            usleep(100_000)  // the late reply arrives...
            #expect(kind(of: caught { _ = try fe.getFeatures() }) == .disconnected)  // ...and is not taken for an answer
            _ = consume fe

            var fe2 = try fixture.connect(to: &daemon)
            try handshake(&fe2)
            #expect(try daemon.wait(timeoutMilliseconds: 0) == nil)  // still running
        }
    }
}
