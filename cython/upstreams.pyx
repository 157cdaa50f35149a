# Upstreams: the pool one listener forwards to. The engine asks it which
# upstream a new connection (or a retry) goes to, tells it when a flow
# attaches to or leaves an upstream, and hands it each health check's
# result (health.pxi runs the checks on the ring). Nothing here submits
# anything or allocates: a pick is a loop over at most MAX_UPSTREAMS
# entries, per connection, nogil.
#
# An upstream that is down gets no new flows, whatever the algorithm; a
# flow's `tried` mask keeps a retry off the upstreams it already failed on.

from libc.math cimport log

BALANCE_CODES = {"first": BAL_FIRST, "roundrobin": BAL_ROUNDROBIN,
                 "leastconn": BAL_LEASTCONN, "source": BAL_SOURCE}


# splitmix64's finaliser: every input bit moves every output bit, so
# neighbouring client addresses land on unrelated upstreams.
cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    x = (x ^ (x >> 30)) * <uint64_t>0xbf58476d1ce4e5b9
    x = (x ^ (x >> 27)) * <uint64_t>0x94d049bb133111eb
    return x ^ (x >> 31)


# The client's address, not its port: `source` keeps a client (all its
# connections) on one upstream.
cdef uint64_t addr_key(sockaddr_storage *ss) noexcept nogil:
    cdef uint64_t h = 0xcbf29ce484222325     # FNV-1a over the address bytes
    cdef const uint8_t *p
    cdef int n, i
    if ss.ss_family == AF_INET:
        p = <const uint8_t *>&(<sockaddr_in *>ss).sin_addr
        n = 4
    elif ss.ss_family == AF_INET6:
        p = <const uint8_t *>&(<sockaddr_in6 *>ss).sin6_addr
        n = 16
    else:
        return 0
    for i in range(n):
        h = (h ^ p[i]) * <uint64_t>0x100000001b3
    return h


cdef class Upstreams:
    def __cinit__(self, str balance="first"):
        if balance not in BALANCE_CODES:
            raise ValueError(f"balance must be one of {', '.join(BALANCE_CODES)}, not {balance!r}")
        self.balance = BALANCE_CODES[balance]
        self.health = &self.u[0]

    def follow(self, Upstreams other not None):
        """Read up/down from `other`, which runs the checks for the same list
        (another worker of the frontend): one set of checks, one verdict."""
        if other.n != self.n:
            raise ValueError("not the same upstreams")
        self.health_owner = other
        self.health = &other.u[0]

    def add(self, int family, str host, int port, int weight=1):
        """Append an upstream (numeric address); `first` tries them in this order."""
        cdef Upstream *c
        cdef int ok
        if self.n == MAX_UPSTREAMS:
            raise ValueError(f"at most {MAX_UPSTREAMS} upstreams")
        if not 1 <= weight <= 256:
            raise ValueError("weight must be 1..256")
        c = &self.u[self.n]
        memset(c, 0, sizeof(Upstream))
        hb = host.encode()
        if family == AF_INET:
            (<sockaddr_in *>&c.addr).sin_family = AF_INET
            (<sockaddr_in *>&c.addr).sin_port = htons(port)
            ok = inet_pton(AF_INET, hb, &(<sockaddr_in *>&c.addr).sin_addr)
            c.addr_len = sizeof(sockaddr_in)
        elif family == AF_INET6:
            (<sockaddr_in6 *>&c.addr).sin6_family = AF_INET6
            (<sockaddr_in6 *>&c.addr).sin6_port = htons(port)
            ok = inet_pton(AF_INET6, hb, &(<sockaddr_in6 *>&c.addr).sin6_addr)
            c.addr_len = sizeof(sockaddr_in6)
        else:
            raise ValueError("family must be AF_INET or AF_INET6")
        if ok != 1:
            raise ValueError(f"not a numeric address: {host!r}")
        c.family = family
        c.weight = weight
        c.up = True          # as HAProxy: up until `fall` checks in a row fail
        c.check_fd = -1
        self.n += 1

    # The upstream a connection goes to, of those up and not in `tried`;
    # -1 if there is none.
    cdef int pick(self, uint64_t tried, sockaddr_storage *client) noexcept nogil:
        cdef int i, best = -1
        cdef uint32_t k
        cdef int64_t total = 0
        cdef Upstream *c
        cdef uint64_t key
        cdef double x, score, best_score = 0
        if self.balance == BAL_LEASTCONN:
            # active/weight, compared cross-multiplied; ties go to the first
            # from a start that moves on each pick, so equal upstreams alternate.
            for k in range(self.n):
                i = <int>((self.lc_start + k) % self.n)
                c = &self.u[i]
                if self.health[i].up and not (tried >> i) & 1:
                    if best < 0 or (<uint64_t>c.active * self.u[best].weight
                                    < <uint64_t>self.u[best].active * c.weight):
                        best = i
            self.lc_start = (self.lc_start + 1) % self.n if self.n else 0
            return best
        if self.balance == BAL_SOURCE:
            # Rendezvous hashing: each upstream scores the client; the best
            # score among the eligible wins. An upstream's score does not
            # depend on the others, so a client keeps its upstream for as
            # long as that one is up, whatever the rest do. Weighted as
            # w / -ln(x), x uniform in (0, 1) from the hash.
            key = addr_key(client)
            for i in range(self.n):
                c = &self.u[i]
                if self.health[i].up and not (tried >> i) & 1:
                    x = (<double>(mix64(key ^ mix64(<uint64_t>i + 1)) >> 11) + 0.5) \
                        * (1.0 / 9007199254740992.0)
                    score = c.weight / -log(x)
                    if best < 0 or score > best_score:
                        best, best_score = i, score
            return best
        for i in range(self.n):
            c = &self.u[i]
            if not self.health[i].up or (tried >> i) & 1:
                continue
            if self.balance == BAL_FIRST:
                return i
            # Smooth weighted round robin (nginx's): every eligible upstream
            # earns its weight, the richest is picked and pays the total, so
            # weights 5,1,1 give a a b a c a a, never five a's in a row.
            c.credit += c.weight
            total += c.weight
            if best < 0 or c.credit > self.u[best].credit:
                best = i
        if best >= 0:
            self.u[best].credit -= total
        return best

    cdef void attach(self, int i) noexcept nogil:
        self.u[i].active += 1
        self.u[i].flows += 1

    cdef void detach(self, int i) noexcept nogil:
        self.u[i].active -= 1

    cdef void connect_failed(self, int i) noexcept nogil:
        self.u[i].connect_fails += 1

    # A check's result (err 0: it connected): 1 if the upstream just came
    # up, -1 if it just went down, else 0.
    cdef int check_done(self, int i, int err, uint32_t rise, uint32_t fall) noexcept nogil:
        cdef Upstream *c = &self.u[i]
        c.checks += 1
        if err == 0:
            c.ok_run += 1
            c.fail_run = 0
            c.last_err = 0
            if not c.up and c.ok_run >= rise:
                c.up = True
                c.transitions += 1
                return 1
            return 0
        c.fail_run += 1
        c.ok_run = 0
        c.last_err = err
        if c.up and c.fail_run >= fall:
            c.up = False
            c.transitions += 1
            return -1
        return 0

    def stats(self):
        """Per upstream, in the order added: state and counters."""
        return [{"up": bool(self.u[i].up), "weight": self.u[i].weight,
                 "active": self.u[i].active, "flows": self.u[i].flows,
                 "connect_fails": self.u[i].connect_fails, "checks": self.u[i].checks,
                 "transitions": self.u[i].transitions}
                for i in range(self.n)]
