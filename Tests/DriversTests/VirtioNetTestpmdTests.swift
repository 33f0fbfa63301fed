import OutboardTestSupport
import Drivers
import Glibc
import OutboardBench
import OutboardRings
import OutboardSystem
import Testing
import VhostUser
import Virtio

/// `VirtioNetDevice` over `VhostUserTransport` against the real peer: DPDK 22.11's
/// dpdk-testpmd as a vhost-user-net device in macswap mode (Debian package dpdk-dev,
/// installed by scripts/setup.sh), which returns every frame with its MAC addresses
/// swapped. Its vhost backend has no configuration space and no CONFIGURE_MEM_SLOTS: the
/// MAC comes from the fallback and memory goes in with SET_MEM_TABLE (8 regions at most).
@Suite(.serialized) struct VirtioNetTestpmdTests {
    static let queueSize = 256
    static let bufferSize = 2048
    static let dmaIO = IOAddress(rawValue: 1 << 20)
    static let dataIO = IOAddress(rawValue: 1 << 32)
    static let ourMAC: [UInt8] = [0x02, 0x0b, 0x0a, 0x0d, 0x00, 0x01]
    static let peerMAC: [UInt8] = [0x02, 0x0b, 0x0a, 0x0d, 0x00, 0x02]

    /// A frame from us to the peer: EtherType 0x88B5 (local experimental), then a payload
    /// that names the frame.
    static func frame(_ n: Int, length: Int) -> [UInt8] {
        var f = [UInt8](repeating: 0, count: length)
        for i in 0..<6 { f[i] = peerMAC[i]; f[6 + i] = ourMAC[i] }
        f[12] = 0x88; f[13] = 0xB5
        f[14] = UInt8(truncatingIfNeeded: n); f[15] = UInt8(truncatingIfNeeded: n >> 8)
        for i in 16..<length { f[i] = UInt8(truncatingIfNeeded: n &* 131 &+ i &* 7) }
        return f
    }

    /// Sends `count` frames (64 and 1518 bytes, alternating) from transmit slots and takes
    /// `count` back into receive slots, polling (notifications off) for at most 10 s.
    /// Returns the frames received, by the number in their payload.
    static func roundTrip(_ device: inout VirtioNetDevice<VhostUserTransport>, data: UnsafeMutableRawPointer,
                          count: Int) throws -> [Int: [UInt8]] {
        precondition(count <= queueSize)
        let txBase = queueSize * bufferSize
        for s in 0..<count {
            check(device.postReceive(slot: s, buffer: dataIO.advanced(by: s * bufferSize), length: UInt32(bufferSize)))
        }
        _ = device.publish(.receive)
        for s in 0..<count {
            let f = frame(s, length: s % 2 == 0 ? 64 : 1518)
            f.withUnsafeBytes { (data + txBase + s * bufferSize).copyMemory(from: $0.baseAddress!, byteCount: f.count) }
            check(device.transmit(slot: s, buffer: dataIO.advanced(by: txBase + s * bufferSize), length: UInt32(f.count)))
        }
        _ = device.publish(.transmit)
        var received: [Int: [UInt8]] = [:]
        var sent = 0
        let deadline = Clock.monotonicNanoseconds + 10_000_000_000
        while (received.count < count || sent < count) && Clock.monotonicNanoseconds < deadline {
            var progress = false
            while let r = device.nextReceived() {
                progress = true
                #expect(r.status == .ok, "slot \(r.slot)")
                guard r.status == .ok else { continue }
                let b = Array(UnsafeRawBufferPointer(start: data + r.slot * bufferSize, count: Int(r.length)))
                let n = b.count >= 16 ? Int(b[14]) | Int(b[15]) << 8 : -1
                #expect(received[n] == nil, "frame \(n) received twice")
                received[n] = b
            }
            while device.nextTransmitted() != nil { sent += 1; progress = true }
            if device.error != nil { break }
            if !progress { usleep(200) }
        }
        check(device.error == nil, "\(String(describing: device.error))")
        #expect(sent == count)
        return received
    }

    /// What macswap must return for frame `n`: the frame with its two addresses swapped.
    static func verify(_ received: [Int: [UInt8]], count: Int, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(received.count == count, sourceLocation: sourceLocation)
        for n in 0..<count {
            guard let b = received[n] else { Issue.record("frame \(n) did not come back", sourceLocation: sourceLocation); continue }
            var expected = frame(n, length: n % 2 == 0 ? 64 : 1518)
            for i in 0..<6 { expected.swapAt(i, 6 + i) }
            #expect(Array(b[0..<6]) == ourMAC && Array(b[6..<12]) == peerMAC, "frame \(n): MACs not swapped",
                    sourceLocation: sourceLocation)
            #expect(b == expected, "frame \(n): \(b.count) bytes, payload differs", sourceLocation: sourceLocation)
        }
    }

    @Test func framesGoRoundTripThroughTestpmdMacswap() throws {
        let turn = try BusyTurn()
        defer { turn.hold() }
        let dir = try NetTestDirectory()
        let socket = dir.path + "/vhu.sock"
        var testpmd = try Testpmd(sockets: [socket], forwardMode: "macswap", filePrefix: "vnet-\(getpid())")
        let layout = try VirtioNetLayout(queueSize: Self.queueSize)
        let dmaRegion = try SharedRegion(name: "vnet-dma", size: SharedRegion.roundToPage(layout.byteCount))
        let dmaMap = try dmaRegion.map(.readWrite)
        let dataRegion = try SharedRegion(name: "vnet-data", size: 2 * Self.queueSize * Self.bufferSize)
        let dataMap = try dataRegion.map(.readWrite)

        var link = try VhostUserTransport(queues: 2, replyTimeoutMilliseconds: 5000)
        try link.connect(UnixSocket.connectStream(path: socket))
        // testpmd's vhost backend: no CONFIG, no CONFIGURE_MEM_SLOTS: the 8-region table.
        check(!link.hasConfigSpace)
        check(!link.memorySlots)
        check(link.memoryRegionLimit == VhostUserMemoryTable.maxRegions)
        var device = try VirtioNetDevice(transport: link, memory: dmaMap.base, size: dmaMap.size, ioAddress: Self.dmaIO,
                                         queueSize: Self.queueSize)

        for round in 0..<2 {
            if round == 1 {
                // A new connection (the old one dropped): negotiate again, expose again, and
                // post the same slots.
                device.transport.disconnect()
                try device.transport.connect(UnixSocket.connectStream(path: socket))
            }
            let info = try device.negotiate(eventIdx: true, fallbackMAC: Self.ourMAC, fallbackMTU: 1500)
            #expect(info.mac == Self.ourMAC && !info.macFromDevice)
            #expect(info.mtu == 1500 && info.headerSize == 12)
            #expect(info.mergeableBuffers, "testpmd offers MRG_RXBUF: num_buffers is written only with it")
            try device.transport.expose(device.deviceMemory(fd: dmaRegion.fd.raw.rawValue))
            try device.transport.expose(DeviceMemory(ioAddress: Self.dataIO, size: dataMap.size, base: dataMap.base,
                                                     fd: dataRegion.fd.raw.rawValue))
            if round == 0 {
                // SET_MEM_TABLE carries the whole table each time: fill it to 8, the 9th is
                // refused, and withdrawing sends the smaller table (the device keeps working
                // with what is left: the traffic below).
                // (One memfd, shown at six IO addresses: the table resends every region's
                // descriptor each time.)
                let extra = try SharedRegion(name: "vnet-extra", size: 1 << 16)
                let extraMap = try extra.map(.readWrite)
                let extras = VhostUserMemoryTable.maxRegions - 2
                for k in 0..<extras {
                    try device.transport.expose(DeviceMemory(ioAddress: IOAddress(rawValue: UInt64(8 + k) << 32),
                                                             size: extraMap.size, base: extraMap.base, fd: extra.fd.raw.rawValue))
                }
                check(device.transport.exposedRegionCount == 8)
                let ninth = try SharedRegion(name: "vnet-ninth", size: 1 << 16)
                let ninthMap = try ninth.map(.readWrite)
                do {
                    try device.transport.expose(DeviceMemory(ioAddress: IOAddress(rawValue: 20 << 32), size: ninthMap.size,
                                                             base: ninthMap.base, fd: ninth.fd.raw.rawValue))
                    Issue.record("a 9th region was taken")
                } catch {
                    #expect(error == .noMemorySlot(limit: 8))
                }
                for k in 0..<extras { try device.transport.withdraw(IOAddress(rawValue: UInt64(8 + k) << 32)) }
                check(device.transport.exposedRegionCount == 2)
            }
            try device.start(notificationsOff: true)
            let received = try Self.roundTrip(&device, data: dataMap.base, count: 64)
            Self.verify(received, count: 64)
            check(device.counters.receiveDropped == 0)
        }
        check(device.counters.received == 128 && device.counters.transmitted == 128)
        device.transport.disconnect()
        let final = try TestpmdStatistics.final(testpmd.stop())
        #expect(final.map(\.port) == [0])
        #expect(final.first?.rxPackets == 128 && final.first?.txPackets == 128, "\(final)")
    }
}

/// A temporary directory for sockets and logs, removed with what is in it.
final class NetTestDirectory {
    let path: String

    init() throws {
        var template = Array("/tmp/vnet-XXXXXX".utf8CString)
        guard let p = mkdtemp(&template) else { throw LabError("mkdtemp: errno \(errno)") }
        path = String(cString: p)
    }

    deinit {
        if let d = opendir(path) {
            while let e = readdir(d) {
                let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
                if name != "." && name != ".." { unlink("\(path)/\(name)") }
            }
            closedir(d)
        }
        rmdir(path)
    }
}
