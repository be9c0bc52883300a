"""`fos-host doctor`: what this machine's kernel lets the host do, each feature tried for real.

In the spirit of chrome://sandbox: every check forks a child (or creates and removes a cgroup,
or opens a PSI trigger) and reports what happened, never what a config file claims. A verdict
is OK, DEGRADED (works in a lesser form) or MISSING, with a one-line detail and a fix.

The doctor creates cgroups only directly below its own cgroup, named `fos-doctor-<pid>`, and
removes each at once. It must run single-threaded (it forks).
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import importlib.metadata
import json
import os
import pwd
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from fos_host.errors import StepError
from fos_host.kernel import libc
from fos_host.kernel import namespaces as ns
from fos_host.kernel.fds import readable


class Verdict(Enum):
    OK = "OK"
    DEGRADED = "DEGRADED"
    MISSING = "MISSING"


@dataclass
class Check:
    name: str
    verdict: Verdict
    detail: str
    fix: str = ""


# ---------------------------------------------------------------------------------------------
# helpers

_CHILD_TIMEOUT = 10.0

NAMESPACES: tuple[tuple[str, int], ...] = tuple((name, flag) for flag, name in ns.NAMES.items())

# (import name, distribution name, fix when missing)
LIBRARIES: tuple[tuple[str, str, str], ...] = (
    ("prctl", "python-prctl", "apt-get install libcap-dev, then scripts/bootstrap"),
    ("pyseccomp", "pyseccomp", "apt-get install libseccomp2, then scripts/bootstrap"),
    ("cgroupspy", "cgroupspy", "scripts/bootstrap"),
    ("pyroute2", "pyroute2", "scripts/bootstrap"),
    ("posix_ipc", "posix-ipc", "scripts/bootstrap"),
    ("sdnotify", "sdnotify", "scripts/bootstrap"),
)

PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39

_libc = ctypes.CDLL(None, use_errno=True)


def _errtext(exc: BaseException) -> str:
    if isinstance(exc, StepError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        where = f" on {exc.filename}" if exc.filename else ""
        return f"{name} ({os.strerror(exc.errno)}){where}"
    return f"{type(exc).__name__}: {exc}"


def _in_child(body: Callable[[], str], timeout: float = _CHILD_TIMEOUT) -> tuple[bool, str]:
    """Run `body` in a forked child. (True, what it returned) or (False, why it failed)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the caller's stack
        code = 1
        try:
            os.close(rfd)
            try:
                text = body()
                code = 0
            except BaseException as exc:  # report anything, including SystemExit
                text = _errtext(exc)
            os.write(wfd, text.encode(errors="replace")[:4000])
        finally:
            os._exit(code)
    os.close(wfd)
    chunks: list[bytes] = []
    timed_out = False
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                os.kill(pid, signal.SIGKILL)
                break
            ready = readable([rfd], left)
            if ready:
                data = os.read(rfd, 4096)
                if not data:
                    break
                chunks.append(data)
    finally:
        os.close(rfd)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    text = b"".join(chunks).decode(errors="replace")
    if timed_out:
        return False, f"child timed out after {timeout:.0f} s"
    if code < 0:
        return False, f"child killed by {signal.Signals(-code).name}"
    return code == 0, text


@contextmanager
def _child_cgroup(parent: Path) -> Iterator[Path]:
    """Create `parent/fos-doctor-<pid>` and remove it on the way out."""
    path = parent / f"fos-doctor-{os.getpid()}"
    path.mkdir()
    try:
        yield path
    finally:
        path.rmdir()


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _nobody() -> tuple[int, int]:
    try:
        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return 65534, 65534


# ---------------------------------------------------------------------------------------------
# kernel


def _check_kernel() -> Check:
    release = os.uname().release
    m = re.match(r"(\d+)\.(\d+)", release)
    version = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    if version >= (5, 19):
        return Check("kernel release", Verdict.OK, release)
    lacking = []
    if version < (5, 14):
        lacking.append("cgroup.kill (5.14)")
    lacking.append("memory.reclaim (5.19)")
    return Check(
        "kernel release",
        Verdict.DEGRADED,
        f"{release}: lacks {', '.join(lacking)}",
        "run on Linux 5.19 or newer",
    )


def _check_arch() -> Check:
    machine = os.uname().machine
    if machine == "x86_64":
        return Check("architecture", Verdict.OK, machine)
    return Check(
        "architecture",
        Verdict.DEGRADED,
        f"{machine}: fos_host.kernel.libc knows x86_64 syscall numbers only",
        "add this architecture's syscall numbers to fos_host/kernel/libc.py",
    )


# ---------------------------------------------------------------------------------------------
# cgroups


@dataclass
class _Cgroups:
    """Where this process's own cgroup directories are, in each hierarchy."""

    layout: str
    v1_dirs: dict[str, Path] = field(default_factory=dict)  # controller -> own dir
    v2_dir: Path | None = None
    v2_controllers: frozenset[str] = frozenset()


def _own_paths() -> dict[str, str]:
    """/proc/self/cgroup as {controller or name=X: path}, the cgroup2 entry under ""."""
    own: dict[str, str] = {}
    for line in (_read("/proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            own[""] = path
        for ctrl in controllers.split(","):
            if ctrl:
                own[ctrl] = path
    return own


def _mounts() -> tuple[dict[str, tuple[Path, str]], tuple[Path, str] | None]:
    """cgroup mounts from /proc/self/mountinfo: ({controller: (mount, root)}, v2 (mount, root))."""
    v1: dict[str, tuple[Path, str]] = {}
    v2: tuple[Path, str] | None = None
    known = {ln.split()[0] for ln in (_read("/proc/cgroups") or "").splitlines()[1:] if ln}
    for line in (_read("/proc/self/mountinfo") or "").splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        root, mnt = fields[3], Path(fields[4].replace("\\040", " "))
        if tail[0] == "cgroup2" and v2 is None:
            v2 = (mnt, root)
        elif tail[0] == "cgroup":
            for opt in tail[2].split(","):
                if opt in known or opt.startswith("name="):
                    v1.setdefault(opt, (mnt, root))
    return v1, v2


def _join(mount: Path, root: str, own: str) -> Path:
    rel = os.path.relpath(own, root) if own.startswith(root) else own.lstrip("/")
    return mount if rel in (".", "") else mount / rel


def _cgroups() -> _Cgroups:
    """The own cgroup dirs: from `fos_host.kernel.cgroup.detect`, or read here if it fails."""
    try:
        from fos_host.kernel.cgroup import detect

        info = detect()
    except Exception:
        pass  # the "cgroup layout" check reports it; the rest reads /proc/self/* here
    else:
        view = _Cgroups(layout=str(info.layout.value), v2_controllers=info.v2_controllers)
        for ctrl in info.v1_mounts:
            own_dir = info.own_dir(ctrl)
            if own_dir is not None:
                view.v1_dirs[ctrl] = own_dir
        view.v2_dir = info.own_dir("")
        return view
    own = _own_paths()
    v1_mounts, v2_mount = _mounts()
    layout = {
        (True, True): "hybrid",
        (True, False): "v1",
        (False, True): "v2",
        (False, False): "none",
    }[(bool(v1_mounts), v2_mount is not None)]
    view = _Cgroups(layout=layout)
    for ctrl, (mnt, root) in v1_mounts.items():
        if ctrl in own:
            view.v1_dirs[ctrl] = _join(mnt, root, own[ctrl])
    if v2_mount is not None and "" in own:
        view.v2_dir = _join(v2_mount[0], v2_mount[1], own[""])
        view.v2_controllers = frozenset((_read(view.v2_dir / "cgroup.controllers") or "").split())
    return view


def _check_cgroup_layout() -> Check:
    name = "cgroup layout"
    try:
        from fos_host.kernel.cgroup import detect

        info = detect()
    except Exception as exc:
        return Check(
            name,
            Verdict.MISSING,
            f"fos_host.kernel.cgroup.detect unavailable: {_errtext(exc)}",
            "fos_host/kernel/cgroup.py must import: update or repair the checkout",
        )
    v1 = ", ".join(sorted(info.v1_mounts)) or "none"
    ctrls = " ".join(sorted(info.v2_controllers)) or "none"
    v2 = f"cgroup2 at {info.v2_mount} (controllers: {ctrls})" if info.v2_mount else "no cgroup2"
    detail = f"{info.layout.value}: {v2}; v1: {v1}"
    if "memory" in info.v1_mounts or "memory" in info.v2_controllers:
        return Check(name, Verdict.OK, detail)
    return Check(
        name,
        Verdict.DEGRADED,
        detail + "; no memory controller",
        "enable the memory controller (cgroup_enable=memory on the kernel command line)",
    )


def _check_memory_limits() -> Check:
    """What fos-host itself does: open the host's cgroups (moving into a leaf of its own where
    cgroup v2 needs that) and give a sandbox cgroup a memory limit, then read it back."""
    name = "memory limits"
    limit = 64 << 20
    try:
        from fos_host.errors import FosError
        from fos_host.kernel.cgroup import DELEGATE_FIX, V2_KEY, Limits, detect

        with detect().open_host() as host:
            cg = host.create("doctor", Limits(memory_max=limit))
            got = cg.stats().memory_max
            where = host.dirs.get("memory") or host.dirs.get(V2_KEY)
            moved = host.leaf is not None
    except (FosError, OSError) as exc:
        fix = (
            DELEGATE_FIX
            if os.geteuid() != 0
            else (
                "enable the memory controller (cgroup_enable=memory on the kernel command line, "
                "or +memory in the parent's cgroup.subtree_control)"
            )
        )
        return Check(name, Verdict.MISSING, _errtext(exc), fix)
    except Exception as exc:  # the "cgroup layout" check says why the module does not work
        return Check(name, Verdict.MISSING, f"fos_host.kernel.cgroup: {_errtext(exc)}", "")
    if got != limit:
        return Check(name, Verdict.MISSING, f"set a 64 MiB limit below {where}, read back {got}")
    leaf = " (fos-host moves itself into a leaf of its cgroup to enable it)" if moved else ""
    return Check(name, Verdict.OK, f"a 64 MiB limit set and read back below {where}{leaf}")


def _check_delegation(cg: _Cgroups) -> Check:
    name = "cgroup delegation (rootless)"
    dirs = []
    if cg.v2_dir is not None:
        dirs.append(cg.v2_dir)
    if "memory" in cg.v1_dirs:
        dirs.append(cg.v1_dirs["memory"])
    if not dirs:
        return Check(name, Verdict.MISSING, "no cgroup directory found for this process", "")
    fix = "run rootless hosts in a systemd unit or scope with Delegate=yes"
    if os.geteuid() == 0:
        owners = []
        delegated = False
        for d in dirs:
            try:
                uid = d.stat().st_uid
            except OSError as exc:
                owners.append(f"{d}: {_errtext(exc)}")
                continue
            delegated = delegated or uid != 0
            owners.append(f"{d} owned by {_user(uid)}")
        detail = (
            "running as root (needs none); rootless users need a delegated cgroup "
            "(systemd Delegate=yes): " + "; ".join(owners)
        )
        return Check(name, Verdict.OK if delegated else Verdict.DEGRADED, detail, fix)
    results = []
    writable = False
    for d in dirs:
        try:
            with _child_cgroup(d):
                pass
            writable = True
            results.append(f"{d} writable")
        except OSError as exc:
            results.append(f"{d}: {_errtext(exc)}")
    verdict = Verdict.OK if writable else Verdict.MISSING
    return Check(name, verdict, "; ".join(results), "" if writable else fix)


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} ({uid})"
    except KeyError:
        return str(uid)


# ---------------------------------------------------------------------------------------------
# namespaces


def _unshare_body(kind: str, flags: int) -> Callable[[], str]:
    def body() -> str:
        libc.unshare(flags)
        if kind == "pid":  # the next child is pid 1 of the new namespace
            ok, text = _in_child(lambda: str(os.getpid()))
            if not ok or text != "1":
                raise RuntimeError(f"first child in the new pid namespace: {text}")
            return "unshare ok, first child is pid 1"
        if kind == "user":
            return f"unshare ok, uid in it {os.getuid()} (unmapped)"
        return "unshare ok"

    return body


def _check_namespace(kind: str, flag: int) -> Check:
    name = f"namespace: {kind}"
    flags = flag
    via = ""
    if os.geteuid() != 0 and flag != ns.CLONE_NEWUSER:
        flags |= ns.CLONE_NEWUSER  # how the sandbox does it without root
        via = " (with a user namespace)"
    ok, text = _in_child(_unshare_body(kind, flags))
    if ok:
        return Check(name, Verdict.OK, text + via)
    fix = (
        "enable user namespaces (sysctl user.max_user_namespaces=15000)"
        if kind == "user" or via
        else f"a kernel with CONFIG_{kind.upper()}_NS, and CAP_SYS_ADMIN"
    )
    return Check(name, Verdict.MISSING, text + via, fix)


def _check_unprivileged_userns() -> Check:
    name = "unprivileged user namespaces"
    facts: list[str] = []
    blocked: list[str] = []
    clone = _read("/proc/sys/kernel/unprivileged_userns_clone")
    if clone is not None:
        facts.append(f"unprivileged_userns_clone={clone.strip()}")
        if clone.strip() == "0":
            blocked.append("sysctl kernel.unprivileged_userns_clone=1")
    aa = _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
    if aa is not None and aa.strip() != "0":
        facts.append("apparmor_restrict_unprivileged_userns=1")
        blocked.append("an AppArmor profile allowing userns, or that sysctl set to 0")
    maxns = (_read("/proc/sys/user/max_user_namespaces") or "0").strip()
    facts.append(f"max_user_namespaces={maxns}")
    if not maxns.isdigit() or int(maxns) == 0:
        blocked.append("sysctl user.max_user_namespaces=15000")

    if os.geteuid() == 0:
        uid, gid = _nobody()

        def body() -> str:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            libc.unshare(ns.CLONE_NEWUSER)
            return f"as uid {uid}: unshare(CLONE_NEWUSER) ok"

    else:

        def body() -> str:
            libc.unshare(ns.CLONE_NEWUSER)
            return f"as uid {os.getuid()}: unshare(CLONE_NEWUSER) ok"

    ok, text = _in_child(body)
    tried = text if ok else f"unshare(ns.CLONE_NEWUSER) as an unprivileged user: {text}"
    newuidmap = shutil.which("newuidmap") or (
        "/usr/bin/newuidmap" if os.path.exists("/usr/bin/newuidmap") else None
    )
    facts.append(f"newuidmap: {newuidmap or 'not found'}")
    detail = f"{tried}; " + ", ".join(facts)
    if not ok:
        return Check(name, Verdict.MISSING, detail, "; ".join(blocked) or "see the error above")
    if newuidmap is None:
        return Check(
            name,
            Verdict.DEGRADED,
            detail + " (rootless maps only the user's own uid)",
            "apt-get install uidmap",
        )
    return Check(name, Verdict.OK, detail)


# ---------------------------------------------------------------------------------------------
# seccomp


def _check_seccomp_actions() -> Check:
    name = "seccomp actions"
    text = _read("/proc/sys/kernel/seccomp/actions_avail")
    if text is None:
        return Check(name, Verdict.MISSING, "no /proc/sys/kernel/seccomp", "CONFIG_SECCOMP_FILTER")
    avail = set(text.split())
    lacking = sorted({"kill_process", "user_notif", "log"} - avail)
    if lacking:
        return Check(
            name,
            Verdict.DEGRADED,
            f"lacks {' '.join(lacking)} (has {' '.join(sorted(avail))})",
            "Linux 5.0 or newer",
        )
    return Check(name, Verdict.OK, "kill_process, user_notif, log available")


def _seccomp_body() -> str:
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    import pyseccomp

    filt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    filt.add_rule(pyseccomp.ERRNO(errno.ENOTRECOVERABLE), "getpid")
    filt.load()
    nr = int(pyseccomp.resolve_syscall(pyseccomp.system_arch(), "getpid"))
    ret = libc.syscall(nr)
    err = ctypes.get_errno()
    if ret != -1 or err != errno.ENOTRECOVERABLE:
        raise RuntimeError(f"filter loaded, but getpid() returned {ret} (errno {err})")
    nnp = _libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)
    return f"NO_NEW_PRIVS={nnp}, getpid() -> ENOTRECOVERABLE under a pyseccomp filter"


def _check_seccomp_filter() -> Check:
    ok, text = _in_child(_seccomp_body)
    if ok:
        return Check("seccomp filter", Verdict.OK, text)
    return Check(
        "seccomp filter",
        Verdict.MISSING,
        text,
        "CONFIG_SECCOMP_FILTER, libseccomp2 and pyseccomp (scripts/bootstrap)",
    )


# ---------------------------------------------------------------------------------------------
# PSI


def _try_trigger(path: Path, window_us: int) -> str | None:
    """None if a `some 150000 <window>` trigger was accepted, else the error."""
    # The trailing NUL matters: /proc/pressure/* overwrites the last byte written with one, so
    # "some 150000 2000000" without it arrives as a 200 ms window (EINVAL).
    trigger = f"some 150000 {window_us}\0".encode()
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return _errtext(exc)
    try:
        os.write(fd, trigger)
        return None
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    finally:
        os.close(fd)


def _psi_verdict(name: str, path: Path, where: str) -> Check:
    text = _read(path)
    if text is None or not text.startswith("some"):
        return Check(name, Verdict.MISSING, f"{path} not readable", "boot with psi=1 (CONFIG_PSI)")
    one = _try_trigger(path, 1_000_000)
    two = _try_trigger(path, 2_000_000)
    if one is None:
        return Check(name, Verdict.OK, f"triggers allowed, 1 s windows too; {where}")
    if two is None:
        return Check(
            name,
            Verdict.DEGRADED,
            f"only 2 s windows (1 s window: {one}); {where}",
            "CAP_SYS_RESOURCE allows windows under 2 s",
        )
    return Check(
        name,
        Verdict.DEGRADED,
        f"refused: polling fallback (2 s window: {two}); {where}",
        "none needed: the host polls total= deltas",
    )


def _check_psi_proc() -> Check:
    path = Path("/proc/pressure/memory")
    return _psi_verdict("psi: /proc/pressure/memory", path, "the file is readable")


def _check_psi_cgroup(cg: _Cgroups) -> Check:
    name = "psi: cgroup2 memory.pressure"
    if cg.v2_dir is None:
        return Check(name, Verdict.MISSING, "no cgroup2 mounted", "mount cgroup2")
    if not (cg.v2_dir / "memory.pressure").exists():
        return Check(name, Verdict.MISSING, f"no {cg.v2_dir}/memory.pressure", "boot with psi=1")
    # Prefer a cgroup of our own (never write to cgroups we did not create); else the own one.
    try:
        with _child_cgroup(cg.v2_dir) as child:
            return _psi_verdict(name, child / "memory.pressure", f"tried in a child of {cg.v2_dir}")
    except OSError:
        pass
    return _psi_verdict(name, cg.v2_dir / "memory.pressure", f"tried in {cg.v2_dir}")


# ---------------------------------------------------------------------------------------------
# libraries


def _check_library(module: str, dist: str, fix: str) -> Check:
    name = f"library: {module}"
    loaded = module in sys.modules
    start = time.perf_counter()
    try:
        importlib.import_module(module)
    except Exception as exc:
        return Check(name, Verdict.MISSING, f"import {module}: {_errtext(exc)}", fix)
    ms = (time.perf_counter() - start) * 1000
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "version unknown"
    took = "already imported" if loaded else f"import {ms:.0f} ms"
    return Check(name, Verdict.OK, f"{dist} {version}, {took}")


# ---------------------------------------------------------------------------------------------
# public


def run_checks() -> list[Check]:
    """Try every feature the host uses; one `Check` each, in a fixed order."""
    sys.stdout.flush()
    sys.stderr.flush()
    cg = _cgroups()
    checks = [
        _check_kernel(),
        _check_arch(),
        _check_cgroup_layout(),
        _check_memory_limits(),
        *(_check_namespace(kind, flag) for kind, flag in NAMESPACES),
        _check_unprivileged_userns(),
        _check_delegation(cg),
        _check_seccomp_actions(),
        _check_seccomp_filter(),
        _check_psi_proc(),
        _check_psi_cgroup(cg),
        *(_check_library(*lib) for lib in LIBRARIES),
    ]
    return checks


def render_table(checks: list[Check]) -> str:
    """A plain-text table: one row per check, the fix indented below rows that are not OK."""
    width = max([len("CHECK"), *(len(c.name) for c in checks)])
    vwidth = max(len(v.value) for v in Verdict)
    lines = [f"{'CHECK':<{width}}  {'VERDICT':<{vwidth}}  DETAIL"]
    for c in checks:
        lines.append(f"{c.name:<{width}}  {c.verdict.value:<{vwidth}}  {c.detail}")
        if c.verdict is not Verdict.OK and c.fix:
            lines.append(f"{'':<{width}}  {'':<{vwidth}}  fix: {c.fix}")
    counts = {v: sum(c.verdict is v for c in checks) for v in Verdict}
    lines.append(", ".join(f"{n} {v.value}" for v, n in counts.items()))
    return "\n".join(lines)


def to_json(checks: list[Check]) -> str:
    """{"kernel": {release, version, machine}, "checks": [{name, verdict, detail, fix}]}."""
    u = os.uname()
    doc = {
        "kernel": {"release": u.release, "version": u.version, "machine": u.machine},
        "checks": [
            {"name": c.name, "verdict": c.verdict.value, "detail": c.detail, "fix": c.fix}
            for c in checks
        ],
    }
    return json.dumps(doc, indent=2)
