"""Byte-exact transfers through the proxy, both directions at once, verified by content.

Each test connects a client to the proxy and queues a handler on a threaded upstream;
client and upstream each send one deterministic pattern and verify the other's, then
each side sees a clean EOF right after the last byte. The close line must count exactly
the bytes delivered and say cause=normal.
"""
import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import HAS_IPV6
from netutil import BgThread, connect, duplex, fmt_addr, recv_stream, send_stream

MiB = 1 << 20


def transfer(proxy_proc, srv, c2u: int, u2c: int, *, seed: int = 1, client_opts=None,
             upstream_opts=None, timeout: float = 120.0):
    """One connection moving ``c2u`` bytes up and ``u2c`` bytes down at the same time.
    Returns the proxy's close line for it."""
    up_seed, down_seed = seed * 2 + 1000, seed * 2 + 1001
    fut = srv.serve_next(lambda conn: duplex(
        conn, send_seed=down_seed, send_total=u2c, recv_seed=up_seed, recv_total=c2u,
        what="upstream", timeout=timeout, **(upstream_opts or {})))
    with connect(proxy_proc.listen_addr) as c:
        client_addr = fmt_addr(c.getsockname())
        duplex(c, send_seed=up_seed, send_total=c2u, recv_seed=down_seed, recv_total=u2c,
               what="client", timeout=timeout, **(client_opts or {}))
        fut.result(timeout)
    close = proxy_proc.close_for(client_addr)
    assert close["cause"] == "normal", close
    assert (close["bytes_c2u"], close["bytes_u2c"]) == (c2u, u2c), close
    assert close["upstream"] == srv.addr, close
    return close


EXACT = [(1, 1), (1, 0), (0, 1), (0, 0),
         (4095, 65537), (65536, 65536), (MiB + 3, 3 * MiB + 5), (8 * MiB, 0), (0, 8 * MiB)]


def test_exact_transfer(proxy, upstream):
    """Every size pair of EXACT through one proxy, a connection each: the proxy's
    start and stop once, not once per pair (the suite runs this in every variant)."""
    srv = upstream()
    p = proxy(srv.addr)
    for seed, (c2u, u2c) in enumerate(EXACT, start=1):
        transfer(p, srv, c2u, u2c, seed=seed)


@pytest.mark.time_limit(200)
def test_256mib_both_directions(proxy, upstream):
    srv = upstream()
    p = proxy(srv.addr)
    transfer(p, srv, 256 * MiB, 256 * MiB, seed=7, timeout=150)


def test_sequential_connections_reuse_state(proxy, upstream):
    """Many short connections one after another: slot reuse must not mix up flows."""
    srv = upstream()
    p = proxy(srv.addr)
    for i in range(40):
        transfer(p, srv, 1 + 977 * i, 1 + 1531 * i, seed=100 + i)
    assert len(p.closes()) == 40


_sizes = st.one_of(st.integers(0, 16), st.integers(0, 70_000), st.integers(0, MiB))
_chunks = st.lists(st.integers(1, 200_000), max_size=12)
_pauses = st.lists(st.sampled_from([0.0, 0.0, 0.001, 0.005]), max_size=12)


# 100 examples in each variant under make test-full, 50 under make test (its budget).
@settings(max_examples=100 if os.environ.get("URING_NET_TEST_FULL") else 50, deadline=None,
          derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(c2u=_sizes, u2c=_sizes, c_chunks=_chunks, u_chunks=_chunks, c_pauses=_pauses,
       u_pauses=_pauses, c_recv=_chunks, u_recv=_chunks)
def test_random_chunking(proxy, upstream, c2u, u2c, c_chunks, u_chunks, c_pauses, u_pauses,
                         c_recv, u_recv):
    """Random write and read sizes with short pauses on both ends, both ways at once.

    One proxy serves all examples of a run (each example is a new connection)."""
    if not hasattr(proxy, "_hyp"):
        srv = upstream()
        proxy._hyp = (proxy(srv.addr), srv)
    p, srv = proxy._hyp
    transfer(p, srv, c2u, u2c, seed=len(p.closes()) + 1,
             client_opts=dict(send_chunks=c_chunks, send_pauses=c_pauses, recv_sizes=c_recv),
             upstream_opts=dict(send_chunks=u_chunks, send_pauses=u_pauses, recv_sizes=u_recv))


def test_server_speaks_first(proxy, upstream):
    """The upstream sends a banner before the client says anything, then a request and a
    response follow; the proxy must not wait for client data before reading upstream."""
    srv = upstream()
    p = proxy(srv.addr)
    banner, request, response = 100_000, 5_000, 300_000

    def server(conn):
        send_stream(conn, 11, banner, shutdown=False)
        recv_stream(conn, 12, request, expect_eof=False, what="upstream request")
        send_stream(conn, 13, response)
        recv_stream(conn, 14, 0, what="upstream after response")  # then the client's EOF

    fut = srv.serve_next(server)
    with connect(p.listen_addr) as c:
        addr = fmt_addr(c.getsockname())
        recv_stream(c, 11, banner, expect_eof=False, what="client banner")
        send_stream(c, 12, request, shutdown=False)
        recv_stream(c, 13, response, what="client response")
        c.shutdown(socket.SHUT_WR)
        fut.result(30)
    close = p.close_for(addr)
    assert (close["bytes_c2u"], close["bytes_u2c"], close["cause"]) == \
        (request, banner + response, "normal"), close


def test_server_speaks_first_client_silent(proxy, upstream):
    """A client that never sends: the banner and the upstream's EOF still arrive."""
    srv = upstream()
    p = proxy(srv.addr)
    fut = srv.serve_next(lambda conn: (send_stream(conn, 21, 4096),
                                       recv_stream(conn, 22, 0, what="upstream")))
    with connect(p.listen_addr) as c:
        addr = fmt_addr(c.getsockname())
        recv_stream(c, 21, 4096, what="client banner")
        c.shutdown(socket.SHUT_WR)
        fut.result(30)
    close = p.close_for(addr)
    assert (close["bytes_c2u"], close["bytes_u2c"], close["cause"]) == (0, 4096, "normal"), close


@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback (::1) on this machine")
# Mode-independent: the address family matters only to listen, accept and connect, not the data path.
@pytest.mark.parametrize("mode", ["copy"])
@pytest.mark.parametrize("listen_host,upstream_host", [
    ("::1", "::1"), ("::1", "127.0.0.1"), ("127.0.0.1", "::1")], ids=["6to6", "6to4", "4to6"])
def test_ipv6_transfer(proxy, upstream, listen_host, upstream_host):
    srv = upstream(upstream_host)
    listen = f"[{listen_host}]:0" if ":" in listen_host else f"{listen_host}:0"
    p = proxy(srv.addr, listen=listen)
    assert p.listen_addr.startswith(listen[:-1]), p.listening
    assert p.listening["upstream"] == srv.addr, p.listening
    close = transfer(p, srv, 3 * MiB + 1, 2 * MiB + 7, seed=31)
    assert close["client"].startswith(listen[:-2]), close


def test_concurrent_bulk_flows(proxy, echo_server):
    """Several large flows at once through an echo upstream, each streaming up while its
    echo streams down: bytes must not mix across connections."""
    p = proxy(echo_server.addr)

    def flow(i):
        size = 4 * MiB + 4099 * i
        with connect(p.listen_addr) as c:
            addr = fmt_addr(c.getsockname())
            duplex(c, send_seed=50 + i, send_total=size, recv_seed=50 + i, recv_total=size,
                   send_chunks=[1 + 977 * i], what=f"flow {i}")
        return addr, size

    threads = [BgThread(flow, i, name=f"flow{i}") for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        addr, size = t.result(120)
        close = p.close_for(addr)
        assert (close["bytes_c2u"], close["bytes_u2c"], close["cause"]) == \
            (size, size, "normal"), close
