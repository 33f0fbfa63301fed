#define _GNU_SOURCE
#include "CLinux.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/vfio.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>

const unsigned int OB_MFD_CLOEXEC = MFD_CLOEXEC;
const unsigned int OB_MFD_ALLOW_SEALING = MFD_ALLOW_SEALING;
const int OB_F_ADD_SEALS = F_ADD_SEALS;
const int OB_F_GET_SEALS = F_GET_SEALS;
const int OB_F_SEAL_SEAL = F_SEAL_SEAL;
const int OB_F_SEAL_SHRINK = F_SEAL_SHRINK;
const int OB_F_SEAL_GROW = F_SEAL_GROW;
const int OB_F_SEAL_WRITE = F_SEAL_WRITE;
#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif
const int OB_F_SEAL_FUTURE_WRITE = F_SEAL_FUTURE_WRITE;
const int OB_EFD_CLOEXEC = EFD_CLOEXEC;
const int OB_EFD_NONBLOCK = EFD_NONBLOCK;
const int OB_SOCK_SEQPACKET = SOCK_SEQPACKET;
const int OB_SOCK_CLOEXEC = SOCK_CLOEXEC;
const int OB_MSG_CMSG_CLOEXEC = MSG_CMSG_CLOEXEC;
const int OB_MSG_TRUNC = MSG_TRUNC;
const int OB_MSG_CTRUNC = MSG_CTRUNC;
const int OB_MSG_NOSIGNAL = MSG_NOSIGNAL;
const int OB_MSG_DONTWAIT = MSG_DONTWAIT;

const unsigned long OB_VFIO_GET_API_VERSION = VFIO_GET_API_VERSION;
const unsigned long OB_VFIO_CHECK_EXTENSION = VFIO_CHECK_EXTENSION;
const unsigned long OB_VFIO_SET_IOMMU = VFIO_SET_IOMMU;
const unsigned long OB_VFIO_GROUP_GET_STATUS = VFIO_GROUP_GET_STATUS;
const unsigned long OB_VFIO_GROUP_SET_CONTAINER = VFIO_GROUP_SET_CONTAINER;
const unsigned long OB_VFIO_GROUP_GET_DEVICE_FD = VFIO_GROUP_GET_DEVICE_FD;
const unsigned long OB_VFIO_DEVICE_GET_INFO = VFIO_DEVICE_GET_INFO;
const unsigned long OB_VFIO_DEVICE_GET_REGION_INFO = VFIO_DEVICE_GET_REGION_INFO;
const unsigned long OB_VFIO_DEVICE_GET_IRQ_INFO = VFIO_DEVICE_GET_IRQ_INFO;
const unsigned long OB_VFIO_DEVICE_SET_IRQS = VFIO_DEVICE_SET_IRQS;
const unsigned long OB_VFIO_DEVICE_RESET = VFIO_DEVICE_RESET;
const unsigned long OB_VFIO_IOMMU_MAP_DMA = VFIO_IOMMU_MAP_DMA;
const unsigned long OB_VFIO_IOMMU_UNMAP_DMA = VFIO_IOMMU_UNMAP_DMA;

int ob_memfd_create(const char *name, unsigned int flags) { return memfd_create(name, flags); }
int ob_fcntl_int(int fd, int cmd, int arg) { return fcntl(fd, cmd, arg); }
int ob_eventfd(unsigned int initval, int flags) { return eventfd(initval, flags); }
int ob_pidfd_open(pid_t pid, unsigned int flags) { return (int)syscall(SYS_pidfd_open, pid, flags); }
int ob_pidfd_send_signal(int pidfd, int sig) {
    return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0);
}

int ob_pin_to_cpu(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return sched_setaffinity(0, sizeof set, &set);
}

int ob_cpu_count(void) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) != 0) return 1;
    return CPU_COUNT(&set);
}

// At most 253 descriptors fit one SCM_RIGHTS message (SCM_MAX_FD); Outboard never passes
// more than a handful, so the control buffer is sized for 64.
#define OB_MAX_FDS 64

ssize_t ob_send_with_fds(int sock, const void *buf, size_t len, const int *fds, size_t nfds, int flags) {
    if (nfds > OB_MAX_FDS) { errno = EINVAL; return -1; }
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    union { char buf[CMSG_SPACE(sizeof(int) * OB_MAX_FDS)]; struct cmsghdr align; } control;
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
    if (nfds > 0) {
        memset(&control, 0, sizeof control);
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    return sendmsg(sock, &msg, flags | MSG_NOSIGNAL);
}

ssize_t ob_recv_with_fds(int sock, void *buf, size_t len, int *fds, size_t maxfds, size_t *nfds,
                         int *msgflags, int flags) {
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    union { char buf[CMSG_SPACE(sizeof(int) * OB_MAX_FDS)]; struct cmsghdr align; } control;
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
                          .msg_control = control.buf, .msg_controllen = sizeof control.buf };
    *nfds = 0;
    ssize_t n = recvmsg(sock, &msg, flags | MSG_CMSG_CLOEXEC);
    if (n < 0) return n;
    *msgflags = msg.msg_flags;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int *data = (int *)CMSG_DATA(c);
        for (size_t i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, data + i, sizeof fd);
            if (*nfds < maxfds) fds[(*nfds)++] = fd;
            else { close(fd); *msgflags |= MSG_CTRUNC; }
        }
    }
    return n;
}

int ob_peer_credentials(int sock, pid_t *pid, uid_t *uid, gid_t *gid) {
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return -1;
    *pid = cred.pid; *uid = cred.uid; *gid = cred.gid;
    return 0;
}

static int fill_sockaddr(struct sockaddr_un *a, const char *path) {
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof a->sun_path) { errno = ENAMETOOLONG; return -1; }
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    memcpy(a->sun_path, path, n + 1);
    return 0;
}

int ob_bind_unix(int sock, const char *path) {
    struct sockaddr_un a;
    if (fill_sockaddr(&a, path) != 0) return -1;
    return bind(sock, (struct sockaddr *)&a, sizeof a);
}

int ob_connect_unix(int sock, const char *path) {
    struct sockaddr_un a;
    if (fill_sockaddr(&a, path) != 0) return -1;
    return connect(sock, (struct sockaddr *)&a, sizeof a);
}

int ob_spawn(pid_t *pid, const char *path, char *const argv[], char *const envp[],
             const int *from, const int *to, size_t count, int closefrom) {
    posix_spawn_file_actions_t fa;
    int rc = posix_spawn_file_actions_init(&fa);
    if (rc != 0) return rc;
    for (size_t i = 0; i < count && rc == 0; i++)
        rc = posix_spawn_file_actions_adddup2(&fa, from[i], to[i]);
    if (rc == 0) rc = posix_spawn_file_actions_addclosefrom_np(&fa, closefrom);
    if (rc == 0) rc = posix_spawn(pid, path, &fa, NULL, argv, envp);
    posix_spawn_file_actions_destroy(&fa);
    return rc;
}

static uint64_t clock_ns(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
uint64_t ob_process_cpu_ns(void) { return clock_ns(CLOCK_PROCESS_CPUTIME_ID); }
uint64_t ob_monotonic_ns(void) { return clock_ns(CLOCK_MONOTONIC); }


const uint32_t OB_EPOLLIN = EPOLLIN, OB_EPOLLOUT = EPOLLOUT, OB_EPOLLERR = EPOLLERR,
               OB_EPOLLHUP = EPOLLHUP, OB_EPOLLET = EPOLLET;
const int OB_EPOLL_CTL_ADD = EPOLL_CTL_ADD, OB_EPOLL_CTL_MOD = EPOLL_CTL_MOD, OB_EPOLL_CTL_DEL = EPOLL_CTL_DEL;
int ob_epoll_create(void) { return epoll_create1(EPOLL_CLOEXEC); }
int ob_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t token) {
    struct epoll_event ev = { .events = events, .data.u64 = token };
    return epoll_ctl(epfd, op, fd, &ev);
}
int ob_epoll_wait(int epfd, uint32_t *events, uint64_t *tokens, int max, int timeout_ms) {
    struct epoll_event evs[64];
    if (max > 64) max = 64;
    int n = epoll_wait(epfd, evs, max, timeout_ms);
    for (int i = 0; i < n; i++) { events[i] = evs[i].events; tokens[i] = evs[i].data.u64; }
    return n;
}

int ob_accept(int sock) { return accept4(sock, NULL, NULL, SOCK_CLOEXEC); }
