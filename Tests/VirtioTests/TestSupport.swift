import Glibc
import Synchronization
import Testing
import OutboardTestSupport
import OutboardRings
import Virtio

/// Deterministic PRNG (SplitMix64), so a failure reproduces.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}


extension SplitVirtqueue {
    /// `add` for an array (tests only; the array is the test's allocation, not the queue's).
    mutating func add(_ buffers: [VirtqBuffer]) throws(VirtioError) -> UInt16 {
        try buffers.withUnsafeBufferPointer { (p) throws(VirtioError) -> UInt16 in try add(p) }
    }
}

/// `#expect` for expressions on non-copyable values (the macro cannot decompose those).
func check(_ condition: Bool, _ comment: Comment? = nil, sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(condition, comment, sourceLocation: sourceLocation)
}
