import OutboardSession
import OutboardSystem

#if canImport(Glibc)
import Glibc
#endif

/// Block I/O with async/await, for convenience: each call copies its data through the
/// session's data region and resumes when the device has answered. Calls from many tasks
/// are in flight together, up to the queue depth. Throughput code uses `BlockSession`'s
/// batch API directly instead (no copies, no continuation per request).
///
/// Completions are collected by a pump that runs on the actor while anything is in flight
/// and sleeps on the session's completion doorbell in short slices, so other calls keep
/// getting in.
public actor AsyncBlockDevice {
    var session: BlockSession
    var waiters: [UInt32: CheckedContinuation<BlockResult, any Error>] = [:]
    var freeChunks: [Int]
    var pumping = false
    /// Bytes of the data region each call may use.
    public nonisolated let chunkBytes: Int
    public nonisolated let info: BlockInfo

    public init(session: consuming BlockSession) {
        let depth = session.queueDepth
        let chunk = (session.buffer.count / depth) & ~(blockSectorSize - 1)
        info = session.info
        chunkBytes = chunk
        freeChunks = Array((0..<depth).reversed())
        self.session = session
    }

    /// Opens a session (see `BlockSession.open`) with `queueDepth` chunks of
    /// `chunkBytes` each.
    public static func open(socketPath: String, device: String, writable: Bool, chunkBytes: Int = 128 << 10,
                            queueDepth: Int = 16, waitMilliseconds: Int = 0) throws -> AsyncBlockDevice {
        let s = try BlockSession.open(socketPath: socketPath, device: device, writable: writable,
                                      dataBytes: chunkBytes * queueDepth, queueDepth: queueDepth,
                                      waitMilliseconds: waitMilliseconds)
        return AsyncBlockDevice(session: s)
    }

    /// Capacity in 512-byte sectors.
    public nonisolated var sectorCount: UInt64 { info.blockCount }

    public func read(sector: UInt64, bytes: Int) async throws -> [UInt8] {
        try await withChunk { chunk in
            let r = try await perform(.read, sector: sector, offset: chunk, length: bytes)
            try Self.check(r)
            let b = session.buffer
            return Array(UnsafeRawBufferPointer(rebasing: b[chunk..<(chunk + bytes)]))
        }
    }

    public func write(sector: UInt64, _ data: [UInt8]) async throws {
        try await withChunk { chunk in
            guard data.count <= chunkBytes else {
                throw SessionError.invalidRequest("\(data.count) bytes: more than a call's \(chunkBytes)-byte chunk")
            }
            let b = session.buffer
            data.withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: b[chunk..<(chunk + data.count)]).copyMemory(from: $0) }
            try Self.check(try await perform(.write, sector: sector, offset: chunk, length: data.count))
        }
    }

    public func flush() async throws {
        try Self.check(try await perform(.flush, sector: 0, offset: 0, length: 0))
    }

    public func discard(sector: UInt64, bytes: Int) async throws {
        try Self.check(try await perform(.discard, sector: sector, offset: 0, length: bytes))
    }

    public func writeZeroes(sector: UInt64, bytes: Int) async throws {
        try Self.check(try await perform(.writeZeroes, sector: sector, offset: 0, length: bytes))
    }

    static func check(_ r: BlockResult) throws {
        guard let st = r.status else { throw BlockIOError(status: nil, op: r.op, sector: r.sector) }
        guard st == .ok else { throw BlockIOError(status: st, op: r.op, sector: r.sector) }
    }

    func withChunk<T>(_ body: (Int) async throws -> T) async throws -> T {
        while freeChunks.isEmpty { await Task.yield() }
        let c = freeChunks.removeLast()
        defer { freeChunks.append(c) }
        return try await body(c * chunkBytes)
    }

    func perform(_ op: BlockOp, sector: UInt64, offset: Int, length: Int) async throws -> BlockResult {
        while true {
            if let tag = try session.submit(op, sector: sector, offset: offset, length: length) {
                return try await withCheckedThrowingContinuation { c in
                    waiters[tag] = c
                    startPump()
                }
            }
            await Task.yield()  // queue full: let the pump make room
        }
    }

    func startPump() {
        guard !pumping else { return }
        pumping = true
        Task { await self.pump() }
    }

    func pump() async {
        let out = UnsafeMutableBufferPointer<BlockResult>.allocate(capacity: session.queueDepth)
        defer { out.deallocate() }
        while !waiters.isEmpty {
            do {
                let n = try session.wait(into: out, timeoutMilliseconds: 1)
                for i in 0..<n { waiters.removeValue(forKey: out[i].tag)?.resume(returning: out[i]) }
            } catch {
                for (_, c) in waiters { c.resume(throwing: error) }
                waiters.removeAll()
            }
            await Task.yield()
        }
        pumping = false
    }
}

/// A request the device (or driver) answered with an error status.
public struct BlockIOError: Error, Equatable, Sendable, CustomStringConvertible {
    public var status: BlockStatus?
    public var op: BlockOp
    public var sector: UInt64
    public var description: String {
        "\(op) at sector \(sector): \(status.map { "\($0)" } ?? "unknown status")"
    }
}
