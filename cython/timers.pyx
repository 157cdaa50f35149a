# TimerWheel: a deadline per id (the engine's ids are flow slots), on a
# wheel of TW_SLOTS ticks of TW_TICK_NS.
#
# An id sits in the list of the tick its deadline falls in (rounded up,
# never before the next tick, at most a lap ahead: a later deadline is
# looked at after a lap and placed again). Adding and removing are O(1)
# (intrusive doubly linked lists, the links in arrays indexed by id);
# expiring looks only at the ticks that passed. Nothing is done for an id
# between expiries, so the owner stamps activity on its own side and,
# when an id comes due, decides whether it expired or goes back in at a
# later deadline. The link arrays are reserved address space, written
# only for ids that were ever added: memory follows use, not capacity.

cdef class TimerWheel:
    def __cinit__(self, uint32_t capacity, int64_t origin_ns):
        cdef uint32_t i
        self.cap = capacity
        self.origin_ns = origin_ns
        self.hint = <uint64_t>-1
        self.due = -1
        self.head = <int32_t *>malloc(TW_SLOTS * sizeof(int32_t))
        if self.head == NULL:
            raise MemoryError()
        for i in range(TW_SLOTS):
            self.head[i] = -1
        self.links_bytes = <size_t>max(1, capacity) * 3 * sizeof(int32_t)
        self.next = <int32_t *>reserve_zeroed(self.links_bytes)
        if self.next == NULL:
            raise MemoryError("cannot reserve the timer wheel's links")
        self.prev = self.next + max(1, capacity)
        self.slot = self.prev + max(1, capacity)

    def __dealloc__(self):
        free(self.head)
        if self.next != NULL:
            munmap(self.next, self.links_bytes)

    # The slot array starts zeroed, and 0 is a valid slot: an id's slot is
    # stored + 1, so 0 reads as "not in the wheel" for ids never added.
    cdef bint holds(self, uint32_t id) noexcept nogil:
        return self.slot[id] != 0

    cdef void add(self, uint32_t id, int64_t deadline) noexcept nogil:
        cdef uint64_t t
        cdef int32_t i
        if self.slot[id]:
            self.remove(id)
        if deadline == INT64_MAX or deadline - self.origin_ns >= <int64_t>TW_SLOTS * TW_TICK_NS:
            t = self.tick + TW_SLOTS - 1
        else:
            t = <uint64_t>max(<int64_t>0, (deadline - self.origin_ns + TW_TICK_NS - 1) // TW_TICK_NS)
            t = min(max(t, self.tick), self.tick + TW_SLOTS - 1)
        i = <int32_t>(t % TW_SLOTS)
        self.slot[id] = i + 1
        self.prev[id] = -1
        self.next[id] = self.head[i]
        if self.next[id] >= 0:
            self.prev[self.next[id]] = <int32_t>id
        self.head[i] = <int32_t>id
        self.n += 1
        if t < self.hint:
            self.hint = t

    cdef void remove(self, uint32_t id) noexcept nogil:
        cdef int32_t s = self.slot[id] - 1
        if s < 0:
            return
        if self.prev[id] >= 0:
            self.next[self.prev[id]] = self.next[id]
        elif s == TW_SLOTS:
            self.due = self.next[id]          # in the list pop_due is handing out
        else:
            self.head[s] = self.next[id]
        if self.next[id] >= 0:
            self.prev[self.next[id]] = self.prev[id]
        self.slot[id] = 0
        self.n -= 1

    # The next id whose tick has come by `now`, taken out of the wheel; -1
    # when there is none. A tick's list is taken whole first (its ids are
    # marked as in the pseudo-slot TW_SLOTS), so an id added again while
    # the owner handles it lands on a later tick, never back in this one.
    cdef int32_t pop_due(self, int64_t now) noexcept nogil:
        cdef uint64_t last
        cdef int32_t x
        while self.due < 0:
            if now < self.origin_ns:
                return -1
            last = <uint64_t>((now - self.origin_ns) // TW_TICK_NS)
            if self.n == 0:
                self.tick = max(self.tick, last + 1)
                self.hint = <uint64_t>-1
                return -1
            if self.hint != <uint64_t>-1 and self.hint > last:
                return -1
            if self.tick > last:
                self.hint = <uint64_t>-1          # found again by next_due
                return -1
            x = self.head[self.tick % TW_SLOTS]
            self.head[self.tick % TW_SLOTS] = -1
            self.tick += 1
            self.due = x
            while x >= 0:
                self.slot[x] = TW_SLOTS + 1
                x = self.next[x]
        x = self.due
        self.due = self.next[x]
        if self.due >= 0:
            self.prev[self.due] = -1
        self.slot[x] = 0
        self.n -= 1
        return x

    # When the owner's wait must end for the wheel: the start of the first
    # non-empty tick (INT64_MAX when the wheel is empty).
    cdef int64_t next_due(self) noexcept nogil:
        cdef uint64_t t
        if self.n == 0:
            return INT64_MAX
        if self.due >= 0:
            return self.origin_ns + <int64_t>(self.tick - 1) * TW_TICK_NS
        if self.hint == <uint64_t>-1:
            t = self.tick
            while self.head[t % TW_SLOTS] < 0 and t < self.tick + TW_SLOTS:
                t += 1
            self.hint = t
        return self.origin_ns + <int64_t>self.hint * TW_TICK_NS
