"""The lifecycle under real memory pressure: a hog inside the renderers' parent cgroup (so it
counts against their budget) thrashes a file on disk, the pressure monitor raises the level,
and the policy steps the background tabs down — frozen first, then hibernated (discarded
when the level is critical), least recently used first — while the active tab is left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fdcheck import run
from limits import needs_limits
from waiting import until

from fos_host.bench_hog import HELD, Hog
from fos_host.host.host import Host, HostConfig, Tab, TabState
from fos_host.host.lifecycle import Tier
from fos_host.host.pressure import Level, PressureConfig
from fos_host.kernel.cgroup import Limits
from fos_host.services.origin import OriginServer

pytestmark = [pytest.mark.usefixtures("no_fd_leak"), needs_limits]

MiB = 1 << 20
PAGE = "http://news.fos.test/"
FREEING = ("hibernate", "discard")


@contextlib.asynccontextmanager
async def browser(profile: Path, **config: Any) -> AsyncIterator[Host]:
    async with OriginServer() as origin:
        c = HostConfig(profile, resolve=origin.resolve(), resolve_only=True, **config)
        async with Host(c) as host:
            yield host


def test_pressure_steps_background_tabs_down_lru_first(tmp_path: Path, big_file: Path) -> None:
    async def body() -> None:
        config = PressureConfig(dwell=1.0)
        async with browser(tmp_path, pressure=config, action_gap=0.3, warm_renderers=0) as host:
            if host.monitor is None or host.cgroups is None:
                pytest.skip("no pressure monitor here")
            tabs: list[Tab] = [await host.open(PAGE) for _ in range(4)]
            for tab in tabs:
                assert tab.state is TabState.READY, tab.reason
            front, *back = tabs
            for tab in back:  # least recently used first: back[0], back[1], back[2]
                await host.activate(tab.id)
                await asyncio.sleep(1.0)
            await host.activate(front.id)
            assert host.level() is Level.NONE

            parent = host.cgroups.as_cgroup()
            use = parent.memory_use()
            assert use is not None
            # a budget the hog's file pages do not fit in
            parent.set_limits(Limits(memory_max=use.working_set + HELD + 24 * MiB))
            hog_cgroup = host.cgroups.create("sb-hog", Limits())
            try:
                with Hog(hog_cgroup, big_file):
                    await until(
                        lambda: all(not t.tier.has_process for t in back),
                        "every background tab stepped down",
                        seconds=90,
                    )
            finally:
                hog_cgroup.remove()

            steps = [(e.action, e.tab) for e in host.events if e.tab is not None]
            freeing = [tab for action, tab in steps if action in FREEING]
            assert freeing[:3] == [t.id for t in back], steps  # least recently used first
            for tab in back:
                mine = [action for action, t in steps if t == tab.id]
                assert mine[0] == "freeze" or mine[0] == "discard", steps  # frozen first
            assert all(t != front.id for _, t in steps)  # the active tab is left alone
            assert front.tier is Tier.ACTIVE and front.renderer is not None
            freed = [e.freed for e in host.events if e.action in FREEING and e.freed]
            assert len(freed) >= 3 and min(freed) > MiB  # each ended a renderer's cgroup
            levels = [e.why for e in host.events if e.action == "level"]
            assert levels and "none ->" in levels[0]

            # the hog is gone: a stepped-down tab comes back as it was, without a refetch
            tab = back[0]
            await host.activate(tab.id)
            assert tab.state is TabState.READY and tab.title == "fOS News"
            assert tab.reason == ""  # restored from its snapshot (else: "reloaded from its URL")
            assert host.events[-1].action == "restore" and host.events[-1].tab == tab.id

    run(body(), timeout=180)
