import ArgumentParser
import FoundationEssentials
import OutboardBench

#if canImport(Glibc)
import Glibc
#endif

/// `outboard _refblk`: the C reference vhost-user-blk frontend, run as its own process by
/// `bench blk`. Prints one JSON line (RefBlkResult) and exits 0, or prints the error on
/// stderr and exits 1. With `--dump-sector`, reads `--dump-bytes` at that sector instead and
/// writes the raw bytes to stdout (for correctness checks against the image file). With
/// `--kernel-file`, runs the kernel reference (fio) on that file instead and prints its JSON line.
struct RefBlkCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "_refblk", shouldDisplay: false)

    @Option(help: "vhost-user-blk backend socket.")
    var socket: String = ""

    @Option(help: "Requests in flight.")
    var qd: Int = 32

    @Option(help: "Measured interval, seconds.")
    var seconds: Double = 5

    @Option(help: "Warm-up before the measured interval, seconds.")
    var warmup: Double = 1

    @Option(help: "interrupt, event-idx, adaptive or poll.")
    var mode: String = "event-idx"

    @Option(help: "Open loop at this many requests per second (at most --qd in flight); 0: closed loop.")
    var rate: Double = 0

    @Option(help: "Seed of the random offsets.")
    var seed: UInt64 = 1

    @Option(help: "Debug: read once at this sector and write the bytes to stdout.")
    var dumpSector: UInt64?

    @Option(help: "Bytes to read with --dump-sector.")
    var dumpBytes: Int = 4096

    @Option(help: "Run the kernel reference (fio, io_uring, buffered) on this file instead.")
    var kernelFile: String?

    func run() throws {
        do {
            let e = JSONEncoder()
            e.outputFormatting = [.sortedKeys]
            if let file = kernelFile {
                let r = try runKernelReference(file: file, queueDepth: qd, seconds: seconds)
                print(String(decoding: try e.encode(r), as: UTF8.self))
                return
            }
            guard !socket.isEmpty else { throw LabError("--socket is required") }
            if let sector = dumpSector {
                let (data, _) = try refBlkReadOnce(socket: socket, sector: sector, bytes: dumpBytes)
                var off = 0
                while off < data.count {
                    let n = data[off...].withUnsafeBytes { Glibc.write(1, $0.baseAddress, $0.count) }
                    if n <= 0 { throw LabError("write to stdout failed") }
                    off += n
                }
                return
            }
            let r = try runRefBlk(socket: socket, queueDepth: qd, warmupSeconds: warmup, seconds: seconds,
                                  mode: mode, seed: seed, rateIops: rate)
            print(String(decoding: try e.encode(r), as: UTF8.self))
        } catch {
            writeStderr("outboard _refblk: \(error)\n")
            throw ExitCode(1)
        }
    }
}
