#!/usr/bin/env python3
"""perf profile of uring-proxy and its peers: where the CPU goes, per GB or per request.

README
======
What it measures
    For each *path* (a proxy, named as in bench/throughput.py) it runs the proxy under
    a load and attaches four tools, **one after another, each in a load run of its
    own** (attached together they distort each other; strace alone slows the proxy
    several times over):

    stat      ``perf stat -x,``: task-clock, context switches, CPU migrations, page
              faults, cycles and instructions, in total and per unit. Most VMs expose
              no hardware counters: cycles and instructions are then "not available"
              (perf says <not supported>), and task-clock stands for CPU time.
    uring     io_uring's own figures: ``perf stat`` on the io_uring: tracepoints and
              syscalls:sys_enter_io_uring_enter (SQEs per io_uring_enter, CQEs per wait,
              work punted to io-wq, -EAGAIN retries, CQ overflows, failed requests),
              io-wq worker threads (iou-wrk-*) seen in /proc/PID/task during the run,
              and the proxy's final ``stats`` log line (``-vv --log-format json``: CQEs
              per batch, CQ overflows, zero-copy sends and the share of them the kernel
              really sent without a copy, 1 - zc_copied / zc_notifs). Only for
              uring-proxy on the io_uring backend: HAProxy and the epoll backend make no
              io_uring calls.
    record    ``perf record -F 499 --call-graph dwarf``, kernel included: folded stacks
              (folded.txt, "frame;frame;frame COUNT", the thread's name as root frame,
              kernel frames suffixed _[k]), an SVG flame graph (flame.svg, drawn by
              pyinferno, the Rust inferno crate: ``.venv/bin/python -m pip install
              pyinferno``; without it the folded file is still written and the report
              says why there is no SVG), and the top 15 frames by self and by inclusive
              samples.
    syscalls  ``perf trace -s`` (every thread's syscalls, summed), or ``strace -c -f``
              when perf trace cannot run (or with --syscall-tool strace): calls and
              errors per syscall, per unit. Both slow a proxy that makes many syscalls
              (perf trace handles an event per syscall; strace stops the proxy at every
              one, far worse), so that load run moves less; the per-unit counts stay
              meaningful, the syscall times do not.

    perf stat and perf record start with their events off (``-D -1``) and are switched
    on and off through ``--control`` fifos right around the load, so their window is
    the load's exactly. perf trace and strace cannot be: they attach a second before
    the load and detach after it (an idle uring-proxy makes about 2 syscalls a second).

Scenarios (the load, and what one unit is)
    bulk    one iperf3 TCP stream, ``iperf3 -c -t SECONDS``; unit: GB (10^9 bytes the
            iperf3 server received)
    http    ``wrk -t1 -c100`` keep-alive against an nginx answering "hello world"
            (bench/http_rate.py's); unit: request
    conn    the same with ``Connection: close``: one connection per request; unit:
            connection
    A fresh proxy is started for every load run (so its stats line covers that run
    alone). uring-proxy paths get ``-vv --log-format json`` added.

Attaching to a running process
    ``--pid PID`` attaches the same tools, one after another, each for --seconds, to
    a process (and its child processes) you run and load yourself. To get per-unit
    figures give the load's steady rate, --bytes-per-s or --requests-per-s (each
    window's units = rate x window); without it the figures are per second. Give
    ``--proxy-log FILE`` (a uring-proxy ``-vv --log-format json`` log) for the proxy's
    own counters: its last stats line, cumulative since the proxy started.

Output
    bench/results/perf-YYYYmmdd-HHMM-HOST/<path>/ (or --out DIR):
    report.md (the tables), report.json (every raw figure and the parsed tool
    outputs), folded.txt, flame.svg, and the tools' raw outputs (perf-stat.csv,
    perf-uring.csv, perf-trace-s.txt or strace-c.txt, and proxy-uring.log, the
    proxy's log of the uring run less its close lines); with several paths also
    summary.md, one column per path. A figure that cannot be had is written as
    "not available: <reason>" (never 0, never left out) and warned about on stderr.

Usage (from the repository root; perf needs root, or kernel.perf_event_paranoid <= -1
for the tracepoints)
    .venv/bin/python bench/perf/profile_proxy.py --scenario bulk --path uring-proxy-copy,haproxy
    .venv/bin/python bench/perf/profile_proxy.py --scenario http --path uring-proxy-copy --seconds 5
    .venv/bin/python bench/perf/profile_proxy.py --scenario conn --path haproxy --tools stat,syscalls
    .venv/bin/python bench/perf/profile_proxy.py --pid 1234 --seconds 10 --bytes-per-s 2.5e9 \\
        --proxy-log /tmp/proxy.log

Exit status: 0 every tool ran, 1 some tool failed (the report is still written, the
failure in it), 2 cannot start (perf or a load tool missing, no such pid, bad option),
130 interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import errno
import json
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import throughput as tp  # noqa: E402  (paths, proxies, children, /proc accounting)
import http_rate as hr  # noqa: E402  (nginx upstream, wrk)
import perfparse as pp  # noqa: E402  (the parsers and figures)
import perfreport as rp  # noqa: E402  (the markdown)
from perfparse import NA  # noqa: E402

PERF = shutil.which("perf") or "/usr/bin/perf"
STRACE = shutil.which("strace") or "/usr/bin/strace"
RESULTS = tp.REPO / "bench" / "results"
TOOLS = ("stat", "uring", "record", "syscalls")
STAT_EVENTS = "task-clock,context-switches,cpu-migrations,page-faults,cycles,instructions"
URING_PROXY_ARGS = ["-vv", "--log-format", "json"]
SCENARIOS = {
    "bulk": ("GB", "bulk: one iperf3 stream"),
    "http": ("request", "http: wrk keep-alive requests to nginx"),
    "conn": ("connection", "conn: wrk, one connection per request (Connection: close)"),
}
CONTROL_TIMEOUT_S = 15.0    # perf must open its control fifo / acknowledge within this
TOOL_STOP_TIMEOUT_S = 60.0  # perf record may take a while writing after SIGINT
TRACE_SETTLE_S = 1.0        # perf trace / strace: attach time before the load starts
TRACEFS = ("/sys/kernel/tracing/events", "/sys/kernel/debug/tracing/events")

log = tp.log


class ToolError(Exception):
    """One tool's run failed; the other tools go on."""


def warn(msg: str) -> None:
    log(f"warning: {msg}")


def _tail_file(path: Path, n: int = 3) -> str:
    try:
        lines = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


# ---------------------------------------------------------------- the tools' processes


class PerfControlled:
    """perf stat / perf record attached to `pids` with its events off (-D -1),
    switched on and off through --control fifos: the window is exactly the load."""

    def __init__(self, children: tp.Children, head: list[str], pids: list[int],
                 workdir: Path, name: str) -> None:
        self.children, self.name = children, name
        self.ctl, self.ack = workdir / f"{name}.ctl", workdir / f"{name}.ack"
        for f in (self.ctl, self.ack):
            if f.exists():
                f.unlink()
            os.mkfifo(f)
        self.errfile = workdir / f"{name}.stderr"
        self.argv = [*head, "-D", "-1", "--control", f"fifo:{self.ctl},{self.ack}",
                     "-p", ",".join(map(str, pids))]
        self.ctl_fd = self.ack_fd = -1
        self.window_s = 0.0
        with open(self.errfile, "wb") as err:
            self.proc = children.spawn(self.argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        deadline = time.monotonic() + CONTROL_TIMEOUT_S
        while True:
            try:
                self.ctl_fd = os.open(self.ctl, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as e:
                if e.errno != errno.ENXIO:      # ENXIO: perf has not opened it yet
                    raise
            self._check_alive()
            if time.monotonic() > deadline:
                self.abort()
                raise ToolError(f"{self.argv[1]} did not open its control fifo in "
                                f"{CONTROL_TIMEOUT_S:.0f} s: {_tail_file(self.errfile)}")
            time.sleep(0.02)
        self.ack_fd = os.open(self.ack, os.O_RDONLY | os.O_NONBLOCK)

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            rc = self.proc.returncode
            self.close()
            raise ToolError(f"`{shlex.join(self.argv[:3])} ...` exited with status {rc}: "
                            f"{_tail_file(self.errfile) or 'no message'}")

    def command(self, cmd: str) -> None:
        os.write(self.ctl_fd, cmd.encode() + b"\n")
        deadline = time.monotonic() + CONTROL_TIMEOUT_S
        got = b""
        while b"ack" not in got:
            self._check_alive()
            if time.monotonic() > deadline:
                self.abort()
                raise ToolError(f"perf did not acknowledge '{cmd}' in {CONTROL_TIMEOUT_S:.0f} s")
            r, _, _ = select.select([self.ack_fd], [], [], 0.1)
            if r:
                chunk = os.read(self.ack_fd, 64)
                if not chunk:               # no writer yet: EOF until perf opens it
                    time.sleep(0.01)
                got += chunk

    def enable(self) -> None:
        self.command("enable")
        self.t0 = time.monotonic()

    def disable(self) -> None:
        self.command("disable")
        self.window_s = time.monotonic() - self.t0

    def finish(self) -> None:
        """SIGINT (perf writes its counts or its data file), then wait."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(TOOL_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.abort()
            raise ToolError(f"{self.argv[1]} did not stop within {TOOL_STOP_TIMEOUT_S:.0f} s of SIGINT")
        self.close()
        self.children.stop(self.proc)
        # perf stat and record exit 0 on SIGINT; anything else is a failure.
        if self.proc.returncode not in (0, -signal.SIGINT, 130):
            raise ToolError(f"{self.argv[1]} exited with status {self.proc.returncode}: "
                            f"{_tail_file(self.errfile)}")

    def close(self) -> None:
        for fd in (self.ctl_fd, self.ack_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.ctl_fd = self.ack_fd = -1

    def abort(self) -> None:
        self.close()
        self.children.stop(self.proc)


class Attached:
    """perf trace -s or strace -c -f attached to `pids`, stopped with SIGINT; no
    control channel: it attaches a moment before the load and detaches after."""

    def __init__(self, children: tp.Children, kind: str, pids: list[int], out: Path,
                 workdir: Path) -> None:
        self.children, self.kind, self.out = children, kind, out
        self.errfile = workdir / f"{kind}.stderr"
        if kind == "perf-trace":
            self.argv = [PERF, "trace", "-s", "-o", str(out), "-p", ",".join(map(str, pids))]
        else:
            self.argv = [STRACE, "-c", "-f", "-o", str(out)]
            for p in pids:
                self.argv += ["-p", str(p)]
        with open(self.errfile, "wb") as err:
            self.proc = children.spawn(self.argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        deadline = time.monotonic() + max(TRACE_SETTLE_S, 5.0)
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise ToolError(f"{kind} exited with status {self.proc.returncode} at start: "
                                f"{_tail_file(self.errfile) or 'no message'}")
            if kind == "strace" and "attached" in self.errfile.read_text(errors="replace"):
                break               # strace says "Process N attached" per thread
            if kind == "perf-trace" and time.monotonic() - t0 >= TRACE_SETTLE_S:
                break
            if time.monotonic() > deadline:
                children.stop(self.proc)
                raise ToolError(f"{kind} did not attach within 5 s: {_tail_file(self.errfile)}")
            time.sleep(0.05)
        self.t0 = time.monotonic()

    def finish(self) -> str:
        self.window_s = time.monotonic() - self.t0
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(TOOL_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.children.stop(self.proc)
            raise ToolError(f"{self.kind} did not stop within {TOOL_STOP_TIMEOUT_S:.0f} s of SIGINT")
        self.children.stop(self.proc)
        text = self.out.read_text(errors="replace") if self.out.exists() else ""
        if not text.strip():
            raise ToolError(f"{self.kind} wrote no summary (status {self.proc.returncode}): "
                            f"{_tail_file(self.errfile)}")
        return text


class IowqSampler(threading.Thread):
    """Lists the io-wq worker threads (comm iou-wrk-*) of `pids` every 50 ms."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids, self.samples, self.error = pids, [], None
        self._stop_ev = threading.Event()

    def sample(self) -> None:
        comms = {}
        for pid in self.pids:
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError as e:
                self.error = str(e)
                continue
            for tid in tids:
                try:
                    with open(f"/proc/{pid}/task/{tid}/comm") as f:
                        comms[int(tid)] = f.read().strip()
                except OSError:
                    pass            # the thread ended meanwhile
        self.samples.append(pp.iowq_threads(comms))

    def run(self) -> None:
        while not self._stop_ev.is_set():
            self.sample()
            self._stop_ev.wait(0.05)

    def stop(self) -> dict | None:
        self._stop_ev.set()
        self.join()
        self.sample()
        return pp.iowq_summary(self.samples) if not self.error else None


def tracefs_events() -> str | None:
    for base in TRACEFS:
        if os.path.isdir(base):
            return base
    return None


# ---------------------------------------------------------------- targets


class Session:
    """One load run against one target: the pids to attach to and the load."""

    def __init__(self, pids: list[int], root: int) -> None:
        self.pids, self.root = pids, root
        self.log_text = ""
        self.load: dict = {}

    def cpu_seconds(self) -> float:
        return tp.tree_cpu_seconds(self.root)


class ScenarioTarget:
    """A fresh proxy per load run, in front of the scenario's server."""

    def __init__(self, children: tp.Children, scenario: str, path: tp.Path_, upstream_port: int,
                 proxy_args: list[str], workdir: Path, seconds: int, connections: int) -> None:
        self.children, self.scenario, self.path = children, scenario, path
        self.upstream_port, self.workdir = upstream_port, workdir
        self.proxy_args = proxy_args + (URING_PROXY_ARGS if path.kind == "uring" else [])
        self.seconds, self.connections = seconds, connections
        self.unit = SCENARIOS[scenario][0]
        self.argv: list[str] = []
        self.is_uring = path.kind == "uring" and _backend(path.args + proxy_args) != "epoll"
        self.uring_skip = None if self.is_uring else (
            "the epoll backend makes no io_uring calls" if path.kind == "uring"
            else f"{path.name} is not an io_uring program")

    @contextlib.contextmanager
    def session(self):
        proxy = tp.Proxy(self.children, self.path, self.upstream_port, self.proxy_args, self.workdir)
        self.argv = proxy.argv
        pid = proxy.proc.pid
        s = Session([pid] + tp._descendants(pid), pid)
        s.proxy = proxy
        try:
            yield s
            if proxy.proc.poll() is not None:
                raise ToolError(f"{self.path.name} exited with status {proxy.proc.returncode} "
                                "during the run" + tp._tail(proxy.logfile))
        finally:
            status, s.log_text = proxy.stop()
            s.exit_status = status

    def run_load(self, s: Session) -> dict:
        port = s.proxy.port
        try:
            if self.scenario == "bulk":
                r = tp.run_iperf_client(self.children, port, self.seconds)
                return {"units": r["bytes"] / 1e9, "raw": r,
                        "load_text": f"iperf3 -t {self.seconds}: {r['bytes'] / 1e9:.2f} GB, "
                                     f"{r['bits_per_second'] / 1e9:.2f} Gbit/s"}
            r = hr.run_wrk(self.children, port, self.seconds, self.connections,
                           close=self.scenario == "conn")
            return {"units": float(r["requests"]), "raw": r,
                    "load_text": f"wrk -t1 -c{self.connections} -d{self.seconds}s"
                                 f"{' Connection: close' if self.scenario == 'conn' else ''}: "
                                 f"{r['requests']:,} requests, {r['req_per_s']:,.0f}/s"}
        except tp.RunError as e:
            raise ToolError(f"the load failed: {e}") from None


def _backend(args: list[str]) -> str:
    for i, a in enumerate(args):
        if a == "--backend" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--backend="):
            return a.split("=", 1)[1]
    return "auto"


class AttachTarget:
    """A process the user runs and loads; each tool watches it for `seconds`."""

    def __init__(self, pid: int, seconds: int, bytes_per_s: float | None,
                 requests_per_s: float | None, proxy_log: Path | None) -> None:
        self.pid, self.seconds, self.proxy_log = pid, seconds, proxy_log
        self.rate = bytes_per_s / 1e9 if bytes_per_s else requests_per_s
        self.unit = "GB" if bytes_per_s else "request" if requests_per_s else "second"
        self.argv = _cmdline(pid)
        self.is_uring = _has_io_uring(pid)
        self.uring_skip = None if self.is_uring else f"process {pid} has no io_uring instance open"

    @contextlib.contextmanager
    def session(self):
        if not os.path.exists(f"/proc/{self.pid}"):
            raise ToolError(f"process {self.pid} is gone")
        yield Session([self.pid] + tp._descendants(self.pid), self.pid)

    def run_load(self, s: Session) -> dict:
        time.sleep(self.seconds)
        return {"units": None, "load_text": f"attached for {self.seconds} s (your load)"}

    def units_for(self, window_s: float):
        if self.unit == "second":
            return window_s
        return self.rate * window_s

    def read_stats(self):
        if self.proxy_log is None:
            return None, "no --proxy-log given"
        try:
            st = pp.proxy_stats(self.proxy_log.read_text(errors="replace"))
        except OSError as e:
            return None, f"cannot read --proxy-log: {e}"
        if st is None:
            return None, (f"no stats line in {self.proxy_log} yet: a uring-proxy run with "
                          "-vv --log-format json writes one every 10 s and at stop")
        return st, None


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _has_io_uring(pid: int) -> bool:
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[io_uring]":
                    return True
    except OSError:
        pass
    return False


# ---------------------------------------------------------------- one tool run


def load_run(target, children: tp.Children, start_tool, stop_tool) -> tuple[Session, dict]:
    """One load run: the target's session, the tool attached (start_tool(session)
    returns a handle), the load, the tool stopped (stop_tool(handle) returns the
    tool window). Returns the session and the run's figures."""
    with target.session() as s:
        handle = start_tool(s)
        try:
            cpu0 = s.cpu_seconds()
            load = target.run_load(s)
            cpu1 = s.cpu_seconds()
        except BaseException:
            with contextlib.suppress(Exception):
                stop_tool(handle, failed=True)
            raise
        window = stop_tool(handle)
    run = {"load_text": load["load_text"], "window_s": window, "proxy_cpu_s": cpu1 - cpu0}
    run["units"] = load["units"] if load["units"] is not None else target.units_for(window)
    if "raw" in load:
        run["load"] = load["raw"]
    run["proxy_cpu_per_unit"] = pp.ratio(run["proxy_cpu_s"], run["units"], f"no {target.unit}s moved")
    if getattr(target, "path", None) is not None and target.path.kind == "uring" \
            and getattr(s, "exit_status", 0) not in (0, None):
        # The contract says SIGTERM -> exit 0 (HAProxy and nginx die by the signal).
        run["warning"] = f"proxy exit status {s.exit_status} after SIGTERM (contract says 0)"
    return s, run


def _controlled(children, head, workdir, name):
    def start(s: Session):
        t = PerfControlled(children, head, s.pids, workdir, name)
        t.enable()
        return t

    def stop(t: PerfControlled, failed: bool = False) -> float:
        return end_controlled(t, failed)
    return start, stop


def end_controlled(t: PerfControlled, failed: bool) -> float:
    """Stop a controlled perf at the end of its load run: its window in seconds,
    or 0 when the load failed (the tool is aborted, its output not read)."""
    if failed:
        t.abort()
        return 0.0
    t.disable()
    t.finish()
    return t.window_s


def tool_stat(target, children, workdir: Path, outdir: Path, res: dict) -> None:
    csv = outdir / "perf-stat.csv"
    start, stop = _controlled(children, [PERF, "stat", "-x,", "-o", str(csv), "-e", STAT_EVENTS],
                              workdir, "perf-stat")
    _, run = load_run(target, children, start, stop)
    res["runs"]["stat"] = run
    rows = pp.parse_perf_stat_csv(csv.read_text(errors="replace"))
    if not rows:
        raise ToolError(f"perf stat printed no counts ({csv.name} is empty)")
    res["stat"] = {"rows": rows, "figures": pp.stat_figures(rows, run["units"], target.unit, run["window_s"])}


def tool_uring(target, children, workdir: Path, outdir: Path, res: dict) -> None:
    events_dir = tracefs_events()
    missing: dict[str, str] = {}
    for key, ev, _flt in pp.URING_EVENTS:
        sysname, name = ev.split(":")
        if events_dir is None:
            missing[key] = "tracefs is not mounted (/sys/kernel/tracing)"
        elif not os.path.isdir(os.path.join(events_dir, sysname, name)):
            missing[key] = f"tracepoint {ev} is not in this kernel"
    csv = outdir / "perf-uring.csv"

    def attempt(missing: dict[str, str]):
        head = [PERF, "stat", "-x,", "-o", str(csv)]
        for key, ev, flt in pp.URING_EVENTS:
            if key not in missing:
                head += ["-e", ev] + (["--filter", flt] if flt else [])
        asked = len(pp.URING_EVENTS) > len(missing)
        sampler: list[IowqSampler] = []

        def start(s: Session):
            smp = IowqSampler(s.pids)
            smp.sample()
            smp.start()
            sampler.append(smp)
            if not asked:
                return None
            t = PerfControlled(children, head, s.pids, workdir, "perf-uring")
            t.enable()
            return t

        def stop(t, failed: bool = False) -> float:
            iowq = sampler[0].stop() if sampler else None
            res.setdefault("uring", {})["iowq"] = iowq
            if t is None:
                return float(target.seconds) if isinstance(target, AttachTarget) else 0.0
            return end_controlled(t, failed)
        return load_run(target, children, start, stop)

    try:
        s, run = attempt(missing)
    except ToolError as e:
        filtered = {key for key, _, flt in pp.URING_EVENTS if flt and key not in missing}
        if "filter" not in str(e).lower() or not filtered:
            raise
        warn(f"perf refused a tracepoint filter ({e}); counting again without the filtered events")
        missing.update({k: f"perf refused the tracepoint filter: {e}" for k in filtered})
        s, run = attempt(missing)
    res["runs"]["uring"] = run
    rows = pp.parse_perf_stat_csv(csv.read_text(errors="replace")) if csv.exists() else []
    counts = pp.uring_counts(rows, missing)
    if isinstance(target, AttachTarget):
        stats, why = target.read_stats()
    else:
        stats = pp.proxy_stats(s.log_text)
        why = None if stats else "the proxy wrote no stats line (needs -vv --log-format json)"
        # One close line per connection makes megabytes in the conn scenario: left out.
        kept = [l for l in s.log_text.splitlines() if '"event": "close"' not in l]
        (outdir / "proxy-uring.log").write_text("\n".join(kept) + "\n")
    ur = res["uring"]
    ur.update({"counts": counts, "stats": stats, "tracepoint_rows": rows})
    if isinstance(target, AttachTarget) and stats is not None:
        res["notes"].append("The proxy's own counters come from the last stats line of --proxy-log: "
                            "cumulative since the proxy started, not this window.")
    ur["figures"] = pp.uring_figures(counts, stats, ur.get("iowq"), run["units"], target.unit,
                                     stats_why=why or "")


def tool_record(target, children, workdir: Path, outdir: Path, res: dict, freq: int,
                call_graph: str) -> None:
    data = workdir / "perf.data"
    start, stop = _controlled(children, [PERF, "record", "-F", str(freq), "--call-graph", call_graph,
                                         "-o", str(data)], workdir, "perf-record")
    _, run = load_run(target, children, start, stop)
    res["runs"]["record"] = run
    log(f"  perf script ({data.stat().st_size / 1e6:.0f} MB of samples) ...")
    try:
        p = subprocess.run([PERF, "script", "-i", str(data)], capture_output=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise ToolError("perf script took more than 600 s") from None
    text = p.stdout.decode(errors="replace")
    folded = pp.fold_perf_script(text)
    data.unlink()
    if not folded:
        raise ToolError(f"perf script gave no samples (status {p.returncode}): "
                        + " | ".join(p.stderr.decode(errors="replace").strip().splitlines()[-2:]))
    lines = pp.folded_lines(folded)
    (outdir / "folded.txt").write_text("\n".join(lines) + "\n")
    top = pp.top_frames(folded, 15)
    rec = {"frequency": freq, "call_graph": call_graph, "top": top,
           "samples_per_unit": pp.ratio(top["samples"], run["units"], f"no {target.unit}s moved"),
           "folded": "folded.txt", "na": []}
    if not any("_[k]" in s for s in folded):
        why = ("perf recorded no kernel frame: kernel.perf_event_paranoid="
               f"{_read('/proc/sys/kernel/perf_event_paranoid')} and not root, or kernel.kptr_restrict")
        rec["na"].append(("kernel frames", why))
    rec["flame"] = flame(lines, outdir / "flame.svg",
                         f"{res['path']}, {res['scenario_text']}: {top['samples']:,} samples, "
                         f"perf record -F {freq} --call-graph {call_graph}")
    res["record"] = rec


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "?"


def flame(lines: list[str], out: Path, title: str):
    """Write the SVG with pyinferno; return its name, or NA saying why not."""
    try:
        import pyinferno
    except ImportError as e:
        return NA(f"pyinferno is not importable ({e}); `{sys.executable} -m pip install pyinferno` "
                  "draws it; folded.txt is written, and any flame-graph tool reads it")
    try:
        svg = pyinferno.flamegraph_from_lines(lines, title=title)
    except Exception as e:  # pyinferno.InfernoError, or a bad line
        return NA(f"pyinferno failed: {e}")
    out.write_text(svg)
    return out.name


def tool_syscalls(target, children, workdir: Path, outdir: Path, res: dict, which: str) -> None:
    kinds = ["perf-trace", "strace"] if which == "auto" else [which]
    last_error = None
    for kind in kinds:
        out = outdir / ("perf-trace-s.txt" if kind == "perf-trace" else "strace-c.txt")
        if kind == "strace" and not os.access(STRACE, os.X_OK):
            last_error = ToolError(f"strace is not installed ({STRACE}): apt-get install strace")
            continue
        holder: dict = {}

        def start(s: Session, kind=kind, out=out):
            return Attached(children, kind, s.pids, out, workdir)

        def stop(t: Attached, failed: bool = False) -> float:
            if failed:
                children.stop(t.proc)
                return 0.0
            holder["text"] = t.finish()
            return t.window_s
        try:
            _, run = load_run(target, children, start, stop)
        except ToolError as e:
            last_error = e
            if kind == "perf-trace" and which == "auto":
                warn(f"perf trace failed ({e}); falling back to strace -c -f, which slows the proxy")
            continue
        res["runs"]["syscalls"] = run
        summary = (pp.parse_perf_trace_summary if kind == "perf-trace" else pp.parse_strace_summary)(holder["text"])
        if not summary["syscalls"]:
            raise ToolError(f"{kind}: no syscall rows in its summary ({out.name})")
        res["syscalls"] = {"tool": summary["tool"], "summary": summary,
                           "rows": pp.syscall_rows(summary, run["units"], target.unit)}
        return
    raise last_error


# ---------------------------------------------------------------- one path


def profile_target(target, name: str, scenario_text: str, tools: list[str], args,
                   children: tp.Children, workdir: Path, outdir: Path, meta: dict) -> dict:
    outdir.mkdir(parents=True, exist_ok=True)
    res: dict = {"path": name, "scenario_text": scenario_text, "unit": target.unit, "meta": meta,
                 "proxy_argv": [], "runs": {}, "errors": [], "skipped": {}, "notes": [],
                 "is_uring": target.is_uring}
    for tool in tools:
        if tool == "uring" and target.uring_skip:
            res["skipped"]["uring"] = target.uring_skip
            log(f"{name}: uring: skipped, {target.uring_skip}")
            continue
        log(f"{name}: {tool} ...")
        t0 = time.monotonic()
        try:
            if tool == "stat":
                tool_stat(target, children, workdir, outdir, res)
            elif tool == "uring":
                tool_uring(target, children, workdir, outdir, res)
            elif tool == "record":
                tool_record(target, children, workdir, outdir, res, args.frequency, args.call_graph)
            elif tool == "syscalls":
                tool_syscalls(target, children, workdir, outdir, res, args.syscall_tool)
        except (ToolError, tp.RunError, OSError) as e:
            res["errors"].append({"tool": tool, "error": str(e)})
            res["runs"].setdefault(tool, {})["error"] = str(e)
            log(f"{name}: {tool} FAILED: {e}")
            continue
        run = res["runs"].get(tool, {})
        log(f"{name}: {tool} done in {time.monotonic() - t0:.1f} s ({run.get('load_text', '')})")
        if run.get("warning"):
            warn(f"{name}: {tool}: {run['warning']}")
        time.sleep(tp.SETTLE_S)
    res["proxy_argv"] = target.argv
    res["unavailable"] = rp.collect_unavailable(res)
    for u in res["unavailable"]:
        warn(f"{name}: {u['where']}: {u['figure']}: not available: {u['reason']}")
    (outdir / "report.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (outdir / "report.md").write_text(rp.render_path(res))
    log(f"{name}: wrote {_rel(outdir / 'report.md')}")
    return res


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(tp.REPO))
    except ValueError:
        return str(p)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="""\
perf profile of uring-proxy and its peers (--scenario), or of any running process
(--pid): where the CPU goes, per GB or per request. Tools (--tools), each in a
load run of its own, one after another:
  stat      perf stat: task-clock, context switches, CPU migrations, page faults,
            cycles, instructions (not available without hardware counters: VMs)
  uring     io_uring tracepoints + the proxy's stats line: SQEs per io_uring_enter,
            CQEs per wait, io-wq work and workers, -EAGAIN retries, CQ overflows,
            share of zero-copy sends really sent without a copy
  record    perf record --call-graph: folded.txt, flame.svg (pyinferno), top frames
  syscalls  perf trace -s (or strace -c -f): calls and errors per syscall""",
        epilog="""\
output: bench/results/perf-YYYYmmdd-HHMM-HOST/<path>/ report.md, report.json,
folded.txt, flame.svg, the tools' raw outputs; summary.md beside them with
several paths. A figure that cannot be had reads "not available: <reason>"
and is warned about on stderr.

exit status: 0 every tool ran, 1 some tool failed (the report is still
written), 2 cannot start, 130 interrupted. Run from the repository root, as
root (tracepoints). The README at the top of bench/perf/profile_proxy.py says what
every figure means.""",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--scenario", choices=sorted(SCENARIOS),
                      help="start the servers, the proxy and the load itself: bulk (iperf3, per GB), "
                           "http (wrk keep-alive to nginx, per request), conn (wrk with Connection: "
                           "close, per connection)")
    what.add_argument("--pid", type=int, help="attach to this running process (and its children) instead")
    ap.add_argument("--path", default="uring-proxy-copy",
                    help="with --scenario: comma-separated paths from bench/throughput.py "
                         f"({', '.join(p.name for p in tp.all_paths() if p.is_proxy)}); "
                         "default uring-proxy-copy")
    ap.add_argument("--seconds", type=int, default=5,
                    help="length of each load run (with --pid: of each tool's window); default 5")
    ap.add_argument("--tools", default=",".join(TOOLS),
                    help=f"comma-separated, run in this order, each in its own load run: "
                         f"{', '.join(TOOLS)} (default: all)")
    ap.add_argument("--connections", type=int, default=100, help="wrk -c for http and conn (default 100)")
    ap.add_argument("--proxy-args", default="", help='extra uring-proxy arguments, one string')
    ap.add_argument("--frequency", type=int, default=499, help="perf record -F (default 499 Hz)")
    ap.add_argument("--call-graph", default="dwarf,16384",
                    help="perf record --call-graph: dwarf,SIZE (default dwarf,16384: unwinds "
                         "through liburing and the Cython core, which have no frame pointers) or fp "
                         "(lighter; user-space stacks then stop at the first library without them)")
    ap.add_argument("--syscall-tool", choices=("auto", "perf-trace", "strace"), default="auto",
                    help="auto: perf trace -s, strace -c -f if perf trace cannot run (default auto)")
    ap.add_argument("--bytes-per-s", type=float,
                    help="with --pid: the load's steady rate in bytes/s, for per-GB figures")
    ap.add_argument("--requests-per-s", type=float,
                    help="with --pid: the load's steady rate in requests/s, for per-request figures")
    ap.add_argument("--proxy-log", type=Path,
                    help="with --pid: the uring-proxy's -vv --log-format json log, for its own counters")
    ap.add_argument("--name", help="with --pid: the report's directory name (default pid-PID-COMM)")
    ap.add_argument("--out", type=Path,
                    help="results directory (default bench/results/perf-YYYYmmdd-HHMM-HOST)")
    ap.add_argument("--write-docs", action="store_true",
                    help="with --scenario and several paths: put the side-by-side summary in "
                         "this scenario's section of docs/benchmarks.md, linking the reports")
    a = ap.parse_args(argv)
    a.tools = [t.strip() for t in a.tools.split(",") if t.strip()]
    bad = [t for t in a.tools if t not in TOOLS]
    if bad or not a.tools:
        ap.error(f"unknown tool(s) {', '.join(bad) or '(none given)'}; known: {', '.join(TOOLS)}")
    if a.seconds < 1 or a.frequency < 1 or a.connections < 1:
        ap.error("--seconds, --frequency and --connections must be at least 1")
    if a.pid is None and (a.bytes_per_s or a.requests_per_s or a.proxy_log or a.name):
        ap.error("--bytes-per-s, --requests-per-s, --proxy-log and --name go with --pid")
    if a.bytes_per_s and a.requests_per_s:
        ap.error("give --bytes-per-s or --requests-per-s, not both")
    return a


def check_perf(tools: list[str]) -> None:
    if not os.access(PERF, os.X_OK):
        raise tp.BenchError(f"perf is not installed ({PERF}); Debian: apt-get install linux-perf")
    p = subprocess.run([PERF, "--version"], capture_output=True, text=True)
    if p.returncode:
        raise tp.BenchError(f"`perf --version` failed: {(p.stderr or p.stdout).strip()}")
    paranoid = _read("/proc/sys/kernel/perf_event_paranoid")
    if os.geteuid() != 0 and paranoid not in ("-1", "?"):
        warn(f"not root and kernel.perf_event_paranoid={paranoid}: tracepoints (uring, syscalls) "
             "need root or paranoid -1; kernel frames and counts need <= 1")


def results_dir(args) -> Path:
    if args.out:
        return args.out
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M")
    base = RESULTS / f"perf-{stamp}-{socket.gethostname()}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = Path(f"{base}-{n}")
    return out


def write_docs(meta: dict, results: list[dict], out: Path) -> None:
    """This scenario's section of docs/benchmarks.md: the summary table, the
    machine and command, and where each path's full report and flame graph are."""
    scenario = meta["config"]["scenario"]
    markers = tp.section_markers("perf/profile_proxy.py", f" --scenario {scenario}")
    m = meta["machine"]
    summary = rp.render_summary(results).split("\n", 1)[1].strip()   # without its title
    rel = out.relative_to(tp.REPO)
    links = "\n".join(f"- `{r['path']}`: [report]({'../' + str(rel / r['path'] / 'report.md')}), "
                      f"[flame graph]({'../' + str(rel / r['path'] / 'flame.svg')})" for r in results)
    section = f"""{markers[0]}
## Where the cost goes: {results[0]['scenario_text']} (perf, io_uring tracepoints)

- Date: {meta['date']}
- Machine: Linux {m['kernel']}, {m['nproc']} CPUs, {m['cpu_model']}
- Command (from the repository root): `{meta['command']}`
- Each tool ran in a load run of its own ({meta['config']['seconds']:g} s), so perf trace or
  strace slowing the proxy does not skew the others; per-unit figures divide by what that
  run's load generator counted. Hardware counters (cycles, instructions) are not available
  on a VM: task-clock stands for CPU time.

{summary}

{links}
{markers[1]}
"""
    tp.replace_docs_section(markers, section)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_perf(args.tools)
        proxy_args = shlex.split(args.proxy_args)
        if args.scenario:
            paths, _ = tp.select_paths(args.path)
            paths = [p for p in paths if p.is_proxy]
            if not paths:
                raise tp.BenchError("--path names no proxy (direct has no process to profile)")
            paths = tp.check_tools(paths, True, need_iperf3=args.scenario == "bulk")
            if args.scenario != "bulk":
                missing = [f for f in (hr.WRK, tp.NGINX) if not os.access(f, os.X_OK)]
                if missing:
                    raise tp.BenchError(f"missing {', '.join(missing)}; apt-get install wrk nginx-light")
        else:
            if not os.path.exists(f"/proc/{args.pid}"):
                raise tp.BenchError(f"no process {args.pid}")
            paths = []
    except (tp.BenchError, ValueError) as e:
        print(f"profile_proxy.py: error: {e}", file=sys.stderr)
        return 2

    versions = tp.software_versions(paths) if args.scenario else {}
    if args.scenario != "bulk":
        versions.pop("iperf3", None)
    versions["perf"] = tp._first_line([PERF, "--version"]).removeprefix("perf version ")
    if "syscalls" in args.tools and args.syscall_tool != "perf-trace":
        versions["strace"] = tp._first_line([STRACE, "-V"]).removeprefix("strace -- version ")
    try:
        import pyinferno
        versions["pyinferno"] = getattr(pyinferno, "__version__", "?")
    except ImportError:
        warn("pyinferno is not importable: no flame.svg, only folded.txt "
             f"({sys.executable} -m pip install pyinferno)")
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": tp.command_line(__file__), "machine": tp.machine_info(), "versions": versions,
            "config": {"scenario": args.scenario, "pid": args.pid, "seconds": args.seconds,
                       "tools": args.tools, "frequency": args.frequency, "call_graph": args.call_graph,
                       "connections": args.connections, "proxy_args": proxy_args}}
    out = results_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    log(f"results in {_rel(out)}")
    busy = tp.busy_percent(0.5)
    if busy > tp.BUSY_WARN_PERCENT:
        warn(f"the machine was {busy:.0f}% busy before the run; other work skews every figure")
    meta["busy_percent_before"] = round(busy, 1)

    children = tp.Children()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, tp._raise_interrupt)
    results: list[dict] = []
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="uring-perf-") as tmp:
        workdir = Path(tmp)
        try:
            if args.pid is not None:
                target = AttachTarget(args.pid, args.seconds, args.bytes_per_s, args.requests_per_s,
                                      args.proxy_log)
                comm = _read(f"/proc/{args.pid}/comm")
                name = args.name or f"pid-{args.pid}-{comm}"
                if target.unit == "second":
                    warn("no --bytes-per-s / --requests-per-s: figures are per second of the window")
                results.append(profile_target(target, name, f"attached to pid {args.pid} ({comm})",
                                              args.tools, args, children, workdir, out / name, meta))
            else:
                if args.scenario == "bulk":
                    server = tp.IperfServer(children, workdir)
                else:
                    server = hr.HttpServer(children, workdir)
                for path in paths:
                    target = ScenarioTarget(children, args.scenario, path, server.port, proxy_args,
                                            workdir, args.seconds, args.connections)
                    results.append(profile_target(target, path.name, SCENARIOS[args.scenario][1],
                                                  args.tools, args, children, workdir,
                                                  out / path.name, meta))
                    if args.scenario == "bulk" and any(r.get("error") for r in results[-1]["runs"].values()):
                        server.restart()   # a client that died mid-test can leave it waiting
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted; stopping children")
        except tp.BenchError as e:
            print(f"profile_proxy.py: error: {e}", file=sys.stderr)
            return 2
        finally:
            tp.stop_everything(children)
    if len(results) > 1:
        (out / "summary.md").write_text(rp.render_summary(results))
        log(f"wrote {_rel(out / 'summary.md')}")
    if interrupted:
        return 130
    if args.write_docs and args.scenario and results:
        write_docs(meta, results, out)
        log(f"wrote the perf {args.scenario} section of {tp.DOCS_FILE}")
    failed = [(r["path"], e["tool"]) for r in results for e in r["errors"]]
    if failed:
        log(f"{len(failed)} tool run(s) failed: " + ", ".join(f"{p} {t}" for p, t in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
