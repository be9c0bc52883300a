"""Run a command as an unprivileged user, from a root test process.

The only Python 3.11 of these machines lives under /root/.pyenv and /root is 0700: an
unprivileged user cannot even start the venv's interpreter (a symlink into it). `run_as`
forks; the child takes a private mount namespace in which every directory the user cannot
pass on the way to what it needs (/root here; a 0700 clone folder in CI, maybe) is covered by
an empty read-only tmpfs (mode 0755) holding read-only binds of only those paths: the
interpreter tree and the repository. Then it drops to the user and execs. Nothing on the host
changes: the mount namespace dies with the command's process tree.

    cp = run_as("fos-rootless", [PYTHON, "-m", "fos_host.cli", "exec", "--", "true"])
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from fos_host.kernel.libc import mount, unshare
from fos_host.kernel.mounts import (
    MS_BIND,
    MS_NODEV,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
)
from fos_host.kernel.namespaces import CLONE_NEWNS

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable  # the venv's python, by its own path (no shim)
USER = "fos-rootless"
CLEAN_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
}


def _closed_ancestor(path: str) -> str | None:
    """The topmost directory above `path` that others may not pass (no o+x), if any."""
    parts = Path(path).parts
    for i in range(2, len(parts)):
        d = os.path.join(*parts[:i])
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return d
    return None


def exposure() -> dict[str, list[str]]:
    """{closed directory: the paths below it the command needs}: what `run_as` re-exposes."""
    plan: dict[str, list[str]] = {}
    for path in sorted({os.path.realpath(sys.base_prefix), str(REPO)}):
        top = _closed_ancestor(path)
        if top is not None:
            plan.setdefault(top, []).append(path)
    return plan


def _enter(uid: int, gid: int, cwd: str, plan: dict[str, list[str]], cgroups: list[Path]) -> None:
    """In the forked child, before exec: the cgroups to start in, the private view, then
    become the user."""
    for d in cgroups:
        with open(d / "cgroup.procs", "w") as f:
            f.write("0")
    unshare(CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    paths = [p for top in plan for p in plan[top]]
    sources = [os.open(p, os.O_PATH | os.O_CLOEXEC) for p in paths]  # before they are covered
    ro = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
    for top in plan:
        mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
    for path, fd in zip(paths, sources, strict=True):
        os.makedirs(path, mode=0o755, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        mount(None, path, None, ro)
        os.close(fd)
    for top in plan:
        mount(None, top, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
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
    cgroups: list[Path] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` as `user` (needs root) with a clean environment plus `env`, stdin from
    /dev/null, in `cgroups` (one directory per hierarchy) if given, else in this process's;
    stdout and stderr captured as text. Raises subprocess.TimeoutExpired."""
    pw = pwd.getpwnam(user)
    plan = exposure()
    where = os.fspath(cwd)
    return subprocess.run(
        argv,
        env={**CLEAN_ENV, **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        preexec_fn=lambda: _enter(pw.pw_uid, pw.pw_gid, where, plan, cgroups or []),
    )
