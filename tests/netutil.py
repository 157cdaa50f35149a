"""Loopback peers for the proxy tests: byte patterns, verifying readers, upstream servers.

Everything here talks to real sockets and nothing else. Every blocking call has a
timeout and every thread is joined with a deadline, so a broken proxy makes a test fail,
never hang.

The proxy's own process and its log lines are handled in ``conftest.py``; this module
only knows about sockets.
"""
from __future__ import annotations

import errno
import queue
import random
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Iterable, Sequence

# Upper bound for one blocking socket operation. Generous because the suite shares two
# cores between the proxy, the peers and pytest; a stuck proxy still fails the test.
IO_TIMEOUT = 20.0
# The default chunk for bulk sends and receives.
BULK = 1 << 20

LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER {on, 0}: close() sends RST


def fmt_addr(sockaddr) -> str:
    """A socket address as the proxy logs it: ``127.0.0.1:80`` or ``[::1]:80``."""
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def connect(addr: str, timeout: float = 5.0) -> socket.socket:
    """A blocking client socket connected to ``addr``, with IO_TIMEOUT on every later op."""
    host, port = parse_addr(addr)
    s = socket.socket(family_of(host), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    s.settimeout(IO_TIMEOUT)
    return s


def reset_close(sock: socket.socket) -> None:
    """Abort the connection: SO_LINGER {1,0} then close() makes the kernel send RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    sock.close()


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- patterns


class Pattern:
    """A deterministic byte stream that is cheap to generate at any offset.

    The stream is cut into 64 KiB blocks. Every block is the same seeded random body with
    its first 16 bytes replaced by (seed, block index). A dropped, duplicated, reordered or
    shifted byte therefore shows up as a content mismatch, and so do bytes from the other
    direction or another connection (different seed).
    """

    BLOCK = 1 << 16

    def __init__(self, seed: int):
        self.seed = seed & 0xFFFFFFFFFFFFFFFF
        self._body = bytearray(random.Random(seed).randbytes(self.BLOCK))
        self._cache: dict[int, bytes] = {}

    def block(self, k: int) -> bytes:
        b = self._cache.get(k)
        if b is None:
            buf = bytearray(self._body)
            struct.pack_into("<QQ", buf, 0, self.seed, k)
            b = bytes(buf)
            if len(self._cache) >= 4:
                self._cache.clear()
            self._cache[k] = b
        return b

    def slice(self, offset: int, n: int) -> bytes:
        B = self.BLOCK
        k, o = divmod(offset, B)
        if o + n <= B:
            return self.block(k)[o:o + n]
        parts = []
        while n > 0:
            k, o = divmod(offset, B)
            m = min(n, B - o)
            parts.append(self.block(k)[o:o + m])
            offset += m
            n -= m
        return b"".join(parts)


class Verifier:
    """Checks a received stream against a Pattern, byte for byte, as it arrives."""

    def __init__(self, seed: int, total: int, what: str = "stream"):
        self.pattern = Pattern(seed)
        self.total = total
        self.what = what
        self.received = 0
        self.eof = False

    def feed(self, data: bytes) -> None:
        n = len(data)
        if self.received + n > self.total:
            raise AssertionError(
                f"{self.what}: received {self.received + n} bytes, more than the {self.total} sent")
        expected = self.pattern.slice(self.received, n)
        if data != expected:
            i = next(i for i in range(n) if data[i] != expected[i])
            raise AssertionError(
                f"{self.what}: content mismatch at stream offset {self.received + i} "
                f"(got {data[i:i + 16].hex()}, expected {expected[i:i + 16].hex()})")
        self.received += n

    def at_eof(self) -> None:
        self.eof = True
        if self.received != self.total:
            raise AssertionError(
                f"{self.what}: EOF after {self.received} of {self.total} bytes")

    @property
    def complete(self) -> bool:
        return self.received == self.total


def _cycle_prefix(sizes: Sequence[int] | None, default: int) -> Iterable[int]:
    """The given sizes first (that is where the interesting boundaries are), then bulk."""
    for s in sizes or ():
        yield max(1, s)
    while True:
        yield default


def send_stream(sock: socket.socket, seed: int, total: int, *,
                chunks: Sequence[int] | None = None,
                pauses: Sequence[float] | None = None,
                shutdown: bool = True,
                start: int = 0) -> int:
    """Send bytes [start, total) of Pattern(seed); then shut down writing if asked."""
    pattern = Pattern(seed)
    sizes = _cycle_prefix(chunks, BULK)
    pauses = list(pauses or ())
    off, i = start, 0
    while off < total:
        n = min(next(sizes), total - off)
        sock.sendall(pattern.slice(off, n))
        off += n
        if i < len(pauses) and pauses[i] > 0:
            time.sleep(pauses[i])
        i += 1
    if shutdown:
        sock.shutdown(socket.SHUT_WR)
    return off


def recv_exact(sock: socket.socket, verifier: Verifier, n: int) -> None:
    """Read exactly ``n`` more bytes of the verifier's stream (no EOF expected)."""
    end = verifier.received + n
    while verifier.received < end:
        try:
            data = sock.recv(min(BULK, end - verifier.received))
        except socket.timeout as e:
            raise AssertionError(f"{verifier.what}: no data for {sock.gettimeout()} s after "
                                 f"{verifier.received} bytes (waiting for {end})") from e
        if not data:
            raise AssertionError(f"{verifier.what}: EOF after {verifier.received} bytes, "
                                 f"expected at least {end}")
        verifier.feed(data)


def recv_stream(sock: socket.socket, seed: int, total: int, *,
                sizes: Sequence[int] | None = None,
                expect_eof: bool = True, what: str = "stream") -> Verifier:
    """Receive Pattern(seed) up to ``total`` bytes, verifying content; then, if asked,
    require a clean EOF right after the last byte (a reset fails the test)."""
    v = Verifier(seed, total, what)
    it = _cycle_prefix(sizes, BULK)
    while True:
        if not expect_eof and v.complete:
            return v
        want = next(it)
        if not expect_eof:
            want = min(want, total - v.received)
        try:
            data = sock.recv(want)
        except ConnectionResetError as e:
            raise AssertionError(
                f"{what}: connection reset after {v.received} of {total} bytes") from e
        except socket.timeout as e:
            raise AssertionError(
                f"{what}: no data for {sock.gettimeout()} s after "
                f"{v.received} of {total} bytes") from e
        if not data:
            v.at_eof()
            return v
        v.feed(data)


class BgThread(threading.Thread):
    """A thread whose result or exception is handed back by ``result(timeout)``."""

    def __init__(self, fn: Callable, *args, name: str | None = None, **kwargs):
        super().__init__(name=name, daemon=True)
        self._fn, self._args, self._kwargs = fn, args, kwargs
        self._result = None
        self._exc: BaseException | None = None

    def run(self):
        try:
            self._result = self._fn(*self._args, **self._kwargs)
        except BaseException as e:  # handed to the joining thread
            self._exc = e

    def result(self, timeout: float):
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"thread {self.name} still running after {timeout} s")
        if self._exc is not None:
            raise self._exc
        return self._result


def duplex(sock: socket.socket, *, send_seed: int, send_total: int,
           recv_seed: int, recv_total: int,
           send_chunks=None, send_pauses=None, recv_sizes=None,
           shutdown: bool = True, what: str = "peer",
           timeout: float = 120.0) -> Verifier:
    """Send one pattern and receive another at the same time (both directions at once).

    Sends Pattern(send_seed)[:send_total] then shuts down writing; receives and verifies
    Pattern(recv_seed)[:recv_total] followed by a clean EOF."""
    sender = BgThread(send_stream, sock, send_seed, send_total, chunks=send_chunks,
                      pauses=send_pauses, shutdown=shutdown, name=f"{what}-send")
    sender.start()
    try:
        v = recv_stream(sock, recv_seed, recv_total, sizes=recv_sizes, what=f"{what} recv")
    finally:
        # The receive side is done (or failed); the sender must finish on its own.
        sender.result(timeout)
    return v


def expect_closed(sock: socket.socket, timeout: float) -> str:
    """Wait until the peer closes: returns 'eof' or 'reset'. Data fails the test."""
    sock.settimeout(timeout)
    t0 = time.monotonic()
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        return "reset"
    except socket.timeout:
        raise AssertionError(
            f"connection still open {time.monotonic() - t0:.1f} s later") from None
    if data:
        raise AssertionError(f"unexpected data instead of a close: {data[:32]!r}")
    return "eof"


def expect_reset(sock: socket.socket, timeout: float, verifier: Verifier | None = None) -> int:
    """Read until the connection is reset; data before it must be a correct prefix of the
    stream (checked when a verifier is given). A clean EOF fails the test."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    got = 0
    while True:
        if time.monotonic() > deadline:
            raise AssertionError(f"no reset within {timeout} s ({got} bytes read)")
        try:
            data = sock.recv(BULK)
        except ConnectionResetError:
            return got
        except socket.timeout:
            raise AssertionError(f"no reset within {timeout} s ({got} bytes read)") from None
        if not data:
            raise AssertionError(f"clean EOF instead of a reset (after {got} bytes)")
        got += len(data)
        if verifier is not None:
            verifier.feed(data)


# --------------------------------------------------------------------------- servers


class TcpServer:
    """A threaded upstream: each accepted connection is handed to the next handler queued
    with ``serve_next(fn)``; ``fn(conn)`` runs on its own thread and its return value or
    exception lands in the Future that ``serve_next`` returned.

    A connection that arrives with no handler queued is an error (reported at close)."""

    def __init__(self, host: str = "127.0.0.1", backlog: int = 128):
        self.sock = socket.socket(family_of(host), socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(backlog)
        self.sock.settimeout(0.1)
        self.addr = fmt_addr(self.sock.getsockname())
        self.accepted = 0
        self.errors: list[str] = []
        self._handlers: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name=f"upstream-{self.addr}")
        self._acceptor.start()

    def serve_next(self, fn: Callable[[socket.socket], object]) -> Future:
        fut: Future = Future()
        self._handlers.put((fn, fut))
        return fut

    def serve(self, fn, count: int) -> list[Future]:
        return [self.serve_next(fn) for _ in range(count)]

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.settimeout(IO_TIMEOUT)
            self._conns.append(conn)
            try:
                fn, fut = self._handlers.get(timeout=5)
            except queue.Empty:
                self.errors.append(f"unexpected upstream connection from {fmt_addr(peer)}")
                conn.close()
                continue
            t = threading.Thread(target=self._run, args=(fn, fut, conn), daemon=True)
            self._threads.append(t)
            t.start()

    @staticmethod
    def _run(fn, fut: Future, conn: socket.socket):
        try:
            fut.set_result(fn(conn))
        except BaseException as e:
            fut.set_exception(e)
        finally:
            conn.close()

    def close(self, timeout: float = 30.0) -> list[str]:
        self._stop.set()
        self._acceptor.join(5)
        # A test that failed half-way may leave a handler blocked on its socket; wake it
        # (recv returns EOF, send fails) instead of waiting for IO_TIMEOUT.
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                self.errors.append(f"upstream handler thread {t.name} did not finish")
        self.sock.close()
        return self.errors


def stop_selector_thread(server, what: str) -> None:
    """Stop a server's selector thread (its _stop flag, a byte on its wake socket), then
    close every socket it watched and the selector; a thread that would not stop is
    recorded in server.errors."""
    server._stop = True
    server._wake_w.send(b"x")
    server._thread.join(10)
    if server._thread.is_alive():
        server.errors.append(f"{what} thread did not stop")
    for key in list(server._sel.get_map().values()):
        key.fileobj.close()
    server._sel.close()
    server._wake_w.close()


class EchoServer:
    """A single-threaded selector echo upstream for many connections.

    Echoes everything; on the client's EOF it finishes sending, shuts down writing and
    closes. Counts connections (accepted, open, peak open) and resets it saw."""

    def __init__(self, host: str = "127.0.0.1", backlog: int = 4096, port: int = 0):
        self.sock = socket.socket(family_of(host), socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(backlog)
        self.sock.setblocking(False)
        self.addr = fmt_addr(self.sock.getsockname())
        self.accepted = 0
        self.open = 0
        self.peak_open = 0
        self.resets = 0
        self.bytes_echoed = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self.sock, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"echo-{self.addr}")
        self._thread.start()

    class _Conn:
        __slots__ = ("sock", "pending", "eof")

        def __init__(self, sock):
            self.sock, self.pending, self.eof = sock, bytearray(), False

    def _drop(self, c, reset: bool = False):
        try:
            self._sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        if reset:
            self.resets += 1
        c.sock.close()
        with self._lock:
            self.open -= 1

    def _update(self, c):
        ev = 0 if c.eof or len(c.pending) > BULK else selectors.EVENT_READ
        if c.pending:
            ev |= selectors.EVENT_WRITE
        if ev == 0:  # EOF seen and everything sent: finish
            try:
                c.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._drop(c)
            return
        self._sel.modify(c.sock, ev, c)

    def _loop(self):
        while not self._stop:
            for key, mask in self._sel.select(0.2):
                if key.data == "wake":
                    return
                if key.data is None:
                    for _ in range(64):
                        try:
                            s, _peer = self.sock.accept()
                        except BlockingIOError:
                            break
                        s.setblocking(False)
                        self.accepted += 1
                        with self._lock:
                            self.open += 1
                            self.peak_open = max(self.peak_open, self.open)
                        self._sel.register(s, selectors.EVENT_READ, self._Conn(s))
                    continue
                c = key.data
                try:
                    if mask & selectors.EVENT_READ:
                        data = c.sock.recv(262144)
                        if data:
                            c.pending += data
                            self.bytes_echoed += len(data)
                        else:
                            c.eof = True
                    if c.pending:
                        try:
                            n = c.sock.send(c.pending)
                            del c.pending[:n]
                        except BlockingIOError:
                            pass
                    self._update(c)
                except (ConnectionResetError, BrokenPipeError):
                    self._drop(c, reset=True)
                except OSError as e:
                    self.errors.append(f"echo: {e!r}")
                    self._drop(c)

    def close(self) -> list[str]:
        stop_selector_thread(self, "echo server")
        return self.errors


class RefusingUpstream:
    """An address where nothing listens, reserved for the test.

    The socket is bound but never listen()s, so the port stays ours (nobody else can take
    it during the test) and a SYN to it is answered with RST: ECONNREFUSED."""

    def __init__(self, host: str = "127.0.0.1"):
        self.sock = socket.socket(family_of(host), socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.addr = fmt_addr(self.sock.getsockname())

    def close(self):
        self.sock.close()


class BlackholeUpstream:
    """An address whose SYNs go unanswered, on loopback, without firewall rules.

    A listening socket with backlog 0 accepts exactly one connection into its accept
    queue (the kernel's test is ``ack_backlog > max_ack_backlog``). We make that one
    connection and never accept() it. From then on the accept queue is full and
    ``tcp_conn_request()`` drops every further SYN before answering it, whatever
    ``tcp_syncookies`` says (syncookies only cover a full SYN queue, not a full accept
    queue). The connecting side sees no SYN-ACK and no RST, and keeps retransmitting:
    its connect() hangs until its own timeout. ``probe()`` checks that this holds on the
    machine at hand."""

    def __init__(self, host: str = "127.0.0.1"):
        fam = family_of(host)
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(0)
        self.addr = fmt_addr(self.sock.getsockname())
        self._fillers = []
        f = socket.socket(fam, socket.SOCK_STREAM)
        f.settimeout(2)
        f.connect(self.sock.getsockname()[:2])
        self._fillers.append(f)

    def probe(self, wait: float = 0.5) -> bool:
        """True if a further connect() goes unanswered for ``wait`` seconds."""
        s = socket.socket(self.sock.family, socket.SOCK_STREAM)
        s.settimeout(wait)
        try:
            s.connect(self.sock.getsockname()[:2])
        except socket.timeout:
            return True
        except OSError:
            return False
        else:
            return False
        finally:
            s.close()

    def close(self):
        for f in self._fillers:
            f.close()
        self.sock.close()


# --------------------------------------------------------------------------- many clients


def _ename(err: int) -> str:
    return errno.errorcode.get(err, str(err))


class LoadClient:
    """Drives many client connections at once from one thread with a selector.

    Each connection connects, sends its payload, reads the echo back and verifies it. When
    every connection has its full echo (so all of them are open at the same moment), each
    one shuts down writing, reads the EOF, and closes."""

    def __init__(self, addr: str, payload_sizes: Sequence[int], seed_base: int,
                 max_connecting: int = 64):
        self.addr = parse_addr(addr)
        self.sizes = list(payload_sizes)
        self.seed_base = seed_base
        self.max_connecting = max_connecting
        self.client_addrs: list[str] = [""] * len(self.sizes)
        self.peak_open = 0

    def run(self, deadline_s: float) -> None:
        n = len(self.sizes)
        deadline = time.monotonic() + deadline_s
        sel = selectors.DefaultSelector()
        socks: list[socket.socket | None] = [None] * n
        payload = [Pattern(self.seed_base + i).slice(0, self.sizes[i]) for i in range(n)]
        sent = [0] * n
        verifiers = [Verifier(self.seed_base + i, self.sizes[i], f"conn {i} echo")
                     for i in range(n)]
        state = ["new"] * n  # new, connecting, echoing, echoed, closing, done
        next_i = 0
        connecting = 0
        echoed = 0
        done = 0
        open_now = 0
        released = False
        fam = family_of(self.addr[0])

        def want(i, ev):
            sel.modify(socks[i], ev, i)

        def progress(i):
            return f"{verifiers[i].received} of {self.sizes[i]} bytes back"

        try:
            while done < n:
                if time.monotonic() > deadline:
                    counts = {s: state.count(s) for s in set(state)}
                    raise AssertionError(f"load did not finish within {deadline_s} s: {counts}")
                while next_i < n and connecting < self.max_connecting:
                    i = next_i
                    next_i += 1
                    s = socket.socket(fam, socket.SOCK_STREAM)
                    s.setblocking(False)
                    err = s.connect_ex(self.addr)
                    if err not in (0, errno.EINPROGRESS):
                        raise AssertionError(f"conn {i}: connect failed: {_ename(err)}")
                    socks[i] = s
                    state[i] = "connecting"
                    connecting += 1
                    open_now += 1
                    self.peak_open = max(self.peak_open, open_now)
                    sel.register(s, selectors.EVENT_WRITE, i)
                if not released and echoed == n:
                    released = True
                    for i in range(n):
                        socks[i].shutdown(socket.SHUT_WR)
                        state[i] = "closing"
                        want(i, selectors.EVENT_READ)
                for key, mask in sel.select(0.2):
                    i = key.data
                    s = socks[i]
                    st = state[i]
                    if st == "connecting":
                        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            raise AssertionError(f"conn {i}: connect failed: {_ename(err)}")
                        connecting -= 1
                        self.client_addrs[i] = fmt_addr(s.getsockname())
                        state[i] = "echoing"
                        st = "echoing"
                        mask = selectors.EVENT_WRITE
                    if st == "echoing":
                        if mask & selectors.EVENT_WRITE and sent[i] < len(payload[i]):
                            try:
                                sent[i] += s.send(payload[i][sent[i]:sent[i] + 262144])
                            except BlockingIOError:
                                pass
                        if mask & selectors.EVENT_READ:
                            try:
                                data = s.recv(262144)
                            except ConnectionResetError:
                                raise AssertionError(f"conn {i}: reset while echoing "
                                                     f"({progress(i)})") from None
                            if not data:
                                raise AssertionError(f"conn {i}: EOF while echoing "
                                                     f"({progress(i)})")
                            verifiers[i].feed(data)
                        if verifiers[i].complete:
                            state[i] = "echoed"
                            echoed += 1
                            sel.modify(s, selectors.EVENT_READ, i)  # nothing more may arrive
                        else:
                            ev = selectors.EVENT_READ
                            if sent[i] < len(payload[i]):
                                ev |= selectors.EVENT_WRITE
                            want(i, ev)
                    elif st == "echoed":
                        data = s.recv(1)
                        raise AssertionError(f"conn {i}: unexpected {'data' if data else 'EOF'} "
                                             "before the client shut down")
                    elif st == "closing":
                        try:
                            data = s.recv(65536)
                        except ConnectionResetError:
                            raise AssertionError(f"conn {i}: reset instead of EOF") from None
                        if data:
                            verifiers[i].feed(data)  # raises: more than was sent
                        verifiers[i].at_eof()
                        sel.unregister(s)
                        s.close()
                        state[i] = "done"
                        done += 1
                        open_now -= 1
        finally:
            for s in socks:
                if s is not None and s.fileno() >= 0:
                    s.close()
            sel.close()


def run_without_io_uring(code: str, timeout: float = 60) -> tuple[str, list[str]]:
    """Run ``python -c code`` where io_uring_setup fails EPERM, as under a
    container's seccomp profile (tests/seccomp_deny_uring.py). Returns its
    stdout and the RuntimeWarning lines of its stderr; asserts it exited 0."""
    here = Path(__file__).resolve().parent
    r = subprocess.run([sys.executable, str(here / "seccomp_deny_uring.py"), sys.executable,
                        "-c", code], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r.stdout, [line for line in r.stderr.splitlines() if "RuntimeWarning" in line]
