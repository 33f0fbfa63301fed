/// One entry of a PCI capability list: its id (0x09 vendor-specific, 0x11 MSI-X, ...) and
/// where it starts in the configuration space.
public struct PCICapability: Equatable, Sendable {
    public var id: UInt8
    public var offset: Int
    public init(id: UInt8, offset: Int) { self.id = id; self.offset = offset }
}

/// The MSI-X capability (PCI Local Bus 3.0 §6.8.2): how many vectors, and where the table
/// and the pending-bit array are (a BAR and an offset in it).
public struct MSIXCapability: Equatable, Sendable {
    /// Where the capability starts in the configuration space.
    public var offset: Int
    /// Vectors in the table (Message Control's table size + 1).
    public var tableSize: Int
    public var tableBAR: Int
    public var tableOffset: UInt32
    public var pbaBAR: Int
    public var pbaOffset: UInt32
    /// Message Control's MSI-X Enable and Function Mask bits when the copy was taken.
    public var enabled: Bool
    public var functionMasked: Bool

    public init(offset: Int, tableSize: Int, tableBAR: Int, tableOffset: UInt32, pbaBAR: Int, pbaOffset: UInt32,
                enabled: Bool, functionMasked: Bool) {
        self.offset = offset; self.tableSize = tableSize; self.tableBAR = tableBAR; self.tableOffset = tableOffset
        self.pbaBAR = pbaBAR; self.pbaOffset = pbaOffset; self.enabled = enabled; self.functionMasked = functionMasked
    }
}

/// The standard capability list of a PCI function, walked over a copy of its configuration
/// space (at least the 64-byte header; normally 256 bytes). The copy comes from the device
/// and is checked as if hostile: a pointer into the header, past the copy or not 4-byte
/// aligned, a list that comes back to an entry, a capability cut off by the end of the copy
/// all make `init` throw `.malformed`.
public struct PCICapabilities: Sendable {
    /// Capability ids this code names.
    public static let vendorSpecific: UInt8 = 0x09
    public static let msixID: UInt8 = 0x11

    /// The entries in list order.
    public let entries: [PCICapability]
    /// The configuration-space copy the list was read from (for a capability's body).
    public let config: [UInt8]
    private let msixEntry: MSIXCapability?

    /// Walks the list in `config` (empty when the status register's Capabilities List bit
    /// is clear).
    public init(config: [UInt8]) throws(PCIError) {
        guard config.count >= 0x40 else {
            throw .malformed("configuration space copy of \(config.count) bytes is shorter than the 64-byte header")
        }
        self.config = config
        let status = UInt16(config[6]) | UInt16(config[7]) << 8
        var entries: [PCICapability] = []
        if status & 0x10 != 0 {
            // The standard list lives in the first 256 bytes; 48 dword slots after the header.
            let limit = min(config.count, 256)
            var visited = [Bool](repeating: false, count: 64)
            var pointer = Int(config[0x34])
            var from = "the capabilities pointer (0x34)"
            while pointer != 0 {
                guard pointer % 4 == 0 else {
                    throw .malformed("\(from) is \(hex(pointer)), not 4-byte aligned")
                }
                guard pointer >= 0x40 else {
                    throw .malformed("\(from) is \(hex(pointer)), inside the 64-byte header")
                }
                guard pointer + 2 <= limit else {
                    throw .malformed("\(from) is \(hex(pointer)), past the \(limit) bytes of configuration space")
                }
                guard !visited[pointer / 4] else {
                    throw .malformed("capability list loops: \(from) points back to \(hex(pointer))")
                }
                visited[pointer / 4] = true
                entries.append(PCICapability(id: config[pointer], offset: pointer))
                from = "the next pointer of the capability at \(hex(pointer))"
                pointer = Int(config[pointer + 1])
            }
        }
        self.entries = entries
        msixEntry = try Self.parseMSIX(config, entries)
    }

    /// The entries with `id`, in list order.
    public func entries(withID id: UInt8) -> [PCICapability] { entries.filter { $0.id == id } }

    /// The MSI-X capability, if the function has one.
    public func msix() -> MSIXCapability? { msixEntry }

    private static func parseMSIX(_ config: [UInt8], _ entries: [PCICapability]) throws(PCIError) -> MSIXCapability? {
        let found = entries.filter { $0.id == msixID }
        guard let cap = found.first else { return nil }
        guard found.count == 1 else { throw .malformed("\(found.count) MSI-X capabilities") }
        let at = cap.offset
        guard let control = config.loadLE(UInt16.self, at: at + 2), let table = config.loadLE(UInt32.self, at: at + 4),
              let pba = config.loadLE(UInt32.self, at: at + 8), at + 12 <= min(config.count, 256)
        else { throw .malformed("MSI-X capability at \(hex(at)) is cut off by the end of configuration space") }
        let tableBAR = Int(table & 7), pbaBAR = Int(pba & 7)
        guard tableBAR <= 5, pbaBAR <= 5 else {
            throw .malformed("MSI-X capability at \(hex(at)) names BAR \(tableBAR) / \(pbaBAR) (BIR above 5)")
        }
        return MSIXCapability(
            offset: at, tableSize: Int(control & 0x7ff) + 1,
            tableBAR: tableBAR, tableOffset: table & ~7, pbaBAR: pbaBAR, pbaOffset: pba & ~7,
            enabled: control & 0x8000 != 0, functionMasked: control & 0x4000 != 0)
    }
}
