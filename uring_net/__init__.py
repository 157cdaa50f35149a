"""uring_net: io_uring networking for Python.

The first piece is ``uring-proxy``, a TCP proxy whose data path is io_uring
(see ``uring_net.cli``). The compiled core lives in ``uring_net._core``.
"""

__version__ = "0.1.0"
