"""Log lines: one event per line on stderr, as text or JSON.

The formats are a contract (docs/cli-contract.md): scripts parse them.

stderr may be a pipe nobody drains for a while (a stuck log shipper, a
parent that reads only at exit). A write there blocks, and a proxy
blocked in a write serves nobody: 2,000 departing clients once sat in
CLOSE-WAIT behind a full 64 KiB pipe. So the proxy writes through a
thread (start_writer) that holds at most MAX_PENDING characters; beyond
that lines are dropped, counted, and the count is written once the
stream takes lines again.
"""
from __future__ import annotations

import json
import re
import sys
import threading
import time

# Text rendering of the events whose shape the contract fixes.
_TEXT = {
    "listening": "listening on {listen} upstream {upstream} backend={backend} mode={mode}",
    "close": ("close client={client} upstream={upstream} c2u={bytes_c2u} u2c={bytes_u2c} "
              "duration_ms={duration_ms} cause={cause} term={term}"),
    "stopped": "stopped connections={connections} c2u={bytes_c2u} u2c={bytes_u2c}",
}


# Each template's own fields: the others of an event go after it (error=...).
_TEXT_KEYS = {event: frozenset(re.findall(r"\{(\w+)\}", t)) for event, t in _TEXT.items()}

MAX_PENDING = 1 << 20


class Log:
    def __init__(self, fmt: str = "text", verbose: int = 0, stream=None):
        self.fmt = fmt
        self.verbose = verbose
        self.stream = stream if stream is not None else sys.stderr
        self._writer = None
        self._cv = threading.Condition()
        self._queue: list[str] = []
        self._pending = 0        # characters queued or being written
        self._dropped = 0
        self._closing = False

    def event(self, event: str, level: int = 0, **fields) -> None:
        """Write one line if `level` <= the verbosity (0: always)."""
        if level > self.verbose:
            return
        self.raw(self._render(event, fields))

    def raw(self, line: str) -> None:
        """Write one line as it is (error messages), in order with the events."""
        self.lines([line])

    def block(self, text: str, nlines: int) -> None:
        """`nlines` lines already rendered, each ending in a newline (the engine's
        close lines): queued whole, or dropped and counted whole. A block always
        fits an empty queue: it holds at most one drain of the engine's records
        (4,096 lines, about 1.2 MB in JSON), which alone may exceed MAX_PENDING."""
        if self._writer is None:
            self.stream.write(text)
            self.stream.flush()
            return
        with self._cv:
            if self._pending and self._pending + len(text) > MAX_PENDING:
                self._dropped += nlines
                return
            was_empty = not self._queue
            self._queue.append(text)
            self._pending += len(text)
            if was_empty:
                self._cv.notify()

    def lines(self, lines: list[str]) -> None:
        if self._writer is None:
            for line in lines:
                self.stream.write(line + "\n")
            self.stream.flush()
            return
        with self._cv:
            was_empty = not self._queue
            for line in lines:
                if self._pending + len(line) + 1 > MAX_PENDING:
                    self._dropped += 1
                    continue
                self._queue.append(line + "\n")
                self._pending += len(line) + 1
            if was_empty and self._queue:   # the writer waits only on an empty queue
                self._cv.notify()

    def start_writer(self) -> None:
        """From now on lines go through a thread: a blocked stream no longer blocks the caller."""
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="uring-proxy-log", daemon=True)
            self._writer.start()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (waiting at most `timeout` for the stream), then stop the thread."""
        if self._writer is None:
            return
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._writer.join(timeout)
        self._writer = None

    def _write_loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._dropped and not self._closing:
                    self._cv.wait()
                if not self._queue and not self._dropped:
                    return
                lines, self._queue = self._queue, []
                dropped, self._dropped = self._dropped, 0
            queued = sum(map(len, lines))
            if dropped:
                lines.append(self._render("log_dropped", {"stderr_lines": dropped}) + "\n")
            text = "".join(lines)
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                pass     # stderr gone (EPIPE, closed): nothing is left to tell
            with self._cv:
                self._pending -= queued

    def _render(self, event: str, fields: dict) -> str:
        if self.fmt == "json":
            line = json.dumps({"event": event, "ts": round(time.time(), 6), **fields})
        elif event in _TEXT:
            # The contract's fields first, in its order; any others (error=...) after.
            keys = _TEXT_KEYS[event]
            extra = " ".join(f"{k}={v}" for k, v in fields.items() if k not in keys)
            line = _TEXT[event].format(**fields) + (" " + extra if extra else "")
        else:
            parts = " ".join(f"{k}={v}" for k, v in fields.items())
            line = f"{event} {parts}" if parts else event
        return line
