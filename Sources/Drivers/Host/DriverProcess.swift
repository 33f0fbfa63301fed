import OutboardSession
import OutboardSystem
import VFIO
import VhostUser
import Virtio
import VirtioPCI

#if canImport(Glibc)
import Glibc
#endif

/// The driver process (`outboard _driver`, started by the manager only; its control
/// socket is descriptor 3): the sandbox first, before a single byte from anyone else is
/// read, then the driver host with the device logic its kind names.
public enum DriverProcess {
    /// Device logic a driver process can run: a class over a transport.
    public enum Kind: Sendable, CaseIterable {
        case memoryBlock
        case virtioBlkVhostUser
        case virtioBlkVFIO
        case virtioNetVhostUser

        /// As the manager names them on the command line (`--transport`, `--class`).
        public init?(transport: String, deviceClass: String) {
            switch (transport, deviceClass) {
            case ("memory", "block"): self = .memoryBlock
            case ("vhost-user", "block"): self = .virtioBlkVhostUser
            case ("vfio", "block"): self = .virtioBlkVFIO
            case ("vhost-user", "net"): self = .virtioNetVhostUser
            default: return nil
            }
        }
    }

    public struct Options: Sendable {
        public var kind: Kind
        public var device: String
        public var sandbox: SandboxPolicy
        public var probeSandbox: Bool
        public var exitAtStart: Bool
        /// Test knob: exit at start with this classification (test_exit_recovery).
        public var exitRecovery: Recovery?
        public init(kind: Kind, device: String, sandbox: SandboxPolicy, probeSandbox: Bool, exitAtStart: Bool,
                    exitRecovery: Recovery? = nil) {
            self.kind = kind; self.device = device; self.sandbox = sandbox
            self.probeSandbox = probeSandbox; self.exitAtStart = exitAtStart; self.exitRecovery = exitRecovery
        }
    }

    /// Runs the driver; returns the process's exit status (`DriverExit`).
    public static func main(_ o: Options) -> Int32 {
        // The kernel objects a driver needs and its filter refuses to create (epoll_create1,
        // eventfd2) are made first, before anything is read, so the filter allows no extras.
        let epoll: Epoll
        do { epoll = try Epoll() } catch {
            log(o, "cannot create its epoll set: \(error)")
            return DriverExit.status(for: .restartDriver)
        }
        var link: VhostUserTransport? = nil
        var pci: VirtioPCITransport<VFIODevice>? = nil
        var policy = o.sandbox
        do {
            switch o.kind {
            case .memoryBlock: break
            case .virtioBlkVhostUser: link = try VhostUserTransport(queues: 1)
            case .virtioNetVhostUser:
                // DPDK's vhost backend maps (and pre-faults) every region of SET_MEM_TABLE
                // before it answers: tens of milliseconds, more on a loaded machine.
                link = try VhostUserTransport(queues: 2, replyTimeoutMilliseconds: 400)
            case .virtioBlkVFIO:
                pci = try VirtioPCITransport(queues: 1)
                // The device fd's own ioctls (regions, interrupts, reset), argument-checked:
                // nothing that maps DMA, which is the manager's.
                policy.allowedIoctls = Sandbox.vfioDeviceIoctls
            }
        } catch {
            log(o, "cannot create its doorbells: \(error)")
            return DriverExit.status(for: .restartDriver)
        }
        // Registered for clients' heavy barriers (membarrier(2)), so that a client that waits
        // rarely spares the driver a fence per completion batch. Registering is refused
        // inside the sandbox; without it, the completion queues keep their fences.
        do { try Membarrier.register() } catch {
            log(o, "membarrier registration refused (\(error)); completion queues use fences only")
        }
        do {
            try Sandbox.enter(policy)
        } catch {
            log(o, "cannot enter sandbox: \(error)")
            return DriverExit.status(for: .failDevice)
        }
        if let r = o.exitRecovery {
            log(o, "exiting at start as '\(r)' (test_exit_recovery)")
            return DriverExit.status(for: r)
        }
        if o.exitAtStart {
            log(o, "exiting at start (test_exit_at_start)")
            return 1
        }
        let probes = o.probeSandbox ? Sandbox.probe(otherProcess: getppid()).map { "\($0.name) \($0.errno)" } : []
        let socket = UnixSocket(adopting: OwnedFD(adopting: 3))
        do throws(DriverError) {
            switch o.kind {
            case .memoryBlock:
                var host = try DriverHost<MemBlockServer, BlockServerEndpoint>(manager: socket, epoll: epoll, probes: probes) {
                    (cfg, memory, ctx) throws(DriverError) in try MemBlockServer(start: cfg, memory: memory, context: ctx)
                }
                try host.run()
            case .virtioBlkVhostUser:
                var host = try DriverHost<VirtioBlkServer<VhostUserTransport>, BlockServerEndpoint>(manager: socket, epoll: epoll, probes: probes) {
                    (cfg, memory, ctx) throws(DriverError) in
                    guard let l = link.take() else { throw .setup("the device link was used already") }
                    return try VirtioBlkServer(start: cfg, memory: memory, link: l, context: ctx)
                }
                try host.run()
            case .virtioBlkVFIO:
                var host = try DriverHost<VirtioBlkServer<VirtioPCITransport<VFIODevice>>, BlockServerEndpoint>(manager: socket, epoll: epoll, probes: probes) {
                    (cfg, memory, ctx) throws(DriverError) in
                    guard let l = pci.take() else { throw .setup("the device link was used already") }
                    return try VirtioBlkServer(start: cfg, memory: memory, link: l, context: ctx)
                }
                try host.run()
            case .virtioNetVhostUser:
                var host = try DriverHost<VirtioNetServer<VhostUserTransport>, NetServerEndpoint>(manager: socket, epoll: epoll, probes: probes) {
                    (cfg, memory, ctx) throws(DriverError) in
                    guard let l = link.take() else { throw .setup("the device link was used already") }
                    return try VirtioNetServer(start: cfg, memory: memory, link: l, context: ctx)
                }
                try host.run()
            }
        } catch {
            log(o, "\(error) (\(error.recovery))")
            return DriverExit.status(for: error.recovery)
        }
        return 0
    }

    static func log(_ o: Options, _ s: String) {
        var bytes = Array("outboard driver \(o.device): \(s)\n".utf8)
        _ = Glibc.write(2, &bytes, bytes.count)
    }
}
