# Epoll: the engine's io_uring operations carried out over epoll (epoll.pyx).

cdef extern from "epoll_compat.h" nogil:
    int SO_ZEROCOPY, MSG_ZEROCOPY
    uint64_t uc_sqe_addr(const io_uring_sqe *s)
    uint64_t uc_sqe_off(const io_uring_sqe *s)
    uint32_t uc_sqe_opflags(const io_uring_sqe *s)
    int32_t uc_sqe_splice_fd_in(const io_uring_sqe *s)
    int uc_br_peek(io_uring_buf_ring *br, uint16_t head, unsigned mask,
                   void **addr, uint32_t *len, uint16_t *bid)
    int uc_zc_completion(int fd, uint32_t *lo, uint32_t *hi, int *copied)
    int uc_closes_with_reset(int fd)
    int uc_disconnect(int fd)

cdef enum:
    EP_HARVEST = 256        # completions one peek_batch hands out

# One submitted SQE, from submit until its final CQE.
cdef struct EOp:
    io_uring_sqe sqe        # as the engine prepared it
    int64_t deadline        # TIMEOUT / LINK_TIMEOUT: when it fires (CLOCK_MONOTONIC ns)
    uint32_t zc_id          # SEND_ZC sent: its MSG_ZEROCOPY send number
    int32_t next            # next op on the same wait list, or on the free list
    int32_t link            # op started when this one completes (IOSQE_IO_LINK)
    int32_t ltimeout        # this op's LINK_TIMEOUT, or -1
    int32_t owner           # a LINK_TIMEOUT's guarded op
    int32_t tm_idx          # place in the timer heap, or -1
    uint8_t where           # W_*: which list holds it
    uint8_t live

# One fd the driver has waited on.
cdef struct EFd:
    int32_t head[3]         # wait lists, FIFO: W_IN, W_OUT, W_ZC
    int32_t tail[3]
    uint32_t zc_next        # number the kernel gives this socket's next MSG_ZEROCOPY send
    uint8_t reg             # in the epoll set
    uint8_t zc              # SO_ZEROCOPY: 0 not asked yet, 1 on, 2 refused
    uint8_t again           # on the again list (more to do without a new event)
    int32_t close_op        # 1 + a CLOSE waiting for this fd's zero-copy completions, or 0

cdef class Epoll(Driver):        # the contract's calls: driver.pxd
    cdef readonly int epfd
    cdef io_uring_sqe *sq          # SQEs prepared since the last submit
    cdef uint32_t sq_n, sq_cap
    cdef io_uring_cqe *cq          # completions not yet handled
    cdef uint32_t cq_n, cq_head, cq_cap
    cdef io_uring_cqe harvest[EP_HARVEST]   # peek_batch's copies: posting may move cq
    cdef EOp *ops
    cdef int32_t ops_cap, op_free
    cdef EFd *fds
    cdef int32_t fds_cap
    cdef int32_t *tm               # ops with a deadline
    cdef int32_t ntm, tm_cap
    cdef int32_t *again_fds        # fds with more to do without waiting for an event
    cdef int32_t nagain, again_cap
    cdef int32_t *pend             # submit()'s scratch: chain heads to start
    cdef io_uring_buf_ring *br     # the engine's buffer ring (we play the kernel's side)
    cdef uint32_t br_mask
    cdef readonly uint16_t br_head # entries taken, as the kernel's head would count them
    cdef readonly uint64_t syscalls_io, wakeups
    cdef readonly int oom

    cdef int wait(self, int64_t timeout_ns) noexcept nogil
    cdef void post(self, uint64_t ud, int res, uint32_t flags) noexcept nogil
    cdef int32_t op_new(self, io_uring_sqe *s) noexcept nogil
    cdef void op_free_one(self, int32_t o) noexcept nogil
    cdef EFd *fd_get(self, int fd) noexcept nogil
    cdef int watch(self, int fd) noexcept nogil
    cdef void list_add(self, int fd, int w, int32_t o) noexcept nogil
    cdef void list_remove(self, int32_t o) noexcept nogil
    cdef void tm_add(self, int32_t o, int64_t deadline) noexcept nogil
    cdef void tm_remove(self, int32_t o) noexcept nogil
    cdef void tm_swap(self, int32_t a, int32_t b) noexcept nogil
    cdef void tm_up(self, int32_t k) noexcept nogil
    cdef void tm_down(self, int32_t k) noexcept nogil
    cdef void again_add(self, int fd) noexcept nogil
    cdef void complete(self, int32_t o, int res, uint32_t flags) noexcept nogil
    cdef void wake(self, int fd, int w, uint32_t events) noexcept nogil
    cdef void fire_timers(self, int64_t now) noexcept nogil
