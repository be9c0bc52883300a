"""The memory pressure level of the renderers: NONE, MODERATE, CRITICAL, EMERGENCY.

Two kinds of evidence must agree before the level rises, as in Android's lmkd:

- **stall** (PSI): the share of time tasks waited for memory, from PSI triggers on the
  renderers' parent cgroup, on watched tabs' cgroups and on the system (where the kernel
  allows triggers), cgroup v1 `memory.pressure_level` where no PSI file exists, and polling of
  the `total=` counters everywhere (kernel/psi.py);
- **the gate**: the share of memory still available, the lower of MemAvailable / MemTotal
  and the share of the parent's budget its working set leaves free,
  (limit - working set) / limit (`MemoryUse.available_share`). The budget counts because a
  host squeezed into a small budget is short of memory however much the machine has free;
  the working set (usage minus inactive page cache) because usage alone is always near the
  limit once the page cache has filled it.

Stall alone never raises the level — a tab thrashing at its own limit on a machine with room
to spare is that tab's business, and killing on it would kill for nothing — and neither does
a low gate alone (full but not stalling is memory well used).

The rules (`LevelRule`) are pure data and `decide()` a pure function of the state, a
`Reading` and the time, so the hysteresis is tested without a kernel. A level is *entered*
when one of its rules holds with its thresholds as written, and *held* while one holds with
them relaxed by `exit_factor` (2: half the stall, twice the available share): it is left only
when stall has fallen below half its entry threshold or available memory has risen above
twice its entry threshold. A level is left only after `dwell` seconds without a reading that
would enter it again; a higher level is taken at once.

Time comes from an injectable clock; `PressureMonitor` does the I/O and calls `decide()`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fos_host.closing import Closing
from fos_host.errors import ConfigError, FosError
from fos_host.kernel.cgroup import Cgroup
from fos_host.kernel.psi import (
    SYSTEM_PRESSURE,
    WINDOWS,
    MemInfo,
    PressureLevelV1,
    PsiPoller,
    PsiTrigger,
    Stall,
    TriggerRefused,
    mem_available,
)

log = logging.getLogger(__name__)


class Level(enum.Enum):
    """How hard the host must shed memory. Values are the names shown to users; levels are
    ordered (NONE < MODERATE < CRITICAL < EMERGENCY), so `level >= Level.CRITICAL` reads well."""

    NONE = "none"
    MODERATE = "moderate"
    CRITICAL = "critical"
    EMERGENCY = "emergency"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def __lt__(self, other: Level) -> bool:
        return self.rank < other.rank

    def __le__(self, other: Level) -> bool:
        return self.rank <= other.rank

    def __gt__(self, other: Level) -> bool:
        return self.rank > other.rank

    def __ge__(self, other: Level) -> bool:
        return self.rank >= other.rank


_RANKS = {level: rank for rank, level in enumerate(Level)}


# --------------------------------------------------------------------------------------
# the pure decision


@dataclass(frozen=True)
class Reading:
    """One look at the evidence: stall shares (0..1, the highest of every source) and the
    available share (0..1, the gate), with where each came from for the reasons given."""

    some: float
    full: float
    available: float
    stall_from: str = ""
    available_from: str = ""

    def describe(self) -> str:
        stall = f"stall some {self.some:.1%} full {self.full:.1%}"
        if self.stall_from:
            stall += f" ({self.stall_from})"
        gate = f"available {self.available:.1%}"
        if self.available_from:
            gate += f" ({self.available_from})"
        return f"{stall}, {gate}"


@dataclass(frozen=True)
class LevelRule:
    """`level` holds when available < `available` and (some ≥ `some` or full ≥ `full`).

    A level may have several rules (EMERGENCY: deep shortage with critical stall, or a full
    stall with critical shortage). None leaves that stall kind out of the rule.
    """

    level: Level
    available: float
    some: float | None = None
    full: float | None = None

    def __post_init__(self) -> None:
        if self.level is Level.NONE:
            raise ConfigError("a pressure rule cannot be for Level.NONE (that is no rule)")
        if self.some is None and self.full is None:
            raise ConfigError(f"pressure rule for {self.level.name}: needs a some or full stall")
        for key in ("available", "some", "full"):
            value = getattr(self, key)
            if value is not None and not 0 < value <= 1:
                raise ConfigError(
                    f"pressure rule for {self.level.name}: {key} must be a share in (0, 1], "
                    f"not {value!r}"
                )

    def met(self, r: Reading, relax: float = 1.0) -> bool:
        """Whether `r` satisfies this rule, its thresholds relaxed by `relax` (1: entering;
        the exit factor: holding a level already reached)."""
        if r.available >= min(1.0, self.available * relax):
            return False
        if self.some is not None and r.some >= self.some / relax:
            return True
        return self.full is not None and r.full >= self.full / relax

    def describe(self) -> str:
        stall = " or ".join(
            f"{kind} ≥ {value:.1%}"
            for kind, value in (("some", self.some), ("full", self.full))
            if value is not None
        )
        return f"{self.level.name}: {stall} and available < {self.available:.0%}"


DEFAULT_RULES = (
    LevelRule(Level.MODERATE, available=0.40, some=0.075),  # 150 ms of stall per 2 s
    LevelRule(Level.CRITICAL, available=0.05, some=0.20),
    LevelRule(Level.EMERGENCY, available=0.02, some=0.20),
    LevelRule(Level.EMERGENCY, available=0.05, full=0.50),
)


@dataclass(frozen=True)
class LevelState:
    """The level and when it was entered or last confirmed (a reading that would enter it)."""

    level: Level = Level.NONE
    since: float = -math.inf
    rule: LevelRule | None = None  # the rule that entered or last confirmed it


def decide(
    state: LevelState,
    reading: Reading,
    now: float,
    rules: tuple[LevelRule, ...] = DEFAULT_RULES,
    exit_factor: float = 2.0,
    dwell: float = 5.0,
) -> LevelState:
    """The next state after `reading` at `now`.

    Up at once to the highest level a rule enters; a reading that enters the current level
    again confirms it (`since` = now). Otherwise the level is kept while one of its rules
    holds with thresholds relaxed by `exit_factor`, and also, whatever the reading, until
    `dwell` seconds after it was entered or last confirmed; then it steps down to the highest
    lower level still held (levels are nested: holding CRITICAL's rule holds MODERATE's too).
    """
    entered = _highest(r for r in rules if r.met(reading))
    if entered is not None and entered.level >= state.level:
        return LevelState(entered.level, now, entered)
    held = _highest(r for r in rules if r.level <= state.level and r.met(reading, exit_factor))
    held_level = held.level if held is not None else Level.NONE
    if held_level == state.level or now - state.since < dwell:
        return state
    return LevelState(held_level, now, held)


def _highest(rules: Iterable[LevelRule]) -> LevelRule | None:
    return max(rules, key=lambda r: r.level, default=None)


# --------------------------------------------------------------------------------------
# configuration and changes


@dataclass(frozen=True)
class PressureConfig:
    """How the monitor listens and decides. Shares are of wall time (stall) or of memory."""

    rules: tuple[LevelRule, ...] = DEFAULT_RULES
    exit_factor: float = 2.0  # held while stall ≥ entry / 2 and available < entry * 2
    dwell: float = 5.0  # seconds at a level before leaving it (tests set it low)
    interval: float = 1.0  # seconds between polls while polling is needed
    window: float = 2.0  # seconds over which polled stall is measured
    trigger_windows: tuple[float, ...] = WINDOWS  # tried shortest first
    system: bool = True  # also listen to /proc/pressure/memory

    def __post_init__(self) -> None:
        if not self.rules:
            raise ConfigError("pressure config: no rules")
        if self.exit_factor < 1:
            raise ConfigError(f"pressure exit_factor must be ≥ 1, not {self.exit_factor!r}")
        if not self.dwell >= 0:
            raise ConfigError(f"pressure dwell must be ≥ 0 seconds, not {self.dwell!r}")
        for key in ("interval", "window"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"pressure {key} must be positive, not {getattr(self, key)!r}")
        if not self.trigger_windows:
            raise ConfigError("pressure config: no trigger window to try")

    def stall_for(self, level: Level) -> float:
        """The lowest "some" share that can enter `level`: the trigger threshold for it."""
        shares = [r.some for r in self.rules if r.level is level and r.some is not None]
        if not shares:
            raise ConfigError(f"pressure config: no 'some' stall rule for {level.name}")
        return min(shares)


@dataclass(frozen=True)
class Change:
    """A level change, with the reading that caused it."""

    level: Level
    previous: Level
    at: float  # the monitor's clock
    reading: Reading
    rule: LevelRule | None

    @property
    def reason(self) -> str:
        if self.level > self.previous and self.rule is not None:
            return f"{self.rule.describe()}: {self.reading.describe()}"
        return f"{self.previous.name} no longer holds: {self.reading.describe()}"


# --------------------------------------------------------------------------------------
# the sources


class _Watch(Closing):
    """One cgroup (or the system) listened to: its trigger or v1 events, and its poller.

    An event counts as stall at the threshold it stands for (a trigger: its share; v1 medium:
    MODERATE's, critical: CRITICAL's) for one window after it came, since neither says when
    the stall ends; polling then tells.
    """

    def __init__(
        self,
        label: str,
        pressure: Path | None,
        vmpressure: Path | None,
        monitor: PressureMonitor,
    ) -> None:
        self.label = label
        self.kind = "none"
        self.poller: PsiPoller | None = None
        self.trigger: PsiTrigger | None = None
        self.v1: list[PressureLevelV1] = []
        self.event_share = 0.0
        self.event_until = -math.inf
        self._monitor = monitor
        config = monitor.config
        try:
            if pressure is not None:
                self.poller = PsiPoller(pressure, config.window, monitor.clock)
                self.kind = "polling"
                try:
                    self.trigger = PsiTrigger(
                        pressure,
                        config.stall_for(Level.MODERATE),
                        windows=config.trigger_windows,
                    )
                    self.trigger.attach(self._triggered, self._gone)
                    self.kind = "trigger"
                except TriggerRefused as e:
                    log.info("%s: polling: %s", label, e)
            elif vmpressure is not None:
                for name, level in (("medium", Level.MODERATE), ("critical", Level.CRITICAL)):
                    v1 = PressureLevelV1(vmpressure, name)
                    self.v1.append(v1)
                    v1.attach(self._v1_handler(name, config.stall_for(level)))
                self.kind = "v1"
            else:
                raise ConfigError(f"{label}: no memory.pressure and no v1 memory.pressure_level")
        except BaseException:
            self.close()
            raise

    def describe(self) -> str:
        if self.trigger is not None:
            t = self.trigger
            return f"{self.label}: PSI trigger {t.threshold * 1000:g} ms per {t.window:g} s"
        if self.kind == "v1":
            return f"{self.label}: v1 memory.pressure_level medium+critical"
        return f"{self.label}: polling every {self._monitor.config.interval:g} s"

    def _v1_handler(self, name: str, share: float) -> Callable[[int], None]:
        # v1 events say nothing about how long they hold: one stall window, as a trigger's.
        hold = self._monitor.config.window
        return lambda _count: self._event(share, f"v1 {name}", hold)

    def _triggered(self) -> None:
        assert self.trigger is not None
        self._event(self.trigger.share, "PSI trigger", self.trigger.window)

    def _event(self, share: float, what: str, hold: float) -> None:
        now = self._monitor.clock()
        if now >= self.event_until or share >= self.event_share:
            self.event_share = share
        self.event_until = now + hold
        self._monitor._evaluate(f"{what} on {self.label}")

    def _gone(self) -> None:
        log.debug("%s: pressure file gone (cgroup removed)", self.label)
        self._monitor._drop(self)

    def stall(self, now: float) -> tuple[Stall, str]:
        """The stall now: polled, raised to a recent event's share."""
        polled = self.poller.poll() if self.poller is not None else Stall(0.0, 0.0, 0.0, 0.0)
        how = "polled"
        some = polled.some
        if now < self.event_until and self.event_share > some:
            some, how = self.event_share, "event"
        return Stall(some, polled.full, polled.avg10, polled.avg60), f"{how} on {self.label}"

    def close(self) -> None:
        for owned in (self.trigger, self.poller, *self.v1):
            if owned is not None:
                owned.close()
        self.trigger = self.poller = None
        self.v1 = []


# --------------------------------------------------------------------------------------
# the monitor


@dataclass
class _Subscribers:
    callbacks: list[Callable[[Change], None]] = field(default_factory=list)
    queues: list[asyncio.Queue[Change]] = field(default_factory=list)


class PressureMonitor(Closing):
    """The renderers' memory pressure level, kept current on the running asyncio loop.

    `parent` is the renderers' parent cgroup (`HostCgroups.as_cgroup()`): its PSI (or v1
    vmpressure) and its budget are always watched; `watch(cgroup)` adds a tab's. `start()`
    opens the sources (in a running loop); `close()` releases every fd.

    The best source available is used for the parent and told by `source`: a PSI trigger on
    the shortest window allowed (events at once), else v1 `memory.pressure_level`, else
    polling. Polling runs every `interval` while any source polls only, and otherwise only
    while the level is above NONE or an event is recent (to see the stall end), so an idle
    host with triggers wakes for nothing.
    """

    def __init__(
        self,
        parent: Cgroup,
        config: PressureConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        meminfo: Callable[[], MemInfo] = mem_available,
    ) -> None:
        self.parent = parent
        self.config = config or PressureConfig()
        self.clock = clock
        self._meminfo = meminfo
        self.state = LevelState()
        self.reading: Reading | None = None
        self.last: Change | None = None
        self._watches: dict[str, _Watch] = {}
        self._subscribers = _Subscribers()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def level(self) -> Level:
        return self.state.level

    @property
    def source(self) -> str:
        """How the parent is listened to: "trigger", "v1" or "polling" ("" before start)."""
        watch = self._watches.get(self.parent.name)
        return watch.kind if watch is not None else ""

    def describe(self) -> str:
        sources = "; ".join(w.describe() for w in self._watches.values()) or "not started"
        reading = f"; last: {self.reading.describe()}" if self.reading is not None else ""
        return f"memory pressure {self.level.name} from {sources}{reading}"

    def start(self) -> None:
        """Open the sources and begin; call in the running loop. ConfigError if the parent
        has no pressure source at all."""
        if self._task is not None:
            raise FosError("the pressure monitor is already started")
        self._wake = asyncio.Event()
        self._add(self.parent.name, self.parent.pressure_path(), self.parent.vmpressure_dir())
        if self.config.system and SYSTEM_PRESSURE.exists():
            self._add(str(SYSTEM_PRESSURE), SYSTEM_PRESSURE, None)
        self._task = asyncio.get_running_loop().create_task(self._poll_loop())
        self._evaluate("start")

    def watch(self, cgroup: Cgroup) -> None:
        """Listen to a tab's cgroup too (its pressure raises the stall; the gate stays the
        parent's and the system's). A cgroup without a pressure source is ignored."""
        if cgroup.name in self._watches:
            return
        pressure, vmpressure = cgroup.pressure_path(), cgroup.vmpressure_dir()
        if pressure is None and vmpressure is None:
            log.debug("%s: no pressure source to watch", cgroup.name)
            return
        self._add(cgroup.name, pressure, vmpressure)

    def unwatch(self, cgroup: Cgroup) -> None:
        """Stop listening to a tab's cgroup (before it is removed)."""
        watch = self._watches.get(cgroup.name)
        if watch is not None and cgroup.name != self.parent.name:
            self._drop(watch)

    def subscribe(self, callback: Callable[[Change], None]) -> None:
        """Call `callback(change)` on every level change."""
        self._subscribers.callbacks.append(callback)

    async def changes(self) -> AsyncIterator[Change]:
        """Every level change from now on, as an async iterator."""
        queue: asyncio.Queue[Change] = asyncio.Queue()
        self._subscribers.queues.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.queues.remove(queue)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for watch in list(self._watches.values()):
            watch.close()
        self._watches.clear()

    # -- internals ---------------------------------------------------------------------------

    def _add(self, label: str, pressure: Path | None, vmpressure: Path | None) -> None:
        self._watches[label] = _Watch(label, pressure, vmpressure, self)

    def _drop(self, watch: _Watch) -> None:
        self._watches.pop(watch.label, None)
        watch.close()

    def _polling_needed(self) -> bool:
        if self.level is not Level.NONE:
            return True
        now = self.clock()
        for watch in self._watches.values():
            if watch.kind == "polling" or now < watch.event_until:
                return True
        return False

    async def _poll_loop(self) -> None:
        assert self._wake is not None
        while True:
            if self._polling_needed():
                await asyncio.sleep(self.config.interval)
            else:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._evaluate("poll")

    def _read(self, now: float) -> Reading:
        some = full = 0.0
        stall_from = ""
        for watch in list(self._watches.values()):
            try:
                stall, how = watch.stall(now)
            except FosError as e:  # a tab's cgroup removed without unwatch
                if watch.label == self.parent.name:
                    raise
                log.debug("%s: %s", watch.label, e)
                self._drop(watch)
                continue
            if stall.some > some or not stall_from:
                some, stall_from = stall.some, how
            full = max(full, stall.full)
        mem = self._meminfo()
        available, available_from = mem.share, "MemAvailable"
        use = self.parent.memory_use()
        budget_share = use.available_share if use is not None else None
        if use is not None and budget_share is not None and budget_share < available:
            available = budget_share
            available_from = (
                f"budget of {self.parent.name}: working set {use.working_set >> 20} MiB "
                f"of {(use.limit or 0) >> 20} MiB"
            )
        return Reading(some, full, available, stall_from, available_from)

    def _evaluate(self, why: str) -> None:
        """Read, decide and tell; on a poll, an event or start. A read error is logged and
        the level kept: the next poll or event reads again."""
        if self._wake is None:
            return
        now = self.clock()
        try:
            reading = self._read(now)
        except FosError as e:
            log.warning("memory pressure (%s): %s", why, e)
            return
        self.reading = reading
        before = self.state
        self.state = decide(
            before, reading, now, self.config.rules, self.config.exit_factor, self.config.dwell
        )
        self._wake.set()  # the poll loop looks again at whether it must poll
        if self.state.level is before.level:
            return
        change = Change(self.state.level, before.level, now, reading, self.state.rule)
        self.last = change
        log.info("memory pressure %s (%s): %s", change.level.name, why, change.reason)
        for callback in list(self._subscribers.callbacks):
            callback(change)
        for queue in self._subscribers.queues:
            queue.put_nowait(change)
