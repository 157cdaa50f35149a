"""--mode zerocopy: notification-gated buffers, the usage counts, the threshold, fallbacks.

Every behaviour test in the suite also runs in zerocopy mode (conftest MODES); these
check what only this mode has. A limit of this machine, stated once: on loopback (and
veth) the kernel copies every SEND_ZC at send time, so a buffer reused before its
notification could not corrupt bytes here. What is checked instead is the ownership
accounting: every send that promised a notification got one, and every buffer came
back to the pool (the fixture checks buffers_out == 0 for every proxy it ran).
"""
import os

import pytest

from netutil import BgThread, connect, duplex, fmt_addr, reset_close, send_stream

MiB = 1 << 20

zerocopy_only = pytest.mark.parametrize("mode", ["zerocopy"])


def stopped_event(p) -> dict:
    assert p.stop() == 0
    return [e for e in p.lines if e["event"] == "stopped"][-1]


def echo_roundtrip(p, seed: int, size: int) -> None:
    with connect(p.listen_addr) as c:
        duplex(c, send_seed=seed, send_total=size, recv_seed=seed, recv_total=size)


@zerocopy_only
def test_every_zero_copy_send_gets_its_notification(proxy, echo_server):
    p = proxy(echo_server.addr, "--zc-threshold", "4096", log_format="json")
    zc = next(e for e in p.lines if e["event"] == "zerocopy")
    for seed in range(4):
        echo_roundtrip(p, seed, 8 * MiB)
    p.wait_for_close(4, 10)
    st = stopped_event(p)
    assert st["zc_sends"] > 0, st
    assert st["zc_notifs"] == st["zc_sends"], st
    # Honest reporting: the usage report says whether the kernel copied anyway. On
    # loopback it always does, and the start-up probe said so.
    if zc["loopback_copies"] == "yes":
        assert st["zc_copied"] == st["zc_notifs"], st
    assert st["buffers_out"] == 0, st
    # io_uring sends from registered buffers, each registered on its first zero-copy
    # send (nothing is pinned at start); the epoll driver has no registered buffers.
    if proxy.backend == "uring":
        assert 0 < st["zc_registered_bufs"] <= st["pool_buffers"], st
    else:
        assert st["zc_registered_bufs"] == 0, st


@zerocopy_only
def test_resets_mid_transfer_keep_buffers_and_notifications_whole(proxy, echo_server, upstream):
    """Clients reset while their zero-copy sends are in flight; distinctive patterns on
    the flows that finish must arrive intact, and the slots, fds and buffers of the reset
    flows must all come back once their notifications are in. A small pool makes
    buffers go round quickly."""
    p = proxy(echo_server.addr, "--buffers", "64", "--buffer-size", "16384",
              "--zc-threshold", "4096", log_format="json")
    idle_fds = p.fd_count()

    def victim(seed):
        # Sends without reading the echo, so backpressure soon stalls it mid-transfer
        # with zero-copy sends of its bytes in flight; then it resets.
        c = connect(p.listen_addr)
        c.settimeout(0.3)
        try:
            send_stream(c, seed, 64 * MiB, shutdown=False)
        except (TimeoutError, ConnectionResetError, BrokenPipeError):
            pass
        reset_close(c)

    def keeper(seed):
        echo_roundtrip(p, seed, 6 * MiB)

    threads = [BgThread(victim if i % 2 else keeper, 1000 + i, name=f"flow{i}") for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.result(60)
    closes = p.wait_for_close(12, 20)
    causes = sorted(c["cause"] for c in closes)
    assert causes.count("normal") == 6, causes
    assert p.wait_fd_count(idle_fds, 10) == idle_fds
    st = stopped_event(p)
    assert st["zc_sends"] > 0 and st["zc_notifs"] == st["zc_sends"], st
    assert st["buffers_out"] == 0, st


@zerocopy_only
def test_sends_below_the_threshold_are_copied(proxy, echo_server):
    # Every send carries at most one 64 KiB buffer, below this threshold.
    p = proxy(echo_server.addr, "--zc-threshold", str(1 << 20), log_format="json")
    echo_roundtrip(p, 7, 4 * MiB)
    p.wait_for_close(1, 10)
    st = stopped_event(p)
    assert (st["zc_sends"], st["zc_notifs"]) == (0, 0), st


@zerocopy_only
@pytest.mark.parametrize("disabled_features", ["send_zc"], ids=["no-send_zc"])
def test_without_send_zc_the_mode_falls_back_to_copying_sends(proxy, echo_server):
    p = proxy(echo_server.addr, log_format="json")
    fb = [e for e in p.lines if e["event"] == "fallback" and e["feature"] == "send_zc"]
    assert len(fb) == 1 and fb[0]["using"] == "copy-mode sends", p.lines
    echo_roundtrip(p, 8, 4 * MiB)
    p.wait_for_close(1, 10)
    st = stopped_event(p)
    assert st["zc_sends"] == 0, st


@zerocopy_only
@pytest.mark.parametrize("disabled_features", ["registered_buffers"], ids=["no-registered"])
def test_without_registered_buffers_zero_copy_uses_plain_addresses(proxy, echo_server):
    p = proxy(echo_server.addr, "--zc-threshold", "4096", log_format="json")
    fb = [e for e in p.lines if e["event"] == "fallback"]
    assert [e["feature"] for e in fb] == ["registered_buffers"], fb
    echo_roundtrip(p, 9, 4 * MiB)
    p.wait_for_close(1, 10)
    st = stopped_event(p)
    assert st["zc_sends"] > 0 and st["zc_notifs"] == st["zc_sends"], st
    assert st["zc_registered_bufs"] == 0, st


def test_probe_reports_send_zc(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "uring_net", "--probe"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    rows = {line.split("  ")[0].strip(): line for line in out.stdout.splitlines()}
    assert "send_zc on TCP" in rows and "send_zc usage report" in rows, out.stdout


@pytest.mark.parametrize("mode", ["auto"])
def test_auto_backs_off_zero_copy_where_the_kernel_copies(proxy, echo_server):
    """Auto mode starts a direction on zero-copy sends and, once the kernel's usage
    reports show it copying (always, on loopback), goes back to plain sends. On loopback
    a notification comes only when the reader has consumed the data, so the sends made
    while the first 16 reports are awaited vary; what must hold is that most of the
    2 x 1024 buffer-sized sends were plain."""
    p = proxy(echo_server.addr, "--zc-threshold", "4096", log_format="json")
    auto = next(e for e in p.lines if e["event"] == "auto")
    zc = next(e for e in p.lines if e["event"] == "zerocopy")
    assert "zero-copy" in auto["choice"], auto
    echo_roundtrip(p, 11, 64 * MiB)      # 1024 buffers each way at 64 KiB
    p.wait_for_close(1, 20)
    st = stopped_event(p)
    assert st["zc_notifs"] == st["zc_sends"], st
    if zc["loopback_copies"] == "yes":
        assert st["zc_backoffs"] == 2, st           # both directions judged, both off
        assert 2 * 16 <= st["zc_sends"] < 2 * 1024 // 4, st


@pytest.mark.parametrize("mode", ["zerocopy", "auto"])
def test_pinned_memory_running_out_falls_back_to_copy_sends(echo_server, mode):
    """A process without CAP_IPC_LOCK pins zero-copy pages against RLIMIT_MEMLOCK. Once
    registering buffers has met the limit, a SEND_ZC on plain addresses fails with
    ENOMEM having sent nothing: that must turn zero-copy off with one line and send the
    same bytes by copy, not reset the flow (it reset all four of these before)."""
    import shutil

    from conftest import ProxyProcess, proxy_argv
    if os.geteuid() != 0 or not (shutil.which("prlimit") and shutil.which("setpriv")):
        pytest.fail("needs root, prlimit and setpriv (util-linux) to drop CAP_IPC_LOCK")
    limit = 1 << 20        # the rings fit; the registered pool does not
    argv = ["prlimit", f"--memlock={limit}:{limit}", "setpriv", "--inh-caps=-ipc_lock",
            "--bounding-set=-ipc_lock",
            *proxy_argv("127.0.0.1:0", echo_server.addr, "uring", mode, log_format="json")]
    p = ProxyProcess(argv, "json")
    try:
        for seed in range(4):
            with connect(p.listen_addr) as c:
                client = fmt_addr(c.getsockname())
                duplex(c, send_seed=seed, send_total=1 << 20, recv_seed=seed, recv_total=1 << 20)
            line = p.close_for(client)
            assert (line["cause"], line["bytes_u2c"]) == ("normal", 1 << 20), line
        fb = [(e["feature"], e["reason"]) for e in p.lines if e["event"] == "fallback"]
        assert ("send_zc", "ENOMEM at run time") in fb, fb
        assert fb.count(("send_zc", "ENOMEM at run time")) == 1, fb
    finally:
        assert p.stop() == 0, p.stderr_text()
    assert not p.problems(), p.problems()
