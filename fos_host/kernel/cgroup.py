"""cgroups: one interface over cgroup v1, v2 and the hybrid of both.

`detect()` is the one place the layout is decided (from /proc/self/mountinfo and
/proc/self/cgroup). Its `CgroupSystem` opens a `HostCgroups`: the host's own directory
`fos.<pid>.<starttime>` below the process's current cgroup in every hierarchy used. Each
sandbox gets a `Cgroup` below that, from one of three backends:

- `V2Cgroup`: everything in the unified hierarchy (memory.max, pids.max, cpu.weight,
  cgroup.freeze/kill/events, memory.pressure).
- `V1Cgroup`: limits in the v1 memory, pids and cpu hierarchies, freezing with the v1 freezer.
- `HybridCgroup`: v1 limits plus cgroup2 (mounted without controllers) for freeze, kill,
  events and pressure.

The child half: the sandbox's launcher gets the handle as plain data (`spec()`,
`from_spec()`), `make()`s the directories with their limits — so the host does not pay for the
mkdirs — and `join()`s: it writes "0" to every `procs_files()` entry before it unshares its
cgroup namespace.

Sizes are binary: `parse_size("64M") == 64 * 2**20`, shown as "64 MiB" by `format_size`.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import errno
import logging
import os
import re
import select
import signal
import time
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cgroupspy.controllers import Controller, CpuController, MemoryController
from cgroupspy.nodes import Node

from fos_host.closing import Closing
from fos_host.errors import ConfigError, FosError, StepError
from fos_host.kernel import proc
from fos_host.paths import data_dir

log = logging.getLogger(__name__)

V2_KEY = ""
"""The key of the cgroup2 hierarchy in `CgroupSystem.own` (as /proc/self/cgroup spells it)."""

V1_CONTROLLERS = frozenset(
    {
        "blkio",
        "cpu",
        "cpuacct",
        "cpuset",
        "devices",
        "freezer",
        "hugetlb",
        "memory",
        "misc",
        "net_cls",
        "net_prio",
        "perf_event",
        "pids",
        "rdma",
    }
)
LIMIT_CONTROLLERS = ("memory", "pids", "cpu")
HOST_DIR_RE = re.compile(r"fos\.([0-9]+)\.([0-9]+)(\.host)?")
LEAF_SUFFIX = ".host"
"""`fos.<pid>.<start>.host`: the leaf a host moves itself into on cgroup v2 (`HostCgroups`)."""
SANDBOX_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

FREEZE_TIMEOUT = 5.0
REMOVE_TIMEOUT = 5.0
RMDIR_BUSY_GRACE = 2.0  # rmdir right after the last process died may give EBUSY briefly
V1_UNLIMITED = 2**62  # v1 shows "no limit" as 9223372036854771712; anything this big is none
DELEGATE_FIX = (
    "run as root or under a delegated cgroup (systemd-run --user --scope -p Delegate=yes)"
)


class Layout(enum.Enum):
    V1 = "v1"
    V2 = "v2"
    HYBRID = "hybrid"


# --------------------------------------------------------------------------------------
# values


@dataclass(frozen=True)
class Limits:
    """Limits of one sandbox cgroup. None leaves the value as it is (unlimited when new).

    cpu_weight is v2's 1..10000 (100 = default); v1 maps it to cpu.shares.
    """

    memory_max: int | None = None
    memory_high: int | None = None
    pids_max: int | None = None
    cpu_weight: int | None = None

    def __post_init__(self) -> None:
        for key, low, high in (
            ("memory_max", 1, 2**63 - 1),
            ("memory_high", 1, 2**63 - 1),
            ("pids_max", 1, 2**31 - 1),
            ("cpu_weight", 1, 10000),
        ):
            value = getattr(self, key)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{key} must be an integer, not {value!r}")
            if not low <= value <= high:
                raise ConfigError(f"{key} must be in {low}..{high}, not {value}")


@dataclass(frozen=True)
class MemoryUse:
    """What a cgroup's memory holds, for judging how much room is left under its limit.

    `current` counts page cache, much of which the kernel can drop; `inactive_file` is the part
    it drops first. `working_set` (current - inactive_file, as cAdvisor and kubelet count it)
    is what the cgroup needs to keep running. `limit` is the lower of memory.high and
    memory.max (v1: memory.limit_in_bytes; its soft limit throttles nothing): where the kernel
    starts to reclaim and throttle. None: unlimited.
    """

    current: int
    inactive_file: int
    limit: int | None

    @property
    def working_set(self) -> int:
        return max(0, self.current - self.inactive_file)

    @property
    def available_share(self) -> float | None:
        """The share of `limit` the working set leaves free (0..1); None without a limit."""
        if self.limit is None:
            return None
        return min(1.0, max(0.0, (self.limit - self.working_set) / self.limit))


@dataclass(frozen=True)
class Stats:
    memory_current: int | None
    memory_peak: int | None
    memory_max: int | None
    oom_kills: int
    pids_current: int | None
    frozen: bool | None


def cpu_shares(weight: int) -> int:
    """v1 cpu.shares for a v2 cpu.weight (1 → 2, 10000 → 262144)."""
    return 2 + (weight - 1) * 262142 // 9999


# --------------------------------------------------------------------------------------
# sizes

_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(?:([kmgtp])(?:i?b)?|b)?\s*", re.IGNORECASE)
_SIZE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def parse_size(text: str) -> int:
    """ "64M", "1G", "512K", "1.5GiB", "1048576" → bytes (K/M/G/T/P are powers of 1024)."""
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise ConfigError(
            f"bad size {text!r}: expected a number of bytes or one with K, M, G or T (e.g. 64M)"
        )
    number, unit = m.group(1), (m.group(2) or "").lower()
    factor = 1024 ** ("kmgtp".index(unit) + 1) if unit else 1
    if "." in number:
        if not unit:
            raise ConfigError(f"bad size {text!r}: a fraction of a byte")
        int_part, frac = number.split(".")
        value = int(int_part) * factor + int(frac) * factor // 10 ** len(frac)
    else:
        value = int(number) * factor
    if value > 2**63 - 1:
        raise ConfigError(f"bad size {text!r}: too large")
    return value


def format_size(n: int) -> str:
    """67108864 → "64 MiB", 1610612736 → "1.5 GiB", 100 → "100 B"."""
    if n < 0:
        raise ValueError(f"negative size {n}")
    for power in range(len(_SIZE_UNITS) - 1, 0, -1):
        factor = 1024**power
        if n >= factor:
            if n % factor == 0:
                return f"{n // factor} {_SIZE_UNITS[power]}"
            shown = f"{n / factor:.2f}".rstrip("0").rstrip(".")
            return f"{shown} {_SIZE_UNITS[power]}"
    return f"{n} B"


# --------------------------------------------------------------------------------------
# tier profiles


@dataclass(frozen=True)
class TierProfile:
    """How a tab of one tier is treated: CPU weight, memory.high as a share of its limit,
    and the priority of the host's work for it (one of PRIORITIES; host/scheduler.py)."""

    name: str
    cpu_weight: int
    memory_high_ratio: float
    freeze: bool
    priority: str = "background"

    def limits(self, memory_max: int | None) -> Limits:
        """The limits this tier sets for a tab whose memory limit is `memory_max`.

        memory_max itself is not part of a tier (it stays what the tab was given).
        """
        high = None
        if memory_max is not None:
            high = max(1, int(memory_max * self.memory_high_ratio))
        return Limits(memory_high=high, cpu_weight=self.cpu_weight)


_TIER_KEYS = ("cpu_weight", "memory_high_ratio", "freeze")
_TIER_OPTIONAL = ("priority",)
PRIORITIES = ("user-blocking", "user-visible", "background", "idle")
"""The scheduler's priorities (host/scheduler.py `Priority`), highest first."""
_TIER_NAME_RE = re.compile(r"[a-z][a-z0-9_-]*")


def _load_toml(p: Path, what: str) -> dict[str, Any]:
    try:
        with open(p, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read {what}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from e


def _share_value(p: Path, where: str, value: object) -> float:
    """A number in (0, 1] from a profile file; ConfigError names file and key otherwise."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= 1:
        raise ConfigError(f"{p}: {where}: must be a number in (0, 1], not {value!r}")
    return float(value)


def load_tiers(path: Path | str | None = None) -> dict[str, TierProfile]:
    """Parse the tier profiles (default: cgroups/tiers.toml); ConfigError names file and key."""
    p = Path(path) if path is not None else data_dir("cgroups") / "tiers.toml"
    data = _load_toml(p, "tier profiles")
    if not data:
        raise ConfigError(f"{p}: no tiers defined")
    tiers: dict[str, TierProfile] = {}
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{p}: {name}: expected a table [{name}], not a value")
        if not _TIER_NAME_RE.fullmatch(name):
            raise ConfigError(f"{p}: [{name}]: tier names are lowercase letters, digits, - and _")
        for key in table:
            if key not in _TIER_KEYS + _TIER_OPTIONAL:
                known = ", ".join(_TIER_KEYS + _TIER_OPTIONAL)
                raise ConfigError(f"{p}: [{name}] {key}: unknown key (known: {known})")
        for key in _TIER_KEYS:
            if key not in table:
                raise ConfigError(f"{p}: [{name}] {key}: missing")
        weight, ratio, freeze = table["cpu_weight"], table["memory_high_ratio"], table["freeze"]
        if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= 10000:
            raise ConfigError(
                f"{p}: [{name}] cpu_weight: must be an integer 1..10000, not {weight!r}"
            )
        ratio = _share_value(p, f"[{name}] memory_high_ratio", ratio)
        if not isinstance(freeze, bool):
            raise ConfigError(f"{p}: [{name}] freeze: must be true or false, not {freeze!r}")
        priority = table.get("priority", TierProfile.priority)
        if priority not in PRIORITIES:
            raise ConfigError(
                f"{p}: [{name}] priority: must be one of {', '.join(PRIORITIES)}, not {priority!r}"
            )
        tiers[name] = TierProfile(name, weight, float(ratio), freeze, priority)
    return tiers


# --------------------------------------------------------------------------------------
# the renderers' budget


@dataclass(frozen=True)
class Budget:
    """The memory budget of the renderers' parent (the host directory every sandbox's cgroup
    sits in), as shares of RAM so one file fits machines of any size (cgroups/budget.toml)."""

    memory_share: float  # memory.max (v1 memory.limit_in_bytes) as a share of MemTotal
    high_share: float  # memory.high (v1 memory.soft_limit_in_bytes) as a share of that

    def limits(self, mem_total: int) -> Limits:
        budget = max(1, int(mem_total * self.memory_share))
        return Limits(memory_max=budget, memory_high=max(1, int(budget * self.high_share)))


_BUDGET_KEYS = ("memory_share", "high_share")


def load_budget(path: Path | str | None = None) -> Budget:
    """Parse the budget (default: cgroups/budget.toml, table [renderers]); ConfigError names
    file and key."""
    p = Path(path) if path is not None else data_dir("cgroups") / "budget.toml"
    data = _load_toml(p, "the budget")
    for key in data:
        if key != "renderers":
            raise ConfigError(f"{p}: [{key}]: unknown table (known: [renderers])")
    table = data.get("renderers")
    if not isinstance(table, dict):
        raise ConfigError(f"{p}: [renderers]: missing (the renderers' parent's budget)")
    for key in table:
        if key not in _BUDGET_KEYS:
            known = ", ".join(_BUDGET_KEYS)
            raise ConfigError(f"{p}: [renderers] {key}: unknown key (known: {known})")
    for key in _BUDGET_KEYS:
        if key not in table:
            raise ConfigError(f"{p}: [renderers] {key}: missing")
    return Budget(*(_share_value(p, f"[renderers] {key}", table[key]) for key in _BUDGET_KEYS))


# --------------------------------------------------------------------------------------
# small file helpers (plain I/O: cgroupspy knows neither v2 nor pids/freezer)


def _read(path: Path) -> str:
    with open(path, encoding="ascii") as f:
        return f.read()


def _write(path: Path, text: str) -> None:
    # One write(2) per value: cgroup files take one value per write.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read_keyed(path: Path) -> dict[str, str]:
    """ "key value" lines (cgroup.events, memory.events, memory.oom_control)."""
    out: dict[str, str] = {}
    for line in _read(path).splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = parts[1]
    return out


def _read_pids(procs: Path) -> list[int]:
    try:
        return [int(x) for x in _read(procs).split()]
    except FileNotFoundError:
        return []


def _int_or_none(path: Path) -> int | None:
    try:
        text = _read(path).strip()
    except FileNotFoundError:
        return None
    if text == "max":
        return None
    return int(text)


def parse_pressure(text: str) -> dict[str, dict[str, float]]:
    """A PSI file ("some avg10=0.00 avg60=… total=…" lines) → {"some": {"avg10": …}, …}."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if not kind:
            continue
        values: dict[str, float] = {}
        for item in rest.split():
            key, _, value = item.partition("=")
            values[key] = float(value)
        out[kind] = values
    return out


def _subtree(top: Path) -> list[Path]:
    """`top` and every cgroup below it, parents before children."""
    out = [top]
    for root, dirnames, _ in os.walk(top):
        out.extend(Path(root) / d for d in dirnames)
    return out


def _unique(paths: Iterable[Path]) -> list[Path]:
    return list(dict.fromkeys(paths))


def _host_alive(pid: int, starttime: int) -> bool:
    return proc.starttime(pid) == starttime


def host_dir_name() -> str:
    """`fos.<pid>.<starttime>` of this process: its host directory in every hierarchy."""
    pid = os.getpid()
    return f"fos.{pid}.{proc.starttime(pid)}"


def home_path(path: str) -> str:
    """A cgroup path of this process as if no host had moved it into a leaf: the leaf's parent
    when `path` ends in a `fos.<pid>.<start>.host` (this host's, or that of the host that
    forked this process, which shares it), else `path`."""
    head, _, last = path.rpartition("/")
    m = HOST_DIR_RE.fullmatch(last)
    if m is not None and m.group(3):
        return head or "/"
    return path


# --------------------------------------------------------------------------------------
# freezing, killing and removing subtrees (shared by all backends and the stale cleanup)


def _wait_events(dir_: Path, key: str, want: str, deadline: float) -> bool:
    """Wait until cgroup.events of `dir_` says `key want`; False on timeout.

    cgroup.events raises POLLPRI when it changes, but the kernel rate-limits that notification
    to one per 10 ms (a freeze right after a thaw was seen waiting ~10 ms for it), while the
    file's content is current at once: re-read on a short, growing poll timeout as well.
    """
    fd = os.open(dir_ / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        delay = 0.0005
        while True:
            text = os.pread(fd, 4096, 0).decode()
            for line in text.splitlines():
                k, _, v = line.partition(" ")
                if k == key and v.strip() == want:
                    return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(min(left, delay) * 1000)
            delay = min(delay * 2, 0.05)
    finally:
        os.close(fd)


def _v2_set_frozen(dir_: Path, frozen: bool, deadline: float) -> bool:
    _write(dir_ / "cgroup.freeze", "1" if frozen else "0")
    return _wait_events(dir_, "frozen", "1" if frozen else "0", deadline)


def _v1_set_frozen(dir_: Path, frozen: bool, deadline: float) -> bool:
    want = "FROZEN" if frozen else "THAWED"
    _write(dir_ / "freezer.state", want)
    delay = 0.0002
    while _read(dir_ / "freezer.state").strip() != want:
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
        if frozen:  # the kernel retries FREEZING on each write
            _write(dir_ / "freezer.state", want)
    return True


def _members(tops: Iterable[Path]) -> set[int]:
    pids: set[int] = set()
    for top in tops:
        for d in _subtree(top):
            pids.update(_read_pids(d / "cgroup.procs"))
    return pids


def _sigkill_members(tops: list[Path]) -> set[int]:
    """SIGKILL every process in the subtrees, never one that is not in them.

    A pid read from cgroup.procs may die and be reused before the signal: pin each with a
    pidfd first, re-read the members, and signal only pinned processes still listed.
    """
    fds: dict[int, int] = {}
    try:
        for pid in _members(tops):
            with contextlib.suppress(ProcessLookupError):
                fds[pid] = os.pidfd_open(pid)
        still = _members(tops)
        for pid, fd in fds.items():
            if pid in still:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
        return still
    finally:
        for fd in fds.values():
            os.close(fd)


def _kill_trees(label: str, dirs: Mapping[str, Path], deadline: float) -> None:
    """Kill every process in the subtrees `dirs` (hierarchy → top dir) and wait until empty.

    cgroup.kill where the unified hierarchy has it (kills the whole subtree, races with fork
    handled by the kernel); else freeze (v1 freezer or cgroup.freeze), SIGKILL each member,
    thaw; else SIGKILL members until none are left.
    """
    tops = {k: d for k, d in dirs.items() if d.is_dir()}
    all_tops = _unique(tops.values())
    if not _members(all_tops):
        return
    unified = tops.get(V2_KEY)
    freezer = tops.get("freezer")
    thaw: list[tuple[Path, str]] = []
    try:
        if unified is not None and (unified / "cgroup.kill").exists():
            _write(unified / "cgroup.kill", "1")
        elif freezer is not None:
            _v1_set_frozen(freezer, True, min(deadline, time.monotonic() + 1.0))
            # A sandbox frozen by itself stays frozen when the top thaws: thaw each one.
            thaw = [(d, "v1") for d in reversed(_subtree(freezer))]
        elif unified is not None and (unified / "cgroup.freeze").exists():
            _v2_set_frozen(unified, True, min(deadline, time.monotonic() + 1.0))
            thaw = [(d, "v2") for d in reversed(_subtree(unified))]
        delay = 0.001
        while True:
            still = _sigkill_members(all_tops)
            for d, kind in thaw:
                try:
                    if kind == "v1":
                        _write(d / "freezer.state", "THAWED")
                    else:
                        _write(d / "cgroup.freeze", "0")
                except FileNotFoundError:
                    pass
            thaw = []
            if not still:
                return
            if time.monotonic() >= deadline:
                raise FosError(
                    f"cgroup {label}: processes {sorted(still)} still alive after SIGKILL"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
    except OSError as e:
        raise FosError(f"cgroup {label}: cannot kill its processes: {e}") from e


def _rmdir_trees(label: str, tops: Iterable[Path], deadline: float) -> list[str]:
    deadline = max(deadline, time.monotonic() + RMDIR_BUSY_GRACE)
    removed: list[str] = []
    for top in _unique(tops):
        if not top.is_dir():
            continue
        for d in reversed(_subtree(top)):
            delay = 0.001
            while True:
                try:
                    os.rmdir(d)
                    removed.append(str(d))
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                        raise FosError(f"cgroup {label}: cannot remove {d}: {e.strerror}") from e
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)
    return removed


@contextlib.contextmanager
def _undone_on_failure(what: str) -> Iterator[list[Path]]:
    """Yields a list for the directories the block creates; they are removed again if the
    block fails."""
    created: list[Path] = []
    try:
        yield created
    except BaseException:
        for d in reversed(created):
            try:
                os.rmdir(d)
            except OSError:
                log.warning("cannot remove %s after a failed %s", d, what)
        raise


def _destroy(label: str, dirs: Mapping[str, Path], timeout: float) -> list[str]:
    """Kill everything in the subtrees, then rmdir them depth-first; returns removed dirs."""
    deadline = time.monotonic() + timeout
    _kill_trees(label, dirs, deadline)
    return _rmdir_trees(label, dirs.values(), deadline)


# --------------------------------------------------------------------------------------
# sandbox cgroups


class Cgroup(abc.ABC):
    """One sandbox's cgroup, in every hierarchy the layout uses."""

    def __init__(self, name: str, dirs: Mapping[str, Path]) -> None:
        self.name = name
        self.dirs: dict[str, Path] = dict(dirs)  # hierarchy key → this cgroup's directory

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {[str(d) for d in self._paths()]}>"

    def _paths(self) -> list[Path]:
        return _unique(self.dirs.values())

    def _label(self) -> str:
        return f"{self.name} ({', '.join(str(d) for d in self._paths())})"

    def make(self, limits: Limits) -> None:
        """Create the directories and set `limits`; nothing is left on failure."""
        with _undone_on_failure("create") as created:
            for d in self._paths():
                try:
                    os.mkdir(d, 0o755)
                except FileExistsError as e:
                    raise FosError(f"cgroup {self.name} exists already ({d})") from e
                except OSError as e:
                    raise FosError(f"cannot create cgroup {d}: {e.strerror}") from e
                created.append(d)
            self.set_limits(limits)

    def spec(self) -> dict[str, Any]:
        """Plain data to rebuild this handle in another process (`from_spec`)."""
        return {
            "backend": type(self).__name__,
            "name": self.name,
            "dirs": {k: str(d) for k, d in self.dirs.items()},
        }

    def procs_files(self) -> list[str]:
        """Every cgroup.procs the sandboxed process must join (see `join`)."""
        return [str(d / "cgroup.procs") for d in self._paths()]

    def add(self, pid: int) -> None:
        for procs in self.procs_files():
            try:
                _write(Path(procs), str(pid))
            except OSError as e:
                raise StepError("add to cgroup", e.errno or 0, f"pid {pid} to {procs}") from e

    def pids(self) -> list[int]:
        return sorted({pid for d in self._paths() for pid in _read_pids(d / "cgroup.procs")})

    @abc.abstractmethod
    def set_limits(self, limits: Limits) -> None: ...

    @abc.abstractmethod
    def freeze(self, *, timeout: float = FREEZE_TIMEOUT) -> None: ...

    @abc.abstractmethod
    def thaw(self, *, timeout: float = FREEZE_TIMEOUT) -> None: ...

    @abc.abstractmethod
    def stats(self) -> Stats: ...

    @abc.abstractmethod
    def pressure_path(self) -> Path | None: ...

    @abc.abstractmethod
    def memory_use(self) -> MemoryUse | None:
        """Usage, inactive page cache and limit; None without a memory controller."""

    def vmpressure_dir(self) -> Path | None:
        """The v1 memory directory with `memory.pressure_level` (kernel/psi.py
        `PressureLevelV1`), for where no PSI file exists; None on pure v2."""
        d = self.dirs.get("memory")
        return d if d is not None and (d / "memory.pressure_level").exists() else None

    def oom_killed(self) -> bool:
        return self.stats().oom_kills > 0

    def kill(self, *, timeout: float = REMOVE_TIMEOUT) -> None:
        """Kill every process inside and return when none is left (FosError on timeout)."""
        _kill_trees(self._label(), self.dirs, time.monotonic() + timeout)

    def pressure(self) -> dict[str, dict[str, float]] | None:
        path = self.pressure_path()
        if path is None:
            return None
        try:
            return parse_pressure(_read(path))
        except OSError as e:
            raise FosError(f"cgroup {self._label()}: cannot read {path}: {e.strerror}") from e

    def remove(self, *, timeout: float = REMOVE_TIMEOUT) -> None:
        """Kill what is inside, wait until empty, rmdir in every hierarchy. Idempotent."""
        _destroy(self._label(), self.dirs, timeout)

    def _freeze_failed(self, action: str, timeout: float) -> FosError:
        return FosError(f"cgroup {self._label()}: not {action} after {timeout:g} s")


class V2Cgroup(Cgroup):
    """Pure cgroup v2: every file in one directory."""

    def __init__(self, name: str, dir_: Path) -> None:
        super().__init__(name, {V2_KEY: dir_})
        self.dir = dir_

    def _set(self, file: str, value: str, what: str) -> None:
        path = self.dir / file
        try:
            _write(path, value)
        except FileNotFoundError as e:
            controller = file.split(".")[0]
            raise ConfigError(
                f"cannot set {what}: {path} does not exist (the {controller} controller is "
                f"not enabled for {self.dir.parent})"
            ) from e
        except OSError as e:
            raise FosError(f"cgroup {self.name}: cannot set {what} ({path}): {e.strerror}") from e

    def set_limits(self, limits: Limits) -> None:
        if limits.memory_max is not None:
            self._set("memory.max", str(limits.memory_max), "a memory limit")
            # Like v1's memsw = limit: swap must not extend the limit.
            if (self.dir / "memory.swap.max").exists():
                self._set("memory.swap.max", "0", "a swap limit")
        if limits.memory_high is not None:
            self._set("memory.high", str(limits.memory_high), "memory.high")
        if limits.pids_max is not None:
            self._set("pids.max", str(limits.pids_max), "a pids limit")
        if limits.cpu_weight is not None:
            self._set("cpu.weight", str(limits.cpu_weight), "a CPU weight")

    def freeze(self, *, timeout: float = FREEZE_TIMEOUT) -> None:
        if not _freeze_unified(self, self.dir, True, timeout):
            raise self._freeze_failed("frozen", timeout)

    def thaw(self, *, timeout: float = FREEZE_TIMEOUT) -> None:
        if not _freeze_unified(self, self.dir, False, timeout):
            raise self._freeze_failed("thawed", timeout)

    def stats(self) -> Stats:
        d = self.dir
        try:
            events = _read_keyed(d / "memory.events") if (d / "memory.events").exists() else {}
            return Stats(
                memory_current=_int_or_none(d / "memory.current"),
                memory_peak=_int_or_none(d / "memory.peak"),
                memory_max=_int_or_none(d / "memory.max"),
                oom_kills=int(events.get("oom_kill", 0)),
                pids_current=_int_or_none(d / "pids.current"),
                frozen=_read_keyed(d / "cgroup.events").get("frozen") == "1",
            )
        except OSError as e:
            raise FosError(f"cgroup {self._label()}: cannot read stats: {e}") from e

    def pressure_path(self) -> Path | None:
        path = self.dir / "memory.pressure"
        return path if path.exists() else None

    def memory_use(self) -> MemoryUse | None:
        return _memory_use(self, self.dir, "memory.current", ("memory.high", "memory.max"))


def _memory_use(cg: Cgroup, d: Path, usage: str, limits: tuple[str, ...]) -> MemoryUse | None:
    """memory.stat's inactive file pages ("total_inactive_file", counting descendants, on v1;
    "inactive_file" on v2, which always counts them) beside `usage` and the lowest of `limits`."""
    if not (d / usage).exists():
        return None
    try:
        stat = _read_keyed(d / "memory.stat")
        inactive = stat.get("total_inactive_file", stat.get("inactive_file", "0"))
        set_limits = [v for v in (_int_or_none(d / f) for f in limits) if v is not None]
        limit = min(set_limits, default=None)
        return MemoryUse(
            current=int(_read(d / usage)),
            inactive_file=int(inactive),
            limit=limit if limit is not None and limit < V1_UNLIMITED else None,
        )
    except OSError as e:
        raise FosError(f"cgroup {cg._label()}: cannot read memory use in {d}: {e}") from e


def _freeze_unified(cg: Cgroup, dir_: Path, frozen: bool, timeout: float) -> bool:
    if not (dir_ / "cgroup.freeze").exists():
        raise ConfigError(
            f"cannot freeze cgroup {cg.name}: {dir_}/cgroup.freeze is missing (kernel < 5.2)"
        )
    try:
        return _v2_set_frozen(dir_, frozen, time.monotonic() + timeout)
    except OSError as e:
        raise FosError(f"cgroup {cg._label()}: cannot write cgroup.freeze: {e.strerror}") from e


class V1Cgroup(Cgroup):
    """cgroup v1: memory, pids, cpu (and freezer) hierarchies, each its own directory.

    cgroupspy does the typed v1 files (memory limits and counters, cpu.shares, cgroup.procs);
    pids.* and freezer.state are untyped there and v2 is unknown to it: plain file I/O.
    """

    def __init__(self, name: str, dirs: Mapping[str, Path]) -> None:
        super().__init__(name, dirs)
        self._ctl: dict[str, Any] = {}
        for key, d in self.dirs.items():
            if key == V2_KEY:
                continue
            node = Node(os.fsencode(d))  # a bare node: cgroupspy never creates or walks here
            kind = {"memory": MemoryController, "cpu": CpuController}.get(key, Controller)
            self._ctl[key] = kind(node)

    def _fail(self, what: str, key: str, e: OSError) -> FosError:
        return FosError(f"cgroup {self.name}: cannot set {what} in {self.dirs[key]}: {e.strerror}")

    def _need(self, key: str, what: str) -> Any:
        ctl = self._ctl.get(key)
        if ctl is None:
            raise ConfigError(f"cannot set {what}: cgroup {self.name} has no {key} hierarchy")
        return ctl

    def set_limits(self, limits: Limits) -> None:
        if limits.memory_max is not None:
            self._set_memory_max(limits.memory_max)
        if limits.memory_high is not None:
            mem = self._need("memory", "memory.high")
            try:
                mem.soft_limit_in_bytes = limits.memory_high
            except OSError as e:
                raise self._fail("memory.soft_limit_in_bytes", "memory", e) from e
        if limits.pids_max is not None:
            self._need("pids", "a pids limit")
            try:
                _write(self.dirs["pids"] / "pids.max", str(limits.pids_max))
            except OSError as e:
                raise self._fail("pids.max", "pids", e) from e
        if limits.cpu_weight is not None:
            cpu = self._need("cpu", "a CPU weight")
            try:
                cpu.shares = cpu_shares(limits.cpu_weight)
            except OSError as e:
                raise self._fail("cpu.shares", "cpu", e) from e

    def _set_memory_max(self, value: int) -> None:
        mem = self._need("memory", "a memory limit")
        has_memsw = (self.dirs["memory"] / "memory.memsw.limit_in_bytes").exists()
        try:
            current = int(mem.limit_in_bytes or V1_UNLIMITED)
            # The kernel keeps memsw >= limit at every step: when raising, memsw goes first;
            # when lowering, the limit goes first.
            if has_memsw and value > current:
                mem.memsw_limit_in_bytes = value
                mem.limit_in_bytes = value
            else:
                mem.limit_in_bytes = value
                if has_memsw:
                    mem.memsw_limit_in_bytes = value
        except OSError as e:
            raise self._fail(f"a memory limit of {format_size(value)}", "memory", e) from e

    def add(self, pid: int) -> None:
        for key, d in self.dirs.items():
            try:
                if key in self._ctl:
                    self._ctl[key].procs = [pid]
                else:
                    _write(d / "cgroup.procs", str(pid))
            except OSError as e:
                raise StepError(
                    "add to cgroup", e.errno or 0, f"pid {pid} to {d}/cgroup.procs"
                ) from e

    def pids(self) -> list[int]:
        pids: set[int] = set()
        for key, d in self.dirs.items():
            if key in self._ctl:
                with contextlib.suppress(FileNotFoundError):
                    pids.update(int(p) for p in self._ctl[key].procs)
            else:
                pids.update(_read_pids(d / "cgroup.procs"))
        return sorted(pids)

    def freeze(self, *, timeout: float = FREEZE_TIMEOUT) -> None:
        self._freezer(True, timeout)

    def thaw(self, *, timeout: float = FREEZE_TIMEOUT) -> None:
        self._freezer(False, timeout)

    def _freezer(self, frozen: bool, timeout: float) -> None:
        d = self.dirs.get("freezer")
        if d is None:
            raise ConfigError(
                f"cannot freeze cgroup {self.name}: no writable freezer (neither a v1 freezer "
                "hierarchy nor cgroup2's cgroup.freeze)"
            )
        try:
            ok = _v1_set_frozen(d, frozen, time.monotonic() + timeout)
        except OSError as e:
            raise FosError(f"cgroup {self._label()}: cannot write freezer.state: {e}") from e
        if not ok:
            raise self._freeze_failed("frozen" if frozen else "thawed", timeout)

    def _frozen(self) -> bool | None:
        d = self.dirs.get("freezer")
        if d is None:
            return None
        return _read(d / "freezer.state").strip() == "FROZEN"

    def _oom_kills(self) -> int:
        mem = self._ctl.get("memory")
        if mem is None:
            return 0
        control = mem.oom_control
        return int(control.get("oom_kill", 0)) if isinstance(control, dict) else 0

    def stats(self) -> Stats:
        mem = self._ctl.get("memory")
        try:
            limit = None
            if mem is not None:
                limit = mem.limit_in_bytes
                if limit is not None and limit >= V1_UNLIMITED:
                    limit = None
            pids_dir = self.dirs.get("pids")
            return Stats(
                memory_current=int(mem.usage_in_bytes) if mem is not None else None,
                memory_peak=int(mem.max_usage_in_bytes) if mem is not None else None,
                memory_max=limit,
                oom_kills=self._oom_kills(),
                pids_current=_int_or_none(pids_dir / "pids.current") if pids_dir else None,
                frozen=self._frozen(),
            )
        except OSError as e:
            raise FosError(f"cgroup {self._label()}: cannot read stats: {e}") from e

    def oom_killed(self) -> bool:
        try:
            return self._oom_kills() > 0
        except OSError as e:
            raise FosError(f"cgroup {self._label()}: cannot read memory.oom_control: {e}") from e

    def pressure_path(self) -> Path | None:
        return None

    def memory_use(self) -> MemoryUse | None:
        d = self.dirs.get("memory")
        if d is None:
            return None
        return _memory_use(self, d, "memory.usage_in_bytes", ("memory.limit_in_bytes",))


class HybridCgroup(V1Cgroup):
    """v1 limits (memory, pids, cpu) + cgroup2 without controllers for freeze/kill/PSI."""

    def __init__(self, name: str, dirs: Mapping[str, Path]) -> None:
        super().__init__(name, dirs)
        self.unified = self.dirs[V2_KEY]

    def freeze(self, *, timeout: float = FREEZE_TIMEOUT) -> None:
        if not _freeze_unified(self, self.unified, True, timeout):
            raise self._freeze_failed("frozen", timeout)

    def thaw(self, *, timeout: float = FREEZE_TIMEOUT) -> None:
        if not _freeze_unified(self, self.unified, False, timeout):
            raise self._freeze_failed("thawed", timeout)

    def _frozen(self) -> bool | None:
        return _read_keyed(self.unified / "cgroup.events").get("frozen") == "1"

    def pressure_path(self) -> Path | None:
        path = self.unified / "memory.pressure"
        return path if path.exists() else None


def from_spec(spec: dict[str, Any]) -> Cgroup:
    """The handle that `Cgroup.spec()` describes."""
    name, dirs = spec["name"], {k: Path(d) for k, d in spec["dirs"].items()}
    match spec["backend"]:
        case "V2Cgroup":
            return V2Cgroup(name, dirs[V2_KEY])
        case "HybridCgroup":
            return HybridCgroup(name, dirs)
        case "V1Cgroup":
            return V1Cgroup(name, dirs)
    raise FosError(f"unknown cgroup backend {spec['backend']!r}")


def join(procs_files: list[str]) -> None:
    """CHILD half: move the calling process into each cgroup (write "0" to each cgroup.procs)."""
    for path in procs_files:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        except OSError as e:
            raise StepError("join cgroup", e.errno or 0, path) from e


# --------------------------------------------------------------------------------------
# the system and the host's directories


@dataclass(frozen=True)
class CgroupSystem:
    """What `detect()` found: layout, mounts, this process's own cgroups."""

    layout: Layout
    v2_mount: Path | None
    v1_mounts: dict[str, Path]  # controller → mount point
    own: dict[str, str]  # hierarchy (controller, "name=…", V2_KEY) → own path
    v2_controllers: frozenset[str]  # in the own v2 cgroup's cgroup.controllers
    mount_roots: dict[str, str] = field(default_factory=dict)  # hierarchy → mount's root

    def own_dir(self, key: str) -> Path | None:
        """This process's cgroup directory in hierarchy `key` (controller name or V2_KEY)."""
        mount = self.v2_mount if key == V2_KEY else self.v1_mounts.get(key)
        own = self.own.get(key)
        if mount is None or own is None:
            return None
        root = self.mount_roots.get(key, "/")
        if root != "/":
            if own != root and not own.startswith(root.rstrip("/") + "/"):
                return None  # own cgroup is outside what this mount shows
            own = own[len(root) :]
        return mount / own.lstrip("/")

    def hierarchies(self) -> dict[str, Path]:
        """The hierarchies this layout uses → own directory (existing ones only)."""
        if self.layout is Layout.V2:
            keys: tuple[str, ...] = (V2_KEY,)
        elif self.layout is Layout.HYBRID:
            keys = (V2_KEY, *LIMIT_CONTROLLERS)
        else:
            keys = (*LIMIT_CONTROLLERS, "freezer")
        out: dict[str, Path] = {}
        for key in keys:
            d = self.own_dir(key)
            if d is not None and d.is_dir():
                out[key] = d
        return out

    def open_host(self) -> HostCgroups:
        """Remove stale host dirs, then create this host's directory in every hierarchy."""
        self.cleanup_stale()
        return HostCgroups._create(self, host_dir_name())

    def cleanup_stale(self) -> list[str]:
        """Remove fos.<pid>.<start> dirs (under the own cgroups) of hosts no longer alive."""
        stale: dict[str, dict[str, Path]] = {}
        for key, own in self.hierarchies().items():
            try:
                entries = list(os.scandir(own))
            except OSError:
                continue
            for entry in entries:
                m = HOST_DIR_RE.fullmatch(entry.name)
                if m is None or not entry.is_dir(follow_symlinks=False):
                    continue
                if _host_alive(int(m.group(1)), int(m.group(2))):
                    continue
                stale.setdefault(entry.name, {})[key] = Path(entry.path)
        removed: list[str] = []
        for name, dirs in sorted(stale.items()):
            try:
                removed += _destroy(f"stale host {name}", dirs, REMOVE_TIMEOUT)
            except FosError as e:
                log.warning("stale cgroup cleanup: %s", e)
        return removed


def _parse_mountinfo(text: str) -> list[tuple[str, str, str, str]]:
    """cgroup mounts in /proc/self/mountinfo → [(fstype, mount point, root, super options)]."""
    unescape = re.compile(r"\\([0-7]{3})")
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lf, rf = left.split(), right.split()
        if len(lf) < 5 or len(rf) < 3 or rf[0] not in ("cgroup", "cgroup2"):
            continue
        point = unescape.sub(lambda m: chr(int(m.group(1), 8)), lf[4])
        root = unescape.sub(lambda m: chr(int(m.group(1), 8)), lf[3])
        out.append((rf[0], point, root, rf[2]))
    return out


def _parse_mounts(text: str) -> list[tuple[str, str, str, str]]:
    """Fallback: /proc/self/mounts (no mount root: assume "/")."""
    out = []
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 4 and f[2] in ("cgroup", "cgroup2"):
            out.append((f[2], f[1].replace("\\040", " "), "/", f[3]))
    return out


def _parse_proc_cgroup(text: str) -> dict[str, str]:
    own: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            own[V2_KEY] = path
        for c in controllers.split(","):
            if c:
                own[c] = path
    return own


def _under(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root.rstrip("/") + "/")


def _decide_layout(has_v2: bool, v1_controllers: Iterable[str]) -> Layout:
    if any(c in V1_CONTROLLERS for c in v1_controllers):
        return Layout.HYBRID if has_v2 else Layout.V1
    if has_v2:
        return Layout.V2
    raise ConfigError("no cgroup filesystem is mounted (neither cgroup v1 nor cgroup2)")


def _system_from(mounts: list[tuple[str, str, str, str]], own: dict[str, str]) -> CgroupSystem:
    v1_mounts: dict[str, Path] = {}
    roots: dict[str, str] = {}
    v2_mount: Path | None = None
    for fstype, point, root, options in mounts:
        if fstype == "cgroup2":
            if v2_mount is None and _under(own.get(V2_KEY, "/"), root):
                v2_mount = Path(point)
                roots[V2_KEY] = root
            continue
        for opt in options.split(","):
            if opt in V1_CONTROLLERS and opt not in v1_mounts and _under(own.get(opt, "/"), root):
                v1_mounts[opt] = Path(point)
                roots[opt] = root
    layout = _decide_layout(v2_mount is not None, v1_mounts)
    return CgroupSystem(layout, v2_mount, v1_mounts, own, frozenset(), roots)


def detect() -> CgroupSystem:
    """Decide the layout from this process's mounts and cgroups (the one place that does)."""
    try:
        try:
            mounts = _parse_mountinfo(_read(Path("/proc/self/mountinfo")))
        except FileNotFoundError:
            mounts = _parse_mounts(_read(Path("/proc/self/mounts")))
        own = {
            k: home_path(v) for k, v in _parse_proc_cgroup(_read(Path("/proc/self/cgroup"))).items()
        }
    except OSError as e:
        raise ConfigError(f"cannot read cgroup information from /proc: {e}") from e
    system = _system_from(mounts, own)
    controllers: frozenset[str] = frozenset()
    own_v2 = system.own_dir(V2_KEY)
    if own_v2 is not None:
        with contextlib.suppress(OSError):
            controllers = frozenset(_read(own_v2 / "cgroup.controllers").split())
    return CgroupSystem(
        system.layout,
        system.v2_mount,
        system.v1_mounts,
        own,
        controllers,
        system.mount_roots,
    )


_WHAT = {"memory": "a memory limit", "pids": "a pids limit", "cpu": "a CPU weight"}


def _needed(limits: Limits) -> list[str]:
    need = []
    if limits.memory_max is not None or limits.memory_high is not None:
        need.append("memory")
    if limits.pids_max is not None:
        need.append("pids")
    if limits.cpu_weight is not None:
        need.append("cpu")
    return need


def _not_writable(d: Path) -> str:
    return f"{d} is not writable by uid {os.geteuid()} (no delegated cgroup)"


class HostCgroups(Closing):
    """The host's own directory in each hierarchy; sandboxes are created below it.

    A context manager: `close()` kills and removes everything below and the directory itself.
    """

    def __init__(
        self,
        system: CgroupSystem,
        name: str,
        dirs: Mapping[str, Path],
        controllers: Iterable[str],
        unavailable: Mapping[str, str],
        leaf: Leaf | None = None,
    ) -> None:
        self.system = system
        self.name = name
        self.dirs: dict[str, Path] = dict(dirs)  # hierarchy key → host directory
        self.controllers = frozenset(controllers)  # limits sandboxes can have
        self.unavailable: dict[str, str] = dict(unavailable)  # controller → why not
        self.leaf = leaf
        self.closed = False

    def __repr__(self) -> str:
        return f"<HostCgroups {self.name} {self.system.layout.value} {sorted(self.controllers)}>"

    @classmethod
    def _create(cls, system: CgroupSystem, name: str) -> HostCgroups:
        """Create `name` below the own cgroup in every usable hierarchy (nothing left on error)."""
        own_dirs = system.hierarchies()
        unavailable: dict[str, str] = {}
        if system.layout is not Layout.V2:
            for ctrl in LIMIT_CONTROLLERS:
                if ctrl not in own_dirs:
                    unavailable[ctrl] = f"no cgroup v1 {ctrl} hierarchy is mounted"
        dirs: dict[str, Path] = {}
        with _undone_on_failure("set-up") as created:
            for key, own in own_dirs.items():
                host = own / name
                if host in created:
                    dirs[key] = host
                    continue
                try:
                    os.mkdir(host, 0o755)
                except FileExistsError as e:
                    raise FosError(
                        f"{host} exists: this process already has open host cgroups"
                    ) from e
                except OSError as e:
                    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                        unavailable[key] = _not_writable(own)
                        continue
                    raise FosError(f"cannot create cgroup {host}: {e.strerror}") from e
                created.append(host)
                dirs[key] = host
            if not dirs:
                raise ConfigError(
                    f"cannot create cgroups: {'; '.join(sorted(set(unavailable.values())))}; "
                    f"{DELEGATE_FIX}"
                )
            leaf = None
            if system.layout is Layout.V2:
                own = own_dirs[V2_KEY]
                if _inner_processes(own) and _to_enable(own):
                    leaf = Leaf.enter(own, name)
                controllers: set[str] = set()
                try:
                    controllers = _enable_v2(own, dirs[V2_KEY], unavailable)
                finally:
                    if leaf is not None and not controllers:  # other processes stay in `own`
                        leaf.leave()
                        leaf = None
            else:
                controllers = {c for c in LIMIT_CONTROLLERS if c in dirs}
        return cls(system, name, dirs, controllers, unavailable, leaf)

    def create(self, name: str, limits: Limits | None = None) -> Cgroup:
        """A new sandbox cgroup `name` (e.g. "sb-3") with `limits`; nothing left on failure."""
        limits = limits or Limits()
        cg = self.handle(name, limits)
        cg.make(limits)
        return cg

    def handle(self, name: str, limits: Limits) -> Cgroup:
        """The handle of sandbox cgroup `name`, checked but not made: `Cgroup.make` makes it
        (in the host, or in the sandbox's launcher, which gets it as `spec()`)."""
        if self.closed:
            raise FosError(f"host cgroups {self.name} are closed")
        if not SANDBOX_NAME_RE.fullmatch(name) or name.startswith(("cgroup.", "fos.")):
            raise ConfigError(
                f"bad cgroup name {name!r}: letters, digits, '.', '_', '-' (at most 64), "
                "not starting with 'cgroup.' or 'fos.'"
            )
        for ctrl in _needed(limits):
            if ctrl not in self.controllers:
                reason = self.unavailable.get(ctrl, f"no {ctrl} controller")
                raise ConfigError(f"cannot set {_WHAT[ctrl]}: {reason}; {DELEGATE_FIX}")
        return self._backend(name, {key: d / name for key, d in self.dirs.items()})

    def as_cgroup(self) -> Cgroup:
        """The host directory itself as a `Cgroup`: the renderers' parent, whose limits are
        their shared budget (`Budget`) and whose pressure and usage are all of theirs together.
        Its `kill`/`remove` would end every sandbox: `close()` is the way to do that."""
        if self.closed:
            raise FosError(f"host cgroups {self.name} are closed")
        return self._backend(self.name, self.dirs)

    def _backend(self, name: str, dirs: dict[str, Path]) -> Cgroup:
        layout = self.system.layout
        if layout is Layout.V2:
            return V2Cgroup(name, dirs[V2_KEY])
        if layout is Layout.HYBRID and V2_KEY in dirs:
            return HybridCgroup(name, dirs)
        return V1Cgroup(name, {k: d for k, d in dirs.items() if k != V2_KEY})

    def close(self, *, timeout: float = REMOVE_TIMEOUT) -> list[str]:
        """Kill and remove every cgroup below the host dirs, then the host dirs. Idempotent."""
        self.closed = True
        removed = _destroy(f"host {self.name}", self.dirs, timeout)
        if self.leaf is not None:
            removed += self.leaf.leave()
            self.leaf = None
        return removed


def _inner_processes(cgroup: Path) -> list[int]:
    """The processes in a non-root v2 cgroup (the root has no cgroup.type and is exempt from
    the "no internal processes" rule)."""
    if not (cgroup / "cgroup.type").exists():
        return []
    return _read_pids(cgroup / "cgroup.procs")


def _controllers(own: Path) -> tuple[set[str], set[str]]:
    """The controllers `own` has (cgroup.controllers) and those it enables for its children
    (cgroup.subtree_control)."""
    try:
        available = set(_read(own / "cgroup.controllers").split())
        enabled = set(_read(own / "cgroup.subtree_control").split())
    except OSError as e:
        raise FosError(f"cannot read the controllers of {own}: {e}") from e
    return available, enabled


def _to_enable(own: Path) -> set[str]:
    """The limit controllers `own` offers but does not yet enable for its children."""
    available, enabled = _controllers(own)
    return (available - enabled) & set(LIMIT_CONTROLLERS)


def _enable_v2(own: Path, host: Path, unavailable: dict[str, str]) -> set[str]:
    """Enable memory/pids/cpu for the sandboxes below `host` (pure v2); returns those enabled.

    A controller can be enabled in host's cgroup.subtree_control only if it is enabled in the
    own cgroup's subtree_control, and there only while the own cgroup has no processes (the
    "no internal processes" rule; the threaded pids and cpu would be let in, but would make
    the own cgroup a thread root and its children invalid domains): `HostCgroups` moves the
    host into a `Leaf` first.
    """
    available, enabled = _controllers(own)
    inner = _inner_processes(own)
    done: set[str] = set()
    for ctrl in LIMIT_CONTROLLERS:
        if ctrl not in enabled:
            if ctrl not in available:
                unavailable[ctrl] = (
                    f"the {ctrl} controller is not delegated to {own} "
                    "(missing from its cgroup.controllers)"
                )
                continue
            if inner:
                unavailable[ctrl] = (
                    f"the {ctrl} controller cannot be enabled in {own}/cgroup.subtree_control "
                    f"while processes are in {own} ({_pid_list(inner)}): cgroup v2 "
                    "gives controllers only to cgroups without processes; start fos-host "
                    "alone in its delegated cgroup"
                )
                continue
            try:
                _write(own / "cgroup.subtree_control", f"+{ctrl}")
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EPERM):
                    unavailable[ctrl] = _not_writable(own / "cgroup.subtree_control")
                else:
                    unavailable[ctrl] = f"enabling {ctrl} in {own} failed: {e.strerror}"
                continue
        try:
            _write(host / "cgroup.subtree_control", f"+{ctrl}")
        except OSError as e:
            unavailable[ctrl] = f"enabling {ctrl} in {host} failed: {e.strerror}"
            continue
        done.add(ctrl)
    return done


def _pid_list(pids: list[int]) -> str:
    shown = ", ".join(map(str, pids[:5]))
    return f"pids {shown}{', …' if len(pids) > 5 else ''}" if pids else "no pids"


@dataclass
class Leaf:
    """The leaf cgroup `fos.<pid>.<start>.host` beside the host directory, holding the host.

    On cgroup v2 a cgroup with processes cannot enable controllers for its children. A host
    started in its delegated cgroup (systemd's Delegate=yes puts the service's process there)
    moves itself into this leaf so that the delegated cgroup can enable memory, pids and cpu
    for `fos.<pid>.<start>`, as crun and systemd's DelegateSubgroup= do. Processes the host
    forks afterwards (the zygote) start in the leaf too.
    """

    own: Path
    dir: Path
    enabled_before: frozenset[str]  # own's cgroup.subtree_control before the host moved

    @classmethod
    def enter(cls, own: Path, name: str) -> Leaf | None:
        """Create the leaf and move this process into it; None (and nothing left) if it
        cannot be done, e.g. without write access to the cgroups."""
        d = own / f"{name}{LEAF_SUFFIX}"
        try:
            before = frozenset(_read(own / "cgroup.subtree_control").split())
            os.mkdir(d, 0o755)
        except OSError as e:
            log.debug("no leaf %s: %s", d, e)
            return None
        try:
            _write(d / "cgroup.procs", str(os.getpid()))
        except OSError as e:
            log.debug("cannot move into %s: %s", d, e)
            os.rmdir(d)
            return None
        return cls(own, d, before)

    def leave(self) -> list[str]:
        """Disable what was enabled in `own` since, move every process of the leaf back to
        `own`, and remove the leaf. Called after the host directory is gone. Should `own`
        refuse them, the host stays in the leaf until it exits; the next start removes it."""
        try:
            now = set(_read(self.own / "cgroup.subtree_control").split())
            for ctrl in sorted(now - self.enabled_before):
                _write(self.own / "cgroup.subtree_control", f"-{ctrl}")
            for pid in _read_pids(self.dir / "cgroup.procs"):
                with contextlib.suppress(ProcessLookupError):
                    _write(self.own / "cgroup.procs", str(pid))
        except OSError as e:
            log.warning("fos-host stays in %s until it exits: %s", self.dir, e)
            return []
        return _rmdir_trees(f"leaf {self.dir.name}", [self.dir], time.monotonic() + REMOVE_TIMEOUT)
