"""io_uring blocked the way users meet it: a seccomp profile answering io_uring_setup
with EPERM (Docker 25+ and Kubernetes' default profiles do). tests/seccomp_deny_uring.py
installs such a filter and execs the command; the proxy must say why in one line."""
import os
import socket
import subprocess
import sys
import threading

import pytest

from conftest import REPO_ROOT, ProxyProcess
from netutil import Pattern, Verifier, connect, recv_exact

HELPER = str(REPO_ROOT / "tests" / "seccomp_deny_uring.py")


def run_denied(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, HELPER, sys.executable, "-m", "uring_net", *args],
                          cwd=REPO_ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=30)


def test_the_helper_really_blocks_io_uring_setup():
    """Without this the tests below could pass for another reason."""
    code = ("import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
            "p = ctypes.create_string_buffer(120); "
            "r = libc.syscall(425, 4, p); print(r, ctypes.get_errno())")
    r = subprocess.run([sys.executable, HELPER, sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["-1", "1"], r.stdout      # -1, EPERM
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    ret = int(ok.stdout.split()[0])
    assert ret >= 0, f"io_uring_setup fails here even without the filter: {ok.stdout}"


def test_uring_backend_under_seccomp_exits_naming_the_cause():
    r = run_denied("--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--backend", "uring")
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("uring-proxy: error: io_uring is unavailable"), lines
    assert "EPERM" in lines[0] and "seccomp" in lines[0], lines


def test_probe_under_seccomp_reports_io_uring_unavailable():
    r = run_denied("--probe")
    assert r.returncode == 0, r.stderr
    rows = {line.split("  ")[0].strip(): line for line in r.stdout.splitlines()}
    assert "NO" in rows["io_uring_setup"] and "seccomp" in rows["io_uring_setup"], r.stdout
    assert "backend uring: UNAVAILABLE" in r.stdout, r.stdout


# --- --backend auto: the same proxy, on epoll, saying why ---------------------------

MODES = ["copy", "zerocopy", "auto", "splice", "peek"]


def _echo_through(p: ProxyProcess, seed: int, n: int = 300_000) -> None:
    with connect(p.listen_addr) as s:
        t = threading.Thread(target=s.sendall, args=(Pattern(seed).slice(0, n),))
        t.start()
        recv_exact(s, Verifier(seed, n), n)
        t.join()
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""


@pytest.mark.parametrize("err,reason", [("EPERM", "seccomp"), ("ENOSYS", "ENOSYS")])
@pytest.mark.parametrize("mode", MODES)
def test_auto_backend_under_seccomp_serves_on_epoll_and_says_why(echo_server, mode, err, reason):
    """Docker's profile answers EPERM; a kernel without io_uring, ENOSYS. Either way
    --backend auto (the default) must serve on epoll and say so once, naming the cause."""
    argv = [sys.executable, HELPER, "--errno", err, sys.executable, "-m", "uring_net",
            "--listen", "127.0.0.1:0", "--upstream", echo_server.addr, "--mode", mode]
    p = ProxyProcess(argv)
    try:
        assert p.listening["backend"] == "epoll", p.listening
        fallbacks = [l for l in p.raw_lines if l.startswith("fallback feature=io_uring ")]
        assert len(fallbacks) == 1, p.raw_lines
        assert err in fallbacks[0] and reason in fallbacks[0] and "using=" in fallbacks[0], fallbacks
        for seed in range(3):
            _echo_through(p, seed)
        p.wait_for_close(3, 10)
    finally:
        rc = p.stop()
    assert rc == 0, p._tail()
    st = [e for e in p.lines if e["event"] == "stopped"][-1]
    assert (st["bytes_c2u"], st["bytes_u2c"], st["buffers_out"]) == (900_000, 900_000, 0), st
    assert not p.problems(), p.problems()


def test_auto_backend_takes_epoll_when_the_mode_needs_a_missing_operation(echo_server):
    """io_uring works but lacks what the mode needs (SPLICE here, declared missing the way
    the tests declare features missing): auto runs the mode on epoll instead of refusing."""
    argv = [sys.executable, "-m", "uring_net", "--listen", "127.0.0.1:0",
            "--upstream", echo_server.addr, "--mode", "splice"]
    p = ProxyProcess(argv, disabled="splice")
    try:
        assert p.listening["backend"] == "epoll", p.listening
        fallbacks = [l for l in p.raw_lines if l.startswith("fallback feature=io_uring ")]
        assert len(fallbacks) == 1 and "SPLICE" in fallbacks[0], p.raw_lines
        _echo_through(p, 7)
        p.wait_for_close(1, 10)
    finally:
        assert p.stop() == 0, p._tail()
    # The same declaration with --backend uring keeps its one-line refusal.
    r = subprocess.run([*argv, "--backend", "uring"], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=30, env={**os.environ, "URING_NET_DISABLE": "splice"})
    assert r.returncode == 1 and "SPLICE" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_auto_backend_takes_epoll_when_locked_memory_cannot_hold_the_buffer_ring(echo_server):
    """Without CAP_IPC_LOCK the rings and the provided-buffer ring count against
    RLIMIT_MEMLOCK. With a limit the rings fit in (about 200 KiB for 64 flows) but a
    ring of 32,768 buffers (512 KiB) does not, auto must serve on epoll and say why in
    one line; it exited 1 when the engine met ENOMEM. --backend uring names the limit.
    One worker: each worker has rings of its own, and a second would not fit either."""
    import shutil
    if os.geteuid() != 0 or not (shutil.which("prlimit") and shutil.which("setpriv")):
        pytest.fail("needs root, prlimit and setpriv (util-linux) to drop CAP_IPC_LOCK")
    limit = 384 << 10
    pre = ["prlimit", f"--memlock={limit}:{limit}", "setpriv", "--inh-caps=-ipc_lock",
           "--bounding-set=-ipc_lock"]
    args = [sys.executable, "-m", "uring_net", "--listen", "127.0.0.1:0", "--upstream",
            echo_server.addr, "--workers", "1", "--max-conns", "64", "--max-buffers", "32768"]
    p = ProxyProcess([*pre, *args])
    try:
        assert p.listening["backend"] == "epoll", p.listening
        fallbacks = [l for l in p.raw_lines if l.startswith("fallback feature=io_uring ")]
        assert len(fallbacks) == 1 and "ENOMEM" in fallbacks[0] and "RLIMIT_MEMLOCK" in fallbacks[0], \
            p.raw_lines
        _echo_through(p, 3)
        p.wait_for_close(1, 10)
    finally:
        assert p.stop() == 0, p._tail()
    r = subprocess.run([*pre, *args, "--backend", "uring"], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1 and "RLIMIT_MEMLOCK" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # The control: with room for it, the same command runs on io_uring.
    roomy = 4 << 20
    p = ProxyProcess(["prlimit", f"--memlock={roomy}:{roomy}", *pre[2:], *args])
    try:
        assert p.listening["backend"] == "uring", p.listening
    finally:
        assert p.stop() == 0, p._tail()


def test_auto_backend_uses_io_uring_where_it_works(echo_server):
    p = ProxyProcess([sys.executable, "-m", "uring_net", "--listen", "127.0.0.1:0",
                      "--upstream", echo_server.addr])
    try:
        assert p.listening["backend"] == "uring", p.listening
        assert not [l for l in p.raw_lines if l.startswith("fallback feature=io_uring")]
    finally:
        assert p.stop() == 0, p._tail()


def test_probe_says_what_auto_would_pick_and_why():
    r = run_denied("--probe")
    assert "backend auto: epoll, because io_uring_setup failed: EPERM" in r.stdout, r.stdout
    assert "backend epoll: available" in r.stdout, r.stdout
    r = subprocess.run([sys.executable, "-m", "uring_net", "--probe"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "URING_NET_DISABLE": "splice"})
    assert "backend auto, --mode splice: epoll, because io_uring lacks" in r.stdout, r.stdout
    assert "backend auto, --mode copy: uring" in r.stdout, r.stdout


def test_demo_under_seccomp_runs_on_epoll():
    """`make run` on a host whose seccomp profile blocks io_uring: the demo still runs,
    on the epoll backend, and says so."""
    r = run_denied("demo", "--connections", "4", "--bytes", str(1 << 20))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert "epoll backend" in r.stdout and "verified: yes" in r.stdout, r.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a private mount namespace (make test runs as root)")
@pytest.mark.skipif(not os.path.exists("/proc/sys/kernel/io_uring_disabled"),
                    reason="the kernel has no kernel.io_uring_disabled (added in 6.6)")
@pytest.mark.parametrize("value", ["1", "2"])
def test_auto_backend_names_io_uring_disabled(echo_server, tmp_path, value):
    """kernel.io_uring_disabled=1 or 2 makes io_uring_setup fail with EPERM. The knob is
    machine-wide, so the test does not set it: in a private mount namespace a file holding
    the value is bound over /proc/sys/kernel/io_uring_disabled, and the seccomp helper
    gives the EPERM the kernel would give. The proxy must name the knob, not seccomp."""
    knob = tmp_path / "io_uring_disabled"
    knob.write_text(value + "\n")
    script = ('mount --bind "$1" /proc/sys/kernel/io_uring_disabled && shift && exec "$@"')
    argv = ["unshare", "-m", "sh", "-c", script, "sh", str(knob), sys.executable, HELPER,
            sys.executable, "-m", "uring_net", "--listen", "127.0.0.1:0", "--upstream", echo_server.addr]
    p = ProxyProcess(argv)
    try:
        assert p.listening["backend"] == "epoll", p.listening
        fallbacks = [l for l in p.raw_lines if l.startswith("fallback feature=io_uring ")]
        assert len(fallbacks) == 1 and f"kernel.io_uring_disabled={value}" in fallbacks[0], p.raw_lines
        _echo_through(p, 11)
    finally:
        assert p.stop() == 0, p._tail()
