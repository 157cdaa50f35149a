"""Markdown for bench/perf/profile_proxy.py: report.md of one path, summary.md of several.

Pure functions of the result dict profile_proxy.py builds (and writes as report.json);
a figure that is an NA prints as "not available: <reason>".
"""
from __future__ import annotations

from perfparse import is_na

UNIT_TEXT = {
    "GB": "1 GB = 10^9 bytes the iperf3 server received through the proxy",
    "request": "one HTTP request wrk completed (keep-alive)",
    "connection": "one connection: one HTTP request with Connection: close, as wrk counted it",
    "second": "one second of the attached process's life (no load figures given)",
}


def fmt(x, kind: str | None = None) -> str:
    if x is None:
        return "—"
    if is_na(x):
        return str(x)
    if isinstance(x, bool):
        return str(x)
    if kind == "percent":
        p = 100.0 * x
        return f"{p:.2g} %" if 0 < abs(p) < 0.1 else f"{p:.1f} %"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        if abs(x) >= 0.01:
            return f"{x:.3f}"
        return f"{x:.3g}"
    return str(x)


def plural(unit: str) -> str:
    return unit if unit == "GB" else unit + "s"


def per_unit_cell(f: dict) -> str:
    """The per-unit cell; when it is unavailable for the same reason as the total,
    it says so briefly instead of repeating the reason."""
    pu, total = f.get("per_unit"), f.get("total")
    if is_na(pu) and is_na(total) and str(pu) == str(total):
        return "not available (see total)"
    return fmt(pu)


def table(head: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or ("l" + "r" * (len(head) - 1))
    sep = ["---:" if a == "r" else "---" for a in align]
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _frame(f: str) -> str:
    return f"`{f}`" if f else f


def render_path(r: dict) -> str:
    unit = r["unit"]
    m = r.get("meta", {})
    mach = m.get("machine", {})
    lines = [f"# perf profile: {r['path']}, {r['scenario_text']}", ""]
    lines.append(f"{m.get('date', '')} · Linux {mach.get('kernel', '?')} · {mach.get('nproc', '?')} CPUs"
                 f" · {mach.get('cpu_model', '?')}  ")
    if m.get("command"):
        lines.append(f"Command: `{m['command']}`  ")
    if r.get("proxy_argv"):
        lines.append(f"Proxy: `{' '.join(r['proxy_argv'])}`  ")
    if m.get("versions"):
        lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + "  ")
    lines.append(f"Unit: {UNIT_TEXT.get(unit, unit)}.")
    lines.append("")
    lines.append("Each tool ran in a load run of its own, one after another: tools attached at "
                 "once distort each other. Tracing syscalls slows a proxy that makes many of them "
                 "(perf trace somewhat, strace, which stops the proxy at every syscall, several "
                 "times over), so that load run moves less; every per-unit figure divides by what "
                 "its own load run moved.")
    if r.get("notes"):
        lines.append("")
        lines += [f"- {n}" for n in r["notes"]]
    lines.append("")

    runs = r.get("runs", {})
    if runs:
        lines += ["## Load runs", ""]
        rows = []
        for tool, run in runs.items():
            rows.append([tool, run.get("load_text", "—"), fmt(run.get("units")),
                         fmt(run.get("window_s")), fmt(run.get("proxy_cpu_s")),
                         fmt(run.get("proxy_cpu_per_unit")),
                         ("FAILED: " + run["error"]) if run.get("error") else "ok"])
        lines.append(table(["tool", "load", plural(unit), "tool window (s)", "proxy CPU (s, /proc)",
                            f"proxy CPU s per {unit}", "status"], rows, "llrrrrl"))
        lines.append("")

    st = r.get("stat")
    lines += [f"## CPU and scheduling (perf stat), per {unit}", ""]
    if st and st.get("figures"):
        lines.append(table(["figure", "total", f"per {unit}"],
                           [[f["figure"], fmt(f["total"]), per_unit_cell(f)] for f in st["figures"]]))
    else:
        lines.append(_missing(r, "stat"))
    lines.append("")

    ur = r.get("uring")
    lines += ["## io_uring", ""]
    if ur and ur.get("figures"):
        lines.append("Tracepoints counted by `perf stat -e 'io_uring:*'` over the load run, beside the "
                     "proxy's own counters from its final `stats` log line (`-vv --log-format json`).")
        lines.append("")
        lines.append(table(["figure", "total", f"per {unit}", "source"],
                           [[f["figure"], fmt(f["total"], f.get("fmt")), per_unit_cell(f), f["source"]]
                            for f in ur["figures"]], "lrrl"))
    else:
        lines.append(_missing(r, "uring"))
    lines.append("")

    rec = r.get("record")
    lines += ["## Where the CPU goes (perf record -g, kernel included)", ""]
    if rec and rec.get("top"):
        top = rec["top"]
        lines.append(f"{top['samples']:,} samples at {rec['frequency']} Hz, call graph `{rec['call_graph']}`"
                     f" ({fmt(rec.get('samples_per_unit'))} per {unit}). Folded stacks: "
                     f"[folded.txt](folded.txt); flame graph: "
                     + ("[flame.svg](flame.svg)." if not is_na(rec.get("flame")) else f"{rec['flame']}."))
        lines.append("Kernel frames end in `_[k]`; the root frame is the thread's name "
                     "(`iou-wrk-*` are io_uring's io-wq workers).")
        if top.get("trunk"):
            lines.append("")
            lines.append(f"On at least {100 * top['trunk_share']:.0f} % of the stacks, so left out of the "
                         "inclusive table (the trunk, outermost first): "
                         + " → ".join(_frame(f) for f in top["trunk"]) + ".")
        lines.append("")
        for key, title in (("self", "self samples (the frame itself was running)"),
                           ("inclusive", "inclusive samples (the frame was on the stack)")):
            lines += [f"### Top {len(top[key])} frames by {title}", ""]
            lines.append(table(["#", "frame", "samples", "%"],
                               [[str(i + 1), _frame(f), f"{n:,}", f"{p:.1f}"]
                                for i, (f, n, p) in enumerate(top[key])], "rlrr"))
            lines.append("")
    else:
        lines.append(_missing(r, "record"))
        lines.append("")

    sc = r.get("syscalls")
    lines += [f"## Syscalls, per {unit}", ""]
    if sc and sc.get("rows"):
        lines.append(f"From `{sc['tool']}`, over a window from just before the load to just after it. " + (
            "strace stops the proxy at every syscall (ptrace): its load run is much slower; "
            if sc["tool"].startswith("strace") else
            "perf trace handles an event per syscall, which slows a syscall-heavy proxy; ")
            + "the counts per unit stay meaningful, the syscall times do not.")
        lines.append("")
        lines.append(table(["syscall", "calls", f"per {unit}", "errors"],
                           [[x["syscall"], fmt(x["calls"]), fmt(x["per_unit"]), fmt(x["errors"])]
                            for x in sc["rows"]]))
    else:
        lines.append(_missing(r, "syscalls"))
    lines.append("")

    if r.get("unavailable"):
        lines += ["## Not available", ""]
        lines += [f"- {u['where']}: {u['figure']}: {u['reason']}" for u in r["unavailable"]]
        lines.append("")
    if r.get("errors"):
        lines += ["## Failures", ""]
        lines += [f"- {e['tool']}: {e['error']}" for e in r["errors"]]
        lines.append("")
    return "\n".join(lines)


def _missing(r: dict, tool: str) -> str:
    for e in r.get("errors", []):
        if e["tool"] == tool:
            return f"not available: {tool} failed: {e['error']}"
    why = r.get("skipped", {}).get(tool)
    return f"not available: {why}" if why else f"not available: the {tool} tool was not run (--tools)"


def collect_unavailable(r: dict) -> list[dict]:
    """Every NA figure of a result, for the report's "Not available" list."""
    out = []
    for where in ("stat", "uring"):
        for f in (r.get(where) or {}).get("figures", []):
            for key in ("total", "per_unit"):
                v = f.get(key)
                if is_na(v) and not any(u["figure"] == f["figure"] and u["where"] == where for u in out):
                    out.append({"where": where, "figure": f["figure"],
                                "reason": str(v).removeprefix("not available: ")})
    rec = r.get("record") or {}
    if is_na(rec.get("flame")):
        out.append({"where": "record", "figure": "flame.svg",
                    "reason": str(rec["flame"]).removeprefix("not available: ")})
    for note in rec.get("na", []):
        out.append({"where": "record", "figure": note[0], "reason": note[1]})
    for tool, why in r.get("skipped", {}).items():
        out.append({"where": tool, "figure": "every figure", "reason": why})
    return out


def render_summary(results: list[dict]) -> str:
    """Side by side, one column per path: the figures that compare proxies."""
    if not results:
        return ""
    unit = results[0]["unit"]
    head = ["figure"] + [r["path"] for r in results]

    def stat_fig(r, label):
        for f in (r.get("stat") or {}).get("figures", []):
            if f["figure"] == label:
                return f["per_unit"]
        return _missing(r, "stat")

    def uring_fig(r, label, key="per_unit"):
        if not r["path"].startswith("uring-proxy") and not r.get("is_uring"):
            return None
        for f in (r.get("uring") or {}).get("figures", []):
            if f["figure"] == label:
                return f[key]
        return _missing(r, "uring")

    def sys_fig(r, name):
        sc = r.get("syscalls")
        if not sc or not sc.get("rows"):
            return _missing(r, "syscalls")
        for x in sc["rows"]:
            if x["syscall"] == name:
                return x["per_unit"]
        return 0.0

    def top_self(r):
        top = (r.get("record") or {}).get("top")
        if not top or not top["self"]:
            return _missing(r, "record")
        f, _, p = top["self"][0]
        return f"`{f}` {p:.1f} %"

    rows = [
        ["load per run"] + [next(iter(r.get("runs", {}).values()), {}).get("load_text", "—") for r in results],
        [f"task-clock ms per {unit}"] + [fmt(stat_fig(r, "task-clock (ms of CPU)")) for r in results],
        [f"context switches per {unit}"] + [fmt(stat_fig(r, "context switches")) for r in results],
        [f"CPU migrations per {unit}"] + [fmt(stat_fig(r, "CPU migrations")) for r in results],
        [f"syscalls per {unit}"] + [fmt(sys_fig(r, "total")) for r in results],
        [f"io_uring_enter per {unit}"] + [fmt(uring_fig(r, "io_uring_enter calls")) for r in results],
        ["SQEs per io_uring_enter"] + [fmt(uring_fig(r, "SQEs per io_uring_enter", "total")) for r in results],
        ["CQEs per wait"] + [fmt(uring_fig(r, "CQEs per wait (enters that had to sleep)", "total"))
                             for r in results],
        ["CQEs per batch the proxy handled"] + [fmt(uring_fig(r, "CQEs per batch the proxy handled", "total"))
                                                for r in results],
        [f"work punted to io-wq per {unit}"] + [fmt(uring_fig(r, "work punted to io-wq")) for r in results],
        ["io-wq workers created"] + [fmt(uring_fig(r, "io-wq workers created during the run", "total"))
                                     for r in results],
        [f"-EAGAIN retried inside io_uring (poll armed) per {unit}"]
        + [fmt(uring_fig(r, "-EAGAIN retried inside io_uring (poll armed)")) for r in results],
        [f"-EAGAIN retries by the proxy (splice, peek) per {unit}"]
        + [fmt(uring_fig(r, "-EAGAIN retries by the proxy (splice, peek)")) for r in results],
        ["CQ overflows"] + [fmt(uring_fig(r, "CQ overflows (CQEs to the overflow list)", "total"))
                            for r in results],
        ["zero-copy sends really sent without a copy"]
        + [fmt(uring_fig(r, "share of zero-copy sends really sent without a copy", "total")) for r in results],
        ["top frame (self)"] + [top_self(r) for r in results],
    ]
    lines = [f"# perf profile summary: {results[0]['scenario_text']}", "",
             "One column per path; each path's report.md has the full tables. "
             "— : not an io_uring program.", "",
             table(head, rows, "l" + "r" * len(results)), ""]
    return "\n".join(lines)
