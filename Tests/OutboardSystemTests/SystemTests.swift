import CLinux
import Foundation
import OutboardSystem
import Synchronization
import SystemPackage
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// How many of this process's descriptors refer to the memfd called `name` (tests run in
/// parallel, so counting all descriptors would race with other tests).
func descriptorsReferring(toMemfd name: String) -> Int {
    guard let d = opendir("/proc/self/fd") else { return -1 }
    defer { closedir(d) }
    var n = 0
    while let e = readdir(d) {
        let fd = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
        var buf = [CChar](repeating: 0, count: 512)
        let len = readlink("/proc/self/fd/\(fd)", &buf, 511)
        if len > 0, String(decoding: buf.prefix(len).map { UInt8(bitPattern: $0) }, as: UTF8.self).hasPrefix("/memfd:\(name) ") { n += 1 }
    }
    return n
}

@Suite struct SharedRegionTests {
    @Test func sizeIsRoundedAndSealed() throws {
        let r = try SharedRegion(name: "t", size: 100)
        #expect(r.size == SharedRegion.pageSize)
        let seals = try r.seals
        #expect(seals & OB_F_SEAL_GROW != 0 && seals & OB_F_SEAL_SHRINK != 0)
        // Sealed: nobody can resize it under a mapping.
        #expect(ftruncate(r.fd.raw.rawValue, 0) == -1 && errno == EPERM)
        #expect(ftruncate(r.fd.raw.rawValue, off_t(1 << 20)) == -1 && errno == EPERM)
    }

    @Test func twoMappingsShareTheBytes() throws {
        let r = try SharedRegion(name: "t", size: 8192)
        let a = try r.map(.readWrite)
        let b = try r.map(.readOnly)
        a.base.storeBytes(of: 0xdead_beef_cafe, toByteOffset: 4096, as: UInt64.self)
        #expect(b.base.load(fromByteOffset: 4096, as: UInt64.self) == 0xdead_beef_cafe)
    }

    @Test func futureWriteSealLeavesOnlyReadOnlyMappings() throws {
        let r = try SharedRegion(name: "table", size: 4096)
        let writer = try r.map(.readWrite)
        try r.sealFutureWrites()
        #expect(throws: Errno.notPermitted) { _ = try r.map(.readWrite) }
        let reader = try r.map(.readOnly)
        writer.base.storeBytes(of: 7, as: UInt32.self)  // the existing writer still works
        #expect(reader.base.load(as: UInt32.self) == 7)
    }

    @Test func unsealedOrShortRegionsFromPeersAreRefused() throws {
        let raw = ob_memfd_create("unsealed", OB_MFD_CLOEXEC | OB_MFD_ALLOW_SEALING)
        #expect(raw >= 0)
        #expect(ftruncate(raw, 4096) == 0)
        #expect(throws: Errno.invalidArgument) {
            _ = try SharedRegion(adopting: OwnedFD(adopting: raw), minimumSize: 4096)
        }
        let sealed = try SharedRegion(name: "small", size: 4096)
        #expect(throws: Errno.invalidArgument) {
            _ = try SharedRegion(adopting: try sealed.fd.duplicate(), minimumSize: 8192)
        }
        let ok = try SharedRegion(adopting: try sealed.fd.duplicate(), minimumSize: 4096)
        #expect(ok.size == 4096)
    }
}

@Suite struct DoorbellTests {
    @Test func ringsAccumulateAndOneDrainTakesThemAll() throws {
        let d = try Doorbell()
        #expect(try d.drain() == 0)
        try d.ring()
        try d.ring()
        #expect(try d.drain() == 2)
        #expect(try d.drain() == 0)
    }

    @Test func waitTimesOutThenWakes() throws {
        let d = try Doorbell()
        #expect(try d.wait(timeoutMilliseconds: 10) == false)
        try d.ring()
        #expect(try d.wait(timeoutMilliseconds: 10_000) == true)
        #expect(try d.drain() == 0)
    }

    /// A wait with a timeout ends at its timeout even while signals keep interrupting it:
    /// poll(2) and epoll_wait(2) are retried after EINTR with what is left of the timeout,
    /// not the whole of it again (then a signal every 10 ms would keep a 300 ms wait going
    /// for as long as the signals came: here until the signaller gives up after 10 s).
    @Test func signalsDoNotStretchAWait() throws {
        #expect(ob_count_signal(SIGURG) == 0)
        let d = try Doorbell()
        let e = try Epoll()
        try e.add(d.fd.raw, events: .readable, token: 1)
        var events = EpollEvents(capacity: 4)
        // The test runner's threads block signals such as this one: let it through here.
        var only = sigset_t(), old = sigset_t()
        sigemptyset(&only)
        sigaddset(&only, SIGURG)
        #expect(pthread_sigmask(SIG_UNBLOCK, &only, &old) == 0)
        defer { pthread_sigmask(SIG_SETMASK, &old, nil) }
        let signaller = Signaller(target: pthread_self(), signal: SIGURG, giveUpAfterSeconds: 10)
        defer { _ = signaller.stop() }  // also when a wait throws
        let counted = ob_signals_counted()
        let rang = try d.wait(timeoutMilliseconds: 300)
        let n = try e.wait(into: &events, timeoutMilliseconds: 300)
        let gaveUp = signaller.stop()
        #expect(!rang && n == 0)
        #expect(!gaveUp, "a wait ran until the signals stopped")
        #expect(ob_signals_counted() - counted >= 4, "the waits must actually have been interrupted")
    }

    @Test func epollSeesADoorbell() throws {
        let e = try Epoll()
        let a = try Doorbell()
        let b = try Doorbell()
        try e.add(a.fd.raw, events: .readable, token: 1)
        try e.add(b.fd.raw, events: .readable, token: 2)
        #expect(try e.wait(timeoutMilliseconds: 0).isEmpty)
        try b.ring()
        let events = try e.wait(timeoutMilliseconds: 1000)
        #expect(events.map(\.token) == [2])
        #expect(events.first?.events.contains(.readable) == true)
        try e.remove(b.fd.raw)
        #expect(try e.wait(timeoutMilliseconds: 0).isEmpty)
    }
}

@Suite struct UnixSocketTests {
    /// A peer that answers and closes before it read what we sent: the kernel reports the
    /// reset first (ECONNRESET), then still holds the peer's answer. The receive passes the
    /// reset over and returns the answer, then the end of the connection.
    @Test func theLastWordsOfAPeerThatClosedUnreadAreDelivered() throws {
        let pair = try UnixSocket.pair()
        var first: UnixSocket? = pair.first
        let second = pair.second
        try first!.send(Array("refused".utf8))
        try second.send(Array("request".utf8))
        first = nil  // closes with our request unread
        let m = try second.receive(maxBytes: 64)
        #expect(m.bytes == Array("refused".utf8))
        #expect(throws: SocketError.closed) { _ = try second.receive(maxBytes: 64) }
    }

    @Test func regionsAndDoorbellsTravelWithAMessage() throws {
        let pair = try UnixSocket.pair()
        let region = try SharedRegion(name: "passed", size: 4096)
        let bell = try Doorbell()
        try pair.first.send([1, 2, 3], descriptors: [region.fd.raw, bell.fd.raw])
        var m = try pair.second.receive(maxBytes: 64, maxDescriptors: 2)
        #expect(m.bytes == [1, 2, 3])
        #expect(m.descriptors.count == 2)
        let theirRegion = try SharedRegion(adopting: m.descriptors.take(0)!, minimumSize: 4096)
        let theirBell = Doorbell(adopting: m.descriptors.take(1)!)
        var takenTwice = false
        if m.descriptors.take(1) != nil { takenTwice = true }
        #expect(!takenTwice)  // a descriptor is taken once only
        let mine = try region.map(.readWrite)
        let theirs = try theirRegion.map(.readWrite)
        theirs.base.storeBytes(of: 42, as: UInt64.self)
        #expect(mine.base.load(as: UInt64.self) == 42)
        try theirBell.ring()
        #expect(try bell.drain() == 1)
    }

    @Test func oversizedMessagesAndTooManyDescriptorsAreErrorsThatLeakNothing() throws {
        let pair = try UnixSocket.pair()
        let name = "leakcheck-\(getpid())"
        let region = try SharedRegion(name: name, size: 4096)
        let fd = region.fd.raw
        #expect(descriptorsReferring(toMemfd: name) == 1)
        try pair.first.send([UInt8](repeating: 7, count: 100))
        #expect(throws: SocketError.messageTooLarge(limit: 10)) { _ = try pair.second.receive(maxBytes: 10) }
        try pair.first.send([1], descriptors: [fd, fd, fd])
        #expect(throws: SocketError.tooManyDescriptors(limit: 1)) {
            _ = try pair.second.receive(maxBytes: 10, maxDescriptors: 1)
        }
        try pair.first.send([1], descriptors: [fd, fd])
        do {
            let unclaimed = try pair.second.receive(maxBytes: 10, maxDescriptors: 4)
            #expect(unclaimed.descriptors.count == 2)
        }  // dropped without taking: closed
        #expect(descriptorsReferring(toMemfd: name) == 1)
        // The connection is still usable after a refused message.
        try pair.first.send([9])
        #expect(try pair.second.receive(maxBytes: 10).bytes == [9])
    }

    @Test func closedPeerIsReported() throws {
        let pair = try UnixSocket.pair()
        let survivor = pair.second
        _ = consume pair.first
        #expect(throws: SocketError.closed) { _ = try survivor.receive(maxBytes: 10) }
    }

    @Test func listenerAcceptsAndKnowsThePeer() throws {
        let path = "/tmp/outboard-test-\(getpid()).sock"
        let listener = try UnixListener(path: path)
        let client = try UnixSocket.connect(path: path)
        let server = try listener.accept()
        let cred = try server.peerCredentials()
        #expect(cred.pid == getpid() && cred.uid == getuid() && cred.gid == getgid())
        try client.send([5])
        #expect(try server.receive(maxBytes: 4).bytes == [5])
    }
}

@Suite struct ChildProcessTests {
    @Test func exitStatusAndSignalsArrive() throws {
        var a = try ChildProcess(executable: "/bin/sh", arguments: ["-c", "exit 3"])
        #expect(try a.wait(timeoutMilliseconds: 10_000) == .exited(3))
        var b = try ChildProcess(executable: "/bin/sleep", arguments: ["30"])
        #expect(try b.wait(timeoutMilliseconds: 50) == nil)
        try b.signal(SIGKILL)
        #expect(try b.wait(timeoutMilliseconds: 10_000) == .signalled(SIGKILL))
    }

    @Test func onlyGrantedDescriptorsAreInherited() throws {
        let bell = try Doorbell()
        let leak = try Doorbell()  // not granted: must not be visible in the child
        _ = leak
        // The child checks its descriptors are exactly 0-2, the granted 3, and the one `ls`
        // opens to read /proc/self/fd; then it rings the doorbell it was given as fd 3.
        var c = try ChildProcess(
            executable: "/bin/sh",
            arguments: ["-c", "test \"$(ls /proc/self/fd | tr '\\n' ' ')\" = '0 1 2 3 4 ' && printf '\\1\\0\\0\\0\\0\\0\\0\\0' >&3"],
            descriptors: [(bell.fd.raw, 3)])
        #expect(try c.wait(timeoutMilliseconds: 10_000) == .exited(0))
        #expect(try bell.drain() == 1)
    }

    /// A descriptor the parent left inheritable (no O_CLOEXEC) in the gap between two
    /// granted numbers is closed in the child all the same.
    @Test func inheritableDescriptorsBetweenTargetsAreClosed() throws {
        let bell = try Doorbell()
        let other = try Doorbell()
        let gap = fcntl(other.fd.raw.rawValue, F_DUPFD, 100)  // no FD_CLOEXEC: inheritable
        #expect(gap >= 100 && gap < 200)
        defer { close(gap) }
        // Expected: 0-2, the targets 3 and 200, and the one `ls` opens (the lowest free, 4).
        var c = try ChildProcess(
            executable: "/bin/sh",
            arguments: ["-c", "test \"$(ls /proc/self/fd | tr '\\n' ' ')\" = '0 1 2 200 3 4 '"],
            descriptors: [(bell.fd.raw, 3), (other.fd.raw, 200)])
        #expect(try c.wait(timeoutMilliseconds: 10_000) == .exited(0), "fd \(gap) reached the child")
    }
}

/// Sends `signal` to one thread every 10 ms until stopped, or until it gives up.
final class Signaller: @unchecked Sendable {
    private let stopping = Atomic<Bool>(false)
    private let finished = Atomic<Bool>(false)
    private let gaveUp = Atomic<Bool>(false)

    init(target: pthread_t, signal: CInt, giveUpAfterSeconds: UInt64) {
        let thread = Thread { [self] in
            let end = Clock.monotonicNanoseconds + giveUpAfterSeconds * 1_000_000_000
            while !stopping.load(ordering: .acquiring) {
                if Clock.monotonicNanoseconds > end { gaveUp.store(true, ordering: .relaxed); break }
                pthread_kill(target, signal)
                usleep(10_000)
            }
            finished.store(true, ordering: .releasing)
        }
        thread.start()
    }

    /// Stops the signals and waits until none can come any more; true if it had given up.
    /// Calling it again changes nothing.
    func stop() -> Bool {
        stopping.store(true, ordering: .releasing)
        while !finished.load(ordering: .acquiring) { usleep(1000) }
        return gaveUp.load(ordering: .relaxed)
    }
}
