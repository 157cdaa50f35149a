"""`uring-proxy --probe`: the kernel features we use, and the fallbacks taken."""
from __future__ import annotations

import os
import platform

from . import backend
from .caps import OPS, Capabilities, pipe_max_size
from .config import MODES, disabled_features

# opcode -> what needs it: caps.OPS, the one list. Those of every mode are
# required; a mode's own are needed by that mode (refused, or a fallback said once).
REQUIRED_OPS = tuple((op, use) for op, use, mode in OPS if mode is None)
MODE_OPS = tuple((op, use) for op, use, mode in OPS if mode is not None)


def rows():
    """(feature, status, note) rows, in the order they matter."""
    from . import _core

    out = [("kernel", platform.release(), "")]
    dis = _core.io_uring_disabled_sysctl()
    out.append(("kernel.io_uring_disabled", "absent" if dis is None else str(dis), ""))
    try:
        ring = _core.Ring(entries=64)
    except _core.RingUnavailable as e:
        out.append(("io_uring_setup", "NO", f"{e.strerror}; the uring backend cannot run here"))
        return out
    disabled = disabled_features()
    caps = Capabilities("uring", ring, disabled)
    try:
        out.append(("io_uring_setup", "yes", f"set-up: {ring.setup_mode}"))
        out.append(("registered ring fd", "yes" if ring.ring_fd_registered else "no",
                    "" if ring.ring_fd_registered else "fallback: plain ring fd on every enter"))
        feats = dict(ring.feature_names())
        for name, note in (("nodrop", "CQ overflow is kept, not lost"),
                           ("ext_arg", "waits with a timeout without a timeout SQE"),
                           ("fast_poll", "no io-wq thread for a socket that is not ready"),
                           ("recvsend_bundle", "recv bundles: one completion fills several buffers")):
            out.append((f"feature {name}", "yes" if feats.get(name) else "no", note))
        for op, use in REQUIRED_OPS:
            ok = ring.supports(op)
            out.append((f"op {op}", "yes" if ok else "NO", use if ok else f"required for {use}"))
        for op, use in MODE_OPS:
            out.append((f"op {op}", "yes" if ring.supports(op) else "no", use))
        cap = ring.set_iowq_max_workers(os.cpu_count() or 1)
        out.append(("io-wq worker cap", "yes" if cap == 0 else "no",
                    "splice mode caps the threads that run splices" if cap == 0
                    else "fallback: splice mode runs with io-wq's own limit"))
        zc = caps.zerocopy
        out.append(("send_zc on TCP", "yes" if zc.works else "no",
                    "zerocopy mode" if zc.works else f"fallback: zerocopy mode uses copy-mode sends ({zc.why})"))
        out.append(("send_zc usage report", "yes" if zc.usage_reported else "no",
                    "zero-copied vs copied sends are counted" if zc.usage_reported
                    else "copied sends cannot be counted (kernel < 6.2)"))
        if zc.usage_reported:
            out.append(("send_zc on loopback", "copied" if zc.copied else "zero-copy",
                        "the kernel copies on loopback and veth: zero-copy cannot win there"
                        if zc.copied else ""))
        for name, f in caps.features.items():
            status = "yes" if f.present else "no"
            if f.present and not f.used:
                status = f"yes ({f.why})"
            out.append((name.replace("_", " "), status, "used" if f.used else f"fallback: {f.fallback}"))
    finally:
        ring.close()
    ep = _core.Epoll()
    try:
        zc = Capabilities("epoll", ep, disabled).zerocopy.works
    finally:
        ep.close()
    out.append(("epoll backend", "yes", "every mode; splice with splice(2)"))
    out.append(("SO_ZEROCOPY on TCP", "yes" if zc else "no",
                "epoll zerocopy mode: MSG_ZEROCOPY, completions from the error queue" if zc
                else "fallback: epoll zerocopy mode uses copy-mode sends"))
    out.append(("pipe-max-size", str(pipe_max_size()), "splice mode's default pipe size is capped here"))
    why = caps.peek_off
    out.append(("SO_PEEK_OFF on TCP", "no" if why else "yes",
                f"peek mode refused: {why} (needs Linux 6.9+)" if why else "peek mode"))
    return out


def main() -> int:
    table = rows()
    w1 = max(len(r[0]) for r in table)
    w2 = max(len(r[1]) for r in table)
    print(f"{'feature':<{w1}}  {'present':<{w2}}  note")
    print(f"{'-' * w1}  {'-' * w2}  {'-' * 4}")
    for name, status, note in table:
        print(f"{name:<{w1}}  {status:<{w2}}  {note}".rstrip())
    missing = [name for name, status, _ in table if status == "NO"]
    print()
    print("backend uring:", f"UNAVAILABLE: {', '.join(missing)}" if missing else "available")
    print("backend epoll: available")
    for line in auto_choice_lines():
        print(line)
    return 0


def auto_choice_lines() -> list[str]:
    """What `--backend auto` would pick here, per mode, and why."""
    ring, why = backend.open_uring()
    picks = {}
    try:
        for mode in MODES:
            if ring is None:
                picks[mode] = f"epoll, because {why}"
            else:
                lack = Capabilities("uring", ring, disabled_features()).unusable(mode)
                picks[mode] = f"epoll, because {lack}" if lack else "uring"
    finally:
        if ring is not None:
            ring.close()
    if len(set(picks.values())) == 1:
        return [f"backend auto: {picks[MODES[0]]} (every mode)"]
    return [f"backend auto, --mode {m}: {pick}" for m, pick in picks.items()]
