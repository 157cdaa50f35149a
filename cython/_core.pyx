# cython: language_level=3
# The core of uring_net: Ring (ring.pyx, io_uring), Epoll (epoll.pyx, the
# same operations over epoll), the units the proxy is made of (timer wheel,
# pipe pool, buffer pool) and the proxy Engine (engine.pyx and its data
# paths, *.pxi), compiled as one module: calls between them are direct C
# calls (the classes are final), and the per-CQE path inlines. PollSet
# (pollset.pyx) is the selector's core, on the same Ring.
import os
from libc.string cimport memset, memcpy, memmove

include "driver.pyx"
include "ring.pyx"
include "epoll.pyx"
include "epoll_ops.pxi"
include "timers.pyx"
include "pipes.pyx"
include "bufpool.pyx"
include "events.pyx"
include "upstreams.pyx"
include "engine.pyx"
include "engine_setup.pxi"
include "connect.pxi"
include "copy.pxi"
include "zerocopy.pxi"
include "peek.pxi"
include "splice.pxi"
include "flow_end.pxi"
include "health.pxi"
include "proxyproto.pxi"
include "pollset.pyx"
include "loopops.pyx"
include "stream.pyx"
include "loopcore.pyx"
