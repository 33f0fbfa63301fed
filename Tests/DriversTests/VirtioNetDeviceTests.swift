import Drivers
import Glibc
import OutboardRings
import OutboardTestSupport
import Testing
import Virtio

/// `VirtioNetDevice` in-process over the loopback transport: the same source the driver
/// runs over vhost-user, against a spec-written device the test steps by hand.
@Suite struct VirtioNetDeviceTests {
    static let dmaIO = IOAddress(rawValue: 0x10_0000_0000)
    static let dataIO = IOAddress(rawValue: 0x20_0000_0000)
    static let bufferSize = 2048
    static let deviceMAC: [UInt8] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]
    static let fallbackMAC: [UInt8] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01]
    static let features = VirtioFeature.version1 | VirtioNetFeature.mac | VirtioNetFeature.mtu | VirtioNetFeature.status
        | VirtioNetFeature.mrgRxbuf | VirtioFeature.ringIndirectDesc | VirtioFeature.ringEventIdx
        | VirtioNetFeature.csum | VirtioNetFeature.guestCsum | VirtioNetFeature.hostTSO4 | VirtioNetFeature.ctrlVQ
        | VirtioNetFeature.multiQueue
    static let config = VirtioNetConfig(mac: deviceMAC, status: VirtioNetStatus.linkUp, maxQueuePairs: 4, mtu: 9000)

    /// The device memory area and a data region (one 2 KiB buffer per slot: receive slots
    /// first, then transmit slots), both exposed, and a started device.
    struct Rig: ~Copyable {
        var device: VirtioNetDevice<LoopbackNetTransport>
        let dma: UnsafeMutableRawBufferPointer
        let data: UnsafeMutableRawBufferPointer
        let queueSize: Int

        init(features: UInt64 = VirtioNetDeviceTests.features, config: VirtioNetConfig? = VirtioNetDeviceTests.config,
             refuse: Bool = false, queueSize: Int = 16) throws {
            let layout = try VirtioNetLayout(queueSize: queueSize)
            let area = UnsafeMutableRawBufferPointer.allocate(byteCount: layout.byteCount, alignment: 4096)
            area.initializeMemory(as: UInt8.self, repeating: 0)
            var link = LoopbackNetTransport(features: features, config: config)
            link.refusesFeatures = refuse
            device = try VirtioNetDevice(transport: link, memory: area.baseAddress!, size: area.count,
                                         ioAddress: VirtioNetDeviceTests.dmaIO, queueSize: queueSize)
            dma = area
            data = .allocate(byteCount: 2 * queueSize * VirtioNetDeviceTests.bufferSize, alignment: 4096)
            data.initializeMemory(as: UInt8.self, repeating: 0)
            self.queueSize = queueSize
        }

        deinit {
            dma.deallocate()
            data.deallocate()
        }

        mutating func start(eventIdx: Bool = true, notificationsOff: Bool = false) throws -> VirtioNetInfo {
            let info = try device.negotiate(eventIdx: eventIdx, fallbackMAC: VirtioNetDeviceTests.fallbackMAC, fallbackMTU: 1500)
            try device.transport.expose(device.deviceMemory(fd: -1))
            try device.transport.expose(DeviceMemory(ioAddress: VirtioNetDeviceTests.dataIO, size: data.count,
                                                     base: data.baseAddress!, fd: -1))
            try device.start(notificationsOff: notificationsOff)
            return info
        }

        func rxOffset(_ slot: Int) -> Int { slot * VirtioNetDeviceTests.bufferSize }
        func txOffset(_ slot: Int) -> Int { (queueSize + slot) * VirtioNetDeviceTests.bufferSize }
        func rxBuffer(_ slot: Int) -> IOAddress { VirtioNetDeviceTests.dataIO.advanced(by: rxOffset(slot)) }
        func txBuffer(_ slot: Int) -> IOAddress { VirtioNetDeviceTests.dataIO.advanced(by: txOffset(slot)) }

        mutating func post(_ slots: Range<Int>) {
            for s in slots { check(device.postReceive(slot: s, buffer: rxBuffer(s), length: UInt32(VirtioNetDeviceTests.bufferSize))) }
            _ = device.publish(.receive)
        }

        func bytes(at offset: Int, _ count: Int) -> [UInt8] {
            Array(UnsafeRawBufferPointer(rebasing: data[offset..<(offset + count)]))
        }

        /// Everything the device returned on the receive queue now.
        mutating func drain() -> [VirtioNetReceived] {
            var out: [VirtioNetReceived] = []
            while let r = device.nextReceived() { out.append(r) }
            return out
        }
    }

    /// A frame: destination, source, EtherType 0x88B5 (local experimental), then a payload
    /// that names the frame.
    static func frame(_ n: Int, length: Int) -> [UInt8] {
        var f = [UInt8](repeating: 0, count: length)
        for i in 0..<6 { f[i] = deviceMAC[i]; f[6 + i] = fallbackMAC[i] }
        f[12] = 0x88; f[13] = 0xB5
        for i in 14..<length { f[i] = UInt8(truncatingIfNeeded: n &* 131 &+ i &* 7) }
        return f
    }

    @Test func negotiatesFromTheConfigurationSpace() throws {
        var rig = try Rig()
        let info = try rig.start()
        #expect(info.mac == Self.deviceMAC && info.macFromDevice)
        #expect(info.mtu == 9000 && info.mtuFromDevice)
        #expect(info.linkUp == true)
        #expect(info.headerSize == 12)
        #expect(info.mergeableBuffers && info.eventIdx && info.indirect)
        #expect(info.maxFrameLength == 9018)
        // Only what the driver can use: no offloads, no control queue, no MQ.
        let accepted = rig.device.transport.driverFeatures
        let expected = VirtioFeature.version1 | VirtioNetFeature.mac | VirtioNetFeature.mtu | VirtioNetFeature.status
            | VirtioNetFeature.mrgRxbuf | VirtioFeature.ringIndirectDesc | VirtioFeature.ringEventIdx
        check(accepted == expected, "accepted 0x\(String(accepted, radix: 16))")
        check(rig.device.transport.deviceStatus.contains([.acknowledge, .driver, .featuresOK, .driverOK]))
        check(rig.device.transport.enabled == [true, true])
    }

    /// DPDK's vhost backend: no configuration space. MAC and MTU come from the fallback,
    /// and the configuration features are not accepted even where offered.
    @Test func withoutConfigurationSpaceTheFallbackDecides() throws {
        var rig = try Rig(config: nil)
        let info = try rig.start(eventIdx: false)
        #expect(info.mac == Self.fallbackMAC && !info.macFromDevice)
        #expect(info.mtu == 1500 && !info.mtuFromDevice)
        #expect(info.linkUp == nil)
        #expect(!info.eventIdx)
        check(rig.device.transport.driverFeatures & (VirtioNetFeature.mac | VirtioNetFeature.mtu | VirtioNetFeature.status) == 0)
        // No MAC from anywhere: refused.
        var bare = try Rig(config: nil)
        for mac in [nil, [0x01, 0, 0, 0, 0, 1] as [UInt8]] {
            do {
                _ = try bare.device.negotiate(eventIdx: false, fallbackMAC: mac, fallbackMTU: nil)
                Issue.record("negotiation succeeded with MAC \(String(describing: mac))")
            } catch {
                check(error.description.contains("setup"), "\(error)")
            }
        }
    }

    @Test(arguments: ["no version 1", "refuses", "group mac", "tiny mtu"])
    func aDeviceItCannotUseIsRefused(_ how: String) throws {
        var rig: Rig
        switch how {
        case "no version 1": rig = try Rig(features: Self.features & ~VirtioFeature.version1)
        case "refuses": rig = try Rig(refuse: true)
        case "group mac": rig = try Rig(config: VirtioNetConfig(mac: [0x33, 0x33, 0, 0, 0, 1], status: 1, mtu: 1500))
        default: rig = try Rig(config: VirtioNetConfig(mac: Self.deviceMAC, status: 1, mtu: 20))
        }
        do {
            _ = try rig.device.negotiate(eventIdx: false, fallbackMAC: Self.fallbackMAC, fallbackMTU: nil)
            Issue.record("negotiation succeeded")
        } catch {
            let expected = how.hasSuffix("mtu") || how.hasSuffix("mac") ? "device error" : "unsupported"
            check(error.description.contains(expected), "\(error)")
        }
    }

    /// Receive: each chain is the slot's header in the device area and the caller's
    /// buffer, both device-writable; frames of 64 and 1518 bytes land in the caller's
    /// buffers, and the length excludes the header.
    @Test(arguments: [true, false])
    func receivesIntoTheCallersBuffers(indirect: Bool) throws {
        var rig = try Rig(features: indirect ? Self.features : Self.features & ~VirtioFeature.ringIndirectDesc)
        let info = try rig.start()
        #expect(info.indirect == indirect)
        rig.post(0..<4)
        let chains = rig.device.transport.takeChains(0)
        #expect(chains.count == 4)
        for (k, c) in chains.enumerated() {
            #expect(c.buffers.count == 2)
            #expect(c.buffers.allSatisfy { $0.deviceWritable })
            #expect(c.buffers[0].length == 12)
            #expect(c.buffers[0].address.rawValue >= Self.dmaIO.rawValue
                    && c.buffers[0].address.rawValue < Self.dmaIO.rawValue + UInt64(rig.device.layout.byteCount))
            #expect(c.buffers[1] == VirtqBuffer(address: rig.rxBuffer(k), length: UInt32(Self.bufferSize), deviceWritable: true))
        }
        // A new start: the device forgets the chains, the slots go again.
        _ = try rig.start()
        rig.post(0..<4)
        let lengths = [64, 1518, 64, 1518]
        for (n, l) in lengths.enumerated() { check(rig.device.transport.receive(Self.frame(n, length: l))) }
        let got = rig.drain()
        #expect(got.map(\.slot) == [0, 1, 2, 3])
        #expect(got.map(\.length) == lengths.map(UInt32.init))
        #expect(got.allSatisfy { $0.status == .ok })
        for (n, l) in lengths.enumerated() { #expect(rig.bytes(at: rig.rxOffset(n), l) == Self.frame(n, length: l)) }
        #expect(rig.device.counters.received == 4)
        #expect(rig.device.counters.receiveDropped == 0)
    }

    /// Transmit: each chain is the slot's zeroed header and the caller's frame, both
    /// device-readable, and the slot comes back once the device is done.
    @Test func transmitsFromTheCallersBuffers() throws {
        var rig = try Rig()
        let info = try rig.start()
        let lengths = [64, 1518, 60]
        for (s, l) in lengths.enumerated() {
            let f = Self.frame(100 + s, length: l)
            f.withUnsafeBytes { rig.data.baseAddress!.advanced(by: rig.txOffset(s)).copyMemory(from: $0.baseAddress!, byteCount: l) }
        }
        for (s, l) in lengths.enumerated() {
            check(rig.device.transmit(slot: s, buffer: rig.txBuffer(s), length: UInt32(l)))
        }
        // Longer than the MTU allows, shorter than an Ethernet header: refused, nothing queued.
        check(!rig.device.transmit(slot: 5, buffer: rig.txBuffer(5), length: UInt32(info.maxFrameLength + 1)))
        check(!rig.device.transmit(slot: 5, buffer: rig.txBuffer(5), length: 13))
        // A slot already at the device is refused.
        check(!rig.device.transmit(slot: 0, buffer: rig.txBuffer(0), length: 64))
        _ = rig.device.publish(.transmit)
        let sent = rig.device.transport.transmitted()
        #expect(sent.map(\.frame.count) == [64, 1518, 60])
        for (s, t) in sent.enumerated() {
            #expect(t.header == VirtioNetHeader())
            #expect(t.frame == Self.frame(100 + s, length: t.frame.count))
        }
        var done: [Int] = []
        while let s = rig.device.nextTransmitted() { done.append(s) }
        #expect(done == [0, 1, 2])
        #expect(rig.device.counters.transmitted == 3)
        check(rig.device.transmit(slot: 0, buffer: rig.txBuffer(0), length: 64))
    }

    /// Full queues: posting stops at the ring's capacity (a chain per descriptor with
    /// indirect tables, two descriptors per chain without) and goes on as slots return; a
    /// device without receive buffers drops frames.
    @Test(arguments: [true, false])
    func fullQueuesRefuseAndRecover(indirect: Bool) throws {
        var rig = try Rig(features: indirect ? Self.features : Self.features & ~VirtioFeature.ringIndirectDesc)
        _ = try rig.start()
        let capacity = indirect ? rig.queueSize : rig.queueSize / 2
        #expect(rig.device.receiveRoom == capacity)
        #expect(rig.device.transmitRoom == capacity)
        rig.post(0..<capacity)
        #expect(rig.device.receiveRoom == 0)
        if capacity < rig.queueSize {
            check(!rig.device.postReceive(slot: capacity, buffer: rig.rxBuffer(capacity), length: 2048))
        }
        for s in 0..<capacity { check(rig.device.transmit(slot: s, buffer: rig.txBuffer(s), length: 64)) }
        #expect(rig.device.transmitRoom == 0)
        if capacity < rig.queueSize { check(!rig.device.transmit(slot: capacity, buffer: rig.txBuffer(capacity), length: 64)) }
        _ = rig.device.publish(.transmit)
        for n in 0..<capacity { check(rig.device.transport.receive(Self.frame(n, length: 64))) }
        check(!rig.device.transport.receive(Self.frame(99, length: 64)), "no receive buffer left: the device drops")
        #expect(rig.drain().count == capacity)
        #expect(rig.device.receiveRoom == capacity)
        #expect(rig.device.transport.transmitted().count == capacity)
        var back = 0
        while rig.device.nextTransmitted() != nil { back += 1 }
        #expect(back == capacity)
        #expect(rig.device.transmitRoom == capacity)
        rig.post(0..<capacity)
        check(rig.device.transport.receive(Self.frame(7, length: 1518)))
        #expect(rig.drain() == [VirtioNetReceived(slot: 0, length: 1518, status: .ok)])
    }

    /// Used entries the device writes about frames: the slot comes back with an error
    /// status, the frame is never delivered, the count says so, and the queue goes on.
    @Test func malformedFramesAreDroppedNotDelivered() throws {
        var rig = try Rig()
        _ = try rig.start()
        rig.post(0..<8)
        // Shorter than the header: len 5.
        check(rig.device.transport.receive(Self.frame(0, length: 64), reportedLength: 5))
        // A header and less than an Ethernet header.
        check(rig.device.transport.receive(Self.frame(1, length: 64), reportedLength: 12 + 13))
        // num_buffers 0 (a header the device did not write).
        check(rig.device.transport.receive(Self.frame(2, length: 64), header: VirtioNetHeader(numBuffers: 0)))
        // Checksum offload flags, GSO: nothing of that was negotiated.
        check(rig.device.transport.receive(Self.frame(3, length: 64), header: VirtioNetHeader(flags: 1, numBuffers: 1)))
        check(rig.device.transport.receive(Self.frame(4, length: 64), header: VirtioNetHeader(gsoType: 1, numBuffers: 1)))
        // num_buffers 2: this buffer and the next are dropped; the one after is delivered.
        check(rig.device.transport.receive(Self.frame(5, length: 64), header: VirtioNetHeader(numBuffers: 2)))
        check(rig.device.transport.receive(Self.frame(6, length: 64)))
        check(rig.device.transport.receive(Self.frame(7, length: 64)))
        let got = rig.drain()
        #expect(got.map(\.status) == [.runt, .runt, .mergedBuffers, .offload, .offload, .mergedBuffers, .continuation, .ok])
        #expect(got.map(\.slot) == Array(0..<8))
        #expect(got.dropLast().allSatisfy { $0.length == 0 })
        #expect(got.last?.length == 64)
        #expect(rig.device.counters.receiveDropped == 7)
        #expect(rig.device.counters.received == 1)
        check(rig.device.error == nil)
        #expect(rig.device.receiveRoom == rig.queueSize)
    }

    /// A used entry the ring itself cannot take (an id not in flight or out of range, a
    /// length beyond the chain, used.idx jumping): the receive queue stops, nothing is
    /// delivered on its word, and the transmit queue is not affected.
    @Test(arguments: ["unknown id", "id out of range", "length too long", "index jump"])
    func aHostileUsedRingStopsTheQueue(_ how: String) throws {
        var rig = try Rig()
        _ = try rig.start()
        rig.post(0..<1)
        let chains = rig.device.transport.takeChains(0)
        #expect(chains.count == 1)
        let head = UInt32(chains[0].head)
        switch how {
        case "unknown id": rig.device.transport.completeRaw(0, id: (head + 1) % 16, len: 64)
        case "id out of range": rig.device.transport.completeRaw(0, id: 4000, len: 64)
        case "length too long": rig.device.transport.completeRaw(0, id: head, len: UInt32(12 + Self.bufferSize + 1))
        default: rig.device.transport.setUsedIndex(0, 5)
        }
        check(rig.device.nextReceived() == nil)
        check(rig.device.receiveError != nil, "the virtqueue must record the device's error")
        check(rig.device.receiveRoom == 0)
        check(!rig.device.postReceive(slot: 1, buffer: rig.rxBuffer(1), length: 2048))
        #expect(rig.device.counters.received == 0)
        check(rig.device.transmitError == nil)
        check(rig.device.transmit(slot: 0, buffer: rig.txBuffer(0), length: 64))
    }

    /// After a lost connection the caller learns what was at the device, starts again and
    /// posts the same slots.
    @Test func theSameSlotsGoAgainAfterANewStart() throws {
        var rig = try Rig()
        _ = try rig.start()
        rig.post(2..<5)
        check(rig.device.transmit(slot: 7, buffer: rig.txBuffer(7), length: 64))
        _ = rig.device.publish(.transmit)
        _ = rig.device.transport.takeChains(0)  // the device takes them and goes away
        _ = rig.device.transport.takeChains(1)
        var rxSlots: [Int] = [], txSlots: [Int] = []
        rig.device.forEachPosted(.receive) { rxSlots.append($0) }
        rig.device.forEachPosted(.transmit) { txSlots.append($0) }
        #expect(rxSlots == [2, 3, 4])
        #expect(txSlots == [7])
        _ = try rig.device.negotiate(eventIdx: true, fallbackMAC: Self.fallbackMAC, fallbackMTU: nil)
        try rig.device.start(notificationsOff: false)
        #expect(rig.device.receivePosted == 0 && rig.device.transmitInFlight == 0)
        rig.post(2..<5)
        check(rig.device.transmit(slot: 7, buffer: rig.txBuffer(7), length: 64))
        _ = rig.device.publish(.transmit)
        check(rig.device.transport.receive(Self.frame(1, length: 64)))
        #expect(rig.drain() == [VirtioNetReceived(slot: 2, length: 64, status: .ok)])
        #expect(rig.device.transport.transmitted().count == 1)
        #expect(rig.device.nextTransmitted() == 7)
        // reset forgets everything at the device as well.
        try rig.device.reset()
        var after = 0
        rig.device.forEachPosted(.receive) { _ in after += 1 }
        #expect(after == 0)
    }

    /// Notifications both ways, per queue: the device is kicked only when it asks, and
    /// notifies only when the driver asks (event idx).
    @Test func notificationsPerQueue() throws {
        var rig = try Rig()
        _ = try rig.start(notificationsOff: true)
        rig.post(0..<4)
        check(rig.device.transport.receive(Self.frame(0, length: 64)))
        #expect(rig.device.transport.notifications(0) == 0)
        check(rig.device.enableNotifications(.receive), "an entry is already there")
        _ = rig.drain()
        check(!rig.device.enableNotifications(.receive))
        check(rig.device.transport.receive(Self.frame(1, length: 64)))
        #expect(rig.device.transport.notifications(0) == 1)
        rig.device.disableNotifications(.receive)
        check(rig.device.transport.receive(Self.frame(2, length: 64)))
        #expect(rig.device.transport.notifications(0) == 1)
        #expect(rig.device.transport.notifications(1) == 0)
    }

    /// `bad-ring`: an available entry naming no descriptor reaches the device ahead of the
    /// next chain, on the queue asked for only.
    @Test(arguments: [VirtioNetQueue.receive, .transmit])
    func faultInjectionPutsAnInvalidHead(queue: VirtioNetQueue) throws {
        var rig = try Rig()
        _ = try rig.start()
        rig.device.addInvalidHead(queue)
        check(rig.device.postReceive(slot: 0, buffer: rig.rxBuffer(0), length: 2048))
        check(rig.device.transmit(slot: 0, buffer: rig.txBuffer(0), length: 64))
        _ = rig.device.publish(.receive)
        _ = rig.device.publish(.transmit)
        let rx = rig.device.transport.takeHeads(0)
        let tx = rig.device.transport.takeHeads(1)
        let bad = UInt16(rig.queueSize)
        #expect((queue == .receive ? rx : tx) == [bad, 0])
        #expect((queue == .receive ? tx : rx) == [0])
    }
}
