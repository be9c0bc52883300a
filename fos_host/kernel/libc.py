"""The few libc calls Python 3.11 lacks (unshare, setns, mount, umount2, pivot_root, syscall).

Shared by the kernel modules; each wrapper raises `StepError` naming the step and the errno.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from fos_host.errors import StepError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]

# x86_64 syscall numbers of calls glibc 2.36 has no wrapper for.
SYS_pivot_root = 155
SYS_seccomp = 317


def check(ret: int, step: str, detail: str = "") -> int:
    """Raise `StepError(step, errno)` when a libc call returned -1."""
    if ret == -1:
        raise StepError(step, ctypes.get_errno(), detail)
    return ret


def _b(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def unshare(flags: int) -> None:
    check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    check(_libc.setns(fd, nstype), "setns")


def mount(
    source: str | None,
    target: str,
    fstype: str | None,
    flags: int,
    data: str | None = None,
    *,
    step: str = "mount",
) -> None:
    check(
        _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)),
        step,
        f"{source or fstype} on {target}",
    )


def umount2(target: str, flags: int, *, step: str = "umount") -> None:
    check(_libc.umount2(_b(target), flags), step, target)


def pivot_root(new_root: str, put_old: str) -> None:
    check(
        _libc.syscall(SYS_pivot_root, _b(new_root), _b(put_old)),
        "pivot_root",
        new_root,
    )


def syscall(nr: int, *args: object) -> int:
    """Raw syscall(2); returns the result or -1 with ctypes errno set (caller checks)."""
    return int(_libc.syscall(nr, *args))
