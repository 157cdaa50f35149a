#!/usr/bin/env python3
"""Instructions per request of each event loop's echo server, counted by callgrind.

What it measures
    bench/aio_server.py runs under `valgrind --tool=callgrind` with one loop and
    one API. After a warm-up, the counters are zeroed (`callgrind_control -z`),
    bench/pingpong.c drives the server CLOSED LOOP for --seconds, and the
    counters are dumped (`callgrind_control -d`). The instructions the server
    ran in user space over that window, divided by the requests echoed, is the
    figure printed: the loop's own work per request, plus the Python of the
    echo itself, which is the same for every loop.

Why counted, not timed
    On a shared VM a wall-clock A/B of two builds cannot see a change of a few
    percent: rounds of the same server differ by 17% or more. Instruction
    counts are the same from one run to the next (within ~1%), whatever the
    machine is doing. They say nothing about the kernel's side (system calls,
    copies, wake-ups), so a change that moves work into the kernel, or adds a
    syscall, still needs the timed benchmark (bench/aio.py) to agree.

Usage (from the repository root; needs valgrind: apt-get install valgrind)
    .venv/bin/python bench/aio_instructions.py
    .venv/bin/python bench/aio_instructions.py --loops uring,uvloop --apis protocol
    PYTHONPATH=/tmp/old-build .venv/bin/python bench/aio_instructions.py --loops uring

Under valgrind a server runs ~50x slower, so a 2 s window holds a few thousand
requests: enough, since the count per request does not drift.

Exit status: 0 all counted, 1 some run failed, 2 cannot start.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402

HERE = Path(__file__).resolve().parent
SERVER = HERE / "aio_server.py"
LOOPS = ["asyncio", "uvloop", "uring", "uring-selector"]
APIS = ["sockets", "streams", "protocol", "buffered"]


def summary_of(dump: Path) -> int:
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise tp.RunError(f"no summary line in {dump}")


def pingpong(exe, port, conns, seconds, size, warmup):
    r = subprocess.run([str(exe), str(port), str(conns), "0", str(seconds), str(size), str(warmup)],
                       capture_output=True, text=True, timeout=seconds + warmup + 120)
    if r.returncode != 0 or not r.stdout.strip():
        raise tp.RunError(f"pingpong exited {r.returncode}: {r.stderr.strip()[-300:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def count(exe, loop, api, conns, size, seconds, workdir):
    """(instructions per request, requests echoed) of one server."""
    port = tp.free_port()
    out = workdir / f"cg-{loop}-{api}-{size}-{conns}.out"
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--compress-strings=no", "--compress-pos=no",
         f"--callgrind-out-file={out}", sys.executable, str(SERVER), loop, api, str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise tp.RunError(f"{loop}/{api} server did not start under valgrind: {line!r}")
        pingpong(exe, port, conns, 0.5, size, 0)                    # warm-up
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], capture_output=True, check=True)
        res = pingpong(exe, port, conns, seconds, size, 0)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], capture_output=True, check=True)
        if res["errors"]:
            raise tp.RunError(f"{loop}/{api}: {res['errors']} echo errors")
    finally:
        proc.send_signal(signal.SIGTERM)
        # Valgrind holds a signal back while its thread is in a syscall it
        # runs blocking (the loop's wait): a connection wakes the loop.
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except OSError:
            pass
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    dumps = sorted(workdir.glob(out.name + ".*"), key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise tp.RunError(f"{loop}/{api}: callgrind wrote no dump")
    return summary_of(dumps[-1]) / res["echoed"], res["echoed"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the top of bench/aio_instructions.py for what is counted and why.")
    ap.add_argument("--loops", default=",".join(LOOPS), help=f"comma-separated, of {LOOPS}")
    ap.add_argument("--apis", default=",".join(APIS), help=f"comma-separated, of {APIS}")
    ap.add_argument("--sizes", default="1024", help="message sizes in bytes, comma-separated")
    ap.add_argument("--conns", default="1", help="concurrencies, comma-separated")
    ap.add_argument("--seconds", type=float, default=2.0, help="the counted window (default 2)")
    args = ap.parse_args(argv)
    loops = [x for x in args.loops.split(",") if x]
    apis = [x for x in args.apis.split(",") if x]
    for name, got, known in (("loop", loops, LOOPS), ("API", apis, APIS)):
        bad = [x for x in got if x not in known]
        if bad:
            print(f"aio_instructions: unknown {name} {bad[0]!r}; one of {known}", file=sys.stderr)
            return 2
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"aio_instructions: no {tool} here; apt-get install valgrind", file=sys.stderr)
            return 2
    sizes = [int(x) for x in args.sizes.split(",")]
    conns = [int(x) for x in args.conns.split(",")]
    failed = False
    with tempfile.TemporaryDirectory(prefix="aio-instr-") as wd:
        workdir = Path(wd)
        exe = tp.compile_c(HERE / "pingpong.c", workdir)
        print(f"{'loop':15} {'api':9} {'size':>6} {'conns':>5} {'requests':>9} {'instructions/request':>21}")
        for api in apis:
            for size in sizes:
                for c in conns:
                    for lp in loops:
                        try:
                            per, n = count(exe, lp, api, c, size, args.seconds, workdir)
                        except (tp.RunError, subprocess.SubprocessError, OSError) as e:
                            print(f"{lp:15} {api:9} {size:6} {c:5}  failed: {e}", flush=True)
                            failed = True
                            continue
                        print(f"{lp:15} {api:9} {size:6} {c:5} {n:9} {per:21,.0f}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
