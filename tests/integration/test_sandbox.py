"""The sandbox, attacked from inside. Real namespaces, cgroups, seccomp; no mocks."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
from collections.abc import Iterator

import pytest
from attacks import WITHOUT_SECCOMP, assert_attacks_failed
from limits import needs_limits
from probing import assert_isolated, run_probe

from fos_host.sandbox.jail import Jail
from fos_host.sandbox.sandbox import Spawner

ROOT = os.geteuid() == 0


SECRET_PREFIX = b"fos-test-secret:"
SECRET = SECRET_PREFIX + os.urandom(24).hex().encode()  # in this process before any spawner
HIGH_FD = 1100  # above select(2)'s FD_SETSIZE (1024)


@pytest.fixture(scope="module")
def spawner() -> Iterator[Spawner]:
    with Spawner(zygote=True) as sp:
        yield sp


def test_a_python_workload_never_writes_bytecode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its trees are read-only and seccomp kills mkdir: a host started without
    PYTHONDONTWRITEBYTECODE (a systemd unit, the single-file binary) must not pass its
    sys.dont_write_bytecode of False on to the sandboxes its zygote forks."""
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    with Spawner(zygote=True) as sp:
        out, status = run_probe(sp, Jail("renderer"), "report")
    assert status.code == 0, status.describe()
    assert json.loads(out)["writes_bytecode"] is False


@pytest.mark.parametrize("exec_path", [False, True], ids=["zygote", "exec"])
def test_isolation_report(
    spawner: Spawner, exec_path: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("FOS_TEST_SECRET", "hunter2")
    leaked = os.open("/dev/null", os.O_RDONLY)  # inheritable fd of the host: must not leak
    os.set_inheritable(leaked, True)
    try:
        out, status = run_probe(
            spawner, Jail("renderer").memory("64M"), "report", exec_path=exec_path
        )
    finally:
        os.close(leaked)
    assert status.code == 0, status.describe()
    rep = json.loads(out)
    assert_isolated(rep)
    host_uid = int(rep["uid_map"][1])
    assert host_uid != 0
    if ROOT:
        assert host_uid >= 300000
    else:
        assert host_uid == os.geteuid()
    assert rep["hostname"] == "fos-sandbox"
    assert "NOTIFY_SOCKET" not in rep["environ"]
    assert "FOS_TEST_SECRET" not in rep["environ"]
    assert rep["rlimit_core"] == [0, 0]
    assert rep["rlimit_nofile"][1] <= 4096
    assert all(line.endswith(":/") for line in rep["cgroup"])
    assert "/root" not in rep["mounts"] and "/home" not in rep["mounts"]
    assert "/etc" not in rep["mounts"]


@pytest.mark.parametrize("exec_path", [False, True], ids=["zygote", "exec"])
def test_attacks_from_inside_fail(
    spawner: Spawner, targets: dict[str, str], exec_path: bool
) -> None:
    args = [f"{k}={v}" for k, v in targets.items()]
    out, status = run_probe(spawner, Jail("renderer"), "attack", *args, exec_path=exec_path)
    assert status.code == 0, status.describe()
    assert_attacks_failed(out)


def test_attacks_fail_without_seccomp_too(spawner: Spawner, targets: dict[str, str]) -> None:
    """Defence in depth: with no seccomp at all, namespaces, mounts and dropped
    capabilities still stop the attacks on the host's files, network and processes."""
    args = [f"{k}={v}" for k, v in targets.items()]
    out, status = run_probe(spawner, Jail("none"), "attack", *WITHOUT_SECCOMP, *args)
    assert status.code == 0, status.describe()
    assert_attacks_failed(out, seccomp=False)


@pytest.mark.skipif(not ROOT, reason="distinct host uids need root")
def test_each_sandbox_has_its_own_host_uid(spawner: Spawner) -> None:
    jails = [Jail("renderer") for _ in range(3)]
    sbs = [spawner.spawn(j, entry="fos_host.probe:main", args=("idle",)) for j in jails]
    try:
        uids = {sb.host_uid for sb in sbs}
        assert len(uids) == 3
        for sb in sbs:
            with open(f"/proc/{sb.pid}/status") as f:
                line = next(ln for ln in f if ln.startswith("Uid:"))
            assert int(line.split()[1]) == sb.host_uid
    finally:
        for sb in sbs:
            sb.close()


@needs_limits
def test_oom_is_reported_as_the_exit_reason(spawner: Spawner) -> None:
    _, status = run_probe(spawner, Jail("renderer").memory("32M"), "alloc", "200")
    assert status.oom_kills >= 1
    assert status.describe() == "out of memory at the 32 MiB limit"


@needs_limits
def test_allocation_below_the_limit_succeeds(spawner: Spawner) -> None:
    out, status = run_probe(spawner, Jail("renderer").memory("64M"), "alloc", "16")
    assert status.code == 0 and out.strip() == "allocated"


@needs_limits
def test_forking_past_the_pids_limit_fails(spawner: Spawner) -> None:
    out, status = run_probe(spawner, Jail("renderer").pids(8), "fork", "20")
    assert status.code == 0, status.describe()
    assert 1 <= int(out) < 8


def test_a_host_holding_over_1023_fds_runs_and_waits_for_sandboxes(spawner: Spawner) -> None:
    """A host with a few hundred renderers holds more fds than select(2) can take (it raised
    "filedescriptor out of range in select()" when such a host closed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < HIGH_FD + 64:
        pytest.skip(f"RLIMIT_NOFILE's hard limit {hard} is below {HIGH_FD + 64}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, HIGH_FD + 64), hard))
    filler: list[int] = []
    try:
        while not filler or filler[-1] < HIGH_FD:  # the sandbox's fds come above these
            filler.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        pidfds: list[int] = []
        out, status = run_probe(
            spawner, Jail("renderer"), "alloc", "1", started=lambda sb: pidfds.append(sb.pidfd)
        )
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert pidfds[0] > HIGH_FD
    assert (status.code, out.strip()) == (0, "allocated"), status.describe()


def test_a_sandbox_holds_no_copy_of_the_launching_process_memory(spawner: Spawner) -> None:
    """An attack from inside: a renderer reads its own memory for a secret that this process
    held before the spawner started (SECRET, made at import). The zygote is exec'd afresh, so
    none of the launcher's memory (its heap, its environment, what it read) is copied into the
    sandboxes; a zygote forked from this process carried it into every one."""
    digest = hashlib.sha256(SECRET).hexdigest()
    out, status = run_probe(
        spawner, Jail("renderer"), "find-in-memory", SECRET_PREFIX.decode(), str(len(SECRET)),
        digest,
    )  # fmt: skip
    assert status.code == 0, status.describe()
    assert out.strip() == "0"


def test_seccomp_kill_names_the_syscall(spawner: Spawner) -> None:
    jail = Jail("renderer")
    r, w = os.pipe()
    try:
        code = "import socket; socket.socket(socket.AF_INET)"
        with spawner.spawn(jail, argv=[sys.executable, "-c", code]) as sb:
            status = sb.wait(timeout=60)
    finally:
        os.close(r)
        os.close(w)
    assert status.signal == 31
    # the name comes from the kernel's audit log, which is root-only and rate-limited
    assert status.seccomp_syscall in (None, "socket")
    if status.seccomp_syscall:
        assert status.describe() == "killed by seccomp on syscall socket"


def test_kill_ends_the_whole_sandbox(spawner: Spawner) -> None:
    r, w = os.pipe()
    try:  # a probe with three children that stay until killed; "!" once they all exist
        jail = Jail("renderer").pass_fd(w, 1)
        sb = spawner.spawn(jail, entry="fos_host.probe:main", args=("family", "3"))
        os.close(w)
        w = -1
        with sb:
            assert os.read(r, 1) == b"!"
            cg = sb.cgroup  # None only rootless without a delegated cgroup
            members = cg.pids() if cg is not None else None
            sb.kill()
            status = sb.wait(timeout=10)
            left = cg.pids() if cg is not None else None
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert status.signal == 9
    if members is not None:
        assert len(members) == 4 and left == []  # the probe and its three children, gone
