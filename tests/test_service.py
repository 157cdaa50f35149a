"""uring-proxy under systemd's Type=notify (docs/service.md): READY=1 once it serves,
STOPPING=1 as soon as a stop is asked for.

The test plays the service manager: it binds the unix datagram socket that
$NOTIFY_SOCKET names (sd_notify(3)) and waits on it with a timeout, never a sleep.
"""
import os
import re
import resource
import secrets
import signal
import socket
import subprocess
import shutil
import tempfile

import pytest

from conftest import REPO_ROOT, START_TIMEOUT, STOP_TIMEOUT, ProxyProcess, proxy_argv
from netutil import Verifier, connect, recv_exact, recv_stream, send_stream
from uring_net.config import MAX_POOL_BUFFERS, build_parser
from uring_net.proxy import NOFILE_SPARE

_STATUS = re.compile(r"listening on (?P<listen>\S+) backend=(?P<backend>\w+) mode=(?P<mode>\w+) workers=\d+")


class Manager:
    """systemd's end of the notify protocol: one bound datagram socket."""

    def __init__(self, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._dir = None
        if abstract:
            name = f"uring-net-test-{secrets.token_hex(8)}"
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            # sun_path holds 108 bytes; pytest's tmp_path for a long test id may not fit.
            self._dir = tempfile.TemporaryDirectory(prefix="un-notify-")
            self.env = os.path.join(self._dir.name, "notify")
            self.sock.bind(self.env)

    def receive(self, timeout: float, what: str) -> dict:
        """The next notification as a dict of its assignments."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except socket.timeout:
            raise AssertionError(f"no notification within {timeout} s; waiting for {what}") from None
        return dict(line.split("=", 1) for line in data.decode().splitlines())

    def pending(self) -> bytes | None:
        """A notification already queued, or None: never waits."""
        self.sock.settimeout(0)     # with a timeout set, Python would wait out EAGAIN
        try:
            return self.sock.recv(4096)
        except BlockingIOError:
            return None

    def close(self):
        self.sock.close()
        if self._dir is not None:
            self._dir.cleanup()


@pytest.fixture
def manager():
    m = Manager()
    yield m
    m.close()


def _echo_once(addr: str, seed: int, n: int = 100_000) -> socket.socket:
    """A client that moved `n` bytes through the proxy and back; left open."""
    c = connect(addr)
    send_stream(c, seed, n, shutdown=False)
    recv_exact(c, Verifier(seed, n, "echo through the proxy"), n)
    return c


@pytest.mark.time_limit(60)
@pytest.mark.parametrize("backend", ["uring", "epoll"])
def test_ready_only_once_serving_and_stopping_on_sigterm(manager, echo_server, tmp_path, backend):
    """READY=1 is systemd's go for units ordered after this one: at the moment it
    arrives, the address its STATUS names must already take and serve a client,
    with no retry. The proxy is started here without conftest's ProxyProcess, which
    waits for the log's listening line: that would already prove the port open."""
    log = tmp_path / "stderr.txt"
    argv = proxy_argv("127.0.0.1:0", echo_server.addr, backend, "auto")
    with open(log, "wb") as err:
        p = subprocess.Popen(argv, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=err,
                             env={**os.environ, "NOTIFY_SOCKET": manager.env})
    try:
        ready = manager.receive(START_TIMEOUT, "READY=1")
        assert ready.get("READY") == "1", ready
        m = _STATUS.fullmatch(ready.get("STATUS", ""))
        assert m and (m["backend"], m["mode"]) == (backend, "auto"), ready
        _echo_once(m["listen"], seed=3).close()
        assert manager.pending() is None, "a notification before any stop was asked for"

        p.send_signal(signal.SIGTERM)
        stopping = manager.receive(STOP_TIMEOUT, "STOPPING=1 after SIGTERM")
        assert stopping.get("STOPPING") == "1", stopping
        assert p.wait(STOP_TIMEOUT) == 0, log.read_text()
        assert manager.pending() is None, "a notification after STOPPING=1"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    text = log.read_text()
    assert f"listening on {m['listen']} " in text and "Traceback" not in text, text


@pytest.mark.time_limit(60)
def test_stopping_is_sent_when_the_drain_starts(manager, echo_server, monkeypatch):
    """systemd's stop timeout covers the drain: STOPPING=1 must come at SIGTERM,
    while an open flow still holds the proxy up, not at exit."""
    monkeypatch.setenv("NOTIFY_SOCKET", manager.env)
    p = ProxyProcess(proxy_argv("127.0.0.1:0", echo_server.addr, "uring", "auto",
                                "--drain-timeout", "30"))
    client = None
    try:
        assert manager.receive(START_TIMEOUT, "READY=1").get("READY") == "1"
        client = _echo_once(p.listen_addr, seed=5)
        p.send_signal(signal.SIGTERM)
        stopping = manager.receive(STOP_TIMEOUT, "STOPPING=1 after SIGTERM")
        assert stopping.get("STOPPING") == "1", stopping
        assert p.proc.poll() is None, "the proxy exited with a flow open and 30 s of drain left"
        client.close()      # the last flow ends: the drain is over
        client = None
        assert p.wait_exit() == 0, p.stderr_text()
    finally:
        if client is not None:
            client.close()
        p.stop()
    assert not p.problems(), p.problems()


@pytest.mark.time_limit(60)
def test_abstract_notify_socket(echo_server, monkeypatch):
    """NOTIFY_SOCKET=@name is a socket in the abstract namespace (sd_notify(3))."""
    m = Manager(abstract=True)
    monkeypatch.setenv("NOTIFY_SOCKET", m.env)
    try:
        p = ProxyProcess(proxy_argv("127.0.0.1:0", echo_server.addr, "epoll", "copy"))
        try:
            ready = m.receive(START_TIMEOUT, "READY=1 on the abstract socket")
            assert ready.get("READY") == "1", ready
            assert ready.get("STATUS") == f"listening on {p.listen_addr} backend=epoll mode=copy workers=1", ready
        finally:
            assert p.stop() == 0, p.stderr_text()
        assert m.receive(STOP_TIMEOUT, "STOPPING=1").get("STOPPING") == "1"
    finally:
        m.close()
    assert not p.problems(), p.problems()


@pytest.mark.time_limit(60)
@pytest.mark.parametrize("where", ["/nonexistent/notify", "@uring-net-test-nobody-listens"])
def test_notify_socket_nobody_reads_is_harmless(echo_server, monkeypatch, where):
    """A stale NOTIFY_SOCKET (a shell started from a unit, a manager gone) must not
    stop the proxy from serving or exiting cleanly."""
    monkeypatch.setenv("NOTIFY_SOCKET", where)
    p = ProxyProcess(proxy_argv("127.0.0.1:0", echo_server.addr, "uring", "auto"))
    try:
        _echo_once(p.listen_addr, seed=9).close()
        p.wait_for_close(1, 10)
    finally:
        assert p.stop() == 0, p.stderr_text()
    assert not p.problems(), p.problems()


# --- docs/uring-proxy.service: its limits fit the defaults ------------------------

UNIT = REPO_ROOT / "docs" / "uring-proxy.service"
_SIZE = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def unit_setting(key: str) -> str:
    values = [line.split("=", 1)[1].strip() for line in UNIT.read_text().splitlines()
              if line.startswith(key + "=")]
    assert len(values) == 1, f"{UNIT.name}: {key}= set {len(values)} times"
    return values[0]


def unit_bytes(key: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", unit_setting(key))
    assert m, f"{key}={unit_setting(key)}: not a size this test reads"
    return int(m[1]) * _SIZE[m[2]]


def test_unit_limits_cover_the_default_flags():
    """The unit's arithmetic, redone from the defaults as they are now: a change of
    --max-conns, --buffers or --buffer-size must come with new limits."""
    d = build_parser().parse_args(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9"])
    assert unit_setting("Type") == "notify"
    assert int(unit_setting("LimitNOFILE")) >= d.max_conns * 6 + NOFILE_SPARE   # splice mode
    registered = min(d.buffers + 2 * d.max_conns, MAX_POOL_BUFFERS) * d.buffer_size
    assert unit_bytes("LimitMEMLOCK") >= registered + (512 << 10), \
        "LimitMEMLOCK must hold every pool buffer registered plus the rings"
    assert not any(line.startswith("SystemCallFilter=") for line in UNIT.read_text().splitlines())


def _limits() -> tuple[int, int, list[str]]:
    """The unit's LimitNOFILE and LimitMEMLOCK, and no extra flags; or, where the hard
    limits are lower and cannot be raised (no CAP_SYS_RESOURCE), the machine's hard
    limits with --max-conns and --max-buffers cut by the unit's own arithmetic to fit
    them, so the same check runs here rather than being skipped."""
    nofile, memlock = int(unit_setting("LimitNOFILE")), unit_bytes("LimitMEMLOCK")
    with open("/proc/self/status") as f:
        caps = int(next(l for l in f if l.startswith("CapEff:")).split()[1], 16)
    if caps & (1 << 24):        # CAP_SYS_RESOURCE: may raise hard limits
        return nofile, memlock, []
    hard_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard_memlock = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    extra = []
    if hard_nofile != resource.RLIM_INFINITY and hard_nofile < nofile:
        nofile = hard_nofile
        extra += ["--max-conns", str((nofile - NOFILE_SPARE) // 6)]
    if hard_memlock != resource.RLIM_INFINITY and hard_memlock < memlock:
        memlock = hard_memlock
        d = build_parser().parse_args(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9"])
        fit = (memlock - (512 << 10)) // d.buffer_size
        buffers = 1 << (min(fit, d.buffers).bit_length() - 1)
        extra += ["--buffers", str(buffers), "--max-buffers", str(fit)]
    return nofile, memlock, extra


def _under_unit_limits(argv: list[str], nofile: int, memlock: int) -> list[str]:
    """argv as the unit runs it: its two limits, and no CAP_IPC_LOCK (the unit's
    DynamicUser has none), without which locked memory is not counted at all."""
    return ["prlimit", f"--nofile={nofile}:{nofile}", f"--memlock={memlock}:{memlock}",
            "setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", *argv]


def _cannot_run_limited() -> str:
    if not (shutil.which("prlimit") and shutil.which("setpriv")):
        return "needs prlimit and setpriv (util-linux)"
    if os.geteuid() != 0:
        return "needs root, to drop CAP_IPC_LOCK and set the unit's limits"
    return ""


@pytest.mark.skipif(bool(_cannot_run_limited()), reason=_cannot_run_limited() or "-")
@pytest.mark.time_limit(90)
@pytest.mark.parametrize("mode", ["auto", "splice"])
def test_defaults_run_on_io_uring_within_the_unit_limits(echo_server, mode):
    """At the unit's limits the defaults start on io_uring with every fd they need,
    and zero-copy sends register their buffers: no rlimit shortfall, no fallback."""
    nofile, memlock, extra = _limits()
    p = ProxyProcess(_under_unit_limits(
        proxy_argv("127.0.0.1:0", echo_server.addr, "auto", mode, *extra), nofile, memlock))
    try:
        assert p.listening["backend"] == "uring", p.stderr_text()
        for seed in range(3):
            with connect(p.listen_addr) as c:
                send_stream(c, seed, 1 << 20)
                recv_stream(c, seed, 1 << 20, what=f"echo {seed}")
        p.wait_for_close(3, 10)
    finally:
        assert p.stop() == 0, p.stderr_text()
    text = p.stderr_text()
    assert "rlimit " not in text and "fallback " not in text, text
    st = [e for e in p.lines if e["event"] == "stopped"][-1]
    if mode == "auto":
        assert int(st["zc_registered_bufs"]) > 0, st
    assert not p.problems(), p.problems()
