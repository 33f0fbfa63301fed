// In the system layer, below the session layer, so that TAP devices and net sessions share
// one type.

/// An Ethernet address, the 48 bits in network order in the low six bytes of `rawValue`
/// (byte 0 of the address is bits 40...47). Any value below 2^48 is one.
@frozen
public struct MACAddress: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue & 0xFFFF_FFFF_FFFF }

    /// From six bytes as they appear on the wire.
    @inlinable public init(bytes p: UnsafeRawPointer) {
        var v: UInt64 = 0
        for i in 0..<6 { v = v << 8 | UInt64(p.load(fromByteOffset: i, as: UInt8.self)) }
        rawValue = v
    }

    public init?(bytes: [UInt8]) {
        guard bytes.count == 6 else { return nil }
        self = bytes.withUnsafeBytes { MACAddress(bytes: $0.baseAddress!) }
    }

    /// "02:00:00:00:00:01".
    public init?(_ text: String) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 6 else { return nil }
        var v: UInt64 = 0
        for p in parts {
            guard p.count == 2, let b = UInt8(p, radix: 16) else { return nil }
            v = v << 8 | UInt64(b)
        }
        rawValue = v
    }

    /// Writes the six bytes in wire order at `p`.
    @inlinable public func store(to p: UnsafeMutableRawPointer) {
        for i in 0..<6 { p.storeBytes(of: UInt8(truncatingIfNeeded: rawValue >> (40 - 8 * UInt64(i))), toByteOffset: i, as: UInt8.self) }
    }

    public var bytes: [UInt8] { (0..<6).map { UInt8(truncatingIfNeeded: rawValue >> (40 - 8 * UInt64($0))) } }
    /// Group bit: multicast and broadcast.
    @inlinable public var isMulticast: Bool { rawValue & (1 << 40) != 0 }
    @inlinable public var isBroadcast: Bool { rawValue == 0xFFFF_FFFF_FFFF }
    public static let broadcast = MACAddress(rawValue: 0xFFFF_FFFF_FFFF)

    public var description: String { bytes.map { $0 < 16 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined(separator: ":") }
}
