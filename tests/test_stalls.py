"""Stalled flows: a direction paused by backpressure must neither starve other flows
nor hide a reset.

A flow whose reader does not read makes the proxy stop reading its writer (the
``--max-inflight`` bound, or an empty buffer pool); that is backpressure, and it must
stay a property of that one flow:

- Fresh flows are served while many stalled downloads are held (the buffer pool is
  shared, so stalled flows must not be able to pin all of it).
- A peer that resets while its own direction is paused (the proxy holds no recv on
  its socket) is still noticed, the other side is reset, and the flow's close line
  comes at once, not when the other peer happens to read again.
- The same holds with zero-copy sends whose notifications are still owed.

How a test knows a flow is stalled: its sender uses a non-blocking socket and keeps
sending until a send meets EAGAIN and the socket then stays unwritable for ``QUIET``
seconds (``push_until_stalled``). A transient EAGAIN, while the proxy is still catching
up, is not a stall. Should the proxy be descheduled for that long on a loaded machine,
the test resets a flow that was not paused yet, which can only make a broken proxy
pass, never a correct one fail.
"""
from __future__ import annotations

import selectors
import socket
import threading
import time

import pytest

from netutil import (BULK, BgThread, Pattern, Verifier, connect, expect_closed,
                     expect_reset, fmt_addr, reset_close, stop_selector_thread)

KiB = 1 << 10
MiB = 1 << 20

QUIET = 1.0          # a socket unwritable this long after EAGAIN is stalled
CHUNK = 64 * KiB     # one non-blocking send


def stopped_line(p) -> dict:
    """Stop the proxy (SIGTERM) and return its ``stopped`` line."""
    rc = p.stop()
    assert rc == 0, f"proxy exited with status {rc}; stderr:\n{p._tail()}"
    st = [e for e in p.lines if e["event"] == "stopped"]
    assert st, f"no 'stopped' line; stderr:\n{p._tail()}"
    return st[-1]


def close_line(p, addr: str, timeout: float, context: str) -> dict:
    """The close line for client ``addr`` within ``timeout`` s; the failure says what
    the test was waiting for."""
    try:
        return p.close_for(addr, timeout=timeout)
    except AssertionError as e:
        raise AssertionError(f"{context}: {e}") from None


def push_until_stalled(sock: socket.socket, seed: int, *, limit: int, what: str,
                       quiet: float = QUIET, timeout: float = 30.0) -> int:
    """Send Pattern(seed) on ``sock`` (made non-blocking) until the send has met EAGAIN
    and the socket then stayed unwritable for ``quiet`` seconds: the reader's side is
    paused. Returns the bytes sent. Sending ``limit`` bytes without a stall, or no
    stall within ``timeout``, fails."""
    sock.setblocking(False)
    pattern = Pattern(seed)
    sent = 0
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_WRITE)
        while sent < limit:
            try:
                sent += sock.send(pattern.slice(sent, min(CHUNK - sent % CHUNK, limit - sent)))
                continue
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{what}: still not stalled after {timeout} s "
                                     f"({sent} bytes sent): the reader's side keeps moving")
            if not sel.select(min(quiet, left)) and left >= quiet:
                return sent
    raise AssertionError(f"{what}: sent all {limit} bytes without the send blocking for "
                         f"{quiet} s: no backpressure through the proxy")


# --------------------------------------------------------------------------- test 1


class RoleUpstream:
    """An upstream whose connections pick a role with their first byte.

    b"P" (push): once ``n_push`` pushers have said so (so that every role byte went
    through the proxy before the pool could fill), send bytes as fast as the socket
    takes them, forever, never reading again. b"E" (echo): echo everything, and on EOF
    finish sending, shut down writing and close.

    ``all_stalled`` is set once every pusher's send has met EAGAIN and no pusher has
    moved a byte for ``quiet`` seconds: the proxy has stopped reading every one of
    them. One selector thread serves every connection."""

    PUSH, ECHO = b"P", b"E"

    class _Conn:
        __slots__ = ("sock", "role", "pending", "eof", "eagain")

        def __init__(self, sock):
            self.sock, self.role, self.pending = sock, None, bytearray()
            self.eof = self.eagain = False

    def __init__(self, n_push: int, quiet: float = QUIET):
        self.n_push, self.quiet = n_push, quiet
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.sock.setblocking(False)
        self.addr = fmt_addr(self.sock.getsockname())
        self.chunk = Pattern(0x5157).slice(0, CHUNK)
        self.errors: list[str] = []
        self.accepted = 0
        self.pushers = 0          # role bytes b"P" seen
        self.pushers_eagain = 0   # pushers whose send met EAGAIN at least once
        self.pushed = 0
        self.push_ends = 0        # pushers the proxy reset or closed
        self.echo_done = 0        # echo connections that ended with EOF, all sent back
        self.no_role = 0          # connections that ended before their role byte
        self.all_stalled = threading.Event()
        self._held: list = []     # pushers waiting for the others' role bytes
        self._last_push = time.monotonic()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self.sock, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"roles-{self.addr}")
        self._thread.start()

    def progress(self) -> str:
        return (f"{self.accepted} upstream connections accepted, {self.pushers} of "
                f"{self.n_push} pushers started, {self.pushers_eagain} met EAGAIN, "
                f"{self.pushed} bytes pushed, last push "
                f"{time.monotonic() - self._last_push:.1f} s ago")

    def _drop(self, c):
        try:
            self._sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()

    def _on_role(self, c):
        try:
            role = c.sock.recv(1)
        except (ConnectionResetError, BrokenPipeError):
            role = b""
        if not role:
            self.no_role += 1
            self._drop(c)
        elif role == self.ECHO:
            c.role = role
        elif role == self.PUSH:
            c.role = role
            self.pushers += 1
            self._sel.unregister(c.sock)
            self._held.append(c)
            if self.pushers == self.n_push:
                for h in self._held:
                    self._sel.register(h.sock, selectors.EVENT_WRITE, h)
                self._held.clear()
        else:
            self.errors.append(f"unknown role byte {role!r}")
            self._drop(c)

    def _on_push(self, c):
        # Until EAGAIN: a socket can take bytes while poll() already calls it
        # unwritable, so stopping short could leave it waiting for an event that
        # never comes, stalled without a recorded EAGAIN. (Bounded all the same.)
        for _ in range(4096):
            try:
                n = c.sock.send(self.chunk)
            except BlockingIOError:
                if not c.eagain:
                    c.eagain = True
                    self.pushers_eagain += 1
                return
            except (ConnectionResetError, BrokenPipeError):
                self.push_ends += 1
                self._drop(c)
                return
            self.pushed += n
            self._last_push = time.monotonic()

    def _on_echo(self, c, mask):
        try:
            if mask & selectors.EVENT_READ and not c.eof:
                data = c.sock.recv(256 * KiB)
                if data:
                    c.pending += data
                else:
                    c.eof = True
            if c.pending:
                try:
                    del c.pending[:c.sock.send(c.pending)]
                except BlockingIOError:
                    pass
        except (ConnectionResetError, BrokenPipeError):
            self._drop(c)
            return
        ev = 0 if c.eof or len(c.pending) > BULK else selectors.EVENT_READ
        if c.pending:
            ev |= selectors.EVENT_WRITE
        if ev:
            self._sel.modify(c.sock, ev, c)
            return
        try:
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.echo_done += 1
        self._drop(c)

    def _loop(self):
        try:
            while not self._stop:
                for key, mask in self._sel.select(0.1):
                    if key.data == "wake":
                        return
                    if key.data == "accept":
                        for _ in range(64):
                            try:
                                s, _peer = self.sock.accept()
                            except BlockingIOError:
                                break
                            s.setblocking(False)
                            self.accepted += 1
                            self._sel.register(s, selectors.EVENT_READ, self._Conn(s))
                        continue
                    c = key.data
                    if c.role is None:
                        self._on_role(c)
                    elif c.role == self.PUSH:
                        self._on_push(c)
                    else:
                        self._on_echo(c, mask)
                if (not self.all_stalled.is_set() and self.pushers_eagain == self.n_push
                        and time.monotonic() - self._last_push >= self.quiet):
                    self.all_stalled.set()
        except Exception as e:  # reported by close(), never lost
            self.errors.append(f"upstream loop: {e!r}")

    def close(self) -> list[str]:
        stop_selector_thread(self, "role upstream")
        for c in self._held:      # pushers not yet registered with the selector
            c.sock.close()
        return self.errors


def serve_fresh_flows(addr: str, n: int, size: int, seed_base: int, budget: float):
    """Open ``n`` clients at once; each sends b"E" + Pattern(seed) and must get the
    ``size`` pattern bytes back, byte-exact, within ``budget`` seconds of the start.

    Returns (sockets, client addresses, status): status[i] is the seconds flow i took,
    or a string saying how far it got."""
    socks, addrs = [], []
    try:
        for _ in range(n):
            s = connect(addr)
            socks.append(s)
            addrs.append(fmt_addr(s.getsockname()))
    except BaseException:
        for s in socks:
            s.close()
        raise
    out = [b"E" + Pattern(seed_base + i).slice(0, size) for i in range(n)]
    sent = [0] * n
    vs = [Verifier(seed_base + i, size, f"fresh flow {i} echo") for i in range(n)]
    status: list = [None] * n
    t0 = time.monotonic()
    deadline = t0 + budget
    try:
        _drive_fresh(socks, out, sent, vs, status, size, t0, deadline)
    except BaseException:
        for s in socks:
            s.close()
        raise
    for i in range(n):
        if status[i] is None:
            status[i] = (f"{vs[i].received} of {size} bytes back after {budget} s "
                         f"({sent[i]} of {len(out[i])} sent)")
        socks[i].setblocking(True)
        socks[i].settimeout(10)
    return socks, addrs, status


def _drive_fresh(socks, out, sent, vs, status, size, t0, deadline):
    n = len(socks)
    with selectors.DefaultSelector() as sel:
        for i, s in enumerate(socks):
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, i)
        pending = n
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, mask in sel.select(min(0.2, left)):
                i, s = key.data, key.fileobj
                try:
                    if mask & selectors.EVENT_WRITE and sent[i] < len(out[i]):
                        try:
                            sent[i] += s.send(out[i][sent[i]:])
                        except BlockingIOError:
                            pass
                    if mask & selectors.EVENT_READ:
                        try:
                            data = s.recv(256 * KiB)
                        except BlockingIOError:
                            data = None
                        if data == b"":
                            status[i] = f"EOF after {vs[i].received} of {size} bytes"
                        elif data:
                            vs[i].feed(data)  # raises on a wrong byte
                            if vs[i].complete:
                                status[i] = time.monotonic() - t0
                except (ConnectionResetError, BrokenPipeError):
                    status[i] = f"reset after {vs[i].received} of {size} bytes"
                if status[i] is not None:
                    sel.unregister(s)
                    pending -= 1
                elif sent[i] == len(out[i]):
                    sel.modify(s, selectors.EVENT_READ, i)


N_STALLED = 200
N_FRESH = 20
FRESH_SIZE = 32 * KiB
FRESH_BUDGET = 5.0


@pytest.mark.time_limit(150)
@pytest.mark.epoll_modes("copy")    # the stall tests' tier: see tests 2 and 3 below
def test_stalled_downloads_do_not_starve_fresh_flows(proxy):
    """200 downloads whose clients never read hold the proxy: each upstream pushes until
    its send blocks for good. 20 fresh echo flows of 32 KiB must each be served within
    5 s all the same. Then every flow ends and is logged, and the proxy stops clean."""
    srv = RoleUpstream(N_STALLED)
    stalled: list[socket.socket] = []
    stalled_addrs: list[str] = []
    fresh: list[socket.socket] = []
    fresh_addrs: list[str] = []
    server_errors: list[str] = []
    try:
        p = proxy(srv.addr)
        for _ in range(N_STALLED):
            s = connect(p.listen_addr)
            stalled.append(s)
            stalled_addrs.append(fmt_addr(s.getsockname()))
            s.sendall(RoleUpstream.PUSH)
        if not srv.all_stalled.wait(30):
            raise AssertionError(f"the {N_STALLED} downloads did not all stall within 30 s: "
                                 f"{srv.progress()}")
        fresh, fresh_addrs, status = serve_fresh_flows(
            p.listen_addr, N_FRESH, FRESH_SIZE, 0xF000, FRESH_BUDGET)
        served = [t for t in status if isinstance(t, float)]
        starved = [f"flow {i}: {t}" for i, t in enumerate(status) if not isinstance(t, float)]
        assert not starved, (
            f"{len(served)} of {N_FRESH} fresh flows were served within {FRESH_BUDGET} s "
            f"({sum(t <= 2.0 for t in served)} within 2 s) while {N_STALLED} stalled "
            f"downloads were held ({srv.progress()}); not served: {starved[:5]}")
        for s in fresh:
            s.shutdown(socket.SHUT_WR)
        for i, s in enumerate(fresh):
            assert expect_closed(s, 10) == "eof", f"fresh flow {i}"
    finally:
        # The stalled clients close with unread bytes: the kernel sends RST.
        for s in stalled + fresh:
            s.close()
        server_errors = srv.close()
    assert not server_errors, server_errors
    closes = p.wait_for_close(N_STALLED + N_FRESH, 30)
    by_client = {e["client"]: e for e in closes}
    missing = [a for a in stalled_addrs + fresh_addrs if a not in by_client]
    assert not missing, f"{len(missing)} flows without a close line, e.g. {missing[:3]}"
    causes = {e["cause"] for e in closes}
    assert causes <= {"normal", "client_reset", "upstream_reset"}, \
        sorted((e["cause"], e["client"]) for e in closes if e["cause"] not in
               {"normal", "client_reset", "upstream_reset"})[:5]
    st = stopped_line(p)
    assert (st.get("active"), st.get("buffers_out")) == (0, 0), st


N_SILENT = 2000


@pytest.mark.parametrize("mode,disabled_features", [("copy", "")], ids=["copy"])
@pytest.mark.time_limit(120)
def test_departing_clients_are_closed_while_downloads_stall(proxy):
    """64 stalled downloads hold the proxy, and 2,000 clients that never said a word
    leave (FIN) at once, while nobody reads the proxy's stderr (a stuck log shipper: the
    pipe fills after a few hundred close lines). Every departure must still go through:
    the FIN reaches the upstream, which closes, and the client sees EOF, within 20 s.
    A fresh flow is served, and once stderr is read again every close line is there."""
    srv = RoleUpstream(64)
    stalled: list[socket.socket] = []
    silent: list[socket.socket] = []
    fresh: list[socket.socket] = []
    p = None
    try:
        p = proxy(srv.addr)
        for _ in range(64):
            s = connect(p.listen_addr)
            stalled.append(s)
            s.sendall(RoleUpstream.PUSH)
        if not srv.all_stalled.wait(30):
            raise AssertionError(f"the 64 downloads did not all stall within 30 s: {srv.progress()}")
        p.hold_stderr()
        silent = [connect(p.listen_addr) for _ in range(N_SILENT)]
        for s in silent:
            s.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 20
        for i, s in enumerate(silent):
            left = deadline - time.monotonic()
            try:
                how = expect_closed(s, max(left, 0.01))
            except AssertionError as e:
                raise AssertionError(
                    f"silent client {i} of {N_SILENT} left but its flow was not closed "
                    f"within 20 s ({srv.no_role} upstreams saw the FIN): {e}") from None
            assert how == "eof", f"silent client {i}: {how}"
        fresh, _addrs, status = serve_fresh_flows(p.listen_addr, 5, FRESH_SIZE, 0xF100, FRESH_BUDGET)
        assert all(isinstance(t, float) for t in status), status
        p.release_stderr()
        closes = p.wait_for_close(N_SILENT, 30)
        assert not [e for e in p.lines if e["event"] == "log_dropped"], p._tail()
        assert len(closes) >= N_SILENT, len(closes)
    finally:
        if p is not None:
            p.release_stderr()
        for s in stalled + silent + fresh:
            s.close()
        server_errors = srv.close()
    assert not server_errors, server_errors
    st = stopped_line(p)
    assert (st.get("active"), st.get("buffers_out")) == (0, 0), st


# --------------------------------------------------------------------------- tests 2, 3


# Tier: io_uring runs these stalls in every mode; the epoll driver, in copy mode
# only in make test (every mode in make test-full), to keep make test inside its
# time budget.
@pytest.mark.epoll_modes("copy")
def test_client_reset_while_upstream_stalls(proxy, upstream):
    """The upstream does not read, so the proxy's client->upstream direction is paused;
    then the client resets. The proxy must notice at once (close line client_reset/CD
    within 10 s) and reset the upstream, which, reading at last, gets a correct prefix
    of the stream and then ECONNRESET, not EOF."""
    srv = upstream()
    p = proxy(srv.addr)
    go = threading.Event()
    seed = 0x2121
    pushed = [0]

    def server(conn):
        if not go.wait(60):
            raise AssertionError("upstream was never told to read")
        v = Verifier(seed, pushed[0], "upstream")
        expect_reset(conn, 10, v)
        return v.received

    fut = srv.serve_next(server)
    c = connect(p.listen_addr)
    try:
        addr = fmt_addr(c.getsockname())
        pushed[0] = push_until_stalled(c, seed, limit=256 * MiB, what="client")
        reset_close(c)
        close = close_line(p, addr, 10, f"the client reset after {pushed[0]} bytes, with the "
                           "proxy's client->upstream direction paused (the upstream not "
                           "reading yet)")
        assert (close["cause"], close["term"]) == ("client_reset", "CD"), close
        go.set()
        got = fut.result(30)
        assert close["bytes_c2u"] <= pushed[0], (got, pushed[0], close)
    finally:
        go.set()
        c.close()


@pytest.mark.epoll_modes("copy")
def test_upstream_reset_while_client_stalls(proxy, upstream):
    """The mirror: the client does not read, so the proxy's upstream->client direction
    is paused; then the upstream resets. Close line upstream_reset/SD within 10 s; the
    client, reading at last, gets a correct prefix and then ECONNRESET, not EOF."""
    srv = upstream()
    p = proxy(srv.addr)
    seed = 0x3131

    def server(conn):
        n = push_until_stalled(conn, seed, limit=256 * MiB, what="upstream")
        reset_close(conn)
        return n

    fut = srv.serve_next(server)
    c = connect(p.listen_addr)
    try:
        addr = fmt_addr(c.getsockname())
        pushed = fut.result(60)
        close = close_line(p, addr, 10, f"the upstream reset after {pushed} bytes, with the "
                           "proxy's upstream->client direction paused (the client not "
                           "reading yet)")
        assert (close["cause"], close["term"]) == ("upstream_reset", "SD"), close
        v = Verifier(seed, pushed, "client")
        expect_reset(c, 10, v)
        assert close["bytes_u2c"] <= pushed, (v.received, pushed, close)
    finally:
        c.close()


# --------------------------------------------------------------------------- test 4

N_ZC = 8
# A pool of 128 MiB. With the default 32 MiB the upstream->client directions of eight
# stalled flows (each may read well past --max-inflight while its recv cancel is on
# its way: bundles, incremental buffers) can empty the pool; a flow whose
# client->upstream direction then stalls on ENOBUFS has nothing unsent toward the
# upstream, so no notification owed, and the test would reach its point only now and
# then (about one run in three on the build this was written against; with 64 MiB,
# 4 to 8 of the 8 flows; with 128 MiB, 8 of 8). Where RLIMIT_MEMLOCK refuses to
# register that much, the proxy says so and sends zero-copy from plain addresses.
ZC_BUFFERS = 2048


def unacked_toward(port: int) -> list[int]:
    """Bytes written but not yet acknowledged (sent or not), per established IPv4
    TCP socket on this host whose peer port is ``port`` (/proc/net/tcp tx_queue)."""
    out = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[3] == "01" and int(fields[2].rpartition(":")[2], 16) == port:
                out.append(int(fields[4].partition(":")[0], 16))
    return out


@pytest.mark.parametrize("mode", ["zerocopy"])
def test_resets_with_zero_copy_notifications_owed(proxy, echo_server):
    """8 clients send to the echo upstream without reading the echo, until both
    directions of every flow are stalled with zero-copy sends outstanding (checked: the
    proxy's sockets to the upstream hold unacknowledged bytes, whose notifications the
    kernel gives only once they are acknowledged or dropped); then all 8 reset. Each flow must be logged (client_reset) within 20 s, and at stop every
    notification must have come and every buffer be back."""
    p = proxy(echo_server.addr, "--buffers", str(ZC_BUFFERS))
    socks: list[socket.socket] = []
    try:
        for _ in range(N_ZC):
            socks.append(connect(p.listen_addr))
        addrs = [fmt_addr(s.getsockname()) for s in socks]
        pushers = [BgThread(push_until_stalled, s, 0x4000 + i, limit=256 * MiB,
                            what=f"client {i}", timeout=60, name=f"push{i}")
                   for i, s in enumerate(socks)]
        for t in pushers:
            t.start()
        for t in pushers:      # every thread is done before any failure is raised
            t.join(90)
        for t in pushers:
            t.result(0)
        # Only the proxy connects to this echo server.
        owed = unacked_toward(int(echo_server.addr.rpartition(":")[2]))
        # One flow with notifications owed is enough to show the bug; ask for half,
        # so that the test keeps its point without depending on every flow's timing.
        assert len(owed) == N_ZC and sum(map(bool, owed)) >= N_ZC // 2, (
            f"scenario not reached: unacknowledged bytes on the proxy's {len(owed)} "
            f"upstream sockets {owed}; expected {N_ZC} sockets, at least {N_ZC // 2} "
            f"holding some")
        for s in socks:
            reset_close(s)
        deadline = time.monotonic() + 20
        closes, missing = [], []
        for a in addrs:
            try:
                closes.append(p.close_for(a, timeout=max(0.1, deadline - time.monotonic())))
            except AssertionError:
                missing.append(a)
        assert not missing, (
            f"{len(closes)} of {N_ZC} flows logged within 20 s of their clients' resets; "
            f"none for {missing} (unacknowledged bytes toward the upstream at the reset, "
            f"per flow: {owed}); stderr:\n{p._tail(12)}")
        wrong = [e for e in closes if e["cause"] != "client_reset"]
        assert not wrong, wrong
    finally:
        for s in socks:
            s.close()
    st = stopped_line(p)
    assert (st.get("active"), st.get("buffers_out")) == (0, 0), st
    assert st["zc_sends"] > 0 and st["zc_sends"] == st["zc_notifs"], st
