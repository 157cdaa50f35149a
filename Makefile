# uring_net: the two commands of the README, and what they need.
#
#   make run    install what is missing, build, run the demo (proxy + built-in upstream)
#   make test   install what is missing, build, run the whole test suite
#   make bench  install the peers (iperf3, wrk, HAProxy, nginx, socat), run every benchmark
#
# Every target is safe to repeat: packages are installed only when missing, the
# venv is created once, and the extension is rebuilt only when a source changed.

SHELL       := /bin/bash
PYTHON      ?= python3
VENV        := .venv
VPY         := $(VENV)/bin/python
STAMP_DEPS  := $(VENV)/.deps-installed
CORE_SO     := $(VENV)/.core-built
CY_SOURCES  := $(wildcard cython/*.pyx cython/*.pxd cython/*.pxi cython/*.h) setup.py pyproject.toml

# Debian packages: the build needs liburing's headers and a compiler; the
# benchmark needs the peers it compares against.
BUILD_DEBS  := liburing-dev gcc make pkg-config
BENCH_DEBS  := iperf3 haproxy socat nginx-light libnginx-mod-stream wrk

.PHONY: run test bench probe clean deps-build deps-bench

run: $(CORE_SO)
	$(VENV)/bin/uring-proxy demo

test: $(CORE_SO)
	$(VPY) -m pytest -q tests

bench: $(CORE_SO) deps-bench
	$(VPY) bench/throughput.py
	$(VPY) bench/http_rate.py
	$(VPY) bench/http_rate.py --close
	$(VPY) bench/idle.py
	$(VPY) bench/storm.py

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

$(STAMP_DEPS): pyproject.toml | deps-build
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "setuptools>=77" wheel "Cython>=3.0,<4" "pytest>=7" "hypothesis>=6"
	@touch $@

# Editable install: the CLI lands in .venv/bin and the compiled extension sits
# next to the Python package, so a source edit needs only this rule again.
$(CORE_SO): $(STAMP_DEPS) $(CY_SOURCES) | deps-build
	$(VPY) -m pip install -q --no-build-isolation -e .
	@touch $@

clean:
	rm -rf build cython/_core.c uring_net/_core*.so *.egg-info $(CORE_SO)
