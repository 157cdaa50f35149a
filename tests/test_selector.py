"""UringSelector beyond what CPython's selector tests check: the traps of
building level-triggered readiness from one-shot io_uring polls (stale
completions, fd reuse, closing right after unregister, fork, threads,
thousands of fds), checked against EpollSelector as the reference."""

import os
import selectors
import socket
import threading

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import NOFILE_LIMIT
from netutil import run_without_io_uring
from uring_net.selectors import UringSelector

R, W = selectors.EVENT_READ, selectors.EVENT_WRITE


def by_fd(ready):
    return {key.fd: events for key, events in ready}


@pytest.fixture
def sel():
    s = UringSelector()
    yield s
    s.close()


def test_level_triggered_until_the_data_is_read(sel):
    a, b = socket.socketpair()
    with a, b:
        sel.register(a, R)
        assert sel.select(0) == []
        b.send(b"x" * 10)
        for _ in range(3):          # still unread: reported on every select
            assert by_fd(sel.select(0)) == {a.fileno(): R}
        assert a.recv(100) == b"x" * 10
        assert sel.select(0) == []


def test_changes_are_batched_into_the_wait(sel):
    pairs = [socket.socketpair() for _ in range(100)]
    try:
        for a, b in pairs:
            sel.register(a, R)
            sel.register(b, W)
        before = sel.stats()["enters"]
        ready = by_fd(sel.select(1))
        assert ready == {b.fileno(): W for a, b in pairs}
        assert sel.stats()["enters"] - before == 1       # 200 arms, one io_uring_enter
        for a, b in pairs:
            sel.modify(b, R)        # writers now wait for data: nothing is ready
        assert sel.select(0) == []
        # The writers' polls had fired: 100 new arms, nothing to remove.
        assert sel.stats()["arms"] == 300 and sel.stats()["removes"] == 0
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_a_zero_timeout_select_with_nothing_to_do_makes_no_syscall(sel):
    # An asyncio loop selects with timeout 0 on every turn that has callbacks
    # ready. With nothing to submit and no completion work waiting in the
    # kernel (IORING_SQ_TASKRUN, which needs IORING_SETUP_TASKRUN_FLAG) there
    # is nothing to enter for: each such select() once cost ~30 us here.
    a, b = socket.socketpair()
    with a, b:
        sel.register(a, R)
        assert sel.select(0) == []          # arms the poll: one enter
        before = sel.stats()["enters"]
        for _ in range(100):
            assert sel.select(0) == []
        assert sel.stats()["enters"] == before
        b.send(b"x")
        assert by_fd(sel.select(5)) == {a.fileno(): R}


def test_modify_with_the_poll_armed_replaces_it(sel):
    a, b = socket.socketpair()
    with a, b:
        sel.register(a, R, "old")
        assert sel.select(0) == []          # the READ poll is now in the kernel
        key2 = sel.modify(a, W, "new")
        assert key2.data == "new" and sel.get_key(a) is key2
        assert sel.select(0) == [(key2, W)]
        assert sel.stats()["removes"] == 1
        # A data-only change keeps the poll.
        key3 = sel.modify(a, W, "newer")
        assert sel.select(0) == [(key3, W)] and sel.stats()["removes"] == 1


def test_reused_fd_number_gets_no_stale_completion(sel):
    a, b = socket.socketpair()
    sel.register(a, R)
    assert sel.select(0) == []              # armed on the first socket
    num = a.fileno()
    sel.unregister(a)
    a.close()
    b.close()
    c, d = socket.socketpair()
    with c, d:
        # The lowest free number is taken again (fd reuse is the point).
        reused = c if c.fileno() == num else d
        assert reused.fileno() == num
        key = sel.register(reused, R)
        peer = d if reused is c else c
        peer.send(b"y")
        assert sel.select(1) == [(key, R)]
        # The first socket's poll, cancelled, came back with an old generation.
        assert sel.stats()["stale"] >= 1


def test_close_right_after_unregister_sends_the_fin_at_once(sel):
    # An armed poll holds the file: the FIN would wait for the next select()
    # if unregister() only queued its POLL_REMOVE.
    srv = socket.create_server(("127.0.0.1", 0))
    with srv:
        peer = socket.create_connection(srv.getsockname())
        conn, _ = srv.accept()
        with peer:
            sel.register(conn, R)
            assert sel.select(0) == []      # armed
            sel.unregister(conn)
            conn.close()
            peer.settimeout(10)
            assert peer.recv(10) == b""     # EOF, with no select() in between


def test_unregister_of_an_fd_closed_while_armed(sel):
    a, b = socket.socketpair()
    sel.register(a, R)
    sel.register(b, W)
    assert len(sel.select(0)) == 1
    a.close()
    b.close()
    sel.unregister(a)                       # no OSError, as EpollSelector
    sel.unregister(b)
    assert sel.select(0) == []


def test_registered_fd_closed_before_its_poll_went_in(sel):
    a, b = socket.socketpair()
    with b:
        key = sel.register(a, R)            # queued, not yet in the kernel
        a.close()
        # POLL_ADD fails EBADF: reported ready, so the caller's read says why.
        assert sel.select(0) == [(key, R)]
        sel.unregister(key.fd)


def test_writer_whose_peer_half_closed_does_not_spin(sel):
    # io_uring adds POLLRDHUP to every poll: a write-only poll would wake on
    # the peer's FIN at every re-arm. Such an fd is parked in an epoll set.
    a, b = socket.socketpair()
    with a, b:
        fill(a)
        key = sel.register(a, W)
        b.shutdown(socket.SHUT_WR)
        enters = sel.stats()["enters"]
        assert sel.select(0.3) == []        # waits the whole timeout, once
        assert sel.stats()["enters"] - enters <= 2
        assert sel.stats()["parked"] == 1
        while b.recv(1 << 20, socket.MSG_DONTWAIT) if select_readable(b) else False:
            pass
        assert sel.select(5) == [(key, W)]  # the peer read: writable again
        assert sel.select(0) == [(key, W)]  # and level-triggered while parked
        key = sel.modify(a, R | W)          # back on a ring poll: EOF is readable
        assert by_fd(sel.select(0)) == {a.fileno(): R | W}


def fill(sock):
    """Send on sock, made non-blocking, until its buffer is full."""
    sock.setblocking(False)
    try:
        while True:
            sock.send(b"f" * 65536)
    except BlockingIOError:
        pass


def select_readable(sock):
    import select
    return bool(select.select([sock], [], [], 0)[0])


def test_modify_failure_unregisters(sel):
    # CPython's test_modify_unregister (bpo-30014) patches the internals of the
    # selectors it knows and skips the others: its rule, checked here.
    a, b = socket.socketpair()
    with a, b:
        sel.register(a, R)

        class Failing:
            def __init__(self, polls):
                self.polls = polls

            def change(self, *args):
                raise ZeroDivisionError

            def __getattr__(self, name):
                return getattr(self.polls, name)

        real = sel._polls
        sel._polls = Failing(real)
        try:
            with pytest.raises(ZeroDivisionError):
                sel.modify(a, W)
        finally:
            sel._polls = real
        assert len(sel.get_map()) == 0
        assert sel.select(0) == []


def test_select_from_another_thread(sel):
    a, b = socket.socketpair()
    with a, b:
        key = sel.register(a, R)
        out = []
        t = threading.Thread(target=lambda: out.append(sel.select(10)))
        t.start()
        b.send(b"z")
        t.join(20)
        assert out == [[(key, R)]]


def test_select_waits_on_past_the_completions_it_drops(sel):
    # unregister() and modify() remove polls whose completions come back;
    # select() drops them, and must then wait on for the time left, as
    # epoll_wait does: select(None) never returns [].
    import time
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    with a, b, c, d:
        sel.register(a, R)
        sel.select(0)                       # a's poll in the kernel
        sel.unregister(a)
        key = sel.register(c, R)
        start = time.monotonic()
        assert sel.select(0.2) == []
        assert time.monotonic() - start >= 0.19
        sel.modify(c, W | R)
        sel.modify(c, R)                    # (both polls removed, one armed)
        sel.unregister(c)
        key = sel.register(c, R)
        timer = threading.Timer(0.1, d.send, (b"x",))
        timer.start()
        try:
            assert sel.select(None) == [(key, R)]
        finally:
            timer.join()


def test_one_short_lived_thread_after_another(sel):
    # A thread that exits leaves its pthread_self() to the next one started:
    # the ring must still move to the new thread, whose ident looks the same.
    a, b = socket.socketpair()
    with a, b:
        key = sel.register(a, R)
        b.send(b"z")
        out = []
        for _ in range(3):
            t = threading.Thread(target=lambda: out.append(sel.select(10)))
            t.start()
            t.join(20)
        assert out == [[(key, R)]] * 3


def test_a_closed_selector_refuses_as_epolls_does():
    for cls in (selectors.EpollSelector, UringSelector):
        s = cls()
        s.close()
        a, b = socket.socketpair()
        with a, b:
            for call in (lambda: s.select(0), s.fileno, lambda: s.register(a, R)):
                with pytest.raises(ValueError):
                    call()


def test_every_parked_writer_is_reported_by_one_select(sel):
    # More write-only fds parked (their peers half-closed) than one
    # epoll_wait of 64 events returns: all are reported once writable.
    pairs = [socket.socketpair() for _ in range(100)]
    try:
        for a, b in pairs:
            fill(a)
            sel.register(a, W)
            b.shutdown(socket.SHUT_WR)
        assert sel.select(0.1) == []        # all parked: nothing to write
        assert sel.stats()["parked"] == 100
        for a, b in pairs:
            while select_readable(b) and b.recv(1 << 20, socket.MSG_DONTWAIT):
                pass
        assert len(sel.select(5)) == 100
        assert len(sel.select(0)) == 100
    finally:
        for pair in pairs:
            for sock in pair:
                sock.close()


@pytest.mark.skipif(NOFILE_LIMIT < 10000,
                    reason=f"needs 10,000 fds; RLIMIT_NOFILE allows {NOFILE_LIMIT}")
def test_more_ready_fds_than_the_cq_holds_are_all_reported(sel):
    # One select() arms them all; their completions overflow the CQ (4,096
    # entries), and NODROP keeps the rest until harvest drains them.
    # (conftest raised the fd limit as far as the hard limit allows.)
    pairs = []
    try:
        pairs = [socket.socketpair() for _ in range(4500)]
        for a, b in pairs:
            sel.register(b, W)
        ready = sel.select(5)
        assert sorted(key.fd for key, _ in ready) == sorted(b.fileno() for a, b in pairs)
        assert all(ev == W for _, ev in ready)
        assert sel.stats()["overflows"] >= 1
        assert sel.select(0) and len(sel.select(0)) == 4500    # and again, level-triggered
    finally:
        for a, b in pairs:
            a.close()
            b.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_gets_a_ring_of_its_own(sel):
    a, b = socket.socketpair()
    with a, b:
        key = sel.register(a, R)
        assert sel.select(0) == []          # armed in the parent's ring
        b.send(b"p")
        pid = os.fork()
        if pid == 0:                        # child: report through the exit code
            code = 1
            try:
                ready = sel.select(5)
                code = 0 if ready == [(sel.get_key(a), R)] and sel.stats()["setup"] else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The parent's ring was left alone: its armed poll still answers.
        assert sel.select(5) == [(key, R)]


def test_default_selector_falls_back_to_epoll_once_with_a_warning():
    code = ("import warnings, selectors; warnings.simplefilter('always');"
            "import uring_net.selectors as s;"
            "assert s.DefaultSelector is selectors.EpollSelector;"
            "assert s.DefaultSelector is selectors.EpollSelector;"
            "sel = s.DefaultSelector(); sel.close(); print('ok')")
    out, warnings = run_without_io_uring(code)
    assert out.strip() == "ok"
    assert len(warnings) == 1, warnings
    assert "io_uring is unavailable" in warnings[0] and "EPERM" in warnings[0]


def test_default_selector_is_uring_where_it_works():
    import uring_net.selectors as s
    assert s.DefaultSelector is UringSelector


# --- the reference: EpollSelector, step by step --------------------------

N = 4
step = st.one_of(
    st.tuples(st.just("register"), st.integers(0, N - 1), st.sampled_from([R, W, R | W])),
    st.tuples(st.just("modify"), st.integers(0, N - 1), st.sampled_from([R, W, R | W])),
    st.tuples(st.just("unregister"), st.integers(0, N - 1), st.just(0)),
    st.tuples(st.just("send"), st.integers(0, N - 1), st.integers(1, 3)),
    st.tuples(st.just("recv"), st.integers(0, N - 1), st.integers(1, 3)),
    st.tuples(st.just("fill"), st.integers(0, N - 1), st.just(0)),
    st.tuples(st.just("shut"), st.integers(0, N - 1), st.just(0)),
    st.tuples(st.just("select"), st.just(0), st.just(0)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, max_size=25))
# Found by this test: a poll armed by one select() wakes, the caller reads the byte
# without being told, and the next select() must not call the socket readable.
@example([("register", 0, R), ("select", 0, 0), ("send", 0, 1), ("recv", 0, 1)])
@example([("register", 0, R), ("register", 1, R), ("select", 0, 0), ("send", 0, 1),
          ("send", 1, 1), ("recv", 0, 1)])
def test_same_answers_as_epoll(steps):
    """Any sequence of changes and socket traffic: after each select(0),
    UringSelector reports exactly what EpollSelector reports."""
    pairs = [socket.socketpair() for _ in range(N)]
    for a, b in pairs:
        a.setblocking(False)
        b.setblocking(False)
    uring, epoll = UringSelector(), selectors.EpollSelector()
    try:
        for op, i, arg in steps + [("select", 0, 0)]:
            a, b = pairs[i]
            if op in ("register", "modify", "unregister"):
                outcomes = []
                for s in (uring, epoll):
                    try:
                        getattr(s, op)(a, *([arg] if arg else []))
                        outcomes.append(None)
                    except KeyError:
                        outcomes.append(KeyError)
                assert outcomes[0] == outcomes[1]
            elif op == "send":
                try:
                    b.send(b"d" * arg)
                except OSError:
                    pass
            elif op == "recv":
                try:
                    a.recv(arg)
                except OSError:
                    pass
            elif op == "fill":
                try:
                    while True:
                        a.send(b"f" * 65536)
                except OSError:
                    pass
            elif op == "shut":
                b.shutdown(socket.SHUT_WR)
            else:
                got = by_fd(uring.select(0))
                want = by_fd(epoll.select(0))
                assert got == want
    finally:
        uring.close()
        epoll.close()
        for a, b in pairs:
            a.close()
            b.close()
