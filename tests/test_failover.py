"""--upstream given several times: the flow moves to the next upstream on failure.

In every mode a connect that is refused or times out moves the flow on: nothing was read
from the client yet, so nothing is lost. In peek mode the client's bytes stay in its
socket until they are delivered, so an upstream that resets before it answered is
replaced too, and what it had taken is replayed to the next one (tests/test_peek.py).
"""
import pytest

from netutil import connect, duplex, expect_closed, fmt_addr

N = 200_000


def roundtrip_through(p, seed: int) -> dict:
    with connect(p.listen_addr) as c:
        client = fmt_addr(c.getsockname())
        duplex(c, send_seed=seed, send_total=N, recv_seed=seed, recv_total=N)
    return p.close_for(client)


def test_refused_upstream_fails_over_to_the_next(proxy, refusing_upstream, echo_server):
    p = proxy(refusing_upstream.addr, "--upstream", echo_server.addr, log_format="json")
    listening = next(e for e in p.lines if e["event"] == "listening")
    assert listening["upstream"] == f"{refusing_upstream.addr},{echo_server.addr}", listening
    for seed in range(3):
        c = roundtrip_through(p, seed)
        assert (c["cause"], c["upstream"], c["failovers"]) == \
            ("normal", echo_server.addr, 1), c
        assert c["bytes_c2u"] == N and c["bytes_u2c"] == N, c


# Mode-independent: only the cause differs from the refused case, whose redial runs in every mode.
@pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"])
@pytest.mark.parametrize("mode", ["copy"])
def test_connect_timeout_fails_over_to_the_next(proxy, blackhole_upstream, echo_server):
    p = proxy(blackhole_upstream.addr, "--connect-timeout", "0.3",
              "--upstream", echo_server.addr, log_format="json")
    c = roundtrip_through(p, 7)
    assert (c["cause"], c["upstream"], c["failovers"]) == ("normal", echo_server.addr, 1), c


# Mode-independent: both connects fail before any client byte is read, in any mode.
@pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"])
@pytest.mark.parametrize("mode", ["copy"])
def test_when_every_upstream_fails_the_last_failure_is_reported(proxy, refusing_upstream,
                                                                 blackhole_upstream):
    p = proxy(refusing_upstream.addr, "--upstream", blackhole_upstream.addr,
              "--connect-timeout", "0.3", log_format="json")
    with connect(p.listen_addr) as c:
        client = fmt_addr(c.getsockname())
        expect_closed(c, 5.0)
    line = p.close_for(client)
    assert (line["cause"], line["upstream"], line["failovers"]) == \
        ("connect_timeout", blackhole_upstream.addr, 1), line
    assert line["bytes_c2u"] == 0 and line["bytes_u2c"] == 0, line


# Mode-independent: proxy.py adds "failovers" to close and stopped lines by upstream count alone.
@pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"])
@pytest.mark.parametrize("mode", ["copy"])
def test_one_upstream_prints_no_failover_fields(proxy, echo_server):
    p = proxy(echo_server.addr, log_format="json")
    c = roundtrip_through(p, 9)
    assert "failovers" not in c, c
    assert p.stop() == 0
    st = [e for e in p.lines if e["event"] == "stopped"][-1]
    assert "failovers" not in st, st
