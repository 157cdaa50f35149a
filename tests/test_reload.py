"""SIGHUP: the config file is read again. A valid one starts a new generation of
engines on the same listening sockets before the old one stops accepting and drains,
so a client connecting in a tight loop across reloads is never refused; an invalid one
is logged and changes nothing."""
import signal
import sys
import threading

import pytest

from conftest import ProxyProcess
from netutil import EchoServer, connect

CONFIG = '''
[global]
log_format = "json"
workers = {workers}
[defaults]
backend = "{backend}"
mode = "copy"
drain_timeout = 10
[[frontend]]
name = "web"
listen = "127.0.0.1:{port}"
upstreams = ["{upstream}"]
'''


class Hammer(threading.Thread):
    """Connects, echoes 5 bytes and closes, as fast as it can, counting failures."""

    def __init__(self, addr):
        super().__init__(daemon=True)
        self.addr, self.ok, self.failures = addr, 0, []
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            try:
                with connect(self.addr, timeout=10) as c:
                    c.sendall(b"hello")
                    got = b""
                    while len(got) < 5:
                        chunk = c.recv(5 - len(got))
                        if not chunk:
                            break
                        got += chunk
                if got == b"hello":
                    self.ok += 1
                else:
                    self.failures.append(f"got {got!r}")
            except OSError as e:
                self.failures.append(repr(e))


@pytest.mark.parametrize("workers", [1, 2])
def test_reloads_refuse_no_connection(tmp_path, backend, workers):
    a, b = EchoServer(), EchoServer()
    path = tmp_path / "proxy.toml"
    path.write_text(CONFIG.format(workers=workers, backend=backend, port=0, upstream=a.addr))
    p = ProxyProcess([sys.executable, "-m", "uring_net", "--config", str(path)], "json")
    hammer = None
    try:
        port = p.port
        held = connect(p.listen_addr)           # open across every reload: drained, not cut
        held.sendall(b"first")
        assert held.recv(5) == b"first"
        hammer = Hammer(p.listen_addr)
        hammer.start()
        ups = [b, a, b]
        for i, up in enumerate(ups, start=1):
            path.write_text(CONFIG.format(workers=workers, backend=backend, port=port,
                                          upstream=up.addr))
            seen = hammer.ok
            p.send_signal(signal.SIGHUP)
            p.wait_for(lambda e, i=i: e["event"] == "reloaded" and e["generation"] == i, 20,
                       f"reloaded line {i}")
            p._wait_until(lambda s=seen: hammer.ok > s + 20 or None, 20,
                          lambda: f"the hammer made no progress after reload {i}")
        # New connections went to the last file's upstream.
        before = b.accepted
        p._wait_until(lambda: b.accepted > before + 5 or None, 20,
                      lambda: "no connection reached the reloaded upstream")
        # An invalid file: one line, and nothing changes.
        path.write_text("[[frontend]]\nlisten = 3\n")
        p.send_signal(signal.SIGHUP)
        bad = p.wait_for(lambda e: e["event"] == "reload_failed", 20, "reload_failed line")
        assert "listen" in bad["reason"] and bad["action"] == "running as before", bad
        seen = hammer.ok
        p._wait_until(lambda: hammer.ok > seen + 20 or None, 20,
                      lambda: "no progress after the failed reload")
        hammer.halt.set()
        hammer.join(20)
        assert hammer.failures == [], hammer.failures[:5]
        assert hammer.ok > 100
        held.sendall(b"still")                  # the first generation still serves it
        assert held.recv(5) == b"still"
        held.close()
        assert p.stop() == 0
        stopped = [e for e in p.lines if e["event"] == "stopped"]
        assert sum(e["connections"] for e in stopped) == hammer.ok + 1, stopped
        assert not p.problems(), p.problems()
    finally:
        if hammer is not None:
            hammer.halt.set()
        if p.returncode is None:
            p.kill()
        errors = a.close() + b.close()
        assert not errors, errors


@pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"])
@pytest.mark.parametrize("mode", ["copy"])
def test_sighup_without_a_config_file_changes_nothing(proxy, echo_server):
    p = proxy(echo_server.addr, log_format="json")
    p.send_signal(signal.SIGHUP)
    line = p.wait_for(lambda e: e["event"] == "reload", 10, "reload line")
    assert line["result"] == "nothing to do", line
    with connect(p.listen_addr) as c:
        c.sendall(b"x")
        assert c.recv(1) == b"x"
