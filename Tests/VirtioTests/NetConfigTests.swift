import Testing
import Virtio

/// virtio-net (§5.1): the configuration space and the header, built by hand byte by byte.
@Suite struct NetConfigTests {
    static let all = VirtioNetFeature.mac | VirtioNetFeature.status | VirtioNetFeature.multiQueue | VirtioNetFeature.mtu

    /// mac 52:54:00:12:34:56, status LINK_UP, 4 queue pairs, mtu 9000 (§5.1.4 offsets).
    static let handBuilt: [UInt8] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x01, 0x00, 0x04, 0x00, 0x28, 0x23]

    @Test func parsesEachFieldOnlyWithItsFeature() throws {
        let c = try VirtioNetConfig.parse(Self.handBuilt, features: Self.all)
        #expect(c == VirtioNetConfig(mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56], status: 1, maxQueuePairs: 4, mtu: 9000))
        #expect(c.encoded() == Self.handBuilt)
        #expect(try VirtioNetConfig.parse(Self.handBuilt, features: VirtioNetFeature.mtu) == VirtioNetConfig(mtu: 9000))
        #expect(try VirtioNetConfig.parse([], features: 0) == VirtioNetConfig())
        // A device without MTU may have a shorter space: the fields asked for are enough.
        #expect(try VirtioNetConfig.parse(Array(Self.handBuilt[0..<6]), features: VirtioNetFeature.mac).mac?.count == 6)
    }

    @Test(arguments: [
        ("short", [UInt8](handBuilt[0..<10]), all),
        ("group mac", [0x01] + [UInt8](handBuilt[1...]), VirtioNetFeature.mac),
        ("status bits", [UInt8](handBuilt[0..<6]) + [0x04, 0x00], VirtioNetFeature.status),
        ("zero pairs", [UInt8](handBuilt[0..<8]) + [0x00, 0x00], VirtioNetFeature.multiQueue),
        ("too many pairs", [UInt8](handBuilt[0..<8]) + [0x01, 0x80], VirtioNetFeature.multiQueue),
        ("tiny mtu", [UInt8](handBuilt[0..<10]) + [67, 0], VirtioNetFeature.mtu),
    ])
    func refusesImpossibleFields(_ why: String, _ bytes: [UInt8], _ features: UInt64) {
        #expect(throws: VirtioError.self, "\(why)") { try VirtioNetConfig.parse(bytes, features: features) }
    }

    /// §5.1.6: u8 flags, u8 gso_type, le16 hdr_len, gso_size, csum_start, csum_offset,
    /// num_buffers.
    @Test func theHeaderIsTwelveLittleEndianBytes() {
        let h = VirtioNetHeader(flags: 1, gsoType: 4, hdrLen: 0x0102, gsoSize: 0x0304, csumStart: 0x0506,
                                csumOffset: 0x0708, numBuffers: 0x090A)
        let wire: [UInt8] = [1, 4, 0x02, 0x01, 0x04, 0x03, 0x06, 0x05, 0x08, 0x07, 0x0A, 0x09]
        #expect(h.encoded == wire)
        let back = wire.withUnsafeBytes { VirtioNetHeader(loadingFrom: $0.baseAddress!) }
        #expect(back == h)
        #expect(VirtioNetHeader().encoded == [UInt8](repeating: 0, count: 12))
    }
}
