import Foundation
import Outboard
import OutboardSession
import OutboardSystem
import OutboardTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// After a driver restart the client library reissues what had not completed in
/// submission order (BlockSession's recovery). Observed through overlapping writes: write k
/// (k = 0..<8) covers sectors k..<8 of a range and carries the byte k + 1, so sector j ends
/// holding the byte of the last write among 0...j to reach the device. Only submission
/// order leaves every sector j holding j + 1; any other order leaves some sector with an
/// earlier write's byte.
@Suite(.serialized) struct ReissueOrderTests {
    static let writes = 8
    static let base: UInt64 = 1024  // first sector of the range

    @Test func reissueAfterARestartKeepsSubmissionOrder() throws {
        // Hang detection after 2 s: time enough to submit the writes to the stopped driver.
        let m = try ManagerFixture(devices: "[\(memDevice("m0"))]", heartbeatDeadlineMs: 2000)
        var s = try m.open("m0", dataBytes: 16 * 4096, depth: 16)
        let n = Self.writes
        // Complete one batch first: tags come back in completion order, so the writes below
        // get tags in another order than they are submitted in, and a reissue that went by
        // tag instead of by submission would show too.
        for k in 0..<n { #expect(try s.submit(.read, sector: UInt64(k) * 8, offset: k * 4096, length: 4096) != nil) }
        try drain(&s) { #expect($0.status == .ok) }
        for k in 0..<n { for b in 0..<4096 { s.buffer[k * 4096 + b] = UInt8(k + 1) } }

        // The driver stops (SIGSTOP) before the writes go out, so that none of them is
        // served by it; the manager finds it hung, kills it and starts another, and the
        // session reissues all of them there.
        let hit = try m.admin().injectFault(device: "m0", .hang)
        try waitUntilStopped(pid: hit.pid)
        let reissuedBefore = s.reissued
        var tags: [UInt32] = []
        for k in 0..<n {
            let tag = try s.submit(.write, sector: Self.base + UInt64(k), offset: k * 4096, length: (n - k) * 512)
            tags.append(try #require(tag, "no free tag for write \(k)"))
        }
        #expect(tags != tags.sorted(), "the writes' tags \(tags) follow submission order: a reissue by tag would not show")
        var results: [BlockResult] = []
        try drain(&s) { results.append($0) }
        #expect(results.count == n)
        for r in results {
            #expect(r.status == .ok, "\(r)")
            #expect(r.generation > hit.generation, "write at sector \(r.sector) completed by the stopped driver (generation \(r.generation))")
        }
        #expect(s.reissued - reissuedBefore == n, "\(s.reissued - reissuedBefore) of \(n) writes were reissued")

        for b in 0..<(n * 512) { s.buffer[b] = 0 }
        #expect(try io(&s, .read, sector: Self.base, offset: 0, length: n * 512) == .ok)
        let held = (0..<n).map { s.buffer[$0 * 512] }
        let whole = (0..<n).allSatisfy { j in (0..<512).allSatisfy { s.buffer[j * 512 + $0] == held[j] } }
        #expect(whole, "a sector holds bytes of more than one write")
        #expect(held == (1...n).map { UInt8($0) },
                "sectors hold the bytes of writes \(held.map { Int($0) - 1 }): the reissue did not keep submission order")
    }
}
