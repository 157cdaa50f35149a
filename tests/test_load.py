"""Resource bounds under load: a slow reader, 1,000 concurrent flows, idle flows.

Memory and fds are read from /proc/PID of the proxy process itself.
"""
import socket
import threading
import time

import pytest

from conftest import NOFILE_LIMIT
from netutil import (IO_TIMEOUT, BgThread, LoadClient, Verifier, connect, duplex,
                     expect_closed, fmt_addr,
                     recv_exact, recv_stream, send_stream)

MiB = 1 << 20


class RssSampler:
    """Samples the proxy's VmRSS every ``period`` seconds on a thread."""

    def __init__(self, proxy_proc, period: float = 0.02):
        self.p, self.period = proxy_proc, period
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._t = BgThread(self._run, name="rss-sampler")
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(self.p.rss_kib())
            self._stop.wait(self.period)

    def stop(self) -> int:
        self._stop.set()
        self._t.result(5)
        return max(self.samples)


@pytest.mark.time_limit(200)
@pytest.mark.epoll_modes("copy", "splice")
def test_slow_reader_memory_bounded(proxy, upstream):
    """512 MiB client->upstream while the upstream reads 4 KiB every 10 ms for 1 s, then
    fast. The proxy's RSS must stay below idle + its buffer pool + 64 MiB throughout:
    backpressure has to stop reading from the client, not queue in user space (the
    client sends at loopback speed: a proxy without it would pass the bound within
    the first tenth of that second)."""
    buffers, buffer_size = 256, 16384
    srv = upstream()
    p = proxy(srv.addr, "--buffers", str(buffers), "--buffer-size", str(buffer_size))
    idle_kib = p.rss_kib()
    bound_kib = idle_kib + buffers * buffer_size // 1024 + 64 * 1024
    total = 512 * MiB

    def server(conn):
        v = Verifier(71, total, "upstream")
        slow_until = time.monotonic() + 1.0
        while time.monotonic() < slow_until:
            recv_exact(conn, v, 4096)
            time.sleep(0.01)
        slow_bytes = v.received
        while True:  # fast: the rest, then EOF
            data = conn.recv(MiB)
            if not data:
                v.at_eof()
                return slow_bytes, v.received
            v.feed(data)

    fut = srv.serve_next(server)
    sampler = RssSampler(p)
    try:
        with connect(p.listen_addr) as c:
            addr = fmt_addr(c.getsockname())
            send_stream(c, 71, total)
            slow_bytes, got = fut.result(120)
            assert expect_closed(c, 10) == "eof"
    finally:
        peak_kib = sampler.stop()
    assert got == total
    assert peak_kib <= bound_kib, (
        f"RSS peaked at {peak_kib} KiB; idle {idle_kib} KiB, bound {bound_kib} KiB "
        f"({len(sampler.samples)} samples)")
    close = p.close_for(addr)
    assert (close["bytes_c2u"], close["bytes_u2c"], close["cause"]) == (total, 0, "normal"), close


N_CONNS = 1000
WARMUP = 50


@pytest.mark.skipif(NOFILE_LIMIT < 5 * N_CONNS,
                    reason=f"RLIMIT_NOFILE hard limit too low for {N_CONNS} proxied connections")
@pytest.mark.time_limit(200)
@pytest.mark.epoll_modes("copy")    # (every mode in make test-full)
def test_thousand_concurrent_connections(proxy, echo_server):
    """1,000 connections open at the same moment, each echoing its own verified payload.
    Afterwards the proxy's fds are back to idle and its RSS near the post-warm-up value."""
    buffers, buffer_size = 1024, 16384
    p = proxy(echo_server.addr, "--buffers", str(buffers), "--buffer-size", str(buffer_size))
    LoadClient(p.listen_addr, [4096 + 997 * i for i in range(WARMUP)], seed_base=10_000).run(30)
    warm = p.wait_for_close(WARMUP, 20)
    assert {c["cause"] for c in warm} == {"normal"}, warm
    idle_fds = p.fd_count()
    base_kib = p.rss_kib()

    sizes = [1 + (i * 7919) % 65536 for i in range(N_CONNS)]
    lc = LoadClient(p.listen_addr, sizes, seed_base=20_000)
    t0 = time.monotonic()
    lc.run(120)
    elapsed = time.monotonic() - t0
    assert echo_server.peak_open >= N_CONNS, \
        f"only {echo_server.peak_open} upstream connections were open at once"

    closes = p.wait_for_close(WARMUP + N_CONNS, 30)[WARMUP:]
    by_client = {c["client"]: c for c in closes}
    assert len(by_client) == N_CONNS, "close lines with duplicate client addresses"
    bad = [(addr, n, by_client.get(addr)) for addr, n in zip(lc.client_addrs, sizes)
           if (by_client.get(addr) or {}).get("cause") != "normal"
           or (by_client[addr]["bytes_c2u"], by_client[addr]["bytes_u2c"]) != (n, n)]
    assert not bad, f"{len(bad)} close lines wrong, e.g. {bad[:3]}"

    fds = p.wait_fd_count(idle_fds, 10)
    assert fds == idle_fds, f"{fds} fds after the load, {idle_fds} when idle"
    rss_kib = p.rss_kib()
    margin_kib = buffers * buffer_size // 1024 + 32 * 1024
    assert rss_kib <= base_kib + margin_kib, \
        f"RSS {rss_kib} KiB after the load, {base_kib} KiB after warm-up (margin {margin_kib})"
    assert elapsed < 60, f"1,000 echo flows took {elapsed:.1f} s"


@pytest.mark.epoll_modes("copy")    # epoll has no io-wq to park threads in (every mode in make test-full)
def test_idle_flows_do_not_park_threads(proxy, echo_server):
    """200 established flows with nothing to move must not cost a thread each (an io-wq
    worker parked on a blocking read, see docs/kernel-notes.md). Their thread count stays
    within a few of the idle count."""
    n = 200
    p = proxy(echo_server.addr)
    with connect(p.listen_addr) as c:
        send_stream(c, 80, 1000)
        recv_stream(c, 80, 1000)
    p.wait_for_close(1, 10)
    base_threads = p.threads()
    socks = []
    try:
        for i in range(n):
            s = connect(p.listen_addr)
            socks.append(s)
            send_stream(s, 100 + i, 1000, shutdown=False)
            recv_exact(s, Verifier(100 + i, 1000, f"flow {i}"), 1000)
        time.sleep(0.5)     # an io-wq worker starts with the op it takes: at once
        peak = p.threads()
        assert peak <= base_threads + 16, \
            f"{peak} threads with {n} idle flows, {base_threads} without"
        for s in socks:
            s.shutdown(socket.SHUT_WR)
        for s in socks:
            assert expect_closed(s, 10) == "eof"
    finally:
        for s in socks:
            s.close()
    closes = p.wait_for_close(n + 1, 20)
    assert {c["cause"] for c in closes} == {"normal"}


def test_max_conns_bounds_concurrent_flows(proxy, echo_server):
    """With --max-conns 2 a third connection is not served while two flows are open,
    and is served (not dropped) as soon as one of them ends."""
    p = proxy(echo_server.addr, "--max-conns", "2")
    a, b = connect(p.listen_addr), connect(p.listen_addr)
    c = None
    try:
        for i, s in enumerate((a, b)):
            send_stream(s, 90 + i, 1000, shutdown=False)
            recv_exact(s, Verifier(90 + i, 1000, f"flow {i}"), 1000)
        c = connect(p.listen_addr)  # completes in the kernel's backlog
        send_stream(c, 92, 1000)
        c.settimeout(0.5)
        with pytest.raises(TimeoutError):
            c.recv(1)  # a third flow is not being served
        c.settimeout(IO_TIMEOUT)
        assert echo_server.accepted == 2
        a.shutdown(socket.SHUT_WR)
        assert expect_closed(a, 5) == "eof"
        recv_stream(c, 92, 1000, what="third flow, once a slot was free")  # then EOF
    finally:
        for s in (a, b, c):
            if s is not None:
                s.close()
    closes = p.wait_for_close(3, 10)
    assert echo_server.peak_open <= 2
    assert {e["cause"] for e in closes} == {"normal"}, closes


def test_tiny_buffer_pool_many_bulk_flows(proxy, echo_server):
    """Eight 4 MiB echo flows, both directions at once, through a pool of 16 buffers of
    4 KiB and a 16 KiB in-flight bound: running out of buffers is backpressure, and
    every flow must resume and finish byte-exact when buffers come back."""
    p = proxy(echo_server.addr, "--buffers", "16", "--buffer-size", "4096",
              "--max-inflight", "16384")
    size = 4 * MiB

    def flow(i):
        with connect(p.listen_addr) as c:
            addr = fmt_addr(c.getsockname())
            duplex(c, send_seed=300 + i, send_total=size + i, recv_seed=300 + i,
                   recv_total=size + i, what=f"flow {i}")
        return addr

    threads = [BgThread(flow, i, name=f"flow{i}") for i in range(8)]
    for t in threads:
        t.start()
    addrs = [t.result(120) for t in threads]
    for i, a in enumerate(addrs):
        close = p.close_for(a)
        assert (close["bytes_c2u"], close["bytes_u2c"], close["cause"]) == \
            (size + i, size + i, "normal"), close


@pytest.mark.epoll_modes("copy")    # (every mode in make test-full)
def test_stalled_flows_cost_no_cpu_and_no_threads(proxy, upstream):
    """200 flows whose upstream never reads: each client pushes until its socket is full,
    so the proxy holds data it cannot send and has stopped reading (backpressure), and
    many flows wait for buffers from the shared pool. Stalled like that, the proxy must
    sleep: no busy loop (CPU over 1 s near zero) and no thread per flow (docs/kernel-notes.md:
    io-wq workers parked on blocking operations). Then the upstream closes with the data
    unread, which resets every flow, and everything is released."""
    n = 200
    srv = upstream()
    hold = threading.Event()
    futs = srv.serve(lambda conn: hold.wait(60), n)
    p = proxy(srv.addr)
    base_threads = p.threads()
    chunk = b"s" * 65536
    socks = []
    try:
        for _ in range(n):
            s = connect(p.listen_addr)
            socks.append(s)
            s.setblocking(False)
            pushed = 0
            while pushed < 16 * MiB:
                try:
                    pushed += s.send(chunk)
                except BlockingIOError:
                    break
        # The proxy moves what the clients queued until the upstream's socket
        # buffers are full too (up to a second of CPU on a loaded machine): wait
        # for that, not for a fixed time, then measure the stall.
        p.wait_cpu_quiet()
        # A busy loop would take the whole second; 10% of it is the margin for
        # a loaded machine's accounting.
        cpu0 = p.cpu_seconds()
        time.sleep(1.0)
        cpu = p.cpu_seconds() - cpu0
        threads = p.threads()
        assert cpu < 0.1, f"{cpu:.2f} s of CPU in 1 s with {n} stalled flows: a busy loop"
        assert threads <= base_threads + 16, \
            f"{threads} threads with {n} stalled flows, {base_threads} before"
    finally:
        hold.set()
        for f in futs:
            f.result(60)
        for s in socks:
            s.close()
    closes = p.wait_for_close(n, 30)
    assert {c["cause"] for c in closes} <= {"upstream_reset", "client_reset"}, \
        {c["cause"] for c in closes}


@pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"])
def test_idle_memory_does_not_follow_max_conns(proxy, echo_server):
    """The flow table, the CQ and registered buffers cost memory for flows that exist,
    not for --max-conns: an idle proxy allowed a million flows starts in under 50 MB of
    RSS (Python's own share is ~17 MB), within 8 MB of one allowed 100, and serves."""
    small = proxy(echo_server.addr, "--max-conns", "100")
    big = proxy(echo_server.addr, "--max-conns", "1000000")
    for p in (small, big):
        with connect(p.listen_addr) as c:
            duplex(c, send_seed=7, send_total=MiB, recv_seed=7, recv_total=MiB)
        p.wait_for_close(1, 10)
    rss_small, rss_big = small.rss_kib(), big.rss_kib()
    assert rss_big < 50 * 1024, f"{rss_big} KiB of RSS with --max-conns 1000000"
    assert rss_big - rss_small < 8 * 1024, \
        f"--max-conns 1000000: {rss_big} KiB of RSS; --max-conns 100: {rss_small} KiB"
