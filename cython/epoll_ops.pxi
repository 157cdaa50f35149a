# The epoll driver's operations (module-level functions of Epoll, see
# epoll.pyx): what each SQE's syscall is, when it would block, and the CQE
# it posts.
#
# The operations, as io_uring defines them and as done here:
# - ACCEPT (multishot): accept4() until EAGAIN, one CQE with F_MORE each.
# - RECV with a provided buffer, single-shot (the engine bounds each recv;
#   a multishot one is refused with -EINVAL): the buffer the kernel would
#   pick (the ring's head entry, uc_br_peek), recv() into it, the head
#   moves past it only when bytes landed; an empty ring ends the recv with
#   -ENOBUFS. EOF and errors end it without a buffer.
# - SEND / SENDMSG: send()/sendmsg(); a short count is the result.
# - SEND_ZC: send(MSG_ZEROCOPY) on a socket with SO_ZEROCOPY; the first CQE
#   carries F_MORE, the notification (F_NOTIF, with the usage report) comes
#   when the socket's error queue says the kernel let go of that send
#   (docs/kernel-notes.md, Zero-copy sends): the same lifetime rule the engine already obeys.
# - CONNECT + LINK_TIMEOUT, TIMEOUT: connect() then EPOLLOUT; timers here.
# - POLL_ADD (single or multishot): readiness now (poll(2)) at arm, then
#   one CQE per epoll edge -- never level-triggered, which would spin on a
#   socket holding unconsumed peeked bytes (docs/kernel-notes.md, Peeking).
# - SPLICE, CLOSE: the syscall, at once (splices are always
#   SPLICE_F_NONBLOCK here as there).
# - ASYNC_CANCEL by user_data or by fd (CANCEL_ALL): ops still waiting end
#   with -ECANCELED; a zero-copy notification cannot be cancelled.
# - IOSQE_IO_LINK: the next op starts when this one succeeds, or ends with
#   -ECANCELED when it fails.

# Begin an op: the ones that cannot block complete at once; the others
# try their syscall and wait for an edge if it would block.
cdef void ep_start(Epoll ep, int32_t o) noexcept nogil:
    cdef EOp *p = &ep.ops[o]
    cdef uint8_t opc = p.sqe.opcode
    cdef int fd = p.sqe.fd
    cdef int res, w
    cdef uint32_t mask
    cdef pollfd pfd
    cdef int64_t now = ep_now_ns()
    p.where = W_NONE
    if p.ltimeout >= 0:
        ep.tm_add(p.ltimeout, now + ts_ns(uc_sqe_addr(&ep.ops[p.ltimeout].sqe)))
    if opc == IORING_OP_TIMEOUT:
        ep.tm_add(o, now + ts_ns(uc_sqe_addr(&p.sqe)))
        return
    if opc == IORING_OP_ASYNC_CANCEL:
        ep.complete(o, ep_cancel(ep, o), 0)
        return
    if opc == IORING_OP_CLOSE:
        if 0 <= fd < ep.fds_cap and ep.fds[fd].head[W_ZC - 1] >= 0:
            # MSG_ZEROCOPY sends still own pages, and their completions
            # come only on this socket's error queue: closing it would
            # lose them (io_uring's notifications outlive the fd; ours
            # cannot). A reset is done now with the fd kept (the peer is
            # released and the queued skbs go, so the completions come);
            # the close itself waits for the last of them (zc_drain).
            if uc_closes_with_reset(fd):
                uc_disconnect(fd)
            ep.fds[fd].close_op = o + 1
            ep_zc_drain(ep, fd)
            return
        ep_close_now(ep, o, fd)
        return
    if opc == IORING_OP_SPLICE:
        ep.syscalls_io += 1
        res = <int>splice(uc_sqe_splice_fd_in(&p.sqe), NULL, fd, NULL, p.sqe.len,
                          uc_sqe_opflags(&p.sqe) | SPLICE_F_NONBLOCK)
        ep.complete(o, -errno if res < 0 else res, 0)
        return
    if opc == IORING_OP_POLL_ADD:
        # io_uring checks readiness once at arm (vfs_poll), then waits
        # for wakeups; poll(2) is that first check.
        mask = uc_sqe_opflags(&p.sqe)
        pfd.fd = fd
        pfd.events = <short>mask
        pfd.revents = 0
        poll(&pfd, 1, 0)
        if pfd.revents:
            if not (p.sqe.len & IORING_POLL_ADD_MULTI):
                ep.complete(o, pfd.revents, 0)
                return
            ep.post(p.sqe.user_data, pfd.revents, IORING_CQE_F_MORE)
    res = ep.watch(fd)
    if res < 0:
        ep.complete(o, res, 0)
        return
    if opc == IORING_OP_CONNECT:
        res = connect(fd, <sockaddr *>uc_sqe_addr(&p.sqe), <socklen_t>uc_sqe_off(&p.sqe))
        if res == 0 or errno != EINPROGRESS:
            ep.complete(o, -errno if res < 0 else 0, 0)
            return
    if opc == IORING_OP_POLL_ADD:
        w = W_IN if uc_sqe_opflags(&p.sqe) & POLLIN else W_OUT
    elif opc == IORING_OP_CONNECT:
        w = W_OUT
    else:
        w = ep_attempt(ep, o, 0)
        if w == W_AGAIN:
            ep.again_add(fd)
            w = W_IN
    if w != W_NONE:
        ep.list_add(fd, w, o)

# One turn of a waiting op, after an edge on its fd (events) or at
# start (0). Returns W_NONE when the op has ended (its final CQE is
# posted), else the list it waits on (W_AGAIN: more to do at once).
cdef int ep_attempt(Epoll ep, int32_t o, uint32_t events) noexcept nogil:
    cdef EOp *p = &ep.ops[o]
    cdef uint8_t opc = p.sqe.opcode
    cdef int fd = p.sqe.fd
    cdef uint32_t fl = uc_sqe_opflags(&p.sqe)
    cdef bint multi
    cdef int n, turn, err = 0, copied
    cdef socklen_t elen = sizeof(int)
    cdef sockaddr_storage ss
    cdef socklen_t sl = sizeof(sockaddr_storage)
    cdef void *addr
    cdef uint32_t blen, revents
    cdef uint16_t bid
    cdef char probe
    cdef EFd *e
    if opc == IORING_OP_RECV:
        # Single-shot only: the engine bounds every recv by its quota, which
        # a multishot recv cannot honour (docs/architecture.md, Backpressure).
        if p.sqe.ioprio & IORING_RECV_MULTISHOT:
            ep.complete(o, -EINVAL, 0)
            return W_NONE
        if (p.sqe.flags & IOSQE_BUFFER_SELECT and p.sqe.ioprio & IORING_RECVSEND_BUNDLE
                and not (fl & MSG_DONTWAIT)):
            return ep_recv_bundle(ep, o)
        addr = <void *>uc_sqe_addr(&p.sqe)
        blen = p.sqe.len
        if p.sqe.flags & IOSQE_BUFFER_SELECT:
            if not uc_br_peek(ep.br, ep.br_head, ep.br_mask, &addr, &blen, &bid):
                # No buffer. Only a socket with something to read ends
                # its recv for that (-ENOBUFS, and the engine parks the
                # direction until buffers come back); an idle one keeps
                # waiting, or parked directions that have data would
                # wait behind ones that have none.
                # (Not for a caller's own MSG_DONTWAIT recv: that may be
                # a peek at SO_PEEK_OFF, which any peek would move.)
                if not (fl & MSG_DONTWAIT):
                    n = <int>recv(fd, &probe, 1, MSG_PEEK | MSG_DONTWAIT)
                    if n < 0 and errno == EAGAIN:
                        return W_IN
                ep.complete(o, -ENOBUFS, 0)
                return W_NONE
            if p.sqe.len and p.sqe.len < blen:
                blen = p.sqe.len          # the recv's own cap, as io_uring honours it
        ep.syscalls_io += 1
        n = <int>recv(fd, addr, blen, <int>(fl | MSG_DONTWAIT))
        if n < 0 and errno == EAGAIN:
            if fl & MSG_DONTWAIT:          # the caller asked not to wait
                ep.complete(o, -EAGAIN, 0)
                return W_NONE
            return W_IN
        if n <= 0:
            ep.complete(o, -errno if n < 0 else 0, 0)
        elif p.sqe.flags & IOSQE_BUFFER_SELECT:
            # The head moves past a buffer only once bytes are in it.
            ep.br_head += 1
            ep.complete(o, n, IORING_CQE_F_BUFFER | (<uint32_t>bid << IORING_CQE_BUFFER_SHIFT))
        else:
            ep.complete(o, n, 0)
        return W_NONE
    if opc == IORING_OP_SEND or opc == IORING_OP_SENDMSG or opc == IORING_OP_SEND_ZC:
        if opc == IORING_OP_SEND_ZC:
            e = ep.fd_get(fd)
            if e.zc == 0:
                n = 1
                e.zc = 1 if setsockopt(fd, SOL_SOCKET, SO_ZEROCOPY, &n, sizeof(n)) == 0 else 2
            if e.zc == 2:
                ep.complete(o, -EOPNOTSUPP, 0)
                return W_NONE
        ep.syscalls_io += 1
        if opc == IORING_OP_SENDMSG:
            n = <int>sendmsg(fd, <msghdr *>uc_sqe_addr(&p.sqe), <int>(fl | MSG_DONTWAIT))
        elif opc == IORING_OP_SEND_ZC:
            n = <int>send(fd, <void *>uc_sqe_addr(&p.sqe), p.sqe.len,
                          <int>(fl | MSG_DONTWAIT | MSG_ZEROCOPY))
            if n < 0 and errno == ENOBUFS:
                # Over the socket's optmem for pinned pages: the kernel
                # would not pin these, so copy them, and say so.
                n = <int>send(fd, <void *>uc_sqe_addr(&p.sqe), p.sqe.len, <int>(fl | MSG_DONTWAIT))
                if n >= 0:
                    ep.post(p.sqe.user_data, n, IORING_CQE_F_MORE)
                    ep.complete(o, <int>IORING_NOTIF_USAGE_ZC_COPIED, IORING_CQE_F_NOTIF)
                    return W_NONE
            elif n >= 0:
                # Numbered like the kernel numbers this socket's
                # MSG_ZEROCOPY sends: one per call that sent bytes.
                e = ep.fd_get(fd)
                p.zc_id = e.zc_next
                e.zc_next += 1
                ep.post(p.sqe.user_data, n, IORING_CQE_F_MORE)
                return W_ZC
        else:
            n = <int>send(fd, <void *>uc_sqe_addr(&p.sqe), p.sqe.len, <int>(fl | MSG_DONTWAIT))
        if n < 0 and errno == EAGAIN:
            return W_OUT
        ep.complete(o, -errno if n < 0 else n, 0)
        return W_NONE
    if opc == IORING_OP_ACCEPT:
        multi = (p.sqe.ioprio & IORING_ACCEPT_MULTISHOT) != 0
        for turn in range(TURN_CAP):
            n = accept4(fd, NULL, NULL, <int>(fl | SOCK_NONBLOCK))
            if n < 0 and (errno == EAGAIN or errno == ECONNABORTED):
                if errno == EAGAIN:
                    return W_IN
                continue
            if n < 0 or not multi:
                ep.complete(o, -errno if n < 0 else n, 0)
                return W_NONE
            ep.post(p.sqe.user_data, n, IORING_CQE_F_MORE)
        return W_AGAIN
    if opc == IORING_OP_CONNECT:
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen)
        if err != 0:
            ep.complete(o, -err, 0)
            return W_NONE
        if getpeername(fd, <sockaddr *>&ss, &sl) == 0:
            ep.complete(o, 0, 0)
            return W_NONE
        return W_OUT                        # still connecting: a spurious edge
    if opc == IORING_OP_POLL_ADD:
        # One CQE per edge whose events the poll asked for (error and
        # hang-up always count, as in io_uring).
        revents = events & (fl | POLLERR | POLLHUP)     # EPOLL* == POLL* on Linux
        if revents == 0:
            return W_IN if fl & POLLIN else W_OUT
        if p.sqe.len & IORING_POLL_ADD_MULTI:
            ep.post(p.sqe.user_data, <int>revents, IORING_CQE_F_MORE)
            return W_IN if fl & POLLIN else W_OUT
        ep.complete(o, <int>revents, 0)
        return W_NONE
    ep.complete(o, -EINVAL, 0)            # an op this driver does not carry out
    return W_NONE

# A recv bundle as the kernel does it (6.10+): one recvmsg into the ring's
# entries from the head, up to the SQE's length, and one CQE naming the
# first buffer; the head moves past every buffer the bytes touched. The
# engine takes them in ring order, as it does the kernel's bundles.
cdef int ep_recv_bundle(Epoll ep, int32_t o) noexcept nogil:
    cdef EOp *p = &ep.ops[o]
    cdef iovec iov[BUNDLE_IOV]
    cdef msghdr msg
    cdef void *addr
    cdef uint32_t blen, cap = p.sqe.len if p.sqe.len else 0xFFFFFFFF
    cdef uint16_t bid, first = 0
    cdef int k = 0, n, got, used
    cdef char probe
    while k < BUNDLE_IOV and cap > 0 and uc_br_peek(ep.br, <uint16_t>(ep.br_head + k),
                                                    ep.br_mask, &addr, &blen, &bid):
        if k == 0:
            first = bid
        iov[k].iov_base = addr
        iov[k].iov_len = min(blen, cap)
        cap -= <uint32_t>iov[k].iov_len
        k += 1
    if k == 0:
        # No buffer: as for a plain recv, only a socket with bytes waiting
        # ends its recv for that; an idle one keeps waiting.
        n = <int>recv(p.sqe.fd, &probe, 1, MSG_PEEK | MSG_DONTWAIT)
        if n < 0 and errno == EAGAIN:
            return W_IN
        ep.complete(o, -ENOBUFS, 0)
        return W_NONE
    memset(&msg, 0, sizeof(msg))
    msg.msg_iov = iov
    msg.msg_iovlen = k
    ep.syscalls_io += 1
    n = <int>recvmsg(p.sqe.fd, &msg, <int>(uc_sqe_opflags(&p.sqe) | MSG_DONTWAIT))
    if n < 0 and errno == EAGAIN:
        return W_IN
    if n <= 0:
        ep.complete(o, -errno if n < 0 else 0, 0)
        return W_NONE
    got = n
    used = 0
    while n > 0 and used < k:
        n -= <int>min(<size_t>n, iov[used].iov_len)
        used += 1
    ep.br_head += <uint16_t>used
    ep.complete(o, got, IORING_CQE_F_BUFFER | (<uint32_t>first << IORING_CQE_BUFFER_SHIFT))
    return W_NONE

# ASYNC_CANCEL: by user_data (the first match), or every op waiting on
# an fd (IORING_ASYNC_CANCEL_FD | _ALL). A sent zero-copy send waiting
# for its notification is not cancellable (nor is it in io_uring).
cdef int ep_cancel(Epoll ep, int32_t o) noexcept nogil:
    cdef io_uring_sqe *s = &ep.ops[o].sqe
    cdef uint32_t fl = uc_sqe_opflags(s)
    cdef uint64_t target = uc_sqe_addr(s)
    cdef int32_t i, x, nxt
    cdef int w, n = 0
    cdef EFd *e
    if fl & IORING_ASYNC_CANCEL_FD:
        e = ep.fd_get(s.fd)
        if e == NULL:
            return -ENOENT
        for w in range(W_IN, W_OUT + 1):
            x = ep.fds[s.fd].head[w - 1]
            while x >= 0:
                nxt = ep.ops[x].next
                ep.list_remove(x)
                ep.complete(x, -ECANCELED, 0)
                n += 1
                if not (fl & IORING_ASYNC_CANCEL_ALL):
                    return 0
                x = nxt
        return n if n > 0 else -ENOENT
    if s.fd >= 0:
        # The engine names the fd the target works on (io_uring ignores
        # it here): look only at that fd's waiting operations, not at
        # every op (a linear scan per cancel made a storm of failing
        # flows quadratic).
        if s.fd >= ep.fds_cap:
            return -ENOENT
        for w in range(W_IN, W_OUT + 1):
            x = ep.fds[s.fd].head[w - 1]
            while x >= 0:
                nxt = ep.ops[x].next
                if ep.ops[x].sqe.user_data == target and ep.ops[x].sqe.opcode != IORING_OP_LINK_TIMEOUT:
                    ep.list_remove(x)
                    ep.complete(x, -ECANCELED, 0)
                    return 0
                x = nxt
        return -ENOENT
    for i in range(ep.ops_cap):
        if (ep.ops[i].live and i != o and ep.ops[i].sqe.user_data == target
                and (ep.ops[i].where == W_IN or ep.ops[i].where == W_OUT
                     or ep.ops[i].where == W_TIMER)
                and ep.ops[i].sqe.opcode != IORING_OP_LINK_TIMEOUT):
            if ep.ops[i].where == W_TIMER:
                ep.tm_remove(i)
            else:
                ep.list_remove(i)
            ep.complete(i, -ECANCELED, 0)
            return 0
    return -ENOENT

# Read fd's error queue: each MSG_ZEROCOPY completion names a range of
# sends; their ops post the notification CQE and end.
cdef int ep_zc_drain(Epoll ep, int fd) noexcept nogil:
    cdef uint32_t lo, hi
    cdef int copied, found = 0
    cdef int32_t x, nxt
    while uc_zc_completion(fd, &lo, &hi, &copied) > 0:
        x = ep.fds[fd].head[W_ZC - 1]
        while x >= 0:
            nxt = ep.ops[x].next
            if ep.ops[x].zc_id - lo <= hi - lo:       # in [lo, hi], modulo 2**32
                ep.list_remove(x)
                ep.complete(x, <int>IORING_NOTIF_USAGE_ZC_COPIED
                              if copied and ep.ops[x].sqe.ioprio & IORING_SEND_ZC_REPORT_USAGE else 0,
                            IORING_CQE_F_NOTIF)
                found += 1
            x = nxt
    if ep.fds[fd].close_op and ep.fds[fd].head[W_ZC - 1] < 0:
        x = ep.fds[fd].close_op - 1
        ep.fds[fd].close_op = 0
        ep_close_now(ep, x, fd)
    return found

cdef void ep_close_now(Epoll ep, int32_t o, int fd) noexcept nogil:
    cdef int res
    ep.forget(fd)
    res = close(fd)
    ep.complete(o, -errno if res < 0 else 0, 0)
