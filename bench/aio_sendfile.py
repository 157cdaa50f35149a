#!/usr/bin/env python3
"""loop.sock_sendfile() of a cached file over loopback: uring_net.aio (splice
through a pipe, as completions) against stock asyncio (sendfile(2) from the
loop's thread; uvloop has none), interleaved in one run.

README
======
What it measures
    A reader process (pinned to the generator CPU) accepts one connection and
    reads to EOF into a 1 MiB buffer. A sender process (pinned to the server CPU)
    runs one loop, connects, and sends a --size MiB file (written once and read
    back, so it is in the page cache) with loop.sock_sendfile(). The sender
    reports the wall time of the sendfile and its CPU over it (getrusage of the
    whole process, so io-wq workers count), the reader the bytes it got: a run
    whose count differs FAILS. Meanwhile the sender's loop runs a 1 ms timer and
    reports how late it came at worst: what a sendfile costs the loop's other
    work. With --cold the file is evicted from the page cache before each run
    (posix_fadvise DONTNEED), so that the bytes come from the disk. Figures are
    medians over --rounds; each round runs the loops in a new random order.

Usage (from the repository root)
    .venv/bin/python bench/aio_sendfile.py                   # 256 MiB, 5 rounds
    .venv/bin/python bench/aio_sendfile.py --size 64 --rounds 3 --json out.json
    .venv/bin/python bench/aio_sendfile.py --cold

Exit status: 0 all runs done, 1 some run failed, 2 cannot start.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOOPS = ["asyncio", "uring"]     # uvloop 0.23 has no sock_sendfile (NotImplementedError)


def make_loop(name):
    if name == "asyncio":
        import selectors
        return asyncio.SelectorEventLoop(selectors.EpollSelector())
    if name == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    from uring_net import aio
    loop = aio.new_event_loop()
    if not isinstance(loop, aio.Loop):
        raise SystemExit("uring_net.aio fell back to asyncio's loop here")
    return loop


def send(name, port, path):
    async def ticker(lags):
        # What else the loop serves meanwhile: a 1 ms timer, and how late it is.
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - t - 0.001)

    async def main():
        loop = asyncio.get_running_loop()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        lags = []
        with open(path, "rb") as f:
            tick = asyncio.ensure_future(ticker(lags))
            await asyncio.sleep(0.01)
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            sent = await loop.sock_sendfile(sock, f, fallback=False)
            t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            tick.cancel()
        sock.close()
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        return {"sent": sent, "seconds": t1 - t0, "cpu_seconds": cpu,
                "timer_lag_max_ms": max(lags, default=0) * 1e3}

    loop = make_loop(name)
    try:
        print(json.dumps(loop.run_until_complete(main())))
    finally:
        loop.close()


def read(port_file):
    lsock = socket.create_server(("127.0.0.1", 0))
    Path(port_file).write_text(str(lsock.getsockname()[1]))
    conn, _ = lsock.accept()
    buf = memoryview(bytearray(1 << 20))
    total = 0
    while n := conn.recv_into(buf):
        total += n
    print(json.dumps({"received": total}))


def evict(path):
    """Out of the page cache, so that the sendfile reads the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def one_run(name, path, size, cpus, workdir, cold):
    if cold:
        evict(path)
    port_file = workdir / f"port-{name}"
    port_file.unlink(missing_ok=True)
    pin_r = ["taskset", "-c", cpus[1]] if cpus else []
    pin_s = ["taskset", "-c", cpus[0]] if cpus else []
    reader = subprocess.Popen(pin_r + [sys.executable, __file__, "--read", str(port_file)],
                              stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(500):
            if port_file.exists() and port_file.read_text():
                break
            time.sleep(0.01)
        port = int(port_file.read_text())
        s = subprocess.run(pin_s + [sys.executable, __file__, "--send", name, str(port), str(path)],
                           capture_output=True, text=True, timeout=300)
        if s.returncode != 0:
            raise RuntimeError(f"{name}: sender exited {s.returncode}: {s.stderr.strip()[-300:]}")
        res = json.loads(s.stdout.strip().splitlines()[-1])
        out, _ = reader.communicate(timeout=60)
        res.update(json.loads(out.strip().splitlines()[-1]))
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    if res["received"] != size or res["sent"] != size:
        raise RuntimeError(f"{name}: sent {res['sent']}, received {res['received']}, file {size}")
    res["gbit_s"] = size * 8 / res["seconds"] / 1e9
    res["cpu_s_per_gb"] = res["cpu_seconds"] / (size / 1e9)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loops", default=",".join(LOOPS))
    ap.add_argument("--size", type=int, default=256, help="file size in MiB")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pin", default="1:0", help="SENDER_CPU:READER_CPU, or 'none'")
    ap.add_argument("--cold", action="store_true",
                    help="evict the file from the page cache before each run (fadvise), "
                         "so that the sendfile reads the disk")
    ap.add_argument("--json")
    ap.add_argument("--send", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--read", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.send:
        return send(args.send[0], int(args.send[1]), args.send[2])
    if args.read:
        return read(args.read)
    loops = args.loops.split(",")
    cpus = None if args.pin == "none" else args.pin.split(":")
    size = args.size << 20
    failed = 0
    runs = {name: [] for name in loops}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        path = workdir / "blob"
        with open(path, "wb") as f:
            f.write(os.urandom(1 << 20) * args.size)
        path.read_bytes()                       # in the page cache
        for rnd in range(1, args.rounds + 1):
            order = random.sample(loops, len(loops))
            for name in order:
                try:
                    r = one_run(name, path, size, cpus, workdir, args.cold)
                except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                    print(f"round {rnd}  {name:8}: FAILED: {e}", flush=True)
                    failed += 1
                    continue
                runs[name].append(r)
                print(f"round {rnd}  {name:8}: {r['gbit_s']:6.2f} Gbit/s  "
                      f"{r['cpu_s_per_gb']:.3f} CPU-s/GB  1 ms timer late by up to "
                      f"{r['timer_lag_max_ms']:.1f} ms", flush=True)
    summary = {}
    print(f"\n| loop | Gbit/s (median of {args.rounds}) | CPU-s per GB | 1 ms timer's worst lateness, ms | vs asyncio Gbit/s |")
    print("|---|---|---|---|---|")
    base = None
    for name in loops:
        if not runs[name]:
            print(f"| {name} | failed | failed | failed | - |")
            continue
        g = statistics.median(r["gbit_s"] for r in runs[name])
        c = statistics.median(r["cpu_s_per_gb"] for r in runs[name])
        lag = statistics.median(r["timer_lag_max_ms"] for r in runs[name])
        summary[name] = {"gbit_s": g, "cpu_s_per_gb": c, "timer_lag_max_ms": lag}
        if name == "asyncio":
            base = g
        ratio = f"{g / base:.2f}x" if base else "-"
        print(f"| {name} | {g:.2f} | {c:.3f} | {lag:.1f} | {ratio} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"size_mib": args.size, "cold": args.cold, "runs": runs,
                                               "medians": summary}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
