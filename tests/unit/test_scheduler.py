"""fos_host.host.scheduler: strict priority order, user-blocking work never queued, a slot
always open to user-visible work, idle work only when nothing else runs, cancellation and
close; and each tab tier's priority from cgroups/tiers.toml."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path

import pytest

from fos_host.errors import ConfigError, FosError
from fos_host.host.scheduler import Priority, Scheduler, tier_priorities
from fos_host.kernel.cgroup import PRIORITIES, load_tiers

UB, UV, BG, IDLE = Priority


class Work:
    """Tasks that record when they start and run until released."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self._gates: dict[str, asyncio.Event] = {}

    def task(self, name: str, result: object = None) -> Callable[[], Awaitable[object]]:
        gate = self._gates[name] = asyncio.Event()

        async def run() -> object:
            self.started.append(name)
            try:
                await gate.wait()
            except asyncio.CancelledError:
                self.cancelled.append(name)
                raise
            return result

        return run

    def release(self, name: str) -> None:
        self._gates[name].set()


def in_loop(test: Callable[[], Coroutine[None, None, None]]) -> Callable[[], None]:
    """An async test, run in a new event loop (as the host tests do, without a plugin)."""

    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


async def settle() -> None:
    """Let every ready task run until nothing changes."""
    for _ in range(10):
        await asyncio.sleep(0)


def submit(s: Scheduler, work: Work, priority: Priority, name: str) -> asyncio.Future[object]:
    return s.submit(priority, work.task(name, result=name), name)


@in_loop
async def test_strict_priority_order() -> None:
    work = Work()
    async with Scheduler(limit=2) as s:
        busy = [submit(s, work, UV, "uv-1"), submit(s, work, UV, "uv-2")]
        waiting = [submit(s, work, p, n) for p, n in [(IDLE, "idle"), (BG, "bg"), (UV, "uv-3")]]
        await settle()
        assert work.started == ["uv-1", "uv-2"]  # both slots taken
        assert (s.queued(UV), s.queued(BG), s.queued(IDLE)) == (1, 1, 1)
        work.release("uv-1")
        await settle()
        assert work.started[2:] == ["uv-3"]  # user-visible first, though submitted last
        work.release("uv-2")
        await settle()
        assert work.started[3:] == ["bg"]
        for name in ("uv-3", "bg"):
            work.release(name)
        await settle()
        assert work.started[4:] == ["idle"]  # only once nothing else runs
        work.release("idle")
        assert await asyncio.gather(*busy, *waiting) == ["uv-1", "uv-2", "idle", "bg", "uv-3"]


@in_loop
async def test_background_never_takes_the_last_slot() -> None:
    work = Work()
    async with Scheduler(limit=3) as s:
        for i in range(4):
            submit(s, work, BG, f"bg-{i}")
        await settle()
        assert work.started == ["bg-0", "bg-1"]
        assert (s.running(BG), s.queued(BG)) == (2, 2)
        submit(s, work, UV, "uv")
        await settle()
        assert work.started[2:] == ["uv"]  # not behind the two queued background tasks
        work.release("uv")
        await settle()
        assert work.started[3:] == []  # the freed slot stays open to user-visible work


@in_loop
async def test_user_blocking_is_never_queued() -> None:
    work = Work()
    async with Scheduler(limit=2) as s:
        submit(s, work, UV, "uv-1")
        submit(s, work, UV, "uv-2")
        submit(s, work, UV, "uv-3")
        ub = [submit(s, work, UB, f"ub-{i}") for i in range(3)]
        await settle()
        assert work.started == ["uv-1", "uv-2", "ub-0", "ub-1", "ub-2"]
        assert (s.running(UB), s.queued(UV)) == (3, 1)
        for i in range(3):
            work.release(f"ub-{i}")
        assert await asyncio.gather(*ub) == ["ub-0", "ub-1", "ub-2"]
        await settle()
        assert work.started[5:] == []  # user-blocking work held no slot


@in_loop
async def test_idle_waits_for_everything_else() -> None:
    work = Work()
    async with Scheduler(limit=4) as s:
        submit(s, work, BG, "bg")
        idle = submit(s, work, IDLE, "idle")
        await settle()
        assert work.started == ["bg"]
        assert s.queued(IDLE) == 1
        work.release("bg")
        await settle()
        assert work.started == ["bg", "idle"]
        submit(s, work, UV, "uv")  # idle work already running is not preempted
        await settle()
        assert work.started == ["bg", "idle", "uv"]
        work.release("idle")
        assert await idle == "idle"


@in_loop
async def test_results_and_exceptions_reach_the_future() -> None:
    async def fails() -> None:
        raise ValueError("no room")

    async def answers() -> int:
        return 42

    async with Scheduler() as s:
        assert await s.submit(UV, answers, "answers") == 42
        with pytest.raises(ValueError, match="no room"):
            await s.submit(BG, fails, "fails")


@in_loop
async def test_cancel_queued_never_starts_and_unblocks_idle() -> None:
    work = Work()
    async with Scheduler(limit=2) as s:
        submit(s, work, BG, "bg-1")
        queued = submit(s, work, BG, "bg-2")
        await settle()
        work.release("bg-1")
        queued.cancel()
        idle = submit(s, work, IDLE, "idle")
        await settle()
        assert work.started == ["bg-1", "idle"]
        work.release("idle")
        assert await idle == "idle"
        assert queued.cancelled()


@in_loop
async def test_cancel_running_frees_its_slot() -> None:
    work = Work()
    async with Scheduler(limit=2) as s:
        running = [submit(s, work, UV, "uv-1"), submit(s, work, UV, "uv-2")]
        submit(s, work, UV, "uv-3")
        await settle()
        running[0].cancel()
        await settle()
        assert work.cancelled == ["uv-1"]
        assert work.started == ["uv-1", "uv-2", "uv-3"]


@in_loop
async def test_close_cancels_the_rest() -> None:
    work = Work()
    s = Scheduler(limit=2)
    futures = [submit(s, work, p, f"{p.value}-{i}") for i in range(2) for p in Priority]
    await settle()
    await s.close()
    assert all(f.cancelled() for f in futures)
    assert sorted(work.cancelled) == sorted(work.started)
    assert (s.running(UV), s.running(UB), s.queued(BG)) == (0, 0, 0)
    with pytest.raises(FosError, match="closed"):
        submit(s, work, UB, "late")


def test_limit_leaves_a_slot_for_user_visible_work() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        Scheduler(limit=1)


# ---- tiers ---------------------------------------------------------------------------------


def test_tier_priorities_from_tiers_toml() -> None:
    assert tier_priorities() == {"active": UV, "background": BG, "frozen": IDLE}
    weights = {name: t.cpu_weight for name, t in load_tiers().items()}
    order = list(Priority)
    by_priority = sorted(weights, key=lambda name: order.index(tier_priorities()[name]))
    assert by_priority == sorted(weights, key=lambda name: -weights[name])  # same ranking


def test_priority_names_match_the_tier_files() -> None:
    assert tuple(p.value for p in Priority) == PRIORITIES


TIER = "[t]\ncpu_weight = 5\nmemory_high_ratio = 1\nfreeze = false\n"


def test_tier_priority_default_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "tiers.toml"
    path.write_text(TIER)
    assert tier_priorities(load_tiers(path)) == {"t": BG}
    path.write_text(TIER + 'priority = "idle"\n')
    assert tier_priorities(load_tiers(path)) == {"t": IDLE}
    path.write_text(TIER + 'priority = "urgent"\n')
    with pytest.raises(ConfigError, match=r"\[t\] priority: must be one of user-blocking"):
        load_tiers(path)
