# LoopOps: the operations uring_net.aio's event loop hands to the kernel
# whole -- recv, send, accept, connect, splice -- on the ring of its
# selector's PollSet, so that socket I/O is a completion, not readiness plus
# a syscall.
#
# Each op takes a slot; user_data carries OWNER_LOOP, the slot, the slot's
# generation and the op. PollSet.harvest hands every OWNER_LOOP completion to
# finish(), which releases the slot and queues (waiter, res, op); the loop's
# _process_events calls dispatch(), which gives each to its waiter once: a
# stream transport's StreamIO (stream.pyx) by a C call, a future's waiter by
# calling it. Per completion that is one Python call at most, the least
# asyncio's semantics need (a future's result, a protocol's method).
#
# Buffers have one owner: from prep to completion the kernel may write into
# (recv) or read from (send, connect's address) the object, so the slot holds
# a buffer export of it (the object cannot be resized or freed meanwhile) and
# releases it only in finish().
#
# cancel() submits at once: an op in flight holds its socket's file, so the
# caller's close() would neither send a FIN nor free a listening port until
# the kernel lets go (docs/kernel-notes.md, "Polls for a selector").

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.list cimport PyList_GET_ITEM, PyList_SET_ITEM
from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF


cdef inline void list_put(list l, Py_ssize_t i, object v) noexcept:
    # l[i] = v, for a slot index the caller knows is in range: a completion
    # does this for two or three lists, and Cython's generic item assignment
    # was a tenth of the per-op bookkeeping.
    cdef PyObject *old = PyList_GET_ITEM(l, i)
    Py_INCREF(v)
    PyList_SET_ITEM(l, i, v)        # (steals the reference just taken)
    Py_XDECREF(old)                 # last: a dealloc may run any code

cdef enum LoopOp:
    LOP_RECV = 1
    LOP_SEND = 2
    LOP_ACCEPT = 3
    LOP_CONNECT = 4
    LOP_CANCEL = 5
    LOP_RECV_POOL = 6
    LOP_SPLICE = 7
    LOP_SPLICE_POLL = 8         # the POLLOUT linked before a LOP_SPLICE (same slot)

cdef enum:
    POOL_N = 128                # buffers (a power of two)
    POOL_SIZE = 64 * 1024       # bytes each: 8 MiB in all, touched as used

cdef enum:
    LOOP_MAX_SLOTS = 1 << UD_SLOT_BITS


cdef class LoopOps:
    def __cinit__(self, PollSet polls):
        if not _aio_bound:
            aio_bind()          # asyncio's objects, for StreamIO and the loop's turn
        self.polls = polls
        self.pool_ring = None
        self.waiters = []
        self.keep = []
        self.done = []
        polls.ops = self

    def __dealloc__(self):
        cdef unsigned i
        for i in range(self.cap):
            if self.has_view[i]:
                PyBuffer_Release(&self.views[i])
        self.pool_drop(False)
        free(self.gen)
        free(self.opc)
        free(self.free_slots)
        free(self.views)
        free(self.has_view)
        free(self.scratch)
        free(self.spec)

    cdef int take_slot(self) except -1:
        cdef unsigned n, i
        if self.nfree == 0:
            n = self.cap * 2 if self.cap else 64
            if n > LOOP_MAX_SLOTS:
                raise OSError(ENOBUFS, f"more than {LOOP_MAX_SLOTS} loop operations in flight")
            if (grow_zeroed(<void **>&self.gen, sizeof(uint16_t), self.cap, n)
                    or grow_zeroed(<void **>&self.opc, sizeof(uint8_t), self.cap, n)
                    or grow_zeroed(<void **>&self.free_slots, sizeof(int), self.cap, n)
                    or grow_zeroed(<void **>&self.views, sizeof(Py_buffer), self.cap, n)
                    or grow_zeroed(<void **>&self.has_view, sizeof(uint8_t), self.cap, n)):
                raise MemoryError()
            for i in range(n - self.cap):       # the lowest slot is taken first
                self.free_slots[self.nfree] = n - 1 - i
                self.nfree += 1
            self.waiters.extend([None] * (n - self.cap))
            self.keep.extend([None] * (n - self.cap))
            self.cap = n
        self.nfree -= 1
        return self.free_slots[self.nfree]

    cdef io_uring_sqe *prep(self, int slot, uint32_t op, object waiter) except NULL:
        cdef io_uring_sqe *s = self.polls.live_ring().sqe()
        self.opc[slot] = op
        list_put(self.waiters, slot, waiter)
        self.submitted += 1
        return s

    cdef void release(self, int slot) noexcept:
        if self.has_view[slot]:
            PyBuffer_Release(&self.views[slot])
            self.has_view[slot] = 0
        list_put(self.waiters, slot, None)
        list_put(self.keep, slot, None)
        self.opc[slot] = 0
        self.gen[slot] += 1
        self.free_slots[self.nfree] = slot
        self.nfree += 1

    cdef void finish(self, io_uring_cqe *cqe) noexcept:
        cdef uint64_t ud = cqe.user_data
        cdef int slot = ud_slot(ud)
        cdef uint32_t op = ud_op(ud)
        cdef unsigned bid
        if op == LOP_CANCEL or op == LOP_SPLICE_POLL:
            return      # a poll that failed cancels its splice, whose CQE says so
        if (<unsigned>slot >= self.cap or self.opc[slot] != op
                or ud_gen(ud) != ud_gen_of(self.gen[slot])):
            self.stale += 1
            return
        waiter = self.waiters[slot]
        self.release(slot)
        if (op == LOP_SEND and type(waiter) is StreamIO
                and (<StreamIO>waiter).send_quiet(cqe.res)):
            # A transport's send that took every byte written and leaves
            # nothing for Python to do: finished here, not counted in
            # `completed`, so select() waits on instead of turning the loop
            # once more for it.
            self.quiet_sends += 1
            return
        self.completed += 1
        if op != LOP_RECV_POOL:
            self.done.append((waiter, cqe.res, op))
        elif cqe.res > 0 and (cqe.flags & IORING_CQE_F_BUFFER):
            # Copy out and give the buffer straight back: the bytes object is
            # what data_received() takes anyway.
            bid = cqe.flags >> IORING_CQE_BUFFER_SHIFT
            self.done.append((waiter, PyBytes_FromStringAndSize(
                self.pool + <size_t>bid * POOL_SIZE, cqe.res), op))
            io_uring_buf_ring_add(self.br, self.pool + <size_t>bid * POOL_SIZE, POOL_SIZE,
                                  bid, io_uring_buf_ring_mask(POOL_N), 0)
            io_uring_buf_ring_advance(self.br, 1)
        else:
            if cqe.flags & IORING_CQE_F_BUFFER:
                # A buffer taken for no bytes (EOF): back to the ring all the
                # same, or every EOF would shrink the pool by one.
                bid = cqe.flags >> IORING_CQE_BUFFER_SHIFT
                io_uring_buf_ring_add(self.br, self.pool + <size_t>bid * POOL_SIZE, POOL_SIZE,
                                      bid, io_uring_buf_ring_mask(POOL_N), 0)
                io_uring_buf_ring_advance(self.br, 1)
            if cqe.res == -ENOBUFS:
                self.nobufs += 1
            self.done.append((waiter, b"" if cqe.res == 0 else cqe.res, op))

    cdef uint64_t ud(self, int slot) noexcept:
        return ud_make(OWNER_LOOP, slot, self.gen[slot], self.opc[slot], 0)

    # --- what the loop calls: each returns the op's slot ------------------

    # A slot holding a buffer export of obj, which the kernel may then use
    # until the op completes (PyBUF_WRITABLE: it writes into it).
    cdef int take_slot_viewing(self, obj, int flags) except -1:
        cdef int slot = self.take_slot()
        try:
            PyObject_GetBuffer(obj, &self.views[slot], flags)
        except BaseException:
            self.free_slots[self.nfree] = slot
            self.nfree += 1
            raise
        self.has_view[slot] = 1
        return slot

    def recv(self, int fd, buf, waiter, int flags=0):
        """Receive into `buf` (a writable buffer); waiter(nbytes or -errno)."""
        return self.c_recv(fd, buf, waiter, flags)

    cdef int c_recv(self, int fd, object buf, object waiter, int flags) except -1:
        cdef int slot = self.take_slot_viewing(buf, PyBUF_WRITABLE)
        cdef io_uring_sqe *s = self.prep(slot, LOP_RECV, waiter)
        io_uring_prep_recv(s, fd, self.views[slot].buf, <size_t>self.views[slot].len, flags)
        io_uring_sqe_set_data64(s, self.ud(slot))
        return slot

    cdef int pool_ready(self) except -1:
        cdef int err = 0
        cdef unsigned i
        cdef Ring r = self.polls.live_ring()
        if self.pool_ring is r:
            return 0
        self.pool_drop(False)
        if self.pool == NULL:
            self.pool = <char *>reserve_zeroed(<size_t>POOL_N * POOL_SIZE)
            if self.pool == NULL:
                raise MemoryError()
        self.br = r.buf_ring_setup(POOL_N, False, &err)
        if self.br == NULL:
            raise OSError(-err, f"provided-buffer ring: {os.strerror(-err)}")
        for i in range(POOL_N):
            io_uring_buf_ring_add(self.br, self.pool + <size_t>i * POOL_SIZE, POOL_SIZE, i,
                                  io_uring_buf_ring_mask(POOL_N), i)
        io_uring_buf_ring_advance(self.br, POOL_N)
        self.pool_ring = r
        self.pool_n = POOL_N
        self.pool_size = POOL_SIZE
        return 0

    # forked: the registration is the parent's (shared ring): only unmap
    # the child's copy of the entries.
    cdef void pool_drop(self, bint forked) noexcept:
        if self.br != NULL:
            if forked or self.pool_ring is None:
                munmap(self.br, <size_t>POOL_N * sizeof(io_uring_buf))
            else:
                self.pool_ring.buf_ring_free(self.br, POOL_N)
            self.br = NULL
        self.pool_ring = None

    def recv_pooled(self, int fd, waiter, size_t limit=0):
        """Receive into a buffer of the pool, at most `limit` bytes (0: a
        whole buffer); waiter(bytes, b"" at EOF, or -errno; -ENOBUFS when
        every buffer was in use)."""
        return self.c_recv_pooled(fd, waiter, limit)

    cdef int c_recv_pooled(self, int fd, object waiter, size_t limit) except -1:
        self.pool_ready()
        cdef int slot = self.take_slot()
        cdef io_uring_sqe *s = self.prep(slot, LOP_RECV_POOL, waiter)
        uc_prep_recv_select(s, fd, 0, 0, 0)
        if 0 < limit < POOL_SIZE:
            s.len = <unsigned>limit         # a selected buffer is filled up to len
        io_uring_sqe_set_data64(s, self.ud(slot))
        return slot

    # --- a receive that does not wait -------------------------------------
    # asyncio's sock_recv tries recv(2) before it waits, and where the bytes
    # are already there (the peer answered while we were busy: always, when
    # both share a CPU) that is the whole call: no op, no loop turn, no task
    # switch. These are that try, in C: no BlockingIOError to make and catch
    # when nothing is there, and no n-byte bytes to allocate for it
    # (asyncio's sock_recv asks 256 KiB).
    #
    # Where the peer is slower than we are the try never finds anything, and
    # each costs a syscall (measured: 0.74x the requests per second, with
    # the peer on another CPU). So a socket whose try came back empty skips
    # the next 1, 3, 7, then 15 tries and goes to the ring; one that finds
    # bytes is tried every time again.

    cdef bint spec_skip(self, int fd) except -1:
        cdef unsigned n
        if <unsigned>fd >= self.spec_cap:
            n = self.spec_cap * 2 if self.spec_cap else 64
            while n <= <unsigned>fd:
                n *= 2
            if grow_zeroed(<void **>&self.spec, sizeof(uint8_t), self.spec_cap, n):
                raise MemoryError()
            self.spec_cap = n
        if self.spec[fd] & 0xf:
            self.spec[fd] -= 1
            return True
        return False

    cdef void spec_result(self, int fd, bint hit) noexcept:
        cdef unsigned level = self.spec[fd] >> 4
        if hit:
            self.spec[fd] = 0
        else:
            if level < 4:
                level += 1
            self.spec[fd] = <uint8_t>((level << 4) | ((1u << level) - 1))
            self.spec_misses += 1

    # recv(2) of up to n bytes into buf, not waiting: the count (0 at EOF),
    # -EAGAIN when nothing is there yet, a signal came or the try was
    # skipped, else -errno.
    cdef ssize_t recv_now(self, int fd, void *buf, size_t n) except? -1:
        cdef ssize_t got
        cdef int err = 0
        if fd < 0 or self.spec_skip(fd):
            return -EAGAIN
        with nogil:
            got = recv(fd, buf, n, MSG_DONTWAIT)
            err = errno
        if got < 0:
            got = -EAGAIN if err == EAGAIN or err == EINTR else -err
        self.spec_result(fd, got != -EAGAIN)
        return got

    def try_recv(self, int fd, size_t n):
        """recv(2) of up to n bytes, not waiting: bytes (b"" at EOF), None if
        nothing is there yet, or a signal came, or the try was skipped (see
        above); else -errno."""
        cdef ssize_t got
        if self.scratch == NULL:
            self.scratch = <char *>malloc(POOL_SIZE)
            if self.scratch == NULL:
                raise MemoryError()
        if n > POOL_SIZE:
            n = POOL_SIZE       # "up to n": the rest waits for the next call
        got = self.recv_now(fd, self.scratch, n)
        if got >= 0:
            return PyBytes_FromStringAndSize(self.scratch, got)
        return None if got == -EAGAIN else got

    def try_recv_into(self, int fd, buf):
        """recv(2) into buf, not waiting: the count (0 at EOF), None as for
        try_recv(), else -errno."""
        cdef Py_buffer view
        cdef ssize_t got
        PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
        try:
            got = self.recv_now(fd, view.buf, <size_t>view.len)
        finally:
            PyBuffer_Release(&view)
        return None if got == -EAGAIN else got

    def pool_available(self):
        """Whether the receive pool can be set up here (5.19+), and if not why."""
        try:
            self.pool_ready()
            self.pooled = True
            return (True, "")
        except OSError as e:
            return (False, e.strerror or str(e))

    def send(self, int fd, data, waiter, int flags=MSG_NOSIGNAL):
        """Send from `data` (a bytes-like object); waiter(nbytes or -errno)."""
        return self.c_send(fd, data, waiter, flags)

    cdef int c_send(self, int fd, object data, object waiter, int flags) except -1:
        cdef int slot = self.take_slot_viewing(data, PyBUF_SIMPLE)
        cdef io_uring_sqe *s = self.prep(slot, LOP_SEND, waiter)
        io_uring_prep_send(s, fd, self.views[slot].buf, <size_t>self.views[slot].len, flags)
        io_uring_sqe_set_data64(s, self.ud(slot))
        self.polls.eager = True
        return slot

    def splice(self, int fd_in, int64_t off_in, int fd_out, unsigned nbytes, waiter,
               bint when_writable=False):
        """splice(2) up to `nbytes` from fd_in (at off_in; -1: a pipe) to
        fd_out; waiter(nbytes, 0 at EOF, or -errno). A splice always runs in
        an io-wq worker, so it must never wait there (docs/kernel-notes.md,
        "Splice"): the fds are non-blocking, and with `when_writable` a
        POLLOUT on fd_out, linked before it, holds it back until fd_out has
        room -- a poll in the ring, not a sleeping thread."""
        cdef Ring r = self.polls.live_ring()
        r.reserve(2)                # the poll and its splice in one submit: a link
        cdef int slot = self.take_slot()
        cdef io_uring_sqe *s
        if when_writable:
            s = r.sqe()
            io_uring_prep_poll_add(s, fd_out, POLLOUT)
            s.flags |= IOSQE_IO_LINK
            io_uring_sqe_set_data64(s, ud_make(OWNER_LOOP, slot, self.gen[slot], LOP_SPLICE_POLL, 0))
        s = self.prep(slot, LOP_SPLICE, waiter)
        io_uring_prep_splice(s, fd_in, off_in, fd_out, -1, nbytes, SPLICE_F_NONBLOCK)
        io_uring_sqe_set_data64(s, self.ud(slot))
        return slot

    def accept(self, int fd, waiter, bytearray peer):
        """Accept one connection, non-blocking and close-on-exec; waiter(fd or
        -errno). The kernel writes the peer's address into `peer` as accept(2)
        does: a socklen_t (set it to the room left), then the sockaddr."""
        cdef int slot = self.take_slot()
        cdef io_uring_sqe *s = self.prep(slot, LOP_ACCEPT, waiter)
        cdef char *p = PyByteArray_AS_STRING(peer)
        self.keep[slot] = peer          # (not resized: its bytes stay put)
        io_uring_prep_accept(s, fd, <sockaddr *>(p + sizeof(socklen_t)), <socklen_t *>p,
                             SOCK_NONBLOCK | SOCK_CLOEXEC)
        io_uring_sqe_set_data64(s, self.ud(slot))
        return slot

    def connect(self, int fd, bytes sockaddr, waiter):
        """Connect to a packed struct sockaddr; waiter(0 or -errno)."""
        cdef int slot = self.take_slot()
        cdef io_uring_sqe *s = self.prep(slot, LOP_CONNECT, waiter)
        self.keep[slot] = sockaddr
        io_uring_prep_connect(s, fd, <const char *>sockaddr, <unsigned>len(sockaddr))
        io_uring_sqe_set_data64(s, self.ud(slot))
        # Submitted now, as connect(2) would be: the SYN leaves before the
        # caller's next step (which may be a blocking accept() elsewhere).
        self.polls.ring.submit()
        return slot

    def cancel(self, int slot, waiter):
        """Ask the kernel to end `slot`'s op (if `waiter` still owns it), now:
        its completion still comes, with -ECANCELED or what it had done."""
        return self.c_cancel(slot, waiter, 0)

    # op (0: any): a waiter with several ops in flight (a StreamIO's receive
    # and send) names the one it means, as its slot may already have been
    # released and taken by its other op.
    cdef bint c_cancel(self, int slot, object waiter, uint32_t op) except -1:
        if (<unsigned>slot >= self.cap or self.waiters[slot] is not waiter or self.opc[slot] == 0
                or (op != 0 and self.opc[slot] != op)):
            return False
        cdef Ring r = self.polls.live_ring()
        cdef io_uring_sqe *s = r.sqe()
        io_uring_prep_cancel64(s, self.ud(slot), 0)
        io_uring_sqe_set_data64(s, ud_make(OWNER_LOOP, slot, 0, LOP_CANCEL, 0))
        if self.opc[slot] == LOP_SPLICE:
            # A splice still behind its poll is found through the poll.
            s = r.sqe()
            io_uring_prep_cancel64(s, ud_make(OWNER_LOOP, slot, self.gen[slot], LOP_SPLICE_POLL, 0), 0)
            io_uring_sqe_set_data64(s, ud_make(OWNER_LOOP, slot, 0, LOP_CANCEL, 0))
        r.submit()
        self.cancels += 1
        return True

    cdef int c_dispatch(self, loop) except -1:
        # Hand each completion harvested since the last call to its waiter:
        # a StreamIO by a C call, any other waiter by calling it with the
        # result. An exception goes to the loop's exception handler; the
        # completions after it are still handed out (SystemExit and
        # KeyboardInterrupt propagate, and the rest wait for the next call).
        cdef list done = self.done
        cdef Py_ssize_t i, n = len(done)
        cdef tuple item
        if n == 0:
            return 0
        self.done = []
        for i in range(n):
            item = <tuple>done[i]
            waiter = item[0]
            try:
                if type(waiter) is StreamIO:
                    (<StreamIO>waiter).completed(<uint32_t>item[2], item[1])
                else:
                    waiter(item[1])
            except BaseException as exc:
                if isinstance(exc, (SystemExit, KeyboardInterrupt)):
                    self.done = done[i + 1:] + self.done
                    raise
                loop.call_exception_handler({
                    'message': 'Exception in an io_uring completion callback',
                    'exception': exc})
        return 0

    def in_flight(self):
        return self.cap - self.nfree

    def abandon(self, bint forked=False):
        """The ring is going (closed, or left to the parent after fork): no
        op will complete. Buffers are released; waiters are dropped uncalled."""
        cdef unsigned i
        for i in range(self.cap):
            if self.opc[i]:
                self.release(i)
        self.done = []
        self.pool_drop(forked)

    def stats(self):
        return {"submitted": self.submitted, "completed": self.completed,
                "cancels": self.cancels, "stale": self.stale, "nobufs": self.nobufs,
                "recv_tries_empty": self.spec_misses, "quiet_sends": self.quiet_sends,
                "in_flight": self.in_flight()}
