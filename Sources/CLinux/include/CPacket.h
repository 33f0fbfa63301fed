#ifndef OB_CPACKET_H
#define OB_CPACKET_H

#include <stdint.h>
#include <stddef.h>

// AF_PACKET sockets for the kernel reference of `bench net` (packet.c). Each returns what
// the call it wraps returns, -1 with errno on failure.

/// A raw packet socket (SOCK_RAW, ETH_P_ALL, close-on-exec) bound to interface `ifindex`.
/// `receive_timeout_ms` > 0: SO_RCVTIMEO, so that a blocking receive returns now and then.
int ob_packet_socket(int ifindex, int receive_timeout_ms);
/// sendmmsg(2) of `count` frames (at most 64), each `length` bytes from `frame` (the same
/// buffer for all). Returns how many the kernel took.
int ob_packet_send(int fd, const void *frame, size_t length, int count);
/// recvmmsg(2) of up to `count` frames (at most 64) into `buffer` (`count` x `stride`
/// bytes), blocking for the first. Returns how many came.
int ob_packet_receive(int fd, void *buffer, size_t stride, int count);
/// prctl(PR_SET_TIMERSLACK): how late a sleep of this thread may end, in nanoseconds.
int ob_timer_slack(unsigned long nanoseconds);

#endif
