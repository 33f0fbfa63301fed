import Drivers
import Glibc
import OutboardRings
import OutboardTestSupport
import Testing
import Virtio

/// `VirtioBlkDevice` in-process over the loopback transport: the same source the driver
/// process runs over vhost-user, against a spec-written device that the test steps by hand.
@Suite struct VirtioBlkDeviceTests {
    static let sectors = 2048
    static let dmaIO = IOAddress(rawValue: 0x10_0000_0000)
    static let dataIO = IOAddress(rawValue: 0x20_0000_0000)
    static let features = VirtioFeature.version1 | VirtioBlkFeature.flush | VirtioBlkFeature.discard
        | VirtioBlkFeature.writeZeroes | VirtioBlkFeature.sizeMax | VirtioFeature.ringIndirectDesc | VirtioFeature.ringEventIdx

    /// The device memory area and a data region, both exposed, and a started device.
    struct Rig: ~Copyable {
        var device: VirtioBlkDevice<LoopbackBlkTransport>
        let dma: UnsafeMutableRawBufferPointer
        let data: UnsafeMutableRawBufferPointer

        init(features: UInt64 = VirtioBlkDeviceTests.features, refuse: Bool = false, queueSize: Int = 16) throws {
            let layout = try VirtioBlkLayout(queueSize: queueSize)
            let config = VirtioBlkConfig(capacity: UInt64(VirtioBlkDeviceTests.sectors), sizeMax: 65536,
                                         maxDiscardSectors: 1024, maxDiscardSeg: 1, discardSectorAlignment: 1,
                                         maxWriteZeroesSectors: 1024, maxWriteZeroesSeg: 1)
            let area = UnsafeMutableRawBufferPointer.allocate(byteCount: (layout.byteCount + 4095) & ~4095, alignment: 4096)
            area.initializeMemory(as: UInt8.self, repeating: 0)
            var link = LoopbackBlkTransport(sectors: VirtioBlkDeviceTests.sectors, features: features, config: config, fill: 0xEE)
            link.refusesFeatures = refuse
            let dev = try VirtioBlkDevice(transport: link, memory: area.baseAddress!, size: area.count,
                                          ioAddress: VirtioBlkDeviceTests.dmaIO, queueSize: queueSize)
            device = dev
            dma = area
            data = .allocate(byteCount: 1 << 20, alignment: 4096)
            data.initializeMemory(as: UInt8.self, repeating: 0)
        }

        deinit {
            dma.deallocate()
            data.deallocate()
        }

        /// §3.1.1 through the device, with both regions exposed between the two halves.
        mutating func start() throws -> VirtioBlkInfo {
            let info = try device.negotiate(eventIdx: true, maxTransfer: 1 << 20)
            try device.transport.expose(device.deviceMemory(fd: -1))
            try device.transport.expose(DeviceMemory(ioAddress: VirtioBlkDeviceTests.dataIO, size: data.count,
                                                     base: data.baseAddress!, fd: -1))
            try device.start(notificationsOff: false)
            return info
        }

        /// Submits, publishes, lets the device work, and returns the completions by slot.
        mutating func run(_ requests: [(Int, VirtioBlkRequest)]) -> [Int: VirtioBlkResult] {
            for (slot, r) in requests { check(device.submit(slot: slot, r)) }
            _ = device.publish()
            check(device.transport.process() == requests.count)
            var out: [Int: VirtioBlkResult] = [:]
            while let c = device.nextCompletion() { out[c.slot] = c.status }
            return out
        }
    }

    @Test func negotiatesAndFindsTheDevice() throws {
        var rig = try Rig()
        let info = try rig.start()
        #expect(info.capacity == UInt64(Self.sectors))
        #expect(info.flush && info.discard && info.writeZeroes && !info.readOnly)
        #expect(info.maxTransfer == 65536)  // size_max lowers the driver's limit
        #expect(info.maxDiscardSectors == 1024)
        // Only offered features, VERSION_1 among them; the device saw FEATURES_OK and DRIVER_OK.
        check(rig.device.transport.driverFeatures & ~Self.features == 0)
        check(rig.device.transport.driverFeatures & VirtioFeature.version1 != 0)
        check(rig.device.transport.deviceStatus.contains([.acknowledge, .driver, .featuresOK, .driverOK]))
    }

    @Test func readWriteFlushDiscardAndWriteZeroes() throws {
        var rig = try Rig()
        _ = try rig.start()
        let d = rig.data.baseAddress!
        for i in 0..<8192 { d.storeBytes(of: UInt8(truncatingIfNeeded: i * 7 + 1), toByteOffset: i, as: UInt8.self) }
        // Write 8 KiB at sector 100 from offset 0; read it back into offset 64 KiB.
        var done = rig.run([(3, VirtioBlkRequest(op: .write, sector: 100, buffer: Self.dataIO, length: 8192))])
        #expect(done == [3: .ok])
        check(memcmp(rig.device.transport.disk.baseAddress! + 100 * 512, d, 8192) == 0)
        done = rig.run([(5, VirtioBlkRequest(op: .read, sector: 100, buffer: Self.dataIO.advanced(by: 65536), length: 8192)),
                        (6, VirtioBlkRequest(op: .flush, sector: 0, length: 0))])
        #expect(done == [5: .ok, 6: .ok])
        #expect(memcmp(d + 65536, d, 8192) == 0)
        // Discard sectors 100..103, write zeroes on 104..107: both read back as zeroes
        // (this device forgets discarded sectors as zeroes); sector 108 is untouched.
        done = rig.run([(1, VirtioBlkRequest(op: .discard, sector: 100, length: 2048)),
                        (2, VirtioBlkRequest(op: .writeZeroes, sector: 104, length: 2048))])
        #expect(done == [1: .ok, 2: .ok])
        let disk = rig.device.transport.disk.baseAddress!
        #expect((0..<4096).allSatisfy { disk.load(fromByteOffset: 100 * 512 + $0, as: UInt8.self) == 0 })
        #expect(memcmp(disk + 108 * 512, d + 4096, 4096) == 0)
    }

    @Test func aBufferOutsideExposedMemoryFailsOnlyThatRequest() throws {
        var rig = try Rig()
        _ = try rig.start()
        let done = rig.run([(0, VirtioBlkRequest(op: .read, sector: 0, buffer: IOAddress(rawValue: 0x30_0000_0000), length: 512)),
                            (1, VirtioBlkRequest(op: .read, sector: 0, buffer: Self.dataIO, length: 512))])
        #expect(done == [0: .ioError, 1: .ok])
        check(rig.device.error == nil)
    }

    @Test func aDeviceThatRefusesTheFeaturesIsRefused() throws {
        var rig = try Rig(refuse: true)
        do {
            _ = try rig.device.negotiate(eventIdx: false, maxTransfer: 4096)
            Issue.record("negotiation succeeded")
        } catch {
            check(error.description.contains("unsupported"), "\(error)")
        }
    }

    @Test func aDeviceWithoutVersion1IsRefused() throws {
        var rig = try Rig(features: Self.features & ~VirtioFeature.version1)
        do {
            _ = try rig.device.negotiate(eventIdx: false, maxTransfer: 4096)
            Issue.record("negotiation succeeded")
        } catch {
            check(error.description.contains("unsupported"), "\(error)")
        }
    }

    /// The device returns a head it was never given, a length beyond what the chain can
    /// take, or moves used.idx past what it holds: the queue stops with an error, nothing
    /// is completed on its word, and nothing outside the area is touched.
    @Test(arguments: ["unknown id", "id out of range", "length too long", "index jump"])
    func aHostileUsedRingStopsTheQueue(_ how: String) throws {
        var rig = try Rig()
        _ = try rig.start()
        check(rig.device.submit(slot: 2, VirtioBlkRequest(op: .read, sector: 0, buffer: Self.dataIO, length: 4096)))
        _ = rig.device.publish()
        let chains = rig.device.transport.takeChains()
        #expect(chains.count == 1)
        let head = UInt32(chains[0].head)
        switch how {
        case "unknown id": rig.device.transport.completeRaw(id: (head + 1) % 16, len: 1)
        case "id out of range": rig.device.transport.completeRaw(id: 4000, len: 1)
        case "length too long": rig.device.transport.completeRaw(id: head, len: 4096 + 2)
        default: rig.device.transport.setUsedIndex(5)
        }
        check(rig.device.nextCompletion() == nil)
        check(rig.device.error != nil, "the virtqueue must record the device's error")
        check(rig.device.room == 0, "nothing more is submitted on a failed queue")
        check(!rig.device.submit(slot: 3, VirtioBlkRequest(op: .flush, sector: 0, length: 0)))
    }

    /// A reconnection starts a fresh queue over the same memory, and the same slots can be
    /// submitted again (what the driver does after a device connection was lost).
    @Test func theSameSlotsGoAgainAfterANewStart() throws {
        var rig = try Rig()
        _ = try rig.start()
        check(rig.device.submit(slot: 7, VirtioBlkRequest(op: .read, sector: 1, buffer: Self.dataIO, length: 512)))
        _ = rig.device.publish()
        _ = rig.device.transport.takeChains()  // the device takes it and goes away
        _ = try rig.device.negotiate(eventIdx: true, maxTransfer: 1 << 20)
        try rig.device.start(notificationsOff: false)
        check(rig.device.inFlight == 0)
        let done = rig.run([(7, VirtioBlkRequest(op: .read, sector: 1, buffer: Self.dataIO, length: 512))])
        #expect(done == [7: .ok])
    }
}

/// `#expect` for expressions on non-copyable values (the macro cannot decompose those).
func check(_ condition: Bool, _ comment: Comment? = nil, sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(condition, comment, sourceLocation: sourceLocation)
}
