"""Run a command with io_uring_setup(2) failing EPERM, as Docker's and Kubernetes'
default seccomp profiles make it fail.

    python tests/seccomp_deny_uring.py [--errno ENOSYS] CMD [ARG...]

Installs a seccomp filter (PR_SET_NO_NEW_PRIVS first, so no privilege is needed) that
answers io_uring_setup with EPERM (or the errno named, e.g. ENOSYS as a kernel built
without io_uring answers) and allows every other call, then execs CMD. The
filter is inherited by CMD and its children, as a container's profile would be.
"""
import ctypes
import os
import platform
import struct
import sys

# io_uring_setup is 425 in the unified syscall table (x86_64 and aarch64 alike).
NR_IO_URING_SETUP = 425
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM = 1

# Classic BPF: (code, jt, jf, k). seccomp_data: nr at offset 0, arch at offset 4.
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06


def filter_program(arch: int, err: int = EPERM) -> list[tuple[int, int, int, int]]:
    return [
        (LD_W_ABS, 0, 0, 4),                          # A = arch
        (JEQ_K, 1, 0, arch),                          # native arch? go on : allow
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),
        (LD_W_ABS, 0, 0, 0),                          # A = syscall number
        (JEQ_K, 0, 1, NR_IO_URING_SETUP),             # io_uring_setup? EPERM : allow
        (RET_K, 0, 0, SECCOMP_RET_ERRNO | err),
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]


def install(err: int = EPERM) -> None:
    arch = AUDIT_ARCH.get(platform.machine())
    if arch is None:
        raise SystemExit(f"seccomp_deny_uring: no syscall table for {platform.machine()}")
    prog = filter_program(arch, err)
    raw = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p,
                           ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    args = sys.argv[1:]
    err = EPERM
    if args[0] == "--errno":
        import errno
        err, args = getattr(errno, args[1]), args[2:]
    install(err)
    os.execvp(args[0], args)
