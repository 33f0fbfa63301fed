import CLinux
import OutboardSystem
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

// The calls this module makes, each retried on EINTR and turned into a PCIError that names
// the call and errno's description.

/// errno's description, e.g. "Operation not permitted (EPERM, 1)".
func errnoText(_ e: CInt) -> String {
    "\(Errno(rawValue: e).description) (errno \(e))"
}

/// Runs `call` until it returns something other than -1 with EINTR; -1 with any other
/// errno throws `.system("<what>: <errno text>")`. Not inlined: errno is read right after
/// the call.
@inline(never)
func vfioCall<T: FixedWidthInteger>(_ what: @autoclosure () -> String, _ call: () -> T) throws(PCIError) -> T {
    while true {
        let r = call()
        if r != -1 { return r }
        let e = errno
        if e == EINTR { continue }
        throw .system("\(what()): \(errnoText(e))")
    }
}

/// As vfioCall, also handing errno to the caller (which decides what an error means).
@inline(never)
func vfioCallErrno<T: FixedWidthInteger>(_ call: () -> T) -> (T, CInt) {
    while true {
        let r = call()
        if r != -1 { return (r, 0) }
        let e = errno
        if e == EINTR { continue }
        return (r, e)
    }
}

/// open(2) with O_CLOEXEC, owned.
func openOwned(_ path: String, _ flags: CInt) throws(PCIError) -> OwnedFD {
    OwnedFD(adopting: try vfioCall("open \(path)") { Glibc.open(path, flags | O_CLOEXEC) })
}

/// Builds a byte buffer of `count` zeros with `argsz` (the first u32) set to `count`.
func argszBuffer(_ count: Int) -> [UInt8] {
    var b = [UInt8](repeating: 0, count: count)
    b.storeLE(UInt32(truncatingIfNeeded: count), at: 0)
    return b
}

extension Array where Element == UInt8 {
    /// The little-endian integer at `offset`; nil when it does not fit in the array.
    func loadLE<T: FixedWidthInteger>(_ type: T.Type, at offset: Int) -> T? {
        let size = MemoryLayout<T>.size
        guard offset >= 0, offset <= count - size else { return nil }
        var v: T = 0
        for i in 0..<size { v |= T(truncatingIfNeeded: self[offset + i]) << (8 * i) }
        return v
    }

    /// Stores `value` little-endian at `offset` (which must fit).
    mutating func storeLE<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        let size = MemoryLayout<T>.size
        precondition(offset >= 0 && offset <= count - size)
        for i in 0..<size { self[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * i)) }
    }
}

/// "0x" and lower-case hexadecimal.
func hex<T: BinaryInteger>(_ v: T) -> String { "0x" + String(v, radix: 16) }
