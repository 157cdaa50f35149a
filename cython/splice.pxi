# --- splice mode: source -> pipe -> sink, the bytes never in user space ------
#
# Both sockets and the pipe are non-blocking, so a splice (always run by
# an io-wq worker) never sleeps in one: it moves what it can or ends with
# EAGAIN. After EAGAIN the next splice is linked behind a poll for the
# readiness it lacked. A read that says EAGAIN while the pipe holds bytes
# is ambiguous (empty socket, or full pipe slots: one slot holds one page
# fragment, so a pipe fills before pipe_cap bytes); polling the socket
# then could spin, so that read waits for the next write to the sink.

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

# Splice mode, one direction (see on_splice_in for the rules).
cdef void splice_step(Engine e, uint32_t slot, Flow *f, int d) noexcept nogil:
    cdef Dir *D = &f.dir[d]
    cdef io_uring_sqe *s
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
    # Always ask for the pipe's free space: the kernel moves what fits.
    if not (D.flags & (D_RECV_ARMED | D_EOF | D_IN_STUCK)) and D.pipe_bytes < D.pipe_cap:
        e.reserve(2)
        if not (D.flags & D_READY):
            s = e.flow_sqe(slot, f, OP_POLL, d)
            io_uring_prep_poll_add(s, f.fd[d], POLLIN | POLLRDHUP)
            s.flags |= IOSQE_IO_LINK
        s = e.flow_sqe(slot, f, OP_SPLICE_IN, d)
        io_uring_prep_splice(s, f.fd[d], -1, D.pipe_w, -1, D.pipe_cap - D.pipe_bytes,
                             SPLICE_F_NONBLOCK | SPLICE_F_MOVE)
        D.flags |= D_RECV_ARMED
