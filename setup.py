"""Build of the Cython core. Everything else is declared in pyproject.toml.

The core is one extension module, ``uring_net._core``, compiled from
``cython/_core.pyx``. Like uvloop's ``loop.pyx`` it stitches the small
per-idea files in ``cython/`` together with ``include``, so the per-CQE
path is one translation unit: the state machine and the driver inline into
each other and no call crosses a module boundary.
"""
from setuptools import Extension, setup
from Cython.Build import cythonize

ext = Extension(
    "uring_net._core",
    sources=["cython/_core.pyx"],
    include_dirs=["cython"],
    libraries=["uring"],
    extra_compile_args=["-O2", "-Wno-unused-function", "-Wno-unused-variable"],
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
