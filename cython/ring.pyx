# Ring: set-up with fallbacks, probe, batched submit.
#
# One Ring per thread. With SINGLE_ISSUER|DEFER_TASKRUN (6.1) only the
# thread that created the ring may submit and wait on it, and completions
# are produced only while that thread waits (io_uring_setup(2)); that is the
# cheapest mode and the one the engine's single-threaded loop wants.

import errno as _errno
import os as _os
import socket as _socket

# Set-up attempts, best first. The kernel answers EINVAL to flags it does not
# know, so each step drops what the previous kernel refused.
_SETUP_CHAIN = (
    # TASKRUN_FLAG: the kernel marks the SQ when completion work waits, so
    # that a caller with nothing to submit can tell it need not enter
    # (must_enter); without it every zero-timeout poll of the ring was an
    # io_uring_enter, ~30 us each here (an asyncio loop polls so each turn
    # that has callbacks ready).
    ("single_issuer+defer_taskrun",
     IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG),
    ("coop_taskrun", IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG),
    ("plain", 0),
)

FEATURE_NAMES = (
    (IORING_FEAT_SINGLE_MMAP, "single_mmap"),
    (IORING_FEAT_NODROP, "nodrop"),
    (IORING_FEAT_SUBMIT_STABLE, "submit_stable"),
    (IORING_FEAT_RW_CUR_POS, "rw_cur_pos"),
    (IORING_FEAT_CUR_PERSONALITY, "cur_personality"),
    (IORING_FEAT_FAST_POLL, "fast_poll"),
    (IORING_FEAT_POLL_32BITS, "poll_32bits"),
    (IORING_FEAT_SQPOLL_NONFIXED, "sqpoll_nonfixed"),
    (IORING_FEAT_EXT_ARG, "ext_arg"),
    (IORING_FEAT_NATIVE_WORKERS, "native_workers"),
    (IORING_FEAT_RSRC_TAGS, "rsrc_tags"),
    (IORING_FEAT_CQE_SKIP, "cqe_skip"),
    (IORING_FEAT_LINKED_FILE, "linked_file"),
    (IORING_FEAT_REG_REG_RING, "reg_reg_ring"),
    (IORING_FEAT_RECVSEND_BUNDLE, "recvsend_bundle"),
    (IORING_FEAT_MIN_TIMEOUT, "min_timeout"),
    (IORING_FEAT_RW_ATTR, "rw_attr"),
    (IORING_FEAT_NO_IOWAIT, "no_iowait"),
)

OPCODES = {
    "ACCEPT": IORING_OP_ACCEPT, "CONNECT": IORING_OP_CONNECT,
    "LINK_TIMEOUT": IORING_OP_LINK_TIMEOUT, "TIMEOUT": IORING_OP_TIMEOUT,
    "RECV": IORING_OP_RECV, "SEND": IORING_OP_SEND, "SHUTDOWN": IORING_OP_SHUTDOWN,
    "CLOSE": IORING_OP_CLOSE, "ASYNC_CANCEL": IORING_OP_ASYNC_CANCEL,
    "POLL_ADD": IORING_OP_POLL_ADD, "SPLICE": IORING_OP_SPLICE,
    "SEND_ZC": IORING_OP_SEND_ZC, "SENDMSG": IORING_OP_SENDMSG,
}


class RingUnavailable(OSError):
    """io_uring cannot be set up here (seccomp, io_uring_disabled, ENOSYS...)."""


def io_uring_disabled_sysctl():
    """The value of kernel.io_uring_disabled, or None where the knob is absent."""
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


cdef class Ring(Driver):
    def __cinit__(self, unsigned entries=1024, unsigned cq_factor=8, str force_setup=None,
                  unsigned cq_entries=0):
        cdef io_uring_params p
        cdef int ret = -EINVAL
        self.closed = True
        self.op_supported = bytearray(256)
        if force_setup is None:
            force_setup = _os.environ.get("URING_NET_FORCE_SETUP") or None
        chain = [c for c in _SETUP_CHAIN if force_setup is None or c[0] == force_setup]
        if not chain:
            raise ValueError(f"unknown set-up mode {force_setup!r}")
        for name, flags in chain:
            memset(&p, 0, sizeof(p))
            # A CQ larger than the SQ: one SQE may post several CQEs (multishot
            # accept and polls, zero-copy notifications), and every open flow
            # may complete in one turn. The caller sizes it for its flows
            # (cq_entries; CLAMP caps it at the kernel's maximum). Beyond it
            # NODROP keeps completions in a slower overflow list (counted).
            p.flags = flags | IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP | IORING_SETUP_SUBMIT_ALL
            p.cq_entries = cq_entries if cq_entries else entries * cq_factor
            ret = io_uring_queue_init_params(entries, &self.ring, &p)
            if ret == 0:
                self.setup_mode = name
                self.setup_flags = p.flags
                break
            if ret != -EINVAL:
                break
        if ret < 0:
            reason = _os.strerror(-ret)
            if ret == -EPERM:
                dis = io_uring_disabled_sysctl()
                if dis:
                    reason = f"EPERM (kernel.io_uring_disabled={dis})"
                else:
                    reason = "EPERM (blocked by a seccomp profile or policy)"
            elif ret == -ENOSYS:
                reason = "ENOSYS (kernel built without io_uring)"
            raise RingUnavailable(-ret, f"io_uring_setup failed: {reason}")
        self.closed = False
        self.features = p.features
        self.sq_entries = p.sq_entries
        self.cq_entries = p.cq_entries

        cdef io_uring_probe *probe = io_uring_get_probe_ring(&self.ring)
        if probe != NULL:
            for op in range(min(<int>probe.last_op + 1, 256)):
                self.op_supported[op] = 1 if io_uring_opcode_supported(probe, op) else 0
            io_uring_free_probe(probe)
        # A registered ring fd saves an fdget/fdput on every io_uring_enter,
        # but only in the thread that registered it: the index is the
        # thread's own (a PollSet moves to a new ring when its thread changes).
        self.ring_fd_registered = io_uring_register_ring_fd(&self.ring) == 1

    def __dealloc__(self):
        if not self.closed:
            io_uring_queue_exit(&self.ring)
            self.closed = True

    def close(self):
        if not self.closed:
            io_uring_queue_exit(&self.ring)
            self.closed = True

    @property
    def fd(self):
        return self.ring.ring_fd

    def supports(self, str opname):
        return bool(self.op_supported[OPCODES[opname]])

    def feature_names(self):
        return [(name, bool(self.features & bit)) for bit, name in FEATURE_NAMES]

    # Getting an SQE never fails: a full SQ is submitted first. Callers that
    # link SQEs reserve() their chain so it is never split across submits.
    cdef io_uring_sqe *sqe(self) noexcept nogil:
        cdef io_uring_sqe *s = io_uring_get_sqe(&self.ring)
        while s == NULL:
            io_uring_submit(&self.ring)
            s = io_uring_get_sqe(&self.ring)
        return s

    cdef void reserve(self, unsigned n) noexcept nogil:
        if io_uring_sq_space_left(&self.ring) < n:
            io_uring_submit(&self.ring)

    # --- the rest of the driver contract (driver.pxd) ------------------------

    cdef int submit_and_wait(self, int64_t timeout_ns) noexcept nogil:
        cdef io_uring_cqe *cqe
        cdef __kernel_timespec ts
        if timeout_ns < 0:
            return io_uring_submit_and_wait_timeout(&self.ring, &cqe, 1, NULL, NULL)
        ts.tv_sec = timeout_ns // 1000000000
        ts.tv_nsec = timeout_ns % 1000000000
        return io_uring_submit_and_wait_timeout(&self.ring, &cqe, 1, &ts, NULL)

    # With the completion work run too (GETEVENTS): under DEFER_TASKRUN a
    # cancelled op lets go of its file only when its completion is run, and
    # a caller that closes the socket next expects its FIN to leave now.
    cdef int submit(self) noexcept nogil:
        return io_uring_submit_and_get_events(&self.ring)

    cdef unsigned ready(self) noexcept nogil:
        return io_uring_cq_ready(&self.ring)

    cdef bint must_enter(self) noexcept nogil:
        return io_uring_sq_ready(&self.ring) != 0 or self.kernel_work()

    # Completions the kernel has for us already, posted or not yet run.
    cdef bint completions_waiting(self) noexcept nogil:
        return io_uring_cq_ready(&self.ring) != 0 or self.kernel_work()

    # Completion work the kernel holds for us (the TASKRUN flag) or an
    # overflow to flush; True where the ring has no flag to read.
    cdef inline bint kernel_work(self) noexcept nogil:
        if not (self.setup_flags & IORING_SETUP_TASKRUN_FLAG):
            return True
        return (self.ring.sq.kflags[0] & (IORING_SQ_TASKRUN | IORING_SQ_CQ_OVERFLOW)) != 0

    cdef unsigned peek_batch(self, io_uring_cqe **cqes, unsigned n) noexcept nogil:
        return io_uring_peek_batch_cqe(&self.ring, cqes, n)

    cdef void advance(self, unsigned n) noexcept nogil:
        io_uring_cq_advance(&self.ring, n)

    cdef bint cq_overflowed(self) noexcept nogil:
        return (self.ring.sq.kflags[0] & IORING_SQ_CQ_OVERFLOW) != 0

    cdef io_uring_buf_ring *buf_ring_setup(self, unsigned entries, bint incremental,
                                           int *err) noexcept nogil:
        return uc_setup_buf_ring(&self.ring, entries, 0, IOU_PBUF_RING_INC if incremental else 0, err)

    cdef void buf_ring_free(self, io_uring_buf_ring *br, unsigned entries) noexcept nogil:
        if br != NULL and not self.closed:
            uc_free_buf_ring(&self.ring, br, entries, 0)

    cdef int buf_ring_head(self, unsigned *head) noexcept nogil:
        return uc_buf_ring_head(&self.ring, 0, head)

    cdef int buffers_sparse(self, unsigned n) noexcept nogil:
        return io_uring_register_buffers_sparse(&self.ring, n)

    cdef int buffer_update(self, unsigned idx, void *addr, size_t len) noexcept nogil:
        cdef iovec iov
        iov.iov_base = addr
        iov.iov_len = len
        return io_uring_register_buffers_update_tag(&self.ring, idx, &iov, NULL, 1)

    cdef void forget(self, int fd) noexcept nogil:
        pass                # the kernel keeps no state for an fd we closed

    @property
    def cq_dropped(self):
        """Completions the kernel lost for want of memory even with NODROP."""
        return self.ring.cq.koverflow[0]

    def set_iowq_max_workers(self, unsigned n):
        """Cap io-wq's bounded and unbounded workers at n (5.15+); 0 or -errno."""
        cdef unsigned values[2]
        values[0] = n
        values[1] = n
        return io_uring_register_iowq_max_workers(&self.ring, values)

    # --- active probes ---------------------------------------------------
    # The opcode probe cannot tell whether multishot flags are honoured, so
    # these try the real thing once on loopback at start-up.

    def probe_multishot_accept(self):
        """True if IORING_ACCEPT_MULTISHOT works (5.19+)."""
        cdef io_uring_sqe *s
        cdef int res
        cdef unsigned flags
        lsock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        try:
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(4)
            s = self.sqe()
            io_uring_prep_multishot_accept(s, lsock.fileno(), NULL, NULL, SOCK_CLOEXEC)
            io_uring_sqe_set_data64(s, 1)
            io_uring_submit(&self.ring)
            c = _socket.create_connection(lsock.getsockname(), timeout=2)
            res, flags = self._wait_one(1)
            c.close()
            if res >= 0:
                _os.close(res)
            ok = res >= 0 and (flags & IORING_CQE_F_MORE) != 0
            if flags & IORING_CQE_F_MORE:
                self._cancel_and_drain(1)
            return ok
        finally:
            lsock.close()

    def buf_ring_error(self, unsigned entries=2):
        """0 if a provided-buffer ring of `entries` can be registered now, else
        the errno: EINVAL before 5.19 (every recv of the engine picks its
        buffer from one), ENOMEM where locked memory (RLIMIT_MEMLOCK, without
        CAP_IPC_LOCK) cannot hold that many entries next to the rings."""
        cdef int err = 0
        cdef io_uring_buf_ring *br = uc_setup_buf_ring(&self.ring, entries, 0x7ff2, 0, &err)
        if br == NULL:
            return -err
        uc_free_buf_ring(&self.ring, br, entries, 0x7ff2)
        return 0

    def probe_nop(self):
        """True if a NOP submitted now completes: the ring is usable, not only
        created (a policy may allow io_uring_setup and still refuse enter)."""
        cdef io_uring_sqe *s = self.sqe()
        io_uring_prep_nop(s)
        io_uring_sqe_set_data64(s, 4)
        res, _ = self._wait_one(4)
        return res == 0

    def probe_buf_ring_inc(self):
        """True if provided-buffer rings can be consumed incrementally
        (IOU_PBUF_RING_INC, 6.12+): older kernels refuse the flag with EINVAL."""
        cdef int err = 0
        cdef io_uring_buf_ring *br = uc_setup_buf_ring(&self.ring, 2, 0x7ff1, IOU_PBUF_RING_INC, &err)
        if br == NULL:
            return False
        uc_free_buf_ring(&self.ring, br, 2, 0x7ff1)
        return True

    def probe_send_zc(self):
        """SEND_ZC on loopback TCP: (works, usage_reported, copied).

        `works`: a send returned its bytes and promised a notification.
        `usage_reported`: the notification carries IORING_SEND_ZC_REPORT_USAGE's
        answer (6.2+; an older kernel refuses the flag with EINVAL).
        `copied`: that answer said the kernel copied -- always so on loopback."""
        cdef io_uring_sqe *s
        cdef char byte = 120
        if not self.op_supported[IORING_OP_SEND_ZC]:
            return (False, False, False)
        lsock = _socket.create_server(("127.0.0.1", 0))
        a = _socket.create_connection(lsock.getsockname(), timeout=2)
        b, _ = lsock.accept()
        try:
            s = self.sqe()
            io_uring_prep_send_zc(s, a.fileno(), &byte, 1, MSG_NOSIGNAL, IORING_SEND_ZC_REPORT_USAGE)
            io_uring_sqe_set_data64(s, 3)
            res, flags = self._wait_one(3)
            if res == -EINVAL:
                # Maybe only the usage report is unknown: try without it.
                s = self.sqe()
                io_uring_prep_send_zc(s, a.fileno(), &byte, 1, MSG_NOSIGNAL, 0)
                io_uring_sqe_set_data64(s, 3)
                res, flags = self._wait_one(3)
                if flags & IORING_CQE_F_MORE:
                    self._wait_one(3)
                return (res == 1, False, False)
            if res != 1 or not (flags & IORING_CQE_F_MORE):
                return (False, False, False)
            nres, nflags = self._wait_one(3)
            copied = bool(<uint32_t><int32_t>nres & IORING_NOTIF_USAGE_ZC_COPIED)
            return (True, True, copied)
        finally:
            for sock in (a, b, lsock):
                sock.close()

    def _wait_one(self, uint64_t ud):
        """(res, flags) of the next CQE for `ud`; others are dropped. (-ETIME, 0) after 2 s."""
        cdef io_uring_cqe *cqe
        cdef __kernel_timespec ts
        ts.tv_sec = 2
        ts.tv_nsec = 0
        while True:
            ret = io_uring_submit_and_wait_timeout(&self.ring, &cqe, 1, &ts, NULL)
            if ret < 0 and ret != -EINTR:
                return (ret, 0)
            if io_uring_peek_batch_cqe(&self.ring, &cqe, 1) == 1:
                res, flags, got = cqe.res, cqe.flags, cqe.user_data
                io_uring_cqe_seen(&self.ring, cqe)
                if got == ud:
                    return (res, flags)

    def _cancel_and_drain(self, uint64_t ud):
        """Cancel the multishot `ud` and wait for its final CQE and the cancel's,
        in whichever order they come, so nothing of a probe outlives it."""
        cdef io_uring_cqe *cqe
        cdef __kernel_timespec ts
        cdef io_uring_sqe *s = self.sqe()
        io_uring_prep_cancel64(s, ud, 0)
        io_uring_sqe_set_data64(s, 0xdead)
        ts.tv_sec = 2
        ts.tv_nsec = 0
        final_seen = cancel_seen = False
        while not (final_seen and cancel_seen):
            ret = io_uring_submit_and_wait_timeout(&self.ring, &cqe, 1, &ts, NULL)
            if ret < 0 and ret != -EINTR:
                return
            while io_uring_peek_batch_cqe(&self.ring, &cqe, 1) == 1:
                if cqe.user_data == ud and not (cqe.flags & IORING_CQE_F_MORE):
                    final_seen = True
                elif cqe.user_data == 0xdead:
                    cancel_seen = True
                io_uring_cqe_seen(&self.ring, cqe)
