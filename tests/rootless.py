"""Run a command as an unprivileged user, from a root test process.

The only Python 3.11 of these machines lives under /root/.pyenv and /root is 0700: an
unprivileged user cannot even start the venv's interpreter (a symlink into it). `run_as`
gives the command a private mount namespace in which /root is an empty, read-only tmpfs
(mode 0755) holding read-only binds of only what it needs (the interpreter tree, and the
repository when it lies below /root too), then drops to the user and execs. Nothing on the
host changes: the namespace dies with the command's process tree.

    cp = run_as("fos-rootless", [PYTHON, "-m", "fos_host.cli", "exec", "--", "true"])
"""

from __future__ import annotations

import ctypes
import os
import pwd
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python")  # the venv's python, by its own path
USER = "fos-rootless"
HIDDEN = "/root"  # 0700: replaced by a tmpfs in the command's mount namespace
CLEAN_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
}

CLONE_NEWNS = 0x00020000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.unshare.argtypes = [ctypes.c_int]


def _check(ret: int, what: str) -> None:
    if ret == -1:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    enc = [None if s is None else os.fsencode(s) for s in (src, target, fstype)]
    _check(
        _libc.mount(enc[0], enc[1], enc[2], flags, os.fsencode(data) if data else None),
        f"mount {src or fstype} on {target}",
    )


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def exposed_paths() -> list[str]:
    """What the command needs from below HIDDEN: the interpreter tree, maybe the repo."""
    wanted = {os.path.realpath(sys.base_prefix), str(REPO)}
    return sorted(p for p in wanted if _under(p, HIDDEN))


def _enter(uid: int, gid: int, cwd: str, expose: Sequence[str]) -> None:
    """In the forked child, before exec: private /root view, then become the user."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    sources = [os.open(p, os.O_PATH | os.O_CLOEXEC) for p in expose]  # before /root is covered
    _mount("tmpfs", HIDDEN, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
    for path, fd in zip(expose, sources, strict=True):
        os.makedirs(path, mode=0o755, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fd)
    _mount(None, HIDDEN, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    os.chdir(cwd)


def run_as(
    user: str,
    argv: list[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 30,
    *,
    cwd: str | os.PathLike[str] = REPO,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` as `user` (root only) with a clean environment plus `env`; capture text
    stdout and stderr. The command sees /root as an empty tmpfs but for `exposed_paths()`."""
    pw = pwd.getpwnam(user)
    expose = exposed_paths()
    here = os.fspath(cwd)
    return subprocess.run(
        argv,
        env={**CLEAN_ENV, **(env or {})},
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        close_fds=True,
        preexec_fn=lambda: _enter(pw.pw_uid, pw.pw_gid, here, expose),
    )
