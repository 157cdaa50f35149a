"""The bench's parsing and statistics, on outputs recorded from the real tools.

bench/ decides what a person reads about io_uring on their machine: a parser that
misreads iperf3 or wrk, or a summary that turns a failed path into a zero, would
overstate or hide a result. The recorded files under tests/data/bench/ came from
iperf3 3.12 (loopback, -P 2 and -R) and wrk 4.1 (keep-alive against nginx; and
against a server that answers 503 and closes).
"""
import copy
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
DATA = Path(__file__).resolve().parent / "data" / "bench"
sys.path.insert(0, str(BENCH))

import aio_instructions  # noqa: E402
import charts  # noqa: E402
import http_rate  # noqa: E402
import suite  # noqa: E402
import throughput as tp  # noqa: E402


def iperf(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def test_iperf_two_streams_sums_what_the_receiver_got():
    data = iperf("iperf3-P2.json")
    r = tp.parse_iperf(data, streams=2)
    per_stream = [s["receiver"]["bytes"] for s in data["end"]["streams"]]
    assert r["bytes"] == data["end"]["sum_received"]["bytes"] == sum(per_stream)
    assert r["bits_per_second"] == pytest.approx(data["end"]["sum_received"]["bits_per_second"])


def test_iperf_reverse_reads_the_clients_receiving_end():
    data = iperf("iperf3-R.json")
    r = tp.parse_iperf(data, streams=1)
    assert r["bytes"] == data["end"]["streams"][0]["receiver"]["bytes"] > 0


def test_iperf_a_stream_that_carried_nothing_fails_the_run():
    data = iperf("iperf3-P2.json")
    dead = copy.deepcopy(data)
    dead["end"]["streams"][1]["receiver"]["bytes"] = 0
    with pytest.raises(tp.RunError, match="1 of 2 iperf3 streams"):
        tp.parse_iperf(dead, streams=2)
    with pytest.raises(tp.RunError, match="2 of 8"):
        tp.parse_iperf(data, streams=8)   # fewer streams than asked for


def test_iperf_error_and_missing_end_fail():
    with pytest.raises(tp.RunError, match="unable to connect"):
        tp.parse_iperf({"error": "unable to connect to server"})
    with pytest.raises(tp.RunError, match="sum_received"):
        tp.parse_iperf({"end": {}})


def test_iperf_argv_carries_streams_and_direction():
    argv = tp.iperf_argv(5201, 4, streams=8, reverse=True)
    assert argv[argv.index("-P") + 1] == "8" and "-R" in argv
    assert "-P" not in tp.iperf_argv(5201, 4) and "-R" not in tp.iperf_argv(5201, 4)


def test_wrk_keepalive_output():
    r = http_rate.parse_wrk((DATA / "wrk-keepalive.txt").read_text())
    assert r == {"requests": 79045, "seconds": 1.0, "req_per_s": 79013.79,
                 "socket_errors": 0, "non_2xx": 0}


def test_wrk_errors_are_counted_not_lost():
    r = http_rate.parse_wrk((DATA / "wrk-errors.txt").read_text())
    assert r["socket_errors"] == 6747 and r["non_2xx"] == 6747
    assert r["seconds"] == pytest.approx(1.1)


def test_wrk_without_a_result_is_an_error():
    with pytest.raises(tp.RunError, match="no result"):
        http_rate.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def _runs():
    return [
        {"path": "haproxy", "round": 1, "gbps": 10.0, "cpu_s_per_gb": 1.0, "cpu_percent": 90},
        {"path": "haproxy", "round": 2, "gbps": 12.0, "cpu_s_per_gb": 0.8, "cpu_percent": 95},
        {"path": "haproxy", "round": 3, "gbps": 11.0, "cpu_s_per_gb": 0.9, "cpu_percent": 92},
        {"path": "uring-proxy-copy", "round": 1, "gbps": 20.0, "cpu_s_per_gb": 0.4, "cpu_percent": 80},
        {"path": "uring-proxy-copy", "round": 2, "error": "proxy reports c2u=1 bytes, fewer ..."},
        {"path": "uring-proxy-copy", "round": 3, "gbps": 22.0, "cpu_s_per_gb": 0.5, "cpu_percent": 85},
        {"path": "uring-proxy-splice", "round": 1, "error": "exited with status 1"},
    ]


def test_summary_takes_medians_and_keeps_failed_paths_as_failed():
    paths, _ = tp.select_paths("haproxy,uring-proxy-copy,uring-proxy-splice")
    rows = {r["path"]: r for r in tp.summarize(paths, _runs())}
    assert rows["haproxy"]["median_gbps"] == 11.0
    assert rows["haproxy"]["median_cpu_s_per_gb"] == 0.9
    copy_ = rows["uring-proxy-copy"]
    assert (copy_["median_gbps"], copy_["runs_ok"], copy_["runs"]) == (21.0, 2, 3)
    assert copy_["ratio_vs_haproxy"] == pytest.approx(21.0 / 11.0)
    # The failed path is in the table with 0 of 1 runs and no figure: not a zero.
    splice = rows["uring-proxy-splice"]
    assert (splice["runs_ok"], splice["runs"]) == (0, 1)
    assert splice.get("median_gbps") is None and splice["ratio_vs_haproxy"] is None
    assert "| uring-proxy-splice | - | - | - | - |" in tp.markdown_table(list(rows.values()))
    # The chart draws it as failed, never as a zero bar.
    s = charts.series({"scenarios": {"bulk-1": {"summary": list(rows.values())}}}, "bulk-1", "median_gbps")
    assert s["uring-proxy-splice"]["failed"] and not s["uring-proxy-copy"]["failed"]
    assert (s["uring-proxy-copy"]["lo"], s["uring-proxy-copy"]["hi"]) == (20.0, 22.0)


def test_each_variant_writes_only_its_own_docs_section(tmp_path, monkeypatch):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nhand-written intro\n")
    monkeypatch.setattr(tp, "DOCS_FILE", doc)
    one = tp.section_markers("throughput.py", tp.variant_args())
    eight = tp.section_markers("throughput.py", tp.variant_args(streams=8, reverse=True, cpus="1"))
    assert one[0] == "<!-- bench/throughput.py --write-docs: begin -->"
    assert eight[0] == "<!-- bench/throughput.py --streams 8 --reverse --cpus 1 --write-docs: begin -->"
    tp.replace_docs_section(one, f"{one[0]}\nfirst\n{one[1]}\n")
    tp.replace_docs_section(eight, f"{eight[0]}\neight\n{eight[1]}\n")
    tp.replace_docs_section(one, f"{one[0]}\nsecond\n{one[1]}\n")
    text = doc.read_text()
    assert "hand-written intro" in text and "eight" in text and "second" in text
    assert "first" not in text
    assert text.index("second") < text.index("eight")   # rewritten in place


def test_eta_uses_the_runs_so_far():
    assert tp.eta(0.0, 0, 10, 5.5) == "~55 s left"
    assert tp.eta(100.0, 10, 40, 5.5) == "~5 min left"


def test_cpus_must_be_cpus_this_process_may_use():
    with pytest.raises(tp.BenchError, match="may run only on"):
        tp.check_cpus("4095")
    with pytest.raises(tp.BenchError, match="expected a list"):
        tp.check_cpus("one")


def _results(latency_p99=None):
    def sc(rows):
        return {"summary": rows}
    res = {"scenarios": {
        "bulk-1": sc([{"path": "haproxy", "median_gbps": 10.0, "median_cpu_s_per_gb": 1.0},
                      {"path": "haproxy-splice", "median_gbps": 11.0, "median_cpu_s_per_gb": 0.5},
                      {"path": "uring-proxy-copy", "median_gbps": 16.0, "median_cpu_s_per_gb": 0.45},
                      {"path": "uring-proxy-splice", "median_gbps": 21.0, "median_cpu_s_per_gb": 0.3}]),
    }}
    if latency_p99:
        res["scenarios"]["latency"] = sc([
            {"path": "haproxy", "rate": 10000, "p99_us": 1.0},
            {"path": "uring-proxy-copy", "rate": 10000, "p99_us": 9.0},
            {"path": "haproxy", "rate": 50000, "p99_us": latency_p99[0]},
            {"path": "uring-proxy-copy", "rate": 50000, "p99_us": latency_p99[1]}])
    return res


def test_targets_say_met_missed_by_how_much_or_not_measured():
    table = suite.targets_table(_results(latency_p99=(800.0, 600.0)))
    lines = {l.split(" | ")[0].lstrip("| "): l for l in table.splitlines()[2:]}
    best = lines["single stream, best mode, Gbit/s"]
    assert "2.10x: `uring-proxy-splice`" in best and best.endswith("| yes |")
    cpu = lines["proxy CPU-s/GB, copy mode"]
    assert "0.45x" in cpu and cpu.endswith("| yes |")
    cpu_best = lines["proxy CPU-s/GB, best mode, against HAProxy with splice"]
    assert "0.60x" in cpu_best and "no (missed by 50%)" in cpu_best
    assert "0.75x" in lines["p99 latency at 50k msg/s, copy mode"]
    pinned = lines["single stream pinned to one core, copy mode, Gbit/s"]
    assert "not measured: no `uring-proxy-copy` figure in `bulk-1-pinned`" in pinned
    failed = _results(latency_p99=(800.0, None))
    assert "no `uring-proxy-copy` figure in `latency` at 50000 msg/s" in suite.targets_table(failed)


def _aio_run(loop, api, rnd, req_s, size=1024, conns=4, errors=0):
    return {"loop": loop, "api": api, "size": size, "conns": conns, "round": rnd,
            "req_s": req_s, "p50_us": 1.0, "p99_us": 2.0, "errors": errors,
            "server_cpu_us_per_req": 1e6 / req_s, "generator_cpu_percent": 50.0}


def test_aio_targets_pair_rounds_and_say_which_cells_c_echo_cannot_reach():
    import aio
    runs = [_aio_run("uring", "protocol", 1, 2000), _aio_run("asyncio", "protocol", 1, 1000),
            _aio_run("uring", "protocol", 2, 1000), _aio_run("asyncio", "protocol", 2, 1000),
            _aio_run("uring", "protocol", 3, 1500), _aio_run("asyncio", "protocol", 3, 500),
            # a failed round pairs with nothing
            _aio_run("uring", "protocol", 4, 9000, errors=1), _aio_run("asyncio", "protocol", 4, 1000),
            _aio_run("c-echo", "sockets", 1, 1100), _aio_run("c-echo", "sockets", 2, 1100)]
    assert sorted(aio.paired_ratios(runs, "uring", "asyncio", "protocol", 1024, 4)) == [1.0, 2.0, 3.0]
    line = next(x for x in aio.targets_table(aio.summarize(runs), runs, [1024], [4]).splitlines()
                if x.startswith("| protocol: uring >= 1.3x asyncio"))
    # medians: uring 1500 (its failed round left out), asyncio 1000 -> 1.50x,
    # met; c-echo's 1100 is only 1.10x asyncio's, under the 1.3x asked
    assert "| 1 / 0 / 1 |" in line, line
    assert "1024/c4 1.50x [1.00-3.00] (c-echo only 1.10x)" in line, line


def test_aio_placements_write_their_own_docs_sections():
    import aio
    assert aio.section_of("1:0") == aio.SECTION == aio.section_of("none")
    one = aio.section_of("1:1")
    assert one != aio.SECTION and "--pin 1:1" in one[0] and "--pin 1:1" in one[1]


def test_aio_instructions_reads_callgrinds_total_and_refuses_unknown_loops(tmp_path, capsys):
    dump = tmp_path / "cg.out.1"
    dump.write_text("# callgrind format\nversion: 1\nevents: Ir\nsummary: 57408326\n\nfn=x\n0 5\n")
    assert aio_instructions.summary_of(dump) == 57408326
    assert aio_instructions.main(["--loops", "uring,trio"]) == 2
    assert "unknown loop 'trio'" in capsys.readouterr().err
