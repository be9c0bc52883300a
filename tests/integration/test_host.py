"""The host for real: renderers in sandboxes forked from the zygote, the network and storage
services in sandboxes of their own, pages from an origin server on loopback (the demo sites:
news.fos.test and shop.fos.test are one site, fos.test; a.b.example.co.uk and c.example.co.uk
are one site, example.co.uk; evil.test is another).

The compromised renderer is `fos_host.probe:hostile_renderer`: the real renderer whose
localStorage obeys commands, as an exploited renderer would.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fdcheck import run
from limits import needs_limits
from PIL import Image, ImageChops
from waiting import alive, until

from fos_host.host.host import STORAGE_UID, Host, HostConfig, Tab, TabState
from fos_host.host.sites import BadUrl
from fos_host.ipc.channel import ChannelClosed
from fos_host.services.origin import OriginServer, Sites, demo_sites, redirect

pytestmark = [pytest.mark.usefixtures("no_fd_leak"), needs_limits]

GOLDEN = Path(__file__).parent / "golden"
NEWS, SHOP = "http://news.fos.test/", "http://shop.fos.test/"
A, C, EVIL = "http://a.b.example.co.uk/", "http://c.example.co.uk/", "http://evil.test/"
HOSTILE = "fos_host.probe:hostile_renderer"
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="distinct host uids need root")


@contextlib.asynccontextmanager
async def browser(profile: Path, sites: Sites | None = None, **config: Any) -> AsyncIterator[Host]:
    async with OriginServer(sites) as origin:
        config.setdefault("warm_renderers", 1)
        c = HostConfig(profile, resolve=origin.resolve(), resolve_only=True, **config)
        async with Host(c) as host:
            yield host


def ready(tab: Tab) -> Tab:
    assert tab.state is TabState.READY, f"tab {tab.id} {tab.url}: {tab.state} {tab.reason}"
    return tab


def pid(tab: Tab) -> int:
    assert tab.renderer is not None, f"tab {tab.id} has no renderer: {tab.reason}"
    return tab.renderer.pid


@root_only
def test_two_sites_get_two_renderers_with_their_own_host_uids(tmp_path: Path) -> None:
    async def body() -> None:
        async with browser(tmp_path) as host:
            news = ready(await host.open(NEWS))
            a = ready(await host.open(A))
            assert (news.title, a.title) == ("fOS News", "Example A")
            assert pid(news) != pid(a)
            infos = {i.id: i for i in host.infos()}
            assert infos[news.id].site == "http://fos.test"
            assert infos[a.id].site == "http://example.co.uk"
            uids = {infos[news.id].host_uid, infos[a.id].host_uid}
            assert len(uids) == 2 and 0 not in uids and os.geteuid() not in uids
            # every process of the host runs as its own uid: renderers, warm ones, services
            everyone = [p.sandbox.host_uid for p in host.renderers()]
            assert len(set(everyone)) == len(everyone)
            assert infos[news.id].memory_limit == 64 << 20
            assert infos[news.id].memory and infos[news.id].memory > 0

    run(body(), timeout=120)


def test_same_site_tabs_share_a_renderer_up_to_the_limit(tmp_path: Path) -> None:
    async def body() -> None:
        async with browser(tmp_path, tabs_per_renderer=2) as host:
            news = ready(await host.open(NEWS))
            shop = ready(await host.open(SHOP))  # fos.test too
            third = ready(await host.open(NEWS + "article/1"))
            assert pid(news) == pid(shop)
            assert pid(third) != pid(news)  # two tabs per renderer, then a new one
            a = ready(await host.open(A))
            c = ready(await host.open(C))
            assert pid(a) == pid(c) != pid(news)
            # each view paints its own frame
            assert host.screenshot(news.id) != host.screenshot(shop.id)

    run(body(), timeout=120)


def test_a_cross_site_navigation_swaps_the_process(tmp_path: Path) -> None:
    async def body() -> None:
        async with browser(tmp_path) as host:
            tab = ready(await host.open(NEWS))
            first = pid(tab)
            ready(await host.navigate(tab.id, SHOP))  # same site: same process
            assert pid(tab) == first
            ready(await host.navigate(tab.id, C))
            assert pid(tab) != first and tab.title == "Example C"
            # the renderer it left had no other tab: it ends
            await until(lambda: not alive(first), "the renderer left behind ended")
            assert tab.state is TabState.READY  # a released renderer is no crash
            assert host.crashes == 0

    run(body(), timeout=120)


def test_a_cross_site_redirect_moves_the_tab(tmp_path: Path) -> None:
    async def body() -> None:
        async with browser(tmp_path) as host:
            evil = ready(await host.open(EVIL))
            tab = ready(await host.open(EVIL + "steal"))  # redirects to shop.fos.test/cart
            assert (tab.url, tab.title) == (SHOP + "cart", "Your cart")
            assert tab.renderer is not None and tab.renderer.lock is not None
            assert str(tab.renderer.lock.site) == "http://fos.test"
            assert pid(tab) != pid(evil)
            assert host.bad_messages == 0  # a redirect is not the renderer's fault

    run(body(), timeout=120)


def test_sites_that_redirect_to_each_other_fail_the_navigation_only(tmp_path: Path) -> None:
    sites = demo_sites()
    sites["evil.test"]["/ping"] = redirect("//shop.fos.test/pong")
    sites["shop.fos.test"]["/pong"] = redirect("//evil.test/ping")

    async def body() -> None:
        async with browser(tmp_path, sites) as host:
            tab = await host.open(EVIL + "ping")
            assert tab.state is TabState.FAILED
            assert tab.reason.startswith("FetchFailed: TooManyRedirects: http://evil.test/ping")
            assert host.bad_messages == 0
            ready(await host.navigate(tab.id, NEWS))  # and the tab still works

    run(body(), timeout=120)


def test_a_compromised_renderer_is_killed_and_the_others_live_on(tmp_path: Path) -> None:
    async def body() -> None:
        async with browser(tmp_path, renderer_entry=HOSTILE) as host:
            shop = ready(await host.open(SHOP))
            assert shop.page is not None
            await shop.page.local_set("cart", b"secret cart")
            evil = ready(await host.open(EVIL))
            evil_pid = pid(evil)
            assert evil.page is not None
            with pytest.raises(ChannelClosed):  # the host kills it instead of answering
                await evil.page.local_get("forge-storage:http://shop.fos.test|cart")
            await until(lambda: evil.state is TabState.CRASHED, "evil crashed")
            assert evil.state is TabState.CRASHED
            assert evil.reason.startswith("killed: bad message: storage of origin")
            assert "http://evil.test" in evil.reason  # the site it was locked to
            assert not alive(evil_pid)
            assert host.bad_messages == 1
            # the other tab lives on, its data intact and still its own
            assert alive(pid(shop)) and shop.state is TabState.READY
            assert await shop.page.local_get("cart") == b"secret cart"

            # the reload of the killed tab gets a new renderer, which fares no better at
            # fetching another site's page
            ready(await host.reload(evil.id))
            assert pid(evil) != evil_pid
            assert evil.page is not None
            with pytest.raises(ChannelClosed):
                await evil.page.local_get("forge-fetch:http://shop.fos.test/cart")
            await until(lambda: evil.state is TabState.CRASHED, "evil crashed")
            assert evil.reason.startswith("killed: bad message: fetch of 'http://shop.fos.test")
            assert host.bad_messages == 2
            assert shop.state is TabState.READY

    run(body(), timeout=120)


def test_an_out_of_memory_kill_is_reported_on_its_tab_only(tmp_path: Path) -> None:
    async def body() -> None:
        async with browser(tmp_path, renderer_entry=HOSTILE) as host:
            hog = ready(await host.open(NEWS))
            other = ready(await host.open(A))
            other_pid = pid(other)
            # in front: a background tab's memory.high (cgroups/tiers.toml) would throttle
            # it below its limit instead (on cgroup v2), slowly, as it is meant to
            await host.activate(hog.id)
            assert hog.page is not None
            with pytest.raises(ChannelClosed):
                await hog.page.local_set("alloc", b"200")
            await until(lambda: hog.state is TabState.CRASHED, "hog crashed")
            assert (hog.state, hog.reason) == (
                TabState.CRASHED,
                "crashed: out of memory at the 64 MiB limit",
            )
            assert host.crashes == 1 and host.bad_messages == 0
            info = {i.id: i for i in host.infos()}
            assert info[hog.id].state == "crashed" and info[hog.id].pid is None
            assert alive(other_pid) and ready(other) is other
            with pytest.raises(Exception, match="shows nothing"):
                host.screenshot(hog.id)
            ready(await host.reload(hog.id))  # respawns
            assert hog.title == "fOS News"

    run(body(), timeout=120)


def test_a_renderer_killed_from_outside_shows_why_and_reload_respawns(tmp_path: Path) -> None:
    async def body() -> None:
        async with browser(tmp_path) as host:
            tab = ready(await host.open(NEWS))
            first = pid(tab)
            os.kill(first, signal.SIGKILL)
            await until(lambda: tab.state is TabState.CRASHED, "tab crashed")
            assert tab.reason == "crashed: killed by signal SIGKILL"
            ready(await host.reload(tab.id))
            assert pid(tab) != first

    run(body(), timeout=120)


def test_the_screenshot_shows_the_page(tmp_path: Path) -> None:
    async def body() -> bytes:
        async with browser(tmp_path) as host:
            tab = ready(await host.open(NEWS))
            return host.screenshot(tab.id)

    png = run(body(), timeout=120)
    got = Image.open(io.BytesIO(png)).convert("RGB")
    want = Image.open(GOLDEN / "news.png").convert("RGB")
    assert got.size == want.size == (800, 600)
    same = ImageChops.difference(got, want).convert("L").histogram()[0]
    differ = 800 * 600 - same
    assert differ <= 0.005 * 800 * 600, f"{differ} pixels differ from golden/news.png"
    ink = 800 * 600 - got.convert("L").histogram()[255]
    assert ink > 2000  # text was painted (a blank frame would match nothing above anyway)


def test_storage_is_per_origin_and_survives_the_host(tmp_path: Path) -> None:
    async def body() -> None:
        async with browser(tmp_path) as host:
            news = ready(await host.open(NEWS))
            shop = ready(await host.open(SHOP))
            assert news.page is not None and shop.page is not None
            await news.page.local_set("theme", b"dark")
            assert await shop.page.local_get("theme") is None  # same site, other origin
        async with browser(tmp_path) as host:  # a new host on the same profile
            news = ready(await host.open(NEWS))
            assert news.page is not None
            assert await news.page.local_get("theme") == b"dark"

    run(body(), timeout=120)
    files = list((tmp_path / "storage").iterdir())
    assert any(f.name.startswith("http_news.fos.test") for f in files)
    if os.geteuid() == 0:  # the storage service's own uid, not root's
        assert {f.stat().st_uid for f in files} == {STORAGE_UID}


def test_a_dead_service_is_restarted(tmp_path: Path) -> None:
    async def body() -> None:
        async with browser(tmp_path) as host:
            ready(await host.open(NEWS))
            network = host._services["network"].sandbox.pid
            os.kill(network, signal.SIGKILL)

            def restarted() -> bool:
                service = host._services.get("network")
                return service is not None and service.sandbox.pid != network

            await until(restarted, "the network service was restarted")
            ready(await host.open(SHOP))

    run(body(), timeout=120)


def test_the_host_raises_its_open_files_limit_to_the_hard_one(tmp_path: Path) -> None:
    """Several fds per renderer: at the usual soft limit of 1024 a host with ~150 renderers
    would fail with EMFILE (the sandboxes set their own limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))

    async def body() -> None:
        async with browser(tmp_path):
            assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)

    try:
        run(body(), timeout=120)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_bad_urls_leave_no_tab(tmp_path: Path) -> None:
    async def body() -> None:
        async with browser(tmp_path) as host:
            for url in ("about:blank", "file:///etc/passwd", "http://exa mple.com/"):
                with pytest.raises(BadUrl):
                    await host.open(url)
            assert host.tabs == {}
            tab = await host.open("http://unknown.test/")  # not in the resolve map
            assert tab.state is TabState.FAILED
            assert tab.reason.startswith("FetchFailed: FetchFailed: DNS")

    run(body(), timeout=120)
