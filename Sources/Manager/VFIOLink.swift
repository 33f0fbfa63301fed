import Logging
import OutboardRings
import OutboardSession
import OutboardSystem
import SystemPackage
import VFIO

#if canImport(Glibc)
import Glibc
#endif

/// The manager's side of a PCI device behind an IOMMU. The manager binds the device to
/// vfio-pci, holds the VFIO container and group, and maps into the container exactly what
/// the device may reach: the driver's DMA region at `DeviceState.dmaIOAddress`, and each
/// session's data region at the IO address of its translation-table entry, from the
/// session's creation until its revocation completes. The driver gets the device fd only:
/// its sandbox refuses the container's ioctls, so what the IOMMU lets the device reach is
/// the translation table, enforced by hardware.
///
/// The device is bound at the first hand-off (a device that cannot be bound fails alone,
/// not the manager) and given back to its previous kernel driver when the manager stops.
final class VFIOLink {
    let address: PCIAddress
    let handoff: DeviceHandoff
    let sysfs: PCISysfs
    /// Set once the device is bound and the container holds the DMA region.
    private(set) var opened: Opened?

    /// What exists while the device is bound: the container, the group, the mappings.
    final class Opened {
        var container: VFIOContainer
        let group: VFIOGroup
        let previousDriver: String?
        /// The driver's DMA region, mapped in the manager (VFIO pins by virtual address).
        let dma: SharedMapping
        /// End (exclusive) of the IO addresses sessions may use: the IOMMU's usable range
        /// that holds `IOAddressAllocator.first`, below any reserved region in it.
        let sessionLimit: UInt64
        /// Session data regions mapped into the container, by IO address.
        var windows: [IOAddress: Window] = [:]

        init(container: consuming VFIOContainer, group: consuming VFIOGroup, previousDriver: String?,
             dma: consuming SharedMapping, sessionLimit: UInt64) {
            self.container = container; self.group = group
            self.previousDriver = previousDriver; self.dma = dma; self.sessionLimit = sessionLimit
        }
    }

    /// A session's data region as the container maps it (the manager's own mapping of it:
    /// VFIO pins the pages behind a virtual address of the caller).
    final class Window {
        let mapping: SharedMapping
        init(_ mapping: consuming SharedMapping) { self.mapping = mapping }
    }

    /// Where the driver the device had before is written down while the manager holds it
    /// (root's, mode 0600), so that a manager started after one that crashed still knows
    /// whom to give the device back to.
    let recordPath: String

    init(address: PCIAddress, reconnectMs: UInt32, stateDirectory: String, sysfs: PCISysfs = PCISysfs()) {
        self.address = address
        self.sysfs = sysfs
        recordPath = stateDirectory + "/vfio-\(address).driver"
        handoff = DeviceHandoff(reconnectMs: reconnectMs)
    }

    /// A driver name as sysfs spells them: it becomes part of a sysfs path.
    static func isDriverName(_ s: String) -> Bool {
        !s.isEmpty && s.utf8.count <= 64 && s.utf8.allSatisfy { ($0 >= 0x61 && $0 <= 0x7A) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2D || $0 == 0x5F }
    }

    /// The record lives only in a directory that is root's and writable by nobody else
    /// (`/run/outboard`, the default): elsewhere another user could remove or replace it.
    var recordDirectoryIsSafe: Bool {
        let dir = String(recordPath[..<(recordPath.lastIndex(of: "/") ?? recordPath.startIndex)])
        var st = stat()
        return lstat(dir.isEmpty ? "/" : dir, &st) == 0 && st.st_mode & S_IFMT == S_IFDIR && st.st_uid == 0 && st.st_mode & 0o022 == 0
    }

    /// The previous driver a manager before this one wrote down, if the record is a
    /// regular file of root's, not writable by anyone else, in a safe directory, and names
    /// a driver ("" inside: the device had none).
    func recordedDriver() -> String?? {
        guard recordDirectoryIsSafe,
              let fd = try? OwnedFD.open(recordPath, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC) else { return nil }
        var st = stat()
        guard fstat(fd.raw.rawValue, &st) == 0, st.st_mode & S_IFMT == S_IFREG, st.st_uid == 0, st.st_mode & 0o022 == 0,
              st.st_nlink == 1, let bytes = try? fd.readToEnd(limit: 128) else { return nil }
        let name = String(decoding: bytes, as: UTF8.self).trimmingNewline()
        if name.isEmpty { return .some(nil) }
        return Self.isDriverName(name) && name != "vfio-pci" ? .some(name) : nil
    }

    /// Writes the record (replacing any); a failure is logged: a crash would then leave
    /// the device on vfio-pci.
    func writeRecord(_ driver: String?, logger: Logger) {
        guard recordDirectoryIsSafe else {
            logger.warning("not recording the device's driver: \(recordPath)'s directory is not root's alone; a manager killed while it holds the device leaves it on vfio-pci", metadata: ["pci": "\(address)"])
            return
        }
        unlink(recordPath)
        do {
            let fd = try OwnedFD.open(recordPath, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode: 0o600)
            try fd.writeAll(Array(((driver ?? "") + "\n").utf8))
        } catch {
            logger.warning("cannot record the device's driver in \(recordPath): \(error)", metadata: ["pci": "\(address)"])
        }
    }

    /// Binds the device to vfio-pci (its IOMMU group must hold nothing bound to another
    /// driver), opens the container and the group, checks the IOMMU's address ranges and
    /// maps the driver's DMA region. Undone, and the previous driver restored, if any step
    /// fails.
    func open(dma region: borrowing SharedRegion, logger: Logger) throws(PCIError) {
        guard opened == nil else { return }
        let groupNumber = try sysfs.iommuGroup(of: address)
        // The device itself is bound to its kernel driver until bindToVFIO.
        let blockers = try sysfs.groupBlockers(of: address).filter { $0 != address }
        guard blockers.isEmpty else {
            throw .unsupported("an IOMMU group of its own: group \(groupNumber) also holds \(blockers.map(\.description).joined(separator: ", ")), bound to other drivers (bind them to vfio-pci or move the device)")
        }
        // The record first, then the bind: a manager killed in between leaves a record that
        // names the driver the device had.
        let current = sysfs.driver(of: address)
        var previous: String?
        var boundHere = false
        if current == "vfio-pci" {
            // Bound already: by a manager that did not get to give it back if it left a
            // record (then that driver gets it at the end), else by someone else (then it
            // stays on vfio-pci).
            previous = recordedDriver() ?? "vfio-pci"
        } else {
            writeRecord(current, logger: logger)
            do { previous = try sysfs.bindToVFIO(address) } catch {
                unlink(recordPath)
                throw error
            }
            boundHere = true
        }
        do throws(PCIError) {
            var container = try VFIOContainer()
            let group = try VFIOGroup(number: groupNumber)
            try container.attach(group)
            let info = try container.info()
            let reserved = try sysfs.reservedRegions(group: groupNumber)
            let dmaFirst = DeviceState.dmaIOAddress.rawValue
            let dmaRange = IOVARange(first: dmaFirst, last: dmaFirst + UInt64(region.size) - 1)
            let limit = try IOAddressAllocator.limit(usable: info.iovaRanges, reserved: reserved, dma: dmaRange)
            let mapping: SharedMapping
            do { mapping = try region.map(.readWrite) } catch { throw .system("mapping the DMA region: \(error)") }
            try container.map(hostAddress: mapping.base, ioAddress: DeviceState.dmaIOAddress, size: mapping.size, writable: true)
            opened = Opened(container: container, group: group, previousDriver: previous,
                            dma: mapping, sessionLimit: limit)
            logger.info("device bound to vfio-pci", metadata: [
                "pci": "\(address)", "iommu_group": "\(groupNumber)", "previous_driver": "\(previous ?? "none")",
                "session_io_limit": "0x\(String(limit, radix: 16))"])
        } catch {
            // Only a bind of this call is undone: a device found on vfio-pci may be in use
            // by whoever holds its group.
            if boundHere {
                try? sysfs.restore(address, previousDriver: previous)
                unlink(recordPath)
            }
            throw error
        }
    }

    /// A new fd of the device, for the driver. The manager keeps none: when the driver
    /// dies, the kernel resets the device as its last fd closes, and the next driver finds
    /// it quiet.
    func withDeviceDescriptor(_ body: (FileDescriptor) -> Void) throws(PCIError) {
        guard let o = opened else { throw .unsupported("a bound group (the device is not open)") }
        let device = try o.group.openDevice(address)
        body(FileDescriptor(rawValue: device.descriptor))
    }

    /// Maps a session's data region at its IO address, for the device to read and write.
    func map(_ s: Session) throws(PCIError) {
        guard let o = opened else { throw .unsupported("a bound group (the device is not open)") }
        let end = s.ioAddress.rawValue.addingReportingOverflow(s.dataBytes)
        guard !end.overflow, end.partialValue <= o.sessionLimit else {
            throw .unsupported("IO addresses up to 0x\(String(s.ioAddress.rawValue &+ s.dataBytes, radix: 16)) (the IOMMU's limit is 0x\(String(o.sessionLimit, radix: 16)))")
        }
        let mapping: SharedMapping
        do { mapping = try s.resources.data.map(.readWrite) } catch { throw .system("mapping session \(s.id)'s data: \(error)") }
        try o.container.map(hostAddress: mapping.base, ioAddress: s.ioAddress, size: Int(s.dataBytes), writable: true)
        o.windows[s.ioAddress] = Window(mapping)
    }

    /// Takes a session's data region out of the container: from here on the device's
    /// accesses to it fault in the IOMMU.
    func unmap(_ s: Session) throws(PCIError) {
        guard let o = opened, o.windows[s.ioAddress] != nil else { return }
        try o.container.unmap(ioAddress: s.ioAddress, size: Int(s.dataBytes))
        o.windows.removeValue(forKey: s.ioAddress)
    }

    /// Unmaps everything and closes the group and the container (their fds close with the
    /// last reference, here: the kernel lets another driver probe the device only when no
    /// group of it is open). Returns the driver the device had before (nil inside if it had
    /// none), or nil if nothing was open.
    private func closeContainer() -> String?? {
        guard let o = opened else { return nil }
        opened = nil
        for (a, w) in o.windows { try? o.container.unmap(ioAddress: a, size: w.mapping.size) }
        o.windows.removeAll()
        try? o.container.unmap(ioAddress: DeviceState.dmaIOAddress, size: o.dma.size)
        let previous = o.previousDriver
        _ = consume o  // the last reference: the group's and the container's fds close here
        return .some(previous)
    }

    /// Unmaps everything, closes the group and container, and gives the device back to
    /// the driver it had before the manager bound it.
    func release(logger: Logger) {
        guard let previous = closeContainer() else { return }
        guard previous != "vfio-pci" else { return }
        do {
            try sysfs.restore(address, previousDriver: previous)
            unlink(recordPath)
            logger.info("device given back", metadata: ["pci": "\(address)", "driver": "\(previous ?? "none")"])
        } catch {
            logger.error("cannot give the device back to its driver: \(error)", metadata: ["pci": "\(address)"])
        }
    }
}

extension String {
    func trimmingNewline() -> String {
        var s = self
        while s.last == "\n" || s.last == "\r" || s.last == " " { s.removeLast() }
        return s
    }
}
