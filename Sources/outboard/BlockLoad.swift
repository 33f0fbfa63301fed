import ArgumentParser
import Outboard
import OutboardSession
import OutboardSystem

/// The Outboard client of `bench blk` and `bench guest`: 4 KiB requests of one kind at
/// random 4 KiB-aligned places of the whole device, from one session, `depth` slots of its
/// data region. Closed loop (`rate` nil: every slot kept busy, each batch of completions
/// resubmitted with one batch submit) or open loop at `rate` requests per second (a
/// deadline schedule: request k is due at start + k / rate, issued as soon as it is due
/// and a slot is free, so a late request does not move the later ones; the same schedule
/// as the C reference's `rate_iops`). With requests in flight the client waits for a
/// completion or the next deadline (the library's wait, in whole milliseconds, polling
/// `spinMicroseconds` first); with none it sleeps until the deadline. `busyPoll`: it never
/// sleeps, polling instead (the poll notification mode).
struct BlockLoad {
    var op: BlockOp
    var depth: Int
    var rate: Double?
    var warmup: Double
    var seconds: Double
    var spinMicroseconds = 0
    var busyPoll = false
    var seed: UInt64

    struct Outcome {
        /// Completions in the measured interval, those not `ok` (warm-up included), and (open loop) requests
        /// issued in it and the late ones among them (due while every slot was busy, or due
        /// by the end and never issued).
        var ios = 0, errors = 0, issued = 0, late = 0
        var p50Us = 0.0, p99Us = 0.0
    }

    /// Runs on `s`. `begin` is called once, with `s`, when the warm-up is over, and returns the time
    /// the measured interval starts (the caller takes its first snapshot there); the
    /// interval ends `seconds` after it, and `run` returns with requests still in flight
    /// (the caller takes its last snapshot, then drains).
    func run(_ s: inout BlockSession, begin: (borrowing BlockSession) throws -> UInt64) throws -> Outcome {
        let blocks = s.info.blockCount / 8
        guard blocks > 0 else { throw CommandFailure("the device has fewer than 8 sectors") }
        let results = UnsafeMutableBufferPointer<BlockResult>.allocate(capacity: s.queueDepth)
        let batch = UnsafeMutableBufferPointer<BlockSubmission>.allocate(capacity: max(depth, s.queueDepth))
        let started = UnsafeMutablePointer<UInt64>.allocate(capacity: depth)
        let freeSlots = UnsafeMutablePointer<Int>.allocate(capacity: depth)
        var latencies = Latencies()
        defer { results.deallocate(); batch.deallocate(); started.deallocate(); freeSlots.deallocate() }
        var rng = 0x9E37_79B9_7F4A_7C15 ^ seed
        func random() -> UInt64 { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng }
        let start = Clock.monotonicNanoseconds
        let warmEnd = start + UInt64(warmup * 1e9)
        var end = UInt64.max
        var measuring = false
        var out = Outcome()
        func deadline(_ k: UInt64) -> UInt64 { rate.map { start &+ UInt64(Double(k) * 1e9 / $0) } ?? 0 }
        func dueBy(_ t: UInt64) -> UInt64 { rate.map { r in t < start ? 0 : UInt64(Double(t - start) * r / 1e9) + 1 } ?? 0 }
        // next: the index of the next request; every request below blockedThrough fell due
        // while every slot was busy. lastProgress: the last completion, or the last issue
        // into an empty queue (the stall check's start).
        var next: UInt64 = 0, blockedThrough: UInt64 = 0, lastProgress = start
        var nfree = depth
        for i in 0..<depth { freeSlots[i] = depth - 1 - i }
        var now = start
        while true {
            var n = 0
            while nfree > 0 && deadline(next) <= now {
                nfree -= 1
                let b = freeSlots[nfree]
                batch[n] = BlockSubmission(op, sector: (random() % blocks) * 8, offset: b * 4096, length: 4096, userData: UInt64(b))
                started[b] = now
                if measuring {
                    out.issued += 1
                    if next < blockedThrough { out.late += 1 }
                }
                if s.inFlight + n == 0 { lastProgress = now }
                next += 1
                n += 1
            }
            if rate != nil && nfree == 0 && deadline(next) <= now { blockedThrough = max(blockedThrough, dueBy(now)) }
            if n > 0 {
                guard try s.submit(batch: UnsafeBufferPointer(rebasing: batch[0..<n])) == n else {
                    throw CommandFailure("could not submit \(n) requests with \(nfree) of \(depth) slots free")
                }
            }
            // With every slot busy the next deadline cannot be served: wait for a
            // completion (or the phase's end) instead of spinning past it.
            let until = min(nfree > 0 && rate != nil ? deadline(next) : .max, measuring ? end : warmEnd)
            var k = 0
            if s.inFlight == 0 {
                if busyPoll {
                    while Clock.monotonicNanoseconds < until {}
                } else {
                    sleepUntil(until)
                }
            } else if busyPoll {
                repeat { k = try s.poll(into: results) } while k == 0 && Clock.monotonicNanoseconds < until
            } else {
                let t = Clock.monotonicNanoseconds
                k = t < until
                    ? try s.wait(into: results, timeoutMilliseconds: Int(min((until - t + 999_999) / 1_000_000, 1000)),
                                 spinMicroseconds: spinMicroseconds)
                    : try s.poll(into: results)
            }
            now = Clock.monotonicNanoseconds
            if interrupted() { throw ExitCode(130) }
            if k > 0 {
                lastProgress = now
            } else if s.inFlight > 0 && now - lastProgress > 10_000_000_000 {
                throw CommandFailure("no completion for 10 s with \(s.inFlight) requests in flight")
            }
            for i in 0..<k {
                let r = results[i]
                let b = Int(r.userData)
                if r.status != .ok { out.errors += 1 }
                if measuring {
                    out.ios += 1
                    latencies.add(now - started[b])
                }
                freeSlots[nfree] = b
                nfree += 1
            }
            if !measuring && now >= warmEnd {
                now = try begin(s)
                end = now + UInt64(seconds * 1e9)
                measuring = true
            } else if measuring && now >= end {
                break
            }
        }
        let due = dueBy(end)
        if due > next { out.late += Int(due - next) }
        (out.p50Us, out.p99Us) = latencies.percentiles()
        return out
    }
}

/// Submit-to-completion latencies in 0.1 us units, and their percentiles.
struct Latencies: ~Copyable {
    let buffer = UnsafeMutableBufferPointer<UInt32>.allocate(capacity: 1 << 23)
    var count = 0
    deinit { buffer.deallocate() }
    mutating func add(_ nanoseconds: UInt64) {
        guard count < buffer.count else { return }
        buffer[count] = UInt32(clamping: nanoseconds / 100)
        count += 1
    }
    /// Sorts what was recorded; returns p50 and p99 in microseconds.
    mutating func percentiles() -> (p50: Double, p99: Double) {
        var sorted = UnsafeMutableBufferPointer(rebasing: buffer[0..<count])
        sorted.sort()
        let n = count
        func pct(_ p: Double) -> Double { n == 0 ? 0 : Double(sorted[min(n - 1, Int(Double(n) * p))]) / 10 }
        return (pct(0.5), pct(0.99))
    }
}
