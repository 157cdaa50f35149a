#!/usr/bin/env python3
"""HTTP keep-alive requests per second through uring-proxy and its peers, on loopback.

README
======
What it measures
    ``wrk -t1 -c100 -dSs http://127.0.0.1:P/`` against an nginx that answers every
    request with ``return 200 "hello world\\n"`` (NGINX_HTTP_CFG below), through each
    *path*: the same paths as bench/throughput.py (direct, HAProxy, nginx stream,
    socat, every uring-proxy mode on both backends), interleaved round-robin so drift
    on the machine hits every path alike. The figure is wrk's ``Requests/sec``.

    Small requests on 100 connections measure what a bulk stream does not: the cost
    of one small recv and one small send per request, per direction, and how many
    ready flows one batch carries. For each proxy it also reports the proxy's CPU
    time per request (utime + stime of the proxy's process tree, in microseconds)
    and its CPU % of one core. A run with socket errors or non-2xx answers fails:
    a proxy that loses requests is not fast.

    For uring-proxy, the ``stopped`` line must show at least the 100 connections wrk
    opened, as proof the requests crossed the proxy.

Usage (from the repository root)
    make bench                                  # both bench scripts, after throughput
    .venv/bin/python bench/http_rate.py              # 5 rounds x 4 s, every path
    .venv/bin/python bench/http_rate.py --paths haproxy,uring-proxy-copy,uring-proxy-epoll-copy
    .venv/bin/python bench/http_rate.py --connections 400 --seconds 8
    .venv/bin/python bench/http_rate.py --json bench/results/http.json --write-docs
    .venv/bin/python bench/http_rate.py --close      # connection rate: a new connection
                                                     # per request (Connection: close)

    ``--write-docs`` rewrites the HTTP section of docs/benchmarks.md (and only that
    section; bench/throughput.py keeps it when it rewrites the rest).

Reading the numbers
    wrk, nginx and the proxy share the machine's cores: compare paths inside one run
    and quote the ratio to HAProxy's median, not the req/s.

Exit status: 0 all runs done, 1 some run failed, 2 cannot start, 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402  (the paths, proxies and /proc accounting)

WRK = "/usr/bin/wrk"

# The upstream: one nginx worker answering from memory, no access log (a log
# write per request would be the bottleneck being measured).
NGINX_HTTP_CFG = """\
worker_processes 1;
daemon off;
pid {workdir}/nginx-http.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "hello world\\n"; }}
    }}
}}
"""


class HttpServer:
    """The nginx every path ends at."""

    def __init__(self, children: tp.Children, workdir: Path) -> None:
        self.port = tp.free_port()
        cfg = workdir / "nginx-http.conf"
        cfg.write_text(NGINX_HTTP_CFG.format(workdir=workdir, port=self.port))
        self.logfile = workdir / "nginx-http.log"
        with open(self.logfile, "wb") as out:
            self.proc = children.spawn([tp.NGINX, "-e", "stderr", "-p", str(workdir), "-c", str(cfg)],
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            tp.wait_listening(self.port, self.proc, "nginx (HTTP upstream)", self.logfile)
        except tp.RunError as e:
            raise tp.BenchError(str(e)) from None


def parse_wrk(out: str) -> dict:
    """wrk's text report: requests, duration, req/s, errors and non-2xx answers."""
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m or not rps:
        raise tp.RunError("wrk printed no result: " + (out.strip().splitlines() or ["nothing"])[-1])
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)]
    r = {"requests": int(m.group(1)), "seconds": float(m.group(2)) * scale,
         "req_per_s": float(rps.group(1)), "socket_errors": 0, "non_2xx": 0}
    e = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if e:
        r["socket_errors"] = sum(int(x) for x in e.groups())
    n = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if n:
        r["non_2xx"] = int(n.group(1))
    return r


def run_wrk(children: tp.Children, port: int, seconds: int, connections: int,
            close: bool = False) -> dict:
    # --close: "Connection: close" on every request, so nginx closes after each answer
    # and wrk opens a new connection for the next: one request = one connection.
    argv = [WRK, "-t1", f"-c{connections}", f"-d{seconds}s", *(["-H", "Connection: close"] if close else []),
            f"http://127.0.0.1:{port}/"]
    proc = children.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        raise tp.RunError(f"wrk did not finish within {seconds + 30} s") from None
    finally:
        children.stop(proc)
    r = parse_wrk(out.decode(errors="replace"))
    if r["socket_errors"] or r["non_2xx"]:
        raise tp.RunError(f"wrk saw {r['socket_errors']} socket errors and {r['non_2xx']} "
                          f"non-2xx answers in {r['requests']} requests")
    return r


def measure(children: tp.Children, server: HttpServer, path: tp.Path_, seconds: int,
            connections: int, proxy_args: list[str], workdir: Path, close: bool = False,
            cpus: str | None = None) -> dict:
    result: dict = {"path": path.name}
    before = tp.others_snapshot()
    if not path.is_proxy:
        result.update(run_wrk(children, server.port, seconds, connections, close))
    else:
        proxy = tp.Proxy(children, path, server.port, proxy_args, workdir, cpus)
        result["argv"] = proxy.argv
        try:
            cpu0 = proxy.cpu_seconds()
            result.update(run_wrk(children, proxy.port, seconds, connections, close))
            tp.wait_no_descendants(proxy.proc.pid)
            cpu1 = proxy.cpu_seconds()
            if proxy.proc.poll() is not None:
                raise tp.RunError(f"{path.name} exited with status {proxy.proc.returncode} "
                                  "during the test" + tp._tail(proxy.logfile))
        finally:
            status, proxy_log = proxy.stop()
        result["proxy_exit_status"] = status
        result["cpu_seconds"] = cpu1 - cpu0
        result["cpu_us_per_request"] = 1e6 * result["cpu_seconds"] / max(1, result["requests"])
        result["cpu_percent"] = 100.0 * result["cpu_seconds"] / result["seconds"]
        if path.kind == "uring":
            stopped = tp._stopped_fields(proxy_log)
            if stopped.get("connections", 0) < connections:
                raise tp.RunError(f"the proxy's stopped line shows {stopped.get('connections')} "
                                  f"connections, not the {connections} wrk opened")
            if status != 0:
                result["warning"] = f"exit status {status} after SIGTERM (contract says 0)"
    result["other_cpu_s"] = tp.others_cpu_seconds(before, tp.others_snapshot())
    result["other_cpu_percent"] = 100.0 * result["other_cpu_s"] / result["seconds"]
    return result


# ---------------------------------------------------------------- report


def summarize(paths: list[tp.Path_], runs: list[dict]) -> list[dict]:
    rows = []
    for p, ok, row in tp.runs_of(paths, runs):
        if ok:
            v = [r["req_per_s"] for r in ok]
            row.update(median=statistics.median(v), min=min(v), max=max(v))
            if p.is_proxy:
                row["cpu_us_per_request"] = statistics.median(r["cpu_us_per_request"] for r in ok)
                row["cpu_percent"] = statistics.median(r["cpu_percent"] for r in ok)
        rows.append(row)
    base = next((r.get("median") for r in rows if r["path"] == "haproxy"), None)
    for r in rows:
        r["ratio_vs_haproxy"] = r["median"] / base if base and r.get("median") else None
    return rows


HEAD = ["path", "median req/s", "min", "max", "vs HAProxy", "proxy CPU us/req", "proxy CPU %",
        "runs ok"]
# With --close every request is a connection: the same columns, named for that.
HEAD_CLOSE = ["path", "median conn/s", "min", "max", "vs HAProxy", "proxy CPU us/conn",
              "proxy CPU %", "runs ok"]


def cells(rows: list[dict]) -> list[list[str]]:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    return [[r["path"], f(r.get("median"), ",.0f"), f(r.get("min"), ",.0f"), f(r.get("max"), ",.0f"),
             "-" if r.get("ratio_vs_haproxy") is None else f"{r['ratio_vs_haproxy']:.2f}x",
             f(r.get("cpu_us_per_request"), ".1f"), f(r.get("cpu_percent"), ".0f"),
             f"{r['runs_ok']}/{r['runs']}"] for r in rows]


def text_table(rows: list[dict], head: list[str] = HEAD) -> str:
    c = [head] + cells(rows)
    w = [max(len(x[i]) for x in c) for i in range(len(head))]
    lines = ["  ".join([x[0].ljust(w[0])] + [x[i].rjust(w[i]) for i in range(1, len(x))]) for x in c]
    lines.insert(1, "  ".join("-" * n for n in w))
    return "\n".join(lines)


def markdown_table(rows: list[dict], head: list[str] = HEAD) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
                     + ["| " + " | ".join(x) + " |" for x in cells(rows)])


def backend_ratios(rows: list[dict], close: bool = False) -> str:
    """Per mode: io_uring's req/s over epoll's, and CPU per request likewise."""
    unit = "conn" if close else "req"
    return tp.backend_table(rows, ("median", f"{unit}/s", ",.0f", "connection rate" if close else "request rate"),
                            ("cpu_us_per_request", f"CPU us/{unit}", ".1f",
                             "CPU per connection" if close else "CPU per request"))


def variant_args(cfg: dict) -> str:
    """The options that make this run its own scenario (and docs section)."""
    return ((f" --connections {cfg['connections']}" if cfg["connections"] != 100 else "")
            + (" --close" if cfg.get("close") else "")
            + (f" --cpus {cfg['cpus']}" if cfg.get("cpus") else ""))


def write_docs(meta: dict, rows: list[dict], runs: list[dict]) -> None:
    m, cfg = meta["machine"], meta["config"]
    close = cfg.get("close", False)
    failures = [r for r in runs if "error" in r]
    markers = tp.section_markers("http_rate.py", variant_args(cfg))
    begin, end = markers
    head = HEAD_CLOSE if close else HEAD
    title = ("Connection rate: a new connection per request (wrk, `Connection: close`, loopback)"
             if close else f"HTTP requests through the proxy (wrk, keep-alive, c{cfg['connections']}, loopback)")
    if cfg.get("cpus"):
        title += ", proxy on one core"
    unit = "connection" if close else "request"
    section = f"""{begin}
## {title}

- Date: {meta['date']}
- Machine: Linux {m['kernel']}, {m['nproc']} CPUs, {m['cpu_model']}
- Software: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}, Python {m['python']}
- CPU busy in the second before the run: {meta['busy_percent_before']:.0f}%
- Command (from the repository root): `{meta['command']}`
- {cfg['rounds']} rounds x {cfg['seconds']} s per path, paths interleaved round-robin;
  load `wrk -t1 -c{cfg['connections']} -d{cfg['seconds']}s{' -H "Connection: close"' if close else ''}`;
  {tp.pinning_note(cfg.get('cpus'))}; proxy extra arguments:
  {('`' + shlex.join(cfg['proxy_args']) + '`') if cfg['proxy_args'] else 'none'}

{markdown_table(rows, head)}

- **median {'conn' if close else 'req'}/s**: median over the rounds of wrk's `Requests/sec`{' (each request on its own connection: nginx closes after answering)' if close else ''}; a run with any
  socket error or non-2xx answer counts as failed.
- **vs HAProxy**: the path's median over HAProxy's, same run.
- **proxy CPU us/{'conn' if close else 'req'}**: the proxy's CPU time (user + system, every thread and child)
  during the wrk run, in microseconds per {unit}; lower is better.
- {tp.others_note(runs) or 'No run finished.'}
{('- Failed runs: ' + '; '.join(f"{r['path']} round {r['round']}: {r['error'].splitlines()[0]}" for r in failures) + chr(10)) if failures else ''}
### io_uring against epoll, mode by mode (same run)

{backend_ratios(rows, close) or 'Not measured in this run (select both backends to see it).'}

### How to reproduce

    make bench
    .venv/bin/python bench/http_rate.py --rounds {cfg['rounds']} --seconds {cfg['seconds']}{variant_args(cfg)} --write-docs

The upstream is nginx, run as `nginx -e stderr -p DIR -c nginx-http.conf` with:

```
{NGINX_HTTP_CFG.format(workdir='DIR', port='U').rstrip()}
```

The peers run with the configurations above.
{end}
"""
    tp.replace_docs_section(markers, section)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="HTTP keep-alive req/s (wrk -> proxy -> nginx) through uring-proxy and its peers.",
        epilog="paths: " + ", ".join(p.name for p in tp.all_paths())
               + " ('uring-proxy' = every uring-proxy variant)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds over all paths (default 5)")
    ap.add_argument("--seconds", type=int, default=4, help="wrk -d per run (default 4)")
    ap.add_argument("--connections", type=int, default=100, help="wrk -c (default 100)")
    ap.add_argument("--close", action="store_true",
                    help="connection rate: every request on a new connection (Connection: close); "
                         "reports conn/s and proxy CPU us per connection, in its own docs section")
    ap.add_argument("--cpus", metavar="LIST",
                    help="pin every proxy to these CPUs with taskset -c LIST (see bench/throughput.py)")
    ap.add_argument("--paths", help="comma-separated paths to run (default: all)")
    ap.add_argument("--proxy-args", default="", help="extra uring-proxy arguments, one string")
    ap.add_argument("--json", metavar="FILE", help="write every run's raw results here")
    ap.add_argument("--write-docs", action="store_true",
                    help="rewrite the HTTP section (with --close: the connection-rate section) "
                         "of docs/benchmarks.md from this run")
    a = ap.parse_args(argv)
    if a.rounds < 1 or a.seconds < 1 or a.connections < 1:
        ap.error("--rounds, --seconds and --connections must be at least 1")
    if a.cpus is not None:
        try:
            tp.check_cpus(a.cpus)
        except tp.BenchError as e:
            ap.error(str(e))
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        paths, explicit = tp.select_paths(args.paths)
        missing = [f for f in (WRK, tp.NGINX) if not os.access(f, os.X_OK)]
        if missing:
            raise tp.BenchError(f"missing {', '.join(missing)}; `make bench` installs them "
                                "(Debian: apt-get install wrk nginx-light)")
        paths = tp.check_tools(paths, explicit, need_iperf3=False)
        proxy_args = shlex.split(args.proxy_args)
        # wrk's sockets, and a proxy's two per connection plus its own.
        tp.raise_fd_limit(3 * args.connections + 256)
    except (tp.BenchError, ValueError) as e:
        print(f"http_rate.py: error: {e}", file=sys.stderr)
        return 2
    versions = {k: v for k, v in tp.software_versions(paths).items() if k != "iperf3"}
    versions = {"wrk": tp._first_line([WRK, "-v"]).split(" [")[0].removeprefix("wrk "),
                "nginx (upstream)": tp._first_line([tp.NGINX, "-v"]).rsplit("/", 1)[-1], **versions}
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": tp.command_line(__file__),
        "machine": tp.machine_info(), "versions": versions,
        "busy_percent_before": round(tp.busy_percent(), 1),
        "config": {"rounds": args.rounds, "seconds": args.seconds, "connections": args.connections,
                   "close": args.close, "cpus": args.cpus,
                   "paths": [p.name for p in paths], "proxy_args": proxy_args},
    }
    unit = "conn" if args.close else "req"
    runs: list[dict] = []
    children = tp.Children()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, tp._raise_interrupt)
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="uring-bench-http-") as tmp:
        workdir = Path(tmp)
        try:
            server = HttpServer(children, workdir)
            tp.log(f"nginx on 127.0.0.1:{server.port}")
            interrupted = tp.run_rounds(
                paths, args.rounds, args.seconds, runs,
                lambda path: measure(children, server, path, args.seconds, args.connections,
                                     proxy_args, workdir, args.close, args.cpus),
                lambda r: f"{r['req_per_s']:9,.0f} {unit}/s" + (
                    f", proxy {r['cpu_us_per_request']:.1f} us CPU/{unit} ({r['cpu_percent']:.0f}% CPU)"
                    if "cpu_us_per_request" in r else ""))
        except KeyboardInterrupt:
            interrupted = True
        except tp.BenchError as e:
            print(f"http_rate.py: error: {e}", file=sys.stderr)
            return 2
        finally:
            tp.stop_everything(children)

    rows = summarize(paths, runs)
    what = "connections/s (Connection: close)" if args.close else "keep-alive req/s"
    print(f"\nHTTP {what}, wrk -t1 -c{args.connections}, {args.rounds} rounds x "
          f"{args.seconds} s, {meta['date']}, Linux {meta['machine']['kernel']}, "
          f"{meta['machine']['nproc']} CPUs")
    print(text_table(rows, HEAD_CLOSE if args.close else HEAD))
    if tp.others_note(runs):
        print(tp.others_note(runs))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=2) + "\n")
    if interrupted:
        return 130
    if args.write_docs:
        write_docs(meta, rows, runs)
        tp.log(f"wrote the {'connection-rate' if args.close else 'HTTP'} section of {tp.DOCS_FILE}")
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
