#define _GNU_SOURCE
/* The C reference vhost-user-blk frontend for `outboard bench blk` (see CRefBlk.h).

   One process, one thread, one virtqueue. Everything it shares with the backend lives in
   one memfd region, mapped at the same "guest physical" address as its own virtual address
   (identity mapping: descriptor addresses are plain pointers, and SET_VRING_ADDR, which
   takes the frontend's virtual addresses, gets the same values):

     desc[N]  | avail (flags, idx, ring[N], used_event) | pad to 4 KiB |
     used (flags, idx, ring[N], avail_event) | pad | headers[qd] | status[qd] | pad | data[qd]

   Request slot i owns descriptors 3i (header, 16 bytes, device-readable), 3i+1 (data,
   device-writable) and 3i+2 (status byte, device-writable); the chains are written once and
   only the header's sector changes. The used ring's id is therefore 3 * slot.

   Notification rules (the same ones the Swift driver uses):
   - kick: after publishing avail.idx (16-bit release store), a full fence, then
       without EVENT_IDX: kick unless used.flags has VIRTQ_USED_F_NO_NOTIFY;
       with EVENT_IDX:    kick if vring_need_event(avail_event, new_idx, old_idx).
   - interrupts: INTERRUPT mode leaves avail.flags 0 (a signal per completion); EVENT_IDX
     mode sets used_event = last_used_idx after every harvest, i.e. "signal me on the next
     completion"; POLL mode sets VIRTQ_AVAIL_F_NO_INTERRUPT and never sleeps; ADAPTIVE mode
     (event idx) busy-polls for poll_us after each completion with used_event 2^15 behind
     (no calls), then sleeps as EVENT_IDX.
   - before sleeping: (EVENT_IDX: store used_event,) full fence, re-read used.idx; sleep on
     the call eventfd only if it still shows nothing new. A wake-up never proves a
     completion: the loop always re-reads used.idx.

   Open loop (rate_iops > 0): request k is due at start + k / rate. The loop issues every
   due request while a slot is free, then waits for a completion or the next deadline
   (wait_paced), or, with nothing in flight, sleeps until the deadline (sleep_until). A
   request that falls due with every slot busy is late; the schedule does not slip for it,
   so the offered rate stays the one asked for. The Outboard client in `bench blk` runs the
   same schedule with the same waits. */

#include "CRefBlk.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "virtio 1.x structures are little-endian; this reference assumes a little-endian host"
#endif

/* ---- vhost-user --------------------------------------------------------------------- */

enum {
    VHOST_USER_GET_FEATURES = 1,
    VHOST_USER_SET_FEATURES = 2,
    VHOST_USER_SET_OWNER = 3,
    VHOST_USER_SET_MEM_TABLE = 5,
    VHOST_USER_SET_VRING_NUM = 8,
    VHOST_USER_SET_VRING_ADDR = 9,
    VHOST_USER_SET_VRING_BASE = 10,
    VHOST_USER_GET_VRING_BASE = 11,
    VHOST_USER_SET_VRING_KICK = 12,
    VHOST_USER_SET_VRING_CALL = 13,
    VHOST_USER_GET_PROTOCOL_FEATURES = 15,
    VHOST_USER_SET_PROTOCOL_FEATURES = 16,
    VHOST_USER_SET_VRING_ENABLE = 18,
    VHOST_USER_GET_CONFIG = 24,
};

#define VHOST_USER_VERSION 0x1u
#define VHOST_USER_FLAG_REPLY (1u << 2)
#define VHOST_USER_FLAG_NEED_REPLY (1u << 3)

#define F_RING_EVENT_IDX (1ull << 29)
#define F_PROTOCOL_FEATURES (1ull << 30)
#define F_VERSION_1 (1ull << 32)

#define PF_MQ (1ull << 0)
#define PF_REPLY_ACK (1ull << 3)
#define PF_CONFIG (1ull << 9)

struct vu_hdr { uint32_t request, flags, size; };
struct vu_state { uint32_t index, num; };
struct vu_addr {
    uint32_t index, flags;
    uint64_t desc, used, avail, log;
};
struct vu_region { uint64_t guest_phys_addr, memory_size, userspace_addr, mmap_offset; };
struct vu_mem { uint32_t nregions, padding; struct vu_region regions[1]; };
#define BLK_CONFIG_SIZE 60
struct vu_config { uint32_t offset, size, flags; uint8_t region[BLK_CONFIG_SIZE]; };

/* ---- virtio split ring, virtio-blk ---------------------------------------------------- */

struct vq_desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct vq_avail { uint16_t flags, idx; uint16_t ring[]; };   /* used_event at ring[N] */
struct vq_used_elem { uint32_t id, len; };
struct vq_used { uint16_t flags, idx; struct vq_used_elem ring[]; }; /* then avail_event */
struct blk_outhdr { uint32_t type, ioprio; uint64_t sector; };

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY 1
#define VIRTIO_BLK_T_IN 0

static inline bool vring_need_event(uint16_t event, uint16_t new_idx, uint16_t old) {
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

#define TIMEOUT_NS 5000000000ull
#define TIMEOUT_MS 5000

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* ---- the device connection ------------------------------------------------------------ */

struct dev {
    int sock, kick, call, memfd;
    uint8_t *mem;
    size_t mem_size;
    unsigned n;            /* queue size, power of two */
    int qd;
    uint32_t io_bytes;
    int mode;
    bool event_idx, reply_ack, rings_started;
    struct vq_desc *desc;
    struct vq_avail *avail;
    struct vq_used *used;
    uint16_t *used_event, *avail_event;
    struct blk_outhdr *hdr;
    uint8_t *status;
    uint8_t *data;
    uint64_t capacity;     /* sectors */
    uint16_t avail_idx, last_used;
    uint64_t kicks, calls; /* running totals */
    uint64_t poll_ns;      /* ADAPTIVE: busy-poll window after the last completion */
    uint64_t last_work;    /* ADAPTIVE: when the last completion was harvested */
    char *err;             /* 256 bytes */
};

static int fail(struct dev *d, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(struct dev *d, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(d->err, 256, fmt, ap);
    va_end(ap);
    return -1;
}

static const char *req_name(uint32_t r) {
    switch (r) {
    case VHOST_USER_GET_FEATURES: return "GET_FEATURES";
    case VHOST_USER_SET_FEATURES: return "SET_FEATURES";
    case VHOST_USER_SET_OWNER: return "SET_OWNER";
    case VHOST_USER_SET_MEM_TABLE: return "SET_MEM_TABLE";
    case VHOST_USER_SET_VRING_NUM: return "SET_VRING_NUM";
    case VHOST_USER_SET_VRING_ADDR: return "SET_VRING_ADDR";
    case VHOST_USER_SET_VRING_BASE: return "SET_VRING_BASE";
    case VHOST_USER_GET_VRING_BASE: return "GET_VRING_BASE";
    case VHOST_USER_SET_VRING_KICK: return "SET_VRING_KICK";
    case VHOST_USER_SET_VRING_CALL: return "SET_VRING_CALL";
    case VHOST_USER_GET_PROTOCOL_FEATURES: return "GET_PROTOCOL_FEATURES";
    case VHOST_USER_SET_PROTOCOL_FEATURES: return "SET_PROTOCOL_FEATURES";
    case VHOST_USER_SET_VRING_ENABLE: return "SET_VRING_ENABLE";
    case VHOST_USER_GET_CONFIG: return "GET_CONFIG";
    default: return "?";
    }
}

/* Reads exactly len bytes; the socket's SO_RCVTIMEO bounds every wait. */
static int recv_all(struct dev *d, void *buf, size_t len, uint32_t req) {
    size_t got = 0;
    while (got < len) {
        ssize_t r = recv(d->sock, (uint8_t *)buf + got, len - got, MSG_WAITALL);
        if (r > 0) { got += (size_t)r; continue; }
        if (r == 0) return fail(d, "%s: backend closed the connection", req_name(req));
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return fail(d, "%s: no reply within %d ms", req_name(req), TIMEOUT_MS);
        return fail(d, "%s: recv: %s", req_name(req), strerror(errno));
    }
    return 0;
}

static int recv_reply(struct dev *d, uint32_t req, void *payload, uint32_t min, uint32_t max) {
    struct vu_hdr h;
    if (recv_all(d, &h, sizeof h, req) < 0) return -1;
    if (h.request != req || !(h.flags & VHOST_USER_FLAG_REPLY))
        return fail(d, "%s: unexpected reply (request %u, flags 0x%x)", req_name(req), h.request, h.flags);
    if (h.size < min || h.size > max)
        return fail(d, "%s: reply of %u bytes (expected %u..%u)", req_name(req), h.size, min, max);
    return recv_all(d, payload, h.size, req);
}

/* Sends one message (with up to one fd). need_ack: ask for a REPLY_ACK when negotiated, and
   check it. Replies to GET_* requests are read by the caller. */
static int send_msg(struct dev *d, uint32_t req, const void *payload, uint32_t len, int fd, bool need_ack) {
    struct vu_hdr h = { req, VHOST_USER_VERSION, len };
    bool ack = need_ack && d->reply_ack;
    if (ack) h.flags |= VHOST_USER_FLAG_NEED_REPLY;
    struct iovec iov[2] = { { &h, sizeof h }, { (void *)payload, len } };
    union { struct cmsghdr align; char buf[CMSG_SPACE(sizeof(int))]; } ctl;
    struct msghdr m = { .msg_iov = iov, .msg_iovlen = len ? 2 : 1 };
    if (fd >= 0) {
        memset(&ctl, 0, sizeof ctl);
        m.msg_control = ctl.buf;
        m.msg_controllen = sizeof ctl.buf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    size_t total = sizeof h + len;
    ssize_t r;
    do r = sendmsg(d->sock, &m, MSG_NOSIGNAL); while (r < 0 && errno == EINTR);
    if (r < 0) return fail(d, "%s: sendmsg: %s", req_name(req), strerror(errno));
    if ((size_t)r != total) return fail(d, "%s: short send (%zd of %zu)", req_name(req), r, total);
    if (ack) {
        uint64_t v = 1;
        if (recv_reply(d, req, &v, 8, 8) < 0) return -1;
        if (v != 0) return fail(d, "%s: backend answered failure (%llu)", req_name(req), (unsigned long long)v);
    }
    return 0;
}

static int get_u64(struct dev *d, uint32_t req, uint64_t *out) {
    if (send_msg(d, req, NULL, 0, -1, false) < 0) return -1;
    return recv_reply(d, req, out, 8, 8);
}

static int set_u64(struct dev *d, uint32_t req, uint64_t v, int fd) {
    return send_msg(d, req, &v, sizeof v, fd, true);
}

static int set_state(struct dev *d, uint32_t req, uint32_t num) {
    struct vu_state s = { 0, num };
    return send_msg(d, req, &s, sizeof s, -1, true);
}

static size_t align_up(size_t v, size_t a) { return (v + a - 1) & ~(a - 1); }

static void dev_init(struct dev *d, char *err) {
    memset(d, 0, sizeof *d);
    d->sock = d->kick = d->call = d->memfd = -1;
    d->err = err;
}

static void dev_close(struct dev *d) {
    if (d->sock >= 0) close(d->sock);
    if (d->kick >= 0) close(d->kick);
    if (d->call >= 0) close(d->call);
    if (d->memfd >= 0) close(d->memfd);
    if (d->mem) munmap(d->mem, d->mem_size);
    d->sock = d->kick = d->call = d->memfd = -1;
    d->mem = NULL;
}

/* Connects, negotiates, maps the region and starts queue 0. */
static int dev_open(struct dev *d, const char *path, int qd, int queue_size, uint32_t io_bytes, int mode) {
    if (!path) return fail(d, "no socket path");
    if (qd < 1 || qd > 4096) return fail(d, "queue depth %d out of range 1...4096", qd);
    if (io_bytes == 0 || io_bytes % 512 != 0 || io_bytes > (1u << 20))
        return fail(d, "io_bytes %u: must be a multiple of 512, at most 1 MiB", io_bytes);
    if (mode < OB_REFBLK_INTERRUPT || mode > OB_REFBLK_ADAPTIVE) return fail(d, "unknown mode %d", mode);
    unsigned n = 1;
    while (n < 3u * (unsigned)qd) n <<= 1;
    if (queue_size > 0 && (unsigned)queue_size > n) {
        n = 1;
        while (n < (unsigned)queue_size) n <<= 1;
    } else if (queue_size <= 0 && n < 256) {
        n = 256;
    }
    if (n > 32768) return fail(d, "queue size %u too large", n);
    d->n = n;
    d->qd = qd;
    d->io_bytes = io_bytes;
    d->mode = mode;
    d->event_idx = mode == OB_REFBLK_EVENT_IDX || mode == OB_REFBLK_ADAPTIVE;

    /* Connect with bounded waits: SO_SNDTIMEO also bounds connect(2) on a Unix socket. */
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof sa.sun_path) return fail(d, "socket path too long: %s", path);
    strcpy(sa.sun_path, path);
    d->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (d->sock < 0) return fail(d, "socket: %s", strerror(errno));
    struct timeval tv = { .tv_sec = TIMEOUT_MS / 1000 };
    setsockopt(d->sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(d->sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(d->sock, (struct sockaddr *)&sa, sizeof sa) < 0)
        return fail(d, "connect %s: %s", path, strerror(errno));

    /* Features. */
    uint64_t features, pfeatures;
    if (get_u64(d, VHOST_USER_GET_FEATURES, &features) < 0) return -1;
    uint64_t want = F_VERSION_1 | F_PROTOCOL_FEATURES | (d->event_idx ? F_RING_EVENT_IDX : 0);
    if ((features & want) != want)
        return fail(d, "backend features 0x%llx lack 0x%llx", (unsigned long long)features,
                    (unsigned long long)(want & ~features));
    if (get_u64(d, VHOST_USER_GET_PROTOCOL_FEATURES, &pfeatures) < 0) return -1;
    if (!(pfeatures & PF_CONFIG))
        return fail(d, "backend protocol features 0x%llx lack CONFIG", (unsigned long long)pfeatures);
    uint64_t pwant = pfeatures & (PF_CONFIG | PF_REPLY_ACK | PF_MQ);
    if (set_u64(d, VHOST_USER_SET_PROTOCOL_FEATURES, pwant, -1) < 0) return -1;
    d->reply_ack = (pwant & PF_REPLY_ACK) != 0;
    if (send_msg(d, VHOST_USER_SET_OWNER, NULL, 0, -1, true) < 0) return -1;
    if (set_u64(d, VHOST_USER_SET_FEATURES, want, -1) < 0) return -1;

    /* Capacity. */
    struct vu_config cfg = { 0, BLK_CONFIG_SIZE, 0, { 0 } };
    if (send_msg(d, VHOST_USER_GET_CONFIG, &cfg, sizeof cfg, -1, false) < 0) return -1;
    memset(&cfg, 0, sizeof cfg);
    if (recv_reply(d, VHOST_USER_GET_CONFIG, &cfg, 12 + 8, sizeof cfg) < 0) return -1;
    memcpy(&d->capacity, cfg.region, 8);
    if (d->capacity * 512 < io_bytes)
        return fail(d, "capacity %llu sectors is smaller than one I/O", (unsigned long long)d->capacity);

    /* The region. */
    size_t off_avail = 16 * (size_t)n;
    size_t off_used = align_up(off_avail + 6 + 2 * (size_t)n, 4096);
    size_t off_hdr = align_up(off_used + 6 + 8 * (size_t)n, 64);
    size_t off_status = off_hdr + sizeof(struct blk_outhdr) * (size_t)qd;
    size_t off_data = align_up(off_status + (size_t)qd, 4096);
    d->mem_size = align_up(off_data + (size_t)io_bytes * (size_t)qd, 4096);
    d->memfd = memfd_create("outboard-refblk", MFD_CLOEXEC);
    if (d->memfd < 0) return fail(d, "memfd_create: %s", strerror(errno));
    if (ftruncate(d->memfd, (off_t)d->mem_size) < 0) return fail(d, "ftruncate: %s", strerror(errno));
    void *m = mmap(NULL, d->mem_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, d->memfd, 0);
    if (m == MAP_FAILED) return fail(d, "mmap: %s", strerror(errno));
    d->mem = m;
    d->desc = (struct vq_desc *)(d->mem);
    d->avail = (struct vq_avail *)(d->mem + off_avail);
    d->used = (struct vq_used *)(d->mem + off_used);
    d->used_event = &d->avail->ring[n];
    d->avail_event = (uint16_t *)&d->used->ring[n];
    d->hdr = (struct blk_outhdr *)(d->mem + off_hdr);
    d->status = d->mem + off_status;
    d->data = d->mem + off_data;
    for (int i = 0; i < qd; i++) {
        struct vq_desc *c = &d->desc[3 * i];
        c[0] = (struct vq_desc){ (uint64_t)(uintptr_t)&d->hdr[i], sizeof(struct blk_outhdr), VIRTQ_DESC_F_NEXT, (uint16_t)(3 * i + 1) };
        c[1] = (struct vq_desc){ (uint64_t)(uintptr_t)(d->data + (size_t)i * io_bytes), io_bytes,
                                 VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, (uint16_t)(3 * i + 2) };
        c[2] = (struct vq_desc){ (uint64_t)(uintptr_t)&d->status[i], 1, VIRTQ_DESC_F_WRITE, 0 };
    }
    d->avail->flags = mode == OB_REFBLK_POLL ? VIRTQ_AVAIL_F_NO_INTERRUPT : 0;

    struct vu_mem mem = { 1, 0, { { (uint64_t)(uintptr_t)d->mem, d->mem_size, (uint64_t)(uintptr_t)d->mem, 0 } } };
    if (send_msg(d, VHOST_USER_SET_MEM_TABLE, &mem, sizeof mem, d->memfd, true) < 0) return -1;

    /* Queue 0. */
    d->kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    d->call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (d->kick < 0 || d->call < 0) return fail(d, "eventfd: %s", strerror(errno));
    if (set_state(d, VHOST_USER_SET_VRING_NUM, n) < 0) return -1;
    if (set_state(d, VHOST_USER_SET_VRING_BASE, 0) < 0) return -1;
    struct vu_addr a = { 0, 0, (uint64_t)(uintptr_t)d->desc, (uint64_t)(uintptr_t)d->used,
                         (uint64_t)(uintptr_t)d->avail, 0 };
    if (send_msg(d, VHOST_USER_SET_VRING_ADDR, &a, sizeof a, -1, true) < 0) return -1;
    if (set_u64(d, VHOST_USER_SET_VRING_CALL, 0, d->call) < 0) return -1;
    if (set_u64(d, VHOST_USER_SET_VRING_KICK, 0, d->kick) < 0) return -1;
    if (set_state(d, VHOST_USER_SET_VRING_ENABLE, 1) < 0) return -1;
    d->rings_started = true;
    /* The backend signals the call fd once when it gets it: drain that. */
    uint64_t v;
    (void)!read(d->call, &v, sizeof v);
    return 0;
}

/* Stops the queue (GET_VRING_BASE) and disconnects. Only call it with nothing in flight. */
static int dev_stop(struct dev *d) {
    int rc = 0;
    if (d->rings_started && d->sock >= 0) {
        struct vu_state s = { 0, 0 };
        if (send_msg(d, VHOST_USER_GET_VRING_BASE, &s, sizeof s, -1, false) < 0 ||
            recv_reply(d, VHOST_USER_GET_VRING_BASE, &s, sizeof s, sizeof s) < 0)
            rc = -1;
        else if ((uint16_t)s.num != d->avail_idx)
            rc = fail(d, "GET_VRING_BASE: backend at %u, frontend published %u", s.num, d->avail_idx);
        d->rings_started = false;
    }
    dev_close(d);
    return rc;
}

/* Queues slot i (a read at `sector`) in the avail ring; not visible until publish(). */
static inline void queue_read(struct dev *d, int i, uint64_t sector) {
    d->hdr[i].type = VIRTIO_BLK_T_IN;
    d->hdr[i].ioprio = 0;
    d->hdr[i].sector = sector;
    d->status[i] = 0xff;
    d->avail->ring[d->avail_idx & (d->n - 1)] = (uint16_t)(3 * i);
    d->avail_idx++;
}

/* Makes everything queued since `old` visible and kicks if the device asks for it. */
static inline int publish(struct dev *d, uint16_t old) {
    if (d->avail_idx == old) return 0;
    __atomic_store_n(&d->avail->idx, d->avail_idx, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    bool kick;
    if (d->event_idx)
        kick = vring_need_event(__atomic_load_n(d->avail_event, __ATOMIC_ACQUIRE), d->avail_idx, old);
    else
        kick = !(__atomic_load_n(&d->used->flags, __ATOMIC_ACQUIRE) & VIRTQ_USED_F_NO_NOTIFY);
    if (kick) {
        uint64_t one = 1;
        ssize_t r;
        do r = write(d->kick, &one, sizeof one); while (r < 0 && errno == EINTR);
        if (r != sizeof one && !(r < 0 && errno == EAGAIN)) return fail(d, "kick: %s", strerror(errno));
        d->kicks++;
    }
    return 0;
}

/* Before sleeping: asks for a used buffer notification at the next completion (event
   idx: used_event = last_used; otherwise notifications are on), then re-checks used.idx
   after a full fence (pairs with the device's fence between storing used.idx and reading
   used_event). 1 if a completion is already there: do not sleep. */
static int ask_for_notification(struct dev *d) {
    if (d->event_idx) __atomic_store_n(d->used_event, d->last_used, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return __atomic_load_n(&d->used->idx, __ATOMIC_ACQUIRE) != d->last_used;
}

/* Sleeps on the call eventfd for at most `ms`, and consumes the notification. -1: error. */
static int sleep_on_call(struct dev *d, int ms) {
    struct pollfd pfd = { d->call, POLLIN, 0 };
    int r = poll(&pfd, 1, ms);
    if (r < 0 && errno != EINTR) return fail(d, "poll call fd: %s", strerror(errno));
    if (r > 0) {
        uint64_t v;
        if (read(d->call, &v, sizeof v) == sizeof v) d->calls++;
    }
    return 0;
}

/* Waits until used.idx moves past last_used. 1: something to harvest; 0: nothing for
   timeout_ns; -1: error. */
static int wait_used(struct dev *d, uint64_t timeout_ns) {
    uint64_t start = 0;
    unsigned spins = 0;
    for (;;) {
        if (__atomic_load_n(&d->used->idx, __ATOMIC_ACQUIRE) != d->last_used) return 1;
        if (d->mode == OB_REFBLK_ADAPTIVE && now_ns() - d->last_work < d->poll_ns) {
            /* Busy-polling: notifications stay off (harvest left used_event behind). */
            cpu_relax();
            continue;
        }
        if (d->mode == OB_REFBLK_POLL) {
            cpu_relax();
            if ((++spins & 1023) == 0) {
                uint64_t t = now_ns();
                if (start == 0) start = t;
                else if (t - start > timeout_ns) return 0;
            }
            continue;
        }
        if (ask_for_notification(d)) return 1;
        uint64_t t = now_ns();
        if (start == 0) start = t;
        else if (t - start > timeout_ns) return 0;
        if (sleep_on_call(d, (int)((timeout_ns - (t - start)) / 1000000) + 1) < 0) return -1;
    }
}

/* Open loop, requests in flight: waits until used.idx moves past last_used (1) or
   `until` (0); -1 on error. The same notification rules as wait_used; the sleep's timeout
   is rounded up to whole milliseconds, as the Outboard client's wait is, so that both
   sides wake alike. */
static int wait_paced(struct dev *d, uint64_t until) {
    for (;;) {
        if (__atomic_load_n(&d->used->idx, __ATOMIC_ACQUIRE) != d->last_used) return 1;
        uint64_t t = now_ns();
        if (t >= until) return 0;
        if (d->mode == OB_REFBLK_POLL || (d->mode == OB_REFBLK_ADAPTIVE && t - d->last_work < d->poll_ns)) {
            cpu_relax();
            continue;
        }
        if (ask_for_notification(d)) return 1;
        uint64_t wait_ms = (until - t + 999999) / 1000000;
        if (sleep_on_call(d, wait_ms > TIMEOUT_MS ? TIMEOUT_MS : (int)wait_ms) < 0) return -1;
    }
}

/* Open loop, nothing in flight: sleeps until `until` (CLOCK_MONOTONIC, absolute), or
   spins in POLL mode, which never sleeps. */
static void sleep_until(struct dev *d, uint64_t until) {
    if (d->mode == OB_REFBLK_POLL) {
        while (now_ns() < until) cpu_relax();
        return;
    }
    struct timespec ts = { (time_t)(until / 1000000000ull), (long)(until % 1000000000ull) };
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {}
}

/* Moves every new used entry's slot into slots[]; returns how many, -1 on a bad entry. */
static int harvest(struct dev *d, int *slots, uint8_t *inflight) {
    uint16_t u = __atomic_load_n(&d->used->idx, __ATOMIC_ACQUIRE);
    uint16_t count = (uint16_t)(u - d->last_used);
    if (count > (uint16_t)d->qd)
        return fail(d, "device reported %u used entries with at most %d in flight", count, d->qd);
    int k = 0;
    while (d->last_used != u) {
        struct vq_used_elem e = d->used->ring[d->last_used & (d->n - 1)];
        d->last_used++;
        uint32_t slot = e.id / 3;
        if (e.id % 3 != 0 || slot >= (uint32_t)d->qd || !inflight[slot])
            return fail(d, "device returned descriptor id %u, not a request in flight", e.id);
        inflight[slot] = 0;
        slots[k++] = (int)slot;
    }
    if (d->mode == OB_REFBLK_ADAPTIVE) {
        /* Notifications off while we busy-poll: used_event half the index space behind
           last_used. The device compares it with the used index of its last notification
           check, which can lag behind what we harvested, so last_used - 1 could still draw
           a call; 2^15 behind cannot. wait_used moves it to last_used before sleeping. */
        __atomic_store_n(d->used_event, (uint16_t)(d->last_used - 0x8000), __ATOMIC_RELAXED);
        if (k > 0) d->last_work = now_ns();
    } else if (d->event_idx) {
        __atomic_store_n(d->used_event, d->last_used, __ATOMIC_RELAXED);
    }
    return k;
}

/* ---- latency histogram: log-linear, 128 sub-buckets per power of two -------------------- */

#define HSUB_BITS 7
#define HSUB (1u << HSUB_BITS)
#define HBUCKETS ((64 - HSUB_BITS + 1) * HSUB)

static inline unsigned hbucket(uint64_t v) {
    if (v < HSUB) return (unsigned)v;
    unsigned e = 63u - (unsigned)__builtin_clzll(v);
    return (e - HSUB_BITS + 1) * HSUB + (unsigned)((v >> (e - HSUB_BITS)) & (HSUB - 1));
}

static uint64_t hvalue(unsigned b) { /* midpoint of bucket b */
    if (b < HSUB) return b;
    unsigned e = b / HSUB + HSUB_BITS - 1, sub = b % HSUB;
    uint64_t low = (uint64_t)(HSUB + sub) << (e - HSUB_BITS), width = 1ull << (e - HSUB_BITS);
    return low + width / 2;
}

static uint64_t hpercentile(const uint64_t *h, uint64_t count, double p, uint64_t max) {
    if (count == 0) return 0;
    uint64_t rank = (uint64_t)(p * (double)count);
    if ((double)rank < p * (double)count) rank++;
    if (rank < 1) rank = 1;
    uint64_t seen = 0;
    for (unsigned b = 0; b < HBUCKETS; b++) {
        seen += h[b];
        if (seen >= rank) { uint64_t v = hvalue(b); return v > max ? max : v; }
    }
    return max;
}

static uint64_t rusage_ns(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ((uint64_t)ru.ru_utime.tv_sec + (uint64_t)ru.ru_stime.tv_sec) * 1000000000ull +
           ((uint64_t)ru.ru_utime.tv_usec + (uint64_t)ru.ru_stime.tv_usec) * 1000ull;
}

/* ---- the benchmark -------------------------------------------------------------------- */

/* Open loop: when request k falls due (k = 0 at `start`). */
static inline uint64_t deadline_of(uint64_t start, double rate, uint64_t k) {
    return start + (uint64_t)((double)k * 1e9 / rate);
}

/* Open loop: how many requests have fallen due by `t`. */
static inline uint64_t due_by(uint64_t start, double rate, uint64_t t) {
    return t < start ? 0 : (uint64_t)((double)(t - start) * rate / 1e9) + 1;
}

static inline void mark_interval(const struct ob_refblk_params *p, int edge) {
    if (p->on_interval) p->on_interval(p->context, edge);
}

int ob_refblk_run(const struct ob_refblk_params *p, struct ob_refblk_result *r) {
    memset(r, 0, sizeof *r);
    struct dev dv, *d = &dv;
    dev_init(d, r->error);
    if (!p) return fail(d, "no parameters");
    if (!(p->seconds > 0) || p->warmup_seconds < 0)
        return fail(d, "seconds must be > 0 and warm-up >= 0");
    if (!(p->rate_iops >= 0) || p->rate_iops > 1e9) return fail(d, "rate_iops must be 0 (closed loop) or 0 < rate <= 1e9");
    uint32_t io_bytes = p->io_bytes ? p->io_bytes : 4096;
    int qd = p->queue_depth;
    bool paced = p->rate_iops > 0;
    double rate = p->rate_iops;
    uint64_t *hist = NULL;
    int *slots = NULL, *free_slots = NULL;
    uint8_t *inflight = NULL;
    uint64_t *submitted = NULL;
    int rc = -1;

    if (dev_open(d, p->socket_path, qd, p->queue_size, io_bytes, p->mode) < 0) goto out;
    d->poll_ns = (uint64_t)(p->poll_us ? p->poll_us : 50) * 1000ull;
    d->last_work = now_ns();
    r->capacity_sectors = d->capacity;
    hist = calloc(HBUCKETS, sizeof *hist);
    slots = calloc((size_t)qd, sizeof *slots);
    free_slots = calloc((size_t)qd, sizeof *free_slots);
    inflight = calloc((size_t)qd, 1);
    submitted = calloc((size_t)qd, sizeof *submitted);
    if (!hist || !slots || !free_slots || !inflight || !submitted) { fail(d, "out of memory"); goto out; }

    /* Offsets: 4 KiB-aligned, anywhere the whole I/O fits. */
    uint64_t bytes = d->capacity * 512;
    uint64_t nblocks = (bytes - io_bytes) / 4096 + 1;
    uint64_t rng = p->seed;

    enum { WARMUP, MEASURE, DRAIN } phase = p->warmup_seconds > 0 ? WARMUP : MEASURE;
    uint64_t t = now_ns();
    uint64_t start = t;
    uint64_t warm_end = t + (uint64_t)(p->warmup_seconds * 1e9);
    uint64_t t0 = t, t1 = 0, cpu0 = 0, cpu1 = 0, kicks0 = 0, calls0 = 0;
    uint64_t ios = 0, max_lat = 0, issued = 0, late = 0;
    uint64_t t_end = 0;
    if (phase == MEASURE) {
        t_end = t0 + (uint64_t)(p->seconds * 1e9);
        mark_interval(p, 0);
        cpu0 = rusage_ns();
    }

    /* Open loop: next is the index of the next request to issue; every request below
       blocked_through fell due while all slots were busy. last_progress: the last
       completion, or the last issue into an empty queue (the stall check's start). */
    uint64_t next = 0, blocked_through = 0, last_progress = t;
    int nfree = qd;
    for (int i = 0; i < qd; i++) free_slots[i] = qd - 1 - i;
    int outstanding = 0;

    for (;;) {
        if (phase != DRAIN) {
            /* Issue: closed loop, every free slot; open loop, every due request a slot is
               free for. */
            uint16_t old = d->avail_idx;
            while (nfree > 0 && (!paced || deadline_of(start, rate, next) <= t)) {
                int s = free_slots[--nfree];
                queue_read(d, s, splitmix64(&rng) % nblocks * 8);
                inflight[s] = 1;
                submitted[s] = t;
                if (phase == MEASURE) {
                    issued++;
                    if (next < blocked_through) late++;
                }
                next++;
                if (outstanding++ == 0) last_progress = t;
            }
            if (paced && nfree == 0 && deadline_of(start, rate, next) <= t) {
                uint64_t due = due_by(start, rate, t);
                if (due > blocked_through) blocked_through = due;
            }
            if (publish(d, old) < 0) goto out;
        } else if (outstanding == 0) {
            break;
        }

        /* Wait: for a completion, or (open loop) for the next deadline or phase change. */
        int w;
        if (paced && phase != DRAIN) {
            /* With every slot busy the next deadline cannot be served: wait for a
               completion (or the phase's end) instead of spinning past the deadline. */
            uint64_t until = nfree > 0 ? deadline_of(start, rate, next) : UINT64_MAX;
            uint64_t edge = phase == WARMUP ? warm_end : t_end;
            if (edge < until) until = edge;
            if (outstanding == 0) {
                sleep_until(d, until);
                w = 0;
            } else {
                w = wait_paced(d, until);
            }
            if (w < 0) goto out;
            if (w == 0 && outstanding > 0 && now_ns() - last_progress > TIMEOUT_NS) {
                fail(d, "no completion for %llu s with %d requests in flight",
                     (unsigned long long)(TIMEOUT_NS / 1000000000ull), outstanding);
                goto out;
            }
        } else {
            w = wait_used(d, TIMEOUT_NS);
            if (w < 0) goto out;
            if (w == 0) {
                fail(d, "no completion for %llu s with %d requests in flight",
                     (unsigned long long)(TIMEOUT_NS / 1000000000ull), outstanding);
                goto out;
            }
        }
        t = now_ns();
        int k = 0;
        if (w > 0) {
            k = harvest(d, slots, inflight);
            if (k < 0) goto out;
            last_progress = t;
        }
        outstanding -= k;
        for (int j = 0; j < k; j++) {
            int s = slots[j];
            free_slots[nfree++] = s;
            if (d->status[s] != 0) r->errors++;
            if (phase == MEASURE) {
                uint64_t lat = t - submitted[s];
                hist[hbucket(lat)]++;
                if (lat > max_lat) max_lat = lat;
            }
        }
        if (phase == MEASURE) ios += (uint64_t)k;
        if (phase == WARMUP && t >= warm_end) {
            phase = MEASURE;
            t0 = t;
            t_end = t0 + (uint64_t)(p->seconds * 1e9);
            mark_interval(p, 0);
            cpu0 = rusage_ns();
            kicks0 = d->kicks;
            calls0 = d->calls;
        } else if (phase == MEASURE && t >= t_end) {
            phase = DRAIN;
            t1 = t;
            cpu1 = rusage_ns();
            mark_interval(p, 1);
            r->kicks = d->kicks - kicks0;
            r->calls = d->calls - calls0;
            /* Due by the end and never issued: late as well. */
            if (paced) {
                uint64_t due = due_by(start, rate, t_end);
                if (due > next) late += due - next;
            }
        }
    }

    r->ios = ios;
    r->issued = issued;
    r->late = late;
    r->seconds = (double)(t1 - t0) / 1e9;
    r->cpu_ns = cpu1 - cpu0;
    r->max_ns = max_lat;
    r->p50_ns = hpercentile(hist, ios, 0.50, max_lat);
    r->p99_ns = hpercentile(hist, ios, 0.99, max_lat);
    rc = dev_stop(d);
out:
    dev_close(d);
    free(hist);
    free(slots);
    free(free_slots);
    free(inflight);
    free(submitted);
    return rc;
}

int ob_refblk_read_once(const char *socket_path, uint64_t sector, void *buf, uint32_t bytes,
                        uint64_t *capacity_sectors, char *error) {
    struct dev dv, *d = &dv;
    dev_init(d, error);
    error[0] = 0;
    int rc = -1;
    uint8_t inflight = 1;
    int slot;
    if (dev_open(d, socket_path, 1, 0, bytes, OB_REFBLK_INTERRUPT) < 0) goto out;
    if (capacity_sectors) *capacity_sectors = d->capacity;
    if (sector > d->capacity || d->capacity - sector < bytes / 512) {
        fail(d, "read of %u bytes at sector %llu is past the end (%llu sectors)", bytes,
             (unsigned long long)sector, (unsigned long long)d->capacity);
        goto out;
    }
    queue_read(d, 0, sector);
    if (publish(d, 0) < 0) goto out;
    int w = wait_used(d, TIMEOUT_NS);
    if (w <= 0) {
        if (w == 0) fail(d, "no completion for 5 s");
        goto out;
    }
    if (harvest(d, &slot, &inflight) != 1) {
        if (!error[0]) fail(d, "expected exactly one completion");
        goto out;
    }
    if (d->status[0] != 0) { fail(d, "device status %u", d->status[0]); goto out; }
    memcpy(buf, d->data, bytes);
    rc = dev_stop(d);
out:
    dev_close(d);
    return rc;
}
