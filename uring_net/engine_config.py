"""What the engine is told at start-up: one mode, the sizes, and the kernel
features it may use.

The proxy builds an EngineConfig from the command line (config.Config) and
what the probe found (the capabilities), and the engine reads it once, in its
constructor. A mode is one value, so no combination of switches can ask for
two data paths at once; the features say what the kernel has, and the engine
uses each only where the mode has a use for it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import BALANCES, MODES


@dataclass(frozen=True)
class EngineConfig:
    mode: str = "copy"
    # sizes
    max_conns: int = 4096
    buffers: int = 256
    buffer_size: int = 65536
    max_buffers: int = 0            # the pool's cap; 0: --buffers (no growth)
    max_inflight: int = 1 << 20     # bytes one direction may hold read ahead
    connect_timeout: float = 5.0
    zc_threshold: int = 16384       # smaller sends are copied in every zero-copy mode
    replay_window: int = 65536      # peek: delivered bytes held for a failover
    pipe_size: int = 0              # splice: each pipe's capacity (probed)
    segs_per_buf: int = 8           # test knob (proxy.SEGS_PER_BUF_ENV)
    # every flow ends (0: off)
    idle_timeout: float = 0.0
    client_fin_timeout: float = 0.0
    server_fin_timeout: float = 0.0
    keepalive: tuple[int, int, int] | None = None     # idle, interval, count
    # the upstream pool
    balance: str = "first"          # first, roundrobin, leastconn, source
    retries: int = 3                # other upstreams a failed connect may move on to
    health_interval: float = 0.0    # seconds between health checks; 0: none
    rise: int = 2                   # checks in a row that bring an upstream up ...
    fall: int = 3                   # ... and that take it down
    proxy_protocol: int = 0         # PROXY protocol header to upstreams: 0 (off), 1, 2
    accept_proxy: bool = False      # clients send a PROXY header first (v1 or v2)
    proxy_header_timeout: float = 5.0
    # kernel features the probe found usable (each off: its named fallback)
    multishot_accept: bool = True
    recv_bundle: bool = False
    incremental_buffers: bool = False
    send_zc: bool = False           # zero-copy sends work (zerocopy, auto, peek)
    registered_buffers: bool = False    # SEND_ZC from registered buffers (io_uring)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.mode == "splice" and self.pipe_size <= 0:
            raise ValueError("splice mode needs the probed pipe size")
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}, not {self.balance!r}")
        if self.proxy_protocol not in (0, 1, 2):
            raise ValueError("proxy_protocol must be 0, 1 or 2")
        if not 0 <= self.retries <= 63 or self.rise < 1 or self.fall < 1:
            raise ValueError("retries must be 0..63, rise and fall at least 1")
        if self.registered_buffers and not self.send_zc:
            raise ValueError("registered buffers are for zero-copy sends, which are off")
