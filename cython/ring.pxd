# Ring: one io_uring instance, set up with the best flags the kernel takes.

cdef class Ring(Driver):         # the contract's calls: driver.pxd
    cdef io_uring ring
    cdef readonly unsigned setup_flags
    cdef readonly unsigned features
    cdef readonly unsigned sq_entries
    cdef readonly unsigned cq_entries
    cdef readonly str setup_mode
    cdef readonly bint ring_fd_registered
    cdef bint closed
    cdef bytearray op_supported       # index: opcode -> 1 if the probe says so

    cdef bint completions_waiting(self) noexcept nogil    # the selector's, not the contract's
    cdef bint kernel_work(self) noexcept nogil
