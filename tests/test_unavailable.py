"""io_uring blocked the way users meet it: a seccomp profile answering io_uring_setup
with EPERM (Docker 25+ and Kubernetes' default profiles do). tests/seccomp_deny_uring.py
installs such a filter and execs the command; the proxy must say why in one line."""
import subprocess
import sys

from conftest import REPO_ROOT

HELPER = str(REPO_ROOT / "tests" / "seccomp_deny_uring.py")


def run_denied(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, HELPER, sys.executable, "-m", "uring_net", *args],
                          cwd=REPO_ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=30)


def test_the_helper_really_blocks_io_uring_setup():
    """Without this the tests below could pass for another reason."""
    code = ("import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
            "p = ctypes.create_string_buffer(120); "
            "r = libc.syscall(425, 4, p); print(r, ctypes.get_errno())")
    r = subprocess.run([sys.executable, HELPER, sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["-1", "1"], r.stdout      # -1, EPERM
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    ret = int(ok.stdout.split()[0])
    assert ret >= 0, f"io_uring_setup fails here even without the filter: {ok.stdout}"


def test_uring_backend_under_seccomp_exits_naming_the_cause():
    r = run_denied("--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--backend", "uring")
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("uring-proxy: error: io_uring is unavailable"), lines
    assert "EPERM" in lines[0] and "seccomp" in lines[0], lines


def test_probe_under_seccomp_reports_io_uring_unavailable():
    r = run_denied("--probe")
    assert r.returncode == 0, r.stderr
    rows = {line.split("  ")[0].strip(): line for line in r.stdout.splitlines()}
    assert "NO" in rows["io_uring_setup"] and "seccomp" in rows["io_uring_setup"], r.stdout
    assert "backend uring: UNAVAILABLE" in r.stdout, r.stdout
