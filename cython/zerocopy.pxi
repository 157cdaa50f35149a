# Zero-copy sends (--mode zerocopy, auto, and peek's sends): SEND_ZC of
# the queue's head segment, its two completions, and auto mode's judgement
# of whether the kernel really skips the copy. A segment sent zero-copy is
# the kernel's until its notification, whatever the first CQE said.

# SEND_ZC posts up to two CQEs with the same user_data: the result (with
# IORING_CQE_F_MORE when a notification follows) and the notification
# (IORING_CQE_F_NOTIF). Only the notification gives the buffer back
# (io_uring_prep_send_zc(3)); whether one comes is F_MORE's say, not
# res's: an errored send can still post one.
cdef void on_send_zc(Engine e, Flow *f, int d, int res, uint32_t cflags, uint32_t si) noexcept nogil:
    cdef Seg *g = &e.pool.segs[si]
    if cflags & IORING_CQE_F_NOTIF:
        e.st.zc_notifs += 1
        if <uint32_t>res & IORING_NOTIF_USAGE_ZC_COPIED:
            e.st.zc_copied += 1
        if e.zc_backoff:
            zc_judge(e, &f.dir[d], (<uint32_t>res & IORING_NOTIF_USAGE_ZC_COPIED) != 0)
        g.notif -= 1
        if g.notif == 0 and g.next == SEG_SENT:
            e.pool.hold(&f.dir[d].q, 0, -1)
            delivered(e, f, d, <int32_t>si)
            e.pool.seg_free(<int32_t>si)
        return
    if cflags & IORING_CQE_F_MORE:
        e.st.zc_sends += 1
    else:
        g.notif -= 1                  # counted at submit; none will come
    if res == -EOPNOTSUPP or res == -ENOMEM:
        # EOPNOTSUPP: the kernel or this socket cannot send zero-copy.
        # ENOMEM: the kernel cannot pin the pages -- for a process without
        # CAP_IPC_LOCK they count against RLIMIT_MEMLOCK, which registering
        # the buffers may already have met (reset every flow with ENOMEM
        # before: 4 of 4 1 MiB echoes at an 8 MiB limit). Either way nothing
        # was sent. Turn zero-copy off for good (one event: Python logs it,
        # with the reason) and let dir_step send the same bytes the copying way.
        if e.zc:
            e.events.note(EV_FALLBACK, FB_SEND_ZC, -res, 0, e.batch_ns)
        e.zc = False
        e.st.zc_eopnotsupp += 1
        f.dir[d].flags &= ~D_SEND_BUSY
        return
    on_send(e, f, d, res)

# Auto mode: zero-copy pays only where the kernel really skips the copy
# (a NIC that can send from user pages). Where its usage reports say it
# copied (loopback, veth, ...) the zero-copy send cost more than a plain
# one, so after ZC_JUDGE_AFTER notifications, a direction whose sends
# were mostly copied goes back to plain sends for good.
cdef void zc_judge(Engine e, Dir *D, bint copied) noexcept nogil:
    if D.flags & D_ZC_OFF or D.zc_notifs >= ZC_JUDGE_AFTER:
        return
    D.zc_notifs += 1
    D.zc_copied += copied
    if D.zc_notifs == ZC_JUDGE_AFTER and 2 * D.zc_copied > D.zc_notifs:
        D.flags |= D_ZC_OFF
        e.st.zc_backoffs += 1

# A zero-copy send of the queue's head segment, from where the head
# stands (one segment per send: its notification must name which bytes
# the kernel has let go of, and user_data has room for one segment).
cdef void zc_send(Engine e, uint32_t slot, Flow *f, int d) noexcept nogil:
    cdef Dir *D = &f.dir[d]
    cdef io_uring_sqe *s
    cdef int32_t si = D.q.head
    cdef Seg *g = &e.pool.segs[si]
    D.send_len = <uint32_t>D.iov[0].iov_len
    s = e.flow_sqe(slot, f, OP_SEND_ZC, d)
    io_uring_sqe_set_data64(s, ud_with_seg(proxy_ud(slot, f.gen, OP_SEND_ZC, d), si))
    if e.zc_fixed and buf_fixed(e, g.bid):
        io_uring_prep_send_zc_fixed(s, f.fd[1 - d], D.iov[0].iov_base, D.iov[0].iov_len,
                                    MSG_NOSIGNAL, IORING_SEND_ZC_REPORT_USAGE,
                                    g.bid)
    else:
        io_uring_prep_send_zc(s, f.fd[1 - d], D.iov[0].iov_base, D.iov[0].iov_len,
                              MSG_NOSIGNAL, IORING_SEND_ZC_REPORT_USAGE)
    g.notif += 1

# Buffer bid is in the registered table (registered now if it was not:
# once per buffer for the proxy's life). A refusal (RLIMIT_MEMLOCK,
# ENOMEM) turns registered sends off for good, counted; SEND_ZC then
# pins pages per send, as without registration.
cdef bint buf_fixed(Engine e, uint32_t bid) noexcept nogil:
    cdef int ret
    if e.buf_reg[bid]:
        return True
    ret = e.drv.buffer_update(bid, e.pool.buf_addr(bid), e.pool.buf_size)
    if ret == 1:
        e.buf_reg[bid] = 1
        e.st.zc_registered_bufs += 1
        return True
    e.zc_fixed = False
    e.st.zc_register_fails += 1
    e.events.note(EV_FALLBACK, FB_REGISTERED_BUFFERS, -ret if ret < 0 else EIO, 0, e.batch_ns)
    return False
