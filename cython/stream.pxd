# StreamIO: the data path of uring_net.aio's socket transport (stream.pyx).

@cython.final
cdef class StreamIO:
    cdef LoopOps ops
    cdef int fd
    cdef object transport       # the Python transport, for the cold paths; None once lost
    # The protocol's methods, looked up once per set_protocol().
    cdef object protocol, data_received, get_buffer, buffer_updated
    cdef bint buffered
    # Reading: one receive in the kernel while the transport reads.
    cdef int recv_slot          # -1: none in flight
    cdef object recv_waiter     # self while a receive is in flight (cancel() checks it)
    cdef uint8_t recv_mode      # RM_*: where the receive in flight puts the bytes
    cdef bytearray rbuf         # RM_OWN: this transport's buffer (no pool)
    cdef list held              # results that came while not reading, in order
    cdef bint held_due          # deliver_held() is scheduled
    # Writing: the bytes not yet sent, the first of them in the kernel.
    cdef list wq                # bytes objects, in order; wq[0] is being sent from wq_off
    cdef Py_ssize_t wq_off
    cdef int send_slot          # -1: none in flight
    cdef public Py_ssize_t wsize            # bytes written and not yet sent
    # The transport's state (its attributes are properties over these).
    cdef public int conn_lost
    cdef public bint closing, paused, eof, protocol_paused
    cdef public Py_ssize_t high_water, low_water
    cdef public object empty_waiter
    cdef object lost            # (exc,): connection_lost waits for the ops in flight
    cdef readonly uint64_t sends, send_parts

    cdef bint reading(self) noexcept
    cdef int start_recv(self) except -1
    cdef uint32_t recv_op(self) noexcept
    cdef int submit_send(self) except -1
    cdef int completed(self, uint32_t op, object res) except -1
    cdef int recv_done(self, object res) except -1
    cdef int send_done(self, object res) except -1
    cdef bint send_quiet(self, int res) noexcept
    cdef int deliver(self, object res) except -1
    cdef int feed(self, object data) except -1
    cdef int feed_buffered(self, bytes data) except -1
    cdef int check_lost(self) except -1
