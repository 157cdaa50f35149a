"""uring_net.aio beyond CPython's suites: activation, that socket I/O really
is completions, and the traps of completions (cancel before close, nothing
lost to a cancelled operation, bounded memory, fork, the fallback)."""

import asyncio
import collections
import contextvars
import os
import select
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import NOFILE_LIMIT
from netutil import run_without_io_uring
from uring_net import aio

HERE = Path(__file__).resolve().parent


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class QueueSink(asyncio.Protocol):
    """Puts every piece it receives on a queue."""

    def __init__(self, queue):
        self.queue = queue

    def data_received(self, data):
        self.queue.put_nowait(data)


async def echo_client(addr, messages):
    r, w = await asyncio.open_connection(*addr)
    for m in messages:
        w.write(m)
        assert await r.readexactly(len(m)) == m
    w.close()
    await w.wait_closed()


def test_activation_the_uvloop_ways():
    async def main():
        return type(asyncio.get_running_loop())

    assert aio.run(main()) is aio.Loop
    with asyncio.Runner(loop_factory=aio.new_event_loop) as runner:
        assert runner.run(main()) is aio.Loop
    if hasattr(aio, "install"):
        old = asyncio.get_event_loop_policy()
        try:
            aio.install()
            loop = asyncio.new_event_loop()
            assert type(loop) is aio.Loop
            loop.close()
        finally:
            asyncio.set_event_loop_policy(old)


def test_a_replaced_run_once_is_what_run_forever_calls():
    # run_forever turns the loop in C (LoopCore), but a _run_once put in
    # the loop's own place -- a subclass's, or one set on the instance to
    # count turns, as CPython's test_timeout_rounding does -- is called
    # for every turn, as asyncio's run_forever calls it.
    class Counting(aio.Loop):
        turns = 0

        def _run_once(self):
            self.turns += 1
            super()._run_once()

    sub = Counting()
    inst = aio.new_event_loop()
    counted = []
    own = inst._run_once
    inst._run_once = lambda: (counted.append(1), own())
    try:
        for loop in (sub, inst):
            loop.run_until_complete(asyncio.sleep(0.01))
    finally:
        sub.close()
        inst.close()
    assert sub.turns >= 2 and len(counted) >= 2, (sub.turns, counted)


def run_callbacks_as_asyncio_does(loop):
    """What a loop's turn did with a few callbacks: in their contexts,
    cancelled ones not at all, a raising one reported with asyncio's keys."""
    seen, reported = [], []
    var = contextvars.ContextVar("v", default="outer")
    loop.set_exception_handler(lambda _, ctx: reported.append(ctx))

    def boom(tag):
        raise ValueError(tag)

    ctx = contextvars.copy_context()
    ctx.run(var.set, "inner")
    loop.call_soon(lambda: seen.append(("plain", var.get())))
    loop.call_soon(lambda: seen.append(("ctx", var.get())), context=ctx)
    loop.call_soon(seen.append, "cancelled").cancel()
    loop.call_soon(boom, "x")
    loop.call_later(0.001, seen.append, "timer")
    loop.call_later(0.001, seen.append, "timer cancelled").cancel()
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
    return seen, [(c["message"], type(c["exception"]).__name__, str(c["exception"]),
                   sorted(c)) for c in reported]


def test_callbacks_run_in_c_as_asyncio_runs_them():
    # The turn runs a Handle's callback itself (LoopCore, _run_handle), not
    # through Handle._run: the same contexts, cancellations and reports.
    import selectors
    ours = run_callbacks_as_asyncio_does(aio.new_event_loop())
    stock = run_callbacks_as_asyncio_does(asyncio.SelectorEventLoop(selectors.EpollSelector()))
    assert ours == stock
    assert ours[0] == [("plain", "outer"), ("ctx", "inner"), "timer"]
    (message, exc_type, text, keys), = ours[1]
    assert message.startswith("Exception in callback ") and ".boom(" in message
    assert (exc_type, text, keys) == ("ValueError", "x", ["exception", "handle", "message"])


def handles_the_hard_ways(loop):
    """Callbacks that test how a turn holds a Handle: one that cancels its
    own handle while a C callable still uses its callback and arguments,
    arguments given as a list, and Handle._run replaced by instrumentation."""
    import gc
    got = []

    class Pairs:        # dict.update() calls keys() first: the handle is cancelled mid-call
        def keys(self):
            handle.cancel()         # drops the handle's own references
            gc.collect()
            return ["a", "b"]

        def __getitem__(self, k):
            return k * 3

    target = {}
    handle = loop.call_soon(target.update, Pairs())
    loop._ready.append(asyncio.Handle(got.extend, [["listed"]], loop))
    runs = []
    own = asyncio.events.Handle._run

    def counting(self):
        runs.append(1)
        return own(self)

    loop.call_soon(loop.stop)
    loop.run_forever()
    asyncio.events.Handle._run = counting
    try:
        loop.call_soon(got.append, "counted")
        loop.call_soon(loop.stop)
        loop.run_forever()
    finally:
        asyncio.events.Handle._run = own
    loop.close()
    return target, got, len(runs)


def test_handles_survive_what_asyncio_survives():
    # The turn runs Handles in C (_run_handle); it must hold what it calls
    # as Handle._run's frame does, take any iterable of arguments, and call
    # a replaced Handle._run (aiodebug-style instrumentation) as asyncio does.
    import selectors
    ours = handles_the_hard_ways(aio.new_event_loop())
    stock = handles_the_hard_ways(asyncio.SelectorEventLoop(selectors.EpollSelector()))
    assert ours == stock == ({"a": "aaa", "b": "bbb"}, ["listed", "counted"], 2)


def test_mock_patch_object_restores_the_loops_c_fields():
    # asyncio's attributes the turn reads are C fields of LoopCore; deleting
    # one must make it absent, as an instance attribute is, or
    # mock.patch.object cannot put the original back.
    from unittest import mock
    loop = aio.new_event_loop()
    try:
        patches = {"_debug": True, "_selector": mock.Mock(), "_clock_resolution": 1.0,
                   "_stopping": True, "_ready": collections.deque(), "_scheduled": []}
        before = {n: getattr(loop, n) for n in patches}
        for name, value in patches.items():
            with mock.patch.object(loop, name, value):
                assert getattr(loop, name) is value or getattr(loop, name) == value
        after = {n: getattr(loop, n) for n in patches}
        assert all(after[n] is before[n] or after[n] == before[n] for n in patches), after
        del loop._debug
        with pytest.raises(AttributeError):
            loop._debug
        loop._debug = False
        assert loop.run_until_complete(asyncio.sleep(0, "ran")) == "ran"
    finally:
        loop.close()


def test_completions_after_a_keyboard_interrupt_are_handed_out_next_run():
    # Two receives complete in one harvest; the first protocol raises
    # KeyboardInterrupt, which ends the dispatch and the run. The other's
    # bytes are still owed: the next run must deliver them at once, not
    # wait for some new event to end its select().
    loop = aio.new_event_loop()
    raise_once = [True]
    got = []
    both = loop.create_future()

    class Proto(asyncio.Protocol):
        def data_received(self, data):
            got.append(data)
            if len(got) == 2:
                both.set_result(None)
            if raise_once:
                raise_once.clear()
                raise KeyboardInterrupt

    async def connect(sock):
        return await loop.create_connection(Proto, sock=sock)

    pairs = [socket.socketpair() for _ in range(2)]
    try:
        for ours, _ in pairs:
            loop.run_until_complete(connect(ours))
        for _, peer in pairs:
            peer.sendall(b"x")          # both are there before the loop looks
        late = []
        loop.call_later(30, late.append, True)
        with pytest.raises(KeyboardInterrupt):
            loop.run_forever()
        loop.run_until_complete(both)       # nothing new comes: only what is owed
        assert got == [b"x", b"x"] and late == []
    finally:
        for a, b in pairs:
            a.close()
            b.close()
        loop.close()


def test_stream_reads_are_completions_not_polls():
    async def main():
        async def handle(r, w):
            while data := await r.read(65536):
                w.write(data)
            w.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        before = loop.stats()
        await echo_client(srv.sockets[0].getsockname(), [b"m%d" % i * 100 for i in range(200)])
        after = loop.stats()
        srv.close()
        await srv.wait_closed()
        return before, after

    before, after = aio.run(main())
    ops = after["ops"]["completed"] - before["ops"]["completed"]
    arms = after["polls"]["arms"] - before["polls"]["arms"]
    # 200 messages each way: a receive completion per message on both sides;
    # polls only for the listener and the loop's own wake-up socket.
    assert ops >= 400, (before, after)
    assert arms < 20, (before, after)


def test_transports_read_without_the_pool():
    # Linux < 5.19 has no provided-buffer rings: each reading transport then
    # receives into one buffer of its own. The same path, chosen here by hand.
    loop = aio.new_event_loop()
    loop._ops.pooled = False

    async def main():
        got = asyncio.Queue()

        a, b = socket.socketpair()
        t, _ = await loop.create_connection(lambda: QueueSink(got), sock=a)
        out = []
        for msg in (b"first", b"second" * 1000):
            b.sendall(msg)
            data = b""
            while len(data) < len(msg):
                data += await asyncio.wait_for(got.get(), 10)
            out.append(data == msg)
        t.close()
        b.close()
        return out

    try:
        assert loop.run_until_complete(main()) == [True, True]
    finally:
        loop.close()


def test_sock_methods_are_completions():
    async def main():
        loop = asyncio.get_running_loop()
        lsock = socket.create_server(("127.0.0.1", 0))
        lsock.setblocking(False)
        c = socket.socket()
        c.setblocking(False)
        before = loop.stats()["ops"]["completed"]
        conn_task = asyncio.ensure_future(loop.sock_accept(lsock))
        await loop.sock_connect(c, lsock.getsockname())
        s, addr = await conn_task
        assert addr == c.getsockname()
        for i in range(50):
            # Nothing is there when the receive starts: it waits as an op.
            recv = asyncio.ensure_future(loop.sock_recv(s, 1000))
            await asyncio.sleep(0)
            await loop.sock_sendall(c, b"x" * 1000)
            got = await recv
            while len(got) < 1000:
                got += await loop.sock_recv(s, 1000 - len(got))
        buf = bytearray(10)
        recv = asyncio.ensure_future(loop.sock_recv_into(c, buf))
        await asyncio.sleep(0)
        await loop.sock_sendall(s, b"0123456789")
        n = await recv
        assert buf[:n] == b"0123456789"[:n]
        done = loop.stats()["ops"]["completed"] - before
        for x in (s, c, lsock):
            x.close()
        return done

    assert aio.run(main()) >= 53        # accept, connect, 51 receives


def test_sock_recv_takes_what_is_there_without_an_op():
    # As asyncio's: bytes already received are returned at once, by recv(2).
    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        out = []
        for recv in (lambda: loop.sock_recv(a, 100),
                     lambda: loop.sock_recv_into(a, bytearray(100))):
            b.send(b"ready")
            select.select([a], [], [], 10)
            before = loop.stats()["ops"]["submitted"]
            got = await recv()
            out.append((got, loop.stats()["ops"]["submitted"] - before))
        a.close()
        b.close()
        return out

    assert aio.run(main()) == [(b"ready", 0), (5, 0)]


def test_sock_recv_stops_trying_a_socket_that_has_nothing():
    # A peer slower than the loop: the try before the wait finds nothing
    # every time, so it is made less and less often (each a wasted syscall).
    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        before = loop.stats()["ops"]["recv_tries_empty"]
        for i in range(40):
            recv = asyncio.ensure_future(loop.sock_recv(a, 100))
            await asyncio.sleep(0)
            await loop.sock_sendall(b, b"%d" % i)
            assert await recv == b"%d" % i
        empty = loop.stats()["ops"]["recv_tries_empty"] - before
        # Bytes there again: once a try is made it finds them, and from then
        # on every receive is a try that finds them, no op.
        direct = []
        for i in range(20):
            b.send(b"%d" % i)
            select.select([a], [], [], 10)
            ops = loop.stats()["ops"]["submitted"]
            assert await loop.sock_recv(a, 100) == b"%d" % i
            direct.append(loop.stats()["ops"]["submitted"] == ops)
        a.close()
        b.close()
        return empty, direct

    empty, direct = aio.run(main())
    assert 1 <= empty <= 6, empty      # tries 1, 3, 7, 15, 31 of 40 (then every 16th)
    first = direct.index(True)
    assert first <= 15 and all(direct[first:]), direct


def test_transport_close_with_a_receive_in_flight_sends_the_fin_at_once():
    # Cancel first, then close: a receive in flight holds the socket's file,
    # so closing the fd under it would keep the FIN back.
    async def main():
        closed = asyncio.Event()

        class Closer(asyncio.Protocol):
            def connection_made(self, t):
                asyncio.get_running_loop().call_later(0.05, t.close)

            def connection_lost(self, exc):
                closed.set()

        loop = asyncio.get_running_loop()
        srv = await loop.create_server(Closer, "127.0.0.1", 0)
        c = socket.create_connection(srv.sockets[0].getsockname())
        await closed.wait()
        c.settimeout(10)
        got = await loop.run_in_executor(None, c.recv, 10)
        c.close()
        srv.close()
        return got

    assert aio.run(main()) == b""


def test_cancelled_sock_recv_loses_no_bytes():
    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        task = asyncio.ensure_future(loop.sock_recv(a, 100))
        await asyncio.sleep(0)          # its receive is prepared, not yet submitted
        b.send(b"early bytes")
        task.cancel()                   # the receive and its cancel go in together
        with pytest.raises(asyncio.CancelledError):
            await task
        b.send(b", and later ones")
        got = b""
        while len(got) < len(b"early bytes, and later ones"):
            got += await asyncio.wait_for(loop.sock_recv(a, 100), 10)
        a.close()
        b.close()
        return got

    assert aio.run(main()) == b"early bytes, and later ones"


def receive(loop, kind, sock, buf=None):
    """sock_recv(sock, 100), or sock_recv_into(sock, buf) for kind "into",
    answering the bytes received either way."""
    if kind == "recv":
        return loop.sock_recv(sock, 100)

    async def into():
        b = bytearray(100) if buf is None else buf
        return bytes(b[:await loop.sock_recv_into(sock, b)])
    return into()


async def cancel_a_receive_that_completes_unseen(loop, kind="recv", buf=None):
    """Two receive tasks (receive() of `kind`; y's into buf), on x and y,
    cancelled in one turn, x's first: x's cancel, submitted first, runs y's
    receive, which completes with "A" that the loop has not harvested yet.
    Then "B" is sent to y. Returns the sockets (x, x_peer, y, y_peer) and
    the two tasks; the caller goes on in the cancellations' turn."""
    x, x_peer = socket.socketpair()
    y, y_peer = socket.socketpair()
    for sock in (x, y):
        sock.setblocking(False)
    tx = asyncio.ensure_future(receive(loop, kind, x))
    ty = asyncio.ensure_future(receive(loop, kind, y, buf))
    for _ in range(3):
        await asyncio.sleep(0)          # both receives in the kernel, waiting
    # y's bytes arrive after the next turn's wait, before the cancellations run.
    loop.call_soon(y_peer.send, b"A")
    tx.cancel()
    ty.cancel()
    await asyncio.sleep(0)              # (runs after both cancellations, same turn)
    y_peer.send(b"B")
    return (x, x_peer, y, y_peer), tx, ty


@pytest.mark.parametrize("kind", ["recv", "into"])
def test_a_sock_recv_after_a_cancelled_one_keeps_the_bytes_in_order(kind):
    # A cancelled receive may already have completed with bytes ("A") that
    # the loop has not harvested yet: another cancel's submit in the same
    # turn ran its completion. A receive made at once after the
    # cancellation must not return later bytes ("B") before those, and the
    # cancelled receive's buffer is left as it was (asyncio's is).
    async def main():
        loop = asyncio.get_running_loop()
        given = bytearray(b"." * 100)
        socks, tx, ty = await cancel_a_receive_that_completes_unseen(loop, kind, given)
        x, x_peer, y, y_peer = socks
        got = [await receive(loop, kind, y)]    # in this turn still (no wait_for task)
        while len(b"".join(got)) < 2:
            got.append(await asyncio.wait_for(receive(loop, kind, y), 10))
        for sock in (x, x_peer, y, y_peer):
            sock.close()
        return b"".join(got), tx.cancelled(), ty.cancelled(), given == b"." * 100

    assert aio.run(main()) == (b"AB", True, True, True)


def test_a_cancelled_wait_for_a_cancelled_receive_leaves_the_others_waiting():
    # As above; then a sock_recv that waits for the cancelled receive to come
    # back is itself cancelled, in the same turn (stepped by hand, as a task
    # would be). The next sock_recv must still get "A", then "B".
    async def main():
        loop = asyncio.get_running_loop()
        socks, _, _ = await cancel_a_receive_that_completes_unseen(loop)
        x, x_peer, y, y_peer = socks
        first = loop.sock_recv(y, 100)
        awaited = first.send(None)      # it waits for y's cancelled receive
        awaited.cancel()                # what cancelling its task does
        with pytest.raises(asyncio.CancelledError):
            first.throw(asyncio.CancelledError())
        second = loop.sock_recv(y, 100)     # in the same turn, waiting as well
        waited = second.send(None)
        await asyncio.wait([waited], timeout=10)    # (not awaited twice)
        with pytest.raises(StopIteration) as stop:
            second.send(None)
        got = stop.value.value
        while len(got) < 2:
            got += await asyncio.wait_for(loop.sock_recv(y, 100), 10)
        for sock in (x, x_peer, y, y_peer):
            sock.close()
        return got

    assert aio.run(main()) == b"AB"


@pytest.mark.parametrize("kind", ["recv", "into"])
def test_a_sock_recv_cancelled_after_its_bytes_came_keeps_them(kind):
    # The receive completed and set its result; the task was cancelled
    # before it ran again, so it raises CancelledError, and the bytes go to
    # the next receive (asyncio's own loop drops them).
    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        task = asyncio.ensure_future(receive(loop, kind, a))
        for _ in range(3):
            await asyncio.sleep(0)      # its receive in the kernel, waiting
        b.send(b"A")
        loop.call_soon(task.cancel)     # runs after the turn's completions
        with pytest.raises(asyncio.CancelledError):
            await task
        got = await asyncio.wait_for(receive(loop, kind, a), 10)
        a.close()
        b.close()
        return got

    assert aio.run(main()) == b"A"


def test_cancelled_sock_accept_loses_no_connection():
    async def main():
        loop = asyncio.get_running_loop()
        lsock = socket.create_server(("127.0.0.1", 0))
        lsock.setblocking(False)
        task = asyncio.ensure_future(loop.sock_accept(lsock))
        await asyncio.sleep(0)
        c = socket.create_connection(lsock.getsockname())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        s, _ = await asyncio.wait_for(loop.sock_accept(lsock), 10)
        c.sendall(b"hi")
        got = await loop.sock_recv(s, 10)
        for x in (s, c, lsock):
            x.close()
        return got

    assert aio.run(main()) == b"hi"


async def cancel_once_its_result_came(loop, op, send):
    """Start op() as a task, send() once it waits in the kernel, and cancel
    the task after the completion came but before the task ran again: the
    kernel has done the op (bytes taken, a connection accepted)."""
    task = asyncio.ensure_future(op())
    for _ in range(3):
        await asyncio.sleep(0)          # its op in the kernel, waiting
    send()
    loop.call_soon(task.cancel)         # runs after the turn's completions
    with pytest.raises(asyncio.CancelledError):
        await task


def test_kept_bytes_never_go_to_a_socket_that_reuses_the_fd_number():
    # What a cancelled receive took belongs to its socket: once that is
    # closed, a new socket that gets the same fd number starts empty.
    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        await cancel_once_its_result_came(loop, lambda: loop.sock_recv(a, 100),
                                          lambda: b.send(b"OLD"))
        fd = a.fileno()
        a.close()
        b.close()
        c, d = socket.socketpair()
        c.setblocking(False)
        assert c.fileno() == fd         # (the lowest free number)
        d.send(b"new")
        got = await asyncio.wait_for(loop.sock_recv(c, 100), 10)
        c.close()
        d.close()
        return got

    assert aio.run(main()) == b"new"


def test_a_kept_connection_never_goes_to_a_listener_that_reuses_the_fd_number():
    # A connection a cancelled sock_accept took belongs to its listener: a
    # new listener on the same fd number accepts its own, and the kept one
    # is closed, as the closed listener's backlog would have been.
    async def main():
        loop = asyncio.get_running_loop()
        old = socket.create_server(("127.0.0.1", 0))
        old.setblocking(False)
        clients = []
        await cancel_once_its_result_came(
            loop, lambda: loop.sock_accept(old),
            lambda: clients.append(socket.create_connection(old.getsockname())))
        fd = old.fileno()
        old.close()
        new = socket.create_server(("127.0.0.1", 0))
        new.setblocking(False)
        assert new.fileno() == fd
        clients.append(socket.create_connection(new.getsockname()))
        conn, _ = await asyncio.wait_for(loop.sock_accept(new), 10)
        accepted = conn.getpeername() == clients[1].getsockname()
        clients[0].settimeout(10)
        first_client_got = clients[0].recv(10)      # b"": closed by the loop
        for sock in clients + [conn, new]:
            sock.close()
        return accepted, first_client_got

    assert aio.run(main()) == (True, b"")


def test_bytes_a_cancelled_receive_took_go_first_to_a_transport():
    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        await cancel_once_its_result_came(loop, lambda: loop.sock_recv(a, 100),
                                          lambda: b.send(b"HELLO"))
        b.send(b"-more")
        reader, writer = await asyncio.open_connection(sock=a)
        got = b""
        while len(got) < 10:
            got += await asyncio.wait_for(reader.read(100), 10)
        writer.close()
        b.close()
        return got

    assert aio.run(main()) == b"HELLO-more"


class SwappingBuffers(asyncio.BufferedProtocol):
    """Keeps what it received in `got`; its buffer is `buf` at the time
    get_buffer() is called, which the test may swap between callbacks."""

    def __init__(self, loop):
        self.buf = bytearray(16)
        self.got = bytearray()
        self.grew = loop.create_future()
        self.want = 0

    def get_buffer(self, sizehint):
        return self.buf

    def buffer_updated(self, n):
        self.got += self.buf[:n]
        if len(self.got) >= self.want and not self.grew.done():
            self.grew.set_result(None)

    async def until(self, n):
        self.want = n
        if len(self.got) < n:
            await asyncio.wait_for(self.grew, 10)
        self.grew = asyncio.get_running_loop().create_future()


def test_a_buffered_protocol_gets_bytes_in_the_buffer_it_gives_when_they_came():
    # asyncio asks get_buffer() for a buffer when the bytes are there. A
    # protocol may hand its buffer on (or compact it) between callbacks; the
    # bytes must never land in one it gave before.
    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        proto = SwappingBuffers(loop)
        transport, _ = await loop.connect_accepted_socket(lambda: proto, a)
        b.send(b"hello")
        await proto.until(5)
        given = proto.buf
        proto.buf = bytearray(16)       # handed on: no longer the receive's
        b.send(b"world")
        await proto.until(10)
        transport.close()
        b.close()
        return bytes(proto.got), bytes(given[:6])

    assert aio.run(main()) == (b"helloworld", b"hello\0")


def test_set_protocol_from_a_task_takes_the_next_bytes():
    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        first = SwappingBuffers(loop)
        transport, _ = await loop.connect_accepted_socket(lambda: first, a)
        b.send(b"first")
        await first.until(5)
        second = SwappingBuffers(loop)
        transport.set_protocol(second)
        b.send(b"second")
        await second.until(6)
        transport.close()
        b.close()
        return bytes(first.got), bytes(second.got)

    assert aio.run(main()) == (b"first", b"second")


def test_sock_connect_again_after_a_cancelled_one_waits_for_it():
    # A cancelled sock_connect leaves the kernel's connect going (its SYN
    # unanswered: the listener's queue is full). A second sock_connect, as
    # after a wait_for timeout, connects once the listener takes it.
    async def main():
        loop = asyncio.get_running_loop()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)      # one connection not accepted fills the queue
        address = listener.getsockname()
        queued = socket.create_connection(address)
        sock = socket.socket()
        sock.setblocking(False)
        task = asyncio.ensure_future(loop.sock_connect(sock, address))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Its SYN was dropped (the queue is full): the connect goes on.
        tcp_state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        assert tcp_state == 2   # TCP_SYN_SENT
        queued.close()
        listener.setblocking(False)
        while True:             # empty the queue: the SYN's retry gets in
            try:
                listener.accept()[0].close()
            except BlockingIOError:
                break
        await asyncio.wait_for(loop.sock_connect(sock, address), 20)
        peer = sock.getpeername()
        sock.close()
        listener.close()
        return peer

    assert aio.run(main())[1] > 0


@pytest.mark.parametrize("family,client", [
    ("inet", None), ("inet-reset", None), ("inet6", None),
    ("unix", None), ("unix", "path"), ("unix", "abstract")])
def test_sock_accept_gives_the_address_accept_gives(family, client, tmp_path):
    # The peer's address comes with the accept, as from accept(2): also for
    # a client that reset the connection while it waited in the queue
    # (getpeername() fails on that one).
    async def main():
        loop = asyncio.get_running_loop()
        if family == "unix":
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(str(tmp_path / "listener"))
            c = socket.socket(socket.AF_UNIX)
            if client == "path":
                c.bind(str(tmp_path / "client"))
            elif client == "abstract":
                c.bind(b"\0uring-net-test-%d" % os.getpid())
        else:
            fam = socket.AF_INET6 if family == "inet6" else socket.AF_INET
            listener = socket.socket(fam)
            listener.bind(("::1" if family == "inet6" else "127.0.0.1", 0))
            c = socket.socket(fam)
        listener.listen()
        listener.setblocking(False)
        c.connect(listener.getsockname())
        expected = c.getsockname()
        if family == "inet-reset":
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
        conn, address = await asyncio.wait_for(loop.sock_accept(listener), 10)
        for sock in (conn, c, listener):
            sock.close()
        return address, expected

    address, expected = aio.run(main())
    assert address == expected


def test_receive_pool_survives_more_eofs_than_it_has_buffers():
    # 128 pool buffers; 300 connections that end with an EOF on one loop, then
    # data must still arrive (an EOF whose buffer was not given back would
    # shrink the pool to nothing).
    async def main():
        loop = asyncio.get_running_loop()
        got = asyncio.Queue()

        srv = await loop.create_server(lambda: QueueSink(got), "127.0.0.1", 0)
        addr = srv.sockets[0].getsockname()
        for _ in range(300):
            r, w = await asyncio.open_connection(*addr)
            w.close()
            await w.wait_closed()
        r, w = await asyncio.open_connection(*addr)
        w.write(b"after the EOFs")
        data = await asyncio.wait_for(got.get(), 10)
        w.close()
        srv.close()
        return data, loop.stats()["ops"]["nobufs"]

    data, nobufs = aio.run(main())
    assert data == b"after the EOFs"
    assert nobufs == 0


def test_paused_transport_gets_nothing_until_resumed():
    async def main():
        loop = asyncio.get_running_loop()
        got = []
        first = asyncio.Event()

        class Pauser(asyncio.Protocol):
            def connection_made(self, t):
                self.t = t

            def data_received(self, data):
                got.append(data)
                self.t.pause_reading()
                first.set()

        a, b = socket.socketpair()
        t, proto = await loop.create_connection(Pauser, sock=a)
        b.send(b"one")
        await first.wait()
        b.send(b"two")
        for _ in range(20):             # loop turns: nothing may be delivered
            await asyncio.sleep(0)
        paused = list(got)
        t.resume_reading()
        while b"".join(got) != b"onetwo":
            await asyncio.sleep(0.01)
        t.close()
        b.close()
        return paused

    assert aio.run(main()) == [b"one"]


@pytest.mark.skipif(NOFILE_LIMIT < 2200, reason=f"needs 2,200 fds; RLIMIT_NOFILE allows {NOFILE_LIMIT}")
def test_idle_transports_hold_no_receive_buffer_each():
    # Each reading transport has a receive in the kernel; with a buffer of
    # its own (256 KiB, as asyncio reads) 1,000 would take 256 MB. The
    # shared pool bounds it. (conftest raised the fd limit as far as it goes.)

    async def main():
        loop = asyncio.get_running_loop()
        pairs = [socket.socketpair() for _ in range(1000)]
        base = rss_bytes()
        transports = []
        for a, b in pairs:
            t, _ = await loop.create_connection(asyncio.Protocol, sock=a)
            transports.append(t)
        for _ in range(5):
            await asyncio.sleep(0)
        inflight = loop.stats()["ops"]["in_flight"]
        grown = rss_bytes() - base
        for t in transports:
            t.close()
        await asyncio.sleep(0.1)
        for a, b in pairs:
            b.close()
        return inflight, grown

    inflight, grown = aio.run(main())
    assert inflight >= 1000
    assert grown < 64 << 20, f"RSS grew {grown >> 20} MiB for 1,000 idle transports"


async def echo_of_a_socketpair(msg):
    """What sock_recv gets of `msg` sent on a new socketpair, on the running loop."""
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        b.send(msg)
        return await asyncio.get_running_loop().sock_recv(a, 10)


def test_loop_made_in_one_thread_runs_in_another():
    # The ring is its thread's (SINGLE_ISSUER): the loop's selector moves to a
    # ring of the thread that runs it, and the receive pool with it.
    import threading
    loop = aio.new_event_loop()
    out = []
    t = threading.Thread(target=lambda: out.append(
        loop.run_until_complete(echo_of_a_socketpair(b"moved"))))
    t.start()
    t.join(30)
    try:
        assert out == [b"moved"]
        assert loop.stats()["polls"]["moves"] == 1
    finally:
        loop.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_runs_a_loop_of_its_own():
    def serve_once():
        return echo_of_a_socketpair(b"ping")

    loop = aio.new_event_loop()
    try:
        assert loop.run_until_complete(serve_once()) == b"ping"
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = 0 if aio.run(serve_once()) == b"ping" else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert loop.run_until_complete(serve_once()) == b"ping"
    finally:
        loop.close()


def test_fallback_without_io_uring_warns_once_and_runs():
    code = ("import asyncio, warnings\nwarnings.simplefilter('always')\n"
            "from uring_net import aio\n"
            "async def main():\n    return type(asyncio.get_running_loop()).__name__\n"
            "print(aio.run(main()))\nprint(aio.run(main()))\n")
    out, warnings = run_without_io_uring(code)
    assert out.split() == ["_UnixSelectorEventLoop"] * 2
    assert len(warnings) == 1 and "EPERM" in warnings[0], warnings


# The same CPython tests again, in a process where io_uring_setup fails (every
# loop the hooks make is the fallback), and with asyncio's debug mode on. The
# default tier runs three of the suites each way; make test-full runs them all.
SUBSET = "TestAioSockLowlevel or TestAioBufferedProtocol or TestAioStartServer"


def run_cpython_aio(prefix, env=None):
    which = "TestAio" if os.environ.get("URING_NET_TEST_FULL") else SUBSET
    r = subprocess.run(prefix + [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                 "-W", "ignore::RuntimeWarning", str(HERE / "test_cpython_aio.py"),
                                 "-k", which],
                       capture_output=True, text=True, timeout=600, cwd=HERE.parent,
                       env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


def test_cpython_suites_pass_on_the_fallback():
    run_cpython_aio([sys.executable, str(HERE / "seccomp_deny_uring.py")])


def test_cpython_suites_pass_in_asyncio_debug_mode():
    run_cpython_aio([], {"PYTHONASYNCIODEBUG": "1"})


def test_resume_before_the_cancel_of_a_pause_comes_back_reads_on():
    # pause_reading() cancels the receive in the kernel; a resume_reading()
    # before that cancel's completion is seen must still arm the next one.
    async def main():
        loop = asyncio.get_running_loop()
        got = asyncio.Queue()

        a, b = socket.socketpair()
        t, _ = await loop.create_connection(lambda: QueueSink(got), sock=a)
        b.send(b"one")
        first = await asyncio.wait_for(got.get(), 10)
        for _ in range(3):
            await asyncio.sleep(0)          # the next receive is armed and idle
        t.pause_reading()
        t.resume_reading()
        b.send(b"two")
        second = await asyncio.wait_for(got.get(), 10)
        t.close()
        b.close()
        return first, second

    assert aio.run(main()) == (b"one", b"two")
