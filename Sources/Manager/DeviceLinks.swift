import Logging
import OutboardSession
import OutboardSystem
import SystemPackage
import VFIO

/// How the manager links a device to its driver: one case per transport.
enum DeviceLink {
    /// The device is manager memory, sent with DriverStart: nothing to connect.
    case memory
    /// A vhost-user device: the driver, sandboxed, cannot open its socket, so the manager
    /// connects and hands the connection over, again whenever the driver reports it lost.
    case vhostUser(VhostUserLink)
    /// A PCI device behind an IOMMU: the manager binds it to vfio-pci, holds the container
    /// and hands the driver a device fd, again after every driver restart.
    case vfio(VFIOLink)

    /// The hand-off state of a device the driver is given a connection to.
    var handoff: DeviceHandoff? {
        switch self {
        case .memory: return nil
        case .vhostUser(let l): return l.handoff
        case .vfio(let l): return l.handoff
        }
    }

    var vfio: VFIOLink? {
        if case .vfio(let l) = self { return l }
        return nil
    }
}

/// What the manager tracks of the device connections it hands to a driver (a vhost-user
/// socket, a VFIO device fd). It keeps no copy of a vhost-user connection it handed over:
/// when the driver dies, the device sees the connection close and is free for the next
/// driver.
final class DeviceHandoff {
    let reconnectNs: UInt64
    /// The driver negotiated with the device over the current connection.
    var connected = false
    /// The current driver wants a (new) connection; tried at `retryAt`.
    var wanted = false
    var retryAt: UInt64 = 0
    var attempts: UInt64 = 0
    var made: UInt64 = 0
    var losses = 0

    init(reconnectMs: UInt32) {
        reconnectNs = UInt64(reconnectMs) * 1_000_000
    }

    /// A new driver: it needs a connection at once.
    func driverStarted() {
        connected = false
        wanted = true
        retryAt = 0
    }

    func driverGone() {
        connected = false
        wanted = false
    }

    /// The driver reported the connection unusable. `recovery` .retry waits the reconnect
    /// delay first (the device asked for patience); .reconnectDevice tries now, unless the
    /// connection it loses never got as far as the device's report (a set-up that fails
    /// every time would otherwise be retried in a busy loop).
    func lost(_ recovery: Recovery, now: UInt64) {
        let hadDevice = connected
        connected = false
        losses += 1
        wanted = true
        retryAt = recovery == .retry || !hadDevice ? now + reconnectNs : 0
    }
}

/// The manager's side of a vhost-user device: where to connect.
final class VhostUserLink {
    let path: String
    let handoff: DeviceHandoff

    init(path: String, reconnectMs: UInt32) {
        self.path = path
        handoff = DeviceHandoff(reconnectMs: reconnectMs)
    }
}

extension Manager {
    /// Gives the current driver a device connection if it wants one and one is due.
    /// Retried from `tick` while the device is absent.
    func linkDevice(_ d: DeviceState) {
        guard let h = d.link.handoff, h.wanted, let drv = d.driver, drv.killReason == nil else { return }
        let now = Clock.monotonicNanoseconds
        guard now >= h.retryAt else { return }
        h.attempts += 1
        switch d.link {
        case .memory:
            return
        case .vhostUser(let link):
            let fd: OwnedFD
            do {
                fd = try UnixSocket.connectStream(path: link.path)
            } catch {
                let why = "cannot connect to \(link.path): \(error)"
                if d.lastDeviceError != why {
                    logger.warning("\(why); retrying every \(d.config.reconnectMs) ms", metadata: ["device": "\(d.name)"])
                }
                d.lastDeviceError = why
                h.retryAt = now + h.reconnectNs
                return
            }
            handOver(d, drv, h, fd.raw)
        case .vfio(let link):
            do {
                try link.open(dma: d.memory, logger: logger)
                if let limit = link.opened?.sessionLimit { d.ioAddresses.limit = limit }
            } catch {
                // Binding a PCI device fails the same way on every try (a shared IOMMU
                // group, no IOMMU, no vfio-pci): the device fails, the manager and its
                // other devices carry on.
                failDevice(d, reason: "device '\(d.name)' at \(link.address): \(error)")
                return
            }
            do {
                try link.withDeviceDescriptor { fd in handOver(d, drv, h, fd) }
            } catch {
                // The device is bound; a new fd of it may work later (descriptors or memory
                // short for a moment).
                let why = "cannot open \(link.address) for its driver: \(error)"
                if d.lastDeviceError != why {
                    logger.warning("\(why); retrying every \(d.config.reconnectMs) ms", metadata: ["device": "\(d.name)"])
                }
                d.lastDeviceError = why
                h.retryAt = now + h.reconnectNs
            }
        }
    }

    private func handOver(_ d: DeviceState, _ drv: DriverProcess, _ h: DeviceHandoff, _ fd: FileDescriptor) {
        h.made += 1
        do {
            try drv.socket.send(.deviceConnection(attempt: h.made), descriptors: [fd], nonBlocking: true)
            h.wanted = false
        } catch {
            logger.warning("cannot hand the device connection to the driver of \(d.name): \(error)")
            stopDriver(d, drv, reason: "not reading its control socket")
        }
    }

    /// The driver negotiated with the device and says what it is. Checked as hostile
    /// input: a report of the wrong class, or one out of range, is the device refusing to
    /// be what the config says, which no restart changes: the device fails.
    func deviceReported(_ d: DeviceState, _ drv: DriverProcess, _ info: ClassInfo) {
        guard let link = d.link.handoff else {
            stopDriver(d, drv, reason: "deviceInfo from a driver whose device does not report itself")
            return
        }
        guard info.deviceClass == d.config.deviceClass else {
            failDevice(d, reason: "device '\(d.name)' reported class \(info.deviceClass), configured \(d.config.deviceClass)")
            return
        }
        switch info {
        case .block(let b):
            guard b.blockCount > 0, b.blockCount <= UInt64(1) << 55, b.blockSize >= 512, b.blockSize <= 65536,
                  b.blockSize.nonzeroBitCount == 1, b.maxTransfer >= UInt32(blockSectorSize),
                  DeviceFlags.known.isSuperset(of: b.flags) else {
                failDevice(d, reason: "device '\(d.name)' reported an unusable block device: \(b)")
                return
            }
            if case .block(let old)? = d.reported, old.blockCount != b.blockCount {
                logger.warning("device size changed", metadata: ["device": "\(d.name)", "was": "\(old.blockCount)", "now": "\(b.blockCount)"])
            }
            logger.info("device connected", metadata: ["device": "\(d.name)", "sectors": "\(b.blockCount)",
                                                       "block_size": "\(b.blockSize)", "flags": "\(b.flags)"])
        case .net(let n):
            guard !n.mac.isMulticast, NetInfo.mtuRange.contains(n.mtu) else {
                failDevice(d, reason: "device '\(d.name)' reported an unusable port: \(n)")
                return
            }
            logger.info("device connected", metadata: ["device": "\(d.name)", "mac": "\(n.mac)", "mtu": "\(n.mtu)",
                                                       "link": "\(n.linkUp ? "up" : "down")"])
        }
        d.reported = info
        link.connected = true
        d.lastDeviceError = nil
    }

    /// The driver lost (or was refused by) the device; `recovery` is its classification.
    func deviceLost(_ d: DeviceState, _ drv: DriverProcess, reason: String, recovery: Recovery) {
        guard let link = d.link.handoff else {
            stopDriver(d, drv, reason: "deviceLost from a driver whose device has no connection")
            return
        }
        d.lastDeviceError = reason
        logger.warning("device connection lost", metadata: ["device": "\(d.name)", "reason": "\(reason)", "recovery": "\(recovery)"])
        switch recovery {
        case .retry, .reconnectDevice:
            link.lost(recovery, now: Clock.monotonicNanoseconds)
            linkDevice(d)
        case .restartDriver:
            link.lost(recovery, now: Clock.monotonicNanoseconds)
            stopDriver(d, drv, reason: "device connection lost, driver asked for a restart: \(reason)")
        case .failDevice, .fatal:
            link.lost(recovery, now: Clock.monotonicNanoseconds)
            failDevice(d, reason: "device '\(d.name)' refused its driver: \(reason)")
        }
    }
}
