"""`fos-host ctl` ↔ the running host (`fos-host run`): the control API on its unix socket.

The host serves `Control` to every connection its peer-credential check lets in (the host's
own uid, root, and uids given with `--allow-uid`); see fos_host/host/control.py. Every failure
a user can act on arrives as a declared error (`NoSuchTab`, `BadUrl`, `Failed`) with the
host's reason, so `fos-host ctl` prints it instead of an anonymous "failed on the other side".
Screenshots and snapshots are plain `bytes`: big ones cross as sealed memfds by themselves.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fos_host.ipc.interface import Interface, RemoteError, method


class NoSuchTab(RemoteError):
    """No open tab has that id (`fos-host ctl list` shows them)."""


class BadUrl(RemoteError):
    """The URL has no site: not http(s), no host, or a host no browser would accept."""


class Failed(RemoteError):
    """The host could not do it; the message says why (e.g. the tab's renderer crashed)."""


@dataclass
class TabView:
    """A tab as the host shows it (`Host.info`)."""

    id: int
    url: str
    title: str
    state: str  # loading, ready, failed, crashed
    reason: str  # why it failed or crashed, "" otherwise
    site: str  # scheme://registrable-domain, "" for a URL without one
    active: bool
    tier: str  # active, background, frozen, hibernated, discarded
    pinned: bool  # never stepped down by the policy
    unsaved: bool  # holds input the user typed: never stepped down by the policy
    renderer: int | None  # the process model's renderer id, None without a renderer
    pid: int | None  # the renderer's pid (on the host)
    host_uid: int | None  # the renderer's unprivileged uid on the host
    memory: int | None  # bytes in its renderer's cgroup (shared by the renderer's tabs)
    memory_limit: int | None


@dataclass
class Event:
    """A lifecycle step of a tab (or of the pressure level, with `tab` None)."""

    time: float  # Unix time
    tab: int | None
    action: str  # freeze, thaw, hibernate, discard, kill, restore, reload, level
    tier: str  # the tab's tier after it
    why: str
    freed: int | None  # bytes its renderer's cgroup held, when the step ended a renderer
    ms: float  # how long the step took
    level: str  # the pressure level when it happened


@dataclass
class Status:
    pid: int  # the host's
    tabs: int
    renderers: int  # running renderer processes, warm (unlocked) ones included
    bad_messages: int  # renderers killed for breaking the rules, since the host started
    crashes: int  # renderers that ended unasked (bad messages included)
    level: str  # the memory pressure level: none, moderate, critical, emergency


@dataclass
class Pressure:
    """The memory pressure level and how the host knows it (`fos-host top` shows it)."""

    level: str  # none, moderate, critical, emergency
    source: str  # how the renderers' cgroup is listened to: trigger, v1, polling; "" for none
    detail: str  # the monitor's own account: every source and the last reading


class Control(Interface, version=1):
    """What the running host offers its local tools."""

    errors = (NoSuchTab, BadUrl, Failed)

    @method(0)
    async def open(self, url: str) -> TabView:
        """A new tab showing `url`; answers once the page loaded or failed to."""
        ...

    @method(1)
    async def navigate(self, tab: int, url: str) -> TabView:
        """Show `url` in the tab (in another renderer if it is of another site)."""
        ...

    @method(2)
    async def reload(self, tab: int) -> TabView:
        """Load the tab's URL again; a crashed tab gets a new renderer."""
        ...

    @method(3)
    async def activate(self, tab: int) -> TabView:
        """Bring the tab to the front (the others go to the back)."""
        ...

    @method(4)
    async def close(self, tab: int) -> None:
        """Close the tab (its renderer ends if no other tab uses it)."""
        ...

    @method(5)
    async def list(self) -> list[TabView]:
        """Every open tab, in the order they were opened."""
        ...

    @method(6)
    async def screenshot(self, tab: int) -> bytes:
        """What the tab shows, as PNG."""
        ...

    @method(7)
    async def snapshot(self, tab: int) -> bytes:
        """The tab's page state (URL, DOM, scroll, form) from its renderer, for restore."""
        ...

    @method(8)
    async def status(self) -> Status:
        """Counts of the whole host."""
        ...

    @method(9)
    def events(self) -> AsyncIterator[Event]:  # no await: `async for e in control.events()`
        """The lifecycle events kept so far, then each new one as it happens."""
        ...

    @method(10)
    async def step(self, tab: int, action: str) -> TabView:
        """Step the tab down by hand: freeze, hibernate, discard or kill (as the lifecycle
        policy would under pressure; the active tab too)."""
        ...

    @method(11)
    async def pin(self, tab: int, pinned: bool) -> TabView:
        """Pin or unpin the tab: a pinned tab is never stepped down by the policy."""
        ...

    @method(12)
    async def pressure(self) -> Pressure:
        """The memory pressure level now, and where it comes from."""
        ...

    @method(13)
    async def recent_events(self, last: int) -> builtins.list[Event]:  # not the method `list`
        """The last `last` lifecycle events kept (all kept ones for 0): what `events` would
        send first, without waiting for more."""
        ...
