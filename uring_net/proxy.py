"""Running uring-proxy: listener, ring, engine, and the loop between batches.

Python's part is start-up, signals, logging and statistics. The engine runs
nogil in C until a flow closes (a log line is due), a signal arrives or the
batch timeout passes; then this loop drains the engine's event log.
"""
from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import threading
import time

from .config import Config, ConfigError
from .log import Log

BATCH_TIMEOUT = 0.5      # seconds the engine may run without returning
STOP_GRACE = 5.0         # seconds to let flows finish closing on shutdown
STATS_EVERY = 10.0


class StartupError(Exception):
    """The proxy could not start for a reason outside the configuration."""


def probe_ring_features(ring, disabled=frozenset()):
    """What the engine can use on this kernel, and the fallback when not.

    Returns {feature: (present, used, fallback_text)}. A feature named in
    `disabled` is reported present but not used (forced fallback)."""
    ms_accept = ring.probe_multishot_accept()
    ms_recv = ring.probe_multishot_recv()
    bundle = dict(ring.feature_names())["recvsend_bundle"]
    return {
        "multishot_accept": (ms_accept, ms_accept and "multishot_accept" not in disabled,
                             "single-shot accept, re-armed per connection"),
        "multishot_recv": (ms_recv, ms_recv and "multishot_recv" not in disabled,
                           "single-shot recv with buffer select, re-armed per completion"),
        "recv_bundle": (bundle, bundle and "recv_bundle" not in disabled,
                        "one buffer per recv completion"),
    }


def open_listener(cfg: Config) -> socket.socket:
    s = socket.socket(cfg.listen.family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if cfg.listen.family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((cfg.listen.host, cfg.listen.port))
        s.listen(cfg.backlog)
    except OSError as e:
        s.close()
        raise ConfigError(f"cannot listen on {cfg.listen}: {e.strerror}") from None
    return s


def bound_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


class Proxy:
    """One listener, one ring, one engine, run by the calling thread."""

    def __init__(self, cfg: Config, log: Log):
        self.cfg = cfg
        self.log = log
        self.listener = None
        self.ring = None
        self.engine = None
        self.address = None
        self._stop = threading.Event()
        self._accept_pauses_logged = 0
        self._log_dropped_logged = 0
        self._zc_off_logged = False

    def start(self) -> str:
        from . import _core

        cfg = self.cfg
        self.listener = open_listener(cfg)
        try:
            self.ring = _core.Ring(entries=1024)
        except _core.RingUnavailable as e:
            self.listener.close()
            raise StartupError(f"io_uring is unavailable: {e.strerror}") from None
        feats = probe_ring_features(self.ring, cfg.disabled)
        for name, (present, used, fallback) in feats.items():
            if not used:
                why = "forced off by URING_NET_DISABLE" if present else "not supported by this kernel"
                self.log.event("fallback", feature=name, reason=why, using=fallback)
        self.log.event("ring", level=1, setup=self.ring.setup_mode,
                       features=hex(self.ring.features),
                       ring_fd_registered=self.ring.ring_fd_registered)
        zerocopy = cfg.mode in ("zerocopy", "auto") and self._zerocopy_usable()
        if cfg.mode == "auto":
            self.log.event("auto", choice=(
                f"copy, with zero-copy sends >= {cfg.zc_threshold} bytes until a socket's usage "
                "reports show the kernel copying" if zerocopy else "copy (no SEND_ZC)"))
        self.engine = _core.Engine(
            self.ring, max_conns=cfg.max_conns, buffers=cfg.buffers,
            buffer_size=cfg.buffer_size, max_inflight=cfg.max_inflight,
            connect_timeout=cfg.connect_timeout,
            multishot_accept=feats["multishot_accept"][1],
            multishot_recv=feats["multishot_recv"][1],
            zerocopy=zerocopy, zc_threshold=cfg.zc_threshold,
            zc_registered="registered_buffers" not in cfg.disabled,
            zc_backoff=cfg.mode == "auto",
            recv_bundle=feats["recv_bundle"][1])
        if zerocopy and "registered_buffers" in cfg.disabled:
            self.log.event("fallback", feature="registered_buffers", reason="forced off by URING_NET_DISABLE",
                           using="SEND_ZC on plain addresses (pages pinned per send)")
        elif zerocopy and self.engine.zc_register_err:
            self.log.event("fallback", feature="registered_buffers",
                           reason=errno.errorcode.get(self.engine.zc_register_err, "?"),
                           using="SEND_ZC on plain addresses (pages pinned per send)")
        self.engine.set_upstream(cfg.upstream.family, cfg.upstream.host, cfg.upstream.port)
        self.engine.add_listener(self.listener.fileno(), self.listener.family)
        self.address = bound_address(self.listener)
        self.log.event("listening", listen=self.address, upstream=str(cfg.upstream),
                       backend=cfg.backend, mode=cfg.mode)
        return self.address

    def _zerocopy_usable(self) -> bool:
        """Probe SEND_ZC; False (with one log line) means copy-mode sends."""
        fallback = "copy-mode sends"
        if "send_zc" in self.cfg.disabled:
            self.log.event("fallback", feature="send_zc", reason="forced off by URING_NET_DISABLE",
                           using=fallback)
            return False
        works, usage, copied = self.ring.probe_send_zc()
        if not works:
            self.log.event("fallback", feature="send_zc", reason="not supported by this kernel",
                           using=fallback)
            return False
        # Said once, plainly: on loopback (and veth) the kernel copies every
        # "zero-copy" send, so this mode cannot win a loopback benchmark.
        self.log.event("zerocopy", usage_report="yes" if usage else "no (kernel < 6.2)",
                       loopback_copies="yes" if copied else ("no" if usage else "unknown"))
        return True

    def request_stop(self, *_):
        self._stop.set()

    def run(self) -> dict:
        """Serve until request_stop(); then end every flow and return the stats."""
        eng = self.engine
        next_stats = time.monotonic() + STATS_EVERY
        while not self._stop.is_set():
            eng.run(BATCH_TIMEOUT)
            self._drain()
            if self.cfg.verbose >= 2 and time.monotonic() >= next_stats:
                next_stats = time.monotonic() + STATS_EVERY
                self.log.event("stats", level=2, **eng.stats())
        eng.stop()
        deadline = time.monotonic() + STOP_GRACE
        while (eng.active or eng.accepting) and time.monotonic() < deadline:
            eng.run(0.05)
            self._drain()
        self._drain()
        stats = eng.stats()
        zc = {k: stats[k] for k in ("zc_sends", "zc_notifs", "zc_copied", "zc_backoffs")} \
            if self.cfg.mode in ("zerocopy", "auto") else {}
        # buffers_out: receive buffers not back in the ring. With every flow
        # gone it must be 0; anything else is a buffer lost to its owner.
        self.log.event("stopped", connections=stats["closed"], bytes_c2u=stats["c2u_bytes"],
                       bytes_u2c=stats["u2c_bytes"], active=stats["active"],
                       buffers_out=stats["bufs_held"], ring_order_errors=stats["ring_order_errors"],
                       **zc)
        return stats

    def _drain(self):
        up = str(self.cfg.upstream)
        for rec in self.engine.drain_closed():
            err = rec.pop("errno")
            if err:
                rec["error"] = errno.errorcode.get(err, str(err))
            self.log.event("close", upstream=up, **rec)
        st = self.engine.stats()
        if st["accept_pauses"] != self._accept_pauses_logged:
            n = st["accept_pauses"] - self._accept_pauses_logged
            self._accept_pauses_logged = st["accept_pauses"]
            code = errno.errorcode.get(st["accept_last_err"], str(st["accept_last_err"]))
            self.log.event("accept_paused", reason=code, times=n,
                           action="accepting again in 100 ms")
        if st["zc_eopnotsupp"] and not self._zc_off_logged:
            self._zc_off_logged = True
            self.log.event("fallback", feature="send_zc", reason="EOPNOTSUPP at run time",
                           using="copy-mode sends")
        if st["log_dropped"] != self._log_dropped_logged:
            # More flows closed in one batch than the engine's record buffer
            # holds: their totals are in the statistics, their lines are not.
            self.log.event("log_dropped", close_lines=st["log_dropped"] - self._log_dropped_logged)
            self._log_dropped_logged = st["log_dropped"]

    def close(self):
        # The engine owns the ring; dropping it exits the ring after every
        # request, then frees the buffer pool.
        self.engine = None
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None


def serve(cfg: Config, log: Log) -> int:
    proxy = Proxy(cfg, log)
    # Handlers go in before the listening line: a script that reads the
    # port and signals at once must still get a clean exit 0.
    old = {sig: signal.signal(sig, proxy.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        proxy.start()
        proxy.run()
    except StartupError as e:
        print(f"uring-proxy: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        # io_uring_enter failed in a way the engine cannot ride out.
        print(f"uring-proxy: error: the io_uring loop failed: {e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        proxy.close()
    return 0
