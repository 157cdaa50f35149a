"""Telling a service manager how the proxy is doing: systemd's notify protocol.

Under `Type=notify` (docs/uring-proxy.service) systemd starts the proxy with
$NOTIFY_SOCKET naming a unix datagram socket, and counts the service started
only when a `READY=1` datagram arrives there. The protocol is one datagram of
newline-separated KEY=VALUE assignments (sd_notify(3)); it is small enough
that the proxy speaks it itself rather than depend on libsystemd.

Outside systemd the variable is unset and every call here does nothing.
"""
from __future__ import annotations

import os
import socket


def notify_address() -> bytes | None:
    """The socket $NOTIFY_SOCKET names: a path, or with a leading '@' a name in
    the abstract namespace (sd_notify(3)); None when there is none to tell."""
    name = os.environ.get("NOTIFY_SOCKET", "")
    if name.startswith("@"):
        return b"\0" + os.fsencode(name[1:])
    if name.startswith("/"):
        return os.fsencode(name)
    return None     # unset, or a kind of address we do not speak (vsock:)


def notify(*assignments: str) -> bool:
    """Send `assignments` ("READY=1", "STATUS=...") as one notification.

    True if it was handed to the socket. A notification that cannot be sent is
    dropped: the proxy serves its clients whether or not its supervisor hears,
    and the send never blocks (a manager that stopped reading must not stop the
    proxy), so a full queue drops it too."""
    addr = notify_address()
    if addr is None:
        return False
    msg = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(msg, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, addr)
    except OSError:
        return False
    return True
