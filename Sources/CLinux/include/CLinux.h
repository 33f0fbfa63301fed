// CLinux: the Linux facts Swift's Glibc module does not import.
//
// Functions are implemented in shim.c, which is compiled with _GNU_SOURCE; this header
// only uses plain C types so that it does not depend on how the Glibc module was built.
// Constants are exported as `static const` values because Swift does not import
// function-like macros such as _IOW or CMSG_SPACE.
#ifndef OUTBOARD_CLINUX_H
#define OUTBOARD_CLINUX_H

#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>

// memfd_create(2) and file seals (fcntl(2), F_ADD_SEALS).
int ob_memfd_create(const char *name, unsigned int flags);
extern const unsigned int OB_MFD_CLOEXEC;
extern const unsigned int OB_MFD_ALLOW_SEALING;
extern const int OB_F_ADD_SEALS;
extern const int OB_F_GET_SEALS;
extern const int OB_F_SEAL_SEAL;
extern const int OB_F_SEAL_SHRINK;
extern const int OB_F_SEAL_GROW;
extern const int OB_F_SEAL_WRITE;
extern const int OB_F_SEAL_FUTURE_WRITE;
int ob_fcntl_int(int fd, int cmd, int arg);

// eventfd(2).
int ob_eventfd(unsigned int initval, int flags);
extern const int OB_EFD_CLOEXEC;
extern const int OB_EFD_NONBLOCK;

// pidfd_open(2) and pidfd_send_signal(2): raw syscalls, glibc 2.36 has no wrappers in
// every header configuration.
int ob_pidfd_open(pid_t pid, unsigned int flags);
int ob_pidfd_send_signal(int pidfd, int sig);

// membarrier(2): a raw syscall (glibc has no wrapper). Commands from <linux/membarrier.h>.
int ob_membarrier(int cmd, unsigned int flags);
extern const int OB_MEMBARRIER_CMD_QUERY;
extern const int OB_MEMBARRIER_CMD_GLOBAL_EXPEDITED;
extern const int OB_MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED;

// sched_setaffinity(2) with a single CPU (the CPU_* macros are not importable).
int ob_pin_to_cpu(int cpu);
/// The CPUs the calling thread may run on (sched_getaffinity), ascending, at most `max`;
/// -1 on error.
int ob_cpu_allowed(int *cpus, int max);

// Unix sockets.
extern const int OB_SOCK_SEQPACKET;
extern const int OB_SOCK_CLOEXEC;
extern const int OB_MSG_CMSG_CLOEXEC;
extern const int OB_MSG_TRUNC;
extern const int OB_MSG_CTRUNC;
extern const int OB_MSG_NOSIGNAL;
extern const int OB_MSG_DONTWAIT;

/// sendmsg(2) of one datagram carrying `nfds` descriptors in one SCM_RIGHTS message.
ssize_t ob_send_with_fds(int sock, const void *buf, size_t len, const int *fds, size_t nfds, int flags);
/// recvmsg(2) of one datagram; received descriptors are stored in `fds` (at most `maxfds`)
/// and their count in `*nfds`; `*msgflags` receives msg_flags (MSG_TRUNC, MSG_CTRUNC).
/// Descriptors of any SCM_RIGHTS payload beyond `maxfds` are closed here, so none leaks.
ssize_t ob_recv_with_fds(int sock, void *buf, size_t len, int *fds, size_t maxfds, size_t *nfds,
                         int *msgflags, int flags);
/// getsockopt(SO_PEERCRED).
int ob_peer_credentials(int sock, pid_t *pid, uid_t *uid, gid_t *gid);
/// bind(2)/connect(2) with a sockaddr_un built here; path must fit sun_path (108 bytes).
int ob_bind_unix(int sock, const char *path);
int ob_connect_unix(int sock, const char *path);
/// accept4(2) with SOCK_CLOEXEC.
int ob_accept(int sock);

// posix_spawn helpers.
/// Spawns `path` with `argv`/`envp`. Before exec, in the child: each `from[i]` is dup2'ed
/// to `to[i]` and every other descriptor >= `closefrom` is closed (glibc 2.34
/// posix_spawn_file_actions_addclosefrom_np). Returns 0 or an errno value.
int ob_spawn(pid_t *pid, const char *path, char *const argv[], char *const envp[],
             const int *from, const int *to, size_t count, int closefrom);

// Process CPU time, for CPU-per-operation figures.
uint64_t ob_process_cpu_ns(void);
uint64_t ob_monotonic_ns(void);

// epoll(7): sys/epoll.h is not part of Swift's Glibc module.
extern const uint32_t OB_EPOLLIN, OB_EPOLLOUT, OB_EPOLLERR, OB_EPOLLHUP, OB_EPOLLET;
extern const int OB_EPOLL_CTL_ADD, OB_EPOLL_CTL_MOD, OB_EPOLL_CTL_DEL;
int ob_epoll_create(void);
int ob_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t token);
/// epoll_wait(2) into parallel arrays of events and tokens.
int ob_epoll_wait(int epfd, uint32_t *events, uint64_t *tokens, int max, int timeout_ms);


// Volatile MMIO accessors (used by VFIO drivers). On x86-64 an aligned load or store of
// 1, 2, 4 or 8 bytes through a volatile pointer is a single access, not split or merged,
// and the mapping is uncached (UC) for BARs, so no fence is needed for ordering among
// MMIO accesses; ordering against normal (write-back) memory is the caller's business.
static inline uint8_t ob_mmio_read8(const volatile void *a) { return *(const volatile uint8_t *)a; }
static inline uint16_t ob_mmio_read16(const volatile void *a) { return *(const volatile uint16_t *)a; }
static inline uint32_t ob_mmio_read32(const volatile void *a) { return *(const volatile uint32_t *)a; }
static inline uint64_t ob_mmio_read64(const volatile void *a) { return *(const volatile uint64_t *)a; }
static inline void ob_mmio_write8(volatile void *a, uint8_t v) { *(volatile uint8_t *)a = v; }
static inline void ob_mmio_write16(volatile void *a, uint16_t v) { *(volatile uint16_t *)a = v; }
static inline void ob_mmio_write32(volatile void *a, uint32_t v) { *(volatile uint32_t *)a = v; }
static inline void ob_mmio_write64(volatile void *a, uint64_t v) { *(volatile uint64_t *)a = v; }

/// Spin-wait hint (x86 PAUSE): tells the core this is a busy-wait loop, saving power and
/// letting a sibling hyperthread run. Used by both the Swift and the C queue workers.
static inline void ob_cpu_relax(void) { __builtin_ia32_pause(); }


// Driver sandbox (OutboardSystem/Sandbox.swift): namespaces, a private read-only root,
// rlimits, identity, no_new_privs, and a seccomp BPF filter written here (no libseccomp).
// Every int-returning call returns 0 (or a count) on success, -1 with errno on failure.

/// Number of threads of the calling process (from /proc/self/stat), or -1 with errno.
int ob_thread_count(void);

// unshare(2) and mount(2) family.
extern const int OB_CLONE_NEWNS, OB_CLONE_NEWNET, OB_CLONE_NEWIPC;
extern const unsigned long OB_MS_RDONLY, OB_MS_NOSUID, OB_MS_NODEV, OB_MS_NOEXEC, OB_MS_REMOUNT,
                           OB_MS_BIND, OB_MS_REC, OB_MS_PRIVATE;
extern const int OB_MNT_DETACH;
int ob_unshare(int flags);
int ob_mount(const char *source, const char *target, const char *fstype, unsigned long flags,
             const char *data);
int ob_umount2(const char *target, int flags);
/// pivot_root(2) (no glibc wrapper).
int ob_pivot_root(const char *new_root, const char *put_old);

// Resource limits: setrlimit(2) with soft = hard = value (RLIM_INFINITY for UINT64_MAX).
extern const int OB_RLIMIT_NOFILE, OB_RLIMIT_FSIZE, OB_RLIMIT_CORE, OB_RLIMIT_NPROC;
int ob_setrlimit(int resource, uint64_t value);
/// getrlimit(2): both values, for verification.
int ob_getrlimit(int resource, uint64_t *soft, uint64_t *hard);

// Identity.
/// setgroups(0, NULL): no supplementary groups.
int ob_drop_supplementary_groups(void);
/// getgroups(0, NULL): the number of supplementary groups.
int ob_supplementary_group_count(void);
int ob_setresgid(gid_t gid);
int ob_setresuid(uid_t uid);
int ob_getresuid(uid_t *r, uid_t *e, uid_t *s);
int ob_getresgid(gid_t *r, gid_t *e, gid_t *s);
/// capget(2): 1 if any capability is in the effective, permitted or inheritable set of the
/// calling thread, or in its ambient set; 0 if all are empty; -1 with errno.
int ob_has_any_capability(void);

// prctl(2).
int ob_set_no_new_privs(void);
int ob_get_no_new_privs(void);
int ob_set_dumpable(int dumpable);

/// The sandbox's base seccomp allow-list (syscall numbers; x86-64). `*count` receives the
/// number of entries. kill, tkill and tgkill are not in it: the filter allows them only
/// when they target the calling process itself (see ob_seccomp_install).
const int *ob_sandbox_allowed_syscalls(size_t *count);
/// Largest number of extra syscalls ob_seccomp_install accepts.
extern const size_t OB_SECCOMP_MAX_EXTRA;
/// Largest number of ioctl request numbers ob_seccomp_install accepts.
extern const size_t OB_SECCOMP_MAX_IOCTLS;
/// The ioctl request numbers a driver holding a VFIO device fd needs (device, region and
/// IRQ info, SET_IRQS, RESET); `*count` receives the number of entries.
const uint32_t *ob_sandbox_vfio_device_ioctls(size_t *count);
/// 1 if `nr` may be given as an extra syscall: a native x86-64 number (0 ..< 0x40000000)
/// that is not one of the argument-checked kill, tkill, tgkill, fcntl, membarrier, ioctl.
/// 0 otherwise.
int ob_seccomp_extra_is_valid(int nr);
/// Installs the sandbox's seccomp filter on the calling thread (prctl(PR_SET_SECCOMP,
/// SECCOMP_MODE_FILTER)); no_new_privs must already be set. The filter:
/// - kills the process for any architecture other than x86-64 and for x32 syscalls;
/// - allows the base list and `extra` (count `nextra`);
/// - allows kill(pid, ...), tkill(tid, ...) and tgkill(tgid, ...) only when that first
///   argument is exactly `self` (upper 32 bits zero), so abort()/raise() keep working but
///   no other process can be signalled;
/// - allows ioctl only with a request number in `ioctls` (count `nioctls`; none: no ioctl);
/// - makes every other syscall fail with EPERM.
/// Returns -1 with errno EINVAL for a syscall number out of range or too many extras.
int ob_seccomp_install(const int *extra, size_t nextra, const uint32_t *ioctls, size_t nioctls, pid_t self);

// Single syscalls used by Sandbox.probe() to show that they are refused. Each returns the
// syscall's result (-1 with errno on failure). On success they undo what they did
// (a forked child exits at once and is reaped; an attached tracee is detached).
int ob_probe_execve(const char *path);
int ob_probe_ptrace_attach(pid_t pid);
int ob_probe_clone(void);
int ob_probe_clone3(void);
int ob_probe_process_vm_readv_self(void);
int ob_probe_ioctl_fionread(int fd);
/// ioctl(0, VFIO_IOMMU_MAP_DMA, ...): what a driver would call to widen its device's reach.
int ob_probe_ioctl_vfio_map_dma(void);
/// ioctl(0, VFIO_DEVICE_GET_INFO, ...): one a VFIO driver is allowed (ENOTTY on stdin).
int ob_probe_ioctl_vfio_device_get_info(void);
int ob_probe_prctl_get_dumpable(void);
int ob_probe_bpf(void);
int ob_probe_setns(void);
/// getpid through the x32 ABI (syscall number | __X32_SYSCALL_BIT): the sandbox's filter
/// kills the process (SIGSYS) for it.
long ob_probe_x32_getpid(void);
/// getpid through the i386 ABI (`int $0x80`, number 20): the filter sees the i386
/// architecture tag and kills the process (SIGSYS).
long ob_probe_i386_getpid(void);

/// pipe2(2) with O_CLOEXEC (Glibc's Swift module does not offer pipe2).
int ob_pipe_cloexec(int fds[2]);

// Tests: makes `sig` interrupt blocking calls in the thread it is sent to (a handler
// without SA_RESTART that only counts), so that they fail with EINTR. 0, or -1 with errno.
int ob_count_signal(int sig);
/// How many signals the handler of ob_count_signal has counted.
unsigned long ob_signals_counted(void);

// VFIO (linux/vfio.h): request numbers, ioctl(2), layouts, the full MMIO barrier.
#include "CVFIO.h"

// AF_PACKET sockets (packet.c).
#include "CPacket.h"

// TAP devices (<linux/if_tun.h>) and the interface ioctls of <linux/sockios.h> (struct
// ifreq, a union Swift imports badly, stays on this side). Each returns 0 or -1 with errno.
extern const int OB_IFNAMSIZ;
/// TUNSETIFF on an open /dev/net/tun descriptor: a TAP (IFF_TAP | IFF_NO_PI, no virtio-net
/// header) named `name` ("" lets the kernel choose; a "%d" pattern is filled in). The
/// interface's name is written to `out` (OB_IFNAMSIZ bytes, NUL-terminated).
int ob_tap_attach(int fd, const char *name, char *out);
/// TUNGETIFF: the attached interface's current name into `out` (OB_IFNAMSIZ bytes).
int ob_tap_name(int fd, char *out);
/// TUNGETDEVNETNS: a new descriptor of the network namespace the interface is in.
int ob_tap_netns(int fd);
/// SIOCGIFHWADDR / SIOCSIFHWADDR on the TAP descriptor itself (wherever the interface is).
int ob_tap_get_hwaddr(int fd, uint8_t mac[6]);
int ob_tap_set_hwaddr(int fd, const uint8_t mac[6]);
/// A socket for the interface ioctls below (AF_INET, SOCK_DGRAM, close-on-exec): they name
/// the interface, and the name is looked up in the socket's network namespace.
int ob_if_control_socket(void);
int ob_if_get_mtu(int sock, const char *name, int *mtu);
int ob_if_set_mtu(int sock, const char *name, int mtu);
int ob_if_get_flags(int sock, const char *name, unsigned int *flags);
int ob_if_set_flags(int sock, const char *name, unsigned int flags);
int ob_if_get_index(int sock, const char *name, int *index);
extern const unsigned int OB_IFF_UP;
extern const unsigned int OB_IFF_RUNNING;

#endif
