"""The tab lifecycle for real: renderers frozen in their cgroups, hibernated into the host's
warm tier (the process killed), discarded to disk, and restored without a refetch; the
policy's idle rule; cold snapshots after a host restart; a corrupt cold file.

Real memory pressure driving these steps: test_lifecycle_pressure.py.
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
from waiting import alive, until

from fos_host.host.host import Host, HostConfig, Tab, TabState
from fos_host.host.lifecycle import Action, Policy, Tier
from fos_host.services.origin import OriginServer

pytestmark = [pytest.mark.usefixtures("no_fd_leak"), needs_limits]

NEWS, SHOP, A = "http://news.fos.test/", "http://shop.fos.test/", "http://a.b.example.co.uk/"


@contextlib.asynccontextmanager
async def browser(profile: Path, **config: Any) -> AsyncIterator[tuple[Host, OriginServer]]:
    async with OriginServer() as origin:
        config.setdefault("warm_renderers", 1)
        config.setdefault("lifecycle", False)
        c = HostConfig(profile, resolve=origin.resolve(), resolve_only=True, **config)
        async with Host(c) as host:
            yield host, origin


def frozen(tab: Tab) -> bool:
    """The kernel's word (cgroup.events "frozen 1", or v1 freezer.state FROZEN)."""
    assert tab.renderer is not None and tab.renderer.sandbox.cgroup is not None
    return bool(tab.renderer.sandbox.cgroup.stats().frozen)


def pid(tab: Tab) -> int:
    assert tab.renderer is not None, f"tab {tab.id} ({tab.tier}) has no renderer"
    return tab.renderer.pid


def test_freeze_hibernate_discard_and_restore_without_a_refetch(tmp_path: Path) -> None:
    async def body() -> None:
        async with browser(tmp_path) as (host, origin):
            front = await host.open(A)
            await host.activate(front.id)
            tab = await host.open(NEWS + "big")  # a long page: scroll it
            assert tab.page is not None and tab.state is TabState.READY
            await tab.page.scroll(1234)
            before = host.screenshot(tab.id)
            first = pid(tab)

            await host.step(tab.id, Action.FREEZE)
            assert tab.tier is Tier.FROZEN and frozen(tab)
            assert host.screenshot(tab.id) == before  # the frame is still there

            event = await host.step(tab.id, Action.HIBERNATE)
            assert tab.tier is Tier.HIBERNATED and tab.renderer is None
            assert event.freed and event.freed > 1 << 20  # its cgroup's memory
            await until(lambda: not alive(first), "the hibernated renderer ended")
            assert host.crashes == 0

            await host.step(tab.id, Action.DISCARD)
            assert tab.tier is Tier.DISCARDED
            files = list((tmp_path / "snapshots").glob("fos-*.snap"))
            assert len(files) == 1

            fetched = len(origin.seen)
            await host.activate(tab.id)
            assert tab.tier is Tier.ACTIVE and tab.state is TabState.READY
            assert pid(tab) != first and tab.reason == ""
            assert len(origin.seen) == fetched  # restored, not refetched
            assert tab.title == "A very long page"
            assert host.screenshot(tab.id) == before  # same text at the same scroll
            assert not list((tmp_path / "snapshots").glob("fos-*.snap"))  # dropped
            assert front.tier is Tier.BACKGROUND
            actions = [e.action for e in host.events if e.tab == tab.id]
            assert actions == ["freeze", "hibernate", "discard", "restore"]

    run(body(), timeout=120)


def test_background_tabs_freeze_when_idle_and_protected_ones_do_not(tmp_path: Path) -> None:
    async def body() -> None:
        policy = Policy(idle_freeze=0.5)
        async with browser(tmp_path, lifecycle=True, policy=policy) as (host, _):
            front = await host.open(NEWS)
            await host.activate(front.id)
            idle = await host.open(SHOP)
            pinned = host.pin((await host.open(A)).id)
            typed = host.mark_unsaved((await host.open(A + "to-c")).id)
            await until(lambda: idle.tier is Tier.FROZEN, "the idle tab froze")
            assert frozen(idle)
            await asyncio.sleep(1.5)  # the others had their chance
            assert (front.tier, pinned.tier, typed.tier) == (
                Tier.ACTIVE,
                Tier.BACKGROUND,
                Tier.BACKGROUND,
            )
            await host.activate(idle.id)  # thawed, in front
            assert idle.tier is Tier.ACTIVE and not frozen(idle)
            assert front.tier is Tier.BACKGROUND

    run(body(), timeout=120)


def test_discarded_tabs_restore_after_a_host_restart(tmp_path: Path) -> None:
    async def body() -> None:
        async with browser(tmp_path) as (host, _):
            tab = await host.open(NEWS + "article/1")
            assert tab.page is not None
            snapshot = await host.snapshot(tab.id)
            await host.step(tab.id, Action.DISCARD)
            assert tab.tier is Tier.DISCARDED
        async with browser(tmp_path) as (host, origin):
            (tab,) = host.tabs.values()
            assert (tab.tier, tab.url, tab.title) == (
                Tier.DISCARDED,
                NEWS + "article/1",
                "Kernel sandboxes explained",
            )
            assert await host.snapshot(tab.id) == snapshot  # from disk, not from a renderer
            await host.activate(tab.id)
            assert tab.state is TabState.READY and tab.reason == ""
            assert origin.seen == []  # nothing fetched

    run(body(), timeout=120)


def test_a_corrupt_cold_file_reloads_that_tab_only(tmp_path: Path) -> None:
    async def body() -> None:
        async with browser(tmp_path) as (host, origin):
            bad = await host.open(NEWS)
            good = await host.open(SHOP)
            for tab in (bad, good):
                await host.step(tab.id, Action.DISCARD)
            path = tmp_path / "snapshots" / f"fos-{bad.key}.snap"
            data = bytearray(path.read_bytes())
            data[-10] ^= 0xFF  # a flipped byte in the payload
            path.write_bytes(bytes(data))
            fetched = len(origin.seen)

            await host.activate(bad.id)
            assert bad.state is TabState.READY and bad.title == "fOS News"
            assert "snapshot" in bad.reason and str(path) in bad.reason
            assert bad.reason.endswith("reloaded from its URL")
            assert len(origin.seen) == fetched + 1  # reloaded
            await host.activate(good.id)
            assert good.state is TabState.READY and good.reason == ""
            assert len(origin.seen) == fetched + 1  # the other restored from its file
            reloads = [e for e in host.events if e.action == "reload"]
            assert [e.tab for e in reloads] == [bad.id]

    run(body(), timeout=120)


def test_an_emergency_kill_reloads_on_activation(tmp_path: Path) -> None:
    async def body() -> None:
        async with browser(tmp_path) as (host, origin):
            tab = await host.open(NEWS)
            first = pid(tab)
            await host.step(tab.id, Action.KILL)
            await until(lambda: not alive(first), "the killed renderer ended")
            assert tab.tier is Tier.DISCARDED and "memory emergency" in tab.reason
            fetched = len(origin.seen)
            await host.activate(tab.id)
            assert tab.state is TabState.READY
            assert tab.reason.endswith("reloaded from its URL")
            assert len(origin.seen) == fetched + 1

    run(body(), timeout=120)
