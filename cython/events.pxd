# EventLog: what the engine tells Python, as records in a C array that
# Python drains between batches (see events.pyx).

cdef enum:
    EV_CAP = 4096            # records between two drains (more are counted as dropped)
    EV_BATCH = 512           # the engine returns to Python once this many wait ...
    EV_DELAY_NS = 5000000    # ... or once the oldest has waited 5 ms

cdef enum EventKind:
    EV_CLOSE = 1             # a flow ended (code: its Cause)
    EV_ACCEPT_PAUSED         # accept failed and waits arg ms (err: why)
    EV_ENGINE_ERROR          # never expected (code: ERR_*)
    EV_FALLBACK              # a feature turned itself off at run time (code: FB_*)
    EV_HEALTH                # an upstream changed state (code: 1 up, 0 down; arg: checks in a row)

cdef enum:
    ERR_RING_ORDER = 1       # a recv CQE named a buffer that is not the ring's head entry
    ERR_UNKNOWN_CQE          # a CQE whose user_data names no op of ours
    FB_REGISTERED_BUFFERS = 1    # registering a buffer was refused (err)
    FB_SEND_ZC               # SEND_ZC said EOPNOTSUPP

cdef struct Event:
    uint8_t kind             # EventKind
    uint8_t code             # per kind, as above
    uint8_t up_idx           # close, health: which upstream
    uint8_t failovers        # close: upstreams given up on before it
    int32_t err
    uint32_t arg             # accept pause: its length in ms
    uint32_t times           # the same event this many times in a row (coalesced)
    uint64_t c2u_bytes
    uint64_t u2c_bytes
    int64_t duration_ns
    sockaddr_storage client

cdef enum:
    LINE_NAMES = 256         # upstream names and errno names the close lines know
    LINE_MAX = 768           # a close line's bytes, but for its upstream name

@cython.final
cdef class EventLog:
    cdef Event *recs
    cdef uint32_t n
    cdef int64_t first_ns      # when the oldest waiting record was written
    cdef readonly uint64_t dropped

    # Close lines rendered in C (set_close_format): the names are borrowed
    # from the bytes objects in `names_kept`, which live as long as the log.
    cdef bint render_closes
    cdef bint json_lines
    cdef const char *upstream_names[LINE_NAMES]
    cdef const char *errno_names[LINE_NAMES]
    cdef const char *frontend      # the config file's frontend name, or NULL
    cdef list names_kept
    cdef char *text                # the rendered lines of one drain
    cdef size_t text_cap

    cdef Event *push(self, uint8_t kind, uint8_t code, int64_t now) noexcept nogil
    cdef void note(self, uint8_t kind, uint8_t code, int err, uint32_t arg,
                   int64_t now) noexcept nogil
    cdef int64_t due_ns(self) noexcept nogil
    cdef size_t render_close(self, Event *r, const char *ts, size_t at) noexcept nogil
    cdef grow_text(self, size_t need)
