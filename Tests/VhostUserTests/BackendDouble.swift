import CLinux
import Foundation
import OutboardSystem
import Synchronization
import SystemPackage
import VhostUser

#if canImport(Glibc)
import Glibc
#endif

/// A vhost-user backend double: the other end of a socketpair, served by a thread that
/// answers each request the way the test's script says, including in ways the protocol
/// forbids. Descriptors it sends are fresh memfds named `probePrefix-N`, so a test can count
/// how many of them are still open anywhere in the process afterwards.
final class BackendDouble: Sendable {
    enum Action: Sendable {
        /// Raw bytes, with `descriptors` probe memfds attached to the first byte.
        case send([UInt8], descriptors: Int = 0)
        /// A message (header + payload) in one sendmsg, with probe memfds attached.
        case reply(VhostUserMessage, descriptors: Int = 0)
        case sleep(milliseconds: Int)
        /// Close the connection and stop.
        case close
    }

    struct Received: Sendable {
        var message: VhostUserMessage
        var descriptors: Int
    }

    typealias Script = @Sendable (VhostUserMessage) -> [Action]

    let probePrefix: String
    private let log = Mutex<[Received]>([])
    private let finished = Atomic<Bool>(false)

    /// Every message received so far, in order.
    var received: [Received] { log.withLock { $0 } }

    init(socket: consuming OwnedFD, probePrefix: String, script: @escaping Script) {
        self.probePrefix = probePrefix
        let fd = socket.release().rawValue
        Thread { [self] in
            serve(fd: fd, script: script)
            close(fd)
            finished.store(true, ordering: .releasing)
        }.start()
    }

    /// Waits for the serving thread to end (the frontend closed its end, or the script
    /// closed). False if it is still running after `timeoutMilliseconds`.
    func join(timeoutMilliseconds: Int) -> Bool {
        let deadline = Clock.monotonicNanoseconds + UInt64(timeoutMilliseconds) * 1_000_000
        while !finished.load(ordering: .acquiring) {
            if Clock.monotonicNanoseconds > deadline { return false }
            usleep(2_000)
        }
        return true
    }

    private func serve(fd: CInt, script: Script) {
        var probes = 0
        while true {
            // Nothing may wait forever: 20 s of silence from the frontend ends the double.
            guard let (header, fds1) = readExactly(fd, VhostUserHeader.byteCount, timeoutMilliseconds: 20_000),
                  let h = VhostUserHeader(decoding: header), h.size <= 4096,
                  let (payload, fds2) = readExactly(fd, Int(h.size), timeoutMilliseconds: 20_000)
            else { return }
            let message = VhostUserMessage(header: h, payload: payload)
            log.withLock { $0.append(Received(message: message, descriptors: fds1 + fds2)) }
            for action in script(message) {
                switch action {
                case .send(let bytes, let n):
                    sendWithProbes(fd, bytes, count: n, probes: &probes)
                case .reply(let m, let n):
                    sendWithProbes(fd, m.encoded, count: n, probes: &probes)
                case .sleep(let ms):
                    usleep(useconds_t(ms) * 1000)
                case .close:
                    return
                }
            }
        }
    }

    private func sendWithProbes(_ fd: CInt, _ bytes: [UInt8], count: Int, probes: inout Int) {
        var fds: [CInt] = []
        for _ in 0..<count {
            fds.append(ob_memfd_create("\(probePrefix)-\(probes)", OB_MFD_CLOEXEC))
            probes += 1
        }
        _ = bytes.withUnsafeBytes { ob_send_with_fds(fd, $0.baseAddress, $0.count, fds, fds.count, 0) }
        for f in fds { close(f) }  // the frontend has its own copies now (or they are lost)
    }

    /// Reads exactly `count` bytes (blocking, each wait bounded); closes any descriptors that
    /// come along and returns their number. nil on end of stream, error or timeout.
    private func readExactly(_ fd: CInt, _ count: Int, timeoutMilliseconds: Int) -> ([UInt8], Int)? {
        var bytes = [UInt8](repeating: 0, count: count)
        var got = 0
        var descriptors = 0
        var fds = [CInt](repeating: -1, count: 16)
        while got < count {
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&pfd, 1, CInt(timeoutMilliseconds)) > 0 else { return nil }
            var nfds = 0
            var flags: CInt = 0
            let n = bytes.withUnsafeMutableBytes {
                ob_recv_with_fds(fd, $0.baseAddress! + got, count - got, &fds, fds.count, &nfds, &flags, 0)
            }
            for i in 0..<nfds { close(fds[i]) }
            descriptors += nfds
            guard n > 0 else { return nil }
            got += n
        }
        return (bytes, descriptors)
    }

    // MARK: - Building replies

    static func reply(to m: VhostUserMessage, payload: [UInt8], flags: UInt32 = 0x5) -> VhostUserMessage {
        VhostUserMessage(header: VhostUserHeader(request: m.header.request, flags: flags, size: UInt32(payload.count)),
                         payload: payload)
    }

    static let offeredFeatures: UInt64 = (1 << 32) | VhostUserFeature.protocolFeatures | (1 << 9)
    static let offeredProtocolFeatures: UInt64 = VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.config
        | VhostUserProtocolFeature.multiQueue | VhostUserProtocolFeature.configureMemSlots

    /// What a correct backend answers: the natural reply, or an ack of 0 when NEED_REPLY is set.
    static func wellBehaved(_ m: VhostUserMessage) -> [Action] {
        guard let request = VhostUserRequest(rawValue: m.header.request) else { return [.close] }
        switch request {
        case .getFeatures: return [.reply(reply(to: m, payload: VhostUserMessage.u64(offeredFeatures)))]
        case .getProtocolFeatures: return [.reply(reply(to: m, payload: VhostUserMessage.u64(offeredProtocolFeatures)))]
        case .getQueueNum: return [.reply(reply(to: m, payload: VhostUserMessage.u64(1)))]
        case .getMaxMemSlots: return [.reply(reply(to: m, payload: VhostUserMessage.u64(32)))]
        case .getVringBase:
            let index = VhostUserVringState(decoding: m.payload)?.index ?? 0
            return [.reply(reply(to: m, payload: VhostUserVringState(index: index, num: 7).encoded))]
        case .getConfig:
            guard let c = VhostUserConfigSpace(decoding: m.payload) else { return [.close] }
            let data = (0..<c.data.count).map { UInt8(truncatingIfNeeded: Int(c.offset) + $0) }
            return [.reply(reply(to: m, payload: VhostUserConfigSpace(offset: c.offset, flags: c.flags, data: data).encoded))]
        default:
            if m.header.flags & VhostUserHeader.needReplyFlag != 0 {
                return [.reply(reply(to: m, payload: VhostUserMessage.u64(0)))]
            }
            return []
        }
    }
}
