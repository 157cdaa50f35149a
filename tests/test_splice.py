"""--mode splice: socket -> pipe -> socket, the bytes never in user space.

Every behaviour test also runs in splice mode (conftest MODES), the 200-stalled-flow test
included; these check what only this mode has: the pipe size, the io-wq worker cap (every
IORING_OP_SPLICE runs in an io-wq worker), and the refusal or fallback when the kernel
lacks what the mode needs.
"""
import os
import resource
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO_ROOT
from netutil import (BgThread, Pattern, Verifier, connect, duplex, recv_exact, recv_stream,
                     send_stream)

splice_only = pytest.mark.parametrize("mode", ["splice"])
MiB = 1 << 20


def run_cli(*args, disabled: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, URING_NET_DISABLE=disabled)
    return subprocess.run([sys.executable, "-m", "uring_net", "--listen", "127.0.0.1:0",
                           "--upstream", "127.0.0.1:9", *args],
                          cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=15)


def one_error_line(r: subprocess.CompletedProcess, status: int) -> str:
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == status and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("uring-proxy: error:"), r.stderr
    return lines[0]


@splice_only
def test_pipe_size_is_what_was_asked(proxy, echo_server):
    p = proxy(echo_server.addr, "--pipe-size", "65536", log_format="json")
    ev = next(e for e in p.lines if e["event"] == "splice")
    assert ev["pipe_size"] == 65536, ev
    with connect(p.listen_addr) as c:
        duplex(c, send_seed=5, send_total=8 * MiB, recv_seed=5, recv_total=8 * MiB)
    p.wait_for_close(1, 10)


@splice_only
def test_default_pipe_size_follows_max_inflight(proxy, echo_server):
    with open("/proc/sys/fs/pipe-max-size") as f:
        cap = int(f.read())
    p = proxy(echo_server.addr, "--max-inflight", str(256 * 1024), log_format="json")
    ev = next(e for e in p.lines if e["event"] == "splice")
    assert ev["pipe_size"] == min(256 * 1024, cap), ev


@splice_only
def test_io_wq_workers_stay_within_the_cap(proxy, echo_server):
    """32 bulk flows at once: on io_uring every splice is an io-wq work item, and the
    threads the proxy runs stay within --iowq-workers (bounded and unbounded pools, 2
    each) of the one Python thread. On epoll splice(2) runs in the loop: no thread at all."""
    uring = proxy.backend == "uring"
    p = proxy(echo_server.addr, *(["--iowq-workers", "2"] if uring else []), log_format="json")
    ev = next(e for e in p.lines if e["event"] == "splice")
    assert ev["iowq_workers"] == (2 if uring else "none (epoll backend)"), ev
    base = p.threads()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], p.threads())
            time.sleep(0.01)

    def flow(seed):
        with connect(p.listen_addr) as c:
            duplex(c, send_seed=seed, send_total=4 * MiB, recv_seed=seed, recv_total=4 * MiB)

    sampler = threading.Thread(target=sample)
    sampler.start()
    flows = [threading.Thread(target=flow, args=(i,)) for i in range(32)]
    for t in flows:
        t.start()
    for t in flows:
        t.join(60)
    done.set()
    sampler.join()
    p.wait_for_close(32, 20)
    if uring:
        assert peak[0] > base, "no io-wq worker was ever seen: the sampler is blind"
        assert peak[0] <= base + 4, f"{peak[0]} threads at peak, {base} idle, cap 2 + 2"
    else:
        assert peak[0] == base, f"{peak[0]} threads at peak, {base} idle: epoll needs none"


@splice_only
@pytest.mark.parametrize("backend", ["uring"])            # io-wq is io_uring's
@pytest.mark.parametrize("disabled_features", ["iowq_cap"], ids=["no-iowq_cap"])
def test_without_the_worker_cap_splice_still_runs_and_says_so(proxy, echo_server):
    p = proxy(echo_server.addr, log_format="json")
    fb = [e for e in p.lines if e["event"] == "fallback"]
    assert [e["feature"] for e in fb] == ["iowq_cap"], fb
    with connect(p.listen_addr) as c:
        duplex(c, send_seed=6, send_total=4 * MiB, recv_seed=6, recv_total=4 * MiB)
    p.wait_for_close(1, 10)


@splice_only
def test_idle_flows_hold_no_pipe_and_busy_ones_wait_for_one(proxy, echo_server):
    """A direction holds a pipe only while bytes are in it or a splice is in flight:
    60 idle flows hold their 120 sockets and nothing else (they held 360 fds). Then,
    with fds left for only 2 more pipes beside the pool's 32, every client sends
    without reading: 120 directions want a pipe, the rest wait in the fd queue (accept
    pauses, EMFILE), and once the clients read, every byte comes back in order as
    pipes return to the pool."""
    n, size = 60, 4 * MiB
    p = proxy(echo_server.addr, "--pipe-size", "65536", log_format="json")
    base = p.fd_count()
    socks = [connect(p.listen_addr) for _ in range(n)]
    try:
        for i, s in enumerate(socks):
            s.sendall(Pattern(i).slice(0, 1000))
            recv_exact(s, Verifier(i, 1000, f"flow {i}"), 1000)
        # Idle: the pool keeps 32 pipes (as at start) and closes the rest.
        assert p.wait_fd_count(base + 2 * n, 10) == base + 2 * n, \
            f"{p.fd_count() - base} fds for {n} idle flows, want {2 * n}"
        pid = p.proc.pid
        open_fds = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
        free, limit = 0, 0
        while free < 4:                      # room for exactly two new pipes
            free += limit not in open_fds
            limit += 1
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))

        # Every client sends without reading: its flow's two pipes fill (the upstream's
        # echo backs up behind the client), so every direction wants a pipe and, past
        # the pool and the two spare, waits for one.
        senders = [BgThread(send_stream, s, 100 + i, size, name=f"send{i}")
                   for i, s in enumerate(socks)]
        for t in senders:
            t.start()
        p.wait_for(lambda e: e["event"] == "accept_paused" and e["reason"] == "EMFILE", 20,
                   "a direction waiting in the fd queue for a pipe")
        readers = [BgThread(recv_stream, s, 100 + i, size, what=f"flow {i}", name=f"recv{i}")
                   for i, s in enumerate(socks)]
        for t in readers:
            t.start()
        for t in senders + readers:
            t.result(60)
    finally:
        for s in socks:
            s.close()
    closes = p.wait_for_close(n, 20)
    assert {c["cause"] for c in closes} == {"normal"}, closes


def test_splice_mode_is_refused_without_the_splice_op():
    line = one_error_line(run_cli("--backend", "uring", "--mode", "splice", disabled="splice"), 1)
    assert "--mode splice needs" in line and "SPLICE" in line, line


def test_iowq_workers_with_the_epoll_backend_is_a_usage_error():
    line = one_error_line(run_cli("--backend", "epoll", "--mode", "splice", "--iowq-workers", "2"), 2)
    assert "--iowq-workers" in line and "epoll" in line, line


@pytest.mark.parametrize("option", [["--pipe-size", "65536"], ["--iowq-workers", "2"]])
def test_splice_options_outside_splice_mode_are_usage_errors(option):
    line = one_error_line(run_cli("--mode", "copy", *option), 2)
    assert option[0] in line and "splice" in line, line
