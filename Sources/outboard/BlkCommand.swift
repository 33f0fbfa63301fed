import ArgumentParser
import FoundationEssentials
import Outboard
import OutboardSession
import OutboardSystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// `outboard blk info|read|write|verify`: a block device through a session, for people.
struct BlkCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "blk",
        abstract: "Look at and move data on a block device through the manager.",
        subcommands: [BlkInfo.self, BlkRead.self, BlkWrite.self, BlkVerify.self]
    )
}

struct BlkTarget: ParsableArguments {
    @OptionGroup var address: ManagerAddress

    @Option(help: "The device.")
    var device: String

    @Option(help: "Milliseconds to wait for a device that is not ready yet.")
    var waitMs: Int = 10_000

    func open(writable: Bool, dataBytes: Int, queueDepth: Int = 2) throws -> BlockSession {
        try BlockSession.open(socketPath: address.socketPath(), device: device, writable: writable, dataBytes: dataBytes,
                              queueDepth: queueDepth, waitMilliseconds: waitMs)
    }
}

/// A failure while doing the work (not a usage mistake): printed as "Error: ..." without
/// the usage text that ValidationError brings.
struct CommandFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Runs one request to completion and checks its status.
func runOne(_ s: inout BlockSession, _ op: BlockOp, sector: UInt64, offset: Int = 0, length: Int) throws {
    guard try s.submit(op, sector: sector, offset: offset, length: length) != nil else {
        throw CommandFailure("no free tag")
    }
    let out = UnsafeMutableBufferPointer<BlockResult>.allocate(capacity: 1)
    defer { out.deallocate() }
    var n = 0
    while n == 0 { n = try s.wait(into: out, timeoutMilliseconds: 1000) }
    guard let st = out[0].status, st == .ok else {
        throw CommandFailure("\(op) at sector \(sector): \(out[0].status.map { "\($0)" } ?? "unknown status")")
    }
}

struct BlkInfo: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "info", abstract: "Size, block size and capabilities.")
    @OptionGroup var target: BlkTarget
    @Flag(help: "Print one JSON object.") var json = false

    func run() throws {
        let s = try target.open(writable: false, dataBytes: 4096)
        let i = s.info
        if json {
            print("{\"device\":\"\(target.device)\",\"sectors\":\(i.blockCount),\"bytes\":\(i.blockCount * 512),\"max_transfer\":\(i.maxTransfer),\"flags\":\"\(i.flags)\"}")
        } else {
            print("device \(target.device): \(i.blockCount) sectors of 512 bytes (\(i.blockCount * 512) bytes)")
            print("  max transfer \(i.maxTransfer) bytes, capabilities: \(i.flags)")
        }
    }
}

struct BlkRead: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "read", abstract: "Read sectors to a file or as a hex dump.")
    @OptionGroup var target: BlkTarget
    @Option(help: "First sector (512 bytes).") var sector: UInt64 = 0
    @Option(help: "Sectors to read.") var count: Int = 1
    @Option(help: "Write the data to this file instead of a hex dump.") var output: String?

    func run() throws {
        guard count > 0 else { throw ValidationError("--count must be positive") }
        let bytes = count * 512
        let chunk = min(bytes, 1 << 20)
        var s = try target.open(writable: false, dataBytes: chunk)
        let step = min(chunk, Int(s.info.maxTransfer))
        var data = [UInt8]()
        data.reserveCapacity(bytes)
        var done = 0
        while done < bytes {
            let n = min(step, bytes - done)
            try runOne(&s, .read, sector: sector + UInt64(done / 512), length: n)
            data.append(contentsOf: UnsafeRawBufferPointer(rebasing: s.buffer[0..<n]))
            done += n
        }
        if let output {
            do {
                try OwnedFD.open(output, O_WRONLY | O_CREAT | O_TRUNC).writeAll(data)
            } catch {
                throw CommandFailure("cannot write \(output): \(error)")
            }
        } else {
            for line in stride(from: 0, to: data.count, by: 16) {
                let row = data[line..<min(line + 16, data.count)]
                let hex = row.map { b in String(b, radix: 16).leftPadded(2) }.joined(separator: " ")
                let text = String(row.map { (32...126).contains($0) ? Character(UnicodeScalar($0)) : "." })
                print("\(String(Int(sector) * 512 + line, radix: 16).leftPadded(8))  \(hex)  \(text)")
            }
        }
    }
}

struct BlkWrite: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "write",
                                                    abstract: "Write a file (padded to whole sectors) or a byte pattern.")
    @OptionGroup var target: BlkTarget
    @Option(help: "First sector (512 bytes).") var sector: UInt64 = 0
    @Option(help: "File to write (up to 1 GiB).") var input: String?
    @Option(help: "Write this byte value instead of a file...") var pattern: UInt8?
    @Option(help: "...over this many sectors.") var count: Int = 1
    @Flag(help: "Flush afterwards.") var flush = false

    func run() throws {
        var data: [UInt8]
        if let input {
            // A read error is an error, not the end of the input (which would write a cut file).
            do { data = try OwnedFD.open(input, O_RDONLY).readToEnd() } catch {
                throw CommandFailure("cannot read \(input): \(error)")
            }
        } else if let pattern {
            data = [UInt8](repeating: pattern, count: count * 512)
        } else {
            throw ValidationError("give --input FILE or --pattern BYTE")
        }
        guard !data.isEmpty else { throw ValidationError("nothing to write") }
        data += [UInt8](repeating: 0, count: (512 - data.count % 512) % 512)
        let chunk = min(data.count, 1 << 20)
        var s = try target.open(writable: true, dataBytes: chunk)
        let step = min(chunk, Int(s.info.maxTransfer))
        var done = 0
        while done < data.count {
            let n = min(step, data.count - done)
            let b = s.buffer
            data[done..<(done + n)].withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: b[0..<n]).copyMemory(from: $0) }
            try runOne(&s, .write, sector: sector + UInt64(done / 512), length: n)
            done += n
        }
        if flush { try runOne(&s, .flush, sector: 0, length: 0) }
        print("wrote \(data.count) bytes at sector \(sector)\(flush ? ", flushed" : "")")
    }
}

struct BlkVerify: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "A verified random read/write workload: every read checked against the last write (overwrites the blocks it uses).")
    @OptionGroup var target: BlkTarget
    @Option(help: "Operations after every block was written once.") var ops: Int = 10_000
    @Option(help: "4 KiB blocks used, from the start of the device.") var blocks: Int = 1024
    @Option(help: "Requests in flight.") var depth: Int = 16
    @Option(help: "Random seed.") var seed: UInt64 = 1

    func run() throws {
        let s = try target.open(writable: true, dataBytes: depth * VerifiedWorkload.blockBytes, queueDepth: depth)
        guard UInt64(blocks) * 8 <= s.info.blockCount else {
            throw ValidationError("\(blocks) blocks of 4 KiB do not fit the device's \(s.info.blockCount) sectors")
        }
        var w = VerifiedWorkload(session: s, blocks: blocks, seed: seed)
        let t0 = Clock.monotonicNanoseconds
        try w.prepare()
        try w.run(operations: ops)
        try w.finish()
        let secs = Double(Clock.monotonicNanoseconds - t0) / 1e9
        print("\(w.ops) ops (\(w.reads) reads, \(w.writes) writes) in \(Int(secs * 1000)) ms: verify errors \(w.verifyErrors), client errors \(w.clientErrors)")
        if let e = w.firstError { print("first error: \(e)") }
        if w.verifyErrors > 0 || w.clientErrors > 0 { throw ExitCode(1) }
    }
}

extension String {
    func leftPadded(_ n: Int) -> String { count >= n ? self : String(repeating: "0", count: n - count) + self }
}
