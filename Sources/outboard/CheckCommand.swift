import ArgumentParser
import FoundationEssentials
import Manager
import Outboard
import OutboardSession
import OutboardSystem

#if canImport(Glibc)
import Glibc
#endif

/// `outboard check --config FILE --device NAME`: does a device work through Outboard? On a
/// running manager (or one it starts from the config and stops after), one session runs
/// every block operation the device offers and checks each answer:
///
/// - `verified-workload`: random reads and writes at queue depth 16, every read compared
///   with what was last written there;
/// - `pattern`: a known pattern (from `--seed`) written at `--pattern-offset`, flushed and
///   read back: whoever holds the disk image afterwards can compare its bytes;
/// - `flush`, `write-zeroes` (read back as zeros), `discard`: where the device offers them;
/// - `beyond-capacity`: a request past the end is refused as invalid, not served;
/// - `dma-isolation` (with `--dma-isolation`, devices behind an IOMMU): the driver is made
///   to point the status descriptor of its next request at an IO address no grant covers
///   (fault `stray-dma`); that request, and only it, ends with an I/O error, a second
///   session's data region is unchanged, and the next request works. Then again at the IO
///   address of a third session's region after that session was closed and revoked (the
///   manager refuses the address if anything holds it again by then). Each of the two
///   requests fails with or without an IOMMU (its status byte is never written where the
///   driver reads it); that the IOMMU refused the writes shows in the kernel log, a DMAR
///   fault at each address on x86, which the guest-lane test reads.
///
/// One line per check (`check NAME ok|failed|skipped: detail`), or with `--json` one
/// object. Exit status 0 only if no check failed.
struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Check a device through Outboard: verified reads and writes, flush, write-zeroes, discard, limits."
    )

    @Option(help: "The manager's configuration file (a running manager, or one to start).")
    var config: String

    @Option(help: "The device to check.")
    var device: String

    @Option(help: "4 KiB blocks the verified workload uses (from block 0).")
    var blocks: Int = 2048

    @Option(help: "Operations of the verified workload.")
    var operations: Int = 4000

    @Option(help: "Byte offset of the 64 KiB pattern (after the workload's blocks).")
    var patternOffset: UInt64 = 16 << 20

    @Option(help: "Seed of the workload and the pattern.")
    var seed: UInt64 = 1

    @Flag(help: "Also check that the IOMMU contains a driver's stray DMA (transport vfio; needs admin rights).")
    var dmaIsolation = false

    @Flag(help: "Print one JSON object.")
    var json = false

    struct Result: Encodable {
        var name: String
        var outcome: String
        var detail: String
    }

    func run() throws {
        let results = try withManager(config: config) { try check(socket: $0) }
        let failed = results.filter { $0.outcome == "failed" }.count
        if json {
            struct Summary: Encodable { var device: String; var checks: [Result]; var failed: Int }
            let e = JSONEncoder()
            e.outputFormatting = [.sortedKeys]
            print(String(decoding: try e.encode(Summary(device: device, checks: results, failed: failed)), as: UTF8.self))
        } else {
            for r in results { print("check \(r.name) \(r.outcome): \(r.detail)") }
        }
        if failed > 0 { throw ExitCode(1) }
    }

    static let patternBytes = 64 << 10

    /// The pattern `check` writes: byte i of it is a function of i and the seed.
    static func pattern(seed: UInt64, count: Int) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: UInt64($0) &* 0x9E37_79B9 &+ seed &* 131 &+ UInt64($0 >> 12)) }
    }

    func check(socket: String) throws -> [Result] {
        var results: [Result] = []
        func note(_ name: String, _ ok: Bool?, _ detail: String) {
            results.append(Result(name: name, outcome: ok == nil ? "skipped" : ok! ? "ok" : "failed", detail: detail))
        }
        let depth = 16
        let session = try BlockSession.open(socketPath: socket, device: device, writable: true,
                                            dataBytes: max(depth, Self.patternBytes / VerifiedWorkload.blockBytes) * VerifiedWorkload.blockBytes,
                                            queueDepth: depth, waitMilliseconds: 30_000)
        let info = session.info
        var w = VerifiedWorkload(session: session, blocks: blocks, seed: seed)
        do {
            try w.prepare()
            try w.run(operations: operations)
            try w.finish()
            note("verified-workload", w.verifyErrors == 0, "\(w.ops) operations on \(blocks) blocks, \(w.verifyErrors) verify errors")
        } catch {
            note("verified-workload", false, "\(error)")
            return results
        }
        let sectors = info.blockCount
        let patternSector = patternOffset / 512
        guard patternOffset % 4096 == 0, patternSector + UInt64(Self.patternBytes / 512) <= sectors else {
            note("pattern", false, "offset \(patternOffset) does not fit a \(Self.patternBytes)-byte pattern on \(sectors) sectors")
            return results
        }
        let expected = Self.pattern(seed: seed, count: Self.patternBytes)
        do {
            expected.withUnsafeBytes { w.session.buffer.copyMemory(from: $0) }
            var status = try io(&w.session, .write, sector: patternSector, length: Self.patternBytes)
            if status == .ok, info.flags.contains(.flush) { status = try io(&w.session, .flush, sector: 0, length: 0) }
            w.session.buffer.initializeMemory(as: UInt8.self, repeating: 0)
            if status == .ok { status = try io(&w.session, .read, sector: patternSector, length: Self.patternBytes) }
            let same = status == .ok && w.session.buffer.prefix(Self.patternBytes).elementsEqual(expected)
            note("pattern", same, "\(Self.patternBytes) bytes at \(patternOffset): write, flush, read back: \(status)\(same ? "" : ", bytes differ")")
        }
        if info.flags.contains(.flush) {
            let st = try io(&w.session, .flush, sector: 0, length: 0)
            note("flush", st == .ok, "\(st)")
        } else {
            note("flush", nil, "the device writes through (no flush)")
        }
        // Write-zeroes and discard on the 64 KiB after the pattern.
        let scratch = patternSector + UInt64(Self.patternBytes / 512)
        if info.flags.contains(.writeZeroes), scratch + 128 <= sectors {
            w.session.buffer.initializeMemory(as: UInt8.self, repeating: 0xA5)
            var st = try io(&w.session, .write, sector: scratch, length: 65536)
            if st == .ok { st = try io(&w.session, .writeZeroes, sector: scratch, length: 65536) }
            w.session.buffer.initializeMemory(as: UInt8.self, repeating: 0xA5)
            if st == .ok { st = try io(&w.session, .read, sector: scratch, length: 65536) }
            let zero = st == .ok && w.session.buffer.prefix(65536).allSatisfy { $0 == 0 }
            note("write-zeroes", zero, "64 KiB written, zeroed, read back: \(st)\(zero || st != .ok ? "" : ", not zero")")
        } else {
            note("write-zeroes", nil, "not offered")
        }
        if info.flags.contains(.discard), scratch + 128 <= sectors {
            let st = try io(&w.session, .discard, sector: scratch, length: 65536)
            note("discard", st == .ok, "\(st)")
        } else {
            note("discard", nil, "not offered")
        }
        let beyond = try io(&w.session, .read, sector: sectors - 4, length: 4096)
        note("beyond-capacity", beyond == .invalid, "a 4 KiB read 2 KiB before the end: \(beyond)")
        if dmaIsolation {
            let (ok, detail) = try checkDMAIsolation(socket: socket, &w.session, patternSector: patternSector, expected: expected)
            note("dma-isolation", ok, detail)
        }
        return results
    }

    /// A second session with a known 64 KiB in its data region, the stray-dma fault, one
    /// read on the first session (the victim of the stray descriptor), then a read that
    /// must work again.
    func checkDMAIsolation(socket: String, _ s: inout BlockSession, patternSector: UInt64,
                           expected: [UInt8]) throws -> (Bool, String) {
        let admin = try AdminConnection(socketPath: socket)
        let before = try sessionAddresses(admin)
        var other = try BlockSession.open(socketPath: socket, device: device, writable: true, dataBytes: Self.patternBytes,
                                          queueDepth: 2, waitMilliseconds: 30_000)
        // An injection aimed at a live region is refused: fault injection writes into nobody's memory.
        guard let otherAt = try sessionAddresses(admin).first(where: { before[$0.key] == nil })?.value else {
            return (false, "the manager's status does not list the second session")
        }
        var refusedLive = false
        do { _ = try admin.injectFault(device: device, .strayDMA, argument: otherAt + 4096) } catch { refusedLive = true }
        guard refusedLive else { return (false, "the manager let a stray-dma aim at a live session's region (0x\(String(otherAt + 4096, radix: 16)))") }
        let marker: UInt8 = 0x5A
        // The other session's region: read from the device once (it is mapped for the
        // device), then filled with the marker.
        var st = try io(&other, .read, sector: patternSector, length: Self.patternBytes)
        guard st == .ok else { return (false, "the second session's read: \(st)") }
        other.buffer.initializeMemory(as: UInt8.self, repeating: marker)
        let hit = try admin.injectFault(device: device, .strayDMA)
        s.buffer.initializeMemory(as: UInt8.self, repeating: 0)
        let stray = try io(&s, .read, sector: patternSector, length: 4096)
        let otherIntact = other.buffer.prefix(Self.patternBytes).allSatisfy { $0 == marker }
        s.buffer.initializeMemory(as: UInt8.self, repeating: 0)
        st = try io(&s, .read, sector: patternSector, length: Self.patternBytes)
        let after = st == .ok && s.buffer.prefix(Self.patternBytes).elementsEqual(expected)
        // A region after its session's revocation: the stray at its old IO address must
        // fault in the IOMMU too (the kernel logs that address; the request fails either way).
        let (id, revokedAt) = try openUseAndClose(socket: socket, admin, patternSector: patternSector)
        let deadline = Clock.monotonicNanoseconds + 10_000_000_000
        while try sessionAddresses(admin)[id] != nil {
            guard Clock.monotonicNanoseconds < deadline else { return (false, "session \(id) was not revoked within 10 s") }
            var t = timespec(tv_sec: 0, tv_nsec: 5_000_000)
            nanosleep(&t, nil)
        }
        _ = try admin.injectFault(device: device, .strayDMA, argument: revokedAt)
        let strayRevoked = try io(&s, .read, sector: patternSector, length: 4096)
        let again = try io(&s, .read, sector: patternSector, length: 4096)
        let ok = stray == .ioError && otherIntact && after && strayRevoked == .ioError && again == .ok
        return (ok, "a stray aimed at a live region refused; stray status descriptor at generation \(hit.generation): the request ended \(stray) (want ioError); "
                + "the second session's region \(otherIntact ? "unchanged" : "CHANGED"); the next read \(st)\(after || st != .ok ? "" : ", bytes differ"); "
                + "stray at 0x\(String(revokedAt, radix: 16)), revoked session \(id)'s region: \(strayRevoked) (want ioError; the kernel log shows whether the IOMMU refused it), the next read \(again)")
    }

    /// Opens a session, has the device read into its region once, and closes it; returns
    /// its id and IO address (from `outboard status`).
    func openUseAndClose(socket: String, _ admin: borrowing AdminConnection, patternSector: UInt64) throws -> (UInt64, UInt64) {
        let before = try sessionAddresses(admin)
        var s = try BlockSession.open(socketPath: socket, device: device, writable: true, dataBytes: 4096, queueDepth: 2,
                                      waitMilliseconds: 30_000)
        let st = try io(&s, .read, sector: patternSector, length: 4096)
        guard st == .ok else { throw ValidationError("the third session's read: \(st)") }
        guard let new = try sessionAddresses(admin).first(where: { before[$0.key] == nil }) else {
            throw ValidationError("the manager's status does not list the third session")
        }
        return (new.key, new.value)
    }

    /// The device's sessions in `outboard status`: id to IO address.
    func sessionAddresses(_ admin: borrowing AdminConnection) throws -> [UInt64: UInt64] {
        let report = try StatusReport.decode(admin.status())
        return Dictionary(uniqueKeysWithValues: report.sessions.filter { $0.device == device }.map { ($0.id, $0.ioAddress) })
    }

    /// One request, waited for (at most 30 s).
    func io(_ s: inout BlockSession, _ op: BlockOp, sector: UInt64, length: Int) throws -> BlockStatus {
        guard try s.submit(op, sector: sector, offset: 0, length: length) != nil else { throw ValidationError("queue full") }
        let out = UnsafeMutableBufferPointer<BlockResult>.allocate(capacity: s.queueDepth)
        defer { out.deallocate() }
        let deadline = Clock.monotonicNanoseconds + 30_000_000_000
        while Clock.monotonicNanoseconds < deadline {
            let n = try s.wait(into: out, timeoutMilliseconds: 100)
            if n > 0 { return out[0].status ?? .ioError }
        }
        throw ValidationError("no completion for \(op) within 30 s")
    }
}
