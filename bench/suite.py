#!/usr/bin/env python3
"""Every benchmark scenario in one run: the raw figures in one JSON file, the charts,
and the targets table of docs/benchmarks.md.

README
======
What it runs
    The scenario scripts of bench/, one after another, each with its own paths
    interleaved round-robin (SCENARIOS below):

    bulk-1, bulk-1-reverse, bulk-8, bulk-8-reverse
                        bench/throughput.py: iperf3, 1 and 8 streams, both directions
    http-c100, http-c1000
                        bench/http_rate.py: wrk keep-alive to nginx
    conn-rate           bench/http_rate.py --close: a new connection per request
    latency             bench/latency.py: 64-byte ping-pong at 10k and 50k msg/s
    idle                bench/idle.py: RSS, fds and CPU per idle connection
    storm               bench/storm.py: latency of 20,000 short connections
    bulk-1-pinned, bulk-1-reverse-pinned, bulk-8-pinned, bulk-8-reverse-pinned,
    http-c100-pinned, http-c1000-pinned, conn-rate-pinned
                        every bulk and HTTP scenario again with each proxy pinned to
                        one CPU (taskset)

    Each script writes its own section of docs/benchmarks.md (--write-docs) and its
    raw runs (--json); this script gathers them into
    bench/results/<date>-<host>.json, draws the charts (bench/charts.py) into
    docs/img/, and writes the "At a glance" section: the machine, the targets
    with this run's ratios, and the charts.

    --only NAMES runs some scenarios: their sections and a results JSON, with its
    charts beside it; the summary and docs/img stay those of the last whole run.

    --quick runs a ~2-minute subset (QUICK below: fewer scenarios and paths, one
    round of 2 s). Its figures are single runs, not medians: it writes only
    bench/results/<date>-<host>-quick.json and its charts beside it (both ignored
    by git), never the docs.

Usage (from the repository root)
    make bench                      # every scenario (about 70 minutes on 2 cores)
    make bench QUICK=1              # the subset, about 2 minutes
    .venv/bin/python bench/suite.py --only bulk-1,latency --rounds 3
    .venv/bin/python bench/suite.py --list

Exit status: 0 every scenario ran clean, 1 some run or scenario failed (the results
and the docs say which), 2 cannot start, 130 interrupted.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402  (machine facts, docs sections)

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
IMG = tp.REPO / "docs" / "img"
SUMMARY_SECTION = tp.section_markers("suite.py")


def pin_cpu() -> str:
    """The CPU the pinned scenarios put the proxy on: the last one this process may
    use, so CPU 0 (where interrupts usually land) stays for the load."""
    return str(max(os.sched_getaffinity(0)))


@dataclass
class Scenario:
    name: str
    script: str
    args: list[str] = field(default_factory=list)
    minutes: float = 5.0          # a rough duration at the defaults, for the estimate
    quick_args: list[str] | None = None  # None: not in --quick

    def argv(self, quick: bool, rounds: int | None) -> list[str]:
        extra = list(self.quick_args if quick else self.args)
        if rounds and self.script not in ("idle.py",):
            extra += ["--rounds", str(rounds)]
        return [sys.executable, str(BENCH / self.script), *extra]


QUICK_PATHS = "direct,haproxy,haproxy-splice,uring-proxy-copy,uring-proxy-splice,uring-proxy-epoll-copy"
_Q = ["--paths", QUICK_PATHS, "--rounds", "1", "--seconds", "2"]
# storm.py's own default leaves some paths out to be quick; the suite runs them all.
ALL_PATHS = ",".join(p.name for p in tp.all_paths())


def scenarios() -> list[Scenario]:
    cpu = pin_cpu()
    return [
        Scenario("bulk-1", "throughput.py", ["--rounds", "3"], 5, _Q),
        Scenario("bulk-1-reverse", "throughput.py", ["--rounds", "3", "--reverse"], 5),
        Scenario("bulk-8", "throughput.py", ["--rounds", "3", "--streams", "8"], 5, _Q + ["--streams", "8"]),
        Scenario("bulk-8-reverse", "throughput.py", ["--rounds", "3", "--streams", "8", "--reverse"], 5),
        Scenario("http-c100", "http_rate.py", ["--rounds", "3"], 5, _Q),
        Scenario("http-c1000", "http_rate.py", ["--rounds", "3", "--connections", "1000"], 5),
        Scenario("conn-rate", "http_rate.py", ["--rounds", "3", "--close"], 5, _Q + ["--close"]),
        Scenario("latency", "latency.py", ["--rounds", "3", "--rates", "10000,20000,50000"], 16,
                 ["--paths", QUICK_PATHS, "--rounds", "1", "--seconds", "3", "--rates", "10000"]),
        Scenario("idle", "idle.py", [], 4),
        Scenario("storm", "storm.py", ["--rounds", "3", "--paths", ALL_PATHS], 10,
                 ["--paths", QUICK_PATHS, "--rounds", "1", "--total", "5000"]),
        Scenario("bulk-1-pinned", "throughput.py", ["--rounds", "3", "--cpus", cpu], 5),
        Scenario("bulk-1-reverse-pinned", "throughput.py", ["--rounds", "3", "--reverse", "--cpus", cpu], 5),
        Scenario("bulk-8-pinned", "throughput.py", ["--rounds", "3", "--streams", "8", "--cpus", cpu], 5),
        Scenario("bulk-8-reverse-pinned", "throughput.py",
                 ["--rounds", "3", "--streams", "8", "--reverse", "--cpus", cpu], 5),
        Scenario("http-c100-pinned", "http_rate.py", ["--rounds", "3", "--cpus", cpu], 5),
        Scenario("http-c1000-pinned", "http_rate.py",
                 ["--rounds", "3", "--connections", "1000", "--cpus", cpu], 5),
        Scenario("conn-rate-pinned", "http_rate.py", ["--rounds", "3", "--close", "--cpus", cpu], 5),
    ]


# ---------------------------------------------------------------- targets


def summary_rows(res: dict, scenario: str, key: str) -> tuple[list[dict], str]:
    """The summary rows of `scenario` and the figure's key in them. A key
    "p99_us@50000" is p99_us in the rows of rate 50000 (latency.py has a row per
    rate and path)."""
    rows = res.get("scenarios", {}).get(scenario, {}).get("summary", [])
    if "@" in key:
        key, rate = key.split("@")
        rows = [r for r in rows if r.get("rate") == int(rate)]
    return rows, key


def _row(res: dict, scenario: str, path: str, key: str) -> dict | None:
    rows, _ = summary_rows(res, scenario, key)
    for r in rows:
        if r.get("path") == path:
            return r
    return None


def _best(res: dict, scenario: str, key: str, lowest: bool = False) -> tuple[str, float] | None:
    """(path, value) of the uring-proxy path with the best `key` in `scenario`."""
    rows, key = summary_rows(res, scenario, key)
    rows = [r for r in rows if r.get("path", "").startswith("uring-proxy-") and r.get(key) is not None]
    if not rows:
        return None
    r = (min if lowest else max)(rows, key=lambda r: r[key])
    return r["path"], r[key]


def _ratio(res, scenario, key, path, peer="haproxy", lowest=False):
    """(uring path, its value, the peer's value, ratio), or (why not) as a string."""
    if path is None:
        best = _best(res, scenario, key, lowest)
        if best is None:
            return f"no uring-proxy figure in `{scenario}`"
        path, val = best
    else:
        row = _row(res, scenario, path, key)
        if row is None or row.get(key.split("@")[0]) is None:
            return f"no `{path}` figure in `{scenario}`" + (f" at {key.split('@')[1]} msg/s" if "@" in key else "")
        val = row[key.split("@")[0]]
    peer_row = _row(res, scenario, peer, key)
    if peer_row is None or not peer_row.get(key.split("@")[0]):
        return f"no `{peer}` figure in `{scenario}`" + (f" at {key.split('@')[1]} msg/s" if "@" in key else "")
    return path, val, peer_row[key.split("@")[0]], val / peer_row[key.split("@")[0]]


# (what, scenario, key, uring path or None for the best, peer, lowest is best, target ratio)
TARGETS = [
    ("single stream, best mode, Gbit/s", "bulk-1", "median_gbps", None, "haproxy", False, 2.0),
    ("single stream pinned to one core, copy mode, Gbit/s", "bulk-1-pinned", "median_gbps",
     "uring-proxy-copy", "haproxy", False, 1.5),
    ("proxy CPU-s/GB, best mode, against HAProxy with splice", "bulk-1", "median_cpu_s_per_gb",
     None, "haproxy-splice", True, 0.4),
    ("proxy CPU-s/GB, copy mode", "bulk-1", "median_cpu_s_per_gb", "uring-proxy-copy", "haproxy",
     True, 0.5),
    ("keep-alive CPU-us/request, copy mode (c100)", "http-c100", "cpu_us_per_request",
     "uring-proxy-copy", "haproxy", True, 0.7),
    ("p99 latency at 50k msg/s, copy mode", "latency", "p99_us@50000", "uring-proxy-copy",
     "haproxy", True, 1.0),
    ("8-stream throughput, best mode, Gbit/s", "bulk-8", "median_gbps", None, "haproxy", False, 1.0),
]


def targets_table(res: dict) -> str:
    """Markdown: each target of the benchmark issue with this run's ratio, met or by
    how much it is missed; a target whose figures are missing says so."""
    lines = ["| figure | target | this run | met? |", "|---|---|---|---|"]
    for what, scen, key, path, peer, lowest, target in TARGETS:
        r = _ratio(res, scen, key, path, peer, lowest)
        goal = f"{'<=' if lowest else '>='} {target:g}x {peer}"
        if isinstance(r, str):
            lines.append(f"| {what} | {goal} | not measured: {r} | - |")
            continue
        p, val, base, ratio = r
        met = ratio <= target if lowest else ratio >= target
        miss = "" if met else f" (missed by {abs(ratio / target - 1) * 100:.0f}%)"
        lines.append(f"| {what} | {goal} | {ratio:.2f}x: `{p}` {val:,.3g} against {base:,.3g} "
                     f"| {'yes' if met else 'no' + miss} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- run


def run_scenario(sc: Scenario, quick: bool, rounds: int | None, outdir: Path, write_docs: bool,
                 index: int, total: int, left_min: float) -> dict:
    out = outdir / f"{sc.name}.json"
    argv = sc.argv(quick, rounds) + ["--json", str(out)] + (["--write-docs"] if write_docs else [])
    tp.log(f"== scenario {index}/{total} {sc.name} (~{left_min:.0f} min left in the suite): "
           f"{' '.join(argv[1:])}")
    t0 = time.monotonic()
    rc = subprocess.run(argv, cwd=tp.REPO).returncode
    entry: dict = {"script": f"bench/{sc.script}", "args": argv[2:], "exit_status": rc,
                   "seconds": round(time.monotonic() - t0, 1)}
    try:
        data = json.loads(out.read_text())
        entry.update(meta=data.get("meta"), summary=data.get("summary", []), runs=data.get("runs", []))
    except (OSError, ValueError) as e:
        # A scenario that wrote nothing failed as a whole: say so, never an empty table.
        entry["error"] = f"exit status {rc}, no results ({e.__class__.__name__})"
    if rc not in (0, 1) and "error" not in entry:
        entry["error"] = f"exit status {rc}"
    return entry


def liburing_version() -> str:
    try:
        return subprocess.run(["pkg-config", "--modversion", "liburing"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def write_summary(res: dict, charts: list[Path]) -> None:
    m, v = res["meta"]["machine"], res["meta"]["versions"]
    ran = res["scenarios"]
    rows = "\n".join(f"| {n} | `{' '.join([s['script']] + [a for a in s['args'] if a not in ('--json',) and not a.endswith('.json')])}` "
                     f"| {s['seconds']:.0f} s | {'failed: ' + s['error'] if 'error' in s else ('some runs failed' if s['exit_status'] else 'ok')} |"
                     for n, s in ran.items())
    pics = "\n".join(f"![{c.stem}](img/{c.name})" for c in charts)
    section = f"""{SUMMARY_SECTION[0]}
## At a glance

- Date: {res['meta']['date']}; raw figures: `{res['meta']['results_file']}`
- Machine: Linux {m['kernel']}, {m['nproc']} CPUs, {m['cpu_model']}, liburing {v.get('liburing')}
- Software: {', '.join(f'{k} {val}' for k, val in v.items() if k != 'liburing')}, Python {m['python']}
- Command: `make bench` (bench/suite.py); each section below says its own command.

### Targets (ratios in the same run)

{targets_table(res)}

### Scenarios of this run

| scenario | command | took | result |
|---|---|---|---|
{rows}

### Charts

{pics or 'No chart: matplotlib is not installed (`make bench-tools`).'}
{SUMMARY_SECTION[1]}
"""
    tp.replace_docs_section(SUMMARY_SECTION, section)


def main(argv: list[str] | None = None) -> int:
    all_sc = scenarios()
    ap = argparse.ArgumentParser(description="Run every benchmark scenario; gather the results, "
                                             "the charts and the targets table.",
                                 epilog="scenarios: " + ", ".join(s.name for s in all_sc))
    ap.add_argument("--quick", action="store_true",
                    help="a ~2-minute subset, one round each; results only, docs untouched")
    ap.add_argument("--only", help="comma-separated scenario names")
    ap.add_argument("--rounds", type=int, help="rounds per scenario (default: each scenario's, 3)")
    ap.add_argument("--list", action="store_true", help="list the scenarios and their commands, then exit")
    args = ap.parse_args(argv)
    chosen = [s for s in all_sc if not args.quick or s.quick_args is not None]
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in {s.name for s in all_sc}]
        if unknown:
            print(f"suite.py: error: unknown scenario {', '.join(unknown)}; known: "
                  f"{', '.join(s.name for s in all_sc)}", file=sys.stderr)
            return 2
        chosen = [s for s in chosen if s.name in names]
    if args.list:
        for s in chosen:
            print(f"{s.name:<18} {' '.join(s.argv(args.quick, args.rounds)[1:]).replace(str(tp.REPO) + '/', '')}")
        return 0
    if not chosen:
        print("suite.py: error: no scenario selected", file=sys.stderr)
        return 2
    # A partial run (--only) writes its scenarios' sections, never the summary of
    # the run of record: "At a glance" and its charts come from one whole run.
    full = not args.quick and not args.only
    now = _dt.datetime.now(_dt.timezone.utc)
    stem = (f"{now:%Y-%m-%d-%H%M}-{socket.gethostname()}" + ("-quick" if args.quick else "")
            + ("-only" if args.only else ""))
    # Each script's own JSON is gathered into one file; the scripts' files go.
    outdir = Path(tempfile.mkdtemp(prefix="uring-bench-suite-"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    results_file = RESULTS / f"{stem}.json"
    versions = tp.software_versions(tp.all_paths())
    versions["liburing"] = liburing_version()
    res = {"meta": {"date": now.strftime("%Y-%m-%d %H:%M UTC"), "host": socket.gethostname(),
                    "quick": args.quick, "machine": tp.machine_info(), "versions": versions,
                    "command": tp.command_line(__file__),
                    "results_file": str(results_file.relative_to(tp.REPO))},
           "scenarios": {}}
    minutes = [0.4 if args.quick else s.minutes for s in chosen]
    interrupted = False
    try:
        for i, sc in enumerate(chosen):
            entry = run_scenario(sc, args.quick, args.rounds, outdir, not args.quick, i + 1,
                                 len(chosen), sum(minutes[i:]))
            res["scenarios"][sc.name] = entry
            results_file.write_text(json.dumps(res, indent=1) + "\n")  # kept after a crash
            if entry["exit_status"] == 130:
                interrupted = True
                break
    except KeyboardInterrupt:
        interrupted = True
    results_file.write_text(json.dumps(res, indent=1) + "\n")
    shutil.rmtree(outdir, ignore_errors=True)
    tp.log(f"wrote {results_file}")
    try:
        import charts
        # Only a full run redraws the docs' charts; a quick or --only run's go beside its JSON.
        pics = charts.render(res, IMG if full else RESULTS / f"{stem}-charts")
        for p in pics:
            tp.log(f"wrote {p}")
    except charts.ChartsUnavailable as e:
        tp.log(f"no charts: {e}")
        pics = []
    print("\n" + targets_table(res))
    if full and not interrupted:
        write_summary(res, pics)
        tp.log(f"wrote the summary section of {tp.DOCS_FILE}")
    if interrupted:
        return 130
    bad = [n for n, s in res["scenarios"].items() if s["exit_status"] or "error" in s]
    if bad:
        tp.log(f"scenarios with failures: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
