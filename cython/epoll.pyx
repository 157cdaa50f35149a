# Epoll: the engine's io_uring operations carried out with non-blocking
# syscalls over epoll readiness, for where io_uring is unavailable (seccomp
# profiles, kernel.io_uring_disabled, old kernels).
#
# There is one flow state machine (engine.pyx). It prepares io_uring SQEs
# with liburing's prep helpers whichever backend runs it; on this backend
# they land in our own array, and submit() performs each with the syscall
# io_uring would have made, posting the CQE io_uring would have posted:
# same res, same flags (F_MORE, F_BUFFER, F_NOTIF), same ordering rules. A
# behaviour difference between the backends is therefore a bug in this
# file's reading of one operation, and the test suite runs every behaviour
# against both to find it.
#
# The operations, as io_uring defines them and as done here:
# - ACCEPT (multishot): accept4() until EAGAIN, one CQE with F_MORE each.
# - RECV with a provided buffer (multishot or not): the buffer the kernel
#   would pick (the ring's head entry, uc_br_peek), recv() into it, the
#   head moves past it only when bytes landed; an empty ring ends the recv
#   with -ENOBUFS. EOF and errors end it without a buffer.
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
#
# Every socket the driver waits on is in the epoll set once, edge-triggered
# for in and out, until it is closed. An op that would block waits on its
# fd's in or out list and is tried again at the next edge; an op that has
# more to do than one turn allows (a long multishot) puts its fd on the
# again list, so a busy socket cannot starve the others and nothing waits
# for an edge that already came.

cdef enum:
    W_NONE = 0
    W_IN = 1                # waits for the fd to become readable
    W_OUT = 2               # ... writable
    W_ZC = 3                # a sent SEND_ZC waiting for its notification
    W_TIMER = 4             # TIMEOUT / LINK_TIMEOUT waiting for its deadline
    W_LINKED = 5            # waits for the op it is linked behind
    W_AGAIN = 6             # attempt(): wait on W_IN, but the fd has more right away

cdef enum:
    EP_EVENTS = 256         # epoll events harvested per wait
    TURN_CAP = 16           # accepts/recvs one op does per turn before the others
    BUNDLE_IOV = 16         # buffers one recv bundle may fill

cdef inline int64_t ep_now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec

cdef inline int64_t ts_ns(uint64_t addr) noexcept nogil:
    cdef __kernel_timespec *t = <__kernel_timespec *>addr
    return t.tv_sec * 1000000000 + t.tv_nsec


cdef class Epoll:
    def __cinit__(self):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, f"epoll_create1 failed: {os.strerror(errno)}")
        self.sq_cap = 1024
        self.cq_cap = 1024
        self.ops_cap = 1024
        self.fds_cap = 1024
        self.tm_cap = 64
        self.again_cap = 64
        self.sq = <io_uring_sqe *>calloc(self.sq_cap, sizeof(io_uring_sqe))
        self.pend = <int32_t *>calloc(self.sq_cap, sizeof(int32_t))
        self.cq = <io_uring_cqe *>calloc(self.cq_cap, sizeof(io_uring_cqe))
        self.ops = <EOp *>calloc(self.ops_cap, sizeof(EOp))
        self.fds = <EFd *>calloc(self.fds_cap, sizeof(EFd))
        self.tm = <int32_t *>calloc(self.tm_cap, sizeof(int32_t))
        self.again_fds = <int32_t *>calloc(self.again_cap, sizeof(int32_t))
        if (self.sq == NULL or self.pend == NULL or self.cq == NULL or self.ops == NULL
                or self.fds == NULL or self.tm == NULL or self.again_fds == NULL):
            raise MemoryError()
        for i in range(self.ops_cap):
            self.ops[i].next = i + 1 if i + 1 < self.ops_cap else -1
        self.op_free = 0
        for i in range(self.fds_cap):
            self.fds[i].head[0] = self.fds[i].head[1] = self.fds[i].head[2] = -1
            self.fds[i].tail[0] = self.fds[i].tail[1] = self.fds[i].tail[2] = -1

    def __dealloc__(self):
        if self.epfd >= 0:
            close(self.epfd)
        free(self.sq)
        free(self.pend)
        free(self.cq)
        free(self.ops)
        free(self.fds)
        free(self.tm)
        free(self.again_fds)

    def close(self):
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1

    @property
    def closed(self):
        return self.epfd < 0

    def probe_zerocopy(self):
        """True if a TCP socket here takes SO_ZEROCOPY (4.14+), which
        MSG_ZEROCOPY sends need."""
        cdef int one = 1
        cdef int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)
        cdef int ok
        if fd < 0:
            return False
        ok = setsockopt(fd, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof(one)) == 0
        close(fd)
        return ok

    # --- the submission side (what the engine calls) ---------------------------

    # Like Ring.sqe(): never fails; a full array is submitted first.
    cdef io_uring_sqe *sqe(self) noexcept nogil:
        cdef io_uring_sqe *s
        if self.sq_n == self.sq_cap:
            self.submit()
        s = &self.sq[self.sq_n]
        self.sq_n += 1
        memset(s, 0, sizeof(io_uring_sqe))
        return s

    cdef void reserve(self, unsigned n) noexcept nogil:
        if self.sq_cap - self.sq_n < n:
            self.submit()

    # Turn every prepared SQE into an op, wire the links, then start each
    # chain's head in submission order (as io_uring issues them).
    cdef void submit(self) noexcept nogil:
        cdef uint32_t i, n = self.sq_n, nh = 0
        cdef int32_t o, prev = -1
        self.sq_n = 0
        for i in range(n):
            o = self.op_new(&self.sq[i])
            if o < 0:
                # Out of memory: the op cannot be tracked, so it fails the
                # way io_uring fails a request it cannot allocate.
                self.post(self.sq[i].user_data, -ENOMEM, 0)
                prev = -1
                continue
            if prev >= 0 and self.ops[o].sqe.opcode == IORING_OP_LINK_TIMEOUT:
                self.ops[prev].ltimeout = o
                self.ops[o].owner = prev
                self.ops[o].where = W_LINKED
            elif prev >= 0:
                self.ops[prev].link = o
                self.ops[o].where = W_LINKED
            else:
                self.pend[nh] = o
                nh += 1
            prev = o if self.sq[i].flags & IOSQE_IO_LINK else -1
        for i in range(nh):
            self.start(self.pend[i])

    # Begin an op: the ones that cannot block complete at once; the others
    # try their syscall and wait for an edge if it would block.
    cdef void start(self, int32_t o) noexcept nogil:
        cdef EOp *p = &self.ops[o]
        cdef uint8_t opc = p.sqe.opcode
        cdef int fd = p.sqe.fd
        cdef int res, w
        cdef uint32_t mask
        cdef pollfd pfd
        cdef int64_t now = ep_now_ns()
        p.where = W_NONE
        if p.ltimeout >= 0:
            self.tm_add(p.ltimeout, now + ts_ns(uc_sqe_addr(&self.ops[p.ltimeout].sqe)))
        if opc == IORING_OP_TIMEOUT:
            self.tm_add(o, now + ts_ns(uc_sqe_addr(&p.sqe)))
            return
        if opc == IORING_OP_ASYNC_CANCEL:
            self.complete(o, self.cancel(o), 0)
            return
        if opc == IORING_OP_CLOSE:
            if 0 <= fd < self.fds_cap and self.fds[fd].head[W_ZC - 1] >= 0:
                # MSG_ZEROCOPY sends still own pages, and their completions
                # come only on this socket's error queue: closing it would
                # lose them (io_uring's notifications outlive the fd; ours
                # cannot). A reset is done now with the fd kept (the peer is
                # released and the queued skbs go, so the completions come);
                # the close itself waits for the last of them (zc_drain).
                if uc_closes_with_reset(fd):
                    uc_disconnect(fd)
                self.fds[fd].close_op = o + 1
                self.zc_drain(fd)
                return
            self.close_now(o, fd)
            return
        if opc == IORING_OP_SPLICE:
            self.syscalls_io += 1
            res = <int>splice(uc_sqe_splice_fd_in(&p.sqe), NULL, fd, NULL, p.sqe.len,
                              uc_sqe_opflags(&p.sqe) | SPLICE_F_NONBLOCK)
            self.complete(o, -errno if res < 0 else res, 0)
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
                    self.complete(o, pfd.revents, 0)
                    return
                self.post(p.sqe.user_data, pfd.revents, IORING_CQE_F_MORE)
        res = self.watch(fd)
        if res < 0:
            self.complete(o, res, 0)
            return
        if opc == IORING_OP_CONNECT:
            res = connect(fd, <sockaddr *>uc_sqe_addr(&p.sqe), <socklen_t>uc_sqe_off(&p.sqe))
            if res == 0 or errno != EINPROGRESS:
                self.complete(o, -errno if res < 0 else 0, 0)
                return
        if opc == IORING_OP_POLL_ADD:
            w = W_IN if uc_sqe_opflags(&p.sqe) & POLLIN else W_OUT
        elif opc == IORING_OP_CONNECT:
            w = W_OUT
        else:
            w = self.attempt(o, 0)
            if w == W_AGAIN:
                self.again_add(fd)
                w = W_IN
        if w != W_NONE:
            self.list_add(fd, w, o)

    # One turn of a waiting op, after an edge on its fd (events) or at
    # start (0). Returns W_NONE when the op has ended (its final CQE is
    # posted), else the list it waits on (W_AGAIN: more to do at once).
    cdef int attempt(self, int32_t o, uint32_t events) noexcept nogil:
        cdef EOp *p = &self.ops[o]
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
            multi = (p.sqe.ioprio & IORING_RECV_MULTISHOT) != 0
            if (p.sqe.flags & IOSQE_BUFFER_SELECT and p.sqe.ioprio & IORING_RECVSEND_BUNDLE
                    and not multi and not (fl & MSG_DONTWAIT)):
                return self.recv_bundle(o)
            for turn in range(TURN_CAP):
                addr = <void *>uc_sqe_addr(&p.sqe)
                blen = p.sqe.len
                if p.sqe.flags & IOSQE_BUFFER_SELECT:
                    if not uc_br_peek(self.br, self.br_head, self.br_mask, &addr, &blen, &bid):
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
                        self.complete(o, -ENOBUFS, 0)
                        return W_NONE
                    if p.sqe.len and p.sqe.len < blen:
                        blen = p.sqe.len          # the recv's own cap, as io_uring honours it
                self.syscalls_io += 1
                n = <int>recv(fd, addr, blen, <int>(fl | MSG_DONTWAIT))
                if n < 0 and errno == EAGAIN:
                    if fl & MSG_DONTWAIT:          # the caller asked not to wait
                        self.complete(o, -EAGAIN, 0)
                        return W_NONE
                    return W_IN
                if n <= 0:
                    self.complete(o, -errno if n < 0 else 0, 0)
                    return W_NONE
                if p.sqe.flags & IOSQE_BUFFER_SELECT:
                    # The head moves past a buffer only once bytes are in it.
                    self.br_head += 1
                    if not multi:
                        self.complete(o, n, IORING_CQE_F_BUFFER | (<uint32_t>bid << IORING_CQE_BUFFER_SHIFT))
                        return W_NONE
                    self.post(p.sqe.user_data, n, IORING_CQE_F_MORE | IORING_CQE_F_BUFFER
                              | (<uint32_t>bid << IORING_CQE_BUFFER_SHIFT))
                else:
                    self.complete(o, n, 0)
                    return W_NONE
                # Read on until EAGAIN, even after a short read: a FIN that
                # came with the data makes no new edge, and the read that
                # returns 0 for it is the only way to learn of it.
            return W_AGAIN
        if opc == IORING_OP_SEND or opc == IORING_OP_SENDMSG or opc == IORING_OP_SEND_ZC:
            if opc == IORING_OP_SEND_ZC:
                e = self.fd_get(fd)
                if e.zc == 0:
                    n = 1
                    e.zc = 1 if setsockopt(fd, SOL_SOCKET, SO_ZEROCOPY, &n, sizeof(n)) == 0 else 2
                if e.zc == 2:
                    self.complete(o, -EOPNOTSUPP, 0)
                    return W_NONE
            self.syscalls_io += 1
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
                        self.post(p.sqe.user_data, n, IORING_CQE_F_MORE)
                        self.complete(o, <int>IORING_NOTIF_USAGE_ZC_COPIED, IORING_CQE_F_NOTIF)
                        return W_NONE
                elif n >= 0:
                    # Numbered like the kernel numbers this socket's
                    # MSG_ZEROCOPY sends: one per call that sent bytes.
                    e = self.fd_get(fd)
                    p.zc_id = e.zc_next
                    e.zc_next += 1
                    self.post(p.sqe.user_data, n, IORING_CQE_F_MORE)
                    return W_ZC
            else:
                n = <int>send(fd, <void *>uc_sqe_addr(&p.sqe), p.sqe.len, <int>(fl | MSG_DONTWAIT))
            if n < 0 and errno == EAGAIN:
                return W_OUT
            self.complete(o, -errno if n < 0 else n, 0)
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
                    self.complete(o, -errno if n < 0 else n, 0)
                    return W_NONE
                self.post(p.sqe.user_data, n, IORING_CQE_F_MORE)
            return W_AGAIN
        if opc == IORING_OP_CONNECT:
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen)
            if err != 0:
                self.complete(o, -err, 0)
                return W_NONE
            if getpeername(fd, <sockaddr *>&ss, &sl) == 0:
                self.complete(o, 0, 0)
                return W_NONE
            return W_OUT                        # still connecting: a spurious edge
        if opc == IORING_OP_POLL_ADD:
            # One CQE per edge whose events the poll asked for (error and
            # hang-up always count, as in io_uring).
            revents = events & (fl | POLLERR | POLLHUP)     # EPOLL* == POLL* on Linux
            if revents == 0:
                return W_IN if fl & POLLIN else W_OUT
            if p.sqe.len & IORING_POLL_ADD_MULTI:
                self.post(p.sqe.user_data, <int>revents, IORING_CQE_F_MORE)
                return W_IN if fl & POLLIN else W_OUT
            self.complete(o, <int>revents, 0)
            return W_NONE
        self.complete(o, -EINVAL, 0)            # an op this driver does not carry out
        return W_NONE

    # A recv bundle as the kernel does it (6.10+): one recvmsg into the ring's
    # entries from the head, up to the SQE's length, and one CQE naming the
    # first buffer; the head moves past every buffer the bytes touched. The
    # engine takes them in ring order, as it does the kernel's bundles.
    cdef int recv_bundle(self, int32_t o) noexcept nogil:
        cdef EOp *p = &self.ops[o]
        cdef iovec iov[BUNDLE_IOV]
        cdef msghdr msg
        cdef void *addr
        cdef uint32_t blen, cap = p.sqe.len if p.sqe.len else 0xFFFFFFFF
        cdef uint16_t bid, first = 0
        cdef int k = 0, n, got, used
        cdef char probe
        while k < BUNDLE_IOV and cap > 0 and uc_br_peek(self.br, <uint16_t>(self.br_head + k),
                                                         self.br_mask, &addr, &blen, &bid):
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
            self.complete(o, -ENOBUFS, 0)
            return W_NONE
        memset(&msg, 0, sizeof(msg))
        msg.msg_iov = iov
        msg.msg_iovlen = k
        self.syscalls_io += 1
        n = <int>recvmsg(p.sqe.fd, &msg, <int>(uc_sqe_opflags(&p.sqe) | MSG_DONTWAIT))
        if n < 0 and errno == EAGAIN:
            return W_IN
        if n <= 0:
            self.complete(o, -errno if n < 0 else 0, 0)
            return W_NONE
        got = n
        used = 0
        while n > 0 and used < k:
            n -= <int>min(<size_t>n, iov[used].iov_len)
            used += 1
        self.br_head += <uint16_t>used
        self.complete(o, got, IORING_CQE_F_BUFFER | (<uint32_t>first << IORING_CQE_BUFFER_SHIFT))
        return W_NONE

    # Post an op's CQE. Without F_MORE it is the op's last: its linked
    # timeout is disarmed, the op linked behind it starts (or, if this one
    # failed, is cancelled with the rest of the chain), and the op is freed.
    cdef void complete(self, int32_t o, int res, uint32_t flags) noexcept nogil:
        cdef int32_t t = self.ops[o].ltimeout
        cdef int32_t nx = self.ops[o].link
        cdef int32_t after
        self.post(self.ops[o].sqe.user_data, res, flags)
        if flags & IORING_CQE_F_MORE:
            return
        if t >= 0:
            self.tm_remove(t)
            self.post(self.ops[t].sqe.user_data, -ECANCELED, 0)
            self.op_free_one(t)
        self.op_free_one(o)
        if nx >= 0:
            if res >= 0:
                self.start(nx)
            else:
                while nx >= 0:
                    after = self.ops[nx].link
                    self.ops[nx].link = -1
                    self.complete(nx, -ECANCELED, 0)
                    nx = after

    # ASYNC_CANCEL: by user_data (the first match), or every op waiting on
    # an fd (IORING_ASYNC_CANCEL_FD | _ALL). A sent zero-copy send waiting
    # for its notification is not cancellable (nor is it in io_uring).
    cdef int cancel(self, int32_t o) noexcept nogil:
        cdef io_uring_sqe *s = &self.ops[o].sqe
        cdef uint32_t fl = uc_sqe_opflags(s)
        cdef uint64_t target = uc_sqe_addr(s)
        cdef int32_t i, x, nxt
        cdef int w, n = 0
        cdef EFd *e
        if fl & IORING_ASYNC_CANCEL_FD:
            e = self.fd_get(s.fd)
            if e == NULL:
                return -ENOENT
            for w in range(W_IN, W_OUT + 1):
                x = self.fds[s.fd].head[w - 1]
                while x >= 0:
                    nxt = self.ops[x].next
                    self.list_remove(x)
                    self.complete(x, -ECANCELED, 0)
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
            if s.fd >= self.fds_cap:
                return -ENOENT
            for w in range(W_IN, W_OUT + 1):
                x = self.fds[s.fd].head[w - 1]
                while x >= 0:
                    nxt = self.ops[x].next
                    if self.ops[x].sqe.user_data == target and self.ops[x].sqe.opcode != IORING_OP_LINK_TIMEOUT:
                        self.list_remove(x)
                        self.complete(x, -ECANCELED, 0)
                        return 0
                    x = nxt
            return -ENOENT
        for i in range(self.ops_cap):
            if (self.ops[i].live and i != o and self.ops[i].sqe.user_data == target
                    and (self.ops[i].where == W_IN or self.ops[i].where == W_OUT
                         or self.ops[i].where == W_TIMER)
                    and self.ops[i].sqe.opcode != IORING_OP_LINK_TIMEOUT):
                if self.ops[i].where == W_TIMER:
                    self.tm_remove(i)
                else:
                    self.list_remove(i)
                self.complete(i, -ECANCELED, 0)
                return 0
        return -ENOENT

    # --- waiting -------------------------------------------------------------

    # Submit what was prepared, then, if no completion is waiting, sleep in
    # epoll_wait until an edge, the next timer or timeout_ns. Returns 0, or
    # -EINTR when a signal came (Python handles it between batches).
    cdef int wait(self, int64_t timeout_ns) noexcept nogil:
        cdef epoll_event evs[EP_EVENTS]
        cdef int n, i, fd, ms
        cdef int32_t k, na
        cdef uint32_t ev
        cdef int64_t now, until
        self.submit()
        ms = 0
        if self.cq_head == self.cq_n and self.nagain == 0:
            now = ep_now_ns()
            until = now + timeout_ns
            if self.ntm > 0:
                until = min(until, self.ops[self.tm[0]].deadline)   # the heap's top
            # Round up: waking before the deadline would spin until it.
            ms = <int>((until - now + 999999) // 1000000) if until > now else 0
        n = epoll_wait(self.epfd, evs, EP_EVENTS, ms)
        if n < 0:
            return -errno if errno == EINTR else 0
        self.wakeups += 1
        # Fds left with work by the previous turn first (they were ready
        # before these edges), then the edges.
        na = self.nagain
        for k in range(na):
            fd = self.again_fds[k]
            self.fds[fd].again = 0
            self.wake(fd, W_IN, 0)
        memmove(self.again_fds, self.again_fds + na, (self.nagain - na) * sizeof(int32_t))
        self.nagain -= na
        for i in range(n):
            fd = evs[i].data.fd
            ev = evs[i].events
            if fd >= self.fds_cap or not self.fds[fd].reg:
                continue
            if ev & EPOLLERR and self.fds[fd].head[W_ZC - 1] >= 0:
                # Zero-copy completions arrive on the error queue. An edge
                # that brought only those is not news for readers or writers.
                if self.zc_drain(fd) > 0 and not (ev & ~EPOLLERR):
                    continue
            if ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                self.wake(fd, W_IN, ev)
            if ev & (EPOLLOUT | EPOLLHUP | EPOLLERR):
                self.wake(fd, W_OUT, ev)
        self.fire_timers(ep_now_ns())
        return 0

    # Give every op waiting on fd's list w a turn. The list is taken whole
    # first: a turn may complete ops and start linked ones on this fd.
    cdef void wake(self, int fd, int w, uint32_t events) noexcept nogil:
        cdef EFd *e = &self.fds[fd]
        cdef int32_t x = e.head[w - 1]
        cdef int32_t nxt
        cdef int r
        e.head[w - 1] = -1
        e.tail[w - 1] = -1
        while x >= 0:
            nxt = self.ops[x].next
            self.ops[x].where = W_NONE
            self.ops[x].next = -1
            r = self.attempt(x, events)
            if r == W_AGAIN:
                self.again_add(fd)
                r = W_IN
            if r != W_NONE:
                self.list_add(fd, r, x)
            x = nxt

    # Read fd's error queue: each MSG_ZEROCOPY completion names a range of
    # sends; their ops post the notification CQE and end.
    cdef int zc_drain(self, int fd) noexcept nogil:
        cdef uint32_t lo, hi
        cdef int copied, found = 0
        cdef int32_t x, nxt
        while uc_zc_completion(fd, &lo, &hi, &copied) > 0:
            x = self.fds[fd].head[W_ZC - 1]
            while x >= 0:
                nxt = self.ops[x].next
                if self.ops[x].zc_id - lo <= hi - lo:       # in [lo, hi], modulo 2**32
                    self.list_remove(x)
                    self.complete(x, <int>IORING_NOTIF_USAGE_ZC_COPIED
                                  if copied and self.ops[x].sqe.ioprio & IORING_SEND_ZC_REPORT_USAGE else 0,
                                  IORING_CQE_F_NOTIF)
                    found += 1
                x = nxt
        if self.fds[fd].close_op and self.fds[fd].head[W_ZC - 1] < 0:
            x = self.fds[fd].close_op - 1
            self.fds[fd].close_op = 0
            self.close_now(x, fd)
        return found

    cdef void close_now(self, int32_t o, int fd) noexcept nogil:
        cdef int res
        self.forget(fd)
        res = close(fd)
        self.complete(o, -errno if res < 0 else 0, 0)

    # Every timer due by now, earliest first; one that completing an op
    # adds, already due, fires in the same call.
    cdef void fire_timers(self, int64_t now) noexcept nogil:
        cdef int32_t o, w
        while self.ntm > 0 and self.ops[self.tm[0]].deadline <= now:
            o = self.tm[0]
            self.tm_remove(o)
            if self.ops[o].sqe.opcode == IORING_OP_LINK_TIMEOUT:
                # The guarded op is cancelled; the timeout itself says -ETIME.
                w = self.ops[o].owner
                self.ops[w].ltimeout = -1
                self.list_remove(w)
                self.complete(w, -ECANCELED, 0)
                self.post(self.ops[o].sqe.user_data, -ETIME, 0)
                self.op_free_one(o)
            else:
                self.complete(o, -ETIME, 0)

    # --- bookkeeping -----------------------------------------------------------

    cdef void post(self, uint64_t ud, int res, uint32_t flags) noexcept nogil:
        cdef io_uring_cqe *grown
        if self.cq_n == self.cq_cap:
            if self.cq_head > 0:
                memmove(self.cq, self.cq + self.cq_head, (self.cq_n - self.cq_head) * sizeof(io_uring_cqe))
                self.cq_n -= self.cq_head
                self.cq_head = 0
            else:
                grown = <io_uring_cqe *>realloc(self.cq, self.cq_cap * 2 * sizeof(io_uring_cqe))
                if grown == NULL:
                    self.oom += 1                # cannot happen quietly: Python raises
                    return
                self.cq = grown
                self.cq_cap *= 2
        self.cq[self.cq_n].user_data = ud
        self.cq[self.cq_n].res = res
        self.cq[self.cq_n].flags = flags
        self.cq_n += 1

    cdef int32_t op_new(self, io_uring_sqe *s) noexcept nogil:
        cdef int32_t o, i
        cdef EOp *grown
        if self.op_free < 0:
            grown = <EOp *>realloc(self.ops, self.ops_cap * 2 * sizeof(EOp))
            if grown == NULL:
                self.oom += 1
                return -1
            self.ops = grown
            memset(self.ops + self.ops_cap, 0, self.ops_cap * sizeof(EOp))
            for i in range(self.ops_cap, self.ops_cap * 2):
                self.ops[i].next = i + 1 if i + 1 < self.ops_cap * 2 else -1
            self.op_free = self.ops_cap
            self.ops_cap *= 2
        o = self.op_free
        self.op_free = self.ops[o].next
        memcpy(&self.ops[o].sqe, s, sizeof(io_uring_sqe))
        self.ops[o].next = -1
        self.ops[o].link = -1
        self.ops[o].ltimeout = -1
        self.ops[o].owner = -1
        self.ops[o].tm_idx = -1
        self.ops[o].where = W_NONE
        self.ops[o].live = 1
        return o

    cdef void op_free_one(self, int32_t o) noexcept nogil:
        self.ops[o].live = 0
        self.ops[o].where = W_NONE
        self.ops[o].next = self.op_free
        self.op_free = o

    # The fd's entry, the table grown to hold it (NULL if it cannot be).
    cdef EFd *fd_get(self, int fd) noexcept nogil:
        cdef int32_t cap = self.fds_cap
        cdef int32_t i
        cdef EFd *grown
        if fd < 0:
            return NULL
        if fd >= cap:
            while cap <= fd:
                cap *= 2
            grown = <EFd *>realloc(self.fds, cap * sizeof(EFd))
            if grown == NULL:
                self.oom += 1
                return NULL
            self.fds = grown
            memset(self.fds + self.fds_cap, 0, (cap - self.fds_cap) * sizeof(EFd))
            for i in range(self.fds_cap, cap):
                self.fds[i].head[0] = self.fds[i].head[1] = self.fds[i].head[2] = -1
                self.fds[i].tail[0] = self.fds[i].tail[1] = self.fds[i].tail[2] = -1
            self.fds_cap = cap
        return &self.fds[fd]

    # Put fd in the epoll set (once: edge-triggered for in and out until
    # it is closed), and make it non-blocking: the engine's sockets are
    # blocking, which io_uring turns into waiting in the kernel, and here an
    # accept or connect would block the whole loop. 0, or -errno.
    cdef int watch(self, int fd) noexcept nogil:
        cdef epoll_event ev
        cdef EFd *e = self.fd_get(fd)
        if e == NULL:
            return -ENOMEM
        if e.reg:
            return 0
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
        ev.data.u64 = 0
        ev.data.fd = fd
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0 and errno != EEXIST:
            return -errno
        e.reg = 1
        return 0

    # The fd is being closed: the kernel drops it from the epoll set with
    # its last reference, and its number may come back as another socket.
    cdef void forget(self, int fd) noexcept nogil:
        if 0 <= fd < self.fds_cap:
            self.fds[fd].reg = 0
            self.fds[fd].zc = 0
            self.fds[fd].zc_next = 0
            self.fds[fd].close_op = 0

    cdef void list_add(self, int fd, int w, int32_t o) noexcept nogil:
        cdef EFd *e = &self.fds[fd]
        self.ops[o].where = <uint8_t>w
        self.ops[o].next = -1
        if e.tail[w - 1] >= 0:
            self.ops[e.tail[w - 1]].next = o
        else:
            e.head[w - 1] = o
        e.tail[w - 1] = o

    cdef void list_remove(self, int32_t o) noexcept nogil:
        cdef int w = self.ops[o].where
        cdef EFd *e
        cdef int32_t x, prev = -1
        if w < W_IN or w > W_ZC:
            return
        e = &self.fds[self.ops[o].sqe.fd]
        x = e.head[w - 1]
        while x >= 0 and x != o:
            prev = x
            x = self.ops[x].next
        if x < 0:
            return
        if prev >= 0:
            self.ops[prev].next = self.ops[o].next
        else:
            e.head[w - 1] = self.ops[o].next
        if e.tail[w - 1] == o:
            e.tail[w - 1] = prev
        self.ops[o].next = -1
        self.ops[o].where = W_NONE

    cdef void tm_add(self, int32_t o, int64_t deadline) noexcept nogil:
        cdef int32_t *grown
        if self.ntm == self.tm_cap:
            grown = <int32_t *>realloc(self.tm, self.tm_cap * 2 * sizeof(int32_t))
            if grown == NULL:
                self.oom += 1
                return
            self.tm = grown
            self.tm_cap *= 2
        self.ops[o].deadline = deadline
        self.ops[o].where = W_TIMER
        self.tm[self.ntm] = o
        self.ops[o].tm_idx = self.ntm
        self.ntm += 1
        self.tm_up(self.ntm - 1)

    # The timers are a binary min-heap on deadline (tm[0] is the next one),
    # each op knowing its place (tm_idx): add, remove and the next deadline
    # are O(log n) or better. A plain array scanned on every wait was O(n)
    # per wait with many connects pending.
    cdef void tm_remove(self, int32_t o) noexcept nogil:
        cdef int32_t k = self.ops[o].tm_idx
        if k < 0:
            return
        self.ntm -= 1
        self.ops[o].tm_idx = -1
        self.ops[o].where = W_NONE
        if k == self.ntm:
            return
        self.tm[k] = self.tm[self.ntm]
        self.ops[self.tm[k]].tm_idx = k
        if k > 0 and self.ops[self.tm[k]].deadline < self.ops[self.tm[(k - 1) // 2]].deadline:
            self.tm_up(k)
        else:
            self.tm_down(k)

    cdef void tm_swap(self, int32_t a, int32_t b) noexcept nogil:
        cdef int32_t t = self.tm[a]
        self.tm[a] = self.tm[b]
        self.tm[b] = t
        self.ops[self.tm[a]].tm_idx = a
        self.ops[self.tm[b]].tm_idx = b

    cdef void tm_up(self, int32_t k) noexcept nogil:
        while k > 0 and self.ops[self.tm[k]].deadline < self.ops[self.tm[(k - 1) // 2]].deadline:
            self.tm_swap(k, (k - 1) // 2)
            k = (k - 1) // 2

    cdef void tm_down(self, int32_t k) noexcept nogil:
        cdef int32_t c
        while True:
            c = 2 * k + 1
            if c >= self.ntm:
                return
            if c + 1 < self.ntm and self.ops[self.tm[c + 1]].deadline < self.ops[self.tm[c]].deadline:
                c += 1
            if self.ops[self.tm[c]].deadline >= self.ops[self.tm[k]].deadline:
                return
            self.tm_swap(k, c)
            k = c

    cdef void again_add(self, int fd) noexcept nogil:
        cdef int32_t *grown
        if self.fds[fd].again:
            return
        if self.nagain == self.again_cap:
            grown = <int32_t *>realloc(self.again_fds, self.again_cap * 2 * sizeof(int32_t))
            if grown == NULL:
                self.oom += 1
                return
            self.again_fds = grown
            self.again_cap *= 2
        self.fds[fd].again = 1
        self.again_fds[self.nagain] = fd
        self.nagain += 1

    def stats(self):
        return {"epoll_wakeups": self.wakeups, "io_syscalls": self.syscalls_io,
                "ops_live": sum(1 for i in range(self.ops_cap) if self.ops[i].live)}
