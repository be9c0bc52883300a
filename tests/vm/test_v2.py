"""Sandboxes on a pure cgroup v2 kernel: limits, events, freeze, kill, PSI and reclaim, for real.

Runs in the VM (make test-vm, tests/vm/harness.py: Debian's cloud kernel, cgroup2 only, every
controller enabled, zram swap), as root and as an unprivileged user in a delegated cgroup;
skips on any other layout.
"""

from __future__ import annotations

import errno
import json
import os
import select
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from limits import needs_limits

from fos_host.errors import ConfigError
from fos_host.kernel import proc
from fos_host.kernel.cgroup import V2_KEY, Layout, Limits, V2Cgroup, detect
from fos_host.sandbox.jail import Jail
from fos_host.sandbox.sandbox import Spawner

MiB = 1 << 20


def _layout() -> Layout | None:
    try:
        return detect().layout
    except ConfigError:
        return None


LAYOUT = _layout()
pytestmark = [
    pytest.mark.skipif(
        LAYOUT is not Layout.V2,
        reason=f"needs a pure cgroup v2 hierarchy, this machine's is "
        f"{LAYOUT.value if LAYOUT else 'none'}: run it in the VM (make test-vm)",
    ),
    needs_limits,
]
PSI = Path("/proc/pressure/memory").exists()
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="moves other processes: needs root")


@pytest.fixture(scope="module")
def spawner() -> Iterator[Spawner]:
    with Spawner(zygote=True) as sp:
        yield sp


class Probe:
    """fos_host.probe in a sandbox, with a pipe to its stdin and one from its stdout.
    Leaving it kills the sandbox and checks that its cgroup is gone."""

    def __init__(self, sp: Spawner, jail: Jail, *args: str) -> None:
        in_r, self.stdin = os.pipe()
        self.stdout, out_w = os.pipe()
        self.out = b""
        try:
            jail.pass_fd(in_r, 0).pass_fd(out_w, 1)
            self.sb = sp.spawn(jail, entry="fos_host.probe:main", args=args)
        except BaseException:
            os.close(self.stdin)
            os.close(self.stdout)
            raise
        finally:
            os.close(in_r)
            os.close(out_w)
        cg = self.sb.cgroup
        if not isinstance(cg, V2Cgroup):
            self._close()
            raise AssertionError(f"the sandbox's cgroup is not a V2Cgroup: {cg!r}")
        self.cg = cg
        self.dir = cg.dir

    def _close(self) -> None:
        try:
            self.sb.close()
        finally:
            os.close(self.stdin)
            os.close(self.stdout)

    def __enter__(self) -> Probe:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._close()
        assert not self.dir.exists(), f"{self.dir} left behind"

    def read_until(self, marker: bytes, timeout: float = 30) -> None:
        """Read stdout until `marker` has come (b"" reads to the end)."""
        deadline = time.monotonic() + timeout
        while not marker or marker not in self.out:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.stdout], [], [], left)[0]:
                raise AssertionError(f"no {marker!r} from the probe in {timeout} s: {self.out!r}")
            chunk = os.read(self.stdout, 1 << 16)
            if not chunk:
                assert not marker, f"the probe ended before {marker!r}: {self.out!r}"
                return
            self.out += chunk

    def send(self, line: str) -> None:
        os.write(self.stdin, line.encode() + b"\n")

    def read(self, name: str) -> str:
        return (self.dir / name).read_text().strip()

    def keyed(self, name: str) -> dict[str, int]:
        """A "key value" file of the sandbox's cgroup (memory.events, memory.stat, …)."""
        return {k: int(v) for k, v in (line.split() for line in self.read(name).splitlines())}

    def squeeze(self, above: int) -> int:
        """Lower memory.high to `above` bytes over what the idle probe uses now."""
        high = int(self.read("memory.current")) + above
        self.cg.set_limits(Limits(memory_high=high))
        assert int(self.read("memory.high")) == high
        return high


def test_memory_max_ends_in_an_oom_kill(spawner: Spawner) -> None:
    with Probe(spawner, Jail("renderer").memory("32M"), "alloc", "200") as p:
        assert int(p.read("memory.max")) == 32 * MiB
        if (p.dir / "memory.swap.max").exists():  # swap must not extend the limit
            assert p.read("memory.swap.max") == "0"
        p.read_until(b"")
        status = p.sb.wait(timeout=60)
        events = p.keyed("memory.events")
        assert p.cg.stats().oom_kills == events["oom_kill"]
    assert events["oom_kill"] >= 1, events
    assert events["max"] >= 1, events
    assert status.signal == 9 and status.oom_kills >= 1
    assert status.describe() == "out of memory at the 32 MiB limit"
    assert b"allocated" not in p.out


def test_memory_high_throttles_and_counts_instead_of_killing(spawner: Spawner) -> None:
    jail = Jail("renderer").memory("256M").memory_high("64M")
    with Probe(spawner, jail, "grow") as p:
        p.read_until(b"!")
        assert int(p.read("memory.high")) == 64 * MiB  # the jail's value, set by the launcher
        assert p.keyed("memory.events")["high"] == 0
        high = p.squeeze(4 * MiB)
        p.send("5")  # 1 MiB past memory.high: no swap for it (swap.max 0), so it is throttled
        p.read_until(b"+", timeout=60)
        events = p.keyed("memory.events")
        pressure = p.cg.pressure()
        assert p.sb.poll() is None, "the probe ended: memory.high must not kill"
    assert events["high"] > 0, (high, events)
    assert events["oom_kill"] == 0 and events["max"] == 0, events
    if pressure is None and not PSI:
        pytest.skip("memory.high works; PSI is off (boot with psi=1): memory.pressure unchecked")
    assert pressure is not None and pressure["some"]["total"] > 0, pressure


def test_pids_max_and_cpu_weight_in_the_v2_files(spawner: Spawner) -> None:
    with Probe(spawner, Jail("renderer").pids(8).cpu_weight(50), "fork", "20") as p:
        assert p.read("pids.max") == "8"
        assert p.read("cpu.weight") == "50"
        p.read_until(b"")
        status = p.sb.wait(timeout=60)
        pids_events = p.keyed("pids.events")
    assert status.code == 0, status.describe()
    assert 1 <= int(p.out) < 8, p.out
    assert pids_events["max"] >= 1, pids_events


def _wchan(pid: int) -> str:
    """Where the process sleeps in the kernel: "0" while it is on a run queue (waited out for
    up to 2 s) or when the kernel does not say."""
    deadline = time.monotonic() + 2
    while (where := Path(f"/proc/{pid}/wchan").read_text().strip()) == "0":
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return where


FREEZER_TRAP = {"do_freezer_trap", "get_signal"}  # get_signal when the trap is inlined


def test_freeze_and_thaw_a_running_sandbox(spawner: Spawner) -> None:
    with Probe(spawner, Jail("renderer"), "idle") as p:
        p.read_until(b"!")
        assert p.keyed("cgroup.events")["frozen"] == 0
        p.cg.freeze()
        assert p.keyed("cgroup.events")["frozen"] == 1
        assert p.cg.stats().frozen is True
        frozen_at = _wchan(p.sb.pid)
        state = proc.stat_fields(p.sb.pid)  # v2 parks it in a signal trap: "S", never "T"
        assert state is not None and state[0] == "S", state
        p.cg.thaw()
        assert p.keyed("cgroup.events")["frozen"] == 0
        assert p.cg.stats().frozen is False
        deadline = time.monotonic() + 5
        while (thawed_at := _wchan(p.sb.pid)) in FREEZER_TRAP and time.monotonic() < deadline:
            time.sleep(0.01)
        assert p.sb.poll() is None, "thawed, the probe must still run"
    if frozen_at != "0":
        assert frozen_at in FREEZER_TRAP, frozen_at
        assert thawed_at not in FREEZER_TRAP, thawed_at


def test_cgroup_kill_ends_the_whole_sandbox(spawner: Spawner) -> None:
    with Probe(spawner, Jail("renderer"), "family", "3") as p:
        p.read_until(b"!")
        members = p.cg.pids()
        assert len(members) == 4 and p.sb.pid in members, members
        pidfds = [os.pidfd_open(pid) for pid in members]
        try:
            p.sb.kill()
            status = p.sb.wait(timeout=10)
            assert p.cg.pids() == []
            assert p.keyed("cgroup.events")["populated"] == 0
            for pid, fd in zip(members, pidfds, strict=True):
                assert select.select([fd], [], [], 5)[0], f"pid {pid} survived cgroup.kill"
        finally:
            for fd in pidfds:
                os.close(fd)
    assert status.signal == 9, status


def test_psi_trigger_fires_under_memory_high(spawner: Spawner) -> None:
    if not PSI:
        pytest.skip("PSI is off in this kernel (boot with psi=1)")
    jail = Jail("renderer").memory("256M")
    with Probe(spawner, jail, "grow") as p:
        p.read_until(b"!")
        fd = os.open(p.dir / "memory.pressure", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            # 150 ms of stall in a 2 s window; the kernel drops the last byte written.
            os.write(fd, b"some 150000 2000000\0")
            poller = select.poll()
            poller.register(fd, select.POLLPRI)
            assert poller.poll(0) == [], "the trigger fired before any squeeze"
            p.squeeze(4 * MiB)
            p.send("16")  # 12 MiB past memory.high: throttled for good, never done
            ready = poller.poll(20_000)
        finally:
            os.close(fd)
        some = (p.cg.pressure() or {}).get("some")
    assert ready and ready[0][1] & select.POLLPRI, f"no PSI event in 20 s; some={some}"


def test_memory_reclaim_moves_anonymous_memory_to_swap(spawner: Spawner) -> None:
    if len(Path("/proc/swaps").read_text().strip().splitlines()) < 2:  # the header only
        pytest.skip(
            "memory.reclaim needs swap or zswap to move anonymous memory; none is set up in this VM"
        )
    with Probe(spawner, Jail("renderer"), "grow") as p:  # no memory.max: swap.max stays max
        p.read_until(b"!")
        p.send("32")
        p.read_until(b"+", timeout=60)
        before, stolen = int(p.read("memory.current")), p.keyed("memory.stat").get("pgsteal")
        try:
            (p.dir / "memory.reclaim").write_text("8M")  # one write(2), when the file closes
        except OSError as e:  # EAGAIN: less than asked for was reclaimed
            assert e.errno == errno.EAGAIN, e
        after, stolen_after = int(p.read("memory.current")), p.keyed("memory.stat").get("pgsteal")
        assert p.sb.poll() is None
    grew = stolen is not None and stolen_after is not None and stolen_after > stolen
    assert after < before or grew, (before, after, stolen, stolen_after)


# -- a host alone in its delegated cgroup moves into a leaf (HostCgroups, cgroup.Leaf) -------


def _v2_path() -> str:
    text = Path("/proc/self/cgroup").read_text()
    return next(line[3:] for line in text.splitlines() if line.startswith("0::"))


def _as_host_in(cgroup: Path, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run `body` in a forked child that first joins `cgroup`; its result comes back as JSON
    (or the error it raised, as {"error": text})."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            (cgroup / "cgroup.procs").write_text("0")
            try:
                out = body()
            except Exception as e:  # handed to the test as data
                out = {"error": f"{type(e).__name__}: {e}"}
            os.write(w, json.dumps(out).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the host child failed"
    return dict(json.loads(data))


def _dirs_in(cgroup: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(cgroup) if e.is_dir())


@pytest.fixture
def scratch() -> Iterator[Path]:
    """An empty cgroup below this process's own, with the limit controllers available."""
    own = detect().own_dir(V2_KEY)
    assert own is not None
    d = own / f"fos-scratch-{os.getpid()}"
    d.mkdir()
    try:
        yield d
    finally:
        deadline = time.monotonic() + 5
        while True:
            try:
                d.rmdir()
                break
            except OSError as e:  # EBUSY until the last child is reaped
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


@as_root
def test_a_host_alone_in_its_cgroup_moves_into_a_leaf_and_back(scratch: Path) -> None:
    def host() -> dict[str, Any]:
        before = _v2_path()
        h = detect().open_host()
        inside = _v2_path()
        cg = h.create("sb-leaf", Limits(memory_max=32 * MiB, pids_max=8))
        limits = [(cg.dirs[V2_KEY] / f).read_text().strip() for f in ("memory.max", "pids.max")]
        enabled = (scratch / "cgroup.subtree_control").read_text().split()
        h.close()
        return {
            "before": before,
            "inside": inside,
            "name": h.name,
            "limits": limits,
            "enabled": enabled,
            "after": _v2_path(),
            "restored": (scratch / "cgroup.subtree_control").read_text().split(),
            "left": _dirs_in(scratch),
        }

    out = _as_host_in(scratch, host)
    assert "error" not in out, out
    assert out["inside"] == f"{out['before']}/{out['name']}.host"
    assert out["limits"] == [str(32 * MiB), "8"]
    assert {"memory", "pids", "cpu"} <= set(out["enabled"])
    assert out["after"] == out["before"]
    assert out["restored"] == [] and out["left"] == []


@as_root
def test_a_host_that_shares_its_cgroup_names_the_pids_in_the_way(scratch: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (scratch / "cgroup.procs").write_text(str(sleeper.pid))

        def host() -> dict[str, Any]:
            before = _v2_path()
            with detect().open_host() as h:
                try:
                    h.create("sb-blocked", Limits(memory_max=32 * MiB))
                    refused = ""
                except ConfigError as e:
                    refused = str(e)
                return {"before": before, "during": _v2_path(), "refused": refused,
                        "leaf": h.leaf is not None}  # fmt: skip

        out = _as_host_in(scratch, host)
        assert (scratch / "cgroup.subtree_control").read_text().split() == []
        assert _dirs_in(scratch) == []
    finally:
        sleeper.kill()
        sleeper.wait()
    assert "error" not in out, out
    assert out["during"] == out["before"] and out["leaf"] is False  # it went back at once
    refused = str(out["refused"])
    assert f"pids {sleeper.pid}" in refused, refused
    assert "start fos-host alone in its delegated cgroup" in refused, refused
