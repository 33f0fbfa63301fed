import OutboardRings
import OutboardSession
import OutboardSystem

#if canImport(Glibc)
import Glibc
#endif

/// The memory block device: a region the manager owns, so its contents survive driver
/// restarts as a real disk's do. Requests are served at once, through the whole path
/// (client queues -> translation table -> "DMA" into the device), with an optional
/// emulated latency; it is what the manager's supervision, revocation and fault tests
/// run against.
struct MemBlockServer: ~Copyable, BlockDeviceServer {
    static var keepsDataDescriptors: Bool { false }
    let device: SharedMapping
    let limits: BlockLimits?
    let latencyMicroseconds: UInt32
    let heartbeatIntervalMs: UInt32

    init(start cfg: DriverStart, memory: consuming OwnedFD, context: borrowing BlockContext) throws(DriverError) {
        guard case .memory = cfg.transport else { throw .setup("the memory block driver got transport \(cfg.transport)") }
        guard cfg.blockSize == UInt32(blockSectorSize) else { throw .setup("block size \(cfg.blockSize): only 512 is served") }
        let bytes = cfg.blockCount.multipliedReportingOverflow(by: UInt64(blockSectorSize))
        guard !bytes.overflow, bytes.partialValue <= UInt64(Int.max / 2) else { throw .setup("device size overflows") }
        device = try mapRegion(memory, Int(bytes.partialValue), .readWrite, "device memory")
        limits = BlockLimits(blockCount: cfg.blockCount, maxTransfer: cfg.maxTransfer, flags: [.flush])
        latencyMicroseconds = cfg.latencyMicroseconds
        heartbeatIntervalMs = cfg.heartbeatIntervalMs
    }

    var room: Int { SessionTable.batch }
    var deviceConnected: Bool { true }

    mutating func start(_ r: BlockRequest, session i: Int, context: inout BlockContext) -> BlockStatus? {
        guard let op = BlockOp(rawValue: r.op) else { return .unsupported }
        // Memory is never cached: a flush has nothing to do. Nothing else but read and
        // write is offered (limits.flags), so nothing else comes here.
        guard op.hasBuffer else { return .ok }
        // The device's own time first; the translation is checked after it, right before
        // the transfer, so a lease that ends meanwhile is seen.
        if latencyMicroseconds > 0 { emulateLatency(context.page) }
        // The device writes into the client's buffer on a read.
        switch context.sessions.translate(i, offset: r.offset, length: r.length, deviceWrites: op == .read,
                                          table: context.table) {
        case .refused(let status):
            return status
        case .granted(_, let regionOffset):
            // "DMA": the IO address resolves to our mapping of that region.
            let buffer = context.sessions.block[i].data.base + regionOffset
            let disk = device.base + Int(r.sector * UInt64(blockSectorSize))
            if op == .read {
                buffer.copyMemory(from: disk, byteCount: Int(r.length))
            } else {
                disk.copyMemory(from: buffer, byteCount: Int(r.length))
            }
            return .ok
        }
    }

    /// Device latency, in slices short enough to keep the heartbeat going: a slow device
    /// is not a hung driver.
    func emulateLatency(_ page: DriverPage) {
        var left = Int(latencyMicroseconds)
        let slice = max(1000, Int(heartbeatIntervalMs) * 250)
        while left > 0 {
            let step = min(left, slice)
            usleep(UInt32(step))
            left -= step
            page.beat()
        }
    }

    mutating func publish(context: inout BlockContext) {}
    mutating func poll(context: inout BlockContext) -> Int {
        // Requests finish inside `start`; count them for the manager there.
        0
    }
    func shouldSpin(lastWork: UInt64) -> Bool { false }
    mutating func prepareDeviceToSleep() -> Bool { true }
    mutating func deviceWoke() {}
    mutating func event(_ token: UInt64, context: inout BlockContext) {}
    mutating func connect(_ fd: consuming OwnedFD, context: inout BlockContext) {
        _ = consume fd  // a memory device has no connection
    }
    mutating func attached(_ session: Int, context: inout BlockContext) -> String? { nil }
    mutating func removing(_ session: Int, context: inout BlockContext) {}
    mutating func forget(_ session: Int, context: inout BlockContext) {}
}
