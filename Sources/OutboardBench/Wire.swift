/// Little-endian fixed-field encoding for the worker set-up and result messages.
/// The reader never traps: a short or malformed message yields nil.
struct WireWriter {
    var bytes: [UInt8] = []
    mutating func put<T: FixedWidthInteger>(_ v: T) {
        withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) }
    }
}

struct WireReader {
    let bytes: [UInt8]
    var position = 0
    init(_ bytes: [UInt8]) { self.bytes = bytes }

    mutating func get<T: FixedWidthInteger>(_: T.Type = T.self) -> T? {
        let n = MemoryLayout<T>.size
        guard bytes.count - position >= n else { return nil }
        var v: T = 0
        for i in 0..<n { v |= T(truncatingIfNeeded: bytes[position + i]) << (8 * i) }
        position += n
        return v
    }

    var rest: ArraySlice<UInt8> { bytes[position...] }
}
