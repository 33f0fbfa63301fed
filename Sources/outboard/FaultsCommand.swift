import ArgumentParser
import FoundationEssentials
import Manager
import Outboard
import OutboardBench
import OutboardSession
import OutboardSystem

#if canImport(Glibc)
import Glibc
#endif

/// `outboard faults`: a verified random read/write workload through a session while the
/// driver is killed, crashed, hung and made to abort, again and again.
struct FaultsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "faults",
        abstract: "Inject driver faults under a verified read/write workload and report recovery.",
        discussion: """
            Connects to the manager of --config (starting one for the run if none is listening), \
            opens a session on --device, keeps --depth requests in flight, and injects --faults \
            faults in turn: SIGKILL, SIGSEGV, a hang (SIGSTOP, found by the heartbeat) and an \
            abort() inside request handling. After each fault it waits until a request completes \
            under the new driver generation (the recovery time), then runs --ops-between more \
            operations. Every read is checked against the last acknowledged write.
            """
    )

    @Option(help: "The manager's configuration file.")
    var config: String?

    @Option(help: "The device to run on.")
    var device: String = "vblk0"

    @Flag(help: "Instead of --config: run against a virtio-blk device of a fresh qemu-storage-daemon, with a manager of its own, in a temporary directory (needs root).")
    var storageDaemon = false

    @Option(help: "With --storage-daemon: the driver's notification mode.")
    var notify: String = "adaptive"

    @Option(help: "Number of faults to inject.")
    var faults: Int = 20

    @Option(help: "Faults to inject, in turn, comma separated: kill, segv, hang, abort (each ends the driver), bad-ring (an available-ring entry naming no descriptor: the device refuses the queue, the driver resets or reconnects it and resubmits).")
    var kinds: ListOption<FaultName> = [FaultName(.kill), FaultName(.segfault), FaultName(.hang), FaultName(.abort)]

    @Option(help: "Operations between faults (after recovery).")
    var opsBetween: Int = 200

    @Option(help: "Requests in flight.")
    var depth: Int = 16

    @Option(help: "4 KiB blocks of the device the workload uses.")
    var blocks: Int = 2048

    @Option(help: "Seconds to wait for one recovery before giving up.")
    var recoveryTimeout: Int = 30

    @Option(help: "Random seed.")
    var seed: UInt64 = 1

    @Flag(help: "Print one JSON object.")
    var json = false

    func run() throws {
        if storageDaemon {
            guard config == nil else { throw ValidationError("give --config or --storage-daemon, not both") }
            installInterruptFlag()
            let lab = try Lab(name: "faults")
            defer { lab.remove() }
            try makeImage(path: lab.dir + "/disk.img", bytes: max(blocks * 4096, 64 << 20), fill: false)
            var daemon = try StorageDaemon(image: lab.dir + "/disk.img", sockets: [lab.dir + "/\(device).sock"])
            defer { daemon.stop() }
            let path = try lab.writeManagerConfig(device: device, socket: daemon.sockets[0], notify: notify)
            var manager = try ManagerProcess(config: path, socket: lab.controlSocket)
            defer { manager.stop() }
            try inject(socket: lab.controlSocket)
            return
        }
        guard let config else { throw ValidationError("give --config FILE (a running or startable manager) or --storage-daemon") }
        try withManager(config: config) { try inject(socket: $0) }
    }

    func inject(socket: String) throws {
        let admin = try AdminConnection(socketPath: socket)
        let session = try BlockSession.open(socketPath: socket, device: device, writable: true,
                                            dataBytes: depth * VerifiedWorkload.blockBytes, queueDepth: depth,
                                            waitMilliseconds: 20_000)
        var w = VerifiedWorkload(session: session, blocks: blocks, seed: seed)
        // A recovery may take as long as it is allowed to before the workload calls it a stall.
        w.stallLimitMilliseconds = max(w.stallLimitMilliseconds, recoveryTimeout * 1000)
        // Every block written once, so that earlier contents of the device do not matter.
        try w.prepare()
        try w.run(operations: opsBetween)
        let kinds = self.kinds.values.map(\.kind)
        var recovered = 0, injected = 0
        var recoveryMs: [Double] = []
        var byKind: [String: [Double]] = [:]
        var failure: String? = nil
        for i in 0..<faults {
            let kind = kinds[i % kinds.count]
            let t0 = Clock.monotonicNanoseconds
            // A fault that leaves the driver running is over when the device was lost and
            // is connected again, and a request completed after that.
            let lossesBefore = kind.endsTheDriver ? 0 : try deviceState(admin).losses
            let hit: (generation: UInt64, pid: Int32)
            do { hit = try admin.injectFault(device: device, kind) } catch {
                failure = "injecting fault \(i + 1) (\(kind)): \(error)"
                break
            }
            injected += 1
            let deadline = t0 + UInt64(recoveryTimeout) * 1_000_000_000
            var timedOut = false
            var reconnectedAt: Int? = nil
            var nextLook: UInt64 = 0
            do {
                try w.run { w in
                    if kind.endsTheDriver {
                        if w.lastCompletionGeneration > hit.generation { return true }
                    } else if let at = reconnectedAt {
                        if w.ops > at { return true }
                    } else if Clock.monotonicNanoseconds >= nextLook {
                        nextLook = Clock.monotonicNanoseconds + 5_000_000
                        if let s = try? deviceState(admin), s.losses > lossesBefore, s.connected { reconnectedAt = w.ops }
                    }
                    if Clock.monotonicNanoseconds > deadline { timedOut = true; return true }
                    return false
                }
            } catch {
                failure = "after fault \(i + 1) (\(kind)): \(error)"
                break
            }
            if timedOut {
                failure = "fault \(i + 1) (\(kind)): no recovery within \(recoveryTimeout) s"
                break
            }
            recovered += 1
            let ms = Double(Clock.monotonicNanoseconds - t0) / 1e6
            recoveryMs.append(ms)
            byKind[kind.description, default: []].append(ms)
            if !json && (i + 1) % 20 == 0 {
                print("faults: \(i + 1)/\(faults) injected, \(recovered) recovered, \(w.ops) ops, \(w.verifyErrors) verify errors")
            }
            do { try w.run(operations: opsBetween) } catch {
                failure = "after fault \(i + 1) (\(kind)): \(error)"
                break
            }
        }
        if failure == nil {
            do { try w.finish() } catch { failure = "finishing: \(error)" }
        }
        func percentile(_ p: Double, _ values: [Double]) -> Double {
            let sorted = values.sorted()
            guard !sorted.isEmpty else { return 0 }
            let idx = min(sorted.count - 1, Int((p * Double(sorted.count)).rounded(.up)) - 1)
            return sorted[max(0, idx)]
        }
        let report = FaultReport(
            device: device, faultsInjected: injected, recovered: recovered, ops: w.ops, reads: w.reads, writes: w.writes,
            verifyErrors: w.verifyErrors, clientErrors: w.clientErrors, reissued: w.session.reissued,
            recoveryMsP50: percentile(0.5, recoveryMs), recoveryMsP99: percentile(0.99, recoveryMs),
            recoveryMsMax: recoveryMs.max() ?? 0,
            recoveryMsP50ByFault: byKind.mapValues { percentile(0.5, $0) },
            firstError: w.firstError, failure: failure)
        if json {
            let e = JSONEncoder()
            e.keyEncodingStrategy = .convertToSnakeCase
            e.outputFormatting = [.sortedKeys]
            print(String(decoding: try e.encode(report), as: UTF8.self))
        } else {
            print("""
                device \(device): \(injected) faults injected, \(recovered) recovered
                ops \(w.ops) (\(w.reads) reads, \(w.writes) writes), \(w.session.reissued) reissued after restarts
                verify errors \(w.verifyErrors), client errors \(w.clientErrors)
                recovery ms: p50 \(fmt(report.recoveryMsP50)), p99 \(fmt(report.recoveryMsP99)), max \(fmt(report.recoveryMsMax))
                recovery ms, median by fault: \(report.recoveryMsP50ByFault.sorted { $0.key < $1.key }.map { "\($0.key) \(fmt($0.value))" }.joined(separator: ", "))
                """)
            if let e = w.firstError { print("first error: \(e)") }
            if let failure { print("stopped: \(failure)") }
        }
        if failure != nil || recovered != injected || w.verifyErrors > 0 || w.clientErrors > 0 {
            throw ExitCode(1)
        }
    }

    /// The device's connection losses and whether it is connected now (`outboard status`).
    func deviceState(_ admin: borrowing AdminConnection) throws -> (losses: Int, connected: Bool) {
        let report = try StatusReport.decode(admin.status())
        guard let d = report.devices.first(where: { $0.name == device }) else {
            throw ValidationError("the manager has no device '\(device)'")
        }
        return (d.deviceLosses ?? 0, d.deviceConnected ?? false)
    }

    func fmt(_ v: Double) -> String {
        let tenths = Int((v * 10).rounded())
        return "\(tenths / 10).\(tenths % 10)"
    }
}

struct FaultReport: Codable {
    var device: String
    var faultsInjected: Int
    var recovered: Int
    var ops: Int
    var reads: Int
    var writes: Int
    var verifyErrors: Int
    var clientErrors: Int
    var reissued: Int
    var recoveryMsP50: Double
    var recoveryMsP99: Double
    var recoveryMsMax: Double
    /// Median recovery per fault kind (kill, segv, hang, abort).
    var recoveryMsP50ByFault: [String: Double]
    var firstError: String?
    var failure: String?
}

/// A fault kind as `--kinds` spells it (`segv`, `bad-ring`).
struct FaultName: LosslessStringConvertible, Sendable {
    var kind: FaultKind
    init(_ kind: FaultKind) { self.kind = kind }
    init?(_ description: String) {
        guard let k = FaultKind(name: description), k != .strayDMA else { return nil }
        kind = k
    }
    var description: String { kind.description }
}
