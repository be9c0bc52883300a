"""Watching a running host (`fos-host run`) over its control socket: `fos-host top` and
`fos-host ctl events`.

`top` asks the host for its status, pressure, tabs and last lifecycle events at once, every
interval, and redraws from that `Sample` alone: a redraw never mixes a new tab list with an
older pressure level. `--once`, or stdout that is
not a terminal, prints one table as plain text; `--json` prints the sample.

`ctl events` prints each lifecycle event as one JSON line, flushed at once, so `| grep`,
`| jq` and a test reading a pipe see an event when it happens.

Both end at SIGINT or SIGTERM with exit 0 (stopping them is how they are used), and with one
line and exit 1 when the host goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from fos_host.errors import ConfigError
from fos_host.host.control import connect
from fos_host.interfaces.control import Control, Event, Pressure, Status, TabView
from fos_host.kernel.cgroup import format_size
from fos_host.tables import (
    Row,
    fitted_table,
    memory_text,
    number_text,
    state_text,
    stdout_console,
    table,
)

RECENT = 8  # lifecycle events shown below the table (and in --json)
DEFAULT_INTERVAL = 1.0  # seconds between redraws
MIN_INTERVAL = 0.1  # each redraw is four calls to the host: not a busy loop
COLUMNS = ("tab", "title", "site", "tier", "state", "pid", "memory")
NUMERIC_COLUMNS = frozenset({"tab", "pid"})
EVENT_COLUMNS = ("time", "tab", "action", "why", "freed")
TIERS = ("active", "background", "frozen", "hibernated", "discarded")  # the order to count in
TIER_STYLES = {"active": "bold green", "background": "green", "frozen": "cyan",
               "hibernated": "blue", "discarded": "dim"}  # fmt: skip
LEVEL_STYLES = {"none": "green", "moderate": "yellow", "critical": "red",
                "emergency": "bold red"}  # fmt: skip
SOURCES = {"trigger": "PSI trigger", "v1": "cgroup v1 memory.pressure_level",
           "polling": "polling"}  # fmt: skip


@dataclass
class Sample:
    """One look at the host: what `top` draws, and `top --json` prints."""

    status: Status
    pressure: Pressure
    tabs: list[TabView]
    events: list[Event]  # the last RECENT lifecycle events, oldest first

    @classmethod
    async def of(cls, control: Control) -> Sample:
        status, pressure, tabs, events = await asyncio.gather(
            control.status(), control.pressure(), control.list(), control.recent_events(RECENT)
        )
        return cls(status, pressure, tabs, events)


def run_top(path: Path, interval: float, once: bool, as_json: bool) -> int:
    """`fos-host top`: live until a signal on a terminal, else one table (or JSON)."""
    if interval < MIN_INTERVAL:
        raise ConfigError(f"--interval {interval:g}: must be at least {MIN_INTERVAL:g} s")
    console = stdout_console()
    live = console.is_terminal and not (once or as_json)
    _run_until_signal(_top(path, console, interval, live, as_json))
    return 0


async def _top(path: Path, console: Console, interval: float, live: bool, as_json: bool) -> None:
    async with connect(path) as control:
        sample = await Sample.of(control)
        if as_json:
            print(json.dumps(dataclasses.asdict(sample), indent=2))
        elif not live:
            console.print(view(sample, console, live))
        else:  # redrawn from here, not by rich's refresh thread: one sample per redraw
            with Live(view(sample, console, live), console=console, auto_refresh=False) as shown:
                while True:
                    await asyncio.sleep(interval)
                    shown.update(view(await Sample.of(control), console, live), refresh=True)


def view(sample: Sample, console: Console, live: bool) -> Group:
    """The header line (pressure and counts), the table of tabs (without titles when the
    console is too narrow), the recent events; on a live table, how to quit."""
    plain = not console.is_terminal
    rows = [_tab_row(t, plain) for t in sorted(sample.tabs, key=lambda t: t.id)]
    parts: list[RenderableType] = [_header(sample, plain)]
    if rows:
        parts.append(fitted_table(console, rows, COLUMNS, NUMERIC_COLUMNS, drop="title"))
    else:
        parts.append(Text("no tabs (open one with: fos-host ctl open URL)"))
    if sample.events:
        events = [_event_row(e) for e in sample.events]
        parts += [Text("recent lifecycle events:"), table(events, EVENT_COLUMNS, {"tab"}, plain)]
    else:
        parts.append(Text("no lifecycle events yet"))
    if live:
        parts.append(Text("Ctrl-C quits", style="dim"))
    return Group(*parts)


def _header(sample: Sample, plain: bool) -> Text:
    """The level and its source, then the counts: "memory pressure none (PSI trigger) ·
    3 tabs: 2 active, 1 hibernated · 4 renderers · 0 bad messages · 0 crashes"."""
    p, s = sample.pressure, sample.status
    tiers = Counter(t.tier for t in sample.tabs)
    counts = ", ".join(f"{tiers[name]} {name}" for name in TIERS if tiers[name])
    text = Text("memory pressure ")
    text.append(p.level, style="" if plain else LEVEL_STYLES.get(p.level, ""))
    text.append(f" ({SOURCES.get(p.source, p.source) or 'no monitor'}) · {s.tabs} tabs"
                f"{': ' + counts if counts else ''} · {s.renderers} renderers · "
                f"{s.bad_messages} bad messages · {s.crashes} crashes")  # fmt: skip
    return text


def _tab_row(t: TabView, plain: bool) -> Row:
    return {
        "tab": f"*{t.id}" if t.active else str(t.id),
        "title": t.title,
        "site": t.site,
        "tier": Text(t.tier, style="" if plain else TIER_STYLES.get(t.tier, "")),
        "state": state_text(t, plain),
        "pid": number_text(t.pid),
        "memory": memory_text(t),
    }


def _event_row(e: Event) -> Row:
    return {
        "time": time.strftime("%H:%M:%S", time.localtime(e.time)),
        "tab": number_text(e.tab),
        "action": e.action,
        "why": e.why,
        "freed": "" if e.freed is None else format_size(e.freed),
    }


def print_events(path: Path, follow: bool) -> int:
    """`fos-host ctl events`: the kept lifecycle events, then (`follow`) each new one, as
    JSON lines. A reader that stops reading (`| head`) ends it quietly."""
    try:
        _run_until_signal(_events(path, follow))
    except BrokenPipeError:  # stdout is gone: nothing more to say, and no traceback at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


async def _events(path: Path, follow: bool) -> None:
    async with connect(path) as control:
        if not follow:
            for event in await control.recent_events(0):
                _print_line(event)
            return
        async for event in control.events():  # ends with an error: host gone, or dropped
            _print_line(event)


def _print_line(event: Event) -> None:
    print(json.dumps(dataclasses.asdict(event)), flush=True)


def _run_until_signal(work: Coroutine[Any, Any, None]) -> None:
    """Run `work` until it returns or SIGINT or SIGTERM cancels it (then return normally:
    stopping a watcher is its normal end). Its errors propagate."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = loop.create_task(work)
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, task.cancel)
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    asyncio.run(main())
