"""The receive-buffer pool under sharing: recv bundles and incremental buffers.

With incremental consumption (IOU_PBUF_RING_INC, 6.12+) the recvs of many flows land
one after another in the same buffer, each as a segment of it; a buffer may go back to
the kernel only when the kernel has stopped filling it and every segment in it has been
sent (and notified, if zero-copy). Returning it one segment early hands another flow's
bytes to the next recv, so these tests interleave many small flows through a tiny pool
and check every byte. The plain variant runs the same tests with whole-buffer recvs.
"""
import os
import re

import pytest

from netutil import LoadClient

KiB = 1 << 10


def kernel_at_least(major: int, minor: int) -> bool:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return m is not None and (int(m[1]), int(m[2])) >= (major, minor)


def uses_incremental(p) -> bool:
    """Incremental buffers are the kernel ring's: the epoll backend never has them."""
    return p.listening["backend"] == "uring" and re.search(
        r"^fallback\b.*\bincremental_buffers\b", p.stderr_text(), re.M) is None


@pytest.mark.parametrize("backend", ["uring"])           # a probe of io_uring's ring
@pytest.mark.parametrize("mode", ["copy", "zerocopy", "auto", "peek"])
def test_incremental_buffers_used_where_the_kernel_has_them(proxy, echo_server, mode,
                                                              disabled_features):
    """The probe finds IOU_PBUF_RING_INC on 6.12+ and the engine uses it (or, forced off,
    says so); never a silent change of path."""
    p = proxy(echo_server.addr)
    forced_off = "incremental_buffers" in disabled_features
    assert uses_incremental(p) == (kernel_at_least(6, 12) and not forced_off), p.lines


@pytest.mark.time_limit(120)
@pytest.mark.parametrize("mode", ["copy", "peek"])    # splice has no buffer pool
@pytest.mark.parametrize("buffers,buffer_kib", [(2, 64), (4, 4)])
def test_many_small_flows_through_a_tiny_pool(proxy, echo_server, mode, buffers, buffer_kib,
                                              monkeypatch):
    """300 concurrent echo flows of 1 B to 6 KiB through a pool of two 64 KiB buffers (or
    four of 4 KiB). With incremental buffers the flows' segments interleave inside the
    same few buffers, and with 64 KiB buffers the segment table (8 per buffer to begin
    with) must grow; without, every recv takes a whole buffer and the flows queue for
    them. Every byte must come back in order, and every buffer and segment must be home
    at the end (teardown checks that, and the kernel's ring head against ours).

    The segment table starts at one entry per buffer (the test knob), so with incremental
    buffers a third live segment in a two-buffer pool must grow it: that holds whatever
    the batching, unlike the default of 8, which needed 17 recvs to land between two
    sends and failed on a loaded machine."""
    monkeypatch.setenv("URING_NET_TEST_SEGS_PER_BUF", "1")
    # --max-buffers: the pool must stay this small (it would grow for 300 flows).
    p = proxy(echo_server.addr, "--buffers", str(buffers), "--max-buffers", str(buffers),
              "--buffer-size", str(buffer_kib * KiB))
    sizes = [1 + (i * 7919) % (6 * KiB) for i in range(300)]
    lc = LoadClient(p.listen_addr, sizes, seed_base=40_000, max_connecting=300)
    # ~0.3 s here. A bound, not a speed test: directions waiting for a buffer once
    # stalled for up to 30 s with buffers free (re-armed two per loop timeout).
    lc.run(20)
    closes = p.wait_for_close(len(sizes), 30)
    assert {e["cause"] for e in closes} == {"normal"}, closes
    assert sorted(e["bytes_c2u"] for e in closes) == sorted(sizes)
    assert p.stop() == 0
    st = [e for e in p.lines if e["event"] == "stopped"][-1]
    if buffer_kib == 64:
        # Only incremental buffers put more than one segment in a buffer.
        assert (st["segment_grows"] > 0) == uses_incremental(p), st
