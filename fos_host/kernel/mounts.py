"""Mount namespace: a tmpfs root with only what the workload needs.

Host half: `Bind` and `check_binds` (sources exist, targets absolute) — mistakes are found
before any process is forked.
Child half, in order: `make_private` → `open_sources` (O_PATH fds of every bind source,
taken while the process still has its host credentials, so a 0700 /root can be traversed)
→ `build_root` (tmpfs root, read-only binds, minimal /dev, fresh /proc, private /tmp, extra
tmpfs) → `pivot` → `seal_root` (root remounted read-only).
Recursive read-only binds use mount_setattr(2) (Linux 5.12+), which also keeps the flags the
kernel locks on mounts inherited from a more privileged namespace.
"""

from __future__ import annotations

import ctypes
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from fos_host.errors import ConfigError, StepError
from fos_host.kernel import libc

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

SYS_mount_setattr = 442
AT_RECURSIVE = 0x8000
AT_EMPTY_PATH = 0x1000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4

NEW_ROOT = "/tmp"  # where the tmpfs root is assembled; every host dir has a /tmp
DEVICES = ("null", "zero", "full", "random", "urandom")
TMP_SIZE = "64m"


@dataclass(frozen=True)
class Bind:
    source: str
    target: str
    writable: bool = False
    optional: bool = False  # a default bind whose source may be absent on this host


def parse_bind(spec: str, *, writable: bool) -> Bind:
    """`SRC[:DST]` from the command line."""
    src, _, dst = spec.partition(":")
    return Bind(os.path.abspath(src), dst or os.path.abspath(src), writable)


def check_binds(binds: list[Bind], tmpfs: list[str]) -> list[Bind]:
    """Drop absent optional binds; refuse a missing source or a relative target."""
    out = []
    for b in binds:
        if not os.path.isabs(b.target):
            raise ConfigError(f"bind target must be an absolute path: {b.target}")
        if not os.path.lexists(b.source):
            if b.optional:
                continue
            raise ConfigError(f"bind source does not exist: {b.source}")
        out.append(b)
    for t in tmpfs:
        if not os.path.isabs(t):
            raise ConfigError(f"tmpfs target must be an absolute path: {t}")
    return out


# -- child half --------------------------------------------------------------------------


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _setattr(path: str, attrs: int, *, recursive: bool) -> None:
    ma = _MountAttr(attrs, 0, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    ret = libc.syscall(
        SYS_mount_setattr, -100, os.fsencode(path), flags, ctypes.byref(ma), ctypes.sizeof(ma)
    )
    libc.check(ret, "mount_setattr read-only", path)


def make_private() -> None:
    libc.mount(None, "/", None, MS_REC | MS_PRIVATE, step="make / rprivate")


def open_sources(binds: list[Bind]) -> list[int]:
    """O_PATH fds of the bind sources and the device nodes, in that order."""
    fds = []
    for path in [b.source for b in binds] + [f"/dev/{d}" for d in DEVICES]:
        try:
            fds.append(os.open(path, os.O_PATH | os.O_CLOEXEC))
        except OSError as e:
            raise StepError("open bind source", e.errno or 0, path) from e
    return fds


def _mountpoint(target: str, is_dir: bool) -> None:
    if is_dir:
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.lexists(target):
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))


def _bind_fd(fd: int, target: str, step: str) -> None:
    is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
    _mountpoint(target, is_dir)
    libc.mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC, step=step)


def build_root(binds: list[Bind], fds: list[int], tmpfs: list[str]) -> str:
    """Assemble the new root at NEW_ROOT; returns its path."""
    root = NEW_ROOT
    libc.mount(
        "tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=16m", step="mount tmpfs root"
    )
    # Private /tmp and extra tmpfs first: binds below them (a checkout in /tmp) go on top.
    for t in ["/tmp", *tmpfs]:
        os.makedirs(root + t, exist_ok=True)
        libc.mount(
            "tmpfs",
            root + t,
            "tmpfs",
            MS_NOSUID | MS_NODEV,
            f"mode=1777,size={TMP_SIZE}",
            step=f"mount tmpfs {t}",
        )
    for b, fd in zip(binds, fds, strict=False):
        if os.path.islink(b.source) and b.source == b.target:
            # merged-/usr links such as /lib -> usr/lib are recreated, not bound
            link = os.readlink(b.source)
            os.makedirs(root + os.path.dirname(b.target), exist_ok=True)
            os.symlink(link, root + b.target)
            continue
        target = root + b.target
        _bind_fd(fd, target, f"bind {b.source}")
        attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
        if not b.writable:
            attrs |= MOUNT_ATTR_RDONLY
        _setattr(target, attrs, recursive=True)
    _build_dev(root, fds[len(binds) :])
    os.makedirs(root + "/proc", exist_ok=True)
    libc.mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, step="mount /proc")
    return root


def _build_dev(root: str, dev_fds: list[int]) -> None:
    dev = root + "/dev"
    os.makedirs(dev, exist_ok=True)
    for name, fd in zip(DEVICES, dev_fds, strict=True):
        _bind_fd(fd, f"{dev}/{name}", f"bind /dev/{name}")
    for name, link in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(link, f"{dev}/{name}")


def pivot(root: str) -> None:
    os.chdir(root)
    libc.pivot_root(".", ".")
    libc.umount2(".", MNT_DETACH, step="detach old root")
    os.chdir("/")


def seal_root() -> None:
    """Remount the tmpfs root read-only (binds and /tmp keep their own flags)."""
    _setattr("/", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, recursive=False)


def python_runtime_binds(prefixes: list[str]) -> list[Bind]:
    """What a Python workload needs: the system libraries and its interpreter trees."""
    binds = [Bind("/usr", "/usr")]
    for top in ("/lib", "/lib64", "/bin", "/sbin", "/lib32", "/libx32"):
        binds.append(Bind(top, top, optional=True))
    seen = {"/usr"}
    for p in prefixes:
        real = str(Path(p).resolve())
        for path in (p, real):
            if not any(path == s or path.startswith(s + "/") for s in seen):
                seen.add(path)
                binds.append(Bind(path, path, optional=True))
    return binds
