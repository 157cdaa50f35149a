# The engine: a preallocated flow table and one per-flow state machine, driven
# by io_uring completions. Everything from io_uring_submit_and_wait to the
# next one runs nogil on C structs; Python is entered once per batch.
#
# Reading order: user_data encoding, the CQE dispatcher, the event handlers
# (accept, connect, recv, send, shutdown), then flow_step/dir_step -- the one
# place that decides what each flow submits next -- then the close path and
# the buffer pool.
#
# Invariants (each is relied on below; break one and bytes are lost):
# - Received bytes have one owner: the kernel (filling the buffer), exactly
#   one direction's send queue, or -- sent zero-copy -- the kernel until the
#   last notification for them (the segment parked, next == SEG_SENT).
#   seg_sent() decides between the last two. A buffer goes back to the ring
#   (buf_return(), the only way back) when the kernel has stopped filling it
#   and the last of its segments is freed.
# - A direction has at most one send in flight, so bytes leave in the order
#   they arrived, and a short send resumes from head_off.
# - shutdown(SHUT_WR) is submitted only when the direction has read EOF, its
#   queue is empty and no send is in flight: the FIN follows the last byte.
# - fds are closed only when flow.inflight == 0: no CQE can name them after.
# - A slot's generation is bumped on release, and it is in every user_data,
#   so a CQE that outlives its flow is recognised and dropped.

# --- user_data ---------------------------------------------------------------
# bits 0-19 slot | 20-35 generation | 36-55 segment | 56-60 op | 61 direction
# The segment is there for SEND_ZC: its notification CQE, which may come
# after later sends, must say which bytes the kernel has let go of.
cdef enum Op:
    OP_ACCEPT = 1
    OP_ACCEPT_TIMER
    OP_CONNECT
    OP_CONNECT_TIMEOUT
    OP_RECV
    OP_SEND
    OP_SEND_ZC
    OP_CANCEL
    OP_CLOSE
    OP_ENGINE_CANCEL    # a cancel not tied to a flow (the accept); CQE ignored
    OP_WATCH            # peek: multishot poll on the client, one CQE per wakeup
    OP_CONSUME          # peek: MSG_TRUNC recv dropping delivered bytes
    OP_POLL             # splice: readiness poll linked before a splice in
    OP_POLL_OUT         # splice: readiness poll linked before a splice out
    OP_SPLICE_IN        # splice: source socket -> pipe
    OP_SPLICE_OUT       # splice: pipe -> sink socket
    OP_WAKE             # poll on the signal wakeup fd: return to Python
    OP_ERRWATCH         # multishot poll for an error on a side nothing else watches
    OP_LAST = OP_ERRWATCH

cdef enum:
    SLOT_BITS = 20           # --max-conns is capped at 2**20
    GEN_MASK = 0xFFFF
    SEG_SHIFT = 36
    SEG_MAX = 1 << 20        # segments the user_data field can name
    SEG_SENT = -2            # Seg.next: fully sent, waiting for its notifications
    SEGS_PER_BUF = 8         # initial segment table, per buffer (it doubles when full)
    CQE_BATCH = 256          # CQEs harvested per peek
    TAKE_OK = 0              # ring_take: the bytes are queued (or dropped as asked)
    TAKE_NO_SEG = 1          # ... no segment could record them: lost
    TAKE_ORDER = 2           # ... the CQE's buffer is not the ring's head entry: untrusted
    ACCEPT_PAUSE_MS = 100    # accept pause after EMFILE/ENFILE
    ACCEPT_BACKOFF_MAX_MS = 3200   # longest pause after repeated other accept errors
    LOG_CAP = 4096           # closed-flow records between two drains
    LOG_BATCH = 512          # ... run_c returns to Python once this many wait
    LOG_DELAY_NS = 5000000   # ... or once the oldest has waited 5 ms: a close line is
                             # prompt, and Python runs at most 200 times a second for them
    ZC_JUDGE_AFTER = 16      # auto mode: notifications before judging a direction
    CANCEL_CHECK_NS = 2000000000   # a failing flow's cancels looked at again after 2 s

cdef inline uint64_t ud_make(uint32_t slot, uint32_t gen, int op, int d) noexcept nogil:
    return (<uint64_t>slot) | ((<uint64_t>(gen & GEN_MASK)) << SLOT_BITS) \
        | ((<uint64_t>op) << 56) | ((<uint64_t>d) << 61)

cdef inline uint64_t ud_with_seg(uint64_t ud, int32_t si) noexcept nogil:
    return ud | ((<uint64_t>si & (SEG_MAX - 1)) << SEG_SHIFT)

cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


CAUSES = {
    C_NORMAL: ("normal", "--"),
    C_CLIENT_RESET: ("client_reset", "CD"),
    C_UPSTREAM_RESET: ("upstream_reset", "SD"),
    C_UPSTREAM_REFUSED: ("upstream_refused", "SC"),
    C_CONNECT_TIMEOUT: ("connect_timeout", "sC"),
    C_CONNECT_ERROR: ("connect_error", "SC"),
    C_PROXY_SHUTDOWN: ("proxy_shutdown", "PD"),
    C_RESOURCE: ("resource", "RC"),
    C_IDLE_TIMEOUT: ("idle_timeout", "cD"),
    C_CLIENT_FIN_TIMEOUT: ("client_fin_timeout", "cD"),
    C_SERVER_FIN_TIMEOUT: ("server_fin_timeout", "sD"),
}


cdef str _format_addr(sockaddr_storage *ss):
    cdef char buf[64]
    cdef sockaddr_in *a4
    cdef sockaddr_in6 *a6
    if ss.ss_family == AF_INET:
        a4 = <sockaddr_in *>ss
        inet_ntop(AF_INET, &a4.sin_addr, buf, sizeof(buf))
        return f"{buf.decode()}:{ntohs(a4.sin_port)}"
    if ss.ss_family == AF_INET6:
        a6 = <sockaddr_in6 *>ss
        inet_ntop(AF_INET6, &a6.sin6_addr, buf, sizeof(buf))
        return f"[{buf.decode()}]:{ntohs(a6.sin6_port)}"
    return "?"


cdef class Engine:
    def __cinit__(self, driver not None, *, uint32_t max_conns, uint32_t buffers,
                  uint32_t buffer_size, uint64_t max_inflight, double connect_timeout,
                  bint multishot_accept=True,
                  bint zerocopy=False, uint32_t zc_threshold=16384,
                  bint zc_registered=True, bint zc_backoff=False, bint recv_bundle=False,
                  bint recv_inc=False,
                  bint splice=False, uint32_t pipe_size=0, bint peek=False,
                  uint32_t replay_window=65536, uint32_t segs_per_buf=SEGS_PER_BUF,
                  uint32_t max_buffers=0, double idle_timeout=0,
                  double client_fin_timeout=0, double server_fin_timeout=0,
                  int keepalive_idle=0, int keepalive_interval=0, int keepalive_count=0):
        cdef int err = 0
        cdef uint32_t i
        cdef int pr, pw
        cdef uint32_t pcap
        # The driver: a Ring (io_uring) or an Epoll carrying out the same
        # SQEs with syscalls. Everything below this line is the same for both.
        if isinstance(driver, Epoll):
            self.ep = driver
            self.use_ep = True
            recv_inc = False        # the kernel ring's feature (the driver does bundles)
        else:
            self.ring = <Ring?>driver
        self.listen_fd = -1
        self.wake_fd = -1
        self.ka_idle = keepalive_idle
        self.ka_intvl = keepalive_interval
        self.ka_cnt = keepalive_count
        self.idle_ns = <int64_t>(idle_timeout * 1e9)
        self.cfin_ns = <int64_t>(client_fin_timeout * 1e9)
        self.sfin_ns = <int64_t>(server_fin_timeout * 1e9)
        self.tw = TimerWheel(max_conns, now_ns())
        self.max_conns = max_conns
        self.max_bufs = max(buffers, max_buffers)
        if self.max_bufs > 32768:
            raise ValueError("at most 32768 buffers (the kernel's buffer-ring limit)")
        cdef uint32_t entries = 1
        while entries < self.max_bufs:
            entries <<= 1
        self.ring_mask = entries - 1
        self.buf_size = buffer_size
        # Free buffers the ring keeps before it grows, and that read-ahead
        # leaves alone (see recv_quota): an eighth of the initial pool.
        self.buf_reserve = max(1, buffers // 8)
        self.readahead_budget = max(1, buffers - self.buf_reserve)
        # A short read still pins a whole buffer, so the bound is in buffers.
        self.max_queued_bufs = max(1, <uint32_t>(max_inflight // buffer_size))
        self.ms_accept = multishot_accept
        self.connect_timeout_ns = <int64_t>(connect_timeout * 1e9)
        self.connect_ts.tv_sec = <int64_t>connect_timeout
        self.connect_ts.tv_nsec = <long long>((connect_timeout - <int64_t>connect_timeout) * 1e9)
        self.acc_backoff_ms = ACCEPT_PAUSE_MS
        self.wait_head = -1
        self.wait_tail = -1
        self.splice = splice
        self.pipe_size = pipe_size
        self.peek = peek
        self.replay_window = replay_window

        # Reserved, not committed (MAP_NORESERVE, zero pages): a slot's page
        # costs memory once a flow first uses it (slot_take), so the table
        # follows the most flows open at once, not --max-conns. (calloc
        # would memset a chunk it took from the heap.)
        self.flows_bytes = <size_t>max(1, max_conns) * sizeof(Flow)
        self.flows = <Flow *>mmap(NULL, self.flows_bytes, PROT_READ | PROT_WRITE,
                                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if <void *>self.flows == MAP_FAILED:
            self.flows = NULL
        self.buf_fill = <uint32_t *>calloc(self.max_bufs, sizeof(uint32_t))
        self.buf_refs = <uint32_t *>calloc(self.max_bufs, sizeof(uint32_t))
        self.buf_kern = <uint8_t *>calloc(self.max_bufs, sizeof(uint8_t))
        self.ring_bid = <uint16_t *>calloc(entries, sizeof(uint16_t))
        # The table grows when full; segs_per_buf is a test knob (see
        # proxy.py) that makes growth certain rather than a matter of how
        # many completions share a batch.
        self.nsegs = min(<uint32_t>SEG_MAX, buffers * max(1, segs_per_buf))
        self.segs = <Seg *>calloc(self.nsegs, sizeof(Seg))
        self.bundle = recv_bundle
        self.inc = recv_inc
        self.log = <CloseRec *>calloc(LOG_CAP, sizeof(CloseRec))
        self.fdw_cap = max_conns
        self.fdw = <uint64_t *>calloc(max_conns, sizeof(uint64_t))
        self.log_cap = LOG_CAP
        if (self.flows == NULL or self.buf_fill == NULL
                or self.buf_refs == NULL or self.buf_kern == NULL or self.ring_bid == NULL
                or self.segs == NULL
                or self.log == NULL or self.fdw == NULL):
            raise MemoryError("cannot allocate the flow table")
        # The whole cap is reserved as address space only (MAP_NORESERVE):
        # a page costs memory once the kernel writes into it, so a pool
        # that never grows past --buffers never costs more.
        self.pool_bytes = <size_t>self.max_bufs * buffer_size
        self.buf_mem = <char *>mmap(NULL, self.pool_bytes, PROT_READ | PROT_WRITE,
                                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if <void *>self.buf_mem == MAP_FAILED:
            self.buf_mem = NULL
            raise MemoryError(f"cannot reserve {self.pool_bytes} bytes for the buffer pool")
        # Slots are handed out in order and initialised on first use, so the
        # table costs memory for the most flows ever open at once, not for
        # --max-conns: calloc's pages stay untouched until then.
        self.free_head = -1
        self.slots_used = 0
        for i in range(self.nsegs):
            self.segs[i].next = <int32_t>i + 1 if i + 1 < self.nsegs else -1
        self.seg_free = 0

        if self.use_ep:
            # The same ring layout; the driver plays the kernel's side of it.
            if posix_memalign(<void **>&self.br, 4096, <size_t>entries * sizeof(io_uring_buf)) != 0:
                raise MemoryError()
            io_uring_buf_ring_init(self.br)
            self.ep.br = self.br
            self.ep.br_mask = self.ring_mask
        else:
            self.br = uc_setup_buf_ring(&self.ring.ring, entries, 0, IOU_PBUF_RING_INC if recv_inc else 0, &err)
        if self.br == NULL:
            raise OSError(-err, f"registering the provided-buffer ring failed: {os.strerror(-err)}")
        self.pool_grow(buffers)
        self.st.pool_grows = 0
        io_uring_buf_ring_advance(self.br, self.br_pending)
        self.ring_tail = <uint32_t>self.br_pending
        self.br_pending = 0

        # Zero-copy sends from registered buffers save pinning pages per send.
        # Registering pins (and so touches) every page it covers, so the
        # table starts empty, one slot per buffer id, and a buffer is
        # registered when it is first sent zero-copy (buf_fixed): pinned
        # memory follows the buffers in use, not the pool's reservation
        # (registering the initial pool at start cost 32 MiB of RSS idle).
        # Where registering is refused (RLIMIT_MEMLOCK for non-root), SEND_ZC
        # works on plain addresses.
        self.zc = zerocopy
        self.zc_threshold = zc_threshold
        self.zc_backoff = zc_backoff
        if zerocopy and zc_registered and not self.use_ep:
            self.buf_reg = <uint8_t *>calloc(self.max_bufs, sizeof(uint8_t))
            if self.buf_reg == NULL:
                raise MemoryError()
            self.zc_register_err = -io_uring_register_buffers_sparse(&self.ring.ring, self.max_bufs)
            self.zc_fixed = self.zc_register_err == 0

        # The pipe pool is filled now and kept full, so an idle proxy always
        # holds the same fds and a new flow rarely pays for pipe2 + fcntl.
        if splice:
            self.pipes = PipePool(pipe_size)
            while self.pipes.n < PIPE_POOL:
                err = self.pipes.make(&pr, &pw, &pcap)
                if err < 0:
                    raise OSError(-err, f"creating the splice pipe pool failed: {os.strerror(-err)}")
                self.pipes.put(pr, pw, pcap, 0)

    def __dealloc__(self):
        # The ring must go before the pool: in-flight requests may point into
        # it. stop() has already waited for every flow, so none should be.
        if self.ring is not None:
            if self.br != NULL and not self.ring.closed:
                uc_free_buf_ring(&self.ring.ring, self.br, self.ring_mask + 1, 0)
            self.ring.close()
        if self.ep is not None:
            self.ep.br = NULL
            free(self.br)
            self.ep.close()
        # The pipe pool closes its pipes when it goes (PipePool.__dealloc__).
        if self.flows != NULL:
            munmap(self.flows, self.flows_bytes)
        free(self.buf_fill)
        free(self.buf_refs)
        free(self.buf_kern)
        free(self.buf_reg)
        free(self.segs)
        free(self.ring_bid)
        free(self.log)
        free(self.fdw)
        if self.buf_mem != NULL:
            munmap(self.buf_mem, self.pool_bytes)

    # --- configuration (Python, start-up only) ------------------------------

    def add_upstream(self, int family, str host, int port):
        """Append an upstream; flows try them in the order added."""
        if self.n_up == MAX_UPSTREAMS:
            raise ValueError(f"at most {MAX_UPSTREAMS} upstreams")
        cdef int i = self.n_up
        cdef sockaddr_in *a4 = <sockaddr_in *>&self.up_addr[i]
        cdef sockaddr_in6 *a6 = <sockaddr_in6 *>&self.up_addr[i]
        memset(&self.up_addr[i], 0, sizeof(sockaddr_storage))
        hb = host.encode()
        if family == AF_INET:
            a4.sin_family = AF_INET
            a4.sin_port = htons(port)
            ok = inet_pton(AF_INET, hb, &a4.sin_addr)
            self.up_len[i] = sizeof(sockaddr_in)
        elif family == AF_INET6:
            a6.sin6_family = AF_INET6
            a6.sin6_port = htons(port)
            ok = inet_pton(AF_INET6, hb, &a6.sin6_addr)
            self.up_len[i] = sizeof(sockaddr_in6)
        else:
            raise ValueError("family must be AF_INET or AF_INET6")
        if ok != 1:
            raise ValueError(f"not a numeric address: {host!r}")
        self.up_family[i] = family
        self.n_up += 1

    def add_listener(self, int fd, int family):
        if self.listen_fd >= 0:
            raise ValueError("one listener per engine")
        self.listen_fd = fd
        self.listen_family = family
        with nogil:
            self.accept_step()

    # A signal that lands while io_uring_enter waits does not always end the
    # wait: when the same call submitted SQEs the kernel returns their count,
    # not -EINTR, and liburing waits again -- the stop request sat unseen
    # for a whole batch timeout. Python's signal handler writes to this fd
    # (signal.set_wakeup_fd); a poll on it is a CQE, and run_c returns.
    def watch_wakeup(self, int fd):
        self.wake_fd = fd

    cdef void wake_arm(self) noexcept nogil:
        cdef io_uring_sqe *s = self.sqe()
        io_uring_prep_poll_add(s, self.wake_fd, POLLIN)
        io_uring_sqe_set_data64(s, ud_make(0, 0, OP_WAKE, 0))
        self.wake_armed = True

    # --- CQE dispatch ---------------------------------------------------------

    cdef void handle(self, io_uring_cqe *cqe) noexcept nogil:
        cdef uint64_t ud = cqe.user_data
        cdef int op = <int>((ud >> 56) & 0x1F)
        cdef int d = <int>((ud >> 61) & 1)
        cdef uint32_t slot = <uint32_t>(ud & ((1 << SLOT_BITS) - 1))
        cdef uint32_t gen = <uint32_t>((ud >> SLOT_BITS) & GEN_MASK)
        cdef uint32_t si = <uint32_t>((ud >> SEG_SHIFT) & (SEG_MAX - 1))
        cdef Flow *f
        cdef int res = cqe.res
        cdef uint32_t cflags = cqe.flags

        if op < OP_ACCEPT or op > OP_LAST:
            # Not an op we prepare: a corrupted or foreign user_data. Counted
            # and dropped; above all it must not decrement a flow's inflight
            # (that would close fds under operations still using them).
            self.st.unknown_cqes += 1
            return
        if op == OP_ACCEPT:
            self.on_accept(res, cflags)
            return
        if op == OP_ENGINE_CANCEL:
            return
        if op == OP_WAKE:
            self.wake_armed = False
            self.woken = True
            return
        if op == OP_ACCEPT_TIMER:
            self.acc_timer = False
            self.acc_paused = False
            self.fdw_retry()
            self.accept_step()
            return
        if slot >= self.max_conns:
            self.st.stale_cqes += 1
            return
        f = &self.flows[slot]
        if f.state == F_FREE or (f.gen & GEN_MASK) != gen:
            # A completion that outlived its flow. Our close path waits for
            # every CQE, so this is defence in depth -- but the buffers it
            # filled must still go home or the pool shrinks for good.
            self.st.stale_cqes += 1
            if cflags & IORING_CQE_F_BUFFER:
                self.ring_take(NULL, cflags >> IORING_CQE_BUFFER_SHIFT, res, cflags)
            return
        if not (cflags & IORING_CQE_F_MORE):
            f.inflight -= 1
        if res > 0 and (op == OP_RECV or op == OP_SEND or op == OP_SPLICE_IN
                        or op == OP_SPLICE_OUT or (op == OP_SEND_ZC and not (cflags & IORING_CQE_F_NOTIF))):
            f.t_active_ns = self.batch_ns      # bytes moved: the timeouts start again
        if op == OP_SEND_ZC:
            # Notifications owed: counted in inflight (each is its SQE's
            # final CQE) but, unlike every other op, not a use of the fds.
            if cflags & IORING_CQE_F_NOTIF:
                f.zc_owed -= 1
            elif cflags & IORING_CQE_F_MORE:
                f.zc_owed += 1

        if op == OP_RECV:
            self.on_recv(f, d, res, cflags)
        elif op == OP_SEND:
            self.on_send(f, d, res)
        elif op == OP_SEND_ZC:
            self.on_send_zc(f, d, res, cflags, si)
        elif op == OP_CONNECT:
            self.on_connect(f, res)
        elif op == OP_SPLICE_IN:
            self.on_splice_in(f, d, res)
        elif op == OP_SPLICE_OUT:
            self.on_splice_out(f, d, res)
        elif op == OP_WATCH:
            self.on_poll(f, d, res, cflags)
        elif op == OP_CONSUME:
            self.on_consume(f, d, res)
        elif op == OP_ERRWATCH:
            self.on_errwatch(f, d, res, cflags)
        # OP_CONNECT_TIMEOUT, OP_CANCEL, OP_CLOSE, OP_POLL(_OUT) (the splice after
        # it has its own CQE): only the inflight count.
        self.flow_step(slot)

    # --- accept ----------------------------------------------------------------

    cdef void on_accept(self, int res, uint32_t cflags) noexcept nogil:
        if not (cflags & IORING_CQE_F_MORE):
            self.acc_armed = False
            self.acc_cancel = False
        if res >= 0:
            if self.stopping or not self.slot_available():
                # Raced with our cancel of the multishot accept.
                self.close_fd(res)
                self.st.rejected_full += 1
            else:
                self.st.accepted += 1
                self.acc_backoff_ms = ACCEPT_PAUSE_MS
                self.flow_open(res)
        elif res == -EMFILE or res == -ENFILE or res == -ENOMEM or res == -ENOBUFS:
            # Out of fds or memory: the connection stays in the backlog.
            self.accept_pause(-res, ACCEPT_PAUSE_MS)
        elif res == -ECONNABORTED or res == -EAGAIN or res == -EINTR:
            pass                # that client went first, or a spurious wake: accept on
        elif res != -ECANCELED:
            # Anything else (EPERM from a firewall hook, EPROTO, ...) would
            # fail again at once if re-armed at once: back off, doubling the
            # pause up to ACCEPT_BACKOFF_MAX_MS until an accept succeeds.
            self.st.accept_errors += 1
            self.accept_pause(-res, self.acc_backoff_ms)
            self.acc_backoff_ms = min(self.acc_backoff_ms * 2, <uint32_t>ACCEPT_BACKOFF_MAX_MS)
        self.accept_step()

    # Re-arming at once would fail again, so wait pause_ms; the timer's CQE
    # retries (never a spin). The pause's length is read when the timer is
    # submitted, so pause_ts may be changed for the next one.
    cdef void accept_pause(self, int err, uint32_t pause_ms) noexcept nogil:
        cdef io_uring_sqe *s
        self.st.accept_pauses += 1
        self.st.accept_last_err = err
        self.st.accept_pause_ms = pause_ms
        self.pause_ts.tv_sec = pause_ms // 1000
        self.pause_ts.tv_nsec = (pause_ms % 1000) * 1000000
        self.acc_paused = True
        if not self.acc_timer and not self.stopping:
            self.acc_timer = True
            s = self.sqe()
            io_uring_prep_timeout(s, &self.pause_ts, 0, 0)
            io_uring_sqe_set_data64(s, ud_make(0, 0, OP_ACCEPT_TIMER, 0))

    # Decides whether an accept should be in flight: not while stopping, not
    # while paused on a resource error or while accepted clients still wait
    # for an fd, not while the flow table is full (HAProxy's maxconn:
    # connections wait in the kernel's backlog).
    cdef void accept_step(self) noexcept nogil:
        cdef io_uring_sqe *s
        cdef bint want = (self.listen_fd >= 0 and not self.stopping and not self.acc_paused
                          and self.fdw_n == 0 and self.slot_available())
        if want and not self.acc_armed:
            s = self.sqe()
            if self.ms_accept:
                io_uring_prep_multishot_accept(s, self.listen_fd, NULL, NULL, SOCK_CLOEXEC)
            else:
                io_uring_prep_accept(s, self.listen_fd, NULL, NULL, SOCK_CLOEXEC)
            io_uring_sqe_set_data64(s, ud_make(0, 0, OP_ACCEPT, 0))
            self.acc_armed = True
        elif not want and self.acc_armed and not self.acc_cancel:
            s = self.sqe()
            io_uring_prep_cancel64(s, ud_make(0, 0, OP_ACCEPT, 0), 0)
            io_uring_sqe_set_data64(s, ud_make(0, 0, OP_ENGINE_CANCEL, 0))
            self.acc_cancel = True

    # --- flow set-up -------------------------------------------------------------

    cdef bint slot_available(self) noexcept nogil:
        return self.free_head >= 0 or self.slots_used < self.max_conns

    # A free slot: a recycled one (its generation moved on at release), or
    # the next never-used one, whose zeroed page is touched only now.
    cdef uint32_t slot_take(self) noexcept nogil:
        cdef uint32_t slot
        if self.free_head >= 0:
            slot = <uint32_t>self.free_head
            self.free_head = self.flows[slot].next_free
            return slot
        slot = self.slots_used
        self.slots_used += 1
        return slot

    cdef void flow_open(self, int cfd) noexcept nogil:
        cdef uint32_t slot = self.slot_take()
        cdef Flow *f = &self.flows[slot]
        cdef int one = 1, zero = 0, rcvbuf = 0
        cdef socklen_t optlen = sizeof(int)
        cdef int d
        self.nactive += 1
        f.state = F_CONNECTING
        f.cause = C_NONE
        f.err = 0
        f.reset_mask = 0
        f.inflight = 0
        f.watch = 0
        f.zc_owed = 0
        f.up_idx = 0
        f.failovers = 0
        f.t_start_ns = now_ns()
        f.fd[0] = cfd
        f.fd[1] = -1
        memset(&f.dir[0], 0, sizeof(Dir) * 2)
        for d in range(2):
            f.dir[d].q_head = -1
            f.dir[d].q_tail = -1
            f.dir[d].wait_prev = -1
            f.dir[d].wait_next = -1
            f.dir[d].pipe_r = -1
            f.dir[d].pipe_w = -1
        # SO_PEERNAME, not getpeername(): a client that reset before we got
        # here is in TCP_CLOSE, where getpeername() says ENOTCONN, but the
        # kernel still knows the address (inet_getname with peer=2 skips the
        # state check). It wants the exact address size, not a larger buffer.
        f.peer_len = sizeof(sockaddr_in6) if self.listen_family == AF_INET6 else sizeof(sockaddr_in)
        memset(&f.peer, 0, sizeof(f.peer))
        if getsockopt(cfd, SOL_SOCKET, SO_PEERNAME, &f.peer, &f.peer_len) != 0:
            memset(&f.peer, 0, sizeof(f.peer))
        # The proxy forwards whatever it has as soon as it has it; Nagle
        # would hold a small tail back for an ACK round trip.
        setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
        self.keepalive(cfd)
        if self.splice:
            # Splices run in io-wq workers; a blocking socket would park one
            # per idle flow (docs/kernel-notes.md, Splice). Non-blocking, a splice that
            # cannot move anything ends at once with EAGAIN.
            fcntl(cfd, F_SETFL, fcntl(cfd, F_GETFL) | O_NONBLOCK)
        f.replayable = self.peek
        if self.peek:
            # MSG_PEEK now reads on from the previous peek (6.9+, probed).
            setsockopt(cfd, SOL_SOCKET, SO_PEEK_OFF, &zero, sizeof(zero))
            # Held bytes sit in the receive buffer: holding a quarter of it
            # at most leaves the client room to send while we wait.
            getsockopt(cfd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, &optlen)
            f.replay_limit = min(self.replay_window, <uint32_t>max(rcvbuf, 0) // 4)
        self.flow_dial(slot, f)

    # TCP keep-alive (--tcp-keepalive): a peer that vanished without a FIN
    # or RST (powered off, NAT entry dropped) is then found by the kernel,
    # whose probes go unanswered and end the socket with ETIMEDOUT; the
    # recv or error watch on that side sees it, even with --idle-timeout 0.
    cdef void keepalive(self, int fd) noexcept nogil:
        cdef int one = 1
        if self.ka_idle <= 0:
            return
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one))
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &self.ka_idle, sizeof(int))
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &self.ka_intvl, sizeof(int))
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &self.ka_cnt, sizeof(int))

    # Connect to the flow's current upstream, or queue it until an fd is free.
    cdef void flow_dial(self, uint32_t slot, Flow *f) noexcept nogil:
        if not self.flow_connect(slot, f):
            # The client took the last fd. It is ours now: it waits (accept
            # paused) until an fd comes back, rather than being dropped.
            if self.fdw_n == self.fdw_cap:
                self.flow_fail(f, C_RESOURCE, EMFILE, 0)
                self.flow_step(slot)
                return
            self.fdw[(self.fdw_head + self.fdw_n) % self.fdw_cap] = slot | (<uint64_t>f.gen << 32)
            self.fdw_n += 1
            self.accept_pause(EMFILE, ACCEPT_PAUSE_MS)

    # Create the upstream socket and submit connect + linked timeout.
    # False when the socket cannot be created for lack of fds (try later).
    cdef bint flow_connect(self, uint32_t slot, Flow *f) noexcept nogil:
        cdef int one = 1
        cdef int ufd, d, err
        cdef io_uring_sqe *s
        cdef uint8_t u = f.up_idx
        if self.splice:
            for d in range(2):
                if f.dir[d].pipe_r < 0:
                    err = self.pipes.get(&f.dir[d].pipe_r, &f.dir[d].pipe_w, &f.dir[d].pipe_cap)
                    f.dir[d].pipe_bytes = 0
                    if err == -EMFILE or err == -ENFILE:
                        return False
                    if err < 0:
                        self.flow_fail(f, C_RESOURCE, -err, 0)
                        self.flow_step(slot)
                        return True
        ufd = socket(self.up_family[u], SOCK_STREAM | SOCK_CLOEXEC, 0)
        if ufd < 0:
            if errno == EMFILE or errno == ENFILE:
                return False
            self.flow_fail(f, C_RESOURCE, errno, 0)
            self.flow_step(slot)
            return True
        f.fd[1] = ufd
        setsockopt(ufd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
        self.keepalive(ufd)
        # connect + linked timeout: the pair must reach the kernel in one
        # submit, or the link is broken (io_uring_prep_link_timeout(3)).
        self.reserve(2)
        s = self.flow_sqe(slot, f, OP_CONNECT, 0)
        io_uring_prep_connect(s, ufd, <sockaddr *>&self.up_addr[u], self.up_len[u])
        s.flags |= IOSQE_IO_LINK
        s = self.flow_sqe(slot, f, OP_CONNECT_TIMEOUT, 0)
        io_uring_prep_link_timeout(s, &self.connect_ts, 0)
        return True

    # Flows waiting for an fd, oldest first; stop at the first that still
    # cannot get one. A wait longer than --connect-timeout ends the flow.
    cdef void fdw_retry(self) noexcept nogil:
        cdef uint64_t e
        cdef uint32_t slot
        cdef Flow *f
        while self.fdw_n > 0:
            e = self.fdw[self.fdw_head]
            slot = <uint32_t>e
            f = &self.flows[slot]
            if f.gen != <uint32_t>(e >> 32) or f.state != F_CONNECTING or f.fd[1] >= 0:
                pass      # ended meanwhile (stop, or the slot was reused)
            elif now_ns() - f.t_start_ns > self.connect_timeout_ns:
                self.flow_fail(f, C_RESOURCE, EMFILE, 0)
                self.flow_step(slot)
            elif not self.flow_connect(slot, f):
                self.accept_pause(EMFILE, ACCEPT_PAUSE_MS)
                return
            self.fdw_head = (self.fdw_head + 1) % self.fdw_cap
            self.fdw_n -= 1

    # The driver's SQE: io_uring's SQ, or the epoll driver's array.
    cdef io_uring_sqe *sqe(self) noexcept nogil:
        if self.use_ep:
            return self.ep.sqe()
        return self.ring.sqe()

    cdef void reserve(self, unsigned n) noexcept nogil:
        if self.use_ep:
            self.ep.reserve(n)
        else:
            self.ring.reserve(n)

    # An fd closed outside an OP_CLOSE: the epoll driver must forget it, or
    # the next socket to get its number would never be put in the set.
    cdef void close_fd(self, int fd) noexcept nogil:
        if self.use_ep:
            self.ep.forget(fd)
        close(fd)

    # Every SQE of a flow goes through here, so inflight counts them all.
    cdef io_uring_sqe *flow_sqe(self, uint32_t slot, Flow *f, int op, int d) noexcept nogil:
        cdef io_uring_sqe *s = self.sqe()
        f.inflight += 1
        # liburing's prep helpers set every field but user_data, so it is
        # safe to set it before the caller preps the operation.
        io_uring_sqe_set_data64(s, ud_make(slot, f.gen, op, d))
        return s

    # --- events ------------------------------------------------------------------

    cdef void on_connect(self, Flow *f, int res) noexcept nogil:
        if f.state != F_CONNECTING:
            return
        if res == 0:
            f.state = F_OPEN
            f.t_active_ns = self.batch_ns
            self.tw.add(<uint32_t>(f - self.flows), self.flow_deadline(f, NULL))
            if self.splice:
                # Only now: a non-blocking connect would not be waited for.
                fcntl(f.fd[1], F_SETFL, fcntl(f.fd[1], F_GETFL) | O_NONBLOCK)
        elif res == -ECONNREFUSED:
            self.flow_fail(f, C_UPSTREAM_REFUSED, -res, 0)
        elif res == -ECANCELED or res == -ETIMEDOUT:
            # -ECANCELED: the linked timeout fired (we cancel connects only
            # once the flow is already closing, which returned above).
            self.flow_fail(f, C_CONNECT_TIMEOUT, ETIMEDOUT, 0)
        else:
            self.flow_fail(f, C_CONNECT_ERROR, -res, 0)

    cdef void on_recv(self, Flow *f, int d, int res, uint32_t cflags) noexcept nogil:
        cdef Dir *D = &f.dir[d]
        cdef int taken
        if not (cflags & IORING_CQE_F_MORE):
            D.flags &= ~D_RECV_ARMED
        if cflags & IORING_CQE_F_BUFFER:
            # Ownership: kernel -> this direction's send queue (dropped if
            # the flow is ending or nothing was read).
            taken = self.ring_take(D if res > 0 and f.state == F_OPEN else NULL,
                                   cflags >> IORING_CQE_BUFFER_SHIFT, res, cflags)
            if taken != TAKE_OK:
                # The bytes are lost (no room to record them), or cannot be
                # trusted (the CQE's buffer is not the one the ring order
                # says): the flow must not go on as if they were sent.
                self.flow_fail(f, C_RESOURCE, ENOMEM if taken == TAKE_NO_SEG else EPROTO, 3)
                return
        if res > 0 and self.peek and f.state == F_OPEN:
            if d == 0:
                D.peeked += <uint32_t>res
            else:
                f.replayable = 0     # the upstream answered: no failover from here
        if f.state != F_OPEN or res > 0:
            return
        if res == 0:
            D.flags |= D_EOF
            self.tw_half_closed(f)
            if d == 1:
                f.replayable = 0
        elif res == -EAGAIN:
            # Only a peek (MSG_DONTWAIT) ends so: nothing lies past the peek
            # offset. The client's poll says when that changes.
            D.flags &= ~D_READY
            self.st.peek_eagain += 1
        elif res == -ENOBUFS:
            # The pool is empty: backpressure, not an error. The bytes stay in
            # the socket; bufs_flush() re-arms us when buffers come back.
            self.st.enobufs += 1
            self.wait_push(<uint32_t>(f - self.flows), d)
        elif res != -ECANCELED:
            self.side_failed(f, d, res)

    cdef void on_send(self, Flow *f, int d, int res) noexcept nogil:
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
                self.side_failed(f, 1 - d, res if res < 0 else -EPIPE)
            return
        if <uint32_t>res < D.send_len:
            self.st.short_sends += 1      # the rest goes out in the next send
        D.moved_bytes += <uint64_t>res
        # Consume res bytes from the head of the queue; each segment fully
        # sent leaves it (seg_sent decides where to).
        while res > 0:
            si = D.q_head
            avail = <int>(self.segs[si].len - D.head_off)
            if res < avail:
                D.head_off += <uint32_t>res
                break
            res -= avail
            D.head_off = 0
            self.seg_sent(f, d, self.seg_pop(D))

    # SEND_ZC posts up to two CQEs with the same user_data: the result (with
    # IORING_CQE_F_MORE when a notification follows) and the notification
    # (IORING_CQE_F_NOTIF). Only the notification gives the buffer back
    # (io_uring_prep_send_zc(3)); whether one comes is F_MORE's say, not
    # res's: an errored send can still post one.
    cdef void on_send_zc(self, Flow *f, int d, int res, uint32_t cflags, uint32_t si) noexcept nogil:
        cdef Seg *g = &self.segs[si]
        if cflags & IORING_CQE_F_NOTIF:
            self.st.zc_notifs += 1
            if <uint32_t>res & IORING_NOTIF_USAGE_ZC_COPIED:
                self.st.zc_copied += 1
            if self.zc_backoff:
                self.zc_judge(&f.dir[d], (<uint32_t>res & IORING_NOTIF_USAGE_ZC_COPIED) != 0)
            g.notif -= 1
            if g.notif == 0 and g.next == SEG_SENT:
                self.dir_hold(&f.dir[d], 0, -1)
                self.delivered(f, d, <int32_t>si)
                self.seg_free_one(<int32_t>si)
            return
        if cflags & IORING_CQE_F_MORE:
            self.st.zc_sends += 1
        else:
            g.notif -= 1                  # counted at submit; none will come
        if res == -EOPNOTSUPP:
            # The kernel or this socket cannot send zero-copy: nothing was
            # sent. Turn zero-copy off for good (Python logs it once) and let
            # dir_step send the same bytes the copying way.
            self.zc = False
            self.st.zc_eopnotsupp += 1
            f.dir[d].flags &= ~D_SEND_BUSY
            return
        self.on_send(f, d, res)

    # Auto mode: zero-copy pays only where the kernel really skips the copy
    # (a NIC that can send from user pages). Where its usage reports say it
    # copied (loopback, veth, ...) the zero-copy send cost more than a plain
    # one, so after ZC_JUDGE_AFTER notifications, a direction whose sends
    # were mostly copied goes back to plain sends for good.
    cdef void zc_judge(self, Dir *D, bint copied) noexcept nogil:
        if D.flags & D_ZC_OFF or D.zc_notifs >= ZC_JUDGE_AFTER:
            return
        D.zc_notifs += 1
        D.zc_copied += copied
        if D.zc_notifs == ZC_JUDGE_AFTER and 2 * D.zc_copied > D.zc_notifs:
            D.flags |= D_ZC_OFF
            self.st.zc_backoffs += 1

    # Ownership: send queue -> freed, or -> parked until the notifications
    # owed for these bytes have all arrived (then on_send_zc frees it).
    cdef void seg_sent(self, Flow *f, int d, int32_t si) noexcept nogil:
        if self.segs[si].notif:
            self.segs[si].next = SEG_SENT
            self.dir_hold(&f.dir[d], 0, 1)
        else:
            self.delivered(f, d, si)
            self.seg_free_one(si)

    # The kernel is done with a segment's bytes: sent, and notified if sent
    # zero-copy. In peek mode that is when the client's copy of them may go.
    cdef void delivered(self, Flow *f, int d, int32_t si) noexcept nogil:
        if self.peek and d == 0:
            f.dir[0].released += self.segs[si].len
            if f.dir[0].released >= f.replay_limit:
                # Holding more could close the client's window on an upstream
                # that reads everything before it answers: give up replay.
                f.replayable = 0

    # Forward direction d's FIN, now. shutdown(SHUT_WR) on a TCP socket
    # queues the FIN behind the bytes already sent and returns; it never
    # blocks. io_uring's SHUTDOWN op cannot complete inline: the kernel hands
    # every one to an io-wq worker, and waking it cost 16% of the proxy's CPU
    # with a new connection per request (perf, wrk -H "Connection: close").
    # So it is a plain syscall, on both backends. A failure (the peer reset
    # meanwhile) fails the flow; flow_step stops stepping a flow that failed.
    cdef void shut_wr(self, Flow *f, int d) noexcept nogil:
        cdef int res = shutdown(f.fd[1 - d], SHUT_WR)
        f.dir[d].flags |= D_SHUT_SENT | D_SHUT_DONE
        if res != 0 and f.state == F_OPEN:
            self.side_failed(f, 1 - d, -errno)

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

    cdef void on_poll(self, Flow *f, int d, int res, uint32_t cflags) noexcept nogil:
        if not (cflags & IORING_CQE_F_MORE):
            f.dir[d].flags &= ~D_POLL_ARMED      # re-armed by peek_step
        if f.state == F_OPEN and res != -ECANCELED:
            f.dir[d].flags |= D_READY
            # This poll is also the client's error watch (watch_step): while
            # the peek waits for room, only it can see a reset.
            self.side_error(f, d, res)

    cdef void on_consume(self, Flow *f, int d, int res) noexcept nogil:
        cdef Dir *D = &f.dir[d]
        D.flags &= ~D_CONSUME_BUSY
        if f.state != F_OPEN:
            return
        if res > 0:
            D.consumed += <uint32_t>res
            D.released += D.consume_len - <uint32_t>res
            self.st.consumed_bytes += <uint32_t>res
        elif res != -ECANCELED:
            # The bytes were peeked, so they are there; 0 or EAGAIN would mean
            # our count is wrong, which must not pass quietly.
            self.side_failed(f, d, res if res < 0 else -EIO)

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
    cdef void on_splice_in(self, Flow *f, int d, int res) noexcept nogil:
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
            self.tw_half_closed(f)
        elif res == -EAGAIN:
            self.st.splice_eagain += 1
            if D.pipe_bytes == 0:
                D.flags &= ~D_READY
            else:
                D.flags |= D_IN_STUCK
        elif res != -ECANCELED:
            self.side_failed(f, d, res)

    cdef void on_splice_out(self, Flow *f, int d, int res) noexcept nogil:
        cdef Dir *D = &f.dir[d]
        D.flags &= ~D_SEND_BUSY
        if res > 0:
            if <uint32_t>res < D.pipe_bytes:
                self.st.short_sends += 1
            D.pipe_bytes -= <uint32_t>res
            D.moved_bytes += <uint32_t>res
        if f.state != F_OPEN:
            return
        if res > 0:
            D.flags &= ~(D_OUT_WAIT | D_IN_STUCK)
        elif res == -EAGAIN:
            self.st.splice_eagain += 1
            D.flags |= D_OUT_WAIT
        elif res != -ECANCELED:
            # 0 with bytes in the pipe cannot happen; do not retry it forever.
            self.side_failed(f, 1 - d, res if res < 0 else -EPIPE)

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

    cdef int64_t flow_deadline(self, Flow *f, uint8_t *cause) noexcept nogil:
        cdef int64_t t = INT64_MAX
        cdef uint8_t c = C_NONE
        if self.idle_ns:
            t = f.t_active_ns + self.idle_ns
            c = C_IDLE_TIMEOUT
        if self.cfin_ns and f.dir[0].flags & D_EOF and f.t_active_ns + self.cfin_ns < t:
            t = f.t_active_ns + self.cfin_ns
            c = C_CLIENT_FIN_TIMEOUT
        if self.sfin_ns and f.dir[1].flags & D_EOF and f.t_active_ns + self.sfin_ns < t:
            t = f.t_active_ns + self.sfin_ns
            c = C_SERVER_FIN_TIMEOUT
        if cause != NULL:
            cause[0] = c
        return t

    cdef void cancel_fallback(self, uint32_t slot, Flow *f) noexcept nogil:
        cdef io_uring_sqe *s
        cdef int side
        self.st.cancel_fallbacks += 1
        for side in range(2):
            if f.fd[side] >= 0:
                s = self.flow_sqe(slot, f, OP_CANCEL, side)
                io_uring_prep_cancel_fd(s, f.fd[side], IORING_ASYNC_CANCEL_ALL)

    # A FIN makes the side's fin timeout apply, which may come well before
    # the deadline the entry was placed at: place it again.
    cdef void tw_half_closed(self, Flow *f) noexcept nogil:
        cdef uint32_t slot = <uint32_t>(f - self.flows)
        if self.tw.holds(slot):
            self.tw.add(slot, self.flow_deadline(f, NULL))

    # Every flow whose tick has come: expired, or placed again at the
    # deadline it has now (it moved, or its deadline is more than a lap
    # away). A closing flow is in the wheel only for its cancel check.
    cdef void tw_expire(self, int64_t now) noexcept nogil:
        cdef int32_t x
        cdef Flow *f
        cdef int64_t dl
        cdef uint8_t cause = C_NONE
        while True:
            x = self.tw.pop_due(now)
            if x < 0:
                return
            f = &self.flows[x]
            self.st.tw_visits += 1
            if f.state != F_OPEN:
                # A closing flow's cancels were looked at again (flow_fail).
                if f.inflight > f.zc_owed and (f.state == F_CLOSING or f.state == F_REDIAL):
                    self.cancel_fallback(<uint32_t>x, f)
                continue
            dl = self.flow_deadline(f, &cause)
            if dl <= now:
                self.st.timeouts += 1
                self.flow_fail(f, cause, ETIMEDOUT, 3)
                self.flow_step(<uint32_t>x)
            else:
                self.tw.add(<uint32_t>x, dl)

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
    cdef void watch_step(self, uint32_t slot, Flow *f) noexcept nogil:
        cdef io_uring_sqe *s
        cdef int side
        for side in range(2):
            if f.watch & (1 << side) or f.fd[side] < 0:
                continue
            if f.dir[side].flags & (D_RECV_ARMED | D_POLL_ARMED) \
                    or f.dir[1 - side].flags & D_SEND_BUSY:
                continue
            s = self.flow_sqe(slot, f, OP_ERRWATCH, side)
            io_uring_prep_poll_multishot(s, f.fd[side], POLLERR | POLLHUP)
            f.watch |= <uint8_t>(1 << side)

    cdef void on_errwatch(self, Flow *f, int side, int res, uint32_t cflags) noexcept nogil:
        if not (cflags & IORING_CQE_F_MORE):
            f.watch &= <uint8_t>~(1 << side)    # re-armed by watch_step while needed
        if f.state == F_OPEN:
            self.side_error(f, side, res)

    # A poll said `res` of a side: a pending socket error (SO_ERROR: a
    # reset sets ECONNRESET, or EPIPE in CLOSE_WAIT) fails the flow. POLLERR
    # alone is not one: MSG_ZEROCOPY completions on the error queue raise it
    # too (the epoll backend's zero-copy sends). A hang-up without an error
    # is the normal end of both directions, which their FINs and shutdowns
    # report on their own.
    cdef void side_error(self, Flow *f, int side, int res) noexcept nogil:
        cdef int err = 0
        cdef socklen_t len = sizeof(int)
        if res <= 0 or not (<uint32_t>res & (POLLERR | POLLHUP)):
            return
        getsockopt(f.fd[side], SOL_SOCKET, SO_ERROR, &err, &len)
        if err != 0:
            self.st.paused_errors += 1
            self.side_failed(f, side, -err)

    # A socket of the flow failed (reset, broken pipe...). The other side is
    # reset too: a reset on one side becomes a reset on the other.
    cdef void side_failed(self, Flow *f, int side, int res) noexcept nogil:
        self.flow_fail(f, C_CLIENT_RESET if side == 0 else C_UPSTREAM_RESET,
                       -res, <uint8_t>(1 << (1 - side)))

    # The one way into F_CLOSING. The first cause wins. In-flight operations
    # are cancelled; fds close only when the last of their CQEs is in.
    cdef void flow_fail(self, Flow *f, uint8_t cause, int err, uint8_t reset_mask) noexcept nogil:
        cdef uint32_t slot = <uint32_t>(f - self.flows)
        cdef uint8_t was = f.state
        cdef int d
        cdef Dir *D
        if f.state >= F_CLOSING:
            return
        self.tw.remove(<uint32_t>(f - self.flows))
        f.cause = cause
        f.err = err
        if self.can_redial(f, cause):
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
        if was == F_CONNECTING and f.fd[1] >= 0:
            self.cancel_op(slot, f, OP_CONNECT, 0, f.fd[1], -1)
        for d in range(2):
            D = &f.dir[d]
            if D.flags & D_RECV_ARMED:
                if self.splice:
                    self.cancel_op(slot, f, OP_POLL, d, f.fd[d], -1)
                    self.cancel_op(slot, f, OP_SPLICE_IN, d, f.fd[d], -1)
                else:
                    self.cancel_op(slot, f, OP_RECV, d, f.fd[d], -1)
            if D.flags & D_SEND_BUSY:
                if self.splice:
                    self.cancel_op(slot, f, OP_POLL_OUT, d, f.fd[1 - d], -1)
                    self.cancel_op(slot, f, OP_SPLICE_OUT, d, f.fd[1 - d], -1)
                else:
                    # Which of the two went is not recorded; the other's
                    # cancel finds nothing (-ENOENT).
                    self.cancel_op(slot, f, OP_SEND, d, f.fd[1 - d], -1)
                    self.cancel_op(slot, f, OP_SEND_ZC, d, f.fd[1 - d], D.q_head)
            if D.flags & D_POLL_ARMED:
                self.cancel_op(slot, f, OP_WATCH, d, f.fd[d], -1)
            if D.flags & D_CONSUME_BUSY:
                self.cancel_op(slot, f, OP_CONSUME, d, f.fd[d], -1)
            if f.watch & (1 << d):
                self.cancel_op(slot, f, OP_ERRWATCH, d, f.fd[d], -1)
        # Defence in depth: an operation this list missed would hold the flow
        # for ever. The wheel looks again in CANCEL_CHECK_NS and, if anything
        # but notifications is still in flight, cancels by fd (counted in
        # cancel_fallbacks, which the tests require to stay 0).
        self.tw.add(slot, self.batch_ns + CANCEL_CHECK_NS)

    # A cancel of one operation by its user_data. The fd it works on goes in
    # the SQE too: io_uring ignores it without IORING_ASYNC_CANCEL_FD, and the
    # epoll driver then looks only at that fd's waiting operations.
    cdef void cancel_op(self, uint32_t slot, Flow *f, int op, int d, int fd, int32_t si) noexcept nogil:
        cdef uint64_t ud = ud_make(slot, f.gen, op, d)
        cdef io_uring_sqe *s
        if fd < 0:
            return
        if si >= 0:
            ud = ud_with_seg(ud, si)
        s = self.flow_sqe(slot, f, OP_CANCEL, d)
        io_uring_prep_cancel64(s, ud, 0)
        s.fd = fd

    # --- failover: the next --upstream -----------------------------------------

    # Whether the flow can move to the next upstream without the client
    # noticing: before the connect succeeded (no client byte was read yet,
    # in any mode), or in peek mode while every client byte is still in its
    # socket and the upstream has not answered.
    cdef bint can_redial(self, Flow *f, uint8_t cause) noexcept nogil:
        if self.stopping or f.up_idx + 1 >= self.n_up or f.fd[1] < 0:
            return False
        if cause != C_UPSTREAM_REFUSED and cause != C_CONNECT_TIMEOUT \
                and cause != C_CONNECT_ERROR and cause != C_UPSTREAM_RESET:
            return False
        return f.state == F_CONNECTING or (f.state == F_OPEN and f.replayable)

    # Every operation of the failed attempt has completed (flow_fail
    # cancelled them): drop the old upstream, rewind the client's peek
    # offset to the first byte, and connect to the next upstream.
    cdef void redial(self, uint32_t slot, Flow *f) noexcept nogil:
        cdef int zero = 0
        cdef int d
        cdef Dir *D
        cdef int pr, pw
        cdef uint32_t pc, pb, parked
        self.tw.remove(<uint32_t>(f - self.flows))
        self.flow_drop_queues(slot, f)
        self.close_fd(f.fd[1])
        f.fd[1] = -1
        if self.peek:
            self.st.replayed_bytes += f.dir[0].peeked
            setsockopt(f.fd[0], SOL_SOCKET, SO_PEEK_OFF, &zero, sizeof(zero))
        for d in range(2):
            D = &f.dir[d]
            pr, pw, pc, pb = D.pipe_r, D.pipe_w, D.pipe_cap, D.pipe_bytes
            parked = D.parked          # notifications still owed from the last upstream
            memset(D, 0, sizeof(Dir))
            D.parked = parked
            D.q_head = -1
            D.q_tail = -1
            D.wait_prev = -1
            D.wait_next = -1
            D.pipe_r, D.pipe_w, D.pipe_cap, D.pipe_bytes = pr, pw, pc, pb
        f.up_idx += 1
        f.failovers += 1
        self.st.failovers += 1
        f.state = F_CONNECTING
        f.cause = C_NONE
        f.err = 0
        f.replayable = self.peek
        self.flow_dial(slot, f)

    # --- the decision: what each flow submits next ---------------------------------

    cdef void flow_step(self, uint32_t slot) noexcept nogil:
        cdef Flow *f = &self.flows[slot]
        if f.state == F_OPEN:
            self.dir_step(slot, f, 0)
        if f.state == F_OPEN:
            self.dir_step(slot, f, 1)
        if f.state == F_OPEN:
            self.watch_step(slot, f)
            if (f.dir[0].flags & D_SHUT_DONE) and (f.dir[1].flags & D_SHUT_DONE):
                if self.peek and f.dir[0].consumed < f.dir[0].peeked:
                    # Closing a socket with unread bytes sends RST, not FIN:
                    # drop what was delivered first (ZC notifications may
                    # still be on their way; each one comes back here).
                    f.replayable = 0
                    self.peek_step(slot, f, 0)
                else:
                    # Both FINs forwarded after their last byte: a clean end.
                    self.flow_fail(f, C_NORMAL, 0, 0)
        # Owed zero-copy notifications do not keep the sockets: a notification
        # comes once the kernel drops its reference to the pages, which for a
        # peer that never reads is when our socket is closed (or reset) and
        # its queued skbs are freed. They keep the slot and the parked
        # segments (F_CLOSED_WAIT waits for inflight == 0).
        if f.state == F_REDIAL and f.inflight == f.zc_owed:
            self.redial(slot, f)
        if f.state == F_CLOSING and f.inflight == f.zc_owed:
            self.flow_close_fds(slot, f)
        if f.state == F_CLOSED_WAIT and f.inflight == 0:
            self.flow_release(slot, f)

    cdef void dir_step(self, uint32_t slot, Flow *f, int d) noexcept nogil:
        if self.splice:
            self.splice_step(slot, f, d)
            return
        self.send_step(slot, f, d)
        if f.state != F_OPEN:
            return
        if self.peek and d == 0:
            self.peek_step(slot, f, d)
        else:
            self.recv_step(slot, f, d)

    # Writing from the buffer queue (copy, zerocopy, auto, peek).
    cdef void send_step(self, uint32_t slot, Flow *f, int d) noexcept nogil:
        cdef Dir *D = &f.dir[d]
        cdef io_uring_sqe *s
        cdef int32_t si
        cdef Seg *g
        cdef int n
        cdef uint32_t off
        if not (D.flags & D_SEND_BUSY):
            if D.q_head >= 0:
                # Everything queued (up to SEND_IOV segments) in one send; the
                # head may be partly sent already (head_off).
                n = 0
                off = D.head_off
                si = D.q_head
                D.send_len = 0
                while si >= 0 and n < SEND_IOV:
                    g = &self.segs[si]
                    D.iov[n].iov_base = self.buf_mem + <size_t>g.bid * self.buf_size + g.off + off
                    D.iov[n].iov_len = g.len - off
                    D.send_len += <uint32_t>D.iov[n].iov_len
                    off = 0
                    n += 1
                    si = g.next
                if self.zc and D.iov[0].iov_len >= self.zc_threshold and not (D.flags & D_ZC_OFF):
                    # One segment per zero-copy send, from where the head stands.
                    si = D.q_head
                    D.send_len = <uint32_t>D.iov[0].iov_len
                    s = self.flow_sqe(slot, f, OP_SEND_ZC, d)
                    io_uring_sqe_set_data64(s, ud_with_seg(ud_make(slot, f.gen, OP_SEND_ZC, d), si))
                    if self.zc_fixed and self.buf_fixed(self.segs[si].bid):
                        io_uring_prep_send_zc_fixed(s, f.fd[1 - d], D.iov[0].iov_base, D.iov[0].iov_len,
                                                    MSG_NOSIGNAL, IORING_SEND_ZC_REPORT_USAGE,
                                                    self.segs[si].bid)
                    else:
                        io_uring_prep_send_zc(s, f.fd[1 - d], D.iov[0].iov_base, D.iov[0].iov_len,
                                              MSG_NOSIGNAL, IORING_SEND_ZC_REPORT_USAGE)
                    self.segs[si].notif += 1
                elif n == 1:
                    s = self.flow_sqe(slot, f, OP_SEND, d)
                    io_uring_prep_send(s, f.fd[1 - d], D.iov[0].iov_base,
                                       D.iov[0].iov_len, MSG_NOSIGNAL)
                else:
                    s = self.flow_sqe(slot, f, OP_SEND, d)
                    memset(&D.msg, 0, sizeof(msghdr))
                    D.msg.msg_iov = D.iov
                    D.msg.msg_iovlen = n
                    io_uring_prep_sendmsg(s, f.fd[1 - d], &D.msg, MSG_NOSIGNAL)
                D.flags |= D_SEND_BUSY
            elif (D.flags & D_EOF) and not (D.flags & D_SHUT_SENT):
                self.shut_wr(f, d)

    # How many more buffers direction D may fill with its next recv: the
    # fairness rule of the shared pool.
    #
    # Every direction may always fill its first buffer. Beyond that it may
    # read ahead, up to --max-inflight, only out of a shared budget of
    # --buffers (less a reserve) counted over all flows: buffers held beyond
    # each holder's first. The pool grows on demand (pool_grow) up to
    # --max-buffers, which by default is --buffers + 2 x --max-conns, so
    # every direction's first buffer is there however many flows are
    # stalled, and the pool's memory is at most (--buffers + 2 x the
    # directions holding data) x --buffer-size. A stalled flow (its sink
    # does not read) pins what it read before it stalled, one buffer once
    # the budget is spent; the rest waits in the kernel's socket buffers,
    # where TCP flow control slows its sender.
    #
    # A recv is single-shot and asks for at most quota x buffer-size bytes
    # (a bundle honours the length too), so the bound is exact: a multishot
    # recv keeps filling buffers until a cancel lands, and one task-work run
    # of the kernel posts dozens (4 stalled flows held ~95 buffers each where
    # --max-inflight allowed 16).
    #
    # A segment sent zero-copy stays ours, in the kernel's socket buffer,
    # until its notification, which for a reader that does not read is
    # never. So parked segments count as held for the guarantee and the
    # shared budget: without that, each stalled zero-copy flow pinned a
    # socket buffer's worth of the pool (~4 MiB), and 200 of them starved
    # every other flow. The per-direction --max-inflight bound is on the
    # queue only, as in copy mode, where the socket buffer holds a copy:
    # a moving zero-copy flow keeps its send window.
    cdef uint32_t recv_quota(self, Dir *D) noexcept nogil:
        cdef uint32_t extras
        if D.queued_bufs + D.parked == 0:
            return 1
        if D.queued_bufs >= self.max_queued_bufs:
            return 0
        extras = self.bufs_held - min(self.bufs_held, self.dirs_holding)
        if extras >= self.readahead_budget:
            return 0
        return min(self.readahead_budget - extras, self.max_queued_bufs - D.queued_bufs)

    # Change what D holds (queued buffers dq, parked segments dp), keeping
    # dirs_holding, the count of directions holding anything, exact.
    cdef void dir_hold(self, Dir *D, int dq, int dp) noexcept nogil:
        cdef bint was = D.queued_bufs + D.parked > 0
        D.queued_bufs = <uint32_t>(<int>D.queued_bufs + dq)
        D.parked = <uint32_t>(<int>D.parked + dp)
        if was != (D.queued_bufs + D.parked > 0):
            if was:
                self.dirs_holding -= 1
            else:
                self.dirs_holding += 1

    # Reading into the buffer pool (copy, zerocopy, auto; peek's upstream side).
    cdef void recv_step(self, uint32_t slot, Flow *f, int d) noexcept nogil:
        cdef Dir *D = &f.dir[d]
        cdef io_uring_sqe *s
        cdef uint32_t quota
        # Read again once the queue is down to half of what this direction
        # may hold, so a sink that keeps up sees few large writes and a
        # recv/send pair per buffer is avoided at the boundary.
        if D.flags & (D_RECV_ARMED | D_EOF | D_WAIT_BUF):
            return
        quota = self.recv_quota(D)
        if quota == 0 or quota < D.queued_bufs:
            return
        s = self.flow_sqe(slot, f, OP_RECV, d)
        uc_prep_recv_select(s, f.fd[d], 0, self.bundle, 0)
        s.len = quota * self.buf_size
        D.flags |= D_RECV_ARMED

    # Peek mode's reading side (see on_poll for the traps it avoids).
    cdef void peek_step(self, uint32_t slot, Flow *f, int d) noexcept nogil:
        cdef Dir *D = &f.dir[d]
        cdef io_uring_sqe *s
        cdef uint64_t n
        if not (D.flags & (D_POLL_ARMED | D_EOF)):
            s = self.flow_sqe(slot, f, OP_WATCH, d)
            io_uring_prep_poll_multishot(s, f.fd[d], POLLIN | POLLRDHUP)
            D.flags |= D_POLL_ARMED
        # One peek at a time, each into one pool buffer; at --max-inflight of
        # queued buffers the bytes wait in the socket (the window closes).
        if ((D.flags & (D_READY | D_RECV_ARMED | D_EOF | D_WAIT_BUF)) == D_READY
                and self.recv_quota(D) > 0):
            s = self.flow_sqe(slot, f, OP_RECV, d)
            uc_prep_recv_select(s, f.fd[d], 0, 0, MSG_PEEK | MSG_DONTWAIT)
            D.flags |= D_RECV_ARMED
        # Delivered bytes leave the socket once replay is off the table.
        if D.released and not f.replayable and not (D.flags & D_CONSUME_BUSY):
            n = min(D.released, <uint64_t>1 << 30)
            s = self.flow_sqe(slot, f, OP_CONSUME, d)
            io_uring_prep_recv(s, f.fd[d], NULL, <size_t>n, MSG_TRUNC | MSG_DONTWAIT)
            D.consume_len = <uint32_t>n
            D.released -= n
            D.flags |= D_CONSUME_BUSY

    # Splice mode, one direction (see on_splice_in for the rules).
    cdef void splice_step(self, uint32_t slot, Flow *f, int d) noexcept nogil:
        cdef Dir *D = &f.dir[d]
        cdef io_uring_sqe *s
        if not (D.flags & D_SEND_BUSY):
            if D.pipe_bytes > 0:
                self.reserve(2)
                if D.flags & D_OUT_WAIT:
                    s = self.flow_sqe(slot, f, OP_POLL_OUT, d)
                    io_uring_prep_poll_add(s, f.fd[1 - d], POLLOUT)
                    s.flags |= IOSQE_IO_LINK
                s = self.flow_sqe(slot, f, OP_SPLICE_OUT, d)
                io_uring_prep_splice(s, D.pipe_r, -1, f.fd[1 - d], -1, D.pipe_bytes,
                                     SPLICE_F_NONBLOCK | SPLICE_F_MOVE)
                D.flags |= D_SEND_BUSY
            elif (D.flags & D_EOF) and not (D.flags & D_SHUT_SENT):
                self.shut_wr(f, d)
        # Always ask for the pipe's free space: the kernel moves what fits.
        if not (D.flags & (D_RECV_ARMED | D_EOF | D_IN_STUCK)) and D.pipe_bytes < D.pipe_cap:
            self.reserve(2)
            if not (D.flags & D_READY):
                s = self.flow_sqe(slot, f, OP_POLL, d)
                io_uring_prep_poll_add(s, f.fd[d], POLLIN | POLLRDHUP)
                s.flags |= IOSQE_IO_LINK
            s = self.flow_sqe(slot, f, OP_SPLICE_IN, d)
            io_uring_prep_splice(s, f.fd[d], -1, D.pipe_w, -1, D.pipe_cap - D.pipe_bytes,
                                 SPLICE_F_NONBLOCK | SPLICE_F_MOVE)
            D.flags |= D_RECV_ARMED

    # --- the close path ------------------------------------------------------------

    # Nothing but zero-copy notifications is in flight: a queued segment is
    # ours to give back, unless a notification is still owed for its bytes
    # (a short SEND_ZC left it at the head); then it is parked like a sent
    # one, and its last notification frees it.
    cdef void flow_drop_queues(self, uint32_t slot, Flow *f) noexcept nogil:
        cdef int d
        cdef int32_t si
        for d in range(2):
            while f.dir[d].q_head >= 0:
                si = self.seg_pop(&f.dir[d])
                if self.segs[si].notif:
                    self.segs[si].next = SEG_SENT
                    self.dir_hold(&f.dir[d], 0, 1)
                else:
                    self.seg_free_one(si)
            if f.dir[d].flags & D_WAIT_BUF:
                self.wait_remove(slot, d)

    cdef void flow_close_fds(self, uint32_t slot, Flow *f) noexcept nogil:
        cdef linger lg
        cdef io_uring_sqe *s
        cdef int side
        self.tw.remove(<uint32_t>(f - self.flows))
        self.flow_drop_queues(slot, f)
        for side in range(2):
            if f.dir[side].pipe_r >= 0:
                self.pipes.put(f.dir[side].pipe_r, f.dir[side].pipe_w, f.dir[side].pipe_cap,
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
            s = self.flow_sqe(slot, f, OP_CLOSE, side)
            io_uring_prep_close(s, f.fd[side])
            f.fd[side] = -1
        f.t_fds_closed_ns = now_ns() if f.zc_owed else 0
        f.state = F_CLOSED_WAIT

    cdef void flow_release(self, uint32_t slot, Flow *f) noexcept nogil:
        cdef CloseRec *r
        if self.log_n < self.log_cap:
            if self.log_n == 0:
                self.log_first_ns = self.batch_ns
            r = &self.log[self.log_n]
            self.log_n += 1
            memcpy(&r.client, &f.peer, sizeof(sockaddr_storage))
            r.c2u_bytes = f.dir[0].moved_bytes
            r.u2c_bytes = f.dir[1].moved_bytes
            r.duration_ns = now_ns() - f.t_start_ns
            r.cause = f.cause
            r.err = f.err
            r.up_idx = f.up_idx
            r.failovers = f.failovers
        else:
            self.st.log_dropped += 1
        self.st.closed += 1
        if f.t_fds_closed_ns:
            self.st.zc_close_waits += 1
            self.st.zc_close_wait_ns += <uint64_t>(now_ns() - f.t_fds_closed_ns)
        self.st.c2u_bytes += f.dir[0].moved_bytes
        self.st.u2c_bytes += f.dir[1].moved_bytes
        f.gen += 1
        f.state = F_FREE
        f.next_free = self.free_head
        self.free_head = <int32_t>slot
        self.nactive -= 1
        self.fdw_retry()      # its two fds are closed now
        self.accept_step()

    # --- the buffer pool ---------------------------------------------------------------

    # The bytes a recv CQE carries: from the ring's head entry, at the fill
    # that entry already has, on through the next entries (a bundle). With
    # DEFER_TASKRUN every completion runs in this thread, one after the
    # other, and takes its bytes from the head as it posts its CQE, so CQE
    # order is ring order and the shadow ring names every buffer. The CQE's
    # own bid must be the head entry; ring_order_errors counts any CQE that
    # is not (the tests require 0).
    #
    # Which buffers the kernel is done with (verified on 6.18): a plain ring
    # gives up every buffer a completion touched, however little it wrote.
    # An incremental ring (IOU_PBUF_RING_INC) keeps the last one while it
    # has room, and says so with IORING_CQE_F_BUF_MORE; the next recv, of
    # any flow, continues in it at buf_fill.
    #
    # The bytes become segments of D's queue; with D NULL they are dropped.
    # False if a segment could not be recorded (those bytes are lost).
    cdef int ring_take(self, Dir *D, uint32_t bid, int res, uint32_t cflags) noexcept nogil:
        cdef uint32_t mask = self.ring_mask
        cdef uint32_t left = <uint32_t>res if res > 0 else 0
        cdef uint32_t b, n, touched = 0
        cdef bint ok = True
        cdef int order = TAKE_OK
        if self.ring_bid[self.ring_head & mask] != bid:
            # Our shadow and the kernel disagree, so which buffers (or which
            # part of a bundle) hold these bytes is unknown: take the
            # kernel's word for the entry, keep the accounting, and drop the
            # bytes (the caller resets the flow).
            self.st.ring_order_errors += 1
            self.ring_bid[self.ring_head & mask] = <uint16_t>bid
            D = NULL
            order = TAKE_ORDER
        while True:
            b = self.ring_bid[self.ring_head & mask]
            n = min(left, self.buf_size - self.buf_fill[b])
            if n > 0 and D != NULL:
                ok = self.seg_push(D, b, self.buf_fill[b], n) and ok
            self.buf_fill[b] += n
            left -= n
            touched += 1
            if self.inc and left == 0 and (n == 0 or cflags & IORING_CQE_F_BUF_MORE):
                break                      # the kernel keeps filling this one
            # Ownership: ring -> us. It goes back once its segments are gone.
            self.ring_head += 1
            self.buf_kern[b] = 0
            self.bufs_held += 1
            if self.buf_refs[b] == 0:
                self.buf_return(b)
            if left == 0:
                break
        if touched > 1:
            self.st.bundles += 1
        if order != TAKE_OK:
            return order
        return TAKE_OK if ok else TAKE_NO_SEG

    # Append bytes [off, off + n) of buffer b to D's send queue. Bytes that
    # continue the tail segment extend it (one flow reading alone fills a
    # buffer as one segment). A direction's segments in one buffer are
    # adjacent in its queue (a buffer is reused only once all of its
    # segments are freed), so queued_bufs counts distinct buffers by
    # comparing neighbours.
    cdef bint seg_push(self, Dir *D, uint32_t b, uint32_t off, uint32_t n) noexcept nogil:
        cdef int32_t t = D.q_tail
        cdef int32_t si
        cdef Seg *grown
        cdef uint32_t i, cap
        if t >= 0 and self.segs[t].bid == b and self.segs[t].off + self.segs[t].len == off:
            self.segs[t].len += n
            return True
        if self.seg_free < 0:
            # Only incremental buffers can need more than one segment per
            # buffer: tiny reads of many flows interleaved in one buffer.
            # Doubling is rare and amortised; past SEG_MAX the bytes are lost.
            cap = self.nsegs * 2
            if cap > SEG_MAX:
                return False
            grown = <Seg *>realloc(self.segs, cap * sizeof(Seg))
            if grown == NULL:
                return False
            self.segs = grown
            for i in range(self.nsegs, cap):
                self.segs[i].next = <int32_t>i + 1 if i + 1 < cap else -1
            self.seg_free = <int32_t>self.nsegs
            self.nsegs = cap
            self.st.seg_grows += 1
        si = self.seg_free
        self.seg_free = self.segs[si].next
        self.segs[si].bid = <uint16_t>b
        self.segs[si].off = off
        self.segs[si].len = n
        self.segs[si].notif = 0
        self.segs[si].next = -1
        self.buf_refs[b] += 1
        self.segs_live += 1
        if t >= 0:
            self.segs[t].next = si
        else:
            D.q_head = si
        if t < 0 or self.segs[t].bid != b:
            self.dir_hold(D, 1, 0)
        D.q_tail = si
        return True

    # Unlink D's head segment and return it (the caller frees or parks it).
    cdef int32_t seg_pop(self, Dir *D) noexcept nogil:
        cdef int32_t si = D.q_head
        D.q_head = self.segs[si].next
        if D.q_head < 0:
            D.q_tail = -1
        if D.q_head < 0 or self.segs[D.q_head].bid != self.segs[si].bid:
            self.dir_hold(D, -1, 0)
        self.segs[si].next = -1
        return si

    # Ownership: segment -> its buffer, which goes back to the ring with its
    # last segment, unless the kernel is still filling it.
    cdef void seg_free_one(self, int32_t si) noexcept nogil:
        cdef uint32_t b = self.segs[si].bid
        self.segs[si].next = self.seg_free
        self.seg_free = si
        self.segs_live -= 1
        self.buf_refs[b] -= 1
        if self.buf_refs[b] == 0 and not self.buf_kern[b]:
            self.buf_return(b)

    # Buffer bid is in the registered table (registered now if it was not:
    # once per buffer for the proxy's life). A refusal (RLIMIT_MEMLOCK,
    # ENOMEM) turns registered sends off for good, counted; SEND_ZC then
    # pins pages per send, as without registration.
    cdef bint buf_fixed(self, uint32_t bid) noexcept nogil:
        cdef iovec iov
        cdef int ret
        if self.buf_reg[bid]:
            return True
        iov.iov_base = self.buf_mem + <size_t>bid * self.buf_size
        iov.iov_len = self.buf_size
        ret = io_uring_register_buffers_update_tag(&self.ring.ring, bid, &iov, NULL, 1)
        if ret == 1:
            self.buf_reg[bid] = 1
            self.st.zc_registered_bufs += 1
            return True
        self.zc_fixed = False
        self.st.zc_register_fails += 1
        self.st.zc_register_last_err = -ret if ret < 0 else EIO
        return False

    # Ownership: us -> ring. Made visible to the kernel in bufs_flush().
    cdef void buf_return(self, uint32_t bid) noexcept nogil:
        self.bufs_held -= 1
        self.ring_add(bid)

    cdef void ring_add(self, uint32_t bid) noexcept nogil:
        self.ring_bid[(self.ring_tail + <uint32_t>self.br_pending) & self.ring_mask] = <uint16_t>bid
        io_uring_buf_ring_add(self.br, self.buf_mem + <size_t>bid * self.buf_size,
                              self.buf_size, <unsigned short>bid,
                              self.ring_mask, self.br_pending)
        self.br_pending += 1
        self.buf_fill[bid] = 0
        self.buf_kern[bid] = 1

    # New buffers for the ring, from the reserved region: bids published
    # .. published + n - 1. Their pages cost memory only once filled.
    cdef void pool_grow(self, uint32_t n) noexcept nogil:
        cdef uint32_t i
        n = min(n, self.max_bufs - self.published)
        for i in range(n):
            self.ring_add(self.published + i)
        self.published += n
        if n:
            self.st.pool_grows += 1

    # Once per batch: publish returned buffers, then re-arm as many waiting
    # directions as there are free buffers (each will take at least one).
    cdef void bufs_flush(self) noexcept nogil:
        cdef uint32_t free_bufs
        cdef int32_t w
        # Grow before the ring runs dry: the SQEs prepared in this batch are
        # submitted after this, so their recvs already find the new buffers.
        if self.published - self.bufs_held < self.buf_reserve + self.wait_n:
            self.pool_grow(max(self.buf_reserve + self.wait_n, self.published // 4))
        if self.br_pending:
            io_uring_buf_ring_advance(self.br, self.br_pending)
            self.ring_tail += <uint32_t>self.br_pending
            self.br_pending = 0
        free_bufs = self.published - self.bufs_held
        while self.wait_head >= 0 and free_bufs > 0:
            w = self.wait_head
            self.wait_remove(<uint32_t>(w >> 1), w & 1)
            self.flow_step(<uint32_t>(w >> 1))
            free_bufs -= 1

    cdef void wait_push(self, uint32_t slot, int d) noexcept nogil:
        cdef Dir *D = &self.flows[slot].dir[d]
        cdef int32_t me = <int32_t>(slot * 2 + d)
        D.flags |= D_WAIT_BUF
        self.wait_n += 1
        D.wait_next = -1
        D.wait_prev = self.wait_tail
        if self.wait_tail >= 0:
            self.flows[self.wait_tail >> 1].dir[self.wait_tail & 1].wait_next = me
        else:
            self.wait_head = me
        self.wait_tail = me

    cdef void wait_remove(self, uint32_t slot, int d) noexcept nogil:
        cdef Dir *D = &self.flows[slot].dir[d]
        if D.wait_prev >= 0:
            self.flows[D.wait_prev >> 1].dir[D.wait_prev & 1].wait_next = D.wait_next
        else:
            self.wait_head = D.wait_next
        if D.wait_next >= 0:
            self.flows[D.wait_next >> 1].dir[D.wait_next & 1].wait_prev = D.wait_prev
        else:
            self.wait_tail = D.wait_prev
        D.wait_prev = -1
        D.wait_next = -1
        D.flags &= ~D_WAIT_BUF
        self.wait_n -= 1

    # --- the loop -------------------------------------------------------------------

    # Submit everything prepared, wait for at least one CQE, handle whole
    # batches. Returns to Python when LOG_BATCH close records wait or the
    # oldest has waited LOG_DELAY_NS, when timeout_ns passed, or on a
    # signal or wakeup (-EINTR), whichever is first.
    cdef int run_c(self, int64_t timeout_ns) noexcept nogil:
        cdef io_uring_cqe *cqes[CQE_BATCH]
        cdef io_uring_cqe *cqe
        cdef __kernel_timespec ts
        cdef int64_t deadline = now_ns() + timeout_ns
        cdef int64_t left
        cdef unsigned n, i
        cdef int ret
        while True:
            if self.wake_fd >= 0 and not self.wake_armed:
                self.wake_arm()     # single-shot: Python drained the fd
            self.bufs_flush()
            self.batch_ns = now_ns()
            left = min(deadline, self.tw.next_due()) - self.batch_ns
            if self.log_n > 0:
                left = min(left, self.log_first_ns + LOG_DELAY_NS - self.batch_ns)
            if self.wait_head >= 0 and self.published > self.bufs_held:
                # bufs_flush re-armed as many waiting directions as there are
                # free buffers, and more wait. A re-armed recv whose socket
                # is empty takes no buffer and posts nothing until bytes come,
                # so a blocking wait here would leave the rest of the list,
                # and bytes waiting in their sockets, until the next timeout:
                # 300 flows through a 2-buffer pool stalled for up to 30 s,
                # two re-arms per 0.5 s. Go round at once; each turn takes
                # directions off the list, so this ends.
                left = 0
            if left < 0:
                left = 0
            if self.use_ep:
                ret = self.run_epoll(left)
            else:
                ts.tv_sec = left // 1000000000
                ts.tv_nsec = left % 1000000000
                ret = io_uring_submit_and_wait_timeout(&self.ring.ring, &cqe, 1, &ts, NULL)
                while ret != -EINTR:
                    n = io_uring_peek_batch_cqe(&self.ring.ring, cqes, CQE_BATCH)
                    if n == 0:
                        break
                    self.st.batches += 1
                    self.st.cqes += n
                    for i in range(n):
                        self.handle(cqes[i])
                    io_uring_cq_advance(&self.ring.ring, n)
                    if n < CQE_BATCH:
                        break
                # More completions than the CQ holds went to the kernel's
                # overflow list (NODROP); they come back as the CQ drains,
                # more slowly. Counted: a CQ too small for the load.
                if self.ring.ring.sq.kflags[0] & IORING_SQ_CQ_OVERFLOW:
                    self.st.cq_overflows += 1
            self.batch_ns = now_ns()
            self.tw_expire(self.batch_ns)
            if ret == -EINTR or self.woken:
                self.woken = False
                return -EINTR
            # Python formats close lines once per batch of them, never once
            # per flow: at one return per closed flow, a connection storm
            # spent more in the return (stats, a line, a write) than in
            # the flow.
            if (self.log_n >= LOG_BATCH or self.batch_ns >= deadline
                    or (self.log_n > 0 and self.batch_ns >= self.log_first_ns + LOG_DELAY_NS)):
                return 0
            # -ETIME: nothing came in time. -EBUSY/-EAGAIN: the CQ was
            # overflowing or the kernel was short of memory for the
            # submission; the harvest above made room, so go round again.
            if ret < 0 and ret != -ETIME and ret != -EBUSY and ret != -EAGAIN:
                return ret

    # One turn of the epoll driver: it submits, waits, and posts CQEs into
    # its own array, handled here exactly as the ring's are. Each is copied
    # out first: handling one may post more (the array may move).
    cdef int run_epoll(self, int64_t left) noexcept nogil:
        cdef io_uring_cqe c
        cdef int ret = self.ep.wait(left)
        if self.ep.cq_head < self.ep.cq_n:
            self.st.batches += 1
        while self.ep.cq_head < self.ep.cq_n:
            c = self.ep.cq[self.ep.cq_head]
            self.ep.cq_head += 1
            self.st.cqes += 1
            self.handle(&c)
        self.ep.cq_head = 0
        self.ep.cq_n = 0
        if self.ep.oom:
            return -ENOMEM
        return ret

    # --- Python surface (between batches) ---------------------------------------

    def run(self, double timeout):
        """Run the data path for up to `timeout` seconds (less if flows closed)."""
        cdef int ret
        cdef int64_t t = <int64_t>(timeout * 1e9)
        with nogil:
            ret = self.run_c(t)
        if ret < 0 and ret != -EINTR:
            raise OSError(-ret, os.strerror(-ret))
        return ret

    def drain_closed(self):
        """The flows closed since the last call: a list of dicts."""
        out = []
        cdef uint32_t i
        cdef CloseRec *r
        for i in range(self.log_n):
            r = &self.log[i]
            cause, term = CAUSES.get(r.cause, ("unknown", "??"))
            out.append({
                "client": _format_addr(&r.client),
                "bytes_c2u": r.c2u_bytes,
                "bytes_u2c": r.u2c_bytes,
                "duration_ms": round(r.duration_ns / 1e6, 3),
                "cause": cause,
                "term": term,
                "errno": r.err,
                "upstream_index": r.up_idx,
                "failovers": r.failovers,
            })
        self.log_n = 0
        return out

    def drain(self):
        """Stop accepting; open flows go on (stop() ends them)."""
        with nogil:
            self.stopping = True
            self.accept_step()

    def close_listener(self):
        """Forget the listener once no accept is in flight (the caller closes
        it): the epoll backend must not keep a closed fd number in its set."""
        if self.acc_armed or self.listen_fd < 0:
            return False
        if self.use_ep:
            self.ep.forget(self.listen_fd)
        self.listen_fd = -1
        return True

    def stop(self):
        """Stop accepting and end every flow still open (cause proxy_shutdown)
        with an RST to both sides: the proxy cannot know that a stream it cuts
        was complete, so its peers must not see a clean end."""
        cdef uint32_t i
        with nogil:
            self.stopping = True
            self.accept_step()
            for i in range(self.slots_used):
                if self.flows[i].state in (F_CONNECTING, F_OPEN, F_REDIAL):
                    self.flow_fail(&self.flows[i], C_PROXY_SHUTDOWN, 0, 3)
                    self.flow_step(i)

    @property
    def active(self):
        return self.nactive

    @property
    def accepting(self):
        return self.acc_armed

    @property
    def listening(self):
        """False once close_listener() has let go of the listener."""
        return self.listen_fd >= 0

    def verify_ring(self):
        """With no flow left, our shadow head must be the kernel's head of the
        buffer ring (checked where IORING_REGISTER_PBUF_STATUS exists, 6.8+);
        a difference is counted as a ring order error. Returns the kernel's
        head, or None where it cannot be read."""
        cdef unsigned head = 0
        if self.nactive:
            return None
        if self.use_ep:
            head = self.ep.br_head
        elif uc_buf_ring_head(&self.ring.ring, 0, &head) < 0:
            return None
        if (head & 0xFFFF) != (self.ring_head & 0xFFFF):
            self.st.ring_order_errors += 1
        return head

    # --- test hooks: drive the dispatcher with a CQE the kernel did not post ----

    def _test_inject_cqe(self, uint32_t slot, str op, int d, int res, uint32_t flags):
        """Hand handle() a CQE for `slot`'s current generation. `op` is a name
        (recv, send, close...) or 'unknown' (an op code no SQE ever carries)."""
        cdef io_uring_cqe c
        codes = {"recv": OP_RECV, "send": OP_SEND, "close": OP_CLOSE, "accept": OP_ACCEPT,
                 "unknown": OP_LAST + 1}
        if slot >= self.max_conns:
            raise ValueError("no such slot")
        memset(&c, 0, sizeof(c))
        c.user_data = ud_make(slot, self.flows[slot].gen, codes[op], d) if op != "accept" \
            else ud_make(0, 0, OP_ACCEPT, 0)
        c.res = res
        c.flags = flags
        with nogil:
            self.handle(&c)
            self.bufs_flush()

    def _test_flow(self, uint32_t slot):
        """A flow's state, inflight count and the ring's shadow head entry."""
        cdef Flow *f = &self.flows[slot]
        return {"state": f.state, "inflight": f.inflight,
                "head_bid": self.ring_bid[self.ring_head & self.ring_mask]}

    def alerts(self):
        """The counters Python turns into log lines after each return: a few,
        not the whole stats() dict, which is built only when asked for."""
        return {"accept_pauses": self.st.accept_pauses,
                "accept_last_err": self.st.accept_last_err,
                "accept_pause_ms": self.st.accept_pause_ms,
                "ring_order_errors": self.st.ring_order_errors,
                "unknown_cqes": self.st.unknown_cqes,
                "zc_eopnotsupp": self.st.zc_eopnotsupp,
                "zc_register_fails": self.st.zc_register_fails,
                "zc_register_last_err": self.st.zc_register_last_err,
                "log_dropped": self.st.log_dropped}

    def stats(self):
        s = dict(self.st)
        s["active"] = self.nactive
        s["bufs_held"] = self.bufs_held
        s["pool_buffers"] = self.published
        s["segments_out"] = self.segs_live
        s["waiting_for_buffers"] = int(self.wait_head >= 0)   # 0/1: any direction on the list
        s["pipes_pooled"] = self.pipes.n if self.pipes is not None else 0
        s["pipes_created"] = self.pipes.created if self.pipes is not None else 0
        s["pipe_errors"] = self.pipes.errors if self.pipes is not None else 0
        # Completions the kernel lost for want of memory even with NODROP.
        s["cq_dropped"] = 0 if self.ring is None else self.ring.ring.cq.koverflow[0]
        return s
