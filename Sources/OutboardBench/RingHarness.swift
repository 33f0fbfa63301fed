import OutboardRings
import OutboardSystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The outcome of one producer/consumer run.
public struct RingRun: Sendable {
    public var parameters: RingParameters
    public var results: [RingRole: RingWorkerResult] = [:]
    public var exits: [RingRole: ExitStatus] = [:]
    /// Workers the harness killed: the hostile one when the others finished, or the
    /// survivors after one failed.
    public var killedByHarness: Set<RingRole> = []
    /// The run did not finish before the harness's deadline; everything was killed.
    public var watchdogFired = false

    /// Producer and consumer both ended with status ok and moved every descriptor.
    public var succeeded: Bool {
        !watchdogFired && [RingRole.producer, .consumer].allSatisfy {
            results[$0]?.status == .ok && results[$0]?.processed == parameters.count && exits[$0] == .exited(0)
        }
    }

    /// Wall time from the first worker's start to the last one's end.
    public var elapsedNanoseconds: UInt64 {
        let rs = [RingRole.producer, .consumer].compactMap { results[$0] }
        guard rs.count == 2 else { return 0 }
        return rs.map(\.endNanoseconds).max()! - rs.map(\.startNanoseconds).min()!
    }

    public var descriptorsPerSecond: Double {
        elapsedNanoseconds == 0 ? 0 : Double(parameters.count) / (Double(elapsedNanoseconds) / 1e9)
    }

    /// CPU of producer and consumer together, per descriptor.
    public var cpuNanosecondsPerDescriptor: Double {
        let cpu = [RingRole.producer, .consumer].compactMap { results[$0]?.cpuNanoseconds }.reduce(0, +)
        return Double(cpu) / Double(parameters.count)
    }

    /// Times producer or consumer went to sleep on its doorbell, per descriptor.
    public var sleepsPerDescriptor: Double {
        let n = [RingRole.producer, .consumer].compactMap { results[$0]?.sleeps }.reduce(0, +)
        return Double(n) / Double(parameters.count)
    }

    /// Heavy barriers (membarrier(2), the asymmetric signal ordering) run by producer or
    /// consumer before a sleep, per descriptor.
    public var heavyBarriersPerDescriptor: Double {
        let n = [RingRole.producer, .consumer].compactMap { results[$0]?.heavyBarriers }.reduce(0, +)
        return Double(n) / Double(parameters.count)
    }

    public var doorbellsPerDescriptor: Double {
        let rings = [RingRole.producer, .consumer].compactMap { results[$0]?.doorbells }.reduce(0, +)
        return Double(rings) / Double(parameters.count)
    }

    /// One line per worker, for failure messages.
    public var summary: String {
        var lines: [String] = watchdogFired ? ["watchdog fired"] : []
        for role in [RingRole.producer, .consumer, .hostile] where results[role] != nil || exits[role] != nil {
            let r = results[role]
            lines.append("\(role): \(r.map { "\($0.status), \($0.processed) processed, \($0.doorbells) doorbells, \($0.sleeps) sleeps (\($0.timeouts) timed out), \($0.heavyBarriers) heavy barriers \($0.detail)" } ?? "no result"); \(exits[role].map { "\($0)" } ?? "not reaped")\(killedByHarness.contains(role) ? " (killed by harness)" : "")")
        }
        return lines.joined(separator: "\n")
    }
}

/// Runs ring workers as separate processes of `executable` (`outboard _ring-worker`):
/// creates the shared regions and doorbells, passes them over a SOCK_SEQPACKET socket
/// with SCM_RIGHTS, starts every worker at once, collects results, and kills everything
/// that outlives the watchdog.
public struct RingHarness: Sendable {
    public let executable: String
    /// A command the workers run under (its path first, then its arguments), e.g.
    /// valgrind for instruction counts; empty: the workers run directly.
    public let wrapper: [String]

    public init(executable: String, wrapper: [String] = []) {
        self.executable = executable
        self.wrapper = wrapper
    }

    final class Worker {
        let role: RingRole
        let socket: UnixSocket
        var process: ChildProcess
        var done = false
        init(role: RingRole, socket: consuming UnixSocket, process: consuming ChildProcess) {
            self.role = role
            self.socket = socket
            self.process = process
        }
    }

    /// Runs a producer and a consumer with `parameters` (its `role` and `cpu` are set per
    /// worker), plus a hostile writer when `hostile` is true. Once the producer or the
    /// consumer has reported a failure, the other gets `graceMilliseconds` to stop by
    /// itself (it may be waiting for the one that stopped) before it is killed.
    public func run(_ parameters: RingParameters, hostile: Bool = false, producerCPU: Int = -1,
                    consumerCPU: Int = -1, watchdogMilliseconds: Int = 300_000,
                    graceMilliseconds: Int = 1000) throws -> RingRun {
        if let problem = parameters.problem { throw RingWorkerFailure.setup(problem) }
        let layout = try parameters.pairLayout
        let queues = try SharedRegion(name: "outboard-ring-queues", size: layout.endOffset)
        do {
            let m = try queues.map(.readWrite)
            try layout.initialize(memory: m.base, size: m.size)
        }
        let data = try SharedRegion(name: "outboard-ring-data", size: parameters.dataRegionSize)
        let activeBell = try Doorbell()
        let freeBell = try Doorbell()
        let fds = [queues.fd.raw, data.fd.raw, activeBell.fd.raw, freeBell.fd.raw]

        var roles: [(RingRole, Int)] = [(.consumer, consumerCPU), (.producer, producerCPU)]
        if hostile { roles.append((.hostile, -1)) }
        var workers: [Worker] = []
        for (role, cpu) in roles {
            var p = parameters
            p.role = role
            p.cpu = cpu
            let pair = try UnixSocket.pair()
            let child = try ChildProcess(executable: wrapper.first ?? executable,
                                         arguments: wrapper.dropFirst() + (wrapper.isEmpty ? [] : [executable]) + ["_ring-worker"],
                                         descriptors: [(pair.second.fd.raw, ringWorkerSocketFD)])
            try pair.first.send(p.encoded, descriptors: fds)
            workers.append(Worker(role: role, socket: pair.first, process: child))
        }

        var run = RingRun(parameters: parameters)
        let deadline = Clock.monotonicNanoseconds + UInt64(watchdogMilliseconds) * 1_000_000
        // Ready: each worker sends one byte once it has mapped everything (or a result if
        // its set-up failed).
        for w in workers {
            guard (try? w.socket.fd.waitReadable(until: deadline)) == true else { run.watchdogFired = true; break }
            if let m = try? w.socket.receive(maxBytes: 4096) {
                if m.bytes != [0x52] { run.results[w.role] = RingWorkerResult.decode(m.bytes) }
            } else {
                run.results[w.role] = RingWorkerResult(status: .setupFailed, detail: "worker closed its socket during set-up")
            }
        }
        if run.results.isEmpty && !run.watchdogFired {
            for w in workers { try? w.socket.send([0x47]) }  // go
        }

        let epoll = try Epoll()
        for (i, w) in workers.enumerated() {
            try epoll.add(w.socket.fd.raw, events: .readable, token: UInt64(i))
            try epoll.add(w.process.pidfd.raw, events: .readable, token: UInt64(100 + i))
        }
        var graceDeadline: UInt64? = run.results.isEmpty ? nil : Clock.monotonicNanoseconds
        while workers.contains(where: { !$0.done }) {
            let now = Clock.monotonicNanoseconds
            if now >= deadline {
                run.watchdogFired = true
                break
            }
            if let g = graceDeadline, now >= g { break }
            let limit = min(deadline, graceDeadline ?? deadline)
            let events = try epoll.wait(timeoutMilliseconds: Int((limit - now) / 1_000_000) + 1)
            for e in events {
                if e.token >= 100 {
                    let w = workers[Int(e.token - 100)]
                    if let st = try w.process.wait(timeoutMilliseconds: 0) {
                        run.exits[w.role] = st
                        w.done = true
                        try? epoll.remove(w.process.pidfd.raw)
                    }
                } else {
                    let w = workers[Int(e.token)]
                    if let m = try? w.socket.receive(maxBytes: 4096, nonBlocking: true),
                       let r = RingWorkerResult.decode(m.bytes) {
                        run.results[w.role] = r
                        if r.status != .ok && w.role != .hostile && graceDeadline == nil {
                            graceDeadline = Clock.monotonicNanoseconds + UInt64(max(graceMilliseconds, 0)) * 1_000_000
                        }
                    } else {
                        try? epoll.remove(w.socket.fd.raw)
                    }
                }
            }
            // Producer and consumer both gone: the hostile writer has nothing left to attack.
            if workers.allSatisfy({ $0.done || $0.role == .hostile }) { break }
        }
        for w in workers where !w.done {
            run.killedByHarness.insert(w.role)
            try? w.process.signal(SIGKILL)
            run.exits[w.role] = try w.process.wait()
            w.done = true
        }
        return run
    }
}
