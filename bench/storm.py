#!/usr/bin/env python3
"""Connection storm: the latency of short connections through each proxy, on loopback.

README
======
What it measures
    ``storm client``: TOTAL connections (default 20,000), CONC at once (default 100),
    each one connect, 100 bytes sent, writing shut down, the 100 bytes read back and
    the EOF, close. Its latency runs from connect() to that EOF: the proxy's accept,
    upstream connect, both forwards, both FINs. The upstream is ``storm echo``. Both
    are bench/storm.c, compiled here with the system's cc: one C thread each, every
    sample kept and sorted (no histogram rounding), so the client is not what limits
    the tail. The direct path (client straight to the echo server) shows what the
    client and server alone reach; a proxy's tail beyond it is the proxy's.

    Paths are bench/throughput.py's, interleaved round-robin; each figure is the
    median over rounds of that run's percentile. The proxy's CPU per connection sits
    beside it.

Usage (from the repository root)
    .venv/bin/python bench/storm.py                       # 3 rounds, the default paths
    .venv/bin/python bench/storm.py --paths direct,haproxy,uring-proxy-copy --rounds 5
    .venv/bin/python bench/storm.py --total 50000 --concurrency 200 --write-docs

Exit status: 0 all runs done, 1 some run failed, 2 cannot start, 130 interrupted.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402  (the paths, proxies and /proc accounting)

SOURCE = Path(__file__).resolve().parent / "storm.c"
DEFAULT_PATHS = ("direct,haproxy,uring-proxy-copy,uring-proxy-auto,uring-proxy-zerocopy,"
                 "uring-proxy-peek,uring-proxy-splice,uring-proxy-epoll-copy,uring-proxy-epoll-splice")
SECTION = tp.STORM_SECTION
FIGURES = ("p50_us", "p99_us", "p999_us", "max_us", "conn_per_s")


def measure(children: tp.Children, exe: Path, echo_port: int, path: tp.Path_, total: int,
            conc: int, proxy_args: list[str], workdir: Path) -> dict:
    argv = [str(exe), "client", "", str(total), str(conc), "100"]
    result: dict = {"path": path.name}
    proxy = None
    if path.is_proxy:
        proxy = tp.Proxy(children, path, echo_port, proxy_args, workdir)
        result["argv"] = proxy.argv
    try:
        argv[2] = str(proxy.port if proxy else echo_port)
        cpu0 = proxy.cpu_seconds() if proxy else 0.0
        r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        if r.returncode:
            raise tp.RunError(f"storm client failed ({r.returncode}): {r.stdout.strip()} {r.stderr.strip()}")
        result.update(json.loads(r.stdout))
        if proxy:
            tp.wait_no_descendants(proxy.proc.pid)
            result["cpu_us_per_conn"] = 1e6 * (proxy.cpu_seconds() - cpu0) / total
    finally:
        if proxy:
            proxy.stop()
    return result


def summarize(paths: list[tp.Path_], runs: list[dict]) -> list[dict]:
    rows = []
    for p, ok, row in tp.runs_of(paths, runs):
        for f in FIGURES + ("cpu_us_per_conn",):
            vals = [r[f] for r in ok if f in r]
            row[f] = statistics.median(vals) if vals else None
        rows.append(row)
    return rows


HEAD = ["path", "p50 (ms)", "p99 (ms)", "p99.9 (ms)", "max (ms)", "conn/s", "proxy CPU us/conn",
        "runs ok"]


def cells(rows: list[dict]) -> list[list[str]]:
    """A path with no good run reads FAILED in every figure: never a blank."""
    out = []
    for r in rows:
        dead = r["runs_ok"] == 0

        def f(v, fmt):
            return "FAILED" if dead else "-" if v is None else format(v, fmt)
        out.append([r["path"], *(f(None if r[k] is None else r[k] / 1000, ".1f")
                                 for k in ("p50_us", "p99_us", "p999_us", "max_us")),
                    f(r["conn_per_s"], ",.0f"), f(r["cpu_us_per_conn"], ".0f"),
                    f"{r['runs_ok']}/{r['runs']}" + (" FAILED" if r["runs_ok"] < r["runs"] else "")])
    return out


def failure_lines(runs: list[dict]) -> str:
    """One line per failed run, with the start of its reason."""
    return "".join(f"- FAILED: {r['path']} round {r.get('round', '?')}: "
                   f"{r['error'].splitlines()[0][:160]}\n" for r in runs if "error" in r)


def text_table(rows: list[dict]) -> str:
    body = cells(rows)
    w = [max(len(x) for x in col) for col in zip(HEAD, *body)]
    out = ["  ".join(h.ljust(n) for h, n in zip(HEAD, w)), "  ".join("-" * n for n in w)]
    out += ["  ".join(c.ljust(n) for c, n in zip(row, w)) for row in body]
    return "\n".join(out)


def write_docs(meta: dict, rows: list[dict], runs: list[dict]) -> None:
    m = meta["machine"]
    table = "\n".join(["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
                      + ["| " + " | ".join(c) + " |" for c in cells(rows)])
    c = meta["config"]
    section = f"""{SECTION[0]}
## Connection storm: latency of short connections (bench/storm.c, loopback)

- Date: {meta['date']}
- Machine: Linux {m['kernel']}, {m['nproc']} CPUs, {m['cpu_model']}
- Command (from the repository root): `{meta['command']}`
- {c['total']:,} connections per run, {c['concurrency']} at once: connect, 100 bytes each way,
  FIN each way, close; latency from connect() to the EOF. Each figure is the median over
  {c['rounds']} interleaved rounds of that run's percentile. The direct path is the client
  and the echo server alone.

{table}

{failure_lines(runs)}{SECTION[1]}
"""
    tp.replace_docs_section(SECTION, section)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Latency of short connections through each proxy.",
                                 epilog="paths: " + ", ".join(p.name for p in tp.all_paths()))
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all paths (default 3)")
    ap.add_argument("--total", type=int, default=20000, help="connections per run (default 20000)")
    ap.add_argument("--concurrency", type=int, default=100, help="connections at once (default 100)")
    ap.add_argument("--paths", default=DEFAULT_PATHS, help=f"comma-separated (default {DEFAULT_PATHS})")
    ap.add_argument("--proxy-args", default="", help="extra uring-proxy arguments, one string")
    ap.add_argument("--json", metavar="FILE", help="write every run's raw results here")
    ap.add_argument("--write-docs", action="store_true",
                    help="rewrite the storm section of docs/benchmarks.md from this run")
    args = ap.parse_args(argv)
    if min(args.rounds, args.total, args.concurrency) < 1:
        ap.error("--rounds, --total and --concurrency must be at least 1")
    try:
        paths, explicit = tp.select_paths(args.paths)
        paths = tp.check_tools(paths, explicit, need_iperf3=False)
    except tp.BenchError as e:
        print(f"storm.py: error: {e}", file=sys.stderr)
        return 2
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": tp.command_line(__file__), "machine": tp.machine_info(),
            "config": {"rounds": args.rounds, "total": args.total, "concurrency": args.concurrency,
                       "paths": [p.name for p in paths]}}
    runs: list[dict] = []
    children = tp.Children()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, tp._raise_interrupt)
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="uring-bench-storm-") as tmp:
        workdir = Path(tmp)
        try:
            exe = tp.compile_c(SOURCE, workdir)
            port = tp.free_port()
            echo = children.spawn([str(exe), "echo", str(port)], stdin=subprocess.DEVNULL)
            tp.wait_listening(port, echo, "storm echo", None)
            interrupted = tp.run_rounds(
                paths, args.rounds, 0, runs,
                lambda path: measure(children, exe, port, path, args.total, args.concurrency,
                                     shlex.split(args.proxy_args), workdir),
                lambda r: (f"p50 {r['p50_us'] / 1000:.1f} ms, p99 {r['p99_us'] / 1000:.1f} ms, "
                           f"p99.9 {r['p999_us'] / 1000:.1f} ms, {r['conn_per_s']:,.0f} conn/s"))
        except KeyboardInterrupt:
            interrupted = True
        except tp.BenchError as e:
            print(f"storm.py: error: {e}", file=sys.stderr)
            return 2
        finally:
            tp.stop_everything(children)
    rows = summarize(paths, runs)
    print(f"\nConnection storm, {args.total:,} connections x {args.rounds} rounds, "
          f"{args.concurrency} at once, {meta['date']}, Linux {meta['machine']['kernel']}")
    print(text_table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=2) + "\n")
    if interrupted:
        return 130
    if args.write_docs:
        write_docs(meta, rows, runs)
        tp.log(f"wrote the storm section of {tp.DOCS_FILE}")
    return 0 if all(r["runs_ok"] == r["runs"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
