"""SIGTERM and SIGINT: close what is held, print `stopped`, exit 0."""
import os
import signal
import time

import pytest

from netutil import (Verifier, connect, expect_closed, fmt_addr, recv_exact, recv_stream,
                     send_stream)

N_OPEN = 5
SIZE = 10_000


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_with_open_connections(proxy, echo_server, sig):
    p = proxy(echo_server.addr)
    clients = []
    try:
        for i in range(N_OPEN):
            c = connect(p.listen_addr)
            clients.append(c)
            send_stream(c, 40 + i, SIZE, shutdown=False)
            recv_exact(c, Verifier(40 + i, SIZE, f"client {i} echo"), SIZE)
        addrs = [fmt_addr(c.getsockname()) for c in clients]
        t0 = time.monotonic()
        rc = p.stop(sig)
        elapsed = time.monotonic() - t0
        assert rc == 0, f"exit status {rc}; stderr:\n{p.stderr_text()}"
        assert elapsed < 5, f"took {elapsed:.1f} s to stop"
        for c in clients:
            assert expect_closed(c, 5) in ("eof", "reset")
    finally:
        for c in clients:
            c.close()
    stopped = [e for e in p.lines if e["event"] == "stopped"]
    assert len(stopped) == 1, p.stderr_text()
    assert stopped[0]["connections"] == N_OPEN, stopped
    assert (stopped[0]["bytes_c2u"], stopped[0]["bytes_u2c"]) == (N_OPEN * SIZE,) * 2, stopped
    for a in addrs:
        close = p.close_for(a, timeout=0)
        assert close["cause"] == "proxy_shutdown", close
        assert (close["bytes_c2u"], close["bytes_u2c"]) == (SIZE, SIZE), close
    assert p.lines[-1]["event"] == "stopped", "stopped must be the last line"


def test_stopped_totals_match_close_lines(proxy, echo_server):
    p = proxy(echo_server.addr)
    sizes = [1, 70_000, 1 << 20]
    for i, n in enumerate(sizes):
        with connect(p.listen_addr) as c:
            send_stream(c, 60 + i, n)
            recv_stream(c, 60 + i, n, what=f"echo {i}")
    closes = p.wait_for_close(len(sizes), 10)
    assert p.stop() == 0
    stopped = [e for e in p.lines if e["event"] == "stopped"]
    assert len(stopped) == 1, p.stderr_text()
    assert stopped[0]["connections"] == len(sizes), stopped
    assert stopped[0]["bytes_c2u"] == sum(c["bytes_c2u"] for c in closes) == sum(sizes)
    assert stopped[0]["bytes_u2c"] == sum(c["bytes_u2c"] for c in closes) == sum(sizes)


# Mode-independent: serve() installs handlers and wakeup fd for every mode; no flow exists yet.
@pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"])
@pytest.mark.parametrize("mode", ["copy"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_right_after_start(proxy, echo_server, sig):
    """A signal sent as soon as the `listening` line is out must still stop the proxy
    cleanly: a script may start the proxy, read the port and stop it at once, so the
    handlers have to be in place before the proxy announces itself. The window is short,
    so ten rounds (four in make test, whose budget runs this in four variants)."""
    for _ in range(10 if os.environ.get("URING_NET_TEST_FULL") else 4):
        p = proxy(echo_server.addr, signal_on_listening=sig)
        rc = p.wait_exit()
        assert rc == 0, f"exit status {rc}; stderr:\n{p.stderr_text()}"
        stopped = [e for e in p.lines if e["event"] == "stopped"]
        assert len(stopped) == 1 and stopped[0]["connections"] == 0, \
            f"no stopped line; stderr:\n{p.stderr_text()}"


# Mode-independent: the flow never gets past its connect, which is the same in every mode.
@pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"])
@pytest.mark.parametrize("mode", ["copy"])
def test_signal_during_pending_connect(proxy, blackhole_upstream):
    """A flow stuck in its upstream connect must not delay the shutdown."""
    p = proxy(blackhole_upstream.addr, "--connect-timeout", "30")
    with connect(p.listen_addr) as c:
        addr = fmt_addr(c.getsockname())
        time.sleep(0.5)  # the proxy has accepted and is connecting
        t0 = time.monotonic()
        assert p.stop() == 0, p.stderr_text()
        assert time.monotonic() - t0 < 5
        assert expect_closed(c, 5) in ("eof", "reset")
    close = p.close_for(addr, timeout=0)
    assert close["cause"] == "proxy_shutdown", close
    assert any(e["event"] == "stopped" for e in p.lines)
