"""The host's own work in four priorities, and which priority each tab tier's work gets.

    scheduler = Scheduler(limit=2)
    future = scheduler.submit(Priority.BACKGROUND, lambda: compress(tab), "hibernate tab 7")
    await future                                  # its result, or its exception

The priorities are the seed's (and the web's `scheduler.postTask`, plus idle):

- **user-blocking** — the user waits on it (activating a tab, restoring its snapshot): it
  starts at once, never queued and never counted against the limit. Keep it short and rare.
- **user-visible** — what the user will notice soon (loading a background tab): up to `limit`
  tasks at once, and always first in line for a free slot.
- **background** — housekeeping (hibernating, writing snapshots to disk): shares the slots, but
  never takes the last one, so user-visible work never queues behind background work.
- **idle** — only when nothing else is queued or running (tidying the snapshot store).

Within a priority, first come first served. A running task is never preempted (asyncio cannot,
and cancelling would lose its work): the slot it holds is given to the highest priority
waiting when it ends, which is why background work never holds the last slot. Tasks are
submitted as factories, not coroutines, so one cancelled while queued never made a coroutine
that would warn it was never awaited.

The same priorities rank the tabs' renderers: cgroups/tiers.toml gives each tier a `priority`
next to its CPU weight (active → user-visible, background → background, frozen → idle), read
by `tier_priorities()`: the host runs work on a tab's behalf at its tier's priority.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fos_host.errors import FosError
from fos_host.kernel.cgroup import TierProfile, load_tiers

T = TypeVar("T")


class Priority(enum.Enum):
    """Highest first. The values are the names used in cgroups/tiers.toml."""

    USER_BLOCKING = "user-blocking"
    USER_VISIBLE = "user-visible"
    BACKGROUND = "background"
    IDLE = "idle"


_SHARED = (Priority.USER_VISIBLE, Priority.BACKGROUND, Priority.IDLE)  # these count the limit
_LOW = (Priority.BACKGROUND, Priority.IDLE)  # these never take the last slot


@dataclass(eq=False)
class _Job:
    priority: Priority
    factory: Callable[[], Awaitable[Any]]
    name: str
    future: asyncio.Future[Any]
    task: asyncio.Task[None] | None = field(default=None)


class Scheduler:
    """See the module's docstring. One event loop; `close()` (or `async with`) cancels what
    is left."""

    def __init__(self, limit: int = 2) -> None:
        if limit < 2:
            raise ValueError(
                f"limit {limit}: at least 2 (background work never takes the last slot)"
            )
        self.limit = limit
        self._queues: dict[Priority, deque[_Job]] = {p: deque() for p in Priority}
        self._running: set[_Job] = set()
        self._closed = False

    async def __aenter__(self) -> Scheduler:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def submit(
        self, priority: Priority, factory: Callable[[], Awaitable[T]], name: str
    ) -> asyncio.Future[T]:
        """Run `factory()` when `priority` allows; the future gives its result or exception.
        Cancelling the future cancels the task (or, while queued, means it never starts)."""
        if self._closed:
            raise FosError(f"cannot run {name!r}: the scheduler is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        job = _Job(priority, factory, name, future)
        future.add_done_callback(lambda _: self._settled(job))
        self._queues[priority].append(job)
        self._dispatch()
        return future

    def queued(self, priority: Priority) -> int:
        return sum(1 for job in self._queues[priority] if not job.future.done())

    def running(self, priority: Priority) -> int:
        return sum(1 for job in self._running if job.priority is priority)

    async def close(self) -> None:
        """Cancel every queued and running task and wait for the running ones to end."""
        self._closed = True
        for queue in self._queues.values():
            for job in queue:
                job.future.cancel()
            queue.clear()
        tasks = [job.task for job in self._running if job.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- inside ------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while (job := self._next()) is not None:
            job.task = asyncio.get_running_loop().create_task(self._run(job), name=job.name)
            self._running.add(job)

    def _next(self) -> _Job | None:
        """The job to start now, taken off its queue, or None."""
        for queue in self._queues.values():
            while queue and queue[0].future.done():  # cancelled while queued
                queue.popleft()
        if self._queues[Priority.USER_BLOCKING]:
            return self._queues[Priority.USER_BLOCKING].popleft()
        shared = [job for job in self._running if job.priority in _SHARED]
        if len(shared) >= self.limit:
            return None
        if self._queues[Priority.USER_VISIBLE]:
            return self._queues[Priority.USER_VISIBLE].popleft()
        if sum(1 for job in shared if job.priority in _LOW) >= self.limit - 1:
            return None
        if self._queues[Priority.BACKGROUND]:
            return self._queues[Priority.BACKGROUND].popleft()
        busy = any(job.priority is not Priority.IDLE for job in self._running)
        if self._queues[Priority.IDLE] and not busy:
            return self._queues[Priority.IDLE].popleft()
        return None

    async def _run(self, job: _Job) -> None:
        try:
            result = await job.factory()
        except asyncio.CancelledError:
            job.future.cancel()
            raise
        except Exception as e:
            if not job.future.done():
                job.future.set_exception(e)
        else:
            if not job.future.done():
                job.future.set_result(result)
        finally:
            self._running.discard(job)
            if not self._closed:
                self._dispatch()

    def _settled(self, job: _Job) -> None:
        """The future is done: a cancelled one stops its task; a queued one that was
        cancelled may have been what idle work waited behind."""
        if job.task is not None:
            if job.future.cancelled() and not job.task.done():
                job.task.cancel()
        elif not self._closed:
            self._dispatch()


def tier_priorities(tiers: Mapping[str, TierProfile] | None = None) -> dict[str, Priority]:
    """Each tab tier's priority, from its `priority` key (default: cgroups/tiers.toml), so
    work for a tab runs at the priority its renderer's CPU weight already says."""
    profiles = load_tiers() if tiers is None else tiers
    return {name: Priority(profile.priority) for name, profile in profiles.items()}
