import CLinux
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Shared memory that another process can map: a sealed memfd.
///
/// The size is fixed when the region is created and sealed (F_SEAL_GROW | F_SEAL_SHRINK),
/// so no process holding the fd can truncate it under a peer's mapping (which would turn
/// that peer's next access into SIGBUS). A region received from another process is only
/// accepted when it carries those seals and has at least the size the receiver expects.
/// memfd_create(2), fcntl(2) F_ADD_SEALS.
public struct SharedRegion: ~Copyable, Sendable {
    public let fd: OwnedFD
    /// Size in bytes, from our own parameters (creator) or checked with fstat (receiver).
    public let size: Int

    public static let requiredSeals = OB_F_SEAL_GROW | OB_F_SEAL_SHRINK

    /// Creates a zero-filled region of `size` bytes (rounded up to whole pages) and seals
    /// its size. memfd_create(2) + ftruncate(2) + F_ADD_SEALS.
    public init(name: String, size: Int) throws(Errno) {
        guard size > 0 else { throw Errno.invalidArgument }
        let rounded = SharedRegion.roundToPage(size)
        let fd = OwnedFD(adopting: try sys { ob_memfd_create(name, OB_MFD_CLOEXEC | OB_MFD_ALLOW_SEALING) })
        let raw = fd.raw.rawValue
        _ = try sys { ftruncate(raw, off_t(rounded)) }
        _ = try sys { ob_fcntl_int(raw, OB_F_ADD_SEALS, SharedRegion.requiredSeals) }
        self.fd = fd
        self.size = rounded
    }

    /// Accepts a region fd received from a peer. Fails with `.invalidArgument` unless the
    /// fd is a memfd sealed against resizing and at least `minimumSize` bytes long.
    public init(adopting fd: consuming OwnedFD, minimumSize: Int) throws(Errno) {
        let raw = fd.raw.rawValue
        let seals = try sys { ob_fcntl_int(raw, OB_F_GET_SEALS, 0) }
        guard seals & SharedRegion.requiredSeals == SharedRegion.requiredSeals else { throw Errno.invalidArgument }
        var st = stat()
        _ = try sys { fstat(raw, &st) }
        guard Int(st.st_size) >= minimumSize, st.st_size > 0 else { throw Errno.invalidArgument }
        self.fd = fd
        self.size = Int(st.st_size)
    }

    /// Forbids every future writable mapping, by anyone (F_SEAL_FUTURE_WRITE): mappings that
    /// exist keep working, new ones can only be read-only. This is how a table the manager
    /// writes is handed to a driver that must not write it.
    public func sealFutureWrites() throws(Errno) {
        let raw = fd.raw.rawValue
        _ = try sys { ob_fcntl_int(raw, OB_F_ADD_SEALS, OB_F_SEAL_FUTURE_WRITE) }
    }

    /// The seals set on the region (F_GET_SEALS).
    public var seals: CInt {
        get throws(Errno) {
            let raw = fd.raw.rawValue
            return try sys { ob_fcntl_int(raw, OB_F_GET_SEALS, 0) }
        }
    }

    /// Maps the whole region. mmap(2).
    public func map(_ access: SharedMapping.Access) throws(Errno) -> SharedMapping {
        try SharedMapping(fd: fd.raw, size: size, access: access)
    }

    public static let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
    public static func roundToPage(_ n: Int) -> Int { (n + pageSize - 1) & ~(pageSize - 1) }
}

/// A mapping of a shared region, unmapped when dropped.
///
/// The mapping sits between two inaccessible guard pages, so an access that runs past
/// either end faults at once instead of touching unrelated memory. mmap(2), munmap(2).
public struct SharedMapping: ~Copyable, @unchecked Sendable {
    public enum Access: Sendable { case readOnly, readWrite }

    /// First byte of the region.
    public let base: UnsafeMutableRawPointer
    public let size: Int
    let reservation: UnsafeMutableRawPointer
    let reservationSize: Int

    init(fd: FileDescriptor, size: Int, access: Access) throws(Errno) {
        let page = SharedRegion.pageSize
        let total = size + 2 * page
        let reserved = mmap(nil, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let reserved, reserved != MAP_FAILED else { throw Errno(rawValue: errno) }
        let prot = access == .readWrite ? PROT_READ | PROT_WRITE : PROT_READ
        let p = mmap(reserved + page, size, prot, MAP_SHARED | MAP_FIXED, fd.rawValue, 0)
        guard let p, p != MAP_FAILED else {
            let e = Errno(rawValue: errno)
            munmap(reserved, total)
            throw e
        }
        base = p
        self.size = size
        reservation = reserved
        reservationSize = total
    }

    deinit { munmap(reservation, reservationSize) }

    /// Pointer to `offset`, checked against the mapping's size.
    public func pointer(at offset: Int, length: Int = 1) -> UnsafeMutableRawPointer {
        precondition(offset >= 0 && length >= 0 && offset <= size && length <= size - offset,
                     "offset \(offset)+\(length) outside mapping of \(size) bytes")
        return base + offset
    }
}
