"""bench/perf/: the parsers and figures, on tool outputs recorded on a real machine.

tests/data/bench_perf/ holds what perf 6.1, strace 6.1 and uring-proxy printed in
short runs on a 2-CPU VM without hardware counters (Linux 6.18):

    perf-stat.csv                 perf stat -x, -e task-clock,...,cycles,instructions
                                  on uring-proxy-copy (cycles: <not supported>)
    perf-stat-uring.csv           perf stat -x, on the io_uring tracepoints, in
                                  perfparse.URING_EVENTS order (the same event again
                                  for each --filter), uring-proxy-zerocopy, iperf3 2 s
    uring-proxy-zerocopy-log.jsonl  that run's proxy log (-vv --log-format json)
    perf-stat-uring-conn.csv      the same on uring-proxy-copy, wrk Connection: close
    perf-script.txt               4 samples of perf script, --call-graph dwarf, of the proxy
    perf-trace-s-haproxy.txt      perf trace -s of HAProxy (two threads)
    perf-trace-s-uring-proxy.txt  perf trace -s of uring-proxy (two threads)
    strace-c-haproxy.txt          strace -c -f of HAProxy
    strace-c-uring-proxy.txt      strace -c -f of uring-proxy
    uring-proxy-log.jsonl         uring-proxy -vv --log-format json, 10 iperf3 runs
                                  (stats lines every 10 s and at stop)

No perf is run here and nothing is timed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "bench" / "perf"))

import perfparse as pp  # noqa: E402
import perfreport as rp  # noqa: E402
from perfparse import NA, is_na  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "bench_perf"


def data(name: str) -> str:
    return (DATA / name).read_text()


# ---------------------------------------------------------------- NA and ratios


def test_na_is_a_string_that_says_why():
    x = NA("no hardware counters")
    assert str(x) == "not available: no hardware counters"
    assert x.reason == "no hardware counters"
    assert is_na(x) and is_na("not available: read back from report.json")
    assert not is_na(0) and not is_na(0.0) and not is_na(None)


def test_ratio_division_by_zero_and_na_operands():
    assert pp.ratio(6, 3) == 2
    r = pp.ratio(5, 0, "no io_uring_enter calls")
    assert is_na(r) and r.reason == "no io_uring_enter calls"
    first = NA("tracepoint missing")
    assert pp.ratio(first, 0) is first           # the operand's reason wins
    assert pp.ratio(4, NA("no load")).reason == "no load"
    assert is_na(pp.ratio(None, 2))


# ---------------------------------------------------------------- perf stat


def test_perf_stat_csv_software_rows_and_not_supported():
    rows = pp.parse_perf_stat_csv(data("perf-stat.csv"))
    assert [r["event"] for r in rows] == ["task-clock", "context-switches", "cpu-migrations",
                                          "page-faults", "cycles", "instructions"]
    tc = rows[0]
    assert tc["value"] == pytest.approx(1289.79) and tc["unit"] == "msec" and tc["status"] == "ok"
    assert tc["run_ns"] == 1289792206 and tc["percent"] == 100.0
    assert rows[1]["value"] == 1455 and rows[3]["value"] == 8197
    for r in rows[4:]:
        assert r["value"] is None and r["status"] == "not supported"
    v = pp.stat_value(rows[4])
    assert is_na(v) and "no hardware counters" in v
    assert is_na(pp.stat_value(None))


def test_perf_stat_not_counted_and_comment_lines():
    text = ("# started on Tue Dec  1 11:09:33 2026\n\n"
            "<not counted>,msec,task-clock,0,100.00,,\n"
            "Events disabled\nEvents enabled\n")
    rows = pp.parse_perf_stat_csv(text)
    assert len(rows) == 1 and rows[0]["status"] == "not counted"
    assert "never ran" in pp.stat_value(rows[0])


def test_stat_figures_per_unit_and_unavailable_rows():
    rows = pp.parse_perf_stat_csv(data("perf-stat.csv"))
    figs = {f["figure"]: f for f in pp.stat_figures(rows, 1.742, "GB", 2.027)}
    tc = figs["task-clock (ms of CPU)"]
    assert tc["total"] == pytest.approx(1289.79)
    assert tc["per_unit"] == pytest.approx(1289.79 / 1.742)
    cs = figs["context switches"]
    assert cs["total"] == 1455 and isinstance(cs["total"], int)
    assert figs["CPUs utilized (task-clock / wall time)"]["total"] == pytest.approx(1.28979 / 2.027)
    for name in ("cycles", "instructions", "instructions per cycle"):
        assert is_na(figs[name]["total"]), name          # never 0, never missing
        assert "hardware counters" in figs[name]["total"]
    assert is_na(figs["cycles"]["per_unit"])
    # no load moved: every per-unit figure says so
    figs0 = {f["figure"]: f for f in pp.stat_figures(rows, 0.0, "GB", 2.0)}
    assert figs0["page faults"]["per_unit"].reason == "no GBs moved"


# ---------------------------------------------------------------- io_uring tracepoints


def test_uring_counts_from_recorded_tracepoints():
    rows = pp.parse_perf_stat_csv(data("perf-stat-uring.csv"))
    assert len(rows) == len(pp.URING_EVENTS)
    c = pp.uring_counts(rows)
    # the same event twice (unfiltered, then filtered) comes back in -e order
    assert c["enter"] == 21298 and c["enter_nosubmit"] == 567
    assert c["submit_req"] == 21864
    # res < 0 leaving out zero-copy notifications (whose res says "copied" in bit 31):
    # 6, not the ~20,000 notifications of this run
    assert (c["complete"], c["complete_eagain"], c["complete_err"]) == (41806, 0, 6)
    assert c["cqring_wait"] == 553 and c["poll_arm"] == 540
    assert c["queue_async_work"] == 0 and c["cqe_overflow"] == 0 and c["req_failed"] == 0
    assert c["local_work_run"] == 4624 and c["task_work_run"] == 0
    assert c["complete_enobufs"] == 0 and c["complete_ecanceled"] == 5


def test_uring_counts_conn_scenario_errors_are_cancellations():
    c = pp.uring_counts(pp.parse_perf_stat_csv(data("perf-stat-uring-conn.csv")))
    assert c["complete_err"] == 39127 and c["complete_ecanceled"] == 39098
    f = _figs(pp.uring_figures(c, None, None, 12962.0, "connection", "no log"))
    assert f["SQEs per io_uring_enter"]["total"] == pytest.approx(182620 / 6536)
    assert f["CQEs posted"]["per_unit"] == pytest.approx(204219 / 12962)


def test_uring_counts_with_an_event_left_out():
    # A kernel without the filtered -EAGAIN count: the rows after it still line up.
    lines = data("perf-stat-uring.csv").splitlines()
    complete_rows = [i for i, l in enumerate(lines) if ",io_uring:io_uring_complete," in l]
    del lines[complete_rows[1]]                         # the `res == -11` row
    c = pp.uring_counts(pp.parse_perf_stat_csv("\n".join(lines)),
                        {"complete_eagain": "perf refused the tracepoint filter"})
    assert c["complete"] == 41806 and c["complete_err"] == 6 and c["cqring_wait"] == 553
    assert c["complete_ecanceled"] == 5
    assert is_na(c["complete_eagain"]) and "filter" in c["complete_eagain"]


def _figs(rows):
    return {f["figure"]: f for f in rows}


def test_uring_figures_from_recorded_counts_and_proxy_log():
    c = pp.uring_counts(pp.parse_perf_stat_csv(data("perf-stat-uring.csv")))
    stats = pp.proxy_stats(data("uring-proxy-zerocopy-log.jsonl"))
    iowq = pp.iowq_summary([set(), {101}, {101, 102}])
    f = _figs(pp.uring_figures(c, stats, iowq, 1.629552435, "GB"))
    assert f["SQEs per io_uring_enter"]["total"] == pytest.approx(21864 / 21298)
    assert f["SQEs per io_uring_enter"]["per_unit"] is None          # a ratio
    assert f["CQEs per wait (enters that had to sleep)"]["total"] == pytest.approx(41806 / 553)
    assert f["CQEs per batch the proxy handled"]["total"] == pytest.approx(41809 / 21298)
    assert f["io_uring_enter calls"]["per_unit"] == pytest.approx(21298 / 1.629552435)
    assert f["io-wq workers created during the run"]["total"] == 2
    assert f["io-wq workers at once, most"]["total"] == 2
    assert f["task-work runs"]["total"] == 4624
    assert f["CQ overflows seen by the proxy"]["total"] == 0       # a real 0, not a missing one
    assert f["zero-copy sends"]["total"] == 19939
    # loopback: the kernel copied every "zero-copy" send (zc_copied == zc_notifs)
    assert f["share of zero-copy sends really sent without a copy"]["total"] == 0.0
    copy_mode = _figs(pp.uring_figures(c, pp.proxy_stats(data("uring-proxy-log.jsonl")), None, 1.0, "GB"))
    zc = copy_mode["share of zero-copy sends really sent without a copy"]
    assert is_na(zc["total"]) and "no zero-copy send" in zc["total"]


def test_uring_figures_division_by_zero_and_missing_sources():
    c = {k: 0 for k, _, _ in pp.URING_EVENTS}
    c["complete"] = 7
    c["poll_arm"] = NA("tracepoint io_uring:io_uring_poll_arm is not in this kernel")
    f = _figs(pp.uring_figures(c, None, None, 0.0, "request", stats_why="no --proxy-log given"))
    assert f["SQEs per io_uring_enter"]["total"].reason == "no io_uring_enter calls"
    assert "never had to wait" in f["CQEs per wait (enters that had to sleep)"]["total"]
    assert f["CQEs posted"]["per_unit"].reason == "no requests moved"
    assert f["CQEs per batch the proxy handled"]["total"].reason == "no --proxy-log given"
    assert "not in this kernel" in f["-EAGAIN retried inside io_uring (poll armed)"]["total"]
    assert is_na(f["io-wq workers created during the run"]["total"])
    # every row has a figure or a reason: no None totals, no rows left out
    assert all(r["total"] is not None for r in f.values())
    assert len(f) == len(pp.uring_figures({}, None, None, 1.0, "GB"))


def test_zero_copy_share():
    assert pp.zc_share({"zc_notifs": 10, "zc_copied": 4}) == pytest.approx(0.6)
    assert pp.zc_share({"zc_notifs": 8, "zc_copied": 8}) == 0.0      # loopback: all copied
    assert is_na(pp.zc_share({"zc_notifs": 0, "zc_copied": 0}))
    assert is_na(pp.zc_share({"zc_sends": 3}))
    assert pp.zc_share(None, "no stats").reason == "no stats"


def test_proxy_stats_takes_the_last_stats_line():
    st = pp.proxy_stats(data("uring-proxy-log.jsonl"))
    assert st["event"] == "stats"
    assert (st["cqes"], st["batches"], st["cq_overflows"]) == (105949, 70146, 0)
    assert st["c2u_bytes"] == 16479028635 and st["accepted"] == 10
    assert pp.proxy_stats('{"event": "listening"}\nnot json\n') is None


def test_iowq_threads_and_summary():
    comms = {10: "python", 11: "python", 12: "iou-wrk-10", 13: "iou-wrk-10", 14: "iou-sqp-10"}
    assert pp.iowq_threads(comms) == {12, 13}
    s = pp.iowq_summary([{12}, {12, 13}, {13, 15}, set()])
    assert s == {"at_start": 1, "max": 2, "created": 2, "samples": 4}
    assert pp.iowq_summary([]) is None


# ---------------------------------------------------------------- perf script -> folded


KNOWN_STACK = (
    "python;_start;__libc_start_main_impl;__libc_start_call_main;Py_BytesMain;pymain_main;"
    "Py_RunMain;pymain_run_python;pymain_run_module;_PyEval_Vector;_PyEval_EvalFrame;"
    "_PyEval_EvalFrameDefault;PyObject_Vectorcall;_PyObject_VectorcallTstate;"
    "cfunction_vectorcall_FASTCALL_KEYWORDS;builtin_exec;builtin_exec_impl;PyEval_EvalCode;"
    "_PyEval_Vector;_PyEval_EvalFrame;_PyEval_EvalFrameDefault;PyObject_Vectorcall;"
    "_PyObject_VectorcallTstate;__pyx_pw_9uring_net_5_core_6Engine_11run;"
    "__pyx_pf_9uring_net_5_core_6Engine_10run;__pyx_f_9uring_net_5_core_6Engine_run_c;"
    "__pyx_f_9uring_net_5_core_4Ring_submit_and_wait;io_uring_submit_and_wait_timeout")


def test_fold_recorded_perf_script():
    folded = pp.fold_perf_script(data("perf-script.txt"))
    assert sum(folded.values()) == 4 and len(folded) == 3
    assert folded[KNOWN_STACK] == 2                 # two samples, same user-space stack
    lines = pp.folded_lines(folded)
    assert f"{KNOWN_STACK} 2" in lines
    sched = [s for s in folded if s.endswith("finish_task_switch.isra.0_[k]")]
    assert len(sched) == 1 and folded[sched[0]] == 1
    # kernel frames are marked, the unknown symbol names its library, offsets are gone
    assert ";entry_SYSCALL_64_after_hwframe_[k];do_syscall_64_[k];" in sched[0]
    assert ";[liburing.so.2.3];entry_SYSCALL_64" in sched[0]
    assert not any("+0x" in s for s in folded)
    send = [s for s in folded if s.endswith("tcp_sendmsg_locked_[k]")]
    assert send and "io_submit_sqes_[k];io_issue_sqe_[k];__io_issue_sqe_[k];io_sendmsg_[k]" in send[0]
    assert pp.parse_folded("\n".join(lines)) == folded


def test_frame_names():
    assert pp.frame_name("fput+0x5", "[kernel.kallsyms]") == "fput_[k]"
    assert pp.frame_name("fput+0x5", "[kernel.kallsyms]", annotate_kernel=False) == "fput"
    assert pp.frame_name("[unknown]", "/usr/lib/x86_64-linux-gnu/liburing.so.2.3") == "[liburing.so.2.3]"
    assert pp.frame_name("[unknown]", "[unknown]") == "[unknown]"
    assert pp.frame_name("ns::f(int, char const*)+0x10", "/usr/bin/x") == "ns::f"
    assert pp.frame_name("a;b", "/usr/bin/x") == "a:b"


def test_fold_sample_without_call_chain():
    text = ("iou-wrk-13127 13130 10155.620818:    1001001 cpu-clock:ppp:  "
            "ffffffff81b85ae1 io_wq_worker+0x1b1 ([kernel.kallsyms])\n"
            "python 13127 10155.62:    1001001 cpu-clock:ppp: \n\n")
    assert pp.fold_perf_script(text) == {"iou-wrk-13127;io_wq_worker_[k]": 1, "python;[no stack]": 1}


def test_top_frames_self_inclusive_and_trunk():
    folded = pp.fold_perf_script(data("perf-script.txt"))
    top = pp.top_frames(folded, 15)
    assert top["samples"] == 4
    assert top["self"][0] == ("io_uring_submit_and_wait_timeout", 2, 50.0)
    assert {f for f, _, _ in top["self"]} == {"io_uring_submit_and_wait_timeout",
                                             "finish_task_switch.isra.0_[k]", "tcp_sendmsg_locked_[k]"}
    # frames on every stack are the trunk, outermost first, not inclusive rows
    assert top["trunk"][0] == "_start"
    assert top["trunk"][-2:] == ["__pyx_f_9uring_net_5_core_4Ring_submit_and_wait",
                                 "io_uring_submit_and_wait_timeout"]
    incl = dict((f, n) for f, n, _ in top["inclusive"])
    assert "_start" not in incl and "python" not in incl
    assert "io_uring_submit_and_wait_timeout" not in incl
    assert incl["do_syscall_64_[k]"] == 2 and incl["[liburing.so.2.3]"] == 2
    assert incl["io_sendmsg_[k]"] == 1
    assert len(pp.top_frames(folded, 2)["self"]) == 2


# ---------------------------------------------------------------- syscalls


def test_perf_trace_summary_sums_threads():
    s = pp.parse_perf_trace_summary(data("perf-trace-s-haproxy.txt"))
    assert [(t["comm"], t["tid"], t["events"]) for t in s["threads"]] == [
        ("haproxy", 17186, 190), ("haproxy", 17188, 69876)]
    assert s["syscalls"]["sendto"]["calls"] == 11 + 17310
    assert s["syscalls"]["recvfrom"] == {"calls": 21 + 17312, "errors": 8 + 2,
                                         "total_ms": pytest.approx(0.428 + 384.532)}
    assert s["syscalls"]["timer_settime"]["calls"] == 1
    assert s["total_calls"] == sum(x["calls"] for x in s["syscalls"].values()) == 95 + 34939
    assert s["total_errors"] == 15


def test_perf_trace_summary_uring_proxy():
    s = pp.parse_perf_trace_summary(data("perf-trace-s-uring-proxy.txt"))
    assert len(s["threads"]) == 2
    assert s["syscalls"]["io_uring_enter"] == {"calls": 2213, "errors": 3,
                                               "total_ms": pytest.approx(1686.492)}
    assert s["syscalls"]["futex"]["calls"] == 5 + 6
    assert s["total_calls"] == 2250 and s["total_errors"] == 11


def test_perf_trace_summary_without_errors_column():
    # perf before 5.x printed no errors column
    text = (" python (7), 3 events, 100.0%\n\n"
            "   syscall            calls    total       min       avg       max      stddev\n"
            "                               (msec)    (msec)    (msec)    (msec)        (%)\n"
            "   --------------- -------- --------- --------- --------- ---------     ------\n"
            "   io_uring_enter         3     0.3     0.1     0.1     0.1      0.00%\n")
    s = pp.parse_perf_trace_summary(text)
    assert s["syscalls"]["io_uring_enter"]["calls"] == 3
    assert s["total_errors"] is None


def test_strace_summary_haproxy():
    s = pp.parse_strace_summary(data("strace-c-haproxy.txt"))
    assert s["syscalls"]["recvfrom"] == {"calls": 29878, "errors": 9924, "seconds": pytest.approx(0.508217)}
    assert s["syscalls"]["sendto"]["calls"] == 19908 and s["syscalls"]["sendto"]["errors"] == 0
    assert s["syscalls"]["connect"]["errors"] == 101
    assert s["total_calls"] == s["reported_total"] == 52058
    assert s["total_errors"] == 10029
    assert "total" not in s["syscalls"]


def test_strace_summary_uring_proxy():
    s = pp.parse_strace_summary(data("strace-c-uring-proxy.txt"))
    assert set(s["syscalls"]) == {"io_uring_enter", "futex", "write", "recvfrom"}
    assert s["syscalls"]["io_uring_enter"]["calls"] == 4275
    assert s["syscalls"]["recvfrom"]["errors"] == 2
    assert s["total_calls"] == s["reported_total"] == 4280


def test_syscall_rows_per_unit():
    s = pp.parse_strace_summary(data("strace-c-haproxy.txt"))
    rows = pp.syscall_rows(s, 9901.0, "request")
    assert rows[0]["syscall"] == "recvfrom" and rows[0]["per_unit"] == pytest.approx(29878 / 9901)
    assert rows[-1]["syscall"] == "total" and rows[-1]["calls"] == 52058
    assert [r["syscall"] for r in pp.syscall_rows(s, 1.0, "request", top=2)] == ["recvfrom", "sendto", "total"]
    none = pp.syscall_rows(s, 0, "request")
    assert all(r["per_unit"].reason == "no requests moved" for r in none)


# ---------------------------------------------------------------- the report


def _result():
    rows = pp.parse_perf_stat_csv(data("perf-stat.csv"))
    c = pp.uring_counts(pp.parse_perf_stat_csv(data("perf-stat-uring.csv")))
    folded = pp.fold_perf_script(data("perf-script.txt"))
    sc = pp.parse_perf_trace_summary(data("perf-trace-s-uring-proxy.txt"))
    res = {"path": "uring-proxy-copy", "scenario_text": "bulk: one iperf3 stream", "unit": "GB",
           "meta": {"date": "2026-12-01 11:13 UTC", "machine": {"kernel": "6.18", "nproc": 2}},
           "proxy_argv": ["python", "-m", "uring_net"], "errors": [], "skipped": {}, "notes": [],
           "runs": {"stat": {"load_text": "iperf3 -t 2: 1.74 GB", "units": 1.742, "window_s": 2.0,
                             "proxy_cpu_s": 1.1, "proxy_cpu_per_unit": 0.63}},
           "stat": {"figures": pp.stat_figures(rows, 1.742, "GB", 2.0)},
           "uring": {"figures": pp.uring_figures(c, pp.proxy_stats(data("uring-proxy-log.jsonl")),
                                                 None, 1.629552435, "GB")},
           "record": {"frequency": 499, "call_graph": "dwarf,16384", "top": pp.top_frames(folded),
                      "samples_per_unit": 2.0, "flame": NA("pyinferno is not importable"), "na": []},
           "syscalls": {"tool": "perf trace -s", "rows": pp.syscall_rows(sc, 1.325, "GB")}}
    res["unavailable"] = rp.collect_unavailable(res)
    return res


def test_report_says_not_available_with_the_reason():
    res = _result()
    md = rp.render_path(res)
    cycles = next(l for l in md.splitlines() if l.startswith("| cycles |"))
    assert "not available: perf says <not supported>" in cycles and "| 0 |" not in cycles
    zc = next(l for l in md.splitlines() if l.startswith("| share of zero-copy"))
    assert "not available: no zero-copy send completed" in zc
    assert "| SQEs per io_uring_enter | 1.027 |" in md
    assert "| io_uring_enter | 2,213 | 1,670 | 3 |" in md
    assert "flame graph: not available: pyinferno is not importable" in md
    assert "`io_uring_submit_and_wait_timeout` | 2 | 50.0 |" in md
    listed = {(u["where"], u["figure"]) for u in res["unavailable"]}
    assert ("stat", "cycles") in listed and ("record", "flame.svg") in listed
    assert ("uring", "share of zero-copy sends really sent without a copy") in listed
    assert "## Not available" in md


def test_report_for_a_failed_and_a_skipped_tool():
    res = _result()
    del res["uring"]
    res["skipped"] = {"uring": "haproxy is not an io_uring program"}
    del res["syscalls"]
    res["errors"] = [{"tool": "syscalls", "error": "perf trace exited with status 255"}]
    md = rp.render_path(res)
    assert "not available: haproxy is not an io_uring program" in md
    assert "not available: syscalls failed: perf trace exited with status 255" in md
    assert "## Failures" in md


def test_summary_side_by_side():
    a = _result()
    b = dict(_result(), path="haproxy", is_uring=False)
    del b["uring"]
    md = rp.render_summary([a, b])
    assert "| figure | uring-proxy-copy | haproxy |" in md
    row = next(l for l in md.splitlines() if l.startswith("| SQEs per io_uring_enter"))
    assert row.endswith("| 1.027 | — |")
    assert "| syscalls per GB | 1,698 |" in md


def test_fmt():
    assert rp.fmt(1234567) == "1,234,567"
    assert rp.fmt(0.0) == "0"
    assert rp.fmt(12.345) == "12.3"
    assert rp.fmt(0.000332) == "0.000332"
    assert rp.fmt(0.25, "percent") == "25.0 %"
    assert rp.fmt(None) == "—"
    assert rp.fmt(NA("x")) == "not available: x"


# ---------------------------------------------------------------- the CLI's options


@pytest.fixture(scope="module")
def profile():
    # loaded from its file: `import profile` could be the standard library's
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_perf_profile", REPO / "bench" / "perf" / "profile_proxy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("argv", [
    [],                                                     # neither --scenario nor --pid
    ["--scenario", "bulk", "--pid", "1"],
    ["--scenario", "bulk", "--tools", "stat,nonsense"],
    ["--scenario", "bulk", "--bytes-per-s", "1e9"],         # a rate goes with --pid
    ["--pid", "1", "--bytes-per-s", "1e9", "--requests-per-s", "5"],
    ["--scenario", "bulk", "--seconds", "0"],
])
def test_bad_options_exit_2(profile, argv, capsys):
    with pytest.raises(SystemExit) as e:
        profile.parse_args(argv)
    assert e.value.code == 2


def test_options(profile):
    a = profile.parse_args(["--scenario", "http", "--path", "haproxy", "--tools", "stat, syscalls"])
    assert a.tools == ["stat", "syscalls"] and a.seconds == 5 and a.call_graph.startswith("dwarf")
    assert profile._backend(["--mode", "copy", "--backend", "epoll"]) == "epoll"
    assert profile._backend(["--backend=uring"]) == "uring"


def test_flame_without_pyinferno_says_why(profile, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pyinferno", None)     # import pyinferno -> ImportError
    out = tmp_path / "flame.svg"
    r = profile.flame(["a;b 1"], out, "t")
    assert is_na(r) and "pyinferno is not importable" in r and "folded.txt is written" in r
    assert not out.exists()


def test_flame_with_pyinferno(profile, tmp_path):
    # make test installs pyinferno (the Makefile's test dependencies): no skip.
    out = tmp_path / "flame.svg"
    lines = pp.folded_lines(pp.fold_perf_script(data("perf-script.txt")))
    assert profile.flame(lines, out, "recorded sample") == "flame.svg"
    assert out.read_text().startswith("<?xml") and "<svg" in out.read_text()[:400]
