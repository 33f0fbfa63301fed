import Testing
import VFIO

/// A 256-byte configuration space with the Capabilities List status bit set and the
/// capabilities pointer at `first`; `caps` are (offset, id, next) entries.
func configSpace(first: UInt8, _ caps: [(Int, UInt8, UInt8)], count: Int = 256, listBit: Bool = true) -> [UInt8] {
    var c = [UInt8](repeating: 0, count: count)
    c[0] = 0xf4; c[1] = 0x1a                 // vendor 0x1af4
    if listBit { c[6] = 0x10 }
    c[0x34] = first
    for (at, id, next) in caps where at + 1 < count { c[at] = id; c[at + 1] = next }
    return c
}

/// The message of the .malformed error the walk over `config` throws; nil when it throws none.
func malformedMessage(_ config: [UInt8]) -> String? {
    do throws(PCIError) { _ = try PCICapabilities(config: config) } catch {
        if case .malformed(let s) = error { return s }
        return "not malformed: \(error)"
    }
    return nil
}

@Suite struct PCICapabilitiesTests {
    @Test func walksAListAndReadsMSIX() throws {
        var c = configSpace(first: 0x40, [(0x40, 0x09, 0x50), (0x50, 0x11, 0x60), (0x60, 0x09, 0x00)])
        c[0x52] = 0x02; c[0x53] = 0x80           // table size 3, MSI-X enabled
        c[0x54] = 0x01                           // table in BAR 1 at 0
        c[0x58] = 0x01; c[0x59] = 0x08           // PBA in BAR 1 at 0x800
        let caps = try PCICapabilities(config: c)
        #expect(caps.entries == [PCICapability(id: 0x09, offset: 0x40), PCICapability(id: 0x11, offset: 0x50),
                                 PCICapability(id: 0x09, offset: 0x60)])
        #expect(caps.entries(withID: PCICapabilities.vendorSpecific).map(\.offset) == [0x40, 0x60])
        let m = try #require(caps.msix())
        #expect(m == MSIXCapability(offset: 0x50, tableSize: 3, tableBAR: 1, tableOffset: 0, pbaBAR: 1, pbaOffset: 0x800,
                                    enabled: true, functionMasked: false))
    }

    @Test func noListWhenTheStatusBitIsClear() throws {
        let caps = try PCICapabilities(config: configSpace(first: 0x40, [(0x40, 0x11, 0x40)], listBit: false))
        #expect(caps.entries.isEmpty)
        #expect(caps.msix() == nil)
    }

    @Test func refusesLoops() {
        let selfLoop = malformedMessage(configSpace(first: 0x40, [(0x40, 0x09, 0x40)]))
        #expect(selfLoop?.contains("loops") == true, "\(selfLoop ?? "no error")")
        let longLoop = malformedMessage(configSpace(first: 0x40, [(0x40, 0x09, 0x80), (0x80, 0x05, 0xfc), (0xfc, 0x01, 0x80)]))
        #expect(longLoop?.contains("loops") == true, "\(longLoop ?? "no error")")
    }

    @Test func refusesPointersOutOfRangeAndMisaligned() {
        let intoHeader = malformedMessage(configSpace(first: 0x40, [(0x40, 0x09, 0x10)]))
        #expect(intoHeader?.contains("inside the 64-byte header") == true, "\(intoHeader ?? "no error")")
        let pastCopy = malformedMessage(configSpace(first: 0x90, [], count: 0x80))
        #expect(pastCopy?.contains("past the 128 bytes") == true, "\(pastCopy ?? "no error")")
        let misaligned = malformedMessage(configSpace(first: 0x42, [(0x42, 0x09, 0)]))
        #expect(misaligned?.contains("not 4-byte aligned") == true, "\(misaligned ?? "no error")")
        let misalignedNext = malformedMessage(configSpace(first: 0x40, [(0x40, 0x09, 0x51)]))
        #expect(misalignedNext?.contains("next pointer of the capability at 0x40") == true, "\(misalignedNext ?? "no error")")
        let short = malformedMessage([UInt8](repeating: 0, count: 0x3f))
        #expect(short?.contains("64-byte header") == true)
    }

    @Test func refusesABadMSIXCapability() {
        // Cut off: the capability needs 12 bytes, the copy ends 8 bytes after it.
        let cut = malformedMessage(configSpace(first: 0x40, [(0x40, 0x11, 0)], count: 0x48))
        #expect(cut?.contains("cut off") == true, "\(cut ?? "no error")")
        var c = configSpace(first: 0x40, [(0x40, 0x11, 0)])
        c[0x44] = 0x06                           // BIR 6
        let bir = malformedMessage(c)
        #expect(bir?.contains("BIR above 5") == true, "\(bir ?? "no error")")
        let two = malformedMessage(configSpace(first: 0x40, [(0x40, 0x11, 0x50), (0x50, 0x11, 0)]))
        #expect(two?.contains("2 MSI-X") == true, "\(two ?? "no error")")
    }

    /// Random configuration spaces: the walk ends (throwing .malformed or not) with at most
    /// 48 entries, each aligned and inside the standard space, none twice.
    @Test func randomBytesNeverTrapOrLoop() {
        var seed: UInt64 = 0x9e37_79b9_7f4a_7c15
        func next() -> UInt8 {
            seed = seed &* 6364136223846793005 &+ 1442695040888963407
            return UInt8(truncatingIfNeeded: seed >> 56)
        }
        for round in 0..<2000 {
            var c = (0..<256).map { _ in next() }
            c[6] |= 0x10
            if round % 2 == 0 {                  // bias towards aligned pointers so that lists get long
                c[0x34] &= 0xfc
                for at in stride(from: 0x40, to: 0x100, by: 4) { c[at + 1] &= 0xfc }
            }
            do throws(PCIError) {
                let caps = try PCICapabilities(config: c)
                #expect(caps.entries.count <= 48)
                #expect(Set(caps.entries.map(\.offset)).count == caps.entries.count)
                #expect(caps.entries.allSatisfy { $0.offset >= 0x40 && $0.offset < 0x100 && $0.offset % 4 == 0 })
            } catch {
                guard case .malformed = error else { Issue.record("round \(round): \(error)"); return }
            }
        }
    }
}
