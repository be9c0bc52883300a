"""fos_host.kernel.cgroup against the real cgroups of this machine (no mocks).

Every cgroup made here is below this process's own cgroup in each hierarchy, named fos…,
and removed by the fixtures; `no_leftovers` checks after every test that none remains.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import struct
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from limits import needs_limits

from fos_host.errors import ConfigError, FosError
from fos_host.kernel import cgroup, proc
from fos_host.kernel.cgroup import (
    V2_KEY,
    CgroupSystem,
    HostCgroups,
    Layout,
    Limits,
    cpu_shares,
    detect,
    home_path,
    host_dir_name,
    join,
)

MiB = 1 << 20

pytestmark = needs_limits
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="changes its uid: needs root")


# ---- helpers and fixtures ----------------------------------------------------------------


def _alive(pid: int, start: int | None = None) -> bool:
    fields = proc.stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return False
    return start is None or int(fields[19]) == start


def _fos_dirs(system: CgroupSystem) -> set[Path]:
    out = set()
    for own in system.hierarchies().values():
        for entry in os.scandir(own):
            if entry.name.startswith("fos") and entry.is_dir(follow_symlinks=False):
                out.add(Path(entry.path))
    return out


def _belongs_to_other_live_process(d: Path) -> bool:
    """fos… dirs of other live processes (concurrent hosts) are theirs, not our leftovers."""
    m = re.match(r"fos\.(\d+)\.(\d+)$", d.name)
    if m:
        pid, start = int(m.group(1)), int(m.group(2))
        return pid != os.getpid() and _alive(pid, start)
    m = re.match(r"fos\D+(\d+)", d.name)
    if m is None:
        return False
    return int(m.group(1)) != os.getpid() and _alive(int(m.group(1)))


@pytest.fixture(scope="module")
def system() -> CgroupSystem:
    return detect()


@pytest.fixture(autouse=True)
def no_leftovers(system: CgroupSystem) -> Iterator[None]:
    before = _fos_dirs(system)
    yield
    left = {d for d in _fos_dirs(system) - before if not _belongs_to_other_live_process(d)}
    assert not left, f"cgroups left behind: {sorted(map(str, left))}"


@pytest.fixture
def host(system: CgroupSystem) -> Iterator[HostCgroups]:
    h = system.open_host()
    try:
        yield h
    finally:
        h.close()


class Children:
    """Forked test processes; whatever is still unreaped at the end is killed and reaped."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def spawn(self, cg: cgroup.Cgroup | None, body: Callable[[], int]) -> int:
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                if cg is not None:
                    join(cg.procs_files())
                code = body()
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.pids.append(pid)
        return pid

    def wait(self, pid: int, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            got, status = os.waitpid(pid, os.WNOHANG)
            if got == pid:
                self.pids.remove(pid)
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"child {pid} did not exit in {timeout} s")
            time.sleep(0.005)

    def cleanup(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.pids.clear()


@pytest.fixture
def children() -> Iterator[Children]:
    c = Children()
    try:
        yield c
    finally:
        c.cleanup()


def _sleeper(seconds: float = 60) -> Callable[[], int]:
    def body() -> int:
        time.sleep(seconds)
        return 0

    return body


def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def _v1_only(system: CgroupSystem) -> None:
    if system.layout is Layout.V2:
        pytest.skip("cgroup v1 files")


def _read(path: Path) -> str:
    return path.read_text().strip()


# ---- detection ---------------------------------------------------------------------------


def _mounted(point: str, fstype: str) -> bool:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if left.split()[4] == point and right.split()[0] == fstype:
            return True
    return False


def test_detect_this_machine_is_hybrid(system: CgroupSystem) -> None:
    if not (
        _mounted("/sys/fs/cgroup/unified", "cgroup2")
        and _mounted("/sys/fs/cgroup/memory", "cgroup")
    ):
        pytest.skip("not a hybrid machine like the dev/CI VM")
    assert system.layout is Layout.HYBRID
    assert system.v2_mount == Path("/sys/fs/cgroup/unified")
    for ctrl in ("memory", "pids", "cpu", "freezer"):
        assert system.v1_mounts[ctrl] == Path(f"/sys/fs/cgroup/{ctrl}")
    proc_cgroup = Path("/proc/self/cgroup").read_text()
    memory_path = re.search(r"^\d+:memory:(.*)$", proc_cgroup, re.M)
    assert memory_path is not None
    assert system.own["memory"] == memory_path.group(1)
    v2_path = re.search(r"^0::(.*)$", proc_cgroup, re.M)
    assert v2_path is not None
    assert system.own[V2_KEY] == home_path(v2_path.group(1))
    hierarchies = system.hierarchies()
    assert set(hierarchies) == {V2_KEY, "memory", "pids", "cpu"}
    assert hierarchies["memory"] == Path("/sys/fs/cgroup/memory") / memory_path.group(1)[1:]
    name = host_dir_name()
    assert re.fullmatch(rf"fos\.{os.getpid()}\.\d+", name)


def test_open_host_creates_dir_in_every_hierarchy(system: CgroupSystem) -> None:
    with system.open_host() as h:
        assert set(h.dirs) == set(system.hierarchies())
        for key, d in h.dirs.items():
            assert d == system.hierarchies()[key] / host_dir_name()
            assert d.is_dir()
        assert {"memory", "pids", "cpu"} <= h.controllers
        with pytest.raises(FosError, match="already has open host cgroups"):
            system.open_host()
    assert not any(d.exists() for d in h.dirs.values())
    h.close()  # idempotent


# ---- limits ------------------------------------------------------------------------------


def test_limits_read_back_v1(system: CgroupSystem, host: HostCgroups) -> None:
    _v1_only(system)
    cg = host.create(
        "sb-1", Limits(memory_max=32 * MiB, memory_high=16 * MiB, pids_max=10, cpu_weight=100)
    )
    mem = cg.dirs["memory"]
    assert int(_read(mem / "memory.limit_in_bytes")) == 32 * MiB
    assert int(_read(mem / "memory.memsw.limit_in_bytes")) == 32 * MiB
    assert int(_read(mem / "memory.soft_limit_in_bytes")) == 16 * MiB
    assert _read(cg.dirs["pids"] / "pids.max") == "10"
    assert int(_read(cg.dirs["cpu"] / "cpu.shares")) == cpu_shares(100) == 2597
    st = cg.stats()
    assert st.memory_max == 32 * MiB
    assert st.pids_current == 0
    assert st.oom_kills == 0
    assert st.frozen is False

    # Raising and lowering keep memsw >= limit at every step (else the kernel says EINVAL).
    cg.set_limits(Limits(memory_max=64 * MiB))
    assert int(_read(mem / "memory.limit_in_bytes")) == 64 * MiB
    assert int(_read(mem / "memory.memsw.limit_in_bytes")) == 64 * MiB
    cg.set_limits(Limits(memory_max=8 * MiB))
    assert int(_read(mem / "memory.limit_in_bytes")) == 8 * MiB
    assert int(_read(mem / "memory.memsw.limit_in_bytes")) == 8 * MiB
    # None leaves a value alone.
    cg.set_limits(Limits(cpu_weight=10000))
    assert int(_read(mem / "memory.limit_in_bytes")) == 8 * MiB
    assert int(_read(cg.dirs["cpu"] / "cpu.shares")) == 262144


def test_limits_read_back_v2(system: CgroupSystem, host: HostCgroups) -> None:
    if system.layout is not Layout.V2:
        pytest.skip("pure cgroup v2 only")
    cg = host.create(
        "sb-1", Limits(memory_max=32 * MiB, memory_high=16 * MiB, pids_max=10, cpu_weight=100)
    )
    d = cg.dirs[V2_KEY]
    assert int(_read(d / "memory.max")) == 32 * MiB
    assert int(_read(d / "memory.high")) == 16 * MiB
    assert _read(d / "pids.max") == "10"
    assert _read(d / "cpu.weight") == "100"


def test_unlimited_cgroup_stats(host: HostCgroups) -> None:
    st = host.create("sb-free").stats()
    assert st.memory_max is None
    assert st.oom_kills == 0


# ---- processes ---------------------------------------------------------------------------


def test_child_joins_and_appears_in_pids(host: HostCgroups, children: Children) -> None:
    cg = host.create("sb-1", Limits(memory_max=64 * MiB))
    pid = children.spawn(cg, _sleeper())
    _until(lambda: pid in cg.pids())
    assert cg.pids() == [pid]
    for procs in cg.procs_files():
        assert str(pid) in Path(procs).read_text().split()
    own_cgroups = Path(f"/proc/{pid}/cgroup").read_text()
    assert f"/{host.name}/sb-1\n" in own_cgroups
    assert cg.stats().pids_current == 1


def test_add_moves_a_process(host: HostCgroups, children: Children) -> None:
    cg = host.create("sb-1")
    pid = children.spawn(None, _sleeper())
    cg.add(pid)
    assert cg.pids() == [pid]


def test_join_error_is_a_step_error(tmp_path: Path) -> None:
    from fos_host.errors import StepError

    with pytest.raises(StepError, match="join cgroup: ENOENT") as info:
        join([str(tmp_path / "gone" / "cgroup.procs")])
    assert "gone" in str(info.value)


def _allocate_forever() -> int:
    chunks = []
    for _ in range(1024):  # 1 GiB at most: far past the limit
        chunks.append(bytearray(b"\x01") * MiB)  # written, so every page is touched
    return 0


def test_oom_kill(host: HostCgroups, children: Children) -> None:
    cg = host.create("sb-oom", Limits(memory_max=32 * MiB))
    pid = children.spawn(cg, _allocate_forever)
    status = children.wait(pid, timeout=30)
    assert os.WIFSIGNALED(status), f"status {status:#x}: not killed"
    assert os.WTERMSIG(status) == signal.SIGKILL
    assert cg.oom_killed()
    st = cg.stats()
    assert st.oom_kills >= 1
    assert st.memory_peak is None or st.memory_peak <= 32 * MiB


def test_no_oom_below_limit(host: HostCgroups, children: Children) -> None:
    cg = host.create("sb-ok", Limits(memory_max=64 * MiB))

    def body() -> int:
        block = bytearray(b"\x01") * (8 * MiB)
        return 0 if block[-1] == 1 else 1

    assert children.wait(children.spawn(cg, body)) == 0
    assert not cg.oom_killed()


def test_pids_limit(host: HostCgroups, children: Children) -> None:
    cg = host.create("sb-pids", Limits(pids_max=4))

    def body() -> int:
        kids: list[int] = []
        result = 100
        try:
            for _ in range(10):
                kid = os.fork()
                if kid == 0:
                    time.sleep(60)
                    os._exit(0)
                kids.append(kid)
        except BlockingIOError:
            result = len(kids)
        finally:
            for kid in kids:
                os.kill(kid, signal.SIGKILL)
                os.waitpid(kid, 0)
        return result

    status = children.wait(children.spawn(cg, body))
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == 3  # itself + 3 children = 4; the 4th fork got EAGAIN


def _drain(fd: int) -> bytes:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def test_freeze_and_thaw(host: HostCgroups, children: Children) -> None:
    cg = host.create("sb-freeze")
    r, w = os.pipe()

    def counter() -> int:
        os.close(r)
        i = 0
        while True:
            os.write(w, struct.pack("=Q", i))
            i += 1
            time.sleep(0.001)

    children.spawn(cg, counter)
    os.close(w)
    try:
        os.set_blocking(r, False)
        assert select.select([r], [], [], 5)[0], "the counter never started"
        t0 = time.perf_counter()
        cg.freeze()
        latency = time.perf_counter() - t0
        assert cg.stats().frozen is True
        before = _drain(r)
        time.sleep(0.3)
        assert _drain(r) == b"", "the counter advanced while frozen"
        cg.thaw()
        assert cg.stats().frozen is False
        assert select.select([r], [], [], 5)[0], "the counter did not resume"
        time.sleep(0.02)
        after = _drain(r)
        last = struct.unpack("=Q", (before + after)[-8:])[0]
        assert last > struct.unpack("=Q", before[-8:])[0]
        print(f"freeze latency {latency * 1000:.2f} ms")
    finally:
        os.close(r)


def test_freeze_empty_cgroup_and_timeout_is_fos_error(host: HostCgroups) -> None:
    cg = host.create("sb-empty")
    cg.freeze(timeout=1)
    assert cg.stats().frozen is True
    cg.thaw()
    assert cg.stats().frozen is False


def _family(n: int) -> Callable[[], int]:
    """A process that forks n-1 sleeping children and sleeps too."""

    def body() -> int:
        for _ in range(n - 1):
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
        time.sleep(60)
        return 0

    return body


def test_kill_three_processes(host: HostCgroups, children: Children) -> None:
    cg = host.create("sb-kill")
    pid = children.spawn(cg, _family(3))
    _until(lambda: len(cg.pids()) == 3)
    members = cg.pids()
    cg.kill()
    assert cg.pids() == []
    status = children.wait(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    for member in members:
        _until(lambda m=member: not _alive(m))  # type: ignore[misc]
    cg.kill()  # nothing inside: a no-op


def test_kill_frozen_cgroup(host: HostCgroups, children: Children) -> None:
    cg = host.create("sb-kill-frozen")
    pid = children.spawn(cg, _family(2))
    _until(lambda: len(cg.pids()) == 2)
    cg.freeze()
    cg.kill()
    assert cg.pids() == []
    assert os.WTERMSIG(children.wait(pid)) == signal.SIGKILL


def test_pressure(system: CgroupSystem, host: HostCgroups) -> None:
    cg = host.create("sb-psi")
    path = cg.pressure_path()
    if system.layout is Layout.V1:
        assert path is None
        assert cg.pressure() is None
        return
    assert path == cg.dirs[V2_KEY] / "memory.pressure"
    psi = cg.pressure()
    assert psi is not None
    assert set(psi["some"]) == {"avg10", "avg60", "avg300", "total"}
    assert "full" in psi


# ---- removal -----------------------------------------------------------------------------


def test_remove_leaves_nothing(host: HostCgroups, children: Children) -> None:
    cg = host.create("sb-rm", Limits(memory_max=32 * MiB, pids_max=8))
    pid = children.spawn(cg, _family(2))
    _until(lambda: len(cg.pids()) == 2)
    cg.remove()
    assert not any(d.exists() for d in cg.dirs.values())
    assert os.WTERMSIG(children.wait(pid)) == signal.SIGKILL
    cg.remove()  # idempotent
    for d in host.dirs.values():
        assert not [e for e in os.scandir(d) if e.is_dir()], f"a cgroup is left in {d}"


def test_close_removes_everything_with_live_processes(
    system: CgroupSystem, children: Children
) -> None:
    h = system.open_host()
    try:
        a = h.create("sb-a", Limits(memory_max=64 * MiB))
        b = h.create("sb-b", Limits(pids_max=16))
        pa = children.spawn(a, _family(2))
        pb = children.spawn(b, _sleeper())
        _until(lambda: len(a.pids()) == 2 and len(b.pids()) == 1)
        # A nested cgroup made by someone below the host dir goes too.
        for d in b.dirs.values():
            (d / "nested").mkdir()
        removed = h.close()
    finally:
        h.close()
    assert not any(d.exists() for d in h.dirs.values())
    assert set(map(str, h.dirs.values())) <= set(removed)
    assert os.WTERMSIG(children.wait(pa)) == signal.SIGKILL
    assert os.WTERMSIG(children.wait(pb)) == signal.SIGKILL
    with pytest.raises(FosError, match="closed"):
        h.create("sb-c")


# ---- creation errors leave nothing -------------------------------------------------------


def test_create_errors_leave_nothing(host: HostCgroups) -> None:
    for bad in ("", "a/b", "..", "cgroup.procs", "fos.1.2", "x" * 65):
        with pytest.raises(ConfigError, match="bad cgroup name"):
            host.create(bad)
    host.create("sb-1")
    with pytest.raises(FosError, match="exists already"):
        host.create("sb-1")
    assert all((d / "sb-1").is_dir() for d in host.dirs.values())
    # The kernel refuses this pids.max (above PID_MAX_LIMIT): the dirs made go again.
    with pytest.raises(FosError, match="pids"):
        host.create("sb-2", Limits(pids_max=2**31 - 1))
    assert not any((d / "sb-2").exists() for d in host.dirs.values())


def test_create_names_the_fix_when_a_controller_is_missing(host: HostCgroups) -> None:
    reason = "/sys/fs/cgroup/memory/x is not writable by uid 1000 (no delegated cgroup)"
    limited = HostCgroups(
        host.system,
        host.name,
        host.dirs,
        controllers={"pids", "cpu"},
        unavailable={"memory": reason},
    )
    with pytest.raises(ConfigError) as info:
        limited.create("sb-nomem", Limits(memory_max=32 * MiB))
    text = str(info.value)
    assert text.startswith(f"cannot set a memory limit: {reason}; run as root")
    assert "systemd-run --user --scope -p Delegate=yes" in text
    assert not any((d / "sb-nomem").exists() for d in host.dirs.values())
    limited.create("sb-pids-only", Limits(pids_max=5))  # what it can do still works


@as_root
def test_unprivileged_user_gets_config_error(system: CgroupSystem, children: Children) -> None:
    def body() -> int:
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)
        try:
            detect().open_host().close()
        except ConfigError as e:
            ok = "not writable by uid 65534" in str(e) and "Delegate=yes" in str(e)
            print(e)
            return 0 if ok else 2
        return 1

    assert children.wait(children.spawn(None, body)) == 0


# ---- stale host directories --------------------------------------------------------------


def _pidfd_exited(pid_fd: int, timeout: float) -> bool:
    return bool(select.select([pid_fd], [], [], timeout)[0])


def test_cleanup_stale_after_a_host_died(
    system: CgroupSystem, host: HostCgroups, children: Children
) -> None:
    mine = host.create("sb-live")
    live_pid = children.spawn(mine, _sleeper())
    _until(lambda: mine.pids() == [live_pid])
    r, w = os.pipe()

    def dying_host() -> int:
        os.close(r)
        h = detect().open_host()
        cg = h.create("sb-1", Limits(memory_max=32 * MiB))
        grandchild = os.fork()
        if grandchild == 0:
            join(cg.procs_files())
            time.sleep(60)
            os._exit(0)
        _until(lambda: cg.pids() == [grandchild])
        os.write(w, f"{h.name} {grandchild}".encode())
        return 0  # exits without closing: its cgroups are now stale

    host_pid = children.spawn(None, dying_host)
    os.close(w)
    try:
        assert children.wait(host_pid) == 0
        stale_name, g = os.read(r, 100).decode().split()
        grandchild = int(g)
    finally:
        os.close(r)
    stale_dirs = [own / stale_name for own in system.hierarchies().values()]
    pid_fd = os.pidfd_open(grandchild)
    try:
        assert all((d / "sb-1").is_dir() for d in stale_dirs)
        assert _alive(grandchild)
        removed = system.cleanup_stale()
        assert _pidfd_exited(pid_fd, 5), "the stale sandbox process survived"
        assert {str(d) for d in stale_dirs} | {str(d / "sb-1") for d in stale_dirs} <= set(removed)
        assert not any(d.exists() for d in stale_dirs)
        # The live host (this process) was not touched.
        assert all(d.is_dir() for d in host.dirs.values())
        assert mine.pids() == [live_pid]
    finally:
        os.close(pid_fd)
        system.cleanup_stale()


def test_cleanup_stale_by_name_only_touches_dead_hosts(
    system: CgroupSystem, children: Children
) -> None:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    pid1_start = Path("/proc/1/stat").read_text().rsplit(")", 1)[1].split()[19]
    dead = f"fos.{pid_max + 1}.{os.getpid()}"  # a pid above pid_max is never alive
    live = f"fos.1.{pid1_start}"  # pid 1 is alive with exactly this start time
    other = "fos.not-a-host"
    made: dict[str, dict[str, Path]] = {}
    try:
        for name in (dead, live, other):
            made[name] = {}
            for key, own in system.hierarchies().items():
                (own / name).mkdir()
                made[name][key] = own / name
        sandbox = {key: d / "sb-1" for key, d in made[dead].items()}
        for d in sandbox.values():
            d.mkdir()
        procs = sorted({str(d / "cgroup.procs") for d in sandbox.values()})

        def stale_sandbox() -> int:
            join(procs)
            time.sleep(60)
            return 0

        pid = children.spawn(None, stale_sandbox)
        _until(lambda: all(str(pid) in Path(f).read_text().split() for f in procs))

        removed = system.cleanup_stale()

        assert {str(d) for d in made[dead].values()} <= set(removed)
        assert not any(d.exists() for d in made[dead].values())
        assert all(d.is_dir() for d in made[live].values())
        assert all(d.is_dir() for d in made[other].values())
        assert not any(live in r or other in r for r in removed)
        assert os.WTERMSIG(children.wait(pid)) == signal.SIGKILL
    finally:
        for name, dirs in made.items():
            HostCgroups(system, name, dirs, (), {}).close()
