"""The sandbox core as an unprivileged user: `fos-host exec` run by a user the tests create.

Rootless here means: user namespaces work, but the cgroups belong to root and are not
delegated. Sandboxes without limits must work (with no cgroup of their own), limits must be
refused in one line naming the fix, and the sandbox - which runs under the user's own host
uid - must not reach the host. With a cgroup delegated to the user (the `delegated`
fixture, as systemd's Delegate=yes makes one), limits work and nothing is left in it.
Each command runs through `rootless.run_as` (a private mount namespace that makes the
interpreter under 0700 /root reachable, then setuid).

Skipped unless root: it creates the user. The VM (make test-vm) also runs the whole
selection as an unprivileged user in a delegated cgroup.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from attacks import WITHOUT_SECCOMP, assert_attacks_failed, host_targets
from probing import assert_isolated
from rootless import PYTHON, USER, exposure, run_as

from fos_host.kernel.cgroup import Layout, detect

pytestmark = [
    pytest.mark.rootless,
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason="not root: cannot create the test user (a non-root run of the suite is rootless)",
    ),
]

MARK = "fos-host rootless tests (temporary)"  # GECOS of a user these tests created
LOCK = "/run/fos-rootless-tests.lock"
LAYOUT = detect().layout
# What systemd's Delegate=yes gives the user, besides the directory itself (v1 has "tasks").
DELEGATED_FILES = ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads", "tasks")
USERADD = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]

# Run as the user: fos* directories it owns in its own cgroups, as it sees them (others'
# sessions may create root-owned ones in the shared hierarchies at any time).
USER_FOS_CGROUPS = """
import json, os
from fos_host.kernel.cgroup import detect
dirs = sorted({str(d) for d in detect().hierarchies().values()})
mine = [os.path.join(d, e) for d in dirs for e in os.listdir(d)
        if e.startswith("fos") and os.stat(os.path.join(d, e)).st_uid == os.getuid()]
print(json.dumps({"dirs": dirs, "mine": mine}))
"""

# Run as the user: a host that spawns a sandbox trying to kill everything it may signal.
KILL_ESCAPE_HOST = """
import json, subprocess, sys
from fos_host.sandbox.jail import Jail
from fos_host.sandbox.sandbox import Spawner

WORKLOAD = '''
import os, signal, sys
child = os.fork()
if child == 0:
    signal.pause()
    os._exit(0)
out = {}
for name, target in (("all", -1), ("group", 0), ("host", int(sys.argv[1]))):
    try:
        os.kill(target, 9)
        out[name] = "sent"
    except OSError as e:
        out[name] = e.errno
out["child"] = os.waitpid(child, 0)[1]
print("sandbox", __import__("json").dumps(out), flush=True)
'''
bystander = subprocess.Popen(["sleep", "60"])
argv = [sys.executable, "-c", WORKLOAD, str(__import__("os").getpid())]
with Spawner() as sp, sp.spawn(Jail(sys.argv[1]), argv=argv) as sb:
    status = sb.wait(timeout=20)
standing = bystander.poll() is None
bystander.kill()
bystander.wait()
print("alive", json.dumps({"code": status.code, "signal": status.signal,
                           "uid": sb.host_uid, "bystander": standing}), flush=True)
"""


# -- the user ---------------------------------------------------------------------------


def _user_exists() -> bool:
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return False
    return True


@pytest.fixture(scope="session")
def rootless_user() -> Iterator[pwd.struct_passwd]:
    """`fos-rootless`, created if missing and removed at the end by whichever session of
    these tests holds it last (concurrent sessions share it under a lock), and only if a
    session of these tests created it (its GECOS says so): a user made by others stays."""
    lock = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _user_exists():
            subprocess.run([*USERADD, "--comment", MARK, USER], check=True, capture_output=True)
        fcntl.flock(lock, fcntl.LOCK_SH)
        yield pwd.getpwnam(USER)
    finally:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while others use it
        except BlockingIOError:
            pass
        else:
            if _user_exists() and pwd.getpwnam(USER).pw_gecos == MARK:
                subprocess.run(["userdel", USER], check=True, capture_output=True)
        finally:
            os.close(lock)


def fos_host(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return run_as(USER, [PYTHON, "-m", "fos_host.cli", *args], timeout=timeout)


def errors(stderr: str) -> list[str]:
    """stderr without the log's warning lines."""
    return [ln for ln in stderr.splitlines() if not ln.startswith("fos-host: WARNING ")]


# -- tests -------------------------------------------------------------------------------


def test_runner_gives_the_user_only_what_it_needs(rootless_user: pwd.struct_passwd) -> None:
    code = (
        "import json, os; print(json.dumps("
        "[os.getuid(), os.getgid(), os.getgroups(), sorted(os.listdir('/root'))]))"
    )
    cp = run_as(USER, [PYTHON, "-c", code])
    assert cp.returncode == 0, cp.stderr
    uid, gid, groups, in_root = json.loads(cp.stdout)
    assert (uid, gid, groups) == (rootless_user.pw_uid, rootless_user.pw_gid, [])
    if os.stat("/root").st_mode & 0o777 != 0o700:  # the VM's /root is open: nothing to expose
        assert "/root" not in exposure()
        return
    shown = {Path(p).relative_to("/root").parts[0] for p in exposure().get("/root", [])}
    assert ".pyenv" in shown
    assert set(in_root) == shown  # the interpreter (and a repo clone below /root), no more
    assert os.stat("/root").st_mode & 0o777 == 0o700  # the host's /root is as it was


def test_isolation_report(rootless_user: pwd.struct_passwd) -> None:
    cp = fos_host("exec", "--", PYTHON, "-m", "fos_host.probe", "report")
    assert cp.returncode == 0, cp.stderr
    assert not errors(cp.stderr), cp.stderr
    rep = json.loads(cp.stdout)
    assert_isolated(rep)
    assert rep["uid_map"] == ["0", str(rootless_user.pw_uid), "1"]
    assert rep["gid_map"] == ["0", str(rootless_user.pw_gid), "1"]
    assert rep["hostname"] == "fos-sandbox"
    assert rep["rlimit_core"] == [0, 0]
    assert all(line.endswith(":/") for line in rep["cgroup"])
    assert "/root" not in rep["mounts"] and "/etc" not in rep["mounts"]


@pytest.fixture
def targets(rootless_user: pwd.struct_passwd) -> Iterator[dict[str, str]]:
    """A secret the user can read on the host, a TCP listener and an abstract socket."""
    home = tempfile.mkdtemp(prefix="fos-rootless-")
    os.chmod(home, 0o755)
    secret = Path(home) / "secret.txt"
    secret.write_text("host secret")
    secret.chmod(0o644)
    try:
        with host_targets(str(secret), "fos-rootless-test") as t:
            yield t
    finally:
        shutil.rmtree(home)


def test_the_user_can_read_the_secret_outside(targets: dict[str, str]) -> None:
    """So the attack below is stopped by the sandbox, not by file permissions."""
    cp = run_as(USER, ["cat", targets["secret"]])
    assert (cp.returncode, cp.stdout) == (0, "host secret")


def test_attacks_from_inside_fail(targets: dict[str, str]) -> None:
    args = [f"{k}={v}" for k, v in targets.items()]
    cp = fos_host("exec", "--", PYTHON, "-m", "fos_host.probe", "attack", *args)
    assert cp.returncode == 0, cp.stderr
    assert_attacks_failed(cp.stdout)


def test_attacks_fail_without_seccomp_too(targets: dict[str, str]) -> None:
    args = [f"{k}={v}" for k, v in targets.items()]
    probe = [PYTHON, "-m", "fos_host.probe", "attack", *WITHOUT_SECCOMP, *args]
    cp = fos_host("exec", "--profile", "none", "--", *probe)
    assert cp.returncode == 0, cp.stderr
    assert_attacks_failed(cp.stdout, seccomp=False)


@pytest.mark.parametrize("profile", ["renderer", "none"])
def test_sandbox_cannot_signal_the_host(rootless_user: pwd.struct_passwd, profile: str) -> None:
    """The sandbox runs under the user's own host uid: only its pid namespace and session
    keep kill(-1)/kill(0) from reaching the host and the user's other processes."""
    cp = run_as(USER, [PYTHON, "-c", KILL_ESCAPE_HOST, profile])
    assert cp.returncode == 0, cp.stderr
    lines = dict(ln.split(" ", 1) for ln in cp.stdout.splitlines())
    assert "alive" in lines, cp.stdout + cp.stderr
    host = json.loads(lines["alive"])
    assert host["uid"] == rootless_user.pw_uid  # same uid as the host: signals would pass
    assert host["bystander"], "a process of the user outside the sandbox was killed"
    assert (host["code"], host["signal"]) == (0, None), cp.stderr
    inside = json.loads(lines["sandbox"])
    assert inside["all"] == "sent"  # kill(-1) reached the sandbox's own child only
    assert inside["child"] == signal.SIGKILL  # waitpid status: killed by SIGKILL
    assert inside["group"] == "sent"  # its own group: pid 1 ignores a SIGKILL from inside
    assert inside["host"] == 3  # ESRCH: the host's pid names nothing in the namespace


def test_memory_limit_is_refused_naming_the_fix(rootless_user: pwd.struct_passwd) -> None:
    cp = fos_host("exec", "--memory", "64M", "--", "true")
    assert cp.returncode == 2, cp.stderr
    (line,) = errors(cp.stderr)
    assert line.startswith("fos-host: "), line
    assert "delegat" in line, line
    assert cp.stdout == ""
    view = run_as(USER, [PYTHON, "-c", USER_FOS_CGROUPS])
    assert view.returncode == 0, view.stderr
    seen = json.loads(view.stdout)
    limits_at = "/sys/fs/cgroup" if LAYOUT is Layout.V2 else "/memory"
    assert any(limits_at in d for d in seen["dirs"]), seen  # it looked where limits live
    assert seen["mine"] == [], "the user made cgroups"


def test_memory_limit_refusal_is_one_line(rootless_user: pwd.struct_passwd) -> None:
    cp = fos_host("exec", "--memory", "64M", "--", "true")
    assert cp.returncode == 2
    assert len(cp.stderr.splitlines()) == 1, cp.stderr


def test_doctor_reports_delegation_missing(rootless_user: pwd.struct_passwd) -> None:
    cp = fos_host("doctor", "--json")
    assert cp.returncode == 0, cp.stderr
    checks = {c["name"]: c for c in json.loads(cp.stdout)["checks"]}
    delegation = checks["cgroup delegation (rootless)"]
    assert delegation["verdict"] == "MISSING", delegation
    assert "Delegate=yes" in delegation["fix"]
    assert checks["memory limits"]["verdict"] == "MISSING"
    assert "delegated cgroup" in checks["memory limits"]["fix"]
    userns = checks["unprivileged user namespaces"]
    if shutil.which("newuidmap"):
        assert userns["verdict"] == "OK", userns
    else:  # the VM has no uidmap package: rootless sandboxes map only the user's own uid
        assert userns["verdict"] == "DEGRADED" and "newuidmap: not found" in userns["detail"]
    for kind in ("user", "pid", "net", "ipc", "uts", "mount", "cgroup"):
        assert checks[f"namespace: {kind}"]["verdict"] == "OK", checks[f"namespace: {kind}"]


SOCKET_INET = "import socket; socket.socket(socket.AF_INET)"
OOM = "x = bytearray(200 << 20)"


def test_seccomp_kill_is_reported(rootless_user: pwd.struct_passwd) -> None:
    cp = fos_host("exec", "--", PYTHON, "-c", SOCKET_INET)
    assert cp.returncode == 128 + signal.SIGSYS
    (line,) = errors(cp.stderr)
    assert line.startswith("fos-host: sandbox killed by seccomp"), line
    # the syscall's name comes from /dev/kmsg, which only root may read here
    assert "rerun with --seccomp-learn" in line, line


def test_seccomp_learn_names_the_syscall(rootless_user: pwd.struct_passwd) -> None:
    cp = fos_host("exec", "--seccomp-learn", "--", PYTHON, "-c", SOCKET_INET)
    assert cp.returncode == 0, cp.stderr
    (line,) = errors(cp.stderr)
    assert re.fullmatch(r"fos-host: seccomp learn: profile renderer would have refused: .*", line)
    assert "socket" in line.rsplit(":", 1)[1].replace(" ", "").split(","), line


# -- with a delegated cgroup ---------------------------------------------------------------


def _rmdir(d: Path, timeout: float = 5.0) -> None:
    """rmdir a cgroup whose last process has just exited (EBUSY for a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            d.rmdir()
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@pytest.fixture
def delegated(rootless_user: pwd.struct_passwd) -> Iterator[list[Path]]:
    """A cgroup below this process's own in every hierarchy fos-host uses, delegated to the
    user: the directory and its DELEGATED_FILES owned by the user. At the end it must hold
    nothing the user's fos-host made; then it is removed."""
    dirs: list[Path] = []
    try:
        for own in dict.fromkeys(detect().hierarchies().values()):
            d = own / f"fos-delegated-{os.getpid()}"
            d.mkdir()
            dirs.append(d)
            for f in (d, *(d / name for name in DELEGATED_FILES)):
                if f.exists():
                    os.chown(f, rootless_user.pw_uid, rootless_user.pw_gid)
        yield dirs
        left = [str(sub) for d in dirs for sub in d.iterdir() if sub.is_dir()]
        assert not left, f"the user's fos-host left cgroups behind: {left}"
    finally:
        for d in reversed(dirs):
            _rmdir(d)


def in_delegated(dirs: list[Path], *args: str) -> subprocess.CompletedProcess[str]:
    """fos-host run by the user, alone in its delegated cgroup (as a systemd service is)."""
    return run_as(USER, [PYTHON, "-m", "fos_host.cli", *args], timeout=60, cgroups=dirs)


def test_delegated_memory_limit_ends_in_an_oom_kill(delegated: list[Path]) -> None:
    cp = in_delegated(delegated, "exec", "--memory", "32M", "--", PYTHON, "-c", OOM)
    assert cp.returncode == 128 + signal.SIGKILL, cp.stderr
    assert errors(cp.stderr) == ["fos-host: sandbox out of memory at the 32 MiB limit"]


def test_delegated_limits_let_a_workload_below_them_run(delegated: list[Path]) -> None:
    argv = [PYTHON, "-c", "x = bytearray(16 << 20); print('allocated')"]
    cp = in_delegated(delegated, "exec", "--memory", "64M", "--pids", "16", "--", *argv)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == "allocated\n"


def test_doctor_finds_the_delegation(delegated: list[Path]) -> None:
    cp = in_delegated(delegated, "doctor", "--json")
    assert cp.returncode == 0, cp.stderr
    checks = {c["name"]: c for c in json.loads(cp.stdout)["checks"]}
    assert checks["cgroup delegation (rootless)"]["verdict"] == "OK", checks
    memory = checks["memory limits"]
    assert memory["verdict"] == "OK", memory
    assert "a 64 MiB limit set and read back" in memory["detail"]
