#!/usr/bin/env python3
"""Latency at a fixed message rate: 64-byte ping-pong through each proxy, on loopback.

README
======
What it measures
    ``pingpong`` (bench/pingpong.c) opens --conns connections (default 100) and sends
    64-byte messages at a fixed aggregate rate (--rates, default 10,000 and 50,000
    msg/s), OPEN LOOP: every message has a due time on a fixed schedule, and its
    latency runs from that due time to the moment its whole echo is read back, so a
    stall of the path counts against every message queued behind it (no coordinated
    omission). One message at a time per connection. The upstream is ``storm echo``
    (bench/storm.c). Latencies go into pingpong's own log-linear histogram (HdrHistogram
    style, under 0.8% relative error, no sample stored); the first second is warm-up,
    then --seconds (default 5) are recorded. Every echo is compared with what was sent,
    byte for byte.

    Paths are bench/throughput.py's (direct, HAProxy, nginx stream, socat, uring-proxy
    in every mode on both backends), interleaved round-robin inside each rate; each
    figure is the median over --rounds (default 3) of that run's percentile. Beside it,
    the proxy's CPU (all threads and children, from /proc) over the run, per message
    (one 64-byte request and its 64-byte echo).

    A run FAILED, and says why, when pingpong counted any error (a connect that
    failed, an echo that differs from what was sent, an EOF or reset, an echo that
    never came back) or sent fewer than 99% of the target rate inside the measured
    seconds (the path could not keep up). A failed run keeps its figures in --json
    but is left out of the medians; a path with no run left shows FAILED, never a
    zero or a blank.

Is the generator the bottleneck?
    The direct path (pingpong straight to the echo server) answers it at each rate:
    the table's footer gives its achieved rate, pingpong's own CPU (getrusage over the
    measured seconds; 100% = one core) and how late it sent the messages whose
    connection was free at their due time (its scheduling lag, p99). A direct run at
    the target rate with the generator well under one core shows that the generator and
    the echo server are not what limits the proxy paths; a generator near one core says
    the rate is at this machine's limit, and the footer says so.

Usage (from the repository root)
    .venv/bin/python bench/latency.py                     # 3 rounds x 5 s, every path, 10k and 50k msg/s
    .venv/bin/python bench/latency.py --paths direct,haproxy,uring-proxy-copy --rates 10000
    .venv/bin/python bench/latency.py --rounds 5 --json bench/results/latency.json --write-docs

    Progress (one line per rate, path and round) goes to stderr, the tables to stdout.

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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402  (the paths, proxies and /proc accounting)

HERE = Path(__file__).resolve().parent
PINGPONG_SOURCE = HERE / "pingpong.c"
STORM_SOURCE = HERE / "storm.c"
LATENCY_SECTION = ("<!-- bench/latency.py --write-docs: begin -->",
                   "<!-- bench/latency.py --write-docs: end -->")
DEFAULT_RATES = "10000,50000"
RATE_OK = 0.99  # a run must send this share of the target rate
GEN_BUSY_PERCENT = 80.0  # a generator above this much of a core may be what limits the rate
# Medians over the ok runs of these figures of each run.
FIGURES = ("p50_us", "p90_us", "p99_us", "p999_us", "max_us", "achieved_rate",
           "cpu_us_per_msg", "cpu_percent", "gen_cpu_percent", "sched_lag_p99_us")


def verdict(res: dict, rate: int) -> str | None:
    """Why a pingpong result is a failed run, or None when it is good."""
    why = []
    if res.get("errors"):
        parts = [f"{res[k]} {what}" for k, what in
                 (("connect_errors", "failed connects"), ("mismatches", "echoes that differ"),
                  ("eofs", "EOFs or resets"), ("lost", "echoes never back")) if res.get(k)]
        why.append(f"{res['errors']} errors ({', '.join(parts) or 'see --json'})")
    achieved = res.get("achieved_rate", 0.0)
    if achieved < RATE_OK * rate:
        why.append(f"sent {achieved:,.0f} msg/s, under {RATE_OK:.0%} of {rate:,}"
                   + (f" ({res['unsent']:,} messages never sent)" if res.get("unsent") else ""))
    return "; ".join(why) or None


def run_pingpong(children: tp.Children, exe: Path, port: int, rate: int, conns: int,
                 seconds: float, size: int, warmup: float) -> dict:
    """One pingpong run: its JSON line, the generator's figures renamed gen_*."""
    argv = [str(exe), str(port), str(conns), str(rate), str(seconds), str(size), str(warmup)]
    proc = children.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    limit = warmup + seconds + 30  # + connecting, the 3 s drain, and slack
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        raise tp.RunError(f"pingpong did not finish within {limit:.0f} s") from None
    finally:
        children.stop(proc)
    lines = out.strip().splitlines()
    try:
        data = json.loads(lines[-1])
    except (IndexError, ValueError):
        msg = err.strip().splitlines()
        raise tp.RunError(f"pingpong exited {proc.returncode}: "
                          f"{msg[-1] if msg else 'no output'}") from None
    for k in ("cpu_s", "window_cpu_s", "cpu_percent"):
        data["gen_" + k] = data.pop(k)
    data["pingpong_exit_status"] = proc.returncode
    return data


def measure(children: tp.Children, exe: Path, echo: subprocess.Popen, echo_port: int,
            path: tp.Path_, rate: int, conns: int, seconds: float, size: int, warmup: float,
            proxy_args: list[str], workdir: Path) -> dict:
    if echo.poll() is not None:
        raise tp.RunError(f"storm echo (the upstream) exited with status {echo.returncode}")
    result: dict = {"path": path.name, "rate": rate}
    before = tp.others_snapshot()
    proxy, died = None, None
    if path.is_proxy:
        proxy = tp.Proxy(children, path, echo_port, proxy_args, workdir)
        result["argv"] = proxy.argv
    try:
        cpu0 = proxy.cpu_seconds() if proxy else 0.0
        t0 = time.monotonic()
        result.update(run_pingpong(children, exe, proxy.port if proxy else echo_port, rate,
                                   conns, seconds, size, warmup))
        wall = time.monotonic() - t0
        if proxy:
            tp.wait_no_descendants(proxy.proc.pid)
            cpu = proxy.cpu_seconds() - cpu0
            if proxy.proc.poll() is not None:
                died = f"{path.name} exited with status {proxy.proc.returncode} during the run"
            result["cpu_seconds"] = cpu
            result["cpu_percent"] = 100.0 * cpu / wall
            result["cpu_us_per_msg"] = 1e6 * cpu / result["echoed"] if result["echoed"] else None
    finally:
        if proxy:
            status, log = proxy.stop()
            result["proxy_exit_status"] = status
            result["proxy_log_tail"] = log.strip().splitlines()[-3:]
            if path.kind == "uring" and status not in (0, None):
                result["warning"] = f"exit status {status} after SIGTERM (contract says 0)"
    result["other_cpu_percent"] = 100.0 * tp.others_cpu_seconds(before, tp.others_snapshot()) / wall
    why = "; ".join(w for w in (died, verdict(result, rate)) if w)
    if why:
        result["error"] = why
    return result


def progress(r: dict) -> str:
    """The progress line's figures of one run (failed or not)."""
    text = (f"{r['rate']:,} msg/s: p50 {r['p50_us']:.0f} us, p99 {r['p99_us']:.0f} us, "
            f"p99.9 {r['p999_us']:.0f} us, sent {r['achieved_rate']:,.0f} msg/s"
            + (f", proxy {r['cpu_us_per_msg']:.1f} CPU-us/msg" if r.get("cpu_us_per_msg") is not None else "")
            + f", generator {r['gen_cpu_percent']:.0f}% CPU")
    return f"FAILED: {r['error']} [{text}]" if "error" in r else text


def summarize(paths: list[tp.Path_], runs: list[dict]) -> list[dict]:
    """One row per rate and path (rates in the order they ran): the medians over the
    ok runs, the counts, the reasons of the failed ones, and p99 over HAProxy's."""
    rows = []
    rates = list(dict.fromkeys(r["rate"] for r in runs))
    for rate in rates:
        mine = [r for r in runs if r["rate"] == rate]
        block = []
        for p, ok, row in tp.runs_of(paths, mine):
            row["rate"] = rate
            for f in FIGURES:
                vals = [r[f] for r in ok if r.get(f) is not None]
                row[f] = statistics.median(vals) if vals else None
            row["failures"] = [f"round {r.get('round', '?')}: {r['error']}"
                               for r in mine if r["path"] == p.name and "error" in r]
            row["failed"] = row["runs_ok"] < row["runs"]
            block.append(row)
        base = next((r["p99_us"] for r in block if r["path"] == "haproxy"), None)
        for r in block:
            r["p99_vs_haproxy"] = r["p99_us"] / base if base and r["p99_us"] is not None else None
        rows += [r for r in block if r["runs"]]
    return rows


HEAD = ["path", "p50 (µs)", "p99 (µs)", "p99.9 (µs)", "achieved msg/s", "proxy CPU µs/msg",
        "vs HAProxy p99", "runs ok"]


def cells(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        dead = r["runs_ok"] == 0

        def f(key, fmt):
            if dead:
                return "FAILED"
            return "-" if r.get(key) is None else format(r[key], fmt)
        out.append([r["path"], f("p50_us", ",.0f"), f("p99_us", ",.0f"), f("p999_us", ",.0f"),
                    f("achieved_rate", ",.0f"), f("cpu_us_per_msg", ".1f"),
                    "-" if r.get("p99_vs_haproxy") is None else f"{r['p99_vs_haproxy']:.2f}x",
                    f"{r['runs_ok']}/{r['runs']}" + (" FAILED" if r["failed"] else "")])
    return out


def generator_check(rows: list[dict], rate: int) -> str:
    """The sentence on whether pingpong kept up at `rate`, from the direct path."""
    d = next((r for r in rows if r["rate"] == rate and r["path"] == "direct"), None)
    if d is None:
        return (f"Generator check at {rate:,} msg/s: the direct path was not run, so nothing "
                "here shows that pingpong itself kept up.")
    if not d["runs_ok"]:
        return (f"Generator check at {rate:,} msg/s: the direct path FAILED "
                f"({'; '.join(d['failures'])}): pingpong and the echo server alone did not "
                "keep up, so the proxy paths' figures at this rate are the machine's limit, "
                "not the proxies'.")
    text = (f"Generator check at {rate:,} msg/s: on the direct path (pingpong straight to the "
            f"echo server) it sent {d['achieved_rate']:,.0f} msg/s "
            f"({100 * d['achieved_rate'] / rate:.1f}% of the target) using "
            f"{d['gen_cpu_percent']:.0f}% of one core, and sent the messages whose connection "
            f"was free p99 {d['sched_lag_p99_us']:,.0f} µs after their due time.")
    if d["gen_cpu_percent"] > GEN_BUSY_PERCENT:
        text += (f" Above {GEN_BUSY_PERCENT:.0f}% of a core the generator is close to its limit: "
                 "at this rate it may be part of what the proxy paths measure.")
    return text


def text_table(rows: list[dict]) -> str:
    body = cells(rows)
    w = [max(len(x) for x in col) for col in zip(HEAD, *body)]
    out = ["  ".join(h.ljust(n) for h, n in zip(HEAD, w)), "  ".join("-" * n for n in w)]
    out += ["  ".join(c.ljust(n) for c, n in zip(row, w)) for row in body]
    return "\n".join(out)


def markdown_table(rows: list[dict]) -> str:
    return "\n".join(["| " + " | ".join(HEAD) + " |", "|---|" + "---:|" * (len(HEAD) - 1)]
                     + ["| " + " | ".join(c) + " |" for c in cells(rows)])


def failures_text(rows: list[dict]) -> str:
    return "\n".join(f"- FAILED: {r['path']} {f}" for r in rows for f in r["failures"])


def write_docs(meta: dict, rows: list[dict], runs: list[dict]) -> None:
    m, c = meta["machine"], meta["config"]
    blocks = []
    for rate in c["rates"]:
        mine = [r for r in rows if r["rate"] == rate]
        if not mine:
            continue
        fails = failures_text(mine)
        blocks.append(f"### {rate:,} msg/s\n\n{markdown_table(mine)}\n\n- {generator_check(rows, rate)}\n"
                      + (fails + "\n" if fails else ""))
    section = f"""{LATENCY_SECTION[0]}
## Latency at a fixed rate: {c['size']}-byte ping-pong over {c['conns']} connections (bench/pingpong.c, loopback)

- Date: {meta['date']}
- Machine: Linux {m['kernel']}, {m['nproc']} CPUs, {m['cpu_model']}
- Software: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}, Python {m['python']}
- Command (from the repository root): `{meta['command']}`
- Open loop: message i is due at i / rate on connection i mod {c['conns']}, one message
  at a time per connection; latency from the due time to the whole echo read back (a
  stall counts against every message queued behind it). {c['warmup']:g} s warm-up, then
  {c['seconds']:g} s recorded in an HdrHistogram-style histogram (under 0.8% error);
  upstream `storm echo`; every echo compared byte for byte. Proxy extra arguments:
  {('`' + shlex.join(c['proxy_args']) + '`') if c.get('proxy_args') else 'none'}.
- Each figure is the median over {c['rounds']} rounds (paths interleaved round-robin) of
  that run's percentile. **achieved msg/s**: messages due in the recorded seconds and
  sent inside them, per second. **proxy CPU µs/msg**: the proxy's CPU (all threads and
  children) over the run per message (a request and its echo). **vs HAProxy p99**: this
  path's p99 over HAProxy's at the same rate (below 1 is better).
- A run with any error (failed connect, echo that differs, EOF, echo never back) or
  under {RATE_OK:.0%} of the target rate is FAILED and left out of the medians; a path
  with no good run shows FAILED.
- {tp.others_note(runs) or 'No run finished.'}

{chr(10).join(blocks)}
### How to reproduce

    .venv/bin/python bench/latency.py --rounds {c['rounds']} --seconds {c['seconds']:g} --rates {','.join(map(str, c['rates']))} --conns {c['conns']}{reproduce_extra(c)} --write-docs

{LATENCY_SECTION[1]}
"""
    tp.replace_docs_section(LATENCY_SECTION, section)


def reproduce_extra(c: dict) -> str:
    """The options of this run beyond the ones every reproduce line names."""
    extra = [("--paths", c.get("paths_arg")), ("--warmup", None if c["warmup"] == 1 else f"{c['warmup']:g}"),
             ("--size", None if c["size"] == 64 else str(c["size"])),
             ("--proxy-args", shlex.join(c["proxy_args"]) if c.get("proxy_args") else None)]
    return "".join(f" {k} {shlex.quote(v)}" for k, v in extra if v)


def parse_rates(text: str) -> list[int]:
    rates = [int(x.replace("_", "")) for x in text.split(",") if x.strip()]
    if not rates or min(rates) < 1:
        raise ValueError("rates must be positive integers")
    return list(dict.fromkeys(rates))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Latency of 64-byte ping-pong at fixed rates through each proxy.",
                                 epilog="paths: " + ", ".join(p.name for p in tp.all_paths())
                                 + " ('uring-proxy' = every uring-proxy variant)")
    ap.add_argument("--paths", help="comma-separated paths to run (default: all)")
    ap.add_argument("--rates", default=DEFAULT_RATES,
                    help=f"comma-separated messages per second, in all (default {DEFAULT_RATES})")
    ap.add_argument("--conns", type=int, default=100, help="connections (default 100)")
    ap.add_argument("--seconds", type=float, default=5, help="recorded seconds per run (default 5)")
    ap.add_argument("--warmup", type=float, default=1, help="warm-up seconds before them (default 1)")
    ap.add_argument("--size", type=int, default=64, help="message size in bytes (default 64)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all paths (default 3)")
    ap.add_argument("--proxy-args", default="", help="extra uring-proxy arguments, one string")
    ap.add_argument("--json", metavar="FILE", help="write every run's raw results here")
    ap.add_argument("--write-docs", action="store_true",
                    help="rewrite the latency section of docs/benchmarks.md from this run")
    args = ap.parse_args(argv)
    try:
        rates = parse_rates(args.rates)
    except ValueError:
        ap.error(f"--rates {args.rates!r}: expected positive integers, like 10000,50000")
    if min(args.conns, args.rounds, args.size) < 1 or args.seconds <= 0 or args.warmup < 0:
        ap.error("--conns, --rounds, --size and --seconds must be positive, --warmup not negative")
    try:
        paths, explicit = tp.select_paths(args.paths)
        paths = tp.check_tools(paths, explicit, need_iperf3=False)
        proxy_args = shlex.split(args.proxy_args)
        if hasattr(tp, "raise_fd_limit"):
            tp.raise_fd_limit(3 * args.conns + 256)  # a proxy holds two per connection
    except (tp.BenchError, ValueError) as e:
        print(f"latency.py: error: {e}", file=sys.stderr)
        return 2
    versions = tp.software_versions(paths)
    versions.pop("iperf3", None)
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": tp.command_line(__file__), "machine": tp.machine_info(), "versions": versions,
            "config": {"rounds": args.rounds, "rates": rates, "conns": args.conns,
                       "seconds": args.seconds, "warmup": args.warmup, "size": args.size,
                       "paths": [p.name for p in paths], "paths_arg": args.paths,
                       "proxy_args": proxy_args}}
    runs: list[dict] = []
    children = tp.Children()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, tp._raise_interrupt)
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="uring-bench-latency-") as tmp:
        workdir = Path(tmp)
        try:
            pingpong = tp.compile_c(PINGPONG_SOURCE, workdir)
            storm = tp.compile_c(STORM_SOURCE, workdir)
            port = tp.free_port()
            echo = children.spawn([str(storm), "echo", str(port)], stdin=subprocess.DEVNULL)
            try:
                tp.wait_listening(port, echo, "storm echo", None)
            except tp.RunError as e:
                raise tp.BenchError(str(e)) from None
            for rate in rates:
                tp.log(f"rate {rate:,} msg/s: {args.conns} connections, {args.size}-byte messages, "
                       f"{args.warmup:g} s warm-up + {args.seconds:g} s")
                mine: list[dict] = []
                interrupted = tp.run_rounds(
                    paths, args.rounds, int(args.warmup + args.seconds + 1), mine,
                    lambda path: measure(children, pingpong, echo, port, path, rate, args.conns,
                                         args.seconds, args.size, args.warmup, proxy_args, workdir),
                    progress)
                for r in mine:
                    r.setdefault("rate", rate)
                runs += mine
                if interrupted:
                    break
        except KeyboardInterrupt:
            interrupted = True
        except tp.BenchError as e:
            print(f"latency.py: error: {e}", file=sys.stderr)
            return 2
        finally:
            tp.stop_everything(children)
    rows = summarize(paths, runs)
    print(f"\nLatency, {args.size}-byte ping-pong over {args.conns} connections, {args.rounds} rounds x "
          f"{args.seconds:g} s, {meta['date']}, Linux {meta['machine']['kernel']}, "
          f"{meta['machine']['nproc']} CPUs")
    for rate in rates:
        mine = [r for r in rows if r["rate"] == rate]
        if mine:
            print(f"\n{rate:,} msg/s\n{text_table(mine)}\n{generator_check(rows, rate)}")
            if failures_text(mine):
                print(failures_text(mine))
    if tp.others_note(runs):
        print(tp.others_note(runs))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=2) + "\n")
        tp.log(f"wrote {out}")
    if interrupted:
        if args.write_docs:
            tp.log(f"not writing {tp.DOCS_FILE} from an interrupted run")
        return 130
    if args.write_docs:
        write_docs(meta, rows, runs)
        tp.log(f"wrote the latency section of {tp.DOCS_FILE}")
    return 0 if all(r["runs_ok"] == r["runs"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
