"""An upstream pool: --balance, weights, health checks on the ring, --retries, and the
PROXY protocol header. (Balancing is the engine's choice before any driver call: make
test runs it on io_uring, make test-full on both backends.)

Balancing and health are the engine's, the same in every mode, so these run in copy mode
on both backends. Every connection's upstream is read from its close line; health changes
from the health lines (JSON logs). Waits are on log lines, never on sleeps.
"""
import ipaddress
import socket
import struct
import time

import pytest
from hypothesis import given, settings, strategies as st

from conftest import HAS_IPV6
from netutil import EchoServer, connect, expect_closed, fmt_addr



def engine_logic(test):
    """The pool is the engine's, the same in every mode: copy mode, on both backends."""
    return pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"])(
        pytest.mark.parametrize("mode", ["copy"])(test))


@pytest.fixture
def echoes():
    """Factory of echo upstreams, all closed at teardown."""
    made = []

    def make(n: int, host: str = "127.0.0.1"):
        new = [EchoServer(host) for _ in range(n)]
        made.extend(new)
        return new
    yield make
    errors = [e for s in made if not s._stop for e in s.close()]   # some a test closed
    assert not errors, errors


def one_exchange(addr: str, source: str | None = None) -> str:
    """Connect (from `source`, if given), echo a few bytes, close; the client's address."""
    host, _, port = addr.rpartition(":")
    s = socket.socket(socket.AF_INET6 if host.startswith("[") else socket.AF_INET)
    s.settimeout(5)
    if source:
        s.bind((source, 0))
    with s:
        s.connect((host.strip("[]"), int(port)))
        s.sendall(b"ping")
        got = b""
        while len(got) < 4:
            chunk = s.recv(4 - len(got))
            assert chunk, "the proxy closed before the echo came back"
            got += chunk
        assert got == b"ping"
        return fmt_addr(s.getsockname())


def upstream_of(p, client: str) -> str:
    line = p.close_for(client)
    assert line["cause"] == "normal", line
    return line["upstream"]


def pool_args(*addrs_weights, balance: str, extra=()):
    args = []
    for addr, w in addrs_weights[1:]:
        args += ["--upstream", f"{addr},weight={w}" if w != 1 else addr]
    first, w0 = addrs_weights[0]
    return (f"{first},weight={w0}" if w0 != 1 else first), ["--balance", balance, *args, *extra]


# --- balancing -----------------------------------------------------------------------

@engine_logic
def test_roundrobin_spreads_by_weight_in_turn(proxy, echoes):
    a, b, c = echoes(3)
    first, args = pool_args((a.addr, 3), (b.addr, 1), (c.addr, 1), balance="roundrobin")
    p = proxy(first, *args, log_format="json")
    assert p.listening["balance"] == "roundrobin" and p.listening["weights"] == "3,1,1"
    order = [upstream_of(p, one_exchange(p.listen_addr)) for _ in range(10)]
    # Smooth weighted round robin: 3:1:1 exactly per cycle of 5, and the heavy one
    # never three times in a row.
    assert [order.count(x.addr) for x in (a, b, c)] == [6, 2, 2], order
    assert order[:5] == [a.addr, b.addr, a.addr, c.addr, a.addr], order


@engine_logic
def test_first_sends_everything_to_the_first_up(proxy, echoes):
    a, b = echoes(2)
    p = proxy(a.addr, "--upstream", b.addr, "--balance", "first", log_format="json")
    assert {upstream_of(p, one_exchange(p.listen_addr)) for _ in range(4)} == {a.addr}


@engine_logic
def test_leastconn_fills_the_least_loaded_per_weight(proxy, echoes):
    a, b = echoes(2)
    first, args = pool_args((a.addr, 3), (b.addr, 1), balance="leastconn")
    p = proxy(first, *args, log_format="json")
    held = []
    try:
        for _ in range(8):
            s = connect(p.listen_addr)
            held.append(s)
            s.sendall(b"x")
            assert s.recv(1) == b"x"     # connected through: counted as active
        # Each new connection went where active/weight was lowest: 6 and 2 at the end.
        assert (a.open, b.open) == (6, 2), (a.open, b.open)
        clients = [fmt_addr(s.getsockname()) for s in held]
    finally:
        for s in held:
            s.close()
    for cl in clients:
        p.close_for(cl)


@engine_logic
def test_source_keeps_each_client_on_its_upstream_while_it_is_up(proxy, echoes):
    ups = echoes(3)
    p = proxy(ups[0].addr, "--upstream", ups[1].addr, "--upstream", ups[2].addr,
              "--balance", "source", "--health-interval", "0.05", "--fall", "1",
              log_format="json")
    sources = [f"127.0.0.{i}" for i in range(2, 22)]
    home = {src: upstream_of(p, one_exchange(p.listen_addr, src)) for src in sources}
    assert len(set(home.values())) == 3, home       # 20 clients use every upstream
    for src in sources[:5]:                         # and a client always comes home
        assert upstream_of(p, one_exchange(p.listen_addr, src)) == home[src]
    # One upstream goes away: its clients move; nobody else's does.
    gone = ups[1]
    gone.close()
    p.wait_for(lambda e: e["event"] == "health" and e["upstream"] == gone.addr
               and e["state"] == "down", 10, "health down line")
    for src in sources:
        now = upstream_of(p, one_exchange(p.listen_addr, src))
        if home[src] == gone.addr:
            assert now != gone.addr
        else:
            assert now == home[src], (src, home[src], now)


# --- health checks -------------------------------------------------------------------

class Revivable:
    """An upstream whose port stays ours: down (bound, not listening: connects are
    refused) or up (listening, echoing)."""

    def __init__(self):
        self.port = None
        self.echo = None
        self._down_sock = None
        self.go_down()

    @property
    def addr(self):
        return f"127.0.0.1:{self.port}"

    def go_down(self):
        if self.echo is not None:
            self.echo.close()
            self.echo = None
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port or 0))
        self.port = s.getsockname()[1]
        self._down_sock = s

    def go_up(self):
        self._down_sock.close()
        self._down_sock = None
        self.echo = EchoServer("127.0.0.1", port=self.port)

    def close(self):
        if self.echo is not None:
            self.echo.close()
        if self._down_sock is not None:
            self._down_sock.close()


@engine_logic
def test_health_checks_take_an_upstream_down_and_bring_it_back(proxy, echoes):
    (a,) = echoes(1)
    b = Revivable()
    try:
        b.go_up()
        t0 = time.monotonic()
        p = proxy(a.addr, "--upstream", b.addr, "--balance", "roundrobin",
                  "--health-interval", "0.1", "--fall", "2", "--rise", "3", log_format="json")
        assert p.listening["health_interval"] == 0.1
        assert {upstream_of(p, one_exchange(p.listen_addr)) for _ in range(2)} == {a.addr, b.addr}
        b.go_down()
        down = p.wait_for(lambda e: e["event"] == "health" and e["state"] == "down", 10,
                          "health down line")
        assert (down["upstream"], down["checks"], down["reason"]) == (b.addr, 2, "ECONNREFUSED"), down
        # Down: every new connection goes to a, at once (no failover needed).
        for _ in range(3):
            cl = one_exchange(p.listen_addr)
            line = p.close_for(cl)
            assert (line["upstream"], line.get("failovers", 0)) == (a.addr, 0), line
        b.go_up()
        up = p.wait_for(lambda e: e["event"] == "health" and e["state"] == "up", 10,
                        "health up line")
        assert (up["upstream"], up["checks"]) == (b.addr, 3), up
        assert b.addr in {upstream_of(p, one_exchange(p.listen_addr)) for _ in range(2)}
        assert [e["state"] for e in p.lines if e["event"] == "health"] == ["down", "up"]
        assert time.monotonic() - t0 < 30
    finally:
        b.close()


@engine_logic
def test_no_upstream_up_closes_the_client_at_once(proxy, refusing_upstream):
    other = Revivable()
    try:
        p = proxy(refusing_upstream.addr, "--upstream", other.addr, "--health-interval", "0.05",
                  "--fall", "1", log_format="json")
        p.wait_for(lambda e: len([x for x in p.lines if x["event"] == "health"]) >= 2, 10,
                   "both upstreams down")
        with connect(p.listen_addr) as c:
            client = fmt_addr(c.getsockname())
            expect_closed(c, 5.0)
        line = p.close_for(client)
        assert (line["cause"], line["upstream"], line["term"]) == ("no_upstream", "-", "SC"), line
        assert p.stop() == 0
        st = [e for e in p.lines if e["event"] == "stopped"][-1]
        assert st["no_upstream"] == 1, st
    finally:
        other.close()


@engine_logic
def test_health_checks_default_on_for_a_pool_only(proxy, echoes):
    a, b = echoes(2)
    p = proxy(a.addr, "--upstream", b.addr, "--health-interval", "2", log_format="json")
    assert p.listening["health_interval"] == 2.0
    q = proxy(a.addr, log_format="json")
    assert "health_interval" not in q.listening


# --- retries --------------------------------------------------------------------------

@engine_logic
@pytest.mark.parametrize("retries,reaches", [(2, False), (3, True)])
def test_retries_bound_the_upstreams_a_connection_tries(proxy, echo_server, retries, reaches):
    refusing = [Revivable() for _ in range(3)]
    try:
        args = []
        for r in refusing[1:]:
            args += ["--upstream", r.addr]
        p = proxy(refusing[0].addr, *args, "--upstream", echo_server.addr,
                  "--retries", str(retries), log_format="json")
        with connect(p.listen_addr) as c:
            client = fmt_addr(c.getsockname())
            if reaches:
                c.sendall(b"hello")
                assert c.recv(5) == b"hello"
            else:
                expect_closed(c, 5.0)
        line = p.close_for(client)
        if reaches:
            assert (line["cause"], line["upstream"], line["failovers"]) == \
                ("normal", echo_server.addr, 3), line
        else:
            assert (line["cause"], line["upstream"], line["failovers"]) == \
                ("upstream_refused", refusing[2].addr, 2), line
    finally:
        for r in refusing:
            r.close()


# --- PROXY protocol ---------------------------------------------------------------------

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def read_then_reply(nbytes, reply: bytes):
    """An upstream handler: read nbytes() bytes (or to EOF), send `reply`, return what
    it read (the header the proxy sent, then the client's bytes)."""
    def handler(conn):
        got = b""
        while len(got) < nbytes():
            chunk = conn.recv(4096)
            if not chunk:
                break
            got += chunk
        conn.sendall(reply)
        return got
    return handler


def expected_header(version: int, src: tuple, dst: tuple) -> bytes:
    """The specification's bytes, written out here independently of the engine."""
    fam = socket.AF_INET6 if ":" in src[0] else socket.AF_INET
    if version == 1:
        proto = "TCP6" if fam == socket.AF_INET6 else "TCP4"
        return f"PROXY {proto} {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode()
    addrs = socket.inet_pton(fam, src[0]) + socket.inet_pton(fam, dst[0])
    body = addrs + struct.pack("!HH", src[1], dst[1])
    return SIG + bytes([0x21, 0x21 if fam == socket.AF_INET6 else 0x11]) \
        + struct.pack("!H", len(body)) + body


@engine_logic
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_proxy_protocol_header_comes_first_byte_exact(proxy, upstream, version, family):
    if family == "ipv6" and not HAS_IPV6:
        pytest.fail("no IPv6 loopback on this machine")
    host = "::1" if family == "ipv6" else "127.0.0.1"
    up = upstream(host)
    seen = {}
    fut = up.serve_next(read_then_reply(lambda: len(seen["want"]) + 5, b"reply"))
    p = proxy(up.addr, "--proxy-protocol", f"v{version}",
              listen=f"[{host}]:0" if family == "ipv6" else f"{host}:0", log_format="json")
    assert p.listening["proxy_protocol"] == f"v{version}"
    with socket.socket(socket.AF_INET6 if family == "ipv6" else socket.AF_INET) as c:
        c.settimeout(5)
        c.connect((host, p.port))
        src, dst = c.getsockname()[:2], c.getpeername()[:2]
        seen["want"] = expected_header(version, src, dst)
        c.sendall(b"hello")
        assert c.recv(5) == b"reply"
    assert fut.result(10) == seen["want"] + b"hello"
    assert p.stop() == 0
    st = [e for e in p.lines if e["event"] == "stopped"][-1]
    assert st["proxy_headers"] == 1, st


ipv4 = st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 65535))
ipv6 = st.tuples(st.ip_addresses(v=6).map(str), st.integers(0, 65535))


@settings(max_examples=200, deadline=None)
@given(version=st.sampled_from([1, 2]), pair=st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)))
def test_proxy_header_matches_the_specification_for_any_address(version, pair):
    from uring_net import _core
    src, dst = pair
    got = _core.proxy_header(version, src, dst)
    want = expected_header(version, src, dst)
    if version == 2:
        assert got == want
        return
    # v1 writes addresses as text, and an IPv6 address has more than one spelling
    # (::ffff:1.2.3.4 or ::ffff:102:304): compare what the words mean.
    gw, ww = got.decode().split(" "), want.decode().split(" ")
    assert got.endswith(b"\r\n") and len(gw) == len(ww) == 6
    assert gw[:2] == ww[:2] and gw[4:] == ww[4:]
    assert [ipaddress.ip_address(x) for x in gw[2:4]] == [ipaddress.ip_address(x) for x in ww[2:4]]


def test_proxy_header_for_mixed_families_is_unknown():
    from uring_net import _core
    assert _core.proxy_header(1, ("10.0.0.1", 1), ("::1", 2)) == b"PROXY UNKNOWN\r\n"
    assert _core.proxy_header(2, ("10.0.0.1", 1), ("::1", 2)) == SIG + b"\x21\x00\x00\x00"
