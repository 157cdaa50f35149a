"""uring_net.aio's transport writes, which are SEND completions: every byte
arrives in order whatever the chunking, short sends resume, flow control
pauses and resumes the protocol, and the end of a transport (close,
write_eof, abort, a reset peer) waits for, or cancels, the send in flight."""

import asyncio
import os
import socket
import threading
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uring_net import aio


def loopback_pair(sndbuf=None, peer_rcvbuf=None):
    """A loopback TCP connection: our end non-blocking (with `sndbuf`), the
    peer's a plain blocking socket (with `peer_rcvbuf`)."""
    lsock = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(lsock.getsockname())
    if peer_rcvbuf:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, peer_rcvbuf)
    conn, _ = lsock.accept()
    lsock.close()
    if sndbuf:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    conn.setblocking(False)
    peer.settimeout(20)
    return conn, peer


async def tcp_transport(protocol_factory, sndbuf=None):
    """A transport on our end of a loopback_pair(), and the peer."""
    conn, peer = loopback_pair(sndbuf)
    t, proto = await asyncio.get_running_loop().create_connection(protocol_factory, sock=conn)
    return t, proto, peer


def read_to_eof(sock, chunk=65536):
    out = bytearray()
    while True:
        try:
            data = sock.recv(chunk)
        except ConnectionResetError:
            return bytes(out), "reset"
        if not data:
            return bytes(out), "eof"
        out += data


class Ends(asyncio.Protocol):
    def __init__(self):
        self.lost = asyncio.get_running_loop().create_future()
        self.pauses = self.resumes = 0
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.got = bytearray()

    def connection_made(self, t):
        self.t = t

    def data_received(self, data):
        self.got += data

    def pause_writing(self):
        self.pauses += 1
        self.can_write.clear()

    def resume_writing(self):
        self.resumes += 1
        self.can_write.set()

    def connection_lost(self, exc):
        self.lost.set_result(exc)


def pattern(n, seed=0):
    return bytes((seed + i * 7) & 0xFF for i in range(256)) * (n // 256) + bytes(n % 256)


def test_a_slow_reader_gets_every_byte_through_short_sends_and_flow_control():
    total = 8 << 20
    data = pattern(total)

    async def main():
        t, p, peer = await tcp_transport(Ends, sndbuf=16384)
        reader = asyncio.get_running_loop().run_in_executor(None, read_to_eof, peer, 4096)
        for off in range(0, total, 65536):
            await p.can_write.wait()            # what a protocol honouring flow control does
            t.write(data[off:off + 65536])
        t.close()
        got, end = await reader
        exc = await p.lost
        stats = t._io.stats()
        peer.close()
        return got, end, exc, p.pauses, p.resumes, stats

    got, end, exc, pauses, resumes, stats = aio.run(main())
    assert (len(got), end, exc) == (total, "eof", None)
    assert got == data
    assert pauses >= 1 and resumes >= 1
    # a 16 KiB send buffer cannot take a 64 KiB send whole: the rest resumed
    assert stats["short_sends"] > 0, stats


def test_a_send_nobody_waits_on_costs_the_loop_no_turn():
    # A send that took every byte written, on a transport with nothing
    # waiting for it (no paused protocol, drain, close or write_eof), is
    # finished inside select(), which waits on: the send completes in the
    # very io_uring_enter that submits it, and returning for it would turn
    # the loop once more per write (StreamIO.send_quiet).
    async def main():
        loop = asyncio.get_running_loop()
        t, proto, peer = await tcp_transport(Ends)

        async def turns(write):
            before = loop.stats()
            if write:
                t.write(b"x" * 100)
            await asyncio.sleep(0.05)
            after = loop.stats()
            return (after["polls"]["selects"] - before["polls"]["selects"],
                    after["ops"]["quiet_sends"] - before["ops"]["quiet_sends"],
                    after["ops"]["completed"] - before["ops"]["completed"])

        out = []
        for _ in range(5):
            idle = await turns(False)
            busy = await turns(True)
            out.append((idle, busy))
        got = b""
        while len(got) < 500:
            got += peer.recv(500)
        t.close()
        await proto.lost
        peer.close()
        return out, got

    out, got = aio.run(main())
    assert got == b"x" * 500
    for (idle_selects, _, _), (busy_selects, quiet, completed) in out:
        assert (busy_selects, quiet, completed) == (idle_selects, 1, 0), out


def test_a_send_that_cannot_complete_leaves_the_gil_to_other_threads():
    # The loop submits a queued send holding the GIL, since it nearly always
    # completes inside the submit (PollSet.wait). One that cannot -- the
    # peer reads nothing and the socket is full -- must not keep the GIL
    # through the wait that follows: another thread still runs Python and
    # wakes the loop, long before the loop's own timer would.
    async def main():
        loop = asyncio.get_running_loop()
        t, proto, peer = await tcp_transport(Ends, sndbuf=4096)
        t.write(b"x" * (8 << 20))           # far beyond what the socket holds
        woke = loop.create_future()

        def worker():
            time.sleep(0.2)                 # the loop is waiting by now
            n = sum(range(200_000))         # Python: it needs the GIL
            loop.call_soon_threadsafe(woke.set_result, n)

        threading.Thread(target=worker).start()
        # The loop's only other wake-up: with the GIL kept, only it would
        # end the wait, and the worker could not have run before it.
        late = []
        timer = loop.call_later(30, late.append, True)
        n = await woke
        timer.cancel()
        unsent = t.get_write_buffer_size()
        t.abort()
        await proto.lost
        peer.close()
        return n, late, unsent

    n, late, unsent = aio.run(main())
    assert (n, late) == (sum(range(200_000)), [])
    assert unsent > 0           # the send was still waiting on the peer


def test_write_eof_waits_for_the_queue_and_the_other_way_stays_open():
    total = 1 << 20
    data = pattern(total, 3)

    async def main():
        t, p, peer = await tcp_transport(Ends, sndbuf=16384)
        t.write(data)                           # queued: the socket takes 16 KiB at a time
        assert t.get_write_buffer_size() == total
        t.write_eof()
        got, end = await asyncio.get_running_loop().run_in_executor(None, read_to_eof, peer)
        peer.sendall(b"still listening?")
        while bytes(p.got) != b"still listening?":
            await asyncio.sleep(0.005)
        t.close()
        await p.lost
        peer.close()
        return got, end, t.get_write_buffer_size()

    got, end, left = aio.run(main())
    assert (got == data, end, left) == (True, "eof", 0)


def test_abort_with_a_send_in_flight_to_a_peer_that_never_reads_ends_at_once():
    async def main():
        loop = asyncio.get_running_loop()
        t, p, peer = await tcp_transport(Ends, sndbuf=16384)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        t.write(b"x" * (4 << 20))               # far more than both buffers hold
        for _ in range(5):
            await asyncio.sleep(0)
        assert t._io.busy()                     # the send waits in the kernel
        t.abort()
        exc = await asyncio.wait_for(p.lost, 10)
        in_flight = loop._ops.in_flight()
        got, end = await loop.run_in_executor(None, read_to_eof, peer)
        peer.close()
        return exc, in_flight, len(got), end

    exc, in_flight, n, end = aio.run(main())
    assert (exc, in_flight) == (None, 0)
    assert n < 4 << 20 and end in ("eof", "reset")


def test_a_reset_peer_fails_the_write_and_ends_the_transport():
    async def main():
        t, p, peer = await tcp_transport(Ends)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        peer.close()                            # RST
        for _ in range(100):
            if p.lost.done():
                break
            t.write(b"y" * 65536)
            await asyncio.sleep(0.01)
        exc = await asyncio.wait_for(p.lost, 10)
        return exc, t.is_closing()

    exc, closing = aio.run(main())
    assert isinstance(exc, (ConnectionResetError, BrokenPipeError)), exc
    assert closing


chunk = st.tuples(st.integers(0, 150_000), st.sampled_from(["bytes", "bytearray", "memoryview"]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(chunk, max_size=12), st.sampled_from(["close", "write_eof"]),
       st.sampled_from([None, 8192]))
def test_any_chunking_arrives_whole_and_in_order(chunks, end_with, sndbuf):
    # The writer reuses its bytearray after each write: the transport must
    # have copied what it had not sent yet.
    async def main():
        t, p, peer = await tcp_transport(Ends, sndbuf=sndbuf)
        reader = asyncio.get_running_loop().run_in_executor(None, read_to_eof, peer)
        want = bytearray()
        scratch = bytearray(150_000)
        for i, (n, kind) in enumerate(chunks):
            piece = pattern(n, i)
            want += piece
            if kind == "bytes":
                t.write(piece)
            else:
                scratch[:n] = piece
                t.write(scratch[:n] if kind == "bytearray" else memoryview(scratch)[:n])
                scratch[:n] = bytes(n)          # reused at once
        if end_with == "close":
            t.close()
        else:
            t.write_eof()
        got, end = await reader
        if end_with == "write_eof":
            t.close()
        await asyncio.wait_for(p.lost, 20)
        peer.close()
        return got == bytes(want), end

    assert aio.run(main()) == (True, "eof")


class ChoppyBuffers(asyncio.BufferedProtocol):
    """A BufferedProtocol whose get_buffer() gives buffers of the sizes
    listed, in turn, a fresh one each time, and that pauses reading after
    every `pause_every`-th buffer_updated() (0: never) until the next turn."""

    def __init__(self, sizes, pause_every):
        self.sizes = sizes
        self.pause_every = pause_every
        self.calls = 0
        self.got = bytearray()
        self.buf = None
        self.ended = asyncio.get_running_loop().create_future()

    def connection_made(self, t):
        self.t = t

    def get_buffer(self, sizehint):
        self.buf = bytearray(self.sizes[self.calls % len(self.sizes)])
        return self.buf

    def buffer_updated(self, n):
        self.got += self.buf[:n]
        self.buf = None                 # given back: the next bytes need a new one
        self.calls += 1
        if self.pause_every and self.calls % self.pause_every == 0:
            self.t.pause_reading()
            asyncio.get_running_loop().call_soon(self.t.resume_reading)

    def eof_received(self):
        self.ended.set_result(None)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=6),
       st.lists(st.integers(1, 5000), min_size=1, max_size=5), st.integers(0, 4))
def test_a_buffered_protocol_gets_every_byte_whatever_its_buffers_and_pauses(
        pieces, sizes, pause_every):
    # Bytes received into the pool are copied into the buffers get_buffer()
    # gives when they are there: what does not fit goes to the next one,
    # and what is left when buffer_updated() pauses waits for the resume.
    async def main():
        t, p, peer = await tcp_transport(lambda: ChoppyBuffers(sizes, pause_every))
        want = b"".join(pattern(n, i) for i, n in enumerate(pieces))
        for i, n in enumerate(pieces):
            peer.sendall(pattern(n, i))
        peer.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(p.ended, 20)
        t.close()
        peer.close()
        return bytes(p.got) == want

    assert aio.run(main())


def stalled_pair():
    """A loopback_pair() whose buffers a peer that does not read fills soon."""
    return loopback_pair(65536, 65536)


def test_sock_sendfile_splices_and_stalled_peers_cost_no_cpu(tmp_path):
    # 16 sendfiles to peers that do not read: each waits on a POLLOUT in the
    # ring, not in a thread and not in a retry loop; then the peers read and
    # every byte arrives.
    blob = tmp_path / "blob"
    data = pattern(3 << 20, 5)
    blob.write_bytes(data)
    n = 16

    async def main():
        loop = asyncio.get_running_loop()
        pairs = [stalled_pair() for _ in range(n)]
        files = [open(blob, "rb") for _ in range(n)]
        before = loop._ops.stats()["completed"]
        tasks = [asyncio.ensure_future(loop.sock_sendfile(c, f, 1000 + i, None))
                 for i, ((c, _), f) in enumerate(zip(pairs, files))]
        await asyncio.sleep(0.3)                # every one stalls on its full socket
        cpu0 = sum(os.times()[:2])
        await asyncio.sleep(1.0)                # the window: nothing may run
        stalled_cpu = sum(os.times()[:2]) - cpu0
        assert not any(t.done() for t in tasks)
        got = await asyncio.gather(*[loop.run_in_executor(None, read_exactly, p, len(data) - 1000 - i)
                                     for i, (_, p) in enumerate(pairs)])
        sent = await asyncio.gather(*tasks)
        positions = [f.tell() for f in files]
        splices = loop._ops.stats()["completed"] - before
        for (c, p), f in zip(pairs, files):
            c.close()
            p.close()
            f.close()
        return stalled_cpu, got, sent, positions, splices

    stalled_cpu, got, sent, positions, splices = aio.run(main())
    assert stalled_cpu < 0.2, stalled_cpu
    for i in range(n):
        assert got[i] == data[1000 + i:], i
        assert sent[i] == len(data) - 1000 - i
        assert positions[i] == len(data)
    assert splices >= 2 * n                     # file -> pipe -> socket, as completions


def read_exactly(sock, n):
    out = bytearray()
    while len(out) < n:
        data = sock.recv(min(65536, n - len(out)))
        if not data:
            break
        out += data
    return bytes(out)


def test_cancelled_sock_sendfile_leaves_the_file_at_what_was_sent(tmp_path):
    blob = tmp_path / "blob"
    data = pattern(4 << 20, 9)
    blob.write_bytes(data)

    async def main():
        loop = asyncio.get_running_loop()
        conn, peer = stalled_pair()
        with open(blob, "rb") as f:
            task = asyncio.ensure_future(loop.sock_sendfile(conn, f, 0, None))
            await asyncio.sleep(0.2)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            pos = f.tell()
            for _ in range(100):
                if loop._ops.in_flight() == 0:
                    break
                await asyncio.sleep(0.01)
            in_flight = loop._ops.in_flight()
        conn.close()
        got, end = await loop.run_in_executor(None, read_to_eof, peer)
        peer.close()
        return pos, in_flight, got

    pos, in_flight, got = aio.run(main())
    assert in_flight == 0
    assert 0 < pos < len(data)
    assert got == data[:len(got)] and len(got) >= pos
