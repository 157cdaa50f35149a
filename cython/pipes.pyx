# PipePool: the pipes splice mode moves bytes through (socket -> pipe ->
# socket). Making one costs pipe2 and an F_SETPIPE_SZ, so idle ones are
# kept (at most PIPE_POOL) and a flow rarely pays for a new one. A pipe
# goes back to the pool only empty, by the kernel's count as well as ours:
# bytes left in a pooled pipe would reach another flow.

cdef class PipePool:
    def __cinit__(self, uint32_t size):
        self.size = size

    def __dealloc__(self):
        self.close_all()

    # An idle pipe, or a new one. Returns 0 or -errno (EMFILE/ENFILE: the
    # caller waits for fds).
    cdef int get(self, int *r, int *w, uint32_t *cap) noexcept nogil:
        if self.n > 0:
            self.n -= 1
            r[0] = self.fds[2 * self.n]
            w[0] = self.fds[2 * self.n + 1]
            cap[0] = self.caps[self.n]
            return 0
        return self.make(r, w, cap)

    # A new non-blocking pipe of the size asked for. The size was probed
    # at start-up; past the per-user pipe limits (fs.pipe-user-pages-*)
    # the kernel may refuse it, and the pipe keeps what it has: cap is what
    # the kernel says.
    cdef int make(self, int *r, int *w, uint32_t *cap) noexcept nogil:
        cdef int fds[2]
        cdef int c
        if pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0:
            return -errno
        c = fcntl(fds[1], F_SETPIPE_SZ, <int>self.size)
        if c < 0:
            c = fcntl(fds[1], F_GETPIPE_SZ)
        r[0] = fds[0]
        w[0] = fds[1]
        cap[0] = <uint32_t>c
        self.created += 1
        return 0

    # Called with nothing in flight on the pipe. An empty pipe goes back to
    # the pool if it has room; one still holding bytes (its flow was reset)
    # is closed with them, and a new one takes its place in the pool.
    cdef void put(self, int r, int w, uint32_t cap, uint32_t bytes_held) noexcept nogil:
        cdef int queued = 0
        # The kernel's word before pooling: a count that drifted must show.
        if bytes_held == 0 and ioctl(r, FIONREAD, &queued) == 0 and queued != 0:
            self.errors += 1
            bytes_held = <uint32_t>queued
        if bytes_held != 0 or self.n == PIPE_POOL:
            close(r)
            close(w)
            if self.n == PIPE_POOL or self.make(&r, &w, &cap) < 0:
                return
        self.fds[2 * self.n] = r
        self.fds[2 * self.n + 1] = w
        self.caps[self.n] = cap
        self.n += 1

    cdef void close_all(self) noexcept nogil:
        cdef uint32_t i
        for i in range(self.n):
            close(self.fds[2 * i])
            close(self.fds[2 * i + 1])
        self.n = 0
