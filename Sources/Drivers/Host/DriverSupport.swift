import OutboardRings
import OutboardSession
import OutboardSystem

// What every driver process shares: its errors, how it maps what the manager sends, its
// epoll set, and the lease margin.

public enum DriverError: RecoverableError, CustomStringConvertible {
    /// What the manager sent cannot be served (bad parameters, a region that does not map):
    /// a new driver would get the same.
    case setup(String)
    /// The driver cannot go on (its epoll set failed, the manager spoke out of protocol).
    case fatal(String)

    public var recovery: Recovery {
        switch self {
        case .setup: return .failDevice
        case .fatal: return .restartDriver
        }
    }
    public var description: String {
        switch self {
        case .setup(let s): return "driver setup failed: \(s)"
        case .fatal(let s): return "driver failed: \(s)"
        }
    }
}

/// The drivers' flat view of DriverStart's transport and class parameters (a field of
/// the other transport reads as zero; `start` checks the transport first).
extension DriverStart {
    var block: BlockParameters {
        if case .block(let b) = deviceClass { return b }
        return BlockParameters(blockSize: 0, blockCount: 0, maxTransfer: 0)
    }
    var net: NetParameters? {
        if case .net(let n) = deviceClass { return n }
        return nil
    }
    var blockSize: UInt32 { block.blockSize }
    var blockCount: UInt64 { block.blockCount }
    var maxTransfer: UInt32 { block.maxTransfer }
    var latencyMicroseconds: UInt32 {
        if case .memory(let l) = transport { return l }
        return 0
    }
    var virtio: VirtioParameters? { transport.virtio }
    var queueSize: UInt32 { virtio?.queueSize ?? 0 }
    var notifyMode: NotifyMode { virtio?.notifyMode ?? .eventIndex }
    var pollMicroseconds: UInt32 { virtio?.pollMicroseconds ?? 0 }
    var dmaIOAddress: IOAddress { virtio?.dmaIOAddress ?? IOAddress(rawValue: 0) }
}

/// A transfer starts only with at least this much lease left on its region (a 1 MiB copy
/// takes well under a millisecond, a device request a few hundred microseconds); the
/// manager adds a grace period of its own.
let leaseMargin: UInt64 = 20_000_000

/// Maps a region the manager sent, which must be sealed and at least `size` bytes.
func mapRegion(_ fd: consuming OwnedFD, _ size: Int, _ access: SharedMapping.Access, _ what: String) throws(DriverError) -> SharedMapping {
    do { return try SharedRegion(adopting: fd, minimumSize: size).map(access) } catch {
        throw .setup("mapping the \(what): \(error)")
    }
}

/// The next message from the manager, without blocking: nil when none is waiting, or when
/// the manager closed the socket (then `closed` is set: the driver should exit). The
/// manager is trusted; a message we cannot read means a version skew or a bug, which is
/// fatal (the manager restarts us).
func nextManagerMessage(_ manager: borrowing UnixSocket, closed: inout Bool) throws(DriverError) -> ControlDelivery? {
    do {
        return try manager.receiveControl(nonBlocking: true)
    } catch .socket(.system(.wouldBlock)) {
        return nil
    } catch .socket(.closed) {
        closed = true
        return nil
    } catch {
        throw .fatal("bad message from manager: \(error)")
    }
}
