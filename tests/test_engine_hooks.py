"""The dispatcher's defences, driven in-process through the engine's test hooks.

Conditions the kernel should never produce -- a completion whose user_data names no
operation, a recv completion naming a buffer that is not the ring's head entry -- and
accept errors a test cannot provoke on loopback are injected as CQEs into a real engine
serving a real connection, on both backends. What must hold: an unknown CQE is counted
and dropped without touching the flow's in-flight count (its fds stay open under the
operations that use them); a ring-order mismatch resets the flow and forwards nothing
from the suspect buffer; an unexpected accept error pauses accepting with a growing
backoff instead of re-arming at once.
"""
import errno
import socket
import time

import pytest

from netutil import EchoServer
from uring_net.config import MODES
from uring_net.engine_config import EngineConfig

F_BUFFER, F_MORE, BUFFER_SHIFT = 1, 2, 16       # IORING_CQE_F_*, include/uapi/linux/io_uring.h
F_OPEN = 2                                       # FlowState in cython/engine.pxd


class InProcess:
    """An Engine on `backend` in front of an echo server, run from this thread."""

    def __init__(self, backend: str):
        from uring_net import _core
        self.echo = EchoServer()
        driver = _core.Epoll() if backend == "epoll" else _core.Ring()
        self.eng = _core.Engine(driver, EngineConfig(max_conns=8, buffers=8, buffer_size=4096,
                                                     max_inflight=65536, connect_timeout=5))
        host, port = self.echo.addr.rsplit(":", 1)
        self.eng.add_upstream(socket.AF_INET, host, int(port))
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.eng.add_listener(self.lsock.fileno(), socket.AF_INET)
        self.closed = []
        self.events = []          # every record the engine pushed (closes too)

    def drain(self):
        ev = self.eng.drain_events()
        self.events += ev
        self.closed += [e for e in ev if e["event"] == "close"]

    def run_until(self, cond, what: str, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
            self.eng.run(0.02)
            self.drain()

    def open_flow(self) -> socket.socket:
        c = socket.create_connection(self.lsock.getsockname(), timeout=5)
        c.setblocking(False)
        self.run_until(lambda: self.eng.active == 1 and self.eng._test_flow(0)["state"] == F_OPEN,
                       "the flow is open")
        self.echo_round(c, b"hello")
        return c

    def echo_round(self, c: socket.socket, data: bytes):
        c.sendall(data)
        got = bytearray()

        def have():
            try:
                got.extend(c.recv(65536))
            except BlockingIOError:
                pass
            return len(got) >= len(data)
        self.run_until(have, "the echo")
        assert bytes(got) == data

    def close(self):
        self.eng.stop()
        self.run_until(lambda: self.eng.active == 0, "every flow closed")
        self.eng = None
        self.lsock.close()
        assert not self.echo.close()


@pytest.fixture(params=["uring", "epoll"])
def engine(request):
    e = InProcess(request.param)
    yield e
    e.close()


@pytest.mark.parametrize("op", ["unknown", "foreign"])
def test_unknown_op_is_counted_and_dropped(engine, op):
    """An op code no SQE carries, or a CQE another owner of the ring prepared (a recv
    of this very flow's slot and generation, with res 0, which the flow would take
    for the client's FIN): counted, reported once, and the flow never sees it."""
    c = engine.open_flow()
    with c:
        before = engine.eng._test_flow(0)["inflight"]
        engine.eng._test_inject_cqe(0, op, 0, 0, 0)
        assert engine.eng.stats()["unknown_cqes"] == 1
        engine.drain()
        assert {"event": "engine_error", "kind": "unknown_cqes", "times": 1} in engine.events
        assert engine.eng._test_flow(0)["inflight"] == before
        engine.echo_round(c, b"still served after the stray completion")
        c.shutdown(socket.SHUT_WR)
        engine.run_until(lambda: engine.closed, "the close record")
    assert engine.closed[0]["cause"] == "normal", engine.closed


def test_ring_order_mismatch_resets_the_flow(engine):
    c = engine.open_flow()
    with c:
        head = engine.eng._test_flow(0)["head_bid"]
        wrong = (head + 1) % 8
        # A recv completion for the client direction naming a buffer that is not the
        # ring's head entry; F_MORE as a multishot recv would post it, so the real recv
        # still in flight keeps its place in the flow's in-flight count.
        engine.eng._test_inject_cqe(0, "recv", 0, 5, F_BUFFER | F_MORE | (wrong << BUFFER_SHIFT))
        assert engine.eng.stats()["ring_order_errors"] == 1
        engine.drain()
        assert {"event": "engine_error", "kind": "ring_order_errors", "times": 1} in engine.events
        engine.run_until(lambda: engine.closed, "the close record")
        rec = engine.closed[0]
        assert rec["cause"] == "resource" and rec["errno"] == errno.EPROTO, rec
        # Nothing from the suspect buffer went anywhere: the client gets the reset and
        # no byte (the echo upstream would have sent any forwarded byte back).
        c.setblocking(True)
        c.settimeout(5)
        with pytest.raises(ConnectionResetError):
            data = c.recv(65536)
            assert not data, f"bytes from the suspect buffer reached the client: {data!r}"
            c.recv(65536)


def test_unexpected_accept_errors_back_off(engine):
    for want_ms in (100, 200, 400):
        engine.eng._test_inject_cqe(0, "accept", 0, -errno.EPERM, F_MORE)
        ev = engine.eng.drain_events()
        assert ev == [{"event": "accept_paused", "errno": errno.EPERM, "pause_ms": want_ms,
                       "times": 1}], ev
    assert engine.eng.stats()["accept_errors"] == 3
    # The pause ends by itself and the engine accepts again; a success resets the backoff.
    c = engine.open_flow()
    c.close()
    engine.eng._test_inject_cqe(0, "accept", 0, -errno.EPERM, F_MORE)
    assert [e["pause_ms"] for e in engine.eng.drain_events() if e["event"] == "accept_paused"] == [100]


def test_engine_config_is_one_mode_and_refuses_what_cannot_run():
    """The engine takes one mode, not a switch per data path; a configuration the
    engine could not run as asked is refused before any engine exists."""
    from uring_net import _core
    assert set(_core.MODE_CODES) == set(MODES)
    with pytest.raises(ValueError, match="mode must be one of"):
        EngineConfig(mode="turbo")
    with pytest.raises(ValueError, match="pipe size"):
        EngineConfig(mode="splice")
    with pytest.raises(ValueError, match="zero-copy"):
        EngineConfig(mode="zerocopy", registered_buffers=True)
