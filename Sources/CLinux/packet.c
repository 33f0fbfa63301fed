#define _GNU_SOURCE
#include "CPacket.h"

#include <arpa/inet.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <unistd.h>

int ob_packet_socket(int ifindex, int receive_timeout_ms) {
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(ETH_P_ALL));
    if (fd < 0) return -1;
    struct sockaddr_ll a;
    memset(&a, 0, sizeof a);
    a.sll_family = AF_PACKET;
    a.sll_protocol = htons(ETH_P_ALL);
    a.sll_ifindex = ifindex;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0) { close(fd); return -1; }
    if (receive_timeout_ms > 0) {
        struct timeval tv = { .tv_sec = receive_timeout_ms / 1000, .tv_usec = (receive_timeout_ms % 1000) * 1000 };
        if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0) { close(fd); return -1; }
    }
    return fd;
}

int ob_packet_send(int fd, const void *frame, size_t length, int count) {
    struct mmsghdr m[64];
    struct iovec v[64];
    if (count > 64) count = 64;
    memset(m, 0, sizeof(m[0]) * (size_t)count);
    for (int k = 0; k < count; k++) {
        v[k].iov_base = (void *)frame;
        v[k].iov_len = length;
        m[k].msg_hdr.msg_iov = &v[k];
        m[k].msg_hdr.msg_iovlen = 1;
    }
    return sendmmsg(fd, m, (unsigned)count, 0);
}

int ob_packet_receive(int fd, void *buffer, size_t stride, int count) {
    struct mmsghdr m[64];
    struct iovec v[64];
    if (count > 64) count = 64;
    memset(m, 0, sizeof(m[0]) * (size_t)count);
    for (int k = 0; k < count; k++) {
        v[k].iov_base = (char *)buffer + (size_t)k * stride;
        v[k].iov_len = stride;
        m[k].msg_hdr.msg_iov = &v[k];
        m[k].msg_hdr.msg_iovlen = 1;
    }
    return recvmmsg(fd, m, (unsigned)count, MSG_WAITFORONE, NULL);
}

int ob_timer_slack(unsigned long nanoseconds) { return prctl(PR_SET_TIMERSLACK, nanoseconds, 0, 0, 0); }
