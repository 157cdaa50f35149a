# StreamIO: the data path of uring_net.aio's socket transport, in Cython so
# that a completion costs the protocol call asyncio's semantics require
# (data_received, or get_buffer and buffer_updated) and no other Python:
# LoopOps.dispatch calls completed() directly, the protocol's methods were
# looked up once, and the transport's state is in C fields.
#
# The transport (uring_net/aio.py, _UringSocketTransport) keeps asyncio's own
# code for the cold paths -- construction, close, abort, errors, pause and
# resume, TLS and sendfile hooks -- and its state attributes (_conn_lost,
# _closing, _paused, _eof, ...) are properties over the fields here, so both
# see one state.
#
# Reading: one receive is in the kernel while the transport reads, into the
# loop's shared pool, or, without a pool, into a buffer of the transport's
# own. A Protocol gets those bytes; a BufferedProtocol gets them copied into
# the buffer get_buffer() returns once they came, as asyncio's loops ask for
# it (a buffer asked for when the receive went in may since have been handed
# on or compacted by the protocol). pause_reading() cancels the receive;
# results that come meanwhile are held, in order, and delivered on resume.
# (A multishot receive, armed once for many messages, was measured slower:
# docs/architecture.md, "Measured and rejected".)
#
# Writing: write() queues the bytes and prepares a SEND at once; it reaches
# the kernel with the loop's next io_uring_enter, the one that also waits,
# so a write costs no syscall of its own. One send is in flight per
# transport; what is written meanwhile is joined and sent when it completes,
# and a short send resumes where it stopped. A send that took the last byte,
# with nothing waiting on it, is finished in the harvest (send_quiet), so
# the loop does not turn for it. The FIN of write_eof() and the
# connection_lost of close() wait until every byte is out.
#
# The socket is closed only once no op on it is in flight: an op holds the
# file, and a close under it would delay the FIN until the kernel let go.
# So a transport that ends cancels first and closes in the last completion.

from cpython.bytearray cimport PyByteArray_AS_STRING

# asyncio's pieces, bound when uring_net.aio is imported (aio_bind in
# loopcore.pyx), not with the extension: the proxy never uses asyncio, and
# importing it was a third of every proxy's start-up.
cdef object _logger = None
cdef object _BufferedProtocol = None
cdef int _CONNLOST_LOG = 5


cdef int stream_bind() except -1:
    global _logger, _BufferedProtocol, _CONNLOST_LOG
    import logging
    from asyncio import constants, protocols
    _logger = logging.getLogger("asyncio")
    _BufferedProtocol = protocols.BufferedProtocol
    _CONNLOST_LOG = constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES
    return 0

cdef enum:
    RM_POOL = 1     # into the loop's pool: the result is bytes (b"" at EOF)
    RM_OWN = 2      # into self.rbuf: the result is a count

cdef enum:
    OWN_BUF_SIZE = 256 * 1024   # asyncio's max_size


cdef int _protocol_failed(transport, exc, str call) except -1:
    # As asyncio's transports do when a protocol's method raised: SystemExit
    # and KeyboardInterrupt go on up, anything else ends the transport.
    if isinstance(exc, (SystemExit, KeyboardInterrupt)):
        raise exc
    transport._fatal_error(exc, f'Fatal error: protocol.{call}() call failed.')
    return 0


cdef class StreamIO:
    def __cinit__(self, LoopOps ops, int fd, transport):
        self.ops = ops
        self.fd = fd
        self.transport = transport
        self.recv_slot = -1
        self.send_slot = -1
        self.wq = []

    def set_protocol(self, protocol):
        self.protocol = protocol
        self.buffered = isinstance(protocol, _BufferedProtocol)
        if self.buffered:
            self.get_buffer = protocol.get_buffer
            self.buffer_updated = protocol.buffer_updated
            self.data_received = None
        else:
            self.data_received = protocol.data_received
            self.get_buffer = self.buffer_updated = None

    cdef bint reading(self) noexcept:
        return not self.closing and not self.paused

    def busy(self):
        """Whether an op on the socket is still in the kernel."""
        return self.recv_slot >= 0 or self.send_slot >= 0

    # --- reading ----------------------------------------------------------

    def start(self):
        """Read, if the transport reads (its _add_reader)."""
        if self.reading():
            self.start_recv()

    cdef int start_recv(self) except -1:
        if self.recv_slot >= 0 or self.conn_lost or self.transport is None:
            return 0
        if self.held:
            # What came while paused goes first, from a callback of its own
            # (resume_reading() may be called from data_received()); no new
            # receive until it is delivered, so bytes stay in order.
            if not self.held_due:
                self.held_due = True
                self.transport._loop.call_soon(self.deliver_held)
            return 0
        if self.ops.pooled:
            self.recv_slot = self.ops.c_recv_pooled(self.fd, self, 0)
            self.recv_mode = RM_POOL
        else:
            # No pool (Linux < 5.19): one buffer per transport, made once.
            if self.rbuf is None:
                self.rbuf = bytearray(OWN_BUF_SIZE)
            self.recv_slot = self.ops.c_recv(self.fd, self.rbuf, self, 0)
            self.recv_mode = RM_OWN
        return 0

    cdef uint32_t recv_op(self) noexcept:
        return LOP_RECV_POOL if self.recv_mode == RM_POOL else LOP_RECV

    def stop(self):
        """Stop reading (pause, close, EOF kept open): cancel the receive."""
        if self.recv_slot >= 0:
            self.ops.c_cancel(self.recv_slot, self, self.recv_op())

    def deliver_held(self):
        # One result per call: deliver() asks for the next (start_recv), and
        # the protocol may pause again in between.
        self.held_due = False
        if self.held and self.reading() and self.transport is not None:
            self.deliver(self.held.pop(0))

    cdef int completed(self, uint32_t op, object res) except -1:
        if op == LOP_SEND:
            return self.send_done(res)
        return self.recv_done(res)

    cdef int recv_done(self, object res) except -1:
        self.recv_slot = -1
        if self.lost is not None:
            return self.check_lost()
        if self.conn_lost:
            return 0
        if type(res) is int and <long>res == -ECANCELED:
            # Paused, closed, or resumed before the cancel came back: in the
            # last case nothing else would arm the next receive.
            if self.reading():
                self.start_recv()
            return 0
        if not self.reading() or self.held:
            if self.closing:
                return 0            # close() discards what is still to come
            # Paused (kept for resume_reading()), or behind what was.
            if self.held is None:
                self.held = [res]
            else:
                self.held.append(res)
            if self.reading():
                self.start_recv()   # schedules the delivery
            return 0
        return self.deliver(res)

    cdef int deliver(self, object res) except -1:
        cdef long n
        if self.conn_lost:
            return 0
        if type(res) is int:
            n = res
            if n < 0:
                if n == -EAGAIN or n == -EINTR or n == -ENOBUFS:
                    # ENOBUFS: every pool buffer was taken in one batch; they
                    # are back by the next iteration.
                    self.transport._loop.call_soon(self.start)
                    return 0
                self.transport._fatal_error(OSError(-n, os.strerror(-n)),
                                            'Fatal read error on socket transport')
                return 0
            if n == 0:
                self.transport._read_ready__on_eof()
                return 0
            self.feed(PyBytes_FromStringAndSize(<char *>PyByteArray_AS_STRING(self.rbuf), n))
        elif not res:
            self.transport._read_ready__on_eof()
            return 0
        else:
            self.feed(res)
        if self.reading():
            self.start_recv()
        return 0

    cdef int feed(self, object data) except -1:
        if self.buffered:
            return self.feed_buffered(data)
        try:
            self.data_received(data)
        except BaseException as exc:
            _protocol_failed(self.transport, exc, 'data_received')
        return 0

    cdef int feed_buffered(self, bytes data) except -1:
        # Into the buffer get_buffer() returns now, as asyncio's loops do it
        # when the bytes are there: a protocol may hand its buffer on, swap
        # or compact it between callbacks, so one asked for before the
        # receive went in could be stale by the time the bytes came. (What
        # does not fit goes to the next buffer, unless buffer_updated()
        # paused reading: then it is held for resume_reading().)
        cdef Py_buffer view
        cdef Py_ssize_t off = 0, n = len(data), k
        while off < n:
            try:
                buf = self.get_buffer(-1)
                PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
                k = min(view.len, n - off)
                memcpy(view.buf, <char *>data + off, k)
                PyBuffer_Release(&view)
                if k == 0:
                    raise RuntimeError('get_buffer() returned an empty buffer')
            except BaseException as exc:
                return _protocol_failed(self.transport, exc, 'get_buffer')
            try:
                self.buffer_updated(k)
            except BaseException as exc:
                return _protocol_failed(self.transport, exc, 'buffer_updated')
            off += k
            if off < n and (self.conn_lost or not self.reading()):
                if not self.conn_lost and not self.closing:
                    self.hold(data[off:])
                return 0
        return 0

    def hold(self, data):
        """Bytes for the protocol before any received now (a cancelled
        sock_recv's, the rest of what paused it): delivered first, as what
        came while paused is."""
        if self.held is None:
            self.held = [data]
        else:
            self.held.insert(0, data)

    # --- writing ----------------------------------------------------------

    def write(self, data):
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f'data argument must be a bytes-like object, '
                            f'not {type(data).__name__!r}')
        if self.eof:
            raise RuntimeError('Cannot call write() after write_eof()')
        if self.empty_waiter is not None:
            raise RuntimeError('unable to write; sendfile is in progress')
        if not data:
            return
        if self.conn_lost:
            if self.conn_lost >= _CONNLOST_LOG:
                _logger.warning('socket.send() raised exception.')
            self.conn_lost += 1
            return
        if type(data) is not bytes:
            data = bytes(data)      # the caller may reuse its buffer once we return
        self.wq.append(data)
        self.wsize += len(<bytes>data)
        if self.send_slot < 0:
            self.submit_send()
        if self.wsize > self.high_water and not self.protocol_paused:
            self.transport._maybe_pause_protocol()

    def writelines(self, list_of_data):
        self.write(b"".join(list_of_data))

    cdef int submit_send(self) except -1:
        if self.wq_off:
            data = memoryview(self.wq[0])[self.wq_off:]
        else:
            if len(self.wq) > 1:
                self.wq = [b"".join(self.wq)]
            data = self.wq[0]
        self.send_slot = self.ops.c_send(self.fd, data, self, MSG_NOSIGNAL)
        self.sends += 1
        return 0

    cdef int send_done(self, object res) except -1:
        cdef long n = res
        cdef Py_ssize_t off
        self.send_slot = -1
        if self.lost is not None:
            return self.check_lost()
        if self.conn_lost:
            return 0                # aborted: the bytes were dropped with the transport
        if n < 0:
            exc = OSError(-n, os.strerror(-n))
            self.wq = []
            self.wq_off = 0
            self.wsize = 0
            self.transport._fatal_error(exc, 'Fatal write error on socket transport')
            if self.empty_waiter is not None and not self.empty_waiter.done():
                self.empty_waiter.set_exception(exc)
            return 0
        self.wsize -= n
        off = self.wq_off + n
        if off < len(<bytes>self.wq[0]):
            self.send_parts += 1    # a short send: the rest goes next
            self.wq_off = off
        else:
            del self.wq[0]
            self.wq_off = 0
        if self.protocol_paused and self.wsize <= self.low_water:
            self.transport._maybe_resume_protocol()     # may write more
        if self.wq:
            if self.send_slot < 0:
                self.submit_send()
            return 0
        if self.empty_waiter is not None and not self.empty_waiter.done():
            self.empty_waiter.set_result(None)
        if self.closing:
            self.transport._call_connection_lost(None)
        elif self.eof:
            self.transport._sock.shutdown(SHUT_WR)
        return 0

    cdef bint send_quiet(self, int res) noexcept:
        # Called by LoopOps.finish in the harvest, before select() returns:
        # a send that sent the last byte written, on a transport with
        # nothing waiting for that (no paused protocol, drain waiter, close
        # or write_eof), needs no Python. Finishing it there spares the loop
        # a turn per write: the send usually completes inside the
        # io_uring_enter that submitted it, and the loop would otherwise
        # wake for it and go round again before the peer's answer. False:
        # send_done() runs from dispatch() as for any completion.
        if (res <= 0 or self.lost is not None or self.conn_lost or self.closing
                or self.eof or self.protocol_paused or self.empty_waiter is not None
                or len(self.wq) != 1 or self.wq_off + res != len(<bytes>self.wq[0])):
            return False
        self.send_slot = -1
        self.wsize -= res
        self.wq_off = 0
        del self.wq[0]          # (not wq.clear(): Cython makes that a method call)
        return True

    def drop_writes(self):
        """abort(), or a fatal error: what was not sent is dropped, the send
        in flight cancelled (its bytes stay the kernel's until it completes)."""
        self.wq = []
        self.wq_off = 0
        self.wsize = 0
        if self.send_slot >= 0:
            self.ops.c_cancel(self.send_slot, self, LOP_SEND)

    # --- the end ------------------------------------------------------------

    def lose(self, exc):
        """connection_lost(exc) once no op is in flight: cancel them, the
        last completion finishes it (the transport's _connection_lost_now)."""
        self.lost = (exc,)
        if self.recv_slot >= 0:
            self.ops.c_cancel(self.recv_slot, self, self.recv_op())
        if self.send_slot >= 0:
            self.ops.c_cancel(self.send_slot, self, LOP_SEND)

    cdef int check_lost(self) except -1:
        if self.recv_slot >= 0 or self.send_slot >= 0:
            return 0
        exc, = self.lost
        self.lost = None
        self.transport._connection_lost_now(exc)
        return 0

    def detach(self):
        """The transport is gone: drop every reference that could hold it."""
        self.transport = None
        self.protocol = self.data_received = self.get_buffer = None
        self.buffer_updated = None
        self.wq = []
        self.held = None
        self.rbuf = None
        self.empty_waiter = None

    def stats(self):
        return {"sends": self.sends, "short_sends": self.send_parts}
