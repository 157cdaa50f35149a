"""`uring-proxy demo`: the proxy in front of a built-in upstream, every byte verified.

The built-in upstream speaks a one-byte protocol: a connection that starts
with b"E" is echoed back; one that starts with b"S" is a sink, answered at
EOF with the count and SHA-256 of what arrived. The load drives several
connections of each kind at once through the proxy and checks every byte.
"""
from __future__ import annotations

import hashlib
import io
import random
import socket
import struct
import sys
import threading
import time

from .config import Config, Endpoint, _Parser, _positive_int
from .log import Log
from .proxy import Proxy, StartupError

CHUNK = 256 * 1024


class BuiltinUpstream:
    """Echo and sink on one loopback port, a thread per connection."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.sock.getsockname()[1]
        self._threads = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(c,), daemon=True)
            t.start()

    @staticmethod
    def _serve(c):
        with c:
            kind = c.recv(1)
            if kind == b"E":
                while data := c.recv(CHUNK):
                    c.sendall(data)
            elif kind == b"S":
                h, n = hashlib.sha256(), 0
                while data := c.recv(CHUNK):
                    h.update(data)
                    n += len(data)
                c.sendall(struct.pack("!Q", n) + h.digest())
            c.shutdown(socket.SHUT_WR)

    def close(self):
        self.sock.close()


class Pattern:
    """A connection's byte stream: one seeded random 1 MiB block, repeated, each copy
    stamped with its index, so a lost, repeated or reordered block cannot pass."""

    BLOCK = 1 << 20

    def __init__(self, seed: int):
        self.seed = seed
        self.body = random.Random(seed).randbytes(self.BLOCK)
        self._k, self._block = -1, b""

    def block(self, k: int) -> bytes:
        if k != self._k:
            self._k, self._block = k, struct.pack("!QQ", self.seed, k) + self.body[16:]
        return self._block

    def slice(self, off: int, n: int) -> bytes:
        out = bytearray()
        while n > 0:
            k, o = divmod(off, self.BLOCK)
            block = self.block(k)
            m = min(n, self.BLOCK - o)
            out += block[o:o + m]
            off += m
            n -= m
        return bytes(out)


class Conn:
    def __init__(self, idx: int, kind: str, size: int):
        self.idx, self.kind, self.size = idx, kind, size
        self.sent = self.back = 0
        self.verified = None
        self.error = ""
        self.seconds = 0.0
        self._reply = b""
        self._echo_ok = True

    def run(self, port: int):
        t0 = time.monotonic()
        try:
            self._run(port)
        except OSError as e:
            self.verified, self.error = False, e.strerror or str(e)
        self.seconds = time.monotonic() - t0

    def _run(self, port: int):
        pattern = Pattern(self.idx)
        sent_hash = hashlib.sha256()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"E" if self.kind == "echo" else b"S")
            reader = threading.Thread(target=self._read, args=(s, pattern))
            reader.start()
            for off in range(0, self.size, CHUNK):
                chunk = pattern.slice(off, min(CHUNK, self.size - off))
                sent_hash.update(chunk)
                s.sendall(chunk)
                self.sent += len(chunk)
            s.shutdown(socket.SHUT_WR)
            reader.join()
        if self.kind == "echo":
            self.verified = self._echo_ok and self.back == self.size
        else:
            self.verified = self._reply == struct.pack("!Q", self.size) + sent_hash.digest()
            self.back = self.size if self.verified else 0

    def _read(self, s, pattern):
        buf = bytearray()
        while data := s.recv(CHUNK):
            if self.kind == "echo":
                if data != pattern.slice(self.back, len(data)):
                    self._echo_ok = False
                self.back += len(data)
            else:
                buf += data
        self._reply = bytes(buf)


def _progress(conns, total, done: threading.Event, out):
    tty = out.isatty()
    t0 = time.monotonic()
    while not done.wait(0.25 if tty else 1.0):
        moved = sum(c.sent + c.back for c in conns)
        pct = 100.0 * moved / total if total else 100.0
        line = f"  moving bytes through the proxy: {moved / 1e6:8.1f} / {total / 1e6:.1f} MB ({pct:5.1f}%)"
        out.write(("\r" + line) if tty else (line + "\n"))
        out.flush()
    if tty:
        out.write("\r" + " " * 80 + "\r")
    out.write(f"  done in {time.monotonic() - t0:.2f} s\n")


def backend_text(proxy) -> str:
    if proxy.ring is not None:
        return f"io_uring set-up {proxy.ring.setup_mode}"
    return f"{proxy.backend} backend"


def main(argv) -> int:
    p = _Parser(prog="uring-proxy demo", description=(
        "Start a built-in upstream (echo and sink) on loopback, put uring-proxy in front "
        "of it, drive several connections through it and verify every byte."))
    p.add_argument("--connections", type=_positive_int("--connections", 1, 512), default=8,
                   help="connections at once, half echo and half sink")
    p.add_argument("--bytes", type=_positive_int("--bytes", 1), default=32 << 20,
                   help="bytes each connection sends")
    ns = p.parse_args(argv)
    out = sys.stdout

    upstream = BuiltinUpstream()
    cfg = Config(listen=Endpoint("127.0.0.1", 0, socket.AF_INET),
                 upstreams=(Endpoint("127.0.0.1", upstream.port, socket.AF_INET),))
    events = io.StringIO()
    proxy = Proxy(cfg, Log("json", 0, stream=events))
    try:
        address = proxy.start()
    except StartupError as e:
        print(f"uring-proxy: error: {e}", file=sys.stderr)
        return 1
    port = int(address.rsplit(":", 1)[1])
    out.write(f"uring-proxy demo: built-in upstream (echo + sink) on 127.0.0.1:{upstream.port}\n"
              f"  proxy on {address}, {backend_text(proxy)}, mode {cfg.mode}\n"
              f"  {ns.connections} connections x {ns.bytes / 1e6:.1f} MB each\n")
    conns = [Conn(i, "echo" if i % 2 == 0 else "sink", ns.bytes) for i in range(ns.connections)]
    total = sum(c.size * (2 if c.kind == "echo" else 1) for c in conns)
    done = threading.Event()

    def drive():
        threads = [threading.Thread(target=c.run, args=(port,)) for c in conns]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        drive.seconds = time.monotonic() - t0
        done.set()
        # Let the proxy log the last closes before it stops.
        deadline = time.monotonic() + 5
        while proxy.engine.active and time.monotonic() < deadline:
            time.sleep(0.01)
        proxy.request_stop()

    prog = threading.Thread(target=_progress, args=(conns, total, done, out))
    driver = threading.Thread(target=drive)
    prog.start()
    driver.start()
    try:
        stats = proxy.run()
    finally:
        driver.join()
        prog.join()
        proxy.close()
        upstream.close()

    out.write("\n  conn  kind  sent MB  back MB     MB/s  verified\n")
    for c in conns:
        mbps = (c.sent + c.back) / 1e6 / c.seconds if c.seconds else 0.0
        ok = "yes" if c.verified else f"NO {c.error}".rstrip()
        out.write(f"  {c.idx:4d}  {c.kind:<4}  {c.sent / 1e6:7.1f}  {c.back / 1e6:7.1f}  {mbps:7.1f}  {ok}\n")
    all_ok = all(c.verified for c in conns)
    moved = stats["c2u_bytes"] + stats["u2c_bytes"]
    out.write(f"\n  connections {stats['closed']}, bytes through the proxy {moved / 1e6:.1f} MB, "
              f"throughput {moved / 1e6 / drive.seconds:.1f} MB/s, verified: {'yes' if all_ok else 'NO'}\n"
              "  (the load and the upstream here are Python threads and set this pace;\n"
              "   `make bench` measures the proxy itself against HAProxy with iperf3)\n")
    return 0 if all_ok else 1
