import CLinux
import OutboardSystem

#if canImport(Glibc)
import Glibc
#endif

/// A VFIO group (/dev/vfio/N): the devices one IOMMU group holds, all bound to vfio-pci (or
/// to no driver). Its descriptor is owned here. Devices are opened through it once it is
/// attached to a container.
public struct VFIOGroup: ~Copyable {
    let fd: OwnedFD
    /// The IOMMU group number (/sys/kernel/iommu_groups/N).
    public let number: Int

    /// The descriptor, for calls the group does not wrap (it stays owned here).
    public var descriptor: CInt { fd.raw.rawValue }

    /// Opens `directory`/`number` and checks (VFIO_GROUP_GET_STATUS) that the group is
    /// viable: every device in it is bound to vfio-pci or to no driver.
    public init(number: Int, directory: String = "/dev/vfio") throws(PCIError) {
        let path = "\(directory)/\(number)"
        let (r, e) = vfioCallErrno { Glibc.open(path, O_RDWR | O_CLOEXEC) }
        guard r >= 0 else {
            switch e {
            case ENOENT:
                throw .unsupported("VFIO group \(number): \(path) does not exist (no device of IOMMU group \(number) is bound to vfio-pci)")
            case EBUSY:
                throw .system("open \(path): \(errnoText(e)) (the group is open in another process or container)")
            default:
                throw .system("open \(path): \(errnoText(e))")
            }
        }
        let owned = OwnedFD(adopting: r)
        guard try Self.status(r, number).viable else {
            throw .unsupported("a viable VFIO group \(number): a device in IOMMU group \(number) is bound to a host driver "
                               + "other than vfio-pci (bind every member to vfio-pci, or unbind it; see PCISysfs.groupBlockers)")
        }
        fd = owned
        self.number = number
    }

    /// VFIO_GROUP_GET_STATUS: whether the group is viable and attached to a container.
    public func status() throws(PCIError) -> (viable: Bool, containerSet: Bool) {
        try Self.status(fd.raw.rawValue, number)
    }

    static func status(_ raw: CInt, _ number: Int) throws(PCIError) -> (viable: Bool, containerSet: Bool) {
        var st = vfio_group_status()
        st.argsz = UInt32(MemoryLayout<vfio_group_status>.size)
        _ = try vfioCall("VFIO_GROUP_GET_STATUS for group \(number)") { ob_vfio_ioctl_ptr(raw, ob_vfio_req_group_get_status(), &st) }
        return (st.flags & UInt32(VFIO_GROUP_FLAGS_VIABLE) != 0, st.flags & UInt32(VFIO_GROUP_FLAGS_CONTAINER_SET) != 0)
    }

    /// Opens the device at `address` (VFIO_GROUP_GET_DEVICE_FD). The group must be attached
    /// to a container whose IOMMU is set.
    public func openDevice(_ address: PCIAddress) throws(PCIError) -> VFIODevice {
        guard try status().containerSet else {
            throw .unsupported("a container for VFIO group \(number): attach the group (VFIOContainer.attach) before opening \(address)")
        }
        let raw = fd.raw.rawValue
        let name = address.description
        let (r, e) = vfioCallErrno {
            name.withCString { ob_vfio_ioctl_ptr(raw, ob_vfio_req_group_get_device_fd(), UnsafeMutableRawPointer(mutating: $0)) }
        }
        guard r >= 0 else {
            let hint = e == EINVAL || e == ENODEV ? " (is \(address) in IOMMU group \(number)?)" : ""
            throw .system("VFIO_GROUP_GET_DEVICE_FD \(address) in group \(number): \(errnoText(e))\(hint)")
        }
        return try VFIODevice(adopting: OwnedFD(adopting: r))
    }
}
