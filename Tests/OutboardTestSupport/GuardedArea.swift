#if canImport(Glibc)
import Glibc
#endif

/// `byteCount` bytes of memory between two inaccessible pages, flush against the one
/// before it (`.atStart`) or the one after it (`.atEnd`; both, when `byteCount` is a
/// whole number of pages): a read or write of a single byte past that side kills the
/// test process (SIGSEGV). Filled with 0xA5, garbage an initializer must overwrite.
public struct GuardedArea: ~Copyable {
    public enum Flush: Sendable { case atStart, atEnd }
    public let base: UnsafeMutableRawPointer
    public let byteCount: Int
    let mapping: UnsafeMutableRawPointer
    let mappingBytes: Int

    public init(byteCount: Int, flush: Flush = .atStart) {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let body = (byteCount + page - 1) / page * page
        mappingBytes = body + 2 * page
        let p = mmap(nil, mappingBytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        precondition(p != MAP_FAILED && p != nil, "mmap failed")
        mapping = p!
        precondition(mprotect(mapping + page, body, PROT_READ | PROT_WRITE) == 0, "mprotect failed")
        base = flush == .atStart ? mapping + page : mapping + page + body - byteCount
        self.byteCount = byteCount
        base.initializeMemory(as: UInt8.self, repeating: 0xA5, count: byteCount)
    }

    deinit { munmap(mapping, mappingBytes) }
}
