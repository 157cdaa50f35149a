"""Choosing the event backend: io_uring, or epoll where io_uring is unavailable.

Both run the same engine (cython/engine.pyx); the epoll driver
(cython/epoll.pyx) carries out the engine's io_uring operations with
non-blocking syscalls. `--backend auto` (the default) takes io_uring when a
ring can be set up, works, and has every operation the chosen mode needs;
otherwise epoll, with one `fallback` line naming the reason.
"""
from __future__ import annotations

# Every io_uring operation the engine submits: what it is for, and the one mode that
# needs it (None: every mode). The one list behind --probe, --backend auto and the
# mode checks. (A FIN is forwarded with shutdown(2), not the SHUTDOWN op: see
# Engine.shut_wr.)
OPS = (
    ("ACCEPT", "accepting connections", None),
    ("CONNECT", "connecting upstream", None),
    ("LINK_TIMEOUT", "--connect-timeout", None),
    ("TIMEOUT", "pausing accept after errors", None),
    ("RECV", "receiving", None),
    ("SEND", "sending", None),
    ("SENDMSG", "sending a queue of segments in one call", None),
    ("CLOSE", "closing flows", None),
    ("ASYNC_CANCEL", "backpressure and teardown", None),
    ("POLL_ADD", "errors on paused sides, signals; readiness in splice and peek modes", None),
    ("SEND_ZC", "zerocopy mode (else copy-mode sends)", "zerocopy"),
    ("SPLICE", "splice mode (refused without it)", "splice"),
)
BASE_OPS = tuple(op for op, _, mode in OPS if mode is None)
MODE_OPS = {m: tuple(op for op, _, mode in OPS if mode == m) for _, _, m in OPS if m}


class BackendUnavailable(Exception):
    """The backend asked for cannot run here; str() says why."""


def uring_unusable(ring, mode: str, disabled=frozenset()) -> str | None:
    """None if `ring` can run `mode`, else the reason it cannot (what is missing)."""
    if not ring.probe_nop():
        return "a NOP submitted to the ring never completed"
    missing = [op for op in BASE_OPS + MODE_OPS.get(mode, ()) if not ring.supports(op)]
    if mode == "splice" and "splice" in disabled:
        missing.append("SPLICE (forced off by URING_NET_DISABLE)")
    if not ring.probe_buf_ring():
        missing.append("provided-buffer rings (Linux 5.19+)")
    if missing:
        return f"io_uring lacks what --mode {mode} needs: {', '.join(missing)}"
    return None


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


def choose(backend: str, mode: str, disabled=frozenset(), max_conns: int = 4096):
    """(name, driver, fallback_reason) for --backend `backend` and --mode `mode`.

    `fallback_reason` is set when auto chose epoll (the caller logs it once).
    --backend uring where io_uring cannot be set up raises BackendUnavailable;
    where an operation of the mode is missing it returns the ring, and the mode's
    own set-up refuses or falls back as it always has."""
    from . import _core
    if backend == "epoll":
        return "epoll", _core.Epoll(), None
    ring, why = open_uring(max_conns)
    if ring is None:
        if backend == "uring":
            raise BackendUnavailable(f"io_uring is unavailable: {why}")
        return "epoll", _core.Epoll(), why
    if backend == "auto":
        why = uring_unusable(ring, mode, disabled)
        if why:
            ring.close()
            return "epoll", _core.Epoll(), why
    return "uring", ring, None
