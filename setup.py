"""Build of the Cython core. Everything else is declared in pyproject.toml.

The core is one extension module, ``uring_net._core``, compiled from
``cython/_core.pyx``. Like uvloop's ``loop.pyx`` it stitches the small
per-idea files in ``cython/`` together with ``include``, so the per-CQE
path is one translation unit: the state machine and the driver inline into
each other and no call crosses a module boundary.

liburing is linked statically when its archive is installed (liburing_archive).
"""
import os
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from Cython.Build import cythonize


def liburing_archive() -> str | None:
    """liburing.a, where the system has one (Debian's liburing-dev ships it):
    pkg-config's libdir first, then the usual multiarch and plain paths."""
    dirs = []
    try:
        dirs.append(subprocess.run(["pkg-config", "--variable=libdir", "liburing"],
                                   capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    multiarch = sysconfig.get_config_var("MULTIARCH")
    dirs += ([f"/usr/lib/{multiarch}"] if multiarch else []) + ["/usr/lib64", "/usr/lib", "/usr/local/lib"]
    return next((a for d in dirs if d and os.path.isfile(a := os.path.join(d, "liburing.a"))), None)


# Linked statically, liburing travels inside the extension: a wheel built here
# runs where no liburing2 package is installed (or a different soname is). The
# archive must be position-independent code to go into a shared object (Debian's
# is); --exclude-libs keeps its symbols out of the extension's dynamic table, so
# they can neither clash with nor be interposed by another liburing in the process.
archive = liburing_archive()
if archive:
    link = {"extra_objects": [archive], "extra_link_args": ["-Wl,--exclude-libs,liburing.a"]}
else:
    print("uring_net: no liburing.a found; linking liburing.so, so this build (and any wheel "
          "of it) needs the system's liburing at run time", file=sys.stderr)
    link = {"libraries": ["uring"]}

ext = Extension(
    "uring_net._core",
    sources=["cython/_core.pyx"],
    include_dirs=["cython"],
    extra_compile_args=["-O2", "-Wno-unused-function", "-Wno-unused-variable"],
    **link,
)

setup(
    ext_modules=cythonize(
        [ext],
        include_path=["cython", "."],
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
