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
# driver's reading of one operation, and the test suite runs every
# behaviour against both to find it.
#
# How each operation is carried out is in epoll_ops.pxi; this file holds
# the driver contract, the submission side, the wait, and the per-fd
# lists, timer heap and again list the operations wait on.
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
    TURN_CAP = 16           # accepts one multishot accept does per turn before the others
    BUNDLE_IOV = 16         # buffers one recv bundle may fill

cdef inline int64_t ep_now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec

cdef inline int64_t ts_ns(uint64_t addr) noexcept nogil:
    cdef __kernel_timespec *t = <__kernel_timespec *>addr
    return t.tv_sec * 1000000000 + t.tv_nsec


cdef class Epoll(Driver):
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
        free(self.br)
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

    # Submit, wait (not at all if completions are waiting), post the CQEs
    # io_uring would have posted.
    cdef int submit_and_wait(self, int64_t timeout_ns) noexcept nogil:
        cdef int ret = self.wait(timeout_ns)
        if self.oom:
            return -ENOMEM
        return ret

    # Copies: handling a completion may post more, and the array may move.
    cdef unsigned peek_batch(self, io_uring_cqe **cqes, unsigned n) noexcept nogil:
        cdef unsigned k = 0
        n = min(n, <unsigned>EP_HARVEST)
        while k < n and self.cq_head < self.cq_n:
            self.harvest[k] = self.cq[self.cq_head]
            cqes[k] = &self.harvest[k]
            self.cq_head += 1
            k += 1
        if self.cq_head == self.cq_n:
            self.cq_head = 0
            self.cq_n = 0
        return k

    cdef void advance(self, unsigned n) noexcept nogil:
        pass                # peek_batch already took them off the array

    cdef unsigned ready(self) noexcept nogil:
        return self.cq_n - self.cq_head

    cdef bint cq_overflowed(self) noexcept nogil:
        return False        # the array grows instead

    # The same ring layout in our own memory; we play the kernel's side of
    # it (uc_br_peek). There is no incremental consumption here.
    cdef io_uring_buf_ring *buf_ring_setup(self, unsigned entries, bint incremental,
                                           int *err) noexcept nogil:
        cdef io_uring_buf_ring *br = NULL
        if incremental or self.br != NULL:
            err[0] = -EINVAL
            return NULL
        if posix_memalign(<void **>&br, 4096, <size_t>entries * sizeof(io_uring_buf)) != 0:
            err[0] = -ENOMEM
            return NULL
        io_uring_buf_ring_init(br)
        self.br = br
        self.br_mask = entries - 1
        return br

    cdef void buf_ring_free(self, io_uring_buf_ring *br, unsigned entries) noexcept nogil:
        if br != NULL and br == self.br:
            free(self.br)
            self.br = NULL

    cdef int buf_ring_head(self, unsigned *head) noexcept nogil:
        head[0] = self.br_head
        return 0

    # MSG_ZEROCOPY sends from any address: there is no table to register.
    cdef int buffers_sparse(self, unsigned n) noexcept nogil:
        return -EOPNOTSUPP

    cdef int buffer_update(self, unsigned idx, void *addr, size_t len) noexcept nogil:
        return -EOPNOTSUPP

    # Turn every prepared SQE into an op, wire the links, then start each
    # chain's head in submission order (as io_uring issues them). The
    # contract's submit(): ops that finish at once post their CQEs now.
    cdef int submit(self) noexcept nogil:
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
            ep_start(self, self.pend[i])
        return <int>n

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
                ep_start(self, nx)
            else:
                while nx >= 0:
                    after = self.ops[nx].link
                    self.ops[nx].link = -1
                    self.complete(nx, -ECANCELED, 0)
                    nx = after

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
            until = now + timeout_ns if timeout_ns >= 0 else INT64_MAX
            if self.ntm > 0:
                until = min(until, self.ops[self.tm[0]].deadline)   # the heap's top
            # Round up: waking before the deadline would spin until it.
            if until == INT64_MAX:
                ms = -1
            else:
                ms = <int>min((until - now + 999999) // 1000000, 0x7fffffff) if until > now else 0
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
                if ep_zc_drain(self, fd) > 0 and not (ev & ~EPOLLERR):
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
            r = ep_attempt(self, x, events)
            if r == W_AGAIN:
                self.again_add(fd)
                r = W_IN
            if r != W_NONE:
                self.list_add(fd, r, x)
            x = nxt

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
