#ifndef OUTBOARD_CREFBLK_H
#define OUTBOARD_CREFBLK_H

/* The C reference for `outboard bench blk`: a minimal single-process, single-threaded
   vhost-user-blk frontend (driver role). One process talks vhost-user to a backend such as
   qemu-storage-daemon over a Unix stream socket, owns one memfd region holding the split
   virtqueue, request headers, status bytes and data buffers, and keeps queue_depth random
   reads in flight (closed loop) or issues them at a fixed rate (open loop, at most
   queue_depth in flight). No indirect descriptors: three descriptors per request. */

#include <stdint.h>

enum ob_refblk_mode {
    /* No VIRTIO_F_RING_EVENT_IDX, avail flags 0: the device signals every completion. The
       frontend sleeps on the call eventfd (poll with a timeout, then read) only when the
       used ring holds nothing new. */
    OB_REFBLK_INTERRUPT = 0,
    /* VIRTIO_F_RING_EVENT_IDX: after every harvest the frontend sets used_event to its
       last_used_idx (signal me on the next completion), kicks only when
       vring_need_event(avail_event, new, old). Sleeps like INTERRUPT. */
    OB_REFBLK_EVENT_IDX = 1,
    /* No EVENT_IDX, avail flags VIRTQ_AVAIL_F_NO_INTERRUPT: never sleeps, spins on used.idx. */
    OB_REFBLK_POLL = 2,
    /* VIRTIO_F_RING_EVENT_IDX, as the Outboard driver's "adaptive" mode: after a completion
       the frontend busy-polls used.idx with notifications off (used_event left behind) for
       poll_us; when nothing arrived for that long it sets used_event = last_used and sleeps
       as EVENT_IDX does. */
    OB_REFBLK_ADAPTIVE = 3,
};

struct ob_refblk_params {
    const char *socket_path;
    int queue_depth;        /* requests kept in flight, >= 1 */
    double warmup_seconds;  /* run before the measured interval (counters reset after it) */
    double seconds;         /* measured interval */
    int mode;               /* enum ob_refblk_mode */
    uint32_t io_bytes;      /* 0 means 4096; a multiple of 512 */
    uint64_t seed;          /* offsets: splitmix64 from this seed */
    int queue_size;         /* 0 means 256; raised to the next power of two >= 3 * queue_depth */
    uint32_t poll_us;       /* ADAPTIVE: busy-poll window after the last completion; 0 means 50 */
    /* > 0: open loop at this many requests per second. Request k is due at
       start + k / rate_iops (a deadline schedule: a late request does not move the later
       ones); every due request is issued as soon as the loop runs and a slot is free. With
       requests in flight the loop waits for a completion or the next deadline (the same
       wait as the closed loop, its timeout rounded up to whole milliseconds, as the Outboard
       client's wait); with none in flight it sleeps until the next deadline (POLL: spins).
       0: closed loop, queue_depth requests always in flight. */
    double rate_iops;
    /* Called (when set) with edge 0 right before the measured interval's CPU reading and
       edge 1 right after its last one, so a caller can read other processes' CPU over the
       same interval outside the reference's own account. */
    void (*on_interval)(void *context, int edge);
    void *context;
};

struct ob_refblk_result {
    uint64_t ios;               /* completions harvested in the measured interval */
    double seconds;             /* length of the measured interval */
    uint64_t cpu_ns;            /* this process, user + sys, over the measured interval */
    uint64_t p50_ns, p99_ns, max_ns; /* submit-to-harvest latency, measured interval
                                    (percentiles from a log-linear histogram, < 0.4% error) */
    uint64_t kicks;             /* eventfd writes to the device, measured interval */
    uint64_t calls;             /* wake-ups on the call eventfd (reads), measured interval */
    uint64_t capacity_sectors;  /* from GET_CONFIG */
    uint64_t errors;            /* status byte != 0, whole run (warm-up included) */
    uint64_t issued;            /* requests submitted in the measured interval */
    uint64_t late;              /* open loop, measured interval: requests that fell due while
                                   queue_depth were in flight (issued when a slot freed), and
                                   requests due by the interval's end that were never issued */
    char error[256];            /* set when ob_refblk_run returns -1 */
};

/* 0 on success, -1 with r->error set. Every wait is bounded: no completion for 5 s, or no
   answer to a vhost-user message for 5 s, is a failure. Ends with all requests completed,
   GET_VRING_BASE and close, so the backend accepts the next frontend. */
int ob_refblk_run(const struct ob_refblk_params *p, struct ob_refblk_result *r);

/* For tests: one read of `bytes` (a multiple of 512, at most 1 MiB) at `sector` (512-byte
   units) into buf, through a fresh connection. 0 on success, -1 with error (256 bytes) set. */
int ob_refblk_read_once(const char *socket_path, uint64_t sector, void *buf, uint32_t bytes,
                        uint64_t *capacity_sectors, char *error);

#endif
