"""Upstream connect failures: refused and unanswered.

The client's connection was accepted before the upstream connect failed, so the proxy
must close it promptly (EOF or reset) and log why.
"""
import time

import pytest

from netutil import connect, expect_closed, fmt_addr, reset_close


# Mode-independent: in every mode no client byte is read before the upstream connect succeeds.
@pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"])
@pytest.mark.parametrize("mode", ["copy"])
@pytest.mark.parametrize("client_sends", [0, 1000])
def test_upstream_refused(proxy, refusing_upstream, client_sends):
    """Nothing listens at the upstream address: the client is closed within 2 s."""
    p = proxy(refusing_upstream.addr)
    with connect(p.listen_addr) as c:
        addr = fmt_addr(c.getsockname())
        if client_sends:
            c.sendall(b"x" * client_sends)
        t0 = time.monotonic()
        how = expect_closed(c, 2.0)
        elapsed = time.monotonic() - t0
    assert how in ("eof", "reset") and elapsed < 2.0
    close = p.close_for(addr)
    assert close["cause"] == "upstream_refused", close
    assert close.get("error") == "ECONNREFUSED", close
    assert close["upstream"] == refusing_upstream.addr, close
    assert (close["bytes_c2u"], close["bytes_u2c"]) == (0, 0), close


# Mode-independent: connect + linked timeout are the same SQEs in every mode, and no byte moves.
@pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"])
@pytest.mark.parametrize("mode", ["copy"])
def test_connect_timeout(proxy, blackhole_upstream):
    """The upstream never answers the SYN; with --connect-timeout 1 the client is closed
    after about a second (not before), and within 3 s."""
    p = proxy(blackhole_upstream.addr, "--connect-timeout", "1")
    with connect(p.listen_addr) as c:
        addr = fmt_addr(c.getsockname())
        t0 = time.monotonic()
        expect_closed(c, 3.0)
        elapsed = time.monotonic() - t0
    assert 0.8 <= elapsed < 3.0, f"closed after {elapsed:.2f} s"
    close = p.close_for(addr)
    assert close["cause"] == "connect_timeout", close
    assert 800 <= close["duration_ms"] < 3000, close
    assert (close["bytes_c2u"], close["bytes_u2c"]) == (0, 0), close


def test_failed_connects_release_everything(proxy, refusing_upstream):
    """Twenty refused connections, five at a time: afterwards the proxy holds as
    many fds as when idle, and keeps accepting."""
    p = proxy(refusing_upstream.addr)
    idle_fds = p.fd_count()
    for _ in range(4):
        socks = [connect(p.listen_addr) for _ in range(5)]
        for s in socks:
            expect_closed(s, 2.0)
            s.close()
    closes = p.wait_for_close(20, 10)
    assert {c["cause"] for c in closes} == {"upstream_refused"}, closes
    assert p.wait_fd_count(idle_fds, 5) == idle_fds, \
        f"fds: {p.fd_count()} after the failures, {idle_fds} idle"


# Mode-independent: as test_connect_timeout (test_failed_connects_release_everything: per-mode release).
@pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"])
@pytest.mark.parametrize("mode", ["copy"])
def test_concurrent_connect_timeouts(proxy, blackhole_upstream):
    """Several flows waiting on the same dead upstream each time out on their own."""
    p = proxy(blackhole_upstream.addr, "--connect-timeout", "1")
    idle_fds = p.fd_count()
    socks = [connect(p.listen_addr) for _ in range(8)]
    t0 = time.monotonic()
    for s in socks:
        expect_closed(s, 4.0)
        s.close()
    assert time.monotonic() - t0 < 4.0
    closes = p.wait_for_close(8, 5)
    assert [c["cause"] for c in closes] == ["connect_timeout"] * 8, closes
    assert p.wait_fd_count(idle_fds, 5) == idle_fds


def test_client_reset_right_after_connect(proxy, echo_server):
    """Clients that connect and abort at once, before any byte: each flow is logged as a
    client reset, the upstream side is not left open, and no fd is kept."""
    p = proxy(echo_server.addr)
    idle_fds = p.fd_count()
    addrs = []
    for _ in range(20):
        c = connect(p.listen_addr)
        addrs.append(fmt_addr(c.getsockname()))
        reset_close(c)
    closes = p.wait_for_close(len(addrs), 10)
    assert [(c["cause"], c["bytes_c2u"], c["bytes_u2c"]) for c in closes] == \
        [("client_reset", 0, 0)] * len(addrs), closes
    # The accept already told the proxy who the client is, even if it is gone by now.
    wrong = [c["client"] for c in closes if c["client"] not in addrs]
    assert not wrong, (f"{len(wrong)} of {len(addrs)} close lines name a client that did "
                       f"not connect: {wrong[:5]}")
    assert p.wait_fd_count(idle_fds, 5) == idle_fds
    deadline = time.monotonic() + 5
    while echo_server.open and time.monotonic() < deadline:
        time.sleep(0.05)
    assert echo_server.open == 0, f"{echo_server.open} upstream connections left open"
