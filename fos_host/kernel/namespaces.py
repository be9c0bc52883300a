"""User, pid, net, ipc, uts, mount and cgroup namespaces.

Host half: `write_id_maps` — the process that stays in the parent user namespace maps the
sandbox's root to one unprivileged host uid/gid (as root), or to the caller's own uid
(rootless, the only mapping an unprivileged writer may make).

Child half: `drop_groups` (before the user namespace: afterwards it can never be done),
`unshare`, `become_root` (setresuid/setresgid 0 inside the namespace — tmpfs file creation
fails with EOVERFLOW before it), `set_hostname`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from fos_host.errors import StepError
from fos_host.kernel import libc

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

ALL_SANDBOX = (
    CLONE_NEWUSER
    | CLONE_NEWNS
    | CLONE_NEWPID
    | CLONE_NEWNET
    | CLONE_NEWIPC
    | CLONE_NEWUTS
    | CLONE_NEWCGROUP
)

NAMES = {
    CLONE_NEWUSER: "user",
    CLONE_NEWPID: "pid",
    CLONE_NEWNET: "net",
    CLONE_NEWIPC: "ipc",
    CLONE_NEWUTS: "uts",
    CLONE_NEWNS: "mount",
    CLONE_NEWCGROUP: "cgroup",
}


@dataclass(frozen=True)
class IdMap:
    """Root inside the sandbox is `host_uid`/`host_gid` outside it."""

    host_uid: int
    host_gid: int


# -- host half ---------------------------------------------------------------------------


def write_id_maps(pid: int, ids: IdMap) -> None:
    """Map uid/gid 0 of `pid`'s new user namespace to one host id; setgroups denied."""
    for name, text in (
        ("setgroups", "deny"),
        ("uid_map", f"0 {ids.host_uid} 1\n"),
        ("gid_map", f"0 {ids.host_gid} 1\n"),
    ):
        path = f"/proc/{pid}/{name}"
        try:
            with open(path, "w") as f:
                f.write(text)
        except OSError as e:
            raise StepError(f"write {name}", e.errno or 0, f"{text.strip()!r} to {path}") from e


# -- child half --------------------------------------------------------------------------


def drop_groups() -> None:
    """Drop supplementary groups; only possible (and needed) with CAP_SETGID, i.e. as root."""
    if os.geteuid() != 0:
        return
    try:
        os.setgroups([])
    except OSError as e:
        raise StepError("setgroups", e.errno or 0) from e


def unshare(flags: int) -> None:
    try:
        libc.unshare(flags)
    except StepError as e:
        names = ",".join(n for f, n in NAMES.items() if flags & f)
        raise StepError(f"unshare({names})", e.errno) from e


def become_root() -> None:
    try:
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    except OSError as e:
        raise StepError("setresuid(0) in the user namespace", e.errno or 0) from e


def set_hostname(name: str) -> None:
    try:
        socket.sethostname(name)
    except OSError as e:
        raise StepError("sethostname", e.errno or 0, name) from e
