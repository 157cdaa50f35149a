# Declarations of uring_net._core. Cython looks for a module's .pxd by its
# qualified name, so this file sits in the package; the declarations
# themselves live in cython/, one file per idea.
cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t, int64_t
from liburing cimport *
from system cimport *

include "userdata.pxd"
include "driver.pxd"
include "ring.pxd"
include "epoll.pxd"
include "timers.pxd"
include "pipes.pxd"
include "bufpool.pxd"
include "events.pxd"
include "upstreams.pxd"
include "engine.pxd"
include "pollset.pxd"
include "loopops.pxd"
include "stream.pxd"
