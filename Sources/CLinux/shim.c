#define _GNU_SOURCE
#include "CLinux.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
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
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <grp.h>
#include <stdlib.h>
#include <linux/audit.h>
#include <linux/bpf.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/membarrier.h>
#include <linux/seccomp.h>

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

int ob_memfd_create(const char *name, unsigned int flags) { return memfd_create(name, flags); }
int ob_fcntl_int(int fd, int cmd, int arg) { return fcntl(fd, cmd, arg); }
int ob_eventfd(unsigned int initval, int flags) { return eventfd(initval, flags); }
int ob_membarrier(int cmd, unsigned int flags) { return (int)syscall(SYS_membarrier, cmd, flags, 0); }
const int OB_MEMBARRIER_CMD_QUERY = MEMBARRIER_CMD_QUERY;
const int OB_MEMBARRIER_CMD_GLOBAL_EXPEDITED = MEMBARRIER_CMD_GLOBAL_EXPEDITED;
const int OB_MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED = MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED;

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

int ob_cpu_allowed(int *cpus, int max) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) != 0) return -1;
    int n = 0;
    for (int cpu = 0; cpu < CPU_SETSIZE && n < max; cpu++)
        if (CPU_ISSET(cpu, &set)) cpus[n++] = cpu;
    return n;
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
    /* Below `closefrom`, every number that is not a target is closed too: a descriptor
       the parent opened without O_CLOEXEC in a gap between targets (3 and 5 granted, 4
       open) would otherwise reach the child. Closing one that is not open is no error. */
    for (int fd = 3; fd < closefrom && rc == 0; fd++) {
        int granted = 0;
        for (size_t i = 0; i < count; i++) if (to[i] == fd) { granted = 1; break; }
        if (!granted) rc = posix_spawn_file_actions_addclose(&fa, fd);
    }
    if (rc == 0) rc = posix_spawn_file_actions_addclosefrom_np(&fa, closefrom);
    /* The child starts with no blocked signals and every signal at its default action,
       whatever the parent (a test runner, a shell) had set: a manager started from a
       process that blocks SIGTERM must still stop on SIGTERM. */
    posix_spawnattr_t attr;
    int arc = posix_spawnattr_init(&attr);
    if (rc == 0 && arc == 0) {
        sigset_t none, all;
        sigemptyset(&none);
        sigfillset(&all);
        rc = posix_spawnattr_setsigmask(&attr, &none);
        if (rc == 0) rc = posix_spawnattr_setsigdefault(&attr, &all);
        if (rc == 0) rc = posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    }
    if (rc == 0) rc = arc;
    if (rc == 0) rc = posix_spawn(pid, path, &fa, &attr, argv, envp);
    if (arc == 0) posix_spawnattr_destroy(&attr);
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


// ---------------------------------------------------------------------------------------
// Driver sandbox.

int ob_thread_count(void) {
    // /proc/self/status has a "Threads:\t<n>" line; read it without stdio.
    int fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    char buf[4096];
    size_t len = 0;
    for (;;) {
        ssize_t n = read(fd, buf + len, sizeof buf - 1 - len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) { int e = errno; close(fd); errno = e; return -1; }
        if (n == 0) break;
        len += (size_t)n;
        if (len == sizeof buf - 1) break;
    }
    close(fd);
    buf[len] = 0;
    const char *p = strstr(buf, "\nThreads:");
    if (p == NULL) { errno = ENODATA; return -1; }
    return (int)strtol(p + 9, NULL, 10);
}

const int OB_CLONE_NEWNS = CLONE_NEWNS, OB_CLONE_NEWNET = CLONE_NEWNET, OB_CLONE_NEWIPC = CLONE_NEWIPC;
const unsigned long OB_MS_RDONLY = MS_RDONLY, OB_MS_NOSUID = MS_NOSUID, OB_MS_NODEV = MS_NODEV,
                    OB_MS_NOEXEC = MS_NOEXEC, OB_MS_REMOUNT = MS_REMOUNT, OB_MS_BIND = MS_BIND,
                    OB_MS_REC = MS_REC, OB_MS_PRIVATE = MS_PRIVATE;
const int OB_MNT_DETACH = MNT_DETACH;

int ob_unshare(int flags) { return unshare(flags); }
int ob_mount(const char *source, const char *target, const char *fstype, unsigned long flags,
             const char *data) {
    return mount(source, target, fstype, flags, data);
}
int ob_umount2(const char *target, int flags) { return umount2(target, flags); }
int ob_pivot_root(const char *new_root, const char *put_old) {
    return (int)syscall(SYS_pivot_root, new_root, put_old);
}

const int OB_RLIMIT_NOFILE = RLIMIT_NOFILE, OB_RLIMIT_FSIZE = RLIMIT_FSIZE,
          OB_RLIMIT_CORE = RLIMIT_CORE, OB_RLIMIT_NPROC = RLIMIT_NPROC;
int ob_setrlimit(int resource, uint64_t value) {
    struct rlimit r = { .rlim_cur = (rlim_t)value, .rlim_max = (rlim_t)value };
    return setrlimit((__rlimit_resource_t)resource, &r);
}
int ob_getrlimit(int resource, uint64_t *soft, uint64_t *hard) {
    struct rlimit r;
    if (getrlimit((__rlimit_resource_t)resource, &r) != 0) return -1;
    *soft = r.rlim_cur; *hard = r.rlim_max;
    return 0;
}

int ob_drop_supplementary_groups(void) { return setgroups(0, NULL); }
int ob_supplementary_group_count(void) { return getgroups(0, NULL); }
int ob_setresgid(gid_t gid) { return setresgid(gid, gid, gid); }
int ob_setresuid(uid_t uid) { return setresuid(uid, uid, uid); }
int ob_getresuid(uid_t *r, uid_t *e, uid_t *s) { return getresuid(r, e, s); }
int ob_getresgid(gid_t *r, gid_t *e, gid_t *s) { return getresgid(r, e, s); }

int ob_has_any_capability(void) {
    struct __user_cap_header_struct hdr = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
    struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
    memset(data, 0, sizeof data);
    if (syscall(SYS_capget, &hdr, data) != 0) return -1;
    for (int i = 0; i < _LINUX_CAPABILITY_U32S_3; i++)
        if (data[i].effective | data[i].permitted | data[i].inheritable) return 1;
    // The ambient set is always a subset of permitted ∩ inheritable, so it is empty too.
    return 0;
}

int ob_set_no_new_privs(void) { return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); }
int ob_get_no_new_privs(void) { return prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0); }
int ob_set_dumpable(int dumpable) { return prctl(PR_SET_DUMPABLE, dumpable, 0, 0, 0); }

// THE SANDBOX ALLOW-LIST (x86-64). What a driver may do once sandboxed: compute, use the
// memory and descriptors it was given, wait for events, and exit. Everything else,
// including every way to name a file, make a socket, start a process or change a
// namespace, fails with EPERM. Syscalls with argument checks (kill, tkill, tgkill, fcntl,
// membarrier) are handled separately in ob_seccomp_install and must not be added here.
static const int ob_allowed[] = {
    // I/O on descriptors the driver already holds.
    SYS_read, SYS_write, SYS_readv, SYS_writev, SYS_pread64, SYS_pwrite64, SYS_close,
    SYS_lseek, SYS_fstat,
    SYS_newfstatat,  // glibc 2.33+ implements fstat() with it (AT_EMPTY_PATH); stdio's first write calls it
    // Memory.
    SYS_mmap, SYS_munmap, SYS_mprotect, SYS_madvise, SYS_mremap, SYS_brk,
    // Waiting: futexes, epoll, poll.
    SYS_futex, SYS_epoll_wait, SYS_epoll_pwait, SYS_epoll_pwait2, SYS_epoll_ctl, SYS_poll, SYS_ppoll,
    // Messages on sockets the driver was given (SCM_RIGHTS, doorbells, vhost-user).
    SYS_recvmsg, SYS_sendmsg, SYS_recvfrom, SYS_sendto,
    // Time, randomness.
    SYS_clock_gettime, SYS_clock_getres, SYS_clock_nanosleep, SYS_nanosleep, SYS_gettimeofday,
    SYS_getrandom,
    // Exit, signals delivered to this process (abort(), raise()).
    SYS_exit, SYS_exit_group, SYS_rt_sigreturn, SYS_rt_sigprocmask, SYS_rt_sigaction,
    SYS_sigaltstack, SYS_restart_syscall,
    // Who am I.
    SYS_getpid, SYS_gettid, SYS_getppid, SYS_getuid, SYS_geteuid, SYS_getgid, SYS_getegid,
    // Scheduling and glibc/runtime thread housekeeping.
    SYS_sched_yield, SYS_sched_getaffinity, SYS_set_robust_list, SYS_rseq,
};

const int *ob_sandbox_allowed_syscalls(size_t *count) {
    *count = sizeof ob_allowed / sizeof ob_allowed[0];
    return ob_allowed;
}

// fcntl commands a sandboxed driver may use. F_SETOWN/F_SETOWN_EX/F_SETSIG are left out on
// purpose: with O_ASYNC they would make the kernel send SIGIO to another process of the
// same uid (another driver), which is exactly what the kill restriction forbids. F_DUPFD
// is left out as dup is: the descriptor table does not grow.
static const uint32_t ob_fcntl_allowed[] = { F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_GET_SEALS };

// membarrier commands a sandboxed driver may use: the query, and the ones that reach only
// its own threads. MEMBARRIER_CMD_GLOBAL(_EXPEDITED) interrupt every CPU running a
// registered process (the queues' heavy barrier; drivers register before entering the
// sandbox, so clients may send them barriers, but they may not send any).
static const uint32_t ob_membarrier_allowed[] = {
    MEMBARRIER_CMD_QUERY, MEMBARRIER_CMD_PRIVATE_EXPEDITED, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
};

const size_t OB_SECCOMP_MAX_EXTRA = 512;
const size_t OB_SECCOMP_MAX_IOCTLS = 32;

// The VFIO ioctls a driver holding a device fd needs (linux/vfio.h): device, region and
// interrupt information, MSI-X routing to its eventfds, and reset. Container and group
// ioctls (VFIO_IOMMU_MAP_DMA above all) are not among them: DMA mappings are the
// manager's, so a driver cannot widen what its device may reach.
static const uint32_t ob_vfio_device_ioctls[] = {
    VFIO_DEVICE_GET_INFO, VFIO_DEVICE_GET_REGION_INFO, VFIO_DEVICE_GET_IRQ_INFO, VFIO_DEVICE_SET_IRQS, VFIO_DEVICE_RESET,
};

const uint32_t *ob_sandbox_vfio_device_ioctls(size_t *count) {
    *count = sizeof ob_vfio_device_ioctls / sizeof ob_vfio_device_ioctls[0];
    return ob_vfio_device_ioctls;
}

#define OB_RET_EPERM (SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA))
#define OB_ARG_LO(i) (offsetof(struct seccomp_data, args) + 8 * (i))
#define OB_ARG_HI(i) (offsetof(struct seccomp_data, args) + 8 * (i) + 4)

// Emits: if nr == `nr`, allow only when argument `arg` (64 bits, upper half zero) is one of
// `values`, else EPERM. The accumulator still holds nr when the block is skipped.
static size_t emit_arg_restricted(struct sock_filter *f, size_t n, int nr, int arg,
                                  const uint32_t *values, size_t count) {
    // Body: ld hi; jeq 0 ?: deny; ld lo; jeq v_i ? allow (count of them); ret deny; ret allow.
    size_t body = 3 + count + 2;
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)nr, 0, (uint8_t)body);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, OB_ARG_HI(arg));
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, (uint8_t)(count + 1));
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, OB_ARG_LO(arg));
    for (size_t i = 0; i < count; i++)
        f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, values[i], (uint8_t)(count - i), 0);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, OB_RET_EPERM);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    return n;
}

static int is_arg_restricted(int nr) {
    return nr == SYS_kill || nr == SYS_tkill || nr == SYS_tgkill || nr == SYS_fcntl || nr == SYS_membarrier
        || nr == SYS_ioctl;
}

int ob_seccomp_extra_is_valid(int nr) {
    return nr >= 0 && nr < __X32_SYSCALL_BIT && !is_arg_restricted(nr);
}

int ob_seccomp_install(const int *extra, size_t nextra, const uint32_t *ioctls, size_t nioctls, pid_t self) {
    if (nextra > OB_SECCOMP_MAX_EXTRA || nioctls > OB_SECCOMP_MAX_IOCTLS || self <= 0) { errno = EINVAL; return -1; }
    for (size_t i = 0; i < nextra; i++)
        if (!ob_seccomp_extra_is_valid(extra[i])) { errno = EINVAL; return -1; }
    size_t nbase = sizeof ob_allowed / sizeof ob_allowed[0];
    size_t nfcntl = sizeof ob_fcntl_allowed / sizeof ob_fcntl_allowed[0];
    size_t nmembarrier = sizeof ob_membarrier_allowed / sizeof ob_membarrier_allowed[0];
    size_t cap = 6 + 3 * (5 + 1 + 2) + (5 + nfcntl + 2) + (5 + nmembarrier + 2) + (5 + nioctls + 2) + 2 * (nbase + nextra) + 1;
    struct sock_filter *f = calloc(cap, sizeof *f);
    if (f == NULL) { errno = ENOMEM; return -1; }
    size_t n = 0;
    // Native x86-64 only: i386 (int 0x80) and x32 syscalls have other numbers and would
    // bypass the list, so they kill the process outright.
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, __X32_SYSCALL_BIT, 0, 1);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
    // Signals only to this very process: kill(self, ...), tkill(self, ...) (the main
    // thread's tid is the pid), tgkill(self, tid, ...) (the kernel checks tid is ours).
    uint32_t me = (uint32_t)self;
    n = emit_arg_restricted(f, n, SYS_kill, 0, &me, 1);
    n = emit_arg_restricted(f, n, SYS_tkill, 0, &me, 1);
    n = emit_arg_restricted(f, n, SYS_tgkill, 0, &me, 1);
    n = emit_arg_restricted(f, n, SYS_fcntl, 1, ob_fcntl_allowed, nfcntl);
    n = emit_arg_restricted(f, n, SYS_membarrier, 0, ob_membarrier_allowed, nmembarrier);
    // ioctl only with the listed request numbers (none: no ioctl at all).
    n = emit_arg_restricted(f, n, SYS_ioctl, 1, ioctls, nioctls);
    for (size_t i = 0; i < nbase + nextra; i++) {
        int nr = i < nbase ? ob_allowed[i] : extra[i - nbase];
        f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)nr, 0, 1);
        f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    }
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, OB_RET_EPERM);
    struct sock_fprog prog = { .len = (unsigned short)n, .filter = f };
    int rc = prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0);
    int e = errno;
    free(f);
    errno = e;
    return rc;
}

int ob_probe_execve(const char *path) {
    char *const argv[] = { (char *)path, NULL };
    char *const envp[] = { NULL };
    return execve(path, argv, envp);
}

int ob_probe_ptrace_attach(pid_t pid) {
    if (syscall(SYS_ptrace, PTRACE_ATTACH, pid, 0, 0) != 0) return -1;
    int st;
    waitpid(pid, &st, __WALL);
    syscall(SYS_ptrace, PTRACE_DETACH, pid, 0, 0);
    return 0;
}

int ob_probe_clone(void) {
    long r = syscall(SYS_clone, (unsigned long)SIGCHLD, 0, 0, 0, 0);
    if (r == 0) _exit(0);
    if (r < 0) return -1;
    waitpid((pid_t)r, NULL, 0);
    return 0;
}

int ob_probe_clone3(void) {
    // struct clone_args, version 0 (64 bytes); linux/sched.h clashes with sched.h.
    struct { uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls; } args;
    memset(&args, 0, sizeof args);
    args.exit_signal = SIGCHLD;
    long r = syscall(SYS_clone3, &args, sizeof args);
    if (r == 0) _exit(0);
    if (r < 0) return -1;
    waitpid((pid_t)r, NULL, 0);
    return 0;
}

int ob_probe_process_vm_readv_self(void) {
    uint64_t source = 42, target = 0;
    struct iovec local = { .iov_base = &target, .iov_len = sizeof target };
    struct iovec remote = { .iov_base = &source, .iov_len = sizeof source };
    return process_vm_readv(getpid(), &local, 1, &remote, 1, 0) < 0 ? -1 : 0;
}

int ob_probe_ioctl_vfio_map_dma(void) {
    // On any descriptor: what the filter decides is the request number. Outside the
    // sandbox, on stdin (not a VFIO container), this fails with ENOTTY.
    struct vfio_iommu_type1_dma_map map = { .argsz = sizeof map };
    return ioctl(0, VFIO_IOMMU_MAP_DMA, &map);
}

int ob_probe_ioctl_vfio_device_get_info(void) {
    // Allowed to a VFIO driver; on stdin (not a VFIO device) the kernel answers ENOTTY.
    struct vfio_device_info info = { .argsz = sizeof info };
    return ioctl(0, VFIO_DEVICE_GET_INFO, &info);
}

int ob_probe_ioctl_fionread(int fd) {
    int n = 0;
    return ioctl(fd, FIONREAD, &n);
}

int ob_probe_prctl_get_dumpable(void) { return prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) < 0 ? -1 : 0; }

int ob_probe_bpf(void) {
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.map_type = BPF_MAP_TYPE_ARRAY;
    attr.key_size = 4;
    attr.value_size = 4;
    attr.max_entries = 1;
    long fd = syscall(SYS_bpf, BPF_MAP_CREATE, &attr, sizeof attr);
    if (fd < 0) return -1;
    close((int)fd);
    return 0;
}

int ob_probe_setns(void) { return setns(-1, 0); }

long ob_probe_x32_getpid(void) { return syscall(__X32_SYSCALL_BIT | SYS_getpid); }
long ob_probe_i386_getpid(void) {
    long r;
    /* The 32-bit entry from 64-bit code: eax is the i386 number (getpid = 20); r8-r11
       may come back zeroed. */
    __asm__ volatile("int $0x80" : "=a"(r) : "a"(20L) : "r8", "r9", "r10", "r11", "memory");
    return r;
}

int ob_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC); }

static _Atomic unsigned long ob_counted_signals;

static void ob_counting_handler(int sig) {
    (void)sig;
    atomic_fetch_add_explicit(&ob_counted_signals, 1, memory_order_relaxed);
}

int ob_count_signal(int sig) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = ob_counting_handler;  // no SA_RESTART: blocking calls fail with EINTR
    sigemptyset(&sa.sa_mask);
    return sigaction(sig, &sa, NULL);
}

unsigned long ob_signals_counted(void) {
    return atomic_load_explicit(&ob_counted_signals, memory_order_relaxed);
}

/* TAP devices and interface ioctls. */
#include <linux/if.h>
#include <linux/if_arp.h>
#include <linux/if_tun.h>

const int OB_IFNAMSIZ = IFNAMSIZ;
const unsigned int OB_IFF_UP = IFF_UP;
const unsigned int OB_IFF_RUNNING = IFF_RUNNING;

/* An ifreq naming `name`; -1 with EINVAL when it does not fit (the kernel would cut it). */
static int ob_ifreq_named(struct ifreq *ifr, const char *name) {
    memset(ifr, 0, sizeof *ifr);
    size_t n = strlen(name);
    if (n >= IFNAMSIZ) { errno = EINVAL; return -1; }
    memcpy(ifr->ifr_name, name, n);
    return 0;
}

static void ob_ifreq_name_out(const struct ifreq *ifr, char *out) {
    memcpy(out, ifr->ifr_name, IFNAMSIZ);
    out[IFNAMSIZ - 1] = 0;
}

int ob_tap_attach(int fd, const char *name, char *out) {
    struct ifreq ifr;
    if (ob_ifreq_named(&ifr, name) < 0) return -1;
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) return -1;
    ob_ifreq_name_out(&ifr, out);
    return 0;
}

int ob_tap_name(int fd, char *out) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    if (ioctl(fd, TUNGETIFF, &ifr) < 0) return -1;
    ob_ifreq_name_out(&ifr, out);
    return 0;
}

int ob_tap_netns(int fd) { return ioctl(fd, TUNGETDEVNETNS); }

int ob_tap_get_hwaddr(int fd, uint8_t mac[6]) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    if (ioctl(fd, SIOCGIFHWADDR, &ifr) < 0) return -1;
    memcpy(mac, ifr.ifr_hwaddr.sa_data, 6);
    return 0;
}

int ob_tap_set_hwaddr(int fd, const uint8_t mac[6]) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
    memcpy(ifr.ifr_hwaddr.sa_data, mac, 6);
    return ioctl(fd, SIOCSIFHWADDR, &ifr);
}

int ob_if_control_socket(void) { return socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0); }

int ob_if_get_mtu(int sock, const char *name, int *mtu) {
    struct ifreq ifr;
    if (ob_ifreq_named(&ifr, name) < 0) return -1;
    if (ioctl(sock, SIOCGIFMTU, &ifr) < 0) return -1;
    *mtu = ifr.ifr_mtu;
    return 0;
}

int ob_if_set_mtu(int sock, const char *name, int mtu) {
    struct ifreq ifr;
    if (ob_ifreq_named(&ifr, name) < 0) return -1;
    ifr.ifr_mtu = mtu;
    return ioctl(sock, SIOCSIFMTU, &ifr);
}

int ob_if_get_flags(int sock, const char *name, unsigned int *flags) {
    struct ifreq ifr;
    if (ob_ifreq_named(&ifr, name) < 0) return -1;
    if (ioctl(sock, SIOCGIFFLAGS, &ifr) < 0) return -1;
    *flags = (unsigned short)ifr.ifr_flags;
    return 0;
}

int ob_if_set_flags(int sock, const char *name, unsigned int flags) {
    struct ifreq ifr;
    if (ob_ifreq_named(&ifr, name) < 0) return -1;
    if (flags > 0xffff) { errno = EINVAL; return -1; }
    ifr.ifr_flags = (short)flags;
    return ioctl(sock, SIOCSIFFLAGS, &ifr);
}

int ob_if_get_index(int sock, const char *name, int *index) {
    struct ifreq ifr;
    if (ob_ifreq_named(&ifr, name) < 0) return -1;
    if (ioctl(sock, SIOCGIFINDEX, &ifr) < 0) return -1;
    *index = ifr.ifr_ifindex;
    return 0;
}
