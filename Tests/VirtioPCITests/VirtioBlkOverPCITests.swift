import Drivers
import Glibc
import OutboardRings
import OutboardTestSupport
import Testing
import VFIO
import Virtio
import VirtioPCI

extension VirtioPCITransportTests {
    /// The virtio-blk driver, unchanged, over the transport and the device double: the
    /// double's queue side is the spec-written `TestDevice` over the same memory, its
    /// block side a RAM disk; completions are signalled on MSI-X vector 1.
    @Test func virtioBlkRunsOverTheTransport() throws {
        let sectors = 64
        let disk = UnsafeMutableRawBufferPointer.allocate(byteCount: sectors * 512, alignment: 4096)
        defer { disk.deallocate() }
        disk.initializeMemory(as: UInt8.self, repeating: 0)
        let areaIO: UInt64 = 0x10_0000, areaSize = 1 << 20
        let dataIO: UInt64 = 0x80_0000, dataSize = 8192
        let area = UnsafeMutableRawPointer.allocate(byteCount: areaSize, alignment: 4096)
        let data = UnsafeMutableRawPointer.allocate(byteCount: dataSize, alignment: 4096)
        defer { area.deallocate(); data.deallocate() }
        area.initializeMemory(as: UInt8.self, repeating: 0, count: areaSize)
        func resolve(_ io: IOAddress, _ length: UInt32) -> UnsafeMutableRawPointer? {
            let a = io.rawValue, n = UInt64(length)
            if a >= areaIO, a - areaIO <= UInt64(areaSize), n <= UInt64(areaSize) - (a - areaIO) { return area + Int(a - areaIO) }
            if a >= dataIO, a - dataIO <= UInt64(dataSize), n <= UInt64(dataSize) - (a - dataIO) { return data + Int(a - dataIO) }
            return nil
        }

        try withDevice({ m in
            m.deviceFeatures = VirtioFeature.version1 | VirtioFeature.accessPlatform | VirtioBlkFeature.flush
                | VirtioFeature.ringEventIdx
            m.deviceConfig = VirtioBlkConfig(capacity: UInt64(sectors)).encoded() + [0, 0, 0, 0]
        }) { model in
            var device = try VirtioBlkDevice(transport: try attached(model), memory: area, size: areaSize,
                                             ioAddress: IOAddress(rawValue: areaIO), queueSize: 64)
            let info = try device.negotiate(eventIdx: false, maxTransfer: 1 << 20)
            #expect(info.capacity == UInt64(sectors))
            #expect(info.flush)
            // ACCESS_PLATFORM accepted because the transport asks for it; EVENT_IDX not asked.
            #expect(model.pointee.driverFeatures == VirtioFeature.version1 | VirtioFeature.accessPlatform | VirtioBlkFeature.flush)
            try device.start(notificationsOff: false)
            #expect(model.pointee.status == 15)
            let q = model.pointee.queues[0]
            #expect(q.enable == 1 && q.size == 64 && q.desc == areaIO && q.vector == 1)

            /// The device at work: every available chain executed against the disk, then
            /// vector 1 raised.
            func serve() -> Int {
                var tq = TestDevice(memory: area, ioAddress: areaIO, size: 64, eventIdx: false)
                tq.lastAvail = model.pointee.lastAvail
                tq.usedIdx = model.pointee.usedIdx
                let chains = tq.takeAvailable()
                for c in chains {
                    var written: UInt32 = 0
                    var status = VirtioBlkStatus.ok
                    let h = resolve(c.buffers[0].address, 16)!
                    let type = UInt32(littleEndian: h.load(as: UInt32.self))
                    let sector = Int(UInt64(littleEndian: h.load(fromByteOffset: 8, as: UInt64.self)))
                    for b in c.buffers.dropFirst().dropLast() {
                        guard let p = resolve(b.address, b.length), sector * 512 + Int(b.length) <= disk.count else {
                            status = VirtioBlkStatus.ioError
                            break
                        }
                        if type == VirtioBlkRequestType.write {
                            (disk.baseAddress! + sector * 512).copyMemory(from: p, byteCount: Int(b.length))
                        } else if type == VirtioBlkRequestType.read {
                            p.copyMemory(from: disk.baseAddress! + sector * 512, byteCount: Int(b.length))
                            written += b.length
                        }
                    }
                    resolve(c.buffers.last!.address, 1)!.storeBytes(of: status, as: UInt8.self)
                    tq.complete(id: UInt32(c.head), len: written + 1)
                }
                model.pointee.lastAvail = tq.lastAvail
                model.pointee.usedIdx = tq.usedIdx
                if !chains.isEmpty { _ = model.pointee.fire(vector: 1) }
                return chains.count
            }
            let irq = device.transport.interruptDescriptor(0)

            for k in 0..<4096 { data.storeBytes(of: UInt8(truncatingIfNeeded: k * 7 + 3), toByteOffset: k, as: UInt8.self) }
            var ok = device.submit(slot: 0, VirtioBlkRequest(op: .write, sector: 8, buffer: IOAddress(rawValue: dataIO), length: 4096))
            #expect(ok)
            ok = device.publish()
            #expect(ok)
            #expect(model.pointee.notifications.map(\.offset) == [0])
            #expect(model.pointee.notifications.map(\.value) == [0])
            #expect(serve() == 1)
            #expect(waitReadable(irq))
            let first = device.nextCompletion()
            #expect(first?.slot == 0 && first?.status == .ok)

            ok = device.submit(slot: 1, VirtioBlkRequest(op: .read, sector: 8, buffer: IOAddress(rawValue: dataIO + 4096),
                                                         length: 4096))
                && device.submit(slot: 2, VirtioBlkRequest(op: .flush, sector: 0, length: 0))
            #expect(ok)
            ok = device.publish()
            #expect(ok)
            #expect(serve() == 2)
            var done: [VirtioBlkCompletion] = []
            while let c = device.nextCompletion() { done.append(c) }
            #expect(done.map(\.slot) == [1, 2])
            #expect(done.allSatisfy { $0.status == .ok })
            #expect(memcmp(data, data + 4096, 4096) == 0)
            #expect(model.pointee.notifications.count == 2)
        }
    }
}
