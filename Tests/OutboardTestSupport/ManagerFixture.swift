import Foundation
import Outboard
import OutboardSession
import OutboardSystem

public struct FixtureError: Error, CustomStringConvertible {
    public let description: String
    public init(_ s: String) { description = s }
}

/// A real manager process (`outboard run`) with a config of the test's making, its
/// drivers sandboxed as in production. Stopped (SIGTERM, then SIGKILL) when dropped.
/// Shared by the test targets that run a manager: ManagerTests, OutboardTests, DriversTests.
public final class ManagerFixture {
    public let directory: String
    public let socketPath: String
    public let configPath: String
    var process: ChildProcess?

    /// `devices`: the JSON of the "devices" array. `extra`: more top-level keys.
    /// `leaseMs` and `heartbeatDeadlineMs`: the manager's lease and hang-detection times.
    public init(devices: String, extra: String = "", leaseMs: Int = 1000, heartbeatDeadlineMs: Int = 300) throws {
        directory = NSTemporaryDirectory() + "outboard-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        socketPath = directory + "/control.sock"
        configPath = directory + "/outboard.json"
        let config = """
            {
              "control_socket": "\(socketPath)",
              "driver_user": "nobody",
              "lease_ms": \(leaseMs),
              "heartbeat_interval_ms": 20,
              "heartbeat_deadline_ms": \(heartbeatDeadlineMs),
              \(extra.isEmpty ? "" : extra + ",")
              "devices": \(devices)
            }
            """
        try config.write(toFile: configPath, atomically: true, encoding: .utf8)
        var child = try ChildProcess(executable: try outboardExecutable(),
                                     arguments: ["run", "--config", configPath, "--log-level", "warning"])
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline {
            if (try? UnixSocket.connect(path: socketPath)) != nil { break }
            if let status = try child.wait(timeoutMilliseconds: 20) {
                throw FixtureError("manager exited at start: \(status)")
            }
        }
        process = consume child
        // Wait until every driver reported ready (or the device failed).
        while Date() < deadline {
            let s = try status()
            if s.allSatisfy({ $0.state == "running" || $0.state == "failed" }) { return }
            usleep(10_000)
        }
        throw FixtureError("drivers not ready within 20 s")
    }

    deinit {
        if process != nil {
            try? process!.signal(SIGTERM)
            try? process!.signal(SIGCONT)  // a test that paused it and then failed
            if (try? process!.wait(timeoutMilliseconds: 5000)) == nil {
                try? process!.signal(SIGKILL)
            }
        }
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// Stops (SIGSTOP) the manager process: it renews no lease and answers nothing until
    /// `resume()`. Its drivers and clients go on.
    public func pause() throws { try process!.signal(SIGSTOP) }

    /// Kills (SIGKILL) the manager process: it closes nothing in order, its clients see their
    /// connections end.
    public func kill() throws { try process!.signal(SIGKILL) }

    /// Continues (SIGCONT) a manager stopped by `pause()`.
    public func resume() throws { try process!.signal(SIGCONT) }

    public func admin() throws -> AdminConnection { try AdminConnection(socketPath: socketPath) }

    /// The status report, parsed.
    public func report() throws -> [String: Any] {
        let json = try admin().status()
        return try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [String: Any]
    }

    public struct DeviceStatus {
        public var name: String
        public var state: String
        public var generation: Int
        public var restarts: Int
        public var failures: Int
        public var lastFailure: String?
        public var revokedIdle: Int
        public var revokedAtLeaseEnd: Int
        public var registeredBytes: Int
        public var probes: [String]
        public var pid: Int?
    }

    public func status() throws -> [DeviceStatus] {
        let r = try report()
        return (r["devices"] as! [[String: Any]]).map { d in
            DeviceStatus(name: d["name"] as! String, state: d["state"] as! String, generation: d["generation"] as! Int,
                         restarts: d["restarts"] as! Int, failures: d["failures"] as! Int, lastFailure: d["last_failure"] as? String,
                         revokedIdle: d["revoked_idle"] as! Int, revokedAtLeaseEnd: d["revoked_at_lease_end"] as! Int,
                         registeredBytes: d["registered_bytes"] as! Int, probes: d["sandbox_probes"] as! [String],
                         pid: d["pid"] as? Int)
        }
    }

    public func device(_ name: String) throws -> DeviceStatus {
        guard let d = try status().first(where: { $0.name == name }) else { throw FixtureError("no device \(name)") }
        return d
    }

    public func sessions() throws -> [[String: Any]] { try report()["sessions"] as! [[String: Any]] }

    /// Polls `condition` until it holds or `seconds` pass (state, not timing, is asserted).
    public func waitFor(_ what: String, seconds: Double = 20, _ condition: () throws -> Bool) throws {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if try condition() { return }
            usleep(10_000)
        }
        throw FixtureError("timed out waiting for \(what)")
    }

    public func open(_ device: String, writable: Bool = true, dataBytes: Int = 16 * 4096, depth: Int = 16) throws(SessionError) -> BlockSession {
        try BlockSession.open(socketPath: socketPath, device: device, writable: writable, dataBytes: dataBytes, queueDepth: depth)
    }
}

/// A device entry for the fixture's config.
public func memDevice(_ name: String, sizeMib: Int = 16, access: String = #"[{"uid": 0, "mode": "rw"}]"#,
               limits: String = "{}", extra: String = "") -> String {
    """
    {"name": "\(name)", "transport": "memory", "size_mib": \(sizeMib), "access": \(access), "limits": \(limits)\(extra.isEmpty ? "" : ", " + extra)}
    """
}

/// Runs one request and waits for it, at most `seconds` (then throws: a lost request
/// fails the test instead of hanging it).
public func io(_ s: inout BlockSession, _ op: BlockOp, sector: UInt64, offset: Int = 0, length: Int = 4096,
               within seconds: Double = testDeadlineSeconds) throws(SessionError) -> BlockStatus? {
    guard try s.submit(op, sector: sector, offset: offset, length: length) != nil else { throw .invalidRequest("queue full") }
    var result: BlockStatus?? = nil
    try drain(&s, within: seconds) { r in result = r.status }
    return result ?? nil
}

/// Values held together that an Array cannot hold (BlockSession, UnixSocket and other
/// ~Copyable types): kept in raw storage, ended (deinit) with the holder.
public struct Held<Element: ~Copyable>: ~Copyable {
    private let storage: UnsafeMutablePointer<Element>
    public let capacity: Int
    public private(set) var count = 0

    public init(capacity: Int) {
        storage = .allocate(capacity: capacity)
        self.capacity = capacity
    }

    deinit {
        storage.deinitialize(count: count)
        storage.deallocate()
    }

    public mutating func append(_ element: consuming Element) {
        precondition(count < capacity, "more than capacity \(capacity)")
        (storage + count).initialize(to: element)
        count += 1
    }

    /// Runs `body` on the `k`th element.
    public func with<R>(_ k: Int, _ body: (inout Element) throws -> R) rethrows -> R {
        precondition(k >= 0 && k < count)
        return try body(&storage[k])
    }
}
