// CRefRing: the C reference the ring benchmark measures Outboard's Swift queue against.
//
// Same shared-memory layout as OutboardRings (QueueLayout: tail @0, producer barrier @4,
// head @64, consumer signal @128, signal ordering @132, wake index @136, 16-byte
// descriptors @192), same algorithm (free-running indices, private index copies, peer
// index range checks, copy-then-validate descriptors, the request-signal/double-check
// protocol with the fence or asymmetric ordering, the wake index and the idle flush), and
// the same work per descriptor as the Swift worker in OutboardBench/RingWorker.swift.
// Written for the benchmark; it is a yardstick, not a second implementation to use.
#ifndef OUTBOARD_CREFRING_H
#define OUTBOARD_CREFRING_H

#include <stddef.h>
#include <stdint.h>

struct ref_desc {
    uint64_t offset;
    uint32_t length;
    uint32_t cookie;
};

enum { REF_MODE_BUSY = 0, REF_MODE_SLEEP = 1 };
enum {
    REF_OK = 0,
    REF_QUEUE_ERROR = 3,
    REF_VERIFY_ERROR = 4,
    REF_STALLED = 5,
    REF_SYSTEM_ERROR = 6,
};

struct ref_params {
    int mode;
    uint32_t batch;
    uint64_t count;
    uint32_t capacity;
    uint32_t buffer_count;
    uint32_t buffer_size;
    uint32_t spin;
    uint64_t deadline_ns;
    size_t free_offset;
    size_t active_offset;
    /// The process registered for membarrier GLOBAL_EXPEDITED (the worker process does it).
    int registered;
    /// QueueConsumer.heavyBarrierThreshold: 0 never uses the asymmetric ordering (and is
    /// what a process that cannot run the heavy barrier passes).
    uint32_t heavy_threshold;
    /// RingParameters.pauseEvery and pauseNanoseconds: the producer pauses after every
    /// `pause_every` descriptors (0: never), a sleep from 100 us, else a busy wait of a
    /// random length up to `pause_ns` (xorshift seeded by `seed`), as the Swift worker does.
    uint64_t pause_every;
    uint64_t pause_ns;
    uint64_t seed;
    /// RingParameters.sleepTimeoutMilliseconds: the longest sleep on the doorbell.
    uint32_t sleep_timeout_ms;
    /// RingParameters.wakeAfter: a sleeping consumer asks to be woken once this many
    /// entries wait (or when the producer goes idle); 1 wakes at the first.
    uint32_t wake_after;
    /// RingParameters.idleFlush: answer a standing request before pausing or sleeping (0
    /// only in tests of the wake index alone; the flush when done always runs).
    int idle_flush;
};

struct ref_result {
    int status;
    uint64_t processed;
    uint64_t doorbells;
    uint64_t sleeps;
    /// Sleeps that ended by the wait's timeout (sleep_timeout_ms) rather than a doorbell.
    uint64_t timeouts;
    /// Heavy barriers (membarrier) run before sleeps.
    uint64_t heavy_barriers;
};

/// The client side: fills buffers, enqueues them on the active queue, takes them back
/// from the free queue.
void ref_run_producer(const struct ref_params *p, void *queues, size_t queues_size, void *data,
                      size_t data_size, int active_bell, int free_bell, struct ref_result *r);
/// The server side: dequeues from the active queue, verifies each buffer, returns it on
/// the free queue.
void ref_run_consumer(const struct ref_params *p, void *queues, size_t queues_size, void *data,
                      size_t data_size, int active_bell, int free_bell, struct ref_result *r);

#endif
