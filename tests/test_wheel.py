"""`make wheel`'s wheel installs and runs where liburing is not installed.

setup.py links liburing.a into the extension. Here the wheel is built once per
session the way `make wheel` builds it, its extension's DT_NEEDED entries are
read (a small ELF reader, no tools), and it is installed into a fresh venv with
no index. That venv then runs `uring-proxy --probe` and the demo with the
system's liburing.so hidden: as root, in a private mount namespace with an empty
file bound over each liburing.so (and a control that dlopen really fails
there); in every case /proc/self/maps is read after the proxy code ran.

It compiles the extension, so it runs in the full tier only (make test-full,
make test-wheel).
"""
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT

BUILD_SECONDS = 60      # measured: the compile is most of it (2 CPUs)

pytestmark = pytest.mark.skipif(
    not os.environ.get("URING_NET_TEST_FULL"),
    reason=f"full tier only (make test-full): builds a wheel, ~{BUILD_SECONDS} s")

# What the host may put in front of the venv's own libraries and modules.
_LEAKY_ENV = ("LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
DEMO = ["demo", "--connections", "4", "--bytes", str(1 << 20)]


def dt_needed(elf: bytes) -> list[str]:
    """The DT_NEEDED names of an ELF64 little-endian shared object, from its
    SHT_DYNAMIC section and the string table that section links to."""
    assert elf[:4] == b"\x7fELF" and elf[4] == 2 and elf[5] == 1, "not an ELF64 little-endian file"
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
    # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info, ...
    sections = [struct.unpack_from("<IIQQQQII", elf, shoff + i * shentsize) for i in range(shnum)]
    names = []
    for _, sh_type, _, _, offset, size, link, _ in sections:
        if sh_type != 6:            # SHT_DYNAMIC
            continue
        strtab = sections[link][4]
        for pos in range(offset, offset + size, 16):
            tag, val = struct.unpack_from("<qQ", elf, pos)
            if tag == 0:            # DT_NULL ends the table
                break
            if tag == 1:            # DT_NEEDED: an offset into the string table
                start = strtab + val
                names.append(elf[start:elf.index(b"\0", start)].decode())
    return names


def system_liburing_files() -> list[str]:
    """Every liburing.so* file the dynamic loader could find, symlinks resolved."""
    found = set()
    for d in ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib"):
        found.update(glob.glob(f"{d}/liburing.so*") + glob.glob(f"{d}/*/liburing.so*"))
    return sorted({os.path.realpath(f) for f in found if os.path.isfile(f)})


def _run(argv, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kw)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The wheel `make wheel` builds (python -m build --wheel --no-isolation), once a session."""
    if importlib.util.find_spec("build") is None:
        pytest.fail("the venv lacks the `build` package (make's venv installs it: pip install build)",
                    pytrace=False)
    # From a copy: the tree's build/ may hold objects that setuptools would link
    # again instead of compiling what the sources say now.
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO_ROOT / name, src / name)
    for name in ("LICENSES", "cython", "uring_net"):
        shutil.copytree(REPO_ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("*.so", "_core.c", "__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    r = _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), "."],
             timeout=900, cwd=src)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheels = list(out.glob("uring_net-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="session")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with only the wheel installed, from the file: no index, no network."""
    root = tmp_path_factory.mktemp("wheel-venv")
    r = _run([sys.executable, "-m", "venv", str(root / "venv")])
    assert r.returncode == 0, r.stderr
    py = root / "venv" / "bin" / "python"
    r = _run([str(py), "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheel)])
    assert r.returncode == 0, r.stdout + r.stderr
    return root / "venv"


@pytest.fixture(scope="session")
def hidden(tmp_path_factory) -> list[str]:
    """A command prefix that runs its command with every system liburing.so read
    as an empty file (a private mount namespace: root only); [] where that cannot
    be done, and then only the maps check below speaks."""
    libs = system_liburing_files()
    if not libs or os.geteuid() != 0 or shutil.which("unshare") is None:
        return []
    empty = tmp_path_factory.mktemp("hide") / "empty"
    empty.write_bytes(b"")
    mounts = " && ".join(f"mount --bind {shlex.quote(str(empty))} {shlex.quote(lib)}" for lib in libs)
    prefix = ["unshare", "-m", "sh", "-c", f'{mounts} && exec "$@"', "sh"]
    # The control: in there, the system library must really fail to load.
    r = _run([*prefix, sys.executable, "-c", "import ctypes; ctypes.CDLL('liburing.so.2')"])
    assert r.returncode != 0, f"liburing.so.2 still loads with {libs} hidden: {r.stderr}"
    return prefix


def run_installed(venv: Path, hidden: list[str], argv: list[str], tmp_path: Path):
    """argv (relative to the venv's bin/) run from a directory that is not the source
    tree, without the host's library or module paths."""
    env = {k: v for k, v in os.environ.items() if k not in _LEAKY_ENV}
    return _run([*hidden, str(venv / "bin" / argv[0]), *argv[1:]], cwd=tmp_path, env=env)


def test_extension_needs_no_liburing(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        exts = [n for n in names if re.fullmatch(r"uring_net/_core\.[^/]*\.so", n)]
        assert len(exts) == 1, names
        needed = dt_needed(z.read(exts[0]))
    assert any(n.startswith("libc.so") for n in needed), f"the ELF reader found no libc: {needed}"
    assert not [n for n in needed if "uring" in n], f"{exts[0]} needs {needed}"
    # Linked in, liburing's MIT notice must travel with it.
    assert [n for n in names if n.endswith(".dist-info/licenses/LICENSES/liburing.txt")], names


def test_probe_and_demo_run_without_the_system_liburing(venv, hidden, tmp_path):
    # What the source tree's own build reports here is what the wheel must report.
    control = _run([sys.executable, "-m", "uring_net", "--probe"], cwd=REPO_ROOT)
    uring_line = re.search(r"^backend uring: .*$", control.stdout, re.M)
    assert control.returncode == 0 and uring_line, control.stdout + control.stderr

    r = run_installed(venv, hidden, ["python", "-c", "import uring_net._core as c; print(c.__file__)"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(str(venv)), f"imported {r.stdout.strip()}, not the venv's"

    r = run_installed(venv, hidden, ["uring-proxy", "--probe"], tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert uring_line[0] in r.stdout.splitlines(), r.stdout

    r = run_installed(venv, hidden, ["uring-proxy", *DEMO], tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Traceback" not in out, out
    assert re.search(r"verified: yes", out), out
    if uring_line[0] == "backend uring: available":
        assert "io_uring set-up" in out, f"the demo did not run on io_uring:\n{out}"


def test_liburing_is_not_mapped_after_the_demo(venv, hidden, tmp_path):
    """The demo run in-process, then the process's own mappings: the io_uring code
    that ran came from the extension, not from a liburing.so."""
    code = ("import json, sys\nfrom uring_net.cli import main\n"
            f"rc = main({DEMO!r})\n"
            "files = {l.split()[-1] for l in open('/proc/self/maps') if l.split()[-1].startswith('/')}\n"
            "print('MAPPED', json.dumps(sorted(files)))\nsys.exit(rc)\n")
    r = run_installed(venv, hidden, ["python", "-c", code], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    mapped = re.search(r"^MAPPED (.*)$", r.stdout, re.M)
    assert mapped, r.stdout
    files = json.loads(mapped[1])
    assert [f for f in files if f.startswith(str(venv)) and "/uring_net/_core" in f], \
        f"the venv's extension is not mapped: {files}"
    assert not [f for f in files if "liburing" in f], f"liburing is mapped: {files}"
