"""Log lines: one event per line on stderr, as text or JSON.

The formats are a contract (docs/cli-contract.md): scripts parse them.
"""
from __future__ import annotations

import json
import sys
import time

# Text rendering of the events whose shape the contract fixes.
_TEXT = {
    "listening": "listening on {listen} upstream {upstream} backend={backend} mode={mode}",
    "close": ("close client={client} upstream={upstream} c2u={bytes_c2u} u2c={bytes_u2c} "
              "duration_ms={duration_ms} cause={cause} term={term}"),
    "stopped": "stopped connections={connections} c2u={bytes_c2u} u2c={bytes_u2c}",
}


class Log:
    def __init__(self, fmt: str = "text", verbose: int = 0, stream=None):
        self.fmt = fmt
        self.verbose = verbose
        self.stream = stream if stream is not None else sys.stderr

    def event(self, event: str, level: int = 0, **fields) -> None:
        """Write one line if `level` <= the verbosity (0: always)."""
        if level > self.verbose:
            return
        if self.fmt == "json":
            line = json.dumps({"event": event, "ts": round(time.time(), 6), **fields})
        elif event in _TEXT:
            # The contract's fields first, in its order; any others (error=...) after.
            template = _TEXT[event]
            extra = " ".join(f"{k}={v}" for k, v in fields.items() if "{" + k + "}" not in template)
            line = template.format(**fields) + (" " + extra if extra else "")
        else:
            parts = " ".join(f"{k}={v}" for k, v in fields.items())
            line = f"{event} {parts}" if parts else event
        self.stream.write(line + "\n")
        self.stream.flush()
