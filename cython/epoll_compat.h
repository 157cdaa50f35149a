/*
 * epoll_compat.h: what the epoll driver (epoll.pyx) needs in C: reading an
 * SQE's union fields back, the provided-buffer ring seen from the kernel's
 * side, and MSG_ZEROCOPY completions from the socket error queue.
 *
 * The engine prepares io_uring SQEs with liburing's helpers whatever the
 * backend; on epoll they never reach a kernel ring, and these accessors
 * read them as the kernel would (include/uapi/linux/io_uring.h). x86 and
 * other little-endian machines only: liburing swaps poll32_events on
 * big-endian ones.
 */
#ifndef EPOLL_COMPAT_H
#define EPOLL_COMPAT_H

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <linux/errqueue.h>
#include <liburing.h>

#ifndef SO_ZEROCOPY
#define SO_ZEROCOPY 60
/*
 * Whether closing fd resets the connection (SO_LINGER {1, 0}), and a way to
 * do that without giving up the fd: connect() with AF_UNSPEC runs
 * tcp_disconnect(), which sends the RST and frees the socket's queued
 * skbs -- and with them the pages of its MSG_ZEROCOPY sends, whose
 * completions then arrive on the error queue we can still read.
 */
static inline int uc_closes_with_reset(int fd)
{
    struct linger lg;
    socklen_t len = sizeof(lg);
    return getsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, &len) == 0 && lg.l_onoff && lg.l_linger == 0;
}

static inline int uc_disconnect(int fd)
{
    struct sockaddr sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_family = AF_UNSPEC;
    return connect(fd, &sa, sizeof(sa)) < 0 ? -errno : 0;
}

#endif
#ifndef MSG_ZEROCOPY
#define MSG_ZEROCOPY 0x4000000
/*
 * Whether closing fd resets the connection (SO_LINGER {1, 0}), and a way to
 * do that without giving up the fd: connect() with AF_UNSPEC runs
 * tcp_disconnect(), which sends the RST and frees the socket's queued
 * skbs -- and with them the pages of its MSG_ZEROCOPY sends, whose
 * completions then arrive on the error queue we can still read.
 */
static inline int uc_closes_with_reset(int fd)
{
    struct linger lg;
    socklen_t len = sizeof(lg);
    return getsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, &len) == 0 && lg.l_onoff && lg.l_linger == 0;
}

static inline int uc_disconnect(int fd)
{
    struct sockaddr sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_family = AF_UNSPEC;
    return connect(fd, &sa, sizeof(sa)) < 0 ? -errno : 0;
}

#endif
#ifndef SO_EE_ORIGIN_ZEROCOPY
#define SO_EE_ORIGIN_ZEROCOPY 5
/*
 * Whether closing fd resets the connection (SO_LINGER {1, 0}), and a way to
 * do that without giving up the fd: connect() with AF_UNSPEC runs
 * tcp_disconnect(), which sends the RST and frees the socket's queued
 * skbs -- and with them the pages of its MSG_ZEROCOPY sends, whose
 * completions then arrive on the error queue we can still read.
 */
static inline int uc_closes_with_reset(int fd)
{
    struct linger lg;
    socklen_t len = sizeof(lg);
    return getsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, &len) == 0 && lg.l_onoff && lg.l_linger == 0;
}

static inline int uc_disconnect(int fd)
{
    struct sockaddr sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_family = AF_UNSPEC;
    return connect(fd, &sa, sizeof(sa)) < 0 ? -errno : 0;
}

#endif
#ifndef SO_EE_CODE_ZEROCOPY_COPIED
#define SO_EE_CODE_ZEROCOPY_COPIED 1
/*
 * Whether closing fd resets the connection (SO_LINGER {1, 0}), and a way to
 * do that without giving up the fd: connect() with AF_UNSPEC runs
 * tcp_disconnect(), which sends the RST and frees the socket's queued
 * skbs -- and with them the pages of its MSG_ZEROCOPY sends, whose
 * completions then arrive on the error queue we can still read.
 */
static inline int uc_closes_with_reset(int fd)
{
    struct linger lg;
    socklen_t len = sizeof(lg);
    return getsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, &len) == 0 && lg.l_onoff && lg.l_linger == 0;
}

static inline int uc_disconnect(int fd)
{
    struct sockaddr sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_family = AF_UNSPEC;
    return connect(fd, &sa, sizeof(sa)) < 0 ? -errno : 0;
}

#endif

static inline __u64 uc_sqe_addr(const struct io_uring_sqe *s) { return s->addr; }
static inline __u64 uc_sqe_off(const struct io_uring_sqe *s) { return s->off; }
/* msg_flags, accept_flags, poll32_events, cancel_flags, splice_flags and
 * timeout_flags are one 32-bit union member. */
static inline __u32 uc_sqe_opflags(const struct io_uring_sqe *s) { return s->rw_flags; }
static inline __s32 uc_sqe_splice_fd_in(const struct io_uring_sqe *s) { return s->splice_fd_in; }

/*
 * The next buffer the kernel would pick from a provided-buffer ring: the
 * entry at `head` unless the ring is empty (head == tail, the tail read with
 * acquire as the kernel does). 0 when empty.
 */
static inline int uc_br_peek(struct io_uring_buf_ring *br, __u16 head, unsigned mask,
                             void **addr, __u32 *len, __u16 *bid)
{
    __u16 tail = __atomic_load_n(&br->tail, __ATOMIC_ACQUIRE);
    struct io_uring_buf *b;
    if (head == tail)
        return 0;
    b = &br->bufs[head & mask];
    *addr = (void *)(unsigned long)b->addr;
    *len = b->len;
    *bid = b->bid;
    return 1;
}

/*
 * One MSG_ZEROCOPY completion from fd's error queue: the inclusive range
 * [*lo, *hi] of send calls the kernel has let go of, and whether it copied
 * them after all (docs/kernel-notes.md, Zero-copy sends). 1 when one was read, 0 when the queue
 * is empty, -errno on error. Other error-queue messages are skipped.
 */
static inline int uc_zc_completion(int fd, __u32 *lo, __u32 *hi, int *copied)
{
    char control[128];
    struct msghdr msg;
    struct cmsghdr *cm;
    struct sock_extended_err *serr;
    for (;;) {
        memset(&msg, 0, sizeof(msg));
        msg.msg_control = control;
        msg.msg_controllen = sizeof(control);
        if (recvmsg(fd, &msg, MSG_ERRQUEUE | MSG_DONTWAIT) < 0)
            return errno == EAGAIN ? 0 : -errno;
        for (cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
            if (!((cm->cmsg_level == SOL_IP && cm->cmsg_type == IP_RECVERR) ||
                  (cm->cmsg_level == SOL_IPV6 && cm->cmsg_type == IPV6_RECVERR)))
                continue;
            serr = (struct sock_extended_err *)CMSG_DATA(cm);
            if (serr->ee_errno != 0 || serr->ee_origin != SO_EE_ORIGIN_ZEROCOPY)
                continue;
            *lo = serr->ee_info;
            *hi = serr->ee_data;
            *copied = (serr->ee_code & SO_EE_CODE_ZEROCOPY_COPIED) != 0;
            return 1;
        }
    }
}

/*
 * Whether closing fd resets the connection (SO_LINGER {1, 0}), and a way to
 * do that without giving up the fd: connect() with AF_UNSPEC runs
 * tcp_disconnect(), which sends the RST and frees the socket's queued
 * skbs -- and with them the pages of its MSG_ZEROCOPY sends, whose
 * completions then arrive on the error queue we can still read.
 */
static inline int uc_closes_with_reset(int fd)
{
    struct linger lg;
    socklen_t len = sizeof(lg);
    return getsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, &len) == 0 && lg.l_onoff && lg.l_linger == 0;
}

static inline int uc_disconnect(int fd)
{
    struct sockaddr sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_family = AF_UNSPEC;
    return connect(fd, &sa, sizeof(sa)) < 0 ? -errno : 0;
}

#endif
