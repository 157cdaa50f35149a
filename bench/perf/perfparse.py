"""Pure parsers and figures for bench/perf/profile_proxy.py: no process is started here.

Parsers take the text a tool printed (``perf stat -x,``, ``perf script``, ``perf trace
-s``, ``strace -c -f``, uring-proxy's JSON log) and return plain dicts and lists;
the figure functions turn counts into per-unit figures and ratios. A figure that
cannot be had is an ``NA`` (a str, "not available: <reason>"), never 0 and never
left out, so that every report row says why it is empty.

tests/test_bench_perf.py runs all of it on outputs recorded on a real machine
(tests/data/bench_perf/).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter


class NA(str):
    """A figure that is not available; str(x) is 'not available: <reason>'.

    A str so that it goes into report.json and the tables as it is."""

    reason: str

    def __new__(cls, reason: str) -> "NA":
        s = super().__new__(cls, f"not available: {reason}")
        s.reason = reason
        return s


def is_na(x) -> bool:
    return isinstance(x, NA) or (isinstance(x, str) and x.startswith("not available"))


def ratio(num, den, why_zero: str = "the divisor is 0"):
    """num / den, or NA with the first reason: an NA operand's, or `why_zero`."""
    for x in (num, den):
        if is_na(x):
            return x if isinstance(x, NA) else NA(str(x).removeprefix("not available: "))
        if x is None:
            return NA("no figure")
    if den == 0:
        return NA(why_zero)
    return num / den


# ---------------------------------------------------------------- perf stat -x,


NOT_SUPPORTED = "<not supported>"
NOT_COUNTED = "<not counted>"


def parse_perf_stat_csv(text: str) -> list[dict]:
    """The rows of ``perf stat -x, ...`` output, in the order perf printed them
    (which is the order of the -e options: the same event given twice, with two
    --filter, comes out as two rows of one name).

    Each row: event, value (float, or None), unit, status ("ok", "not supported",
    "not counted"), run_ns, percent (share of the time the counter ran). Comment
    lines (``# started on``) and perf's "Events enabled/disabled" notes are skipped.
    """
    rows = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        f = line.split(",")
        if len(f) < 3 or not f[2].strip():
            continue
        raw = f[0].strip()
        if raw == NOT_SUPPORTED:
            value, status = None, "not supported"
        elif raw == NOT_COUNTED:
            value, status = None, "not counted"
        else:
            try:
                value, status = float(raw), "ok"
            except ValueError:
                continue
        run_ns = _num(f[3]) if len(f) > 3 else None
        pct = _num(f[4]) if len(f) > 4 else None
        rows.append({"event": f[2].strip(), "value": value, "unit": f[1].strip(),
                     "status": status, "run_ns": run_ns, "percent": pct})
    return rows


def _num(s: str):
    try:
        return float(s)
    except ValueError:
        return None


def stat_value(row: dict | None, why_missing: str = "perf printed no row for it"):
    """A perf stat row's value, or NA saying why there is none."""
    if row is None:
        return NA(why_missing)
    if row["status"] == "not supported":
        if row["event"].split(":")[0] in HW_EVENTS:
            return NA("perf says <not supported>: this machine exposes no hardware "
                      "counters (common in VMs)")
        return NA(f"perf says <not supported> for {row['event']}")
    if row["status"] == "not counted":
        return NA(f"perf says <not counted> for {row['event']} (the counter never ran: "
                  "the task did not run while it was enabled, or it could not be scheduled)")
    return row["value"]


HW_EVENTS = ("cycles", "instructions", "branches", "branch-misses", "cache-misses",
             "cache-references", "stalled-cycles-frontend", "stalled-cycles-backend",
             "ref-cycles", "bus-cycles", "cpu-cycles")


# ---------------------------------------------------------------- perf script -> folded stacks


_SAMPLE_HEAD = re.compile(
    r"^(?P<comm>\S.*?)\s+(?P<pid>\d+)(?:/(?P<tid>\d+))?\s+(?:\[\d+\]\s+)?"
    r"(?P<time>\d+\.\d+):\s+(?:(?P<period>\d+)\s+)?(?P<event>[\w:.\-]+):\s*(?P<rest>.*)$")
_FRAME = re.compile(r"^\s+(?P<ip>[0-9a-fA-F]+)\s+(?P<sym>.*?)\s+\((?P<dso>[^()]*)\)\s*$")
_OFFSET = re.compile(r"\+0x[0-9a-fA-F]+$")


def frame_name(sym: str, dso: str, annotate_kernel: bool = True) -> str:
    """One frame's name as stackcollapse-perf.pl writes it: the symbol without its
    +0x offset; an unknown symbol as [module]; kernel frames with a _[k] suffix."""
    sym = _OFFSET.sub("", sym.strip())
    if sym in ("[unknown]", ""):
        base = os.path.basename(dso) if dso and dso not in ("[unknown]", "unknown") else ""
        name = f"[{base}]" if base else "[unknown]"
        if base.startswith("["):            # [kernel.kallsyms] -> itself
            name = base
    else:
        name = sym
        paren = name.find("(")
        if paren > 0:                       # C++ argument lists: name only
            name = name[:paren]
    name = name.replace(";", ":")           # ';' separates frames in a folded line
    if annotate_kernel and (dso.startswith("[kernel") or dso.endswith(".ko") or dso == "[bpf_prog]"):
        name += "_[k]"
    return name


def fold_perf_script(text: str, annotate_kernel: bool = True) -> Counter:
    """Fold ``perf script`` output (samples with call chains) into
    {"comm;outermost;...;innermost": samples}. The thread's name is the root frame,
    so io-wq workers (iou-wrk-PID) and the proxy's own thread stand apart.
    A sample without a call chain counts as comm;[no stack]."""
    folded: Counter = Counter()
    comm = None
    frames: list[str] = []

    def flush():
        if comm is not None:
            stack = [comm] + (list(reversed(frames)) if frames else ["[no stack]"])
            folded[";".join(stack)] += 1

    for line in text.splitlines():
        if not line.strip():
            flush()
            comm, frames = None, []
            continue
        if not line[0].isspace():
            m = _SAMPLE_HEAD.match(line)
            if m:
                flush()
                comm, frames = m.group("comm").replace(";", ":").strip(), []
                rest = m.group("rest")
                # Without -g perf script puts the one ip/sym/dso on the header line.
                one = _FRAME.match("\t" + rest) if rest else None
                if one:
                    frames.append(frame_name(one.group("sym"), one.group("dso"), annotate_kernel))
            continue
        if comm is None:
            continue
        m = _FRAME.match(line)
        if m:
            frames.append(frame_name(m.group("sym"), m.group("dso"), annotate_kernel))
    flush()
    return folded


def folded_lines(folded: Counter) -> list[str]:
    """'a;b;c COUNT' lines, sorted by stack (flamegraph.pl's and inferno's input)."""
    return [f"{stack} {n}" for stack, n in sorted(folded.items())]


def parse_folded(text: str) -> Counter:
    out: Counter = Counter()
    for line in text.splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if stack and n.isdigit():
            out[stack] += int(n)
    return out


def top_frames(folded: Counter, n: int = 15, skip_root: bool = True, trunk_share: float = 0.99) -> dict:
    """The `n` frames with the most self samples (the leaf of a stack) and with
    the most inclusive samples (anywhere in a stack, once per stack even when a
    frame recurses). skip_root leaves out the root frame (the thread's name).
    Each entry: (frame, samples, percent of all).

    Frames on at least `trunk_share` of all stacks (main(), the interpreter, the
    event loop) are the trunk: listed apart under "trunk", outermost first, and
    left out of the inclusive list, where they would fill every row at 100 %."""
    total = sum(folded.values())
    self_c: Counter = Counter()
    incl_c: Counter = Counter()
    for stack, count in folded.items():
        frames = stack.split(";")
        if skip_root and len(frames) > 1:
            frames = frames[1:]
        self_c[frames[-1]] += count
        for f in dict.fromkeys(frames):     # once per stack, in stack order
            incl_c[f] += count

    def rows(c: Counter, skip=()):
        # Ties by name: a report must not change with the interpreter's hash seed.
        ranked = sorted(c.items(), key=lambda fk: (-fk[1], fk[0]))
        return [(f, k, 100.0 * k / total if total else 0.0) for f, k in ranked if f not in skip][:n]
    trunk = {f for f, k in incl_c.items() if total and k >= trunk_share * total}
    # outermost first: order by the frame's first position in the heaviest stack
    order: dict[str, int] = {}
    for stack, _ in folded.most_common():
        for i, f in enumerate(stack.split(";")):
            order.setdefault(f, i)
    return {"samples": total, "self": rows(self_c), "inclusive": rows(incl_c, trunk),
            "trunk": sorted(trunk, key=lambda f: (order.get(f, 0), f)), "trunk_share": trunk_share}


# ---------------------------------------------------------------- perf trace -s


_TRACE_THREAD = re.compile(r"^\s*(?P<comm>.+?) \((?P<tid>\d+)\), (?P<events>\d+) events, [\d.]+%")


def parse_perf_trace_summary(text: str) -> dict:
    """``perf trace -s`` summary: one section per thread, summed per syscall.

    Returns {"threads": [{comm, tid, events}], "syscalls": {name: {calls, errors,
    total_ms}}, "total_calls", "total_errors"}. Older perf prints no errors column;
    errors are then None."""
    threads: list[dict] = []
    sys_: dict[str, dict] = {}
    has_errors = None
    for line in text.splitlines():
        m = _TRACE_THREAD.match(line)
        if m:
            threads.append({"comm": m.group("comm"), "tid": int(m.group("tid")),
                            "events": int(m.group("events"))})
            continue
        toks = line.split()
        if not toks:
            continue
        if toks[0] == "syscall" and "calls" in toks:
            has_errors = "errors" in toks
            continue
        if has_errors is None or not re.fullmatch(r"[A-Za-z_][\w]*", toks[0]) or len(toks) < 3:
            continue
        try:
            calls = int(toks[1])
            if has_errors:
                errors, total_ms = int(toks[2]), float(toks[3])
            else:
                errors, total_ms = None, float(toks[2])
        except (ValueError, IndexError):
            continue
        s = sys_.setdefault(toks[0], {"calls": 0, "errors": 0 if has_errors else None, "total_ms": 0.0})
        s["calls"] += calls
        if errors is not None:
            s["errors"] = (s["errors"] or 0) + errors
        s["total_ms"] += total_ms
    return _totals({"tool": "perf trace -s", "threads": threads, "syscalls": sys_})


def _totals(d: dict) -> dict:
    d["total_calls"] = sum(s["calls"] for s in d["syscalls"].values())
    errs = [s["errors"] for s in d["syscalls"].values()]
    d["total_errors"] = None if any(e is None for e in errs) else sum(errs)
    return d


# ---------------------------------------------------------------- strace -c -f


def parse_strace_summary(text: str) -> dict:
    """``strace -c -f`` summary table (all traced threads together).

    Returns {"syscalls": {name: {calls, errors, seconds}}, "total_calls",
    "total_errors", "reported_total": the calls of strace's own total row}."""
    sys_: dict[str, dict] = {}
    reported = None
    in_table = False
    for line in text.splitlines():
        toks = line.split()
        if not toks:
            continue
        if toks[0] == "%" and "calls" in toks:
            in_table = True
            continue
        if not in_table or toks[0].startswith("---"):
            continue
        # pct seconds usecs/call calls [errors] name
        if len(toks) not in (5, 6) or not re.fullmatch(r"[A-Za-z_]\w*", toks[-1]):
            # "100.00 0.70 164 4280 2 totalstrace: Process ... attached" (stderr glued on)
            m = re.match(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?total", line)
            if m:
                reported = int(m.group(1))
            continue
        try:
            seconds = float(toks[1])
            calls = int(toks[3])
            errors = int(toks[4]) if len(toks) == 6 else 0
        except ValueError:
            continue
        if toks[-1] == "total":
            reported = calls
            continue
        s = sys_.setdefault(toks[-1], {"calls": 0, "errors": 0, "seconds": 0.0})
        s["calls"] += calls
        s["errors"] += errors
        s["seconds"] += seconds
    d = _totals({"tool": "strace -c -f", "syscalls": sys_})
    d["reported_total"] = reported
    return d


def syscall_rows(summary: dict, units, unit: str, top: int | None = None) -> list[dict]:
    """Per-syscall rows, most calls first: calls, calls per unit, errors."""
    rows = []
    for name, s in sorted(summary["syscalls"].items(), key=lambda kv: (-kv[1]["calls"], kv[0])):
        rows.append({"syscall": name, "calls": s["calls"],
                     "per_unit": ratio(s["calls"], units, f"no {unit}s moved"),
                     "errors": s["errors"]})
    if top is not None:
        rows = rows[:top]
    rows.append({"syscall": "total", "calls": summary["total_calls"],
                 "per_unit": ratio(summary["total_calls"], units, f"no {unit}s moved"),
                 "errors": summary["total_errors"]})
    return rows


# ---------------------------------------------------------------- uring-proxy's log


def proxy_stats(log_text: str) -> dict | None:
    """The last ``{"event": "stats", ...}`` line of a ``-vv --log-format json`` log
    (the one written at stop, cumulative since start), or None."""
    last = None
    for line in log_text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"stats"' in line:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == "stats":
                last = ev
    return last


# ---------------------------------------------------------------- derived figures


# perf stat (software + hardware) figures: (event, label); task-clock is in ms,
# the others are counts.
STAT_EVENTS = [
    ("task-clock", "task-clock (ms of CPU)"),
    ("context-switches", "context switches"),
    ("cpu-migrations", "CPU migrations"),
    ("page-faults", "page faults"),
    ("cycles", "cycles"),
    ("instructions", "instructions"),
]


def find_row(rows: list[dict], event: str, nth: int = 0) -> dict | None:
    # perf may print a modifier it added (cycles:u when kernel counting is denied)
    hits = [r for r in rows if r["event"] == event or re.sub(r":[ukhGHpPS]+$", "", r["event"]) == event]
    return hits[nth] if len(hits) > nth else None


def stat_figures(rows: list[dict], units, unit: str, window_s) -> list[dict]:
    """Totals and per-unit figures from perf stat's software and hardware rows,
    plus CPUs utilized (task-clock over the window) and IPC."""
    out = []
    vals = {}
    for event, label in STAT_EVENTS:
        v = stat_value(find_row(rows, event))
        if not is_na(v) and event != "task-clock":
            v = int(v)                      # a count: perf prints it as a float
        vals[event] = v
        out.append({"figure": label, "total": v,
                    "per_unit": ratio(v, units, f"no {unit}s moved")})
    tc = vals["task-clock"]
    out.append({"figure": "CPUs utilized (task-clock / wall time)",
                "total": ratio(tc if is_na(tc) else tc / 1000.0, window_s, "empty window"),
                "per_unit": None})          # None: a ratio, no per-unit figure
    out.append({"figure": "instructions per cycle",
                "total": ratio(vals["instructions"], vals["cycles"], "0 cycles"),
                "per_unit": None})
    return out


# The io_uring tool's perf stat events, in order: (key, event, filter or None).
URING_EVENTS = [
    ("enter", "syscalls:sys_enter_io_uring_enter", None),
    ("enter_nosubmit", "syscalls:sys_enter_io_uring_enter", "to_submit == 0"),
    ("submit_req", "io_uring:io_uring_submit_req", None),
    ("complete", "io_uring:io_uring_complete", None),
    ("complete_eagain", "io_uring:io_uring_complete", "res == -11"),
    # A SEND_ZC notification's res has bit 31 set when the kernel copied
    # (IORING_NOTIF_USAGE_ZC_COPIED): negative, and no error. Notifications carry
    # IORING_CQE_F_NOTIF (1 << 3) in cflags.
    ("complete_err", "io_uring:io_uring_complete", "res < 0 && !(cflags & 8)"),
    ("cqring_wait", "io_uring:io_uring_cqring_wait", None),
    ("queue_async_work", "io_uring:io_uring_queue_async_work", None),
    ("poll_arm", "io_uring:io_uring_poll_arm", None),
    ("cqe_overflow", "io_uring:io_uring_cqe_overflow", None),
    ("req_failed", "io_uring:io_uring_req_failed", None),
    ("local_work_run", "io_uring:io_uring_local_work_run", None),
    ("task_work_run", "io_uring:io_uring_task_work_run", None),
    ("complete_enobufs", "io_uring:io_uring_complete", "res == -105"),
    ("complete_ecanceled", "io_uring:io_uring_complete", "res == -125"),
]


def uring_counts(rows: list[dict], missing: dict[str, str] | None = None) -> dict:
    """{key: count or NA} for URING_EVENTS from perf stat rows printed in that
    order (less the events in `missing`, {key: why}, which were not asked for)."""
    missing = missing or {}
    asked = [(k, ev) for k, ev, _ in URING_EVENTS if k not in missing]
    out: dict = {k: NA(why) for k, why in missing.items()}
    seen: Counter = Counter()
    for key, ev in asked:
        row = find_row(rows, ev, seen[ev])
        seen[ev] += 1
        v = stat_value(row)
        out[key] = v if is_na(v) else int(v)
    return out


def uring_figures(c: dict, stats: dict | None, iowq: dict | None, units, unit: str,
                  stats_why: str = "no stats line in the proxy's log") -> list[dict]:
    """The io_uring table: each row {figure, total, per_unit, source}.

    c: uring_counts() (tracepoints); stats: the proxy's final stats line (None when
    not had: `stats_why` says why); iowq: io-wq threads seen in /proc, {"at_start",
    "max", "created"} or None."""
    no_units = f"no {unit}s moved"

    def row(figure, total, source, per_unit=True, fmt=None):
        r = {"figure": figure, "total": total,
             "per_unit": ratio(total, units, no_units) if per_unit else None,  # None: a ratio
             "source": source}
        if fmt:
            r["fmt"] = fmt
        return r

    def st(*keys):
        if stats is None:
            return NA(stats_why)
        missing = [k for k in keys if k not in stats]
        if missing:
            return NA(f"the proxy's stats line has no {', '.join(missing)}")
        return sum(int(stats[k]) for k in keys)

    def g(key):
        return c.get(key, NA("not measured"))

    tp = "tracepoint"
    rows = [
        row("io_uring_enter calls", g("enter"), f"{tp} syscalls:sys_enter_io_uring_enter"),
        row("SQEs submitted", g("submit_req"), f"{tp} io_uring_submit_req"),
        row("SQEs per io_uring_enter", ratio(g("submit_req"), g("enter"), "no io_uring_enter calls"),
            "submit_req / enter", per_unit=False),
        row("io_uring_enter that submitted nothing (wait only)", g("enter_nosubmit"),
            f"{tp} sys_enter_io_uring_enter, to_submit == 0"),
        row("CQEs posted", g("complete"), f"{tp} io_uring_complete"),
        row("CQEs per wait (enters that had to sleep)",
            ratio(g("complete"), g("cqring_wait"), "the proxy never had to wait for a CQE"),
            "complete / io_uring_cqring_wait", per_unit=False),
        row("CQEs per batch the proxy handled", ratio(st("cqes"), st("batches"), "no batches"),
            "proxy stats cqes / batches", per_unit=False),
        row("work punted to io-wq", g("queue_async_work"), f"{tp} io_uring_queue_async_work"),
        row("io-wq workers created during the run",
            iowq["created"] if iowq else NA("the proxy's threads could not be listed"),
            "iou-wrk-* threads in /proc/PID/task"),
        row("io-wq workers at once, most",
            iowq["max"] if iowq else NA("the proxy's threads could not be listed"),
            "iou-wrk-* threads in /proc/PID/task", per_unit=False),
        row("-EAGAIN retried inside io_uring (poll armed)", g("poll_arm"), f"{tp} io_uring_poll_arm"),
        row("CQEs with -EAGAIN", g("complete_eagain"), f"{tp} io_uring_complete, res == -11"),
        row("-EAGAIN retries by the proxy (splice, peek)", st("splice_eagain", "peek_eagain"),
            "proxy stats splice_eagain + peek_eagain"),
        row("CQEs with an error (res < 0, zero-copy notifications aside)", g("complete_err"),
            f"{tp} io_uring_complete, res < 0 && !(cflags & IORING_CQE_F_NOTIF)"),
        row("  of which -ECANCELED (requests cancelled, as at a close)", g("complete_ecanceled"),
            f"{tp} io_uring_complete, res == -125"),
        row("  of which -ENOBUFS (no provided buffer left)", g("complete_enobufs"),
            f"{tp} io_uring_complete, res == -105"),
        row("-ENOBUFS seen by the proxy", st("enobufs"), "proxy stats enobufs"),
        row("requests failed", g("req_failed"), f"{tp} io_uring_req_failed"),
        row("CQ overflows (CQEs to the overflow list)", g("cqe_overflow"), f"{tp} io_uring_cqe_overflow"),
        row("CQ overflows seen by the proxy", st("cq_overflows"), "proxy stats cq_overflows"),
        row("CQEs dropped", st("cq_dropped"), "proxy stats cq_dropped"),
        row("task-work runs", _sum(g("local_work_run"), g("task_work_run")),
            f"{tp} io_uring_local_work_run + io_uring_task_work_run"),
        row("zero-copy sends", st("zc_sends"), "proxy stats zc_sends"),
        row("share of zero-copy sends really sent without a copy", zc_share(stats, stats_why),
            "proxy stats 1 - zc_copied / zc_notifs", per_unit=False, fmt="percent"),
    ]
    return rows


def _sum(*xs):
    vals = [x for x in xs if not is_na(x)]
    if not vals:
        return xs[0]
    return sum(vals)


def zc_share(stats: dict | None, stats_why: str = "no stats line in the proxy's log"):
    """The share of zero-copy sends the kernel really sent without copying:
    1 - zc_copied / zc_notifs (each notification says whether it copied)."""
    if stats is None:
        return NA(stats_why)
    if "zc_notifs" not in stats or "zc_copied" not in stats:
        return NA("the proxy's stats line has no zc_notifs / zc_copied")
    if int(stats["zc_notifs"]) == 0:
        return NA("no zero-copy send completed (copy or splice mode, or every send "
                  "below --zc-threshold)")
    return 1.0 - int(stats["zc_copied"]) / int(stats["zc_notifs"])


# ---------------------------------------------------------------- io-wq threads


def iowq_threads(task_comms: dict[int, str]) -> set[int]:
    """The tids whose comm is an io-wq worker's (iou-wrk-PID)."""
    return {tid for tid, comm in task_comms.items() if comm.startswith("iou-wrk-")}


def iowq_summary(samples: list[set[int]]) -> dict | None:
    """From successive sets of io-wq worker tids: workers at the first sample, the
    most at once, and how many new ones appeared (created during the run)."""
    if not samples:
        return None
    first = samples[0]
    seen = set().union(*samples)
    return {"at_start": len(first), "max": max(len(s) for s in samples),
            "created": len(seen - first), "samples": len(samples)}
