# cython: language_level=3
# The io_uring core of uring_net: Ring (ring.pyx) and the proxy Engine
# (engine.pyx), compiled as one module so the per-CQE path inlines.
import os
from libc.string cimport memset, memcpy

include "ring.pyx"
include "engine.pyx"
