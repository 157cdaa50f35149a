"""Close orders, drawn by hypothesis: each side sends some bytes, waits a little, and
ends with a FIN or a reset, in either order and at any point of the other's transfer.

The invariant under test: a reset never turns into a clean EOF, and a FIN never loses a
byte. With no reset, both sides get every byte and then EOF, and the flow is `normal`
with exact counts. When a side resets, every side that did not must see the reset -- a
clean EOF with no error anywhere would be a silently truncated stream.

Where a side sees it is the kernel's choice: tcp_reset() leaves ECONNRESET in sk_err and
sock_error() hands it to the first call that looks, then clears it. If the side's own
send or shutdown takes it, its reader's next recv returns 0. So a side has seen the
reset when its reader, its sends or its shutdown did.
"""
import socket
import time

from hypothesis import HealthCheck, given, settings, strategies as st

from netutil import (IO_TIMEOUT, BgThread, Verifier, family_of, fmt_addr, parse_addr,
                     reset_close, send_stream)

KiB = 1 << 10


def read_until_end(sock: socket.socket, verifier: Verifier) -> str:
    """Read and verify until the peer ends: 'eof' or 'reset'."""
    while True:
        try:
            data = sock.recv(256 * KiB)
        except ConnectionResetError:
            return "reset"
        if not data:
            return "eof"
        verifier.feed(data)


def play(sock: socket.socket, *, send_seed: int, n_send: int, recv_seed: int,
         n_recv: int, ending: str, delay: float, peer_resets: bool) -> tuple[str, int]:
    """One side's part. Returns (how the connection ended for this side: 'eof' or
    'reset', bytes received)."""
    if ending == "reset":
        # No reader here: a thread blocked in recv() holds the socket, and close()
        # would then not send the RST until that recv returned.
        try:
            send_stream(sock, send_seed, n_send, shutdown=False)
        except (ConnectionResetError, BrokenPipeError):
            assert peer_resets, "send failed although the peer did not reset"
        time.sleep(delay)
        reset_close(sock)
        return ("sent-reset", 0)
    verifier = Verifier(recv_seed, n_recv)
    reader = BgThread(read_until_end, sock, verifier, name="reader")
    reader.start()
    writer_saw_reset = False
    try:
        send_stream(sock, send_seed, n_send, shutdown=False)
        time.sleep(delay)
        sock.shutdown(socket.SHUT_WR)
    except (ConnectionResetError, BrokenPipeError, OSError) as e:
        # EPIPE/ECONNRESET from send, ENOTCONN from shutdown: the socket was reset.
        assert peer_resets, f"sending failed although the peer did not reset: {e!r}"
        writer_saw_reset = True
    end = reader.result(30)
    return ("reset" if writer_saw_reset else end), verifier.received


_side = st.fixed_dictionaries({
    "n": st.one_of(st.integers(0, 8), st.integers(0, 300 * KiB), st.integers(0, 3 << 20)),
    "ending": st.sampled_from(["fin", "fin", "reset"]),
    "delay": st.sampled_from([0.0, 0.001, 0.02]),
})


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(client=_side, server=_side)
def test_close_orders(proxy, upstream, client, server):
    # One proxy for all examples (hypothesis reuses the fixtures): each example is a new
    # flow in a recycled slot, which is part of what is tested.
    if not hasattr(proxy, "close_orders"):
        srv = upstream()
        proxy.close_orders = (srv, proxy(srv.addr))
    srv, p = proxy.close_orders
    c_resets, u_resets = client["ending"] == "reset", server["ending"] == "reset"

    fut = srv.serve_next(lambda conn: play(
        conn, send_seed=2, n_send=server["n"], recv_seed=1, n_recv=client["n"],
        ending=server["ending"], delay=server["delay"], peer_resets=c_resets))
    host, port = parse_addr(p.listen_addr)
    c = socket.socket(family_of(host), socket.SOCK_STREAM)
    with c:
        c.settimeout(IO_TIMEOUT)
        try:
            c.connect((host, port))
        except ConnectionResetError:
            # The upstream reset at once and the proxy passed the reset on before this
            # thread got back from connect(): the kernel then reports it from connect.
            assert u_resets, "connect() was reset although the upstream did not reset"
            addr = fmt_addr(c.getsockname())
            c_end, c_got = "reset", 0
        else:
            addr = fmt_addr(c.getsockname())
            c_end, c_got = play(c, send_seed=1, n_send=client["n"], recv_seed=2,
                                n_recv=server["n"], ending=client["ending"],
                                delay=client["delay"], peer_resets=u_resets)
    u_end, u_got = fut.result(30)
    close = p.close_for(addr)

    if not (c_resets or u_resets):
        assert (c_end, c_got, u_end, u_got) == ("eof", server["n"], "eof", client["n"])
        assert (close["cause"], close["bytes_c2u"], close["bytes_u2c"]) == \
            ("normal", client["n"], server["n"]), close
    elif c_resets and u_resets:
        assert close["cause"] in ("client_reset", "upstream_reset"), close
    elif c_resets:
        assert u_end == "reset", f"the client reset but the upstream saw {u_end!r}"
        assert close["cause"] == "client_reset", close
    else:
        assert c_end == "reset", f"the upstream reset but the client saw {c_end!r}"
        assert close["cause"] == "upstream_reset", close
