# Building an engine from its EngineConfig (uring_net/engine_config.py), and
# taking it apart: the flow table reserved, not committed; the buffer pool and
# its ring registered with the driver; the zero-copy registration table; the
# splice pipe pool filled. Start-up only: nothing here runs per flow.

cdef int engine_setup(Engine self, driver, config) except -1:
    cdef int err = 0
    cdef uint32_t entries
    cdef io_uring_buf_ring *br = NULL
    cdef int pr, pw
    cdef uint32_t pcap
    cdef int mode = MODE_CODES[config.mode]     # EngineConfig checked the name
    cdef uint32_t max_conns = config.max_conns
    cdef uint32_t buffers = config.buffers
    cdef uint32_t buffer_size = config.buffer_size
    cdef double connect_timeout = config.connect_timeout
    cdef bint recv_inc = config.incremental_buffers
    keepalive = config.keepalive or (0, 0, 0)
    # The driver: a Ring (io_uring) or an Epoll carrying out the same
    # SQEs with syscalls (driver.pxd). The engine never asks which.
    self.drv = <Driver?>driver
    self.listen_fd = -1
    self.wake_fd = -1
    self.ka_idle, self.ka_intvl, self.ka_cnt = keepalive
    self.idle_ns = <int64_t>(config.idle_timeout * 1e9)
    self.cfin_ns = <int64_t>(config.client_fin_timeout * 1e9)
    self.sfin_ns = <int64_t>(config.server_fin_timeout * 1e9)
    if max_conns > (1 << UD_SLOT_BITS):
        raise ValueError(f"at most {1 << UD_SLOT_BITS} flows (user_data's slot field)")
    self.tw = TimerWheel(max_conns, now_ns())
    self.max_conns = max_conns
    self.ms_accept = config.multishot_accept
    self.connect_timeout_ns = <int64_t>(connect_timeout * 1e9)
    set_timespec(&self.connect_ts, connect_timeout)
    self.acc_backoff_ms = ACCEPT_PAUSE_MS
    # The mode, as the flags the data paths test (engine.pxd).
    self.splice = mode == MODE_SPLICE
    self.peek = mode == MODE_PEEK
    self.pipe_size = config.pipe_size
    self.replay_window = config.replay_window
    # The pool: balancing, retries, health checks, PROXY protocol.
    self.ups = Upstreams(config.balance)
    self.retries = config.retries
    self.proxy_proto = config.proxy_protocol
    self.accept_proxy = config.accept_proxy
    self.hdr_timeout_ns = <int64_t>(config.proxy_header_timeout * 1e9)
    self.rise = config.rise
    self.fall = config.fall
    self.hc_interval_ns = <int64_t>(config.health_interval * 1e9)
    set_timespec(&self.hc_interval_ts, config.health_interval)
    # A check waits for its connect at most the connect timeout, and
    # never past its round.
    set_timespec(&self.hc_timeout_ts, min(connect_timeout, config.health_interval or connect_timeout))

    # Reserved, not committed (MAP_NORESERVE, zero pages): a slot's page
    # costs memory once a flow first uses it (slot_take), so the table
    # follows the most flows open at once, not --max-conns. (calloc
    # would memset a chunk it took from the heap.)
    self.flows_bytes = <size_t>max(1, max_conns) * sizeof(Flow)
    self.flows = <Flow *>reserve_zeroed(self.flows_bytes)
    self.bundle = config.recv_bundle
    # Each flow waits for one fd (its connect) or, open in splice mode,
    # for up to two (a pipe per direction).
    self.fdw_cap = 2 * max_conns
    self.fdw = <uint64_t *>calloc(self.fdw_cap, sizeof(uint64_t))
    self.events = EventLog()
    if self.flows == NULL or self.fdw == NULL:
        raise MemoryError("cannot allocate the flow table")
    self.free_head = -1
    self.slots_used = 0
    self.pool = BufferPool(buffers=buffers, max_buffers=config.max_buffers,
                           buffer_size=buffer_size, max_inflight=config.max_inflight,
                           holders=2 * max_conns, incremental=recv_inc,
                           segs_per_buf=config.segs_per_buf)
    entries = self.pool.entries

    br = self.drv.buf_ring_setup(entries, recv_inc, &err)
    if br == NULL:
        raise OSError(-err, f"registering the provided-buffer ring ({entries} entries) failed: "
                      f"{os.strerror(-err)}" + (", locked memory (RLIMIT_MEMLOCK) is short: raise it "
                      "or use --backend epoll" if err == -ENOMEM else ""))
    self.pool.attach(br, buffers)

    # Zero-copy sends from registered buffers save pinning pages per send.
    # Registering pins (and so touches) every page it covers, so the
    # table starts empty, one slot per buffer id, and a buffer is
    # registered when it is first sent zero-copy (buf_fixed): pinned
    # memory follows the buffers in use, not the pool's reservation
    # (registering the initial pool at start cost 32 MiB of RSS idle).
    # Where registering is refused (RLIMIT_MEMLOCK for non-root), SEND_ZC
    # works on plain addresses.
    self.zc = config.send_zc and mode in (MODE_ZEROCOPY, MODE_AUTO, MODE_PEEK)
    self.zc_threshold = config.zc_threshold
    # Auto mode, and peek which sends as auto does, back off per socket.
    self.zc_backoff = self.zc and mode != MODE_ZEROCOPY
    if self.zc and config.registered_buffers:
        self.buf_reg = <uint8_t *>calloc(self.pool.max_bufs, sizeof(uint8_t))
        if self.buf_reg == NULL:
            raise MemoryError()
        self.zc_register_err = -self.drv.buffers_sparse(self.pool.max_bufs)
        self.zc_fixed = self.zc_register_err == 0

    # The pipe pool is filled now and kept full, so an idle proxy always
    # holds the same fds and a new flow rarely pays for pipe2 + fcntl.
    if self.splice:
        self.pipes = PipePool(self.pipe_size)
        while self.pipes.n < PIPE_POOL:
            err = self.pipes.make(&pr, &pw, &pcap)
            if err < 0:
                raise OSError(-err, f"creating the splice pipe pool failed: {os.strerror(-err)}")
            self.pipes.put(pr, pw, pcap, 0)
    return 0


cdef void engine_teardown(Engine self) noexcept:
    # The ring must go before the pool: in-flight requests may point into
    # it. stop() has already waited for every flow, so none should be.
    if self.drv is not None:
        if self.pool is not None:
            self.drv.buf_ring_free(self.pool.br, self.pool.entries)
        self.drv.close()
    if self.ups is not None:
        health_close(self)
    # The pipe pool closes its pipes when it goes (PipePool.__dealloc__).
    if self.flows != NULL:
        munmap(self.flows, self.flows_bytes)
    free(self.buf_reg)
    free(self.fdw)
