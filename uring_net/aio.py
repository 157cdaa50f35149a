"""An asyncio event loop on io_uring, activated the way uvloop is.

    import uring_net.aio
    uring_net.aio.run(main())                                  # or:
    asyncio.Runner(loop_factory=uring_net.aio.new_event_loop)  # 3.11
    asyncio.run(main(), loop_factory=uring_net.aio.new_event_loop)  # 3.12+
    uring_net.aio.install()     # the policy, where asyncio still has policies

What is a completion here, not readiness plus a syscall:
- ``sock_recv``, ``sock_recv_into``, ``sock_accept``, ``sock_connect``, and
  ``sock_sendall`` once the socket's buffer is full (a first ``send`` is
  tried at once, as asyncio does);
- the reading side of every stream transport (``create_connection``,
  ``create_server``, ``open_connection``, ``start_server``, and TLS on top of
  them): a receive stays in the kernel while the transport reads, into a
  shared pool of buffers for a ``Protocol``, straight into the buffer
  ``get_buffer()`` returned for a ``BufferedProtocol``.

Everything else -- ``add_reader``/``add_writer``, writes a socket accepts
at once, subprocess pipes, signals through the wake-up fd, datagrams -- is
asyncio's own selector code on ``UringSelector``, so on the same ring's polls.

Where io_uring cannot be set up (seccomp, ``kernel.io_uring_disabled``, an
old kernel) ``new_event_loop()`` returns asyncio's loop on ``EpollSelector``,
with one RuntimeWarning saying why. docs/python.md has the details and the
measured figures.
"""

import asyncio
import errno
import os
import socket
import struct
import sys
import warnings
from asyncio import base_events, selector_events, unix_events

from ._core import LoopOps
from .selectors import UringSelector, uring_available

__all__ = ["Loop", "new_event_loop", "run", "install", "EventLoopPolicy"]

_ECANCELED = errno.ECANCELED
_retry = frozenset((errno.EAGAIN, errno.EINTR, errno.ENOBUFS))


def _error(res):
    """The OSError subclass asyncio's own calls would raise for -res."""
    return OSError(-res, os.strerror(-res))


def _pack_sockaddr(family, address):
    """struct sockaddr for CONNECT, or None for a family left to asyncio."""
    if family == socket.AF_INET:
        host, port = address[:2]
        return (struct.pack("=H", family) + struct.pack("!H", port)
                + socket.inet_pton(family, host) + bytes(8))
    if family == socket.AF_INET6:
        host, port = address[:2]
        flowinfo = address[2] if len(address) > 2 else 0
        scope_id = address[3] if len(address) > 3 else 0
        return (struct.pack("=H", family) + struct.pack("!HI", port, flowinfo)
                + socket.inet_pton(family, host) + struct.pack("=I", scope_id))
    if family == socket.AF_UNIX:
        path = os.fsencode(address) if not isinstance(address, (bytes, bytearray)) else bytes(address)
        if not path.startswith(b"\0"):
            path += b"\0"           # the abstract namespace is counted, not terminated
        return struct.pack("=H", family) + path
    return None


class _UringSocketTransport(selector_events._SelectorSocketTransport):
    """asyncio's socket transport, reading by completions.

    One receive is in the kernel while the transport reads. pause_reading(),
    close() and EOF-with-keep-open cancel it (through the loop's
    _remove_reader); bytes that still arrive while paused are held and
    delivered on resume_reading(). The socket is closed only after that
    receive has completed: an op in flight holds the file, and closing
    under it would delay the FIN until the kernel let go."""

    _recv_waiter = None         # the completion callback of the receive in flight
    _recv_slot = -1
    _held = None                # a result that came while not reading
    _held_due = False           # _deliver_held is scheduled
    _rbuf = None                # without the pool: this transport's receive buffer
    _lost = None                # (exc,): connection_lost waits for the receive

    def set_protocol(self, protocol):
        super().set_protocol(protocol)
        # Asked once here, not per completion.
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)

    def _add_reader(self, fd, callback, *args):
        # asyncio's transport registers its reader here (at start and on
        # resume_reading); this one submits a receive instead.
        if self.is_reading():
            self._start_recv()

    def _start_recv(self):
        if self._recv_waiter is not None or self._conn_lost:
            return
        if self._held is not None:
            # What came while paused goes first, from a callback of its own
            # (resume_reading() may be called from data_received()); no new
            # receive until it is delivered, so bytes stay in order.
            if not self._held_due:
                self._held_due = True
                self._loop.call_soon(self._deliver_held)
            return
        waiter = self._recv_done
        ops = self._loop._ops
        if self._buffered:
            try:
                buf = self._protocol.get_buffer(-1)
                if not len(buf):
                    raise RuntimeError('get_buffer() returned an empty buffer')
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, 'Fatal error: protocol.get_buffer() call failed.')
                return
            self._recv_slot = ops.recv(self._sock_fd, buf, waiter)
        elif self._loop._pooled:
            self._recv_slot = ops.recv_pooled(self._sock_fd, waiter)
        else:
            # No pool (Linux < 5.19): one buffer per transport, made once, not
            # a zeroed 256 KiB per receive.
            if self._rbuf is None:
                self._rbuf = bytearray(self.max_size)
            self._recv_slot = ops.recv(self._sock_fd, self._rbuf, waiter)
        self._recv_waiter = waiter

    def _deliver_held(self):
        self._held_due = False
        if self._held is not None and self.is_reading():
            held, self._held = self._held, None
            self._deliver(held)

    def _stop_recv(self):
        if self._recv_waiter is not None:
            self._loop._ops.cancel(self._recv_slot, self._recv_waiter)

    def _recv_done(self, res):
        self._recv_waiter = None
        if self._lost is not None:
            exc, = self._lost
            self._lost = None
            super()._call_connection_lost(exc)
            return
        if self._conn_lost:
            return
        if res == -_ECANCELED:
            return
        if not self.is_reading():
            if self._closing:
                return          # close() discards what is still to come
            self._held = res    # paused: keep it for resume_reading()
            return
        self._deliver(res)

    def _deliver(self, res):
        if self._conn_lost:
            return
        if type(res) is int:
            if res < 0:
                if -res in _retry:
                    # ENOBUFS: every pool buffer was taken in one batch; they
                    # are back by the next iteration.
                    self._loop.call_soon(self._start_recv)
                    return
                self._fatal_error(_error(res), 'Fatal read error on socket transport')
                return
            if res == 0:
                self._read_ready__on_eof()
                return
            # Into the protocol's buffer (BufferedProtocol), or our bytearray.
            if self._buffered:
                try:
                    self._protocol.buffer_updated(res)
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    self._fatal_error(exc, 'Fatal error: protocol.buffer_updated() call failed.')
                    return
            else:
                self._data_received(bytes(memoryview(self._rbuf)[:res]))
        elif not res:
            self._read_ready__on_eof()
            return
        else:
            self._data_received(res)
        if self.is_reading():
            self._start_recv()

    def _data_received(self, data):
        try:
            self._protocol.data_received(data)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, 'Fatal error: protocol.data_received() call failed.')

    def _call_connection_lost(self, exc):
        if self._recv_waiter is not None:
            # Cancel first, then close: _recv_done finishes this.
            self._lost = (exc,)
            self._stop_recv()
            return
        super()._call_connection_lost(exc)


class Loop(unix_events._UnixSelectorEventLoop):
    """asyncio's Unix selector loop on a UringSelector, with the socket
    operations and stream transports' reads as io_uring completions."""

    def __init__(self, selector=None):
        if selector is None:
            selector = UringSelector()
        super().__init__(selector)
        self._ops = LoopOps(selector._polls)
        self._pooled, why = self._ops.pool_available()
        if not self._pooled:
            warnings.warn(f"uring_net.aio: no receive buffer pool ({why}); each stream "
                          f"transport reads into a buffer of its own", RuntimeWarning)
        self._recv_stash = {}       # fd -> bytes a cancelled sock_recv received
        self._accept_stash = {}     # fd -> [fds] a cancelled sock_accept accepted

    # -- the completions -------------------------------------------------

    def _process_events(self, event_list):
        if event_list:
            super()._process_events(event_list)
        for waiter, res in self._ops.take_done():
            try:
                waiter(res)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self.call_exception_handler({
                    'message': 'Exception in an io_uring completion callback',
                    'exception': exc})

    def _remove_reader(self, fd):
        t = self._transports.get(fd)
        if t is not None and type(t) is _UringSocketTransport:
            t._stop_recv()
        return super()._remove_reader(fd)

    def _make_socket_transport(self, sock, protocol, waiter=None, *, extra=None, server=None):
        return _UringSocketTransport(self, sock, protocol, waiter, extra, server)

    def close(self):
        super().close()
        for fds in self._accept_stash.values():
            for fd in fds:
                os.close(fd)
        self._accept_stash.clear()
        self._recv_stash.clear()

    def stats(self):
        """The ring work done so far: the selector's polls and the loop's ops."""
        return {"polls": self._selector.stats(), "ops": self._ops.stats()}

    async def _op(self, start, on_cancel=None):
        """Submit an op (start(waiter) -> slot) and wait for its result. A
        cancelled wait cancels the op; on_cancel(res) then gets a result the
        kernel still produced, so nothing it did is lost."""
        fut = self.create_future()

        def waiter(res):
            if fut.cancelled():
                if on_cancel is not None:
                    on_cancel(res)
            else:
                fut.set_result(res)

        slot = start(waiter)
        try:
            return await fut
        except asyncio.CancelledError:
            self._ops.cancel(slot, waiter)
            raise

    def _check_sock(self, sock):
        base_events._check_ssl_socket(sock)
        if self._debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")

    async def sock_recv(self, sock, n):
        self._check_sock(sock)
        fd = sock.fileno()
        if self._recv_stash and fd in self._recv_stash:
            return self._from_stash(fd, n)
        self._ensure_fd_no_transport(fd)
        if n <= 0:
            return await super().sock_recv(sock, n)

        def keep(res):      # a cancelled receive that still got bytes
            if type(res) is bytes and res:
                self._recv_stash[fd] = self._recv_stash.get(fd, b"") + res

        if self._pooled:
            # From the pool, at most n bytes: no n-byte buffer to allocate and
            # fault in per call (asyncio asks for 256 KiB).
            while True:
                res = await self._op(lambda w: self._ops.recv_pooled(fd, w, n), keep)
                if type(res) is bytes:
                    return res
                if res != -errno.ENOBUFS:
                    raise _error(res)
                await asyncio.sleep(0)      # every buffer was taken in one batch
        buf = bytearray(n)

        def keep_own(res):
            if res > 0:
                self._recv_stash[fd] = self._recv_stash.get(fd, b"") + bytes(buf[:res])

        res = await self._op(lambda w: self._ops.recv(fd, buf, w), keep_own)
        if res < 0:
            raise _error(res)
        del buf[res:]
        return bytes(buf)

    def _from_stash(self, fd, n):
        data = self._recv_stash.pop(fd)
        if len(data) > n:
            self._recv_stash[fd] = data[n:]
        return data[:n]

    async def sock_recv_into(self, sock, buf):
        self._check_sock(sock)
        fd = sock.fileno()
        if self._recv_stash and fd in self._recv_stash:
            data = self._from_stash(fd, len(memoryview(buf)))
            memoryview(buf)[:len(data)] = data
            return len(data)
        self._ensure_fd_no_transport(fd)
        # A cancelled receive into the caller's buffer: the caller gave it up
        # with the cancellation, as with any cancelled recv_into.
        res = await self._op(lambda w: self._ops.recv(fd, buf, w))
        if res < 0:
            raise _error(res)
        return res

    async def sock_sendall(self, sock, data):
        self._check_sock(sock)
        try:
            n = sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        view = memoryview(data).cast("B")
        if n == len(view):
            return
        fd = sock.fileno()
        self._ensure_fd_no_transport(fd)
        view = view[n:]
        while view:
            part = view
            res = await self._op(lambda w: self._ops.send(fd, part, w))
            if res < 0:
                raise _error(res)
            view = view[res:]

    async def sock_accept(self, sock):
        self._check_sock(sock)
        fd = sock.fileno()
        stash = self._accept_stash.get(fd)
        if not stash:
            self._ensure_fd_no_transport(fd)

            def keep(res):      # accepted after all: the next sock_accept gets it
                if res >= 0:
                    self._accept_stash.setdefault(fd, []).append(res)

            res = await self._op(lambda w: self._ops.accept(fd, w), keep)
            if res < 0:
                raise _error(res)
        else:
            res = stash.pop(0)
        conn = socket.socket(sock.family, sock.type, sock.proto, fileno=res)
        conn.setblocking(False)
        try:
            address = conn.getpeername()
        except OSError:
            address = "" if sock.family == socket.AF_UNIX else None
        return conn, address

    async def sock_connect(self, sock, address):
        self._check_sock(sock)
        if sock.family == socket.AF_INET or (
                base_events._HAS_IPv6 and sock.family == socket.AF_INET6):
            resolved = await self._ensure_resolved(
                address, family=sock.family, type=sock.type, proto=sock.proto, loop=self)
            _, _, _, _, address = resolved[0]
        try:
            sockaddr = _pack_sockaddr(sock.family, address)
        except (OSError, ValueError, TypeError, struct.error):
            sockaddr = None
        if sockaddr is None:
            return await super().sock_connect(sock, address)
        fd = sock.fileno()
        self._ensure_fd_no_transport(fd)
        res = await self._op(lambda w: self._ops.connect(fd, sockaddr, w))
        if res < 0:
            raise OSError(-res, f"Connect call failed {address}")


def new_event_loop():
    """A uring_net loop, or where io_uring cannot run here asyncio's own loop
    on EpollSelector, with one RuntimeWarning saying why."""
    ok, why = uring_available()
    if ok:
        return Loop()
    _warn_fallback(why)
    return asyncio.SelectorEventLoop()


_warned = False


def _warn_fallback(why):
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"uring_net.aio: io_uring is unavailable ({why}); using asyncio's "
                      f"loop on EpollSelector", RuntimeWarning, stacklevel=3)


def run(main, *, debug=None):
    """asyncio.run(main) on a uring_net loop."""
    if sys.version_info >= (3, 12):
        return asyncio.run(main, debug=debug, loop_factory=new_event_loop)
    with asyncio.Runner(debug=debug, loop_factory=new_event_loop) as runner:
        return runner.run(main)


if sys.version_info < (3, 14):
    # asyncio's policies are deprecated from 3.14: EventLoopPolicy and
    # install() exist only where they do, and install() warns as uvloop's.

    class EventLoopPolicy(unix_events.DefaultEventLoopPolicy):
        """The policy whose new loops are uring_net loops."""

        def _loop_factory(self):
            return new_event_loop()

    def install():
        """Make asyncio's policy create uring_net loops."""
        if sys.version_info >= (3, 12):
            warnings.warn("uring_net.aio.install() is deprecated in favor of "
                          "uring_net.aio.run() or a loop_factory", DeprecationWarning,
                          stacklevel=2)
        asyncio.set_event_loop_policy(EventLoopPolicy())
else:
    __all__ = ["Loop", "new_event_loop", "run"]
