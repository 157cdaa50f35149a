"""Choosing the event backend: io_uring, or epoll where io_uring is unavailable.

Both run the same engine (cython/engine.pyx); the epoll driver
(cython/epoll.pyx) carries out the engine's io_uring operations with
non-blocking syscalls. `--backend auto` (the default) takes io_uring when a
ring can be set up, works, and has every operation the chosen mode needs;
otherwise epoll, with one `fallback` line naming the reason.
"""
from __future__ import annotations

from .caps import Capabilities


class BackendUnavailable(Exception):
    """The backend asked for cannot run here; str() says why."""


def cq_entries_for(max_conns: int) -> int:
    """CQ size for up to `max_conns` flows: two completions per flow in one
    turn before the kernel's overflow list is used; at least 8,192, and at
    most the kernel's limit of 65,536 (memory: 16 bytes each)."""
    want = 8192
    while want < 2 * max_conns and want < 65536:
        want *= 2
    return want


def open_uring(max_conns: int = 4096):
    """(ring, None), or (None, why io_uring cannot be set up here)."""
    from . import _core
    try:
        return _core.Ring(entries=1024, cq_entries=cq_entries_for(max_conns)), None
    except _core.RingUnavailable as e:
        return None, e.strerror


def choose(backend: str, mode: str, disabled=frozenset(), max_conns: int = 4096,
           buf_entries: int = 2):
    """(capabilities, fallback_reason) for --backend `backend` and --mode `mode`:
    the Capabilities of the driver chosen (caps.driver, caps.backend).

    `fallback_reason` is set when auto chose epoll (the caller logs it once).
    --backend uring where io_uring cannot be set up raises BackendUnavailable;
    where an operation of the mode is missing it returns the ring, and the mode's
    own set-up refuses or falls back as it always has. A buffer ring of
    `buf_entries` (the pool's, _core.buf_ring_entries) is registered once and let go: where locked memory cannot
    hold it, auto takes epoll rather than failing when the engine starts."""
    from . import _core
    if backend == "epoll":
        return Capabilities("epoll", _core.Epoll(), disabled), None
    ring, why = open_uring(max_conns)
    if ring is None:
        if backend == "uring":
            raise BackendUnavailable(f"io_uring is unavailable: {why}")
        return Capabilities("epoll", _core.Epoll(), disabled), why
    caps = Capabilities("uring", ring, disabled)
    if backend == "auto":
        why = caps.unusable(mode, buf_entries)
        if why:
            ring.close()
            return Capabilities("epoll", _core.Epoll(), disabled), why
    return caps, None
