"""CPython's own asyncio tests on uring_net.aio's loop: each suite the issue
names, through its loop-factory hook, and the standard library's own
concrete class (the control) in the same session. A test that skips on
uring_net.aio but ran on the control fails the session unless
tests/cpython-skips.txt lists it with its reason (conftest.py)."""

from test.test_asyncio import test_buffered_proto as cp_buffered
from test.test_asyncio import test_events as cp_events
from test.test_asyncio import test_sendfile as cp_sendfile
from test.test_asyncio import test_server as cp_server
from test.test_asyncio import test_sock_lowlevel as cp_sock
from test.test_asyncio import test_sslproto as cp_sslproto

from uring_net import aio


class TestAioEvents(cp_events.UnixEventLoopTestsMixin, cp_events.SubprocessTestsMixin,
                    cp_events.test_utils.TestCase):
    def create_event_loop(self):
        return aio.new_event_loop()


class TestAioSockLowlevel(cp_sock.EPollEventLoopTests):
    def create_event_loop(self):
        return aio.new_event_loop()


class TestAioBufferedProtocol(cp_buffered.BufferedProtocolSelectorTests):
    def new_loop(self):
        return aio.new_event_loop()


class TestAioSendfile(cp_sendfile.EPollEventLoopTests):
    def create_event_loop(self):
        return aio.new_event_loop()


class TestAioStartServer(cp_server.SelectorStartServerTests):
    def new_loop(self):
        return aio.new_event_loop()


class TestAioStartTLS(cp_sslproto.SelectorStartTLSTests):
    def new_loop(self):
        return aio.new_event_loop()


# The controls: the standard library's classes as they are.
class ControlSockLowlevel(cp_sock.EPollEventLoopTests):
    pass


class ControlBufferedProtocol(cp_buffered.BufferedProtocolSelectorTests):
    pass


class ControlSendfile(cp_sendfile.EPollEventLoopTests):
    pass


class ControlStartServer(cp_server.SelectorStartServerTests):
    pass


class ControlStartTLS(cp_sslproto.SelectorStartTLSTests):
    pass
