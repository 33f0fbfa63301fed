import CLinux
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A TAP interface: the kernel's end of an Ethernet link whose other end is this process.
/// The one owner of the /dev/net/tun descriptor; the interface goes away with it (this
/// type never makes a device persistent).
///
/// - Frames only (IFF_TAP | IFF_NO_PI): a read gives one whole Ethernet frame as the
///   kernel sent it out of the interface, a write hands one to the kernel as if received
///   on it. No virtio-net header (no IFF_VNET_HDR): no checksum or segmentation offload
///   crosses the descriptor, so every frame read is at most the MTU plus its Ethernet
///   header (and a VLAN tag).
/// - Non-blocking: register `descriptor` for readability (epoll) and read until nil.
///   `read` and `write` allocate nothing; one frame per call (the kernel has no batched
///   read or write for TAP descriptors).
/// - Opened in the calling thread's network namespace; it may be moved to another one
///   afterwards (`ip link set dev NAME netns NS`) and the descriptor keeps working. Moving
///   it takes it down. MTU and up/down go through an interface ioctl by name, which only
///   reaches an interface in the caller's namespace: once the device is elsewhere they
///   fail with ENODEV. The MAC address is read and set through the descriptor itself,
///   wherever the device is.
public struct TapDevice: ~Copyable, Sendable {
    public let fd: OwnedFD
    /// The interface's name as the kernel gave it at open (renaming it later is not seen
    /// here; `currentName()` asks the kernel).
    public let name: String

    /// The longest interface name (IFNAMSIZ - 1 bytes).
    public static let maxNameLength = Int(OB_IFNAMSIZ) - 1

    /// Opens /dev/net/tun and creates a TAP interface: `name` exactly, a pattern with "%d"
    /// that the kernel fills in, or nil for the kernel's own choice ("tap0", ...). A name
    /// longer than `maxNameLength` bytes or with a NUL is EINVAL; the name of an interface
    /// that exists is EBUSY (a TAP another descriptor holds) or EINVAL (another kind),
    /// except a persistent TAP nobody holds (`ip tuntap add`), which this attaches to and
    /// which stays after it; EPERM without CAP_NET_ADMIN.
    public init(name: String? = nil) throws(Errno) {
        let wanted = name ?? ""
        guard wanted.utf8.count <= Self.maxNameLength, !wanted.utf8.contains(0) else { throw Errno.invalidArgument }
        let fd = try OwnedFD.open("/dev/net/tun", O_RDWR | O_NONBLOCK)
        var out = [CChar](repeating: 0, count: Int(OB_IFNAMSIZ))
        let raw = fd.raw.rawValue
        _ = try sys { ob_tap_attach(raw, wanted, &out) }
        self.fd = fd
        self.name = Self.string(out)
    }

    /// The descriptor, for epoll (readable: frames are waiting).
    public var descriptor: FileDescriptor { fd.raw }

    /// The next frame the kernel sent out of the interface, copied into `buffer`; its
    /// length, or nil when none is waiting (EAGAIN). The kernel cuts a frame longer than
    /// the buffer without saying so, so a frame that fills `buffer` is taken as cut and
    /// refused with EMSGSIZE (the frame is gone; the next read gives the next one): give
    /// at least one byte more than the longest frame, e.g. MTU + 14 (Ethernet header)
    /// + 4 (one VLAN tag) + 1. While the interface is down nothing arrives.
    @inline(__always)
    public func read(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int? {
        let raw = fd.raw.rawValue
        let n: Int
        do {
            n = try sys { Glibc.read(raw, buffer.baseAddress, buffer.count) }
        } catch .resourceTemporarilyUnavailable {
            return nil
        }
        guard n < buffer.count else { throw Errno.messageTooLong }
        return n
    }

    /// Hands `frame` (a whole Ethernet frame, header first) to the kernel as received on
    /// the interface. A frame shorter than an Ethernet header is EINVAL; one the kernel
    /// cannot take now is EAGAIN (the caller drops it, as a NIC would); EIO while the
    /// interface is down.
    @inline(__always)
    public func write(_ frame: UnsafeRawBufferPointer) throws(Errno) {
        let raw = fd.raw.rawValue
        let n = try sys { Glibc.write(raw, frame.baseAddress, frame.count) }
        guard n == frame.count else { throw Errno.ioError }
    }

    /// The interface's name now (TUNGETIFF): it may have been renamed since it was opened.
    public func currentName() throws(Errno) -> String {
        var out = [CChar](repeating: 0, count: Int(OB_IFNAMSIZ))
        let raw = fd.raw.rawValue
        _ = try sys { ob_tap_name(raw, &out) }
        return Self.string(out)
    }

    /// The interface's MAC address (SIOCGIFHWADDR on the descriptor). The kernel gives a
    /// new TAP a random locally administered one.
    public func macAddress() throws(Errno) -> MACAddress {
        var mac = [UInt8](repeating: 0, count: 6)
        let raw = fd.raw.rawValue
        _ = try sys { ob_tap_get_hwaddr(raw, &mac) }
        return MACAddress(bytes: mac)!
    }

    /// Sets the interface's MAC address (SIOCSIFHWADDR on the descriptor), also while it is
    /// up. A multicast or all-zero address is EADDRNOTAVAIL.
    public func setMACAddress(_ mac: MACAddress) throws(Errno) {
        let bytes = mac.bytes
        let raw = fd.raw.rawValue
        _ = try sys { ob_tap_set_hwaddr(raw, bytes) }
    }

    /// The interface's MTU (SIOCGIFMTU). ENODEV once the device is in another namespace.
    public func mtu() throws(Errno) -> Int {
        var mtu: CInt = 0
        try withControlSocket { (s, name) throws(Errno) in _ = try sys { ob_if_get_mtu(s, name, &mtu) } }
        return Int(mtu)
    }

    /// Sets the interface's MTU (SIOCSIFMTU): 68 to 65521 for a TAP, else EINVAL. ENODEV
    /// once the device is in another namespace.
    public func setMTU(_ mtu: Int) throws(Errno) {
        guard let m = CInt(exactly: mtu) else { throw Errno.invalidArgument }
        try withControlSocket { (s, name) throws(Errno) in _ = try sys { ob_if_set_mtu(s, name, m) } }
    }

    /// Whether the interface is administratively up (IFF_UP, SIOCGIFFLAGS). ENODEV once
    /// the device is in another namespace.
    public func isUp() throws(Errno) -> Bool {
        var flags: CUnsignedInt = 0
        try withControlSocket { (s, name) throws(Errno) in _ = try sys { ob_if_get_flags(s, name, &flags) } }
        return flags & OB_IFF_UP != 0
    }

    /// Brings the interface up or down (IFF_UP, SIOCSIFFLAGS; the other flags are kept).
    /// ENODEV once the device is in another namespace.
    public func setUp(_ up: Bool = true) throws(Errno) {
        try withControlSocket { (s, name) throws(Errno) in
            var flags: CUnsignedInt = 0
            _ = try sys { ob_if_get_flags(s, name, &flags) }
            let wanted = up ? flags | OB_IFF_UP : flags & ~OB_IFF_UP
            if wanted != flags { _ = try sys { ob_if_set_flags(s, name, wanted) } }
        }
    }

    /// Whether the interface is in the calling thread's network namespace (TUNGETDEVNETNS,
    /// compared with /proc/thread-self/ns/net).
    public func isInCurrentNamespace() throws(Errno) -> Bool {
        let raw = fd.raw.rawValue
        let ns = OwnedFD(adopting: try sys { ob_tap_netns(raw) })
        var theirs = stat(), ours = stat()
        let nsRaw = ns.raw.rawValue
        _ = try sys { fstat(nsRaw, &theirs) }
        _ = try sys { stat("/proc/thread-self/ns/net", &ours) }
        return theirs.st_dev == ours.st_dev && theirs.st_ino == ours.st_ino
    }

    /// Runs `body` with an interface-ioctl socket and the interface's current name, after
    /// checking that the name names this device: in another namespace it could name another
    /// interface, or none.
    private func withControlSocket(_ body: (CInt, String) throws(Errno) -> Void) throws(Errno) {
        guard try isInCurrentNamespace() else { throw Errno.operationNotSupportedByDevice }
        let name = try currentName()
        let socket = OwnedFD(adopting: try sys { ob_if_control_socket() })
        try body(socket.raw.rawValue, name)
    }

    private static func string(_ cchars: [CChar]) -> String {
        let bytes = cchars.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }
        return String(decoding: bytes, as: UTF8.self)
    }
}
