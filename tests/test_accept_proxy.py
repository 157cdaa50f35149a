"""--accept-proxy: a client's PROXY protocol header (v1 or v2) is read before anything
else; its address is the client's from then on (logs, source balancing, the header sent
on). A malformed, oversized, truncated or never-completing header ends that connection
with its own cause, and the proxy serves on."""
import socket

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from netutil import connect, expect_closed, fmt_addr
from test_pool import SIG, expected_header, read_then_reply

from uring_net import _core


def engine_logic(test):
    """The header is read before any data path: copy mode, on both backends."""
    return pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"])(
        pytest.mark.parametrize("mode", ["copy"])(test))


# --- the parser, against the specification's bytes --------------------------------------

ipv4 = st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 65535))
ipv6 = st.tuples(st.ip_addresses(v=6).map(str), st.integers(0, 65535))


@settings(max_examples=300, deadline=None)
@given(version=st.sampled_from([1, 2]), pair=st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)),
       tail=st.binary(max_size=64))
def test_every_header_the_builder_writes_parses_back(version, pair, tail):
    src, dst = pair
    hdr = expected_header(version, src, dst)
    status, length, got_src, got_dst = _core.parse_proxy_header(hdr + tail)
    assert (status, length) == ("ok", len(hdr))
    norm = lambda a: (socket.inet_pton(socket.AF_INET6 if ":" in a[0] else socket.AF_INET, a[0]), a[1])
    assert norm(got_src) == norm(src) and norm(got_dst) == norm(dst)
    # Every proper prefix asks for more, and never for less than it has.
    for cut in range(len(hdr)):
        status, want, _, _ = _core.parse_proxy_header(hdr[:cut])
        assert status == "more" and cut < want <= len(hdr), (cut, status, want)


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=600))
def test_any_bytes_are_classified_without_harm(data):
    status, n, _, _ = _core.parse_proxy_header(data)
    assert status in ("ok", "more", "error")
    if status == "ok":
        assert 0 < n <= len(data)
    if status == "more":
        assert len(data) < n <= 528


@pytest.mark.parametrize("data,want", [
    (b"PROXY UNKNOWN\r\n", ("ok", 15, None, None)),
    (b"PROXY UNKNOWN ff::1 ::1 1 2\r\n", ("ok", 29, None, None)),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nGET", ("ok", 32, ("1.2.3.4", 1), ("5.6.7.8", 2))),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", ("error", "EPROTO", None, None)),      # LF only
    (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", ("error", "EPROTO", None, None)),   # two spaces
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", ("error", "EPROTO", None, None)),   # leading zero
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", ("error", "EPROTO", None, None)),
    (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", ("error", "EPROTO", None, None)),        # family mismatch
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", ("error", "EPROTO", None, None)),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", ("error", "EPROTO", None, None)),
    (b"PROXX", ("error", "EPROTO", None, None)),
    (b"GET / HTTP/1.1\r\n", ("error", "EPROTO", None, None)),
    (b"PROXY TCP4 " + b"1" * 100, ("error", "EMSGSIZE", None, None)),
    (SIG + b"\x21\x11\x02\x11" + b"\0" * 12, ("error", "EMSGSIZE", None, None)),  # 529 bytes
    (SIG + b"\x31\x11\x00\x0c" + b"\0" * 12, ("error", "EPROTO", None, None)),    # version 3
    (SIG + b"\x22\x11\x00\x0c" + b"\0" * 12, ("error", "EPROTO", None, None)),    # command 2
    (SIG + b"\x21\x11\x00\x08" + b"\0" * 8, ("error", "EPROTO", None, None)),     # short IPv4
    (SIG + b"\x20\x00\x00\x00", ("ok", 16, None, None)),                          # LOCAL
    (SIG + b"\x21\x12\x00\x0c" + b"\0" * 12, ("ok", 28, None, None)),             # UDP: no TCP address
    (SIG + b"\x21\x11\x00\x10" + bytes([1, 2, 3, 4, 5, 6, 7, 8, 0, 9, 0, 10]) + b"TLV!",
     ("ok", 32, ("1.2.3.4", 9), ("5.6.7.8", 10))),                                # with a TLV
])
def test_parser_cases(data, want):
    assert _core.parse_proxy_header(data) == want


# --- on the wire -------------------------------------------------------------------------

def send_through(p, first: bytes, chunks: int = 1) -> socket.socket:
    c = connect(p.listen_addr)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    step = max(1, len(first) // chunks)
    for i in range(0, len(first), step):
        c.sendall(first[i:i + step])
    return c


@engine_logic
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("chunks", [1, 7])
def test_carried_address_is_the_client_and_is_sent_on(proxy, upstream, version, chunks):
    up = upstream()
    carried_src, carried_dst = ("203.0.113.7", 51234), ("198.51.100.1", 443)
    want = expected_header(2, carried_src, carried_dst)
    fut = up.serve_next(read_then_reply(lambda: len(want) + 5, b"reply"))
    p = proxy(up.addr, "--accept-proxy", "--proxy-protocol", "v2", log_format="json")
    assert p.listening["accept_proxy"] == "v1,v2"
    with send_through(p, expected_header(version, carried_src, carried_dst) + b"hello", chunks) as c:
        assert c.recv(5) == b"reply"
    # The upstream got our v2 header with the carried addresses, then the client's bytes.
    assert fut.result(10) == want + b"hello"
    line = p.close_for(fmt_addr(carried_src))
    assert (line["cause"], line["bytes_c2u"]) == ("normal", 5), line


@engine_logic
@pytest.mark.parametrize("first,error", [
    (b"GET / HTTP/1.0\r\n\r\n", "EPROTO"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", "EPROTO"),
    (b"PROXY TCP4 " + b"9" * 120, "EMSGSIZE"),
    (SIG + b"\x21\x11\xff\xff", "EMSGSIZE"),
])
def test_a_bad_header_closes_that_connection_with_its_cause(proxy, echo_server, first, error):
    p = proxy(echo_server.addr, "--accept-proxy", log_format="json")
    with send_through(p, first) as c:
        client = fmt_addr(c.getsockname())
        expect_closed(c, 5)
    line = p.close_for(client)
    assert (line["cause"], line["term"], line["error"], line["upstream"]) == \
        ("bad_proxy_header", "PR", error, "-"), line
    assert echo_server.accepted == 0
    good = send_through(p, b"PROXY UNKNOWN\r\nping")      # and it serves on
    assert good.recv(4) == b"ping"
    good.close()


@engine_logic
def test_a_truncated_header_is_refused_at_the_clients_end(proxy, echo_server):
    p = proxy(echo_server.addr, "--accept-proxy", log_format="json")
    c = send_through(p, b"PROXY TCP4 1.2.3.4 ")
    client = fmt_addr(c.getsockname())
    c.shutdown(socket.SHUT_WR)
    expect_closed(c, 5)
    c.close()
    line = p.close_for(client)
    assert (line["cause"], line["error"]) == ("bad_proxy_header", "ECONNABORTED"), line


@engine_logic
def test_a_header_that_never_completes_times_out(proxy, echo_server):
    p = proxy(echo_server.addr, "--accept-proxy", "--proxy-header-timeout", "0.3",
              log_format="json")
    c = send_through(p, SIG + b"\x21\x11\x00\x0c" + b"\x01\x02")   # 6 bytes short, forever
    client = fmt_addr(c.getsockname())
    expect_closed(c, 5)
    c.close()
    line = p.close_for(client)
    assert (line["cause"], line["term"], line["error"]) == ("proxy_header_timeout", "cR", "ETIMEDOUT"), line
    assert p.stop() == 0
    st_ = [e for e in p.lines if e["event"] == "stopped"][-1]
    assert (st_["headers_accepted"], st_["bad_headers"]) == (0, 0), st_


@engine_logic
def test_fuzzed_headers_never_harm_the_proxy(proxy, echo_server):
    p = proxy(echo_server.addr, "--accept-proxy", "--proxy-header-timeout", "0.5",
              log_format="json")

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(
        st.binary(min_size=1, max_size=200),
        st.builds(lambda h, cut, junk: h[:cut] + junk,
                  st.sampled_from([expected_header(1, ("1.2.3.4", 5), ("6.7.8.9", 10)),
                                   expected_header(2, ("::1", 5), ("::2", 10))]),
                  st.integers(0, 60), st.binary(max_size=20))))
    def one(data):
        c = connect(p.listen_addr)
        client = fmt_addr(c.getsockname())
        try:                    # a bad header may be refused before all of it is sent
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)
            while c.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError, OSError):
            pass
        finally:
            c.close()
        status, n, src, _ = _core.parse_proxy_header(data)
        line = p.close_for(fmt_addr(src) if status == "ok" and src else client)
        if status == "ok":
            assert line["cause"] == "normal" and line["bytes_c2u"] == len(data) - n, line
        else:
            assert line["cause"] == "bad_proxy_header", (data, line)
    one()
    assert p.stop() == 0


@pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"])
@pytest.mark.parametrize("mode", ["copy"])
def test_source_balancing_follows_the_carried_address(proxy, echo_server):
    from netutil import EchoServer
    others = [EchoServer(), EchoServer()]
    try:
        p = proxy(echo_server.addr, "--upstream", others[0].addr, "--upstream", others[1].addr,
                  "--balance", "source", "--accept-proxy", log_format="json")

        def upstream_for(src_ip: str, port: int) -> str:
            hdr = expected_header(1, (src_ip, port), ("198.51.100.1", 443))
            with send_through(p, hdr + b"ping") as c:
                assert c.recv(4) == b"ping"
            return p.close_for(f"{src_ip}:{port}")["upstream"]
        # One carried client, many connections (all from 127.0.0.1 really): one upstream.
        assert len({upstream_for("203.0.113.9", 1000 + i) for i in range(6)}) == 1
        # Many carried clients: spread over the pool.
        assert len({upstream_for(f"203.0.113.{i}", 2000) for i in range(1, 25)}) == 3
    finally:
        errors = [e for s in others for e in s.close()]
        assert not errors, errors


@pytest.mark.epoll_modes("splice")
def test_a_header_in_and_out_in_every_mode(proxy, upstream):
    """The header is read before any data path exists and written before its first
    operation: every mode (peek sets its peek offset only after it) forwards the rest."""
    up = upstream()
    src, dst = ("192.0.2.1", 4242), ("192.0.2.2", 80)
    want = expected_header(1, src, dst)
    fut = up.serve_next(read_then_reply(lambda: len(want) + 6, b"answer"))
    p = proxy(up.addr, "--accept-proxy", "--proxy-protocol", "v1", log_format="json")
    with send_through(p, expected_header(2, src, dst) + b"hello!") as c:
        assert c.recv(6) == b"answer"
    assert fut.result(10) == want + b"hello!"
    assert p.close_for(fmt_addr(src))["bytes_c2u"] == 6
