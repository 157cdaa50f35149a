# The turn of uring_net.aio's event loop in C: asyncio's BaseEventLoop
# _run_once, _process_events, call_soon and create_future, step for step, as
# methods of LoopCore, the first base of the Loop class (uring_net/aio.py),
# ahead of asyncio's own. asyncio runs these in Python once per turn and
# once per callback scheduled; they were most of what uring_net.aio still
# spent in Python beyond the protocol's own code.
#
# The attributes of asyncio's that a turn reads are C fields of LoopCore.
# asyncio's own code, which assigns and reads them as self._ready and so
# on, reaches the same fields through their descriptors: one state. Read
# from here they cost no lookup (a loop instance's attribute went through
# the MRO and the instance dict, ~180 instructions each, seven a turn).
#
# Same order, same attributes, same semantics as asyncio's (3.11 to 3.13
# agree on them): the timer heap and the ready deque stay asyncio's own
# objects, so call_later, Handle.cancel and the rest of asyncio keep working
# on them; debug mode takes asyncio's own code paths. One difference: the
# turn calls its own _process_events and, on a UringSelector, the
# PollSet's select, not whatever a subclass put in their place.

import contextvars as _contextvars
import heapq as _heapq
import sys as _sys
import threading as _threading

cdef object _heappop = _heapq.heappop
cdef object _heapify = _heapq.heapify
cdef object _copy_context = _contextvars.copy_context
# asyncio's own objects and constants, bound by aio_bind() (below).
cdef object _Handle = None
cdef object _TimerHandle = None
cdef object _handle_run = None          # asyncio's Handle._run, as imported
cdef object _format_callback_source = None
cdef bint _format_takes_debug = False    # 3.13's format_helpers asks for the loop's debug
cdef object _Future = None
cdef object _base_call_soon = None
cdef object _format_handle = None
cdef object _aio_logger = None
cdef double _MAX_SELECT_TIMEOUT = 0
cdef Py_ssize_t _MIN_SCHEDULED = 0
cdef double _MIN_CANCELLED_FRACTION = 0
cdef bint _handle_by_slots = False
cdef object _set_running_loop = None
cdef bint _forever_setup = False     # asyncio has _run_forever_setup/_cleanup (3.13+)
cdef bint _aio_bound = False

# Where a Handle keeps each of the slots call_soon fills (_H_*), read from
# the slots' own member descriptors, as CPython's member_set finds them.
cdef Py_ssize_t _h_off[7]
cdef enum:
    _H_CALLBACK, _H_ARGS, _H_CANCELLED, _H_LOOP, _H_TRACEBACK, _H_REPR, _H_CONTEXT

from cpython.ref cimport Py_DECREF

cdef extern from "Python.h":
    int PyContext_Enter(object) except -1
    int PyContext_Exit(object) except -1
    ctypedef struct PyMemberDef:
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef *d_member
    ctypedef struct PyTypeObject:
        PyObject *(*tp_alloc)(PyTypeObject *, Py_ssize_t)


def aio_bind():
    """Bind asyncio's objects this module's loop and transports use. Called when
    uring_net.aio is imported (and by LoopOps, whoever makes one): importing
    asyncio with the extension cost every proxy start ~50 ms for nothing."""
    cdef int i
    global _Handle, _Future, _base_call_soon, _format_handle, _aio_logger
    global _MAX_SELECT_TIMEOUT, _MIN_SCHEDULED, _MIN_CANCELLED_FRACTION
    global _handle_by_slots, _aio_bound, _set_running_loop, _forever_setup
    global _TimerHandle, _format_callback_source, _format_takes_debug, _handle_run
    if _aio_bound:
        return
    import logging
    from asyncio import base_events, events, futures
    stream_bind()
    _Handle = events.Handle
    _TimerHandle = events.TimerHandle
    _handle_run = _Handle._run
    from asyncio import format_helpers
    import inspect
    _format_callback_source = format_helpers._format_callback_source
    _format_takes_debug = 'debug' in inspect.signature(_format_callback_source).parameters
    _Future = futures.Future
    _base_call_soon = base_events.BaseEventLoop.call_soon
    _format_handle = base_events._format_handle
    _aio_logger = logging.getLogger("asyncio")
    _MAX_SELECT_TIMEOUT = base_events.MAXIMUM_SELECT_TIMEOUT
    _MIN_SCHEDULED = base_events._MIN_SCHEDULED_TIMER_HANDLES
    _MIN_CANCELLED_FRACTION = base_events._MIN_CANCELLED_TIMER_HANDLES_FRACTION
    # asyncio's Handle.__init__ outside debug mode sets these slots and no
    # others, and TimerHandle runs as Handle does (3.11 to 3.13 agree);
    # where that still holds, call_soon fills a Handle's slots and the turn
    # runs it, in C. Elsewhere both go through asyncio's own methods.
    _handle_by_slots = _TimerHandle._run is _Handle._run and _Handle.__slots__ == (
        '_callback', '_args', '_cancelled', '_loop', '_source_traceback', '_repr',
        '__weakref__', '_context')
    if _handle_by_slots:
        for i, name in enumerate(('_callback', '_args', '_cancelled', '_loop',
                                  '_source_traceback', '_repr', '_context')):
            _h_off[i] = _slot_offset(_Handle, name)
    _set_running_loop = events._set_running_loop
    _forever_setup = hasattr(base_events.BaseEventLoop, '_run_forever_setup')
    _aio_bound = True


# --- Handles made and run in C (call_soon, the turn) ---------------------

cdef Py_ssize_t _slot_offset(cls, str name) except -1:
    d = cls.__dict__[name]
    if type(d).__name__ != 'member_descriptor':
        raise TypeError(f'{cls.__name__}.{name} is not a slot')
    return (<PyMemberDescrObject *>d).d_member.offset


cdef inline void _fill(object o, Py_ssize_t off, object v) noexcept:
    # A slot of an object just allocated (so empty): one reference to v.
    Py_INCREF(v)
    (<PyObject **>(<char *><PyObject *>o + off))[0] = <PyObject *>v


cdef inline PyObject *_slot(object o, int which) noexcept:
    # A filled slot of a Handle (borrowed).
    return (<PyObject **>(<char *><PyObject *>o + _h_off[which]))[0]


cdef int _run_handle(handle) except -1:
    # asyncio's Handle._run: the callback in the handle's context; an
    # exception (but SystemExit and KeyboardInterrupt) to the loop's
    # exception handler, with the message and keys asyncio gives it.
    # References of our own to what the call uses, as Handle._run's frame
    # holds: a callback may cancel its own handle, which drops the slots'.
    if (_slot(handle, _H_CONTEXT) == NULL or _slot(handle, _H_CALLBACK) == NULL
            or _slot(handle, _H_ARGS) == NULL):
        return handle._run()        # (a slot deleted: asyncio's own error)
    ctx = <object>_slot(handle, _H_CONTEXT)
    callback = <object>_slot(handle, _H_CALLBACK)
    args = <object>_slot(handle, _H_ARGS)     # any iterable, as *self._args takes
    try:
        PyContext_Enter(ctx)
        try:
            callback(*args)
        finally:
            PyContext_Exit(ctx)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        loop = handle._loop
        if _format_takes_debug:
            cb = _format_callback_source(handle._callback, handle._args, debug=loop.get_debug())
        else:
            cb = _format_callback_source(handle._callback, handle._args)
        context = {'message': f'Exception in callback {cb}', 'exception': exc, 'handle': handle}
        if handle._source_traceback:
            context['source_traceback'] = handle._source_traceback
        loop.call_exception_handler(context)
    return 0


cdef object _alloc_handle():
    cdef PyTypeObject *tp = <PyTypeObject *>_Handle
    cdef PyObject *p = tp.tp_alloc(tp, 0)
    if p == NULL:
        raise MemoryError()
    o = <object>p
    Py_DECREF(o)            # (the cast took a reference of its own)
    return o


cdef class LoopCore:
    # asyncio's BaseEventLoop attributes, set by its __init__ as usual.
    cdef object ready                   # _ready: collections.deque of Handles
    cdef list scheduled                 # _scheduled: heap of TimerHandles
    cdef Py_ssize_t cancelled_timers    # _timer_cancelled_count
    cdef bint stopping, closed          # _stopping, _closed
    cdef object debug                   # _debug: whatever set_debug() was given
    cdef double clock_res               # _clock_resolution
    cdef object selector                # _selector
    cdef unsigned deleted               # bit i: fields' attribute i deleted (below)
    # uring_net.aio's: the ring's operations, and the PollSet to select on
    # directly when the selector is a UringSelector (None: call its select()).
    cdef public LoopOps _ops
    cdef public PollSet _polls

    cdef int present(self, unsigned bit, str name) except -1:
        # An attribute of the ones below that was deleted is absent.
        if self.deleted & bit:
            raise AttributeError(name)
        return 0

    # asyncio's attributes over those fields, for asyncio's own Python code
    # and anyone else's. Deleting one makes it absent until set again, as
    # for an instance attribute: unittest.mock's patch.object deletes what
    # it patched and puts the original back only if the name is then gone.

    @property
    def _ready(self):
        self.present(1, '_ready')
        return self.ready

    @_ready.setter
    def _ready(self, value):
        self.ready = value
        self.deleted &= ~1

    @_ready.deleter
    def _ready(self):
        self.present(1, '_ready')
        self.deleted |= 1

    @property
    def _scheduled(self):
        self.present(2, '_scheduled')
        return self.scheduled

    @_scheduled.setter
    def _scheduled(self, value):
        self.scheduled = value
        self.deleted &= ~2

    @_scheduled.deleter
    def _scheduled(self):
        self.present(2, '_scheduled')
        self.deleted |= 2

    @property
    def _timer_cancelled_count(self):
        self.present(4, '_timer_cancelled_count')
        return self.cancelled_timers

    @_timer_cancelled_count.setter
    def _timer_cancelled_count(self, value):
        self.cancelled_timers = value
        self.deleted &= ~4

    @_timer_cancelled_count.deleter
    def _timer_cancelled_count(self):
        self.present(4, '_timer_cancelled_count')
        self.deleted |= 4

    @property
    def _stopping(self):
        self.present(8, '_stopping')
        return self.stopping

    @_stopping.setter
    def _stopping(self, value):
        self.stopping = value
        self.deleted &= ~8

    @_stopping.deleter
    def _stopping(self):
        self.present(8, '_stopping')
        self.deleted |= 8

    @property
    def _closed(self):
        self.present(16, '_closed')
        return self.closed

    @_closed.setter
    def _closed(self, value):
        self.closed = value
        self.deleted &= ~16

    @_closed.deleter
    def _closed(self):
        self.present(16, '_closed')
        self.deleted |= 16

    @property
    def _debug(self):
        self.present(32, '_debug')
        return self.debug

    @_debug.setter
    def _debug(self, value):
        self.debug = value
        self.deleted &= ~32

    @_debug.deleter
    def _debug(self):
        self.present(32, '_debug')
        self.deleted |= 32

    @property
    def _clock_resolution(self):
        self.present(64, '_clock_resolution')
        return self.clock_res

    @_clock_resolution.setter
    def _clock_resolution(self, value):
        self.clock_res = value
        self.deleted &= ~64

    @_clock_resolution.deleter
    def _clock_resolution(self):
        self.present(64, '_clock_resolution')
        self.deleted |= 64

    @property
    def _selector(self):
        self.present(128, '_selector')
        return self.selector

    @_selector.setter
    def _selector(self, value):
        self.selector = value
        self.deleted &= ~128

    @_selector.deleter
    def _selector(self):
        self.present(128, '_selector')
        self.deleted |= 128

    def run_forever(self):
        """asyncio's run_forever, its set-up and clean-up asyncio's own
        (3.13's methods, or 3.11 and 3.12's lines, which agree), and its
        turns in a C loop: asyncio's is Python bytecode, ~600 instructions a
        turn around a turn that is a few thousand."""
        if _forever_setup:
            try:
                self._run_forever_setup()
                self.run_turns()
            finally:
                self._run_forever_cleanup()
            return
        self._check_closed()
        self._check_running()
        self._set_coroutine_origin_tracking(self.debug)
        old_agen_hooks = _sys.get_asyncgen_hooks()
        try:
            self._thread_id = _threading.get_ident()
            _sys.set_asyncgen_hooks(firstiter=self._asyncgen_firstiter_hook,
                                    finalizer=self._asyncgen_finalizer_hook)
            _set_running_loop(self)
            self.run_turns()
        finally:
            self.stopping = False
            self._thread_id = None
            _set_running_loop(None)
            self._set_coroutine_origin_tracking(False)
            _sys.set_asyncgen_hooks(*old_agen_hooks)

    cdef int run_turns(self) except -1:
        if type(self)._run_once is not _core_run_once or '_run_once' in self.__dict__:
            # _run_once replaced (a subclass, or a test counting turns): as
            # asyncio does, through the attribute.
            while True:
                self._run_once()
                if self.stopping:
                    return 0
        while True:
            self.turn()
            if self.stopping:
                return 0
            # Where asyncio's bytecode loop would run a Python signal
            # handler (SIGINT's KeyboardInterrupt, asyncio.Runner's own)
            # even in turns that ran no Python.
            PyErr_CheckSignals()

    def _run_once(self):
        """One turn: drop cancelled timers, wait for I/O (not at all when
        callbacks are ready), move due timers to the ready queue, and run the
        callbacks that were ready when the turn began."""
        self.turn()

    cdef int turn(self) except -1:
        cdef list scheduled = self.scheduled
        cdef Py_ssize_t sched_count = len(scheduled), ntodo, i
        cdef bint direct
        cdef double t, end_time
        cdef list event_list
        ready = self.ready
        if (sched_count > _MIN_SCHEDULED
                and <double>self.cancelled_timers / sched_count > _MIN_CANCELLED_FRACTION):
            # Too many cancelled timers: rebuild the heap without them.
            live = []
            for handle in scheduled:
                if handle._cancelled:
                    handle._scheduled = False
                else:
                    live.append(handle)
            _heapify(live)
            self.scheduled = scheduled = live
            self.cancelled_timers = 0
        else:
            while scheduled and scheduled[0]._cancelled:
                self.cancelled_timers -= 1
                handle = _heappop(scheduled)
                handle._scheduled = False

        timeout = None
        if ready or self.stopping or (self._ops is not None and self._ops.done):
            # (completions not yet handed out: a KeyboardInterrupt or
            # SystemExit from one ended the last dispatch before them)
            timeout = 0
        elif scheduled:
            t = scheduled[0]._when - self.time()
            timeout = 0.0 if t < 0 else (_MAX_SELECT_TIMEOUT if t > _MAX_SELECT_TIMEOUT else t)

        if self._polls is not None:
            event_list = self._polls.c_select(timeout)
        else:
            event_list = self.selector.select(timeout)
        self.process_events(event_list)
        event_list = None

        if scheduled:
            end_time = self.time() + self.clock_res
            while scheduled:
                handle = scheduled[0]
                if handle._when >= end_time:
                    break
                handle = _heappop(scheduled)
                handle._scheduled = False
                ready.append(handle)

        # Only the callbacks ready now: those they schedule wait for the next
        # turn, after another look at I/O.
        ntodo = len(ready)
        if not ntodo:
            return 0
        popleft = ready.popleft
        if self.debug:
            for i in range(ntodo):
                handle = popleft()
                if handle._cancelled:
                    continue
                try:
                    self._current_handle = handle
                    t0 = self.time()
                    handle._run()
                    dt = self.time() - t0
                    if dt >= self.slow_callback_duration:
                        _aio_logger.warning('Executing %s took %.3f seconds',
                                            _format_handle(handle), dt)
                finally:
                    self._current_handle = None
        else:
            # Handle._run is asyncio's own still (instrumentation such as
            # aiodebug's replaces it, and must then be called): once a turn.
            direct = (_handle_by_slots and _Handle._run is _handle_run
                      and _TimerHandle._run is _handle_run)
            for i in range(ntodo):
                handle = popleft()
                if direct and (type(handle) is _Handle or type(handle) is _TimerHandle):
                    # Handle._run in C: the same steps, without its frame
                    # and two attribute lookups per callback.
                    if <object>_slot(handle, _H_CANCELLED):
                        continue
                    _run_handle(handle)
                    continue
                if handle._cancelled:
                    continue
                handle._run()
        handle = None       # breaks a cycle when a callback raised
        return 0

    def call_soon(self, callback, *args, context=None):
        """asyncio's call_soon; in debug mode asyncio's own, with its checks."""
        if self.debug:
            return _base_call_soon(self, callback, *args, context=context)
        if self.closed:
            raise RuntimeError('Event loop is closed')
        if not _handle_by_slots:
            handle = _Handle(callback, args, self, context)
        else:
            # What Handle.__init__ sets outside debug mode, straight into
            # its slots: a Python frame and seven attribute stores fewer
            # for every callback (each future's result schedules one).
            handle = _alloc_handle()
            _fill(handle, _h_off[_H_CONTEXT], _copy_context() if context is None else context)
            _fill(handle, _h_off[_H_LOOP], self)
            _fill(handle, _h_off[_H_CALLBACK], callback)
            _fill(handle, _h_off[_H_ARGS], args)
            _fill(handle, _h_off[_H_CANCELLED], False)
            _fill(handle, _h_off[_H_REPR], None)
            _fill(handle, _h_off[_H_TRACEBACK], None)
        self.ready.append(handle)
        return handle

    def create_future(self):
        return _Future(loop=self)

    def get_debug(self):
        # asyncio's, without its Python frame: every new Future asks.
        return self.debug

    def _process_events(self, list event_list):
        self.process_events(event_list)

    cdef int process_events(self, list event_list) except -1:
        """The selector's readiness (asyncio's add_reader/add_writer callbacks
        to the ready queue, as asyncio does), then the ring's completions
        (LoopOps.dispatch: a transport's by a C call, a future's result)."""
        cdef tuple item
        cdef int mask
        for item in event_list:
            key = item[0]
            mask = item[1]
            reader, writer = key.data
            if mask & 1 and reader is not None:         # EVENT_READ
                if reader._cancelled:
                    self._remove_reader(key.fileobj)
                else:
                    self.ready.append(reader)
            if mask & 2 and writer is not None:         # EVENT_WRITE
                if writer._cancelled:
                    self._remove_writer(key.fileobj)
                else:
                    self.ready.append(writer)
        if self._ops is not None:
            self._ops.c_dispatch(self)
        return 0

    def time(self):
        return _monotonic()


cdef object _core_run_once = LoopCore._run_once
