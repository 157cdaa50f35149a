#!/usr/bin/env python3
"""Echo servers on asyncio's loops: stock, uvloop, uring_net.aio, and asyncio's
selector loop on UringSelector, interleaved in one run.

README
======
What it measures
    bench/aio_server.py serves echo on one loop with one API:
    sockets (sock_recv/sock_sendall), streams (start_server: read, write, drain),
    protocol (Protocol.data_received -> write), buffered (BufferedProtocol).
    ``pingpong`` (bench/pingpong.c) drives it CLOSED LOOP (RATE 0): --conns
    connections each send a --sizes message, read the whole echo, compare it byte
    for byte, and send the next one at once. Concurrency is the connection count.
    After --warmup seconds, --seconds are measured: requests per second, latency
    p50/p99 from each send to its whole echo, and the server's CPU (from /proc,
    over the whole run) per request.

    Loops: asyncio (SelectorEventLoop on EpollSelector, what asyncio.run uses on
    Linux), uvloop (from PyPI), uring (uring_net.aio), uring-selector
    (SelectorEventLoop(UringSelector())), and c-echo (bench/storm.c's echo server in
    C, the reference for the generator, below). Each round starts every loop's server
    in a new random order, and runs every size and concurrency on it; figures are
    medians over --rounds.

    With --syscalls, one more run per loop, API and concurrency (first size)
    counts the server's system calls with `perf stat -e raw_syscalls:sys_enter`: per
    request, the figure that says what a UringSelector saves over EpollSelector.

Is the generator the bottleneck?
    The c-echo rows answer it: the same generator against an echo server in C. A
    Python server well below c-echo's rate, with the generator's CPU (its own
    getrusage, printed per row) well under one core, is what limits the row. The
    targets table also says, per cell, whether c-echo itself reached the target
    ratio over the other loop: where it did not, no Python loop could have in
    that run, and the cell measured the machine more than the loops.

Where the generator runs (--pin)
    SERVER:GENERATOR on two CPUs (the default, 1:0) is a client on another
    core, as a real one is on another host: every message wakes a sleeping
    process on the other CPU. On a VM that wake-up is an inter-processor
    interrupt through the hypervisor, and a run settles either where both sides
    stay busy or where each message pays a sleep and a wake-up: on a 2-CPU
    firecracker VM (2026-12-02) a cell's fastest round was a median 1.6-1.9x
    its slowest, and up to 5.7x. One CPU for both (--pin 1:1) takes those
    wake-ups out: a send() that wakes the peer hands it the CPU there and then,
    a cell's rounds differ by a median 17-18% (at most 55%), and what differs
    between loops is their CPU per request. The generator's own time
    is then in every rate (c-echo's rate shows how much), so compare the
    fastest loops by their CPU per request. It also favours a loop that
    tries a recv() before waiting (asyncio's sock_recv, uring_net.aio's
    too), since the peer has already answered by the time the server reads.
    The two placements are separate sections of docs/benchmarks.md.

Usage (from the repository root)
    .venv/bin/python bench/aio.py                          # 3 rounds x 2 s, everything
    .venv/bin/python bench/aio.py --apis sockets --sizes 1024 --conns 1 --rounds 1
    .venv/bin/python bench/aio.py --syscalls --json bench/results/aio.json --write-docs

Exit status: 0 all runs done, 1 some run failed, 2 cannot start, 130 interrupted.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402

HERE = Path(__file__).resolve().parent
SERVER = HERE / "aio_server.py"
LOOPS = ["asyncio", "uvloop", "uring", "uring-selector", "c-echo"]
APIS = ["sockets", "streams", "protocol", "buffered"]
# One section of docs/benchmarks.md per placement: the generator on the other
# CPU, and both on one CPU (--pin N:N), which behave differently (README).
SECTION = tp.section_markers("aio.py")


def section_of(pin):
    s, _, g = pin.partition(":")
    return tp.section_markers("aio.py", f" --pin {pin}") if pin != "none" and s == g else SECTION

# The targets: (api, against) -> the least uring/against req/s ratio.
TARGETS = {("sockets", "asyncio"): 1.5, ("sockets", "uvloop"): 1.2,
           ("protocol", "asyncio"): 1.3, ("protocol", "uvloop"): 1.0,
           ("streams", "asyncio"): 1.2}


PIN = {"server": [], "generator": []}    # taskset prefixes (--pin)


def start_server(children, loop, api, storm, port):
    if loop == "c-echo":
        cmd = [str(storm), "echo", str(port)]
    else:
        cmd = [sys.executable, str(SERVER), loop, api, str(port)]
    cmd = PIN["server"] + cmd
    proc = children.spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if loop != "c-echo":
        line = proc.stdout.readline()
        if line.strip() != "ready":
            proc.kill()
            raise tp.RunError(f"{loop}/{api} server did not start: {line!r} "
                              f"{proc.stderr.read()[-500:]}")
    tp.wait_listening(port, proc, f"{loop} server", None)
    return proc


def stop_server(children, proc):
    children.stop(proc)


def pingpong(exe, port, conns, seconds, size, warmup):
    r = subprocess.run(PIN["generator"] + [str(exe), str(port), str(conns), "0", str(seconds),
                                           str(size), str(warmup)],
                       capture_output=True, text=True, timeout=seconds + warmup + 30)
    if r.returncode not in (0, 1) or not r.stdout.strip():
        raise tp.RunError(f"pingpong exited {r.returncode}: {r.stderr.strip()[-300:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def count_syscalls(exe, pid, port, conns, seconds, size, workdir):
    """System calls the server made per request, with perf; None and why if not."""
    out = workdir / f"perf-{pid}.txt"
    try:
        perf = subprocess.Popen(["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter",
                                 "-p", str(pid), "-o", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        return None, f"perf: {e}"
    time.sleep(0.3)
    res = pingpong(exe, port, conns, seconds, size, 0.2)
    perf.send_signal(2)
    try:
        perf.wait(10)
    except subprocess.TimeoutExpired:
        perf.kill()
        return None, "perf did not stop"
    try:
        for line in out.read_text().splitlines():
            f = line.split(",")
            if len(f) > 2 and "raw_syscalls" in f[2]:
                if not f[0].strip().isdigit():
                    return None, f"perf: {f[0]}"
                return int(f[0]) / max(1, res["echoed"]), ""
    except OSError:
        pass
    return None, "perf gave no count: " + (perf.stderr.read() or "")[-200:]


def measure(children, exe, storm, loop, api, cells, args, workdir, rnd):
    port = tp.free_port()
    proc = start_server(children, loop, api, storm, port)
    runs = []
    try:
        for size, conns in cells:
            cpu0 = tp.tree_cpu_seconds(proc.pid)
            res = pingpong(exe, port, conns, args.seconds, size, args.warmup)
            cpu = tp.tree_cpu_seconds(proc.pid) - cpu0
            run = {"loop": loop, "api": api, "size": size, "conns": conns, "round": rnd,
                   "req_s": res["achieved_rate"], "p50_us": res["p50_us"],
                   "p99_us": res["p99_us"], "errors": res["errors"],
                   "server_cpu_us_per_req": 1e6 * cpu / max(1, res["echoed"]),
                   "generator_cpu_percent": res["cpu_percent"], "pingpong": res}
            runs.append(run)
            tp.log(f"round {rnd}  {loop:15} {api:9} {size:6} B  c{conns}: "
                   f"{run['req_s']:9,.0f} req/s  p50 {run['p50_us']:7.1f} us  "
                   f"p99 {run['p99_us']:7.1f} us  server {run['server_cpu_us_per_req']:6.1f} "
                   f"us/req  generator {run['generator_cpu_percent']:.0f}%"
                   + ("  FAILED" if run["errors"] else ""))
        if args.syscalls and rnd == 1 and loop != "c-echo":
            # The first size at every concurrency: with one connection a loop
            # cannot batch, with more it can, and the two differ.
            size = cells[0][0]
            for conns in sorted({c for _, c in cells}):
                per, why = count_syscalls(exe, proc.pid, port, conns, args.seconds, size, workdir)
                runs.append({"loop": loop, "api": api, "size": size, "conns": conns,
                             "syscalls_per_req": per, "why": why})
                tp.log(f"          {loop:15} {api:9} c{conns} syscalls/req: "
                       + (f"{per:.2f}" if per is not None else f"not available: {why}"))
    finally:
        stop_server(children, proc)
    return runs


def summarize(runs):
    rows = {}
    for r in runs:
        if "req_s" not in r or r["errors"]:
            continue
        rows.setdefault((r["loop"], r["api"], r["size"], r["conns"]), []).append(r)
    out = {}
    for k, rs in rows.items():
        out[k] = {m: statistics.median(x[m] for x in rs)
                  for m in ("req_s", "p50_us", "p99_us", "server_cpu_us_per_req",
                            "generator_cpu_percent")}
        out[k]["n"] = len(rs)
    return out


def syscalls_of(runs):
    return {(r["loop"], r["api"], r["conns"]): r for r in runs if "syscalls_per_req" in r}


def table(summary, loops, apis, sizes, conns):
    lines = ["| API | size | conc | " + " | ".join(f"{lp} req/s" for lp in loops)
             + " | uring / asyncio | uring / uvloop | uring-selector / asyncio |",
             "|---|---|---|" + "---|" * (len(loops) + 3)]
    for api in apis:
        for size in sizes:
            for c in conns:
                cells, rate = [], {}
                for lp in loops:
                    s = summary.get((lp, api if lp != "c-echo" else "sockets", size, c))
                    if lp == "c-echo":
                        s = next((v for (a, b, z, cc), v in summary.items()
                                  if a == "c-echo" and z == size and cc == c), None)
                    rate[lp] = s["req_s"] if s else None
                    cells.append(f"{s['req_s']:,.0f} (p99 {s['p99_us']:.0f} us, "
                                 f"{s['server_cpu_us_per_req']:.0f} us CPU)" if s else "FAILED"
                                 if lp in loops else "")
                ratios = []
                for a, b in (("uring", "asyncio"), ("uring", "uvloop"), ("uring-selector", "asyncio")):
                    ratios.append(f"{rate[a] / rate[b]:.2f}x" if rate.get(a) and rate.get(b) else "-")
                lines.append(f"| {api} | {size} | {c} | " + " | ".join(cells) + " | "
                             + " | ".join(ratios) + " |")
    return "\n".join(lines)


def paired_ratios(runs, loop, other, api, size, conns):
    """uring/other per round, each from the two servers measured in that round:
    rounds are interleaved, so a noisy spell touches both sides of a pair."""
    by = {}
    for r in runs:
        if "req_s" in r and not r["errors"] and r["size"] == size and r["conns"] == conns:
            by[(r["loop"], r["api"], r["round"])] = r["req_s"]
    return [by[(loop, api, n)] / by[(other, api, n)] for (lp, a, n) in list(by)
            if lp == loop and a == api and (other, api, n) in by]


def c_echo_of(summary, size, conns):
    return next((v for (a, _, z, cc), v in summary.items()
                 if a == "c-echo" and z == size and cc == conns), None)


def targets_table(summary, runs, sizes, conns):
    """Each target, cell by cell: the ratio of the medians, the range of the
    per-round pairs, and whether the cell can be met on this machine at all.
    c-echo (a C echo server on the same generator) is the fastest server the
    generator and the kernel allow: where c-echo itself is not target x the
    other loop in that run, the cell measured the machine more than the loops
    (no Python loop is faster than c-echo), and it says so."""
    lines = ["| target | cells met / cells where c-echo met it / all | ratio per cell "
             "(size/conc): median [per-round range]; c-echo's ratio where it did not |",
             "|---|---|---|"]
    for (api, other), want in TARGETS.items():
        got = []
        for size in sizes:
            for c in conns:
                u, o = summary.get(("uring", api, size, c)), summary.get((other, api, size, c))
                if not (u and o):
                    continue
                pr = paired_ratios(runs, "uring", other, api, size, c)
                ce = c_echo_of(summary, size, c)
                ceiling = ce["req_s"] / o["req_s"] if ce else None
                got.append((f"{size}/c{c}", u["req_s"] / o["req_s"], pr,
                            ceiling is None or ceiling >= want, ceiling))
        met = sum(1 for g in got if g[1] >= want)
        reach = sum(1 for g in got if g[3])
        cells = []
        for name, r, pr, ok, ceiling in got:
            cell = f"{name} {r:.2f}x" + (f" [{min(pr):.2f}-{max(pr):.2f}]" if pr else "")
            if not ok:
                cell += f" (c-echo only {ceiling:.2f}x)"
            cells.append(cell)
        lines.append(f"| {api}: uring >= {want}x {other} | {met} / {reach} / {len(got)} | "
                     + ", ".join(cells) + " |")
    cpu = []
    for (lp, api, size, c), s in summary.items():
        if lp == "uring":
            o = summary.get(("uvloop", api, size, c))
            if o:
                cpu.append(s["server_cpu_us_per_req"] / o["server_cpu_us_per_req"])
    if cpu:
        lines.append(f"| server CPU per request <= uvloop's | {sum(1 for x in cpu if x <= 1.0)} "
                     f"of {len(cpu)} | median {statistics.median(cpu):.2f}x uvloop's, range "
                     f"{min(cpu):.2f}-{max(cpu):.2f}x |")
    return "\n".join(lines)


def syscalls_table(sc, apis):
    if not sc:
        return ""
    loops = sorted({lp for lp, _, _ in sc})
    lines = ["| API | conc | " + " | ".join(loops) + " |",
             "|---|---|" + "---|" * len(loops)]
    for api in apis:
        for conns in sorted({c for _, _, c in sc}):
            cells = []
            for lp in loops:
                r = sc.get((lp, api, conns))
                cells.append("-" if r is None else f"{r['syscalls_per_req']:.2f}"
                             if r["syscalls_per_req"] is not None else f"n/a ({r['why']})")
            lines.append(f"| {api} | {conns} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("README")[0].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loops", default=",".join(LOOPS))
    ap.add_argument("--apis", default=",".join(APIS))
    ap.add_argument("--sizes", default="1024,10240", help="message sizes in bytes")
    ap.add_argument("--conns", default="1,4", help="concurrencies (connections)")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--syscalls", action="store_true",
                    help="also count the server's system calls per request (perf)")
    ap.add_argument("--pin", default="1:0", metavar="SERVER_CPU:GENERATOR_CPU",
                    help="run the server and the generator each on one CPU (taskset), so "
                    "they do not trade places run to run; 'none' leaves it to the scheduler "
                    "(default: 1:0)")
    ap.add_argument("--json", type=Path, help="write every run and the medians here")
    ap.add_argument("--write-docs", action="store_true",
                    help=f"put the tables in {tp.DOCS_FILE.relative_to(tp.REPO)}")
    ap.add_argument("--from-json", type=Path, metavar="PATH",
                    help="measure nothing: print (and with --write-docs, put in the docs) "
                    "the tables of a run saved with --json; give the --pin, --rounds, "
                    "--seconds and --warmup it ran with")
    args = ap.parse_args(argv)
    loops = [x for x in args.loops.split(",") if x]
    apis = [x for x in args.apis.split(",") if x]
    sizes = [int(x) for x in args.sizes.split(",")]
    conns = [int(x) for x in args.conns.split(",")]
    bad = [x for x in loops if x not in LOOPS] + [x for x in apis if x not in APIS]
    if bad:
        print(f"unknown loop or API: {', '.join(bad)}", file=sys.stderr)
        return 2
    if "uvloop" in loops:
        try:
            import uvloop  # noqa: F401
        except ImportError:
            print("uvloop is not installed in this venv: `make bench` installs it "
                  "(or .venv/bin/python -m pip install uvloop), or "
                  "leave it out with --loops", file=sys.stderr)
            return 2
    if args.pin != "none":
        try:
            scpu, gcpu = (int(x) for x in args.pin.split(":"))
        except ValueError:
            print(f"--pin wants SERVER_CPU:GENERATOR_CPU, not {args.pin!r}", file=sys.stderr)
            return 2
        if max(scpu, gcpu) >= (len(os.sched_getaffinity(0))):
            print(f"--pin {args.pin}: this machine has CPUs 0-{len(os.sched_getaffinity(0)) - 1}",
                  file=sys.stderr)
            return 2
        PIN["server"] = [tp.TASKSET, "-c", str(scpu)]
        PIN["generator"] = [tp.TASKSET, "-c", str(gcpu)]
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        return report(args, saved["meta"], saved["runs"], loops, apis, sizes, conns,
                      any(r.get("failed") or r.get("errors") for r in saved["runs"]))
    cells = [(s, c) for s in sizes for c in conns]
    children = tp.Children()
    runs, failed = [], False
    meta = {"date": _dt.datetime.now().isoformat(timespec="seconds"),
            "command": tp.command_line(__file__), "machine": tp.machine_info(),
            "python": sys.version.split()[0]}
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="aio-bench-") as wd:
        workdir = Path(wd)
        try:
            exe = tp.compile_c(HERE / "pingpong.c", workdir)
            storm = tp.compile_c(HERE / "storm.c", workdir)
            for rnd in range(1, args.rounds + 1):
                order = [(lp, api) for lp in loops for api in (apis if lp != "c-echo" else ["sockets"])]
                random.shuffle(order)
                for lp, api in order:
                    try:
                        runs += measure(children, exe, storm, lp, api, cells, args, workdir, rnd)
                    except tp.RunError as e:
                        failed = True
                        tp.log(f"round {rnd}  {lp} {api}: FAILED: {e}")
                        runs.append({"loop": lp, "api": api, "round": rnd, "failed": str(e)})
                done = time.monotonic() - t_start
                tp.log(f"round {rnd}/{args.rounds} done; ~{done / rnd * (args.rounds - rnd):.0f} s left")
        except KeyboardInterrupt:
            tp.log("interrupted")
            return 130
        except tp.BenchError as e:
            print(f"aio.py: {e}", file=sys.stderr)
            return 2
        finally:
            tp.stop_everything(children)
    failed = failed or any(r.get("errors") for r in runs)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "runs": runs, "summary": [
            {"loop": k[0], "api": k[1], "size": k[2], "conns": k[3], **v}
            for k, v in summarize(runs).items()]}, indent=1))
        tp.log(f"wrote {args.json}")
    return report(args, meta, runs, loops, apis, sizes, conns, failed)


def report(args, meta, runs, loops, apis, sizes, conns, failed):
    """Print the tables of `runs`; with --write-docs, put them in the docs."""
    summary = summarize(runs)
    sc = syscalls_of(runs)
    main_table = table(summary, loops, apis, sizes, conns)
    print(main_table)
    print()
    print(targets_table(summary, runs, sizes, conns))
    if sc:
        print()
        print(syscalls_table(sc, apis))
    if args.write_docs:
        section = section_of(args.pin)
        scpu, _, gcpu = args.pin.partition(":")
        where = ("not pinned (`--pin none`)" if args.pin == "none" else
                 f"server and generator both on CPU {scpu} (`--pin {args.pin}`)" if scpu == gcpu
                 else f"server on CPU {scpu}, generator on CPU {gcpu} (`--pin {args.pin}`)")
        text = (f"{section[0]}\n## asyncio loops: echo servers, {where.split(' (')[0]}\n\n"
                f"{meta['date']}, {meta['machine'].get('cpu_model', '?')}, Python {meta['python']}; "
                f"`{meta['command']}`. Medians of {args.rounds} rounds of {args.seconds:g} s "
                f"(after {args.warmup:g} s of warm-up); every cell: req/s (p99 latency, server "
                f"CPU per request). Placement: {where}.\n\n"
                f"{main_table}\n\nTargets (uring_net.aio against the others, same run):\n\n"
                f"{targets_table(summary, runs, sizes, conns)}\n"
                + (f"\nServer system calls per request (`perf stat -e raw_syscalls:sys_enter`, "
                   f"{sizes[0]} B):\n\n{syscalls_table(sc, apis)}\n"
                   if sc else "")
                + f"{section[1]}\n")
        tp.replace_docs_section(section, text)
        tp.log(f"wrote the aio section of {tp.DOCS_FILE}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
