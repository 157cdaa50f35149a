# EventLog: events pushed by the engine, never inferred by Python from
# counters. Each is a record in a fixed C array, written where it happens
# (nogil, no allocation); run_c returns to Python once EV_BATCH records
# wait or the oldest has waited EV_DELAY_NS, and Python drains them all,
# formats their lines and writes them in one write. So Python runs once
# per batch of closed flows, never once per flow: at one return per
# closed flow, a connection storm spent more in the return than in the
# flow. A repeated event (the same accept error, the same engine error)
# coalesces into its previous record while that is the newest, so a
# flood of one cannot fill the array. Records past EV_CAP are counted
# (dropped) and reported by Python.

CAUSES = {
    C_NORMAL: ("normal", "--"),
    C_CLIENT_RESET: ("client_reset", "CD"),
    C_UPSTREAM_RESET: ("upstream_reset", "SD"),
    C_UPSTREAM_REFUSED: ("upstream_refused", "SC"),
    C_CONNECT_TIMEOUT: ("connect_timeout", "sC"),
    C_CONNECT_ERROR: ("connect_error", "SC"),
    C_PROXY_SHUTDOWN: ("proxy_shutdown", "PD"),
    C_RESOURCE: ("resource", "RC"),
    C_IDLE_TIMEOUT: ("idle_timeout", "cD"),
    C_CLIENT_FIN_TIMEOUT: ("client_fin_timeout", "cD"),
    C_SERVER_FIN_TIMEOUT: ("server_fin_timeout", "sD"),
}
ENGINE_ERRORS = {ERR_RING_ORDER: "ring_order_errors", ERR_UNKNOWN_CQE: "unknown_cqes"}
FALLBACKS = {FB_REGISTERED_BUFFERS: "registered_buffers", FB_SEND_ZC: "send_zc"}


cdef str _format_addr(sockaddr_storage *ss):
    cdef char buf[64]
    cdef sockaddr_in *a4
    cdef sockaddr_in6 *a6
    if ss.ss_family == AF_INET:
        a4 = <sockaddr_in *>ss
        inet_ntop(AF_INET, &a4.sin_addr, buf, sizeof(buf))
        return f"{buf.decode()}:{ntohs(a4.sin_port)}"
    if ss.ss_family == AF_INET6:
        a6 = <sockaddr_in6 *>ss
        inet_ntop(AF_INET6, &a6.sin6_addr, buf, sizeof(buf))
        return f"[{buf.decode()}]:{ntohs(a6.sin6_port)}"
    return "?"


cdef class EventLog:
    def __cinit__(self):
        self.recs = <Event *>calloc(EV_CAP, sizeof(Event))
        if self.recs == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.recs)

    # A new record, zeroed but for kind, code and times, or NULL (counted)
    # when the array is full.
    cdef Event *push(self, uint8_t kind, uint8_t code, int64_t now) noexcept nogil:
        cdef Event *r
        if self.n == EV_CAP:
            self.dropped += 1
            return NULL
        if self.n == 0:
            self.first_ns = now
        r = &self.recs[self.n]
        self.n += 1
        memset(r, 0, sizeof(Event))
        r.kind = kind
        r.code = code
        r.times = 1
        return r

    # An event without a flow: coalesced into the newest record if that
    # is the same event.
    cdef void note(self, uint8_t kind, uint8_t code, int err, uint32_t arg,
                   int64_t now) noexcept nogil:
        cdef Event *r
        if self.n > 0:
            r = &self.recs[self.n - 1]
            if r.kind == kind and r.code == code and r.err == err:
                r.times += 1
                r.arg = arg
                return
        r = self.push(kind, code, now)
        if r != NULL:
            r.err = err
            r.arg = arg

    # When Python should see the records waiting: INT64_MAX if none.
    cdef int64_t due_ns(self) noexcept nogil:
        if self.n == 0:
            return INT64_MAX
        if self.n >= EV_BATCH:
            return 0
        return self.first_ns + EV_DELAY_NS

    def drain(self):
        """Every record since the last drain, oldest first, as dicts with an
        "event" key: close, accept_paused, engine_error, fallback."""
        out = []
        cdef uint32_t i
        cdef Event *r
        for i in range(self.n):
            r = &self.recs[i]
            if r.kind == EV_CLOSE:
                cause, term = CAUSES.get(r.code, ("unknown", "??"))
                out.append({"event": "close", "client": _format_addr(&r.client),
                            "bytes_c2u": r.c2u_bytes, "bytes_u2c": r.u2c_bytes,
                            "duration_ms": round(r.duration_ns / 1e6, 3),
                            "cause": cause, "term": term, "errno": r.err,
                            "upstream_index": r.up_idx, "failovers": r.failovers})
            elif r.kind == EV_ACCEPT_PAUSED:
                out.append({"event": "accept_paused", "errno": r.err, "pause_ms": r.arg,
                            "times": r.times})
            elif r.kind == EV_ENGINE_ERROR:
                out.append({"event": "engine_error", "kind": ENGINE_ERRORS[r.code],
                            "times": r.times})
            elif r.kind == EV_FALLBACK:
                out.append({"event": "fallback", "feature": FALLBACKS[r.code], "errno": r.err})
        self.n = 0
        return out
