# cython: language_level=3
# The core of uring_net: Ring (ring.pyx, io_uring), Epoll (epoll.pyx, the
# same operations over epoll) and the proxy Engine (engine.pyx), compiled
# as one module so the per-CQE path inlines.
import os
from libc.string cimport memset, memcpy, memmove

include "ring.pyx"
include "epoll.pyx"
include "timers.pyx"
include "pipes.pyx"
include "engine.pyx"
