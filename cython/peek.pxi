# --- peek mode: the client's bytes stay in its socket until delivered -------
#
# Direction 0 peeks (MSG_PEEK at SO_PEEK_OFF) into pool buffers, sends
# them as copy mode does, and drops them from the socket (MSG_TRUNC) only
# once delivered. The two traps in docs/kernel-notes.md (Peeking) decide the shape:
# - a peek that finds nothing past the offset must not wait in the kernel
#   (io_uring hands it to an io-wq thread, one per stalled flow), so every
#   peek is MSG_DONTWAIT and ends with EAGAIN instead;
# - after EAGAIN, readiness cannot say when to peek again (unconsumed
#   bytes keep the socket readable: a level-triggered wait spins), so a
#   multishot poll, which posts once per wakeup (an edge: new data, FIN,
#   reset), sets D_READY again.

# The kernel is done with a segment's bytes: sent, and notified if sent
# zero-copy. In peek mode that is when the client's copy of them may go.
cdef void delivered(Engine e, Flow *f, int d, int32_t si) noexcept nogil:
    if e.peek and d == 0:
        f.dir[0].released += e.pool.segs[si].len
        if f.dir[0].released >= f.replay_limit:
            # Holding more could close the client's window on an upstream
            # that reads everything before it answers: give up replay.
            f.replayable = 0

# The readiness poll on a direction's source (OP_WATCH): peek mode's
# multishot one, and splice mode's single-shot one (splice.pxi). Either
# is re-armed by its mode's step.
cdef void on_poll(Engine e, Flow *f, int d, int res, uint32_t cflags) noexcept nogil:
    if not (cflags & IORING_CQE_F_MORE):
        f.dir[d].flags &= ~D_POLL_ARMED
    if f.state == F_OPEN and res != -ECANCELED:
        f.dir[d].flags |= D_READY
        # This poll is also the side's error watch (watch_step): while the
        # direction waits, only it can see a reset.
        side_error(e, f, d, res)

cdef void on_consume(Engine e, Flow *f, int d, int res) noexcept nogil:
    cdef Dir *D = &f.dir[d]
    D.flags &= ~D_CONSUME_BUSY
    if f.state != F_OPEN:
        return
    if res > 0:
        D.consumed += <uint32_t>res
        D.released += D.consume_len - <uint32_t>res
        e.st.consumed_bytes += <uint32_t>res
    elif res != -ECANCELED:
        # The bytes were peeked, so they are there; 0 or EAGAIN would mean
        # our count is wrong, which must not pass quietly.
        side_failed(e, f, d, res if res < 0 else -EIO)

# Peek mode's reading side (see on_poll for the traps it avoids).
cdef void peek_step(Engine e, uint32_t slot, Flow *f, int d) noexcept nogil:
    cdef Dir *D = &f.dir[d]
    cdef io_uring_sqe *s
    cdef uint64_t n
    if not (D.flags & (D_POLL_ARMED | D_EOF)):
        s = e.flow_sqe(slot, f, OP_WATCH, d)
        io_uring_prep_poll_multishot(s, f.fd[d], POLLIN | POLLRDHUP)
        D.flags |= D_POLL_ARMED
    # One peek at a time, each into one pool buffer; at --max-inflight of
    # queued buffers the bytes wait in the socket (the window closes).
    if ((D.flags & (D_READY | D_RECV_ARMED | D_EOF | D_WAIT_BUF)) == D_READY
            and e.pool.quota(&D.q) > 0):
        s = e.flow_sqe(slot, f, OP_RECV, d)
        uc_prep_recv_select(s, f.fd[d], 0, 0, MSG_PEEK | MSG_DONTWAIT)
        D.flags |= D_RECV_ARMED
    # Delivered bytes leave the socket once replay is off the table.
    if D.released and not f.replayable and not (D.flags & D_CONSUME_BUSY):
        n = min(D.released, <uint64_t>1 << 30)
        s = e.flow_sqe(slot, f, OP_CONSUME, d)
        io_uring_prep_recv(s, f.fd[d], NULL, <size_t>n, MSG_TRUNC | MSG_DONTWAIT)
        D.consume_len = <uint32_t>n
        D.released -= n
        D.flags |= D_CONSUME_BUSY
