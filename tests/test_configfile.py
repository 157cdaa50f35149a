"""--config FILE and --check-config FILE: a TOML file of frontends, each a listener with
its own pool. Mistakes name the file, the frontend and key (or the line) and the problem,
and nothing starts; a valid file runs every frontend, each serving."""
import signal
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, ProxyProcess
from netutil import EchoServer, connect
from test_metrics import samples, scrape

from uring_net.config import ConfigError
from uring_net import configfile

EXAMPLE = REPO_ROOT / "docs" / "example.toml"


def check(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uring_net", "--check-config", str(path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def test_check_config_accepts_the_example_file():
    r = check(EXAMPLE)
    assert r.returncode == 0, r.stderr
    assert "3 frontend(s)" in r.stdout
    for name in ("web:", "db:", "cache:"):
        assert name in r.stdout, r.stdout
    fc = configfile.load(str(EXAMPLE))
    web = dict(fc.frontends)["web"]
    assert (web.balance, web.proxy_protocol, [u.weight for u in web.upstreams]) == \
        ("roundrobin", 2, [3, 1])
    assert dict(fc.frontends)["db"].idle_timeout == 0
    assert dict(fc.frontends)["cache"].mode == "splice"


GOOD = '[[frontend]]\nname = "a"\nlisten = "127.0.0.1:0"\nupstreams = ["127.0.0.1:9"]\n'

BAD = [
    # (file text, what the one line must say)
    (GOOD + 'balanse = "roundrobin"\n', ["[[frontend]] 'a'", "unknown key 'balanse'"]),
    (GOOD + 'retries = 99\n', ["[[frontend]] 'a'.retries", "0..63", "99"]),
    (GOOD + 'balance = "random"\n', ["'a'.balance", "unknown balance 'random'"]),
    (GOOD + 'mode = 3\n', ["'a'.mode", "unknown mode '3'"]),
    (GOOD + 'idle_timeout = true\n', ["'a'.idle_timeout", "not a boolean"]),
    (GOOD + 'retries = = 3\n', ["not valid TOML", "line 5"]),
    ('[[frontend]]\nlisten = "127.0.0.1:0"\n', ["[[frontend]] #1", "needs listen", "upstreams"]),
    (GOOD.replace('"127.0.0.1:9"', '{address = "127.0.0.1:9", weight = 0}'),
     ["'a'", "weight must be a whole number from 1 to 256"]),
    (GOOD.replace('"127.0.0.1:9"', '{addr = "127.0.0.1:9"}'), ["upstreams[0]", "addr"]),
    (GOOD.replace('"127.0.0.1:9"', '"no-port"'), ["'a'", "expected HOST:PORT"]),
    (GOOD + GOOD.replace('"a"', '"b"').replace("127.0.0.1:0", "127.0.0.1:7000")
     .replace('name = "b"', 'name = "a"'), ["a second frontend named 'a'"]),
    (GOOD.replace("127.0.0.1:0", "127.0.0.1:7000") + GOOD.replace('"a"', '"b"')
     .replace("127.0.0.1:0", "127.0.0.1:7000"), ["'b'.listen", "127.0.0.1:7000", "'a'"]),
    ('[defaults]\nlisten = "127.0.0.1:1"\n' + GOOD, ["[defaults].listen", "each [[frontend]]"]),
    ('[global]\nmode = "copy"\n' + GOOD, ["[global]", "mode"]),
    ('[defaults]\nlog_format = "json"\n' + GOOD, ["unknown key 'log_format'", "[global]"]),
    ('[frontends]\n', ["unknown top-level key(s) frontends"]),
    ('', ["no [[frontend]]"]),
    (GOOD + 'buffers = 1000\n', ["'a'", "--buffers must be a power of two"]),
    (GOOD + 'pipe_size = 65536\n', ["'a'", "--mode splice only"]),
]


@pytest.mark.parametrize("text,says", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_a_mistake_names_the_file_the_key_and_the_problem(tmp_path, text, says):
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        configfile.load(str(path))
    msg = str(e.value)
    assert msg.startswith(str(path) + ": "), msg
    for s in says:
        assert s in msg, (s, msg)


def test_check_config_exits_2_with_one_line(tmp_path):
    path = tmp_path / "proxy.toml"
    path.write_text(GOOD + "retries = -1\n")
    r = check(path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("uring-proxy: error: "), r.stderr
    missing = check(tmp_path / "absent.toml")
    assert missing.returncode == 2 and "cannot read it" in missing.stderr


def test_config_with_listen_flags_is_refused(tmp_path):
    path = tmp_path / "proxy.toml"
    path.write_text(GOOD)
    r = subprocess.run([sys.executable, "-m", "uring_net", "--config", str(path),
                        "--listen", "127.0.0.1:0"], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "not with --listen" in r.stderr, r.stderr


def test_every_frontend_of_a_file_serves(tmp_path, backend):
    a, b = EchoServer(), EchoServer()
    try:
        path = tmp_path / "proxy.toml"
        path.write_text(f'''
[global]
log_format = "json"
metrics = "127.0.0.1:0"
workers = 1
[defaults]
backend = "{backend}"
mode = "copy"
drain_timeout = 0
[[frontend]]
name = "one"
listen = "127.0.0.1:0"
upstreams = ["{a.addr}"]
[[frontend]]
name = "two"
listen = "127.0.0.1:0"
balance = "roundrobin"
health_interval = 0
upstreams = ["{b.addr}", {{address = "{a.addr}", weight = 2}}]
''')
        p = ProxyProcess([sys.executable, "-m", "uring_net", "--config", str(path)], "json")
        try:
            listening = [p.wait_for(lambda e, n=n: e["event"] == "listening" and e.get("frontend") == n,
                                    30, f"listening line of {n}") for n in ("one", "two")]
            assert listening[1]["weights"] == "1,2"
            n = 0
            for ln, count in zip(listening, (1, 3)):
                for _ in range(count):
                    with connect(ln["listen"]) as c:
                        c.sendall(b"hello")
                        try:
                            assert c.recv(5) == b"hello"
                        except OSError:
                            pytest.fail(p._tail())
                    n += 1
                    p.wait_for_close(n, 10)
            # "two" is smooth weighted round robin over b (1) and a (2): a, b, a.
            ups_seen = [e["upstream"] for e in p.closes()]
            assert ups_seen == [a.addr, a.addr, b.addr, a.addr], ups_seen
            # The frontends share one log: each close line says whose it is.
            assert [e["frontend"] for e in p.closes()] == ["one", "two", "two", "two"], p.closes()
            # One endpoint, every frontend's counters, by name.
            maddr = next(e for e in p.lines if e["event"] == "metrics")["listen"]
            status, text = scrape(maddr)
            assert status == 200
            got = samples(text)
            assert [got[("uring_proxy_connections_accepted_total", frozenset({("frontend", n)}))]
                    for n in ("one", "two")] == [1, 3]
            assert p.stop(signal.SIGTERM) == 0
            stopped = [e for e in p.lines if e["event"] == "stopped"]
            assert sorted((e["frontend"], e["connections"]) for e in stopped) == [("one", 1), ("two", 3)], \
                stopped
            assert not p.problems(), p.problems()
        finally:
            if p.returncode is None:
                p.kill()
    finally:
        errors = a.close() + b.close()
        assert not errors, errors


def test_the_configuration_page_lists_every_key():
    text = (REPO_ROOT / "docs" / "configuration.md").read_text()
    from uring_net.config import build_parser
    keys = [a.dest for a in build_parser()._actions if a.dest not in configfile.NOT_FRONTEND]
    keys += list(configfile.GLOBAL_KEYS) + ["name", "upstreams"]
    missing = [k for k in keys if f"| `{k}` |" not in text]
    assert not missing, f"docs/configuration.md does not list {missing}"
