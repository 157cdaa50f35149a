# PollSet: the core of uring_net.selectors.UringSelector. It keeps, per fd,
# the events asked for and the state of that fd's poll on a Ring, and turns
# one-shot POLL_ADD completions into the level-triggered answers EpollSelector
# gives.
#
# Why one-shot polls, re-armed by select():
# - A multishot poll (IORING_POLL_ADD_MULTI) reports edges: an fd that stays
#   readable because its owner did not read it all is not reported again.
#   EpollSelector is level-triggered, and callers rely on it.
# - IORING_POLL_ADD_LEVEL is refused by POLL_ADD (EINVAL, docs/kernel-notes.md).
# - A one-shot poll armed on a ready fd completes inside the submit that arms
#   it. So re-arming, at the next select(), every fd that was reported gives
#   level triggering, and costs one SQE per reported fd, all in the one
#   io_uring_enter that waits.
#
# Registration changes are batched: register() and modify() only queue the
# fd, and its POLL_ADD (and the POLL_REMOVE of the poll it replaces) goes in
# the next select()'s submit. unregister() of an armed fd is the exception:
# it submits its POLL_REMOVE at once, because an armed poll holds a reference
# to the file, and a caller that closes the socket right after unregister()
# expects the peer to see its FIN then, not at the next select().
#
# One exception to polls on the ring: io_uring adds POLLRDHUP to every poll
# (IO_POLL_UNMASK), whatever it was asked for. An fd registered for writing
# only, whose peer has sent its FIN, wakes with POLLRDHUP alone, and would
# again at every re-arm: a loop waiting for the peer to read would spin.
# Such an fd is parked in an epoll set of our own, which asks for exactly the
# events registered; the ring polls that set's fd like any other, and the fd
# leaves it when it is modified or unregistered.
#
# A completion can be out of date: io_uring records the events a poll woke
# with when the wake-up comes, and with DEFER_TASKRUN posts it only at the
# next select(). A poll armed by an earlier select() that woke while the
# caller was away (its bytes arrived, then the caller read them without
# being told) would say "readable" of a socket that no longer is, where
# EpollSelector, which asks at epoll_wait, says nothing; a caller doing a
# blocking recv() on that word would hang. So when completions were already
# waiting as select() began (the ring's TASKRUN flag, or posted ones), those
# of polls armed by an earlier select() are checked with one poll(2) over all
# of them, and only what it says now is reported. A poll armed by this
# select() was checked by the kernel as it went in, and one that woke during
# this select()'s wait is as fresh as epoll's answer: neither costs a
# syscall. (tests/test_selector.py, test_same_answers_as_epoll, found it.)
# What remains: a unix socket wakes its reader just after queueing the bytes,
# outside the lock a reader takes, so a read on another CPU inside that
# window, then select() at once, can still see the word (TCP wakes under the
# socket's lock, which a reader waits for).
#
# user_data (userdata.pxd): owner OWNER_SELECTOR, slot = the fd, gen = the
# fd's arm generation. Every arm takes a new generation, so the completion of
# a poll that was removed, or that watched an fd number since closed and
# reused, is recognised and dropped.

from cpython.exc cimport PyErr_CheckSignals
from time import monotonic as _monotonic

cdef extern from "thread_token.h":
    unsigned long long un_thread_token()

cdef enum SelOp:
    SEL_POLL = 1
    SEL_REMOVE = 2
    SEL_EPOLL = 3       # the poll of the parking epoll set's fd

cdef enum:
    ST_ARMED = 1        # a POLL_ADD of generation gen[fd] is in the kernel
    ST_QUEUED = 2       # fd is in queue[]: arm it at the next select()
    ST_PARKED = 4       # fd is watched by the parking epoll set, not by a poll
    PS_MAX_FDS = 1 << UD_SLOT_BITS
    PS_BATCH = 256

# selectors.EVENT_READ and EVENT_WRITE
cdef enum:
    EV_READ = 1
    EV_WRITE = 2

cdef inline uint32_t poll_mask(uint32_t events) noexcept nogil:
    return (POLLIN if events & EV_READ else 0) | (POLLOUT if events & EV_WRITE else 0)

# The revents -> selector events rule of EpollSelector: an error or hang-up
# wakes both readers and writers, whose next call then reports it.
cdef inline uint32_t sel_events(uint32_t revents) noexcept nogil:
    cdef uint32_t ev = 0
    if revents & ~(<uint32_t>POLLIN):
        ev |= EV_WRITE
    if revents & ~(<uint32_t>POLLOUT):
        ev |= EV_READ
    return ev


cdef class PollSet:
    def __cinit__(self):
        self.ring = None
        self.keys = []
        self.epfd = -1

    def __dealloc__(self):
        if self.epfd >= 0:
            close(self.epfd)
        free(self.want)
        free(self.gen)
        free(self.state)
        free(self.armed_in)
        free(self.queue)

    cdef int grow(self, int fd) except -1:
        cdef unsigned n = self.cap or 64
        if fd < 0 or fd >= PS_MAX_FDS:
            raise ValueError(f"fd {fd} is beyond the {PS_MAX_FDS} a selector's user_data can name")
        if <unsigned>fd < self.cap:
            return 0
        while n <= <unsigned>fd:
            n *= 2
        if (grow_zeroed(<void **>&self.want, sizeof(uint32_t), self.cap, n)
                or grow_zeroed(<void **>&self.gen, sizeof(uint16_t), self.cap, n)
                or grow_zeroed(<void **>&self.state, sizeof(uint8_t), self.cap, n)
                or grow_zeroed(<void **>&self.armed_in, sizeof(uint32_t), self.cap, n)
                or grow_zeroed(<void **>&self.queue, sizeof(int), self.cap, n)):
            raise MemoryError()     # (the arrays grown so far keep their new size)
        self.keys.extend([None] * (n - self.cap))
        self.cap = n
        return 0

    # The ring, set up at first use by the thread that uses it, with the
    # kernel's cheapest mode for one thread (SINGLE_ISSUER|DEFER_TASKRUN:
    # completion work runs only when that thread waits; measured, asyncio's
    # loop on this selector served 1.2x the requests it did on a ring without
    # it). A selector used from another thread later (a loop created in one
    # thread and run in another) moves to a new ring of that thread's: its
    # fds are armed again there. After a fork the child gets a new one too.
    cdef Ring live_ring(self):
        cdef unsigned long long tid = un_thread_token()
        self.check_open()
        if self.ring is not None and tid != self.owner_tid:
            self.move_to_thread()
        if self.ring is None:
            # SQ: a submit flushes every PS_BATCH-ish arms; CQ: NODROP keeps
            # what does not fit (counted in overflows) until harvest drains it.
            self.ring = Ring(entries=PS_BATCH, cq_entries=PS_BATCH * 16)
            self.owner_tid = tid
        return self.ring

    cdef int move_to_thread(self) except -1:
        if self.ops is not None and self.ops.in_flight():
            raise RuntimeError("uring_net: this selector's ring belongs to another thread, "
                               "and its event loop has operations in flight there")
        if self.ops is not None:
            self.ops.abandon()      # only its buffer pool: re-registered on the new ring
        self.ring.close()           # cancels every poll of the old thread's ring
        self.ring = None
        self.ep_armed = False
        self.ep_queued = self.epfd >= 0
        self.nqueue = 0
        for fd in range(self.cap):
            self.state[fd] &= ~(ST_ARMED | ST_QUEUED)
            if self.want[fd]:
                self.enqueue(fd)
        self.moves += 1
        return 0

    cdef int check_open(self) except -1:
        if self.closed:
            raise ValueError("I/O operation on a closed selector")   # as EpollSelector's
        return 0

    cdef void enqueue(self, int fd) noexcept:
        if not (self.state[fd] & ST_QUEUED):
            self.state[fd] |= ST_QUEUED
            self.queue[self.nqueue] = fd
            self.nqueue += 1

    cdef void prep_remove(self, int fd) noexcept:
        cdef io_uring_sqe *s = self.ring.sqe()
        io_uring_prep_poll_remove(s, ud_make(OWNER_SELECTOR, fd, self.gen[fd], SEL_POLL, 0))
        io_uring_sqe_set_data64(s, ud_make(OWNER_SELECTOR, fd, 0, SEL_REMOVE, 0))
        self.state[fd] &= ~ST_ARMED
        self.removes += 1

    cdef void arm_queued(self) noexcept:
        cdef unsigned i
        cdef int fd
        cdef io_uring_sqe *s
        for i in range(self.nqueue):
            fd = self.queue[i]
            self.state[fd] &= ~ST_QUEUED
            if self.want[fd] == 0 or (self.state[fd] & (ST_ARMED | ST_PARKED)):
                continue
            self.gen[fd] += 1
            s = self.ring.sqe()
            io_uring_prep_poll_add(s, fd, self.want[fd])
            io_uring_sqe_set_data64(s, ud_make(OWNER_SELECTOR, fd, self.gen[fd], SEL_POLL, 0))
            self.state[fd] |= ST_ARMED
            self.armed_in[fd] = <uint32_t>self.selects
            self.arms += 1
        self.nqueue = 0
        if self.ep_queued and not self.ep_armed and self.epfd >= 0:
            self.ep_queued = False
            self.ep_gen += 1
            s = self.ring.sqe()
            io_uring_prep_poll_add(s, self.epfd, POLLIN)
            io_uring_sqe_set_data64(s, ud_make(OWNER_SELECTOR, 0, self.ep_gen, SEL_EPOLL, 0))
            self.ep_armed = True

    # --- the selector's calls ---------------------------------------------

    def add(self, int fd, uint32_t events, key):
        """Watch fd for events (EVENT_READ|EVENT_WRITE); select() reports `key`."""
        self.check_open()
        self.grow(fd)
        if self.want[fd]:
            raise KeyError(f"fd {fd} is already registered")
        self.want[fd] = poll_mask(events)
        self.keys[fd] = key
        self.enqueue(fd)

    def change(self, int fd, uint32_t events, key):
        """New events and key for a watched fd."""
        self.check_open()
        if fd < 0 or <unsigned>fd >= self.cap or not self.want[fd]:
            raise KeyError(f"fd {fd} is not registered")
        cdef uint32_t mask = poll_mask(events)
        self.keys[fd] = key
        if mask == self.want[fd]:
            return
        if self.state[fd] & ST_ARMED:
            self.prep_remove(fd)
        self.unpark(fd)
        self.want[fd] = mask
        self.enqueue(fd)

    def discard(self, int fd):
        """Stop watching fd; never an error, even if fd is already closed."""
        if fd < 0 or <unsigned>fd >= self.cap or not self.want[fd]:
            return
        self.want[fd] = 0
        self.keys[fd] = None
        self.unpark(fd)
        if (self.state[fd] & ST_ARMED) and self.ring is not None:
            self.live_ring()        # (another thread's: moving re-arms, and this fd is gone)
            if self.state[fd] & ST_ARMED:
                self.prep_remove(fd)
                self.ring.submit()

    def select(self, timeout=None):
        """[(key, events)] of the watched fds that are ready, like
        EpollSelector.select(): wait up to `timeout` seconds (None: until one
        is; 0 or less: not at all). A signal whose handler returns does not
        end the wait early (PEP 475); one whose handler raises does."""
        return self.c_select(timeout)

    cdef list c_select(self, object timeout):
        cdef Ring r = self.live_ring()
        cdef double deadline = 0.0
        cdef uint64_t ops_done
        cdef bint timed_out
        cdef list out
        self.selects += 1
        cdef bint poll_only = timeout is not None and timeout <= 0
        if timeout is not None and not poll_only:
            deadline = _monotonic() + timeout
        while True:
            self.woke_before = r.completions_waiting()
            self.arm_queued()
            ops_done = self.ops.completed if self.ops is not None else 0
            timed_out = self.wait(r, poll_only, timeout is None, deadline)
            if r.cq_overflowed():
                self.overflows += 1
            out = self.harvest()
            if (out or poll_only or timed_out
                    or (self.ops is not None and self.ops.completed != ops_done)):
                return out
            # Every completion was one to drop: a removed poll's, an fd's
            # that went to the parking set, or one the re-check found no
            # longer ready. epoll_wait would not have returned: wait on, for
            # the time left, with those fds armed again.

    cdef bint wait(self, Ring r, bint poll_only, bint forever, double deadline) except -1:
        """Submit what is queued and wait until a completion is there, or
        until `deadline` (not at all with poll_only; no limit if forever).
        True if the time ran out."""
        cdef int ret
        cdef int64_t timeout_ns
        while True:
            timeout_ns = -1
            if poll_only:
                timeout_ns = 0          # (an asyncio loop's every turn with callbacks ready)
            elif not forever:
                # (capped at ~146 years: a larger double would not fit)
                timeout_ns = <int64_t>(min(max(0.0, deadline - _monotonic()), 4.6e9) * 1e9)
            # No syscall when answers already wait in the CQ, or when a
            # zero wait could find none that we cannot see from here.
            if not r.must_enter() and (r.ready() or timeout_ns == 0):
                return timeout_ns == 0 and not poll_only
            self.enters += 1
            if timeout_ns == 0:
                # Submit and reap, without the timer a zero wait would arm.
                self.eager = False
                with nogil:
                    ret = r.submit()
                if ret < 0 and ret != -EINTR and ret != -EBUSY and ret != -EAGAIN:
                    raise OSError(-ret, os.strerror(-ret))
                return not poll_only
            if self.eager:
                # A send is queued (LoopOps.c_send): it nearly always
                # completes inside the submit, and the wait would return at
                # once. Submitting first with the GIL held spares a release
                # and a retake around a syscall that does not block: it
                # issues the SQEs (a socket op in the ring never sleeps on
                # the socket) and runs the ring's pending task work, so
                # another thread waits for the GIL no longer than that
                # work takes. The wait, which can block, comes after only
                # if nothing completed, and releases the GIL.
                self.eager = False
                ret = r.submit()
                if ret < 0 and ret != -EINTR and ret != -EBUSY and ret != -EAGAIN:
                    raise OSError(-ret, os.strerror(-ret))
                if ret == -EINTR:
                    PyErr_CheckSignals()    # its handler first, as after a wait's EINTR
                if r.ready() or r.cq_overflowed():
                    return False
                self.enters += 1    # (the wait below: a syscall of its own)
            with nogil:
                ret = r.submit_and_wait(timeout_ns)
            if ret < 0 and ret != -EINTR and ret != -ETIME and ret != -EBUSY and ret != -EAGAIN:
                raise OSError(-ret, os.strerror(-ret))
            if ret == -ETIME:
                return True
            if r.ready() or r.cq_overflowed():
                return False
            # Woken with nothing to report: a signal. (The wait's EINTR is
            # not always what comes back: io_uring_enter returns the count
            # submitted when it submitted anything.) Run its handler, which
            # may raise; else wait on for what is left (PEP 475).
            PyErr_CheckSignals()
            if not forever and _monotonic() >= deadline:
                return True

    cdef list harvest(self):
        cdef io_uring_cqe *cqes[PS_BATCH]
        cdef pollfd pfds[PS_BATCH]
        cdef unsigned n, i, nre
        cdef uint64_t ud
        cdef int fd
        cdef list out = []
        while True:
            n = self.ring.peek_batch(cqes, PS_BATCH)
            if n == 0:
                return out
            self.cqes += n
            nre = 0
            for i in range(n):
                ud = cqes[i].user_data
                if ud_owner(ud) == OWNER_LOOP and self.ops is not None:
                    self.ops.finish(cqes[i])
                    continue
                if ud_owner(ud) == OWNER_SELECTOR and ud_op(ud) == SEL_EPOLL:
                    if self.ep_armed and ud_gen(ud) == ud_gen_of(self.ep_gen):
                        self.ep_armed = False
                        self.ep_queued = True       # level-triggered too
                        self.epoll_ready(out)
                    else:
                        self.stale += 1
                    continue
                if ud_owner(ud) != OWNER_SELECTOR or ud_op(ud) != SEL_POLL:
                    continue            # a POLL_REMOVE's own answer, or not ours
                fd = ud_slot(ud)
                if (<unsigned>fd >= self.cap or not (self.state[fd] & ST_ARMED)
                        or ud_gen(ud) != ud_gen_of(self.gen[fd])):
                    self.stale += 1     # a removed poll, or a closed fd's
                    continue
                self.state[fd] &= ~ST_ARMED
                if cqes[i].res >= 0 and not (<uint32_t>cqes[i].res
                                             & (self.want[fd] | POLLERR | POLLHUP)):
                    self.park(fd, out)  # POLLRDHUP alone: see the top of the file
                    continue
                # Level-triggered: look again at the next select().
                self.enqueue(fd)
                if cqes[i].res < 0:
                    # The poll itself failed (EBADF: the fd was closed before
                    # its arm went in). Report it ready, as poll(2)'s POLLNVAL
                    # is: the caller's next call on it says what is wrong.
                    self.report(fd, POLLERR, out)
                elif not self.woke_before or self.armed_in[fd] == <uint32_t>self.selects:
                    self.report(fd, <uint32_t>cqes[i].res, out)
                else:
                    # Armed by an earlier select(): ask again (top of the file).
                    pfds[nre].fd = fd
                    pfds[nre].events = <short>self.want[fd]
                    pfds[nre].revents = 0
                    nre += 1
            self.ring.advance(n)
            if nre:
                self.recheck(pfds, nre, out)

    cdef void recheck(self, pollfd *pfds, unsigned n, list out) noexcept:
        cdef unsigned i
        self.rechecks += n
        if poll(pfds, n, 0) < 0:
            for i in range(n):      # (EINTR, ENOMEM) what was asked for, as the completions said
                pfds[i].revents = pfds[i].events
        for i in range(n):
            if pfds[i].revents & POLLNVAL:
                self.report(pfds[i].fd, POLLERR, out)
            elif pfds[i].revents:
                self.report(pfds[i].fd, <uint16_t>pfds[i].revents, out)
            else:
                self.recheck_gone += 1      # no longer ready: armed again next select()

    cdef void report(self, int fd, uint32_t revents, list out) noexcept:
        """As epoll reports: what was asked for, errors, hang-ups (not the
        POLLRDHUP io_uring adds)."""
        cdef uint32_t ready = sel_events(revents & (self.want[fd] | POLLERR | POLLHUP))
        ready &= (EV_READ if self.want[fd] & POLLIN else 0) | (EV_WRITE if self.want[fd] & POLLOUT else 0)
        if ready:
            out.append((self.keys[fd], ready))

    cdef void park(self, int fd, list out) noexcept:
        cdef epoll_event ev
        if self.epfd < 0:
            self.epfd = epoll_create1(EPOLL_CLOEXEC)
        ev.events = self.want[fd]          # POLLIN/POLLOUT are EPOLLIN/EPOLLOUT
        ev.data.u64 = 0
        ev.data.fd = fd
        if self.epfd < 0 or epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            # No epoll set (EMFILE...) or the fd is gone: look again with a
            # poll at the next select(), as before.
            self.enqueue(fd)
            return
        self.state[fd] |= ST_PARKED
        self.nparked += 1
        self.ep_queued = True
        self.parked += 1

    cdef void unpark(self, int fd) noexcept:
        if self.state[fd] & ST_PARKED:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, NULL)   # EBADF if closed: gone anyway
            self.state[fd] &= ~ST_PARKED
            self.nparked -= 1

    cdef void epoll_ready(self, list out) noexcept:
        # Room for every parked fd, so that one epoll_wait answers them all
        # (a second call would hand out again those the first returned).
        cdef epoll_event small[64]
        cdef epoll_event *evs = small
        cdef int room = 64, n, i, fd
        cdef uint32_t ready
        if self.nparked > 64:
            evs = <epoll_event *>malloc(self.nparked * sizeof(epoll_event))
            if evs == NULL:
                evs = small         # (the rest at the next select)
            else:
                room = <int>self.nparked
        n = epoll_wait(self.epfd, evs, room, 0)
        for i in range(n):
            fd = evs[i].data.fd
            if <unsigned>fd >= self.cap or not (self.state[fd] & ST_PARKED) or not self.want[fd]:
                continue
            ready = sel_events(evs[i].events) & ((EV_READ if self.want[fd] & POLLIN else 0)
                                                 | (EV_WRITE if self.want[fd] & POLLOUT else 0))
            if ready:
                out.append((self.keys[fd], ready))
        if evs != small:
            free(evs)

    def fileno(self):
        return self.live_ring().fd

    def close(self):
        """Let the kernel go of every poll (closing the ring cancels them)."""
        if self.ops is not None:
            self.ops.abandon()      # before the ring: its buffer ring is unregistered
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1
        self.ep_armed = self.ep_queued = False
        self.nparked = 0
        for i in range(self.cap):
            self.want[i] = 0
            self.state[i] = 0
        self.nqueue = 0
        self.keys = [None] * self.cap
        self.closed = True

    def after_fork(self):
        """In a child of fork(): the ring's memory is shared with the parent,
        so leave it to the parent, and arm every watched fd again on a ring
        of the child's own at its next select()."""
        if self.ops is not None:
            self.ops.abandon(True)  # the parent's, completing in the parent
        if self.ring is not None:
            self.ring.close()       # unmaps and closes only the child's copy
            self.ring = None
        if self.epfd >= 0:
            close(self.epfd)        # the child's reference; the set is the parent's
            self.epfd = -1
        self.ep_armed = self.ep_queued = False
        self.nparked = 0
        self.nqueue = 0
        for fd in range(self.cap):
            self.state[fd] = 0
            if self.want[fd]:
                self.enqueue(fd)

    def stats(self):
        return {"arms": self.arms, "removes": self.removes, "cqes": self.cqes,
                "stale": self.stale, "selects": self.selects, "enters": self.enters,
                "overflows": self.overflows, "parked": self.parked, "moves": self.moves,
                "rechecks": self.rechecks, "recheck_gone": self.recheck_gone,
                "setup": None if self.ring is None else self.ring.setup_mode}
