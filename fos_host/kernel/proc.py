"""Process attributes: rlimits, parent-death signal, session, child subreaper, pidfds.

Child half: `set_rlimits` (no core dumps, bounded open files), `die_with_parent`,
`new_session` (so `kill(0, …)` inside cannot reach the host's process group).
Host half: `become_subreaper` (orphaned sandboxes are reparented to the host, which reaps
them and reads their exit status), `pidfd_open`, `raise_nofile`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal

import prctl

from fos_host.errors import StepError

NOFILE = 1024


def set_rlimits(nofile: int = NOFILE) -> None:
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    except (OSError, ValueError) as e:
        raise StepError("setrlimit", getattr(e, "errno", 0) or 0, str(e)) from e


def raise_nofile() -> None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit: a host holds several fds per
    renderer, and the soft default (often 1024) exists only for programs that use select(2),
    which this one does not (systemd.exec(5) gives the same advice)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def set_name(name: str) -> None:
    """The comm name (15 bytes) that ps and the kernel's logs show."""
    prctl.set_name(name[:15])


def stat_fields(pid: int | str = "self") -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on — index = field number - 3 — or None if
    there is no such process. comm (field 2) may hold spaces and ")": split after the last ")"."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2 :].decode("ascii", "replace").split()


_ENV_START, _ENV_END = 50, 51  # fields of /proc/<pid>/stat: where exec put the environment


def environ_area() -> tuple[int, int] | None:
    """(start, end) of the memory exec put this process's environment in — what
    `/proc/<pid>/environ` shows, and what every child forked without exec inherits — or None
    where the kernel does not say."""
    fields = stat_fields()
    if fields is None or len(fields) <= _ENV_END - 3:
        return None
    return int(fields[_ENV_START - 3]), int(fields[_ENV_END - 3])


def wipe_environ_area() -> None:
    """Overwrite that memory with NULs. A sandbox forked from the host (through the zygote)
    would otherwise carry the host's whole starting environment — secrets included — readable
    by the workload in its own memory. Only once nothing points into it any more:
    `os.environ.clear()` unsetenv()s every variable."""
    area = environ_area()
    if area is not None and area[1] > area[0]:
        ctypes.memset(area[0], 0, area[1] - area[0])


def starttime(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot), None if there is no such pid:
    with the pid, it names a process for good (a pid alone is reused)."""
    fields = stat_fields(pid)
    return None if fields is None else int(fields[22 - 3])


def host_ppid() -> int:
    """The parent's pid as the mounted /proc sees it (getppid() says 0 for a parent outside
    the caller's pid namespace)."""
    fields = stat_fields()
    assert fields is not None
    return int(fields[1])


def children() -> list[int]:
    """This process's children, zombies included."""
    out: list[int] = []
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/children") as f:
            out += [int(p) for p in f.read().split()]
    return out


def comm(pid: int) -> str:
    """A process's comm name, "" if it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def die_with_parent() -> None:
    try:
        prctl.set_pdeathsig(signal.SIGKILL)
    except OSError as e:
        raise StepError("PR_SET_PDEATHSIG", e.errno or 0) from e


def new_session() -> None:
    try:
        os.setsid()
    except OSError as e:
        raise StepError("setsid", e.errno or 0) from e


def become_subreaper() -> None:
    prctl.set_child_subreaper(1)


def pidfd_open(pid: int) -> int:
    return os.pidfd_open(pid)


def reset_signals_for_exec() -> None:
    """Ignored dispositions survive exec: give the workload the defaults (as subprocess's
    restore_signals does — CPython ignores SIGPIPE and SIGXFSZ, the zygote SIGINT)."""
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def reset_signals_for_python() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
