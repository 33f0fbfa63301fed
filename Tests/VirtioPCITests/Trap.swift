import Glibc

// Trapped memory: a BAR double whose every load and store the device model sees, as a real
// device sees its register accesses. The BAR is mapped PROT_NONE; an access faults
// (SIGSEGV, with the address), the handler opens the BAR and sets the trap flag, the access
// runs, the single-step trap (SIGTRAP) follows at once, and its handler lets the model look
// at what changed (a store) or what was read, update its registers, and closes the BAR
// again. The transport's code runs unchanged: it only does volatile loads and stores.
//
// One trapped area at a time (the suite is serialized); a fault or trap elsewhere goes to
// the handler that was installed before.

/// What the model does after each access: `offset` in the area, `wrote` whether it was a
/// store (the page fault's error code says).
typealias TrapAccess = @convention(c) (UnsafeMutableRawPointer?, Int, Bool) -> Void

struct TrapState {
    var base: UnsafeMutableRawPointer?
    var size = 0
    var context: UnsafeMutableRawPointer?
    var access: TrapAccess?
    /// The offset of the access between the fault and the single-step trap, or -1.
    var pending = -1
    var pendingWrite = false
    /// The handlers that were installed before ours, in heap memory that sigaction(2) fills;
    /// nil until `installTrapHandlers` ran. The global holds no `sigaction` value: Swift
    /// 6.3 -O initializes such a global statically with `sigaction`'s interior padding
    /// left out, so the object comes out 8 bytes short and the fields after it lie outside.
    var previousSegv: UnsafeMutablePointer<sigaction>?
    var previousTrap: UnsafeMutablePointer<sigaction>?
}

nonisolated(unsafe) var trap = TrapState()

/// The x86-64 EFLAGS trap flag, and the indices of EFLAGS and the page fault error code in
/// mcontext's gregs (REG_EFL, REG_ERR; bit 1 of the error code: a write).
let trapFlag: Int64 = 0x100
let regEFL = 17
let regERR = 19

func greg(_ uc: UnsafeMutableRawPointer?, _ index: Int) -> UnsafeMutablePointer<Int64> {
    let u = uc!.assumingMemoryBound(to: ucontext_t.self)
    return withUnsafeMutablePointer(to: &u.pointee.uc_mcontext.gregs) {
        UnsafeMutableRawPointer($0).assumingMemoryBound(to: Int64.self) + index
    }
}
func eflags(_ uc: UnsafeMutableRawPointer?) -> UnsafeMutablePointer<Int64> { greg(uc, regEFL) }

/// Puts back the handler that was installed before ours (the default one if there is none).
func passOn(_ signal: CInt, _ previous: UnsafeMutablePointer<sigaction>?) {
    if let p = previous {
        sigaction(signal, p, nil)
    } else {
        Glibc.signal(signal, SIG_DFL)
    }
}

let segvHandler: @convention(c) (CInt, UnsafeMutablePointer<siginfo_t>?, UnsafeMutableRawPointer?) -> Void = { sig, info, uc in
    let address = info!.pointee._sifields._sigfault.si_addr
    guard let base = trap.base, let a = address, a >= UnsafeRawPointer(base), a < UnsafeRawPointer(base + trap.size),
          trap.pending < 0 else {
        passOn(sig, trap.previousSegv)  // the fault repeats under the previous handler
        return
    }
    trap.pending = UnsafeRawPointer(a) - UnsafeRawPointer(base)
    trap.pendingWrite = greg(uc, regERR).pointee & 2 != 0
    mprotect(base, trap.size, PROT_READ | PROT_WRITE)
    eflags(uc).pointee |= trapFlag
}

let trapHandler: @convention(c) (CInt, UnsafeMutablePointer<siginfo_t>?, UnsafeMutableRawPointer?) -> Void = { sig, info, uc in
    guard trap.pending >= 0, let base = trap.base else {
        passOn(sig, trap.previousTrap)
        raise(sig)
        return
    }
    eflags(uc).pointee &= ~trapFlag
    let offset = trap.pending
    trap.pending = -1
    trap.access?(trap.context, offset, trap.pendingWrite)
    mprotect(base, trap.size, PROT_NONE)
}

func installTrapHandlers() {
    guard trap.previousSegv == nil else { return }
    let previousSegv = UnsafeMutablePointer<sigaction>.allocate(capacity: 1)
    let previousTrap = UnsafeMutablePointer<sigaction>.allocate(capacity: 1)
    // The previous handlers are in place before ours can run and pass a signal on.
    precondition(sigaction(SIGSEGV, nil, previousSegv) == 0 && sigaction(SIGTRAP, nil, previousTrap) == 0)
    trap.previousSegv = previousSegv
    trap.previousTrap = previousTrap
    var sa = sigaction()
    sa.__sigaction_handler.sa_sigaction = segvHandler
    sa.sa_flags = SA_SIGINFO | SA_NODEFER
    sigemptyset(&sa.sa_mask)
    precondition(sigaction(SIGSEGV, &sa, nil) == 0, "sigaction(SIGSEGV): errno \(errno)")
    var st = sigaction()
    st.__sigaction_handler.sa_sigaction = trapHandler
    st.sa_flags = SA_SIGINFO
    sigemptyset(&st.sa_mask)
    precondition(sigaction(SIGTRAP, &st, nil) == 0, "sigaction(SIGTRAP): errno \(errno)")
}

/// Arms `size` bytes at `base` (page-aligned, mapped): from now on every access calls
/// `access(context, offset)` after it ran.
func armTrap(base: UnsafeMutableRawPointer, size: Int, context: UnsafeMutableRawPointer, access: TrapAccess) {
    installTrapHandlers()
    precondition(trap.base == nil, "one trapped area at a time")
    trap.base = base; trap.size = size; trap.context = context; trap.access = access; trap.pending = -1
    mprotect(base, size, PROT_NONE)
}

/// Opens the area for the test's own direct accesses and stops trapping.
func disarmTrap() {
    if let b = trap.base { mprotect(b, trap.size, PROT_READ | PROT_WRITE) }
    trap.base = nil; trap.context = nil; trap.access = nil; trap.pending = -1
}

/// Runs `body` with the area open (the model updating its registers), then closes it.
func withTrapOpen<R>(_ body: () -> R) -> R {
    guard let b = trap.base else { return body() }
    mprotect(b, trap.size, PROT_READ | PROT_WRITE)
    defer { mprotect(b, trap.size, PROT_NONE) }
    return body()
}
