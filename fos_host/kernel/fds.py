"""File descriptors: what crosses into a sandbox, and nothing else.

Child half: `install_fds` moves the passed fds onto their target numbers (3, 4, … or as
asked) and closes every other fd; the kept ones lose FD_CLOEXEC so they survive an exec.
Host half: `send_fds` / `recv_fds` with SCM_RIGHTS over a SEQPACKET socket, `fd_kind` (what
a received fd really is, for the IPC layer's typed handles), `open_fd_count` for leak
checks, and `readable`: waiting on fds with poll(2) (select(2) takes no fd above 1023, and a
host with a few hundred renderers has more).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import select
import socket
from collections.abc import Sequence

from fos_host.errors import StepError


def install_fds(mapping: dict[int, int], keep_cloexec: tuple[int, ...] = ()) -> None:
    """Make fd `target` a copy of `source` for each pair; close every fd that is not a
    target, stdio or in `keep_cloexec` (which stay close-on-exec)."""
    # First lift every source out of the target range, so no dup2 clobbers a later source.
    top = max([*mapping.keys(), *mapping.values(), *keep_cloexec, 2]) + 1
    lifted = {t: os.dup2(s, top + i, inheritable=False) for i, (t, s) in enumerate(mapping.items())}
    for target, src in lifted.items():
        try:
            os.dup2(src, target, inheritable=True)
        except OSError as e:
            raise StepError("pass fd", e.errno or 0, f"{src} -> {target}") from e
    keep = {0, 1, 2, *mapping.keys(), *keep_cloexec}
    for fd in _open_fds():
        if fd not in keep:
            with contextlib.suppress(OSError):  # the listing's own fd is already gone
                os.close(fd)


def readable(fds: Sequence[int], timeout: float | None) -> list[int]:
    """Those of `fds` that are readable, hung up or in error within `timeout` seconds (None:
    until one is), as select(2) would say, without its limit of fd 1023."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
    return [fd for fd, _ in poller.poll(ms)]


def _open_fds() -> list[int]:
    return [int(n) for n in os.listdir("/proc/self/fd")]


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd")) - 1


def send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    socket.send_fds(sock, [data], fds)


def recv_fds(sock: socket.socket, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
    """Receive one message; fds beyond `maxfds` or a truncated control message raise after
    closing whatever arrived, so nothing leaks."""
    data, fds, flags, _ = socket.recv_fds(sock, bufsize, maxfds)
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        for fd in fds:
            os.close(fd)
        raise OSError("message or its file descriptors were truncated")
    return data, fds


@functools.cache
def _memfd_dev() -> int:
    """The device of every memfd (the kernel's internal shmem mount), from one made here."""
    fd = os.memfd_create("fos-probe", os.MFD_CLOEXEC)
    try:
        return os.fstat(fd).st_dev
    finally:
        os.close(fd)


def fd_kind(fd: int) -> str:
    """What an fd is, from its /proc/self/fd link: "memfd", "socket", "pidfd", "eventfd",
    "pipe", "file", or the anon inode's name ("anon:<name>")."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        raise OSError(e.errno, f"fd {fd}: {e.strerror}") from e
    if target.startswith("/memfd:"):  # or a file a peer named "memfd:x" in its own mounts
        return "memfd" if os.fstat(fd).st_dev == _memfd_dev() else "file"
    if target.startswith("socket:"):
        return "socket"
    if target.startswith("pipe:"):
        return "pipe"
    if target.startswith("anon_inode:"):
        name = target[len("anon_inode:") :].strip("[]")
        return name if name in ("pidfd", "eventfd") else f"anon:{name}"
    return "file"
