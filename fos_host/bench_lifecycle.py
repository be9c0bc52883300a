"""`fos-host bench lifecycle`: what a tab's steps down and back up cost, how much memory a
hibernation really gives back, how small the snapshots are, and how fast real memory pressure
leads to the first action — with peers measured in the same run.

Steps: one Host (`lifecycle=False`: tabs change tiers only when asked), the demo's pages served
by an `OriginServer` in this process. A sample opens a tab of the next page (round robin, so
every page gets as many samples) and, with the host at rest before each step that ends or
starts a renderer, times what a caller of the Host waits for:

    freeze → thaw (activate) → freeze → hibernate (from frozen, as the policy does: thaw,
    snapshot, into the warm tier, renderer killed) → activate (a warm renderer restores the
    snapshot and paints it) → hibernate → discard (the snapshot to disk) → activate (read
    from disk, restored, painted) → reload from the URL (peer) → close

Peers, for orientation: a new tab opened from the URL until loaded (what a tab without a
snapshot costs: a warm renderer, fetch, parse, layout, paint), reloading the tab from its URL
in its renderer (navigate → loaded), and, right before each freeze, stopping and continuing a
`sleep` process: SIGSTOP/SIGCONT until `waitpid` reports it stopped/continued, cgroup v2's
`cgroup.freeze` (what the host's freeze uses here) and the v1 freezer where one is mounted,
each until the kernel says it is done.

Memory: around each hibernation, the renderers' parent cgroup's usage (`Host.cgroups`), read
with the host at rest before, and after the renderer has exited and its cgroup is removed; the
parent's drop over `Event.freed` (the renderer cgroup's usage just before it was killed) is
the share that really came back. Not MemAvailable: the kernel folds its per-CPU counters into
it about once a second, so read a few ms apart it mostly shows no change at all, and it moves
with everything else on the machine. Snapshots: the warm tier's bytes
around each hibernation (per page), and `store.stats()` after hibernating one tab of every
page (overall).

Pressure: a Host with the lifecycle on (a new one for every onset), an active tab and a few
background tabs. The renderers' parent gets a budget of its working set plus HELD +
BUDGET_ROOM, and the hog (fos_host/bench_hog.py) starts in a child cgroup of the host's, so it
counts against that budget: it holds HELD of anonymous memory and thrashes a file on disk
through a mapping (this machine has no swap). Timed from the hog's onset (its first pass) to
the first level change and to the first lifecycle action, both from the host's event queue
(`subscribe()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fos_host.bench import (
    MAX_FAILURES_IN_A_ROW,
    MIB,
    BenchError,
    failure_lines,
    goal_lines,
    machine,
    machine_line,
    num,
    summarize,
)
from fos_host.bench_hog import HELD, MEMORY_FILESYSTEMS, Hog, fstype, write_file
from fos_host.bench_tabs import settle
from fos_host.errors import ConfigError, FosError
from fos_host.host.host import Host, HostConfig, Subscription, Tab, TabState
from fos_host.host.lifecycle import Action
from fos_host.host.pressure import Level, PressureConfig
from fos_host.interfaces.control import Event
from fos_host.kernel.cgroup import Cgroup, HostCgroups, Limits, V1Cgroup, detect
from fos_host.kernel.psi import PsiTrigger, TriggerRefused
from fos_host.services.origin import OriginServer

PAGES = {
    "news": "http://news.fos.test/",
    "article": "http://news.fos.test/article/1",
    "shop": "http://shop.fos.test/",
    "example": "http://a.b.example.co.uk/",
    "long": "http://news.fos.test/big",  # 3 MiB of one paragraph repeated
}
RUNS = 10  # samples per page
QUICK_RUNS = 1
ONSETS = 5
QUICK_ONSETS = 1
BACKGROUND_TABS = 3  # in the pressure host, besides the active one
BUDGET_ROOM = 24 << 20  # the budget leaves the hog's file this much room
ONSET_TIMEOUT = 20.0  # seconds from the hog's onset to the first action
CALM_TIMEOUT = 30.0  # seconds for the level to fall back to NONE once the hog is gone
BENCH_FREEZER = "fos-bench-"  # + pid: the v1 freezer cgroup of the freeze samples
QUIET = 2.5  # seconds without stall before the next onset: a PSI window and a bit
EXIT_TIMEOUT = 10.0
PRESSURE = PressureConfig(dwell=1.0, interval=0.25)
ACTION_GAP = 0.2

GOAL_FREEZE_MS = 100.0
GOAL_RESTORE_WARM_MS = 300.0
GOAL_RESTORE_COLD_MS = 1000.0
GOAL_FREED_SHARE = 0.90
GOAL_ONSET_S = 2.5  # with 2 s trigger windows (without CAP_SYS_RESOURCE)
GOAL_ONSET_SHORT_S = 1.0  # where sub-2 s windows are allowed


@dataclass(frozen=True)
class Step:
    key: str
    label: str
    peer: bool = False


STEPS = (
    Step("freeze", "freeze (host.step FREEZE)"),
    Step("thaw", "thaw (activate a frozen tab)"),
    Step("hibernate", "hibernate a frozen tab (host.step)"),
    Step("restore_warm", "hibernated -> restored, painted (activate)"),
    Step("discard", "discard a hibernated tab (to disk)"),
    Step("restore_cold", "discarded -> restored from disk (activate)"),
    Step("open", "new tab from its URL -> loaded", peer=True),
    Step("reload", "reload from its URL (navigate -> loaded)", peer=True),
    Step("sigstop", "SIGSTOP a process (until waitpid)", peer=True),
    Step("sigcont", "SIGCONT it (until waitpid)", peer=True),
    Step("cgroup_freeze", "cgroup.freeze (v2), 1 process", peer=True),
    Step("cgroup_thaw", "cgroup.freeze = 0 (v2)", peer=True),
    Step("v1_freeze", "v1 freezer FROZEN, 1 process", peer=True),
    Step("v1_thaw", "v1 freezer THAWED", peer=True),
)
OPTIONAL = {"v1_freeze", "v1_thaw"}  # only where a v1 freezer hierarchy is mounted


@dataclass
class Samples:
    """Figures of the steps part, each kept per page: step ms, and per hibernation the memory
    (MiB) and the snapshot (bytes) figures. Failures count whole samples."""

    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    failures: int = 0
    error: str = ""
    in_a_row: int = 0

    def add(self, key: str, page: str, value: float) -> None:
        self.values.setdefault(key, {}).setdefault(page, []).append(value)

    def all(self, key: str) -> list[float]:
        return [v for page in self.values.get(key, {}).values() for v in page]

    def fail(self, e: BaseException) -> None:
        self.failures += 1
        self.in_a_row += 1
        self.error = self.error or f"{type(e).__name__}: {e}"

    def stats(self, key: str) -> dict[str, Any] | None:
        """The figures of `key` overall and per page (None without a sample)."""
        values = self.all(key)
        if not values:
            return None
        pages = self.values[key]
        return {"n": len(values), **summarize(values),
                "pages": {page: summarize(v) for page, v in pages.items()}}  # fmt: skip


# --------------------------------------------------------------------------------------
# peers: stopping a process, and freezing a cgroup that holds one


class Stoppable:
    """A `sleep` process (an idle one, as a background renderer is), in a cgroup of the host's
    (v2 `cgroup.freeze`; limits in v1 here) and, where a v1 freezer hierarchy is mounted, in a
    freezer cgroup of its own below this process's: the peers of the host's freeze."""

    def __init__(self, cgroups: HostCgroups) -> None:
        self._stack = contextlib.ExitStack()  # closed in reverse: the process ends first
        try:
            self.cgroup = cgroups.create("bench-peer")
            self._stack.callback(self.cgroup.remove)
            self.v1 = self._v1_freezer()
            self.proc = subprocess.Popen(["sleep", "infinity"])
            self._stack.callback(self._end)
            self.cgroup.add(self.proc.pid)
            if self.v1 is not None:
                self.v1.add(self.proc.pid)
        except BaseException:
            self._stack.close()
            raise

    def _v1_freezer(self) -> Cgroup | None:
        own = detect().own_dir("freezer")
        if own is None:
            return None
        # a killed run's dir: the host's stale cleanup does not look at v1 freezer dirs
        for old in own.glob(f"{BENCH_FREEZER}*"):
            pid = old.name.removeprefix(BENCH_FREEZER)
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                with contextlib.suppress(OSError):  # still holding a process: kept
                    old.rmdir()
        d = own / f"{BENCH_FREEZER}{os.getpid()}"
        d.mkdir()
        self._stack.callback(d.rmdir)
        return V1Cgroup(d.name, {"freezer": d})

    def _end(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def sample(self, into: Samples, page: str) -> None:
        """One of each: stop and continue, freeze and thaw (ms)."""
        for key, signum, flag in (
            ("sigstop", signal.SIGSTOP, os.WUNTRACED),
            ("sigcont", signal.SIGCONT, os.WCONTINUED),
        ):
            t0 = time.perf_counter_ns()
            os.kill(self.proc.pid, signum)
            os.waitpid(self.proc.pid, flag)
            into.add(key, page, (time.perf_counter_ns() - t0) / 1e6)
        for prefix, cg in (("cgroup", self.cgroup), ("v1", self.v1)):
            if cg is None:
                continue
            for key, change in (("freeze", cg.freeze), ("thaw", cg.thaw)):
                t0 = time.perf_counter_ns()
                change()
                into.add(f"{prefix}_{key}", page, (time.perf_counter_ns() - t0) / 1e6)

    def close(self) -> None:
        self._stack.close()


# --------------------------------------------------------------------------------------
# the steps


async def _timed(coro: Any) -> float:
    t0 = time.perf_counter_ns()
    await coro
    return (time.perf_counter_ns() - t0) / 1e6


def _ready(tab: Tab, what: str) -> None:
    if tab.state is not TabState.READY or tab.reason:
        raise BenchError(f"{tab.url}: {what}: {tab.state.value} {tab.reason}".rstrip())


def _parent(host: Host) -> Cgroup:
    cgroups = host.cgroups
    if cgroups is None:
        raise ConfigError("no cgroups of the host's own (run as root)")
    return cgroups.as_cgroup()


def _usage(parent: Cgroup) -> int:
    use = parent.memory_use()
    if use is None:
        raise BenchError(f"cgroup {parent.name} has no memory usage to read")
    return use.current


async def _hibernate(host: Host, tab: Tab, into: Samples, page: str) -> None:
    """Hibernate (timed) with the memory and snapshot figures around it."""
    proc = tab.renderer
    parent = _parent(host)
    await settle(host)
    before, warm = _usage(parent), host.store.stats().warm
    t0 = time.perf_counter_ns()
    event: Event = await host.step(tab.id, Action.HIBERNATE, "bench")
    into.add("hibernate", page, (time.perf_counter_ns() - t0) / 1e6)
    await settle(host, proc)  # it has exited, and its cgroup is removed
    after = host.store.stats().warm
    dropped = before - _usage(parent)
    if not event.freed:
        raise BenchError(f"{tab.url}: the hibernation freed nothing ({event})")
    into.add("freed_mib", page, event.freed / MIB)
    into.add("dropped_mib", page, dropped / MIB)
    into.add("freed_share", page, dropped / event.freed)
    into.add("snapshot_raw", page, after.raw_bytes - warm.raw_bytes)
    into.add("snapshot_stored", page, after.bytes - warm.bytes)


async def _sample(host: Host, peer: Stoppable, into: Samples, page: str, url: str) -> None:
    """One tab of `page` down every step and back up (see the module's docstring)."""
    t0 = time.perf_counter_ns()
    tab = await host.open(url)
    opened = (time.perf_counter_ns() - t0) / 1e6
    try:
        _ready(tab, "open")
        into.add("open", page, opened)
        await settle(host)
        peer.sample(into, page)
        into.add("freeze", page, await _timed(host.step(tab.id, Action.FREEZE, "bench")))
        into.add("thaw", page, await _timed(host.activate(tab.id)))
        await host.step(tab.id, Action.FREEZE, "bench")
        await _hibernate(host, tab, into, page)
        into.add("restore_warm", page, await _timed(host.activate(tab.id)))
        _ready(tab, "restore")
        await settle(host)
        proc = tab.renderer
        await host.step(tab.id, Action.HIBERNATE, "bench")
        await settle(host, proc)
        into.add("discard", page, await _timed(host.step(tab.id, Action.DISCARD, "bench")))
        into.add("restore_cold", page, await _timed(host.activate(tab.id)))
        _ready(tab, "restore from disk")
        await settle(host)
        into.add("reload", page, await _timed(host.reload(tab.id)))
        _ready(tab, "reload")
    finally:
        await host.close_tab(tab.id)


async def _warm_tier(host: Host) -> dict[str, Any]:
    """Hibernate one tab of every page; the warm tier's figures then."""
    tabs = [await host.open(url) for url in PAGES.values()]
    try:
        for tab in tabs:
            _ready(tab, "open")
            await host.step(tab.id, Action.HIBERNATE, "bench")
        stats = host.store.stats()
    finally:
        for tab in tabs:
            await host.close_tab(tab.id)
    if stats.warm.count != len(tabs) or not stats.warm.bytes:
        raise BenchError(f"{len(tabs)} tabs hibernated, the warm tier holds {stats.warm}")
    return {
        "tabs": stats.warm.count,
        "raw_bytes": stats.warm.raw_bytes,
        "stored_bytes": stats.warm.bytes,
        "ratio": round(stats.warm.raw_bytes / stats.warm.bytes, 2),
    }


async def _steps(runs: int, profile: Path, origin: OriginServer) -> tuple[Samples, dict[str, Any]]:
    """`runs` samples of every page in one Host; then the warm tier with one tab of each."""
    into = Samples()
    warm: dict[str, Any] = {}
    config = HostConfig(profile, resolve=origin.resolve(), resolve_only=True, lifecycle=False)
    async with Host(config) as host:
        cgroups = host.cgroups
        if cgroups is None:
            raise ConfigError("no cgroups of the host's own (run as root)")
        peer = Stoppable(cgroups)
        try:
            done = 0
            while done < runs * len(PAGES) and into.in_a_row < MAX_FAILURES_IN_A_ROW:
                page = list(PAGES)[done % len(PAGES)]
                try:
                    await _sample(host, peer, into, page, PAGES[page])
                except (OSError, FosError, KeyError) as e:
                    into.fail(e)
                    continue
                into.in_a_row = 0
                done += 1
        finally:
            peer.close()
        try:
            warm = await _warm_tier(host)
        except (OSError, FosError) as e:
            warm = {"error": f"{type(e).__name__}: {e}"}
    return into, warm


# --------------------------------------------------------------------------------------
# pressure onset -> first action


@dataclass
class Onsets:
    level_s: list[float] = field(default_factory=list)  # onset -> first level change
    action_s: list[float] = field(default_factory=list)  # onset -> first action done
    actions: list[str] = field(default_factory=list)  # what the first action was
    source: str = ""
    window: float | None = None  # the shortest trigger window the kernel allows here
    sources: str = ""
    failures: int = 0
    error: str = ""


async def _next_event(sub: Subscription, deadline: float, tab: bool) -> Event:
    """The next event of a tab (`tab`) or of the level, before `deadline` (monotonic)."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        event = await asyncio.wait_for(sub.next(), left)
        if (event.tab is not None) is tab:
            return event


async def _calm(host: Host) -> None:
    deadline = time.monotonic() + CALM_TIMEOUT
    while host.level() is not Level.NONE:
        if time.monotonic() > deadline:
            raise BenchError(f"memory pressure still {host.level().name} after {CALM_TIMEOUT:g} s")
        await asyncio.sleep(0.1)
    await asyncio.sleep(QUIET)


async def _onset(host: Host, file: Path, into: Onsets) -> None:
    """Tabs, a tight budget, the hog: onset -> first level change, first action."""
    if host.monitor is None or host.cgroups is None:
        raise ConfigError("no memory pressure monitor (no cgroups of the host's own)")
    into.source, into.sources = host.monitor.source, host.monitor.describe()
    into.window = _trigger_window(host)
    tabs = [await host.open(url) for url in list(PAGES.values())[: BACKGROUND_TABS + 1]]
    for tab in tabs:
        _ready(tab, "open")
    await host.activate(tabs[0].id)
    await _calm(host)
    await settle(host)
    parent = host.cgroups.as_cgroup()
    use = parent.memory_use()
    if use is None:
        raise BenchError(f"cgroup {parent.name}: no memory usage to squeeze")
    parent.set_limits(Limits(memory_max=use.working_set + HELD + BUDGET_ROOM))
    cg = host.cgroups.create("bench-hog")
    sub = host.subscribe()
    try:
        with Hog(cg, file) as hog:
            deadline = hog.onset + ONSET_TIMEOUT
            try:
                await _next_event(sub, deadline, tab=False)
                into.level_s.append(time.monotonic() - hog.onset)
                action = await _next_event(sub, deadline, tab=True)
                into.action_s.append(time.monotonic() - hog.onset)
            except TimeoutError:
                raise BenchError(
                    f"no action within {ONSET_TIMEOUT:g} s of the hog's onset: "
                    f"{host.monitor.describe()}"
                ) from None
            into.actions.append(f"{action.action} ({action.tier})")
    finally:
        host.unsubscribe(sub)
        cg.remove()


def _trigger_window(host: Host) -> float | None:
    """The shortest window the kernel takes for a trigger on the renderers' parent (the
    monitor's own choice is not public): None where it takes none."""
    path = _parent(host).pressure_path()
    if path is None:
        return None
    config = host.config.pressure
    try:
        with PsiTrigger(
            path, config.stall_for(Level.MODERATE), windows=config.trigger_windows
        ) as t:
            return t.window
    except TriggerRefused:
        return None


async def _pressure(onsets: int, profile: Path, origin: OriginServer) -> Onsets:
    """Each onset in a Host of its own: its parent cgroup, the pressure monitor's state and
    the lifecycle start afresh, and nothing the last hog left in the page cache is charged
    to the new parent."""
    into = Onsets()
    if fstype(profile) in MEMORY_FILESYSTEMS:
        into.error = f"{profile} is on {fstype(profile)}: the hog needs a file on a disk"
        return into
    file = await asyncio.to_thread(write_file, profile / "hog-file")
    in_a_row = 0
    for n in itertools.count():
        if len(into.action_s) >= onsets or in_a_row >= MAX_FAILURES_IN_A_ROW:
            break
        config = HostConfig(profile / f"onset-{n}", resolve=origin.resolve(), resolve_only=True,
                            lifecycle=True, action_gap=ACTION_GAP, pressure=PRESSURE)  # fmt: skip
        try:
            async with Host(config) as host:
                await _onset(host, file, into)
            in_a_row = 0
        except (OSError, FosError) as e:
            into.failures += 1
            in_a_row += 1
            into.error = into.error or f"{type(e).__name__}: {e}"
    return into


# --------------------------------------------------------------------------------------
# the run


async def _measure(runs: int, onsets: int) -> tuple[Samples, dict[str, Any], Onsets]:
    with tempfile.TemporaryDirectory(prefix="fos-bench-lifecycle-") as tmp:
        async with OriginServer() as origin:
            steps, warm = await _steps(runs, Path(tmp) / "steps", origin)
            pressure = await _pressure(onsets, Path(tmp), origin)
    return steps, warm, pressure


def _pages(s: Samples) -> dict[str, dict[str, Any]]:
    """Per page: p50 of every figure, and its snapshots' compression."""
    out: dict[str, dict[str, Any]] = {}
    for page in PAGES:
        row: dict[str, Any] = {}
        for key, pages in s.values.items():
            if pages.get(page):
                row[key] = summarize(pages[page])["p50"]
        raw, stored = s.values.get("snapshot_raw", {}), s.values.get("snapshot_stored", {})
        if sum(stored.get(page, [])):
            row["compression"] = round(sum(raw[page]) / sum(stored[page]), 2)
        out[page] = row
    return out


def measure(runs: int = RUNS, onsets: int = ONSETS) -> dict[str, Any]:
    """Run everything; the report as a JSON-able dict (failed samples counted in it)."""
    if runs < 1 or onsets < 1:
        raise ConfigError(f"--runs and --onsets must be at least 1, not {runs} and {onsets}")
    load_before = os.getloadavg()[0]
    s, warm, p = asyncio.run(_measure(runs, onsets))
    steps: dict[str, dict[str, Any]] = {}
    for step in STEPS:
        stats = s.stats(step.key)
        steps[step.key] = {"label": step.label, "peer": step.peer,
                           "n": stats["n"] if stats else 0, "ms": stats}  # fmt: skip
    report: dict[str, Any] = {
        "benchmark": "lifecycle",
        "runs": runs,
        "pages": PAGES,
        "machine": machine(load_before),
        "steps": steps,
        "samples": {"label": "lifecycle samples", "failures": s.failures, "error": s.error},
        "memory": {key: s.stats(key) for key in ("freed_mib", "dropped_mib", "freed_share")},
        "per_page": _pages(s),
        "warm_tier": warm,
        "pressure": {
            "onsets": onsets,
            "source": p.source,
            "sources": p.sources,
            "trigger_window_s": p.window,
            "budget_room_mib": BUDGET_ROOM // MIB,
            "hog_held_mib": HELD // MIB,
            "level_s": summarize(p.level_s) if p.level_s else None,
            "action_s": summarize(p.action_s) if p.action_s else None,
            "samples_s": [round(v, 3) for v in p.action_s],
            "first_actions": p.actions,
            "label": "pressure onsets",
            "failures": p.failures,
            "error": p.error,
        },
    }  # fmt: skip
    wanted = runs * len(PAGES)
    report["failed"] = sorted(
        [k for k, e in steps.items() if k not in OPTIONAL and e["n"] < wanted]
        + [k for k, v in report["memory"].items() if v is None]
        + (["warm_tier"] if "ratio" not in warm else [])
        + (["pressure"] if len(p.action_s) < onsets else [])
    )
    return _goals(report)


def _p50(stats: dict[str, Any] | None) -> float | None:
    return stats["p50"] if stats else None


def _goals(report: dict[str, Any]) -> dict[str, Any]:
    steps, p = report["steps"], report["pressure"]
    window = p["trigger_window_s"]
    onset_goal = GOAL_ONSET_SHORT_S if window is not None and window < 2 else GOAL_ONSET_S
    goals = [
        ("pressure onset -> first action, p50", "<=", onset_goal, _p50(p["action_s"]), "s"),
        ("freeze, p50", "<=", GOAL_FREEZE_MS, _p50(steps["freeze"]["ms"]), "ms"),
        ("hibernated -> restored, p50", "<=", GOAL_RESTORE_WARM_MS,
         _p50(steps["restore_warm"]["ms"]), "ms"),
        ("discarded -> restored, p50", "<=", GOAL_RESTORE_COLD_MS,
         _p50(steps["restore_cold"]["ms"]), "ms"),
        ("memory freed that came back, p50", ">=", GOAL_FREED_SHARE * 100,
         None if report["memory"]["freed_share"] is None
         else report["memory"]["freed_share"]["p50"] * 100, "%"),
    ]  # fmt: skip
    report["goals"] = [
        {
            "goal": name,
            "target": f"{op} {limit:g} {unit}",
            "value": None if value is None else round(value, 3),
            "unit": unit,
            "met": None if value is None else (value <= limit if op == "<=" else value >= limit),
        }
        for name, op, limit, value, unit in goals
    ]
    return report


# --------------------------------------------------------------------------------------
# output


def _row(label: str, stats: dict[str, Any] | None, width: int = 46) -> str:
    if stats is None:
        return f"{label:<{width}}  -"
    return (
        f"{label:<{width}}{stats['p50']:>9.2f}{stats['p90']:>9.2f}{stats['min']:>9.2f}"
        f"{stats['max']:>9.2f}{stats['n']:>5}"
    )


def _page_lines(report: dict[str, Any]) -> Iterator[str]:
    cols = (("restore_warm", "restore", ".1f"), ("restore_cold", "from disk", ".1f"),
            ("open", "open", ".1f"), ("reload", "reload", ".1f"),
            ("freed_share", "came back", ".1%"), ("snapshot_raw", "snap KiB", ".1f"),
            ("compression", "LZ4 ratio", ".2f"))  # fmt: skip
    yield f"{'per page, p50 (ms unless said)':<31}" + "".join(f"{h:>11}" for _, h, _ in cols)
    for page, row in report["per_page"].items():
        cells = []
        for key, _, spec in cols:
            value = row.get(key)
            if key == "snapshot_raw" and value is not None:
                value /= 1024
            cells.append(f"{num(value, spec):>11}")
        yield f"{page:<31}" + "".join(cells)


def render(report: dict[str, Any]) -> str:
    p, mem, warm = report["pressure"], report["memory"], report["warm_tier"]
    lines = [
        f"fos-host lifecycle benchmark: {report['runs']} sample(s) of each of {len(PAGES)} "
        f"demo pages in one Host; then {p['onsets']} pressure onset(s) in a Host with the "
        "lifecycle on",
        machine_line(report["machine"]),
        "",
        f"{'step (ms)':<46}{'p50':>9}{'p90':>9}{'min':>9}{'max':>9}{'n':>5}",
    ]
    peers = False
    for e in report["steps"].values():
        if e["peer"] and not peers:
            lines.append("peers, for orientation:")
            peers = True
        lines.append(_row(e["label"], e["ms"]))
    lines += failure_lines([report["samples"]], "samples")
    lines += ["", *_page_lines(report), ""]
    share = mem["freed_share"]
    lines.append(
        f"memory per hibernation: Event.freed p50 {num(_p50(mem['freed_mib']))} MiB, the "
        f"renderers' parent dropped p50 {num(_p50(mem['dropped_mib']))} MiB: "
        f"{num(share and share['p50'], '.1%')} came back (p90 "
        f"{num(share and share['p90'], '.1%')}, min {num(share and share['min'], '.1%')})"
    )
    if "ratio" in warm:
        lines.append(
            f"warm tier after hibernating {warm['tabs']} tabs (one per page): "
            f"{warm['raw_bytes'] / 1024:.1f} KiB of snapshots in {warm['stored_bytes'] / 1024:.1f}"
            f" KiB, {warm['ratio']:.2f}x"
        )
    else:
        lines.append(f"warm tier: no figure: {warm.get('error', 'not measured')}")
    window = p["trigger_window_s"]
    lines += [
        "",
        f"pressure onset -> first level change p50 {num(_p50(p['level_s']), '.3f')} s, -> first "
        f"action p50 {num(_p50(p['action_s']), '.3f')} s (p90 "
        f"{num(p['action_s'] and p['action_s']['p90'], '.3f')} s; "
        f"{len(p['samples_s'])} onsets: {', '.join(f'{v:.2f}' for v in p['samples_s'])} s)",
        f"  source: {p['source'] or '-'}; trigger window allowed here: "
        f"{f'{window:g} s' if window else '-'}; first actions: {', '.join(p['first_actions'])}",
        f"  {p['sources']}",
    ]
    lines += failure_lines([p], "onsets")
    lines += goal_lines(report, 38, 12)
    return "\n".join(lines)


def run_lifecycle_bench(
    runs: int | None = None, onsets: int | None = None, quick: bool = False, as_json: bool = False
) -> int:
    """Measure and print (a table, or JSON); 0 unless a figure is missing. `quick`: one sample
    of every page and one pressure onset, to see that it works."""
    report = measure(
        runs=runs if runs is not None else QUICK_RUNS if quick else RUNS,
        onsets=onsets if onsets is not None else QUICK_ONSETS if quick else ONSETS,
    )
    print(json.dumps(report, indent=2) if as_json else render(report), flush=True)
    return 1 if report["failed"] else 0
