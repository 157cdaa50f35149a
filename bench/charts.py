#!/usr/bin/env python3
"""PNG charts of one benchmark run (bench/suite.py's results JSON), drawn with matplotlib.

    .venv/bin/python bench/charts.py bench/results/2026-12-01-1200-host.json [--out docs/img]

Four charts, each a PNG named for what it shows:
    throughput.png      median Gbit/s per path, one bar per bulk scenario, min-max whiskers
    cpu-per-gb.png      the proxy's CPU seconds per GB per path, same bars
    latency.png         p50, p99 and p99.9 per path at each ping-pong rate (log scale)
    rates.png           HTTP keep-alive req/s and new connections per second per path

A path whose runs all failed is drawn as the word "failed" where its bar would be,
never as a zero bar and never left out; a path the scenario did not run is absent.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BULK = ["bulk-1", "bulk-1-reverse", "bulk-8", "bulk-8-reverse", "bulk-1-pinned"]
HTTP = ["http-c100", "http-c1000", "http-c100-pinned"]


class ChartsUnavailable(Exception):
    """matplotlib is missing: `make bench-tools` installs it."""


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display on a bench machine
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ChartsUnavailable(f"matplotlib is not installed ({e}); run `make bench-tools`") from None
    return plt


def series(res: dict, scenario: str, key: str, rate: int | None = None) -> dict[str, dict]:
    """path -> {"value", "lo", "hi", "failed"} for `key` of one scenario's summary
    (of its rows at `rate`, for latency.py's rows per rate)."""
    out = {}
    for row in res.get("scenarios", {}).get(scenario, {}).get("summary", []):
        path = row.get("path")
        if not path or (rate is not None and row.get("rate") != rate):
            continue
        failed = row.get("runs_ok", 1) == 0 or row.get(key) is None
        lo_hi = {"median_gbps": ("min_gbps", "max_gbps"), "median": ("min", "max")}.get(key)
        out[path] = {"value": row.get(key), "failed": failed,
                     "lo": row.get(lo_hi[0]) if lo_hi else None,
                     "hi": row.get(lo_hi[1]) if lo_hi else None}
    return out


def grouped_bars(ax, groups: list[tuple[str, dict[str, dict]]], ylabel: str, log: bool = False) -> None:
    """One cluster per path, one bar per group; "failed" written where a bar failed."""
    paths: list[str] = []
    for _, s in groups:
        paths += [p for p in s if p not in paths]
    n = max(1, len(groups))
    width = 0.8 / n
    for gi, (label, s) in enumerate(groups):
        xs, ys, errs, fails = [], [], [[], []], []
        for pi, p in enumerate(paths):
            if p not in s:
                continue
            x = pi - 0.4 + width * (gi + 0.5)
            if s[p]["failed"]:
                fails.append(x)
                continue
            v = s[p]["value"]
            xs.append(x)
            ys.append(v)
            lo, hi = s[p]["lo"], s[p]["hi"]
            errs[0].append(v - lo if lo is not None else 0)
            errs[1].append(hi - v if hi is not None else 0)
        ax.bar(xs, ys, width, label=label,
               yerr=errs if any(errs[0] + errs[1]) else None, capsize=2)
        for x in fails:
            # At the foot of the axes (x in data, y in axes units): a log axis has no 0.
            ax.text(x, 0.02, "failed", rotation=90, ha="center", va="bottom", fontsize=7,
                    color="tab:red", transform=ax.get_xaxis_transform())
    ax.set_xticks(range(len(paths)))
    ax.set_xticklabels([p.replace("uring-proxy-", "u-") for p in paths], rotation=45, ha="right",
                       fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("path (u- is uring-proxy-, u-epoll- its epoll backend)", fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    if len(groups) > 1:
        ax.legend(fontsize=7)


def _title(res: dict, what: str) -> str:
    m = res.get("meta", {})
    mach = m.get("machine", {})
    return (f"{what}\n{m.get('date', '')}, Linux {mach.get('kernel', '?')}, "
            f"{mach.get('nproc', '?')} CPUs{' (quick: single runs)' if m.get('quick') else ''}")


def render(res: dict, outdir: Path) -> list[Path]:
    """Draw every chart the results have figures for; return the files written."""
    plt = _plt()
    outdir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        path = outdir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    bulk = [(s, series(res, s, "median_gbps")) for s in BULK if s in res.get("scenarios", {})]
    if bulk:
        fig, ax = plt.subplots(figsize=(11, 4.5))
        grouped_bars(ax, bulk, "Gbit/s (median; whiskers min-max)")
        ax.set_title(_title(res, "Bulk throughput per path (iperf3, loopback)"), fontsize=9)
        save(fig, "throughput.png")
        cpu = [(s, series(res, s, "median_cpu_s_per_gb")) for s, _ in bulk]
        cpu = [(s, {p: v for p, v in d.items() if p != "direct"}) for s, d in cpu]
        fig, ax = plt.subplots(figsize=(11, 4.5))
        grouped_bars(ax, cpu, "proxy CPU seconds per GB (lower is better)")
        ax.set_title(_title(res, "Proxy CPU per GB forwarded"), fontsize=9)
        save(fig, "cpu-per-gb.png")

    lat = res.get("scenarios", {}).get("latency", {})
    rates = sorted({row["rate"] for row in lat.get("summary", []) if row.get("rate")})
    if rates:
        fig, axes = plt.subplots(1, len(rates), figsize=(6 * len(rates), 4.5), squeeze=False)
        for ax, rate in zip(axes[0], rates):
            groups = [(label, series(res, "latency", key, rate))
                      for label, key in (("p50", "p50_us"), ("p99", "p99_us"), ("p99.9", "p999_us"))]
            grouped_bars(ax, groups, "microseconds (log scale)", log=True)
            ax.set_title(f"{rate:,} msg/s, 64-byte ping-pong", fontsize=9)
        fig.suptitle(_title(res, "Latency percentiles per path"), fontsize=9)
        save(fig, "latency.png")

    http = [(s, series(res, s, "median")) for s in HTTP if s in res.get("scenarios", {})]
    conn = series(res, "conn-rate", "median") if "conn-rate" in res.get("scenarios", {}) else {}
    if http or conn:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), squeeze=False)
        if http:
            grouped_bars(axes[0][0], http, "requests/s (median)")
            axes[0][0].set_title("HTTP keep-alive (wrk to nginx)", fontsize=9)
        if conn:
            grouped_bars(axes[0][1], [("conn-rate", conn)], "connections/s (median)")
            axes[0][1].set_title("A new connection per request (Connection: close)", fontsize=9)
        fig.suptitle(_title(res, "Request and connection rates per path"), fontsize=9)
        save(fig, "rates.png")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Draw the PNG charts of one bench/suite.py run.")
    ap.add_argument("results", help="a results JSON written by bench/suite.py")
    ap.add_argument("--out", default="docs/img", help="directory for the PNGs (default docs/img)")
    a = ap.parse_args(argv)
    try:
        res = json.loads(Path(a.results).read_text())
        for p in render(res, Path(a.out)):
            print(p)
    except (OSError, ValueError) as e:
        print(f"charts.py: error: {a.results}: {e}", file=sys.stderr)
        return 2
    except ChartsUnavailable as e:
        print(f"charts.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
