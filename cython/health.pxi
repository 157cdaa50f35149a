# Health checks: a TCP connect to every upstream each --health-interval,
# on the engine's own ring, as operations under their own owner tag
# (OWNER_HEALTH: slot = the upstream's index, gen = the check's round).
# No thread, no Python: a timer CQE starts a round, each connect's CQE
# is one result for Upstreams.check_done, which decides up and down by
# --rise and --fall. A change of state is pushed to the event log (one
# line each); the checks themselves are counted, not logged.
#
# A check's connect carries a linked timeout (the connect timeout, at
# most the interval), so a check never outlives its round by much; one
# still in flight when the next round comes is left to finish, not doubled.

cdef enum HealthOp:
    HC_TIMER = 1             # the interval's timeout: start a round
    HC_CONNECT               # a check's connect
    HC_TIMEOUT               # ... and its linked timeout (only counted as done)

cdef inline uint64_t health_ud(uint32_t up, uint32_t round_, int op) noexcept nogil:
    return ud_make(OWNER_HEALTH, up, round_, <uint32_t>op, 0)

cdef void health_arm(Engine e) noexcept nogil:
    cdef io_uring_sqe *s
    if e.hc_interval_ns == 0 or e.hc_timer or e.stopping:
        return
    s = e.sqe()
    io_uring_prep_timeout(s, &e.hc_interval_ts, 0, 0)
    io_uring_sqe_set_data64(s, health_ud(0, 0, HC_TIMER))
    e.hc_timer = True

cdef void health_round(Engine e) noexcept nogil:
    cdef io_uring_sqe *s
    cdef Upstream *c
    cdef uint32_t i
    cdef int fd
    e.hc_round += 1
    for i in range(e.ups.n):
        c = &e.ups.u[i]
        if c.check_fd >= 0:
            continue
        fd = socket(c.family, SOCK_STREAM | SOCK_CLOEXEC, 0)
        if fd < 0:
            # Out of fds is the proxy's shortage, not the upstream's failure.
            e.st.health_skipped += 1
            continue
        c.check_fd = fd
        c.check_gen = e.hc_round
        e.reserve(2)
        s = e.sqe()
        io_uring_prep_connect(s, fd, <sockaddr *>&c.addr, c.addr_len)
        s.flags |= IOSQE_IO_LINK
        io_uring_sqe_set_data64(s, health_ud(i, e.hc_round, HC_CONNECT))
        s = e.sqe()
        io_uring_prep_link_timeout(s, &e.hc_timeout_ts, 0)
        io_uring_sqe_set_data64(s, health_ud(i, e.hc_round, HC_TIMEOUT))

cdef void on_health(Engine e, uint64_t ud, int res) noexcept nogil:
    cdef uint32_t op = ud_op(ud)
    cdef uint32_t i = ud_slot(ud)
    cdef Upstream *c
    cdef int err, change
    cdef Event *r
    if op == HC_TIMER:
        e.hc_timer = False
        if not e.stopping:
            health_round(e)
            health_arm(e)
        return
    if op != HC_CONNECT:
        return
    if i >= e.ups.n:
        e.st.unknown_cqes += 1
        return
    c = &e.ups.u[i]
    if c.check_fd < 0 or ud_gen_of(c.check_gen) != ud_gen(ud):
        e.st.stale_cqes += 1
        return
    # The connect has completed: nothing else uses the socket.
    e.close_fd(c.check_fd)
    c.check_fd = -1
    # -ECANCELED: the linked timeout fired first.
    err = 0 if res == 0 else (ETIMEDOUT if res == -ECANCELED else -res)
    change = e.ups.check_done(<int>i, err, e.rise, e.fall)
    if change != 0:
        r = e.events.push(EV_HEALTH, 1 if change > 0 else 0, e.batch_ns)
        if r != NULL:
            r.up_idx = <uint8_t>i
            r.err = err
            r.arg = c.ok_run if change > 0 else c.fail_run

# Checks in flight when the engine goes: their sockets are ours to close.
cdef void health_close(Engine e) noexcept nogil:
    cdef uint32_t i
    for i in range(e.ups.n):
        if e.ups.u[i].check_fd >= 0:
            close(e.ups.u[i].check_fd)
            e.ups.u[i].check_fd = -1
