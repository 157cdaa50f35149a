"""Running uring-proxy: listener, ring, engine, and the loop between batches.

Python's part is start-up, signals, logging and statistics. The engine runs
nogil in C until a flow closes (a log line is due), a signal arrives or the
batch timeout passes; then this loop drains the engine's event log.
"""
from __future__ import annotations

import errno
import fcntl
import os
import resource
import socket
import threading
import time

from . import backend, service
from .caps import FORCED, pipe_max_size
from .config import MAX_POOL_BUFFERS, Config, ConfigError
from .engine_config import EngineConfig
from .log import Log

BATCH_TIMEOUT = 0.5      # seconds the engine may run without returning
# Test knob: the segment table's initial size per buffer (default 8). At 1 the
# table must grow as soon as two flows' bytes share a buffer, which only
# incremental buffers do, so a test can require growth without depending on
# how many completions happen to land in one batch.
SEGS_PER_BUF_ENV = "URING_NET_TEST_SEGS_PER_BUF"
NO_UPSTREAM = 255        # the engine's upstream index for a flow that found none up
NOFILE_SPARE = 128       # fds beside the flows': listener, ring, pipe pool, wakeup, logs
STOP_GRACE = 5.0         # seconds to let flows finish closing on shutdown
STATS_EVERY = 10.0
# Test knob: the worker of this index fails once, after its first connection
# (serve() replaces it); "killing" a thread from outside is not possible.
CRASH_WORKER_ENV = "URING_NET_TEST_CRASH_WORKER"
_crash_pending = None


class StartupError(Exception):
    """The proxy could not start for a reason outside the configuration."""


def probe_pipe_size(wanted: int | None, max_inflight: int) -> int:
    """The pipe size splice mode will use: --pipe-size if the system takes it
    (else ConfigError), or by default --max-inflight capped at fs.pipe-max-size,
    stepping down while the kernel refuses it (per-user pipe limits)."""
    size = wanted if wanted is not None else min(max_inflight, pipe_max_size())
    while True:
        r, w = os.pipe()
        try:
            return fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
        except OSError as e:
            if wanted is not None:
                raise ConfigError(f"--pipe-size {wanted}: the kernel refuses it ({e.strerror}; "
                                  f"fs.pipe-max-size is {pipe_max_size()})") from None
            if size <= 4096:
                return fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
            size //= 2
        finally:
            os.close(r)
            os.close(w)


def open_listener(cfg: Config, reuseport: bool = False, port: int | None = None) -> socket.socket:
    """The frontend's listening socket. With `reuseport` (several workers) each
    worker has its own, bound to one port: the kernel spreads new connections
    over them by hash, and no worker takes another's from its queue."""
    s = socket.socket(cfg.listen.family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if cfg.listen.family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((cfg.listen.host, cfg.listen.port if port is None else port))
        s.listen(cfg.backlog)
    except OSError as e:
        s.close()
        raise ConfigError(f"cannot listen on {cfg.listen}: {e.strerror}") from None
    return s


def _segs_per_buf() -> int:
    raw = os.environ.get(SEGS_PER_BUF_ENV, "8")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if not 1 <= n <= 64:
        raise ConfigError(f"{SEGS_PER_BUF_ENV} must be a whole number from 1 to 64, not {raw!r}")
    return n


def bound_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


class Proxy:
    """One listener, one ring, one engine, run by the calling thread."""

    def __init__(self, cfg: Config, log: Log, name: str | None = None, worker: int = 0,
                 workers: int = 1, listener: socket.socket | None = None, engines: int = 1):
        self.cfg = cfg
        self.log = log
        self.name = name          # the config file's frontend, or None
        self.worker = worker      # which of the frontend's --workers this is
        self.workers = workers
        self.engines = engines    # engines in this process: they share RLIMIT_NOFILE
        self.given_listener = listener    # serve()'s, when it owns the listeners
        self.health_from = None   # worker 0's engine: other workers follow its checks
        # Start-up lines are the frontend's, said once: by worker 0.
        self.say = log.event if worker == 0 else (lambda *a, **k: None)
        self._keep_listener = False
        self._kick_accept = False
        self.on_accept_stopped = None     # reload: called once this engine accepts no more
        self.iowq_workers = 0     # splice mode on io_uring: the io-wq cap (0: none or uncapped)
        self.metrics_at = None    # (listening socket, the Proxies to count): serve /metrics here
        self.metrics = None
        self.listener = None
        self.ring = None          # the io_uring driver, when that is the backend
        self.driver = None        # the Ring or the Epoll the engine runs on
        self.caps = None          # what the kernel offers that driver (caps.py)
        self.backend = None
        self.engine = None
        self.address = None
        self._stop = threading.Event()
        self._signals = 0         # stop requests so far: a second one ends the drain
        self._last_said = {}      # rate limit: when each kind of line was last written
        self._held = {}           # repeats not yet reported (see _repeat)
        self._log_dropped_logged = 0
        # Python's C-level signal handler writes the signal number here
        # (serve() calls signal.set_wakeup_fd); the engine polls the other
        # end, so a signal ends the engine's wait at once.
        self.wakeup_r, self.wakeup_w = socket.socketpair()
        self.wakeup_r.setblocking(False)
        self.wakeup_w.setblocking(False)

    def start(self) -> str:
        from . import _core

        cfg = self.cfg
        max_buffers = self.max_buffers()
        self.listener = self.given_listener
        if self.listener is None:
            self.listener = open_listener(cfg, reuseport=cfg.reuseport)
        try:
            self.caps, why = backend.choose(cfg.backend, cfg.mode, cfg.disabled, cfg.max_conns,
                                            _core.buf_ring_entries(cfg.buffers, max_buffers))
        except backend.BackendUnavailable as e:
            self.listener.close()
            raise StartupError(str(e)) from None
        if why:
            self.say("fallback", feature="io_uring", reason=why,
                           using="the epoll backend (same engine, non-blocking syscalls)")
        caps = self.caps
        self.backend, self.driver, self.ring = caps.backend, caps.driver, caps.ring
        feats = caps.features
        for name, f in feats.items():
            if f.why is not None:
                self.say("fallback", feature=name, reason=f.why, using=f.fallback)
        if self.ring is not None:
            self.say("ring", level=1, setup=self.ring.setup_mode,
                           features=hex(self.ring.features),
                           ring_fd_registered=self.ring.ring_fd_registered)
        refused = caps.refusal(cfg.mode)
        if refused:
            self.listener.close()
            raise StartupError(refused)
        pipe_size = self._splice_setup() if cfg.mode == "splice" else 0
        # Peek mode sends what it peeked the way auto mode does.
        zerocopy = cfg.mode in ("zerocopy", "auto", "peek") and self._zerocopy_usable()
        if cfg.mode == "auto":
            self.say("auto", choice=(
                f"copy, with zero-copy sends >= {cfg.zc_threshold} bytes until a socket's usage "
                "reports show the kernel copying" if zerocopy else "copy (no SEND_ZC)"))
        self._raise_nofile()      # the mode is settled: how many fds a flow needs is known
        self.engine = _core.Engine(self.driver, EngineConfig(
            mode=cfg.mode, max_conns=cfg.max_conns, buffers=cfg.buffers,
            buffer_size=cfg.buffer_size, max_buffers=max_buffers,
            max_inflight=cfg.max_inflight, connect_timeout=cfg.connect_timeout,
            zc_threshold=cfg.zc_threshold, replay_window=cfg.replay_window,
            pipe_size=pipe_size, segs_per_buf=_segs_per_buf(),
            idle_timeout=cfg.idle_timeout, client_fin_timeout=cfg.client_fin_timeout,
            server_fin_timeout=cfg.server_fin_timeout, keepalive=cfg.tcp_keepalive,
            balance=cfg.balance, retries=cfg.retries, health_interval=cfg.health_seconds(),
            rise=cfg.rise, fall=cfg.fall, proxy_protocol=cfg.proxy_protocol,
            accept_proxy=cfg.accept_proxy, proxy_header_timeout=cfg.proxy_header_timeout,
            multishot_accept=feats["multishot_accept"].used,
            recv_bundle=feats["recv_bundle"].used,
            incremental_buffers=feats["incremental_buffers"].used,
            send_zc=zerocopy, registered_buffers=zerocopy and caps.registered_buffers))
        if zerocopy and "registered_buffers" in cfg.disabled:
            self.say("fallback", feature="registered_buffers", reason="forced off by URING_NET_DISABLE",
                           using="SEND_ZC on plain addresses (pages pinned per send)")
        elif zerocopy and self.engine.zc_register_err:
            self.say("fallback", feature="registered_buffers",
                           reason=errno.errorcode.get(self.engine.zc_register_err, "?"),
                           using="SEND_ZC on plain addresses (pages pinned per send)")
        # By the engine's index; 255 is a flow that found no upstream up.
        self.upstream_names = [str(up) for up in cfg.upstreams]
        self.upstream_names += ["?"] * (NO_UPSTREAM - len(self.upstream_names)) + ["-"]
        # Close lines are rendered by the engine, in C, a batch at a time.
        self.engine.set_close_format(self.log.fmt, self.upstream_names,
                                     [errno.errorcode.get(i, str(i)) for i in range(256)],
                                     self.name)
        for up in cfg.upstreams:
            self.engine.add_upstream(up.family, up.host, up.port, up.weight)
        if self.health_from is not None:
            # One set of checks per frontend: the other workers read worker 0's
            # verdicts, so a change is logged once and checked once.
            self.engine.follow_health(self.health_from)
        self.engine.add_listener(self.listener.fileno(), self.listener.family)
        self.engine.watch_wakeup(self.wakeup_r.fileno())
        self.address = bound_address(self.listener)
        pool = {}
        if len(cfg.upstreams) > 1:
            pool = {"balance": cfg.balance, "health_interval": cfg.health_seconds() or "off"}
        if any(up.weight != 1 for up in cfg.upstreams):
            pool["weights"] = ",".join(str(up.weight) for up in cfg.upstreams)
        if cfg.proxy_protocol:
            pool["proxy_protocol"] = f"v{cfg.proxy_protocol}"
        if cfg.accept_proxy:
            pool["accept_proxy"] = "v1,v2"
        if self.name is not None:
            pool["frontend"] = self.name
        if self.workers > 1:
            pool["workers"] = self.workers
        if self.metrics_at is not None:
            from .metrics import MetricsServer
            sock, proxies = self.metrics_at     # the supervisor's listening socket
            self.metrics = MetricsServer(sock, self.engine, proxies, self.log)
            self.say("metrics", listen=self.metrics.address, path="/metrics")
        self.say("listening", listen=self.address, upstream=",".join(map(str, cfg.upstreams)),
                       backend=self.backend, mode=cfg.mode, **pool)
        return self.address

    def _raise_nofile(self):
        """Each flow holds two sockets (and in splice mode a pipe per direction while
        bytes move): raise the soft RLIMIT_NOFILE to what --max-conns needs with
        every flow moving, up to the hard limit, and say so in one line; if the hard
        limit is short, say how many flows fit (idle splice flows need only two)."""
        cfg = self.cfg
        per_flow = 6 if cfg.mode == "splice" else 2
        need = cfg.max_conns * per_flow * self.engines + NOFILE_SPARE
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft >= need:
            return
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (OSError, ValueError) as e:
                self.say("rlimit", nofile=soft, wanted=need, error=type(e).__name__,
                               note="could not be raised")
                target = soft
        if target >= need:
            self.say("rlimit", nofile=target, was=soft, wanted=need)
        else:
            fit = max(0, (target - NOFILE_SPARE) // per_flow)
            self.say("rlimit", nofile=target, was=soft, wanted=need, hard=hard,
                           note=f"the hard limit fits {fit} of --max-conns {cfg.max_conns} "
                                "flows; past that, accepts pause until fds come back")

    def max_buffers(self) -> int:
        """The pool's cap: --max-buffers, or enough for every direction's first buffer
        (2 x --max-conns) on top of the read-ahead budget (--buffers). Said once when
        the kernel's ring limit makes the default smaller than that."""
        cfg = self.cfg
        if cfg.max_buffers is not None:
            return cfg.max_buffers
        want = cfg.buffers + 2 * cfg.max_conns
        if want > MAX_POOL_BUFFERS:
            self.say("pool_cap", max_buffers=MAX_POOL_BUFFERS, wanted=want,
                           note=f"a ring holds at most {MAX_POOL_BUFFERS} buffers: beyond "
                                f"{(MAX_POOL_BUFFERS - cfg.buffers) // 2} connections holding "
                                "data in both directions, a connection may wait its turn for a buffer")
        return min(want, MAX_POOL_BUFFERS)

    def _splice_setup(self) -> int:
        """Size splice mode's pipes and cap io-wq: the pipe size."""
        cfg = self.cfg
        try:
            size = probe_pipe_size(cfg.pipe_size, cfg.max_inflight)
        except ConfigError:
            self.listener.close()
            raise
        if self.ring is None:
            # splice(2) in this thread, non-blocking: no worker threads at all.
            self.say("splice", pipe_size=size, iowq_workers="none (epoll backend)")
            return size
        # Every splice runs in an io-wq worker. Non-blocking fds keep each one
        # short, and the cap keeps a burst of flows from making a thread each.
        workers = cfg.iowq_workers or os.cpu_count() or 1
        ret = -errno.EPERM if "iowq_cap" in cfg.disabled else self.ring.set_iowq_max_workers(workers)
        if ret < 0:
            why = "forced off by URING_NET_DISABLE" if "iowq_cap" in cfg.disabled \
                else errno.errorcode.get(-ret, str(-ret))
            self.say("fallback", feature="iowq_cap", reason=why,
                           using="io-wq's own limit (RLIMIT_NPROC); splices are non-blocking, "
                                 "so workers do not pile up on idle flows")
            workers = 0
        self.say("splice", pipe_size=size, iowq_workers=workers or "uncapped")
        self.iowq_workers = workers
        return size

    def _zerocopy_usable(self) -> bool:
        """Whether zero-copy sends are used; False (with one log line) means
        copy-mode sends."""
        zc = self.caps.zerocopy
        if not zc.works:
            epoll_refused = self.ring is None and zc.why != FORCED
            self.say("fallback", feature="msg_zerocopy" if epoll_refused else "send_zc",
                           reason=zc.why, using="copy-mode sends")
            return False
        if self.ring is None:
            self.say("zerocopy", usage_report="yes (MSG_ZEROCOPY completions)",
                           loopback_copies="yes (always, on loopback and veth)")
        else:
            # Said once, plainly: on loopback (and veth) the kernel copies every
            # "zero-copy" send, so this mode cannot win a loopback benchmark.
            self.say("zerocopy", usage_report="yes" if zc.usage_reported else "no (kernel < 6.2)",
                           loopback_copies="unknown" if zc.copied is None
                           else ("yes" if zc.copied else "no"))
        return True

    def kick_accept(self):
        """From another thread: re-arm this engine's accept (Engine.rearm_accept)."""
        self._kick_accept = True
        try:
            self.wakeup_w.send(b"\0")
        except OSError:
            pass

    def request_stop(self, *_, reload: bool = False):
        """Stop: drain, then end every flow. With `reload`, a newer generation
        accepts on this engine's listening socket already: it is left open."""
        self._keep_listener = self._keep_listener or reload
        self._signals += 1
        if self._signals == 1:  # systemd: the stop has begun; the drain may take a while
            service.notify("STOPPING=1", "STATUS=stopping: draining open connections")
        self._stop.set()
        try:                    # wake the engine, when called from another thread
            self.wakeup_w.send(b"\0")
        except OSError:         # full (a wakeup is pending anyway) or closed
            pass

    def run(self, report: bool = True) -> dict:
        """Serve until request_stop(); then end every flow and return the stats
        (and, with `report`, say them in the stopped line)."""
        eng = self.engine
        next_stats = time.monotonic() + STATS_EVERY
        while not self._stop.is_set():
            eng.run(BATCH_TIMEOUT)
            self._drain_wakeup()
            self._drain()
            if self.metrics is not None:
                self.metrics.service()
            if self._kick_accept:
                self._kick_accept = False
                eng.rearm_accept()
            if _crash_pending is not None:
                _crash_hook(self)
            if self.cfg.verbose >= 2 and time.monotonic() >= next_stats:
                next_stats = time.monotonic() + STATS_EVERY
                self.log.event("stats", level=2, **eng.stats())
        self._drain_flows()
        eng.stop()
        deadline = time.monotonic() + STOP_GRACE
        while (eng.active or eng.accepting) and time.monotonic() < deadline:
            eng.run(0.05)
            self._drain_wakeup()    # a second Ctrl-C must not make every wait end at once
            self._drain()
        self._drain()
        if self.on_accept_stopped is not None:     # (a drain of 0 s: stopped only now)
            self.on_accept_stopped(self)
            self.on_accept_stopped = None
        self._say_held(force=True)      # the last word, past the rate limit
        eng.verify_ring()
        stats = eng.stats()
        self.log.event("stats", level=2, **stats)
        if report:
            log_stopped(self.log, self.cfg, stats, self.name)
        return stats

    def _drain_flows(self):
        """Stop accepting at once (the listener is closed, so new clients are
        refused by the kernel rather than left in a backlog nobody reads), then let
        open flows finish for up to --drain-timeout, or until a second signal."""
        eng = self.engine
        eng.drain()
        deadline = time.monotonic() + self.cfg.drain_timeout
        if self.cfg.drain_timeout <= 0:
            return
        # The accept's cancel completes within a turn or two of the loop.
        while not eng.close_listener() and time.monotonic() < deadline:
            eng.run(0.01)
            self._drain_wakeup()
            self._drain()
        if self.on_accept_stopped is not None and eng.listening is False:
            self.on_accept_stopped(self)
            self.on_accept_stopped = None
        if self.listener is not None and eng.listening is False and not self._keep_listener:
            self.listener.close()
            self.listener = None
        if eng.active:
            self.log.event("draining", connections=eng.active, timeout=self.cfg.drain_timeout)
        while True:
            left = deadline - time.monotonic()
            if not eng.active or left <= 0 or self._signals >= 2:
                return
            eng.run(min(left, BATCH_TIMEOUT))
            self._drain_wakeup()
            self._drain()

    def _rate_ok(self, kind: str, every: float = 10.0) -> bool:
        """At most one line of a kind per `every` seconds: a flood of one error
        (a client hammering, an fd shortage) must not become a flood of lines."""
        now = time.monotonic()
        if now - self._last_said.get(kind, -every) < every:
            return False
        self._last_said[kind] = now
        return True

    def _drain_wakeup(self):
        # Empty before the engine polls again (its poll is single-shot, and
        # an fd left readable would end every wait at once).
        try:
            while self.wakeup_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _drain(self):
        """Log what the engine pushed since the last drain (one batch of records)."""
        ups = self.upstream_names
        for ev in self.engine.drain_events():
            kind = ev.pop("event")
            if kind == "close_lines":
                # Rendered by the engine (set_close_format at start): one block.
                self.log.block(ev["text"], ev["lines"])
                continue
            if kind == "accept_paused":
                code = errno.errorcode.get(ev["errno"], str(ev["errno"]))
                self._repeat(f"accept:{code}", ev["times"], "accept_paused", reason=code,
                             action=f"accepting again in {ev['pause_ms']} ms")
            elif kind == "engine_error":
                # Never expected, never silent: a recv completion naming a buffer that
                # is not the ring's head entry (its flow is reset, its bytes dropped),
                # or a completion whose user_data names no operation of ours (dropped).
                self._repeat(ev["kind"], ev["times"], "engine_error", kind=ev["kind"],
                             action="flow_reset" if ev["kind"] == "ring_order_errors" else "dropped")
            elif kind == "health":
                # One line per change of state; the checks themselves are counted.
                fields = {"reason": errno.errorcode.get(ev["errno"], str(ev["errno"]))} \
                    if ev["errno"] else {}
                self.log.event("health", upstream=ups[ev["upstream_index"]],
                               state="up" if ev["up"] else "down", checks=ev["checks"], **fields)
            elif kind == "fallback" and ev["feature"] == "registered_buffers":
                # Buffers are registered on first zero-copy use; one was refused.
                self.log.event("fallback", feature="registered_buffers",
                               reason=errno.errorcode.get(ev["errno"], "?"),
                               using="SEND_ZC on plain addresses (pages pinned per send)")
            elif kind == "fallback":
                reason = errno.errorcode.get(ev["errno"], str(ev["errno"]))
                self.log.event("fallback", feature=ev["feature"], reason=f"{reason} at run time",
                               using="copy-mode sends")
        self._say_held()
        dropped = self.engine.events_dropped
        if dropped != self._log_dropped_logged:
            # More records in one batch than the engine's array holds (close
            # records, almost always: repeats of the other events fold into one
            # record): the flows' totals are in the statistics, their lines are not.
            self.log.event("log_dropped", close_lines=dropped - self._log_dropped_logged)
            self._log_dropped_logged = dropped

    def _say_held(self, force: bool = False):
        """Report the repeats held back by the rate limit, where it now allows (or,
        with `force`, at stop, all of them)."""
        for key, (held, event, fields) in list(self._held.items()):
            if force or self._rate_ok(key):
                del self._held[key]
                self.log.event(event, **fields, times=held)

    def _repeat(self, key: str, times: int, event: str, **fields):
        """One line for an event that may repeat, at most one per key every 10 s:
        occurrences in between are held and reported as `times` with the next."""
        held = self._held.pop(key, (0,))[0] + times
        if self._rate_ok(key):
            self.log.event(event, **fields, times=held)
        else:
            self._held[key] = (held, event, fields)

    def close(self):
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        # The engine owns the driver; dropping it exits the ring (or closes
        # the epoll fd) after every request, then frees the buffer pool.
        self.engine = None
        if self.driver is not None:
            self.driver.close()
            self.driver = self.ring = None
        if self.listener is not None and self.given_listener is None:
            self.listener.close()
        self.listener = None
        self.wakeup_r.close()
        self.wakeup_w.close()


def sum_stats(many: list) -> dict:
    """Several workers' statistics as one engine's: every count added."""
    out = dict(many[0])
    for st in many[1:]:
        for k, v in st.items():
            if isinstance(v, int) and not isinstance(v, bool):
                out[k] += v
    return out


def log_stopped(log: Log, cfg: Config, stats: dict, name: str | None = None):
    """The stopped line: a frontend's totals (its workers' summed), named when
    it is one of a config file's."""
    # The pool's size at the end: it grows past --buffers only while flows
    # hold buffers (splice mode reads into pipes, not the pool).
    pool = {} if cfg.mode == "splice" else {"pool_buffers": stats["pool_buffers"]}
    extra = {k: stats[k] for k in ("zc_sends", "zc_notifs", "zc_copied", "zc_backoffs")} \
        if cfg.mode in ("zerocopy", "auto", "peek") else {}
    if extra:
        # Flows whose sockets were closed while notifications were owed
        # (a peer that never read), and how long their slots then waited.
        extra["zc_close_waits"] = stats["zc_close_waits"]
        extra["zc_close_wait_ms"] = round(stats["zc_close_wait_ns"] / 1e6)
        # Buffers registered for SEND_ZC_FIXED, each on its first zero-copy send.
        extra["zc_registered_bufs"] = stats["zc_registered_bufs"]
    if cfg.mode != "splice":
        extra["segment_grows"] = stats["seg_grows"]
    if cfg.mode == "peek":
        extra.update({k: stats[k] for k in ("consumed_bytes", "replayed_bytes", "peek_eagain")})
    if cfg.mode == "splice":
        extra.update({k: stats[k] for k in ("splice_eagain", "pipes_created", "pipe_errors")})
    if len(cfg.upstreams) > 1:
        extra["failovers"] = stats["failovers"]
        extra["no_upstream"] = stats["no_upstream"]
    if cfg.proxy_protocol:
        extra["proxy_headers"] = stats["proxy_headers"]
    if cfg.accept_proxy:
        extra["headers_accepted"] = stats["headers_accepted"]
        extra["bad_headers"] = stats["bad_headers"]
    # buffers_out: receive buffers not back in the ring; segments_out:
    # received byte runs not freed. With every flow gone both must be 0;
    # anything else is memory lost to its owner.
    log.event("stopped", connections=stats["closed"], bytes_c2u=stats["c2u_bytes"],
              bytes_u2c=stats["u2c_bytes"], active=stats["active"],
              buffers_out=stats["bufs_held"], segments_out=stats["segments_out"],
              ring_order_errors=stats["ring_order_errors"],
              cancel_fallbacks=stats["cancel_fallbacks"],
              **pool, **extra, **({"frontend": name} if name is not None else {}))


def set_crash_knob():
    """Read CRASH_WORKER_ENV (once per serve)."""
    global _crash_pending
    raw = os.environ.get(CRASH_WORKER_ENV)
    _crash_pending = int(raw) if raw and raw.isdigit() else None


def _crash_hook(p: "Proxy"):
    """Test knob (CRASH_WORKER_ENV): the named worker's loop fails once, after it
    has accepted a connection, as a worker that dies would."""
    global _crash_pending
    if _crash_pending == p.worker and p.engine.stats()["accepted"]:
        _crash_pending = None
        raise OSError(errno.EIO, "worker failed (test knob)")


def serve(frontends: list, log: Log, metrics=None, workers: int = 1,
          cpu_affinity: bool = False, config_path: str | None = None) -> int:
    """Run every (name, Config) of `frontends` with `workers` engines each until
    SIGINT or SIGTERM, reloading `config_path` on SIGHUP (supervisor.py)."""
    from .supervisor import Supervisor
    set_crash_knob()
    sock = None
    if metrics is not None:
        from .metrics import open_metrics_listener
        sock = open_metrics_listener(metrics)
    try:
        return Supervisor(log, sock, workers, cpu_affinity, config_path,
                          metrics_endpoint=metrics).serve(frontends)
    finally:
        if sock is not None:
            sock.close()
