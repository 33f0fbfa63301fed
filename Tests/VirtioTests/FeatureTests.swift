import Testing
import Virtio

@Suite struct FeatureTests {
    /// Bit numbers from virtio 1.2 §6 and §5.2.3.
    @Test func bitsMatchTheSpec() {
        #expect(VirtioFeature.notifyOnEmpty == 1 << 24)
        #expect(VirtioFeature.anyLayout == 1 << 27)
        #expect(VirtioFeature.ringIndirectDesc == 1 << 28)
        #expect(VirtioFeature.ringEventIdx == 1 << 29)
        #expect(VirtioFeature.version1 == 1 << 32)
        #expect(VirtioFeature.accessPlatform == 1 << 33)
        #expect(VirtioFeature.ringPacked == 1 << 34)
        #expect(VirtioFeature.inOrder == 1 << 35)
        #expect(VirtioFeature.ringReset == 1 << 40)
        let blk: [UInt64] = [VirtioBlkFeature.sizeMax, VirtioBlkFeature.segMax, VirtioBlkFeature.geometry,
                             VirtioBlkFeature.readOnly, VirtioBlkFeature.blkSize, VirtioBlkFeature.flush,
                             VirtioBlkFeature.topology, VirtioBlkFeature.configWCE, VirtioBlkFeature.multiQueue,
                             VirtioBlkFeature.discard, VirtioBlkFeature.writeZeroes]
        #expect(blk == [1, 2, 4, 5, 6, 9, 10, 11, 12, 13, 14].map { UInt64(1) << $0 })
        #expect(VirtioBlkRequestType.read == 0 && VirtioBlkRequestType.write == 1 && VirtioBlkRequestType.flush == 4)
        #expect(VirtioBlkRequestType.getID == 8 && VirtioBlkRequestType.discard == 11 && VirtioBlkRequestType.writeZeroes == 13)
        #expect(VirtioBlkStatus.ok == 0 && VirtioBlkStatus.ioError == 1 && VirtioBlkStatus.unsupported == 2)
    }

    @Test func acceptsTheIntersection() throws {
        // What QEMU 7.2's vhost-user-blk export offers (plus PROTOCOL_FEATURES, bit 30).
        let offered = VirtioFeature.version1 | VirtioFeature.ringIndirectDesc | VirtioFeature.ringEventIdx
            | VirtioBlkFeature.sizeMax | VirtioBlkFeature.segMax | VirtioBlkFeature.topology
            | VirtioBlkFeature.blkSize | VirtioBlkFeature.flush | VirtioBlkFeature.discard
            | VirtioBlkFeature.writeZeroes | VirtioBlkFeature.configWCE | VirtioBlkFeature.multiQueue | 1 << 30
        let wanted = VirtioFeature.version1 | VirtioFeature.ringIndirectDesc | VirtioFeature.ringEventIdx
            | VirtioBlkFeature.flush | VirtioBlkFeature.readOnly | VirtioFeature.ringPacked
        let got = try FeatureNegotiation.negotiate(offered: offered, wanted: wanted, required: VirtioFeature.version1)
        #expect(got == VirtioFeature.version1 | VirtioFeature.ringIndirectDesc | VirtioFeature.ringEventIdx
                | VirtioBlkFeature.flush)
    }

    @Test func missingRequiredFeaturesAreNamed() {
        let required = VirtioFeature.version1 | VirtioBlkFeature.flush | VirtioBlkFeature.segMax
        #expect(throws: VirtioError.missingFeatures(VirtioFeature.version1 | VirtioBlkFeature.flush)) {
            try FeatureNegotiation.negotiate(offered: VirtioBlkFeature.segMax | VirtioBlkFeature.readOnly,
                                             wanted: required, required: required)
        }
    }

    @Test func requiredBitsAreAcceptedEvenIfNotListedAsWanted() throws {
        let got = try FeatureNegotiation.negotiate(offered: 0b1111, wanted: 0b0001, required: 0b0100)
        #expect(got == 0b0101)
    }

    @Test func neverAcceptsAnythingNotOffered() throws {
        var rng = SplitMix(seed: 7)
        for _ in 0..<10_000 {
            let offered = rng.next(), wanted = rng.next()
            let required = rng.next() & rng.next() & rng.next()
            do {
                let got = try FeatureNegotiation.negotiate(offered: offered, wanted: wanted, required: required)
                #expect(got & ~offered == 0)
                #expect(got & required == required)
                #expect(got == offered & (wanted | required))
            } catch {
                #expect(error == .missingFeatures(required & ~offered))
                #expect(required & ~offered != 0)
            }
        }
    }
}
