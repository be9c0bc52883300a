"""Shared fixtures: every test leaves no cgroup and no child process behind; `targets` on the
host for the sandbox attacks; `origin`, the demo sites for a daemon (tests/daemon.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from attacks import host_targets
from fdcheck import open_fds

from fos_host.bench_hog import MEMORY_FILESYSTEMS, fstype, write_file
from fos_host.kernel import proc
from fos_host.kernel.cgroup import home_path
from fos_host.services.origin import OriginServer

CGROUP_ROOT = Path("/sys/fs/cgroup")


def own_cgroup_dirs() -> list[Path]:
    """This process's own cgroup directory in every mounted hierarchy (where it started: a
    host that moved into its v2 leaf counts as in the leaf's parent)."""
    mounts: dict[str, Path] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype, opts = fields[sep + 1], fields[sep + 3].split(",")
            if fstype == "cgroup2":
                mounts[""] = Path(fields[4])
            elif fstype == "cgroup":
                for opt in opts:
                    mounts.setdefault(opt, Path(fields[4]))
    out = []
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                if c in mounts:
                    out.append(mounts[c] / home_path(path).lstrip("/"))
    return sorted(set(out))


def fos_cgroups() -> list[Path]:
    found = []
    for d in own_cgroup_dirs():
        if d.is_dir():
            found += [p for p in d.iterdir() if p.is_dir() and p.name.startswith("fos")]
    return found


@pytest.fixture(autouse=True)
def leaves_no_trace() -> Iterator[None]:
    before = set(fos_cgroups())
    yield
    left = {p for p in set(fos_cgroups()) - before if not _of_another_live_host(p)}
    assert not left, f"cgroups left behind: {sorted(map(str, left))}"
    _reap_orphaned_zombies()
    left_kids = [pid for pid in proc.children() if proc.comm(pid) != "fos-zygote"]
    assert not left_kids, f"child processes left behind: {left_kids}"


def _reap_orphaned_zombies() -> None:
    """Once a Spawner made this process a child subreaper, the dead grandchildren of a test's
    own children land here as zombies: reaping them is this process's job, not a leak."""
    for pid in proc.children():
        fields = proc.stat_fields(pid)
        if fields is not None and fields[0] == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def _of_another_live_host(path: Path) -> bool:
    """fos.<pid>.<start> of a live process that is neither us nor our child: another host
    on this machine (the cpu, pids and cgroup2 roots are shared), not our trace."""
    parts = path.name.split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid() or pid in proc.children():
        return False
    fields = proc.stat_fields(pid)  # None: a dead host's directory, somebody must clean it
    return fields is not None and fields[19] == parts[2]


@pytest.fixture
def targets(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A secret file, a TCP listener on loopback and an abstract unix socket of the host."""
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    with host_targets(str(secret), "fos-test") as t:
        yield t


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """Every fd the test opened is closed at its end (IPC tests: `usefixtures`)."""
    before = open_fds()
    yield
    left = open_fds() - before
    assert not left, {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in left}


@pytest.fixture(scope="module")
def origin() -> Iterator[dict[str, str]]:
    """The demo sites on loopback; the resolve map that sends their names there."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="origin", daemon=True)
    thread.start()
    server = OriginServer()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        yield server.resolve()
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 64 MiB file on a disk for the memory hog to thrash (fos_host/bench_hog.py): a file
    in memory (tmpfs) cannot be reclaimed without swap. Where the temporary directory is in
    memory (the VM's /tmp), $FOS_DISK_TMP names a directory on a disk."""
    d = tmp_path_factory.mktemp("pressure")
    made = None
    if fstype(d) in MEMORY_FILESYSTEMS and os.environ.get("FOS_DISK_TMP"):
        d = made = Path(tempfile.mkdtemp(prefix="fos-pressure-", dir=os.environ["FOS_DISK_TMP"]))
    if fstype(d) in MEMORY_FILESYSTEMS:
        pytest.skip(f"{d} is on {fstype(d)}: the hog needs a file on a disk to thrash")
    try:
        yield write_file(d / "big")
    finally:
        if made is not None:
            shutil.rmtree(made)
