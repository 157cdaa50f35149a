# How a flow ends: timeouts on the timer wheel, errors seen on a side
# nothing else watches, flow_fail (the one way into closing), cancels by
# exact user_data, and the close path that frees the slot only once every
# completion naming it has come.

# --- timeouts: idle and half-closed flows, on a timer wheel (timers.pyx) ----------
#
# HAProxy's `timeout client/server` and `client-fin/server-fin`: a flow
# in which no byte moved for --idle-timeout, or, once one side sent its
# FIN, for that side's fin timeout, is ended with an RST to both sides.
# Nothing is done per idle flow between expiries: a byte that moves only
# stamps t_active_ns (the batch's clock), and the wheel entry, placed at
# the deadline known when it was placed, is looked at when its tick
# comes; a flow that moved meanwhile is placed again at its new deadline.
# So each open flow costs one look per timeout period (per 409.6 s lap
# for longer ones), and the loop's wait ends at the next non-empty tick.
# No timeout SQE per flow, no Python object.

cdef int64_t flow_deadline(Engine e, Flow *f, uint8_t *cause) noexcept nogil:
    cdef int64_t t = INT64_MAX
    cdef uint8_t c = C_NONE
    if e.idle_ns:
        t = f.t_active_ns + e.idle_ns
        c = C_IDLE_TIMEOUT
    if e.cfin_ns and f.dir[0].flags & D_EOF and f.t_active_ns + e.cfin_ns < t:
        t = f.t_active_ns + e.cfin_ns
        c = C_CLIENT_FIN_TIMEOUT
    if e.sfin_ns and f.dir[1].flags & D_EOF and f.t_active_ns + e.sfin_ns < t:
        t = f.t_active_ns + e.sfin_ns
        c = C_SERVER_FIN_TIMEOUT
    if cause != NULL:
        cause[0] = c
    return t

cdef void cancel_fallback(Engine e, uint32_t slot, Flow *f) noexcept nogil:
    cdef io_uring_sqe *s
    cdef int side
    e.st.cancel_fallbacks += 1
    for side in range(2):
        if f.fd[side] >= 0:
            s = e.flow_sqe(slot, f, OP_CANCEL, side)
            io_uring_prep_cancel_fd(s, f.fd[side], IORING_ASYNC_CANCEL_ALL)

# A FIN makes the side's fin timeout apply, which may come well before
# the deadline the entry was placed at: place it again.
cdef void tw_half_closed(Engine e, Flow *f) noexcept nogil:
    cdef uint32_t slot = <uint32_t>(f - e.flows)
    if e.tw.holds(slot):
        e.tw.add(slot, flow_deadline(e, f, NULL))

# Every flow whose tick has come: expired, or placed again at the
# deadline it has now (it moved, or its deadline is more than a lap
# away). A closing flow is in the wheel only for its cancel check.
cdef void tw_expire(Engine e, int64_t now) noexcept nogil:
    cdef int32_t x
    cdef Flow *f
    cdef int64_t dl
    cdef uint8_t cause = C_NONE
    while True:
        x = e.tw.pop_due(now)
        if x < 0:
            return
        f = &e.flows[x]
        e.st.tw_visits += 1
        if f.state == F_HEADER:
            # Its only entry: the header's deadline (--proxy-header-timeout).
            e.st.timeouts += 1
            flow_fail(e, f, C_HEADER_TIMEOUT, ETIMEDOUT, 0)
            e.flow_step(<uint32_t>x)
            continue
        if f.state != F_OPEN:
            # A closing flow's cancels were looked at again (flow_fail).
            if f.inflight > f.zc_owed and (f.state == F_CLOSING or f.state == F_REDIAL):
                cancel_fallback(e, <uint32_t>x, f)
            continue
        dl = flow_deadline(e, f, &cause)
        if dl <= now:
            e.st.timeouts += 1
            flow_fail(e, f, cause, ETIMEDOUT, 3)
            e.flow_step(<uint32_t>x)
        else:
            e.tw.add(<uint32_t>x, dl)

# --- errors on a side nothing else is watching -------------------------------
#
# A side's reset reaches the engine through an operation on it: a recv
# (or splice in, or peek-mode poll) reading from it, or a send writing to
# it. A direction that is paused -- backpressure at --max-inflight, no
# buffer for its first recv, splice's OUT_WAIT/IN_STUCK, peek waiting for
# room -- has none, and the other direction may be stalled on a peer that
# never reads: the reset would go unnoticed and the flow would be held for
# ever. So a side with neither gets a multishot poll for POLLERR|POLLHUP.
# It asks for no readiness, so it is quiet on a socket that holds unread
# bytes (the level-triggered trap of peek mode) and posts only when the
# socket errs or hangs up; armed once, it stays until the flow ends.
cdef void watch_step(Engine e, uint32_t slot, Flow *f) noexcept nogil:
    cdef io_uring_sqe *s
    cdef int side
    for side in range(2):
        if f.watch & (1 << side) or f.fd[side] < 0:
            continue
        if f.dir[side].flags & (D_RECV_ARMED | D_POLL_ARMED) \
                or f.dir[1 - side].flags & D_SEND_BUSY:
            continue
        s = e.flow_sqe(slot, f, OP_ERRWATCH, side)
        io_uring_prep_poll_multishot(s, f.fd[side], POLLERR | POLLHUP)
        f.watch |= <uint8_t>(1 << side)

cdef void on_errwatch(Engine e, Flow *f, int side, int res, uint32_t cflags) noexcept nogil:
    if not (cflags & IORING_CQE_F_MORE):
        f.watch &= <uint8_t>~(1 << side)    # re-armed by watch_step while needed
    if f.state == F_OPEN:
        side_error(e, f, side, res)

# A poll said `res` of a side: a pending socket error (SO_ERROR: a
# reset sets ECONNRESET, or EPIPE in CLOSE_WAIT) fails the flow. POLLERR
# alone is not one: MSG_ZEROCOPY completions on the error queue raise it
# too (the epoll backend's zero-copy sends). A hang-up without an error
# is the normal end of both directions, which their FINs and shutdowns
# report on their own.
cdef void side_error(Engine e, Flow *f, int side, int res) noexcept nogil:
    cdef int err = 0
    cdef socklen_t len = sizeof(int)
    if res <= 0 or not (<uint32_t>res & (POLLERR | POLLHUP)):
        return
    getsockopt(f.fd[side], SOL_SOCKET, SO_ERROR, &err, &len)
    if err != 0:
        e.st.paused_errors += 1
        side_failed(e, f, side, -err)

# A socket of the flow failed (reset, broken pipe...). The other side is
# reset too: a reset on one side becomes a reset on the other.
cdef void side_failed(Engine e, Flow *f, int side, int res) noexcept nogil:
    flow_fail(e, f, C_CLIENT_RESET if side == 0 else C_UPSTREAM_RESET,
              -res, <uint8_t>(1 << (1 - side)))

# The one way into F_CLOSING. The first cause wins. In-flight operations
# are cancelled; fds close only when the last of their CQEs is in.
cdef void flow_fail(Engine e, Flow *f, uint8_t cause, int err, uint8_t reset_mask) noexcept nogil:
    cdef uint32_t slot = <uint32_t>(f - e.flows)
    cdef uint8_t was = f.state
    cdef int d
    cdef Dir *D
    if f.state >= F_CLOSING:
        return
    e.tw.remove(<uint32_t>(f - e.flows))
    f.cause = cause
    f.err = err
    if can_redial(e, f, cause):
        # Not the end: the next upstream gets the flow (redial()).
        f.state = F_REDIAL
    else:
        f.state = F_CLOSING
        f.reset_mask = reset_mask
    if f.inflight == f.zc_owed:
        return
    # Cancel each operation in flight by its exact user_data. A cancel by
    # fd (IORING_ASYNC_CANCEL_FD) makes the kernel walk every armed poll
    # of the ring, so a storm of N failing flows cost O(N^2): 9,900
    # clients resetting at once took 22 s of CPU, 2.2 ms a flow.
    if was == F_HEADER:
        cancel_op(e, slot, f, OP_HDRPOLL, 0, f.fd[0], -1)
    if was == F_CONNECTING and f.fd[1] >= 0:
        cancel_op(e, slot, f, OP_CONNECT, 0, f.fd[1], -1)
    for d in range(2):
        D = &f.dir[d]
        if D.flags & D_RECV_ARMED:
            if e.splice:
                cancel_op(e, slot, f, OP_SPLICE_IN, d, f.fd[d], -1)
            else:
                cancel_op(e, slot, f, OP_RECV, d, f.fd[d], -1)
        if D.flags & D_SEND_BUSY:
            if e.splice:
                cancel_op(e, slot, f, OP_POLL_OUT, d, f.fd[1 - d], -1)
                cancel_op(e, slot, f, OP_SPLICE_OUT, d, f.fd[1 - d], -1)
            else:
                # Which of the two went is not recorded; the other's
                # cancel finds nothing (-ENOENT).
                cancel_op(e, slot, f, OP_SEND, d, f.fd[1 - d], -1)
                cancel_op(e, slot, f, OP_SEND_ZC, d, f.fd[1 - d], D.q.head)
        if D.flags & D_POLL_ARMED:
            cancel_op(e, slot, f, OP_WATCH, d, f.fd[d], -1)
        if D.flags & D_CONSUME_BUSY:
            cancel_op(e, slot, f, OP_CONSUME, d, f.fd[d], -1)
        if f.watch & (1 << d):
            cancel_op(e, slot, f, OP_ERRWATCH, d, f.fd[d], -1)
    # Defence in depth: an operation this list missed would hold the flow
    # for ever. The wheel looks again in CANCEL_CHECK_NS and, if anything
    # but notifications is still in flight, cancels by fd (counted in
    # cancel_fallbacks, which the tests require to stay 0).
    e.tw.add(slot, e.batch_ns + CANCEL_CHECK_NS)

# A cancel of one operation by its user_data. The fd it works on goes in
# the SQE too: io_uring ignores it without IORING_ASYNC_CANCEL_FD, and the
# epoll driver then looks only at that fd's waiting operations.
cdef void cancel_op(Engine e, uint32_t slot, Flow *f, int op, int d, int fd, int32_t si) noexcept nogil:
    cdef uint64_t ud = proxy_ud(slot, f.gen, op, d)
    cdef io_uring_sqe *s
    if fd < 0:
        return
    if si >= 0:
        ud = ud_with_seg(ud, si)
    s = e.flow_sqe(slot, f, OP_CANCEL, d)
    io_uring_prep_cancel64(s, ud, 0)
    s.fd = fd

# --- the close path ------------------------------------------------------------

# Nothing but zero-copy notifications is in flight: a queued segment is
# ours to give back, unless a notification is still owed for its bytes
# (a short SEND_ZC left it at the head); then it is parked like a sent
# one, and its last notification frees it.
cdef void flow_drop_queues(Engine e, uint32_t slot, Flow *f) noexcept nogil:
    cdef int d
    cdef int32_t si
    for d in range(2):
        while f.dir[d].q.head >= 0:
            si = e.pool.seg_pop(&f.dir[d].q)
            if e.pool.segs[si].notif:
                e.pool.seg_park(&f.dir[d].q, si)
            else:
                e.pool.seg_free(si)
        if f.dir[d].flags & D_WAIT_BUF:
            wait_remove(e, slot, d)

cdef void flow_close_fds(Engine e, uint32_t slot, Flow *f) noexcept nogil:
    cdef linger lg
    cdef io_uring_sqe *s
    cdef int side
    e.tw.remove(<uint32_t>(f - e.flows))
    flow_drop_queues(e, slot, f)
    for side in range(2):
        if f.dir[side].pipe_r >= 0:
            e.pipes.put(f.dir[side].pipe_r, f.dir[side].pipe_w, f.dir[side].pipe_cap,
                        f.dir[side].pipe_bytes)
            f.dir[side].pipe_r = -1
            f.dir[side].pipe_w = -1
            f.dir[side].pipe_bytes = 0
    lg.l_onoff = 1
    lg.l_linger = 0
    for side in range(2):
        if f.fd[side] < 0:
            continue
        if f.reset_mask & (1 << side):
            # SO_LINGER {1, 0}: close sends RST instead of FIN.
            setsockopt(f.fd[side], SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))
        s = e.flow_sqe(slot, f, OP_CLOSE, side)
        io_uring_prep_close(s, f.fd[side])
        f.fd[side] = -1
    f.t_fds_closed_ns = now_ns() if f.zc_owed else 0
    f.state = F_CLOSED_WAIT

cdef void flow_release(Engine e, uint32_t slot, Flow *f) noexcept nogil:
    cdef Event *r = e.events.push(EV_CLOSE, f.cause, e.batch_ns)
    if r != NULL:
        memcpy(&r.client, &f.peer, sizeof(sockaddr_storage))
        r.c2u_bytes = f.dir[0].moved_bytes
        r.u2c_bytes = f.dir[1].moved_bytes
        r.duration_ns = now_ns() - f.t_start_ns
        r.err = f.err
        r.up_idx = f.up_idx
        r.failovers = f.failovers
    e.st.closed += 1
    e.cause_n[f.cause & 15] += 1
    if f.up_idx != NO_UPSTREAM:
        e.ups.detach(f.up_idx)
    if f.t_fds_closed_ns:
        e.st.zc_close_waits += 1
        e.st.zc_close_wait_ns += <uint64_t>(now_ns() - f.t_fds_closed_ns)
    e.st.c2u_bytes += f.dir[0].moved_bytes
    e.st.u2c_bytes += f.dir[1].moved_bytes
    f.gen += 1
    f.state = F_FREE
    f.next_free = e.free_head
    e.free_head = <int32_t>slot
    e.nactive -= 1
    fdw_retry(e)      # its two fds are closed now
    accept_step(e)


# --- a worker whose loop failed ------------------------------------------------

cdef void flows_reset(Engine self) noexcept nogil:
    """Every open flow's sockets closed with an RST (SO_LINGER 0) and its
    pipes closed, at once and without the ring: its clients and upstreams see
    a reset, never a connection that hangs (Engine.reset_all)."""
    cdef uint32_t i
    cdef int side
    cdef linger lg
    lg.l_onoff = 1
    lg.l_linger = 0
    for i in range(self.slots_used):
        if self.flows[i].state == F_FREE:
            continue
        for side in range(2):
            if self.flows[i].fd[side] >= 0:
                setsockopt(self.flows[i].fd[side], SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))
                close(self.flows[i].fd[side])
                self.flows[i].fd[side] = -1
            if self.flows[i].dir[side].pipe_r >= 0:
                close(self.flows[i].dir[side].pipe_r)
            if self.flows[i].dir[side].pipe_w >= 0:
                close(self.flows[i].dir[side].pipe_w)
            self.flows[i].dir[side].pipe_r = self.flows[i].dir[side].pipe_w = -1
