"""bench/pingpong.c and bench/latency.py: the latency scenario's generator and its report.

Fast and self-contained: no proxy and no peer tool, only cc, `storm echo` and a tiny
Python echo server. pingpong's figures are checked for shape (ordered percentiles,
about the asked number of messages), never against a time limit.

pingpong's contract on errors, checked here: an echo that differs from what was sent
(or a failed connect) is counted in the JSON line's `errors`, which is still printed,
and the exit status is 1; 2 is reserved for "cannot start" (usage, no sockets).
"""
from __future__ import annotations

import json
import selectors
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import latency  # noqa: E402
import throughput as tp  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc)")


@pytest.fixture(scope="module")
def exes(tmp_path_factory):
    """pingpong and storm, compiled with `cc -O2 -Wall`: both must compile cleanly."""
    out = tmp_path_factory.mktemp("bench-c")
    built = {}
    for name in ("pingpong", "storm"):
        r = subprocess.run(["cc", "-O2", "-Wall", "-o", str(out / name), str(BENCH / f"{name}.c")],
                           capture_output=True, text=True)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        built[name] = out / name
    return built


def pingpong(exe: Path, port: int, conns: int, rate: int, seconds: float, warmup: float,
             size: int = 64) -> tuple[int, dict]:
    r = subprocess.run([str(exe), str(port), str(conns), str(rate), str(seconds), str(size),
                        str(warmup)], capture_output=True, text=True, timeout=60)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, (r.stdout, r.stderr)
    return r.returncode, json.loads(lines[0])


def test_pingpong_against_storm_echo(exes):
    port = tp.free_port()
    echo = subprocess.Popen([str(exes["storm"]), "echo", str(port)], stdin=subprocess.DEVNULL)
    try:
        # Returns when the echo server's socket is in LISTEN (or fails if it exited).
        tp.wait_listening(port, echo, "storm echo", None)
        rc, res = pingpong(exes["pingpong"], port, conns=10, rate=2000, seconds=1, warmup=0.5)
    finally:
        echo.kill()
        echo.wait()
    assert rc == 0, res
    assert res["errors"] == 0 and res["mismatches"] == 0 and res["lost"] == 0, res
    assert res["target_rate"] == 2000 and res["conns"] == 10 and res["size"] == 64
    # 1 s recorded at 2000 msg/s; a loaded machine may lag, hence the wide margin.
    assert 1000 < res["messages"] <= 2000 * 1.05, res
    assert res["sent"] == res["echoed"] >= res["messages"], res
    assert 0 < res["p50_us"] <= res["p90_us"] <= res["p99_us"] <= res["p999_us"] <= res["max_us"], res
    assert res["cpu_s"] > 0 and res["cpu_percent"] >= 0


class FlippingEcho:
    """Echoes every connection; flips one byte of the first chunk it sees, once."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))  # listening on return
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.wake_r, self.wake_w = socket.socketpair()
        self.flipped = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        sel.register(self.wake_r, selectors.EVENT_READ)
        while True:
            for key, _ in sel.select():
                s = key.fileobj
                if s is self.wake_r:
                    for k in list(sel.get_map().values()):
                        if k.fileobj not in (self.listener, self.wake_r):
                            k.fileobj.close()
                    sel.close()
                    return
                if s is self.listener:
                    try:
                        c, _ = s.accept()
                    except BlockingIOError:
                        continue
                    sel.register(c, selectors.EVENT_READ)
                    continue
                data = bytearray(s.recv(65536))
                if not data:
                    sel.unregister(s)
                    s.close()
                    continue
                if not self.flipped:
                    data[len(data) // 2] ^= 0x5A
                    self.flipped = True
                s.setblocking(True)
                s.sendall(data)

    def close(self):
        self.wake_w.send(b"x")
        self.thread.join(10)
        for s in (self.listener, self.wake_r, self.wake_w):
            s.close()


def test_pingpong_counts_a_corrupted_echo(exes):
    server = FlippingEcho()
    try:
        rc, res = pingpong(exes["pingpong"], server.port, conns=2, rate=200, seconds=0.5, warmup=0)
    finally:
        server.close()
    assert server.flipped
    assert res["mismatches"] == 1 and res["errors"] == 1, res
    assert rc == 1, "errors are reported in the JSON line and by exit status 1"
    assert res["echoed"] == res["sent"] - 1 and res["lost"] == 0, res
    assert latency.verdict(res, 200).startswith("1 errors (1 echoes that differ")


def test_pingpong_counts_failed_connects(exes):
    with socket.socket() as s:  # bound, not listening: connects are refused
        s.bind(("127.0.0.1", 0))
        rc, res = pingpong(exes["pingpong"], s.getsockname()[1], conns=3, rate=100, seconds=0.2,
                           warmup=0)
    assert rc == 1 and res["connect_errors"] == 3 and res["errors"] == 3 and res["messages"] == 0, res


def test_pingpong_usage_is_exit_2(exes):
    r = subprocess.run([str(exes["pingpong"]), "1", "0", "100", "1", "64"], capture_output=True,
                       text=True, timeout=10)
    assert r.returncode == 2 and r.stdout == "" and "bad arguments" in r.stderr


# ---------------------------------------------------------------- latency.py's report


def run(path, rnd, p50, p99, rate=10000, achieved=None, **kw):
    r = {"path": path, "round": rnd, "rate": rate, "p50_us": p50, "p90_us": p50, "p99_us": p99,
         "p999_us": p99 * 2, "max_us": p99 * 3, "achieved_rate": achieved or float(rate),
         "errors": 0, "echoed": 5 * rate, "gen_cpu_percent": 40.0, "sched_lag_p99_us": 50.0}
    if path != "direct":
        r.update(cpu_us_per_msg=10.0 * rnd, cpu_percent=20.0)
    r.update(kw)
    return r


def test_verdict_errors_and_rate():
    assert latency.verdict(run("haproxy", 1, 100, 200), 10000) is None
    assert latency.verdict(run("haproxy", 1, 100, 200, achieved=9901.0), 10000) is None
    why = latency.verdict(run("haproxy", 1, 100, 200, achieved=9899.0, unsent=1000), 10000)
    assert "under 99% of 10,000" in why and "1,000 messages never sent" in why
    why = latency.verdict(run("haproxy", 1, 100, 200, errors=3, eofs=2, lost=1), 10000)
    assert why == "3 errors (2 EOFs or resets, 1 echoes never back)"


def test_summarize_medians_and_failed_runs():
    paths, _ = tp.select_paths("direct,haproxy,socat,uring-proxy-copy")
    bad = run("uring-proxy-copy", 2, 1, 1, achieved=5000.0)
    bad["error"] = latency.verdict(bad, 10000)
    runs = [run("direct", 1, 50, 100), run("direct", 2, 70, 300), run("direct", 3, 60, 200),
            run("haproxy", 1, 100, 1000), run("haproxy", 2, 300, 3000), run("haproxy", 3, 200, 2000),
            run("uring-proxy-copy", 1, 90, 800), bad, run("uring-proxy-copy", 3, 110, 1200),
            # a run that never measured (the proxy did not start): run_rounds' shape
            {"path": "socat", "round": 1, "rate": 10000, "error": "socat exited with status 1"},
            run("haproxy", 1, 400, 4000, rate=50000)]
    rows = latency.summarize(paths, runs)
    assert [(r["rate"], r["path"]) for r in rows] == [
        (10000, "direct"), (10000, "haproxy"), (10000, "socat"), (10000, "uring-proxy-copy"),
        (50000, "haproxy")]
    by = {(r["rate"], r["path"]): r for r in rows}
    d, h, s, u = (by[(10000, n)] for n in ("direct", "haproxy", "socat", "uring-proxy-copy"))
    assert (d["p50_us"], d["p99_us"], d["runs_ok"], d["runs"], d["failed"]) == (60, 200, 3, 3, False)
    assert d["cpu_us_per_msg"] is None and h["cpu_us_per_msg"] == 20.0
    assert h["p99_us"] == 2000 and h["p99_vs_haproxy"] == 1.0
    # the failed run is out of the medians, and the path says it failed
    assert (u["p50_us"], u["p99_us"], u["runs_ok"], u["runs"], u["failed"]) == (100, 1000, 2, 3, True)
    assert u["p99_vs_haproxy"] == 0.5 and u["cpu_us_per_msg"] == 20.0
    assert u["failures"] == ["round 2: sent 5,000 msg/s, under 99% of 10,000"]
    # no good run: FAILED in every figure, not zero and not blank
    assert s["runs_ok"] == 0 and s["p99_us"] is None and s["failed"]
    cells = {c[0]: c for c in latency.cells(rows[:4])}
    assert cells["socat"][1:6] == ["FAILED"] * 5 and cells["socat"][7] == "0/1 FAILED"
    assert cells["uring-proxy-copy"][2] == "1,000" and cells["uring-proxy-copy"][7] == "2/3 FAILED"
    assert cells["uring-proxy-copy"][6] == "0.50x" and cells["direct"][5] == "-"
    assert cells["direct"][7] == "3/3"
    text = latency.text_table(rows[:4])
    assert "FAILED" in text and "vs HAProxy p99" in text
    assert latency.markdown_table(rows[:4]).count("\n") == 5
    # the generator check comes from the direct path, and says when there is none
    check = latency.generator_check(rows, 10000)
    assert "10,000 msg/s (100.0% of the target)" in check and "40% of one core" in check
    assert "was not run" in latency.generator_check(rows, 50000)
    assert latency.progress(bad).startswith("FAILED: sent 5,000 msg/s")


def test_write_docs_replaces_only_its_section(tmp_path, monkeypatch):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nsomeone else's section\n")
    monkeypatch.setattr(tp, "DOCS_FILE", docs)
    paths, _ = tp.select_paths("direct,haproxy")
    meta = {"date": "2026-01-01 00:00 UTC", "command": ".venv/bin/python bench/latency.py",
            "machine": {"kernel": "6.1", "nproc": 2, "cpu_model": "cpu", "python": "3.11"},
            "versions": {"HAProxy": "2.6"},
            "config": {"rounds": 3, "rates": [10000, 50000], "conns": 100, "seconds": 5.0,
                       "warmup": 1.0, "size": 64, "proxy_args": [], "paths_arg": "direct,haproxy"}}
    runs = [run("direct", 1, 50, 100), run("haproxy", 1, 100, 1000),
            run("direct", 1, 50, 100, rate=50000, gen_cpu_percent=95.0),
            {"path": "haproxy", "round": 1, "rate": 50000, "error": "haproxy exited with status 1"}]
    for _ in range(2):  # the second write replaces the first
        latency.write_docs(meta, latency.summarize(paths, runs), runs)
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nsomeone else's section\n")
    assert text.count(latency.LATENCY_SECTION[0]) == 1 and text.count(latency.LATENCY_SECTION[1]) == 1
    assert "### 10,000 msg/s" in text and "### 50,000 msg/s" in text
    assert "| haproxy | FAILED |" in text and "FAILED: haproxy round 1: haproxy exited" in text
    assert "using 95% of one core" in text and "close to its limit" in text
    assert "--conns 100 --paths direct,haproxy --write-docs" in text
