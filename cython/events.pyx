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
    C_NO_UPSTREAM: ("no_upstream", "SC"),
    C_BAD_HEADER: ("bad_proxy_header", "PR"),
    C_HEADER_TIMEOUT: ("proxy_header_timeout", "cR"),
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


# Close lines are the one event whose number grows with the load: at a few
# thousand connections a second, building a dict per closed flow and
# formatting it in Python was a tenth of the proxy's CPU. With
# set_close_format() the records render here, in C, into one text per drain.
# The lines are the contract's (docs/cli-contract.md), as Log writes them:
# the same fields in the same order, floats as Python prints round(x, n).

cdef const char *CLOSE_TEXT = (b"close client=%s upstream=%s c2u=%llu u2c=%llu "
                               b"duration_ms=%s cause=%s term=%s")
cdef const char *CLOSE_JSON = (b'{"event": "close", "ts": %s, "client": "%s", "upstream": %s, '
                               b'"bytes_c2u": %llu, "bytes_u2c": %llu, "duration_ms": %s, '
                               b'"cause": "%s", "term": "%s"')
# The optional fields and the line's end, [text, json].
cdef const char *FRONTEND[2]
cdef const char *FAILOVERS[2]
cdef const char *ERROR_NAME[2]
cdef const char *ERROR_NUMBER[2]
cdef const char *LINE_END[2]
FRONTEND[:] = [b" frontend=%s", b', "frontend": %s']
FAILOVERS[:] = [b" failovers=%u", b', "failovers": %u']
ERROR_NAME[:] = [b" error=%s", b', "error": "%s"']
ERROR_NUMBER[:] = [b" error=%d", b', "error": "%d"']
LINE_END[:] = [b"\n", b"}\n"]
cdef const char *UNKNOWN_CAUSE = b"unknown"
cdef const char *UNKNOWN_TERM = b"??"
cdef const char *CAUSE_NAMES[16]
cdef const char *CAUSE_TERMS[16]
_CAUSE_BYTES = []


def _cause_names():
    """CAUSES as C strings, for the close lines rendered without Python."""
    cdef bytes name, term
    for code, (n, t) in CAUSES.items():
        name, term = n.encode(), t.encode()
        _CAUSE_BYTES.extend((name, term))   # keeps the strings alive
        CAUSE_NAMES[code] = name
        CAUSE_TERMS[code] = term


_cause_names()


# `v` as Python's repr(round(v, places)) prints it, for the magnitudes a close
# line has (durations, Unix times): fixed point, trailing zeros cut, one kept.
cdef void format_round(double v, int places, char *out, size_t room) noexcept nogil:
    cdef int n = snprintf(out, room, b"%.*f", places, v)
    while n > 2 and out[n - 1] == b"0" and out[n - 2] != b".":
        n -= 1
    out[n] = 0


cdef void format_addr(sockaddr_storage *ss, char *out, size_t room) noexcept nogil:
    cdef char host[64]
    cdef sockaddr_in *a4
    cdef sockaddr_in6 *a6
    if ss.ss_family == AF_INET:
        a4 = <sockaddr_in *>ss
        inet_ntop(AF_INET, &a4.sin_addr, host, sizeof(host))
        snprintf(out, room, b"%s:%u", host, <unsigned>ntohs(a4.sin_port))
    elif ss.ss_family == AF_INET6:
        a6 = <sockaddr_in6 *>ss
        inet_ntop(AF_INET6, &a6.sin6_addr, host, sizeof(host))
        snprintf(out, room, b"[%s]:%u", host, <unsigned>ntohs(a6.sin6_port))
    else:
        snprintf(out, room, b"?")


cdef class EventLog:
    def __cinit__(self):
        self.recs = <Event *>calloc(EV_CAP, sizeof(Event))
        if self.recs == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.recs)
        free(self.text)

    def set_close_format(self, str fmt, upstreams, errno_names, frontend=None):
        """From now on drain() hands over close records as rendered lines
        ({"event": "close_lines", "text": ..., "lines": n}): `fmt` "text" or
        "json", `upstreams` the --upstream names by index, `errno_names` a
        name per errno number below LINE_NAMES, `frontend` the name each
        line ends with (a config file's frontends share one log)."""
        if fmt not in ("text", "json") or len(upstreams) > LINE_NAMES:
            raise ValueError("fmt must be text or json, with at most 256 upstreams")
        self.json_lines = fmt == "json"
        self.names_kept = []
        import json as _json
        for i in range(LINE_NAMES):
            up = upstreams[i] if i < len(upstreams) else "?"
            name = (_json.dumps(up) if self.json_lines else up).encode()
            self.names_kept.append(name)
            self.upstream_names[i] = name
            err = (errno_names[i] if i < len(errno_names) else str(i)).encode()
            self.names_kept.append(err)
            self.errno_names[i] = err
        self.frontend = NULL
        if frontend is not None:
            name = (_json.dumps(frontend) if self.json_lines else frontend).encode()
            self.names_kept.append(name)
            self.frontend = name
        self.render_closes = True

    # One close line at self.text + at (room ensured by the caller); returns
    # its length, newline included.
    cdef size_t render_close(self, Event *r, const char *ts, size_t at) noexcept nogil:
        cdef char client[80]
        cdef char duration[48]
        cdef char *p = self.text + at
        cdef size_t room = self.text_cap - at
        cdef int n
        cdef uint8_t code = r.code if r.code < 16 else 0
        cdef const char *cause = CAUSE_NAMES[code] if CAUSE_NAMES[code] != NULL else UNKNOWN_CAUSE
        cdef const char *term = CAUSE_TERMS[code] if CAUSE_TERMS[code] != NULL else UNKNOWN_TERM
        format_addr(&r.client, client, sizeof(client))
        format_round(r.duration_ns / 1e6, 3, duration, sizeof(duration))
        # The line's head differs by format (JSON leads with the time); the optional
        # fields and the end take the format's own spellings, in one place.
        if self.json_lines:
            n = snprintf(p, room, CLOSE_JSON, ts, client, self.upstream_names[r.up_idx],
                         <unsigned long long>r.c2u_bytes, <unsigned long long>r.u2c_bytes,
                         duration, cause, term)
        else:
            n = snprintf(p, room, CLOSE_TEXT, client, self.upstream_names[r.up_idx],
                         <unsigned long long>r.c2u_bytes, <unsigned long long>r.u2c_bytes,
                         duration, cause, term)
        if self.frontend != NULL:
            n += snprintf(p + n, room - n, FRONTEND[self.json_lines], self.frontend)
        if r.failovers:
            n += snprintf(p + n, room - n, FAILOVERS[self.json_lines], <unsigned>r.failovers)
        if r.err > 0 and r.err < LINE_NAMES:
            n += snprintf(p + n, room - n, ERROR_NAME[self.json_lines], self.errno_names[r.err])
        elif r.err:
            n += snprintf(p + n, room - n, ERROR_NUMBER[self.json_lines], r.err)
        n += snprintf(p + n, room - n, LINE_END[self.json_lines])
        return n

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
        "event" key: close (close_lines, a run of them rendered, after
        set_close_format()), accept_paused, engine_error, fallback, health."""
        out = []
        cdef uint32_t i, lines = 0
        cdef Event *r
        cdef size_t at = 0, need
        cdef char ts[48]
        cdef timespec now
        if self.render_closes:
            clock_gettime(CLOCK_REALTIME, &now)
            format_round(now.tv_sec + now.tv_nsec / 1e9, 6, ts, sizeof(ts))
        for i in range(self.n):
            r = &self.recs[i]
            if r.kind == EV_CLOSE and self.render_closes:
                need = at + LINE_MAX + strlen(self.upstream_names[r.up_idx])
                if need > self.text_cap:
                    self.grow_text(need)
                at += self.render_close(r, ts, at)
                lines += 1
                continue
            if lines:       # in order with the other events
                out.append({"event": "close_lines", "text": self.text[:at].decode(), "lines": lines})
                at = lines = 0
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
            elif r.kind == EV_HEALTH:
                out.append({"event": "health", "upstream_index": r.up_idx, "up": bool(r.code),
                            "errno": r.err, "checks": r.arg})
        if lines:
            out.append({"event": "close_lines", "text": self.text[:at].decode(), "lines": lines})
        self.n = 0
        return out

    cdef grow_text(self, size_t need):
        cdef size_t cap = max(need, 2 * self.text_cap, 65536)
        cdef char *p = <char *>realloc(self.text, cap)
        if p == NULL:
            raise MemoryError()
        self.text = p
        self.text_cap = cap
