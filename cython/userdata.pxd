# user_data: the 64 bits an SQE carries back in its CQEs, laid out in this
# one place for every user of a ring.
#
#   bits  0-19  slot    the user's object (a proxy flow's table index; 0 for
#                       the user's own ops: accept, timers, the wakeup poll)
#        20-33  gen     the slot's generation, mod 2^14: a CQE that outlives
#                       its object is recognised and dropped
#        34-53  seg     SEND_ZC: the segment whose bytes its notification frees
#        54-58  op      the user's op code, 1..31 (0 is never prepared)
#        59     dir     the direction, or the side
#        60-63  owner   who prepared the SQE, so whose dispatcher gets the CQE
#
# The owner tag is how several users share one ring: each has its own op
# codes and objects, and a loop hands every CQE to its owner's handler
# (driver.pxd says what a user may call; docs/architecture.md has the rule
# for adding one). The widths are checked when the module loads (engine.pyx).

cdef enum:
    UD_SLOT_BITS = 20
    UD_GEN_BITS = 14
    UD_SEG_BITS = 20
    UD_OP_BITS = 5
    UD_OWNER_BITS = 4
    UD_GEN_SHIFT = 20
    UD_SEG_SHIFT = 34
    UD_OP_SHIFT = 54
    UD_DIR_SHIFT = 59
    UD_OWNER_SHIFT = 60

cdef enum Owner:
    OWNER_NONE = 0      # start-up probes (ring.pyx); never a live user's CQE
    OWNER_PROXY = 1     # the proxy engine: flows, accept, its timers, the wakeup fd
    OWNER_SELECTOR = 2  # a PollSet (pollset.pyx): slot = the fd polled
    OWNER_LOOP = 3      # uring_net.aio's operations (loopops.pyx): slot = the op's
    OWNER_HEALTH = 4    # the proxy's health checks (health.pxi): slot = the upstream

cdef inline uint64_t ud_make(uint32_t owner, uint32_t slot, uint32_t gen, uint32_t op,
                             uint32_t d) noexcept nogil:
    return ((<uint64_t>slot & ((1 << UD_SLOT_BITS) - 1))
            | ((<uint64_t>gen & ((1 << UD_GEN_BITS) - 1)) << UD_GEN_SHIFT)
            | ((<uint64_t>op & ((1 << UD_OP_BITS) - 1)) << UD_OP_SHIFT)
            | ((<uint64_t>d & 1) << UD_DIR_SHIFT)
            | ((<uint64_t>owner) << UD_OWNER_SHIFT))

cdef inline uint64_t ud_with_seg(uint64_t ud, uint32_t seg) noexcept nogil:
    return ud | ((<uint64_t>seg & ((1 << UD_SEG_BITS) - 1)) << UD_SEG_SHIFT)

cdef inline uint32_t ud_owner(uint64_t ud) noexcept nogil:
    return <uint32_t>(ud >> UD_OWNER_SHIFT)

cdef inline uint32_t ud_slot(uint64_t ud) noexcept nogil:
    return <uint32_t>(ud & ((1 << UD_SLOT_BITS) - 1))

cdef inline uint32_t ud_gen(uint64_t ud) noexcept nogil:
    return <uint32_t>((ud >> UD_GEN_SHIFT) & ((1 << UD_GEN_BITS) - 1))

cdef inline uint32_t ud_seg(uint64_t ud) noexcept nogil:
    return <uint32_t>((ud >> UD_SEG_SHIFT) & ((1 << UD_SEG_BITS) - 1))

cdef inline uint32_t ud_op(uint64_t ud) noexcept nogil:
    return <uint32_t>((ud >> UD_OP_SHIFT) & ((1 << UD_OP_BITS) - 1))

cdef inline uint32_t ud_dir(uint64_t ud) noexcept nogil:
    return <uint32_t>((ud >> UD_DIR_SHIFT) & 1)

# A generation as user_data carries it: compare this with ud_gen().
cdef inline uint32_t ud_gen_of(uint32_t gen) noexcept nogil:
    return gen & ((1 << UD_GEN_BITS) - 1)
