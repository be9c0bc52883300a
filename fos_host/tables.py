"""Tables of tabs for people, shared by `fos-host demo` and `fos-host top` (rich).

On a terminal: a box of heavy rules, states in colour, as wide as the terminal. Anywhere else
(a pipe, CI, a test): ASCII boxes and no colour, `PLAIN_WIDTH` columns wide, since a pipe has
no width of its own and a line cut short would lose the columns on the right.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Sequence

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fos_host.interfaces.control import TabView
from fos_host.kernel.cgroup import format_size

PLAIN_WIDTH = 200  # columns of a plain-text table
STATE_STYLES = {"ready": "green", "loading": "yellow", "failed": "red", "crashed": "bold red"}

Row = dict[str, str | Text]  # a row's cells by column name


def stdout_console() -> Console:
    """A console on stdout: the terminal's width, or PLAIN_WIDTH columns of plain text."""
    console = Console()
    return console if console.is_terminal else Console(width=PLAIN_WIDTH)


def table(rows: Sequence[Row], columns: Sequence[str], numeric: Collection[str],
          plain: bool) -> Table:  # fmt: skip
    """`rows` under `columns` (those in `numeric` right-aligned)."""
    t = Table(box=box.ASCII if plain else box.SIMPLE_HEAVY, header_style="bold")
    for name in columns:
        t.add_column(name, justify="right" if name in numeric else "left")
    for row in rows:
        t.add_row(*(row[name] for name in columns))
    return t


def fitted_table(console: Console, rows: Sequence[Row], columns: Sequence[str],
                 numeric: Collection[str], drop: str) -> Table:  # fmt: skip
    """The table on `console`; without the column `drop` (the titles) when the console is too
    narrow for every column: rich would squeeze every column into ellipses instead."""
    plain = not console.is_terminal
    t = table(rows, columns, numeric, plain)
    unbounded = console.options.update_width(sys.maxsize)  # the width it wants
    if console.measure(t, options=unbounded).maximum > console.width:
        t = table(rows, [c for c in columns if c != drop], numeric, plain)
    return t


def state_text(i: TabView, plain: bool) -> Text:
    """The tab's state, with why it failed or crashed; in colour on a terminal."""
    state = f"{i.state}: {i.reason}" if i.reason else i.state
    return Text(state, style="" if plain else STATE_STYLES.get(i.state, ""))


def number_text(n: int | None) -> str:
    return "" if n is None else str(n)


def memory_text(i: TabView) -> str:
    """The memory of the tab's renderer's cgroup against its limit: "12.5 MiB / 64 MiB"."""
    if i.memory is None:
        return ""
    limit = "no limit" if i.memory_limit is None else format_size(i.memory_limit)
    return f"{format_size(i.memory)} / {limit}"
