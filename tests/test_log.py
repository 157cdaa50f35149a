"""The log writer: a stream that blocks must not block the proxy, and what the
bounded queue had to drop is counted in the log itself.

The stream here is a real pipe whose reader waits until the test lets it read, so a
write blocks in the kernel exactly as on a full stderr pipe.
"""
from __future__ import annotations

import os
import threading

from uring_net import log as logmod
from uring_net.log import Log


class HeldPipe:
    """A pipe as the log's stream; nothing reads it until ``start_reading()``."""

    def __init__(self):
        self.r, self.w = os.pipe()
        self.stream = os.fdopen(self.w, "w", buffering=1)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)

    def _read(self):
        with os.fdopen(self.r, "rb") as f:
            self.lines = f.read().decode().splitlines()

    def start_reading(self):
        self._reader.start()

    def finish(self, log: Log) -> list[str]:
        log.close()
        self.stream.close()
        self._reader.join(10)
        return self.lines


def test_a_blocked_stream_does_not_block_the_caller(monkeypatch):
    monkeypatch.setattr(logmod, "MAX_PENDING", 256 * 1024)
    pipe = HeldPipe()
    log = Log("text", stream=pipe.stream)
    log.start_writer()
    n = 20000        # ~1.2 MB of lines: the 64 KiB pipe and the 256 KiB queue overflow
    done = threading.Event()

    def produce():
        for i in range(n):
            log.event("close", client=f"127.0.0.1:{i}", upstream="127.0.0.1:1", bytes_c2u=i,
                      bytes_u2c=0, duration_ms=0, cause="normal", term="--")
        log.raw("last line")
        done.set()

    threading.Thread(target=produce, daemon=True).start()
    # The writer thread is stuck in write(2) on the full pipe; the producer is not.
    assert done.wait(30), "Log.event blocked while the stream was full"
    pipe.start_reading()
    out = pipe.finish(log)
    closes = [ln for ln in out if ln.startswith("close ")]
    dropped = [ln for ln in out if ln.startswith("log_dropped ")]
    assert dropped, out[-3:]
    lost = sum(int(ln.partition("stderr_lines=")[2]) for ln in dropped)
    assert 0 < lost < n
    # Every line is written whole or counted, and the written ones are in order.
    assert len(closes) + ("last line" in out) + lost == n + 1, (len(closes), lost, dropped)
    seq = [int(ln.split()[1].rpartition(":")[2]) for ln in closes]
    assert seq == sorted(seq)


def test_lines_written_in_order_when_the_stream_keeps_up():
    pipe = HeldPipe()
    log = Log("json", stream=pipe.stream)
    log.start_writer()
    pipe.start_reading()
    for i in range(5000):
        log.event("accept_paused", reason="EMFILE", times=i)
    out = pipe.finish(log)
    assert len(out) == 5000
    assert all(f'"times": {i}' in ln for i, ln in enumerate(out))


def test_blocks_of_rendered_lines_are_kept_or_counted_whole(monkeypatch):
    """The engine's close lines come as one block per drain (Log.block). A block
    larger than MAX_PENDING still goes into an empty queue (one drain is bounded by
    the engine's record array); while that block is unwritten, the queue is over its
    limit and every further block is dropped and its lines counted, whole."""
    monkeypatch.setattr(logmod, "MAX_PENDING", 1024)
    pipe = HeldPipe()
    log = Log("text", stream=pipe.stream)
    log.start_writer()
    # ~150 KB: more than the 64 KiB pipe takes, so the writer blocks in write(2)
    # until the reader starts, and the block stays pending all that time.
    first = "".join(f"close first{i:06d} {'x' * 80}\n" for i in range(1500))
    log.block(first, 1500)
    for b in range(50):
        log.block("".join(f"close b{b}-{i}\n" for i in range(20)), 20)
    pipe.start_reading()
    out = pipe.finish(log)
    assert [ln for ln in out if ln.startswith("close first")] == first.splitlines()
    assert not [ln for ln in out if ln.startswith("close b")]
    lost = sum(int(ln.partition("stderr_lines=")[2]) for ln in out if ln.startswith("log_dropped "))
    assert lost == 50 * 20
