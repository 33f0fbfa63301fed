import Foundation
import Testing

/// Runs the `outboard` executable with `arguments` as a user would; returns its exit
/// status and stdout lines (stderr is dropped). Killed, and the calling test failed, if it
/// has not finished within `seconds`.
public func runOutboard(_ arguments: [String], seconds: Double = 180) throws -> (status: Int32, lines: [String]) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: try outboardExecutable())
    process.arguments = arguments
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = FileHandle.nullDevice
    try process.run()
    // The watchdog: stdout stays open while the command runs, so the read below ends
    // when it exits or is killed.
    let pid = process.processIdentifier
    let watchdog = DispatchWorkItem { kill(pid, SIGKILL) }
    DispatchQueue.global().asyncAfter(deadline: .now() + seconds, execute: watchdog)
    let output = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    watchdog.cancel()
    if process.terminationReason == .uncaughtSignal && process.terminationStatus == SIGKILL {
        Issue.record("outboard \(arguments.joined(separator: " ")) did not finish within \(seconds) s")
    }
    return (process.terminationStatus, String(decoding: output, as: UTF8.self).split(separator: "\n").map(String.init))
}
