import Glibc
import OutboardRings
import VFIO
import Virtio
import VirtioPCI

/// A modern virtio-pci device (virtio 1.2 §4.1) in process, written from the spec: a PCI
/// configuration space with a capability list, one memory BAR holding the common
/// configuration (page 0), the ISR status (page 1), the device configuration (page 2) and
/// the notification window (page 3), and MSI-X routing that is recorded. The BAR is trapped
/// memory (Trap.swift): the model sees each access of the transport and answers as a
/// device's registers do (the selectors choose what device_feature and the queue fields
/// show, a reset clears the status, a refused vector reads NO_VECTOR).
///
/// Tests shape the device (its capabilities, features, faults) before `attach`, and read
/// what it saw afterwards from the model, never from the BAR.
struct VirtioPCIModel {
    static let barIndex = 4
    static let barSize = 0x4000
    static let commonOffset = 0x0000
    static let isrOffset = 0x1000
    static let deviceOffset = 0x2000
    static let notifyOffset = 0x3000

    /// A capability as the double puts it in configuration space.
    struct Cap {
        var id: UInt8 = PCIConfigOffset.capabilityVendor
        var type: UInt8
        var bar = UInt8(VirtioPCIModel.barIndex)
        var offset: UInt32
        var length: UInt32
        var multiplier: UInt32? = nil
        /// The cap_len byte; nil: the right one.
        var capLength: UInt8? = nil
    }

    struct Queue {
        var size: UInt16
        var vector: UInt16 = VirtioPCICommon.noVector
        var enable: UInt16 = 0
        var notifyOff: UInt16
        var desc: UInt64 = 0
        var driver: UInt64 = 0
        var device: UInt64 = 0
    }

    enum ResetBehaviour { case immediate, afterReads(Int), never }

    // Shape (set by tests before attach).
    var caps: [Cap]
    var deviceFeatures: UInt64 = VirtioFeature.version1 | VirtioFeature.accessPlatform | VirtioBlkFeature.flush
    var deviceConfig = [UInt8](repeating: 0, count: 64)
    var maxQueueSize: UInt16 = 256
    var msixVectors = 2
    var barSize = VirtioPCIModel.barSize
    var resetBehaviour = ResetBehaviour.immediate
    var refuseVectors = false
    /// Refuses only the queues' vectors (the configuration vector is taken).
    var refuseQueueVectors = false
    var refuseFeatures = false
    /// The next this many device configuration reads each bump config_generation.
    var generationBumps = 0
    /// The device left the bus: everything reads all-ones.
    var gone = false

    // State.
    var config = [UInt8](repeating: 0, count: 256)
    var status: UInt8 = 0
    var statusWrites: [UInt8] = []
    /// Bus mastering in the command register (set by config writes) and the order of
    /// events that matter to DMA: "bus-master on", "bus-master off", "status 0x..".
    var busMaster = false
    var events: [String] = []
    var deviceFeatureSelect: UInt32 = 0
    var driverFeatureSelect: UInt32 = 0
    var driverFeatures: UInt64 = 0
    var configVector: UInt16 = VirtioPCICommon.noVector
    var generation: UInt8 = 0
    var queueSelect: UInt16 = 0
    var queues: [Queue]
    var resetsPending = 0
    var deviceConfigReads = 0
    var statusReads = 0
    /// (offset in the notification window, the 16-bit value stored).
    var notifications: [(offset: Int, value: UInt16)] = []
    var routed: [CInt] = []
    var routeCalls = 0
    var functionResets = 0
    var configWrites: [(offset: Int, bytes: [UInt8])] = []
    var accesses = 0
    /// Queue 0's device-side indices, for tests that run a `TestDevice` over its rings.
    var lastAvail: UInt16 = 0
    var usedIdx: UInt16 = 0

    var bar: UnsafeMutableRawPointer

    init(queues: Int = 1, multiplier: UInt32 = 4) {
        caps = [
            Cap(type: VirtioPCICapabilityType.common.rawValue, offset: UInt32(Self.commonOffset), length: 0x38),
            Cap(type: VirtioPCICapabilityType.notify.rawValue, offset: UInt32(Self.notifyOffset), length: 0x1000,
                multiplier: multiplier),
            Cap(type: VirtioPCICapabilityType.isr.rawValue, offset: UInt32(Self.isrOffset), length: 1),
            Cap(type: VirtioPCICapabilityType.device.rawValue, offset: UInt32(Self.deviceOffset), length: 64),
        ]
        self.queues = (0..<queues).map { Queue(size: 256, notifyOff: UInt16($0)) }
        msixVectors = queues + 1
        bar = mmap(nil, Self.barSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
    }

    /// Lays out configuration space: header, an MSI-X capability, then `caps` in order.
    mutating func buildConfig() {
        config = [UInt8](repeating: 0, count: 256)
        func put16(_ o: Int, _ v: UInt16) { config[o] = UInt8(v & 0xFF); config[o + 1] = UInt8(v >> 8) }
        func put32(_ o: Int, _ v: UInt32) { for k in 0..<4 { config[o + k] = UInt8(truncatingIfNeeded: v >> (8 * k)) } }
        put16(PCIConfigOffset.vendorID, PCIConfigOffset.virtioVendor)
        put16(PCIConfigOffset.deviceID, 0x1042)
        put16(PCIConfigOffset.status, PCIConfigOffset.statusCapabilityList)
        config[PCIConfigOffset.capabilitiesPointer] = 0x40
        config[0x40] = PCIConfigOffset.capabilityMSIX
        put16(0x42, UInt16(max(0, msixVectors - 1)))
        var at = 0x4C
        config[0x41] = UInt8(at)
        for (k, c) in caps.enumerated() {
            let len = c.multiplier != nil ? 20 : 16
            config[at] = c.id
            let next = k == caps.count - 1 ? 0 : at + len
            config[at + 1] = UInt8(next)
            config[at + 2] = c.capLength ?? UInt8(len)
            config[at + 3] = c.type
            config[at + 4] = c.bar
            put32(at + 8, c.offset)
            put32(at + 12, c.length)
            if let m = c.multiplier { put32(at + 16, m) }
            at = next
        }
    }

    // MARK: the BAR

    func load16(_ o: Int) -> UInt16 { UInt16(littleEndian: (bar + o).loadUnaligned(as: UInt16.self)) }
    func load32(_ o: Int) -> UInt32 { UInt32(littleEndian: (bar + o).loadUnaligned(as: UInt32.self)) }
    func load64(_ o: Int) -> UInt64 { UInt64(load32(o)) | UInt64(load32(o + 4)) << 32 }
    func store8(_ o: Int, _ v: UInt8) { (bar + o).storeBytes(of: v, as: UInt8.self) }
    func store16(_ o: Int, _ v: UInt16) { (bar + o).storeBytes(of: v.littleEndian, toByteOffset: 0, as: UInt16.self) }
    func store32(_ o: Int, _ v: UInt32) { (bar + o).storeBytes(of: v.littleEndian, toByteOffset: 0, as: UInt32.self) }
    func store64(_ o: Int, _ v: UInt64) { store32(o, UInt32(truncatingIfNeeded: v)); store32(o + 4, UInt32(v >> 32)) }

    /// After one access at `offset`: a store changes the model; then the registers show
    /// the model's state again.
    mutating func access(at offset: Int, wrote: Bool) {
        accesses += 1
        if gone {
            publish()
            return
        }
        let c = offset - Self.commonOffset
        if offset >= Self.commonOffset && offset < Self.isrOffset {
            if wrote { commonWrite(c) } else if c == VirtioPCICommon.deviceStatus { statusRead() }
        } else if offset >= Self.deviceOffset && offset < Self.notifyOffset, !wrote {
            deviceConfigReads += 1
            if generationBumps > 0 {
                generationBumps -= 1
                generation &+= 1
            }
        } else if offset >= Self.notifyOffset, wrote {
            notifications.append((offset - Self.notifyOffset, load16(offset)))
        }
        publish()
    }

    mutating func commonWrite(_ c: Int) {
        let q = Int(queueSelect)
        switch c {
        case VirtioPCICommon.deviceFeatureSelect: deviceFeatureSelect = load32(c)
        case VirtioPCICommon.driverFeatureSelect: driverFeatureSelect = load32(c)
        case VirtioPCICommon.driverFeature:
            let v = UInt64(load32(c))
            switch driverFeatureSelect {
            case 0: driverFeatures = driverFeatures & ~0xFFFF_FFFF | v
            case 1: driverFeatures = driverFeatures & 0xFFFF_FFFF | v << 32
            default: break
            }
        case VirtioPCICommon.configMSIXVector:
            let v = load16(c)
            configVector = refuseVectors || Int(v) >= msixVectors ? VirtioPCICommon.noVector : v
        case VirtioPCICommon.deviceStatus:
            let v = (bar + c).load(as: UInt8.self)
            statusWrites.append(v)
            events.append("status 0x" + String(v, radix: 16))
            if v == 0 {
                deviceReset()
            } else {
                var s = v
                if refuseFeatures || driverFeatures & ~deviceFeatures != 0 { s &= ~DeviceStatus.featuresOK.rawValue }
                status = s
            }
        case VirtioPCICommon.queueSelect: queueSelect = load16(c)
        case VirtioPCICommon.queueSize where q < queues.count: queues[q].size = load16(c)
        case VirtioPCICommon.queueMSIXVector where q < queues.count:
            let v = load16(c)
            queues[q].vector = refuseVectors || refuseQueueVectors || Int(v) >= msixVectors ? VirtioPCICommon.noVector : v
        case VirtioPCICommon.queueEnable where q < queues.count: queues[q].enable = load16(c)
        case VirtioPCICommon.queueDesc, VirtioPCICommon.queueDesc + 4:
            if q < queues.count { queues[q].desc = load64(VirtioPCICommon.queueDesc) }
        case VirtioPCICommon.queueDriver, VirtioPCICommon.queueDriver + 4:
            if q < queues.count { queues[q].driver = load64(VirtioPCICommon.queueDriver) }
        case VirtioPCICommon.queueDevice, VirtioPCICommon.queueDevice + 4:
            if q < queues.count { queues[q].device = load64(VirtioPCICommon.queueDevice) }
        default: break  // read-only fields: the next publish restores them
        }
    }

    mutating func deviceReset() {
        switch resetBehaviour {
        case .immediate: resetState()
        case .afterReads(let n): resetsPending = n
        case .never: break
        }
    }

    mutating func resetState() {
        status = 0
        driverFeatures = 0
        configVector = VirtioPCICommon.noVector
        for i in queues.indices {
            queues[i] = Queue(size: maxQueueSize, notifyOff: queues[i].notifyOff)
        }
    }

    mutating func statusRead() {
        statusReads += 1
        if resetsPending > 0 {
            resetsPending -= 1
            if resetsPending == 0 { resetState() }
        }
    }

    /// Writes the registers as the model's state says.
    mutating func publish() {
        if gone {
            bar.initializeMemory(as: UInt8.self, repeating: 0xFF, count: Self.barSize)
        } else {
            let c = Self.commonOffset
            store32(c + VirtioPCICommon.deviceFeatureSelect, deviceFeatureSelect)
            let word: UInt32 = switch deviceFeatureSelect {
            case 0: UInt32(truncatingIfNeeded: deviceFeatures)
            case 1: UInt32(truncatingIfNeeded: deviceFeatures >> 32)
            default: 0
            }
            store32(c + VirtioPCICommon.deviceFeature, word)
            store32(c + VirtioPCICommon.driverFeatureSelect, driverFeatureSelect)
            let driverWord: UInt32 = switch driverFeatureSelect {
            case 0: UInt32(truncatingIfNeeded: driverFeatures)
            case 1: UInt32(truncatingIfNeeded: driverFeatures >> 32)
            default: 0
            }
            store32(c + VirtioPCICommon.driverFeature, driverWord)
            store16(c + VirtioPCICommon.configMSIXVector, configVector)
            store16(c + VirtioPCICommon.numQueues, UInt16(queues.count))
            store8(c + VirtioPCICommon.deviceStatus, status)
            store8(c + VirtioPCICommon.configGeneration, generation)
            store16(c + VirtioPCICommon.queueSelect, queueSelect)
            let q = Int(queueSelect) < queues.count ? queues[Int(queueSelect)] : Queue(size: 0, notifyOff: 0)
            store16(c + VirtioPCICommon.queueSize, q.size)
            store16(c + VirtioPCICommon.queueMSIXVector, q.vector)
            store16(c + VirtioPCICommon.queueEnable, q.enable)
            store16(c + VirtioPCICommon.queueNotifyOff, q.notifyOff)
            store64(c + VirtioPCICommon.queueDesc, q.desc)
            store64(c + VirtioPCICommon.queueDriver, q.driver)
            store64(c + VirtioPCICommon.queueDevice, q.device)
            let dc = deviceConfig
            for (k, b) in dc.enumerated() where k < 0x1000 { store8(Self.deviceOffset + k, b) }
            (bar + Self.notifyOffset).initializeMemory(as: UInt8.self, repeating: 0, count: 0x1000)
        }
    }

    /// Raises MSI-X vector `v`: its routed eventfd is signalled, as VFIO does.
    func fire(vector v: Int) -> Bool {
        guard v < routed.count, routed[v] >= 0 else { return false }
        var one: UInt64 = 1
        return write(routed[v], &one, 8) == 8
    }
}

let modelAccess: TrapAccess = { context, offset, wrote in
    context!.assumingMemoryBound(to: VirtioPCIModel.self).pointee.access(at: offset, wrote: wrote)
}

/// The PCI function the transport attaches: configuration space from the model, BAR 4
/// trapped, MSI-X routing recorded.
struct PCIFunctionDouble: ~Copyable, PCIFunction {
    let model: UnsafeMutablePointer<VirtioPCIModel>

    mutating func readConfig(offset: Int, count: Int) throws(PCIError) -> [UInt8] {
        guard offset >= 0, count >= 0, offset + count <= 4096 else { throw .unsupported("config range \(offset)+\(count)") }
        if model.pointee.gone { return [UInt8](repeating: 0xFF, count: count) }
        return (offset..<(offset + count)).map { $0 < model.pointee.config.count ? model.pointee.config[$0] : 0 }
    }

    mutating func writeConfig(offset: Int, bytes: [UInt8]) throws(PCIError) {
        model.pointee.configWrites.append((offset, bytes))
        if offset <= 4, offset + bytes.count > 4 {
            let on = bytes[4 - offset] & 0x04 != 0
            if on != model.pointee.busMaster { model.pointee.events.append(on ? "bus-master on" : "bus-master off") }
            model.pointee.busMaster = on
        }
        for (k, b) in bytes.enumerated() where offset + k < model.pointee.config.count { model.pointee.config[offset + k] = b }
    }

    mutating func mapBAR(_ index: Int) throws(PCIError) -> MappedBAR {
        guard index == VirtioPCIModel.barIndex else { throw .unsupported("BAR \(index)") }
        return MappedBAR(index: index, base: model.pointee.bar, size: model.pointee.barSize)
    }

    mutating func msixVectorCount() throws(PCIError) -> Int { model.pointee.msixVectors }

    mutating func routeMSIX(to eventfds: [CInt]) throws(PCIError) {
        model.pointee.routed = eventfds
        model.pointee.routeCalls += 1
    }

    mutating func resetFunction() throws(PCIError) -> Bool {
        model.pointee.functionResets += 1
        return false
    }
}

/// Runs `body` with a model shaped by `shape`, its BAR trapped; the BAR is unmapped after.
func withDevice<R>(queues: Int = 1, multiplier: UInt32 = 4, _ shape: (inout VirtioPCIModel) -> Void = { _ in },
                   _ body: (UnsafeMutablePointer<VirtioPCIModel>) throws -> R) rethrows -> R {
    let model = UnsafeMutablePointer<VirtioPCIModel>.allocate(capacity: 1)
    model.initialize(to: VirtioPCIModel(queues: queues, multiplier: multiplier))
    shape(&model.pointee)
    model.pointee.buildConfig()
    model.pointee.resetState()
    model.pointee.publish()
    armTrap(base: model.pointee.bar, size: VirtioPCIModel.barSize, context: UnsafeMutableRawPointer(model), access: modelAccess)
    defer {
        disarmTrap()
        munmap(model.pointee.bar, VirtioPCIModel.barSize)
        model.deinitialize(count: 1)
        model.deallocate()
    }
    return try body(model)
}
