#define _GNU_SOURCE
#include "CRefRing.h"

#include <errno.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/membarrier.h>
#include <sys/syscall.h>

#define TAIL_OFF 0
#define PRODUCER_BARRIER_OFF 4
#define HEAD_OFF 64
#define SIGNAL_OFF 128
#define SIGNAL_ORDERING_OFF 132
#define WAKE_INDEX_OFF 136
#define ENTRIES_OFF 192

_Static_assert(sizeof(struct ref_desc) == 16, "descriptor is 16 bytes");
_Static_assert(offsetof(struct ref_desc, length) == 8, "length at 8");
_Static_assert(offsetof(struct ref_desc, cookie) == 12, "cookie at 12");

struct words {
    _Atomic uint32_t *tail, *producer_barrier, *head, *signal, *signal_ordering, *wake_index;
    struct ref_desc *entries;
};

static struct words words_at(void *base) {
    char *b = base;
    return (struct words){ (_Atomic uint32_t *)(b + TAIL_OFF), (_Atomic uint32_t *)(b + PRODUCER_BARRIER_OFF),
                           (_Atomic uint32_t *)(b + HEAD_OFF), (_Atomic uint32_t *)(b + SIGNAL_OFF),
                           (_Atomic uint32_t *)(b + SIGNAL_ORDERING_OFF), (_Atomic uint32_t *)(b + WAKE_INDEX_OFF),
                           (struct ref_desc *)(b + ENTRIES_OFF) };
}

// The heavy barrier of the asymmetric signal ordering (OutboardSystem's Membarrier).
static int membarrier_cmd(int cmd) { return (int)syscall(SYS_membarrier, cmd, 0, 0); }

struct producer {
    struct words w;
    uint32_t mask, capacity, tail, head_cache;
    int registered;  // our process is registered for the consumer's heavy barrier
    int error;
};

struct consumer {
    struct words w;
    uint32_t mask, capacity, head, tail_cache;
    uint32_t head_at_last_request, heavy_threshold, upgrade_after;
    int asymmetric;  // what we last published in signal_ordering
    int barrier_owed;  // a heavy barrier was asked for and not yet confirmed (confirm_sleep)
    uint64_t region_size;
    uint32_t min_len, max_len;
    int error;
};

static inline void refresh_head(struct producer *p) {
    // Acquire: pairs with the release store of head in dequeue (the consumer's copies of
    // the slots it freed are complete before we overwrite them).
    uint32_t h = atomic_load_explicit(p->w.head, memory_order_acquire);
    if ((uint32_t)(h - p->head_cache) > (uint32_t)(p->tail - p->head_cache)) { p->error = 1; return; }
    p->head_cache = h;
}

static inline size_t enqueue(struct producer *p, const struct ref_desc *batch, size_t count) {
    if (p->error) return 0;
    uint32_t space = p->capacity - (p->tail - p->head_cache);
    if (space < count) {
        refresh_head(p);
        if (p->error) return 0;
        space = p->capacity - (p->tail - p->head_cache);
    }
    size_t n = space < count ? space : count;
    uint32_t t = p->tail;
    for (size_t i = 0; i < n; i++) { p->w.entries[t & p->mask] = batch[i]; t++; }
    p->tail = t;
    atomic_store_explicit(p->w.tail, t, memory_order_release);
    return n;
}

// See QueueProducer.answerIfWakeIndexReached(): the acquire fence pairs with the release
// store of signal in request_signal; the tail must have reached the wake index (signed
// distance, half the index space).
__attribute__((noinline)) static int answer_if_wake_index_reached(struct producer *p) {
    atomic_thread_fence(memory_order_acquire);
    uint32_t wake = atomic_load_explicit(p->w.wake_index, memory_order_relaxed);
    if ((int32_t)(p->tail - wake) < 0) return 0;
    return atomic_exchange_explicit(p->w.signal, 0, memory_order_relaxed) != 0;
}

// See QueueProducer.consumerWantsSignal(): a full fence, or only program order when the
// consumer pays with a heavy barrier (asymmetric ordering).
static inline int consumer_wants_signal(struct producer *p) {
    atomic_signal_fence(memory_order_seq_cst);  // the tail store stays before both loads
    if (!p->registered || atomic_load_explicit(p->w.signal_ordering, memory_order_relaxed) != 1)
        atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(p->w.signal, memory_order_relaxed) == 0) return 0;
    return answer_if_wake_index_reached(p);
}

// See QueueProducer.consumerWantsSignalBeforeIdle(): before going idle, answer a standing
// request if the consumer has not taken everything we published.
static inline int consumer_wants_signal_before_idle(struct producer *p) {
    if (atomic_load_explicit(p->w.signal, memory_order_relaxed) == 0) return 0;
    if (atomic_load_explicit(p->w.head, memory_order_relaxed) == p->tail) return 0;
    return atomic_exchange_explicit(p->w.signal, 0, memory_order_relaxed) != 0;
}

static inline void refresh_tail(struct consumer *c) {
    // Acquire: pairs with the release store of tail in enqueue (the descriptors written
    // before that tail are visible).
    uint32_t t = atomic_load_explicit(c->w.tail, memory_order_acquire);
    uint32_t ahead = t - c->head;
    if (ahead > c->capacity || ahead < (uint32_t)(c->tail_cache - c->head)) { c->error = 1; return; }
    c->tail_cache = t;
}

static inline int admits(const struct consumer *c, const struct ref_desc *d) {
    return d->length >= c->min_len && d->length <= c->max_len && d->offset <= c->region_size &&
           (uint64_t)d->length <= c->region_size - d->offset;
}

// See QueueConsumer.useAsymmetricOrdering().
__attribute__((noinline)) static void use_asymmetric_ordering(struct consumer *c) {
    if (c->asymmetric || c->heavy_threshold == 0 ||
        atomic_load_explicit(c->w.producer_barrier, memory_order_relaxed) != 1) {
        c->head_at_last_request = c->head;  // look again after another threshold's worth
        return;
    }
    c->asymmetric = 1;
    c->upgrade_after = UINT32_MAX;
    atomic_store_explicit(c->w.signal_ordering, 1, memory_order_relaxed);
}

static inline size_t dequeue(struct consumer *c, struct ref_desc *out, size_t max) {
    if (c->error) return 0;
    uint32_t avail = c->tail_cache - c->head;
    if (avail == 0) {
        refresh_tail(c);
        avail = c->tail_cache - c->head;
        if (avail == 0) return 0;
    }
    size_t n = avail < max ? avail : max;
    uint32_t h = c->head;
    size_t i = 0;
    while (i < n) {
        // One copy out of shared memory, one relaxed atomic load per field: a plain struct
        // copy let the compiler load `length` for the check and again for the copy (a
        // double fetch a hostile producer could race). The Swift queue loads each field once.
        const struct ref_desc *slot = &c->w.entries[h & c->mask];
        struct ref_desc d = { .offset = __atomic_load_n(&slot->offset, __ATOMIC_RELAXED),
                              .length = __atomic_load_n(&slot->length, __ATOMIC_RELAXED),
                              .cookie = __atomic_load_n(&slot->cookie, __ATOMIC_RELAXED) };
        if (!admits(c, &d)) { c->error = 1; break; }
        out[i] = d;
        h++;
        i++;
    }
    if (i > 0) {
        c->head = h;
        atomic_store_explicit(c->w.head, h, memory_order_release);
        if ((uint32_t)(h - c->head_at_last_request) >= c->upgrade_after) use_asymmetric_ordering(c);
    }
    return i;
}

static inline int is_empty(struct consumer *c) {
    if (c->tail_cache != c->head) return 0;
    refresh_tail(c);
    return c->tail_cache == c->head;
}

// See QueueConsumer.requestSignal() and chooseOrderingBeforeSleep(): returns 1 when the
// caller must run the heavy barrier before confirm_sleep, 0 when the fence has been run here.
__attribute__((noinline)) static int choose_ordering_before_sleep(struct consumer *c) {
    int rare = c->heavy_threshold != 0 && (uint32_t)(c->head - c->head_at_last_request) >= c->heavy_threshold;
    c->head_at_last_request = c->head;
    int wanted = rare && atomic_load_explicit(c->w.producer_barrier, memory_order_relaxed) == 1;
    int heavy = wanted || c->asymmetric || c->barrier_owed;
    c->barrier_owed = heavy;
    if (wanted != c->asymmetric) {
        c->asymmetric = wanted;
        atomic_store_explicit(c->w.signal_ordering, wanted ? 1 : 0, memory_order_relaxed);
    }
    c->upgrade_after = !c->asymmetric && c->heavy_threshold != 0 ? c->heavy_threshold : UINT32_MAX;
    if (heavy) return 1;
    atomic_thread_fence(memory_order_seq_cst);
    return 0;
}

// See QueueConsumer.requestSignal(wakeAfter:): the wake index, then the request (release).
static inline int request_signal(struct consumer *c, uint32_t wake_after) {
    if (c->error) return 0;
    if (wake_after < 1) wake_after = 1;
    if (wake_after > INT32_MAX) wake_after = INT32_MAX;
    atomic_store_explicit(c->w.wake_index, c->head + wake_after, memory_order_relaxed);
    atomic_store_explicit(c->w.signal, 1, memory_order_release);
    if (c->heavy_threshold == 0 && !c->asymmetric && !c->barrier_owed) {
        atomic_thread_fence(memory_order_seq_cst);
        return 0;
    }
    return choose_ordering_before_sleep(c);
}

static inline int confirm_sleep(struct consumer *c) {
    c->barrier_owed = 0;
    if (!c->error && is_empty(c) && !c->error) return 1;
    atomic_store_explicit(c->w.signal, 0, memory_order_relaxed);
    return 0;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

// See SwiftRingLoop.pause(_:).
static void pause_for(const struct ref_params *p, uint64_t *rng) {
    if (p->pause_ns >= 100000) {
        uint64_t us = p->pause_ns / 1000;
        usleep((useconds_t)(us < 1000000 ? us : 1000000));
        return;
    }
    *rng ^= *rng << 13; *rng ^= *rng >> 7; *rng ^= *rng << 17;
    uint64_t end = now_ns() + *rng % (p->pause_ns + 1);
    while (now_ns() < end) __builtin_ia32_pause();
}

static void ring(int fd, struct ref_result *r) {
    uint64_t one = 1;
    while (write(fd, &one, 8) < 0 && errno == EINTR) {}
    r->doorbells++;
}

// Waits for work on `c`: returns 0 to retry, or a status to stop with. `other` is the
// queue this side produces on: before sleeping, it goes idle there (the idle flush).
static int wait_for_work(const struct ref_params *p, struct consumer *c, int bell, uint64_t *idle,
                         struct producer *other, int other_bell, struct ref_result *r) {
    if (c->error) return REF_QUEUE_ERROR;
    if (p->mode == REF_MODE_BUSY) {
        __builtin_ia32_pause();
        if ((++*idle & 0xffff) == 0 && now_ns() > p->deadline_ns) return REF_STALLED;
        return 0;
    }
    for (uint32_t i = 0; i < p->spin; i++) {
        if (!is_empty(c)) return 0;
        __builtin_ia32_pause();
    }
    if (request_signal(c, p->wake_after)) {
        if (membarrier_cmd(MEMBARRIER_CMD_GLOBAL_EXPEDITED) != 0) {
            atomic_store_explicit(c->w.signal, 0, memory_order_relaxed);
            return REF_SYSTEM_ERROR;
        }
        r->heavy_barriers++;
    }
    if (confirm_sleep(c)) {
        // Going idle on the queue we produce on, right before blocking.
        if (p->idle_flush && consumer_wants_signal_before_idle(other)) ring(other_bell, r);
        r->sleeps++;
        struct pollfd pfd = { .fd = bell, .events = POLLIN };
        int n = poll(&pfd, 1, (int)p->sleep_timeout_ms);
        if (n > 0) { uint64_t v; (void)!read(bell, &v, 8); }
        else if (n == 0) r->timeouts++;
        atomic_store_explicit(c->w.signal, 0, memory_order_relaxed);
        if (now_ns() > p->deadline_ns) return REF_STALLED;
    }
    return c->error ? REF_QUEUE_ERROR : 0;
}

static void init_endpoints(const struct ref_params *p, void *queues, size_t data_size,
                           size_t produce_off, size_t consume_off, uint32_t min_len,
                           struct producer *prod, struct consumer *cons) {
    char *q = queues;
    memset(prod, 0, sizeof *prod);
    memset(cons, 0, sizeof *cons);
    prod->w = words_at(q + produce_off);
    prod->capacity = p->capacity;
    prod->mask = p->capacity - 1;
    prod->registered = p->registered;
    atomic_store_explicit(prod->w.producer_barrier, p->registered ? 1 : 0, memory_order_relaxed);
    cons->w = words_at(q + consume_off);
    cons->capacity = p->capacity;
    cons->mask = p->capacity - 1;
    cons->heavy_threshold = p->heavy_threshold;
    atomic_store_explicit(cons->w.signal_ordering, 0, memory_order_relaxed);
    cons->upgrade_after = p->heavy_threshold != 0 ? p->heavy_threshold : UINT32_MAX;
    cons->region_size = data_size;
    cons->min_len = min_len;
    cons->max_len = p->buffer_size;
}

void ref_run_producer(const struct ref_params *p, void *queues, size_t queues_size, void *data,
                      size_t data_size, int active_bell, int free_bell, struct ref_result *r) {
    (void)queues_size;
    struct producer active;
    struct consumer freeq;
    // Free buffers get buffer_size bytes written into them: refuse shorter ones.
    init_endpoints(p, queues, data_size, p->active_offset, p->free_offset, p->buffer_size, &active, &freeq);
    memset(r, 0, sizeof *r);
    struct ref_desc *stash = malloc(sizeof *stash * p->buffer_count);
    struct ref_desc *out = malloc(sizeof *out * p->batch);
    if (!stash || !out) { r->status = REF_SYSTEM_ERROR; free(stash); free(out); return; }
    size_t stash_count = p->buffer_count;
    for (size_t i = 0; i < stash_count; i++)
        stash[i] = (struct ref_desc){ .offset = (uint64_t)i * p->buffer_size, .length = p->buffer_size };
    uint64_t seq = 0, idle = 0;
    char *d = data;
    // Runs to `stop`: the count, or the next pause (pause_every), as the Swift worker does.
    uint64_t rng = p->seed | 1;
    uint64_t stop = p->pause_every == 0 || p->pause_every > p->count ? p->count : p->pause_every;
    for (;;) {
    while (seq < stop) {
        if (stash_count == 0) {
            size_t want = p->batch < p->buffer_count ? p->batch : p->buffer_count;
            size_t n = dequeue(&freeq, stash, want);
            if (n == 0) {
                int st = wait_for_work(p, &freeq, free_bell, &idle, &active, active_bell, r);
                if (st) { r->status = st; goto done; }
                continue;
            }
            stash_count = n;
        }
        uint64_t left = stop - seq;
        size_t k = p->batch;
        if (k > stash_count) k = stash_count;
        if (k > left) k = (size_t)left;
        /* The top k buffers of the stash, bottom up (the Swift worker takes the same ones). */
        size_t first = stash_count - k;
        for (size_t j = 0; j < k; j++) {
            struct ref_desc b = stash[first + j];
            uint64_t s = seq + j;
            memcpy(d + b.offset, &s, 8);
            b.cookie = (uint32_t)s;
            b.length = p->buffer_size;
            out[j] = b;
        }
        stash_count = first;
        if (enqueue(&active, out, k) != k) { r->status = REF_QUEUE_ERROR; goto done; }
        seq += k;
        if (p->mode == REF_MODE_SLEEP && consumer_wants_signal(&active)) ring(active_bell, r);
    }
    if (seq >= p->count) break;
    // Idle for the length of the pause: see QueueProducer.consumerWantsSignalBeforeIdle().
    if (p->mode == REF_MODE_SLEEP && p->idle_flush && consumer_wants_signal_before_idle(&active)) ring(active_bell, r);
    pause_for(p, &rng);
    uint64_t next = seq + p->pause_every;
    stop = next < seq || next > p->count ? p->count : next;
    }
    r->status = REF_OK;
done:
    // Done producing: the consumer gets what is left without waiting for its wake index.
    if (p->mode == REF_MODE_SLEEP && consumer_wants_signal_before_idle(&active)) ring(active_bell, r);
    r->processed = seq;
    free(stash);
    free(out);
}

void ref_run_consumer(const struct ref_params *p, void *queues, size_t queues_size, void *data,
                      size_t data_size, int active_bell, int free_bell, struct ref_result *r) {
    (void)queues_size;
    struct producer freeq;
    struct consumer active;
    init_endpoints(p, queues, data_size, p->free_offset, p->active_offset, 0, &freeq, &active);
    memset(r, 0, sizeof *r);
    struct ref_desc *buf = malloc(sizeof *buf * p->batch);
    if (!buf) { r->status = REF_SYSTEM_ERROR; return; }
    uint64_t expected = 0, idle = 0;
    const char *d = data;
    while (expected < p->count) {
        size_t n = dequeue(&active, buf, p->batch);
        if (n == 0) {
            int st = wait_for_work(p, &active, active_bell, &idle, &freeq, free_bell, r);
            if (st) { r->status = st; goto done; }
            continue;
        }
        for (size_t j = 0; j < n; j++) {
            uint64_t v;
            if (buf[j].length != p->buffer_size || buf[j].cookie != (uint32_t)expected) { r->status = REF_VERIFY_ERROR; goto done; }
            memcpy(&v, d + buf[j].offset, 8);
            if (v != expected) { r->status = REF_VERIFY_ERROR; goto done; }
            expected++;
        }
        if (enqueue(&freeq, buf, n) != n) { r->status = REF_QUEUE_ERROR; goto done; }
        if (p->mode == REF_MODE_SLEEP && consumer_wants_signal(&freeq)) ring(free_bell, r);
    }
    r->status = REF_OK;
done:
    if (p->mode == REF_MODE_SLEEP && consumer_wants_signal_before_idle(&freeq)) ring(free_bell, r);
    r->processed = expected;
    free(buf);
}
