"""io_uring as a drop-in for the standard library's ``selectors``.

``UringSelector`` behaves as ``selectors.EpollSelector`` does -- level-triggered,
the same errors, the same keys -- but waits on an io_uring instance: every
registration change and every re-arm goes to the kernel in the one
``io_uring_enter`` that waits, where epoll needs one ``epoll_ctl`` per change.

    import uring_net.selectors
    sel = uring_net.selectors.DefaultSelector()      # or UringSelector()
    loop = asyncio.SelectorEventLoop(uring_net.selectors.UringSelector())

``DefaultSelector`` is ``UringSelector`` where io_uring works here, and
``selectors.EpollSelector`` otherwise, with one RuntimeWarning saying why.
The core is ``PollSet`` (cython/pollset.pyx), which says how level triggering
is built from one-shot polls.
"""

import os
import selectors as _std
import warnings
import weakref

from ._core import PollSet, Ring, RingUnavailable

__all__ = ["UringSelector", "DefaultSelector", "uring_available"]

EVENT_READ = _std.EVENT_READ
EVENT_WRITE = _std.EVENT_WRITE


class UringSelector(_std._BaseSelectorImpl):
    """Selector on io_uring polls, level-triggered like EpollSelector.

    Raises ``RingUnavailable`` (an OSError) when made where io_uring cannot be
    set up; ``DefaultSelector`` checks that once for you and falls back."""

    def __init__(self):
        super().__init__()
        self._polls = PollSet()
        self._polls.fileno()            # set the ring up now: fail here, not in select()
        _live.add(self)

    def register(self, fileobj, events, data=None):
        key = super().register(fileobj, events, data)
        try:
            self._polls.add(key.fd, events, key)
        except BaseException:
            super().unregister(fileobj)
            raise
        return key

    def unregister(self, fileobj):
        key = super().unregister(fileobj)
        self._polls.discard(key.fd)
        return key

    def modify(self, fileobj, events, data=None):
        try:
            key = self._fd_to_key[self._fileobj_lookup(fileobj)]
        except KeyError:
            raise KeyError(f"{fileobj!r} is not registered") from None
        if events == key.events and data == key.data:
            return key
        if (not events) or (events & ~(EVENT_READ | EVENT_WRITE)):
            raise ValueError(f"Invalid events: {events!r}")
        # One key object per registration state, as the base class keeps:
        # data-only changes never touch the poll.
        new = key._replace(events=events, data=data)
        try:
            self._polls.change(key.fd, events, new)
        except BaseException:
            # As EpollSelector does (bpo-30014): a registration whose change
            # failed is gone, never half-changed.
            self.unregister(fileobj)
            raise
        self._fd_to_key[key.fd] = new
        return new

    def select(self, timeout=None):
        return self._polls.select(timeout)

    def close(self):
        self._polls.close()
        _live.discard(self)
        super().close()

    def fileno(self):
        """The ring's fd: readable when completions wait, as epoll's fd is
        when events do."""
        return self._polls.fileno()

    def stats(self):
        """Counters of the ring work done so far (arms, removes, enters...)."""
        return self._polls.stats()


# fork() copies the ring's mapping, which stays shared with the parent:
# a child that used it would take the parent's completions. Each selector
# alive in the child leaves that ring alone and arms its fds on a new one.
_live = weakref.WeakSet()


def _after_fork_in_child():
    for sel in list(_live):
        sel._polls.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


_verdict = None


def uring_available():
    """(True, "") if a UringSelector can run here, else (False, why).

    Checked once per process: a ring must set up, and a NOP and a poll must
    complete (a seccomp policy can allow the set-up and refuse the rest)."""
    global _verdict
    if _verdict is None:
        try:
            ring = Ring(entries=8)
            try:
                if not ring.supports("POLL_ADD"):
                    raise RingUnavailable(0, "the kernel has no IORING_OP_POLL_ADD")
                if not ring.probe_nop():
                    raise RingUnavailable(0, "io_uring_enter does not complete a NOP")
            finally:
                ring.close()
            _verdict = (True, "")
        except OSError as e:
            _verdict = (False, e.strerror or str(e))
    return _verdict


def _default_selector():
    ok, why = uring_available()
    if ok:
        return UringSelector
    warnings.warn(f"uring_net: io_uring is unavailable ({why}); DefaultSelector is "
                  f"selectors.EpollSelector", RuntimeWarning, stacklevel=3)
    return _std.EpollSelector


def __getattr__(name):
    # DefaultSelector is decided at first use, not at import: importing the
    # module costs no ring set-up, and the warning names the first user.
    if name == "DefaultSelector":
        cls = _default_selector()
        globals()["DefaultSelector"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
