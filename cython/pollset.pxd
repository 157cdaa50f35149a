# PollSet: level-triggered readiness for a selector, from one-shot POLL_ADDs
# on a Ring (pollset.pyx says how and why).

cdef class LoopOps             # loopops.pxd

@cython.final
cdef class PollSet:
    cdef Ring ring              # None once closed, and in a forked child until used
    cdef unsigned cap           # the per-fd arrays' length (a power of two)
    cdef uint32_t *want         # per fd: the poll mask asked for; 0 = not registered
    cdef uint16_t *gen          # per fd: the generation of its latest arm
    cdef uint8_t *state         # per fd: ST_* bits
    cdef uint32_t *armed_in     # per fd: the select() (its number) that armed its poll
    cdef int *queue             # fds to arm at the next select()
    cdef unsigned nqueue
    cdef list keys              # per fd: what select() reports for it
    cdef LoopOps ops            # the event loop's operations on this ring, if any
    cdef readonly uint64_t arms, removes, cqes, stale, selects, enters, overflows, parked, moves
    cdef readonly uint64_t rechecks, recheck_gone
    cdef bint woke_before      # this select() found completions waiting as it began
    cdef bint eager             # a send is queued: submit before waiting (wait)
    cdef unsigned long long owner_tid   # the thread the ring was set up by (thread_token.h)
    cdef bint closed            # close() was called: every call but close() is refused
    # Write-only fds whose peer has half-closed, watched by an epoll set of
    # our own whose fd the ring polls (pollset.pyx says why).
    cdef int epfd
    cdef unsigned nparked       # fds in it now
    cdef bint ep_armed, ep_queued
    cdef uint16_t ep_gen

    cdef int grow(self, int fd) except -1
    cdef Ring live_ring(self)
    cdef int move_to_thread(self) except -1
    cdef int check_open(self) except -1
    cdef bint wait(self, Ring r, bint poll_only, bint forever, double deadline) except -1
    cdef void enqueue(self, int fd) noexcept
    cdef void prep_remove(self, int fd) noexcept
    cdef void arm_queued(self) noexcept
    cdef list harvest(self)
    cdef list c_select(self, object timeout)
    cdef void recheck(self, pollfd *pfds, unsigned n, list out) noexcept
    cdef void report(self, int fd, uint32_t revents, list out) noexcept
    cdef void park(self, int fd, list out) noexcept
    cdef void unpark(self, int fd) noexcept
    cdef void epoll_ready(self, list out) noexcept
