import CLinux
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// What a sandboxed driver process becomes (DESIGN.md, "Drivers isolated and
/// de-privileged"): an unprivileged uid/gid with no supplementary groups, its own empty
/// read-only root, no network and its own IPC namespace, tight rlimits, `no_new_privs`,
/// and a seccomp allow-list.
public struct SandboxPolicy: Sendable, Equatable {
    /// The unprivileged user and group the process runs as. Neither may be 0.
    public var uid: UInt32
    public var gid: UInt32
    /// New mount, network and IPC namespaces with an empty read-only root.
    public var isolateNamespaces: Bool
    /// RLIMIT_NOFILE: descriptors the process may hold (soft = hard).
    public var maxOpenFiles: UInt64
    /// RLIMIT_FSIZE in bytes. 0: writing to a regular file raises SIGXFSZ (pipes, sockets
    /// and shared memory mappings are not affected).
    public var maxFileSize: UInt64
    /// RLIMIT_CORE in bytes.
    public var maxCoreSize: UInt64
    /// RLIMIT_NPROC: processes of the user. 0: no new process, even if fork were allowed.
    public var maxProcesses: UInt64
    /// Syscall numbers (x86-64) allowed on top of `Sandbox.baseAllowedSyscalls`, for drivers
    /// that need more. kill, tkill, tgkill, fcntl, membarrier and ioctl are always
    /// argument-checked and cannot be listed here (ioctls: `allowedIoctls`).
    public var extraAllowedSyscalls: [CInt]
    /// ioctl request numbers the process may use (`Sandbox.vfioDeviceIoctls` for a driver
    /// of a VFIO device); empty: ioctl is refused whatever the request.
    public var allowedIoctls: [UInt32]

    public init(
        uid: UInt32, gid: UInt32, isolateNamespaces: Bool = true,
        maxOpenFiles: UInt64 = 64, maxFileSize: UInt64 = 0, maxCoreSize: UInt64 = 0,
        maxProcesses: UInt64 = 0, extraAllowedSyscalls: [CInt] = [], allowedIoctls: [UInt32] = []
    ) {
        self.allowedIoctls = allowedIoctls
        self.uid = uid
        self.gid = gid
        self.isolateNamespaces = isolateNamespaces
        self.maxOpenFiles = maxOpenFiles
        self.maxFileSize = maxFileSize
        self.maxCoreSize = maxCoreSize
        self.maxProcesses = maxProcesses
        self.extraAllowedSyscalls = extraAllowedSyscalls
    }

    /// The policy for `user` (getpwnam_r(3)) and `group` (getgrnam_r(3)); without a group,
    /// the user's primary group. Other settings are the defaults.
    public static func resolve(user: String, group: String? = nil) throws(SandboxError) -> SandboxPolicy {
        let (uid, primaryGID) = try lookUpUser(user)
        let gid = try group.map { (g) throws(SandboxError) in try lookUpGroup(g) } ?? primaryGID
        return SandboxPolicy(uid: uid, gid: gid)
    }

    private static func lookUpUser(_ name: String) throws(SandboxError) -> (UInt32, UInt32) {
        var size = max(Int(sysconf(Int32(_SC_GETPW_R_SIZE_MAX))), 1024)
        while true {
            var entry = passwd()
            var result: UnsafeMutablePointer<passwd>? = nil
            var buffer = [CChar](repeating: 0, count: size)
            let rc = getpwnam_r(name, &entry, &buffer, buffer.count, &result)
            if rc == ERANGE, size < 1 << 20 { size *= 4; continue }
            if rc != 0 { throw .userLookupFailed(name, Errno(rawValue: rc)) }
            guard let found = result else { throw .unknownUser(name) }
            return (found.pointee.pw_uid, found.pointee.pw_gid)
        }
    }

    private static func lookUpGroup(_ name: String) throws(SandboxError) -> UInt32 {
        var size = max(Int(sysconf(Int32(_SC_GETGR_R_SIZE_MAX))), 1024)
        while true {
            var entry = group()
            var result: UnsafeMutablePointer<group>? = nil
            var buffer = [CChar](repeating: 0, count: size)
            let rc = getgrnam_r(name, &entry, &buffer, buffer.count, &result)
            if rc == ERANGE, size < 1 << 20 { size *= 4; continue }
            if rc != 0 { throw .groupLookupFailed(name, Errno(rawValue: rc)) }
            guard let found = result else { throw .unknownGroup(name) }
            return found.pointee.gr_gid
        }
    }
}

/// Why the sandbox could not be entered: one case per step, with the errno of the call that
/// failed. A process that gets one of these is half-confined and must exit.
public enum SandboxError: Error, Equatable, Sendable, CustomStringConvertible {
    // Resolving the policy.
    case unknownUser(String)
    case unknownGroup(String)
    case userLookupFailed(String, Errno)
    case groupLookupFailed(String, Errno)
    // Checking the policy and the process before anything is changed.
    case privilegedIdentity(uid: UInt32, gid: UInt32)
    case invalidExtraSyscall(CInt)
    case tooManyExtraSyscalls(Int)
    case tooManyIoctls(Int)
    case threadCountUnknown(Errno)
    case notSingleThreaded(threads: Int)
    // a. Namespaces and the empty read-only root.
    case unshareNamespaces(Errno)
    case makeMountsPrivate(Errno)
    case mountEmptyRoot(at: String, Errno)
    case enterEmptyRoot(Errno)
    case pivotRoot(Errno)
    case detachOldRoot(Errno)
    case changeToNewRoot(Errno)
    case remountRootReadOnly(Errno)
    case rootStillWritable(Errno?)
    // b. Resource limits.
    case setResourceLimit(String, Errno)
    // c. Identity.
    case dropSupplementaryGroups(Errno)
    case setGroupID(UInt32, Errno)
    case setUserID(UInt32, Errno)
    case identityNotDropped(String)
    // d. Privileges.
    case setNoNewPrivileges(Errno)
    case setNotDumpable(Errno)
    // e. Seccomp.
    case installSeccompFilter(Errno)

    public var description: String {
        switch self {
        case .unknownUser(let u): return "sandbox: no such user '\(u)'"
        case .unknownGroup(let g): return "sandbox: no such group '\(g)'"
        case .userLookupFailed(let u, let e): return "sandbox: looking up user '\(u)' failed: \(e)"
        case .groupLookupFailed(let g, let e): return "sandbox: looking up group '\(g)' failed: \(e)"
        case .privilegedIdentity(let u, let g):
            return "sandbox: refusing to run a driver as uid \(u) gid \(g); neither may be 0 (root)"
        case .invalidExtraSyscall(let n):
            return "sandbox: extra syscall \(n) is out of range or argument-checked (kill, tkill, tgkill, fcntl, membarrier, ioctl)"
        case .tooManyIoctls(let n):
            return "sandbox: \(n) ioctl request numbers, at most \(OB_SECCOMP_MAX_IOCTLS) can be allowed"
        case .tooManyExtraSyscalls(let n):
            return "sandbox: \(n) extra syscalls; at most \(OB_SECCOMP_MAX_EXTRA) are accepted"
        case .threadCountUnknown(let e): return "sandbox: cannot count threads in /proc/self/status: \(e)"
        case .notSingleThreaded(let n):
            return "sandbox: the process has \(n) threads; it must be entered while single-threaded"
        case .unshareNamespaces(let e):
            return "sandbox: unshare(CLONE_NEWNS|CLONE_NEWNET|CLONE_NEWIPC) failed: \(e)\(rootHint(e))"
        case .makeMountsPrivate(let e): return "sandbox: mount(/, MS_REC|MS_PRIVATE) failed: \(e)"
        case .mountEmptyRoot(let at, let e): return "sandbox: mounting the empty tmpfs root on \(at) failed: \(e)"
        case .enterEmptyRoot(let e): return "sandbox: chdir into the new root failed: \(e)"
        case .pivotRoot(let e): return "sandbox: pivot_root(\".\", \".\") failed: \(e)"
        case .detachOldRoot(let e): return "sandbox: umount2(old root, MNT_DETACH) failed: \(e)"
        case .changeToNewRoot(let e): return "sandbox: chdir(\"/\") in the new root failed: \(e)"
        case .remountRootReadOnly(let e): return "sandbox: remounting the new root read-only failed: \(e)"
        case .rootStillWritable(let e):
            return "sandbox: the new root is not read-only (mkdir " + (e.map { "failed with \($0), not EROFS" } ?? "succeeded") + ")"
        case .setResourceLimit(let r, let e): return "sandbox: setrlimit(\(r)) failed: \(e)"
        case .dropSupplementaryGroups(let e): return "sandbox: setgroups(0, NULL) failed: \(e)\(rootHint(e))"
        case .setGroupID(let g, let e): return "sandbox: setresgid(\(g)) failed: \(e)\(rootHint(e))"
        case .setUserID(let u, let e): return "sandbox: setresuid(\(u)) failed: \(e)\(rootHint(e))"
        case .identityNotDropped(let what): return "sandbox: identity check failed after dropping privileges: \(what)"
        case .setNoNewPrivileges(let e): return "sandbox: prctl(PR_SET_NO_NEW_PRIVS) failed: \(e)"
        case .setNotDumpable(let e): return "sandbox: prctl(PR_SET_DUMPABLE, 0) failed: \(e)"
        case .installSeccompFilter(let e): return "sandbox: installing the seccomp filter failed: \(e)"
        }
    }

    private func rootHint(_ e: Errno) -> String { e == .notPermitted ? " (entering the sandbox needs root)" : "" }
}

/// The result of one forbidden attempt made by `Sandbox.probe()`.
public struct SandboxProbe: Sendable, Equatable, Codable, CustomStringConvertible {
    /// What was attempted, e.g. "open-etc-passwd".
    public let name: String
    /// errno of the attempt; 0 means it SUCCEEDED, which is a hole in the sandbox.
    public let errno: Int32

    public init(name: String, errno: Int32) {
        self.name = name
        self.errno = errno
    }

    /// The attempt was refused for lack of permission (EPERM, as the seccomp filter
    /// answers, or EACCES). Any other failure (EINVAL, ENOENT ...) is not counted as a
    /// denial, because it does not show that the sandbox stopped the call.
    public var denied: Bool { errno == EPERM || errno == EACCES }

    /// `probe NAME errno N denied true|false`
    public var description: String { "probe \(name) errno \(errno) denied \(denied)" }
}

/// Confinement of a driver process. See `enter(_:)`.
public enum Sandbox {
    /// Where the empty root is mounted before pivot_root: any existing directory will do,
    /// the mount exists only in the process's new mount namespace.
    static let scratchMountPoint = "/tmp"

    /// The seccomp allow-list every sandboxed process gets (x86-64 syscall numbers),
    /// defined in one commented array in Sources/CLinux/shim.c. kill, tkill and tgkill are
    /// allowed in addition, only towards the process itself, fcntl only with
    /// F_GETFD/F_SETFD/F_GETFL/F_SETFL/F_GET_SEALS, and membarrier only with the commands
    /// that reach the process's own threads (and the query).
    public static var baseAllowedSyscalls: [CInt] {
        var count = 0
        guard let list = ob_sandbox_allowed_syscalls(&count) else { return [] }
        return Array(UnsafeBufferPointer(start: list, count: count))
    }

    /// The ioctls a driver holding a VFIO device fd needs: VFIO_DEVICE_GET_INFO,
    /// GET_REGION_INFO, GET_IRQ_INFO, SET_IRQS and RESET. Nothing that touches the
    /// container (DMA mappings are the manager's) or the group.
    public static var vfioDeviceIoctls: [UInt32] {
        var count = 0
        guard let list = ob_sandbox_vfio_device_ioctls(&count) else { return [] }
        return Array(UnsafeBufferPointer(start: list, count: count))
    }

    /// Confines the calling process, irreversibly. Call it from a freshly started,
    /// single-threaded process running as root, before it reads any untrusted input.
    ///
    /// In order:
    /// a. (`isolateNamespaces`) new mount, network and IPC namespaces; all mounts private;
    ///    a 4 KiB tmpfs mounted on `/tmp` of the new namespace becomes the root by
    ///    pivot_root, the old root is detached, and the new root is remounted read-only.
    ///    The process then sees an empty read-only `/`, only a down loopback interface
    ///    and its own System V IPC objects. The host's mounts are not touched.
    /// b. rlimits NOFILE, FSIZE, CORE, NPROC, soft = hard.
    /// c. no supplementary groups, real/effective/saved gid and uid set to the policy's;
    ///    verified, including that setuid(0) fails and no capability is left.
    /// d. no_new_privs, not dumpable.
    /// e. the seccomp filter (`baseAllowedSyscalls` + extras, kill family towards itself
    ///    only, ioctl only with `allowedIoctls`' request numbers, everything else EPERM,
    ///    foreign architectures and x32 kill the process).
    ///
    /// Descriptors already open stay usable: that is how a driver gets its sockets,
    /// regions and doorbells. Give it pipes or sockets for stdout and stderr, not regular
    /// files: with `maxFileSize` 0, a write to a regular file kills it with SIGXFSZ (from
    /// step b on, so an error thrown later could not even be reported there).
    /// If this throws, the process is partly confined and must exit.
    public static func enter(_ policy: SandboxPolicy) throws(SandboxError) {
        // Checks first, so that a bad policy changes nothing.
        guard policy.uid != 0, policy.gid != 0 else {
            throw .privilegedIdentity(uid: policy.uid, gid: policy.gid)
        }
        if let bad = policy.extraAllowedSyscalls.first(where: { ob_seccomp_extra_is_valid($0) == 0 }) {
            throw .invalidExtraSyscall(bad)
        }
        guard policy.extraAllowedSyscalls.count <= OB_SECCOMP_MAX_EXTRA else {
            throw .tooManyExtraSyscalls(policy.extraAllowedSyscalls.count)
        }
        guard policy.allowedIoctls.count <= OB_SECCOMP_MAX_IOCTLS else { throw .tooManyIoctls(policy.allowedIoctls.count) }
        let threads = try step(SandboxError.threadCountUnknown) { ob_thread_count() }
        guard threads == 1 else { throw .notSingleThreaded(threads: Int(threads)) }

        if policy.isolateNamespaces { try isolate() }
        try limitResources(policy)
        try dropIdentity(policy)
        try step(SandboxError.setNoNewPrivileges) { ob_set_no_new_privs() }
        try step(SandboxError.setNotDumpable) { ob_set_dumpable(0) }
        let extras = policy.extraAllowedSyscalls
        let ioctls = policy.allowedIoctls
        let me = getpid()
        try step(SandboxError.installSeccompFilter) { ob_seccomp_install(extras, extras.count, ioctls, ioctls.count, me) }
    }

    /// Step a.
    private static func isolate() throws(SandboxError) {
        try step(SandboxError.unshareNamespaces) { ob_unshare(OB_CLONE_NEWNS | OB_CLONE_NEWNET | OB_CLONE_NEWIPC) }
        // Private, recursively: nothing done below propagates back to the host's mounts.
        try step(SandboxError.makeMountsPrivate) { ob_mount(nil, "/", nil, OB_MS_REC | OB_MS_PRIVATE, nil) }
        let at = scratchMountPoint
        try step({ SandboxError.mountEmptyRoot(at: at, $0) }) {
            ob_mount("tmpfs", at, "tmpfs", OB_MS_NOSUID | OB_MS_NODEV | OB_MS_NOEXEC, "size=4k,nr_inodes=8,mode=0555")
        }
        try step(SandboxError.enterEmptyRoot) { chdir(at) }
        // pivot_root(".", "."): the old root ends up mounted on top of the new one, at the
        // same place; detaching "." then removes it, leaving the new root visible.
        try step(SandboxError.pivotRoot) { ob_pivot_root(".", ".") }
        try step(SandboxError.detachOldRoot) { ob_umount2(".", OB_MNT_DETACH) }
        try step(SandboxError.changeToNewRoot) { chdir("/") }
        try step(SandboxError.remountRootReadOnly) {
            ob_mount(nil, "/", nil, OB_MS_REMOUNT | OB_MS_BIND | OB_MS_RDONLY | OB_MS_NOSUID | OB_MS_NODEV | OB_MS_NOEXEC, nil)
        }
        // Still root here: a writable root would let mkdir succeed.
        if mkdir("/outboard-write-check", 0o700) == 0 {
            rmdir("/outboard-write-check")
            throw .rootStillWritable(nil)
        } else if errno != EROFS {
            throw .rootStillWritable(Errno(rawValue: errno))
        }
    }

    /// Step b.
    private static func limitResources(_ p: SandboxPolicy) throws(SandboxError) {
        let limits: [(String, CInt, UInt64)] = [
            ("RLIMIT_NOFILE", OB_RLIMIT_NOFILE, p.maxOpenFiles),
            ("RLIMIT_FSIZE", OB_RLIMIT_FSIZE, p.maxFileSize),
            ("RLIMIT_CORE", OB_RLIMIT_CORE, p.maxCoreSize),
            ("RLIMIT_NPROC", OB_RLIMIT_NPROC, p.maxProcesses),
        ]
        for (name, resource, value) in limits {
            try step({ SandboxError.setResourceLimit(name, $0) }) { ob_setrlimit(resource, value) }
        }
    }

    /// Step c.
    private static func dropIdentity(_ p: SandboxPolicy) throws(SandboxError) {
        let uid = p.uid, gid = p.gid
        try step(SandboxError.dropSupplementaryGroups) { ob_drop_supplementary_groups() }
        try step({ SandboxError.setGroupID(gid, $0) }) { ob_setresgid(gid) }
        try step({ SandboxError.setUserID(uid, $0) }) { ob_setresuid(uid) }

        var r: uid_t = 0, e: uid_t = 0, s: uid_t = 0
        var rg: gid_t = 0, eg: gid_t = 0, sg: gid_t = 0
        guard ob_getresuid(&r, &e, &s) == 0, ob_getresgid(&rg, &eg, &sg) == 0 else {
            throw .identityNotDropped("getresuid/getresgid failed: \(Errno(rawValue: errno))")
        }
        guard getuid() == uid, geteuid() == uid, r == uid, e == uid, s == uid else {
            throw .identityNotDropped("uids are \(r)/\(e)/\(s), expected \(uid)")
        }
        guard getgid() == gid, getegid() == gid, rg == gid, eg == gid, sg == gid else {
            throw .identityNotDropped("gids are \(rg)/\(eg)/\(sg), expected \(gid)")
        }
        let groups = ob_supplementary_group_count()
        guard groups == 0 else { throw .identityNotDropped("\(groups) supplementary groups remain") }
        guard setuid(0) == -1 else { throw .identityNotDropped("setuid(0) succeeded") }
        guard setgid(0) == -1 else { throw .identityNotDropped("setgid(0) succeeded") }
        let caps = ob_has_any_capability()
        guard caps == 0 else {
            throw .identityNotDropped(caps < 0 ? "capget failed: \(Errno(rawValue: errno))" : "capabilities remain")
        }
    }

    /// Runs a C call returning -1/errno (EINTR retried by `sys`), mapping a failure to the
    /// step's error.
    @discardableResult
    private static func step(_ fail: (Errno) -> SandboxError, _ call: () -> CInt) throws(SandboxError) -> CInt {
        do {
            return try sys(call)
        } catch {
            throw fail(error)
        }
    }

    /// Attempts, one after the other, things a sandboxed driver must not be able to do, and
    /// reports how each went. Every attempt is made for real: CALL THIS ONLY INSIDE THE
    /// SANDBOX. Outside it, the execve attempt replaces the calling process with
    /// /bin/true, and the others open files, attach to the parent with ptrace, fork...
    ///
    /// `otherProcess`: a process running as the same uid (another driver, say) that the
    /// probe tries to signal and ptrace.
    ///
    /// Anything that succeeds is undone at once (closed, detached, child reaped).
    public static func probe(otherProcess: pid_t? = nil) -> [SandboxProbe] {
        var results: [SandboxProbe] = []
        func attempt(_ name: String, _ call: () -> CInt, undo: (CInt) -> Void = { _ in }) {
            let r = call()
            let e = r == -1 ? Glibc.errno : 0
            if r != -1 { undo(r) }
            results.append(SandboxProbe(name: name, errno: e))
        }
        let closeIt: (CInt) -> Void = { fd in _ = close(fd) }

        // Files, sockets, programs, other processes: the brief of every driver sandbox.
        attempt("open-etc-passwd", { open("/etc/passwd", O_RDONLY | O_CLOEXEC) }, undo: closeIt)
        attempt("socket-inet-stream", { socket(AF_INET, CInt(SOCK_STREAM.rawValue), 0) }, undo: closeIt)
        attempt("execve-bin-true", { ob_probe_execve("/bin/true") })
        attempt("ptrace-attach-parent", { ob_probe_ptrace_attach(getppid()) })
        attempt("ptrace-attach-init", { ob_probe_ptrace_attach(1) })
        attempt("kill-init", { kill(1, 0) })
        attempt("kill-parent", { kill(getppid(), 0) })
        if let other = otherProcess {
            attempt("kill-same-uid-process", { kill(other, 0) })
            attempt("ptrace-attach-same-uid-process", { ob_probe_ptrace_attach(other) })
        }
        attempt("clone-fork", { ob_probe_clone() })
        attempt("clone3", { ob_probe_clone3() })
        // More ways out, each of which would succeed without the seccomp filter.
        attempt("socketpair-unix", {
            var fds: [CInt] = [-1, -1]
            let r = socketpair(AF_UNIX, CInt(SOCK_STREAM.rawValue), 0, &fds)
            if r == 0 { close(fds[0]); close(fds[1]) }
            return r
        })
        attempt("memfd-create", { ob_memfd_create("probe", OB_MFD_CLOEXEC) }, undo: closeIt)
        // New kernel objects: a driver gets its epoll set and doorbells made before it
        // enters the sandbox, and cannot make more.
        attempt("eventfd-create", { ob_eventfd(0, OB_EFD_CLOEXEC) }, undo: closeIt)
        attempt("epoll-create", { ob_epoll_create() }, undo: closeIt)
        attempt("pidfd-open-self", { ob_pidfd_open(getpid(), 0) }, undo: closeIt)
        attempt("process-vm-readv-self", { ob_probe_process_vm_readv_self() })
        attempt("ioctl-fionread-stdout", { ob_probe_ioctl_fionread(1) })
        attempt("ioctl-vfio-map-dma", { ob_probe_ioctl_vfio_map_dma() })
        attempt("prctl-get-dumpable", { ob_probe_prctl_get_dumpable() })
        attempt("fcntl-setown-stdout", { fcntl(1, F_SETOWN, getppid()) }, undo: { _ in _ = fcntl(1, F_SETOWN, 0) })
        attempt("fcntl-dupfd-stdout", { fcntl(1, F_DUPFD_CLOEXEC, 0) }, undo: closeIt)
        attempt("unshare-mount-namespace", { ob_unshare(OB_CLONE_NEWNS) })
        attempt("mount-tmpfs", { ob_mount("tmpfs", "/", "tmpfs", 0, nil) })
        attempt("setns", { ob_probe_setns() })
        attempt("bpf-map-create", { ob_probe_bpf() })
        attempt("setuid-root", { setuid(0) })
        // membarrier(2) GLOBAL_EXPEDITED interrupts every CPU running a registered process:
        // a driver may register before it enters the sandbox, but not send barriers.
        attempt("membarrier-global-expedited", { ob_membarrier(OB_MEMBARRIER_CMD_GLOBAL_EXPEDITED, 0) })
        return results
    }

    /// ioctl(0, VFIO_DEVICE_GET_INFO): the errno it fails with (0 if it succeeded). EPERM
    /// says the filter refused it; ENOTTY says the filter let it through to a descriptor
    /// that is no VFIO device.
    public static func attemptVFIODeviceIoctl() -> Int32 {
        ob_probe_ioctl_vfio_device_get_info() == -1 ? Glibc.errno : 0
    }

    /// getpid through the x32 ABI. Inside the sandbox the filter kills the process with
    /// SIGSYS and this never returns; outside, it returns the pid, or -1 (ENOSYS) on
    /// kernels without x32 support.
    public static func attemptX32Syscall() -> Int { ob_probe_x32_getpid() }

    /// getpid through the i386 ABI (`int $0x80`). Inside the sandbox the filter kills the
    /// process with SIGSYS and this never returns; outside, it returns the pid (kernels
    /// with IA-32 emulation).
    public static func attemptI386Syscall() -> Int { ob_probe_i386_getpid() }
}
