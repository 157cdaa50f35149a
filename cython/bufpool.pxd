# BufferPool: the provided-buffer ring every flow receives into, and the
# segments, references and wait list that say who owns each byte (see
# bufpool.pyx).

cdef enum:
    SEG_MAX = 1 << 20        # segments a user_data field can name
    SEG_SENT = -2            # Seg.next: fully sent, waiting for its notifications
    SEGS_PER_BUF = 8         # initial segment table, per buffer (it doubles when full)
    TAKE_OK = 0              # take(): the bytes are queued (or dropped as asked)
    TAKE_NO_SEG = 1          # ... no segment could record them: lost
    TAKE_ORDER = 2           # ... the CQE's buffer is not the ring's head entry: untrusted

# A run of received bytes inside one pool buffer. Without incremental
# buffers a segment is a whole buffer's fill; with them (6.12+) the kernel
# packs consecutive recvs, of any flows, into one buffer, and each recv's
# bytes are a segment of it. Send queues and zero-copy notifications work
# on segments; a buffer goes home when the kernel is done filling it and
# its last segment is freed.
cdef struct Seg:
    uint16_t bid
    uint16_t notif          # zero-copy notifications still owed for its bytes
    uint32_t off            # where its bytes start in the buffer
    uint32_t len
    int32_t next            # the queue's next segment, the free list's next,
                            # or SEG_SENT: sent, waiting for its notifications

# What one holder (a flow's direction) has of the pool: a FIFO of
# segments, and what it holds counted the way the fairness rule needs.
cdef struct SegQueue:
    int32_t head            # FIFO through Seg.next, -1 = empty
    int32_t tail
    uint32_t bufs           # distinct buffers the queued segments pin (a short
                            # read pins its whole buffer)
    uint32_t parked         # segments sent zero-copy, waiting for notifications:
                            # the kernel's socket buffer holds our pages

cdef struct PoolStats:
    uint64_t ring_order_errors  # a buffer CQE not naming the ring's head entry, or our
                                # head not the kernel's at the end (must stay 0)
    uint64_t seg_grows          # the segment table was full and doubled
    uint64_t bundles            # recv completions that filled more than one buffer
    uint64_t pool_grows         # batches of buffers added beyond --buffers

@cython.final
cdef class BufferPool:
    # The ring, set up by the driver (attach); the shadow of its entries.
    cdef io_uring_buf_ring *br
    cdef readonly uint32_t entries   # ring entries: a power of two >= max_bufs
    cdef uint32_t ring_mask
    cdef uint16_t *ring_bid    # the bid at each entry
    cdef uint32_t ring_tail    # entries published (mirrors the shared tail)
    cdef uint32_t ring_head    # entries the kernel has handed us, in CQE order
    cdef int br_pending        # buffers returned since the last ring advance
    cdef readonly bint inc     # incremental consumption (IOU_PBUF_RING_INC, 6.12+)

    # The memory: max_bufs buffers reserved, `published` of them ever given
    # to the ring (a page costs memory once the kernel first fills it).
    cdef char *mem
    cdef size_t mem_bytes
    cdef readonly uint32_t buf_size
    cdef readonly uint32_t max_bufs
    cdef readonly uint32_t published
    cdef uint32_t *fill        # bytes the kernel wrote into each buffer since given
    cdef uint32_t *refs        # segments alive in each buffer
    cdef uint8_t *kern         # 1 while the buffer is in the ring: the kernel may fill it
    cdef readonly uint32_t held     # buffers taken from the ring, not yet returned

    # Segments
    cdef Seg *segs
    cdef uint32_t nsegs
    cdef int32_t free_seg       # free list through Seg.next
    cdef readonly uint32_t segs_live

    # The fairness rule (quota)
    cdef uint32_t reserve          # free buffers kept before the pool grows
    cdef uint32_t budget           # buffers all holders may hold beyond their first
    cdef uint32_t max_queued       # --max-inflight, in whole buffers
    cdef uint32_t holders          # holders whose queue or parked count is non-zero

    # Holders (ids) whose recv found the ring empty, oldest first; the
    # links live in reserved arrays indexed by id.
    cdef int32_t *wl_next
    cdef int32_t *wl_prev
    cdef size_t wl_bytes
    cdef readonly int32_t wait_head
    cdef int32_t wait_tail
    cdef uint32_t wait_n

    cdef PoolStats st

    cdef void attach(self, io_uring_buf_ring *br, uint32_t buffers) noexcept nogil
    cdef int take(self, SegQueue *q, uint32_t bid, int res, uint32_t cflags) noexcept nogil
    cdef bint seg_push(self, SegQueue *q, uint32_t b, uint32_t off, uint32_t n) noexcept nogil
    cdef int32_t seg_pop(self, SegQueue *q) noexcept nogil
    cdef void seg_park(self, SegQueue *q, int32_t si) noexcept nogil
    cdef void seg_free(self, int32_t si) noexcept nogil
    cdef char *buf_addr(self, uint32_t bid) noexcept nogil
    cdef uint32_t quota(self, SegQueue *q) noexcept nogil
    cdef void hold(self, SegQueue *q, int dq, int dp) noexcept nogil
    cdef void buf_return(self, uint32_t bid) noexcept nogil
    cdef void ring_add(self, uint32_t bid) noexcept nogil
    cdef void grow(self, uint32_t n) noexcept nogil
    cdef uint32_t publish(self) noexcept nogil
    cdef void wait_push(self, uint32_t id) noexcept nogil
    cdef void wait_remove(self, uint32_t id) noexcept nogil
