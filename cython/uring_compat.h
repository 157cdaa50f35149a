/*
 * uring_compat.h: what liburing 2.3 (Debian 12, the oldest we build against)
 * lacks, prepared by hand. Every item here is gated at run time by the probe
 * in ring.pyx; defining a flag does not mean the kernel honours it.
 */
#ifndef URING_COMPAT_H
#define URING_COMPAT_H

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <liburing.h>

/* Feature flags newer than liburing 2.3's io_uring.h (include/uapi/linux/io_uring.h). */
#ifndef IORING_FEAT_REG_REG_RING
#define IORING_FEAT_REG_REG_RING      (1U << 13)
#endif
#ifndef IORING_FEAT_RECVSEND_BUNDLE
#define IORING_FEAT_RECVSEND_BUNDLE   (1U << 14)
#endif
#ifndef IORING_FEAT_MIN_TIMEOUT
#define IORING_FEAT_MIN_TIMEOUT       (1U << 15)
#endif
#ifndef IORING_FEAT_RW_ATTR
#define IORING_FEAT_RW_ATTR           (1U << 16)
#endif
#ifndef IORING_FEAT_NO_IOWAIT
#define IORING_FEAT_NO_IOWAIT         (1U << 17)
#endif

/* Send/recv ioprio flags and CQE flags from 6.2+ kernels. */
#ifndef IORING_SEND_ZC_REPORT_USAGE
#define IORING_SEND_ZC_REPORT_USAGE   (1U << 3)
#endif
#ifndef IORING_RECVSEND_BUNDLE
#define IORING_RECVSEND_BUNDLE        (1U << 4)
#endif
#ifndef IORING_NOTIF_USAGE_ZC_COPIED
#define IORING_NOTIF_USAGE_ZC_COPIED  (1U << 31)
#endif
#ifndef IORING_CQE_F_BUF_MORE
#define IORING_CQE_F_BUF_MORE         (1U << 4)
#endif
#ifndef IOU_PBUF_RING_INC
#define IOU_PBUF_RING_INC             2
#endif

/*
 * The register argument as the kernel has it: liburing 2.3 calls the u16
 * after bgid "pad"; since 6.12 it carries IOU_PBUF_RING_INC.
 */
struct uc_buf_reg {
    __u64 ring_addr;
    __u32 ring_entries;
    __u16 bgid;
    __u16 flags;
    __u64 resv[3];
};
_Static_assert(sizeof(struct uc_buf_reg) == sizeof(struct io_uring_buf_reg),
               "io_uring_buf_reg layout changed");

/*
 * A provided-buffer ring for group `bgid` with `entries` slots (a power of
 * two), registered with `flags` (0 or IOU_PBUF_RING_INC). liburing 2.4
 * added io_uring_setup_buf_ring(); 2.3 only has the register call, so the
 * ring memory is mapped here. The ring must be page-aligned memory the
 * kernel can pin (io_uring_register_buf_ring(3)). Returns NULL and sets
 * *err (a negative errno) on failure: EINVAL for flags the kernel lacks.
 */
static inline struct io_uring_buf_ring *
uc_setup_buf_ring(struct io_uring *ring, unsigned entries, int bgid, unsigned flags, int *err)
{
    struct uc_buf_reg reg;
    size_t size = (size_t)entries * sizeof(struct io_uring_buf);
    void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE,
                     MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (mem == MAP_FAILED) {
        *err = -errno;
        return NULL;
    }
    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = (unsigned long)mem;
    reg.ring_entries = entries;
    reg.bgid = (unsigned short)bgid;
    reg.flags = (__u16)flags;
    int ret = io_uring_register_buf_ring(ring, (struct io_uring_buf_reg *)&reg, 0);
    if (ret < 0) {
        munmap(mem, size);
        *err = ret;
        return NULL;
    }
    io_uring_buf_ring_init((struct io_uring_buf_ring *)mem);
    *err = 0;
    return (struct io_uring_buf_ring *)mem;
}

/*
 * The kernel's head of group `bgid` (IORING_REGISTER_PBUF_STATUS, 6.8+):
 * how many entries it has consumed, modulo 2^16. Returns 0 or -errno.
 */
#ifndef IORING_REGISTER_PBUF_STATUS
#define IORING_REGISTER_PBUF_STATUS 26
#endif
static inline int
uc_buf_ring_head(struct io_uring *ring, int bgid, unsigned *head)
{
    struct { __u32 buf_group; __u32 head; __u32 resv[8]; } st;
    memset(&st, 0, sizeof(st));
    st.buf_group = (__u32)bgid;
    int ret = (int)syscall(__NR_io_uring_register, ring->ring_fd,
                           IORING_REGISTER_PBUF_STATUS, &st, 1);
    if (ret < 0)
        return -errno;
    *head = st.head;
    return 0;
}

static inline void
uc_free_buf_ring(struct io_uring *ring, struct io_uring_buf_ring *br,
                 unsigned entries, int bgid)
{
    io_uring_unregister_buf_ring(ring, bgid);
    munmap(br, (size_t)entries * sizeof(struct io_uring_buf));
}

/* Recv with buffer selection from group `bgid`, multishot when asked. With
 * `bundle` (6.10+, IORING_FEAT_RECVSEND_BUNDLE) one completion may fill
 * several buffers: consecutive entries from the ring's head, the CQE naming
 * only the first (io_uring_prep_recv(3), "bundle"). `msg_flags` go to the
 * recv as they would to recv(2) (MSG_PEEK for the peek mode). */
static inline void
uc_prep_recv_select(struct io_uring_sqe *sqe, int fd, int bgid, int bundle, int msg_flags)
{
    io_uring_prep_recv(sqe, fd, NULL, 0, msg_flags);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = (unsigned short)bgid;
    if (bundle)
        sqe->ioprio |= IORING_RECVSEND_BUNDLE;
}


#endif
