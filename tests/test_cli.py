"""The command line and the log format: docs/cli-contract.md."""
import json
import re
import socket
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from netutil import connect, fmt_addr, recv_stream, send_stream

OPTIONS = ["--listen", "--upstream", "--mode", "--backend", "--buffer-size", "--buffers",
           "--max-inflight", "--max-conns", "--connect-timeout", "--verbose", "--log-format",
           "--probe"]


def run_cli(*args: str, timeout: float = 15) -> subprocess.CompletedProcess:
    """The CLI to completion. A run that is still going after ``timeout`` (say, a bad
    option that was accepted and the proxy started) is killed and fails the test."""
    try:
        return subprocess.run([sys.executable, "-m", "uring_net", *args], cwd=REPO_ROOT,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"`uring-proxy {' '.join(args)}` still running after {timeout} s; "
                    f"stderr: {e.stderr!r}", pytrace=False)


def assert_usage_error(r: subprocess.CompletedProcess):
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2, f"exit status {r.returncode}; stderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("uring-proxy: error:"), \
        f"expected one 'uring-proxy: error:' line, got:\n{r.stderr}"


UP = "127.0.0.1:9"  # never contacted: these runs must fail before any client connects

BAD_ARGS = {
    "listen-port-not-a-number": ["--listen", "127.0.0.1:http0", "--upstream", UP],
    "listen-port-out-of-range": ["--listen", "127.0.0.1:70000", "--upstream", UP],
    "listen-missing-port": ["--listen", "127.0.0.1", "--upstream", UP],
    "listen-bad-ipv6-brackets": ["--listen", "[::1:0", "--upstream", UP],
    "listen-bad-ipv4": ["--listen", "127.0.0.300:0", "--upstream", UP],
    "upstream-missing-port": ["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1"],
    "upstream-port-zero-garbage": ["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:x1"],
    "missing-upstream": ["--listen", "127.0.0.1:0"],
    "buffers-not-numeric": ["--listen", "127.0.0.1:0", "--upstream", UP, "--buffers", "abc"],
    "buffers-not-power-of-two": ["--listen", "127.0.0.1:0", "--upstream", UP, "--buffers", "1000"],
    "buffer-size-not-numeric": ["--listen", "127.0.0.1:0", "--upstream", UP,
                                "--buffer-size", "64k?"],
    "connect-timeout-not-numeric": ["--listen", "127.0.0.1:0", "--upstream", UP,
                                    "--connect-timeout", "soon"],
    "unknown-log-format": ["--listen", "127.0.0.1:0", "--upstream", UP, "--log-format", "xml"],
    "unknown-option": ["--listen", "127.0.0.1:0", "--upstream", UP, "--frobnicate"],
}


# Mode- and backend-independent: config.py rejects these while parsing, before any set-up.
@pytest.mark.parametrize("backend", ["uring"])
@pytest.mark.parametrize("mode", ["copy"])
@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_usage_errors(backend, mode, case):
    assert_usage_error(run_cli("--backend", backend, "--mode", mode, *BAD_ARGS[case]))


# Backend-independent: the argument parser rejects --mode before any backend exists.
@pytest.mark.parametrize("backend", ["uring"])
def test_unknown_mode(backend):
    r = run_cli("--listen", "127.0.0.1:0", "--upstream", UP, "--backend", backend,
                "--mode", "telepathy")
    assert_usage_error(r)
    assert "telepathy" in r.stderr


# Mode-independent: the argument parser rejects --backend before any mode is set up.
@pytest.mark.parametrize("mode", ["copy"])
def test_unknown_backend(mode):
    assert_usage_error(run_cli("--listen", "127.0.0.1:0", "--upstream", UP,
                               "--backend", "carrier-pigeon", "--mode", mode))


# Mode- and backend-independent: Proxy.start() binds the listener before choosing a backend.
@pytest.mark.parametrize("backend", ["uring"])
@pytest.mark.parametrize("mode", ["copy"])
def test_port_in_use(backend, mode):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = run_cli("--listen", f"127.0.0.1:{port}", "--upstream", UP,
                    "--backend", backend, "--mode", mode)
    assert_usage_error(r)


def test_help():
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    missing = [o for o in OPTIONS if o not in r.stdout]
    assert not missing, f"--help does not mention {missing}:\n{r.stdout}"
    assert "demo" in r.stdout


def test_probe():
    r = run_cli("--probe", timeout=30)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    rows = [l for l in r.stdout.splitlines() if l.strip()]
    assert len(rows) >= 2, f"--probe printed no table:\n{r.stdout}"
    assert all(len(l.split()) >= 2 for l in rows), f"rows without columns:\n{r.stdout}"


def test_demo():
    r = run_cli("demo", "--connections", "4", "--bytes", str(1 << 20), timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "Traceback" not in out
    assert re.search(r"verified\W+yes", out, re.I), f"the demo did not report verified:\n{out}"
    assert not re.search(r"verified\W+no\b", out, re.I), out


# Mode-independent: one template in log.py prints this line in every mode.
@pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"])
@pytest.mark.parametrize("mode", ["copy"])
def test_listening_line_text(proxy, upstream):
    srv = upstream()
    p = proxy(srv.addr)
    raw = next(l for l in p.raw_lines if l.startswith("listening"))
    assert raw == (f"listening on 127.0.0.1:{p.port} upstream {srv.addr} "
                   f"backend={proxy.backend} mode={proxy.mode}"), raw
    fut = srv.serve_next(lambda conn: recv_stream(conn, 1, 10))
    with connect(p.listen_addr) as c:  # the reported port is the real one
        send_stream(c, 1, 10)
        fut.result(10)
        assert c.recv(1) == b""


# Mode-independent: Log.event json.dumps every line; per-mode events are JSON in other files' tests.
@pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"])
@pytest.mark.parametrize("mode", ["copy"])
def test_json_log_format(proxy, upstream):
    srv = upstream()
    p = proxy(srv.addr, "-v", log_format="json")  # verbose lines must be JSON too
    fut = srv.serve_next(lambda conn: (recv_stream(conn, 1, 1234), send_stream(conn, 2, 5678)))
    with connect(p.listen_addr) as c:
        addr = fmt_addr(c.getsockname())
        send_stream(c, 1, 1234)
        recv_stream(c, 2, 5678)
        fut.result(10)
    p.close_for(addr)
    assert p.stop() == 0
    events = [json.loads(l) for l in p.raw_lines if l.strip()]  # every line parses
    assert not p.malformed, p.malformed
    events = [e for e in events if e["event"] in ("listening", "close", "stopped")]
    kinds = [e["event"] for e in events]
    assert kinds == ["listening", "close", "stopped"], kinds

    listening = events[0]
    assert listening["listen"] == f"127.0.0.1:{p.port}"
    assert (listening["upstream"], listening["backend"], listening["mode"]) == \
        (srv.addr, proxy.backend, proxy.mode), listening

    close = next(e for e in events if e["event"] == "close")
    expected_types = {"client": str, "upstream": str, "bytes_c2u": int, "bytes_u2c": int,
                      "duration_ms": (int, float), "cause": str, "term": str}
    for k, t in expected_types.items():
        assert k in close and isinstance(close[k], t) and not isinstance(close[k], bool), \
            (k, close)
    assert (close["client"], close["upstream"], close["bytes_c2u"], close["bytes_u2c"],
            close["cause"], close["term"]) == (addr, srv.addr, 1234, 5678, "normal", "--"), close
    assert close["duration_ms"] >= 0

    stopped = events[-1]
    assert stopped["connections"] == 1, stopped
    # The contract names the JSON totals like the close event's: bytes_c2u, bytes_u2c.
    assert (stopped["bytes_c2u"], stopped["bytes_u2c"]) == (1234, 5678), stopped


# Mode-independent: the ring's set-up decides, before any flow exists.
@pytest.mark.parametrize("backend", ["uring"])
@pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"])
@pytest.mark.parametrize("mode", ["copy"])
def test_bundles_and_incremental_buffers_need_defer_taskrun(proxy, echo_server, monkeypatch):
    """Both name a completion's buffers by the ring's order, which only a DEFER_TASKRUN
    ring guarantees: on a ring set up without it (forced here) neither is used, and a
    fallback line says why (or, on a kernel without them, that it lacks them)."""
    monkeypatch.setenv("URING_NET_FORCE_SETUP", "coop_taskrun")
    p = proxy(echo_server.addr)
    text = p.stderr_text()
    for feature in ("recv_bundle", "incremental_buffers"):
        m = re.search(rf"^fallback feature={feature} reason=(.*) using=", text, re.M)
        assert m, f"no fallback line for {feature}:\n{text}"
        assert "without DEFER_TASKRUN" in m[1] or m[1] == "not supported by this kernel", m[0]
    with connect(p.listen_addr) as c:
        send_stream(c, 5, 300_000)
        recv_stream(c, 5, 300_000, what="echo on a coop_taskrun ring")


def test_nofile_limit_is_raised_for_max_conns():
    """A soft RLIMIT_NOFILE below what --max-conns needs (two fds a flow, plus 128) is
    raised at start, and one line says so."""
    import resource
    import signal

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    p = subprocess.Popen([sys.executable, "-m", "uring_net", "--listen", "127.0.0.1:0",
                          "--upstream", "127.0.0.1:9", "--mode", "copy", "--max-conns", "1000",
                          "--workers", "1"],
                         cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, preexec_fn=low_limit)
    try:
        lines = []
        for line in p.stderr:
            lines.append(line.rstrip())
            if line.startswith("listening"):
                break
        assert "rlimit nofile=2128 was=512 wanted=2128" in lines, lines
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
