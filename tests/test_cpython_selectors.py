"""CPython's own tests, run on UringSelector: test_selectors' selector tests,
and test_asyncio.test_events' event loop tests on
asyncio.SelectorEventLoop(UringSelector()). Each runs on EpollSelector in the
same session as the control; a test skipped on uring_net that ran on the
control fails the session unless tests/cpython-skips.txt lists it with its
reason (conftest.py). The test package is the interpreter's own: the venv's
Python ships it."""

import asyncio
import selectors
import unittest

import test.test_selectors as cpython_selectors
from test.test_asyncio import test_events as cpython_events

from uring_net.selectors import UringSelector


class TestUringSelector(cpython_selectors.BaseSelectorTestCase,
                        cpython_selectors.ScalableSelectorMixIn, unittest.TestCase):
    SELECTOR = UringSelector


class TestEpollSelectorControl(cpython_selectors.BaseSelectorTestCase,
                               cpython_selectors.ScalableSelectorMixIn, unittest.TestCase):
    SELECTOR = selectors.EpollSelector


class TestLoopOnUringSelector(cpython_events.UnixEventLoopTestsMixin,
                              cpython_events.SubprocessTestsMixin,
                              cpython_events.test_utils.TestCase):
    def create_event_loop(self):
        return asyncio.SelectorEventLoop(UringSelector())


class TestLoopOnEpollControl(cpython_events.UnixEventLoopTestsMixin,
                             cpython_events.SubprocessTestsMixin,
                             cpython_events.test_utils.TestCase):
    def create_event_loop(self):
        return asyncio.SelectorEventLoop(selectors.EpollSelector())
