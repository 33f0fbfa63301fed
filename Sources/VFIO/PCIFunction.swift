import OutboardRings

/// A PCI bus address, `domain:bus:device.function` as sysfs spells it (`0000:00:03.0`).
public struct PCIAddress: Hashable, Sendable, CustomStringConvertible {
    public var domain: UInt16
    public var bus: UInt8
    public var device: UInt8
    public var function: UInt8

    public init(domain: UInt16 = 0, bus: UInt8, device: UInt8, function: UInt8) {
        self.domain = domain; self.bus = bus; self.device = device; self.function = function
    }

    /// Parses `0000:00:03.0` or `00:03.0` (domain 0); nil for anything else (device < 32,
    /// function < 8).
    public init?(_ text: String) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2 || parts.count == 3 else { return nil }
        let dom = parts.count == 3 ? parts[0] : "0000"
        let busPart = parts[parts.count - 2]
        let df = parts[parts.count - 1].split(separator: ".", omittingEmptySubsequences: false)
        guard df.count == 2, dom.count == 4, busPart.count == 2, df[0].count == 2, df[1].count == 1,
              let d = UInt16(dom, radix: 16), let b = UInt8(busPart, radix: 16),
              let dv = UInt8(df[0], radix: 16), let f = UInt8(df[1], radix: 16), dv < 32, f < 8
        else { return nil }
        self.init(domain: d, bus: b, device: dv, function: f)
    }

    public var description: String {
        func hex(_ v: some BinaryInteger, _ width: Int) -> String {
            let s = String(v, radix: 16)
            return String(repeating: "0", count: max(0, width - s.count)) + s
        }
        return "\(hex(domain, 4)):\(hex(bus, 2)):\(hex(device, 2)).\(hex(function, 1))"
    }
}

/// What a PCI function could not do.
public enum PCIError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A system call on the device failed (the call, and errno's description).
    case system(String)
    /// The device does not have what was asked (no such BAR, too few MSI-X vectors, an
    /// access outside a region).
    case unsupported(String)
    /// The device answered with something impossible (a capability list that loops or
    /// points outside the config space, a region smaller than a capability says).
    case malformed(String)

    public var description: String {
        switch self {
        case .system(let s): return "PCI device: \(s)"
        case .unsupported(let s): return "PCI device lacks \(s)"
        case .malformed(let s): return "PCI device malformed: \(s)"
        }
    }
}

/// A BAR mapped into the process: `size` bytes at `base`, valid while the function that
/// mapped it lives. Accesses go through CLinux's volatile MMIO helpers, never plain loads.
public struct MappedBAR: Sendable {
    public let index: Int
    public nonisolated(unsafe) let base: UnsafeMutableRawPointer
    public let size: Int
    public init(index: Int, base: UnsafeMutableRawPointer, size: Int) {
        self.index = index; self.base = base; self.size = size
    }
}

/// One PCI function as a driver uses it: config space, BARs, MSI-X, reset. `VFIODevice`
/// conforms (the device fd the manager handed over); transports (`VirtioPCITransport`) are
/// generic over it, so a setup path can be tested over a double, and the data path (a
/// store into a mapped BAR) never calls through it.
public protocol PCIFunction: ~Copyable {
    /// `count` bytes of PCI configuration space from `offset` (4 KiB for PCIe).
    mutating func readConfig(offset: Int, count: Int) throws(PCIError) -> [UInt8]
    /// Writes `bytes` at `offset` of the configuration space.
    mutating func writeConfig(offset: Int, bytes: [UInt8]) throws(PCIError)
    /// Maps BAR `index` (memory BARs only). The mapping lives as long as the function.
    mutating func mapBAR(_ index: Int) throws(PCIError) -> MappedBAR
    /// MSI-X vectors the device has (0: no MSI-X).
    mutating func msixVectorCount() throws(PCIError) -> Int
    /// Routes MSI-X vector i to `eventfds[i]` and enables MSI-X (vectors beyond the
    /// array stay unrouted). An empty array disables MSI-X.
    mutating func routeMSIX(to eventfds: [CInt]) throws(PCIError)
    /// A function-level reset (VFIO_DEVICE_RESET) where the device offers one; false if
    /// it offers none (the caller then uses the device's own reset).
    mutating func resetFunction() throws(PCIError) -> Bool
}
