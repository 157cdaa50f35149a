# Declarations of the liburing 2.3 API we use, plus our compat header.
# The C boundary lives here and in system.pxd; logic lives in the .pyx files.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t, int64_t
from system cimport msghdr, iovec

cdef extern from "uring_compat.h" nogil:
    struct __kernel_timespec:
        int64_t tv_sec
        long long tv_nsec

    struct io_uring_sqe:
        uint8_t opcode
        uint8_t flags
        uint16_t ioprio
        int32_t fd
        uint32_t len
        uint32_t msg_flags
        uint64_t user_data
        uint16_t buf_group

    struct io_uring_cqe:
        uint64_t user_data
        int32_t res
        uint32_t flags

    struct io_sqring_offsets:
        pass
    struct io_cqring_offsets:
        pass

    struct io_uring_params:
        uint32_t sq_entries
        uint32_t cq_entries
        uint32_t flags
        uint32_t features

    struct io_uring_sq:
        unsigned ring_entries
        unsigned *kflags
    struct io_uring_cq:
        unsigned ring_entries
        unsigned *koverflow

    struct io_uring:
        io_uring_sq sq
        io_uring_cq cq
        unsigned flags
        int ring_fd
        unsigned features

    struct io_uring_probe:
        uint8_t last_op

    struct io_uring_buf_ring:
        pass
    struct io_uring_buf:
        uint64_t addr
        uint32_t len
        uint16_t bid

    # setup flags
    unsigned IORING_SETUP_CQSIZE, IORING_SETUP_CLAMP, IORING_SETUP_SUBMIT_ALL
    unsigned IORING_SETUP_COOP_TASKRUN, IORING_SETUP_TASKRUN_FLAG
    unsigned IORING_SETUP_SINGLE_ISSUER, IORING_SETUP_DEFER_TASKRUN
    unsigned IORING_SQ_CQ_OVERFLOW     # sq flags: completions wait in the kernel's overflow list
    unsigned IORING_SQ_TASKRUN         # sq flags: completion work waits for our next syscall
    # feature flags
    unsigned IORING_FEAT_SINGLE_MMAP, IORING_FEAT_NODROP, IORING_FEAT_SUBMIT_STABLE
    unsigned IORING_FEAT_RW_CUR_POS, IORING_FEAT_CUR_PERSONALITY, IORING_FEAT_FAST_POLL
    unsigned IORING_FEAT_POLL_32BITS, IORING_FEAT_SQPOLL_NONFIXED, IORING_FEAT_EXT_ARG
    unsigned IORING_FEAT_NATIVE_WORKERS, IORING_FEAT_RSRC_TAGS, IORING_FEAT_CQE_SKIP
    unsigned IORING_FEAT_LINKED_FILE, IORING_FEAT_REG_REG_RING, IORING_FEAT_RECVSEND_BUNDLE
    unsigned IORING_FEAT_MIN_TIMEOUT, IORING_FEAT_RW_ATTR, IORING_FEAT_NO_IOWAIT
    # sqe flags
    unsigned IOSQE_IO_LINK, IOSQE_BUFFER_SELECT, IOSQE_CQE_SKIP_SUCCESS
    # cqe flags
    unsigned IORING_CQE_F_BUFFER, IORING_CQE_F_MORE, IORING_CQE_F_SOCK_NONEMPTY
    unsigned IORING_CQE_F_NOTIF, IORING_CQE_BUFFER_SHIFT, IORING_CQE_F_BUF_MORE
    unsigned IOU_PBUF_RING_INC
    # misc op flags
    unsigned IORING_ASYNC_CANCEL_ALL, IORING_ASYNC_CANCEL_FD, IORING_ASYNC_CANCEL_ANY
    unsigned IORING_RECVSEND_BUNDLE, IORING_SEND_ZC_REPORT_USAGE, IORING_NOTIF_USAGE_ZC_COPIED
    unsigned IORING_POLL_ADD_MULTI, IORING_RECV_MULTISHOT, IORING_ACCEPT_MULTISHOT
    void io_uring_buf_ring_init(io_uring_buf_ring *br)

    # opcodes
    enum:
        IORING_OP_NOP, IORING_OP_POLL_ADD, IORING_OP_TIMEOUT, IORING_OP_ACCEPT
        IORING_OP_ASYNC_CANCEL, IORING_OP_LINK_TIMEOUT, IORING_OP_CONNECT
        IORING_OP_CLOSE, IORING_OP_SEND, IORING_OP_RECV, IORING_OP_SPLICE
        IORING_OP_SHUTDOWN, IORING_OP_SEND_ZC, IORING_OP_SENDMSG, IORING_OP_PROVIDE_BUFFERS
        IORING_OP_LAST

    int io_uring_queue_init_params(unsigned entries, io_uring *ring, io_uring_params *p)
    void io_uring_queue_exit(io_uring *ring)
    io_uring_sqe *io_uring_get_sqe(io_uring *ring)
    int io_uring_submit(io_uring *ring)
    int io_uring_submit_and_get_events(io_uring *ring)
    int io_uring_submit_and_wait_timeout(io_uring *ring, io_uring_cqe **cqe_ptr,
                                         unsigned wait_nr, __kernel_timespec *ts, void *sigmask)
    int io_uring_wait_cqe_timeout(io_uring *ring, io_uring_cqe **cqe_ptr, __kernel_timespec *ts)
    unsigned io_uring_peek_batch_cqe(io_uring *ring, io_uring_cqe **cqes, unsigned count)
    void io_uring_cq_advance(io_uring *ring, unsigned nr)
    void io_uring_cqe_seen(io_uring *ring, io_uring_cqe *cqe)
    unsigned io_uring_sq_space_left(io_uring *ring)
    unsigned io_uring_sq_ready(io_uring *ring)
    unsigned io_uring_cq_ready(io_uring *ring)
    io_uring_probe *io_uring_get_probe_ring(io_uring *ring)
    int io_uring_opcode_supported(io_uring_probe *p, int op)
    void io_uring_free_probe(io_uring_probe *p)
    int io_uring_register_ring_fd(io_uring *ring)
    int io_uring_register_iowq_max_workers(io_uring *ring, unsigned *values)

    void io_uring_sqe_set_data64(io_uring_sqe *sqe, uint64_t data)
    void io_uring_prep_nop(io_uring_sqe *sqe)
    void io_uring_prep_multishot_accept(io_uring_sqe *sqe, int fd, void *addr, void *addrlen, int flags)
    void io_uring_prep_accept(io_uring_sqe *sqe, int fd, void *addr, void *addrlen, int flags)
    void io_uring_prep_connect(io_uring_sqe *sqe, int fd, const void *addr, unsigned addrlen)
    void io_uring_prep_link_timeout(io_uring_sqe *sqe, __kernel_timespec *ts, unsigned flags)
    void io_uring_prep_timeout(io_uring_sqe *sqe, __kernel_timespec *ts, unsigned count, unsigned flags)
    void io_uring_prep_send(io_uring_sqe *sqe, int sockfd, const void *buf, size_t len, int flags)
    void io_uring_prep_sendmsg(io_uring_sqe *sqe, int fd, const msghdr *msg, unsigned flags)
    void io_uring_prep_send_zc(io_uring_sqe *sqe, int sockfd, const void *buf, size_t len,
                               int flags, unsigned zc_flags)
    void io_uring_prep_send_zc_fixed(io_uring_sqe *sqe, int sockfd, const void *buf, size_t len,
                                     int flags, unsigned zc_flags, unsigned buf_index)
    int io_uring_register_buffers(io_uring *ring, const iovec *iovecs, unsigned nr_iovecs)
    int io_uring_register_buffers_sparse(io_uring *ring, unsigned nr)
    int io_uring_register_buffers_update_tag(io_uring *ring, unsigned off, const iovec *iovecs,
                                             const uint64_t *tags, unsigned nr)
    void io_uring_prep_recv(io_uring_sqe *sqe, int sockfd, void *buf, size_t len, int flags)
    void io_uring_prep_poll_add(io_uring_sqe *sqe, int fd, unsigned poll_mask)
    void io_uring_prep_poll_multishot(io_uring_sqe *sqe, int fd, unsigned poll_mask)
    void io_uring_prep_poll_remove(io_uring_sqe *sqe, uint64_t user_data)
    void io_uring_prep_splice(io_uring_sqe *sqe, int fd_in, int64_t off_in, int fd_out,
                              int64_t off_out, unsigned nbytes, unsigned splice_flags)
    void io_uring_prep_shutdown(io_uring_sqe *sqe, int fd, int how)
    void io_uring_prep_close(io_uring_sqe *sqe, int fd)
    void io_uring_prep_cancel64(io_uring_sqe *sqe, uint64_t user_data, int flags)
    void io_uring_prep_cancel_fd(io_uring_sqe *sqe, int fd, unsigned flags)

    # provided-buffer rings
    void io_uring_buf_ring_add(io_uring_buf_ring *br, void *addr, unsigned len,
                               unsigned short bid, int mask, int buf_offset)
    void io_uring_buf_ring_advance(io_uring_buf_ring *br, int count)
    int io_uring_buf_ring_mask(uint32_t ring_entries)

    # ours (uring_compat.h)
    io_uring_buf_ring *uc_setup_buf_ring(io_uring *ring, unsigned entries, int bgid,
                                         unsigned flags, int *err)
    int uc_buf_ring_head(io_uring *ring, int bgid, unsigned *head)
    void uc_free_buf_ring(io_uring *ring, io_uring_buf_ring *br, unsigned entries, int bgid)
    void uc_prep_recv_select(io_uring_sqe *sqe, int fd, int bgid, int bundle, int msg_flags)
