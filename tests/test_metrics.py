"""--metrics: Prometheus text at /metrics, served from the proxy's own loop.

The output is parsed with prometheus_client's own parser, and the values are checked
after a known load. A scraper that never sends its request must not hold the others up.
"""
import http.client
import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families

from netutil import connect, fmt_addr


def scrape(addr: str, path: str = "/metrics") -> tuple[int, str]:
    host, _, port = addr.rpartition(":")
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read().decode()
    finally:
        c.close()


def samples(text: str) -> dict:
    """{(name, frozenset(labels)): value} over every family, by the official parser."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


@pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"])
@pytest.mark.parametrize("mode", ["copy"])
def test_metrics_after_a_known_load(proxy, refusing_upstream, echo_server):
    p = proxy(refusing_upstream.addr, "--upstream", echo_server.addr, "--retries", "1",
              "--metrics", "127.0.0.1:0", log_format="json")
    maddr = next(e for e in p.lines if e["event"] == "metrics")["listen"]
    for i in range(3):
        with connect(p.listen_addr) as c:
            client = fmt_addr(c.getsockname())
            c.sendall(b"abcde")
            assert c.recv(5) == b"abcde"
        p.close_for(client)
    # A scraper that connects and never asks: the next scrape is served all the same.
    idle = socket.create_connection(tuple(maddr.rsplit(":", 1)[0:1]) + (int(maddr.rsplit(":", 1)[1]),))
    try:
        status, text = scrape(maddr)
    finally:
        idle.close()
    assert status == 200
    got = samples(text)
    fe = ("frontend", "default")

    def v(name, **labels):
        return got[(name, frozenset({fe, *labels.items()}))]
    assert v("uring_proxy_connections_accepted_total") == 3
    assert v("uring_proxy_connections_closed_total") == 3
    assert v("uring_proxy_connections_active") == 0
    assert v("uring_proxy_connections_refused_total") == 0
    assert v("uring_proxy_bytes_total", direction="c2u") == 15
    assert v("uring_proxy_bytes_total", direction="u2c") == 15
    assert v("uring_proxy_closes_total", cause="normal") == 3
    assert v("uring_proxy_closes_total", cause="upstream_refused") == 0
    assert v("uring_proxy_failovers_total") == 3
    assert v("uring_proxy_upstream_connections_total", upstream=refusing_upstream.addr) == 3
    assert v("uring_proxy_upstream_connect_failures_total", upstream=refusing_upstream.addr) == 3
    assert v("uring_proxy_upstream_connections_total", upstream=echo_server.addr) == 3
    assert v("uring_proxy_upstream_connect_failures_total", upstream=echo_server.addr) == 0
    assert v("uring_proxy_upstream_up", upstream=echo_server.addr) == 1
    assert v("uring_proxy_upstream_active", upstream=echo_server.addr) == 0
    assert v("uring_proxy_engine_cqes_total") > 0 and v("uring_proxy_engine_sqes_total") > 0
    assert v("uring_proxy_engine_cq_overflows_total") == 0
    assert got[("uring_proxy_iowq_threads", frozenset())] >= 0     # the process's, unlabelled
    assert scrape(maddr, "/other")[0] == 404


@pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"])
@pytest.mark.parametrize("mode", ["splice"])
def test_splice_counters_move_with_the_bytes(proxy, echo_server):
    """Splice mode's bytes are counted as they move, not when the connection ends
    (uring_proxy_bytes_total's rule), so a long stream shows in the rate at once."""
    p = proxy(echo_server.addr, "--metrics", "127.0.0.1:0", log_format="json")
    maddr = next(e for e in p.lines if e["event"] == "metrics")["listen"]
    fe = ("frontend", "default")
    with connect(p.listen_addr) as c:
        client = fmt_addr(c.getsockname())
        c.sendall(b"x" * 1000)
        got = b""
        while len(got) < 1000:
            got += c.recv(1000 - len(got))
        live = samples(scrape(maddr)[1])
        # The echo's 1000 bytes went both ways through the pipes; none has ended.
        assert live[("uring_proxy_splice_bytes_total", frozenset({fe}))] == 2000
        assert live[("uring_proxy_bytes_total", frozenset({fe, ("direction", "c2u")}))] == 0
        assert live[("uring_proxy_splice_pipes_pooled", frozenset({fe}))] >= 0
    p.close_for(client)
    ended = samples(scrape(maddr)[1])
    assert ended[("uring_proxy_splice_bytes_total", frozenset({fe}))] == 2000
    assert ended[("uring_proxy_bytes_total", frozenset({fe, ("direction", "u2c")}))] == 1000
    # Back in the pool once the flow ended (the pool is filled at start and kept full).
    assert ended[("uring_proxy_splice_pipes_pooled", frozenset({fe}))] > 0


@pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"])
@pytest.mark.parametrize("mode", ["copy"])
def test_metrics_follow_health_and_a_refused_client(proxy, refusing_upstream):
    p = proxy(refusing_upstream.addr, "--health-interval", "0.05", "--fall", "1",
              "--metrics", "127.0.0.1:0", log_format="json")
    maddr = next(e for e in p.lines if e["event"] == "metrics")["listen"]
    p.wait_for(lambda e: e["event"] == "health", 10, "health down line")
    with connect(p.listen_addr) as c:
        client = fmt_addr(c.getsockname())
        assert c.recv(1) == b""
    assert p.close_for(client)["cause"] == "no_upstream"
    got = samples(scrape(maddr)[1])
    lab = frozenset({("frontend", "default"), ("upstream", refusing_upstream.addr)})
    assert got[("uring_proxy_upstream_up", lab)] == 0
    assert got[("uring_proxy_upstream_health_transitions_total", lab)] == 1
    assert got[("uring_proxy_upstream_health_checks_total", lab)] >= 1
    assert got[("uring_proxy_connections_refused_total", frozenset({("frontend", "default")}))] == 1
    assert got[("uring_proxy_closes_total", frozenset({("frontend", "default"),
                                                       ("cause", "no_upstream")}))] == 1
