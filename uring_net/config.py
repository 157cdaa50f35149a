"""Command-line configuration: parsing and validation, no side effects.

Every mistake a user can make here becomes a ConfigError with one clear
sentence; the CLI prints it as one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from dataclasses import dataclass

MODES = ("auto", "copy", "zerocopy", "splice", "peek")
BACKENDS = ("auto", "uring", "epoll")
LOG_FORMATS = ("text", "json")
BALANCES = ("roundrobin", "leastconn", "source", "first")
DEFAULT_HEALTH_INTERVAL = 2.0

# Features a user (or a test) may declare missing, to force the named fallback.
DISABLE_ENV = "URING_NET_DISABLE"
DISABLEABLE = ("multishot_accept", "recv_bundle", "incremental_buffers", "send_zc",
               "registered_buffers", "splice", "iowq_cap", "peek_off")
MAX_UPSTREAMS = 64           # the engine's per-flow tried set is one 64-bit mask
MAX_POOL_BUFFERS = 32768       # the kernel's limit on a provided-buffer ring's entries


class ConfigError(Exception):
    """A configuration mistake: printed as one line, exit status 2."""


@dataclass(frozen=True)
class Endpoint:
    host: str          # numeric, as the kernel will see it
    port: int
    family: int
    weight: int = 1    # an upstream's share of new connections (1..256)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family == socket.AF_INET6 else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Config:
    listen: Endpoint
    upstreams: tuple          # of Endpoint, with their weights
    mode: str = "auto"
    backend: str = "auto"
    buffer_size: int = 65536
    buffers: int = 512
    max_buffers: int | None = None    # None = --buffers + 2 x --max-conns, at most 32768
    max_inflight: int = 1 << 20
    max_conns: int = 4096
    connect_timeout: float = 5.0
    idle_timeout: float = 3600.0      # 0 = off
    client_fin_timeout: float = 60.0  # 0 = off
    server_fin_timeout: float = 60.0  # 0 = off
    tcp_keepalive: tuple | None = (300, 30, 5)   # (idle, interval, count); None = off
    drain_timeout: float = 30.0
    zc_threshold: int = 16384
    pipe_size: int | None = None      # splice: None = --max-inflight, capped by the system
    iowq_workers: int | None = None   # splice: None = one per CPU
    replay_window: int = 65536
    backlog: int = 1024
    reuseport: bool = False                # SO_REUSEPORT even with one worker
    verbose: int = 0
    log_format: str = "text"
    disabled: frozenset = frozenset()
    balance: str = "first"
    retries: int = 3
    health_interval: float | None = None   # None: 2 s with two or more upstreams, else off
    rise: int = 2
    fall: int = 3
    proxy_protocol: int = 0                # 0 off, 1 or 2
    metrics: Endpoint | None = None        # --metrics: where /metrics is served
    accept_proxy: bool = False
    proxy_header_timeout: float = 5.0

    def health_seconds(self) -> float:
        """The interval the checks run at; 0 when they do not run."""
        if self.health_interval is not None:
            return self.health_interval
        return DEFAULT_HEALTH_INTERVAL if len(self.upstreams) > 1 else 0.0

    @property
    def upstream(self) -> Endpoint:
        return self.upstreams[0]


def parse_endpoint(text: str, what: str, *, allow_port_zero: bool) -> Endpoint:
    """HOST:PORT or [V6]:PORT; a name is resolved once, here."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ConfigError(f"{what} {text!r}: write IPv6 addresses as [ADDR]:PORT")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"{what} {text!r}: expected HOST:PORT")
        if ":" in host:
            raise ConfigError(f"{what} {text!r}: write IPv6 addresses as [ADDR]:PORT")
    try:
        port_n = int(port, 10)
    except ValueError:
        raise ConfigError(f"{what} {text!r}: port {port!r} is not a number") from None
    if not (0 if allow_port_zero else 1) <= port_n <= 65535:
        raise ConfigError(f"{what} {text!r}: port out of range")
    try:
        ip = ipaddress.ip_address(host)
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        return Endpoint(str(ip), port_n, family)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port_n, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"{what} {text!r}: cannot resolve {host!r}: {e.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    return Endpoint(sockaddr[0], port_n, family)


def parse_upstream(text: str, what: str = "--upstream") -> Endpoint:
    """HOST:PORT[,weight=N]: an upstream and its share of new connections."""
    addr, sep, opts = text.partition(",")
    weight = 1
    if sep:
        key, eq, val = opts.partition("=")
        if key.strip() != "weight" or not eq:
            raise ConfigError(f"{what} {text!r}: the only option is weight=N (1..256)")
        try:
            weight = int(val, 10)
        except ValueError:
            weight = 0
        if not 1 <= weight <= 256:
            raise ConfigError(f"{what} {text!r}: weight must be a whole number from 1 to 256")
    ep = parse_endpoint(addr.strip(), what, allow_port_zero=False)
    return Endpoint(ep.host, ep.port, ep.family, weight)


def _positive_int(name, lo=1, hi=None):
    def conv(text):
        try:
            v = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, not {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"{name} must be {rng}, not {v}")
        return v
    return conv


def _seconds(name="--connect-timeout", lo=0.001, hi=3600.0, off_ok=False):
    """A number of seconds in [lo, hi]; with off_ok, 0 (or 'off') turns the timeout off."""
    def conv(text):
        if off_ok and text.strip().lower() == "off":
            return 0.0
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number of seconds, not {text!r}") from None
        if off_ok and v == 0:
            return 0.0
        if not lo <= v <= hi:
            rng = f"between {lo:g} and {hi:g} seconds" + (", or 0 for off" if off_ok else "")
            raise argparse.ArgumentTypeError(f"{name} must be {rng}, not {text}")
        return v
    return conv


def _keepalive(text):
    """IDLE,INTVL,CNT in seconds, seconds and probes, or 'off'."""
    if text.strip().lower() == "off":
        return None
    parts = text.split(",")
    try:
        vals = tuple(int(x, 10) for x in parts)
    except ValueError:
        vals = ()
    if len(vals) != 3 or not (1 <= vals[0] <= 32767 and 1 <= vals[1] <= 32767 and 1 <= vals[2] <= 127):
        raise argparse.ArgumentTypeError(
            f"--tcp-keepalive must be IDLE,INTVL,CNT (seconds 1..32767, seconds 1..32767, "
            f"probes 1..127) or 'off', not {text!r}")
    return vals


def _choice(name, choices, later=()):
    def conv(text):
        if text in choices:
            return text
        hint = f" ({', '.join(later)} are planned, not built yet)" if later else ""
        raise argparse.ArgumentTypeError(
            f"unknown {name} {text!r}: choose from {', '.join(choices)}{hint}")
    return conv


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line and exit status 2 (no usage dump)."""

    def error(self, message):
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="uring-proxy",
        description=(
            "A TCP proxy whose data path is io_uring. Every connection accepted on "
            "--listen is forwarded to --upstream, both directions, byte for byte; "
            "a FIN is forwarded after the last byte, a reset becomes a reset."),
        epilog=(
            "Other commands: 'uring-proxy demo' runs the proxy in front of a built-in "
            "upstream and verifies every byte; 'uring-proxy --probe' shows the kernel "
            "features used and the fallbacks taken. Environment: "
            f"{DISABLE_ENV}=feature[,feature] treats io_uring features as missing "
            f"({', '.join(DISABLEABLE)}), to exercise the fallbacks."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="address to accept on; IPv6 as [::1]:PORT; port 0 picks a free port")
    p.add_argument("--upstream", metavar="HOST:PORT[,weight=N]", action="append",
                   help="address to forward to; give it up to %d times for a pool, which --balance "
                        "spreads new connections over (weight: the upstream's share, 1..256, "
                        "default 1). A connect that is refused, fails or times out moves the "
                        "connection to another upstream that is up, up to --retries times (and in "
                        "--mode peek, so does an upstream that resets before it answered, with the "
                        "client's bytes replayed)" % MAX_UPSTREAMS)
    p.add_argument("--balance", type=_choice("balance", BALANCES), default="first",
                   help="how a new connection picks its upstream, among those up. first: the first "
                        "in the order given (the rest are for failover); roundrobin: in turn, by "
                        "weight (smoothly: weights 5,1,1 give a a b a c a a); leastconn: the fewest "
                        "active connections per unit of weight; source: a hash of the client's "
                        "address, so a client keeps its upstream for as long as that one is up")
    p.add_argument("--retries", type=_positive_int("--retries", 0, 63), default=3, metavar="N",
                   help="a connection whose upstream connect fails moves on to another upstream "
                        "that is up and that it has not tried, at most N times")
    p.add_argument("--health-interval", type=_seconds("--health-interval", 0.05, 3600, off_ok=True),
                   default=None, metavar="SECONDS",
                   help="seconds between health checks: a TCP connect to every upstream, on the "
                        "proxy's own ring. An upstream that fails --fall checks in a row is down "
                        "and gets no new connections until --rise checks in a row succeed; every "
                        "change is one log line. Default: %g with two or more upstreams, off "
                        "with one (there is nowhere else to go); 0 turns them off"
                        % DEFAULT_HEALTH_INTERVAL)
    p.add_argument("--rise", type=_positive_int("--rise", 1, 1000), default=2, metavar="N",
                   help="successful checks in a row that bring a down upstream back")
    p.add_argument("--fall", type=_positive_int("--fall", 1, 1000), default=3, metavar="N",
                   help="failed checks in a row that take an upstream down")
    p.add_argument("--proxy-protocol", type=_choice("PROXY protocol version", ("v1", "v2")),
                   default=None, metavar="v1|v2",
                   help="send a PROXY protocol header (HAProxy's specification, v1 text or v2 "
                        "binary) to the upstream before any client byte, carrying the client's "
                        "address and the address it connected to; off by default")
    p.add_argument("--accept-proxy", action="store_true",
                   help="clients send a PROXY protocol header (v1 or v2, told apart by its first "
                        "byte) before their bytes, as from another proxy in front: its address is "
                        "the client's in logs, for --balance source and in the header sent on with "
                        "--proxy-protocol. A malformed, oversized (v1 over 107 bytes, v2 over 528) "
                        "or truncated header closes that connection (cause bad_proxy_header), "
                        "one not complete in --proxy-header-timeout too (proxy_header_timeout)")
    p.add_argument("--proxy-header-timeout", type=_seconds("--proxy-header-timeout", 0.05, 3600),
                   default=5.0, metavar="SECONDS",
                   help="with --accept-proxy: the time a client has to send its whole header")
    p.add_argument("--mode", type=_choice("mode", MODES),
                   default="auto",
                   help="data path. copy: multishot recv into provided buffers, send from the same "
                        "buffers. zerocopy: the same, but sends of at least --zc-threshold bytes are "
                        "IORING_OP_SEND_ZC from the registered pool, and a buffer is reused only after "
                        "the kernel's notification (on loopback the kernel copies anyway). splice: "
                        "socket -> pipe -> socket with IORING_OP_SPLICE, the bytes never in user "
                        "space. peek: the client's bytes are read with MSG_PEEK at SO_PEEK_OFF "
                        "(Linux 6.9+) and dropped from its socket only once delivered, so they can be "
                        "replayed to the next --upstream. auto: the best this kernel offers, said "
                        "once at start-up: today copy, with zero-copy sends where SEND_ZC exists, "
                        "dropped per socket once the kernel's usage reports show it copying")
    p.add_argument("--backend", type=_choice("backend", BACKENDS), default="auto",
                   help="event backend; every mode runs on both, with the same engine. uring: "
                        "io_uring, or exit 1 naming why it is unavailable. epoll: the same operations "
                        "as non-blocking syscalls over edge-triggered epoll (splice with splice(2), "
                        "zerocopy with MSG_ZEROCOPY and error-queue completions). auto: io_uring when "
                        "a ring can be set up, works and has what --mode needs; else epoll, with one "
                        "'fallback feature=io_uring' line giving the reason (EPERM from a seccomp "
                        "profile, kernel.io_uring_disabled, ENOSYS, a missing operation). "
                        "`--probe` shows what auto would pick here")
    p.add_argument("--buffer-size", type=_positive_int("--buffer-size", 512, 1 << 24), default=65536,
                   metavar="BYTES", help="size of each provided receive buffer")
    p.add_argument("--buffers", type=_positive_int("--buffers", 2, MAX_POOL_BUFFERS), default=512, metavar="N",
                   help="receive buffers the shared pool starts with (a power of two), and the "
                        "read-ahead budget: buffers that all connections together may hold beyond "
                        "the first of each direction")
    p.add_argument("--max-buffers", type=_positive_int("--max-buffers", 2, MAX_POOL_BUFFERS), default=None,
                   metavar="N",
                   help="the most receive buffers the pool may grow to. It starts at --buffers and "
                        "grows only while flows hold buffers: each direction of each connection may "
                        "always fill one buffer, and read ahead beyond that (up to --max-inflight) out "
                        "of a budget of --buffers shared by all, so no number of stalled connections "
                        "can starve the others. Default: --buffers + 2 x --max-conns (at most "
                        f"{MAX_POOL_BUFFERS}); memory is at most this many x --buffer-size")
    p.add_argument("--max-inflight", type=_positive_int("--max-inflight", 1), default=1 << 20,
                   metavar="BYTES",
                   help="per direction, bytes read but not yet sent before the proxy stops reading "
                        "(a slow reader then stalls its sender through TCP, not the proxy's memory)")
    p.add_argument("--max-conns", type=_positive_int("--max-conns", 1, 1 << 20), default=4096, metavar="N",
                   help="connections served at once; more wait in the listen backlog")
    p.add_argument("--connect-timeout", type=_seconds(), default=5.0, metavar="SECONDS",
                   help="close the client if the upstream does not answer the connect in time")
    p.add_argument("--idle-timeout", type=_seconds("--idle-timeout", 0.1, 1e6, off_ok=True),
                   default=3600.0, metavar="SECONDS",
                   help="end a connection in which no byte moved either way for this long: an RST "
                        "to both sides, cause idle_timeout (term cD); 0 turns it off (HAProxy's "
                        "timeout client/server)")
    p.add_argument("--client-fin-timeout", type=_seconds("--client-fin-timeout", 0.1, 1e6, off_ok=True),
                   default=60.0, metavar="SECONDS",
                   help="once the client has sent its FIN, end the connection if no byte moved "
                        "for this long (cause client_fin_timeout, term cD); 0 turns it off")
    p.add_argument("--server-fin-timeout", type=_seconds("--server-fin-timeout", 0.1, 1e6, off_ok=True),
                   default=60.0, metavar="SECONDS",
                   help="once the upstream has sent its FIN, end the connection if no byte moved "
                        "for this long (cause server_fin_timeout, term sD); 0 turns it off")
    p.add_argument("--tcp-keepalive", type=_keepalive, default="300,30,5", metavar="IDLE,INTVL,CNT",
                   help="TCP keep-alive on both sockets of every connection (SO_KEEPALIVE with "
                        "TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT), so a peer that vanished without a "
                        "FIN or RST is found even with --idle-timeout 0; 'off' disables it")
    p.add_argument("--drain-timeout", type=_seconds("--drain-timeout", 0, 3600), default=30.0,
                   metavar="SECONDS",
                   help="on SIGTERM or SIGINT, stop accepting at once and let open connections "
                        "finish for up to this long; then (or at a second signal) every one still "
                        "open is reset on both sides (cause proxy_shutdown), never closed as if complete")
    p.add_argument("--zc-threshold", type=_positive_int("--zc-threshold", 1), default=16384,
                   metavar="BYTES",
                   help="zerocopy mode: smaller sends are copied (zero-copy costs more than it saves "
                        "below roughly 10 KiB, per the kernel's msg_zerocopy documentation)")
    p.add_argument("--pipe-size", type=_positive_int("--pipe-size", 4096, 1 << 30), default=None,
                   metavar="BYTES",
                   help="splice mode: the size of each direction's pipe (F_SETPIPE_SZ). Default: "
                        "--max-inflight, capped at the largest size the system allows "
                        "(fs.pipe-max-size)")
    p.add_argument("--iowq-workers", type=_positive_int("--iowq-workers", 1, 4096), default=None,
                   metavar="N",
                   help="splice mode: cap on io_uring's worker threads (IORING_REGISTER_IOWQ_MAX_WORKERS), "
                        "which run every splice; not with --backend epoll, which has none. Default: one per CPU")
    p.add_argument("--replay-window", type=_positive_int("--replay-window", 0, 1 << 30), default=65536,
                   metavar="BYTES",
                   help="peek mode: client bytes already delivered are kept in the client's socket, "
                        "for replay to the next --upstream, until the upstream answers or this many "
                        "are held (at most a quarter of the socket's receive buffer)")
    p.add_argument("--backlog", type=_positive_int("--backlog", 1, 65535), default=1024, metavar="N",
                   help="listen backlog")
    p.add_argument("--reuseport", action="store_true",
                   help="set SO_REUSEPORT on the listener even with one worker, so that several "
                        "uring-proxy processes (say, one systemd unit per CPU) can listen on the "
                        "same port, each with its own accept queue; --workers sets it anyway")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics: connections, bytes, "
                        "closes by cause, each upstream's state and counters, the engine's batches; "
                        "from the proxy's own loop, no thread. Off by default")
    p.add_argument("--workers", type=_positive_int("--workers", 1, 1024), default=None, metavar="N",
                   help="engines per listener, each with its own ring, buffer pool and SO_REUSEPORT "
                        "listener on the same port (the kernel spreads new connections over them), "
                        "each on a thread of its own: they run without the GIL and share nothing "
                        "but the port. --max-conns, --buffers and --max-buffers are per worker. "
                        "Logs, the stopped line and --metrics are their sum; a worker whose loop "
                        "fails is replaced, and the others keep serving. Default: the number of "
                        "CPUs this process may run on")
    p.add_argument("--cpu-affinity", action="store_true",
                   help="pin each worker's thread to one CPU, in turn")
    p.add_argument("--config", metavar="FILE",
                   help="read the listeners (frontends), their upstream pools and every setting from "
                        "a TOML file (docs/configuration.md); instead of --listen and --upstream")
    p.add_argument("--check-config", metavar="FILE",
                   help="check a config file and say what it would run, without starting: exit "
                        "status 0 if it is valid, 2 (with the file, key and problem) if not")
    p.add_argument("--probe", action="store_true",
                   help="print the kernel features uring-proxy uses and the fallbacks it would take, then exit")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more log lines (start-up choices; -vv adds statistics every 10 s)")
    p.add_argument("--log-format", type=_choice("log format", LOG_FORMATS), default="text",
                   help="text, or json: one object per line")
    return p


def disabled_features(env=os.environ) -> frozenset:
    raw = env.get(DISABLE_ENV, "")
    names = frozenset(x.strip() for x in raw.split(",") if x.strip())
    unknown = names - set(DISABLEABLE)
    if unknown:
        raise ConfigError(f"{DISABLE_ENV}: unknown feature(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(DISABLEABLE)}")
    return names


def config_from_args(ns: argparse.Namespace) -> Config:
    if not ns.listen or not ns.upstream:
        raise ConfigError("--listen and --upstream are both required (or use --probe, or 'uring-proxy demo')")
    if ns.buffers & (ns.buffers - 1):
        raise ConfigError(f"--buffers must be a power of two (the provided-buffer ring's size), not {ns.buffers}")
    if ns.max_buffers is not None and ns.max_buffers < ns.buffers:
        raise ConfigError(f"--max-buffers ({ns.max_buffers}) must be at least --buffers ({ns.buffers})")
    if len(ns.upstream) > MAX_UPSTREAMS:
        raise ConfigError(f"--upstream may be given at most {MAX_UPSTREAMS} times, not {len(ns.upstream)}")
    for opt, modes in (("pipe_size", ("splice",)), ("iowq_workers", ("splice",))):
        if getattr(ns, opt) is not None and ns.mode not in modes:
            raise ConfigError(f"--{opt.replace('_', '-')} applies to --mode {' or '.join(modes)} only, "
                              f"not --mode {ns.mode}")
    if ns.iowq_workers is not None and ns.backend == "epoll":
        # Under --backend auto the cap applies if io_uring is chosen, and the
        # splice line says when it was not; asked of epoll it can never apply.
        raise ConfigError("--iowq-workers caps io_uring's worker threads; --backend epoll runs "
                          "splice(2) in its own loop and has none")
    return Config(
        listen=parse_endpoint(ns.listen, "--listen", allow_port_zero=True),
        upstreams=tuple(parse_upstream(u) for u in ns.upstream),
        balance=ns.balance, retries=ns.retries, health_interval=ns.health_interval,
        rise=ns.rise, fall=ns.fall,
        proxy_protocol={None: 0, "v1": 1, "v2": 2}[ns.proxy_protocol],
        accept_proxy=ns.accept_proxy, proxy_header_timeout=ns.proxy_header_timeout,
        metrics=parse_endpoint(ns.metrics, "--metrics", allow_port_zero=True)
        if getattr(ns, "metrics", None) else None,
        mode=ns.mode, pipe_size=ns.pipe_size, iowq_workers=ns.iowq_workers,
        replay_window=ns.replay_window, backend=ns.backend, buffer_size=ns.buffer_size, buffers=ns.buffers,
        max_buffers=ns.max_buffers,
        max_inflight=ns.max_inflight, max_conns=ns.max_conns,
        connect_timeout=ns.connect_timeout, zc_threshold=ns.zc_threshold,
        idle_timeout=ns.idle_timeout, client_fin_timeout=ns.client_fin_timeout,
        server_fin_timeout=ns.server_fin_timeout, tcp_keepalive=ns.tcp_keepalive,
        drain_timeout=ns.drain_timeout,
        backlog=ns.backlog, reuseport=ns.reuseport, verbose=ns.verbose,
        log_format=ns.log_format, disabled=disabled_features(),
    )
