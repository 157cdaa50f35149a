# BufferPool: the memory every flow receives into, and who owns each byte
# of it.
#
# One provided-buffer ring (one buffer group) is shared by every flow: a
# recv names no buffer, the kernel picks the ring's head entry. The pool
# keeps a shadow of the ring, so each recv CQE says exactly which buffers
# hold its bytes; the bytes become segments of the receiving direction's
# queue (a SegQueue), and a buffer goes back to the ring (buf_return, the
# only way back) when the kernel has stopped filling it and its last
# segment is freed. A segment sent zero-copy is parked, still ours, until
# its notifications have come (the owner frees it then).
#
# The memory is reserved for --max-buffers and committed as buffers are
# first filled; the ring starts with --buffers of them and grows when free
# ones run short. Who may fill how many is the fairness rule (quota).
# Holders whose recv found the ring empty wait on a FIFO list; publish()
# says, once per batch, how many of them the free buffers can serve.
#
# The pool never touches a socket or the ring's SQEs: the driver sets the
# ring up (attach), the owner submits the recvs.

# The provided-buffer ring's size for a pool of up to max(buffers, max_buffers)
# buffers: the next power of two (the kernel's rule for a buffer ring).
cdef uint32_t pool_ring_entries(uint32_t buffers, uint32_t max_buffers) noexcept nogil:
    cdef uint32_t n = max(buffers, max_buffers), entries = 1
    while entries < n and entries < (<uint32_t>1 << 31):
        entries <<= 1
    return entries


def buf_ring_entries(uint32_t buffers, uint32_t max_buffers):
    """The buffer ring's entries for a pool of --buffers/--max-buffers (the
    probe registers one of that size before the engine does)."""
    return pool_ring_entries(buffers, max_buffers)


cdef class BufferPool:
    def __cinit__(self, *, uint32_t buffers, uint32_t max_buffers, uint32_t buffer_size,
                  uint64_t max_inflight, uint32_t holders, bint incremental=False,
                  uint32_t segs_per_buf=SEGS_PER_BUF):
        cdef uint32_t i
        self.max_bufs = max(buffers, max_buffers)
        if self.max_bufs > 32768:
            raise ValueError("at most 32768 buffers (the kernel's buffer-ring limit)")
        self.entries = pool_ring_entries(buffers, max_buffers)
        self.ring_mask = self.entries - 1
        self.buf_size = buffer_size
        self.inc = incremental
        # Free buffers the ring keeps before it grows, and that read-ahead
        # leaves alone (see quota): an eighth of the initial pool.
        self.reserve = max(1, buffers // 8)
        self.budget = max(1, buffers - self.reserve)
        # A short read still pins a whole buffer, so the bound is in buffers.
        self.max_queued = max(1, <uint32_t>(max_inflight // buffer_size))
        self.wait_head = -1
        self.wait_tail = -1
        self.fill = <uint32_t *>calloc(self.max_bufs, sizeof(uint32_t))
        self.refs = <uint32_t *>calloc(self.max_bufs, sizeof(uint32_t))
        self.kern = <uint8_t *>calloc(self.max_bufs, sizeof(uint8_t))
        self.ring_bid = <uint16_t *>calloc(self.entries, sizeof(uint16_t))
        # The table grows when full; segs_per_buf is a test knob (see
        # proxy.py) that makes growth certain rather than a matter of how
        # many completions share a batch.
        self.nsegs = min(<uint32_t>SEG_MAX, buffers * max(1, segs_per_buf))
        self.segs = <Seg *>calloc(self.nsegs, sizeof(Seg))
        if (self.fill == NULL or self.refs == NULL or self.kern == NULL
                or self.ring_bid == NULL or self.segs == NULL):
            raise MemoryError("cannot allocate the buffer pool's tables")
        for i in range(self.nsegs):
            self.segs[i].next = <int32_t>i + 1 if i + 1 < self.nsegs else -1
        # Reserved, not committed (MAP_NORESERVE): a page costs memory once
        # written, so the wait list's links follow the holders that ever
        # waited, and a pool that never grows past --buffers never costs more.
        self.wl_bytes = <size_t>max(1, holders) * 2 * sizeof(int32_t)
        self.wl_next = <int32_t *>reserve_zeroed(self.wl_bytes)
        if self.wl_next == NULL:
            raise MemoryError("cannot reserve the buffer wait list")
        self.wl_prev = self.wl_next + max(1, holders)
        self.mem_bytes = <size_t>self.max_bufs * buffer_size
        self.mem = <char *>reserve_zeroed(self.mem_bytes)
        if self.mem == NULL:
            raise MemoryError(f"cannot reserve {self.mem_bytes} bytes for the buffer pool")

    def __dealloc__(self):
        # The owner closes the ring first: in-flight recvs may point here.
        free(self.fill)
        free(self.refs)
        free(self.kern)
        free(self.ring_bid)
        free(self.segs)
        if self.wl_next != NULL:
            munmap(self.wl_next, self.wl_bytes)
        if self.mem != NULL:
            munmap(self.mem, self.mem_bytes)

    # The ring the driver registered (entries of them): publish the first
    # `buffers` buffers in it.
    cdef void attach(self, io_uring_buf_ring *br, uint32_t buffers) noexcept nogil:
        self.br = br
        self.grow(buffers)
        self.st.pool_grows = 0
        io_uring_buf_ring_advance(self.br, self.br_pending)
        self.ring_tail = <uint32_t>self.br_pending
        self.br_pending = 0

    cdef char *buf_addr(self, uint32_t bid) noexcept nogil:
        return self.mem + <size_t>bid * self.buf_size

# How many more buffers direction D may fill with its next recv: the
# fairness rule of the shared pool.
#
# Every direction may always fill its first buffer. Beyond that it may
# read ahead, up to --max-inflight, only out of a shared budget of
# --buffers (less a reserve) counted over all flows: buffers held beyond
# each holder's first. The pool grows on demand (grow) up to
# --max-buffers, which by default is --buffers + 2 x --max-conns, so
# every direction's first buffer is there however many flows are
# stalled, and the pool's memory is at most (--buffers + 2 x the
# directions holding data) x --buffer-size. A stalled flow (its sink
# does not read) pins what it read before it stalled, one buffer once
# the budget is spent; the rest waits in the kernel's socket buffers,
# where TCP flow control slows its sender.
#
# A recv is single-shot and asks for at most quota x buffer-size bytes
# (a bundle honours the length too), so the bound is exact: a multishot
# recv keeps filling buffers until a cancel lands, and one task-work run
# of the kernel posts dozens (4 stalled flows held ~95 buffers each where
# --max-inflight allowed 16).
#
# A segment sent zero-copy stays ours, in the kernel's socket buffer,
# until its notification, which for a reader that does not read is
# never. So parked segments count as held for the guarantee and the
# shared budget: without that, each stalled zero-copy flow pinned a
# socket buffer's worth of the pool (~4 MiB), and 200 of them starved
# every other flow. The per-direction --max-inflight bound is on the
# queue only, as in copy mode, where the socket buffer holds a copy:
# a moving zero-copy flow keeps its send window.
    cdef uint32_t quota(self, SegQueue *q) noexcept nogil:
        cdef uint32_t extras
        if q.bufs + q.parked == 0:
            return 1
        if q.bufs >= self.max_queued:
            return 0
        extras = self.held - min(self.held, self.holders)
        if extras >= self.budget:
            return 0
        return min(self.budget - extras, self.max_queued - q.bufs)

    # Change what q holds (queued buffers dq, parked segments dp), keeping
    # holders, the count of queues holding anything, exact.
    cdef void hold(self, SegQueue *q, int dq, int dp) noexcept nogil:
        cdef bint was = q.bufs + q.parked > 0
        q.bufs = <uint32_t>(<int>q.bufs + dq)
        q.parked = <uint32_t>(<int>q.parked + dp)
        if was != (q.bufs + q.parked > 0):
            if was:
                self.holders -= 1
            else:
                self.holders += 1

# The bytes a recv CQE carries: from the ring's head entry, at the fill
# that entry already has, on through the next entries (a bundle). With
# DEFER_TASKRUN every completion runs in this thread, one after the
# other, and takes its bytes from the head as it posts its CQE, so CQE
# order is ring order and the shadow ring names every buffer. The CQE's
# own bid must be the head entry; ring_order_errors counts any CQE that
# is not (the tests require 0).
#
# Which buffers the kernel is done with (verified on 6.18): a plain ring
# gives up every buffer a completion touched, however little it wrote.
# An incremental ring (IOU_PBUF_RING_INC) keeps the last one while it
# has room, and says so with IORING_CQE_F_BUF_MORE; the next recv, of
# any flow, continues in it at fill.
#
# The bytes become segments of q; with q NULL they are dropped.
# False if a segment could not be recorded (those bytes are lost).
    cdef int take(self, SegQueue *q, uint32_t bid, int res, uint32_t cflags) noexcept nogil:
        cdef uint32_t mask = self.ring_mask
        cdef uint32_t left = <uint32_t>res if res > 0 else 0
        cdef uint32_t b, n, touched = 0
        cdef bint ok = True
        cdef int order = TAKE_OK
        if self.ring_bid[self.ring_head & mask] != bid:
            # Our shadow and the kernel disagree, so which buffers (or which
            # part of a bundle) hold these bytes is unknown: take the
            # kernel's word for the entry, keep the accounting, and drop the
            # bytes (the caller resets the flow).
            self.st.ring_order_errors += 1
            self.ring_bid[self.ring_head & mask] = <uint16_t>bid
            q = NULL
            order = TAKE_ORDER
        while True:
            b = self.ring_bid[self.ring_head & mask]
            n = min(left, self.buf_size - self.fill[b])
            if n > 0 and q != NULL:
                ok = self.seg_push(q, b, self.fill[b], n) and ok
            self.fill[b] += n
            left -= n
            touched += 1
            if self.inc and left == 0 and (n == 0 or cflags & IORING_CQE_F_BUF_MORE):
                break                      # the kernel keeps filling this one
            # Ownership: ring -> us. It goes back once its segments are gone.
            self.ring_head += 1
            self.kern[b] = 0
            self.held += 1
            if self.refs[b] == 0:
                self.buf_return(b)
            if left == 0:
                break
        if touched > 1:
            self.st.bundles += 1
        if order != TAKE_OK:
            return order
        return TAKE_OK if ok else TAKE_NO_SEG

# Append bytes [off, off + n) of buffer b to q. Bytes that
# continue the tail segment extend it (one flow reading alone fills a
# buffer as one segment). A direction's segments in one buffer are
# adjacent in its queue (a buffer is reused only once all of its
# segments are freed), so q.bufs counts distinct buffers by
# comparing neighbours.
    cdef bint seg_push(self, SegQueue *q, uint32_t b, uint32_t off, uint32_t n) noexcept nogil:
        cdef int32_t t = q.tail
        cdef int32_t si
        cdef Seg *grown
        cdef uint32_t i, cap
        if t >= 0 and self.segs[t].bid == b and self.segs[t].off + self.segs[t].len == off:
            self.segs[t].len += n
            return True
        if self.free_seg < 0:
            # Only incremental buffers can need more than one segment per
            # buffer: tiny reads of many flows interleaved in one buffer.
            # Doubling is rare and amortised; past SEG_MAX the bytes are lost.
            cap = self.nsegs * 2
            if cap > SEG_MAX:
                return False
            grown = <Seg *>realloc(self.segs, cap * sizeof(Seg))
            if grown == NULL:
                return False
            self.segs = grown
            for i in range(self.nsegs, cap):
                self.segs[i].next = <int32_t>i + 1 if i + 1 < cap else -1
            self.free_seg = <int32_t>self.nsegs
            self.nsegs = cap
            self.st.seg_grows += 1
        si = self.free_seg
        self.free_seg = self.segs[si].next
        self.segs[si].bid = <uint16_t>b
        self.segs[si].off = off
        self.segs[si].len = n
        self.segs[si].notif = 0
        self.segs[si].next = -1
        self.refs[b] += 1
        self.segs_live += 1
        if t >= 0:
            self.segs[t].next = si
        else:
            q.head = si
        if t < 0 or self.segs[t].bid != b:
            self.hold(q, 1, 0)
        q.tail = si
        return True

    # Unlink q's head segment and return it (the caller frees or parks it).
    cdef int32_t seg_pop(self, SegQueue *q) noexcept nogil:
        cdef int32_t si = q.head
        q.head = self.segs[si].next
        if q.head < 0:
            q.tail = -1
        if q.head < 0 or self.segs[q.head].bid != self.segs[si].bid:
            self.hold(q, -1, 0)
        self.segs[si].next = -1
        return si

    # Ownership: a popped segment whose zero-copy notifications are still
    # owed stays q's (the kernel holds its pages) until the last one.
    cdef void seg_park(self, SegQueue *q, int32_t si) noexcept nogil:
        self.segs[si].next = SEG_SENT
        self.hold(q, 0, 1)

    # Ownership: segment -> its buffer, which goes back to the ring with its
    # last segment, unless the kernel is still filling it.
    cdef void seg_free(self, int32_t si) noexcept nogil:
        cdef uint32_t b = self.segs[si].bid
        self.segs[si].next = self.free_seg
        self.free_seg = si
        self.segs_live -= 1
        self.refs[b] -= 1
        if self.refs[b] == 0 and not self.kern[b]:
            self.buf_return(b)

    # Ownership: us -> ring. Made visible to the kernel in publish().
    cdef void buf_return(self, uint32_t bid) noexcept nogil:
        self.held -= 1
        self.ring_add(bid)

    cdef void ring_add(self, uint32_t bid) noexcept nogil:
        self.ring_bid[(self.ring_tail + <uint32_t>self.br_pending) & self.ring_mask] = <uint16_t>bid
        io_uring_buf_ring_add(self.br, self.buf_addr(bid), self.buf_size, <unsigned short>bid,
                              self.ring_mask, self.br_pending)
        self.br_pending += 1
        self.fill[bid] = 0
        self.kern[bid] = 1

    # New buffers for the ring, from the reserved region: bids published
    # .. published + n - 1. Their pages cost memory only once filled.
    cdef void grow(self, uint32_t n) noexcept nogil:
        cdef uint32_t i
        n = min(n, self.max_bufs - self.published)
        for i in range(n):
            self.ring_add(self.published + i)
        self.published += n
        if n:
            self.st.pool_grows += 1

    # Once per batch, before the submit: grow if the free buffers are
    # short of the reserve plus the waiters (the recvs prepared in this
    # batch then already find the new ones), and publish the buffers
    # returned. Returns how many are free: the waiters the owner may re-arm.
    cdef uint32_t publish(self) noexcept nogil:
        if self.published - self.held < self.reserve + self.wait_n:
            self.grow(max(self.reserve + self.wait_n, self.published // 4))
        if self.br_pending:
            io_uring_buf_ring_advance(self.br, self.br_pending)
            self.ring_tail += <uint32_t>self.br_pending
            self.br_pending = 0
        return self.published - self.held

    cdef void wait_push(self, uint32_t id) noexcept nogil:
        cdef int32_t me = <int32_t>id
        self.wait_n += 1
        self.wl_next[id] = -1
        self.wl_prev[id] = self.wait_tail
        if self.wait_tail >= 0:
            self.wl_next[self.wait_tail] = me
        else:
            self.wait_head = me
        self.wait_tail = me

    cdef void wait_remove(self, uint32_t id) noexcept nogil:
        if self.wl_prev[id] >= 0:
            self.wl_next[self.wl_prev[id]] = self.wl_next[id]
        else:
            self.wait_head = self.wl_next[id]
        if self.wl_next[id] >= 0:
            self.wl_prev[self.wl_next[id]] = self.wl_prev[id]
        else:
            self.wait_tail = self.wl_prev[id]
        self.wait_n -= 1

    def stats(self):
        """The pool's counters and its state now."""
        s = dict(self.st)
        s["bufs_held"] = self.held
        s["pool_buffers"] = self.published
        s["segments_out"] = self.segs_live
        s["waiting_for_buffers"] = int(self.wait_head >= 0)   # 0/1: any holder waiting
        return s
