import CLinux
import OutboardSystem
import SystemPackage
import Testing
import VhostUser

#if canImport(Glibc)
import Glibc
#endif

/// Runs `body` and returns the VhostUserError it throws (nil if none).
func caught(sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void) -> VhostUserError? {
    do {
        try body()
        return nil
    } catch let e as VhostUserError {
        return e
    } catch {
        Issue.record("not a VhostUserError: \(error)", sourceLocation: sourceLocation)
        return nil
    }
}

enum ErrorKind { case disconnected, timeout, malformed, rejected, unsupported, system }

func kind(of e: VhostUserError?) -> ErrorKind? {
    switch e {
    case .disconnected?: return .disconnected
    case .timeout?: return .timeout
    case .malformedReply?: return .malformed
    case .rejected?: return .rejected
    case .unsupported?: return .unsupported
    case .system?: return .system
    case nil: return nil
    }
}

/// GET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_FEATURES, as a driver does them.
func negotiate(_ fe: inout VhostUserFrontend, protocolFeatures: UInt64) throws(VhostUserError) {
    _ = try fe.getFeatures()
    _ = try fe.getProtocolFeatures()
    try fe.setProtocolFeatures(protocolFeatures)
    try fe.setFeatures(virtioVersion1 | VhostUserFeature.protocolFeatures)
}

/// Against an in-process backend double that misbehaves in every way the protocol allows a
/// backend to: each misbehaviour gives its own clear error, never a crash or a hang, and no
/// descriptor the double sent stays open in this process.
@Suite struct HostileBackendTests {
    /// Connects a frontend to a double following `script`, runs `body`, drops the frontend,
    /// then checks that the double saw our end close (the frontend closed its socket) and
    /// that none of the double's probe descriptors is open anywhere in this process.
    @discardableResult
    func withDouble(_ name: String, timeoutMilliseconds: Int = 2000, script: @escaping BackendDouble.Script,
                    _ body: (inout VhostUserFrontend) throws -> Void) throws -> [BackendDouble.Received] {
        let prefix = "vhu-probe-\(name)"
        let pair = try streamPair()
        let double = BackendDouble(socket: pair.backend, probePrefix: prefix, script: script)
        var fe = VhostUserFrontend(socket: pair.frontend, replyTimeoutMilliseconds: timeoutMilliseconds)
        try withWatchdog(60, name) { try body(&fe) }
        _ = consume fe
        #expect(double.join(timeoutMilliseconds: 5000), "the frontend's socket was not closed")
        #expect(descriptorsReferring(toMemfdPrefix: prefix) == 0, "a received descriptor leaked")
        return double.received
    }

    /// The script: `hostile` answers `request`; everything else is answered correctly.
    func script(for request: VhostUserRequest, _ hostile: @escaping @Sendable (VhostUserMessage) -> [BackendDouble.Action])
        -> BackendDouble.Script {
        { m in m.header.request == request.rawValue ? hostile(m) : BackendDouble.wellBehaved(m) }
    }

    func expect(_ e: VhostUserError?, _ k: ErrorKind, containing text: String = "",
                sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(kind(of: e) == k, "got \(String(describing: e))", sourceLocation: sourceLocation)
        if !text.isEmpty {
            #expect(String(describing: e).contains(text), "\(String(describing: e)) lacks \"\(text)\"",
                    sourceLocation: sourceLocation)
        }
        #expect(e?.shouldReconnect == (k == .disconnected || k == .timeout || k == .malformed),
                sourceLocation: sourceLocation)
    }

    @Test func wellBehavedDoubleHandshakes() throws {
        let received = try withDouble("good", script: BackendDouble.wellBehaved) { fe in
            try fe.setOwner()
            #expect(try fe.getFeatures() == BackendDouble.offeredFeatures)
            #expect(try fe.getProtocolFeatures() == BackendDouble.offeredProtocolFeatures)
            try fe.setProtocolFeatures(wantedProtocolFeatures)
            let fe_protocolFeatures = fe.protocolFeatures
            let fe_usesReplyAck = fe.usesReplyAck
            #expect(fe_protocolFeatures == wantedProtocolFeatures && fe_usesReplyAck)
            #expect(try fe.getQueueNum() == 1)
            #expect(try fe.getMaxMemSlots() == 32)
            #expect(try fe.getConfig(offset: 8, size: 4) == [8, 9, 10, 11])
            try fe.setFeatures(virtioVersion1 | VhostUserFeature.protocolFeatures)
            let fe_features = fe.features
            #expect(fe_features == virtioVersion1 | VhostUserFeature.protocolFeatures)
            let region = VhostUserMemoryRegion(guestPhysicalAddress: 0, size: 4096, userAddress: 0x7000_0000, mmapOffset: 0)
            let second = VhostUserMemoryRegion(guestPhysicalAddress: 1 << 32, size: 4096, userAddress: 0x8000_0000, mmapOffset: 0)
            try fe.setMemTable([region, second], fds: [0, 1])  // any open descriptors do
            try fe.addMemoryRegion(second, fd: 2)
            try fe.removeMemoryRegion(second)
            try fe.setVringNum(0, 128)
            try fe.setVringBase(0, 0)
            try fe.setVringAddr(0, descriptors: 0x7000_0000, used: 0x7000_1000, avail: 0x7000_0800)
            try fe.setVringKick(0, fd: 0)
            try fe.setVringCall(0, fd: -1)
            try fe.setVringEnable(0, true)
            #expect(try fe.getVringBase(0) == 7)
            let fe_failure = fe.failure
            #expect(fe_failure == nil)
        }
        let codes = received.map { VhostUserRequest(rawValue: $0.message.header.request)! }
        #expect(codes == [.setOwner, .getFeatures, .getProtocolFeatures, .setProtocolFeatures, .getQueueNum,
                          .getMaxMemSlots, .getConfig, .setFeatures, .setMemTable, .addMemoryRegion,
                          .removeMemoryRegion, .setVringNum, .setVringBase, .setVringAddr, .setVringKick,
                          .setVringCall, .setVringEnable, .getVringBase])
        func flags(_ r: VhostUserRequest) -> UInt32 { received.first { $0.message.header.request == r.rawValue }!.message.header.flags }
        func fds(_ r: VhostUserRequest) -> Int { received.first { $0.message.header.request == r.rawValue }!.descriptors }
        // Before REPLY_ACK is negotiated nothing asks for an ack; SET_PROTOCOL_FEATURES itself
        // does not; afterwards every request without a natural reply does; requests with a
        // natural reply never do.
        #expect(flags(.setOwner) == 0x1)
        #expect(flags(.setProtocolFeatures) == 0x1)
        #expect(flags(.getQueueNum) == 0x1 && flags(.getConfig) == 0x1 && flags(.getVringBase) == 0x1)
        for r in [VhostUserRequest.setFeatures, .setMemTable, .addMemoryRegion, .removeMemoryRegion, .setVringNum,
                  .setVringBase, .setVringAddr, .setVringKick, .setVringCall, .setVringEnable] {
            #expect(flags(r) == 0x9, "\(r)")
        }
        // Descriptors: one per region, one for ADD_MEM_REG and KICK, none for REM_MEM_REG and
        // for CALL with fd -1 (whose payload carries the no-descriptor bit instead).
        #expect(fds(.setMemTable) == 2 && fds(.addMemoryRegion) == 1 && fds(.removeMemoryRegion) == 0)
        #expect(fds(.setVringKick) == 1 && fds(.setVringCall) == 0)
        let call = received.first { $0.message.header.request == VhostUserRequest.setVringCall.rawValue }!
        #expect(call.message.payload == VhostUserMessage.u64(0x100))
        let table = received.first { $0.message.header.request == VhostUserRequest.setMemTable.rawValue }!
        #expect(VhostUserMemoryTable(decoding: table.message.payload)?.regions.count == 2)
        #expect(table.message.header.size == 8 + 2 * 32)
    }

    @Test func withoutReplyAckCommandsReturnOnceSent() throws {
        let received = try withDouble("noack", script: BackendDouble.wellBehaved) { fe in
            try negotiate(&fe, protocolFeatures: VhostUserProtocolFeature.config)
            let fe_usesReplyAck = fe.usesReplyAck
            #expect(!fe_usesReplyAck)
            try fe.setVringNum(0, 64)
            try fe.setVringEnable(0, true)
            #expect(try fe.getConfig(offset: 0, size: 2) == [0, 1])  // still in step
        }
        #expect(received.allSatisfy { $0.message.header.flags == 0x1 })
    }

    @Test func wrongRequestCode() throws {
        try withDouble("wrongcode", script: script(for: .getFeatures) { m in
            [.reply(VhostUserMessage(header: VhostUserHeader(request: VhostUserRequest.getProtocolFeatures.rawValue, flags: 5, size: 8),
                                     payload: VhostUserMessage.u64(1)))]
        }) { fe in
            expect(caught { _ = try fe.getFeatures() }, .malformed, containing: "GET_FEATURES: got a reply to GET_PROTOCOL_FEATURES")
            // The connection is abandoned: later calls fail at once, without traffic.
            expect(caught { try fe.setOwner() }, .disconnected, containing: "abandoned")
            let fe_failure = fe.failure
            #expect(kind(of: fe_failure) == .malformed)
        }
    }

    @Test func wrongSize() throws {
        try withDouble("wrongsize", script: script(for: .getQueueNum) { m in
            [.reply(BackendDouble.reply(to: m, payload: [1, 0, 0, 0]))]
        }) { fe in
            try negotiate(&fe, protocolFeatures: VhostUserProtocolFeature.multiQueue)
            expect(caught { _ = try fe.getQueueNum() }, .malformed, containing: "4 bytes")
        }
    }

    @Test func oversizeSizeFieldIsRefusedFromTheHeader() throws {
        try withDouble("oversize", script: script(for: .getFeatures) { m in
            // A header announcing 4 GiB, then nothing: refused at once, not read or waited for.
            var header: [UInt8] = []
            VhostUserHeader(request: m.header.request, flags: 5, size: .max).encode(into: &header)
            return [.send(header)]
        }) { fe in
            let start = Clock.monotonicNanoseconds
            expect(caught { _ = try fe.getFeatures() }, .malformed, containing: "4294967295 bytes")
            #expect(millisecondsSince(start) < 1000)
        }
    }

    @Test func oversizeConfigReply() throws {
        try withDouble("bigconfig", script: script(for: .getConfig) { m in
            [.reply(BackendDouble.reply(to: m, payload: VhostUserConfigSpace(offset: 0, data: [UInt8](repeating: 1, count: 4000)).encoded))]
        }) { fe in
            try negotiate(&fe, protocolFeatures: VhostUserProtocolFeature.config)
            expect(caught { _ = try fe.getConfig(offset: 0, size: 60) }, .malformed, containing: "expected 72")
        }
    }

    @Test func configEchoMismatch() throws {
        try withDouble("configecho", script: script(for: .getConfig) { m in
            [.reply(BackendDouble.reply(to: m, payload: VhostUserConfigSpace(offset: 4, data: [1, 2, 3, 4]).encoded))]
        }) { fe in
            try negotiate(&fe, protocolFeatures: VhostUserProtocolFeature.config)
            expect(caught { _ = try fe.getConfig(offset: 0, size: 4) }, .malformed, containing: "at offset 4")
        }
    }

    @Test func emptyConfigReplyIsARefusalAndKeepsTheConnection() throws {
        try withDouble("configrefused", script: script(for: .getConfig) { m in
            [.reply(BackendDouble.reply(to: m, payload: []))]
        }) { fe in
            try negotiate(&fe, protocolFeatures: VhostUserProtocolFeature.config)
            expect(caught { _ = try fe.getConfig(offset: 0, size: 60) }, .rejected, containing: "GET_CONFIG")
            #expect(try fe.getFeatures() == BackendDouble.offeredFeatures)
        }
    }

    @Test func vringBaseForAnotherRing() throws {
        try withDouble("vringindex", script: script(for: .getVringBase) { m in
            [.reply(BackendDouble.reply(to: m, payload: VhostUserVringState(index: 5, num: 0).encoded))]
        }) { fe in
            expect(caught { _ = try fe.getVringBase(0) }, .malformed, containing: "vring 5")
        }
    }

    @Test func missingReplyFlag() throws {
        try withDouble("noreplyflag", script: script(for: .getFeatures) { m in
            [.reply(BackendDouble.reply(to: m, payload: VhostUserMessage.u64(1), flags: 0x1))]
        }) { fe in
            expect(caught { _ = try fe.getFeatures() }, .malformed, containing: "REPLY flag")
        }
    }

    @Test func wrongVersion() throws {
        try withDouble("version", script: script(for: .getFeatures) { m in
            [.reply(BackendDouble.reply(to: m, payload: VhostUserMessage.u64(1), flags: 0x6))]
        }) { fe in
            expect(caught { _ = try fe.getFeatures() }, .malformed, containing: "version 2")
        }
    }

    @Test func extraDescriptorsWithTheHeaderAreClosed() throws {
        try withDouble("fdsheader", script: script(for: .getFeatures) { m in
            [.reply(BackendDouble.reply(to: m, payload: VhostUserMessage.u64(1)), descriptors: 3)]
        }) { fe in
            expect(caught { _ = try fe.getFeatures() }, .malformed, containing: "3 unexpected descriptor")
        }
    }

    @Test func extraDescriptorsWithThePayloadAreClosed() throws {
        try withDouble("fdspayload", script: script(for: .getFeatures) { m in
            var header: [UInt8] = []
            VhostUserHeader(request: m.header.request, flags: 5, size: 8).encode(into: &header)
            return [.send(header), .sleep(milliseconds: 50), .send(VhostUserMessage.u64(1), descriptors: 2)]
        }) { fe in
            expect(caught { _ = try fe.getFeatures() }, .malformed, containing: "2 unexpected descriptor")
        }
    }

    @Test func tooManyDescriptorsToReceiveAreAllClosed() throws {
        try withDouble("fdsflood", script: script(for: .getFeatures) { m in
            [.reply(BackendDouble.reply(to: m, payload: VhostUserMessage.u64(1)), descriptors: 40)]
        }) { fe in
            expect(caught { _ = try fe.getFeatures() }, .malformed, containing: "unexpected descriptor")
        }
    }

    @Test func nonzeroAckIsRejectedAndTheConnectionStaysUsable() throws {
        try withDouble("nack", script: script(for: .setVringNum) { m in
            // Refuses vring 0, accepts the others.
            let code: UInt64 = VhostUserVringState(decoding: m.payload)?.index == 0 ? 22 : 0
            return [.reply(BackendDouble.reply(to: m, payload: VhostUserMessage.u64(code)))]
        }) { fe in
            try negotiate(&fe, protocolFeatures: VhostUserProtocolFeature.replyAck)
            let e = caught { try fe.setVringNum(0, 100_000) }
            expect(e, .rejected)
            #expect(e == .rejected(request: "SET_VRING_NUM", code: 22))
            let fe_failure = fe.failure
            #expect(fe_failure == nil)
            try fe.setVringNum(1, 128)
        }
    }

    @Test func nonzeroAckOnSetFeaturesKeepsTheOldFeatures() throws {
        try withDouble("nackfeatures", script: script(for: .setFeatures) { m in
            [.reply(BackendDouble.reply(to: m, payload: VhostUserMessage.u64(1)))]
        }) { fe in
            _ = try fe.getFeatures()
            _ = try fe.getProtocolFeatures()
            try fe.setProtocolFeatures(VhostUserProtocolFeature.replyAck)
            expect(caught { try fe.setFeatures(virtioVersion1) }, .rejected, containing: "SET_FEATURES")
            let fe_features = fe.features
            #expect(fe_features == 0)
        }
    }

    @Test func closeBeforeReplying() throws {
        try withDouble("closebefore", script: script(for: .getFeatures) { _ in [.close] }) { fe in
            let start = Clock.monotonicNanoseconds
            expect(caught { _ = try fe.getFeatures() }, .disconnected, containing: "GET_FEATURES: backend closed the connection")
            #expect(millisecondsSince(start) < 1000)
        }
    }

    @Test func closeInTheMiddleOfAReply() throws {
        try withDouble("closemid", script: script(for: .getFeatures) { m in
            var header: [UInt8] = []
            VhostUserHeader(request: m.header.request, flags: 5, size: 8).encode(into: &header)
            return [.send(header + [1, 2, 3]), .close]
        }) { fe in
            expect(caught { _ = try fe.getFeatures() }, .disconnected, containing: "payload: 3 of 8 bytes")
        }
    }

    @Test func closeInTheMiddleOfAHeader() throws {
        try withDouble("closeheader", script: script(for: .getFeatures) { _ in [.send([1, 0, 0, 0, 5]), .close] }) { fe in
            expect(caught { _ = try fe.getFeatures() }, .disconnected, containing: "header: 5 of 12 bytes")
        }
    }

    @Test func commandAfterTheBackendClosedIsDisconnectedNotSIGPIPE() throws {
        try withDouble("epipe", script: script(for: .getFeatures) { _ in [.close] }) { fe in
            _ = caught { _ = try fe.getFeatures() }
            // A fresh frontend on a socket whose peer is gone: the send fails with EPIPE.
            var other: VhostUserFrontend
            do {
                let pair = try streamPair()
                other = VhostUserFrontend(socket: pair.frontend)
            }  // pair.backend closes here
            expect(caught { try other.setOwner() }, .disconnected, containing: "SET_OWNER: send failed")
        }
    }

    @Test func neverReplyingTimesOut() throws {
        try withDouble("silent", timeoutMilliseconds: 200, script: script(for: .getFeatures) { _ in [] }) { fe in
            let start = Clock.monotonicNanoseconds
            expect(caught { _ = try fe.getFeatures() }, .timeout, containing: "GET_FEATURES: no reply")
            let elapsed = millisecondsSince(start)
            #expect(elapsed >= 190 && elapsed < 2000, "\(elapsed) ms")
            expect(caught { _ = try fe.getFeatures() }, .disconnected, containing: "abandoned")
        }
    }

    @Test func slowPartialReplyTimesOut() throws {
        // A backend that dribbles out a reply slower than the timeout cannot keep us waiting.
        try withDouble("dribble", timeoutMilliseconds: 300, script: script(for: .getFeatures) { m in
            var bytes: [UInt8] = []
            VhostUserHeader(request: m.header.request, flags: 5, size: 8).encode(into: &bytes)
            bytes += VhostUserMessage.u64(1)
            return bytes.flatMap { [BackendDouble.Action.send([$0]), .sleep(milliseconds: 100)] }
        }) { fe in
            let start = Clock.monotonicNanoseconds
            expect(caught { _ = try fe.getFeatures() }, .timeout, containing: "reply incomplete (header:")
            #expect(millisecondsSince(start) < 1500)
        }
    }

    @Test func backendThatStopsReadingCannotBlockSends() throws {
        // The double reads one message and then sleeps; our sends fill the socket buffer and
        // must then time out instead of blocking in sendmsg.
        let first = Once()
        try withDouble("noread", timeoutMilliseconds: 300, script: { _ in
            first.take() ? [.sleep(milliseconds: 3000)] : []
        }) { fe in
            let start = Clock.monotonicNanoseconds
            var error: VhostUserError?
            for _ in 0..<100_000 {
                error = caught { try fe.setVringAddr(0, descriptors: 1, used: 2, avail: 3) }
                if error != nil { break }
            }
            expect(error, .timeout, containing: "not reading its socket")
            #expect(millisecondsSince(start) < 3000)
        }
    }

    @Test func unsolicitedMessageBeforeTheReply() throws {
        // A backend-initiated message on the frontend channel (it has no right to send any).
        try withDouble("unsolicited", script: script(for: .getFeatures) { m in
            [.reply(VhostUserMessage(.getQueueNum, payload: [])), .reply(BackendDouble.reply(to: m, payload: VhostUserMessage.u64(1)))]
        }) { fe in
            expect(caught { _ = try fe.getFeatures() }, .malformed)
        }
    }

    @Test func requestsTheNegotiationDoesNotAllowAreRefusedWithoutTraffic() throws {
        let received = try withDouble("unsupported", script: BackendDouble.wellBehaved) { fe in
            expect(caught { _ = try fe.getProtocolFeatures() }, .unsupported, containing: "before GET_FEATURES")
            expect(caught { try fe.setFeatures(1) }, .unsupported, containing: "before GET_FEATURES")
            _ = try fe.getFeatures()
            expect(caught { try fe.setFeatures(1 << 63) }, .unsupported, containing: "not offered")
            expect(caught { try fe.setProtocolFeatures(VhostUserProtocolFeature.config) }, .unsupported,
                   containing: "before GET_PROTOCOL_FEATURES")
            _ = try fe.getProtocolFeatures()
            expect(caught { try fe.setProtocolFeatures(VhostUserProtocolFeature.status) }, .unsupported, containing: "not offered")
            expect(caught { _ = try fe.getQueueNum() }, .unsupported, containing: "MQ")
            expect(caught { _ = try fe.getMaxMemSlots() }, .unsupported, containing: "CONFIGURE_MEM_SLOTS")
            expect(caught { _ = try fe.getConfig(offset: 0, size: 4) }, .unsupported, containing: "CONFIG")
            let r = VhostUserMemoryRegion(guestPhysicalAddress: 0, size: 4096, userAddress: 4096, mmapOffset: 0)
            expect(caught { try fe.addMemoryRegion(r, fd: 0) }, .unsupported, containing: "CONFIGURE_MEM_SLOTS")
            expect(caught { try fe.removeMemoryRegion(r) }, .unsupported, containing: "CONFIGURE_MEM_SLOTS")
            expect(caught { try fe.setVringEnable(0, true) }, .unsupported, containing: "PROTOCOL_FEATURES")
            try fe.setProtocolFeatures(VhostUserProtocolFeature.config)
            expect(caught { _ = try fe.getConfig(offset: 0, size: 257) }, .unsupported, containing: "257 bytes")
            expect(caught { _ = try fe.getConfig(offset: 0, size: 0) }, .unsupported)
            expect(caught { try fe.setMemTable(Array(repeating: r, count: 9), fds: Array(repeating: 0, count: 9)) },
                   .unsupported, containing: "9 regions")
            expect(caught { try fe.setMemTable([r], fds: []) }, .system)
            expect(caught { try fe.setMemTable([r], fds: [-1]) }, .system)
            let empty = VhostUserMemoryRegion(guestPhysicalAddress: 0, size: 0, userAddress: 0, mmapOffset: 0)
            expect(caught { try fe.setMemTable([empty], fds: [0]) }, .system)
            let wraps = VhostUserMemoryRegion(guestPhysicalAddress: .max - 10, size: 4096, userAddress: 0, mmapOffset: 0)
            expect(caught { try fe.setMemTable([wraps], fds: [0]) }, .system)
            expect(caught { try fe.setVringKick(256, fd: 0) }, .system)
            let fe_failure = fe.failure
            #expect(fe_failure == nil)
        }
        // Only the two GETs and the one SET_PROTOCOL_FEATURES that were allowed went out.
        #expect(received.map(\.message.header.request) == [1, 15, 16])
    }
}
