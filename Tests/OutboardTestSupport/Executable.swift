#if canImport(Glibc)
import Glibc
#endif

/// The `outboard` executable of this build, which the cross-process tests run as separate
/// processes (ring workers, the manager and its drivers, the sandbox probe):
/// $OUTBOARD_EXECUTABLE, or the build folder the test bundle sits in
/// (.build/<triple>/<config>/outboardPackageTests.xctest -> .build/<triple>/<config>/outboard).
public func outboardExecutable() throws -> String {
    if let env = getenv("OUTBOARD_EXECUTABLE") { return String(cString: env) }
    var buf = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buf, buf.count - 1)
    guard n > 0 else { throw ExecutableNotFound() }
    var dir = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    for _ in 0..<4 {
        guard let slash = dir.lastIndex(of: "/") else { break }
        dir = String(dir[..<slash])
        let candidate = dir + "/outboard"
        var st = stat()
        if stat(candidate, &st) == 0, st.st_mode & S_IFMT == S_IFREG, access(candidate, X_OK) == 0 {
            return candidate
        }
    }
    throw ExecutableNotFound()
}

public struct ExecutableNotFound: Error, CustomStringConvertible {
    public var description: String {
        "outboard executable not found next to the test bundle; build it first or set OUTBOARD_EXECUTABLE"
    }
}
