# Copy mode's data path, which zerocopy, auto and peek build on: recv
# into the shared buffer pool (bufpool.pyx) within the direction's quota,
# send from the direction's queue (a short send resumes at head_off), and
# forward the FIN after the last byte. flow_step (engine.pyx) decides
# when each step runs.

cdef void on_recv(Engine e, Flow *f, int d, int res, uint32_t cflags) noexcept nogil:
    cdef Dir *D = &f.dir[d]
    cdef int taken
    if not (cflags & IORING_CQE_F_MORE):
        D.flags &= ~D_RECV_ARMED
    if cflags & IORING_CQE_F_BUFFER:
        # Ownership: kernel -> this direction's send queue (dropped if
        # the flow is ending or nothing was read).
        taken = take_bytes(e, &D.q if res > 0 and f.state == F_OPEN else NULL, res, cflags)
        if taken != TAKE_OK:
            # The bytes are lost (no room to record them), or cannot be
            # trusted (the CQE's buffer is not the one the ring order
            # says): the flow must not go on as if they were sent.
            flow_fail(e, f, C_RESOURCE, ENOMEM if taken == TAKE_NO_SEG else EPROTO, 3)
            return
    if res > 0 and e.peek and f.state == F_OPEN:
        if d == 0:
            D.peeked += <uint32_t>res
        else:
            f.replayable = 0     # the upstream answered: no failover from here
    if f.state != F_OPEN or res > 0:
        return
    if res == 0:
        D.flags |= D_EOF
        tw_half_closed(e, f)
        if d == 1:
            f.replayable = 0
    elif res == -EAGAIN:
        # Only a peek (MSG_DONTWAIT) ends so: nothing lies past the peek
        # offset. The client's poll says when that changes.
        D.flags &= ~D_READY
        e.st.peek_eagain += 1
    elif res == -ENOBUFS:
        # The pool is empty: backpressure, not an error. The bytes stay in
        # the socket; bufs_flush() re-arms us when buffers come back.
        e.st.enobufs += 1
        wait_push(e, <uint32_t>(f - e.flows), d)
    elif res != -ECANCELED:
        side_failed(e, f, d, res)

# The bytes of a recv CQE that names a buffer, into q (NULL: dropped): the
# pool says where they are; a CQE that contradicts the ring's order is
# never expected and is reported once per run of them (an engine_error).
cdef int take_bytes(Engine e, SegQueue *q, int res, uint32_t cflags) noexcept nogil:
    cdef int taken = e.pool.take(q, cflags >> IORING_CQE_BUFFER_SHIFT, res, cflags)
    if taken == TAKE_ORDER:
        e.events.note(EV_ENGINE_ERROR, ERR_RING_ORDER, 0, 0, e.batch_ns)
    return taken

cdef void on_send(Engine e, Flow *f, int d, int res) noexcept nogil:
    cdef Dir *D = &f.dir[d]
    cdef int32_t si
    cdef int avail
    D.flags &= ~D_SEND_BUSY
    if f.state != F_OPEN:
        if res > 0:
            D.moved_bytes += <uint64_t>res    # they reached the sink all the same
        return
    if res <= 0:
        # 0 cannot happen for a non-empty TCP send; treat it as the sink
        # failing rather than resubmitting the same send forever.
        if res != -ECANCELED:
            side_failed(e, f, 1 - d, res if res < 0 else -EPIPE)
        return
    if <uint32_t>res < D.send_len:
        e.st.short_sends += 1      # the rest goes out in the next send
    D.moved_bytes += <uint64_t>res
    # Consume res bytes from the head of the queue; each segment fully
    # sent leaves it (seg_sent decides where to).
    while res > 0:
        si = D.q.head
        avail = <int>(e.pool.segs[si].len - D.head_off)
        if res < avail:
            D.head_off += <uint32_t>res
            break
        res -= avail
        D.head_off = 0
        seg_sent(e, f, d, e.pool.seg_pop(&D.q))

# Ownership: send queue -> freed, or -> parked until the notifications
# owed for these bytes have all arrived (then on_send_zc frees it).
cdef void seg_sent(Engine e, Flow *f, int d, int32_t si) noexcept nogil:
    if e.pool.segs[si].notif:
        e.pool.seg_park(&f.dir[d].q, si)
    else:
        delivered(e, f, d, si)
        e.pool.seg_free(si)

# Forward direction d's FIN, now. shutdown(SHUT_WR) on a TCP socket
# queues the FIN behind the bytes already sent and returns; it never
# blocks. io_uring's SHUTDOWN op cannot complete inline: the kernel hands
# every one to an io-wq worker, and waking it cost 16% of the proxy's CPU
# with a new connection per request (perf, wrk -H "Connection: close").
# So it is a plain syscall, on both backends. A failure (the peer reset
# meanwhile) fails the flow; flow_step stops stepping a flow that failed.
cdef void shut_wr(Engine e, Flow *f, int d) noexcept nogil:
    cdef int res = shutdown(f.fd[1 - d], SHUT_WR)
    f.dir[d].flags |= D_SHUT_SENT | D_SHUT_DONE
    if res != 0 and f.state == F_OPEN:
        side_failed(e, f, 1 - d, -errno)

# Writing from the buffer queue (copy, zerocopy, auto, peek).
cdef void send_step(Engine e, uint32_t slot, Flow *f, int d) noexcept nogil:
    cdef Dir *D = &f.dir[d]
    cdef io_uring_sqe *s
    cdef int32_t si
    cdef Seg *g
    cdef int n
    cdef uint32_t off
    if not (D.flags & D_SEND_BUSY):
        if D.q.head >= 0:
            # Everything queued (up to SEND_IOV segments) in one send; the
            # head may be partly sent already (head_off).
            n = 0
            off = D.head_off
            si = D.q.head
            D.send_len = 0
            while si >= 0 and n < SEND_IOV:
                g = &e.pool.segs[si]
                D.iov[n].iov_base = e.pool.buf_addr(g.bid) + g.off + off
                D.iov[n].iov_len = g.len - off
                D.send_len += <uint32_t>D.iov[n].iov_len
                off = 0
                n += 1
                si = g.next
            if e.zc and D.iov[0].iov_len >= e.zc_threshold and not (D.flags & D_ZC_OFF):
                zc_send(e, slot, f, d)
            elif n == 1:
                s = e.flow_sqe(slot, f, OP_SEND, d)
                io_uring_prep_send(s, f.fd[1 - d], D.iov[0].iov_base,
                                   D.iov[0].iov_len, MSG_NOSIGNAL)
            else:
                s = e.flow_sqe(slot, f, OP_SEND, d)
                memset(&D.msg, 0, sizeof(msghdr))
                D.msg.msg_iov = D.iov
                D.msg.msg_iovlen = n
                io_uring_prep_sendmsg(s, f.fd[1 - d], &D.msg, MSG_NOSIGNAL)
            D.flags |= D_SEND_BUSY
        elif (D.flags & D_EOF) and not (D.flags & D_SHUT_SENT):
            shut_wr(e, f, d)

# Reading into the buffer pool (copy, zerocopy, auto; peek's upstream side).
cdef void recv_step(Engine e, uint32_t slot, Flow *f, int d) noexcept nogil:
    cdef Dir *D = &f.dir[d]
    cdef io_uring_sqe *s
    cdef uint32_t quota
    # Read again once the queue is down to half of what this direction
    # may hold, so a sink that keeps up sees few large writes and a
    # recv/send pair per buffer is avoided at the boundary.
    if D.flags & (D_RECV_ARMED | D_EOF | D_WAIT_BUF):
        return
    quota = e.pool.quota(&D.q)
    if quota == 0 or quota < D.q.bufs:
        return
    s = e.flow_sqe(slot, f, OP_RECV, d)
    uc_prep_recv_select(s, f.fd[d], 0, e.bundle, 0)
    s.len = quota * e.pool.buf_size
    D.flags |= D_RECV_ARMED

# The buffer pool's wait list holds directions (slot * 2 + d) whose recv
# found the ring empty; bufs_flush re-arms them as buffers come back.
cdef void wait_push(Engine e, uint32_t slot, int d) noexcept nogil:
    e.flows[slot].dir[d].flags |= D_WAIT_BUF
    e.pool.wait_push(slot * 2 + <uint32_t>d)

cdef void wait_remove(Engine e, uint32_t slot, int d) noexcept nogil:
    e.flows[slot].dir[d].flags &= ~D_WAIT_BUF
    e.pool.wait_remove(slot * 2 + <uint32_t>d)
