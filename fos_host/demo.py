"""`fos-host demo`: the browser's process model, live, needing nothing outside this machine.

It starts the built-in origin server (services/origin.py) on loopback and a `Host` whose
network service resolves the demo's names to that server and nowhere else (`resolve_only`),
opens a dozen tabs across its sites (`PAGES`), brings the first one to the front and shows
which sandboxed renderer each tab lives in: its pid, its host uid, its site, the memory of
its cgroup against the limit, and its state. Everything runs in a temporary profile.

On a terminal the table is redrawn twice a second until Ctrl-C or SIGTERM; with `--once`, or
when stdout is not a terminal (CI, a pipe), it is printed once as plain text after every tab
has finished loading. Either way the host (renderers, services, zygote, cgroups), the origin
server and the profile are gone before it exits.

`fos-host demo --sandbox-report` is the other half: one sandbox seen from inside
(sandbox_report.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from rich.text import Text

from fos_host.errors import ConfigError, FosError
from fos_host.host.host import Host, HostConfig, TabState
from fos_host.interfaces.control import TabView
from fos_host.kernel.cgroup import format_size
from fos_host.services.origin import OriginServer
from fos_host.tables import Row, fitted_table, memory_text, number_text, state_text, stdout_console

# What the tabs show, in order; `--tabs N` takes the first N (and starts over past the end).
# The first twelve cover what site isolation has to get right.
PAGES = (
    "http://news.fos.test/",
    "http://news.fos.test/article/1",
    "http://news.fos.test/moved",  # two redirects within the site, to /article/1
    "http://news.fos.test/to-shop",  # to shop.fos.test: the same site (fos.test), no move
    "http://news.fos.test/big",  # 3 MiB of text: a renderer that uses its memory
    "http://shop.fos.test/",
    "http://shop.fos.test/cart",
    "http://a.b.example.co.uk/",  # a.b.example.co.uk and c.example.co.uk: one site,
    "http://c.example.co.uk/",  # http://example.co.uk (co.uk is a public suffix)
    "http://a.b.example.co.uk/to-c",
    "http://evil.test/",
    "http://evil.test/steal",  # a cross-site redirect: the tab moves to a fos.test renderer
    "http://news.fos.test/article/2",
    "http://news.fos.test/slow",  # trickles in over a few seconds
)
DEFAULT_TABS = 12
MAX_TABS = 100  # each tab is a renderer process of up to 64 MiB: a ceiling against typos
REDRAW = 0.5  # seconds between redraws of the live table
SETTLE = 30.0  # --once: seconds for every tab to finish loading, redirects included
COLUMNS = ("tab", "title", "url", "site", "pid", "host uid", "memory", "state")
NUMERIC_COLUMNS = frozenset({"tab", "pid", "host uid"})


@dataclass(frozen=True)
class Totals:
    """The footer line, and the summary at the end."""

    tabs: int
    sites: int
    renderers: int  # live renderer processes, the warm ones included
    warm: int  # running but not yet locked to a site
    memory: int  # bytes, the renderers' cgroups together
    bad_messages: int
    crashes: int

    @classmethod
    def of(cls, host: Host, infos: list[TabView]) -> Totals:
        renderers = host.renderers()
        return cls(
            tabs=len(infos),
            sites=len({i.site for i in infos if i.site}),
            renderers=len(renderers),
            warm=sum(p.lock is None for p in renderers),
            memory=sum(p.memory() or 0 for p in renderers),
            bad_messages=host.bad_messages,
            crashes=host.crashes,
        )

    def __str__(self) -> str:
        return (
            f"{self.tabs} tabs on {self.sites} sites in {self.renderers - self.warm} renderers "
            f"(+{self.warm} warm) · renderer memory {format_size(self.memory)} · "
            f"{self.bad_messages} bad messages · {self.crashes} crashes"
        )


def run_demo(tabs: int | None = None, once: bool = False, as_json: bool = False) -> int:
    """Run the demo with `tabs` tabs (None: DEFAULT_TABS); see the module docstring. 0 when
    it ends by a signal or, with --once or no terminal, when every tab loaded; 1 when a tab
    did not. `as_json` (implies `once`): the table as JSON, each tab's `TabView` with the URL
    it was opened with, and the totals."""
    tabs = DEFAULT_TABS if tabs is None else tabs
    if not 1 <= tabs <= MAX_TABS:
        raise ConfigError(f"--tabs wants 1 to {MAX_TABS} tabs, not {tabs}")
    console = stdout_console()
    urls = list(itertools.islice(itertools.cycle(PAGES), tabs))
    live = console.is_terminal and not once and not as_json
    return asyncio.run(_Demo(urls, console, live, as_json).run())


class _Demo:
    def __init__(self, urls: list[str], console: Console, live: bool, as_json: bool) -> None:
        self.urls = urls
        self.console = console
        self.live = live
        self.as_json = as_json
        self.plain = not console.is_terminal
        self.stopping = asyncio.Event()
        self.stopped_by: signal.Signals | None = None
        self.closed: Totals | None = None  # what the host had when it was closed
        self.opened: dict[int, str] = {}  # tab id -> the URL it was opened with

    async def run(self) -> int:
        """Start, show, shut everything down; after a signal, say so in one line."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        started = time.monotonic()
        ok = await self._run()
        if self.stopped_by is not None:
            c = self.closed
            what = (
                f"closed {c.tabs} tabs and {c.renderers} renderers ({c.bad_messages} bad "
                f"messages, {c.crashes} crashes)"
                if c
                else "stopped while starting"
            )
            print(
                f"fos-host demo: {self.stopped_by.name} after {time.monotonic() - started:.0f} s: "
                f"{what}; the host, the origin server and the temporary profile are gone"
            )
        return 0 if ok or self.stopped_by else 1

    def _on_signal(self, sig: signal.Signals) -> None:
        """A SIGINT or SIGTERM stops the demo at the next safe point: between two tabs while
        opening them, at once while showing. Nothing is cancelled midway (a Host call cut
        short can leave a spawn running on the host's worker thread with its fds closed
        under it), and later signals are ignored (`timeout`, for one, signals twice): the
        shutdown must finish, or cgroups and the profile would be left behind."""
        if self.stopped_by is None:
            self.stopped_by = sig
            self.stopping.set()

    async def _run(self) -> bool:
        """Whether every tab opened and loaded (--once, or no terminal), or True after the
        live table; everything started here is closed when it returns."""
        async with contextlib.AsyncExitStack() as stack:
            profile = stack.enter_context(tempfile.TemporaryDirectory(prefix="fos-demo-"))
            with _Progress(len(self.urls) + 1 + (not self.live)) as progress:
                origin = await stack.enter_async_context(OriginServer())
                config = HostConfig(
                    profile=Path(profile), resolve=origin.resolve(), resolve_only=True
                )
                host = await stack.enter_async_context(Host(config))
                stack.callback(self._closing, host)  # runs first: the host is still up
                progress.advance(
                    f"host up: zygote, network and storage services, "
                    f"{config.warm_renderers} warm renderers; origin server on "
                    f"{origin.address}:{origin.port}"
                )
                opened = await self._open_tabs(host, progress)
                if not self.live and not self.stopping.is_set():
                    progress.describe("waiting for the pages to load")
                    loading = await self._settle(host, SETTLE)
                    progress.advance(f"still loading: {loading}" if loading else "all loaded")
            if self.stopping.is_set():
                return True
            if host.tabs:
                await host.activate(min(host.tabs))
            if self.live:
                await self._show_live(host)
                return True
            if self.as_json:
                print(json.dumps(self._data(host), indent=2))
            else:
                self.console.print(self._view(host))
            return opened and all(i.state == "ready" for i in host.infos())

    def _closing(self, host: Host) -> None:
        self.closed = Totals.of(host, host.infos())

    async def _open_tabs(self, host: Host, progress: _Progress) -> bool:
        """One by one, each returning once its renderer has started to load the page (the
        pages load on meanwhile), so that a signal stops it between two tabs. A tab that
        cannot be opened is reported and the others go on; whether all opened."""
        ok = True
        for url in self.urls:
            if self.stopping.is_set():
                break
            try:
                tab = await host.open(url, wait=False)
            except (FosError, OSError) as e:
                progress.advance(f"cannot open {url}: {e}", error=True)
                ok = False
                continue
            self.opened[tab.id] = url
            progress.advance(f"tab {tab.id} opened: {url}")
        return ok

    async def _settle(self, host: Host, timeout: float) -> int:
        """Wait until no tab is loading (a redirect to another site loads a second time),
        for `timeout` seconds at most, or until a signal; how many are still loading."""
        deadline = time.monotonic() + timeout
        while not self.stopping.is_set() and time.monotonic() < deadline:
            loading = sum(tab.state is TabState.LOADING for tab in host.tabs.values())
            if not loading:
                return 0
            await asyncio.sleep(0.05)
        return sum(tab.state is TabState.LOADING for tab in host.tabs.values())

    async def _show_live(self, host: Host) -> None:
        """Redraw every REDRAW seconds until a signal; the last table stays on the screen.
        Redrawn from here, not by rich's own refresh thread, which would read the host's
        state while the event loop changes it."""
        with Live(self._view(host), console=self.console, auto_refresh=False) as live:
            while not self.stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), REDRAW)
                live.update(self._view(host), refresh=True)

    def _view(self, host: Host) -> Group:
        """The table of tabs and the totals below it. A terminal too narrow for every column
        loses the titles first."""
        infos = sorted(host.infos(), key=lambda i: i.id)
        totals = Totals.of(host, infos)
        rows = [self._row(i) for i in infos]
        table = fitted_table(self.console, rows, COLUMNS, NUMERIC_COLUMNS, drop="title")
        lines: list[RenderableType] = [table, Text(f"{totals}   (* the active tab)")]
        if self.live:
            lines.append(Text("Ctrl-C stops the demo and shuts everything down", style="dim"))
        return Group(*lines)

    def _data(self, host: Host) -> dict[str, object]:
        """What the table shows, as JSON-ready data (`--json`)."""
        infos = sorted(host.infos(), key=lambda i: i.id)
        tabs = [asdict(i) | {"opened": self.opened.get(i.id, i.url)} for i in infos]
        return {"tabs": tabs, "totals": asdict(Totals.of(host, infos))}

    def _row(self, i: TabView) -> Row:
        """One tab's cells by column. A redirected tab shows where it started: after its URL
        in plain text, below it on a terminal (which keeps the column narrow)."""
        return {
            "tab": f"*{i.id}" if i.active else str(i.id),
            "title": i.title,
            "url": _url_text(i.url, self.opened.get(i.id, i.url), " " if self.plain else "\n"),
            "site": i.site,
            "pid": number_text(i.pid),
            "host uid": number_text(i.host_uid),
            "memory": memory_text(i),
            "state": state_text(i, self.plain),
        }


class _Progress:
    """Start-up progress on stderr: a bar on a terminal; one line per step otherwise, so a CI
    log shows how far it got. The bar goes away once the table is shown."""

    def __init__(self, total: int) -> None:
        console = Console(stderr=True)
        self._lines = not console.is_terminal
        self._bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
            transient=True,
        )
        self._task = self._bar.add_task("starting the origin server and the host", total=total)

    def __enter__(self) -> _Progress:
        if not self._lines:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def advance(self, what: str, *, error: bool = False) -> None:
        """One step done; `what` says which."""
        self._bar.advance(self._task)
        self.describe(what, error=error)

    def describe(self, what: str, *, error: bool = False) -> None:
        self._bar.update(self._task, description=what)
        if self._lines or error:  # above the bar, on a terminal
            self._bar.console.print(
                f"fos-host demo: {what}", markup=False, highlight=False, soft_wrap=True
            )


def _url_text(url: str, opened: str, sep: str) -> str:
    """The tab's URL, and where it was opened if a redirect took it elsewhere:
    "http://news.fos.test/article/1 ← /moved" (`sep` " ")."""
    if url == opened:
        return url
    a, b = urlsplit(url), urlsplit(opened)
    return f"{url}{sep}← {b.path if (a.scheme, a.netloc) == (b.scheme, b.netloc) else opened}"
