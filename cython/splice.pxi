# --- splice mode: source -> pipe -> sink, the bytes never in user space ------
#
# Both sockets and the pipe are non-blocking, so a splice (always run by
# an io-wq worker) never sleeps in one: it moves what it can or ends with
# EAGAIN. A direction reads only when its source may have bytes (D_READY);
# after EAGAIN it waits for a single-shot poll (on_poll, as peek mode's)
# with no splice behind it, and a write that said EAGAIN is linked behind
# a poll for room. A read that says EAGAIN while the pipe holds bytes is
# ambiguous (empty socket, or full pipe slots: one slot holds one page
# fragment, so a pipe fills before pipe_cap bytes); polling the socket
# then could spin, so that read waits for the next write to the sink.
#
# A direction holds a pipe only while bytes are in it or a splice is in
# flight, as HAProxy does: an idle direction gives it back to the pool
# and waits on the poll alone, so an idle flow holds its two sockets and
# nothing else (it held six fds). A pipe is taken when the poll says the
# source is ready; when no fd is left for a new one, the direction waits
# in the fd queue (D_PIPE_WAIT, fdw_retry) like a flow's connect does.

# pipe_bytes is counted whatever the flow's state: a splice that lands
# after a reset still moved its bytes, and pipe_put() must not pool a
# pipe that holds them (the next flow would read another flow's bytes).
cdef void on_splice_in(Engine e, Flow *f, int d, int res) noexcept nogil:
    cdef Dir *D = &f.dir[d]
    D.flags &= ~D_RECV_ARMED
    if res > 0:
        D.pipe_bytes += <uint32_t>res
    if f.state != F_OPEN:
        return
    if res > 0:
        D.flags |= D_READY
    elif res == 0:
        D.flags |= D_EOF
        tw_half_closed(e, f)
    elif res == -EAGAIN:
        e.st.splice_eagain += 1
        if D.pipe_bytes == 0:
            D.flags &= ~D_READY
        else:
            D.flags |= D_IN_STUCK
    elif res != -ECANCELED:
        side_failed(e, f, d, res)

cdef void on_splice_out(Engine e, Flow *f, int d, int res) noexcept nogil:
    cdef Dir *D = &f.dir[d]
    D.flags &= ~D_SEND_BUSY
    if res > 0:
        if <uint32_t>res < D.pipe_bytes:
            e.st.short_sends += 1
        D.pipe_bytes -= <uint32_t>res
        D.moved_bytes += <uint32_t>res
        e.st.splice_bytes += <uint32_t>res
    if f.state != F_OPEN:
        return
    if res > 0:
        D.flags &= ~(D_OUT_WAIT | D_IN_STUCK)
    elif res == -EAGAIN:
        e.st.splice_eagain += 1
        D.flags |= D_OUT_WAIT
    elif res != -ECANCELED:
        # 0 with bytes in the pipe cannot happen; do not retry it forever.
        side_failed(e, f, 1 - d, res if res < 0 else -EPIPE)

# A pipe for direction D: from the pool, or new. 0, or -errno (EMFILE
# and ENFILE: wait for an fd).
cdef int pipe_take(Engine e, Dir *D) noexcept nogil:
    cdef int err = e.pipes.get(&D.pipe_r, &D.pipe_w, &D.pipe_cap)
    if err < 0:
        D.pipe_r = -1
        D.pipe_w = -1
    D.pipe_bytes = 0
    return err

# Back to the pool (or closed, with any bytes it still holds). Called only
# with no splice on it in flight.
cdef void pipe_give(Engine e, Dir *D) noexcept nogil:
    e.pipes.put(D.pipe_r, D.pipe_w, D.pipe_cap, D.pipe_bytes)
    D.pipe_r = -1
    D.pipe_w = -1
    D.pipe_bytes = 0
    if e.fdw_n:
        e.fdw_kick = True          # a direction waiting for a pipe may take it

# Splice mode, one direction (see on_splice_in for the rules).
cdef void splice_step(Engine e, uint32_t slot, Flow *f, int d) noexcept nogil:
    cdef Dir *D = &f.dir[d]
    cdef io_uring_sqe *s
    cdef int err
    if not (D.flags & D_SEND_BUSY):
        if D.pipe_bytes > 0:
            e.reserve(2)
            if D.flags & D_OUT_WAIT:
                s = e.flow_sqe(slot, f, OP_POLL_OUT, d)
                io_uring_prep_poll_add(s, f.fd[1 - d], POLLOUT)
                s.flags |= IOSQE_IO_LINK
            s = e.flow_sqe(slot, f, OP_SPLICE_OUT, d)
            io_uring_prep_splice(s, D.pipe_r, -1, f.fd[1 - d], -1, D.pipe_bytes,
                                 SPLICE_F_NONBLOCK | SPLICE_F_MOVE)
            D.flags |= D_SEND_BUSY
        elif (D.flags & D_EOF) and not (D.flags & D_SHUT_SENT):
            shut_wr(e, f, d)
    if not (D.flags & (D_RECV_ARMED | D_EOF | D_IN_STUCK | D_PIPE_WAIT)):
        if not (D.flags & D_READY):
            if not (D.flags & D_POLL_ARMED):
                s = e.flow_sqe(slot, f, OP_WATCH, d)
                io_uring_prep_poll_add(s, f.fd[d], POLLIN | POLLRDHUP)
                D.flags |= D_POLL_ARMED
        else:
            if D.pipe_r < 0:
                err = pipe_take(e, D)
                if err == -EMFILE or err == -ENFILE:
                    fdw_push(e, slot, f, FDW_PIPE0 + d)
                    return
                if err < 0:
                    flow_fail(e, f, C_RESOURCE, -err, 0)
                    return
            if D.pipe_bytes < D.pipe_cap:
                # Always ask for the pipe's free space: the kernel moves what fits.
                s = e.flow_sqe(slot, f, OP_SPLICE_IN, d)
                io_uring_prep_splice(s, f.fd[d], -1, D.pipe_w, -1, D.pipe_cap - D.pipe_bytes,
                                     SPLICE_F_NONBLOCK | SPLICE_F_MOVE)
                D.flags |= D_RECV_ARMED
    if D.pipe_r >= 0 and D.pipe_bytes == 0 and not (D.flags & (D_RECV_ARMED | D_SEND_BUSY)):
        pipe_give(e, D)
