import ArgumentParser
import OutboardBench
import OutboardSystem

#if canImport(Glibc)
import Glibc
#endif

/// `outboard bench ring`: producer and consumer as two processes on two cores, through
/// Outboard's Swift queue and through the C reference queue, alternately in the same run.
struct RingBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ring",
        abstract: "Shared-memory queue throughput: Outboard (Swift) against the C reference, same layout and algorithm."
    )

    @Flag(help: "One JSON object per line.")
    var json = false

    @Option(help: "Batch sizes, comma separated.")
    var batches: String = "1,8,32,128"

    @Option(help: "Modes, comma separated: busy (both poll), sleep (sleep on the doorbell when empty).")
    var modes: String = "busy,sleep"

    @Option(help: "Descriptors per run (default: 3M at batch 1, 6M otherwise).")
    var count: UInt64?

    @Option(help: "Runs per implementation and configuration; medians are reported, and the ratio is the median of adjacent-run ratios.")
    var repeats: Int = 15

    @Option(help: "Queue capacity (and buffers in circulation).")
    var capacity: Int = 512

    @Option(help: "Polls of an empty queue before asking for a doorbell (sleep mode).")
    var spin: Int = 2000

    @Option(help: "Sleep mode: a sleep at least this many descriptors after the previous one uses the asymmetric signal ordering (the sleeper runs membarrier(2), the producer skips its per-batch fence); 0: fences only.")
    var heavyBarrierThreshold: UInt32 = 4096

    @Option(help: "Sleep mode: a sleeping consumer asks to be woken once this many descriptors wait, or when the producer goes idle; 1: at the first.")
    var wakeAfter: UInt32 = 1

    /// For scripts/ring-instructions.sh: a command (path and arguments, space-separated)
    /// the workers run under, such as valgrind.
    @Option(help: .hidden)
    var workerWrapper: String?

    func run() throws {
        #if DEBUG
        FileHandleStderr.write("warning: debug build; both queues run unoptimized and the figures mean little. Use -c release.\n")
        #endif
        guard let batchList = parseList(batches, as: Int.self) else { throw ValidationError("--batches: comma-separated numbers") }
        let modeNames = parseList(modes, as: String.self) ?? []
        let modeList = modeNames.compactMap { m in RingMode.allCases.first { "\($0)" == m } }
        guard !modeNames.isEmpty, modeList.count == modeNames.count else { throw ValidationError("--modes: comma separated, each busy or sleep") }
        let cpus = CPU.allowed.count
        let (producerCPU, consumerCPU) = CPU.firstTwoAllowed ?? (-1, -1)
        let harness = RingHarness(executable: currentExecutable(),
                                  wrapper: workerWrapper.map { $0.split(separator: " ").map(String.init) } ?? [])
        if !json {
            print("Ring benchmark: producer on CPU \(producerCPU), consumer on CPU \(consumerCPU), capacity \(capacity), median of \(repeats)")
            print("mode   batch   outboard Mdesc/s   C Mdesc/s   ratio   ns CPU/desc (outboard, C)   doorbells/desc (outboard, C)")
        }
        for mode in modeList {
            for batch in batchList {
                let n = count ?? (batch == 1 ? 3_000_000 : 6_000_000)
                var rates: [RingImplementation: [Double]] = [:]
                var cpu: [RingImplementation: [Double]] = [:]
                var bells: [RingImplementation: [Double]] = [:]
                var sleeps: [RingImplementation: [Double]] = [:]
                var heavy: [RingImplementation: [Double]] = [:]
                var ratios: [Double] = []
                for i in 0..<max(repeats, 1) {
                    // Alternate which goes first; pair the two adjacent runs. This machine's
                    // vCPU placement drifts between runs, so a ratio of adjacent runs is far
                    // steadier than a ratio of separate averages.
                    let order: [RingImplementation] = i % 2 == 0 ? [.swift, .c] : [.c, .swift]
                    var pairRate: [RingImplementation: Double] = [:]
                    for impl in order {
                        let p = RingParameters(role: .producer, implementation: impl, mode: mode, batch: batch,
                                               count: n, capacity: capacity, spin: spin,
                                               heavyBarrierThreshold: heavyBarrierThreshold, wakeAfter: wakeAfter)
                        let r = try harness.run(p, producerCPU: producerCPU, consumerCPU: consumerCPU,
                                                watchdogMilliseconds: 180_000)
                        guard r.succeeded else {
                            throw ValidationError("\(impl) run failed (mode \(mode), batch \(batch)):\n\(r.summary)")
                        }
                        rates[impl, default: []].append(r.descriptorsPerSecond / 1e6)
                        pairRate[impl] = r.descriptorsPerSecond
                        cpu[impl, default: []].append(r.cpuNanosecondsPerDescriptor)
                        bells[impl, default: []].append(r.doorbellsPerDescriptor)
                        sleeps[impl, default: []].append(r.sleepsPerDescriptor)
                        heavy[impl, default: []].append(r.heavyBarriersPerDescriptor)
                    }
                    ratios.append(pairRate[.swift]! / pairRate[.c]!)
                }
                let ratio = median(ratios)
                let o = median(rates[.swift]!), c = median(rates[.c]!)
                let oc = median(cpu[.swift]!), cc = median(cpu[.c]!)
                let ob = median(bells[.swift]!), cb = median(bells[.c]!)
                let os = median(sleeps[.swift]!), cs = median(sleeps[.c]!)
                let oh = median(heavy[.swift]!), ch = median(heavy[.c]!)
                if json {
                    print("""
                    {"bench":"ring","mode":"\(mode)","batch":\(batch),"outboard_mdesc_per_s":\(fmt(o, 3)),"c_mdesc_per_s":\(fmt(c, 3)),\
                    "ratio":\(fmt(ratio, 3)),"doorbells_per_desc":\(fmt(ob, 6)),"c_doorbells_per_desc":\(fmt(cb, 6)),"sleeps_per_desc":\(fmt(os, 6)),"c_sleeps_per_desc":\(fmt(cs, 6)),\
                    "heavy_barriers_per_desc":\(fmt(oh, 6)),"c_heavy_barriers_per_desc":\(fmt(ch, 6)),\
                    "outboard_cpu_ns_per_desc":\(fmt(oc, 2)),"c_cpu_ns_per_desc":\(fmt(cc, 2)),"ratio_min":\(fmt(ratios.min()!, 3)),"ratio_max":\(fmt(ratios.max()!, 3)),"count":\(n),"runs":\(repeats),\
                    "capacity":\(capacity),"spin":\(spin),"heavy_barrier_threshold":\(heavyBarrierThreshold),"wake_after":\(wakeAfter),"cpus":\(cpus)}
                    """)
                } else {
                    print("\(pad("\(mode)", 6)) \(pad("\(batch)", 6)) \(pad(fmt(o, 2), 18)) \(pad(fmt(c, 2), 11)) \(pad(fmt(ratio, 3), 7)) \(pad(fmt(oc, 1) + ", " + fmt(cc, 1), 27)) \(fmt(ob, 5)), \(fmt(cb, 5))")
                }
            }
        }
    }
}

func median(_ xs: [Double]) -> Double {
    let s = xs.sorted()
    return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}

/// Fixed-point decimal without exponent notation (valid JSON; 3e-07 stays visible at
/// enough decimals instead of collapsing to 0).
func fmt(_ x: Double, _ decimals: Int) -> String {
    guard x.isFinite else { return "0" }
    var scale: Int64 = 1
    for _ in 0..<decimals { scale *= 10 }
    let scaled = Int64((abs(x) * Double(scale)).rounded())
    let whole = scaled / scale, frac = scaled % scale
    let sign = x < 0 && scaled != 0 ? "-" : ""
    guard decimals > 0 else { return sign + "\(whole)" }
    var f = String(frac)
    f = String(repeating: "0", count: max(0, decimals - f.count)) + f
    return sign + "\(whole)." + f
}

func pad(_ s: String, _ width: Int) -> String {
    s.count >= width ? s : String(repeating: " ", count: width - s.count) + s
}

enum FileHandleStderr {
    static func write(_ s: String) {
        var bytes = Array(s.utf8)
        _ = Glibc.write(2, &bytes, bytes.count)
    }
}
