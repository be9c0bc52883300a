"""The host: tabs, the renderer processes they live in, and the services they reach through it.

    async with Host(HostConfig(profile=path)) as host:
        tab = await host.open("https://news.fos.test/")       # returns once it is loaded
        png = host.screenshot(tab.id)

One asyncio process (a child subreaper, through its `Spawner`). At `start()` it starts the
zygote (the renderer engine preloaded, `gc.freeze()`d), the network service and the storage
service (each a sandbox of its own profile), and a warm pool of running, unlocked renderers.

A tab's document goes where `ProcessModel` says (host/sites.py). A renderer from the warm pool
is locked to a site the moment it is taken, before it gets any content, and each tab it shows
is a *view* on a channel of its own (interfaces/renderer.py). Everything a renderer asks for
goes through `_Broker`, which checks it against that renderer's lock: a fetch or a storage
origin outside it is a **bad message** — the renderer is killed, the reason logged and counted,
and its tabs say why. A redirect to another site is not the renderer's fault: the tab moves.

A renderer's exit shows on its tabs with the reason read from its cgroup ("crashed: out of
memory at the 64 MB limit"); `reload` gives the tab a new renderer. If the host dies, every
child dies with it (PDEATHSIG), and the next start removes the cgroups it left (HostCgroups).

Spawning blocks (the zygote's replies, cgroup directories), so every call into the `Spawner`
and its sandboxes runs on one worker thread, in order; the event loop only waits for it. The
zygote was forked before that thread existed and is single-threaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import functools
import itertools
import json
import logging
import mmap
import os
import secrets
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from fos_host.errors import FosError
from fos_host.host.lifecycle import Action, Policy, TabFacts, Tier, decide
from fos_host.host.pressure import Change, Level, PressureConfig, PressureMonitor
from fos_host.host.scheduler import Priority, Scheduler
from fos_host.host.sites import (
    BadUrl,
    MiB,
    ProcessModel,
    SiteLock,
    mem_total,
    process_limit,
    site_of,
)
from fos_host.host.tiered import (
    SnapshotLost,
    SnapshotMeta,
    SnapshotWriteError,
    StoreConfig,
    StoreTier,
    TieredStore,
)
from fos_host.interfaces import network as net
from fos_host.interfaces import storage as st
from fos_host.interfaces.control import Event, TabView
from fos_host.interfaces.renderer import (
    Fetched,
    FetchFailed,
    NotAllowed,
    PageInfo,
    Redirected,
    Renderer,
    RendererHost,
    RendererProcess,
    StorageRefused,
)
from fos_host.ipc.channel import Channel, ChannelClosed
from fos_host.ipc.interface import CallTimeout, Endpoint, Interface, RemoteError
from fos_host.ipc.wire import Memfd, Socket
from fos_host.kernel.cgroup import Budget, HostCgroups, load_budget, load_tiers
from fos_host.kernel.proc import raise_nofile
from fos_host.renderer.paint import frame_size, to_png
from fos_host.sandbox.jail import Jail
from fos_host.sandbox.sandbox import UID_BASE, UID_COUNT, ExitStatus, Sandbox, Spawner
from fos_host.sandbox.zygote import RENDERER_PRELOAD

log = logging.getLogger(__name__)

T = TypeVar("T")
I = TypeVar("I", bound=Interface)  # noqa: E741

RENDERER_ENTRY = "fos_host.renderer.main:main"
STORAGE_UID = UID_BASE + UID_COUNT  # as root: the storage service's files stay its own
FRAME_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
NETWORK_FILES = (
    "/etc/ssl",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
)
MAX_MOVES = 5  # cross-site redirects in a row before a navigation fails
SHUTDOWN_GRACE = 1.0  # seconds a released renderer has to exit by itself
LIFECYCLE_TICK = 1.0  # seconds between looks at the tabs when nothing wakes the policy
SPAWNS_KEPT = 1000  # renderer start times kept (seconds, to ready) for the metrics
EVENTS_KEPT = 1000  # lifecycle events kept for `ctl events`
EVENT_QUEUE = 1000  # events a slow subscriber may fall behind by


@dataclass
class HostConfig:
    """What a host runs with. Sizes are bytes."""

    profile: Path  # storage lives in <profile>/storage
    renderer_memory: int = 64 * MiB  # each renderer's cgroup memory.max (OOM kill above)
    renderer_pids: int = 16
    warm_renderers: int = 2  # running, unlocked renderers kept ready
    spare_sandboxes: int = 1  # set-up sandboxes behind them (the Spawner's pool)
    process_limit: int | None = None  # None: from RAM (sites.process_limit)
    tabs_per_renderer: int = 1
    viewport: tuple[int, int] = (800, 600)
    fetch_timeout: float = 15.0
    max_page_bytes: int = 8 * MiB
    resolve: dict[str, str] = field(default_factory=dict)  # --resolve NAME=ADDR
    resolve_only: bool = False  # names outside `resolve` fail without a DNS lookup
    ca_pem: str | None = None  # extra CA certificates for the network service
    storage_quota: int = 5 * MiB  # per site
    renderer_entry: str = RENDERER_ENTRY  # tests swap in a compromised renderer
    policy: Policy = field(default_factory=Policy)  # when tabs step down (host/lifecycle.py)
    lifecycle: bool = True  # run the policy (off: tabs change tiers only when asked)
    action_gap: float = 1.0  # seconds after an action that freed memory before the next
    store: StoreConfig = field(default_factory=StoreConfig)  # budgets of the snapshot tiers
    pressure: PressureConfig = field(default_factory=PressureConfig)
    budget: Budget | None = None  # the renderers' parent's memory (None: cgroups/budget.toml)


class TabState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"  # the page could not be loaded (the reason says why)
    CRASHED = "crashed"  # its renderer is gone (the reason says why); reload respawns


@dataclass
class View:
    """A tab's document in a renderer: the view's channel and the frame it paints into."""

    endpoint: Endpoint
    page: Renderer
    frame: mmap.mmap  # read-only here; the renderer paints into it

    def close(self) -> None:
        self.endpoint.close()
        self.frame.close()


class RendererProc:
    """A running renderer: its sandbox, its first channel and, once taken, its lock. It
    starts with a view open and a frame attached (`ready_view`), which its first tab takes."""

    def __init__(self, host: Host, sandbox: Sandbox, endpoint: Endpoint) -> None:
        self.sandbox = sandbox
        self.endpoint = endpoint
        self.broker = _Broker(host, self)
        self.control: RendererProcess | None = None  # once connected
        self.ready_view: View | None = None
        self.rid: int | None = None  # ProcessModel's id, once locked
        self.tier = Tier.ACTIVE  # what its cgroup is set to (a new one has the defaults)
        self.lock: SiteLock | None = None
        self.released = False  # the host let it go: its exit is no crash
        self.killed_for: str | None = None  # the bad message it was killed for
        self.status: ExitStatus | None = None

    @property
    def pid(self) -> int:
        return self.sandbox.pid

    def memory(self) -> int | None:
        cg = self.sandbox.cgroup
        if cg is None or self.status is not None:
            return None
        with contextlib.suppress(FosError):
            return cg.stats().memory_current
        return None

    def __repr__(self) -> str:
        return f"<renderer pid={self.pid} site={self.lock.site if self.lock else None}>"


@dataclass
class Tab:
    id: int
    url: str
    title: str = ""
    state: TabState = TabState.LOADING
    reason: str = ""
    active: bool = False
    last_active: float = field(default_factory=time.monotonic)
    tier: Tier = Tier.BACKGROUND
    pinned: bool = False
    unsaved: bool = False  # the user typed into a form: never hibernated or discarded
    key: str = field(default_factory=lambda: secrets.token_hex(8))  # its snapshot's name
    links: list[str] = field(default_factory=list)
    renderer: RendererProc | None = None
    view: View | None = None
    loading: asyncio.Task[None] | None = None

    @property
    def page(self) -> Renderer | None:
        """The proxy to the tab's document in its renderer."""
        return self.view.page if self.view else None

    @property
    def protected(self) -> bool:
        """Never stepped down: in front, pinned, holding unsaved input, or loading."""
        return self.active or self.pinned or self.unsaved or self.state is TabState.LOADING


class Dropped(FosError):
    """The reader of a `Subscription` fell too far behind and was dropped."""


@dataclass(eq=False)  # compared and hashed by identity: the host keeps a set of them
class Subscription:
    """Lifecycle events from the moment of `Host.subscribe`, in order, until dropped."""

    queue: asyncio.Queue[Event | None] = field(
        default_factory=lambda: asyncio.Queue(maxsize=EVENT_QUEUE + 1)  # + 1: the end mark
    )

    async def next(self) -> Event:
        """The next event; `Dropped` after the last one a reader that fell behind was given."""
        event = await self.queue.get()
        if event is None:
            raise Dropped(
                f"this event reader fell {EVENT_QUEUE} events behind and was dropped "
                f"(the host keeps the last {EVENTS_KEPT}: read them again from there)"
            )
        return event


class Service:
    """A service sandbox and the proxy to what it offers."""

    def __init__(self, name: str, sandbox: Sandbox, endpoint: Endpoint) -> None:
        self.name = name
        self.sandbox = sandbox
        self.endpoint = endpoint


class Host:
    """See the module's docstring. Use as an async context manager."""

    def __init__(self, config: HostConfig) -> None:
        self.config = config
        limit = config.process_limit or process_limit(mem_total())
        self.model = ProcessModel(limit, config.tabs_per_renderer)
        self.tabs: dict[int, Tab] = {}
        self.bad_messages = 0
        self.crashes = 0
        self.oom_kills = 0  # renderers ended by the kernel's OOM killer in their cgroup
        self.spawn_seconds: deque[float] = deque(maxlen=SPAWNS_KEPT)  # renderer starts
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="fos-spawn")
        self._spawner: Spawner | None = None
        self._renderers: dict[int, asyncio.Future[RendererProc]] = {}  # rid -> locked renderer
        self._warm: deque[RendererProc] = deque()
        self._warming = 0
        self._live: set[RendererProc] = set()
        self._services: dict[str, Service] = {}
        self._tab_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self.tiers = load_tiers()
        self.scheduler = Scheduler()  # the host's own work: lifecycle steps, store upkeep
        self.store = TieredStore(Path(config.profile) / "snapshots", config.store)
        self.monitor: PressureMonitor | None = None
        self.monitor_error = "not started"  # why there is no monitor, when there is none
        self.events: deque[Event] = deque(maxlen=EVENTS_KEPT)
        self._subscribers: set[Subscription] = set()
        self._wake = asyncio.Event()

    # -- start and stop ------------------------------------------------------------------------

    async def __aenter__(self) -> Host:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Zygote, services, warm renderers: returns when all are up."""
        raise_nofile()  # several fds per renderer (sandboxes set their own limit)
        spawner = Spawner(zygote=True, pool=self.config.spare_sandboxes, preload=RENDERER_PRELOAD)
        self._spawner = await self._run(spawner.__enter__)
        if self.config.spare_sandboxes:
            await self._run(spawner.prewarm, self._renderer_jail())
        await asyncio.gather(self._start_network(), self._start_storage())
        await self.fill_warm_pool()
        for key, meta in self.store.cold_entries().items():  # discarded before a restart
            tab = Tab(next(self._tab_ids), meta.url, meta.title, TabState.READY)
            tab.tier, tab.key = Tier.DISCARDED, key
            self.tabs[tab.id] = tab
        await self._start_monitor()
        if self.config.lifecycle:
            self._background(self._lifecycle())

    async def close(self) -> None:
        """Close every tab, renderer and service, and the zygote; leaves nothing behind."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        for tab in self.tabs.values():
            self._stop_loading(tab)
            self._detach(tab)
        self.tabs.clear()
        for proc in list(self._live):
            self._unwatch(proc)
            self._drop(proc)
        for service in self._services.values():
            self._unwatch_service(service)
            service.endpoint.close()
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        await self.scheduler.close()
        if self._spawner is not None:
            await self._run(self._spawner.close)  # kills, reaps and removes what is left
            self._spawner = None
        self._live.clear()
        self._warm.clear()
        self._renderers.clear()
        self._services.clear()
        self._worker.shutdown()

    async def _run(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """`fn` on the spawn worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, lambda: fn(*args, **kw))

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- sandboxes ---------------------------------------------------------------------------

    async def _spawn(
        self,
        jail: Jail,
        entry: str,
        args: tuple[str, ...],
        name: str,
        uid: int | None = None,
        extra: tuple[int, ...] = (),
    ) -> tuple[Sandbox, Channel]:
        """A sandbox running `entry`, with the other end of its channel at fd 3 and the
        `extra` fds (which this closes) at 4, 5, ..."""
        spawner = self._spawner
        assert spawner is not None
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        jail.pass_fd(theirs.fileno(), 3)
        for target, fd in enumerate(extra, 4):
            jail.pass_fd(fd, target)

        def spawn() -> Sandbox:  # the worker closes the fds: it may outlive a cancelled wait
            try:
                return spawner.spawn(jail, entry=entry, args=args, uid=uid)
            finally:
                theirs.close()
                for fd in extra:
                    os.close(fd)

        try:
            sandbox = await self._run(spawn)
        except BaseException:
            mine.close()
            raise
        return sandbox, Channel(mine, name=f"{name} {sandbox.pid}")

    def _renderer_jail(self) -> Jail:
        jail = Jail("renderer").memory(self.config.renderer_memory).pids(self.config.renderer_pids)
        return jail.hostname("fos-renderer")

    async def _start_renderer(self) -> RendererProc:
        """A new renderer, with its first view's channel and frame passed at spawn (fds 4
        and 5), so that it is ready as soon as both channels said HELLO."""
        c = self.config
        started = time.monotonic()
        w, h = c.viewport
        view_mine, view_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            frame_fd = _frame(w, h)
        except BaseException:
            view_mine.close()
            view_theirs.close()
            raise
        frame = mmap.mmap(frame_fd, frame_size(w, h), mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            sandbox, channel = await self._spawn(
                self._renderer_jail(), c.renderer_entry, ("--view", f"{w}x{h}"), "renderer",
                extra=(view_theirs.detach(), frame_fd),
            )  # fmt: skip
        except BaseException:
            view_mine.close()
            frame.close()
            raise
        endpoint = Endpoint(channel, {}, call_timeout=c.fetch_timeout + 10)
        proc = RendererProc(self, sandbox, endpoint)  # watched before it is connected
        endpoint.on_bad_message = lambda why: self._bad_message(proc, f"protocol: {why}")
        self._live.add(proc)
        self._watch(proc)
        view = self._view_endpoint(proc, view_mine)
        try:
            await asyncio.gather(endpoint.connect(), view.connect())
            proc.control = endpoint.proxy(RendererProcess)
            proc.ready_view = View(view, view.proxy(Renderer), frame)
        except (FosError, OSError) as e:
            view.close()
            frame.close()
            self._kill(proc)
            raise FosError(f"renderer pid={proc.pid} did not start: {e}") from e
        self.spawn_seconds.append(time.monotonic() - started)
        log.debug("renderer pid=%d uid=%d started", sandbox.pid, sandbox.host_uid)
        return proc

    def _watch(self, proc: RendererProc) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(proc.sandbox.pidfd, self._exited, proc)

    def _unwatch(self, proc: RendererProc) -> None:
        if proc.sandbox.pidfd >= 0:
            asyncio.get_running_loop().remove_reader(proc.sandbox.pidfd)

    def _kill(self, proc: RendererProc) -> None:
        """SIGKILL its pid 1, which takes its whole pid namespace with it; `_exited` follows."""
        if proc.status is None and proc.sandbox.pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(proc.sandbox.pidfd, signal.SIGKILL)

    def _exited(self, proc: RendererProc) -> None:
        self._unwatch(proc)
        if self.monitor is not None and proc.sandbox.cgroup is not None:
            self.monitor.unwatch(proc.sandbox.cgroup)
        status = proc.sandbox.poll()
        assert status is not None  # the pidfd is readable once it exited
        proc.status = status
        self._drop(proc)
        self._live.discard(proc)
        with contextlib.suppress(ValueError):
            self._warm.remove(proc)
        reason = f"killed: bad message: {proc.killed_for}" if proc.killed_for else None
        if reason is None and not proc.released:
            reason = f"crashed: {status.describe()}"
        if status.oom_kills and status.signal is not None:
            self.oom_kills += 1
        if reason is not None:
            self.crashes += 1
            log.warning(
                "renderer pid=%d site=%s: %s", proc.pid, proc.lock and proc.lock.site, reason
            )
            for tab in self.tabs.values():
                if tab.renderer is proc:
                    self._detach(tab)
                    self.model.close(tab.id)
                    tab.state, tab.reason = TabState.CRASHED, reason
        if proc.rid is not None:
            self._renderers.pop(proc.rid, None)
        if not self._closing:
            self._background(self._run(proc.sandbox.close))  # its cgroup goes
            self._background(self.fill_warm_pool())

    def _drop(self, proc: RendererProc) -> None:
        """Close the host's ends of a renderer's channels."""
        proc.endpoint.close()
        if proc.ready_view is not None:
            proc.ready_view.close()
            proc.ready_view = None

    def _bad_message(self, proc: RendererProc, reason: str) -> None:
        """A renderer broke the rules: kill it, log and count why."""
        if proc.killed_for is not None or proc.status is not None:
            return
        self.bad_messages += 1
        proc.killed_for = reason
        site = proc.lock.site if proc.lock else None
        log.error("bad message from renderer pid=%d site=%s: %s", proc.pid, site, reason)
        self._kill(proc)

    # -- the warm pool -----------------------------------------------------------------------

    async def fill_warm_pool(self) -> None:
        """Start renderers until `warm_renderers` are ready or on their way."""
        while not self._closing and len(self._warm) + self._warming < self.config.warm_renderers:
            self._warming += 1
            try:
                proc = await self._start_renderer()
            except (FosError, OSError) as e:
                log.error("cannot start a warm renderer: %s", e)
                return
            finally:
                self._warming -= 1
            if proc.status is None:
                self._warm.append(proc)

    async def settle(self) -> None:
        """Wait until the warm pool is full (or a renderer failed to start, which is logged)
        and the spare sandboxes behind it are ready."""
        while not self._closing:
            await self.fill_warm_pool()
            if len(self._warm) >= self.config.warm_renderers or not self._warming:
                break
            await asyncio.sleep(0.005)  # others are on their way
        if self._spawner is not None:
            await self._run(self._spawner.settle)

    async def _take_renderer(self, rid: int, lock: SiteLock) -> RendererProc:
        """A renderer locked to `lock`: from the warm pool (no wait: its view is open and
        its frame attached), else a new one."""
        proc = None
        while self._warm:
            candidate = self._warm.popleft()
            if candidate.status is None:
                proc = candidate
                break
        if proc is None:
            proc = await self._start_renderer()
        else:  # after this open: the refill's spawn competes with it for the GIL
            asyncio.get_running_loop().call_soon(self._background, self.fill_warm_pool())
        proc.rid, proc.lock = rid, lock
        if self.monitor is not None and proc.sandbox.cgroup is not None:
            self.monitor.watch(proc.sandbox.cgroup)  # a tab's own stall counts too
        log.info("renderer pid=%d uid=%d locked to %s", proc.pid, proc.sandbox.host_uid, lock.site)
        return proc

    async def _renderer(self, rid: int, lock: SiteLock, new: bool) -> RendererProc:
        if new:
            future = asyncio.get_running_loop().create_future()
            self._renderers[rid] = future
            try:
                future.set_result(await self._take_renderer(rid, lock))
            except BaseException as e:
                future.set_exception(e)
                future.exception()  # retrieved: other waiters see it too
                self._renderers.pop(rid, None)
                raise
        return await asyncio.shield(self._renderers[rid])

    def _release(self, rid: int | None, *, at_once: bool = False) -> None:
        """The model let renderer `rid` go (its last tab left): close its channel, which
        ends it; kill it if it is still there after SHUTDOWN_GRACE (`at_once`: now)."""
        if rid is None:
            return
        future = self._renderers.pop(rid, None)
        if future is None or not future.done() or future.exception() is not None:
            return
        proc = future.result()
        proc.released = True
        proc.endpoint.close()
        if at_once:
            self._kill(proc)
        else:
            asyncio.get_running_loop().call_later(SHUTDOWN_GRACE, self._kill, proc)

    # -- services ------------------------------------------------------------------------------

    async def _start_service(
        self, name: str, jail: Jail, entry: str, args: tuple[str, ...], uid: int | None = None
    ) -> None:
        sandbox, channel = await self._spawn(jail, entry, args, name, uid)
        endpoint = Endpoint(channel, {}, call_timeout=self.config.fetch_timeout + 5)
        service = Service(name, sandbox, endpoint)
        asyncio.get_running_loop().add_reader(sandbox.pidfd, self._service_exited, service)
        await endpoint.connect()
        self._services[name] = service  # calls go to it from now on
        log.debug("%s service pid=%d uid=%d started", name, sandbox.pid, sandbox.host_uid)

    def _unwatch_service(self, service: Service) -> None:
        if service.sandbox.pidfd >= 0:
            asyncio.get_running_loop().remove_reader(service.sandbox.pidfd)

    def _service_exited(self, service: Service) -> None:
        self._unwatch_service(service)
        status = service.sandbox.poll()
        assert status is not None
        service.endpoint.close()
        self._services.pop(service.name, None)
        if self._closing:  # the spawner closes it, and nothing is restarted
            return
        log.error("the %s service (pid %d) %s; restarting it", service.name, service.sandbox.pid,
                  status.describe())  # fmt: skip
        self._background(self._run(service.sandbox.close))
        start = self._start_network if service.name == "network" else self._start_storage
        self._background(start())

    async def _start_network(self) -> None:
        c = self.config
        jail = Jail("network").net("host").memory("256M").pids(64).hostname("fos-network")
        for path in NETWORK_FILES:
            if os.path.exists(path):
                jail.ro_bind(path)
        config = {"resolve": c.resolve, "resolve_only": c.resolve_only, "ca_pem": c.ca_pem}
        await self._start_service(
            "network", jail, "fos_host.services.network:run", (json.dumps(config),)
        )

    async def _start_storage(self) -> None:
        c = self.config
        where = Path(c.profile).resolve() / "storage"
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
        uid = STORAGE_UID if os.geteuid() == 0 else None
        if uid is not None:
            for path in [where, *where.rglob("*")]:
                os.chown(path, uid, uid, follow_symlinks=False)
        jail = Jail("storage").memory("256M").pids(16).hostname("fos-storage").bind(str(where))
        await self._start_service(
            "storage",
            jail,
            "fos_host.services.storage:run",
            (str(where.parent), str(c.storage_quota)),
            uid,
        )

    def _service(self, name: str, iface: type[I]) -> I:
        service = self._services.get(name)
        if service is None or service.endpoint.closed:
            raise FetchFailed(f"the {name} service is restarting; try again")
        return service.endpoint.proxy(iface)

    # -- tabs ----------------------------------------------------------------------------------

    async def open(self, url: str, *, wait: bool = True) -> Tab:
        """A new tab showing `url`; returns once the page is loaded (or failed), or with
        `wait=False` once its renderer is ready and loading has begun. BadUrl for a URL
        with no site."""
        site_of(url)
        tab = Tab(next(self._tab_ids), url)
        self.tabs[tab.id] = tab
        try:
            assignment = self.model.assign(tab.id, url)
            await self._attach(tab, self.model.lock_of(assignment.renderer), assignment.renderer,
                               assignment.new)  # fmt: skip
        except BaseException:
            self.tabs.pop(tab.id, None)
            self._detach(tab)
            with contextlib.suppress(KeyError):
                self._release(self.model.close(tab.id))
            raise
        self._background(self._settle_tier(tab))
        await self._start_load(tab, url, wait, moves=0)
        return tab

    async def navigate(self, tab_id: int, url: str, *, wait: bool = True) -> Tab:
        """Show `url` in the tab: in the same renderer within its site, in another one
        across sites (the one it leaves ends if it has no tab left)."""
        return await self._navigate(self.tab(tab_id), url, wait, moves=0)

    async def _navigate(self, tab: Tab, url: str, wait: bool, moves: int) -> Tab:
        site_of(url)
        self._stop_loading(tab)
        if tab.tier is Tier.FROZEN:
            await self._thaw(self._live_proc(tab))
        elif not tab.tier.has_process:  # a new page supersedes the snapshot
            self.store.drop(tab.key)
            tab.tier, tab.reason = (Tier.ACTIVE if tab.active else Tier.BACKGROUND), ""
        if tab.renderer is None:  # crashed, or its renderer failed to start: a new one
            with contextlib.suppress(KeyError):
                self._release(self.model.close(tab.id))
            a = self.model.assign(tab.id, url)
        else:
            a = self.model.navigate(tab.id, url)
        if tab.renderer is None or a.moved:
            self._detach(tab)
            self._release(a.released)
            await self._attach(tab, a.lock, a.renderer, a.new)
        await self._start_load(tab, url, wait, moves)
        return tab

    async def reload(self, tab_id: int, *, wait: bool = True) -> Tab:
        """Load the tab's URL again (in a new renderer if its renderer crashed)."""
        return await self.navigate(tab_id, self.tab(tab_id).url, wait=wait)

    async def close_tab(self, tab_id: int) -> None:
        tab = self.tabs.pop(tab_id, None)
        if tab is None:
            raise KeyError(f"no tab {tab_id}")
        self._stop_loading(tab)
        self._detach(tab)
        self.store.drop(tab.key)
        if tab.state is not TabState.CRASHED and tab.tier.has_process:
            self._release(self.model.close(tab_id))

    async def activate(self, tab_id: int) -> Tab:
        """Bring the tab to the front (the one in front goes to the back): thawed, or
        restored from its snapshot, in the active tier."""
        tab = self.tab(tab_id)
        now = time.monotonic()
        for other in self.tabs.values():
            if other.active and other is not tab:
                other.active, other.last_active = False, now
                if other.renderer is not None and other.renderer.tier is Tier.ACTIVE:
                    await self._set_tier(other.renderer, Tier.BACKGROUND)
        tab.active, tab.last_active = True, now
        await self._revive(tab)
        if tab.renderer is not None and tab.renderer.tier is not Tier.ACTIVE:
            await self._set_tier(tab.renderer, Tier.ACTIVE)
        self._wake.set()
        return tab

    def pin(self, tab_id: int, pinned: bool = True) -> Tab:
        """A pinned tab is never frozen, hibernated or discarded."""
        tab = self.tab(tab_id)
        tab.pinned = pinned
        return tab

    def mark_unsaved(self, tab_id: int, unsaved: bool = True) -> Tab:
        """A tab holding input the user typed is never frozen, hibernated or discarded."""
        tab = self.tab(tab_id)
        tab.unsaved = unsaved
        return tab

    def tab(self, tab_id: int) -> Tab:
        try:
            return self.tabs[tab_id]
        except KeyError:
            raise KeyError(f"no tab {tab_id}") from None

    async def wait_loaded(self, tab_id: int) -> Tab:
        tab = self.tab(tab_id)
        if tab.loading is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(tab.loading)
        return tab

    def screenshot(self, tab_id: int) -> bytes:
        """What the tab shows, as PNG."""
        tab = self.tab(tab_id)
        if tab.view is None:
            why = tab.tier.value if not tab.tier.has_process else f"{tab.state.value} {tab.reason}"
            raise FosError(f"tab {tab_id} shows nothing: {why.rstrip()} (activate it)")
        w, h = self.config.viewport
        with memoryview(tab.view.frame) as view:
            return to_png(view, w, h)

    async def snapshot(self, tab_id: int) -> bytes:
        """The tab's page state (URL, DOM, scroll, form), from its renderer."""
        tab = self.tab(tab_id)
        if not tab.tier.has_process and tab.state is not TabState.CRASHED:
            return await asyncio.to_thread(self.store.get, tab.key, promote=False)
        if tab.tier is Tier.FROZEN:
            await self._thaw(self._live_proc(tab))
        if tab.view is None:
            raise FosError(f"tab {tab_id} has no renderer: {tab.state.value} {tab.reason}".rstrip())
        return await tab.view.page.snapshot()

    def info(self, tab: Tab) -> TabView:
        proc = tab.renderer
        return TabView(
            id=tab.id,
            url=tab.url,
            title=tab.title,
            state=tab.state.value,
            reason=tab.reason,
            site=_site_text(tab.url),
            active=tab.active,
            tier=tab.tier.value,
            pinned=tab.pinned,
            unsaved=tab.unsaved,
            renderer=proc.rid if proc else None,
            pid=proc.pid if proc else None,
            host_uid=proc.sandbox.host_uid if proc else None,
            memory=proc.memory() if proc else None,
            memory_limit=proc.sandbox.limits.memory_max if proc else None,
        )

    def infos(self) -> list[TabView]:
        return [self.info(tab) for tab in self.tabs.values()]

    def renderers(self) -> list[RendererProc]:
        """Every live renderer, warm ones included."""
        return sorted(self._live, key=lambda p: p.pid)

    # -- the lifecycle: tiers, hibernation, restore ------------------------------------------------

    async def _start_monitor(self) -> None:
        """Give the renderers' parent (the host's cgroup) its budget and listen to its
        memory pressure (host/pressure.py). Without cgroups there is no monitor: tabs still
        freeze when idle, and step down when asked."""
        cgroups = self.cgroups
        if cgroups is None:
            self.monitor_error = "no memory pressure monitor: the host has no cgroups of its own"
            log.warning("%s", self.monitor_error)
            return
        parent = cgroups.as_cgroup()
        budget = self.config.budget or load_budget()
        await self._run(parent.set_limits, budget.limits(mem_total()))
        monitor = PressureMonitor(parent, self.config.pressure)
        try:
            monitor.start()
        except FosError as e:
            monitor.close()
            self.monitor_error = f"no memory pressure monitor: {e}"
            log.warning("%s", self.monitor_error)
            return
        monitor.subscribe(self._on_level)
        self.monitor, self.monitor_error = monitor, ""
        log.info("%s", monitor.describe())

    def _on_level(self, change: Change) -> None:
        self._event(None, "level", f"{change.previous.value} -> {change.level.value}: "
                    f"{change.reason}", time.monotonic())  # fmt: skip
        self._wake.set()

    @property
    def cgroups(self) -> HostCgroups | None:
        """The host's cgroup directories: the renderers' parent (`as_cgroup()`), below which
        every sandbox's cgroup is made. None without cgroups (rootless, not delegated)."""
        return self._spawner.cgroups if self._spawner is not None else None

    def level(self) -> Level:
        """The memory pressure level now (NONE without a monitor)."""
        return self.monitor.level if self.monitor is not None else Level.NONE

    def facts(self) -> list[TabFacts]:
        """What the lifecycle policy sees of every tab."""
        now = time.monotonic()
        return [
            TabFacts(
                tab.id,
                tab.tier,
                now - tab.last_active,
                (tab.renderer.memory() or 0) if tab.renderer else 0,
                tab.protected,
                tab.renderer.rid if tab.renderer else None,
            )
            for tab in self.tabs.values()
        ]

    async def _lifecycle(self) -> None:
        """The policy's loop: one action at a time, asked again after each (after
        `action_gap` when the action freed memory, so the pressure signals can see it)."""
        while not self._closing:
            decision = decide(self.facts(), self.level(), self.config.policy)
            if decision is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), LIFECYCLE_TICK)
                continue
            name = f"{decision.action.value} tab {decision.tab}"
            try:
                await self.scheduler.submit(
                    Priority.BACKGROUND,
                    functools.partial(self.step, decision.tab, decision.action, decision.why),
                    name,
                )
            except (FosError, KeyError) as e:
                log.warning("tab %d: %s failed: %s", decision.tab, decision.action.value, e)
                await asyncio.sleep(self.config.action_gap)  # not the same failure at once
            if decision.action is not Action.FREEZE:
                await asyncio.sleep(self.config.action_gap)

    async def step(self, tab_id: int, action: Action, why: str = "asked") -> Event:
        """Carry out one lifecycle action on a tab (and so on every tab of its renderer)."""
        tab = self.tab(tab_id)
        started = time.monotonic()
        freed: int | None = None
        if action is Action.FREEZE:
            await self._freeze(tab)
        elif action is Action.HIBERNATE:
            freed = await self._hibernate(tab)
        elif action is Action.DISCARD:
            if tab.tier.has_process:
                freed = await self._hibernate(tab)
            await self._discard(tab)
        else:
            freed = self._kill_tab(tab)
        return self._event(tab, action.value, why, started, freed)

    def _event(
        self, tab: Tab | None, action: str, why: str, started: float, freed: int | None = None
    ) -> Event:
        event = Event(
            time=time.time(),
            tab=tab.id if tab else None,
            action=action,
            tier=tab.tier.value if tab else "",
            why=why,
            freed=freed,
            ms=round((time.monotonic() - started) * 1000, 3),
            level=self.level().value,
        )
        self.events.append(event)
        for sub in list(self._subscribers):
            if sub.queue.qsize() < EVENT_QUEUE:
                sub.queue.put_nowait(event)
                continue
            # a reader that stopped reading: dropped, and told so after what it has
            log.warning("an event subscriber fell %d events behind: dropped", EVENT_QUEUE)
            self._subscribers.discard(sub)
            sub.queue.put_nowait(None)
        log.info("tab %s: %s (%s) in %.1f ms%s", event.tab, action, why, event.ms,
                 f", {freed} bytes freed" if freed is not None else "")  # fmt: skip
        return event

    def subscribe(self) -> Subscription:
        """Every lifecycle event from now on; `unsubscribe` it when done."""
        sub = Subscription()
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    def _tabs_of(self, proc: RendererProc) -> list[Tab]:
        return [t for t in self.tabs.values() if t.renderer is proc]

    def _live_proc(self, tab: Tab) -> RendererProc:
        if tab.renderer is None:
            raise FosError(f"tab {tab.id} has no renderer ({tab.tier.value})")
        return tab.renderer

    async def _set_tier(self, proc: RendererProc, tier: Tier) -> None:
        """Apply a tier's profile (cgroups/tiers.toml) to a renderer's cgroup: CPU weight,
        memory.high as a share of its limit, frozen or not."""
        profile = self.tiers[tier.value]
        cg = proc.sandbox.cgroup
        if cg is not None:
            limits = profile.limits(proc.sandbox.limits.memory_max)

            def apply() -> None:
                if profile.freeze:
                    cg.set_limits(limits)
                    cg.freeze()
                else:
                    cg.thaw()
                    cg.set_limits(limits)

            await asyncio.to_thread(apply)
        proc.tier = tier
        for t in self._tabs_of(proc):
            t.tier = tier if tier is Tier.FROZEN else (Tier.ACTIVE if t.active else Tier.BACKGROUND)

    async def _settle_tier(self, tab: Tab) -> None:
        """A renderer that got a tab is in the tier of its most active tab (after the open
        has returned: the cgroup writes are not in its way)."""
        proc = tab.renderer
        if proc is None or proc.tier is Tier.FROZEN:
            return
        want = Tier.ACTIVE if any(t.active for t in self._tabs_of(proc)) else Tier.BACKGROUND
        if proc.tier is not want:
            await self._set_tier(proc, want)

    async def _freeze(self, tab: Tab) -> None:
        proc = self._live_proc(tab)
        if proc.tier is Tier.FROZEN:
            return
        await self._set_tier(proc, Tier.FROZEN)

    async def _thaw(self, proc: RendererProc) -> None:
        """A frozen renderer runs again, in the tier of its most active tab."""
        active = any(t.active for t in self._tabs_of(proc))
        await self._set_tier(proc, Tier.ACTIVE if active else Tier.BACKGROUND)

    async def _hibernate(self, tab: Tab) -> int | None:
        """Snapshot every tab of the renderer into the warm tier, then end the renderer;
        the bytes its cgroup held (what ending it freed)."""
        proc = self._live_proc(tab)
        if proc.tier is Tier.FROZEN:
            await self._thaw(proc)  # a frozen renderer answers nothing
        tabs = self._tabs_of(proc)
        snapshots = []
        for t in tabs:
            assert t.view is not None
            snapshots.append(await t.view.page.snapshot())
        freed = proc.memory()
        for t, data in zip(tabs, snapshots, strict=True):
            self.store.put(t.key, data, SnapshotMeta(url=t.url, title=t.title))
        for t in tabs:
            self._detach(t)
            t.tier = Tier.HIBERNATED
            self._release(self.model.close(t.id), at_once=True)
        self._rebalance()
        return freed

    def _rebalance(self) -> None:
        """Soon, at idle priority: keep the snapshot tiers within their budgets."""
        future = self.scheduler.submit(Priority.IDLE, self._rebalance_now, "rebalance snapshots")
        future.add_done_callback(_log_failure)

    async def _rebalance_now(self) -> None:
        """What the store moved to disk is discarded; what it evicted reloads from its URL
        when activated (host/tiered.py)."""
        moves = await asyncio.to_thread(self.store.rebalance)
        by_key = {t.key: t for t in self.tabs.values()}
        for key, tier in moves.demoted:
            tab = by_key.get(key)
            if tab is not None and tier is StoreTier.COLD:
                tab.tier = Tier.DISCARDED
                self._event(tab, "discard", "over the warm tier's budget", time.monotonic())
        for key in moves.evicted:
            if key in by_key:
                self._event(by_key[key], "evict", "over the cold tier's budget", time.monotonic())
        for error in moves.errors:
            log.error("snapshot store: %s", error)

    async def _discard(self, tab: Tab) -> None:
        """The hibernated tab's snapshot goes to disk (the cold tier)."""
        if tab.tier is not Tier.HIBERNATED:
            raise FosError(f"tab {tab.id} is {tab.tier.value}, not hibernated")
        try:
            await asyncio.to_thread(self.store.demote, tab.key, StoreTier.COLD)
        except SnapshotWriteError as e:  # it stays in memory: nothing is lost
            raise FosError(f"tab {tab.id} stays hibernated: {e}") from e
        tab.tier = Tier.DISCARDED
        self._rebalance()

    def _kill_tab(self, tab: Tab) -> int | None:
        """End the tab's renderer without a snapshot (a memory emergency): its tabs reload
        from their URLs when they come back."""
        proc = self._live_proc(tab)
        freed = proc.memory()
        for t in self._tabs_of(proc):
            self._detach(t)
            t.tier = Tier.DISCARDED
            t.reason = "killed under a memory emergency: it reloads when activated"
            self._release(self.model.close(t.id), at_once=True)
        return freed

    async def _revive(self, tab: Tab) -> None:
        """Bring a frozen, hibernated or discarded tab back: thaw it, or give it a renderer
        and restore its snapshot (nothing is fetched). A lost or corrupt snapshot: the tab
        reloads from its URL and says why."""
        if tab.tier is Tier.FROZEN:
            await self._thaw(self._live_proc(tab))
            return
        if tab.tier.has_process:
            return
        started = time.monotonic()
        lost = tab.reason
        a = self.model.assign(tab.id, tab.url)
        await self._attach(tab, a.lock, a.renderer, a.new)
        tab.tier = Tier.ACTIVE if tab.active else Tier.BACKGROUND
        try:
            data = await asyncio.to_thread(self.store.get, tab.key)
        except (KeyError, SnapshotLost) as e:
            lost = lost or f"its snapshot is lost ({e})"
            await self._start_load(tab, tab.url, wait=True, moves=0)
            tab.reason = f"{lost}; reloaded from its URL"
            self._event(tab, "reload", tab.reason, started)
            return
        assert tab.view is not None
        try:
            info = await tab.view.page.restore(data)
        except RemoteError as e:
            await self._start_load(tab, tab.url, wait=True, moves=0)
            tab.reason = f"its snapshot did not restore ({e}); reloaded from its URL"
        else:
            tab.url, tab.title, tab.links = info.url, info.title, info.links
            tab.state, tab.reason = TabState.READY, ""
        self.store.drop(tab.key)
        self._event(tab, "restore", "activated", started)

    # -- a tab's view in its renderer ------------------------------------------------------------

    async def _attach(self, tab: Tab, lock: SiteLock, rid: int, new: bool) -> None:
        """Give the tab a view in renderer `rid`: the renderer's ready view, or a new one."""
        proc = await self._renderer(rid, lock, new)
        tab.renderer = proc
        view, proc.ready_view = proc.ready_view, None
        try:
            tab.view = view or await self._open_view(proc)
        except FosError as e:
            self._detach(tab)
            raise FosError(f"tab {tab.id}: {e}") from e

    async def _open_view(self, proc: RendererProc) -> View:
        """A view in `proc` with a frame attached: the renderer's own end of a new channel
        goes with `open_view`, while this end says HELLO (both at once: one round trip)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        endpoint = self._view_endpoint(proc, mine)
        frame: mmap.mmap | None = None
        try:
            assert proc.control is not None
            await asyncio.gather(
                proc.control.open_view(Socket(theirs.detach())), endpoint.connect()
            )
            page = endpoint.proxy(Renderer)
            w, h = self.config.viewport
            fd = _frame(w, h)
            frame = mmap.mmap(fd, frame_size(w, h), mmap.MAP_SHARED, mmap.PROT_READ)
            await page.attach_frame(Memfd(fd), w, h)  # the fd goes with the call
        except BaseException as e:
            endpoint.close()
            if frame is not None:
                frame.close()
            if isinstance(e, (ChannelClosed, CallTimeout, RemoteError)):
                raise FosError(f"renderer pid={proc.pid} gave no view: {e}") from e
            raise
        return View(endpoint, page, frame)

    def _view_endpoint(self, proc: RendererProc, sock: socket.socket) -> Endpoint:
        """The host's end of a view's channel: `RendererHost` for `proc`, checked by its
        broker; a protocol violation is a bad message."""
        return Endpoint(
            Channel(sock, name=f"view {proc.pid}"),
            {RendererHost: proc.broker},
            call_timeout=self.config.fetch_timeout + 10,
            on_bad_message=lambda why: self._bad_message(proc, f"protocol: {why}"),
        )

    def _detach(self, tab: Tab) -> None:
        if tab.view is not None:
            tab.view.close()
        tab.renderer = tab.view = None

    def _stop_loading(self, tab: Tab) -> None:
        if tab.loading is not None and not tab.loading.done():
            tab.loading.cancel()
        tab.loading = None

    async def _start_load(self, tab: Tab, url: str, wait: bool, moves: int) -> None:
        tab.url, tab.state, tab.reason = url, TabState.LOADING, ""
        tab.loading = asyncio.get_running_loop().create_task(self._load(tab, url, moves))
        if wait:
            await self.wait_loaded(tab.id)

    async def _load(self, tab: Tab, url: str, moves: int) -> None:
        """Navigate the tab's view to `url`; a redirect to another site moves the tab there
        (at most MAX_MOVES times in a row: sites that redirect to each other fail)."""
        if tab.view is None:  # detached before this task ran
            return
        try:
            info: PageInfo = await tab.view.page.navigate(url)
        except Redirected as e:
            target = str(e)
            log.info("tab %d: %s redirects to %s, another site", tab.id, url, target)
            if moves >= MAX_MOVES:
                tab.state = TabState.FAILED
                tab.reason = f"more than {MAX_MOVES} redirects across sites (last to {target})"
                return
            tab.loading = None  # this task goes on until the move has loaded
            try:
                await self._navigate(tab, target, wait=True, moves=moves + 1)
            except FosError as failed:
                tab.state, tab.reason = TabState.FAILED, str(failed)
            return
        except (ChannelClosed, CallTimeout) as e:
            if tab.state is not TabState.CRASHED:
                tab.state, tab.reason = TabState.FAILED, str(e)
            return
        except RemoteError as e:
            tab.state, tab.reason = TabState.FAILED, f"{type(e).__name__}: {e}"
            return
        tab.url, tab.title, tab.links = info.url, info.title, info.links
        tab.state = TabState.READY


class _Broker:
    """`RendererHost` for one renderer: every request checked against its lock."""

    def __init__(self, host: Host, proc: RendererProc) -> None:
        self._host = host
        self._proc = proc

    def _violation(self, what: str) -> NotAllowed:
        lock = self._proc.lock
        self._host._bad_message(self._proc, f"{what} outside its site {lock and lock.site}")
        return NotAllowed(f"{what} is not of this renderer's site")

    async def fetch(self, url: str) -> Fetched:
        lock = self._proc.lock
        if lock is None or not lock.allows(url):
            raise self._violation(f"fetch of {url[:200]!r}")
        c = self._host.config
        network = self._host._service("network", net.Network)
        try:
            answer = await network.fetch(url, c.max_page_bytes, c.fetch_timeout)
        except (net.FetchFailed, net.TooBig, net.TooManyRedirects, net.BadScheme) as e:
            raise FetchFailed(f"{type(e).__name__}: {e}") from None
        except (ChannelClosed, CallTimeout) as e:
            raise FetchFailed(f"the network service did not answer: {e}") from None
        if not lock.allows(answer.final_url):  # a redirect left the site: the tab moves
            answer.body.close()
            raise Redirected(answer.final_url)
        return Fetched(answer.final_url, answer.status, answer.content_type, answer.body,
                       answer.length)  # fmt: skip

    def _site(self, origin: str) -> str:
        """The storage service's name for an origin of this renderer's site: "scheme://host"
        (ports share storage). Anything else is a bad message."""
        lock = self._proc.lock
        try:
            parts = urlsplit(origin)
            ok = (
                lock is not None
                and parts.scheme in ("http", "https")
                and parts.hostname is not None
                and not parts.path
                and not parts.query
                and not parts.fragment
                and "@" not in parts.netloc
                and lock.allows(origin)
            )
        except ValueError:
            ok = False
        if not ok:
            raise self._violation(f"storage of origin {origin[:200]!r}")
        return f"{parts.scheme}://{parts.hostname}"

    async def _storage(self, call: Callable[[st.Storage], Any]) -> Any:
        storage = self._host._service("storage", st.Storage)
        try:
            return await call(storage)
        except (st.BadSite, st.BadKey, st.QuotaExceeded, st.StorageFailed) as e:
            raise StorageRefused(f"{type(e).__name__}: {e}") from None
        except (ChannelClosed, CallTimeout) as e:
            raise StorageRefused(f"the storage service did not answer: {e}") from None

    async def storage_get(self, origin: str, key: str) -> bytes | None:
        site = self._site(origin)
        result: bytes | None = await self._storage(lambda s: s.get(site, key))
        return result

    async def storage_set(self, origin: str, key: str, value: bytes) -> None:
        site = self._site(origin)
        await self._storage(lambda s: s.set(site, key, value))


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("%s", future.exception())


def _frame(width: int, height: int) -> int:
    """A frame memfd that neither side can resize (a renderer that shrank it would make the
    host's reads fault); the renderer may write it, the host maps it read-only."""
    fd = os.memfd_create("fos-frame", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, frame_size(width, height))
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, FRAME_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _site_text(url: str) -> str:
    try:
        return str(site_of(url))
    except BadUrl:
        return ""
