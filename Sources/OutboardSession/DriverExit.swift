import OutboardSystem

/// How a driver process's exit status tells the manager what to do next: 0 when the
/// manager closed its socket (asked to stop), otherwise `base + Recovery.rawValue`. Any
/// other status (a signal, a trap, the runtime's own exit codes) is a crash: restart.
public enum DriverExit {
    public static let base: Int32 = 64

    public static func status(for recovery: Recovery) -> Int32 { base + Int32(recovery.rawValue) }

    /// The recovery a driver asked for by its exit status; nil for 0 (a clean stop).
    public static func recovery(fromStatus status: Int32) -> Recovery? {
        if status == 0 { return nil }
        if status > base, let r = Recovery(rawValue: UInt8(clamping: status - base)) { return r }
        return .restartDriver
    }
}
