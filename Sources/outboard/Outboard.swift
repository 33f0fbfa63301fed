import ArgumentParser
import OutboardBench
import OutboardSystem

#if canImport(Glibc)
import Glibc
#endif

@main
struct Outboard: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "outboard",
        abstract: "User-level device drivers for Linux: isolated driver processes, shared-memory queues.",
        subcommands: [DemoCommand.self, RunCommand.self, StatusCommand.self, BlkCommand.self, NetCommand.self, FaultsCommand.self, CheckCommand.self, Bench.self, DriverCommand.self, RingWorkerCommand.self, NetLoadCommand.self, NetKernelCommand.self, SandboxProbeCommand.self, RefBlkCommand.self, VFIOInfoCommand.self]
    )
}

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure Outboard against a reference run in the same invocation.",
        subcommands: [RingBench.self, BlkBench.self, NetBench.self, GuestBench.self, GuestBenchRun.self]
    )
}

/// `outboard _ring-worker`: one side of a queue benchmark or test, started by RingHarness.
/// Not for people: it expects its set-up socket at fd 3.
struct RingWorkerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "_ring-worker", shouldDisplay: false)
    func run() throws {
        Glibc.exit(ringWorkerMain())
    }
}

/// Path of the running executable, for spawning worker processes of the same build.
func currentExecutable() -> String {
    var buf = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buf, buf.count - 1)
    guard n > 0 else { return CommandLine.arguments[0] }
    return String(decoding: buf.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
