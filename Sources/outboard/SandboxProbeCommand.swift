import ArgumentParser
import OutboardSystem

#if canImport(Glibc)
import Glibc
#endif

/// `outboard _sandbox-probe --user nobody [--group G] [--no-namespaces] [--other-process PID]
/// [--allow-syscall N ...] [--allow-vfio-device-ioctls] [--try-x32-syscall] [--try-i386-syscall]`:
/// enters the driver sandbox, then tries what a driver must not be able to do and shows
/// that what it must be able to do still works. For tests; run it as root. Output, one
/// line each:
///
///     sandbox entered namespaces true|false
///     uid N gid N euid N egid N
///     probe NAME errno N denied true|false      (one per attempt of Sandbox.probe)
///     kill-self ok|failed errno N                (kill(getpid(), 0))
///     raise-self ok|failed errno N               (raise(SIGUSR1), ignored: tgkill to itself)
///     mmap ok|failed errno N                     (an anonymous page mapped, written, read, unmapped)
///     passwd-visible true|false errno N          (stat("/etc/passwd"): the old root is gone)
///     vfio-device-get-info errno N               (ioctl(0, VFIO_DEVICE_GET_INFO): ENOTTY when
///                                                 the filter lets it through, EPERM when not)
///     done
///     (--try-x32-syscall: then an x32 syscall, which must kill the process with SIGSYS;
///      if it does not: x32-syscall returned R errno N)
///     (--try-i386-syscall: then an i386 syscall through int 0x80, the same way;
///      if it does not: i386-syscall returned R)
/// With --i386-syscall-unsandboxed it only makes that i386 call, outside the sandbox, and
/// prints what it returned: a kernel without IA-32 emulation faults instead (SIGSEGV).
///
/// Exit status 0 when it got to the end, 2 for a bad user or group, 3 when the sandbox
/// could not be entered (the reason is on stderr).
struct SandboxProbeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "_sandbox-probe",
        abstract: "Enter the driver sandbox and report which forbidden operations are refused (tests; needs root).",
        shouldDisplay: false
    )

    @Option(help: "The unprivileged user to run as.")
    var user: String

    @Option(help: "The group to run as (default: the user's primary group).")
    var group: String?

    @Flag(name: .customLong("no-namespaces"), help: "Skip the mount/network/IPC namespaces and the empty root.")
    var noNamespaces = false

    @Option(help: "A process of the same uid to try to signal and ptrace.")
    var otherProcess: Int32?

    @Option(name: .customLong("allow-syscall"), help: "An extra syscall number to allow (repeatable).")
    var allowSyscalls: [Int32] = []

    @Flag(name: .customLong("allow-vfio-device-ioctls"), help: "Allow the ioctls a driver of a VFIO device gets.")
    var allowVFIODeviceIoctls = false

    @Flag(name: .customLong("try-x32-syscall"), help: "At the end, make an x32 syscall: the filter must kill the process with SIGSYS.")
    var tryX32Syscall = false
    @Flag(name: .customLong("try-i386-syscall"), help: "At the end, make an i386 syscall (int 0x80): the filter must kill the process with SIGSYS.")
    var tryI386Syscall = false
    @Flag(name: .customLong("i386-syscall-unsandboxed"), help: "Only make the i386 syscall, without entering the sandbox (does this kernel run them at all?).")
    var i386SyscallUnsandboxed = false

    func run() throws {
        if i386SyscallUnsandboxed {
            fflush(nil)
            print("i386-syscall returned \(Sandbox.attemptI386Syscall())")
            return
        }
        var policy: SandboxPolicy
        do {
            policy = try SandboxPolicy.resolve(user: user, group: group)
        } catch {
            writeStderr("\(error)\n")
            Glibc.exit(2)
        }
        policy.isolateNamespaces = !noNamespaces
        policy.extraAllowedSyscalls = allowSyscalls
        if allowVFIODeviceIoctls { policy.allowedIoctls = Sandbox.vfioDeviceIoctls }
        // Everything above this line is trusted input (our own command line and passwd).
        do {
            try Sandbox.enter(policy)
        } catch {
            writeStderr("\(error)\n")
            Glibc.exit(3)
        }

        print("sandbox entered namespaces \(policy.isolateNamespaces)")
        print("uid \(getuid()) gid \(getgid()) euid \(geteuid()) egid \(getegid())")
        for p in Sandbox.probe(otherProcess: otherProcess) { print(p) }

        print(outcome("kill-self", kill(getpid(), 0) == 0))
        signal(SIGUSR1, SIG_IGN)
        print(outcome("raise-self", raise(SIGUSR1) == 0))
        print(outcome("mmap", touchAnonymousPage()))
        var st = stat()
        let visible = stat("/etc/passwd", &st) == 0
        print("passwd-visible \(visible) errno \(visible ? 0 : errno)")
        print("vfio-device-get-info errno \(Sandbox.attemptVFIODeviceIoctl())")
        print("done")
        if tryX32Syscall {
            fflush(nil)  // all streams: the next line is the last thing this process does
            let r = Sandbox.attemptX32Syscall()
            print("x32-syscall returned \(r) errno \(errno)")
        }
        if tryI386Syscall {
            fflush(nil)
            let r = Sandbox.attemptI386Syscall()
            print("i386-syscall returned \(r)")
        }
    }

    private func outcome(_ name: String, _ ok: Bool) -> String {
        ok ? "\(name) ok" : "\(name) failed errno \(errno)"
    }

    private func touchAnonymousPage() -> Bool {
        guard let p = mmap(nil, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              p != MAP_FAILED
        else { return false }
        p.storeBytes(of: 0x5a5a_5a5a, toByteOffset: 128, as: UInt32.self)
        let ok = p.load(fromByteOffset: 128, as: UInt32.self) == 0x5a5a_5a5a
        return munmap(p, 4096) == 0 && ok
    }
}
