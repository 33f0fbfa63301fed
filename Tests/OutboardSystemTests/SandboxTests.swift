import OutboardSystem
import SystemPackage
import OutboardTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The driver sandbox, proven from the outside: the tests run `outboard _sandbox-probe`
/// (the executable of the same build) as a separate process, which enters the sandbox as
/// `nobody` and then attempts what a driver must not do. Each attempt must fail with EPERM,
/// the answer of the seccomp filter. That includes open("/etc/passwd"): the filter refuses
/// openat before any path lookup, so the answer is EPERM rather than ENOENT (empty root)
/// or EACCES (permissions).
///
/// Entering the sandbox needs root; without it the process tests are skipped.
@Suite struct SandboxTests {
    static let isRoot = geteuid() == 0
    static let nobody: UInt32 = 65534

    /// Every attempt `Sandbox.probe` makes (`otherProcess` adds the two same-uid ones). A
    /// probe that disappears from the output fails the test too.
    static let expectedProbes: Set<String> = [
        "open-etc-passwd", "socket-inet-stream", "execve-bin-true", "ptrace-attach-parent",
        "ptrace-attach-init", "kill-init", "kill-parent", "clone-fork", "clone3", "socketpair-unix",
        "memfd-create", "pidfd-open-self", "process-vm-readv-self", "ioctl-fionread-stdout",
        "prctl-get-dumpable", "fcntl-setown-stdout", "fcntl-dupfd-stdout", "unshare-mount-namespace",
        "mount-tmpfs", "setns", "bpf-map-create", "setuid-root", "eventfd-create", "epoll-create",
        "membarrier-global-expedited", "ioctl-vfio-map-dma",
    ]

    @Test(.enabled(if: SandboxTests.isRoot, "entering the sandbox needs root"))
    func sandboxedDriverIsRefusedEverythingForbiddenAndStillWorks() throws {
        let hostTmpBefore = tmpMounts()
        let marker = "/tmp/outboard-sandbox-marker-\(getpid())"
        try writeFile(marker, "host")
        defer { unlink(marker) }

        // Another process of the same uid, as another driver would be: without the
        // filter's kill rule the probe could signal it (same uid), and ptrace it.
        let victim = try SameUIDProcess.start()  // killed and reaped when it goes away
        var args = ["_sandbox-probe", "--user", "nobody"]
        if let v = victim { args += ["--other-process", "\(v.pid)"] }

        let run = try runProbe(args)
        #expect(run.status == OutboardSystem.ExitStatus.exited(0), "\(run)")
        #expect(run.errors.isEmpty, "\(run)")
        #expect(run.lines.first == "sandbox entered namespaces true", "\(run)")
        #expect(run.lines.contains("uid \(Self.nobody) gid \(Self.nobody) euid \(Self.nobody) egid \(Self.nobody)"), "\(run)")

        var expected = Self.expectedProbes
        if victim != nil { expected.formUnion(["kill-same-uid-process", "ptrace-attach-same-uid-process"]) }
        #expect(Set(run.probes.map(\.name)) == expected, "\(run)")
        for p in run.probes {
            #expect(p.errno == EPERM && p.denied, "\(p.name) must fail with EPERM: \(p)")
        }

        // What a driver needs still works: writing to an inherited descriptor (all of this
        // output), signals to itself (abort() needs them), memory.
        #expect(run.lines.contains("kill-self ok"), "\(run)")
        #expect(run.lines.contains("raise-self ok"), "\(run)")
        #expect(run.lines.contains("mmap ok"), "\(run)")
        // The root it sees is empty: stat (allowed by the filter) finds nothing.
        #expect(run.lines.contains("passwd-visible false errno \(ENOENT)"), "\(run)")
        #expect(run.lines.contains("vfio-device-get-info errno \(EPERM)"), "\(run)")
        #expect(run.lines.last == "done", "\(run)")

        // The empty root was mounted on /tmp in the child's own mount namespace only.
        #expect(tmpMounts() == hostTmpBefore)
        #expect(readFile(marker) == "host", "the host's /tmp must be untouched")
        // And the other same-uid process was not harmed.
        if let v = victim { #expect(kill(v.pid, 0) == 0) }
    }

    /// Without namespaces the filter alone refuses the same attempts. The filesystem is
    /// visible to stat, though: hiding it is the job of the empty root.
    @Test(.enabled(if: SandboxTests.isRoot, "entering the sandbox needs root"))
    func seccompAloneRefusesTheSameAttempts() throws {
        let run = try runProbe(["_sandbox-probe", "--user", "nobody", "--no-namespaces"])
        #expect(run.status == OutboardSystem.ExitStatus.exited(0), "\(run)")
        #expect(run.lines.first == "sandbox entered namespaces false", "\(run)")
        #expect(Set(run.probes.map(\.name)) == Self.expectedProbes, "\(run)")
        for p in run.probes { #expect(p.errno == EPERM, "\(p)") }
        #expect(run.lines.contains("mmap ok"), "\(run)")
        #expect(run.lines.contains("passwd-visible true errno 0"), "\(run)")
        #expect(run.lines.last == "done", "\(run)")
    }

    /// A policy's extra syscalls are allowed (memfd_create here), and nothing else changes.
    @Test(.enabled(if: SandboxTests.isRoot, "entering the sandbox needs root"))
    func extraSyscallsAreAllowed() throws {
        let memfdCreate = 319  // x86-64 __NR_memfd_create
        let run = try runProbe(["_sandbox-probe", "--user", "nobody", "--allow-syscall", "\(memfdCreate)"])
        #expect(run.status == OutboardSystem.ExitStatus.exited(0), "\(run)")
        #expect(Set(run.probes.map(\.name)) == Self.expectedProbes, "\(run)")
        for p in run.probes {
            #expect(p.errno == (p.name == "memfd-create" ? 0 : EPERM), "\(p)")
        }
        #expect(run.lines.contains("vfio-device-get-info errno \(EPERM)"), "\(run)")
    }

    /// A VFIO driver's policy lets exactly the device ioctls through (ENOTTY: the kernel saw
    /// the call, on a descriptor that is no VFIO device), never one that maps DMA, and no
    /// other ioctl.
    @Test(.enabled(if: SandboxTests.isRoot, "entering the sandbox needs root"))
    func vfioDeviceIoctlsAreAllowedAndNoOtherIoctl() throws {
        let run = try runProbe(["_sandbox-probe", "--user", "nobody", "--allow-vfio-device-ioctls"])
        #expect(run.status == OutboardSystem.ExitStatus.exited(0), "\(run)")
        #expect(Set(run.probes.map(\.name)) == Self.expectedProbes, "\(run)")
        for p in run.probes { #expect(p.errno == EPERM, "\(p)") }
        #expect(run.lines.contains("vfio-device-get-info errno \(ENOTTY)"), "\(run)")
        #expect(Sandbox.vfioDeviceIoctls.count == 5)
    }

    /// x32 syscalls (same architecture tag, other numbers) would slip past a list of
    /// x86-64 numbers: the filter kills the process for them.
    @Test(.enabled(if: SandboxTests.isRoot, "entering the sandbox needs root"))
    func x32SyscallKillsTheProcess() throws {
        let run = try runProbe(["_sandbox-probe", "--user", "nobody", "--try-x32-syscall"])
        #expect(run.status == OutboardSystem.ExitStatus.signalled(SIGSYS), "\(run)")
        #expect(run.lines.last == "done", "\(run)")
    }

    /// i386 syscalls (`int $0x80`, another architecture tag) kill the process too. Only
    /// seccomp raises SIGSYS. A kernel without IA-32 emulation never runs them (the call
    /// faults with SIGSEGV), so there is nothing to filter and the test does not run. Any
    /// other outcome runs it (a probe that cannot start then fails it, loudly).
    static let kernelRunsI386Syscalls: Bool = {
        guard let run = try? runProbe(["_sandbox-probe", "--user", "nobody", "--i386-syscall-unsandboxed"]) else { return true }
        return run.status != .signalled(SIGSEGV)
    }()

    @Test(.enabled(if: SandboxTests.isRoot, "entering the sandbox needs root"),
          .enabled(if: SandboxTests.kernelRunsI386Syscalls, "this kernel does not run i386 syscalls"))
    func i386SyscallKillsTheProcess() throws {
        let run = try runProbe(["_sandbox-probe", "--user", "nobody", "--try-i386-syscall"])
        #expect(run.status == OutboardSystem.ExitStatus.signalled(SIGSYS), "\(run)")
        #expect(run.lines.last == "done", "\(run)")
    }

    /// Bad policies are refused before anything is changed, so these run in the test
    /// process itself.
    @Test func badPoliciesAreRefusedBeforeAnythingChanges() {
        #expect(throws: SandboxError.privilegedIdentity(uid: 0, gid: 0)) {
            try Sandbox.enter(SandboxPolicy(uid: 0, gid: 0))
        }
        #expect(throws: SandboxError.privilegedIdentity(uid: Self.nobody, gid: 0)) {
            try Sandbox.enter(SandboxPolicy(uid: Self.nobody, gid: 0))
        }
        #expect(throws: SandboxError.invalidExtraSyscall(62)) {  // kill: argument-checked, never plain
            try Sandbox.enter(SandboxPolicy(uid: Self.nobody, gid: Self.nobody, extraAllowedSyscalls: [319, 62]))
        }
        #expect(throws: SandboxError.invalidExtraSyscall(16)) {  // ioctl: argument-checked (allowedIoctls)
            try Sandbox.enter(SandboxPolicy(uid: Self.nobody, gid: Self.nobody, extraAllowedSyscalls: [16]))
        }
        #expect(throws: SandboxError.tooManyIoctls(33)) {
            try Sandbox.enter(SandboxPolicy(uid: Self.nobody, gid: Self.nobody, allowedIoctls: Array(repeating: 0x3B6B, count: 33)))
        }
        #expect(throws: SandboxError.invalidExtraSyscall(0x4000_0027)) {  // x32 getpid
            try Sandbox.enter(SandboxPolicy(uid: Self.nobody, gid: Self.nobody, extraAllowedSyscalls: [0x4000_0027]))
        }
    }

    @Test func policiesResolveUsersAndGroups() throws {
        let p = try SandboxPolicy.resolve(user: "nobody")
        #expect(p.uid == Self.nobody && p.gid == Self.nobody)
        #expect(p.isolateNamespaces && p.maxOpenFiles == 64 && p.maxFileSize == 0 && p.maxCoreSize == 0)
        #expect(p.maxProcesses == 0 && p.extraAllowedSyscalls.isEmpty)
        let q = try SandboxPolicy.resolve(user: "nobody", group: "nogroup")
        #expect(q.gid == Self.nobody)
        #expect(throws: SandboxError.unknownUser("outboard-no-such-user")) {
            _ = try SandboxPolicy.resolve(user: "outboard-no-such-user")
        }
        #expect(throws: SandboxError.unknownGroup("outboard-no-such-group")) {
            _ = try SandboxPolicy.resolve(user: "nobody", group: "outboard-no-such-group")
        }
    }

    @Test func theAllowListHasNoWayOut() {
        // x86-64 numbers of syscalls that must never be on the base list.
        let forbidden: [CInt] = [
            2 /* open */, 257 /* openat */, 437 /* openat2 */, 41 /* socket */, 53 /* socketpair */,
            42 /* connect */, 49 /* bind */, 59 /* execve */, 322 /* execveat */, 101 /* ptrace */,
            56 /* clone */, 435 /* clone3 */, 57 /* fork */, 58 /* vfork */, 165 /* mount */,
            272 /* unshare */, 308 /* setns */, 321 /* bpf */, 310 /* process_vm_readv */,
            311 /* process_vm_writev */, 434 /* pidfd_open */, 438 /* pidfd_getfd */,
            319 /* memfd_create */, 16 /* ioctl */, 157 /* prctl */, 246 /* kexec_load */,
            62 /* kill */, 200 /* tkill */, 234 /* tgkill */, 72 /* fcntl: argument-checked */,
            324 /* membarrier: argument-checked */,
            32 /* dup */, 33 /* dup2 */, 292 /* dup3 */, 105 /* setuid */, 155 /* pivot_root */,
        ]
        let base = Set(Sandbox.baseAllowedSyscalls)
        #expect(!base.isEmpty)
        for nr in forbidden { #expect(!base.contains(nr), "syscall \(nr) must not be on the allow-list") }
    }
}

// MARK: - Running the probe

private struct ProbeRun: CustomStringConvertible {
    var status: OutboardSystem.ExitStatus?
    var output: String
    var errors: String
    var lines: [String] { output.split(separator: "\n").map(String.init) }
    /// The `probe NAME errno N denied B` lines.
    var probes: [SandboxProbe] {
        lines.compactMap { line in
            let f = line.split(separator: " ")
            guard f.count == 6, f[0] == "probe", f[2] == "errno", let e = Int32(f[3]) else { return nil }
            return SandboxProbe(name: String(f[1]), errno: e)
        }
    }
    var description: String {
        "status: \(status.map { "\($0)" } ?? "none (killed after the deadline)")\nstdout:\n\(output)\nstderr:\n\(errors)"
    }
}

/// Runs `outboard` with `arguments`, its stdout and stderr on pipes, for at most 60 s.
private func runProbe(_ arguments: [String]) throws -> ProbeRun {
    let exe = try outboardExecutable()
    let out = try OwnedFD.pipe(), err = try OwnedFD.pipe()
    let outRead = out.read, outWrite = out.write
    let errRead = err.read, errWrite = err.write
    var child = try ChildProcess(executable: exe, arguments: arguments,
                                 descriptors: [(outWrite.raw, 1), (errWrite.raw, 2)])
    _ = consume outWrite
    _ = consume errWrite

    var collected: [[UInt8]] = [[], []]
    var open = [true, true]
    let deadline = Clock.monotonicNanoseconds + 60_000_000_000
    while open[0] || open[1] {
        let now = Clock.monotonicNanoseconds
        if now >= deadline { break }
        var fds = [pollfd(fd: open[0] ? outRead.raw.rawValue : -1, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: open[1] ? errRead.raw.rawValue : -1, events: Int16(POLLIN), revents: 0)]
        let n = poll(&fds, 2, CInt((deadline - now) / 1_000_000) + 1)
        if n < 0 && errno == EINTR { continue }
        if n < 0 { throw Errno(rawValue: errno) }
        for i in 0..<2 where open[i] && fds[i].revents != 0 {
            var buf = [UInt8](repeating: 0, count: 4096)
            let got = read(fds[i].fd, &buf, buf.count)
            if got > 0 { collected[i] += buf[0..<got] } else if got == 0 || errno != EINTR { open[i] = false }
        }
    }
    if open[0] || open[1] { try? child.signal(SIGKILL) }
    let status = try child.wait(timeoutMilliseconds: 10_000)
    return ProbeRun(status: open[0] || open[1] ? nil : status,
                    output: String(decoding: collected[0], as: UTF8.self),
                    errors: String(decoding: collected[1], as: UTF8.self))
}

/// A `sleep` running as nobody (setpriv(1) from util-linux), or nil if setpriv is missing.
/// Killed and reaped when it goes away (ChildProcess's deinit).
private final class SameUIDProcess {
    let child: ChildProcess
    var pid: pid_t { child.pid }

    private init(child: consuming ChildProcess) { self.child = child }

    static func start() throws -> SameUIDProcess? {
        let setpriv = "/usr/bin/setpriv"
        guard access(setpriv, X_OK) == 0 else { return nil }
        let child = try ChildProcess(
            executable: setpriv,
            arguments: ["--reuid=\(SandboxTests.nobody)", "--regid=\(SandboxTests.nobody)", "--clear-groups",
                        "/bin/sleep", "60"])
        // Wait until it really runs as nobody, or the kill probe would test nothing new.
        let deadline = Clock.monotonicNanoseconds + 10_000_000_000
        while Clock.monotonicNanoseconds < deadline {
            if readFile("/proc/\(child.pid)/status")?.contains("\nUid:\t\(SandboxTests.nobody)\t") == true {
                return SameUIDProcess(child: child)
            }
            usleep(10_000)
        }
        throw Errno.timedOut
    }
}

// MARK: - Host state

/// The host's mounts at or under /tmp, from this process's /proc/self/mountinfo (mount
/// point is field 5).
private func tmpMounts() -> [String] {
    (readFile("/proc/self/mountinfo") ?? "").split(separator: "\n").compactMap { line in
        let f = line.split(separator: " ")
        guard f.count > 4, f[4] == "/tmp" || f[4].hasPrefix("/tmp/") else { return nil }
        return String(line)
    }
}

private func writeFile(_ path: String, _ text: String) throws {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    guard fd >= 0 else { throw Errno(rawValue: errno) }
    defer { close(fd) }
    var bytes = Array(text.utf8)
    guard write(fd, &bytes, bytes.count) == bytes.count else { throw Errno(rawValue: errno) }
}

private func readFile(_ path: String) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var result: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = read(fd, &buf, buf.count)
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { break }
        result += buf[0..<n]
    }
    return String(decoding: result, as: UTF8.self)
}
