import ArgumentParser
import CLinux
import Drivers
import OutboardRings
import OutboardSystem
import VFIO
import Virtio
import VirtioPCI
#if canImport(Glibc)
import Glibc
#endif

/// `outboard _virtio-pci-smoke BDF`: a diagnostic for the guest lane. Binds the function to
/// vfio-pci, opens it through VFIO (container, group, device), maps 4 MiB of anonymous
/// memory for DMA at IOVA 1 MiB, attaches a `VirtioPCITransport` and drives
/// `VirtioBlkDevice` over it: saves 64 KiB at sector 2048, writes a pattern there, reads it
/// back and compares, writes the saved bytes back (unless --leave-pattern), flushes. Each completion is waited for
/// on the queue's MSI-X eventfd. Then resets the device, detaches, unmaps and restores the
/// function's driver. Needs root. One fact per line; exits non-zero on any failure.
struct VirtioPCISmokeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "_virtio-pci-smoke", shouldDisplay: false)

    @Argument(help: "The PCI function, e.g. 0000:00:04.0.")
    var bdf: String

    @Option(help: "The sector the test writes at (64 KiB from there are saved and restored).")
    var sector: UInt64 = 2048

    @Flag(help: "Leave the pattern on the disk instead of restoring what was there (for a check through the kernel's driver).")
    var leavePattern = false

    func run() throws {
        guard let address = PCIAddress(bdf) else { throw ValidationError("not a PCI address: \(bdf)") }
        let sysfs = PCISysfs()
        let previous = try sysfs.bindToVFIO(address)
        print("device \(address) previous-driver \(previous ?? "none") driver \(sysfs.driver(of: address) ?? "none")")
        let result = Result { try smoke(address, sysfs) }
        // Every VFIO descriptor is closed here: the driver can be restored.
        if let p = previous, p != "vfio-pci" {
            try sysfs.restore(address, previousDriver: p)
            print("restore driver \(sysfs.driver(of: address) ?? "none") ok")
        }
        try result.get()
        print("smoke ok")
    }

    private func smoke(_ address: PCIAddress, _ sysfs: PCISysfs) throws {
        let group = try sysfs.iommuGroup(of: address)
        var container = try VFIOContainer()
        let vfioGroup = try VFIOGroup(number: group)
        try container.attach(vfioGroup)
        var function = try vfioGroup.openDevice(address)
        let vectors = try function.msixVectorCount()
        print("vfio group \(group) msix-vectors \(vectors) reset \(function.canReset)")

        let size = 4 << 20
        let iova = IOAddress(rawValue: 1 << 20)
        guard let mem = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), mem != MAP_FAILED else {
            throw PCIError.system("mmap of the DMA area: \(String(cString: strerror(errno)))")
        }
        defer { munmap(mem, size) }
        memset(mem, 0, size)
        try container.map(hostAddress: mem, ioAddress: iova, size: size, writable: true)
        defer { try? container.unmap(ioAddress: iova, size: size) }
        print("dma iova \(iova) size 0x\(String(size, radix: 16)) ok")

        var transport = try VirtioPCITransport<VFIODevice>(queues: 1)
        try transport.attach(function)
        print("transport attached config-space \(transport.hasConfigSpace) queues \(try transport.queueCount())")

        // The first MiB: the virtqueue and request slots; then the data buffers.
        let queueSize = 128
        let dataOffset = 1 << 20
        let length = 64 << 10
        var device = try VirtioBlkDevice(transport: transport, memory: mem, size: dataOffset, ioAddress: iova, queueSize: queueSize)
        let info = try device.negotiate(eventIdx: false, maxTransfer: 1 << 20)
        let offered = try device.transport.deviceFeatures()
        print("features offered 0x\(String(offered, radix: 16)) negotiated 0x\(String(info.features, radix: 16)) "
              + "access-platform \(info.features & VirtioFeature.accessPlatform != 0)")
        print("capacity \(info.capacity) sectors flush \(info.flush) read-only \(info.readOnly) max-transfer \(info.maxTransfer)")
        guard info.capacity >= sector + UInt64(length / 512) else {
            throw ValidationError("the disk has \(info.capacity) sectors; the test needs \(sector + UInt64(length / 512))")
        }
        try device.start(notificationsOff: false)
        print("started status \(try device.transport.status())")

        let saved = mem + dataOffset
        let pattern = mem + dataOffset + length
        let readBack = mem + dataOffset + 2 * length
        for k in 0..<length { pattern.storeBytes(of: UInt8(truncatingIfNeeded: k &* 31 &+ Int(k >> 9) &+ 0x5A), toByteOffset: k, as: UInt8.self) }
        memset(readBack, 0, length)
        let irq = device.transport.interruptDescriptor(0)
        var interrupts = 0

        func run(_ name: String, _ r: VirtioBlkRequest) throws {
            guard device.submit(slot: 0, r) else { throw ValidationError("\(name): the virtqueue refused the request") }
            _ = device.publish()
            let deadline = Clock.monotonicNanoseconds + 10_000_000_000
            while true {
                if let c = device.nextCompletion() {
                    guard c.status == .ok else { throw ValidationError("\(name): status \(c.status)") }
                    print("\(name) ok interrupts-so-far \(interrupts)")
                    return
                }
                if let e = device.error { throw ValidationError("\(name): virtqueue error \(e)") }
                let now = Clock.monotonicNanoseconds
                guard now < deadline else { throw ValidationError("\(name): no completion within 10 s") }
                var p = pollfd(fd: irq, events: Int16(POLLIN), revents: 0)
                if poll(&p, 1, Int32((deadline - now) / 1_000_000 + 1)) == 1 {
                    var n: UInt64 = 0
                    if read(irq, &n, 8) == 8 { interrupts += Int(n) }
                }
            }
        }
        func io(_ base: UnsafeMutableRawPointer) -> IOAddress { iova.advanced(by: base - mem) }
        let len = UInt32(length)
        try run("read-original", VirtioBlkRequest(op: .read, sector: sector, buffer: io(saved), length: len))
        try run("write-pattern", VirtioBlkRequest(op: .write, sector: sector, buffer: io(pattern), length: len))
        try run("read-back", VirtioBlkRequest(op: .read, sector: sector, buffer: io(readBack), length: len))
        let same = memcmp(pattern, readBack, length) == 0
        print("compare \(length) bytes match \(same)")
        let head = (0..<16).map { String(pattern.load(fromByteOffset: $0, as: UInt8.self), radix: 16) }.joined(separator: " ")
        print("pattern first-bytes \(head)")
        if !leavePattern {
            try run("restore-original", VirtioBlkRequest(op: .write, sector: sector, buffer: io(saved), length: len))
        }
        if info.flush { try run("flush", VirtioBlkRequest(op: .flush, sector: 0, length: 0)) }
        print("msix queue-vector interrupts \(interrupts)")
        guard same else { throw ValidationError("the data read back differs from the pattern written") }
        guard interrupts > 0 else { throw ValidationError("no MSI-X interrupt arrived on the queue's eventfd") }

        try device.transport.reset()
        print("reset status \(try device.transport.status())")
        device.transport.detach()
        print("detached")
    }
}
