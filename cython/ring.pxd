# Ring: one io_uring instance, set up with the best flags the kernel takes.

cdef class Ring(Driver):
    cdef io_uring ring
    cdef readonly unsigned setup_flags
    cdef readonly unsigned features
    cdef readonly unsigned sq_entries
    cdef readonly unsigned cq_entries
    cdef readonly str setup_mode
    cdef readonly bint ring_fd_registered
    cdef bint closed
    cdef bytearray op_supported       # index: opcode -> 1 if the probe says so

    cdef io_uring_sqe *sqe(self) noexcept nogil
    cdef void reserve(self, unsigned n) noexcept nogil
    cdef int submit_and_wait(self, int64_t timeout_ns) noexcept nogil
    cdef unsigned peek_batch(self, io_uring_cqe **cqes, unsigned n) noexcept nogil
    cdef void advance(self, unsigned n) noexcept nogil
    cdef bint cq_overflowed(self) noexcept nogil
    cdef io_uring_buf_ring *buf_ring_setup(self, unsigned entries, bint incremental,
                                           int *err) noexcept nogil
    cdef void buf_ring_free(self, io_uring_buf_ring *br, unsigned entries) noexcept nogil
    cdef int buf_ring_head(self, unsigned *head) noexcept nogil
    cdef int buffers_sparse(self, unsigned n) noexcept nogil
    cdef int buffer_update(self, unsigned idx, void *addr, size_t len) noexcept nogil
    cdef void forget(self, int fd) noexcept nogil
