import Testing
import VhostUser

/// Byte at `offset` of a native (little-endian, x86-64) integer written at `fieldOffset`.
private func field<T: FixedWidthInteger>(_ bytes: [UInt8], at offset: Int, as: T.Type) -> T {
    var v: T = 0
    for i in 0..<MemoryLayout<T>.size { v |= T(bytes[offset + i]) << (8 * i) }
    return v
}

/// The layouts of every payload, pinned to the byte offsets of the vhost-user spec
/// ("Message Specification"), independently of the encoder's code: fields are read back
/// byte by byte at the spec's offsets.
@Suite struct LayoutTests {
    @Test func headerIs12BytesRequestFlagsSize() {
        var b: [UInt8] = []
        VhostUserHeader(request: 0x1122_3344, flags: 0x5566_7788, size: 0x99aa_bbcc).encode(into: &b)
        #expect(b.count == 12 && VhostUserHeader.byteCount == 12)
        #expect(field(b, at: 0, as: UInt32.self) == 0x1122_3344)
        #expect(field(b, at: 4, as: UInt32.self) == 0x5566_7788)
        #expect(field(b, at: 8, as: UInt32.self) == 0x99aa_bbcc)
        #expect(b[0] == 0x44)  // native order on x86-64 is little-endian
        #expect(VhostUserHeader(decoding: b) == VhostUserHeader(request: 0x1122_3344, flags: 0x5566_7788, size: 0x99aa_bbcc))
        #expect(VhostUserHeader(decoding: b.dropLast()) == nil)
    }

    @Test func headerFlagBits() {
        #expect(VhostUserHeader.versionMask == 0x3 && VhostUserHeader.version == 0x1)
        #expect(VhostUserHeader.replyFlag == 0x4 && VhostUserHeader.needReplyFlag == 0x8)
        let m = VhostUserMessage(.setOwner, needReply: true)
        #expect(m.header.flags == 0x9 && m.header.size == 0 && m.header.request == 3)
        #expect(VhostUserMessage(.getFeatures).header.flags == 0x1)
    }

    @Test func u64Payload() {
        let b = VhostUserMessage.u64(0x0102_0304_0506_0708)
        #expect(b == [8, 7, 6, 5, 4, 3, 2, 1])
    }

    @Test func vringStateIsIndexThenNum() {
        let b = VhostUserVringState(index: 0xa1a2_a3a4, num: 0xb1b2_b3b4).encoded
        #expect(b.count == 8 && VhostUserVringState.byteCount == 8)
        #expect(field(b, at: 0, as: UInt32.self) == 0xa1a2_a3a4)
        #expect(field(b, at: 4, as: UInt32.self) == 0xb1b2_b3b4)
        #expect(VhostUserVringState(decoding: b) == VhostUserVringState(index: 0xa1a2_a3a4, num: 0xb1b2_b3b4))
        #expect(VhostUserVringState(decoding: b + [0]) == nil)
    }

    @Test func vringAddressIs40Bytes() {
        let a = VhostUserVringAddress(index: 3, flags: VhostUserVringAddress.logFlag, descriptor: 0x1111_0000_0000_1111,
                                      used: 0x2222_0000_0000_2222, available: 0x3333_0000_0000_3333,
                                      log: 0x4444_0000_0000_4444)
        let b = a.encoded
        #expect(b.count == 40 && VhostUserVringAddress.byteCount == 40)
        #expect(field(b, at: 0, as: UInt32.self) == 3)
        #expect(field(b, at: 4, as: UInt32.self) == 1)
        #expect(field(b, at: 8, as: UInt64.self) == 0x1111_0000_0000_1111)
        #expect(field(b, at: 16, as: UInt64.self) == 0x2222_0000_0000_2222)
        #expect(field(b, at: 24, as: UInt64.self) == 0x3333_0000_0000_3333)
        #expect(field(b, at: 32, as: UInt64.self) == 0x4444_0000_0000_4444)
        #expect(VhostUserVringAddress(decoding: b) == a)
    }

    @Test func vringFileIndexAndNoDescriptorBit() {
        #expect(VhostUserVringFile(index: 5, hasDescriptor: true).value == 5)
        #expect(VhostUserVringFile(index: 5, hasDescriptor: false).value == 0x105)
        #expect(VhostUserVringFile(value: 0x1ff) == VhostUserVringFile(index: 255, hasDescriptor: false))
        #expect(VhostUserVringFile(value: 0x200) == nil)
    }

    @Test func memoryRegionIs32Bytes() {
        let r = VhostUserMemoryRegion(guestPhysicalAddress: 0xa, size: 0xb, userAddress: 0xc, mmapOffset: 0xd)
        var b: [UInt8] = []
        r.encode(into: &b)
        #expect(b.count == 32 && VhostUserMemoryRegion.byteCount == 32)
        #expect(field(b, at: 0, as: UInt64.self) == 0xa)
        #expect(field(b, at: 8, as: UInt64.self) == 0xb)
        #expect(field(b, at: 16, as: UInt64.self) == 0xc)
        #expect(field(b, at: 24, as: UInt64.self) == 0xd)
    }

    @Test func memoryTableIsCountPaddingRegions() {
        var regions: [VhostUserMemoryRegion] = []
        for i in UInt64(0)..<3 {
            let user: UInt64 = 0x7f00_0000_0000 + (i << 20)
            regions.append(VhostUserMemoryRegion(guestPhysicalAddress: i << 32, size: 0x1000 * (i + 1),
                                                 userAddress: user, mmapOffset: i * 512))
        }
        let b = VhostUserMemoryTable(regions: regions).encoded
        #expect(VhostUserMemoryTable.headerByteCount == 8)
        #expect(VhostUserMemoryTable.fullByteCount == 264)  // the C struct: 8 + 8 * 32
        #expect(b.count == 8 + 3 * 32)
        #expect(field(b, at: 0, as: UInt32.self) == 3)
        #expect(field(b, at: 4, as: UInt32.self) == 0)
        for i in 0..<3 {
            let o = 8 + 32 * i
            #expect(field(b, at: o, as: UInt64.self) == regions[i].guestPhysicalAddress)
            #expect(field(b, at: o + 8, as: UInt64.self) == regions[i].size)
            #expect(field(b, at: o + 16, as: UInt64.self) == regions[i].userAddress)
            #expect(field(b, at: o + 24, as: UInt64.self) == regions[i].mmapOffset)
        }
        #expect(VhostUserMemoryTable(decoding: b)?.regions == regions)
        // The full 264-byte form of the C struct decodes to the same regions.
        #expect(VhostUserMemoryTable(decoding: b + [UInt8](repeating: 0, count: 5 * 32))?.regions == regions)
        // More than 8 regions, or a count the bytes do not cover, is refused.
        var nine = b
        nine[0] = 9
        #expect(VhostUserMemoryTable(decoding: nine) == nil)
        #expect(VhostUserMemoryTable(decoding: Array(b.dropLast())) == nil)
    }

    @Test func singleMemoryRegionIsPaddingThenRegion() {
        let r = VhostUserMemoryRegion(guestPhysicalAddress: 0x1_0000_0000, size: 0x20_0000, userAddress: 0x7f12_3456_0000,
                                      mmapOffset: 0x1000)
        let b = VhostUserSingleMemoryRegion(r).encoded
        #expect(b.count == 40 && VhostUserSingleMemoryRegion.byteCount == 40)
        #expect(field(b, at: 0, as: UInt64.self) == 0)
        #expect(field(b, at: 8, as: UInt64.self) == r.guestPhysicalAddress)
        #expect(field(b, at: 16, as: UInt64.self) == r.size)
        #expect(field(b, at: 24, as: UInt64.self) == r.userAddress)
        #expect(field(b, at: 32, as: UInt64.self) == r.mmapOffset)
        #expect(VhostUserSingleMemoryRegion(decoding: b)?.region == r)
    }

    @Test func configSpaceIsOffsetSizeFlagsData() {
        let c = VhostUserConfigSpace(offset: 20, flags: 1, data: [9, 8, 7, 6, 5])
        let b = c.encoded
        #expect(VhostUserConfigSpace.headerByteCount == 12)
        #expect(b.count == 17)
        #expect(field(b, at: 0, as: UInt32.self) == 20)
        #expect(field(b, at: 4, as: UInt32.self) == 5)
        #expect(field(b, at: 8, as: UInt32.self) == 1)
        #expect(Array(b[12...]) == [9, 8, 7, 6, 5])
        #expect(VhostUserConfigSpace(decoding: b) == c)
        #expect(VhostUserConfigSpace(decoding: Array(b.dropLast())) == nil)  // size field says 5
    }

    @Test func messageIsHeaderThenPayload() {
        let m = VhostUserMessage(.setVringNum, payload: VhostUserVringState(index: 0, num: 256).encoded)
        let b = m.encoded
        #expect(b.count == 20)
        #expect(field(b, at: 0, as: UInt32.self) == 8)
        #expect(field(b, at: 4, as: UInt32.self) == 1)
        #expect(field(b, at: 8, as: UInt32.self) == 8)
        #expect(field(b, at: 16, as: UInt32.self) == 256)
        let decoded = VhostUserMessage.decode(b + [0xee])
        #expect(decoded?.message == m && decoded?.consumed == 20)
        #expect(VhostUserMessage.decode(Array(b.dropLast())) == nil)
        // A size field past the limit is refused from the header alone.
        var huge = b
        huge.replaceSubrange(8..<12, with: [0xff, 0xff, 0xff, 0xff])
        #expect(VhostUserMessage.decode(huge) == nil)
    }

    @Test func requestCodesFollowTheSpec() {
        let expected: [(VhostUserRequest, UInt32)] = [
            (.getFeatures, 1), (.setFeatures, 2), (.setOwner, 3), (.setMemTable, 5), (.setVringNum, 8),
            (.setVringAddr, 9), (.setVringBase, 10), (.getVringBase, 11), (.setVringKick, 12), (.setVringCall, 13),
            (.getProtocolFeatures, 15), (.setProtocolFeatures, 16), (.getQueueNum, 17), (.setVringEnable, 18),
            (.getConfig, 24), (.getMaxMemSlots, 36), (.addMemoryRegion, 37), (.removeMemoryRegion, 38),
        ]
        for (r, code) in expected { #expect(r.rawValue == code, "\(r)") }
        #expect(VhostUserRequest.addMemoryRegion.description == "ADD_MEM_REG")
    }

    @Test func protocolFeatureBitsFollowTheSpec() {
        #expect(VhostUserProtocolFeature.multiQueue == 1 << 0)
        #expect(VhostUserProtocolFeature.logShmfd == 1 << 1)
        #expect(VhostUserProtocolFeature.replyAck == 1 << 3)
        #expect(VhostUserProtocolFeature.backendRequest == 1 << 5)
        #expect(VhostUserProtocolFeature.config == 1 << 9)
        #expect(VhostUserProtocolFeature.inflightShmfd == 1 << 12)
        #expect(VhostUserProtocolFeature.configureMemSlots == 1 << 15)
        #expect(VhostUserProtocolFeature.status == 1 << 16)
        #expect(VhostUserFeature.protocolFeatures == 1 << 30)
    }
}

/// The reply checks, without a socket: each way a reply can be wrong, and the right ones.
@Suite struct ReplyCheckTests {
    private func reply(_ r: VhostUserRequest, flags: UInt32 = 0x5, size: Int) -> VhostUserHeader {
        VhostUserHeader(request: r.rawValue, flags: flags, size: UInt32(size))
    }

    private func checkError(_ shape: VhostUserExpectedReply, _ h: VhostUserHeader, _ r: VhostUserRequest,
                            descriptors: Int = 0) -> VhostUserError? {
        do {
            _ = try shape.check(h, answering: r, descriptors: descriptors)
            return nil
        } catch { return error }
    }

    @Test func goodHeadersGiveThePayloadSize() throws {
        #expect(try VhostUserExpectedReply.u64.check(reply(.getFeatures, size: 8), answering: .getFeatures, descriptors: 0) == 8)
        #expect(try VhostUserExpectedReply.ack.check(reply(.setOwner, flags: 0xd, size: 8), answering: .setOwner, descriptors: 0) == 8)
        #expect(try VhostUserExpectedReply.vringState(index: 0).check(reply(.getVringBase, size: 8), answering: .getVringBase, descriptors: 0) == 8)
        #expect(try VhostUserExpectedReply.config(offset: 0, size: 60).check(reply(.getConfig, size: 72), answering: .getConfig, descriptors: 0) == 72)
        #expect(try VhostUserExpectedReply.config(offset: 0, size: 60).check(reply(.getConfig, size: 0), answering: .getConfig, descriptors: 0) == 0)
    }

    @Test func badHeadersAreMalformed() {
        let cases: [(VhostUserExpectedReply, VhostUserHeader, VhostUserRequest, Int, String)] = [
            (.u64, reply(.getProtocolFeatures, size: 8), .getFeatures, 0, "reply to GET_PROTOCOL_FEATURES"),
            (.u64, reply(.getFeatures, flags: 0x1, size: 8), .getFeatures, 0, "REPLY flag"),
            (.u64, reply(.getFeatures, flags: 0x6, size: 8), .getFeatures, 0, "version"),
            (.u64, reply(.getFeatures, flags: 0x15, size: 8), .getFeatures, 0, "unknown flags"),
            (.u64, reply(.getFeatures, size: 4), .getFeatures, 0, "4 bytes"),
            (.u64, VhostUserHeader(request: 1, flags: 5, size: .max), .getFeatures, 0, "4294967295 bytes"),
            (.u64, reply(.getFeatures, size: 8), .getFeatures, 2, "2 unexpected descriptor"),
            (.ack, reply(.setOwner, size: 0), .setOwner, 0, "0 bytes"),
            (.vringState(index: 0), reply(.getVringBase, size: 16), .getVringBase, 0, "16 bytes"),
            (.config(offset: 0, size: 60), reply(.getConfig, size: 60), .getConfig, 0, "expected 72"),
            (.u64, VhostUserHeader(request: 999, flags: 5, size: 8), .getFeatures, 0, "request 999"),
        ]
        for (shape, header, request, fds, text) in cases {
            let e = checkError(shape, header, request, descriptors: fds)
            if case .malformedReply(let why)? = e {
                #expect(why.contains(text), "\(why)")
            } else {
                Issue.record("expected malformedReply containing \(text), got \(String(describing: e))")
            }
        }
    }

    @Test func payloadDecoding() throws {
        #expect(try VhostUserExpectedReply.u64.decode(VhostUserMessage.u64(42), answering: .getQueueNum) == .u64(42))
        #expect(try VhostUserExpectedReply.ack.decode(VhostUserMessage.u64(0), answering: .setOwner) == VhostUserReplyValue.none)
        #expect(throws: VhostUserError.rejected(request: "SET_OWNER", code: 7)) {
            try VhostUserExpectedReply.ack.decode(VhostUserMessage.u64(7), answering: .setOwner)
        }
        let state = VhostUserVringState(index: 2, num: 9).encoded
        #expect(try VhostUserExpectedReply.vringState(index: 2).decode(state, answering: .getVringBase)
            == .vringState(VhostUserVringState(index: 2, num: 9)))
        #expect(throws: VhostUserError.self) {
            try VhostUserExpectedReply.vringState(index: 1).decode(state, answering: .getVringBase)
        }
        let config = VhostUserConfigSpace(offset: 4, data: [1, 2, 3, 4]).encoded
        #expect(try VhostUserExpectedReply.config(offset: 4, size: 4).decode(config, answering: .getConfig) == .config([1, 2, 3, 4]))
        // Echoed offset or size that is not what was asked: malformed.
        #expect(throws: VhostUserError.self) {
            try VhostUserExpectedReply.config(offset: 0, size: 4).decode(config, answering: .getConfig)
        }
        // An empty payload is the spec's refusal.
        #expect(throws: VhostUserError.rejected(request: "GET_CONFIG", code: 0)) {
            try VhostUserExpectedReply.config(offset: 0, size: 4).decode([], answering: .getConfig)
        }
    }

    /// Random headers and payloads never crash the checks: everything either passes the
    /// checks with a consistent size or is refused with a malformedReply/rejected error.
    @Test func randomRepliesNeverCrash() {
        var rng = SplitMix(seed: 0x5eed)
        let shapes: [(VhostUserExpectedReply, VhostUserRequest)] = [
            (.u64, .getFeatures), (.ack, .setMemTable), (.vringState(index: 1), .getVringBase),
            (.config(offset: 0, size: 60), .getConfig),
        ]
        for _ in 0..<20_000 {
            let (shape, request) = shapes[Int(rng.next() % UInt64(shapes.count))]
            let pick = rng.next()
            let header = VhostUserHeader(
                request: pick & 1 == 0 ? request.rawValue : UInt32(truncatingIfNeeded: rng.next() % 64),
                flags: pick & 2 == 0 ? 0x5 : UInt32(truncatingIfNeeded: rng.next()),
                size: pick & 4 == 0 ? UInt32(rng.next() % 80) : UInt32(truncatingIfNeeded: rng.next()))
            do {
                let n = try shape.check(header, answering: request, descriptors: Int(pick >> 60 & 1))
                #expect(n == Int(header.size))
                let payload = (0..<n).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
                _ = try shape.decode(payload, answering: request)
            } catch {
                switch error {
                case .malformedReply, .rejected: break
                default: Issue.record("unexpected \(error)")
                }
            }
        }
    }
}

struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}
