"""An asyncio event loop on io_uring, activated the way uvloop is.

    import uring_net.aio
    uring_net.aio.run(main())                                  # or:
    asyncio.Runner(loop_factory=uring_net.aio.new_event_loop)  # 3.11
    asyncio.run(main(), loop_factory=uring_net.aio.new_event_loop)  # 3.12+
    uring_net.aio.install()     # the policy, where asyncio still has policies

What is a completion here, not readiness plus a syscall:
- ``sock_recv`` and ``sock_recv_into`` when nothing has been received yet
  (bytes already there are taken at once by ``recv``, as asyncio does; a
  socket where that try keeps finding nothing is tried less and less
  often), ``sock_accept``, ``sock_connect``, and ``sock_sendall`` once the
  socket's buffer is full (a first ``send`` is tried at once, as asyncio
  does);
- ``sock_sendfile`` and a transport's ``sendfile``: splices, file -> pipe ->
  socket;
- every stream transport (``create_connection``, ``create_server``,
  ``open_connection``, ``start_server``, and TLS on top of them): a receive
  stays in the kernel while the transport reads, into a shared pool of
  buffers (a ``BufferedProtocol`` gets the bytes copied into the buffer
  ``get_buffer()`` returns once they came, as asyncio asks for it then);
  each write() is queued as a send that goes to the kernel with the loop's
  next wait (cython/stream.pyx).

Everything else -- ``add_reader``/``add_writer``, subprocess pipes, signals
through the wake-up fd, datagrams -- is asyncio's own selector code on
``UringSelector``, so on the same ring's polls. The loop's turn itself
(``_run_once``, ``call_soon``) is asyncio's, step for step, in Cython
(cython/loopcore.pyx).

Where io_uring cannot be set up (seccomp, ``kernel.io_uring_disabled``, an
old kernel) ``new_event_loop()`` returns asyncio's loop on ``EpollSelector``,
with one RuntimeWarning saying why. docs/python.md has the details and the
measured figures.
"""

import asyncio
import errno
import fcntl
import io
import operator
import os
import socket
import struct
import sys
import warnings
import weakref
from asyncio import base_events, exceptions, selector_events, unix_events

from ._core import LoopCore, LoopOps, StreamIO, aio_bind
from .selectors import UringSelector, uring_available

__all__ = ["Loop", "new_event_loop", "run", "install", "EventLoopPolicy"]

aio_bind()      # the extension's loop code takes asyncio's objects from here on

_PIPE_SIZE = 1 << 20        # sendfile's pipe: the bytes one splice pair moves


def _error(res):
    """The OSError subclass asyncio's own calls would raise for -res."""
    return OSError(-res, os.strerror(-res))


def _nbytes(buf):
    with memoryview(buf) as view:
        return view.nbytes


def _copy_into(buf, data):
    """data into the start of buf (any writable buffer, as recv_into takes);
    returns len(data)."""
    with memoryview(buf) as view, view.cast("B") as octets:
        octets[:len(data)] = data
    return len(data)


_PEER_ROOM = 128            # sizeof(struct sockaddr_storage)


def _peer_buffer():
    """Where an ACCEPT puts the peer's address: a socklen_t, then the sockaddr."""
    peer = bytearray(4 + _PEER_ROOM)
    struct.pack_into("=I", peer, 0, _PEER_ROOM)
    return peer


def _unpack_peer(peer, conn):
    """The address accept() would have returned, from _peer_buffer()'s bytes
    (the sockaddr's family is conn's); asyncio's value for a family not
    decoded here, from getpeername()."""
    length = struct.unpack_from("=I", peer)[0]
    raw = bytes(peer[4:4 + min(length, _PEER_ROOM)])
    family = conn.family
    if family == socket.AF_INET and length >= 8:
        return socket.inet_ntop(family, raw[4:8]), struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET6 and length >= 28:
        port, flowinfo = struct.unpack_from("!HI", raw, 2)
        return (socket.inet_ntop(family, raw[8:24]), port, flowinfo,
                struct.unpack_from("=I", raw, 24)[0])
    if family == socket.AF_UNIX:
        path = raw[2:]
        if path[:1] == b"\0":
            return path             # the abstract namespace: bytes, as Python gives
        return os.fsdecode(path.split(b"\0", 1)[0])
    try:
        return conn.getpeername()
    except OSError:
        return None


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


def _io_field(name):
    """A transport attribute of asyncio's that lives in the StreamIO (read
    by an attrgetter: is_closing() and the like stay C calls)."""
    return property(operator.attrgetter("_io." + name),
                    lambda self, value: setattr(self._io, name, value))


class _UringSocketTransport(selector_events._SelectorSocketTransport):
    """asyncio's socket transport with its data path on io_uring.

    The hot path -- each completion, write() -- is a StreamIO (Cython,
    cython/stream.pyx, which says how reads, writes and the end work); this
    class keeps asyncio's code for everything else, and asyncio's state
    attributes below are properties over the StreamIO's fields, so that both
    see one state."""

    _conn_lost = _io_field("conn_lost")
    _closing = _io_field("closing")
    _paused = _io_field("paused")
    _eof = _io_field("eof")
    _empty_waiter = _io_field("empty_waiter")
    _protocol_paused = _io_field("protocol_paused")
    _high_water = _io_field("high_water")
    _low_water = _io_field("low_water")

    @property
    def _buffer(self):
        # What asyncio's close(), write_eof() and _make_empty_waiter() test:
        # the bytes written and not yet sent.
        return self._io.wsize

    @_buffer.setter
    def _buffer(self, value):
        pass            # asyncio's __init__ makes its own: the StreamIO is the buffer

    def __init__(self, loop, sock, protocol, waiter=None, extra=None, server=None):
        self._io = StreamIO(loop._ops, sock.fileno(), self)
        super().__init__(loop, sock, protocol, waiter, extra, server)
        self.write = self._io.write                 # no Python frame per write
        self.writelines = self._io.writelines

    def set_protocol(self, protocol):
        super().set_protocol(protocol)
        self._io.set_protocol(protocol)
        # pause_writing() and resume_writing() come in pairs per protocol: a
        # new protocol (start_tls, sendfile's fallback) was never paused.
        # Bytes stay in the buffer until a send completes here, not only when
        # the socket is full as in asyncio, so a write just before the switch
        # may well have paused the old one.
        self._protocol_paused = False

    def _add_reader(self, fd, callback, *args):
        # asyncio's transport registers its reader here (at start and on
        # resume_reading); this one keeps a receive in the kernel instead.
        self._io.start()

    def get_write_buffer_size(self):
        return self._io.wsize

    def _force_close(self, exc):
        if self._conn_lost:
            return
        self._io.drop_writes()
        if not self._closing:
            self._closing = True
            self._loop._remove_reader(self._sock_fd)
        self._conn_lost += 1
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc):
        if self._io.busy():
            # Cancel first, then close: the last completion calls
            # _connection_lost_now.
            self._io.lose(exc)
            return
        self._connection_lost_now(exc)

    def _connection_lost_now(self, exc):
        try:
            super()._call_connection_lost(exc)
        finally:
            self._io.detach()


class Loop(LoopCore, unix_events._UnixSelectorEventLoop):
    """asyncio's Unix selector loop on a UringSelector, with the socket
    operations and stream transports' data paths as io_uring completions.
    LoopCore (cython/loopcore.pyx) comes first: asyncio's turn, call_soon
    and create_future, in C, on its state in C fields."""

    def __init__(self, selector=None):
        if selector is None:
            selector = UringSelector()
        super().__init__(selector)
        self._ops = LoopOps(selector._polls)
        if type(selector) is UringSelector:
            self._polls = selector._polls   # select() without its Python frame
        pooled, why = self._ops.pool_available()
        if not pooled:
            warnings.warn(f"uring_net.aio: no receive buffer pool ({why}); each stream "
                          f"transport reads into a buffer of its own", RuntimeWarning)
        self._recv_stash = {}       # fd -> [ref to the socket, bytes]: _keep_bytes
        self._recv_owed = {}        # fd -> [n, future]: n cancelled receives not back yet
        _live_loops.add(self)
        self._accept_stash = {}     # fd -> [ref to the listener, [(fd, peer)]]: _keep_conn

    # -- the completions -------------------------------------------------

    def _remove_reader(self, fd):
        t = self._transports.get(fd)
        if t is not None and type(t) is _UringSocketTransport:
            t._io.stop()
        return super()._remove_reader(fd)

    def _make_socket_transport(self, sock, protocol, waiter=None, *, extra=None, server=None):
        transport = _UringSocketTransport(self, sock, protocol, waiter, extra, server)
        if self._recv_stash and self._kept_bytes(sock):
            # A cancelled sock_recv's bytes are the stream's first.
            transport._io.hold(self._recv_stash.pop(sock.fileno())[1])
        return transport

    def close(self):
        super().close()
        self._polls = None
        for fd in list(self._accept_stash):
            self._drop_conns(fd)
        self._recv_stash.clear()
        self._forget_owed()

    def stats(self):
        """The ring work done so far: the selector's polls and the loop's ops."""
        return {"polls": self._selector.stats(), "ops": self._ops.stats()}

    # -- what cancelled operations still got -------------------------------
    # A receive or an accept cancelled as the kernel completed it still took
    # bytes or a connection. They are kept for the next operation on the same
    # socket object: once that socket is closed its fd number may go to
    # another socket, which must never get them.

    def _keep_bytes(self, sock, data):
        fd = sock.fileno()
        if fd < 0:
            return                  # closed meanwhile: gone with it
        if self._kept_bytes(sock):
            self._recv_stash[fd][1] += data
        else:
            self._recv_stash[fd] = [weakref.ref(sock), data]

    def _kept_bytes(self, sock):
        """Whether bytes are kept for sock; another socket's, that had the
        same fd number, are dropped."""
        fd = sock.fileno()
        entry = self._recv_stash.get(fd)
        if entry is None:
            return False
        if entry[0]() is sock:
            return True
        del self._recv_stash[fd]
        return False

    def _from_stash(self, sock, n):
        fd = sock.fileno()
        entry = self._recv_stash[fd]
        data = entry[1]
        if len(data) > n:
            entry[1] = data[n:]
        else:
            del self._recv_stash[fd]
        return data[:n]

    def _keep_conn(self, sock, conn_fd, peer):
        fd = sock.fileno()
        entry = self._accept_stash.get(fd)
        if entry is not None and entry[0]() is sock:
            entry[1].append((conn_fd, peer))
            return
        if fd < 0:
            os.close(conn_fd)       # the listener is closed: as its backlog would be
            return
        self._drop_conns(fd)
        # Should the listener go away unused, so do its connections.
        ref = weakref.ref(sock, lambda ref, fd=fd: self._drop_conns(fd, ref))
        self._accept_stash[fd] = [ref, [(conn_fd, peer)]]

    def _kept_conn(self, sock):
        """A connection kept for listener sock, (fd, peer), or None; another
        listener's, that had the same fd number, are closed."""
        fd = sock.fileno()
        entry = self._accept_stash.get(fd)
        if entry is None:
            return None
        if entry[0]() is not sock:
            self._drop_conns(fd)
            return None
        conn = entry[1].pop(0)
        if not entry[1]:
            del self._accept_stash[fd]
        return conn

    def _drop_conns(self, fd, ref=None):
        entry = self._accept_stash.get(fd)
        if entry is not None and (ref is None or entry[0] is ref):
            del self._accept_stash[fd]
            for conn_fd, _ in entry[1]:
                os.close(conn_fd)

    async def _op(self, start, on_cancel=None, owed_fd=-1):
        """Submit an op (start(waiter) -> slot) and wait for its result. A
        cancelled wait cancels the op; on_cancel(res) then gets a result the
        kernel still produced, so nothing it did is lost. With owed_fd, the
        next sock_recv on that fd waits for that result first (_recv_owed)."""
        fut = self.create_future()
        owed = False

        def waiter(res):
            nonlocal owed
            if fut.cancelled():
                if on_cancel is not None:
                    on_cancel(res)
                if owed:
                    owed = False
                    self._owed_back(owed_fd)
            else:
                fut.set_result(res)

        slot = start(waiter)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # Cancelled after the result came, before this task ran
                # again: the op is done and its result is real.
                if on_cancel is not None:
                    on_cancel(fut.result())
            elif self._ops.cancel(slot, waiter) and owed_fd >= 0:
                owed = True         # its completion is still to come
                entry = self._recv_owed.get(owed_fd)
                if entry is None:
                    self._recv_owed[owed_fd] = [1, self.create_future()]
                else:
                    entry[0] += 1
            raise

    # A cancelled receive may have taken bytes whose completion the loop has
    # not harvested yet: another cancel's submit in the same turn can run
    # it. Until it is back (its bytes in _recv_stash), a new sock_recv on the
    # fd would take the bytes after them first; so it waits for it.
    def _owed_back(self, fd):
        entry = self._recv_owed.get(fd)
        if entry is None:
            return              # forgotten (_forget_owed)
        entry[0] -= 1
        if entry[0] == 0:
            del self._recv_owed[fd]
            if not entry[1].done():
                entry[1].set_result(None)

    def _forget_owed(self):
        # The ring is gone (closed; in a fork's child, the parent's): the
        # cancelled receives will not come back here.
        owed, self._recv_owed = self._recv_owed, {}
        for _, fut in owed.values():
            if not fut.done():
                fut.set_result(None)

    def _check_sock(self, sock):
        base_events._check_ssl_socket(sock)
        if self._debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")

    async def sock_recv(self, sock, n):
        self._check_sock(sock)
        fd = sock.fileno()
        if self._recv_owed and fd in self._recv_owed:
            # A cancelled receive's bytes go first. (Shielded: the future is
            # every waiter's, and cancelling one waiter must not cancel it.)
            await asyncio.shield(self._recv_owed[fd][1])
        if self._recv_stash and self._kept_bytes(sock):
            return self._from_stash(sock, n)
        if n <= 0:
            return await super().sock_recv(sock, n)
        # What is already there is taken now, as asyncio does: no op, no wait
        # (and, as in asyncio, no look for a transport on the fd first).
        res = self._ops.try_recv(fd, n)
        if res is not None:
            if type(res) is bytes:
                return res
            raise _error(res)
        return await self._sock_recv_op(sock, fd, n)

    # (The waits of sock_recv and sock_sendall are methods of their own:
    # their closures' variables would otherwise be cells made on every call,
    # the calls that never wait included.)
    async def _sock_recv_op(self, sock, fd, n):
        self._ensure_fd_no_transport(fd)

        def keep(res):      # a cancelled receive that still got bytes
            if type(res) is bytes and res:
                self._keep_bytes(sock, res)

        if self._ops.pooled:
            # From the pool, at most n bytes: no n-byte buffer to allocate and
            # fault in per call (asyncio asks for 256 KiB).
            while True:
                res = await self._op(lambda w: self._ops.recv_pooled(fd, w, n), keep, fd)
                if type(res) is bytes:
                    return res
                if res != -errno.ENOBUFS:
                    raise _error(res)
                await asyncio.sleep(0)      # every buffer was taken in one batch
        buf = bytearray(n)

        def keep_own(res):
            if res > 0:
                self._keep_bytes(sock, bytes(buf[:res]))

        res = await self._op(lambda w: self._ops.recv(fd, buf, w), keep_own, fd)
        if res < 0:
            raise _error(res)
        del buf[res:]
        return bytes(buf)

    async def sock_recv_into(self, sock, buf):
        self._check_sock(sock)
        fd = sock.fileno()
        if self._recv_owed and fd in self._recv_owed:
            await asyncio.shield(self._recv_owed[fd][1])     # as in sock_recv
        if self._recv_stash and self._kept_bytes(sock):
            return _copy_into(buf, self._from_stash(sock, _nbytes(buf)))
        res = self._ops.try_recv_into(fd, buf)
        if res is not None:
            if res >= 0:
                return res
            raise _error(res)
        return await self._sock_recv_into_op(sock, fd, buf)

    async def _sock_recv_into_op(self, sock, fd, buf):
        # Not into the caller's buffer: the kernel may still fill that after
        # a cancellation, and the caller would neither know how much nor get
        # those bytes from the next receive. Received as sock_recv does, so a
        # cancelled receive's bytes go to the next one on the socket (asyncio
        # reads only once readable, so its cancel never loses bytes either),
        # then copied.
        n = _nbytes(buf)
        if n == 0:
            return 0        # (a try skipped while the socket backs off)
        return _copy_into(buf, await self._sock_recv_op(sock, fd, n))

    async def sock_sendall(self, sock, data):
        self._check_sock(sock)
        try:
            n = sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        if n and type(data) is bytes and n == len(data):
            return                  # all of it, the usual case: no view to make
        view = memoryview(data).cast("B")
        if n == len(view):
            return
        await self._sock_send_op(sock.fileno(), view[n:])

    async def _sock_send_op(self, fd, view):
        self._ensure_fd_no_transport(fd)
        while view:
            part = view
            res = await self._op(lambda w: self._ops.send(fd, part, w))
            if res < 0:
                raise _error(res)
            view = view[res:]

    async def sock_accept(self, sock):
        self._check_sock(sock)
        fd = sock.fileno()
        self._ensure_fd_no_transport(fd)
        kept = self._kept_conn(sock) if self._accept_stash else None
        if kept is None:
            peer = _peer_buffer()

            def keep(res):      # accepted after all: the next sock_accept gets it
                if res >= 0:
                    self._keep_conn(sock, res, peer)

            res = await self._op(lambda w: self._ops.accept(fd, w, peer), keep)
            if res < 0:
                raise _error(res)
        else:
            res, peer = kept
        conn = socket.socket(sock.family, sock.type, sock.proto, fileno=res)
        conn.setblocking(False)
        return conn, _unpack_peer(peer, conn)

    async def _sock_sendfile_native(self, sock, file, offset, count):
        # sock_sendfile(), and a transport's sendfile(), through splice:
        # file -> pipe -> socket, each a completion, so the loop's thread
        # neither copies the bytes nor waits on the disk. The socket side
        # waits for room in the ring (a linked POLLOUT), not in a thread.
        try:
            fileno = file.fileno()
            fsize = os.fstat(fileno).st_size
        except (AttributeError, io.UnsupportedOperation, OSError):
            raise exceptions.SendfileNotAvailableError("not a regular file")
        if not (count or fsize):
            return 0  # empty file
        fd = sock.fileno()
        self._ensure_fd_no_transport(fd)
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        total = 0
        try:
            try:
                cap = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
            except OSError:
                cap = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)  # fs.pipe-max-size is lower
            while not count or total < count:
                want = cap if not count else min(cap, count - total)
                # file -> pipe (empty, so it takes `want`), at the file offset
                got = await self._op(
                    lambda waiter: self._ops.splice(fileno, offset + total, w, want, waiter))
                if got == 0:
                    break                   # end of the file
                if got < 0:
                    if total == 0:
                        raise exceptions.SendfileNotAvailableError(
                            f"splice from the file failed: {os.strerror(-got)}")
                    raise _error(got)
                while got:                  # pipe -> socket, once it has room
                    res = await self._op(
                        lambda waiter: self._ops.splice(r, -1, fd, got, waiter, True))
                    if res == -errno.EAGAIN:
                        continue            # room taken again before the splice ran
                    if res < 0:
                        if total == 0 and res in (-errno.EINVAL, -errno.ENOTSOCK):
                            raise exceptions.SendfileNotAvailableError(
                                f"splice to the socket failed: {os.strerror(-res)}")
                        if res == -errno.ENOTCONN:
                            raise ConnectionError("socket is not connected", errno.ENOTCONN)
                        raise _error(res)
                    got -= res
                    total += res
            return total
        finally:
            if total > 0:
                os.lseek(fileno, offset + total, os.SEEK_SET)
            os.close(r)
            os.close(w)

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
        if res == -errno.EALREADY:
            # An earlier connect on this socket, whose wait was cancelled, is
            # still going on in the kernel: wait for it as asyncio would
            # (writable, then SO_ERROR).
            return await super().sock_connect(sock, address)
        if res < 0:
            raise OSError(-res, f"Connect call failed {address}")


# fork() leaves the ring to the parent (uring_net.selectors): in the child,
# cancelled receives never come back.
_live_loops = weakref.WeakSet()


def _after_fork_in_child():
    for loop in list(_live_loops):
        loop._forget_owed()


os.register_at_fork(after_in_child=_after_fork_in_child)


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
