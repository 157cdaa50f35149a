# Upstreams: the pool a listener forwards to -- addresses, weights, health,
# and which one a new connection goes to (see upstreams.pyx).

cdef enum:
    MAX_UPSTREAMS = 64       # a flow's tried set is one 64-bit mask
    NO_UPSTREAM = 255        # Flow.up_idx of a flow no upstream was found for

# --balance: how a new connection (and each retry) picks among the healthy
# upstreams it has not tried yet.
cdef enum Balance:
    BAL_FIRST = 0            # the first in the order given (failover)
    BAL_ROUNDROBIN           # smooth weighted round robin
    BAL_LEASTCONN            # fewest active flows per unit of weight
    BAL_SOURCE               # the client address's hash (rendezvous, weighted)

cdef struct Upstream:
    sockaddr_storage addr
    socklen_t addr_len
    int family
    uint32_t weight          # 1..256, HAProxy's range
    int64_t credit           # roundrobin: the running credit (nginx's current_weight)
    uint32_t active          # flows on it now
    uint64_t flows           # flows ever sent to it
    uint64_t connect_fails   # connects to it that failed or timed out
    # health: checks are TCP connects on the engine's ring (health.pxi)
    bint up                  # gets new flows
    uint32_t ok_run          # consecutive checks that succeeded ...
    uint32_t fail_run        # ... and that failed
    uint64_t checks          # checks completed
    uint64_t transitions     # changes of `up`
    int32_t last_err         # the errno of the last failed check, 0 after a success
    int check_fd             # the check's socket while it is in flight, else -1
    uint32_t check_gen       # the round it belongs to (in its user_data)

@cython.final
cdef class Upstreams:
    cdef Upstream u[MAX_UPSTREAMS]
    cdef readonly uint32_t n
    cdef uint8_t balance
    cdef uint32_t lc_start       # leastconn: where ties start, moved on per pick
    cdef Upstream *health        # whose `up` pick() reads: ours, or the health
    cdef object health_owner     # ... of the Upstreams that runs the checks (kept alive)

    cdef int pick(self, uint64_t tried, sockaddr_storage *client) noexcept nogil
    cdef void attach(self, int i) noexcept nogil
    cdef void detach(self, int i) noexcept nogil
    cdef void connect_failed(self, int i) noexcept nogil
    cdef int check_done(self, int i, int err, uint32_t rise, uint32_t fall) noexcept nogil
