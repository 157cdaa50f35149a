# TimerWheel: deadlines for many ids (flow slots), nothing done per entry
# between expiries (see timers.pyx).

cdef enum:
    TW_SLOTS = 8192          # ticks in a lap ...
    TW_TICK_NS = 50000000    # ... of 50 ms: a horizon of 409.6 s (later deadlines wait a lap)

@cython.final
cdef class TimerWheel:
    cdef uint32_t cap          # ids 0 .. cap - 1
    cdef int32_t *head         # TW_SLOTS lists of ids
    cdef int32_t *next         # per id: its list's links, and the slot it is in (-1: none)
    cdef int32_t *prev
    cdef int32_t *slot
    cdef size_t links_bytes
    cdef int32_t due           # the list being handed out by pop_due
    cdef int64_t origin_ns     # tick 0 starts here
    cdef uint64_t tick         # the next tick to look at
    cdef uint64_t hint         # no entry is due before this tick
    cdef readonly uint32_t n   # ids in the wheel

    cdef void add(self, uint32_t id, int64_t deadline) noexcept nogil
    cdef void remove(self, uint32_t id) noexcept nogil
    cdef bint holds(self, uint32_t id) noexcept nogil
    cdef int32_t pop_due(self, int64_t now) noexcept nogil
    cdef int64_t next_due(self) noexcept nogil
