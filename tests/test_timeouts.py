"""Every flow ends: idle and half-closed timeouts, TCP keep-alive, drain on SIGTERM.

A flow that nothing ends -- a peer that vanished, a half-close nobody finishes -- would
hold its slot, fds and buffers for ever; the timeouts end it with an RST to both sides
and a close line naming the timeout. On SIGTERM the proxy stops accepting, lets open
flows finish for --drain-timeout, and then resets the rest: a stream it cuts must never
look complete to either peer.
"""
import ctypes
import errno
import os
import select
import signal
import socket
import threading

import pytest

from netutil import (BgThread, Pattern, Verifier, connect, expect_reset, fmt_addr, recv_exact,
                     recv_stream, send_stream)

MiB = 1 << 20


def stream_until(sock: socket.socket, stop: threading.Event, seed: int) -> int:
    """Keep bytes moving through an echo flow until ``stop``: send a block, read its echo."""
    pattern, v, sent = Pattern(seed), Verifier(seed, 1 << 40, "active flow echo"), 0
    while not stop.is_set():
        block = pattern.slice(sent, 4096)
        sock.sendall(block)
        recv_exact(sock, v, len(block))
        sent += len(block)
    return sent


def expect_reset_after_fin(sock: socket.socket, timeout: float) -> None:
    """A socket that already read the peer's FIN reports a later RST as EOF on recv (the
    FIN is what recv sees first), so wait for the error itself: POLLERR, then SO_ERROR."""
    po = select.poll()
    po.register(sock, select.POLLERR)
    assert po.poll(timeout * 1000), f"no reset within {timeout} s"
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    assert err in (errno.ECONNRESET, errno.EPIPE), f"SO_ERROR {errno.errorcode.get(err, err)}"


def test_idle_timeout_ends_idle_flows_and_spares_active_ones(proxy, echo_server):
    """--idle-timeout 0.5: a flow in which nothing moves is reset on both sides after about
    half a second (cause idle_timeout, term cD); a flow that keeps moving bytes all that
    time is untouched and still echoes afterwards. Every variant: each data path stamps
    its own operations (recv, send, SEND_ZC, splice, peek) as activity."""
    p = proxy(echo_server.addr, "--idle-timeout", "0.5")
    with connect(p.listen_addr) as idle, connect(p.listen_addr) as active:
        idle_addr = fmt_addr(idle.getsockname())
        active_addr = fmt_addr(active.getsockname())
        send_stream(idle, 1, 1000, shutdown=False)
        recv_exact(idle, Verifier(1, 1000, "idle flow echo"), 1000)
        stop = threading.Event()
        mover = BgThread(stream_until, active, stop, 2, name="active-flow")
        mover.start()
        try:
            close = p.close_for(idle_addr, timeout=10)
        finally:
            stop.set()
            moved = mover.result(20)
        assert close["cause"] == "idle_timeout" and close["term"] == "cD", close
        assert close["duration_ms"] >= 500, close
        assert (close["bytes_c2u"], close["bytes_u2c"]) == (1000, 1000), close
        expect_reset(idle, 5)
        assert moved > 0
        # The active flow was spared: it is still open and still echoes.
        assert not [e for e in p.closes() if e["client"] == active_addr], p.closes()
        send_stream(active, 3, 5000, shutdown=True)
        recv_stream(active, 3, 5000, what="active flow, after the idle one timed out")
    close = p.close_for(active_addr, timeout=10)
    assert close["cause"] == "normal", close


# A FIN reaches the wheel from the recv path (copy, zerocopy, auto, peek share it) or
# the splice path: one mode of each.
@pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"])
@pytest.mark.parametrize("mode", ["copy", "splice"])
def test_client_fin_timeout(proxy, upstream):
    """The client sends its FIN; the upstream reads to the end and then neither answers nor
    closes. --client-fin-timeout 0.5 ends the flow (cause client_fin_timeout, term cD) with
    a reset on both sides, long before the default hour of --idle-timeout."""
    srv = upstream()
    release = threading.Event()

    def server(conn):
        v = Verifier(11, 3000, "upstream")
        while True:
            data = conn.recv(65536)
            if not data:
                break
            v.feed(data)
        v.at_eof()
        release.wait(30)
        expect_reset_after_fin(conn, 10)     # it read the client's FIN

    fut = srv.serve_next(server)
    p = proxy(srv.addr, "--client-fin-timeout", "0.5")
    try:
        with connect(p.listen_addr) as c:
            addr = fmt_addr(c.getsockname())
            send_stream(c, 11, 3000, shutdown=True)
            close = p.close_for(addr, timeout=10)
            assert close["cause"] == "client_fin_timeout" and close["term"] == "cD", close
            assert close["duration_ms"] >= 500, close
            expect_reset(c, 5)
    finally:
        release.set()
    fut.result(20)


@pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"])
@pytest.mark.parametrize("mode", ["copy", "splice"])
def test_server_fin_timeout(proxy, upstream):
    """The mirror: the upstream sends its bytes and its FIN; the client never finishes its
    own direction. --server-fin-timeout 0.5 ends the flow (server_fin_timeout, term sD)."""
    srv = upstream()
    done = threading.Event()

    def server(conn):
        send_stream(conn, 12, 3000, shutdown=True)
        done.wait(30)
        return expect_reset(conn, 10)        # it never read a FIN

    fut = srv.serve_next(server)
    p = proxy(srv.addr, "--server-fin-timeout", "0.5")
    try:
        with connect(p.listen_addr) as c:
            addr = fmt_addr(c.getsockname())
            recv_stream(c, 12, 3000, what="client")      # ends with the upstream's FIN
            close = p.close_for(addr, timeout=10)
            assert close["cause"] == "server_fin_timeout" and close["term"] == "sD", close
            assert close["duration_ms"] >= 500, close
            expect_reset_after_fin(c, 5)
    finally:
        done.set()
    fut.result(20)


# --------------------------------------------------------------------------- keep-alive

_SYS_pidfd_getfd = 438          # x86_64 and the generic table alike
_libc = ctypes.CDLL(None, use_errno=True)


def proxy_sockets(pid: int) -> list[socket.socket]:
    """Duplicates of the proxy's connected TCP sockets (pidfd_getfd, Linux 5.6+)."""
    pidfd = os.pidfd_open(pid)
    out = []
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = _libc.syscall(_SYS_pidfd_getfd, pidfd, int(name), 0)
            if fd < 0:
                raise OSError(ctypes.get_errno(), f"pidfd_getfd: {os.strerror(ctypes.get_errno())}")
            s = socket.socket(fileno=fd)
            try:
                if s.type == socket.SOCK_STREAM and s.getpeername():
                    out.append(s)
                    continue
            except OSError:
                pass
            s.close()
    finally:
        os.close(pidfd)
    return out


# Mode-independent: keep-alive is set on the client at accept and the upstream at
# socket creation, the same code in every data path.
@pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"])
@pytest.mark.parametrize("mode", ["copy"])
@pytest.mark.parametrize("arg,want", [("7,3,4", (1, 7, 3, 4)), ("off", (0, None, None, None))])
def test_tcp_keepalive_on_both_sockets(proxy, echo_server, arg, want):
    """--tcp-keepalive IDLE,INTVL,CNT sets SO_KEEPALIVE and TCP_KEEPIDLE/INTVL/CNT on the
    client's and the upstream's socket (read back from the proxy's own fds); 'off' leaves
    keep-alive off."""
    p = proxy(echo_server.addr, "--tcp-keepalive", arg)
    with connect(p.listen_addr) as c:
        send_stream(c, 21, 100, shutdown=False)
        recv_exact(c, Verifier(21, 100, "echo"), 100)        # both sockets exist now
        client_port = c.getsockname()[1]
        up_port = int(echo_server.addr.rpartition(":")[2])
        socks = proxy_sockets(p.pid)
        try:
            by_peer = {s.getpeername()[1]: s for s in socks}
            assert client_port in by_peer and up_port in by_peer, \
                f"proxy sockets' peers: {sorted(by_peer)}; client {client_port}, upstream {up_port}"
            for side, port in (("client", client_port), ("upstream", up_port)):
                s = by_peer[port]
                ka = s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
                got = (1 if ka else 0,) + ((s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                                             s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                                             s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT))
                                            if ka else (None, None, None))
                assert got == want, f"{side} socket: keep-alive {got}, want {want}"
                # Nagle off on both too: the client's socket has it (and keep-alive)
                # from the listener, the upstream's from its own setsockopt.
                assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), f"{side} socket: Nagle on"
        finally:
            for s in socks:
                s.close()


# --------------------------------------------------------------------------- drain


# The drain itself is the same code in every mode; copy and splice cover both kinds of
# data path carrying on meanwhile.
@pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"])
@pytest.mark.parametrize("mode", ["copy", "splice"])
def test_drain_lets_a_transfer_in_flight_finish(proxy, upstream):
    """SIGTERM while 8 MiB is on its way each way, with --drain-timeout 30: the listener
    closes at once (a new client is refused), the transfer completes byte for byte with a
    normal close, and only then does the proxy exit, with nothing left behind."""
    srv = upstream()
    started = threading.Event()
    go_on = threading.Event()
    total = 8 * MiB

    def server(conn):
        v = Verifier(31, total, "upstream")
        recv_exact(conn, v, 65536)
        started.set()
        go_on.wait(30)
        sender = BgThread(send_stream, conn, 32, total, name="upstream-send")
        sender.start()
        while True:
            data = conn.recv(MiB)
            if not data:
                break
            v.feed(data)
        v.at_eof()
        sender.result(60)

    fut = srv.serve_next(server)
    p = proxy(srv.addr, "--drain-timeout", "30")
    with connect(p.listen_addr) as c:
        addr = fmt_addr(c.getsockname())
        sender = BgThread(send_stream, c, 31, total, name="client-send")
        sender.start()
        assert started.wait(20)
        p.send_signal(signal.SIGTERM)
        # The draining line comes once the listener is closed: a new client is refused.
        p.wait_for(lambda e: e["event"] == "draining", 10, "draining line")
        with pytest.raises(ConnectionRefusedError):
            connect(p.listen_addr, timeout=2).close()
        go_on.set()
        recv_stream(c, 32, total, what="client, while the proxy drains")
        sender.result(60)
    fut.result(60)
    assert p.wait_exit(30) == 0, p.stderr_text()
    close = p.close_for(addr, timeout=0)
    assert close["cause"] == "normal", close
    assert (close["bytes_c2u"], close["bytes_u2c"]) == (total, total), close
    st = [e for e in p.lines if e["event"] == "stopped"][-1]
    assert (st["active"], st["buffers_out"]) == (0, 0), st


def _stalled_flow(p, srv, hold: threading.Event):
    """A client that pushed until its socket was full towards an upstream that does not
    read: a flow the proxy cannot finish on its own."""
    got = {}

    def server(conn):
        hold.wait(30)
        got["upstream"] = expect_reset(conn, 20)

    fut = srv.serve_next(server)
    c = connect(p.listen_addr)
    c.setblocking(False)
    chunk = b"x" * 65536
    pushed = 0
    while pushed < 256 * MiB:
        try:
            pushed += c.send(chunk)
        except BlockingIOError:
            break
    c.setblocking(True)
    return c, fut, got


def test_stop_resets_a_flow_it_cuts(proxy, upstream):
    """A flow still mid-transfer when --drain-timeout (0.5) ends is reset on both sides,
    cause proxy_shutdown: its peers see ECONNRESET, never an EOF that would pass a
    truncated stream off as complete. The stopped line then shows active=0 buffers_out=0.
    Every variant: each mode resets its own way (zero-copy teardown, splice pipes)."""
    stop_resets(proxy, upstream, second_signal=False)


# How the drain ends is mode-independent; the reset itself is covered above.
@pytest.mark.parametrize("disabled_features", [""], ids=["allfeatures"])
@pytest.mark.parametrize("mode", ["copy"])
def test_second_signal_ends_the_drain_at_once(proxy, upstream):
    """With --drain-timeout 60, a second SIGTERM resets what is left at once."""
    stop_resets(proxy, upstream, second_signal=True)


def stop_resets(proxy, upstream, second_signal: bool):
    srv = upstream()
    hold = threading.Event()
    p = proxy(srv.addr, "--drain-timeout", "60" if second_signal else "0.5")
    c, fut, got = _stalled_flow(p, srv, hold)
    with c:
        addr = fmt_addr(c.getsockname())
        p.send_signal(signal.SIGTERM)
        p.wait_for(lambda e: e["event"] == "draining", 10, "draining line")
        if second_signal:
            p.send_signal(signal.SIGTERM)
        close = p.close_for(addr, timeout=15)
        assert close["cause"] == "proxy_shutdown" and close["term"] == "PD", close
        expect_reset(c, 10)
    hold.set()
    fut.result(30)
    assert p.wait_exit(15) == 0, p.stderr_text()
    st = [e for e in p.lines if e["event"] == "stopped"][-1]
    assert (st["active"], st["buffers_out"]) == (0, 0), st
