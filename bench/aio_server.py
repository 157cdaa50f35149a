#!/usr/bin/env python3
"""The echo server bench/aio.py measures: one event loop, one API.

    aio_server.py LOOP API PORT

LOOP: asyncio (stock: SelectorEventLoop on EpollSelector), uvloop, uring
(uring_net.aio), uring-selector (asyncio's SelectorEventLoop on
uring_net.selectors.UringSelector).
API: sockets (sock_recv + sock_sendall), streams (start_server: read + write
+ drain), protocol (Protocol: data_received -> write), buffered
(BufferedProtocol: get_buffer/buffer_updated -> write).

Prints "ready" when listening on 127.0.0.1:PORT; runs until SIGTERM or SIGINT.
Each echo writes back exactly what was read, whatever the message size: the
load generator compares every byte.
"""
import asyncio
import signal
import socket
import sys


def make_loop(name):
    if name == "asyncio":
        import selectors
        return asyncio.SelectorEventLoop(selectors.EpollSelector())
    if name == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    if name == "uring":
        from uring_net import aio
        loop = aio.new_event_loop()
        if not isinstance(loop, aio.Loop):
            raise SystemExit("uring_net.aio fell back to asyncio's loop here")
        return loop
    if name == "uring-selector":
        from uring_net.selectors import UringSelector
        return asyncio.SelectorEventLoop(UringSelector())
    raise SystemExit(f"unknown loop {name!r}")


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


class BufferedEcho(asyncio.BufferedProtocol):
    def __init__(self):
        self.buf = bytearray(256 * 1024)
        self.view = memoryview(self.buf)

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        return self.view

    def buffer_updated(self, nbytes):
        self.transport.write(self.buf[:nbytes])


async def serve_sockets(loop, lsock):
    async def client(conn):
        try:
            while data := await loop.sock_recv(conn, 256 * 1024):
                await loop.sock_sendall(conn, data)
        except OSError:
            pass
        finally:
            conn.close()

    while True:
        conn, _ = await loop.sock_accept(lsock)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop.create_task(client(conn))


async def main(loop_name, api, port):
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    lsock = socket.create_server(("127.0.0.1", port), backlog=1024)
    lsock.setblocking(False)
    if api == "sockets":
        task = loop.create_task(serve_sockets(loop, lsock))
        server = None
    elif api == "streams":
        async def handle(r, w):
            try:
                while data := await r.read(256 * 1024):
                    w.write(data)
                    await w.drain()
            except OSError:
                pass
            w.close()
        server = await asyncio.start_server(handle, sock=lsock)
    elif api in ("protocol", "buffered"):
        server = await loop.create_server(Echo if api == "protocol" else BufferedEcho, sock=lsock)
    else:
        raise SystemExit(f"unknown API {api!r}")
    print("ready", flush=True)
    await stop.wait()
    if server is not None:
        server.close()
    else:
        task.cancel()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    loop_name, api, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    loop = make_loop(loop_name)
    try:
        loop.run_until_complete(main(loop_name, api, port))
    finally:
        loop.close()
