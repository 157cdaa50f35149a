"""--workers: N engines per listener on SO_REUSEPORT sockets, on threads, their logs,
stopped line and metrics summed; a worker whose loop fails is replaced while the others
serve."""
import os
import subprocess

import pytest

from conftest import ProxyProcess, proxy_argv
from netutil import connect, fmt_addr
from test_metrics import samples, scrape

pytestmark = [pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"]),
              pytest.mark.parametrize("mode", ["copy"])]


def exchange(p) -> str:
    with connect(p.listen_addr) as c:
        client = fmt_addr(c.getsockname())
        c.sendall(b"hello")
        assert c.recv(5) == b"hello"
    return client


def accepted_by_worker(maddr: str) -> dict:
    got = samples(scrape(maddr)[1])
    return {dict(k[1])["worker"]: v for k, v in got.items()
            if k[0] == "uring_proxy_worker_connections_accepted_total"}


@pytest.mark.parametrize("workers", [1, 2])
def test_every_worker_serves_and_the_totals_are_summed(proxy, echo_server, workers):
    p = proxy(echo_server.addr, "--workers", str(workers), "--metrics", "127.0.0.1:0",
              log_format="json")
    assert p.listening.get("workers", 1) == workers
    maddr = next(e for e in p.lines if e["event"] == "metrics")["listen"]
    assert [e["event"] for e in p.lines].count("listening") == 1     # said once
    n = 0
    # SO_REUSEPORT spreads connections by a hash of the addresses: keep connecting
    # until every worker has had some (40 suffice but for a 2^-39 chance).
    while n < 40 or min(accepted_by_worker(maddr).values()) == 0:
        p.close_for(exchange(p))
        n += 1
        assert n < 400, accepted_by_worker(maddr)
    per = accepted_by_worker(maddr)
    assert sorted(per) == [str(w) for w in range(workers)] and sum(per.values()) == n, per
    assert p.stop() == 0
    stopped = [e for e in p.lines if e["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["connections"] == n, stopped
    assert stopped[0]["bytes_c2u"] == 5 * n and stopped[0]["buffers_out"] == 0, stopped


def test_a_failed_worker_is_replaced_and_the_others_serve_on(proxy, echo_server, monkeypatch):
    monkeypatch.setenv("URING_NET_TEST_CRASH_WORKER", "1")
    p = proxy(echo_server.addr, "--workers", "2", "--metrics", "127.0.0.1:0", log_format="json")
    maddr = next(e for e in p.lines if e["event"] == "metrics")["listen"]
    # Connections go on until worker 1 has taken one (and failed after it).
    n = 0
    while not any(e["event"] == "worker_failed" for e in p.lines):
        # The failing worker's clients may see a reset: the one it took, and
        # any whose handshake its listening socket had completed but not yet
        # handed over when it died (the kernel resets those, and a connect
        # that came then fails).
        try:
            with connect(p.listen_addr) as c:
                c.sendall(b"hello")
                c.recv(5)
        except OSError:
            pass
        n += 1
        assert n < 400, "worker 1 never took a connection"
    failed = p.wait_for(lambda e: e["event"] == "worker_failed", 10, "worker_failed line")
    assert (failed["worker"], failed["action"]) == (1, "replaced"), failed
    # Both workers serve again: the replacement counts from zero.
    before = accepted_by_worker(maddr)
    m = 0
    while m < 40 or accepted_by_worker(maddr)["1"] == 0:
        exchange(p)
        m += 1
        assert m < 400, accepted_by_worker(maddr)
    assert accepted_by_worker(maddr)["0"] > before["0"]
    assert p.stop() == 0
    stopped = [e for e in p.lines if e["event"] == "stopped"]
    assert len(stopped) == 1, stopped


def test_workers_default_to_the_cpus(backend, mode, disabled_features, echo_server):
    argv = [a for a in proxy_argv("127.0.0.1:0", echo_server.addr, backend, mode, "--workers", "X",
                                  log_format="json") if a not in ("--workers", "X")]
    p = ProxyProcess(argv, "json")
    try:
        assert p.listening.get("workers", 1) == len(os.sched_getaffinity(0)), p.listening
        p.close_for(exchange(p))
    finally:
        assert p.stop() == 0


def test_cpu_affinity_pins_each_worker_to_one_cpu(proxy, echo_server):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.fail("this test needs two CPUs to tell pinned workers from the rest")
    p = proxy(echo_server.addr, "--workers", "2", "--cpu-affinity", log_format="json")
    p.close_for(exchange(p))
    pinned = set()
    for tid in os.listdir(f"/proc/{p.pid}/task"):
        with open(f"/proc/{p.pid}/task/{tid}/status") as f:
            allowed = next(l.split()[1] for l in f if l.startswith("Cpus_allowed_list:"))
        if "," not in allowed and "-" not in allowed:
            pinned.add(int(allowed))
    # Worker 0 on the first CPU, worker 1 on the second; the main and log threads free.
    assert pinned == {cpus[0], cpus[1]}, pinned


def test_reuseport_lets_two_processes_share_the_port(proxy, echo_server):
    """--reuseport is the process model run by a service manager: two uring-proxy
    processes on one port, each with its own accept queue, both serving; without
    it the second cannot bind."""
    first = proxy(echo_server.addr, "--reuseport", log_format="json")
    listen = first.listen_addr
    # The port is held by a socket with SO_REUSEPORT; one without cannot join it.
    refused = subprocess.run(proxy_argv(listen, echo_server.addr, proxy.backend, proxy.mode),
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and f"cannot listen on {listen}" in refused.stderr, refused
    second = proxy(echo_server.addr, "--reuseport", listen=listen, log_format="json")
    # The kernel hashes each connection to one of the two queues: all 40 landing
    # on one has odds of 2**-39.
    for _ in range(40):
        exchange(first)
    assert first.stop() == 0 and second.stop() == 0
    served = [next(e for e in p.lines if e["event"] == "stopped")["connections"]
              for p in (first, second)]
    assert sum(served) == 40 and min(served) > 0, served
