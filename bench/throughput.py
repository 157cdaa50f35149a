#!/usr/bin/env python3
"""Bulk TCP throughput through uring-proxy and its peers, on loopback.

README
======
What it measures
    iperf3 TCP streams (``iperf3 -c 127.0.0.1 -p P -t S -J``, plus ``-P N`` for N
    parallel streams with --streams, and ``-R`` with --reverse so the server sends and
    the bytes cross the proxy from upstream to client) through each *path*,
    interleaved in one run: round 1 runs every path once, then round 2, and so on, so
    drift on the machine hits every path alike. The figure is
    ``end.sum_received.bits_per_second`` from iperf3's JSON (what the receiving end
    got, summed over the streams). A run in which one stream carried nothing fails.

    --cpus LIST pins every proxy to those CPUs with taskset (HAProxy then starts one
    thread): the per-core efficiency figure, which does not depend on how the load
    generator and the server share the machine.

    For each proxy path it also reads the proxy's CPU time (utime + stime from
    /proc/PID/stat, summed over all its threads and child processes) just before and
    just after the iperf3 run, and reports CPU-seconds per GB (10^9 bytes) delivered
    to the server, plus CPU % of one core over the run. For uring-proxy it also
    checks the ``c2u=`` (``u2c=`` with --reverse) of the proxy's ``stopped`` line
    against what the receiver got, as proof the stream really crossed the proxy.

    Around each run it also measures how much CPU *other* user processes took
    (system busy time minus this script's process tree minus kernel threads): on a
    small machine a test suite or a build running meanwhile skews every figure, and
    the run then says so (a warning per run, and a line under the table).

Paths
    direct              iperf3 client straight to the server (the ceiling)
    haproxy             HAProxy 2.6 ``mode tcp``, the peers' baseline configuration
                        (HAPROXY_CFG below), run in the foreground: ``haproxy -db -f``
    haproxy-splice      the same with ``option splice-request`` and ``splice-response``
                        (the kernel moves the bytes through a pipe, HAProxy's bulk mode)
    nginx-stream        nginx 1.22 ``stream { server { proxy_pass } }`` (NGINX_STREAM_CFG
                        below; skipped with a note when nginx or its stream module
                        is not installed)
    socat               socat ``TCP-LISTEN:P,reuseaddr,fork TCP:127.0.0.1:U`` (a peer;
                        skipped with a note when socat is not installed)
    uring-proxy-<v>     ``python -m uring_net --listen 127.0.0.1:0 --upstream ...``
                        plus the variant's arguments (URING_VARIANTS below) plus
                        ``--proxy-args``. Adding a mode or backend is one line there.

Usage (from the repository root)
    make bench                                  # installs the peers, builds, runs both benches
    .venv/bin/python bench/throughput.py        # 5 rounds x 4 s, every path
    .venv/bin/python bench/throughput.py --rounds 3 --paths direct,haproxy
    .venv/bin/python bench/throughput.py --streams 8 --reverse
    .venv/bin/python bench/throughput.py --cpus 1 --paths haproxy,uring-proxy-copy
    .venv/bin/python bench/throughput.py --proxy-args "--buffer-size 131072"
    .venv/bin/python bench/throughput.py --json bench/results/run.json --write-docs

    ``--paths`` takes names from the list above, comma separated; ``uring-proxy``
    alone selects every uring-proxy variant. ``--write-docs`` rewrites this
    scenario's section of docs/benchmarks.md (one section per --streams/--reverse/
    --cpus combination; the rest of the file stays). Progress goes to stderr, the table to stdout.

Reading the numbers
    The load generator, the server and the proxy share the machine's cores, and
    absolute figures drift by tens of percent between runs: compare paths inside one
    run and quote the ratio to HAProxy's median, not the Gbit/s. Run it on a quiet
    machine; the "other processes" line tells whether it was.

Exit status: 0 all runs done, 1 some run failed (the table still prints),
2 cannot start (a tool missing, uring-proxy not built, bad option), 130 interrupted.

Every child runs in its own process group and is killed (SIGTERM, then SIGKILL) when
the run ends, also on Ctrl-C, SIGTERM or an exception.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS_FILE = REPO / "docs" / "benchmarks.md"

IPERF3 = "/usr/bin/iperf3"
HAPROXY = "/usr/sbin/haproxy"
SOCAT = "/usr/bin/socat"
NGINX = "/usr/sbin/nginx"
TASKSET = "/usr/bin/taskset"
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"

# uring-proxy variants: (name, extra CLI arguments). The path is called
# "uring-proxy-<name>": every mode on the io_uring backend (the mode's name)
# and on the epoll backend ("epoll-<mode>"), side by side in one run.
MODES = ["copy", "zerocopy", "auto", "splice", "peek"]
URING_VARIANTS: list[tuple[str, list[str]]] = (
    [(m, ["--backend", "uring", "--mode", m]) for m in MODES]
    + [(f"epoll-{m}", ["--backend", "epoll", "--mode", m]) for m in MODES])

# HAProxy configuration, exactly as in the peer baselines.
HAPROXY_CFG = """\
global
    maxconn 4000
defaults
    mode tcp{splice}
    timeout connect 5s
    timeout client 60s
    timeout server 60s
listen p
    bind 127.0.0.1:{proxy_port}
    server s1 127.0.0.1:{upstream_port}
"""

# nginx `stream` (TCP) proxy, as in the peer baselines; one worker. `-e stderr`
# and the pid under the run's directory keep nginx away from /var.
# proxy_half_close: without it nginx ends both connections at the client's FIN,
# and a client that shuts down writing before reading its answer (bench/storm.c)
# loses the answer: every storm run failed on nginx until it was on.
NGINX_STREAM_CFG = """\
load_module {module};
worker_processes 1;
daemon off;
pid {workdir}/nginx-stream.pid;
events {{ worker_connections 4096; }}
stream {{
    server {{
        listen 127.0.0.1:{proxy_port};
        proxy_pass 127.0.0.1:{upstream_port};
        proxy_half_close on;
    }}
}}
"""

READY_TIMEOUT_S = 15.0  # a proxy or server must be listening within this
STOP_TIMEOUT_S = 5.0  # SIGTERM grace before SIGKILL
SETTLE_S = 0.5  # pause between runs so one run's teardown does not overlap the next
BUSY_WARN_PERCENT = 15.0  # warn when the CPUs were busier than this before the run
OTHERS_WARN_PERCENT = 10.0  # ... or when other processes took this much of a core in a run
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A failure that ends the whole run with a one-line message."""


class RunError(Exception):
    """A failure of one measurement; the run goes on with the next one."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- children


class Children:
    """Every process we start, each the leader of its own process group.

    Own groups keep the terminal's Ctrl-C away from the children (we stop them in
    order instead), and let one killpg() reach socat's forked per-connection
    children too.
    """

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def spawn(self, argv: list[str], **kw) -> subprocess.Popen:
        proc = subprocess.Popen(argv, start_new_session=True, cwd=REPO, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM the group, SIGKILL it after `timeout`; return the exit status."""
        if proc.poll() is None:
            _killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # The leader is reaped; a forked child (socat's) may still hold the group.
        # While any member lives, the kernel cannot hand the id to a new process,
        # so this SIGKILL reaches only what we started.
        if _group_alive(proc.pid):
            _killpg(proc.pid, signal.SIGKILL)
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            try:
                self.stop(proc, timeout=2.0)
            except Exception:  # keep stopping the others
                pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None and int(st[2]) == pgid and st[0] != "Z":  # field 5 pgrp
                return True
    return False


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------- sockets and /proc


def free_port() -> int:
    """A port nobody listens on now: bind port 0 and let the kernel pick."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_listening(port: int) -> bool:
    """True when some socket is in LISTEN state on `port` (IPv4 or IPv6).

    Reading /proc/net/tcp instead of connecting matters: a probe connection would
    reach the iperf3 server (through the proxy) and count as a test.
    """
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except FileNotFoundError:
            continue
    return False


def wait_listening(port: int, proc: subprocess.Popen, what: str, logfile: Path | None) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunError(f"{what} exited with status {proc.returncode} before listening"
                           + _tail(logfile))
        if is_listening(port):
            return
        time.sleep(0.02)
    raise RunError(f"{what} not listening on port {port} after {READY_TIMEOUT_S:.0f} s"
                   + _tail(logfile))


def _tail(logfile: Path | None, lines: int = 5) -> str:
    if logfile is None or not logfile.exists():
        return ""
    text = logfile.read_text(errors="replace").strip().splitlines()[-lines:]
    return ("\n    " + "\n    ".join(text)) if text else ""


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from field 3 (state) on; None if the pid is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: cut at the last ')'.
    return s[s.rindex(")") + 2:].split()


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None:
                children.setdefault(int(st[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for kid in children.get(todo.pop(), []):
            out.append(kid)
            todo.append(kid)
    return out


def tree_cpu_seconds(root: int) -> float:
    """utime+stime of `root` (all threads), of its live descendants, and of the
    descendants it already reaped (cutime+cstime), in seconds."""
    ticks = 0
    for pid in _descendants(root) + [root]:
        st = _proc_stat(pid)
        if st is not None:
            # field 14 utime, 15 stime, 16 cutime, 17 cstime; st[0] is field 3
            ticks += int(st[11]) + int(st[12]) + int(st[13]) + int(st[14])
    return ticks / CLK_TCK


def wait_no_descendants(root: int, timeout: float = 2.0) -> None:
    """Let a forking proxy (socat) reap its per-connection children, so their CPU
    time lands in the parent's cutime/cstime and is counted exactly once."""
    deadline = time.monotonic() + timeout
    while _descendants(root) and time.monotonic() < deadline:
        time.sleep(0.02)


PF_KTHREAD = 0x00200000  # include/linux/sched.h: the task is a kernel thread


def others_snapshot() -> tuple[int, int, int]:
    """(all CPUs' busy ticks, ticks of this script's process tree, ticks of kernel
    threads), to tell afterwards how much CPU went to unrelated user processes.

    The difference is taken from the system total, not summed over the other
    processes: a parent reaping a long-lived child gains that child's whole life
    in cutime at once, which would count CPU spent before the run. Busy ticks
    include irq and softirq, because the kernel also charges softirq ticks to
    the task they interrupted. Kernel threads (ksoftirqd doing loopback's softirq
    work for the stream under test) are not counted as competition."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6]  # user nice system irq softirq
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None:
                stats[int(entry)] = st
    kids: dict[int, list[int]] = {}
    for pid, st in stats.items():
        kids.setdefault(int(st[1]), []).append(pid)
    ours, todo = {os.getpid()}, [os.getpid()]
    while todo:
        for kid in kids.get(todo.pop(), []):
            ours.add(kid)
            todo.append(kid)
    ours_ticks = kthread_ticks = 0
    for pid, st in stats.items():
        if pid in ours:
            ours_ticks += int(st[11]) + int(st[12]) + int(st[13]) + int(st[14])
        elif int(st[6]) & PF_KTHREAD:  # field 9 flags
            kthread_ticks += int(st[11]) + int(st[12])
    return busy, ours_ticks, kthread_ticks


def others_cpu_seconds(before: tuple[int, int, int], after: tuple[int, int, int]) -> float:
    busy, ours, kthreads = (a - b for a, b in zip(after, before))
    return max(0, busy - ours - kthreads) / CLK_TCK


# ---------------------------------------------------------------- paths


@dataclass
class Path_:
    name: str
    kind: str  # direct | haproxy | nginx | socat | uring
    args: list[str] = field(default_factory=list)
    procs: int = 1  # uring: proxy processes sharing the port with --reuseport

    @property
    def is_proxy(self) -> bool:
        return self.kind != "direct"


def haproxy_cfg(path: Path_, proxy_port, upstream_port) -> str:
    """HAProxy's configuration for `path`: the baseline, or with splice (the kernel
    moves the bytes socket to pipe to socket, HAProxy's fastest bulk mode)."""
    splice = ("\n    option splice-request\n    option splice-response"
              if "splice" in path.args else "")
    return HAPROXY_CFG.format(proxy_port=proxy_port, upstream_port=upstream_port, splice=splice)


def all_paths() -> list[Path_]:
    paths = [Path_("direct", "direct"), Path_("haproxy", "haproxy"),
             Path_("haproxy-splice", "haproxy", ["splice"]),
             Path_("nginx-stream", "nginx"), Path_("socat", "socat")]
    paths += [Path_(f"uring-proxy-{name}", "uring", args) for name, args in URING_VARIANTS]
    # --workers: the copy path with two engines (the scaling figure of docs/benchmarks.md);
    # only when named, so the default tables stay one engine per proxy.
    return paths


def extra_paths() -> list[Path_]:
    copy = ["--backend", "uring", "--mode", "copy"]
    # Two engines as threads of one process (--workers 2) and as two processes
    # (--reuseport), for the choice docs/architecture.md explains.
    return [Path_("uring-proxy-copy-2w", "uring", [*copy, "--workers", "2"]),
            Path_("uring-proxy-copy-2p", "uring", copy, procs=2)]


def select_paths(spec: str | None) -> tuple[list[Path_], bool]:
    """Paths named in `spec` (all when None), in the canonical order; the flag
    says whether the user chose them explicitly."""
    paths = all_paths()
    if not spec:
        return paths, False
    paths += extra_paths()
    wanted = [w.strip().lower().replace(" ", "-") for w in spec.split(",") if w.strip()]
    chosen: list[Path_] = []
    for w in wanted:
        hits = [p for p in paths if p.name == w or (w in ("uring", "uring-proxy") and p.kind == "uring")]
        if not hits:
            raise BenchError(f"unknown path {w!r}; known: {', '.join(p.name for p in paths)}"
                             " (or 'uring-proxy' for every variant)")
        chosen += [p for p in hits if p not in chosen]
    return [p for p in paths if p in chosen], True


class Proxy:
    """One running proxy process for one measurement."""

    def __init__(self, children: Children, path: Path_, upstream_port: int,
                 proxy_args: list[str], workdir: Path, cpus: str | None = None) -> None:
        self.children, self.path, self.cpus = children, path, cpus
        self.logfile = workdir / f"{path.name}.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.argv: list[str] = []
        self._start(upstream_port, proxy_args, workdir)

    def _start(self, upstream_port: int, proxy_args: list[str], workdir: Path) -> None:
        kind = self.path.kind
        if kind == "haproxy":
            self.port = free_port()
            cfg = workdir / f"{self.path.name}.cfg"
            cfg.write_text(haproxy_cfg(self.path, self.port, upstream_port))
            self.argv = [HAPROXY, "-db", "-f", str(cfg)]
        elif kind == "nginx":
            self.port = free_port()
            cfg = workdir / "nginx-stream.conf"
            cfg.write_text(NGINX_STREAM_CFG.format(module=NGINX_STREAM_MODULE, workdir=workdir,
                                                   proxy_port=self.port, upstream_port=upstream_port))
            self.argv = [NGINX, "-e", "stderr", "-p", str(workdir), "-c", str(cfg)]
        elif kind == "socat":
            self.port = free_port()
            self.argv = [SOCAT, f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork",
                         f"TCP:127.0.0.1:{upstream_port}"]
        elif kind == "uring":
            # One worker unless the scenario asks: the runs of record are one engine.
            workers = [] if "--workers" in [*self.path.args, *proxy_args] else ["--workers", "1"]
            self.argv = [sys.executable, "-m", "uring_net", "--listen", "127.0.0.1:0",
                         "--upstream", f"127.0.0.1:{upstream_port}", *workers, *self.path.args,
                         *proxy_args]
            if self.path.procs > 1:
                self.argv = self._procs_argv(self.argv, self.path.procs)
        else:
            raise AssertionError(kind)
        if self.cpus:
            # taskset execs the proxy: the pid we measure is the proxy's, and
            # threads and forked children (socat's) inherit the CPU set.
            self.argv = [TASKSET, "-c", self.cpus, *self.argv]
        with open(self.logfile, "wb") as err:
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            self.proc = self.children.spawn(self.argv, stdin=subprocess.DEVNULL,
                                            stdout=err, stderr=subprocess.STDOUT, env=env)
        if kind == "uring":
            self.port = self._wait_listening_line()
        else:
            wait_listening(self.port, self.proc, self.path.name, self.logfile)

    def _procs_argv(self, argv: list[str], procs: int) -> list[str]:
        """A shell that runs `procs` copies of the proxy on one port (--reuseport),
        waits for them and exits with the worst status. The measured pid is the
        shell's: its tree holds every copy. It ignores the group's SIGTERM itself,
        so that it reports the proxies' exit statuses rather than its own death."""
        self.port = free_port()
        one = shlex.join([a if a != "127.0.0.1:0" else f"127.0.0.1:{self.port}" for a in argv]
                         + ["--reuseport"])
        starts = "; ".join(f"{one} & p{i}=$!" for i in range(procs))
        waits = "; ".join(f"wait $p{i} || rc=$?" for i in range(procs))
        return ["sh", "-c", f"rc=0; {starts}; trap '' TERM; {waits}; exit $rc"]

    def _wait_listening_line(self) -> int:
        """The port from uring-proxy's `listening on HOST:PORT` line (text or JSON),
        once every process of the path has printed one."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            ports = []
            for line in self.logfile.read_text(errors="replace").splitlines():
                m = re.search(r"listening on (?:\[[^\]]*\]|[^\s:]+):(\d+)", line)
                if m:
                    ports.append(int(m.group(1)))
                elif line.startswith("{"):
                    try:
                        ev = json.loads(line)
                    except ValueError:
                        continue
                    if ev.get("event") == "listening":
                        ports.append(int(str(ev["listen"]).rsplit(":", 1)[1]))
            if len(ports) >= self.path.procs:
                return ports[0]
            if self.proc.poll() is not None:
                raise RunError(f"{self.path.name} exited with status {self.proc.returncode}"
                               " before its listening line" + _tail(self.logfile))
            time.sleep(0.02)
        raise RunError(f"{self.path.name}: no 'listening on' line after {READY_TIMEOUT_S:.0f} s"
                       + _tail(self.logfile))

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

    def stop(self) -> tuple[int | None, str]:
        status = self.children.stop(self.proc)
        return status, self.logfile.read_text(errors="replace") if self.logfile.exists() else ""


# ---------------------------------------------------------------- iperf3


class IperfServer:
    """A persistent `iperf3 -s` on a free port; restarted after a failed test,
    because a client that died mid-test can leave it waiting."""

    def __init__(self, children: Children, workdir: Path) -> None:
        self.children, self.workdir = children, workdir
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.logfile = workdir / "iperf3-server.log"
        self.start()

    def start(self) -> None:
        self.port = free_port()
        with open(self.logfile, "ab") as out:
            self.proc = self.children.spawn(
                [IPERF3, "-s", "-p", str(self.port), "-B", "127.0.0.1"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_listening(self.port, self.proc, "iperf3 server", self.logfile)
        except RunError as e:
            raise BenchError(str(e)) from None

    def restart(self) -> None:
        self.children.stop(self.proc)
        self.start()


def iperf_argv(port: int, seconds: int, streams: int = 1, reverse: bool = False) -> list[str]:
    """The client's command: -P for parallel streams, -R for the server sending."""
    return ([IPERF3, "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"]
            + (["-P", str(streams)] if streams > 1 else []) + (["-R"] if reverse else []))


def run_iperf_client(children: Children, port: int, seconds: int, streams: int = 1,
                     reverse: bool = False) -> dict:
    argv = iperf_argv(port, seconds, streams, reverse)
    proc = children.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        children.stop(proc)
        raise RunError(f"iperf3 client did not finish within {seconds + 30} s") from None
    finally:
        children.stop(proc)
    try:
        data = json.loads(out)
    except ValueError:
        msg = (err or out).decode(errors="replace").strip().splitlines()
        raise RunError(f"iperf3 client exited {proc.returncode}: "
                       f"{msg[-1] if msg else 'no output'}") from None
    return parse_iperf(data, streams)


def parse_iperf(data: dict, streams: int = 1) -> dict:
    """The figures of one iperf3 -J result: what the receiver got (the server, or the
    client with -R), over all streams; a run whose streams did not all carry bytes
    failed (a proxy that serves 7 of 8 connections is not fast)."""
    if data.get("error"):
        raise RunError(f"iperf3: {data['error']}")
    try:
        recv = data["end"]["sum_received"]
        sent = data["end"]["sum_sent"]
        per_stream = [st["receiver"]["bytes"] for st in data["end"].get("streams", [])]
    except (KeyError, TypeError, ValueError) as e:
        raise RunError(f"iperf3 JSON lacks end.sum_received ({e})") from None
    if len(per_stream) != streams or not all(per_stream):
        raise RunError(f"{sum(1 for b in per_stream if b)} of {streams} iperf3 streams carried bytes")
    try:
        return {
            "bits_per_second": float(recv["bits_per_second"]),
            "bytes": int(recv["bytes"]),
            "seconds": float(recv["seconds"]),
            "retransmits": sent.get("retransmits"),
            "iperf_cpu": data["end"].get("cpu_utilization_percent"),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise RunError(f"iperf3 JSON lacks end.sum_received ({e})") from None


# ---------------------------------------------------------------- one measurement


def client_run(children: Children, port: int, seconds: int, streams: int = 1,
               reverse: bool = False) -> dict:
    """One iperf3 client run, plus the CPU other processes took meanwhile."""
    before = others_snapshot()
    result = run_iperf_client(children, port, seconds, streams, reverse)
    result["other_cpu_s"] = others_cpu_seconds(before, others_snapshot())
    result["other_cpu_percent"] = 100.0 * result["other_cpu_s"] / result["seconds"]
    return result


def measure(children: Children, server: IperfServer, path: Path_, seconds: int,
            proxy_args: list[str], workdir: Path, streams: int = 1, reverse: bool = False,
            cpus: str | None = None) -> dict:
    result: dict = {"path": path.name}
    if not path.is_proxy:
        result.update(client_run(children, server.port, seconds, streams, reverse))
    else:
        proxy = Proxy(children, path, server.port, proxy_args, workdir, cpus)
        result["argv"] = proxy.argv
        try:
            cpu0 = proxy.cpu_seconds()
            result.update(client_run(children, proxy.port, seconds, streams, reverse))
            wait_no_descendants(proxy.proc.pid)
            cpu1 = proxy.cpu_seconds()
            if proxy.proc.poll() is not None:
                raise RunError(f"{path.name} exited with status {proxy.proc.returncode} "
                               "during the test" + _tail(proxy.logfile))
        finally:
            status, proxy_log = proxy.stop()
        result["proxy_exit_status"] = status
        result["proxy_log_tail"] = proxy_log.strip().splitlines()[-3:]
        result["cpu_seconds"] = cpu1 - cpu0
        gb = result["bytes"] / 1e9
        result["cpu_s_per_gb"] = result["cpu_seconds"] / gb if gb > 0 else None
        result["cpu_percent"] = 100.0 * result["cpu_seconds"] / result["seconds"]
        stopped = _stopped_fields(proxy_log) if path.kind == "uring" else {}
        # With -R the server sends: the stream crosses the proxy upstream to client.
        way = "u2c" if reverse else "c2u"
        forwarded = stopped.get(f"bytes_{way}")
        for k in ("zc_sends", "zc_notifs", "zc_copied"):
            if k in stopped:
                result[k] = stopped[k]
        if forwarded is not None:
            # Proof the stream went through the proxy: it must have delivered at
            # least what the receiver counted.
            result[f"proxy_{way}"] = forwarded
            if forwarded < result["bytes"]:
                raise RunError(f"proxy reports {way}={forwarded} bytes, fewer than the "
                               f"{result['bytes']} the receiver got")
        if path.kind == "uring" and status not in (0, None):
            # The contract says SIGTERM -> exit 0; a crash on shutdown is worth knowing.
            result["warning"] = f"exit status {status} after SIGTERM (contract says 0)"
    result["gbps"] = result["bits_per_second"] / 1e9
    return result


def _stopped_fields(proxy_log: str) -> dict:
    """The integer fields of uring-proxy's `stopped` line (text or JSON), with the
    byte totals under their JSON names (bytes_c2u, bytes_u2c); {} if absent. Several
    processes on one port (a path's `procs`) print one each: their sum."""
    total: dict = {}
    for line in proxy_log.splitlines():
        kv = {}
        if line.startswith("stopped "):
            kv = {k: int(v) for k, v in re.findall(r"\b(\w+)=(\d+)\b", line)}
            if "c2u" in kv:
                kv["bytes_c2u"] = kv.pop("c2u")
            if "u2c" in kv:
                kv["bytes_u2c"] = kv.pop("u2c")
        elif line.startswith("{") and '"stopped"' in line:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            kv = {k: v for k, v in ev.items() if isinstance(v, int)}
        for k, v in kv.items():
            total[k] = total.get(k, 0) + v
    return total


# ---------------------------------------------------------------- report


def summarize(paths: list[Path_], runs: list[dict]) -> list[dict]:
    rows = []
    for p, ok, row in runs_of(paths, runs):
        if ok:
            g = [r["gbps"] for r in ok]
            row.update(median_gbps=statistics.median(g), min_gbps=min(g), max_gbps=max(g))
            if p.is_proxy:
                c = [r["cpu_s_per_gb"] for r in ok if r.get("cpu_s_per_gb") is not None]
                pc = [r["cpu_percent"] for r in ok]
                row["median_cpu_s_per_gb"] = statistics.median(c) if c else None
                row["median_cpu_percent"] = statistics.median(pc)
                notifs = sum(r.get("zc_notifs", 0) for r in ok)
                if any("zc_notifs" in r for r in ok):
                    # Zero-copy sends the kernel reported it copied after all (on
                    # loopback: all of them), over all zero-copy notifications.
                    row["zc_copied_percent"] = (100.0 * sum(r.get("zc_copied", 0) for r in ok)
                                                / notifs) if notifs else None
        rows.append(row)
    base = next((r.get("median_gbps") for r in rows if r["path"] == "haproxy"), None)
    for r in rows:
        r["ratio_vs_haproxy"] = (r["median_gbps"] / base
                                 if base and r.get("median_gbps") is not None else None)
    return rows


def backend_ratios(rows: list[dict]) -> str:
    """Markdown: per mode, the io_uring backend against the epoll backend in this run
    (throughput ratio, and CPU-s/GB ratio: below 1 means io_uring spent less per GB)."""
    return backend_table(rows, ("median_gbps", "Gbit/s", ".2f", "throughput"),
                         ("median_cpu_s_per_gb", "CPU-s/GB", ".3f", "CPU per GB"))


def backend_table(rows: list[dict], rate: tuple[str, str, str, str],
                  cost: tuple[str, str, str, str]) -> str:
    """Per mode, path uring-proxy-M against uring-proxy-epoll-M: the rate, the CPU
    cost, and both ratios, then one sentence with the medians of the ratios over the
    modes. `rate` and `cost` are (row key, unit, format, what it is called)."""
    by = {r["path"]: r for r in rows}
    (rk, ru, rf, rname), (ck, cu, cf, cname) = rate, cost
    lines = [f"| mode | uring {ru} | epoll {ru} | uring / epoll {rname} "
             f"| uring {cu} | epoll {cu} | uring / epoll {cname} |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    rate_ratios, cost_ratios = [], []
    for m in MODES:
        u, e = by.get(f"uring-proxy-{m}", {}), by.get(f"uring-proxy-epoll-{m}", {})
        if not u.get(rk) or not e.get(rk):
            continue
        rate_ratios.append(u[rk] / e[rk])
        uc, ec = u.get(ck), e.get(ck)
        if uc and ec:
            cost_ratios.append(uc / ec)
        lines.append(f"| {m} | {u[rk]:{rf}} | {e[rk]:{rf}} | {rate_ratios[-1]:.2f}x | "
                     f"{'-' if uc is None else format(uc, cf)} | {'-' if ec is None else format(ec, cf)} | "
                     f"{f'{uc / ec:.2f}x' if uc and ec else '-'} |")
    if not rate_ratios:
        return ""
    text = (f"Median over the {len(rate_ratios)} modes: io_uring's {rname} is "
            f"{statistics.median(rate_ratios):.2f}x epoll's "
            f"(range {min(rate_ratios):.2f}x-{max(rate_ratios):.2f}x)")
    if cost_ratios:
        text += (f", and its {cname} {statistics.median(cost_ratios):.2f}x epoll's "
                 f"(range {min(cost_ratios):.2f}x-{max(cost_ratios):.2f}x)")
    return "\n".join(lines) + "\n\n" + text + "."


def others_note(runs: list[dict]) -> str:
    """One line on how quiet the machine was: CPU of unrelated processes per run."""
    ok = [r for r in runs if "other_cpu_percent" in r]
    if not ok:
        return ""
    worst = max(ok, key=lambda r: r["other_cpu_percent"])
    note = (f"Other processes during the runs: median {statistics.median(r['other_cpu_percent'] for r in ok):.0f}%, "
            f"max {worst['other_cpu_percent']:.0f}% of one core ({worst['path']}, round {worst['round']})")
    if worst["other_cpu_percent"] > OTHERS_WARN_PERCENT:
        note += "; the machine was not quiet, so treat this run's figures with care"
    return note + "."


TABLE_HEAD = ["path", "median Gbit/s", "min", "max", "vs HAProxy",
              "proxy CPU-s/GB", "proxy CPU %", "zc copied", "runs ok"]


def table_cells(rows: list[dict]) -> list[list[str]]:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    out = []
    for r in rows:
        out.append([
            r["path"], f(r.get("median_gbps"), ".2f"), f(r.get("min_gbps"), ".2f"),
            f(r.get("max_gbps"), ".2f"),
            "-" if r.get("ratio_vs_haproxy") is None else f"{r['ratio_vs_haproxy']:.2f}x",
            f(r.get("median_cpu_s_per_gb"), ".3f"), f(r.get("median_cpu_percent"), ".0f"),
            "-" if r.get("zc_copied_percent") is None else f"{r['zc_copied_percent']:.0f}%",
            f"{r['runs_ok']}/{r['runs']}",
        ])
    return out


def text_table(rows: list[dict]) -> str:
    cells = [TABLE_HEAD] + table_cells(rows)
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_HEAD))]
    lines = []
    for n, c in enumerate(cells):
        lines.append("  ".join([c[0].ljust(widths[0])]
                               + [c[i].rjust(widths[i]) for i in range(1, len(c))]))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(TABLE_HEAD) + " |",
             "|---|" + "---:|" * (len(TABLE_HEAD) - 1)]
    lines += ["| " + " | ".join(c) + " |" for c in table_cells(rows)]
    return "\n".join(lines)


def _first_line(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = [l for l in (p.stdout + p.stderr).splitlines() if l.strip()]
    return lines[0].strip() if lines else "unknown"


def machine_info() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"kernel": platform.release(), "nproc": os.cpu_count(), "cpu_model": cpu,
            "python": platform.python_version()}


def software_versions(paths: list[Path_]) -> dict:
    def version(argv: list[str], pattern: str) -> str:
        line = _first_line(argv)
        m = re.search(pattern, line)
        return m.group(1) if m else line
    kinds = {p.kind for p in paths}
    v = {"iperf3": version([IPERF3, "--version"], r"iperf ([\d.]+)")}
    if "haproxy" in kinds:
        v["HAProxy"] = version([HAPROXY, "-v"], r"version (\S+)")
    if "nginx" in kinds:
        v["nginx"] = version([NGINX, "-v"], r"nginx/(\S+)")
    if "socat" in kinds:
        out = subprocess.run([SOCAT, "-V"], capture_output=True, text=True).stdout
        m = re.search(r"socat version (\S+)", out)
        v["socat"] = m.group(1) if m else "unknown"
    if "uring" in kinds:
        rev = _first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
        v["uring-proxy"] = (f"git {rev}" if not rev.startswith("fatal")
                            else "working tree (no commit yet)")
    return v


def busy_percent(interval: float = 1.0) -> float:
    """Share of all CPUs not idle over `interval`, from /proc/stat: a busy machine
    (a build, a test suite) before the run makes every figure of the run suspect."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        return sum(vals), vals[3] + vals[4]  # total, idle + iowait
    t0, i0 = sample()
    time.sleep(interval)
    t1, i1 = sample()
    return 100.0 * (1 - (i1 - i0) / max(1, t1 - t0))


def command_line(script_file: str = __file__) -> str:
    exe = Path(sys.executable)
    try:
        exe_s = str(exe.relative_to(REPO)) if exe.is_absolute() else str(exe)
    except ValueError:
        exe_s = str(exe)
    try:
        script = str(Path(script_file).resolve().relative_to(REPO))
    except ValueError:
        script = str(Path(script_file))
    return shlex.join([exe_s, script, *sys.argv[1:]])


def variant_args(streams: int = 1, reverse: bool = False, cpus: str | None = None) -> str:
    """The options that make a run a different scenario: its docs section and its
    name in the results are keyed by them ("" for the default single stream)."""
    return ((f" --streams {streams}" if streams > 1 else "") + (" --reverse" if reverse else "")
            + (f" --cpus {cpus}" if cpus else ""))


def section_markers(script: str, variant: str = "") -> tuple[str, str]:
    """The comment lines around the part of DOCS_FILE that `script` with the
    options `variant` writes; every other part of the file stays as it is."""
    return (f"<!-- bench/{script}{variant} --write-docs: begin -->",
            f"<!-- bench/{script}{variant} --write-docs: end -->")


def pinning_note(cpus: str | None) -> str:
    if not cpus:
        return "not pinned (the scheduler places the proxy, the load and the server)"
    return (f"every proxy pinned with `taskset -c {cpus}` (HAProxy then starts one thread; "
            "uring-proxy and nginx are one thread anyway); load and server not pinned")


def write_docs(meta: dict, rows: list[dict], runs: list[dict]) -> None:
    m, v, cfg = meta["machine"], meta["versions"], meta["config"]
    streams, reverse, cpus = cfg.get("streams", 1), cfg.get("reverse", False), cfg.get("cpus")
    variant = variant_args(streams, reverse, cpus)
    markers = section_markers("throughput.py", variant)
    failures = [r for r in runs if "error" in r]
    what = ("Single TCP stream" if streams == 1 else f"{streams} parallel TCP streams") + (
        ", upstream to client (`-R`)" if reverse else "") + (", proxy on one core" if cpus else "")
    section = f"""{markers[0]}
## {what} through the proxy (iperf3, loopback)

- Date: {meta['date']}
- Machine: Linux {m['kernel']}, {m['nproc']} CPUs, {m['cpu_model']}
- Software: {', '.join(f'{k} {val}' for k, val in v.items())}, Python {m['python']}
- CPU busy in the second before the run: {meta['busy_percent_before']:.0f}%
- Command (from the repository root): `{meta['command']}`
- {cfg['rounds']} rounds x {cfg['seconds']} s per path, paths interleaved round-robin; load
  `{shlex.join(iperf_argv(0, cfg['seconds'], streams, reverse)).replace(' -p 0', ' -p P')}`;
  {pinning_note(cpus)}; proxy extra arguments:
  {('`' + shlex.join(cfg['proxy_args']) + '`') if cfg['proxy_args'] else 'none'}

{markdown_table(rows)}

- **median Gbit/s**: median over the rounds of iperf3's `end.sum_received.bits_per_second`
  (what the receiving end got, over all streams); min and max over the same rounds. A
  run in which a stream carried nothing, or uring-proxy forwarded fewer bytes than the
  receiver counted, failed.
- **vs HAProxy**: this path's median over HAProxy 2.6 `mode tcp`'s median in the same
  run. Quote this ratio, not the Gbit/s: the client, the server and the proxy share the
  machine's cores, and absolute figures drift by tens of percent between runs.
- **proxy CPU-s/GB**: CPU seconds (user + system, all threads and child processes) the
  proxy spent during the run, per 10^9 bytes delivered; lower is better. **proxy
  CPU %**: the same CPU time over the run's wall time (100 = one core).
- **zc copied**: for zero-copy variants, the share of `SEND_ZC` sends whose
  notification said the kernel copied after all (`IORING_NOTIF_USAGE_ZC_COPIED`). On
  loopback and veth it is 100%: zero-copy cannot win there, and its figure says so.
- {others_note(runs) or 'No run finished.'}
{('- Failed runs: ' + '; '.join(f"{r['path']} round {r['round']}: {r['error'].splitlines()[0]}" for r in failures) + chr(10)) if failures else ''}
### io_uring against epoll, mode by mode (same run)

Both backends run the same engine; only the driver differs (docs/architecture.md). A
ratio above 1 in the throughput column, or below 1 in the CPU column, is io_uring's
advantage in this run; near 1 is its absence.

{backend_ratios(rows) or 'Not measured in this run (select both backends to see it).'}

### How to reproduce

    .venv/bin/python bench/throughput.py --rounds {cfg['rounds']} --seconds {cfg['seconds']}{variant} --write-docs

The peers' configurations are in "How the peers run" at the top of this file.
{markers[1]}
"""
    replace_docs_section(markers, section)


# The parts of DOCS_FILE the other scripts write (their default variants).
HTTP_SECTION = section_markers("http_rate.py")
CONN_SECTION = section_markers("http_rate.py", " --close")
IDLE_SECTION = section_markers("idle.py")
STORM_SECTION = section_markers("storm.py")


def docs_section(markers: tuple[str, str]) -> str:
    """The text of DOCS_FILE from markers[0] to markers[1] inclusive, or ''."""
    try:
        text = DOCS_FILE.read_text()
    except FileNotFoundError:
        return ""
    a, b = text.find(markers[0]), text.find(markers[1])
    return text[a:b + len(markers[1])] + "\n" if 0 <= a < b else ""


def write_docs_file(text: str) -> None:
    DOCS_FILE.parent.mkdir(parents=True, exist_ok=True)
    DOCS_FILE.write_text(text)


def replace_docs_section(markers: tuple[str, str], section: str) -> None:
    """Put `section` (markers included) in DOCS_FILE in place of the old one between
    the same markers, or at the end; the rest of the file stays as it is."""
    text = DOCS_FILE.read_text() if DOCS_FILE.exists() else "# Benchmarks\n\n"
    old = docs_section(markers)
    write_docs_file(text.replace(old, section) if old else text.rstrip("\n") + "\n\n" + section)


def runs_of(paths: list[Path_], runs: list[dict]):
    """(path, its successful runs, a summary row with the counts) for each path."""
    for p in paths:
        ok = [r for r in runs if r["path"] == p.name and "error" not in r]
        yield p, ok, {"path": p.name, "runs_ok": len(ok), "runs": sum(r["path"] == p.name for r in runs)}


# ---------------------------------------------------------------- main


def stop_everything(children: Children) -> None:
    """Stop every child; signals are ignored from here on, so a second Ctrl-C
    cannot cut the clean-up short."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    children.stop_all()


def eta(elapsed: float, done: int, total: int, guess_per_run: float) -> str:
    """`~Ns left`: the mean run so far times the runs to go (before the first run
    ends, the caller's guess per run)."""
    per_run = elapsed / done if done else guess_per_run
    left = per_run * (total - done)
    return f"~{left / 60:.0f} min left" if left >= 120 else f"~{left:.0f} s left"


def run_rounds(paths: list[Path_], rounds: int, seconds: int, runs: list[dict],
               run_one, figure, after_failure=None) -> bool:
    """Every path once per round, round-robin, so drift on the machine hits every
    path alike; each result (or {"error": ...}) is appended to `runs` with its
    round. `figure(result)` is the progress line's text. Returns True when
    interrupted (Ctrl-C, SIGTERM): the runs so far stay in `runs`."""
    total, n = rounds * len(paths), 0
    log(f"{rounds} rounds x {len(paths)} paths x {seconds} s (about {total * (seconds + 1.5):.0f} s)")
    started = time.monotonic()
    try:
        for rnd in range(1, rounds + 1):
            for path in paths:
                n += 1
                prefix = (f"[{n}/{total}] round {rnd}/{rounds} {path.name:<26}"
                          f" {eta(time.monotonic() - started, n - 1, total, seconds + 1.5)}")
                log(f"{prefix} running ...")
                try:
                    r = run_one(path)
                except RunError as e:
                    r = {"path": path.name, "error": str(e)}
                    log(f"{prefix} FAILED: {e}")
                    if after_failure:
                        after_failure()
                else:
                    log(f"{prefix} {figure(r)}")
                    if r.get("other_cpu_percent", 0) > OTHERS_WARN_PERCENT:
                        log(f"{prefix} warning: other processes used "
                            f"{r['other_cpu_percent']:.0f}% of a core during this run")
                    if r.get("warning"):
                        log(f"{prefix} warning: {r['warning']}")
                r["round"] = rnd
                runs.append(r)
                time.sleep(SETTLE_S)
    except KeyboardInterrupt:
        log("interrupted; stopping children (the table shows the runs that finished)")
        return True
    return False


def optional_peer(paths: list[Path_], explicit: bool, kind: str, files: list[str],
                  debs: str) -> list[Path_]:
    """Paths of `kind` stay only if its files exist; a peer the user named is an
    error when missing, one of the default set is skipped with a note."""
    if not any(p.kind == kind for p in paths):
        return paths
    missing = [f for f in files if not os.path.exists(f)]
    if not missing:
        return paths
    if explicit:
        raise BenchError(f"missing {', '.join(missing)}; apt-get install {debs}")
    log(f"note: {', '.join(missing)} not installed, skipping the {kind} path "
        f"(apt-get install {debs})")
    return [p for p in paths if p.kind != kind]


def check_tools(paths: list[Path_], explicit: bool, need_iperf3: bool = True) -> list[Path_]:
    missing = []
    if need_iperf3 and not os.access(IPERF3, os.X_OK):
        missing.append(f"iperf3 ({IPERF3})")
    if any(p.kind == "haproxy" for p in paths) and not os.access(HAPROXY, os.X_OK):
        missing.append(f"haproxy ({HAPROXY})")
    if missing:
        raise BenchError(f"missing {', '.join(missing)}; `make bench` installs them "
                         "(Debian: apt-get install iperf3 haproxy)")
    paths = optional_peer(paths, explicit, "socat", [SOCAT], "socat")
    paths = optional_peer(paths, explicit, "nginx", [NGINX, NGINX_STREAM_MODULE],
                          "nginx-light libnginx-mod-stream")
    if any(p.kind == "uring" for p in paths):
        try:
            p = subprocess.run([sys.executable, "-m", "uring_net", "--help"], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
            ok, why = p.returncode == 0, (p.stderr or p.stdout).strip().splitlines()
        except (OSError, subprocess.TimeoutExpired) as e:
            ok, why = False, [str(e)]
        if not ok:
            raise BenchError(
                f"uring-proxy does not run with {sys.executable} -m uring_net"
                f" ({why[-1] if why else 'no output'}); build it with `make bench`,"
                " or leave it out: --paths direct,haproxy,socat")
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    names = ", ".join(p.name for p in all_paths())
    ap = argparse.ArgumentParser(
        description="Bulk iperf3 throughput (1 or N streams, either direction) through uring-proxy and its peers.",
        epilog=f"paths: {names} ('uring-proxy' = every uring-proxy variant)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds over all paths (default 5)")
    ap.add_argument("--seconds", type=int, default=4, help="iperf3 -t per run (default 4)")
    ap.add_argument("--streams", type=int, default=1,
                    help="parallel TCP streams, iperf3 -P (default 1); the figure sums them")
    ap.add_argument("--reverse", action="store_true",
                    help="the server sends, iperf3 -R: bytes cross the proxy upstream to client")
    ap.add_argument("--cpus", metavar="LIST",
                    help="pin every proxy (HAProxy, nginx, socat and uring-proxy alike) to these "
                         "CPUs with taskset -c LIST, e.g. 1: a per-core figure that does not depend "
                         "on how the load generator and the server share the machine")
    ap.add_argument("--paths", help="comma-separated paths to run (default: all)")
    ap.add_argument("--proxy-args", default="",
                    help='extra uring-proxy arguments, one string: "--buffer-size 131072"')
    ap.add_argument("--json", metavar="FILE", help="write every run's raw results here")
    ap.add_argument("--write-docs", action="store_true",
                    help=f"rewrite {DOCS_FILE.relative_to(REPO)} from this run")
    a = ap.parse_args(argv)
    if a.rounds < 1 or a.seconds < 1 or a.streams < 1:
        ap.error("--rounds, --seconds and --streams must be at least 1")
    if a.cpus is not None:
        try:
            check_cpus(a.cpus)
        except BenchError as e:
            ap.error(str(e))
    return a


def compile_c(source: Path, workdir: Path) -> Path:
    """`cc -O2 -Wall` a load generator of bench/ (storm.c, pingpong.c) into workdir."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BenchError("no C compiler (cc); `make bench` installs gcc")
    exe = workdir / source.stem
    r = subprocess.run([cc, "-O2", "-Wall", "-o", str(exe), str(source)], capture_output=True, text=True)
    if r.returncode:
        raise BenchError(f"compiling {source.name} failed:\n{r.stderr}")
    return exe


def raise_fd_limit(need: int) -> None:
    """Lift the soft fd limit to `need` (children inherit it): a load generator
    that hits EMFILE reports socket errors that are the bench's, not the proxy's."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise BenchError(f"this needs {need} file descriptors; the hard limit is {hard} (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def check_cpus(cpus: str) -> None:
    """--cpus must name CPUs this process may run on, and taskset must exist:
    a pinning that silently did not happen would make a per-core figure a lie."""
    if not os.access(TASKSET, os.X_OK):
        raise BenchError(f"--cpus needs {TASKSET} (Debian: apt-get install util-linux)")
    wanted: set[int] = set()
    try:
        for part in cpus.split(","):
            lo, _, hi = part.partition("-")
            wanted.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise BenchError(f"--cpus {cpus!r}: expected a list like 1 or 0,2-3") from None
    allowed = os.sched_getaffinity(0)
    if not wanted or not wanted <= allowed:
        raise BenchError(f"--cpus {cpus}: this process may run only on CPUs "
                         f"{','.join(map(str, sorted(allowed)))}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        paths, explicit = select_paths(args.paths)
        paths = check_tools(paths, explicit)
        proxy_args = shlex.split(args.proxy_args)
    except (BenchError, ValueError) as e:
        print(f"throughput.py: error: {e}", file=sys.stderr)
        return 2

    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line(),
        "machine": machine_info(),
        "versions": software_versions(paths),
        "busy_percent_before": round(busy_percent(), 1),
        "config": {"rounds": args.rounds, "seconds": args.seconds, "streams": args.streams,
                   "reverse": args.reverse, "cpus": args.cpus,
                   "paths": [p.name for p in paths], "proxy_args": proxy_args},
    }
    if meta["busy_percent_before"] > BUSY_WARN_PERCENT:
        log(f"warning: the machine was {meta['busy_percent_before']:.0f}% busy before the run; "
            "other work on the cores skews every figure")
    runs: list[dict] = []
    children = Children()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="uring-bench-") as tmp:
        workdir = Path(tmp)
        try:
            server = IperfServer(children, workdir)
            log(f"iperf3 server on 127.0.0.1:{server.port}")
            # After a failed run: a test that died half way can leave the
            # server waiting on it.
            interrupted = run_rounds(
                paths, args.rounds, args.seconds, runs,
                lambda path: measure(children, server, path, args.seconds, proxy_args, workdir,
                                     args.streams, args.reverse, args.cpus),
                lambda r: f"{r['gbps']:6.2f} Gbit/s" + (
                    f", proxy {r['cpu_s_per_gb']:.3f} CPU-s/GB ({r['cpu_percent']:.0f}% CPU)"
                    if r.get("cpu_s_per_gb") is not None else ""),
                server.restart)
        except KeyboardInterrupt:
            interrupted = True
        except BenchError as e:
            print(f"throughput.py: error: {e}", file=sys.stderr)
            return 2
        finally:
            stop_everything(children)

    rows = summarize(paths, runs)
    print(f"\niperf3 throughput, {args.streams} stream(s){', reverse' if args.reverse else ''}"
          f"{', proxy on CPUs ' + args.cpus if args.cpus else ''}, {args.rounds} rounds x {args.seconds} s, "
          f"{meta['date']}, Linux {meta['machine']['kernel']}, {meta['machine']['nproc']} CPUs")
    print(text_table(rows))
    if others_note(runs):
        print(others_note(runs))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=2) + "\n")
        log(f"wrote {out}")
    if interrupted:
        if args.write_docs:
            log(f"not writing {DOCS_FILE} from an interrupted run")
        return 130
    if args.write_docs:
        write_docs(meta, rows, runs)
        log(f"wrote {DOCS_FILE}")
    failed = [r for r in runs if "error" in r]
    if failed:
        log(f"{len(failed)} of {len(runs)} runs failed (see above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
