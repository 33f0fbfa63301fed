import Glibc
import OutboardRings
import Testing
import VFIO
import Virtio
@testable import VirtioPCI

typealias Transport = VirtioPCITransport<PCIFunctionDouble>

/// Attaches a fresh transport of `queues` queues to the model's device.
func attached(_ model: UnsafeMutablePointer<VirtioPCIModel>, queues: Int = 1, resetTimeout: Int = 1000) throws -> Transport {
    var t = try Transport(queues: queues, resetTimeoutMilliseconds: resetTimeout)
    try t.attach(PCIFunctionDouble(model: model))
    return t
}

func attachError(_ model: UnsafeMutablePointer<VirtioPCIModel>, queues: Int = 1) -> VirtioTransportError? {
    do {
        _ = try attached(model, queues: queues)
        return nil
    } catch let e as VirtioTransportError {
        return e
    } catch {
        Issue.record("unexpected \(error)")
        return nil
    }
}

func readable(_ fd: CInt) -> Bool {
    var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
    return poll(&p, 1, 0) == 1
}

/// Waits (at most the test deadline) for `fd` to become readable.
func waitReadable(_ fd: CInt) -> Bool {
    var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
    return poll(&p, 1, 30_000) == 1
}

@Suite(.serialized) struct VirtioPCITransportTests {
    @Test func attachFindsTheStructuresAndRoutesMSIX() throws {
        try withDevice(queues: 2) { model in
            var t = try attached(model, queues: 2)
            let isAttached = t.isAttached
            #expect(isAttached)
            let hasConfig = t.hasConfigSpace
            #expect(hasConfig)
            #expect(model.pointee.routeCalls == 1)
            #expect(model.pointee.routed == [t.configChangeDescriptor, t.interruptDescriptor(0), t.interruptDescriptor(1)])
            #expect(Set(model.pointee.routed).count == 3)
            let connection = t.connectionDescriptor
            #expect(connection == -1)
            #expect(t.interruptDescriptor(2) == -1)
            // Memory decoding and bus mastering on.
            let cmd = UInt16(model.pointee.config[4]) | UInt16(model.pointee.config[5]) << 8
            #expect(cmd & 0x6 == 0x6)
            #expect(try t.queueCount() == 2)
            // The function-level reset is the driver host's choice, not the transport's.
            try t.reset()
            #expect(model.pointee.functionResets == 0)
            t.detach()
            let stillAttached = t.isAttached
            #expect(!stillAttached)
            #expect(model.pointee.routed == [])
            #expect(model.pointee.routeCalls == 2)
            #expect(throws: VirtioTransportError.disconnected("no device attached")) { try t.status() }
        }
    }

    @Test func featuresAreAll64BitsThroughTheSelectors() throws {
        try withDevice({ $0.deviceFeatures = 0x0000_0007_8000_0201 }) { model in
            var t = try attached(model)
            #expect(try t.deviceFeatures() == 0x0000_0007_8000_0201)
            let transportFeatures = t.transportFeatures
            #expect(transportFeatures == VirtioFeature.accessPlatform)
            try t.setDriverFeatures(0x0000_0003_0000_0001)
            #expect(model.pointee.driverFeatures == 0x0000_0003_0000_0001)
            #expect(throws: VirtioTransportError.refused("features 0x10 were not offered")) { try t.setDriverFeatures(0x10) }
            #expect(throws: VirtioTransportError.unsupported("VIRTIO_F_ACCESS_PLATFORM is offered but not accepted (the "
                + "transport needs it: the driver's addresses are IO virtual addresses)")) { try t.setDriverFeatures(1 << 32) }
        }
    }

    @Test func aDeviceWithoutAccessPlatformIsUnsupported() throws {
        try withDevice({ $0.deviceFeatures = VirtioFeature.version1 }) { model in
            var t = try attached(model)
            #expect(throws: VirtioTransportError.unsupported("the device does not offer VIRTIO_F_ACCESS_PLATFORM: it would "
                + "bypass the IOMMU, and the driver's addresses are IO virtual addresses")) {
                try t.setDriverFeatures(VirtioFeature.version1)
            }
            #expect(model.pointee.driverFeatures == 0)
        }
    }

    @Test func statusSequence() throws {
        try withDevice { model in
            var t = try attached(model)
            try t.reset()
            try t.setStatus(.acknowledge)
            try t.setStatus(.driver)
            #expect(try t.status() == [.acknowledge, .driver])
            try t.setDriverFeatures(VirtioFeature.version1 | VirtioFeature.accessPlatform)
            try t.setStatus(.featuresOK)
            #expect(try t.status() == [.acknowledge, .driver, .featuresOK])
            try t.setStatus(.driverOK)
            #expect(model.pointee.statusWrites.suffix(4) == [1, 3, 11, 15])
            #expect(model.pointee.status == 15)
            // After a reset the device's status and vectors start over; the config vector is 0.
            try t.reset()
            #expect(model.pointee.status == 0)
            #expect(model.pointee.configVector == 0)
            #expect(model.pointee.statusWrites.last == 0)
        }
    }

    @Test func aDeviceThatRefusesTheFeaturesClearsFeaturesOK() throws {
        try withDevice({ $0.refuseFeatures = true }) { model in
            var t = try attached(model)
            try t.reset()
            try t.setStatus([.acknowledge, .driver])
            try t.setDriverFeatures(VirtioFeature.version1 | VirtioFeature.accessPlatform)
            try t.setStatus(.featuresOK)
            #expect(try !t.status().contains(.featuresOK))
        }
    }

    @Test func resetWaitsUntilTheStatusReadsZero() throws {
        try withDevice({ $0.resetBehaviour = .afterReads(5) }) { model in
            var t = try attached(model)
            try t.setStatus(.acknowledge)
            let before = model.pointee.statusReads
            try t.reset()
            #expect(model.pointee.status == 0)
            #expect(model.pointee.statusReads - before >= 5)
        }
    }

    @Test func resetOfADeviceThatNeverClearsTimesOut() throws {
        try withDevice({ $0.resetBehaviour = .never }) { model in
            var t = try attached(model, resetTimeout: 20)
            try t.setStatus(.acknowledge)
            #expect(throws: VirtioTransportError.refused(
                "device_status still reads 0x1 20 ms after the reset (§4.1.4.3.2)")) { try t.reset() }
        }
    }

    @Test func queueSetUpWritesTheRegistersAndNotifyStoresTheIndex() throws {
        try withDevice(queues: 2, multiplier: 4) { model in
            var t = try attached(model, queues: 2)
            try t.reset()
            let a = QueueAddresses(descriptors: IOAddress(rawValue: 0x1_2345_6000), driverArea: IOAddress(rawValue: 0x1_2345_7000),
                                   deviceArea: IOAddress(rawValue: 0x2_0000_0000))
            try t.setUpQueue(1, size: 128, at: a)
            let q = model.pointee.queues[1]
            #expect(q.size == 128)
            #expect(q.desc == 0x1_2345_6000)
            #expect(q.driver == 0x1_2345_7000)
            #expect(q.device == 0x2_0000_0000)
            #expect(q.vector == 2)
            #expect(q.enable == 0)
            #expect(model.pointee.queues[0].desc == 0)
            // Not set up yet: no store.
            t.notify(0)
            #expect(model.pointee.notifications.isEmpty)
            try t.enableQueue(1)
            #expect(model.pointee.queues[1].enable == 1)
            t.notify(1)
            t.notify(1)
            // queue_notify_off 1 × multiplier 4.
            #expect(model.pointee.notifications.map(\.offset) == [4, 4])
            #expect(model.pointee.notifications.map(\.value) == [1, 1])
            // A reset forgets the queue: notify stores nothing.
            try t.reset()
            t.notify(1)
            #expect(model.pointee.notifications.count == 2)
            #expect(throws: VirtioTransportError.refused("queue 1 is not set up")) { try t.enableQueue(1) }
        }
    }

    @Test func queueSizesTheDeviceCannotTakeAreRefused() throws {
        try withDevice({ $0.maxQueueSize = 64 }) { model in
            var t = try attached(model)
            try t.reset()
            let a = QueueAddresses(descriptors: IOAddress(rawValue: 0x10000), driverArea: IOAddress(rawValue: 0x11000),
                                   deviceArea: IOAddress(rawValue: 0x12000))
            #expect(throws: VirtioTransportError.refused("queue 0: size 128 is above the device's 64")) {
                try t.setUpQueue(0, size: 128, at: a)
            }
            #expect(throws: VirtioTransportError.refused("queue size 48 is not a power of 2 up to 32768")) {
                try t.setUpQueue(0, size: 48, at: a)
            }
            #expect(throws: VirtioTransportError.refused("queue 1: this transport has 1")) { try t.setUpQueue(1, size: 64, at: a) }
            try t.setUpQueue(0, size: 64, at: a)
        }
    }

    @Test func multiplierZeroSharesOneNotifyAddress() throws {
        try withDevice(queues: 2, multiplier: 0) { model in
            var t = try attached(model, queues: 2)
            try t.reset()
            let a = QueueAddresses(descriptors: IOAddress(rawValue: 0x10000), driverArea: IOAddress(rawValue: 0x11000),
                                   deviceArea: IOAddress(rawValue: 0x12000))
            try t.setUpQueue(0, size: 64, at: a)
            try t.setUpQueue(1, size: 64, at: a)
            t.notify(0)
            t.notify(1)
            #expect(model.pointee.notifications.map(\.offset) == [0, 0])
            #expect(model.pointee.notifications.map(\.value) == [0, 1])
        }
    }

    /// A device a dead driver left with requests in flight must not reach memory before it
    /// is reset: attach resets it through device_status first, then turns bus mastering on.
    @Test func busMasteringComesOnlyAfterTheReset() throws {
        try withDevice { model in
            _ = try attached(model)
            #expect(model.pointee.events.first == "status 0x0", "\(model.pointee.events)")
            #expect(model.pointee.events.firstIndex(of: "bus-master on") ?? -1 > model.pointee.events.firstIndex(of: "status 0x0") ?? .max,
                    "\(model.pointee.events)")
            #expect(model.pointee.busMaster)
        }
    }

    @Test func refusedVectorsAreErrors() throws {
        // The configuration vector is set by the reset that attach makes.
        try withDevice({ $0.refuseVectors = true }) { model in
            #expect(attachError(model) == .refused("the device refused MSI-X vector 0 for configuration changes"))
        }
        try withDevice({ $0.refuseQueueVectors = true }) { model in
            var t = try attached(model)
            let a = QueueAddresses(descriptors: IOAddress(rawValue: 0x10000), driverArea: IOAddress(rawValue: 0x11000),
                                   deviceArea: IOAddress(rawValue: 0x12000))
            #expect(throws: VirtioTransportError.refused("the device refused MSI-X vector 1 for queue 0 (NO_VECTOR)")) {
                try t.setUpQueue(0, size: 64, at: a)
            }
            t.notify(0)
            #expect(model.pointee.notifications.isEmpty)
        }
    }

    @Test func anInterruptArrivesOnTheQueuesEventfd() throws {
        try withDevice(queues: 2) { model in
            let t = try attached(model, queues: 2)
            #expect(!readable(t.interruptDescriptor(1)))
            #expect(model.pointee.fire(vector: 2))
            #expect(waitReadable(t.interruptDescriptor(1)))
            #expect(!readable(t.interruptDescriptor(0)))
            #expect(!readable(t.configChangeDescriptor))
            #expect(model.pointee.fire(vector: 0))
            #expect(waitReadable(t.configChangeDescriptor))
        }
    }

    @Test func configReadsAtTheFieldWidthOrByteByByte() throws {
        try withDevice({ m in
            for k in 0..<64 { m.deviceConfig[k] = UInt8(k + 1) }
        }) { model in
            var t = try attached(model)
            #expect(try t.readConfig(offset: 0, count: 8) == [1, 2, 3, 4, 5, 6, 7, 8])
            #expect(try t.readConfig(offset: 20, count: 4) == [21, 22, 23, 24])
            #expect(try t.readConfig(offset: 6, count: 2) == [7, 8])
            #expect(try t.readConfig(offset: 63, count: 1) == [64])
            #expect(try t.readConfig(offset: 64, count: 0) == [])
            let reads = model.pointee.deviceConfigReads
            _ = try t.readConfig(offset: 4, count: 4)
            #expect(model.pointee.deviceConfigReads == reads + 1)
            _ = try t.readConfig(offset: 5, count: 3)
            #expect(model.pointee.deviceConfigReads == reads + 4)
            #expect(throws: VirtioTransportError.refused("configuration read 60+8 beyond the device's 64 bytes")) {
                try t.readConfig(offset: 60, count: 8)
            }
        }
    }

    @Test func aGenerationChangeMidReadIsRetried() throws {
        try withDevice({ m in
            for k in 0..<64 { m.deviceConfig[k] = UInt8(k) }
            m.generationBumps = 3
        }) { model in
            var t = try attached(model)
            let reads = model.pointee.deviceConfigReads
            #expect(try t.readConfig(offset: 0, count: 8) == [0, 1, 2, 3, 4, 5, 6, 7])
            // The generation moved during the first attempt (three bumps on its first three
            // byte reads); the second attempt is stable.
            #expect(model.pointee.deviceConfigReads - reads == 16)
            #expect(model.pointee.generation == 3)
        }
    }

    @Test func aGenerationThatNeverSettlesIsAnError() throws {
        try withDevice({ $0.generationBumps = 1_000_000 }) { model in
            var t = try attached(model)
            #expect(throws: VirtioTransportError.refused("config_generation changed during each of 16 configuration reads")) {
                try t.readConfig(offset: 0, count: 4)
            }
        }
    }

    @Test func aVanishedDeviceIsDisconnected() throws {
        try withDevice { model in
            var t = try attached(model)
            try t.reset()
            model.pointee.gone = true
            withTrapOpen { model.pointee.publish() }
            let gone = VirtioTransportError.disconnected("the device reads all-ones (it left the bus)")
            #expect(throws: gone) { try t.status() }
            #expect(throws: gone) { try t.deviceFeatures() }
            #expect(throws: gone) { try t.reset() }
            #expect(throws: gone) { try t.readConfig(offset: 0, count: 8) }
            #expect(throws: gone) { try t.queueCount() }
        }
        withDevice({ $0.gone = true }) { model in
            #expect(attachError(model) == .disconnected("configuration space reads all-ones (the device left the bus)"))
        }
    }

    @Test func exposureIsCountedOnly() throws {
        try withDevice { model in
            var t = try attached(model)
            let base = UnsafeMutableRawPointer(bitPattern: 0x1000)!
            try t.expose(DeviceMemory(ioAddress: IOAddress(rawValue: 0x100000), size: 4096, base: base, fd: -1))
            var count = t.exposedRegionCount
            #expect(count == 1)
            let limit = t.memoryRegionLimit
            #expect(limit == nil)
            #expect(throws: VirtioTransportError.refused("no region is exposed at \(IOAddress(rawValue: 0x200000))")) {
                try t.withdraw(IOAddress(rawValue: 0x200000))
            }
            try t.withdraw(IOAddress(rawValue: 0x100000))
            count = t.exposedRegionCount
            #expect(count == 0)
        }
    }
}

/// Capabilities a hostile or broken device offers (in the same serialized suite: one
/// trapped BAR at a time).
extension VirtioPCITransportTests {
    @Test func missingStructuresAreUnsupported() {
        withDevice({ m in m.caps.removeAll { $0.type == VirtioPCICapabilityType.common.rawValue } }) { model in
            #expect(attachError(model) == .unsupported("no common configuration capability (not a modern virtio-pci device)"))
        }
        withDevice({ m in m.caps.removeAll { $0.type == VirtioPCICapabilityType.notify.rawValue } }) { model in
            #expect(attachError(model) == .unsupported("no notification capability"))
        }
        withDevice({ m in m.caps.removeAll { $0.type == VirtioPCICapabilityType.isr.rawValue } }) { model in
            #expect(attachError(model) == .unsupported("no ISR status capability"))
        }
        withDevice { model in
            model.pointee.config[PCIConfigOffset.status] = 0
            #expect(attachError(model) == .unsupported("the device has no capability list"))
        }
    }

    @Test func withoutADeviceConfigurationThereIsNoConfigSpace() throws {
        try withDevice({ m in m.caps.removeAll { $0.type == VirtioPCICapabilityType.device.rawValue } }) { model in
            var t = try attached(model)
            let hasConfig = t.hasConfigSpace
            #expect(!hasConfig)
            #expect(throws: VirtioTransportError.refused("the device has no device configuration capability")) {
                try t.readConfig(offset: 0, count: 1)
            }
        }
    }

    @Test func aStructureBeyondItsBARIsRefused() {
        withDevice({ m in m.caps[3].length = 0x2001 }) { model in
            #expect(attachError(model) == .refused(
                "the device configuration capability (offset 0x2000, length 8193) lies beyond BAR 4's 16384 bytes"))
        }
        withDevice({ m in m.barSize = 0x3000 }) { model in
            #expect(attachError(model) == .refused(
                "the notification capability (offset 0x3000, length 4096) lies beyond BAR 4's 12288 bytes"))
        }
        withDevice({ m in m.caps[0].offset = 0xFFFF_FFFC; m.caps[0].length = 0x38 }) { model in
            #expect(attachError(model) == .refused(
                "the common configuration capability (offset 0xfffffffc, length 56) lies beyond BAR 4's 16384 bytes"))
        }
        withDevice({ m in m.caps[0].length = 0x20 }) { model in
            #expect(attachError(model) == .refused("the common configuration capability's length 32 is below 56"))
        }
        withDevice({ m in m.caps[0].bar = 2 }) { model in
            #expect(attachError(model) == .unsupported("mapping BAR 2: PCI device lacks BAR 2"))
        }
    }

    @Test func aNotifyAddressBeyondTheWindowIsRefused() throws {
        // queue_notify_off 0xffff × 0x10000: far beyond the 4 KiB window (and 32 bits).
        try withDevice(multiplier: 0x10000, { m in m.queues[0].notifyOff = 0xFFFF }) { model in
            var t = try attached(model)
            try t.reset()
            model.pointee.queues[0].notifyOff = 0xFFFF
            let a = QueueAddresses(descriptors: IOAddress(rawValue: 0x10000), driverArea: IOAddress(rawValue: 0x11000),
                                   deviceArea: IOAddress(rawValue: 0x12000))
            #expect(throws: VirtioTransportError.refused(
                "queue 0's notify address (queue_notify_off 65535 × 65536) lies beyond the 4096-byte notification window")) {
                try t.setUpQueue(0, size: 64, at: a)
            }
            t.notify(0)
            #expect(model.pointee.notifications.isEmpty)
        }
        // The last two bytes of the window are still inside.
        try withDevice(multiplier: 2, { m in m.caps[1].length = 0x1000 }) { model in
            var t = try attached(model)
            try t.reset()
            model.pointee.queues[0].notifyOff = 0x7FF
            let a = QueueAddresses(descriptors: IOAddress(rawValue: 0x10000), driverArea: IOAddress(rawValue: 0x11000),
                                   deviceArea: IOAddress(rawValue: 0x12000))
            try t.setUpQueue(0, size: 64, at: a)
            t.notify(0)
            #expect(model.pointee.notifications.map(\.offset) == [0xFFE])
        }
        withDevice(multiplier: 3) { model in
            #expect(attachError(model) == .refused("notify_off_multiplier 3 is not an even power of 2"))
        }
    }

    @Test func aLoopingOrStrayCapabilityListIsRefused() {
        withDevice { model in
            // The last capability points back at the first vendor one.
            let last = lastCapability(model.pointee.config)
            model.pointee.config[last + 1] = 0x4C
            #expect(attachError(model) == .refused("the capability list: PCI device malformed: capability list loops: the next pointer of the capability at 0x80 points back to 0x4c"))
        }
        withDevice { model in
            model.pointee.config[lastCapability(model.pointee.config) + 1] = 0x20
            #expect(attachError(model) == .refused("the capability list: PCI device malformed: the next pointer of the capability at 0x80 is 0x20, inside the 64-byte header"))
        }
        withDevice({ m in m.caps[1].capLength = 16 }) { model in
            #expect(attachError(model) == .refused("the vendor capability at 0x5c (type 2) has length 16, 20 needed"))
        }
    }

    @Test func tooFewVectorsAreUnsupported() {
        withDevice(queues: 2, { m in m.msixVectors = 2 }) { model in
            #expect(attachError(model, queues: 2) == .unsupported(
                "the device has 2 MSI-X vectors; 2 queue(s) and the configuration change need 3"))
        }
    }

    @Test func reservedBARsAreIgnoredAndTheFirstUsableCapabilityWins() throws {
        try withDevice({ m in
            // A common capability naming reserved BAR 7 first, then a second notify one.
            m.caps.insert(VirtioPCIModel.Cap(type: VirtioPCICapabilityType.common.rawValue, bar: 7, offset: 0, length: 0x38), at: 0)
            m.caps.append(VirtioPCIModel.Cap(type: VirtioPCICapabilityType.notify.rawValue, offset: 0x3800, length: 2, multiplier: 0))
        }) { model in
            var t = try attached(model)
            try t.reset()
            let a = QueueAddresses(descriptors: IOAddress(rawValue: 0x10000), driverArea: IOAddress(rawValue: 0x11000),
                                   deviceArea: IOAddress(rawValue: 0x12000))
            try t.setUpQueue(0, size: 64, at: a)
            t.notify(0)
            #expect(model.pointee.notifications.map(\.offset) == [0])
        }
    }
}

/// The offset of the last capability in the list.
func lastCapability(_ config: [UInt8]) -> Int {
    var at = Int(config[0x34])
    while config[at + 1] != 0 { at = Int(config[at + 1]) }
    return at
}
