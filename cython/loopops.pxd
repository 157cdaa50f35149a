# LoopOps: the asyncio loop's operations on a PollSet's ring (loopops.pyx).

@cython.final
cdef class LoopOps:
    cdef PollSet polls
    cdef unsigned cap, nfree
    cdef uint16_t *gen          # per slot: its generation (bumped on release)
    cdef uint8_t *opc           # per slot: the op in flight (0: free)
    cdef int *free_slots
    cdef Py_buffer *views       # per slot: the buffer the kernel fills or sends from
    cdef uint8_t *has_view
    cdef list waiters           # per slot: called with the result, once
    cdef list keep              # per slot: kept alive while the kernel may read it
    cdef list done              # (waiter, res) harvested, for the loop to call
    cdef readonly uint64_t submitted, completed, cancels, stale, nobufs, spec_misses
    cdef readonly uint64_t quiet_sends   # sends finished in the harvest (StreamIO.send_quiet)
    # The receive pool: a provided-buffer ring (group 0) on the same ring, so
    # that an idle connection's pending recv holds no buffer of its own.
    cdef Ring pool_ring         # the ring the pool is registered with (None: none yet)
    cdef io_uring_buf_ring *br
    cdef char *pool
    cdef readonly unsigned pool_n, pool_size
    cdef public bint pooled     # receive into the pool (pool_available() said it works)
    # try_recv: a receive that does not wait (loopops.pyx)
    cdef char *scratch          # POOL_SIZE bytes, made on first use
    cdef uint8_t *spec          # per fd: the backoff (level << 4 | tries left to skip)
    cdef unsigned spec_cap

    cdef int pool_ready(self) except -1
    cdef void pool_drop(self, bint forked) noexcept
    cdef bint spec_skip(self, int fd) except -1
    cdef void spec_result(self, int fd, bint hit) noexcept
    cdef ssize_t recv_now(self, int fd, void *buf, size_t n) except? -1

    cdef int take_slot(self) except -1
    cdef int take_slot_viewing(self, obj, int flags) except -1
    cdef io_uring_sqe *prep(self, int slot, uint32_t op, object waiter) except NULL
    cdef void release(self, int slot) noexcept
    cdef void finish(self, io_uring_cqe *cqe) noexcept
    cdef uint64_t ud(self, int slot) noexcept
    cdef int c_dispatch(self, loop) except -1
    # What StreamIO calls (the def methods of the same names wrap them).
    cdef int c_recv(self, int fd, object buf, object waiter, int flags) except -1
    cdef int c_recv_pooled(self, int fd, object waiter, size_t limit) except -1
    cdef int c_send(self, int fd, object data, object waiter, int flags) except -1
    cdef bint c_cancel(self, int slot, object waiter, uint32_t op) except -1
