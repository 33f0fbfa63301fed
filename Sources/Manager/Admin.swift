import CLinux
import Logging
import OutboardRings
import OutboardSession
import OutboardSystem

#if canImport(Glibc)
import Glibc
#endif

// Admin: status reports and fault injection, for the uids the config names.

extension Manager {
    func isAdmin(_ c: Connection) -> Bool { config.adminUids.contains(c.credentials.uid) }

    func sendStatus(_ c: Connection) {
        guard isAdmin(c) else { return refuse(c, .permissionDenied, "uid \(c.credentials.uid) may not read status") }
        let json = StatusReport(manager: self).json()
        do { try c.socket.send(.statusReport(json), nonBlocking: true) } catch { logger.warning("cannot send status: \(error)") }
    }

    func injectFault(_ c: Connection, device: String, fault: FaultKind, argument: UInt64) {
        guard isAdmin(c) else { return refuse(c, .permissionDenied, "uid \(c.credentials.uid) may not inject faults") }
        guard let d = devices.first(where: { $0.name == device }) else { return refuse(c, .unknownDevice, "no device named '\(device)'") }
        guard let drv = d.driver, drv.ready, drv.killReason == nil else {
            return refuse(c, .busy, "device '\(device)' has no running driver (state \(d.state))")
        }
        guard argument == 0 || fault == .strayDMA else {
            return refuse(c, .invalidArgument, "fault \(fault) takes no argument")
        }
        if fault == .badRing, d.config.transport == .memory {
            return refuse(c, .invalidArgument, "fault bad-ring is for virtio devices; '\(device)' is memory")
        }
        if fault == .badRing, d.config.deviceClass == .net {
            // DPDK's vhost backend answers a bad available-ring entry by stalling the queue
            // without a word (no used entry, no disconnect), and the net driver has no stall
            // watchdog yet: the fault would stop the port for good.
            return refuse(c, .invalidArgument, "fault bad-ring is not offered for net devices (the vhost-user net backend stalls the queue silently)")
        }
        if fault == .strayDMA, d.config.transport != .vfio {
            return refuse(c, .invalidArgument, "fault stray-dma is for devices behind an IOMMU (transport vfio); '\(device)' is \(d.config.transport.rawValue)")
        }
        if fault == .strayDMA, argument != 0, let reason = d.grantedIOAddress(argument) {
            // A fault injection must not become a way to write into someone's memory.
            return refuse(c, .invalidArgument, "stray-dma at 0x\(String(argument, radix: 16)) would reach \(reason)")
        }
        logger.notice("injecting fault", metadata: ["device": "\(device)", "fault": "\(fault)", "pid": "\(drv.child.pid)"])
        switch fault {
        case .kill: try? drv.child.signal(SIGKILL)
        case .segfault: try? drv.child.signal(SIGSEGV)
        case .hang: try? drv.child.signal(SIGSTOP)
        case .abort: d.table.requestAbort(generation: d.generation)
        case .strayDMA: d.table.requestStrayDMA(at: IOAddress(rawValue: argument))
        case .badRing: d.table.requestBadRing()
        }
        try? c.socket.send(.faultInjected(generation: d.generation, pid: drv.child.pid), nonBlocking: true)
    }
}
