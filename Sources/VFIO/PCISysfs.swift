import CLinux
import OutboardSystem

#if canImport(Glibc)
import Glibc
#endif

/// PCI binding through sysfs, for the manager (root): which IOMMU group a function is in,
/// which driver has it, moving it to vfio-pci and back. Every path is under `root`, so a
/// test can hand it a fake tree. What sysfs holds is read as the kernel's answer, but
/// parsed strictly: a group link or a reserved-regions line that does not parse throws.
public struct PCISysfs {
    public let root: String
    /// Called after each write this value makes, with the path and the text: a test's fake
    /// kernel reacts there (moves the `driver` link) and records the order.
    private let afterWrite: ((String, String) -> Void)?

    public init(root: String = "/sys") {
        self.root = root
        afterWrite = nil
    }

    /// As `init(root:)`, with `afterWrite` called after every write (tests: a fake tree
    /// where something must play the kernel's part).
    public init(root: String, afterWrite: @escaping (String, String) -> Void) {
        self.root = root
        self.afterWrite = afterWrite
    }

    /// Drivers that leave an IOMMU group viable besides vfio-pci (the kernel's list).
    public static let viableDrivers: Set<String> = ["vfio-pci", "pci-stub", "pcieport"]

    func devicePath(_ a: PCIAddress) -> String { "\(root)/bus/pci/devices/\(a)" }
    func driverPath(_ name: String) -> String { "\(root)/bus/pci/drivers/\(name)" }
    func groupPath(_ n: Int) -> String { "\(root)/kernel/iommu_groups/\(n)" }

    // MARK: Reading

    /// The IOMMU group of `a` (the number the `iommu_group` link names).
    public func iommuGroup(of a: PCIAddress) throws(PCIError) -> Int {
        let path = devicePath(a) + "/iommu_group"
        guard let target = try readLink(path) else {
            if exists(devicePath(a)) {
                throw .unsupported("an IOMMU group for \(a): \(path) is missing (no IOMMU, or it is off: intel_iommu=on?)")
            }
            throw .unsupported("a PCI function \(a): \(devicePath(a)) does not exist")
        }
        guard let last = target.split(separator: "/").last, let n = Int(last), n >= 0 else {
            throw .malformed("\(path) points to \(target), not to an IOMMU group")
        }
        return n
    }

    /// The driver bound to `a` (the last part of its `driver` link); nil when unbound.
    public func driver(of a: PCIAddress) -> String? {
        guard let target = try? readLink(devicePath(a) + "/driver"), let last = target.split(separator: "/").last else { return nil }
        return String(last)
    }

    /// The PCI functions in `a`'s IOMMU group (a included), ascending. Entries of the group
    /// that are not PCI addresses are left out.
    public func groupMembers(of a: PCIAddress) throws(PCIError) -> [PCIAddress] {
        let n = try iommuGroup(of: a)
        let dir = groupPath(n) + "/devices"
        return try listDirectory(dir).compactMap { PCIAddress($0) }.sorted { $0.description < $1.description }
    }

    /// The members of `a`'s group bound to a driver that makes the group non-viable (any
    /// other than vfio-pci, pci-stub and pcieport), ascending; `a` itself included when it
    /// is bound to such a driver.
    public func groupBlockers(of a: PCIAddress) throws(PCIError) -> [PCIAddress] {
        try groupMembers(of: a).filter { m in
            guard let d = driver(of: m) else { return false }
            return !Self.viableDrivers.contains(d)
        }
    }

    /// The reserved IOVA regions of IOMMU group `group` (reserved_regions: "start end
    /// type" per line, hexadecimal, inclusive), as listed.
    public func reservedRegions(group: Int) throws(PCIError) -> [IOVARange] {
        let path = groupPath(group) + "/reserved_regions"
        return try Self.parseReservedRegions(readText(path), path: path)
    }

    /// Parses the text of a reserved_regions file (`path` names it in errors).
    public static func parseReservedRegions(_ text: String, path: String = "reserved_regions") throws(PCIError) -> [IOVARange] {
        var out: [IOVARange] = []
        for (i, line) in text.split(separator: "\n", omittingEmptySubsequences: true).enumerated() {
            let words = line.split(separator: " ", omittingEmptySubsequences: true)
            func number(_ w: Substring) -> UInt64? {
                guard w.hasPrefix("0x") || w.hasPrefix("0X") else { return nil }
                let digits = w.dropFirst(2)
                guard !digits.isEmpty, digits.count <= 16 else { return nil }
                return UInt64(digits, radix: 16)
            }
            guard words.count >= 2, let first = number(words[0]), let last = number(words[1]), first <= last else {
                throw .malformed("\(path) line \(i + 1) is not \"0xSTART 0xEND TYPE\": \(line)")
            }
            out.append(IOVARange(first: first, last: last))
        }
        return out
    }

    // MARK: Binding

    /// Binds `a` to vfio-pci: driver_override = vfio-pci, unbind from the current driver,
    /// drivers_probe (then an explicit bind to vfio-pci if the probe did not take). Returns
    /// the driver it had (nil: none); "vfio-pci" without touching anything if it is already
    /// bound there. When binding fails after the unbind, the previous driver is restored
    /// as far as it goes and the first error is thrown.
    public func bindToVFIO(_ a: PCIAddress) throws(PCIError) -> String? {
        let dev = devicePath(a)
        guard exists(dev) else { throw .unsupported("a PCI function \(a): \(dev) does not exist") }
        let previous = driver(of: a)
        if previous == "vfio-pci" { return "vfio-pci" }
        guard exists(driverPath("vfio-pci")) else {
            throw .unsupported("the vfio-pci driver: \(driverPath("vfio-pci")) does not exist (modprobe vfio-pci)")
        }
        try write(dev + "/driver_override", "vfio-pci")
        do throws(PCIError) {
            if let previous { try write(driverPath(previous) + "/unbind", a.description) }
            try write(root + "/bus/pci/drivers_probe", a.description)
            if driver(of: a) != "vfio-pci" {
                try write(driverPath("vfio-pci") + "/bind", a.description)
            }
            guard let now = driver(of: a), now == "vfio-pci" else {
                throw PCIError.system("binding \(a) to vfio-pci: it is bound to \(driver(of: a) ?? "no driver") afterwards")
            }
        } catch {
            try? restore(a, previousDriver: previous)
            throw error
        }
        return previous
    }

    /// Undoes bindToVFIO: unbind from vfio-pci (if bound there), clear driver_override, and
    /// bind back to `previousDriver` (its bind file, then drivers_probe if that did not
    /// take); nil leaves the function unbound. "vfio-pci" as the previous driver leaves it
    /// as it is.
    public func restore(_ a: PCIAddress, previousDriver: String?) throws(PCIError) {
        if previousDriver == "vfio-pci" { return }
        let dev = devicePath(a)
        if driver(of: a) == "vfio-pci" { try write(driverPath("vfio-pci") + "/unbind", a.description) }
        try write(dev + "/driver_override", "\n")
        guard let previousDriver else { return }
        if driver(of: a) == previousDriver { return }
        var firstError: PCIError?
        do throws(PCIError) { try write(driverPath(previousDriver) + "/bind", a.description) } catch { firstError = error }
        if driver(of: a) != previousDriver {
            try write(root + "/bus/pci/drivers_probe", a.description)
        }
        guard driver(of: a) == previousDriver else {
            let why = firstError.map { " (\($0))" } ?? ""
            throw .system("restoring \(a) to \(previousDriver): it is bound to \(driver(of: a) ?? "no driver")\(why)")
        }
    }

    // MARK: Files

    func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    /// The link's target; nil when there is no such link.
    func readLink(_ path: String) throws(PCIError) -> String? {
        var buf = [CChar](repeating: 0, count: 4096)
        let (n, e) = vfioCallErrno { readlink(path, &buf, buf.count - 1) }
        if n < 0 {
            if e == ENOENT || e == ENOTDIR { return nil }
            throw .system("readlink \(path): \(errnoText(e))")
        }
        return String(decoding: buf[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    func readText(_ path: String) throws(PCIError) -> String {
        let fd = try openOwned(path, O_RDONLY)
        let raw = fd.raw.rawValue
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = try vfioCall("read \(path)") { chunk.withUnsafeMutableBytes { read(raw, $0.baseAddress, $0.count) } }
            if n == 0 { break }
            out += chunk[..<n]
            guard out.count <= 1 << 20 else { throw .malformed("\(path) is larger than 1 MiB") }
        }
        return String(decoding: out, as: UTF8.self)
    }

    func listDirectory(_ path: String) throws(PCIError) -> [String] {
        guard let d = opendir(path) else { throw .system("opendir \(path): \(errnoText(errno))") }
        defer { closedir(d) }
        var names: [String] = []
        while let entry = readdir(d) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { b in
                String(decoding: b.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    /// Writes `text` to the sysfs attribute at `path` in one write(2), as the kernel wants
    /// (O_TRUNC as a shell's `>`: sysfs ignores it, a plain file of a fake tree needs it).
    func write(_ path: String, _ text: String) throws(PCIError) {
        let fd = try openOwned(path, O_WRONLY | O_TRUNC)
        let raw = fd.raw.rawValue
        let bytes = Array(text.utf8)
        let n = try vfioCall("write \"\(text == "\n" ? "\\n" : text)\" to \(path)") {
            bytes.withUnsafeBytes { Glibc.write(raw, $0.baseAddress, $0.count) }
        }
        guard n == bytes.count else { throw .system("write to \(path): \(n) of \(bytes.count) bytes") }
        afterWrite?(path, text)
    }
}
