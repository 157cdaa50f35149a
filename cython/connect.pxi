# How a flow gets its two sockets: accept (paused on resource errors,
# stopped while the table is full), flow set-up, the upstream connect with
# its linked timeout, flows waiting for an fd, and failover to the next
# --upstream. Module-level functions of the Engine (engine.pyx holds the
# dispatcher and flow_step, which call these).

# --- accept ----------------------------------------------------------------

cdef void on_accept(Engine e, int res, uint32_t cflags) noexcept nogil:
    if not (cflags & IORING_CQE_F_MORE):
        e.acc_armed = False
        e.acc_cancel = False
    if res >= 0:
        if e.stopping or not slot_available(e):
            # Raced with our cancel of the multishot accept while every flow
            # is being ended. (One that raced a drain's cancel is served: at
            # a reload the new engines accept on the same socket, and this
            # client must not be the one refused.)
            e.close_fd(res)
            e.st.rejected_full += 1
        else:
            e.st.accepted += 1
            e.acc_backoff_ms = ACCEPT_PAUSE_MS
            flow_open(e, res)
    elif res == -EMFILE or res == -ENFILE or res == -ENOMEM or res == -ENOBUFS:
        # Out of fds or memory: the connection stays in the backlog.
        accept_pause(e, -res, ACCEPT_PAUSE_MS)
    elif res == -ECONNABORTED or res == -EAGAIN or res == -EINTR:
        pass                # that client went first, or a spurious wake: accept on
    elif res != -ECANCELED:
        # Anything else (EPERM from a firewall hook, EPROTO, ...) would
        # fail again at once if re-armed at once: back off, doubling the
        # pause up to ACCEPT_BACKOFF_MAX_MS until an accept succeeds.
        e.st.accept_errors += 1
        accept_pause(e, -res, e.acc_backoff_ms)
        e.acc_backoff_ms = min(e.acc_backoff_ms * 2, <uint32_t>ACCEPT_BACKOFF_MAX_MS)
    accept_step(e)

# Re-arming at once would fail again, so wait pause_ms; the timer's CQE
# retries (never a spin). The pause's length is read when the timer is
# submitted, so pause_ts may be changed for the next one.
cdef void accept_pause(Engine e, int err, uint32_t pause_ms) noexcept nogil:
    cdef io_uring_sqe *s
    e.st.accept_pauses += 1
    e.events.note(EV_ACCEPT_PAUSED, 0, err, pause_ms, e.batch_ns)
    e.pause_ts.tv_sec = pause_ms // 1000
    e.pause_ts.tv_nsec = (pause_ms % 1000) * 1000000
    e.acc_paused = True
    if not e.acc_timer and not e.stopping and not e.accept_off:
        e.acc_timer = True
        s = e.sqe()
        io_uring_prep_timeout(s, &e.pause_ts, 0, 0)
        io_uring_sqe_set_data64(s, proxy_ud(0, 0, OP_ACCEPT_TIMER, 0))

# Decides whether an accept should be in flight: not while stopping or
# draining, not while paused on a resource error or while accepted
# clients still wait for an fd, not while the flow table is full
# (HAProxy's maxconn: connections wait in the kernel's backlog).
cdef void accept_step(Engine e) noexcept nogil:
    cdef io_uring_sqe *s
    cdef bint want = (e.listen_fd >= 0 and not e.stopping and not e.accept_off
                      and not e.acc_paused and e.fdw_n == 0 and slot_available(e))
    if want and not e.acc_armed:
        s = e.sqe()
        if e.ms_accept:
            io_uring_prep_multishot_accept(s, e.listen_fd, NULL, NULL, SOCK_CLOEXEC)
        else:
            io_uring_prep_accept(s, e.listen_fd, NULL, NULL, SOCK_CLOEXEC)
        io_uring_sqe_set_data64(s, proxy_ud(0, 0, OP_ACCEPT, 0))
        e.acc_armed = True
    elif not want:
        accept_cancel(e)

# Cancel the accept in flight, once; its completion clears acc_armed, and
# accept_step arms a new one if one is still wanted.
cdef void accept_cancel(Engine e) noexcept nogil:
    cdef io_uring_sqe *s
    if e.acc_armed and not e.acc_cancel:
        s = e.sqe()
        io_uring_prep_cancel64(s, proxy_ud(0, 0, OP_ACCEPT, 0), 0)
        io_uring_sqe_set_data64(s, proxy_ud(0, 0, OP_ENGINE_CANCEL, 0))
        e.acc_cancel = True

# --- flow set-up -------------------------------------------------------------

cdef bint slot_available(Engine e) noexcept nogil:
    return e.free_head >= 0 or e.slots_used < e.max_conns

# A free slot: a recycled one (its generation moved on at release), or
# the next never-used one, whose zeroed page is touched only now.
cdef uint32_t slot_take(Engine e) noexcept nogil:
    cdef uint32_t slot
    if e.free_head >= 0:
        slot = <uint32_t>e.free_head
        e.free_head = e.flows[slot].next_free
        return slot
    slot = e.slots_used
    e.slots_used += 1
    return slot

cdef void flow_open(Engine e, int cfd) noexcept nogil:
    cdef uint32_t slot = slot_take(e)
    cdef Flow *f = &e.flows[slot]
    cdef int d
    e.nactive += 1
    f.state = F_CONNECTING
    f.cause = C_NONE
    f.err = 0
    f.reset_mask = 0
    f.inflight = 0
    f.watch = 0
    f.zc_owed = 0
    f.up_idx = NO_UPSTREAM
    f.tried = 0
    f.failovers = 0
    f.t_start_ns = now_ns()
    f.fd[0] = cfd
    f.fd[1] = -1
    memset(&f.dir[0], 0, sizeof(Dir) * 2)
    for d in range(2):
        f.dir[d].q.head = -1
        f.dir[d].q.tail = -1
        f.dir[d].pipe_r = -1
        f.dir[d].pipe_w = -1
    # SO_PEERNAME, not getpeername(): a client that reset before we got
    # here is in TCP_CLOSE, where getpeername() says ENOTCONN, but the
    # kernel still knows the address (inet_getname with peer=2 skips the
    # state check). It wants the exact address size, not a larger buffer.
    f.peer_len = sizeof(sockaddr_in6) if e.listen_family == AF_INET6 else sizeof(sockaddr_in)
    memset(&f.peer, 0, sizeof(f.peer))
    if getsockopt(cfd, SOL_SOCKET, SO_PEERNAME, &f.peer, &f.peer_len) != 0:
        memset(&f.peer, 0, sizeof(f.peer))
    # TCP_NODELAY and keep-alive came with the listener (add_listener).
    if e.splice:
        # Splices run in io-wq workers; a blocking socket would park one
        # per idle flow (docs/kernel-notes.md, Splice). Non-blocking, a splice that
        # cannot move anything ends at once with EAGAIN.
        fcntl(cfd, F_SETFL, fcntl(cfd, F_GETFL) | O_NONBLOCK)
    f.pp_dst.sin6_family = 0
    if e.accept_proxy:
        # The client's PROXY header comes first (proxyproto.pxi); the rest
        # of the set-up waits for it, under its own deadline.
        f.state = F_HEADER
        f.hdr_want = 1
        e.tw.add(slot, f.t_start_ns + e.hdr_timeout_ns)
        hdr_arm(e, slot, f)
        return
    flow_begin(e, slot, f)

# The flow's client is known (its address, or the one its PROXY header
# carried): set up the data path's socket options, pick an upstream, dial.
cdef void flow_begin(Engine e, uint32_t slot, Flow *f) noexcept nogil:
    cdef int zero = 0, rcvbuf = 0, u
    cdef socklen_t optlen = sizeof(int)
    cdef int cfd = f.fd[0]
    f.replayable = e.peek
    if e.peek:
        # MSG_PEEK now reads on from the previous peek (6.9+, probed).
        setsockopt(cfd, SOL_SOCKET, SO_PEEK_OFF, &zero, sizeof(zero))
        # Held bytes sit in the receive buffer: holding a quarter of it
        # at most leaves the client room to send while we wait.
        getsockopt(cfd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, &optlen)
        f.replay_limit = min(e.replay_window, <uint32_t>max(rcvbuf, 0) // 4)
    u = e.ups.pick(0, &f.peer)
    if u < 0:
        # Every upstream is down: the client is closed at once, and says why.
        e.st.no_upstream += 1
        flow_fail(e, f, C_NO_UPSTREAM, 0, 0)
        e.flow_step(slot)
        return
    flow_attach(e, f, u)
    flow_dial(e, slot, f)

cdef void flow_attach(Engine e, Flow *f, int u) noexcept nogil:
    f.up_idx = <uint8_t>u
    f.tried |= <uint64_t>1 << u
    e.ups.attach(u)

# TCP keep-alive (--tcp-keepalive): a peer that vanished without a FIN
# or RST (powered off, NAT entry dropped) is then found by the kernel,
# whose probes go unanswered and end the socket with ETIMEDOUT; the
# recv or error watch on that side sees it, even with --idle-timeout 0.
cdef void keepalive(Engine e, int fd) noexcept nogil:
    cdef int one = 1
    if e.ka_idle <= 0:
        return
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one))
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &e.ka_idle, sizeof(int))
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &e.ka_intvl, sizeof(int))
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &e.ka_cnt, sizeof(int))

# Connect to the flow's current upstream, or queue it until an fd is free.
cdef void flow_dial(Engine e, uint32_t slot, Flow *f) noexcept nogil:
    if not flow_connect(e, slot, f):
        # The client took the last fd. It is ours now: it waits (accept
        # paused) until an fd comes back, rather than being dropped.
        fdw_push(e, slot, f, FDW_CONNECT)

# Queue what a flow waits for an fd to do: its upstream socket, or
# (splice mode) a pipe for a direction. Accepting pauses meanwhile; the
# queue is retried as fds come back (fdw_retry).
cdef void fdw_push(Engine e, uint32_t slot, Flow *f, int kind) noexcept nogil:
    if e.fdw_n == e.fdw_cap:
        flow_fail(e, f, C_RESOURCE, EMFILE, 0)
        e.flow_step(slot)
        return
    if kind != FDW_CONNECT:
        f.dir[kind - FDW_PIPE0].flags |= D_PIPE_WAIT
    e.fdw[(e.fdw_head + e.fdw_n) % e.fdw_cap] = slot | (<uint64_t>kind << 20) | (<uint64_t>f.gen << 32)
    e.fdw_n += 1
    accept_pause(e, EMFILE, ACCEPT_PAUSE_MS)

# Create the upstream socket and submit connect + linked timeout.
# False when the socket cannot be created for lack of fds (try later).
cdef bint flow_connect(Engine e, uint32_t slot, Flow *f) noexcept nogil:
    cdef int one = 1
    cdef int ufd
    cdef io_uring_sqe *s
    cdef Upstream *up = &e.ups.u[f.up_idx]
    ufd = socket(up.family, SOCK_STREAM | SOCK_CLOEXEC, 0)
    if ufd < 0:
        if errno == EMFILE or errno == ENFILE:
            return False
        flow_fail(e, f, C_RESOURCE, errno, 0)
        e.flow_step(slot)
        return True
    f.fd[1] = ufd
    # The proxy forwards whatever it has as soon as it has it; Nagle
    # would hold a small tail back for an ACK round trip.
    setsockopt(ufd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
    keepalive(e, ufd)
    # connect + linked timeout: the pair must reach the kernel in one
    # submit, or the link is broken (io_uring_prep_link_timeout(3)).
    e.reserve(2)
    s = e.flow_sqe(slot, f, OP_CONNECT, 0)
    io_uring_prep_connect(s, ufd, <sockaddr *>&up.addr, up.addr_len)
    s.flags |= IOSQE_IO_LINK
    s = e.flow_sqe(slot, f, OP_CONNECT_TIMEOUT, 0)
    io_uring_prep_link_timeout(s, &e.connect_ts, 0)
    return True

# What waits for an fd, oldest first; stop at the first that still
# cannot get one. A connect waiting longer than --connect-timeout ends its
# flow; a direction waiting for a pipe is under the flow's idle timeout.
cdef void fdw_retry(Engine e) noexcept nogil:
    cdef uint64_t ent
    cdef uint32_t slot
    cdef int kind, err
    cdef Flow *f
    cdef Dir *D
    e.fdw_kick = False
    while e.fdw_n > 0:
        ent = e.fdw[e.fdw_head]
        slot = <uint32_t>(ent & 0xFFFFF)
        kind = <int>((ent >> 20) & 3)
        f = &e.flows[slot]
        if f.gen != <uint32_t>(ent >> 32):
            pass      # the slot was reused
        elif kind == FDW_CONNECT:
            if f.state != F_CONNECTING or f.fd[1] >= 0:
                pass      # ended meanwhile (stop)
            elif now_ns() - f.t_start_ns > e.connect_timeout_ns:
                flow_fail(e, f, C_RESOURCE, EMFILE, 0)
                e.flow_step(slot)
            elif not flow_connect(e, slot, f):
                accept_pause(e, EMFILE, ACCEPT_PAUSE_MS)
                return
        else:
            D = &f.dir[kind - FDW_PIPE0]
            if f.state == F_OPEN and D.flags & D_PIPE_WAIT:
                err = pipe_take(e, D)
                if err == -EMFILE or err == -ENFILE:
                    accept_pause(e, EMFILE, ACCEPT_PAUSE_MS)
                    return
                D.flags &= ~D_PIPE_WAIT
                if err < 0:
                    flow_fail(e, f, C_RESOURCE, -err, 0)
                e.flow_step(slot)
        e.fdw_head = (e.fdw_head + 1) % e.fdw_cap
        e.fdw_n -= 1

# --- the connect's completion ---------------------------------------------------

cdef void on_connect(Engine e, Flow *f, int res) noexcept nogil:
    cdef int err
    if f.state != F_CONNECTING:
        return
    if res != 0:
        e.ups.connect_failed(f.up_idx)
    if res == 0 and e.proxy_proto:
        # The header first, before any data SQE of this flow exists.
        err = pp_send(e, f)
        if err:
            flow_fail(e, f, C_CONNECT_ERROR, err, 0)
            return
        e.st.proxy_headers += 1
    if res == 0:
        f.state = F_OPEN
        f.t_active_ns = e.batch_ns
        e.tw.add(<uint32_t>(f - e.flows), flow_deadline(e, f, NULL))
        if e.splice:
            # Only now: a non-blocking connect would not be waited for.
            fcntl(f.fd[1], F_SETFL, fcntl(f.fd[1], F_GETFL) | O_NONBLOCK)
    elif res == -ECONNREFUSED:
        flow_fail(e, f, C_UPSTREAM_REFUSED, -res, 0)
    elif res == -ECONNRESET:
        # The upstream accepted and reset before the connect's completion was
        # reaped (seen under load on loopback, mostly on the epoll backend):
        # an upstream reset, passed on to the client as one.
        side_failed(e, f, 1, res)
    elif res == -ECANCELED or res == -ETIMEDOUT:
        # -ECANCELED: the linked timeout fired (we cancel connects only
        # once the flow is already closing, which returned above).
        flow_fail(e, f, C_CONNECT_TIMEOUT, ETIMEDOUT, 0)
    else:
        flow_fail(e, f, C_CONNECT_ERROR, -res, 0)

# --- retries: the next upstream ---------------------------------------------

# Whether the flow can move to another upstream without the client
# noticing: before the connect succeeded (no client byte was read yet,
# in any mode), or in peek mode while every client byte is still in its
# socket and the upstream has not answered; at most --retries times, and
# only to an upstream that is up and that this flow has not tried. The
# balancer picks it now (f.next_up); redial() moves the flow once the
# failed attempt's operations have all completed.
cdef bint can_redial(Engine e, Flow *f, uint8_t cause) noexcept nogil:
    cdef int u
    if e.stopping or f.failovers >= e.retries or f.fd[1] < 0:
        return False
    if cause != C_UPSTREAM_REFUSED and cause != C_CONNECT_TIMEOUT \
            and cause != C_CONNECT_ERROR and cause != C_UPSTREAM_RESET:
        return False
    if not (f.state == F_CONNECTING or (f.state == F_OPEN and f.replayable)):
        return False
    u = e.ups.pick(f.tried, &f.peer)
    if u < 0:
        return False
    f.next_up = <uint8_t>u
    return True

# Every operation of the failed attempt has completed (flow_fail
# cancelled them): drop the old upstream, rewind the client's peek
# offset to the first byte, and connect to the next upstream.
cdef void redial(Engine e, uint32_t slot, Flow *f) noexcept nogil:
    cdef int zero = 0
    cdef int d
    cdef Dir *D
    cdef int pr, pw
    cdef uint32_t pc, pb, parked
    e.tw.remove(<uint32_t>(f - e.flows))
    flow_drop_queues(e, slot, f)
    e.close_fd(f.fd[1])
    f.fd[1] = -1
    if e.peek:
        e.st.replayed_bytes += f.dir[0].peeked
        setsockopt(f.fd[0], SOL_SOCKET, SO_PEEK_OFF, &zero, sizeof(zero))
    for d in range(2):
        D = &f.dir[d]
        pr, pw, pc, pb = D.pipe_r, D.pipe_w, D.pipe_cap, D.pipe_bytes
        parked = D.q.parked        # notifications still owed from the last upstream
        memset(D, 0, sizeof(Dir))
        D.q.parked = parked
        D.q.head = -1
        D.q.tail = -1
        D.pipe_r, D.pipe_w, D.pipe_cap, D.pipe_bytes = pr, pw, pc, pb
    e.ups.detach(f.up_idx)
    flow_attach(e, f, f.next_up)
    f.failovers += 1
    e.st.failovers += 1
    f.state = F_CONNECTING
    f.cause = C_NONE
    f.err = 0
    f.replayable = e.peek
    flow_dial(e, slot, f)
