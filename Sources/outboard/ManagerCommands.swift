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
        guard let k = DriverProcess.Kind(transport: transport, deviceClass: deviceClass) else {
            writeStderr("outboard driver \(device): no driver for class \(deviceClass) over transport \(transport)\n")
            Glibc.exit(DriverExit.status(for: .fatal))
        }
        // No file size limit: the driver cannot open files, and its stderr (inherited from
        // the manager) may be a log file, where a limit of 0 would mean SIGXFSZ on the first
        // message.
        let policy = SandboxPolicy(uid: uid, gid: gid, isolateNamespaces: !noNamespaces, maxOpenFiles: maxOpenFiles,
                                   maxFileSize: .max)
        Glibc.exit(DriverProcess.main(.init(kind: k, device: device, sandbox: policy, probeSandbox: probeSandbox,
                                            exitAtStart: testExitAtStart,
                                            exitRecovery: testExitRecovery.flatMap { Recovery(configName: $0) })))
    }
}

func writeStderr(_ s: String) {
    var bytes = Array(s.utf8)
    _ = Glibc.write(2, &bytes, bytes.count)
}
