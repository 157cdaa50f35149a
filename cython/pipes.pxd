# PipePool: non-blocking pipes for splice mode, kept for reuse (see pipes.pyx).

cdef enum:
    PIPE_POOL = 32           # idle pipes kept for the next flows, as passt does

@cython.final
cdef class PipePool:
    cdef int fds[PIPE_POOL * 2]   # idle pipes: (read end, write end) pairs
    cdef uint32_t caps[PIPE_POOL] # ... and each one's capacity
    cdef readonly uint32_t n      # idle pipes held
    cdef uint32_t size            # the capacity asked for (--pipe-size, probed)
    cdef readonly uint64_t created   # pipes made (the rest came from the pool)
    cdef readonly uint64_t errors    # a pipe said empty was not (must stay 0)

    cdef int get(self, int *r, int *w, uint32_t *cap) noexcept nogil
    cdef int make(self, int *r, int *w, uint32_t *cap) noexcept nogil
    cdef void put(self, int r, int w, uint32_t cap, uint32_t bytes_held) noexcept nogil
    cdef void close_all(self) noexcept nogil
