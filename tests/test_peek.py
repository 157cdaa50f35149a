"""--mode peek: the client's bytes stay in its socket until delivered.

Every behaviour test also runs in peek mode (conftest MODES); these check what only this
mode has: delivered bytes are dropped from the client's socket (MSG_TRUNC) and counted,
an upstream that resets before answering is replaced by the next --upstream with the
client's bytes replayed, replay stops once the held bytes pass the replay window, and a
kernel without SO_PEEK_OFF on TCP is refused with a clear error.
"""
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from netutil import (Pattern, Verifier, connect, duplex, expect_reset, fmt_addr,
                     recv_exact, reset_close)

peek_only = pytest.mark.parametrize("mode", ["peek"])


def stopped_event(p) -> dict:
    assert p.stop() == 0
    return [e for e in p.lines if e["event"] == "stopped"][-1]


def read_then_reset(n: int):
    """An upstream that takes the first n bytes, checks them, and resets unanswered."""
    def handler(conn):
        v = Verifier(1, n, "bytes the failing upstream took")
        recv_exact(conn, v, n)
        reset_close(conn)
        return n
    return handler


@peek_only
def test_delivered_bytes_are_consumed_from_the_client(proxy, echo_server):
    p = proxy(echo_server.addr, log_format="json")
    n = 3 << 20
    with connect(p.listen_addr) as c:
        duplex(c, send_seed=3, send_total=n, recv_seed=3, recv_total=n)
    p.wait_for_close(1, 10)
    st = stopped_event(p)
    assert st["bytes_c2u"] == n and st["consumed_bytes"] == n, st
    assert st["replayed_bytes"] == 0, st


@peek_only
@pytest.mark.parametrize("size", [1, 20_000])
def test_upstream_reset_before_answering_is_replayed_to_the_next(proxy, upstream,
                                                                 echo_server, size):
    """The first upstream reads the whole request and resets without a word. The bytes
    are still in the client's socket, so the proxy connects to the next upstream and
    sends them again: the client gets its full answer and never sees the reset."""
    failing = upstream()
    took = failing.serve_next(read_then_reset(size))
    p = proxy(failing.addr, "--upstream", echo_server.addr, log_format="json")
    with connect(p.listen_addr) as c:
        client = fmt_addr(c.getsockname())
        duplex(c, send_seed=1, send_total=size, recv_seed=1, recv_total=size)
    assert took.result(10) == size
    line = p.close_for(client)
    assert (line["cause"], line["upstream"], line["failovers"]) == \
        ("normal", echo_server.addr, 1), line
    assert line["bytes_c2u"] == size and line["bytes_u2c"] == size, line
    st = stopped_event(p)
    assert st["replayed_bytes"] == size and st["failovers"] == 1, st


@peek_only
def test_no_replay_once_the_held_bytes_pass_the_window(proxy, upstream, echo_server):
    """Past the replay window the delivered bytes are consumed (holding more could stall
    a client whose upstream reads everything before it answers). After that, an upstream
    reset cannot be hidden: the client is reset, and the next upstream is never tried."""
    size = 1 << 20
    failing = upstream()
    failing.serve_next(read_then_reset(size))
    p = proxy(failing.addr, "--upstream", echo_server.addr, "--replay-window", "16384",
              log_format="json")
    with connect(p.listen_addr) as c:
        client = fmt_addr(c.getsockname())
        c.sendall(Pattern(1).slice(0, size))
        expect_reset(c, 10.0)
    line = p.close_for(client)
    assert (line["cause"], line["upstream"]) == ("upstream_reset", failing.addr), line
    assert "failovers" not in line, line
    assert echo_server.accepted == 0


def run_proxy_expecting_failure(mode: str, disabled: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, URING_NET_DISABLE=disabled)
    return subprocess.run([sys.executable, "-m", "uring_net", "--listen", "127.0.0.1:0",
                           "--upstream", "127.0.0.1:9", "--mode", mode],
                          cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=15)


def test_peek_mode_is_refused_without_so_peek_off():
    r = run_proxy_expecting_failure("peek", "peek_off")
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("uring-proxy: error: --mode peek needs"), r.stderr
    assert "SO_PEEK_OFF" in lines[0] and "6.9" in lines[0], lines
