"""How connections end: half-close each way, data arriving with the FIN, resets.

A TCP proxy must forward a FIN only after every byte before it, keep the other direction
flowing after a half-close, and turn a reset on one side into a reset on the other.
"""
import socket


from netutil import (BgThread, Pattern, Verifier, connect, expect_reset, fmt_addr,
                     recv_exact, recv_stream, reset_close, send_stream)

MiB = 1 << 20


def test_client_half_close_upstream_keeps_streaming(proxy, upstream):
    """The client sends a request and shuts down writing while the upstream is already
    streaming; the upstream sees EOF only after the whole request, then streams 32 MiB
    more, all of which the client must get before its EOF."""
    srv = upstream()
    p = proxy(srv.addr)
    request, before, total = 10_000, 4 * MiB, 36 * MiB

    def server(conn):
        early = BgThread(send_stream, conn, 2, before, shutdown=False, name="early")
        early.start()
        recv_stream(conn, 1, request, what="upstream request")  # EOF right after it
        early.result(60)
        send_stream(conn, 2, total, start=before)  # the long tail, after the half-close

    fut = srv.serve_next(server)
    with connect(p.listen_addr) as c:
        addr = fmt_addr(c.getsockname())
        send_stream(c, 1, request)          # then SHUT_WR
        recv_stream(c, 2, total, what="client stream after half-close")
        fut.result(60)
    close = p.close_for(addr)
    assert (close["bytes_c2u"], close["bytes_u2c"], close["cause"]) == \
        (request, total, "normal"), close


def test_upstream_half_close_client_keeps_streaming(proxy, upstream):
    """The upstream sends a short answer and shuts down writing; the client gets EOF
    only after that answer and keeps streaming 32 MiB up, all of which must arrive
    before the upstream's EOF, with no reset on the client's later sends."""
    srv = upstream()
    p = proxy(srv.addr)
    answer, before, total = 10_000, 4 * MiB, 36 * MiB

    def server(conn):
        send_stream(conn, 4, answer)        # then SHUT_WR at once
        return recv_stream(conn, 3, total, what="upstream stream after half-close").received

    fut = srv.serve_next(server)
    with connect(p.listen_addr) as c:
        addr = fmt_addr(c.getsockname())
        early = BgThread(send_stream, c, 3, before, shutdown=False, name="early")
        early.start()
        recv_stream(c, 4, answer, what="client answer")  # EOF right after it
        early.result(60)
        send_stream(c, 3, total, start=before)
        assert fut.result(60) == total
        c.settimeout(5)
        assert c.recv(1) == b"", "data after EOF"
    close = p.close_for(addr)
    assert (close["bytes_c2u"], close["bytes_u2c"], close["cause"]) == \
        (total, answer, "normal"), close


# Each size is a connection of its own through one proxy: the suite runs these in
# every variant, and a proxy's start and stop cost more than a small transfer.
SIZES = [1, 1000, 100_000, 4 * MiB + 1]


def test_data_and_fin_together_both_ways(proxy, upstream):
    """Both ends send everything and shut down writing in one go, without waiting for
    the other: each side must get all the bytes and then a clean EOF, never a reset."""
    srv = upstream()
    p = proxy(srv.addr)
    for size in SIZES:
        def server(conn, size=size):
            send_stream(conn, 6, size)          # sendall + SHUT_WR, back to back
            return recv_stream(conn, 5, size, what="upstream").received

        fut = srv.serve_next(server)
        with connect(p.listen_addr) as c:
            addr = fmt_addr(c.getsockname())
            send_stream(c, 5, size)
            recv_stream(c, 6, size, what=f"client ({size} bytes)")
            assert fut.result(60) == size
        close = p.close_for(addr)
        assert (close["bytes_c2u"], close["bytes_u2c"], close["cause"]) == \
            (size, size, "normal"), close


def test_client_sends_and_closes_at_once(proxy, upstream):
    """sendall() then close() right away (not a reset: nothing unread on the client):
    the upstream must get every byte and then a clean EOF."""
    srv = upstream()
    p = proxy(srv.addr)
    for size in SIZES:
        fut = srv.serve_next(lambda conn, size=size:
                             recv_stream(conn, 7, size, what=f"upstream ({size} bytes)").received)
        c = connect(p.listen_addr)
        addr = fmt_addr(c.getsockname())
        c.sendall(Pattern(7).slice(0, size))
        c.close()
        assert fut.result(60) == size
        close = p.close_for(addr)
        assert (close["bytes_c2u"], close["bytes_u2c"], close["cause"]) == \
            (size, 0, "normal"), close


def test_upstream_sends_and_closes_at_once(proxy, upstream):
    """The upstream answers with sendall() then close() as soon as it is connected: the
    client must get every byte and then a clean EOF."""
    srv = upstream()
    p = proxy(srv.addr)
    for size in SIZES:
        def server(conn, size=size):
            conn.sendall(Pattern(8).slice(0, size))
            conn.close()

        fut = srv.serve_next(server)
        with connect(p.listen_addr) as c:
            addr = fmt_addr(c.getsockname())
            recv_stream(c, 8, size, what=f"client ({size} bytes)")
            fut.result(30)
            c.shutdown(socket.SHUT_WR)
        close = p.close_for(addr)
        assert (close["bytes_c2u"], close["bytes_u2c"], close["cause"]) == \
            (0, size, "normal"), close


REQ, RESP, TAIL = 256 * 1024, 256 * 1024, MiB


def test_client_reset_mid_stream(proxy, upstream):
    """After a request/response exchange the client sends 1 MiB more and aborts (RST).
    The upstream must see a correct prefix of the stream and then ECONNRESET, not EOF."""
    srv = upstream()
    p = proxy(srv.addr)

    def server(conn):
        v = Verifier(9, REQ + TAIL, "upstream")
        recv_exact(conn, v, REQ)
        send_stream(conn, 10, RESP, shutdown=False)
        expect_reset(conn, 10, v)
        return v.received

    fut = srv.serve_next(server)
    c = connect(p.listen_addr)
    addr = fmt_addr(c.getsockname())
    send_stream(c, 9, REQ, shutdown=False)
    recv_exact(c, Verifier(10, RESP, "client"), RESP)
    send_stream(c, 9, REQ + TAIL, start=REQ, shutdown=False)
    reset_close(c)
    got = fut.result(30)
    close = p.close_for(addr)
    assert close["cause"] == "client_reset", close
    # c2u counts what the proxy handed to the upstream socket; a reset may discard some
    # of it in flight, so it can exceed what the upstream read, never the stream.
    assert REQ <= got <= REQ + TAIL, got
    assert REQ <= close["bytes_c2u"] <= REQ + TAIL and close["bytes_u2c"] == RESP, close


def test_upstream_reset_mid_stream(proxy, upstream):
    """After a request/response exchange (confirmed by the client) the upstream sends
    1 MiB more and aborts (RST). The client must see a correct prefix of that stream and
    then ECONNRESET, not EOF. (A reset throws away what the resetting socket has not
    sent yet, so only the confirmed response is sure to arrive.)"""
    srv = upstream()
    p = proxy(srv.addr)
    ack = 1000

    def server(conn):
        v = Verifier(11, REQ + ack, "upstream")
        recv_exact(conn, v, REQ)
        send_stream(conn, 12, RESP, shutdown=False)
        recv_exact(conn, v, ack)            # the client has the whole response
        send_stream(conn, 12, RESP + TAIL, start=RESP, shutdown=False)
        reset_close(conn)

    fut = srv.serve_next(server)
    with connect(p.listen_addr) as c:
        addr = fmt_addr(c.getsockname())
        send_stream(c, 11, REQ, shutdown=False)
        v = Verifier(12, RESP + TAIL, "client")
        recv_exact(c, v, RESP)
        send_stream(c, 11, REQ + ack, start=REQ, shutdown=False)
        fut.result(30)
        expect_reset(c, 10, v)
    close = p.close_for(addr)
    assert close["cause"] == "upstream_reset", close
    assert close["bytes_c2u"] == REQ + ack and RESP <= close["bytes_u2c"] <= RESP + TAIL, close


def test_client_reset_while_upstream_blocked_sending(proxy, upstream):
    """The upstream streams far more than the client reads; the client aborts. The
    upstream's blocked send must fail promptly (the proxy reset it) rather than hang."""
    srv = upstream()
    p = proxy(srv.addr)

    def server(conn):
        conn.settimeout(10)
        try:
            send_stream(conn, 13, 256 * MiB, shutdown=False)
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        except TimeoutError:
            return "send still blocked 10 s later: the upstream was never reset"
        return "sent everything"

    fut = srv.serve_next(server)
    c = connect(p.listen_addr)
    addr = fmt_addr(c.getsockname())
    recv_exact(c, Verifier(13, 256 * MiB, "client"), MiB)
    reset_close(c)
    assert fut.result(30) == "reset"
    close = p.close_for(addr)
    assert close["cause"] == "client_reset", close
    assert MiB <= close["bytes_u2c"] < 256 * MiB, close
