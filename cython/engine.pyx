# The engine: a flow table and one per-flow state machine, driven by
# completions from a driver (ring.pyx: io_uring; epoll.pyx: the same
# operations over epoll). Everything from one submit-and-wait to the next
# runs nogil on C structs; Python is entered once per batch of them.
#
# Where things are:
#   engine.pyx     user_data, the CQE dispatcher (handle), flow_step/dir_step
#                  -- the one place that decides what a flow submits next --,
#                  the loop, and the Python surface
#   engine_setup.pxi   building an engine from its config, and taking it apart
#   connect.pxi    accept, flow set-up, connect, fd waits, failover
#   copy.pxi       recv into the pool, send from the queue, FIN forwarding
#   zerocopy.pxi   SEND_ZC and its notifications, auto mode's judgement
#   peek.pxi       peek mode: client bytes stay in its socket until delivered
#   splice.pxi     splice mode: socket -> pipe -> socket
#   flow_end.pxi   timeouts, errors while paused, flow_fail, cancels, close
#   bufpool.pyx    the buffers and who owns each byte (BufferPool)
#   timers.pyx, pipes.pyx   the timer wheel and the splice pipe pool
#
# Invariants (each is relied on below; break one and bytes are lost):
# - Received bytes have one owner: the kernel (filling the buffer), exactly
#   one direction's send queue, or -- sent zero-copy -- the kernel until the
#   last notification for them (the segment parked, next == SEG_SENT).
#   seg_sent() decides between the last two. A buffer goes back to the ring
#   (BufferPool.buf_return, the only way back) when the kernel has stopped
#   filling it and the last of its segments is freed.
# - A direction has at most one send in flight, so bytes leave in the order
#   they arrived, and a short send resumes from head_off.
# - shutdown(SHUT_WR) is submitted only when the direction has read EOF, its
#   queue is empty and no send is in flight: the FIN follows the last byte.
# - fds are closed only when flow.inflight == 0: no CQE can name them after.
# - A slot's generation is bumped on release, and it is in every user_data,
#   so a CQE that outlives its flow is recognised and dropped.

# --- user_data (layout: userdata.pxd) ---------------------------------------
# The engine's SQEs carry OWNER_PROXY; the slot is the flow's (0 for the
# engine's own ops), and SEND_ZC's carry the segment its notification frees.
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
    OP_WATCH            # peek, splice: readiness poll on a direction's source (on_poll)
    OP_CONSUME          # peek: MSG_TRUNC recv dropping delivered bytes
    OP_POLL_OUT         # splice: readiness poll linked before a splice out
    OP_SPLICE_IN        # splice: source socket -> pipe
    OP_SPLICE_OUT       # splice: pipe -> sink socket
    OP_WAKE             # poll on the signal wakeup fd: return to Python
    OP_ERRWATCH         # multishot poll for an error on a side nothing else watches
    OP_PYWATCH          # a poll for Python's own fds (the metrics server): slot = the fd
    OP_HDRPOLL          # --accept-proxy: the client's socket has (more of) its header
    OP_LAST = OP_HDRPOLL

cdef enum:
    CQE_BATCH = 256          # CQEs harvested per peek
    FDW_CONNECT = 0          # fd queue entries: a flow's upstream socket ...
    FDW_PIPE0 = 1            # ... or a pipe for direction 0 (FDW_PIPE0 + 1: direction 1)
    ACCEPT_PAUSE_MS = 100    # accept pause after EMFILE/ENFILE
    ACCEPT_BACKOFF_MAX_MS = 3200   # longest pause after repeated other accept errors
    ZC_JUDGE_AFTER = 16      # auto mode: notifications before judging a direction
    CANCEL_CHECK_NS = 2000000000   # a failing flow's cancels looked at again after 2 s

cdef inline uint64_t proxy_ud(uint32_t slot, uint32_t gen, int op, int d) noexcept nogil:
    return ud_make(OWNER_PROXY, slot, gen, <uint32_t>op, <uint32_t>d)

MODE_CODES = {"copy": MODE_COPY, "zerocopy": MODE_ZEROCOPY, "auto": MODE_AUTO,
              "peek": MODE_PEEK, "splice": MODE_SPLICE}

def sizes():
    """Bytes per unit of what the engine keeps, for the memory bound on paper
    (docs/architecture.md): per flow slot, per direction (inside the slot), per
    segment, per event record, and the per-flow links in reserved arrays that
    are touched only for flows that use them."""
    return {"flow": sizeof(Flow), "dir": sizeof(Dir), "segment": sizeof(Seg),
            "event": sizeof(Event), "timer_links": 3 * sizeof(int32_t),
            "wait_links": 2 * 2 * sizeof(int32_t), "fd_queue": 2 * sizeof(uint64_t)}


# The fields must hold what the engine puts in them.
if (OP_LAST >= (1 << UD_OP_BITS) or SEG_MAX > (1 << UD_SEG_BITS)
        or UD_OWNER_SHIFT + UD_OWNER_BITS != 64 or UD_DIR_SHIFT != UD_OP_SHIFT + UD_OP_BITS
        or UD_OP_SHIFT != UD_SEG_SHIFT + UD_SEG_BITS or UD_SEG_SHIFT != UD_GEN_SHIFT + UD_GEN_BITS
        or UD_GEN_SHIFT != UD_SLOT_BITS):
    raise ImportError("user_data layout: a field is too narrow or the fields overlap")

cdef inline void set_timespec(__kernel_timespec *ts, double seconds) noexcept nogil:
    ts.tv_sec = <int64_t>seconds
    ts.tv_nsec = <long long>((seconds - <int64_t>seconds) * 1e9)

cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef class Engine:
    def __cinit__(self, driver not None, config not None):
        """Run on `driver` (a Ring or an Epoll) as `config` says: an
        EngineConfig (uring_net/engine_config.py), read once (engine_setup.pxi)."""
        engine_setup(self, driver, config)

    def __dealloc__(self):
        engine_teardown(self)

    # --- configuration (Python, start-up only) ------------------------------

    def add_upstream(self, int family, str host, int port, int weight=1):
        """Append an upstream to the pool (Upstreams.add)."""
        self.ups.add(family, host, port, weight)

    def follow_health(self, Engine other not None):
        """Take up/down from `other`'s checks (worker 0 of the same frontend)
        and run none here."""
        self.ups.follow(other.ups)
        self.hc_interval_ns = 0

    def reset_all(self):
        """A worker whose loop failed: every open flow's sockets closed with an
        RST (SO_LINGER 0), so its clients and upstreams see a reset, never a
        connection that hangs. The engine is not used after this."""
        flows_reset(self)

    def upstream_stats(self):
        """Per upstream, in the order added: up, weight, active, flows, checks..."""
        return self.ups.stats()

    def add_listener(self, int fd, int family):
        cdef int one = 1
        if self.listen_fd >= 0:
            raise ValueError("one listener per engine")
        self.listen_fd = fd
        self.listen_family = family
        # The kernel makes each accepted socket as a copy of the listener's,
        # Nagle's switch and the keep-alive settings (and timer) included, so
        # setting them here once saves five setsockopt calls per connection
        # (tests/test_timeouts.py reads them back from the client's socket).
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
        keepalive(self, fd)
        with nogil:
            accept_step(self)

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
        io_uring_sqe_set_data64(s, proxy_ud(0, 0, OP_WAKE, 0))
        self.wake_armed = True

    # --- CQE dispatch ---------------------------------------------------------

    cdef void handle(self, io_uring_cqe *cqe) noexcept nogil:
        cdef uint64_t ud = cqe.user_data
        cdef int op = <int>ud_op(ud)
        cdef int d = <int>ud_dir(ud)
        cdef uint32_t slot = ud_slot(ud)
        cdef uint32_t gen = ud_gen(ud)
        cdef uint32_t si = ud_seg(ud)
        cdef Flow *f
        cdef int res = cqe.res
        cdef uint32_t cflags = cqe.flags

        if ud_owner(ud) == OWNER_HEALTH:
            on_health(self, ud, res)
            return
        if ud_owner(ud) != OWNER_PROXY or op < OP_ACCEPT or op > OP_LAST:
            # Not an op we prepare: another owner's, or corrupted. Counted
            # and dropped; above all it must not decrement a flow's inflight
            # (that would close fds under operations still using them).
            self.st.unknown_cqes += 1
            self.events.note(EV_ENGINE_ERROR, ERR_UNKNOWN_CQE, 0, 0, self.batch_ns)
            return
        if op == OP_ACCEPT:
            on_accept(self, res, cflags)
            return
        if op == OP_ENGINE_CANCEL:
            return
        if op == OP_WAKE:
            self.wake_armed = False
            self.woken = True
            return
        if op == OP_PYWATCH:
            # Python's: recorded, and the engine returns for Python to see it.
            if self.pyw_n < PYW_CAP:
                self.pyw[self.pyw_n].fd = <int32_t>slot
                self.pyw[self.pyw_n].gen = gen
                self.pyw[self.pyw_n].res = res
                self.pyw_n += 1
            self.woken = True
            return
        if op == OP_ACCEPT_TIMER:
            self.acc_timer = False
            self.acc_paused = False
            fdw_retry(self)
            accept_step(self)
            return
        if slot >= self.max_conns:
            self.st.stale_cqes += 1
            return
        f = &self.flows[slot]
        if f.state == F_FREE or ud_gen_of(f.gen) != gen:
            # A completion that outlived its flow. Our close path waits for
            # every CQE, so this is defence in depth -- but the buffers it
            # filled must still go home or the pool shrinks for good.
            self.st.stale_cqes += 1
            if cflags & IORING_CQE_F_BUFFER:
                take_bytes(self, NULL, res, cflags)
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
            on_recv(self, f, d, res, cflags)
        elif op == OP_SEND:
            on_send(self, f, d, res)
        elif op == OP_SEND_ZC:
            on_send_zc(self, f, d, res, cflags, si)
        elif op == OP_CONNECT:
            on_connect(self, f, res)
        elif op == OP_SPLICE_IN:
            on_splice_in(self, f, d, res)
        elif op == OP_SPLICE_OUT:
            on_splice_out(self, f, d, res)
        elif op == OP_WATCH:
            on_poll(self, f, d, res, cflags)
        elif op == OP_CONSUME:
            on_consume(self, f, d, res)
        elif op == OP_ERRWATCH:
            on_errwatch(self, f, d, res, cflags)
        elif op == OP_HDRPOLL:
            on_hdr_poll(self, slot, f, res)
        # OP_CONNECT_TIMEOUT, OP_CANCEL, OP_CLOSE, OP_POLL_OUT (the splice after
        # it has its own CQE): only the inflight count.
        self.flow_step(slot)

    # The driver's SQE: io_uring's SQ, or the epoll driver's array.
    cdef io_uring_sqe *sqe(self) noexcept nogil:
        self.st.sqes += 1
        return self.drv.sqe()

    cdef void reserve(self, unsigned n) noexcept nogil:
        self.drv.reserve(n)

    # An fd closed outside an OP_CLOSE: the epoll driver must forget it, or
    # the next socket to get its number would never be put in the set.
    cdef void close_fd(self, int fd) noexcept nogil:
        self.drv.forget(fd)
        close(fd)

    # Every SQE of a flow goes through here, so inflight counts them all.
    cdef io_uring_sqe *flow_sqe(self, uint32_t slot, Flow *f, int op, int d) noexcept nogil:
        cdef io_uring_sqe *s = self.sqe()
        f.inflight += 1
        # liburing's prep helpers set every field but user_data, so it is
        # safe to set it before the caller preps the operation.
        io_uring_sqe_set_data64(s, proxy_ud(slot, f.gen, op, d))
        return s

    # --- the decision: what each flow submits next ---------------------------------

    cdef void flow_step(self, uint32_t slot) noexcept nogil:
        cdef Flow *f = &self.flows[slot]
        if f.state == F_OPEN:
            self.dir_step(slot, f, 0)
        if f.state == F_OPEN:
            self.dir_step(slot, f, 1)
        if f.state == F_OPEN:
            watch_step(self, slot, f)
            if (f.dir[0].flags & D_SHUT_DONE) and (f.dir[1].flags & D_SHUT_DONE):
                if self.peek and f.dir[0].consumed < f.dir[0].peeked:
                    # Closing a socket with unread bytes sends RST, not FIN:
                    # drop what was delivered first (ZC notifications may
                    # still be on their way; each one comes back here).
                    f.replayable = 0
                    peek_step(self, slot, f, 0)
                else:
                    # Both FINs forwarded after their last byte: a clean end.
                    flow_fail(self, f, C_NORMAL, 0, 0)
        # Owed zero-copy notifications do not keep the sockets: a notification
        # comes once the kernel drops its reference to the pages, which for a
        # peer that never reads is when our socket is closed (or reset) and
        # its queued skbs are freed. They keep the slot and the parked
        # segments (F_CLOSED_WAIT waits for inflight == 0).
        if f.state == F_REDIAL and f.inflight == f.zc_owed:
            redial(self, slot, f)
        if f.state == F_CLOSING and f.inflight == f.zc_owed:
            flow_close_fds(self, slot, f)
        if f.state == F_CLOSED_WAIT and f.inflight == 0:
            flow_release(self, slot, f)

    cdef void dir_step(self, uint32_t slot, Flow *f, int d) noexcept nogil:
        if self.splice:
            splice_step(self, slot, f, d)
            return
        send_step(self, slot, f, d)
        if f.state != F_OPEN:
            return
        if self.peek and d == 0:
            peek_step(self, slot, f, d)
        else:
            recv_step(self, slot, f, d)

    # Once per batch: publish the buffers returned, then re-arm as many
    # waiting directions as there are free buffers (each takes at least one).
    cdef void bufs_flush(self) noexcept nogil:
        cdef uint32_t free_bufs = self.pool.publish()
        cdef int32_t w
        while self.pool.wait_head >= 0 and free_bufs > 0:
            w = self.pool.wait_head
            wait_remove(self, <uint32_t>(w >> 1), w & 1)
            self.flow_step(<uint32_t>(w >> 1))
            free_bufs -= 1

    # --- the loop -------------------------------------------------------------------

    # Submit everything prepared, wait for at least one CQE, handle whole
    # batches. Returns to Python when the event records are due (EV_BATCH
    # of them, or the oldest EV_DELAY_NS old), when timeout_ns passed, or on a
    # signal or wakeup (-EINTR), whichever is first.
    cdef int run_c(self, int64_t timeout_ns) noexcept nogil:
        cdef io_uring_cqe *cqes[CQE_BATCH]
        cdef int64_t deadline = now_ns() + timeout_ns
        cdef int64_t left
        cdef unsigned n, i
        cdef int ret
        cdef uint64_t sqes_seen = self.st.sqes
        while True:
            if self.fdw_kick:
                fdw_retry(self)     # pipes went back to the pool: a waiter may take one
            if self.wake_fd >= 0 and not self.wake_armed:
                self.wake_arm()     # single-shot: Python drained the fd
            if not self.hc_timer:
                health_arm(self)    # the first round's timer (then each round re-arms)
            self.bufs_flush()
            self.batch_ns = now_ns()
            left = min(deadline, self.tw.next_due()) - self.batch_ns
            left = min(left, self.events.due_ns() - self.batch_ns)
            if self.pool.wait_head >= 0 and self.pool.published > self.pool.held:
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
            if self.st.sqes != sqes_seen:       # this wait submits: counted
                sqes_seen = self.st.sqes
                self.st.submits += 1
            ret = self.drv.submit_and_wait(left)
            while ret != -EINTR:
                n = self.drv.peek_batch(cqes, CQE_BATCH)
                if n == 0:
                    break
                self.st.batches += 1
                self.st.cqes += n
                for i in range(n):
                    self.handle(cqes[i])
                self.drv.advance(n)
                if n < CQE_BATCH:
                    break
            # More completions than the CQ holds went to the kernel's
            # overflow list (NODROP); they come back as the CQ drains,
            # more slowly. Counted: a CQ too small for the load.
            if self.drv.cq_overflowed():
                self.st.cq_overflows += 1
            self.batch_ns = now_ns()
            tw_expire(self, self.batch_ns)
            if ret == -EINTR or self.woken:
                self.woken = False
                return -EINTR
            # Python formats close lines once per batch of them, never once
            # per flow: at one return per closed flow, a connection storm
            # spent more in the return (stats, a line, a write) than in
            # the flow.
            if self.batch_ns >= deadline or self.batch_ns >= self.events.due_ns():
                return 0
            # -ETIME: nothing came in time. -EBUSY/-EAGAIN: the CQ was
            # overflowing or the kernel was short of memory for the
            # submission; the harvest above made room, so go round again.
            if ret < 0 and ret != -ETIME and ret != -EBUSY and ret != -EAGAIN:
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

    # --- Python's own fds on the engine's ring (the metrics endpoint) ---------
    # One-shot polls whose completions make run() return, so a scrape is
    # served between batches by the loop that serves the flows: no thread.
    # `gen` (14 bits) is the caller's, so a completion for an fd number it
    # has since closed and reused is told apart.

    def watch_fd(self, int fd, uint32_t gen, int events):
        """Poll `fd` for `events` once; ready_fds() reports it."""
        cdef io_uring_sqe *s
        if fd < 0 or fd >= (1 << UD_SLOT_BITS):
            raise ValueError("fd out of range for user_data")
        s = self.sqe()
        io_uring_prep_poll_add(s, fd, events)
        io_uring_sqe_set_data64(s, proxy_ud(<uint32_t>fd, gen, OP_PYWATCH, 0))

    def unwatch_fd(self, int fd, uint32_t gen):
        """Cancel watch_fd's poll and forget the fd (the caller closes it next)."""
        cdef io_uring_sqe *s = self.sqe()
        io_uring_prep_cancel64(s, proxy_ud(<uint32_t>fd, gen, OP_PYWATCH, 0), 0)
        io_uring_sqe_set_data64(s, proxy_ud(0, 0, OP_ENGINE_CANCEL, 0))
        self.drv.forget(fd)

    def ready_fds(self):
        """(fd, gen, poll result) of every watch completed since the last call."""
        out = [(self.pyw[i].fd, self.pyw[i].gen, self.pyw[i].res) for i in range(self.pyw_n)]
        self.pyw_n = 0
        return out

    def closes_by_cause(self):
        """Flows closed so far, by cause name."""
        return {name: self.cause_n[code] for code, (name, _) in CAUSES.items()}

    def set_close_format(self, fmt, upstreams, errno_names, frontend=None):
        """Close records drain as rendered lines (EventLog.set_close_format)."""
        self.events.set_close_format(fmt, upstreams, errno_names, frontend)

    def drain_events(self):
        """What happened since the last call (EventLog.drain): flows closed,
        accept pauses, engine errors, run-time fallbacks."""
        return self.events.drain()

    def drain(self):
        """Stop accepting; open flows go on (stop() ends them)."""
        with nogil:
            self.accept_off = True
            accept_step(self)

    def rearm_accept(self):
        """Cancel the accept in flight and arm a new one (accept_step re-arms
        once the cancel's completion is in). At a reload, the old engines'
        accepts on the same socket were woken for connections and then
        cancelled: io_uring's accept waits are exclusive, so the wake-up was
        theirs alone, and those connections would sit in the queue until the
        next one came. A fresh accept looks at the queue at once."""
        with nogil:
            accept_cancel(self)

    def close_listener(self):
        """Forget the listener once no accept is in flight (the caller closes
        it): the epoll backend must not keep a closed fd number in its set."""
        if self.acc_armed or self.listen_fd < 0:
            return False
        self.drv.forget(self.listen_fd)
        self.listen_fd = -1
        return True

    def stop(self):
        """Stop accepting and end every flow still open (cause proxy_shutdown)
        with an RST to both sides: the proxy cannot know that a stream it cuts
        was complete, so its peers must not see a clean end."""
        cdef uint32_t i
        with nogil:
            self.stopping = True
            accept_step(self)
            for i in range(self.slots_used):
                if self.flows[i].state in (F_HEADER, F_CONNECTING, F_OPEN, F_REDIAL):
                    flow_fail(self, &self.flows[i], C_PROXY_SHUTDOWN, 0, 3)
                    self.flow_step(i)

    @property
    def active(self):
        return self.nactive

    @property
    def events_dropped(self):
        """Event records lost because the array was full (EventLog)."""
        return self.events.dropped

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
        if self.drv.buf_ring_head(&head) < 0:
            return None
        if (head & 0xFFFF) != (self.pool.ring_head & 0xFFFF):
            self.pool.st.ring_order_errors += 1
        return head

    # --- test hooks: drive the dispatcher with a CQE the kernel did not post ----

    def _test_inject_cqe(self, uint32_t slot, str op, int d, int res, uint32_t flags):
        """Hand handle() a CQE for `slot`'s current generation. `op` is a name
        (recv, send, close...), 'unknown' (an op code no SQE ever carries) or
        'foreign' (a recv of this flow under another owner's tag)."""
        cdef io_uring_cqe c
        codes = {"recv": OP_RECV, "send": OP_SEND, "close": OP_CLOSE, "accept": OP_ACCEPT,
                 "unknown": OP_LAST + 1, "foreign": 0}
        if slot >= self.max_conns:
            raise ValueError("no such slot")
        memset(&c, 0, sizeof(c))
        if op == "foreign":       # a valid op of this flow, prepared by another owner
            c.user_data = ud_make(OWNER_PROXY + 1, slot, self.flows[slot].gen, OP_RECV, d)
        elif op == "accept":
            c.user_data = proxy_ud(0, 0, OP_ACCEPT, 0)
        else:
            c.user_data = proxy_ud(slot, self.flows[slot].gen, codes[op], d)
        c.res = res
        c.flags = flags
        with nogil:
            self.handle(&c)
            self.bufs_flush()

    def _test_flow(self, uint32_t slot):
        """A flow's state, inflight count and the ring's shadow head entry."""
        cdef Flow *f = &self.flows[slot]
        return {"state": f.state, "inflight": f.inflight,
                "head_bid": self.pool.ring_bid[self.pool.ring_head & self.pool.ring_mask]}

    def stats(self):
        s = dict(self.st)
        s["log_dropped"] = self.events.dropped
        s["active"] = self.nactive
        s.update(self.pool.stats())
        s["pipes_pooled"] = self.pipes.n if self.pipes is not None else 0
        s["pipes_created"] = self.pipes.created if self.pipes is not None else 0
        s["pipe_errors"] = self.pipes.errors if self.pipes is not None else 0
        # Completions the kernel lost for want of memory even with NODROP.
        s["cq_dropped"] = getattr(self.drv, "cq_dropped", 0)
        return s
