"""What the kernel offers a backend: probed once, the one answer behind
`--probe`, `--backend auto` and the checks each mode makes at start-up.

A Capabilities holds a driver (a Ring or an Epoll) and probes lazily, each
thing at most once: `--backend auto` with `--mode copy` never tries
SO_PEEK_OFF. Nothing here logs; the proxy says what a missing feature means
(one fallback line each) and `--probe` prints the same answers as a table.
"""
from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from functools import cached_property

# Every io_uring operation the engine submits: what it is for, and the one mode that
# needs it (None: every mode). (A FIN is forwarded with shutdown(2), not the SHUTDOWN
# op: see shut_wr in cython/copy.pxi.)
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

# The optional io_uring features the engine uses, and what it does without each.
FEATURE_FALLBACKS = {
    "multishot_accept": "single-shot accept, re-armed per connection",
    "recv_bundle": "one buffer per recv completion",
    "incremental_buffers": "a recv takes a whole buffer, however short the read",
}
FORCED = "forced off by URING_NET_DISABLE"
SO_PEEK_OFF = getattr(socket, "SO_PEEK_OFF", 42)     # asm-generic value


@dataclass(frozen=True)
class Feature:
    present: bool
    used: bool
    fallback: str
    why: str | None = None      # why it is not used (None: used, or absent by design)


@dataclass(frozen=True)
class ZeroCopy:
    works: bool                 # zero-copy sends can be used (else copy-mode sends)
    usage_reported: bool        # the kernel says whether it copied (6.2+; epoll: always)
    copied: bool | None         # it copies on loopback (None: cannot tell)
    why: str | None = None      # why they cannot be used


class Capabilities:
    """What `driver` (backend "uring" or "epoll") can do, with the features named in
    `disabled` (URING_NET_DISABLE) forced off."""

    def __init__(self, backend: str, driver, disabled=frozenset()):
        self.backend = backend
        self.driver = driver
        self.disabled = frozenset(disabled)
        self.ring = driver if backend == "uring" else None

    def has_op(self, op: str) -> bool:
        # The epoll driver carries out every operation the engine submits.
        return self.ring is None or self.ring.supports(op)

    def unusable(self, mode: str, buf_entries: int = 2) -> str | None:
        """None if this backend can run `mode` with a buffer ring of `buf_entries`,
        else what it lacks: the reason `--backend auto` takes epoll instead."""
        if self.ring is None:
            return None
        if not self.ring.probe_nop():
            return "a NOP submitted to the ring never completed"
        missing = [op for op in BASE_OPS + MODE_OPS.get(mode, ()) if not self.has_op(op)]
        if mode == "splice" and "splice" in self.disabled:
            missing.append(f"SPLICE ({FORCED})")
        err = self.ring.buf_ring_error(buf_entries)
        if err == errno.ENOMEM:
            return (f"registering the provided-buffer ring ({buf_entries} entries) failed: ENOMEM, "
                    "locked memory (RLIMIT_MEMLOCK) is short")
        if err:
            missing.append("provided-buffer rings (Linux 5.19+)")
        if missing:
            return f"io_uring lacks what --mode {mode} needs: {', '.join(missing)}"
        return None

    def refusal(self, mode: str) -> str | None:
        """None if `mode` can run on this backend, else why it is refused at start-up
        (splice and peek have no fallback)."""
        if mode == "splice":
            missing = [op for op in MODE_OPS["splice"] + ("POLL_ADD",) if not self.has_op(op)]
            if "splice" in self.disabled and self.ring is not None:
                missing.append(f"SPLICE ({FORCED})")
            if missing:
                return (f"--mode splice needs io_uring operations this kernel lacks: "
                        f"{', '.join(missing)}; use --mode copy")
        if mode == "peek":
            why = FORCED if "peek_off" in self.disabled else self.peek_off
            if not why and not self.has_op("POLL_ADD"):
                why = "io_uring lacks POLL_ADD, which tells when to peek again"
            if why:
                return (f"--mode peek needs recv-with-offset (SO_PEEK_OFF on TCP, "
                        f"Linux 6.9+), and this kernel refuses it: {why}")
        return None

    @cached_property
    def features(self) -> dict[str, Feature]:
        """The optional features, each with what the engine does without it.

        Recv bundles and incremental buffers name a completion's bytes by the ring's
        order (the engine's shadow of the buffer ring), which holds only when
        completions are posted in the order recvs take buffers: DEFER_TASKRUN runs
        them one after another in the engine's thread. On a ring without it they are
        not used. The epoll driver carries out multishot accept and recv bundles
        itself; incremental buffers belong to the kernel's ring and are absent there
        by design, not as a fallback."""
        if self.ring is None:
            present = {"multishot_accept": True, "recv_bundle": True,
                       "incremental_buffers": False}
            return {name: Feature(ok, ok and name not in self.disabled, FEATURE_FALLBACKS[name],
                                  FORCED if name in self.disabled else None)
                    for name, ok in present.items()}
        ring = self.ring
        present = {"multishot_accept": ring.probe_multishot_accept(),
                   "recv_bundle": dict(ring.feature_names())["recvsend_bundle"],
                   "incremental_buffers": ring.probe_buf_ring_inc()}
        ordered = "defer_taskrun" in ring.setup_mode
        out = {}
        for name, ok in present.items():
            if name in self.disabled:
                why = FORCED
            elif not ok:
                why = "not supported by this kernel"
            elif name in ("recv_bundle", "incremental_buffers") and not ordered:
                why = (f"the ring was set up {ring.setup_mode}, without DEFER_TASKRUN, so "
                       "completions need not come in buffer-ring order")
            else:
                why = None
            out[name] = Feature(ok, why is None, FEATURE_FALLBACKS[name], why)
        return out

    @cached_property
    def zerocopy(self) -> ZeroCopy:
        """Whether zero-copy sends work: SEND_ZC tried on loopback (io_uring), or
        SO_ZEROCOPY taken by a TCP socket (epoll's MSG_ZEROCOPY)."""
        if "send_zc" in self.disabled:
            return ZeroCopy(False, False, None, FORCED)
        if self.ring is None:
            if not self.driver.probe_zerocopy():
                return ZeroCopy(False, False, None, "SO_ZEROCOPY refused (Linux 4.14+)")
            return ZeroCopy(True, True, True)
        works, usage, copied = self.ring.probe_send_zc()
        if not works:
            return ZeroCopy(False, False, None, "not supported by this kernel")
        return ZeroCopy(True, usage, copied if usage else None)

    @cached_property
    def registered_buffers(self) -> bool:
        """SEND_ZC from registered buffers: io_uring's (MSG_ZEROCOPY sends from any
        address), unless forced off."""
        return self.ring is not None and "registered_buffers" not in self.disabled

    @cached_property
    def peek_off(self) -> str | None:
        """None if recv-with-offset works on TCP (SO_PEEK_OFF, 6.9+), else why not.
        Tried for real on a loopback pair: two peeks must return consecutive bytes."""
        with socket.create_server(("127.0.0.1", 0)) as lsock:
            with socket.create_connection(lsock.getsockname(), timeout=2) as a:
                b, _ = lsock.accept()
                with b:
                    try:
                        b.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
                    except OSError as e:
                        return errno.errorcode.get(e.errno, str(e.errno))
                    a.sendall(b"abcd")
                    b.settimeout(2)
                    first = b.recv(2, socket.MSG_PEEK)
                    second = b.recv(2, socket.MSG_PEEK)
                    if (first, second) != (b"ab", b"cd"):
                        return f"peeks returned {first!r} then {second!r}, not consecutive bytes"
        return None


def pipe_max_size() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20
