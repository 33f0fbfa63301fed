#ifndef OUTBOARD_ORDERING_H
#define OUTBOARD_ORDERING_H

// A compiler-only barrier: the compiler may not move memory accesses across it, and it
// emits no instruction. Swift's Synchronization has no signal fence, so OutboardRings
// takes this one. Imported into Swift and inlined there (static inline), so there is no
// call. Used on the fast side of an asymmetric barrier, whose slow side is
// membarrier(2): the fast side needs only program order, not a fence.
static inline void ob_compiler_barrier(void) {
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

#endif
