"""Fixtures for the uring-proxy test suite: the proxy process, its log lines, upstreams.

The proxy is always the real CLI in a subprocess (``python -m uring_net``), listening on
loopback port 0; the port comes from its ``listening on HOST:PORT`` line. Its stderr is
read on a background thread, so the pipe never fills and tests can wait for ``close``
lines. The log contract is docs/cli-contract.md.

Every behaviour test goes through the ``proxy`` factory, which is parametrized over
BACKENDS x VARIANTS below: a new backend or data path is one word in one list.

Socket peers, byte patterns and upstream servers live in ``netutil.py`` so that test
modules can import them; this file holds the fixtures and the proxy process.
"""
from __future__ import annotations

import compileall
import errno
import faulthandler
import ipaddress
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

from netutil import (BlackholeUpstream, EchoServer, RefusingUpstream, TcpServer,
                     fmt_addr, ipv6_loopback_available)

# Add a backend or a data path here and every behaviour test runs against it.
BACKENDS = ["uring", "epoll"]
MODES = ["copy", "zerocopy", "auto", "splice", "peek"]
# io_uring features the proxy is told to treat as missing (URING_NET_DISABLE, see
# `uring-proxy --help`), so the fallback code paths run on a kernel that has them all.
# id -> comma-separated feature names ("" = use everything the kernel offers).
FEATURE_SETS = {
    "allfeatures": "",
    # Every optional io_uring feature off at once: single-shot accept and recv, one
    # buffer per recv completion. (Each is independent of the others in the engine.)
    "plain": "multishot_accept,recv_bundle,incremental_buffers",
}
# The (mode, feature set) pairs a behaviour test runs in. The plain accept and recv paths
# are the same code in every mode that reads into buffers (splice only accepts there), so
# copy carries them; each mode runs with everything the kernel offers.
VARIANTS = [(m, "allfeatures") for m in MODES] + [("copy", "plain")]

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 10.0      # until the "listening on" line
STOP_TIMEOUT = 10.0       # from SIGTERM/SIGINT to exit
TEST_TIME_LIMIT = 240.0   # the watchdog's default per test; see time_limit marker

# Cause -> term, from the contract.
CAUSE_TERM = {
    "normal": "--",
    "client_reset": "CD",
    "upstream_reset": "SD",
    "upstream_refused": "SC",
    "connect_timeout": "sC",
    "connect_error": "SC",
    "proxy_shutdown": "PD",
    "resource": "RC",
    "idle_timeout": "cD",
    "client_fin_timeout": "cD",
    "server_fin_timeout": "sD",
    "no_upstream": "SC",
    "bad_proxy_header": "PR",
    "proxy_header_timeout": "cR",
}

HAS_IPV6 = ipv6_loopback_available()


def _raise_nofile_limit(want: int = 65536) -> int:
    """The load tests hold a few thousand sockets here and in the proxy (which inherits
    the limit). Raise the soft limit as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


NOFILE_LIMIT = _raise_nofile_limit()


# --------------------------------------------------------------------------- watchdog
# Every operation in the suite has its own timeout; this is the net under them. If a test
# overruns its limit, dump all thread stacks, kill the proxies we started and exit, so a
# hang costs minutes, not the CI run.

_children: set[subprocess.Popen] = set()
_children_lock = threading.Lock()


class _Watchdog:
    def __init__(self):
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._test = ""
        threading.Thread(target=self._run, daemon=True, name="watchdog").start()

    def arm(self, seconds: float, test: str):
        with self._cond:
            self._deadline, self._test = time.monotonic() + seconds, test
            self._cond.notify()

    def disarm(self):
        with self._cond:
            self._deadline = None
            self._cond.notify()

    def _run(self):
        with self._cond:
            while True:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                # pytest captures fds 1 and 2 during a test; give them back first, or
                # the report would go to a capture file that os._exit never prints.
                capman = _pytest_config and _pytest_config.pluginmanager.getplugin(
                    "capturemanager")
                if capman is not None:
                    try:
                        capman.suspend_global_capture(in_=True)
                    except Exception:
                        pass
                sys.stderr.write(f"\n*** watchdog: {self._test} exceeded its time limit; "
                                 "thread stacks follow, then the run is aborted ***\n")
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                with _children_lock:
                    for p in _children:
                        try:
                            p.kill()
                        except OSError:
                            pass
                sys.stderr.flush()
                os._exit(70)


_watchdog = _Watchdog()
_pytest_config = None


def pytest_configure(config):
    global _pytest_config
    _pytest_config = config
    # Every proxy a test starts is a new interpreter importing uring_net. Where
    # PYTHONDONTWRITEBYTECODE is set (it is on these machines) none of them may
    # cache the compiled modules, so each compiled them all again: ~35 ms of
    # every start, over a thousand starts a run. Compiled once here (an
    # explicit compile, which the setting does not stop), they read the cache;
    # a module edited later is seen to be newer and compiled as before.
    compileall.compile_dir(str(REPO_ROOT / "uring_net"), quiet=1)
    config.addinivalue_line(
        "markers", "time_limit(seconds): per-test limit of the suite's watchdog")
    config.addinivalue_line(
        "markers", "epoll_modes(*modes): the modes this test runs on the epoll backend "
        "in the default tier (every mode with URING_NET_TEST_FULL=1, make test-full)")


@pytest.fixture(autouse=True)
def _test_watchdog(request):
    m = request.node.get_closest_marker("time_limit")
    _watchdog.arm(m.args[0] if m else TEST_TIME_LIMIT, request.node.nodeid)
    yield
    _watchdog.disarm()


# --------------------------------------------------------------------------- log lines

_KV = re.compile(r"(\w+)=(\S+)")
_LISTENING = re.compile(
    r"^listening on (?P<listen>\S+) upstream (?P<upstream>\S+) "
    r"backend=(?P<backend>\S+) mode=(?P<mode>\S+)(?P<extra>( \w+=\S+)*)$")
_CLOSE = re.compile(
    r"^close client=(?P<client>\S+) upstream=(?P<upstream>\S+) c2u=(?P<c2u>\d+) "
    r"u2c=(?P<u2c>\d+) duration_ms=(?P<duration_ms>\d+(?:\.\d+)?) "
    r"cause=(?P<cause>[a-z_]+) term=(?P<term>\S\S)(?P<extra>( \w+=\S+)*)$")
_STOPPED = re.compile(r"^stopped(?P<kv>( \w+=\S+)+)$")
_DRAINING = re.compile(r"^draining connections=(?P<n>\d+) timeout=(?P<t>\d+(?:\.\d+)?)$")


def is_address(text) -> bool:
    """``127.0.0.1:80`` or ``[::1]:80``: what the contract prints for an address."""
    if not isinstance(text, str):
        return False
    m = re.fullmatch(r"(?:\[([0-9a-fA-F:.]+)\]|([0-9.]+)):(\d{1,5})", text)
    if not m or not 0 <= int(m[3]) <= 65535:
        return False
    try:
        ipaddress.ip_address(m[1] or m[2])
    except ValueError:
        return False
    return bool(m[1]) == (":" in (m[1] or m[2]))


class Malformed(Exception):
    pass


def parse_text_line(line: str) -> dict | None:
    """One text log line as the JSON format's dict; None for lines that are not events
    (verbose output). A line that starts like an event but breaks the contract raises."""
    if line.startswith("listening"):
        m = _LISTENING.match(line)
        if not m:
            raise Malformed(line)
        d = {"event": "listening", **{k: m[k] for k in ("listen", "upstream", "backend", "mode")}}
        d.update(_KV.findall(m["extra"]))
        return d
    if line.startswith("close "):
        m = _CLOSE.match(line)
        if not m:
            raise Malformed(line)
        d = {"event": "close", "client": m["client"], "upstream": m["upstream"],
             "bytes_c2u": int(m["c2u"]), "bytes_u2c": int(m["u2c"]),
             "duration_ms": float(m["duration_ms"]), "cause": m["cause"],
             "term": m["term"]}
        d.update(_KV.findall(m["extra"]))  # error=ECONNREFUSED and the like
        return d
    if line.startswith("draining"):
        m = _DRAINING.match(line)
        if not m:
            raise Malformed(line)
        return {"event": "draining", "connections": int(m["n"]), "timeout": float(m["t"])}
    if line.startswith("stopped"):
        m = _STOPPED.match(line)
        if not m:
            raise Malformed(line)
        kv = dict(_KV.findall(m["kv"]))
        try:
            d = {k: int(v) for k, v in kv.items()}
            d.update(event="stopped", bytes_c2u=d.pop("c2u"), bytes_u2c=d.pop("u2c"))
            d["connections"]  # required, like the byte totals
            return d
        except (KeyError, ValueError):
            raise Malformed(line) from None
    return None


def parse_json_line(line: str) -> dict:
    try:
        d = json.loads(line)
    except ValueError:
        raise Malformed(line) from None
    if not isinstance(d, dict) or "event" not in d:
        raise Malformed(line)
    return d


# --------------------------------------------------------------------------- the proxy


class ProxyProcess:
    """The CLI in a subprocess, with its parsed log lines and /proc views."""

    def __init__(self, argv: list[str], log_format: str = "text", disabled: str = "",
                 signal_on_listening: int | None = None):
        self.argv = argv
        # Sent by the stderr reader the instant the listening line arrives (a script that
        # starts the proxy and stops it at once), with no thread hand-off in between.
        self._signal_on_listening = signal_on_listening
        self.disabled = disabled
        self.log_format = log_format
        self.raw_lines: list[str] = []
        self.lines: list[dict] = []        # parsed events, in order
        self.malformed: list[str] = []
        self.stdout_chunks: list[bytes] = []
        self._cond = threading.Condition()
        self._eof = False
        self._claimed: set[int] = set()
        self._stderr_open = threading.Event()   # cleared: stop reading (hold_stderr)
        self._stderr_open.set()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("URING_NET_DISABLE", None)
        if disabled:
            env["URING_NET_DISABLE"] = disabled
        self.proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        with _children_lock:
            _children.add(self.proc)
        self.pid = self.proc.pid
        self.returncode: int | None = None
        self._readers = [
            threading.Thread(target=self._read_stderr, daemon=True, name=f"stderr-{self.pid}"),
            threading.Thread(target=self._read_stdout, daemon=True, name=f"stdout-{self.pid}"),
        ]
        for t in self._readers:
            t.start()
        self.listening = self._wait_listening()
        self.listen_addr = self.listening["listen"]
        self.port = int(self.listen_addr.rpartition(":")[2])
        for feature in filter(None, disabled.split(",")):
            # Without this the variant would silently test the default path again.
            if feature not in self.stderr_text():
                self.kill()
                pytest.fail(f"URING_NET_DISABLE={disabled}: the proxy did not report a "
                            f"fallback for {feature}; stderr:\n{self._tail()}", pytrace=False)

    # -- output readers
    def hold_stderr(self):
        """Stop reading the proxy's stderr: the pipe fills, as behind a stuck log shipper."""
        self._stderr_open.clear()

    def release_stderr(self):
        self._stderr_open.set()

    def _read_stderr(self):
        for raw in iter(self.proc.stderr.readline, b""):
            self._stderr_open.wait()
            if self._signal_on_listening and raw.startswith((b"listening", b'{"event": "listening"')):
                self.proc.send_signal(self._signal_on_listening)
                self._signal_on_listening = None
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with self._cond:
                self.raw_lines.append(line)
                try:
                    ev = (parse_json_line(line) if self.log_format == "json"
                          else parse_text_line(line))
                    if ev is not None:
                        self.lines.append(ev)
                except Malformed:
                    self.malformed.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _read_stdout(self):
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):
            self.stdout_chunks.append(chunk)

    def stderr_text(self) -> str:
        with self._cond:
            return "\n".join(self.raw_lines)

    def _tail(self, n: int = 40) -> str:
        with self._cond:
            return "\n".join(self.raw_lines[-n:]) or "(no stderr)"

    # -- waiting for log lines
    def _wait_until(self, check, timeout: float, failure) -> object:
        """Wait on the log until ``check()`` (called under the lock) returns something
        truthy, and return it; on timeout or EOF fail with ``failure()`` and the stderr."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = check()
                if got:
                    return got
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    raise AssertionError(
                        f"{failure()}{' (proxy stderr closed)' if self._eof else ''}; "
                        f"stderr:\n{self._tail()}")
                self._cond.wait(left)

    def wait_for(self, pred, timeout: float, what: str) -> dict:
        return self._wait_until(lambda: next((ev for ev in self.lines if pred(ev)), None),
                                timeout, lambda: f"no {what} within {timeout} s")

    def _wait_listening(self) -> dict:
        try:
            return self.wait_for(lambda e: e["event"] == "listening", START_TIMEOUT,
                                 "'listening on' line")
        except AssertionError as e:
            self.kill()
            pytest.fail(f"proxy did not start: {' '.join(self.argv[1:])}\n{e}", pytrace=False)

    def closes(self) -> list[dict]:
        with self._cond:
            return [e for e in self.lines if e["event"] == "close"]

    def wait_for_close(self, n: int, timeout: float) -> list[dict]:
        """Wait until at least ``n`` close lines were printed; return them all."""
        def enough():
            closes = [e for e in self.lines if e["event"] == "close"]
            return closes if len(closes) >= n else None
        return self._wait_until(
            enough, timeout,
            lambda: f"{len(self.closes())} close lines after {timeout} s, expected {n}")

    def close_for(self, client: str, timeout: float = 10.0) -> dict:
        """The close line of the connection whose client address is ``client``.

        Each line is handed out once: if the kernel reuses a client port for a later
        connection, that connection gets its own line, not its predecessor's."""
        def match(e):
            return (e["event"] == "close" and e.get("client") == client
                    and id(e) not in self._claimed)
        e = self.wait_for(match, timeout, f"close line for client={client}")
        self._claimed.add(id(e))
        return e

    # -- /proc views
    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def _status(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise AssertionError(f"{key} not in /proc/{self.pid}/status")

    def rss_kib(self) -> int:
        return self._status("VmRSS")

    def threads(self) -> int:
        return self._status("Threads")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the proxy so far (all threads)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_cpu_quiet(self, timeout: float = 30.0, window: float = 0.5,
                       quiet: float = 0.02) -> float:
        """Wait until the proxy spends less than ``quiet`` s of CPU in a ``window``,
        which is how a test knows work it caused (bytes it queued) is done before it
        measures an idle state. Returns the CPU spent in the last window; a busy loop
        never gets quiet and the caller's own measurement then fails."""
        deadline = time.monotonic() + timeout
        while True:
            c0 = self.cpu_seconds()
            time.sleep(window)
            used = self.cpu_seconds() - c0
            if used < quiet or time.monotonic() > deadline:
                return used

    def wait_fd_count(self, target: int, timeout: float) -> int:
        """Poll until the fd count is ``target`` (fds may close just after the log line)."""
        deadline = time.monotonic() + timeout
        while True:
            n = self.fd_count()
            if n == target or time.monotonic() > deadline:
                return n
            time.sleep(0.05)

    # -- stopping
    def send_signal(self, sig: int):
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``sig`` and wait for the exit; returns the exit status. Idempotent."""
        self.release_stderr()
        if self.returncode is None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait_exit(timeout)

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for an exit already asked for; returns the exit status."""
        if self.returncode is None:
            try:
                self.returncode = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(
                    f"proxy did not exit within {timeout} s of being signalled; "
                    f"stderr:\n{self._tail()}") from None
            self._join_readers()
        return self.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.returncode = self.proc.wait(10)
        self._join_readers()

    def _join_readers(self):
        for t in self._readers:
            t.join(5)
        with _children_lock:
            _children.discard(self.proc)

    def problems(self) -> list[str]:
        """Contract violations visible in the output, checked for every proxy we ran."""
        out = []
        text = self.stderr_text()
        if "Traceback" in text:
            out.append("stderr contains a Traceback")
        if self.malformed:
            out.append(f"log lines that break the contract: {self.malformed[:5]}")
        for e in self.closes():
            for k in ("client", "upstream"):
                if k == "upstream" and e.get(k) == "-" and e.get("cause") in (
                        "no_upstream", "bad_proxy_header", "proxy_header_timeout"):
                    continue        # no upstream was up: the contract's "-"
                if not is_address(e.get(k)):
                    out.append(f"close line with {k}={e.get(k)!r}, not HOST:PORT: {e}")
            err = e.get("error")
            if err is not None and err not in errno.errorcode.values():
                out.append(f"close line with error={err!r}, not an errno name: {e}")
            if err is not None and e.get("cause") == "normal":
                out.append(f"cause=normal with an error: {e}")
            cause, term = e.get("cause"), e.get("term")
            if cause not in CAUSE_TERM:
                out.append(f"unknown cause in {e}")
            elif term != CAUSE_TERM[cause]:
                out.append(f"cause {cause} has term {term!r}, "
                           f"the contract says {CAUSE_TERM[cause]!r}")
        return out


@pytest.fixture
def backend(request) -> str:
    """Every test that takes it is parametrized over BACKENDS (pytest_generate_tests)."""
    return request.param


def pytest_generate_tests(metafunc):
    """``mode`` and ``disabled_features`` over VARIANTS; a test that pins one of them
    with its own parametrize mark runs the other over all its values."""
    pinned = set()
    for m in metafunc.definition.iter_markers("parametrize"):
        names = m.args[0]
        pinned |= {n.strip() for n in (names.split(",") if isinstance(names, str) else names)}
    want = [n for n in ("mode", "disabled_features")
            if n in metafunc.fixturenames and n not in pinned]
    if want == ["mode", "disabled_features"] and "backend" in metafunc.fixturenames \
            and "backend" not in pinned:
        # The "plain" set declares io_uring features missing; on epoll it would only
        # rerun copy mode through the driver's single-shot paths (test_buffers.py and
        # test_cli.py still cover those), so epoll runs every mode once.
        # A slow test may name the epoll modes of the default tier (epoll_modes): the
        # epoll driver is shared by every mode, so the modes whose driver calls differ
        # carry it, and make test stays inside its time budget. URING_NET_TEST_FULL=1
        # (make test-full) runs every mode.
        # Otherwise the default tier runs each test on epoll in copy and splice (the
        # two ways bytes cross the driver) and in one of the other modes, chosen by
        # the test's name: every mode still runs on epoll across the suite, at 3/5
        # of the cost (the suite's budget is 8 minutes on 2 cores).
        tier = metafunc.definition.get_closest_marker("epoll_modes")
        if os.environ.get("URING_NET_TEST_FULL"):
            epoll_modes = set(MODES)
        elif tier is not None:
            epoll_modes = set(tier.args)
        else:
            rotating = [m for m in MODES if m not in ("copy", "splice")]
            pick = zlib.crc32(metafunc.definition.originalname.encode()) % len(rotating)
            epoll_modes = {"copy", "splice", rotating[pick]}
        combos = [(b, m, f) for b in BACKENDS for m, f in VARIANTS
                  if not (b == "epoll" and (f == "plain" or m not in epoll_modes))]
        metafunc.parametrize("backend,mode,disabled_features",
                             [(b, m, FEATURE_SETS[f]) for b, m, f in combos],
                             ids=[f"{b}-{m}-{f}" for b, m, f in combos])
        return
    if "backend" in metafunc.fixturenames and "backend" not in pinned:
        metafunc.parametrize("backend", BACKENDS)
    if want == ["mode", "disabled_features"]:
        metafunc.parametrize("mode,disabled_features", [(m, FEATURE_SETS[f]) for m, f in VARIANTS],
                             ids=[f"{m}-{f}" for m, f in VARIANTS])
    elif want == ["mode"]:
        metafunc.parametrize("mode", MODES)
    elif want == ["disabled_features"]:
        metafunc.parametrize("disabled_features", list(FEATURE_SETS.values()),
                             ids=list(FEATURE_SETS))


def proxy_argv(listen: str, upstream: str, backend: str, mode: str, *extra: str,
               log_format: str = "text") -> list[str]:
    argv = [sys.executable, "-m", "uring_net", "--listen", listen, "--upstream", upstream,
            "--backend", backend, "--mode", mode]
    if log_format != "text":
        argv += ["--log-format", log_format]
    if "--health-interval" not in extra:
        # With two or more upstreams health checks are on by default, and each
        # check is a connection a test upstream would count (TcpServer calls one
        # it has no handler for an error). They have their own tests.
        argv += ["--health-interval", "0"]
    if "--workers" not in extra:
        # One engine, as the tests count its threads, fds and lines; --workers
        # has its own tests.
        argv += ["--workers", "1"]
    if "--drain-timeout" not in extra:
        # Teardown stops every proxy with SIGTERM; flows a test left open would
        # otherwise hold it for the default 30 s drain. The drain has its tests.
        argv += ["--drain-timeout", "0"]
    return argv + list(extra)


@pytest.fixture
def proxy(backend, mode, disabled_features):
    """Factory: ``proxy(upstream_addr, *extra_args, listen=..., log_format=...)`` starts
    the CLI for this test's backend, mode and feature set. At teardown every proxy still
    running gets SIGTERM and must exit 0 with a ``stopped`` line and a clean log."""
    started: list[ProxyProcess] = []

    def start(upstream: str, *extra: str, listen: str = "127.0.0.1:0",
              log_format: str = "text", signal_on_listening: int | None = None
              ) -> ProxyProcess:
        p = ProxyProcess(proxy_argv(listen, upstream, backend, mode, *extra,
                                    log_format=log_format), log_format, disabled_features,
                         signal_on_listening)
        started.append(p)
        return p

    start.backend, start.mode = backend, mode
    yield start

    failures = []
    for p in started:
        try:
            rc = p.stop()
        except AssertionError as e:
            failures.append(str(e))
            continue
        if rc != 0:
            failures.append(f"proxy exited with status {rc}; stderr:\n{p._tail()}")
        elif not any(e["event"] == "stopped" for e in p.lines):
            failures.append(f"proxy printed no 'stopped' line; stderr:\n{p._tail()}")
        else:
            # Every receive buffer must be back in the pool once no flow holds one:
            # a buffer kept past its last use (or a notification never waited for)
            # would show here, in every mode.
            st = [e for e in p.lines if e["event"] == "stopped"][-1]
            if st.get("active") == 0 and (st.get("buffers_out"), st.get("segments_out")) != (0, 0):
                failures.append(f"{st.get('buffers_out')} receive buffers / {st.get('segments_out')} "
                                f"segments not back in the pool after every flow closed: {st}")
            # The engine names a recv's buffers from its shadow of the ring; a buffer
            # CQE that is not the ring's head entry, or a shadow head that ends up
            # elsewhere than the kernel's, would break bundles and incremental buffers.
            if st.get("ring_order_errors") != 0:
                failures.append(f"ring_order_errors={st.get('ring_order_errors')}: {st}")
            # A failing flow cancels each of its operations by user_data; one the
            # engine's list missed would hold the flow until the fallback cancel by fd.
            if st.get("cancel_fallbacks") != 0:
                failures.append(f"cancel_fallbacks={st.get('cancel_fallbacks')}: {st}")
            # Splice mode: a pipe whose byte count said empty while the kernel said
            # otherwise (checked before every pooling) would leak bytes across flows.
            if st.get("pipe_errors", 0) != 0:
                failures.append(f"pipe_errors={st.get('pipe_errors')}: {st}")
        failures += p.problems()
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


# --------------------------------------------------------------------------- upstreams


@pytest.fixture
def upstream():
    """Factory for threaded upstreams: ``srv = upstream(); fut = srv.serve_next(fn)``."""
    servers: list[TcpServer] = []

    def make(host: str = "127.0.0.1") -> TcpServer:
        s = TcpServer(host)
        servers.append(s)
        return s

    yield make
    errors = []
    for s in servers:
        errors += s.close()
    assert not errors, errors


@pytest.fixture
def echo_server():
    s = EchoServer()
    yield s
    errors = s.close()
    assert not errors, errors


@pytest.fixture
def refusing_upstream():
    r = RefusingUpstream()
    yield r
    r.close()


@pytest.fixture
def blackhole_upstream():
    b = BlackholeUpstream()
    try:
        # Linux drops a SYN to a listener whose accept queue is full, whatever
        # tcp_syncookies says; that is the only loopback way to leave a connect
        # unanswered. If it ever stops holding, the connect-timeout tests cannot
        # run, and that must show as a failure, not as a quiet skip.
        if not b.probe():
            pytest.fail("this kernel answered a SYN to a listener with a full accept queue, "
                        "so no loopback upstream can leave a connect() unanswered", pytrace=False)
        yield b
    finally:
        b.close()


__all__ = ["BACKENDS", "MODES", "CAUSE_TERM", "HAS_IPV6", "NOFILE_LIMIT", "ProxyProcess",
           "fmt_addr"]


# --- CPython's own suites: no skip beyond the control's ---------------------
# tests/test_cpython_*.py run CPython's selector and event loop tests on
# uring_net and, in the same session, on the standard library's epoll as the
# control. A test that skips on uring_net but ran on the control hides a
# difference, so it fails the session unless tests/cpython-skips.txt names it
# with its reason.
CPYTHON_PAIRS = {"TestUringSelector": "TestEpollSelectorControl",
                 "TestLoopOnUringSelector": "TestLoopOnEpollControl",
                 "TestAioEvents": "TestLoopOnEpollControl",
                 "TestAioSockLowlevel": "ControlSockLowlevel",
                 "TestAioBufferedProtocol": "ControlBufferedProtocol",
                 "TestAioSendfile": "ControlSendfile",
                 "TestAioStartServer": "ControlStartServer",
                 "TestAioStartTLS": "ControlStartTLS"}
_cpython_outcomes: dict[tuple[str, str], str] = {}


def _allowed_cpython_skips() -> set[str]:
    allowed = set()
    for line in (Path(__file__).parent / "cpython-skips.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            allowed.add(line.split(": ", 1)[0].strip())
    return allowed


def pytest_runtest_logreport(report):
    if "test_cpython_" not in report.nodeid:
        return
    parts = report.nodeid.split("::")
    if len(parts) != 3:
        return
    if report.when == "call" or report.skipped:
        _cpython_outcomes[(parts[1], parts[2])] = report.outcome


def cpython_skips_beyond_control() -> list[str]:
    """uring_net tests skipped where the control ran the same test, not allowed."""
    allowed = _allowed_cpython_skips()
    bad = []
    for (cls, name), outcome in sorted(_cpython_outcomes.items()):
        control = CPYTHON_PAIRS.get(cls)
        if control is None or outcome != "skipped":
            continue
        if _cpython_outcomes.get((control, name)) in (None, "skipped"):
            continue        # the control skipped it too, or did not run this session
        if f"{cls}::{name}" not in allowed:
            bad.append(f"{cls}::{name}")
    return bad


def pytest_sessionfinish(session, exitstatus):
    bad = cpython_skips_beyond_control()
    if bad:
        sys.stderr.write("\nCPython tests skipped on uring_net but run on the epoll control "
                         "(not in tests/cpython-skips.txt):\n  " + "\n  ".join(bad) + "\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
