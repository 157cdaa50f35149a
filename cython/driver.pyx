# Driver: the contract between a ring's users and the two drivers (see
# driver.pxd). The methods here are the contract's text; Ring and Epoll
# override every one. A user holds a Driver and calls these: one indirect
# call per SQE or per batch, never a branch on which driver it is.

cdef class Driver:
    # A free SQE. Never fails: a full queue is submitted first, so a
    # caller that links SQEs reserve()s its chain beforehand, or the chain
    # would be split across two submits and the link broken.
    cdef io_uring_sqe *sqe(self) noexcept nogil:
        return NULL

    # Room for n SQEs in one submit.
    cdef void reserve(self, unsigned n) noexcept nogil:
        pass

    # Submit everything prepared and wait for at least one completion or
    # timeout_ns (< 0: no timeout). 0 or a count on success; -ETIME when nothing came in time;
    # -EINTR on a signal; -EBUSY/-EAGAIN when the kernel asks to be drained
    # first; -ENOMEM when the driver itself ran out of memory.
    cdef int submit_and_wait(self, int64_t timeout_ns) noexcept nogil:
        return -ENOSYS

    # Submit everything prepared, and run the completion work already due,
    # without waiting: 0 or a count, or -errno.
    cdef int submit(self) noexcept nogil:
        return -ENOSYS

    # Whether a wait with a zero timeout could find anything that peek_batch
    # cannot see yet: SQEs to submit, or completion work the kernel has
    # flagged as waiting for our next syscall. True where it cannot tell.
    cdef bint must_enter(self) noexcept nogil:
        return True

    # How many completions peek_batch would return now.
    cdef unsigned ready(self) noexcept nogil:
        return 0

    # Up to n completions, in order, without waiting. They stay valid, and
    # are not handed out again, until advance(that many); handling one may
    # prepare SQEs (never submitted before advance).
    cdef unsigned peek_batch(self, io_uring_cqe **cqes, unsigned n) noexcept nogil:
        return 0

    cdef void advance(self, unsigned n) noexcept nogil:
        pass

    # Completions went to the overflow list this turn (NODROP keeps them;
    # they come back as the queue drains): the queue is too small.
    cdef bint cq_overflowed(self) noexcept nogil:
        return False

    # A provided-buffer ring of `entries` (a power of two) as buffer group
    # 0; NULL with err = -errno where it cannot be set up. Incremental
    # consumption (IOU_PBUF_RING_INC) only where the driver has it.
    cdef io_uring_buf_ring *buf_ring_setup(self, unsigned entries, bint incremental,
                                           int *err) noexcept nogil:
        err[0] = -ENOSYS
        return NULL

    cdef void buf_ring_free(self, io_uring_buf_ring *br, unsigned entries) noexcept nogil:
        pass

    # The consumer's head of buffer group 0 as the driver sees it: 0, or
    # -errno where it cannot be read.
    cdef int buf_ring_head(self, unsigned *head) noexcept nogil:
        return -ENOSYS

    # Registered buffers for SEND_ZC_FIXED: a sparse table of n, then one
    # entry at a time (1 on success). -errno where refused.
    cdef int buffers_sparse(self, unsigned n) noexcept nogil:
        return -EOPNOTSUPP

    cdef int buffer_update(self, unsigned idx, void *addr, size_t len) noexcept nogil:
        return -EOPNOTSUPP

    # An fd its user closed itself (not with a CLOSE SQE): a driver that
    # keeps per-fd state must drop it before the number is reused.
    cdef void forget(self, int fd) noexcept nogil:
        pass
