# The driver contract: the liburing-shaped calls a user of the ring (the
# proxy engine, and later the selector and the event loop) may make. Ring
# (ring.pyx) implements it with io_uring; Epoll (epoll.pyx) carries out the
# same operations with non-blocking syscalls and posts the same CQEs. A
# user prepares SQEs with liburing's prep helpers and never asks which
# driver it has (see driver.pyx for each call's rules).

cdef class Driver:
    cdef io_uring_sqe *sqe(self) noexcept nogil
    cdef void reserve(self, unsigned n) noexcept nogil
    cdef int submit_and_wait(self, int64_t timeout_ns) noexcept nogil
    cdef int submit(self) noexcept nogil
    cdef bint must_enter(self) noexcept nogil
    cdef unsigned ready(self) noexcept nogil
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
