/// Little-endian encoding for control messages. The control path is not the data path:
/// these allocate, and that is fine. The reader is where hostile bytes are met, so every
/// read is bounds-checked and every failure says what was wrong.

/// Why a control message was refused.
public enum ControlError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The message is malformed: truncated, trailing bytes, a bad field. `reason` says which.
    case malformed(String)
    /// The message is bigger than the protocol allows.
    case tooLarge(size: Int, limit: Int)
    /// A protocol version this build does not speak.
    case unsupportedVersion(UInt16)
    /// A message type this build does not know.
    case unknownType(UInt16)
    /// The message came with the wrong number of file descriptors.
    case wrongDescriptorCount(type: String, expected: Int, received: Int)

    public var description: String {
        switch self {
        case .malformed(let r): return "malformed control message: \(r)"
        case .tooLarge(let s, let l): return "control message of \(s) bytes exceeds the limit of \(l)"
        case .unsupportedVersion(let v): return "control protocol version \(v) not supported (this build speaks \(ControlProtocol.version))"
        case .unknownType(let t): return "unknown control message type \(t)"
        case .wrongDescriptorCount(let t, let e, let r): return "\(t) must carry \(e) file descriptors, it carried \(r)"
        }
    }
}

public struct WireWriter: Sendable {
    public private(set) var bytes: [UInt8] = []
    public init() { bytes.reserveCapacity(128) }

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func bool(_ v: Bool) { bytes.append(v ? 1 : 0) }
    public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func i32(_ v: Int32) { u32(UInt32(bitPattern: v)) }
    /// A string: UInt32 byte count, then UTF-8.
    public mutating func string(_ s: String) {
        let utf8 = Array(s.utf8)
        u32(UInt32(utf8.count))
        bytes.append(contentsOf: utf8)
    }
    mutating func append(_ b: [UInt8]) { bytes.append(contentsOf: b) }
    mutating func patchU32(at offset: Int, _ v: UInt32) {
        withUnsafeBytes(of: v.littleEndian) { for i in 0..<4 { bytes[offset + i] = $0[i] } }
    }
}

public struct WireReader: Sendable {
    let bytes: [UInt8]
    private(set) var position: Int
    let end: Int

    public init(_ bytes: [UInt8], from start: Int = 0) {
        self.bytes = bytes
        self.position = start
        self.end = bytes.count
    }

    init(_ bytes: [UInt8], from start: Int, to end: Int) {
        self.bytes = bytes
        self.position = start
        self.end = end
    }

    public var remaining: Int { end - position }

    mutating func take(_ n: Int, _ field: String) throws(ControlError) -> Int {
        guard n >= 0, n <= remaining else {
            throw .malformed("truncated at \(field): needs \(n) bytes, \(remaining) left")
        }
        defer { position += n }
        return position
    }

    mutating func integer<T: FixedWidthInteger>(_ type: T.Type, _ field: String) throws(ControlError) -> T {
        let at = try take(MemoryLayout<T>.size, field)
        var v: T = 0
        for i in 0..<MemoryLayout<T>.size { v |= T(truncatingIfNeeded: bytes[at + i]) << (8 * i) }
        return v
    }

    public mutating func u8(_ field: String) throws(ControlError) -> UInt8 { try integer(UInt8.self, field) }
    public mutating func u16(_ field: String) throws(ControlError) -> UInt16 { try integer(UInt16.self, field) }
    public mutating func u32(_ field: String) throws(ControlError) -> UInt32 { try integer(UInt32.self, field) }
    public mutating func u64(_ field: String) throws(ControlError) -> UInt64 { try integer(UInt64.self, field) }
    public mutating func i32(_ field: String) throws(ControlError) -> Int32 { Int32(bitPattern: try u32(field)) }

    public mutating func bool(_ field: String) throws(ControlError) -> Bool {
        switch try u8(field) {
        case 0: return false
        case 1: return true
        case let b: throw .malformed("\(field): \(b) is not a boolean")
        }
    }

    /// A string of at most `maxBytes` bytes of valid UTF-8 without NUL or control characters
    /// (names end up in logs and paths).
    public mutating func string(_ field: String, maxBytes: Int, allowControl: Bool = false) throws(ControlError) -> String {
        let n = Int(try u32(field + " length"))
        guard n <= maxBytes else { throw .malformed("\(field): \(n) bytes, limit \(maxBytes)") }
        let at = try take(n, field)
        let slice = bytes[at..<(at + n)]
        guard let s = String(validating: slice, as: UTF8.self) else {
            throw .malformed("\(field): not valid UTF-8")
        }
        if !allowControl, s.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7F }) {
            throw .malformed("\(field): contains control characters")
        }
        return s
    }

    /// A reader over the next `n` bytes only (a tagged section's body), which this one skips.
    mutating func sub(_ n: Int, _ field: String) throws(ControlError) -> WireReader {
        let at = try take(n, field)
        return WireReader(bytes, from: at, to: at + n)
    }

    /// Fails unless every byte was consumed.
    public func finish(_ what: String) throws(ControlError) {
        guard remaining == 0 else { throw .malformed("\(what): \(remaining) trailing bytes") }
    }
}
