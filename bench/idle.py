#!/usr/bin/env python3
"""Idle footprint: memory, fds and CPU per idle connection, uring-proxy beside HAProxy.

README
======
What it measures
    For each path, N client connections through the proxy to an upstream that accepts
    and never answers; each client sends one byte, so every flow is established end to
    end, then nothing moves. With the flows open it reads, from /proc, the proxy's RSS
    and fd count against the same proxy before the flows, and its CPU time over
    ``--idle`` seconds (timers running: uring-proxy's idle timeout, HAProxy's
    ``timeout client/server``). The figures are per connection, and the table the
    proxy allocates for flows is charged to them (uring-proxy's flow table grows with
    the flows open, not with ``--max-conns``).

    N defaults to what this machine's fd limit allows: the hard RLIMIT_NOFILE per
    process (each side needs an fd per connection; a proxy two per idle flow, in
    splice mode too: a direction holds a pipe only while bytes are in it).

Usage (from the repository root)
    .venv/bin/python bench/idle.py                      # N from the fd limit, 10 s idle
    .venv/bin/python bench/idle.py --connections 5000 --idle 5
    .venv/bin/python bench/idle.py --paths haproxy,uring-proxy-copy --write-docs

Exit status: 0 all runs done, 1 some run failed, 2 cannot start.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402  (paths, proxies, /proc accounting, docs helpers)

DEFAULT_PATHS = "haproxy,nginx-stream,uring-proxy-copy,uring-proxy-auto,uring-proxy-splice,uring-proxy-epoll-copy"
IDLE_SECTION = tp.IDLE_SECTION

# HAProxy with room for N connections (the shared configuration stops at 4,000).
HAPROXY_IDLE_CFG = """\
global
    maxconn {maxconn}
defaults
    mode tcp
    timeout connect 5s
    timeout client 3600s
    timeout server 3600s
listen p
    bind 127.0.0.1:{proxy_port}
    server s1 127.0.0.1:{upstream_port}
"""

# nginx stream with room for N connections (two fds each: client and upstream).
NGINX_IDLE_CFG = """\
load_module {module};
worker_processes 1;
worker_rlimit_nofile {nofile};
daemon off;
pid {workdir}/nginx-idle.pid;
events {{ worker_connections {conns}; }}
stream {{
    server {{
        listen 127.0.0.1:{proxy_port};
        proxy_pass 127.0.0.1:{upstream_port};
        proxy_half_close on;
        proxy_timeout 3600s;
    }}
}}
"""

# The upstream: accepts and holds every connection, never reads or writes.
HOLD_UPSTREAM = """
import resource, socket, sys
h = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (h, h))
l = socket.create_server(('127.0.0.1', 0), backlog=4096)
print(l.getsockname()[1], flush=True)
held = []
while True:
    held.append(l.accept()[0])
"""


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise tp.RunError(f"no {key} for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def start_proxy(children, path, upstream_port: int, n: int, workdir: Path):
    """(process, port) for `path`, sized for n connections."""
    if path.kind == "haproxy":
        port = tp.free_port()
        cfg = workdir / "haproxy-idle.cfg"
        cfg.write_text(HAPROXY_IDLE_CFG.format(maxconn=n + 50, proxy_port=port,
                                               upstream_port=upstream_port))
        log = open(workdir / "haproxy-idle.log", "wb")
        proc = children.spawn([tp.HAPROXY, "-db", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                              stdout=log, stderr=subprocess.STDOUT)
        tp.wait_listening(port, proc, path.name, workdir / "haproxy-idle.log")
        return proc, port, None
    if path.kind == "nginx":
        port = tp.free_port()
        cfg = workdir / "nginx-idle.conf"
        cfg.write_text(NGINX_IDLE_CFG.format(module=tp.NGINX_STREAM_MODULE, workdir=workdir,
                                             nofile=2 * n + 100, conns=2 * n + 50,
                                             proxy_port=port, upstream_port=upstream_port))
        log = open(workdir / "nginx-idle.log", "wb")
        master = children.spawn([tp.NGINX, "-e", "stderr", "-p", str(workdir), "-c", str(cfg)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        tp.wait_listening(port, master, path.name, workdir / "nginx-idle.log")
        return master, port, None
    proxy = tp.Proxy(children, path, upstream_port, ["--max-conns", str(n + 10)], workdir)
    return proxy.proc, proxy.port, proxy


def serving_pid(proc) -> int:
    """The process that holds the connections: nginx's one worker, else the proxy."""
    kids = tp._descendants(proc.pid)
    return kids[0] if len(kids) == 1 else proc.pid


def measure(children, path, n: int, idle_s: float, workdir: Path) -> dict:
    up = children.spawn([sys.executable, "-c", HOLD_UPSTREAM], stdout=subprocess.PIPE)
    upstream_port = int(up.stdout.readline())
    proc, port, proxy = start_proxy(children, path, upstream_port, n, workdir)
    socks: list[socket.socket] = []
    try:
        time.sleep(0.5)
        pid = serving_pid(proc)
        rss0, fds0 = status_kib(pid, "VmRSS"), fd_count(pid)
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"x")
            socks.append(s)
        time.sleep(2.0)           # the last flows reach their upstream
        cpu0 = tp.tree_cpu_seconds(proc.pid)
        time.sleep(idle_s)
        cpu = tp.tree_cpu_seconds(proc.pid) - cpu0
        rss1, fds1 = status_kib(pid, "VmRSS"), fd_count(pid)
        if proc.poll() is not None:
            raise tp.RunError(f"{path.name} exited with status {proc.returncode}")
        return {"path": path.name, "connections": n, "rss_before_kib": rss0, "rss_kib": rss1,
                "rss_per_conn_b": (rss1 - rss0) * 1024 / n, "fds_per_conn": (fds1 - fds0) / n,
                "idle_cpu_s": cpu, "idle_s": idle_s}
    finally:
        for s in socks:
            s.close()
        if proxy is not None:
            proxy.stop()
        else:
            children.stop(proc)
        children.stop(up)


def fits(hard: int, want: int) -> int:
    """Connections the fd limit allows (a proxy two fds per idle flow, the client one)."""
    return max(1, min(want, hard - 200, (hard - 200) // 2))


HEAD = ["path", "connections", "RSS per conn (B)", "vs HAProxy", "fds per conn",
        "idle CPU (s)", "RSS total (MB)"]


def cells(rows: list[dict]) -> list[list[str]]:
    base = next((r["rss_per_conn_b"] for r in rows if r["path"] == "haproxy" and "error" not in r), None)
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["path"], "-", "failed: " + r["error"].splitlines()[0], "-", "-", "-", "-"])
            continue
        out.append([r["path"], f"{r['connections']:,}", f"{r['rss_per_conn_b']:,.0f}",
                    f"{r['rss_per_conn_b'] / base:.2f}x" if base else "-",
                    f"{r['fds_per_conn']:.2f}", f"{r['idle_cpu_s']:.3f} in {r['idle_s']:.0f}",
                    f"{r['rss_kib'] / 1024:.1f}"])
    return out


def write_docs(meta: dict, rows: list[dict]) -> None:
    m = meta["machine"]
    table = "\n".join(["| " + " | ".join(HEAD) + " |", "|---|" + "---:|" * (len(HEAD) - 1)]
                      + ["| " + " | ".join(c) + " |" for c in cells(rows)])
    section = f"""{IDLE_SECTION[0]}
## Idle footprint: memory, fds and CPU per idle connection

- Date: {meta['date']}
- Machine: Linux {m['kernel']}, {m['nproc']} CPUs, {m['cpu_model']}; hard fd limit {meta['fd_hard']}
- Command (from the repository root): `{meta['command']}`
- Each client sends one byte, so the flow is established end to end; the upstream holds
  every connection and never answers. Figures are the proxy's, from /proc: RSS with the
  flows open minus RSS before them, per connection (uring-proxy's flow table, which grows
  with the flows, is counted); fds likewise; CPU over the idle period with timers running.
  HAProxy runs with `maxconn` N + 50 and 3600 s client/server timeouts; nginx `stream`
  with one worker, `worker_connections` 2N + 50 and `proxy_timeout 3600s` (the worker's
  figures). socat is left out: it forks a process per connection.

{table}

A splice flow holds a pipe per direction only while bytes are in it, so an idle one
needs its two sockets, as in the other modes; the pipe pool (32 pipes) is part of the
proxy before the flows.
{IDLE_SECTION[1]}
"""
    tp.replace_docs_section(IDLE_SECTION, section)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Idle footprint per connection: uring-proxy beside HAProxy.",
                                 epilog="paths: " + ", ".join(p.name for p in tp.all_paths()
                                                              if p.kind in ("haproxy", "nginx", "uring")))
    ap.add_argument("--connections", type=int, default=0,
                    help="idle connections per path (default: what the fd limit allows)")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measured (default 10)")
    ap.add_argument("--paths", default=DEFAULT_PATHS, help=f"comma-separated paths (default {DEFAULT_PATHS})")
    ap.add_argument("--json", metavar="FILE", help="write the run's raw results here")
    ap.add_argument("--write-docs", action="store_true",
                    help="write the idle-footprint section of docs/benchmarks.md from this run")
    args = ap.parse_args(argv)
    try:
        paths, _ = tp.select_paths(args.paths)
    except tp.BenchError as e:
        print(f"idle.py: error: {e}", file=sys.stderr)
        return 2
    bad = [p.name for p in paths if p.kind not in ("haproxy", "nginx", "uring")]
    if bad:
        # direct has no proxy to measure; socat forks a process per connection,
        # and 9,900 processes would measure the fork, not a proxy's footprint.
        print(f"idle.py: error: only HAProxy, nginx-stream and uring-proxy paths, not "
              f"{', '.join(bad)}", file=sys.stderr)
        return 2
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    want = args.connections or (hard - 200) // 2
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": tp.command_line(__file__), "machine": tp.machine_info(), "fd_hard": hard}
    rows = []
    children = tp.Children()
    with tempfile.TemporaryDirectory(prefix="uring-bench-idle-") as tmp:
        try:
            for path in paths:
                n = fits(hard, want)
                tp.log(f"{path.name}: {n:,} idle connections")
                try:
                    rows.append(measure(children, path, n, args.idle, Path(tmp)))
                except (tp.RunError, OSError) as e:
                    rows.append({"path": path.name, "error": str(e)})
        finally:
            tp.stop_everything(children)
    c = [HEAD] + cells(rows)
    w = [max(len(x[i]) for x in c) for i in range(len(HEAD))]
    print("\n".join("  ".join([x[0].ljust(w[0])] + [x[i].rjust(w[i]) for i in range(1, len(x))]) for x in c))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "summary": rows, "runs": rows}, indent=2) + "\n")
    if args.write_docs:
        write_docs(meta, rows)
        tp.log(f"wrote the idle-footprint section of {tp.DOCS_FILE}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
