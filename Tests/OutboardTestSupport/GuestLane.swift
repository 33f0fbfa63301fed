import OutboardSystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Runs shell commands inside the guest lane: a QEMU guest (TCG) with an emulated Intel
/// IOMMU and two virtio-blk-pci disks, booted by `scripts/guest-lane.sh` with the fully
/// static `outboard` on its PATH (docs/testing.md, "The guest lane"). VFIO works there,
/// which it does not on the host.
///
/// A boot costs seconds to tens of seconds under TCG, so a test that checks several things
/// does them in one boot with `run(checks:)`. The static `outboard` is built once per test
/// process, on the first run; every boot after that uses that binary.
public enum GuestLane {
    /// Where the two disks sit in the guest, and the serial number each reports.
    public static let outboardDisk = (address: "0000:00:04.0", serial: "outboard-vfio")
    public static let kernelDisk = (address: "0000:00:05.0", serial: "guest-kernel")

    /// What one boot gave back.
    public struct Run: Sendable, CustomStringConvertible {
        /// The command's stdout and stderr, as the command wrote them.
        public var output: String
        /// The command's exit status.
        public var status: Int32
        /// What the lane printed (its phase timings).
        public var log: String

        public var description: String { "status \(status)\noutput:\n\(output)\nlane:\n\(log)" }
    }

    /// One of several commands run in the same boot (`run(checks:)`).
    public struct Check: Sendable, CustomStringConvertible {
        public var name: String
        public var output: String
        public var status: Int32
        public var lines: [String] { output.split(separator: "\n", omittingEmptySubsequences: false).map(String.init) }
        public var description: String { "[\(name)] status \(status)\n\(output)" }
    }

    /// What `run(checks:)` gave back: each check in order, and the whole run.
    public struct CheckRun: Sendable, CustomStringConvertible {
        public var checks: [Check]
        public var run: Run
        /// The check named `name`, or nil when the guest never got to report it.
        public subscript(_ name: String) -> Check? { checks.first { $0.name == name } }
        public var description: String { run.description }
    }

    /// Boots the guest, runs `command` in its sh (as root, in a tmpfs), and returns the
    /// output and status. `copying` files land in the guest's /opt, which is on PATH;
    /// `includingFio: false` leaves fio out, which halves the boot (its libraries are 84 MB).
    /// Throws when the lane itself fails (build, boot, the guest dying, the timeout), not
    /// for a command that fails: that is its status.
    /// `workDirectory`: where the disk images (`outboard.img`, `kernel.img`) and logs go,
    /// kept afterwards, so a test can read what the guest wrote to a disk.
    public static func run(_ command: String, timeoutSeconds: Int = 600, copying files: [String] = [],
                           diskSize: String = "64M", memory: String = "1G",
                           includingFio: Bool = true, workDirectory: String? = nil) throws(GuestLaneError) -> Run {
        let binary = try staticOutboard.get()
        var arguments = ["--outboard", binary, "--timeout", "\(timeoutSeconds)", "--disk-size", diskSize, "--memory", memory]
        if let w = workDirectory { arguments += ["--work-dir", w] }
        for f in files { arguments += ["--copy", f] }
        if !includingFio { arguments.append("--no-fio") }
        arguments += ["--", command]
        // The lane stops the guest at its own timeout; this one covers the rest of the script
        // and any wait for another boot to end (the lane boots one guest at a time).
        let result = try runScript(arguments, seconds: 2 * Double(timeoutSeconds) + 300)
        guard let status = result.status else {
            throw .laneFailed("the guest lane did not report the command's status (script \(result.exit.map { "\($0)" } ?? "killed at its deadline"))",
                              log: result.stdout + result.stderr)
        }
        return Run(output: result.stdout, status: status, log: result.stderr)
    }

    /// Runs each `(name, command)` in turn in one boot, each in a subshell of its own (an
    /// `exit` ends only that check), and returns each one's output and status. The run's
    /// status is the last check's.
    public static func run(checks: [(name: String, command: String)], timeoutSeconds: Int = 600,
                           copying files: [String] = [], diskSize: String = "64M",
                           memory: String = "1G", includingFio: Bool = true,
                           workDirectory: String? = nil) throws(GuestLaneError) -> CheckRun {
        // Each check's output sits between a begin line and "\n<end marker> STATUS", so an
        // output without a final newline still ends where it did.
        var script = "s=0\n"
        for c in checks {
            script += "echo '\(beginMarker) \(c.name)'\n( \(c.command)\n) 2>&1\ns=$?\nprintf '\\n\(endMarker) %d\\n' $s\n"
        }
        script += "exit $s\n"
        let run = try run(script, timeoutSeconds: timeoutSeconds, copying: files, diskSize: diskSize, memory: memory,
                          includingFio: includingFio, workDirectory: workDirectory)
        return CheckRun(checks: parseChecks(run.output), run: run)
    }

    static let beginMarker = "@@guest-lane-check-begin"
    static let endMarker = "@@guest-lane-check-end"

    static func parseChecks(_ output: String) -> [Check] {
        var checks: [Check] = []
        var current: (name: String, lines: [Substring])? = nil
        for line in output.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix(beginMarker + " ") {
                current = (String(line.dropFirst(beginMarker.count + 1)), [])
            } else if line.hasPrefix(endMarker + " "), let c = current {
                let status = Int32(line.dropFirst(endMarker.count + 1)) ?? -1
                // The printf's own "\n" ended the last line of output (or stands alone).
                let body = c.lines.joined(separator: "\n")
                checks.append(Check(name: c.name, output: body, status: status))
                current = nil
            } else {
                current?.lines.append(line)
            }
        }
        return checks
    }

    // MARK: - The script

    /// The package root: this file is Tests/OutboardTestSupport/GuestLane.swift.
    static let packageRoot: String = {
        var path = #filePath
        for _ in 0..<3 { path = String(path[..<(path.lastIndex(of: "/") ?? path.startIndex)]) }
        return path
    }()

    static var script: String { packageRoot + "/scripts/guest-lane.sh" }

    /// The stripped static `outboard` of this source tree, built on first use (a minute or
    /// two from scratch, seconds when .build-static is up to date).
    static let staticOutboard: Result<String, GuestLaneError> = {
        do throws(GuestLaneError) {
            let r = try runScript(["--build-only"], seconds: 3600)
            let path = r.stdout.split(separator: "\n").last.map(String.init) ?? ""
            guard r.exit == .exited(0), path.hasPrefix("/") else {
                return .failure(.laneFailed("building the static outboard failed (\(r.exit.map { "\($0)" } ?? "killed at its deadline"))",
                                            log: r.stdout + r.stderr))
            }
            return .success(path)
        } catch {
            return .failure(error)
        }
    }()

    private struct ScriptResult {
        var exit: ExitStatus?
        var status: Int32?  // the command's, from --result
        var stdout: String
        var stderr: String
    }

    /// Runs the lane script with its stdout and stderr in files (no pipe to keep drained),
    /// for at most `seconds`.
    private static func runScript(_ arguments: [String], seconds: Double) throws(GuestLaneError) -> ScriptResult {
        var template = Array("/tmp/outboard-guest-lane.XXXXXX".utf8CString)
        guard let dirPointer = mkdtemp(&template) else { throw .couldNotStart(Errno(rawValue: errno)) }
        let dir = String(cString: dirPointer)
        defer {
            for f in ["stdout", "stderr", "result"] { unlink(dir + "/" + f) }
            rmdir(dir)
        }
        do throws(Errno) {
            let out = try OwnedFD.open(dir + "/stdout", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode: 0o600)
            let err = try OwnedFD.open(dir + "/stderr", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode: 0o600)
            let withResult = arguments.first == "--build-only" ? arguments : ["--result", dir + "/result"] + arguments
            var child = try ChildProcess(executable: "/bin/bash", arguments: [script] + withResult,
                                         descriptors: [(out.raw, 1), (err.raw, 2)])
            let exit = try child.wait(timeoutMilliseconds: Int(seconds * 1000))
            if exit == nil { child.terminate(SIGTERM, graceMilliseconds: 10_000) }
            let resultText = readWholeFile(dir + "/result")
            let status = resultText.flatMap { Int32($0.split(separator: "\n").first ?? "") }
            return ScriptResult(exit: exit, status: exit == nil ? nil : status,
                                stdout: readWholeFile(dir + "/stdout") ?? "", stderr: readWholeFile(dir + "/stderr") ?? "")
        } catch {
            throw .couldNotStart(error)
        }
    }

    private static func readWholeFile(_ path: String) -> String? {
        guard let fd = try? OwnedFD.open(path, O_RDONLY | O_CLOEXEC), let bytes = try? fd.readToEnd() else { return nil }
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// The guest lane itself failed: the command's own failures are its exit status.
public enum GuestLaneError: Error, Sendable, CustomStringConvertible {
    /// The lane script could not be started.
    case couldNotStart(Errno)
    /// The build, the boot or the guest failed, or it ran past its timeout; `log` is what
    /// the script printed (it ends with the guest console's last lines).
    case laneFailed(String, log: String)

    public var description: String {
        switch self {
        case .couldNotStart(let e): return "guest lane: could not run scripts/guest-lane.sh: \(e)"
        case .laneFailed(let what, let log): return "guest lane: \(what)\n\(log)"
        }
    }
}
