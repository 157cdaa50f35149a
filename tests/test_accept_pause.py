"""Out of fds: accept pauses instead of spinning, and recovers when fds come back.

The proxy's own RLIMIT_NOFILE is lowered with prlimit(2) once it is idle, so that exactly
three flows fit (two fds each: in splice mode the pipes come from the pool filled at
start-up). Further clients stay in the listen backlog: accept fails
with EMFILE, the proxy logs one accept_paused event, retries every 100 ms (CPU near
zero, no busy loop), and serves the waiting clients as soon as flows close.
"""
import os
import resource
import time

import pytest

from netutil import Pattern, connect, recv_exact, Verifier

FLOWS_THAT_FIT = 3


N = 4096


def echo_once(sock, seed: int) -> None:
    sock.sendall(Pattern(seed).slice(0, N))
    recv_exact(sock, Verifier(seed, N), N)


def close_cleanly(sock) -> None:
    sock.shutdown(1)
    assert sock.recv(1) == b"", "expected EOF after the echo"
    sock.close()


# Mode-independent: accept pause and fd wait queue are shared; backends x accept paths still run.
@pytest.mark.parametrize("mode", ["copy"])
def test_emfile_pauses_accept_then_recovers(proxy, echo_server):
    p = proxy(echo_server.addr, log_format="json")
    pid = p.proc.pid
    highest_fd = max(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
    limit = highest_fd + 1 + 2 * FLOWS_THAT_FIT
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))

    served = [connect(p.listen_addr) for _ in range(FLOWS_THAT_FIT)]
    for i, s in enumerate(served):
        echo_once(s, seed=i)

    waiting = [connect(p.listen_addr) for _ in range(FLOWS_THAT_FIT)]
    for i, s in enumerate(waiting):
        s.sendall(Pattern(100 + i).slice(0, N))   # queued in the kernel, unanswered for now
    p.wait_for(lambda e: e["event"] == "accept_paused", 5, "accept_paused event")
    ev = [e for e in p.lines if e["event"] == "accept_paused"][0]
    assert ev["reason"] in ("EMFILE", "ENFILE"), ev

    # Paused, the proxy must sleep: a spin on accept would burn a whole core here.
    cpu0, t0 = p.cpu_seconds(), time.monotonic()
    time.sleep(1.0)
    cpu_used = p.cpu_seconds() - cpu0
    assert cpu_used < 0.15, f"{cpu_used:.2f} s of CPU in {time.monotonic() - t0:.1f} s while paused"
    for s in waiting:
        s.settimeout(0.2)
        try:
            data = s.recv(1)
        except TimeoutError:
            data = None
        assert data is None, "a client was served although no fd was free"
        s.settimeout(10)

    for s in served:
        close_cleanly(s)
    for i, s in enumerate(waiting):
        recv_exact(s, Verifier(100 + i, N), N)   # served once fds came back
        close_cleanly(s)
    closes = p.wait_for_close(2 * FLOWS_THAT_FIT, 10)
    assert [c["cause"] for c in closes] == ["normal"] * (2 * FLOWS_THAT_FIT), closes
