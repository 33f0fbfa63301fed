import Foundation
import OutboardSystem
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

// Network namespaces for tests that need the kernel as a network peer (a TAP's other end,
// ping, iperf3), through iproute2's `ip netns`. Every namespace is owned by a value that
// deletes it when it goes away; names carry the test process's pid, so parallel test
// processes never share one, and namespaces a killed test process left behind are deleted
// by the next one. At most `NetworkNamespace.limit` live at once per process (more wait), and every
// command has a deadline.

/// What a command printed (stdout and stderr together) and how it ended.
public struct CommandResult: Sendable, CustomStringConvertible {
    public let command: [String]
    public let status: Int32
    /// Whether it was killed at its deadline.
    public let timedOut: Bool
    public let output: String
    public var succeeded: Bool { status == 0 && !timedOut }
    public var description: String {
        "`\(command.joined(separator: " "))` \(timedOut ? "killed at its deadline" : "exited with \(status)"): \(output)"
    }
}

/// A command that failed: its result.
public struct CommandFailed: Error, CustomStringConvertible {
    public let result: CommandResult
    public var description: String { result.description }
}

/// A command running in the background: its output is collected as it comes (a chatty
/// command never blocks on a full pipe), and it is killed at its deadline.
public struct BackgroundCommand: ~Copyable {
    /// What the reader and the watchdog share with the owner.
    final class Shared: Sendable {
        let output = Mutex(Data())
        let collected = DispatchSemaphore(value: 0)
        let killed = Atomic<Bool>(false)
    }
    let process: Process
    let command: [String]
    let shared = Shared()
    let watchdog: DispatchWorkItem

    /// Starts `executable` with `arguments`; killed (SIGKILL) if it runs longer than `seconds`.
    public init(_ executable: String, _ arguments: [String], seconds: Double) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: executable)
        p.arguments = arguments
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        p.standardInput = FileHandle.nullDevice
        try p.run()
        process = p
        command = [executable] + arguments
        let shared = self.shared
        let reader = pipe.fileHandleForReading
        DispatchQueue.global().async {
            while true {
                let chunk = reader.availableData
                if chunk.isEmpty { break }
                shared.output.withLock { $0.append(chunk) }
            }
            shared.collected.signal()
        }
        let pid = p.processIdentifier
        watchdog = DispatchWorkItem {
            shared.killed.store(true, ordering: .relaxed)
            kill(pid, SIGKILL)
        }
        DispatchQueue.global().asyncAfter(deadline: .now() + seconds, execute: watchdog)
    }

    public var isRunning: Bool { process.isRunning }
    public var pid: pid_t { process.processIdentifier }

    /// What it printed so far.
    public var output: String { shared.output.withLock { String(decoding: $0, as: UTF8.self) } }

    /// Waits until its output contains `text`, at most `seconds`; false if it did not
    /// (the command ended or the time passed first).
    public func waitForOutput(_ text: String, seconds: Double = testDeadlineSeconds) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if output.contains(text) { return true }
            if !process.isRunning { return output.contains(text) }
            usleep(20_000)
        }
        return false
    }

    /// Sends it `signal` (SIGTERM to stop it cleanly).
    public func signal(_ signal: Int32) { kill(process.processIdentifier, signal) }

    /// Waits for it to end (the watchdog bounds the wait) and returns what it printed.
    public consuming func finish() -> CommandResult {
        process.waitUntilExit()
        watchdog.cancel()
        // The pipe ends with the process, unless a child it left behind holds it open.
        _ = shared.collected.wait(timeout: .now() + 5)
        let text = shared.output.withLock { String(decoding: $0, as: UTF8.self) }
        return CommandResult(command: command, status: process.terminationStatus,
                             timedOut: shared.killed.load(ordering: .relaxed), output: text)
    }

    deinit {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        watchdog.cancel()
    }
}

/// Runs `executable` with `arguments` to its end, at most `seconds`.
public func runCommand(_ executable: String, _ arguments: [String], seconds: Double = testDeadlineSeconds) throws -> CommandResult {
    try BackgroundCommand(executable, arguments, seconds: seconds).finish()
}

/// As `runCommand`, throwing `CommandFailed` unless it exits with status 0.
@discardableResult
public func runChecked(_ executable: String, _ arguments: [String], seconds: Double = testDeadlineSeconds) throws -> CommandResult {
    let r = try runCommand(executable, arguments, seconds: seconds)
    guard r.succeeded else { throw CommandFailed(result: r) }
    return r
}

/// iproute2's `ip`, or nil when it is not installed (scripts/setup.sh installs it).
public let ipTool: String? = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"].first { access($0, X_OK) == 0 }

/// Whether this process can run the network-namespace tests: root, /dev/net/tun, `ip`
/// and `ping`.
public var canUseNetworkNamespaces: Bool {
    getuid() == 0 && access("/dev/net/tun", R_OK | W_OK) == 0 && ipTool != nil
        && ["/usr/bin/ping", "/bin/ping"].contains { (path: String) in access(path, X_OK) == 0 }
}

private let linkSerial = Atomic<Int>(0)

/// An interface name no other test (in this process or another) uses: "ob", the pid in
/// hex, a tag letter and a serial, within IFNAMSIZ.
public func uniqueLinkName(_ tag: Character = "t") -> String {
    let n = linkSerial.add(1, ordering: .relaxed).newValue
    let name = "ob\(String(getpid(), radix: 16))\(tag)\(n)"
    precondition(name.utf8.count <= TapDevice.maxNameLength, "interface name \(name) too long")
    return name
}

/// A named network namespace (`ip netns add`), deleted (`ip netns del`) when its value
/// goes away. Interfaces in it go back to the initial namespace then (a TAP also goes
/// away when its descriptor is closed).
public struct NetworkNamespace: ~Copyable {
    public let name: String

    /// How many may exist at once in one test process; more wait for one to go.
    public static let limit = 8
    static let live = Mutex(0)
    static let serial = Atomic<Int>(0)
    static let swept = Mutex(false)
    static let prefix = "obtest-"

    /// Creates a new namespace "obtest-PID-N" with its loopback up. Waits while `limit`
    /// are live (throws after a test deadline); throws when `ip` fails.
    public init() throws {
        guard let ip = ipTool else { throw CommandFailed(result: CommandResult(command: ["ip"], status: 127, timedOut: false, output: "iproute2 is not installed")) }
        try Self.sweepStale(ip)
        // Admission: wait for a free slot, at most a test deadline.
        let deadline = Clock.monotonicNanoseconds + UInt64(testDeadlineSeconds * 1e9)
        while !Self.live.withLock({ n -> Bool in
            guard n < Self.limit else { return false }
            n += 1
            return true
        }) {
            guard Clock.monotonicNanoseconds < deadline else {
                throw CommandFailed(result: CommandResult(command: ["ip", "netns", "add"], status: -1, timedOut: true,
                                                          output: "\(Self.limit) test namespaces stayed in use for \(testDeadlineSeconds) s"))
            }
            usleep(10_000)
        }
        let name = "\(Self.prefix)\(getpid())-\(Self.serial.add(1, ordering: .relaxed).newValue)"
        do {
            try OutboardTestSupport.runChecked(ip, ["netns", "add", name])
            try OutboardTestSupport.runChecked(ip, ["-n", name, "link", "set", "lo", "up"])
        } catch {
            _ = try? runCommand(ip, ["netns", "del", name])
            Self.live.withLock { $0 -= 1 }
            throw error
        }
        self.name = name
    }

    deinit {
        if let ip = ipTool { _ = try? runCommand(ip, ["netns", "del", name]) }
        Self.live.withLock { $0 -= 1 }
    }

    /// Moves interface `link` from the caller's namespace into this one
    /// (`ip link set dev LINK netns NAME`); it arrives down.
    public func moveLink(_ link: String) throws {
        try OutboardTestSupport.runChecked(ipTool!, ["link", "set", "dev", link, "netns", name])
    }

    /// Runs `arguments` (a program on PATH and its arguments) in this namespace
    /// (`ip netns exec`) to its end, at most `seconds`.
    public func run(_ arguments: [String], seconds: Double = testDeadlineSeconds) throws -> CommandResult {
        try runCommand(ipTool!, ["netns", "exec", name] + arguments, seconds: seconds)
    }

    /// As `run`, throwing unless it exits with status 0.
    @discardableResult
    public func runChecked(_ arguments: [String], seconds: Double = testDeadlineSeconds) throws -> CommandResult {
        try OutboardTestSupport.runChecked(ipTool!, ["netns", "exec", name] + arguments, seconds: seconds)
    }

    /// Starts `arguments` in this namespace in the background, killed after `seconds`.
    public func start(_ arguments: [String], seconds: Double = testDeadlineSeconds) throws -> BackgroundCommand {
        try BackgroundCommand(ipTool!, ["netns", "exec", name] + arguments, seconds: seconds)
    }

    /// Deletes namespaces "obtest-PID-N" whose process no longer exists (once per process).
    static func sweepStale(_ ip: String) throws {
        try swept.withLock { done in
            guard !done else { return }
            done = true
            let names = (try? FileManager.default.contentsOfDirectory(atPath: "/run/netns")) ?? []
            for n in names where n.hasPrefix(prefix) {
                let rest = n.dropFirst(prefix.count)
                guard let dash = rest.firstIndex(of: "-"), let pid = pid_t(rest[..<dash]) else { continue }
                if kill(pid, 0) != 0 && errno == ESRCH { _ = try runCommand(ip, ["netns", "del", n]) }
            }
        }
    }
}
