# The flow table and the per-flow state machine (engine.pyx and the data
# paths it includes: connect, copy, zerocopy, peek, splice, flow_end).

# A flow is two sockets; side 0 is the client, side 1 the upstream.
# Direction d carries bytes read from side d and written to side 1 - d.

# --mode: one data path per engine (EngineConfig.mode).
cdef enum Mode:
    MODE_COPY = 0
    MODE_ZEROCOPY
    MODE_AUTO           # copy, with zero-copy sends while the kernel really skips the copy
    MODE_PEEK
    MODE_SPLICE

cdef enum FlowState:
    F_FREE = 0
    F_CONNECTING     # upstream connect (with linked timeout) in flight
    F_OPEN           # both directions may move data
    F_REDIAL         # the upstream failed early: waiting for every in-flight op
                     # to complete before connecting to the next --upstream
    F_HEADER         # --accept-proxy: waiting for the client's PROXY header
    F_CLOSING        # decided to end; waiting for every in-flight op to complete
    F_CLOSED_WAIT    # close SQEs in flight; the slot frees when they complete

cdef enum DirFlag:
    D_RECV_ARMED  = 1 << 0   # a recv on the source side is in flight
    D_SEND_BUSY   = 1 << 2   # a send to the sink side is in flight
    D_EOF         = 1 << 3   # FIN read from the source side
    D_SHUT_SENT   = 1 << 4   # shutdown(SHUT_WR) submitted on the sink side
    D_SHUT_DONE   = 1 << 5   # ... and completed
    D_WAIT_BUF    = 1 << 6   # recv ended with ENOBUFS; queued on the buffer-wait list
    D_ZC_OFF      = 1 << 7   # auto mode: the kernel copies this socket's zero-copy sends
    D_READY       = 1 << 8   # peek/splice: the source may have bytes a read would get
                             # (cleared by EAGAIN; set again by the source's poll)
    D_POLL_ARMED  = 1 << 9   # peek, splice: the source's readiness poll is in flight
    D_CONSUME_BUSY = 1 << 10 # peek: a MSG_TRUNC recv consuming sent bytes is in flight
    D_OUT_WAIT    = 1 << 11  # splice: the sink said EAGAIN; poll it before the next splice
    D_IN_STUCK    = 1 << 12  # splice: reading said EAGAIN with bytes in the pipe (the pipe
                             # may be full); retry after the next write to the sink
    D_PIPE_WAIT   = 1 << 13  # splice: ready to read, but no fd for a pipe: in the fd queue

cdef enum Cause:
    C_NONE = 0
    C_NORMAL
    C_CLIENT_RESET
    C_UPSTREAM_RESET
    C_UPSTREAM_REFUSED
    C_CONNECT_TIMEOUT
    C_CONNECT_ERROR
    C_PROXY_SHUTDOWN
    C_RESOURCE
    C_IDLE_TIMEOUT          # no byte either way for --idle-timeout
    C_CLIENT_FIN_TIMEOUT    # the client sent its FIN; the other way idle for --client-fin-timeout
    C_SERVER_FIN_TIMEOUT    # the upstream sent its FIN; the other way idle for --server-fin-timeout
    C_NO_UPSTREAM           # every upstream is down (health checks), or tried
    C_BAD_HEADER            # --accept-proxy: malformed, oversized or truncated header
    C_HEADER_TIMEOUT        # --accept-proxy: no complete header in time

# Buffers one send may carry: everything queued, up to this many, goes out
# in one sendmsg, so a sink that keeps up sees few large writes.
cdef enum:
    SEND_IOV = 16

cdef struct Dir:
    SegQueue q              # segments queued for sending, and those sent zero-copy
                            # that wait for notifications (parked: the kernel's socket
                            # buffer holds our pages, so they count as held)
    uint32_t head_off       # bytes of the head segment already sent
    uint32_t flags          # DirFlag
    uint64_t moved_bytes    # accepted by the sink's socket
    uint32_t send_len       # bytes the send in flight asked for
    uint16_t zc_notifs      # auto mode: notifications seen on this direction...
    uint16_t zc_copied      # ... and how many said the kernel copied
    msghdr msg              # the in-flight sendmsg's header and iovec: they
    iovec iov[SEND_IOV]     # live here, in the table, until its CQE
    # splice mode: this direction's pipe, source -> pipe -> sink
    int pipe_r
    int pipe_w
    uint32_t pipe_cap       # bytes the pipe was sized for (F_SETPIPE_SZ's answer)
    uint32_t pipe_bytes     # bytes in the pipe: added by splice-in, taken by splice-out
    # peek mode, client -> upstream: the bytes stay in the client's socket until
    # they are delivered; peeked = consumed + released + (sent or queued, in flight)
    uint64_t peeked         # bytes peeked since the (last) connect
    uint64_t released       # delivered (sent, and notified if zero-copy), not yet consumed
    uint64_t consumed       # dropped from the socket with MSG_TRUNC
    uint32_t consume_len    # the consume in flight asked for this many

cdef struct Flow:
    uint32_t gen            # bumped on release: stale CQEs carry the old value
    uint8_t state           # FlowState
    uint8_t cause           # Cause, decided once
    uint8_t reset_mask      # sides (bit per side) to close with SO_LINGER {1,0}
    int32_t err             # errno behind the cause, 0 if none
    uint8_t up_idx          # which upstream this flow is on (NO_UPSTREAM: none was up)
    uint8_t next_up         # the one a retry goes to (chosen by can_redial)
    uint8_t failovers       # upstreams given up on before this one (retries)
    uint64_t tried          # upstreams this flow has been sent to, a bit each
    uint16_t hdr_want       # --accept-proxy: the header bytes the last poll waited for
    sockaddr_in6 pp_dst     # --accept-proxy: the address the header says was connected to
    uint8_t watch           # sides (bit per side) with an OP_ERRWATCH poll armed
    int32_t zc_owed         # zero-copy notifications owed (first CQE seen, F_NOTIF not yet)
    uint8_t replayable      # peek: nothing consumed and the upstream has not answered,
                            # so every byte can still go to the next upstream
    uint32_t replay_limit   # peek: stop holding delivered bytes past this many
    int fd[2]
    int32_t inflight        # SQEs submitted whose final CQE has not arrived
    int32_t next_free
    int64_t t_start_ns
    int64_t t_active_ns     # the batch in which a byte last moved (either way)
    int64_t t_fds_closed_ns # when its fds were closed with notifications owed, or 0
    Dir dir[2]
    sockaddr_storage peer
    socklen_t peer_len

cdef struct Stats:
    uint64_t accepted
    uint64_t closed
    uint64_t rejected_full      # accepted while the table was full (closed at once)
    uint64_t accept_pauses      # EMFILE/ENFILE/ENOMEM pauses
    uint64_t c2u_bytes
    uint64_t u2c_bytes
    uint64_t enobufs            # recvs that found the buffer pool empty
    uint64_t short_sends
    uint64_t stale_cqes         # CQEs for a recycled slot, dropped
    uint64_t zc_sends           # SEND_ZC whose first CQE promised a notification
    uint64_t zc_notifs          # ... notifications received
    uint64_t zc_copied          # ... of which the kernel reported it copied anyway
    uint64_t zc_registered_bufs  # buffers registered for SEND_ZC_FIXED (on first use)
    uint64_t zc_register_fails   # a registration refused: registered sends off
    uint64_t zc_eopnotsupp      # SEND_ZC refused at run time (EOPNOTSUPP, ENOMEM): zero-copy off
    uint64_t zc_backoffs        # auto mode: directions that went back to copying sends
    uint64_t failovers          # upstreams given up on for the next --upstream
    uint64_t replayed_bytes     # peek: bytes sent again to the next upstream
    uint64_t peek_eagain        # peek: peeks that found nothing past the offset
    uint64_t consumed_bytes     # peek: bytes dropped from client sockets after delivery
    uint64_t splice_eagain      # splice: splices that found nothing to move
    uint64_t splice_bytes       # splice: bytes moved pipe -> socket (live, not at close)
    uint64_t zc_close_waits     # flows whose fds closed with zero-copy notifications owed
    uint64_t zc_close_wait_ns   # ... and the time they then waited for them, summed
    uint64_t unknown_cqes       # CQEs whose user_data names no op of ours: dropped
    uint64_t accept_errors      # accept failures other than running out of fds or memory
    uint64_t cancel_fallbacks   # failing flows whose exact cancels missed an op (must stay 0)
    uint64_t timeouts           # flows ended by an idle or fin timeout
    uint64_t tw_visits          # wheel entries looked at (expired or moved on)
    uint64_t paused_errors      # errors seen by a side's error watch (or peek's poll)
    uint64_t cqes
    uint64_t batches
    uint64_t cq_overflows       # turns that found completions in the kernel's overflow list
    uint64_t submits            # waits that submitted SQEs ...
    uint64_t sqes               # ... and the SQEs prepared for them
    uint64_t no_upstream        # connections closed at once: no upstream was up
    uint64_t health_skipped     # health checks not started for want of an fd
    uint64_t proxy_headers      # PROXY protocol headers sent
    uint64_t headers_accepted   # --accept-proxy: headers read from clients ...
    uint64_t bad_headers        # ... and refused (malformed, oversized, truncated)

# A completed poll of one of Python's fds (Engine.watch_fd).
cdef struct PyReady:
    int32_t fd
    uint32_t gen
    int32_t res

cdef enum:
    PYW_CAP = 256

@cython.final
cdef class Engine:
    cdef Driver drv                # io_uring or epoll: the engine never asks which
    cdef Flow *flows
    cdef size_t flows_bytes
    cdef uint32_t max_conns
    cdef int32_t free_head         # recycled slots, a list through next_free
    cdef uint32_t slots_used       # slots ever handed out (the rest are untouched)
    cdef uint32_t nactive

    cdef BufferPool pool           # the buffers every flow receives into (bufpool.pyx)
    cdef bint bundle               # recv bundles (6.10+)

    # data path variants (--mode)
    cdef bint splice           # splice: socket -> pipe -> socket, no user-space buffers
    cdef bint peek             # peek: client bytes stay in its socket until delivered
    cdef uint32_t pipe_size
    cdef PipePool pipes        # splice mode's idle pipes (pipes.pyx); None otherwise
    cdef uint32_t replay_window

    # listener and upstreams
    cdef int listen_fd
    cdef int listen_family
    cdef bint acc_armed
    cdef bint acc_cancel
    cdef bint acc_paused       # resource error: a timer re-arms accept
    cdef bint acc_timer        # ... and that timer is in flight
    cdef uint32_t acc_backoff_ms  # the next pause after an accept error (doubles)
    cdef uint64_t *fdw         # FIFO of flows (slot | gen << 32) waiting for an fd
    cdef uint32_t fdw_head     # to create their upstream socket
    cdef uint32_t fdw_n
    cdef uint32_t fdw_cap
    cdef bint fdw_kick             # a pipe went back to the pool: retry the queue this turn
    cdef int64_t connect_timeout_ns
    cdef bint stopping         # stop(): every flow is being ended
    cdef bint accept_off       # drain(): no new accept; open flows go on
    cdef int wake_fd           # signal.set_wakeup_fd's read end, or -1
    cdef bint wake_armed
    cdef bint woken
    cdef Upstreams ups         # the pool, its balancing and health (upstreams.pyx)
    cdef uint8_t retries       # --retries: upstreams a flow may move on to after the first
    cdef int proxy_proto       # --proxy-protocol: 0 (off), 1 or 2 (proxyproto.pxi)
    cdef bint accept_proxy     # --accept-proxy: clients send a PROXY header first
    cdef int64_t hdr_timeout_ns
    # health checks (health.pxi): a round every interval; 0 = off
    cdef int64_t hc_interval_ns
    cdef __kernel_timespec hc_interval_ts
    cdef __kernel_timespec hc_timeout_ts
    cdef uint32_t rise
    cdef uint32_t fall
    cdef bint hc_timer         # the interval's timer is in flight
    cdef uint32_t hc_round
    cdef __kernel_timespec connect_ts
    cdef __kernel_timespec pause_ts
    cdef bint ms_accept
    cdef bint zc               # --mode zerocopy, while the kernel takes it
    cdef bint zc_fixed         # ... from the registered pool (SEND_ZC_FIXED)
    cdef uint8_t *buf_reg      # per buffer id: 1 once registered (buf_fixed)
    cdef readonly int zc_register_err
    cdef uint32_t zc_threshold
    cdef bint zc_backoff       # auto mode: stop zero-copy on a socket the kernel copies for

    # timeouts: a timer wheel of open flows (see the timeouts section)
    cdef int ka_idle           # TCP keep-alive on both sockets: seconds idle, probe
    cdef int ka_intvl          # interval, probes; ka_idle 0 = off
    cdef int ka_cnt
    cdef int64_t idle_ns
    cdef int64_t cfin_ns
    cdef int64_t sfin_ns
    cdef TimerWheel tw         # open flows' deadlines, by slot (timers.pyx)
    cdef int64_t batch_ns      # now, read once per batch

    cdef EventLog events          # what Python is told, drained between batches (events.pyx)
    cdef Stats st
    cdef uint64_t cause_n[16]     # flows closed, by Cause
    cdef PyReady pyw[PYW_CAP]     # Python's polls that completed (watch_fd)
    cdef uint32_t pyw_n

    cdef void handle(self, io_uring_cqe *cqe) noexcept nogil
    cdef void wake_arm(self) noexcept nogil
    cdef void flow_step(self, uint32_t slot) noexcept nogil
    cdef void dir_step(self, uint32_t slot, Flow *f, int d) noexcept nogil
    cdef io_uring_sqe *flow_sqe(self, uint32_t slot, Flow *f, int op, int d) noexcept nogil
    cdef io_uring_sqe *sqe(self) noexcept nogil
    cdef void reserve(self, unsigned n) noexcept nogil
    cdef void close_fd(self, int fd) noexcept nogil
    cdef void bufs_flush(self) noexcept nogil
    cdef int run_c(self, int64_t timeout_ns) noexcept nogil
