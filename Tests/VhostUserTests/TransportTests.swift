import OutboardRings
import OutboardSystem
import SystemPackage
import Testing
import VhostUser
import Virtio

/// VhostUserTransport against a real qemu-storage-daemon: the link outlives connections,
/// and the memory-slot accounting (exactly what was added is removed) keeps the daemon's
/// table and ours equal however often regions come and go.
@Suite(.serialized) struct VhostUserTransportTests {
    /// Opens a connection through the fixture's retrying connect and hands its socket to
    /// the transport (the manager's part in production).
    func connect(_ link: inout VhostUserTransport, _ fixture: DaemonFixture, _ daemon: inout ChildProcess) throws {
        let deadline = Clock.monotonicNanoseconds + 10_000_000_000
        while true {
            if let status = try daemon.wait(timeoutMilliseconds: 0) {
                throw TestFailure("qemu-storage-daemon \(status) before accepting a connection")
            }
            do {
                try link.connect(try connectStream(path: fixture.socketPath, timeoutMilliseconds: 50))
                return
            } catch let e as Errno where e == .noSuchFileOrDirectory || e == .connectionRefused {
                if Clock.monotonicNanoseconds > deadline { throw e }
            }
        }
    }

    @Test func theLinkSurvivesConnectionsAndReportsTheDevice() throws {
        let fixture = try DaemonFixture()
        var daemon = try fixture.startDaemon()
        var link = try VhostUserTransport(queues: 1, replyTimeoutMilliseconds: 2000)
        for _ in 0..<2 {
            try connect(&link, fixture, &daemon)
            let connected = link.isConnected
            #expect(connected)
            let features = try link.deviceFeatures()
            #expect(features & VirtioFeature.version1 != 0)
            #expect(features & VhostUserFeature.protocolFeatures == 0, "bit 30 is vhost-user's, not the device's")
            // num-queues=1 in the export (MQ negotiated: GET_QUEUE_NUM).
            let queues = try link.queueCount()
            #expect(queues == 1)
            let hasConfig = link.hasConfigSpace
            #expect(hasConfig)
            // virtio 1.2 §5.2.4: capacity (le64 sectors) at 0; a read from an offset is cut here.
            let config = try link.readConfig(offset: 0, count: 60)
            let capacity = config.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 0, as: UInt64.self) }
            #expect(capacity == UInt64(imageSize / 512))
            let blkSize = try link.readConfig(offset: 20, count: 4)
            #expect(blkSize == [0, 2, 0, 0])
            try link.setDriverFeatures(VirtioFeature.version1)
            try link.setStatus([.acknowledge, .driver, .featuresOK])
            let status = try link.status()
            #expect(status.contains(.featuresOK))
            link.disconnect()
            let stillConnected = link.isConnected
            #expect(!stillConnected)
        }
    }

    /// Regions come and go many times more than the daemon has slots (QEMU 7.2's
    /// libvhost-user: 32), at recycled addresses; if a removal did not match what was
    /// added, the daemon would run out of slots and drop the connection.
    @Test func exposureAndWithdrawalNeverDrift() throws {
        let fixture = try DaemonFixture()
        var daemon = try fixture.startDaemon()
        var link = try VhostUserTransport(queues: 1, replyTimeoutMilliseconds: 2000)
        try connect(&link, fixture, &daemon)
        try link.setDriverFeatures(VirtioFeature.version1)
        try link.setStatus([.acknowledge, .driver, .featuresOK])
        let slots = link.memoryRegionLimit
        let limit = try #require(slots)
        #expect(limit >= 8)
        let keep = try SharedRegion(name: "keep", size: 1 << 16)
        let keepMap = try keep.map(.readWrite)
        try link.expose(DeviceMemory(ioAddress: IOAddress(rawValue: 1 << 32), size: keepMap.size, base: keepMap.base,
                                     fd: keep.fd.raw.rawValue))
        for round in 0..<100 {
            let io = IOAddress(rawValue: UInt64(2 + round % 3) << 32)
            let r = try SharedRegion(name: "churn", size: 1 << 16)
            let m = try r.map(.readWrite)
            try link.expose(DeviceMemory(ioAddress: io, size: m.size, base: m.base, fd: r.fd.raw.rawValue))
            let during = link.exposedRegionCount
            #expect(during == 2)
            try link.withdraw(io)
            let after = link.exposedRegionCount
            #expect(after == 1)
        }
        // Filling every slot works, and one more is refused here, not by the daemon.
        // (Pages of one region, each exposed on its own: only the slots matter here.)
        let fill = try SharedRegion(name: "fill", size: limit << 12)
        let fillMap = try fill.map(.readWrite)
        for k in 1..<limit {
            try link.expose(DeviceMemory(ioAddress: IOAddress(rawValue: UInt64(100 + k) << 32), size: 1 << 12,
                                         base: fillMap.base + (k << 12), fd: fill.fd.raw.rawValue))
        }
        let full = link.exposedRegionCount
        #expect(full == limit)
        let extra = try SharedRegion(name: "extra", size: 1 << 12)
        let extraMap = try extra.map(.readWrite)
        do {
            try link.expose(DeviceMemory(ioAddress: IOAddress(rawValue: 99 << 32), size: extraMap.size, base: extraMap.base,
                                         fd: extra.fd.raw.rawValue))
            Issue.record("a region beyond the daemon's slots was accepted")
        } catch .noMemorySlot(let l) {
            #expect(l == limit)
        }
        let kept = link.isConnected
        #expect(kept, "the daemon kept the connection through all of it")
        // And the connection still answers.
        _ = try link.readConfig(offset: 0, count: 8)
    }
}
