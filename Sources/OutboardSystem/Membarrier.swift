import CLinux
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// membarrier(2) with `MEMBARRIER_CMD_GLOBAL_EXPEDITED`: the heavy side of the queues'
/// asymmetric signal ordering (OutboardRings' QueueConsumer.requestSignal). A consumer
/// that sleeps rarely runs it before each sleep, and its producer is spared a fence per
/// batch. It makes every running thread of every registered process execute a full memory
/// barrier before it returns (an interrupt to each CPU running one).
public enum Membarrier {
    /// Registers this process, so that other processes' heavy barriers reach its threads
    /// (`MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED`). A producer must do this before it tells
    /// its queues so (QueueProducer's `registeredForHeavyBarrier`). Idempotent; exec(2)
    /// clears it, so each process registers itself.
    public static func register() throws(Errno) {
        let cmd = OB_MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED
        _ = try sys { ob_membarrier(cmd, 0) }
        registration.store(true, ordering: .releasing)
    }

    /// Whether register() succeeded in this process. Acquire: pairs with the releasing
    /// store in register(), so a thread that sees true also sees the registration done.
    public static var isRegistered: Bool { registration.load(ordering: .acquiring) }
    private static let registration = Atomic<Bool>(false)

    /// Whether this process can run the heavy barrier: the kernel offers it and a trial run
    /// succeeds (a seccomp filter may refuse it). Checked once per process; run() can still
    /// fail later (ENOMEM, or a filter installed since).
    public static let isUsable: Bool = {
        let cmds = ob_membarrier(OB_MEMBARRIER_CMD_QUERY, 0)
        guard cmds >= 0, cmds & OB_MEMBARRIER_CMD_GLOBAL_EXPEDITED != 0 else { return false }
        return ob_membarrier(OB_MEMBARRIER_CMD_GLOBAL_EXPEDITED, 0) == 0
    }()

    /// Runs the heavy barrier. When it fails, the queue's request for a signal must be
    /// withdrawn instead of confirmed (QueueConsumer.requestSignal says what to do).
    public static func run() throws(Errno) {
        let cmd = OB_MEMBARRIER_CMD_GLOBAL_EXPEDITED
        _ = try sys { ob_membarrier(cmd, 0) }
    }
}
