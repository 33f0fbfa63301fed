/// Little-endian encoding of the messages Outboard's processes exchange (control
/// messages, vhost-user payloads, benchmark worker set-up). The control path, not the
/// data path: these allocate, and that is fine. The reader is where hostile bytes are
/// met: every read is bounds-checked and every failure says which field was wrong, in the
/// error type of the protocol being read (`WireFailure`).

/// An error a protocol's reader throws when bytes do not decode.
public protocol WireFailure: Error {
    static func malformed(_ reason: String) -> Self
}

/// A malformed message of a protocol without an error type of its own.
public struct WireFormatError: WireFailure, Equatable, CustomStringConvertible {
    public let reason: String
    public static func malformed(_ reason: String) -> WireFormatError { WireFormatError(reason: reason) }
    public var description: String { "malformed message: \(reason)" }
}

public struct WireWriter: Sendable {
    public private(set) var bytes: [UInt8] = []
    public init() { bytes.reserveCapacity(128) }

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func bool(_ v: Bool) { bytes.append(v ? 1 : 0) }
    public mutating func u16(_ v: UInt16) { integer(v) }
    public mutating func u32(_ v: UInt32) { integer(v) }
    public mutating func u64(_ v: UInt64) { integer(v) }
    public mutating func i32(_ v: Int32) { u32(UInt32(bitPattern: v)) }
    public mutating func integer<T: FixedWidthInteger>(_ v: T) {
        withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) }
    }
    /// The same as `integer`, for fixed-field messages written field after field.
    public mutating func put<T: FixedWidthInteger>(_ v: T) { integer(v) }
    /// A string: UInt32 byte count, then UTF-8.
    public mutating func string(_ s: String) {
        let utf8 = Array(s.utf8)
        u32(UInt32(utf8.count))
        bytes.append(contentsOf: utf8)
    }
    public mutating func append(_ b: [UInt8]) { bytes.append(contentsOf: b) }
    public mutating func patchU32(at offset: Int, _ v: UInt32) {
        withUnsafeBytes(of: v.littleEndian) { for i in 0..<4 { bytes[offset + i] = $0[i] } }
    }
}

/// Reads a message front to back (`u32("field")`, ...), or at fixed offsets of a payload
/// whose length was checked first (`u32(at:)`).
public struct WireReader<Failure: WireFailure> {
    public let bytes: [UInt8]
    public private(set) var position: Int
    let end: Int

    public init(_ bytes: [UInt8], from start: Int = 0) {
        self.bytes = bytes
        self.position = min(max(0, start), bytes.count)
        self.end = bytes.count
    }

    init(_ bytes: [UInt8], from start: Int, to end: Int) {
        self.bytes = bytes
        self.position = start
        self.end = end
    }

    public var remaining: Int { end - position }
    /// What is left, unread.
    public var rest: ArraySlice<UInt8> { bytes[position..<end] }

    mutating func take(_ n: Int, _ field: String) throws(Failure) -> Int {
        guard n >= 0, n <= remaining else {
            throw .malformed("truncated at \(field): needs \(n) bytes, \(remaining) left")
        }
        defer { position += n }
        return position
    }

    public mutating func integer<T: FixedWidthInteger>(_ type: T.Type, _ field: String) throws(Failure) -> T {
        let at = try take(MemoryLayout<T>.size, field)
        var v: T = 0
        for i in 0..<MemoryLayout<T>.size { v |= T(truncatingIfNeeded: bytes[at + i]) << (8 * i) }
        return v
    }

    /// The next integer, or nil if the message is too short: for a message whose every
    /// failure is the same refusal.
    public mutating func get<T: FixedWidthInteger>(_ type: T.Type = T.self) -> T? {
        try? integer(type, "")
    }

    public mutating func u8(_ field: String) throws(Failure) -> UInt8 { try integer(UInt8.self, field) }
    public mutating func u16(_ field: String) throws(Failure) -> UInt16 { try integer(UInt16.self, field) }
    public mutating func u32(_ field: String) throws(Failure) -> UInt32 { try integer(UInt32.self, field) }
    public mutating func u64(_ field: String) throws(Failure) -> UInt64 { try integer(UInt64.self, field) }
    public mutating func i32(_ field: String) throws(Failure) -> Int32 { Int32(bitPattern: try u32(field)) }

    public mutating func bool(_ field: String) throws(Failure) -> Bool {
        switch try u8(field) {
        case 0: return false
        case 1: return true
        case let b: throw .malformed("\(field): \(b) is not a boolean")
        }
    }

    /// A string of at most `maxBytes` bytes of valid UTF-8 without NUL or control characters
    /// (names end up in logs and paths).
    public mutating func string(_ field: String, maxBytes: Int, allowControl: Bool = false) throws(Failure) -> String {
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
    public mutating func sub(_ n: Int, _ field: String) throws(Failure) -> WireReader {
        let at = try take(n, field)
        return WireReader(bytes, from: at, to: at + n)
    }

    /// Fails unless every byte was consumed.
    public func finish(_ what: String) throws(Failure) {
        guard remaining == 0 else { throw .malformed("\(what): \(remaining) trailing bytes") }
    }

    /// The integer at `offset` of a payload whose size the caller checked: reading past it
    /// is the caller's bug, not the peer's, and traps.
    public func integer<T: FixedWidthInteger>(at offset: Int, as _: T.Type = T.self) -> T {
        precondition(offset >= 0 && offset <= bytes.count - MemoryLayout<T>.size, "read past a checked payload")
        var v: T = 0
        for i in 0..<MemoryLayout<T>.size { v |= T(truncatingIfNeeded: bytes[offset + i]) << (8 * i) }
        return v
    }
    public func u32(at offset: Int) -> UInt32 { integer(at: offset) }
    public func u64(at offset: Int) -> UInt64 { integer(at: offset) }
}
