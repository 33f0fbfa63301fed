import ArgumentParser
import Drivers
import FoundationEssentials
import Logging
import Manager
import Outboard
import OutboardSession
import OutboardSystem

#if canImport(Glibc)
import Glibc
#endif

/// `outboard run --config FILE`: the manager, in the foreground.
struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run the manager: attach the configured devices, start their drivers, serve clients (needs root)."
    )

    @Option(help: "The configuration file (JSON; see examples/outboard.json).")
    var config: String

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    func run() throws {
        guard let level = Logger.Level(rawValue: logLevel) else { throw ValidationError("unknown log level '\(logLevel)'") }
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        let logger = Logger(label: "outboard.manager")
        let cfg = try ManagerConfig.load(path: config)
        let manager = try Manager(config: cfg, executable: currentExecutable(), logger: logger)
        try manager.run()
    }
}

/// Where a command finds the manager: `--socket`, or the config's control socket.
struct ManagerAddress: ParsableArguments {
    @Option(help: "The manager's configuration file (to find its control socket).")
    var config: String?

    @Option(help: "The manager's control socket.")
    var socket: String?

    func socketPath() throws -> String {
        if let socket { return socket }
        if let config { return try ManagerConfig.load(path: config).controlSocket }
        return ManagerConfig(devices: []).controlSocket
    }
}

/// `outboard status [--json]`.
struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show devices, drivers (pid, state, generation, restarts, last failure) and sessions."
    )

    @OptionGroup var address: ManagerAddress

    @Flag(help: "Print the manager's report as JSON.")
    var json = false

    func run() throws {
        let admin = try AdminConnection(socketPath: address.socketPath())
        let text = try admin.status()
        if json {
            print(text)
            return
        }
        let r = try StatusReport.decode(text)
        print("manager pid \(r.managerPid), socket \(r.socket)")
        print("devices:")
        for d in r.devices {
            let pid = d.pid.map { "\($0)" } ?? "-"
            print("  \(d.name)  \(d.deviceClass) over \(d.transport)  state \(d.state)  pid \(pid)  generation \(d.generation)  restarts \(d.restarts)  failures \(d.failures)")
            print("    registered \(d.registeredBytes)/\(d.maxDeviceBytes) bytes  revoked \(d.revokedIdle) idle, \(d.revokedAtLeaseEnd) at lease end")
            if let f = d.lastFailure { print("    last failure: \(f)") }
            if !d.sandboxProbes.isEmpty { print("    sandbox probes: \(d.sandboxProbes.joined(separator: ", "))") }
        }
        print("sessions:")
        if r.sessions.isEmpty { print("  none") }
        for s in r.sessions {
            print("  \(s.id)  device \(s.device)  client pid \(s.clientPid) uid \(s.clientUid)  \(s.writable ? "rw" : "ro")  \(s.state)  registered \(s.registeredBytes) bytes  lease expires in \(s.leaseExpiresInMs) ms")
        }
    }
}

/// `outboard _driver`: a driver process. Started by the manager only: its control socket is fd 3.
struct DriverCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "_driver", shouldDisplay: false)

    @Option var transport: String
    @Option(name: .customLong("class")) var deviceClass: String
    @Option var device: String
    @Option var uid: UInt32
    @Option var gid: UInt32
    @Option var maxOpenFiles: UInt64 = 64
    @Flag var noNamespaces = false
    @Flag var probeSandbox = false
    @Flag var testExitAtStart = false
    @Option var testExitRecovery: String?

    func run() throws {
        // The sandbox comes first, before a single byte from anyone else is read.
        // No file size limit: the driver cannot open files, and its stderr (inherited from
        // the manager) may be a log file, where a limit of 0 would mean SIGXFSZ on the first
        // message.
        // The kernel objects a driver needs and its filter would refuse to create (epoll_create1,
        // eventfd2) are made first, before anything is read, so the filter allows no extras.
        let epoll: Epoll
        var kick: Doorbell? = nil, call: Doorbell? = nil
        do {
            epoll = try Epoll()
            if transport == "vhost-user" {
                kick = try Doorbell()
                call = try Doorbell()
            }
        } catch {
            writeStderr("outboard driver \(device): cannot create its epoll or doorbells: \(error)\n")
            Glibc.exit(3)
        }
        // Registered for clients' heavy barriers (membarrier(2)), so that a client that waits
        // rarely spares the driver a fence per completion batch. Registering is refused
        // inside the sandbox; without it, the completion queues keep their fences.
        do { try Membarrier.register() } catch {
            writeStderr("outboard driver \(device): membarrier registration refused (\(error)); completion queues use fences only\n")
        }
        let policy = SandboxPolicy(uid: uid, gid: gid, isolateNamespaces: !noNamespaces, maxOpenFiles: maxOpenFiles,
                                   maxFileSize: .max)
        do {
            try Sandbox.enter(policy)
        } catch {
            writeStderr("outboard driver \(device): cannot enter sandbox: \(error)\n")
            Glibc.exit(3)
        }
        if let name = testExitRecovery, let r = Recovery(configName: name) {
            writeStderr("outboard driver \(device): exiting at start as '\(r)' (test_exit_recovery)\n")
            Glibc.exit(DriverExit.status(for: r))
        }
        if testExitAtStart {
            writeStderr("outboard driver \(device): exiting at start (test_exit_at_start)\n")
            Glibc.exit(1)
        }
        let probes = probeSandbox ? Sandbox.probe(otherProcess: getppid()).map { "\($0.name) \($0.errno)" } : []
        let socket = UnixSocket(adopting: OwnedFD(adopting: 3))
        do {
            switch (transport, deviceClass) {
            case ("memory", "block"):
                var driver = try MemBlockDriver.start(manager: socket, epoll: epoll, probes: probes)
                try driver.run()
            case ("vhost-user", "block"):
                var driver = try VirtioBlkDriver.start(manager: socket, epoll: epoll, kick: kick.take()!, call: call.take()!,
                                                       probes: probes)
                try driver.run()
            default:
                writeStderr("outboard driver \(device): no driver for class \(deviceClass) over transport \(transport)\n")
                Glibc.exit(DriverExit.status(for: .fatal))
            }
        } catch {
            // The exit status carries the error's classification for the supervisor
            // (DriverExit); an unclassified error asks for a new driver.
            let recovery = (error as? RecoverableError)?.recovery ?? .restartDriver
            writeStderr("outboard driver \(device): \(error) (\(recovery))\n")
            Glibc.exit(DriverExit.status(for: recovery))
        }
        Glibc.exit(0)
    }
}

func writeStderr(_ s: String) {
    var bytes = Array(s.utf8)
    _ = Glibc.write(2, &bytes, bytes.count)
}
