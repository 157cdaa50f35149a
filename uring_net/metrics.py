"""--metrics HOST:PORT: Prometheus text format at /metrics.

Served by the loop that serves the flows: the listener and each scrape's
socket are one-shot polls on the first frontend's ring (Engine.watch_fd),
whose completions make the engine return; this code then accepts, reads
or writes without blocking, once per ready fd. No thread, nothing per
connection but the poll. A scraper that does not finish its request
within SCRAPE_TIMEOUT is dropped, and at most MAX_SCRAPES are served at
once, so a slow or hostile client cannot hold the proxy or its memory.

Counters come from every frontend's engine, labelled frontend="NAME"
(the config file's names; "default" on the command line).
"""
from __future__ import annotations

import errno
import os
import select
import socket
import time

MAX_SCRAPES = 16
SCRAPE_TIMEOUT = 5.0
MAX_REQUEST = 8192

# (metric, type, help, stats key)
COUNTERS = [
    ("uring_proxy_connections_accepted_total", "counter", "Connections accepted.", "accepted"),
    ("uring_proxy_connections_closed_total", "counter", "Connections ended (any cause).", "closed"),
    ("uring_proxy_connections_active", "gauge", "Connections open now.", "active"),
    ("uring_proxy_failovers_total", "counter",
     "Connections moved to another upstream after a failed connect.", "failovers"),
    ("uring_proxy_zerocopy_sends_total", "counter",
     "Zero-copy sends whose first completion promised a notification.", "zc_sends"),
    ("uring_proxy_zerocopy_copied_total", "counter",
     "Zero-copy notifications saying the kernel copied anyway.", "zc_copied"),
    ("uring_proxy_splice_bytes_total", "counter",
     "Splice mode: bytes moved pipe to socket, both directions, as they move.", "splice_bytes"),
    ("uring_proxy_splice_pipes_pooled", "gauge",
     "Splice mode: idle pipes kept for the next flow.", "pipes_pooled"),
    ("uring_proxy_splice_pipes_created_total", "counter",
     "Splice mode: pipes made (a flow found the pool empty).", "pipes_created"),
    ("uring_proxy_replayed_bytes_total", "counter",
     "Peek mode: client bytes sent again to the next upstream.", "replayed_bytes"),
    ("uring_proxy_proxy_headers_total", "counter", "PROXY protocol headers sent.", "proxy_headers"),
    ("uring_proxy_proxy_headers_accepted_total", "counter",
     "PROXY protocol headers read from clients (--accept-proxy).", "headers_accepted"),
    ("uring_proxy_proxy_headers_refused_total", "counter",
     "Client PROXY headers refused: malformed, oversized or truncated.", "bad_headers"),
    ("uring_proxy_engine_batches_total", "counter", "Batches of completions handled.", "batches"),
    ("uring_proxy_engine_cqes_total", "counter", "Completions handled.", "cqes"),
    ("uring_proxy_engine_submits_total", "counter", "Waits that submitted operations.", "submits"),
    ("uring_proxy_engine_sqes_total", "counter", "Operations submitted.", "sqes"),
    ("uring_proxy_engine_cq_overflows_total", "counter",
     "Loop turns that found completions in the kernel's overflow list.", "cq_overflows"),
    ("uring_proxy_buffer_pool_buffers", "gauge", "Receive buffers the pool has.", "pool_buffers"),
    ("uring_proxy_buffers_held", "gauge", "Receive buffers flows hold now.", "bufs_held"),
]
UPSTREAM = [
    ("uring_proxy_upstream_up", "gauge", "1 if the upstream gets new connections.", "up"),
    ("uring_proxy_upstream_weight", "gauge", "The upstream's weight.", "weight"),
    ("uring_proxy_upstream_active", "gauge", "Connections on the upstream now.", "active"),
    ("uring_proxy_upstream_connections_total", "counter",
     "Connections sent to the upstream.", "flows"),
    ("uring_proxy_upstream_connect_failures_total", "counter",
     "Connects to the upstream that failed or timed out.", "connect_fails"),
    ("uring_proxy_upstream_health_checks_total", "counter", "Health checks completed.", "checks"),
    ("uring_proxy_upstream_health_transitions_total", "counter",
     "Changes between up and down.", "transitions"),
]


def iowq_threads() -> int:
    """The process's io-wq workers, counted where the kernel lists its threads."""
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                n += f.read().startswith("iou-wrk")
        except OSError:
            pass                # the thread ended meanwhile
    return n


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _frontends(proxies):
    """Per frontend (in order): its name, its workers' Proxies, their summed stats,
    their upstreams' counters summed (state and weight from worker 0, which runs the
    checks), and closes by cause summed."""
    from .proxy import sum_stats
    groups: dict = {}
    for p in proxies:
        if p.engine is not None:
            groups.setdefault(p.name or "default", []).append(p)
    out = []
    for name, ps in groups.items():
        stats = [p.engine.stats() for p in ps]
        ups = [dict(u) for u in ps[0].engine.upstream_stats()]
        for p in ps[1:]:
            for u, o in zip(ups, p.engine.upstream_stats()):
                for k in ("active", "flows", "connect_fails", "checks", "transitions"):
                    u[k] += o[k]
        causes = dict(ps[0].engine.closes_by_cause())
        for p in ps[1:]:
            for k, v in p.engine.closes_by_cause().items():
                causes[k] += v
        out.append((name, ps, sum_stats(stats), ups, causes, stats))
    return out


def render(proxies) -> str:
    """The exposition text for every frontend of `proxies` (each started)."""
    groups = _frontends(proxies)        # each engine's counters read once per scrape
    per = [(fe, ps[0], st, ups, causes) for fe, ps, st, ups, causes, _ in groups]
    workers = [(fe, ps, each) for fe, ps, _, _, _, each in groups]
    out = []

    def family(name, kind, help_):
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")

    for name, kind, help_, key in COUNTERS:
        family(name, kind, help_)
        for fe, _, st, _, _ in per:
            out.append(f'{name}{{frontend="{_esc(fe)}"}} {st[key]}')
    family("uring_proxy_worker_connections_accepted_total", "counter",
           "Connections accepted, by worker (--workers): how the kernel spreads them.")
    for fe, ps, each in workers:
        for p, st in zip(ps, each):
            out.append(f'uring_proxy_worker_connections_accepted_total{{frontend="{_esc(fe)}",'
                       f'worker="{p.worker}"}} {st["accepted"]}')
    family("uring_proxy_connections_refused_total", "counter",
           "Connections closed at once: no upstream up, or accepted while the table was full.")
    for fe, _, st, _, _ in per:
        out.append(f'uring_proxy_connections_refused_total{{frontend="{_esc(fe)}"}} '
                   f'{st["no_upstream"] + st["rejected_full"]}')
    family("uring_proxy_bytes_total", "counter",
           "Bytes delivered, by direction, of connections that have ended.")
    for fe, _, st, _, _ in per:
        for d in ("c2u", "u2c"):
            out.append(f'uring_proxy_bytes_total{{frontend="{_esc(fe)}",direction="{d}"}} '
                       f'{st[d + "_bytes"]}')
    family("uring_proxy_closes_total", "counter", "Connections ended, by cause.")
    for fe, _, _, _, causes in per:
        for cause, n in causes.items():
            out.append(f'uring_proxy_closes_total{{frontend="{_esc(fe)}",cause="{cause}"}} {n}')
    family("uring_proxy_zerocopy_notifications_owed", "gauge",
           "Zero-copy notifications the kernel still owes.")
    for fe, _, st, _, _ in per:
        out.append(f'uring_proxy_zerocopy_notifications_owed{{frontend="{_esc(fe)}"}} '
                   f'{st["zc_sends"] - st["zc_notifs"]}')
    family("uring_proxy_iowq_workers", "gauge",
           "Splice mode on io_uring: the cap on io-wq worker threads (0: none or uncapped).")
    for fe, p, _, _, _ in per:
        out.append(f'uring_proxy_iowq_workers{{frontend="{_esc(fe)}"}} {p.iowq_workers}')
    family("uring_proxy_iowq_threads", "gauge",
           "io-wq worker threads the process has now (all rings; the kernel names them iou-wrk).")
    out.append(f"uring_proxy_iowq_threads {iowq_threads()}")
    for name, kind, help_, key in UPSTREAM:
        family(name, kind, help_)
        for fe, p, _, ups, _ in per:
            for up, u in zip(p.cfg.upstreams, ups):
                out.append(f'{name}{{frontend="{_esc(fe)}",upstream="{up}"}} {int(u[key])}')
    return "\n".join(out) + "\n"


def open_metrics_listener(endpoint) -> socket.socket:
    """The /metrics listening socket; ConfigError if it cannot be had."""
    from .config import ConfigError
    sock = socket.socket(endpoint.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((endpoint.host, endpoint.port))
        sock.listen(64)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {endpoint} for --metrics: {e.strerror}") from None
    sock.setblocking(False)
    return sock


class _Scrape:
    __slots__ = ("sock", "gen", "buf", "out", "deadline")

    def __init__(self, sock, gen, deadline):
        self.sock, self.gen, self.buf, self.out, self.deadline = sock, gen, b"", b"", deadline


class MetricsServer:
    """The /metrics endpoint, on `engine`'s ring, for the frontends in `proxies`."""

    def __init__(self, sock, engine, proxies, log):
        self.engine = engine
        self.proxies = proxies
        self.log = log
        self.sock = sock            # the supervisor's: kept across reloads, closed by it
        host, port = sock.getsockname()[:2]
        self.address = f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"
        self._gen = 0
        self._scrapes: dict[int, _Scrape] = {}
        self.served = 0
        self.engine.watch_fd(self.sock.fileno(), 0, select.POLLIN)

    def _next_gen(self) -> int:
        self._gen = self._gen % 16383 + 1       # 14 bits, never the listener's 0
        return self._gen

    def service(self):
        """Handle the polls that completed; drop scrapes past their deadline."""
        now = time.monotonic()
        for fd, gen, res in self.engine.ready_fds():
            if fd == self.sock.fileno() and gen == 0:
                self._accept(now)
                continue
            sc = self._scrapes.get(fd)
            if sc is None or sc.gen != gen or res == -errno.ECANCELED:
                continue            # a poll of a scrape already closed
            self._step(sc)
        for sc in [s for s in self._scrapes.values() if s.deadline < now]:
            self._close(sc)

    def _accept(self, now):
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break           # ECONNABORTED, EMFILE...: the next poll retries
            if len(self._scrapes) >= MAX_SCRAPES:
                conn.close()
                continue
            conn.setblocking(False)
            sc = _Scrape(conn, self._next_gen(), now + SCRAPE_TIMEOUT)
            self._scrapes[conn.fileno()] = sc
            self.engine.watch_fd(conn.fileno(), sc.gen, select.POLLIN)
        self.engine.watch_fd(self.sock.fileno(), 0, select.POLLIN)

    def _step(self, sc: _Scrape):
        try:
            if not sc.out:
                chunk = sc.sock.recv(4096)
                if not chunk:
                    return self._close(sc)
                sc.buf += chunk
                if b"\r\n\r\n" not in sc.buf and len(sc.buf) < MAX_REQUEST:
                    return self.engine.watch_fd(sc.sock.fileno(), sc.gen, select.POLLIN)
                sc.out = self._response(sc.buf)
            n = sc.sock.send(sc.out)
            sc.out = sc.out[n:]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            return self._close(sc)
        if sc.out:
            return self.engine.watch_fd(sc.sock.fileno(), sc.gen, select.POLLOUT)
        self.served += 1
        self._close(sc)

    def _response(self, request: bytes) -> bytes:
        line = request.split(b"\r\n", 1)[0].split()
        if len(line) >= 2 and line[0] == b"GET" and line[1].split(b"?")[0] == b"/metrics":
            proxies = self.proxies() if callable(self.proxies) else self.proxies
            body, status = render(proxies).encode(), b"200 OK"
            ctype = b"text/plain; version=0.0.4; charset=utf-8"
        else:
            body, status, ctype = b"only GET /metrics here\n", b"404 Not Found", b"text/plain"
        return (b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)

    def _close(self, sc: _Scrape):
        # Cancel the scrape's poll if one is armed (a cancel that finds none
        # costs nothing), and have the driver forget the fd before it closes.
        del self._scrapes[sc.sock.fileno()]
        self.engine.unwatch_fd(sc.sock.fileno(), sc.gen)
        sc.sock.close()

    def close(self):
        for sc in list(self._scrapes.values()):
            self._close(sc)
        if self.engine is not None:
            self.engine.unwatch_fd(self.sock.fileno(), 0)
