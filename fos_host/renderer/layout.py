"""Text layout: a page's blocks wrapped into lines at a viewport width, in pixels.

The font is Pillow's built-in bitmap font (`ImageFont.load_default_imagefont`): it needs no
font file (the sandbox has none), it is not antialiased, and it is the same on every machine,
so golden images are stable. It is monospaced (6 x 11 pixel cells) and covers printable
Latin-1 only: other characters are laid out and painted as "?" (`.text` keeps them). Headings
are bold (struck twice, one pixel apart); h1 and h2 are also scaled 2x with nearest-neighbour,
so they stay crisp and deterministic.

Because every character is one cell wide, wrapping is arithmetic on character counts: a line
is filled by slicing, not by measuring word after word, and a 5 MB text node lays out in well
under a second. A hostile page could still make millions of lines, so layout stops after
`MAX_LINES` and says so in `Layout.truncated`.
"""

from __future__ import annotations

import bisect
import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from PIL import ImageFont

from fos_host.renderer.dom import Block, Control, Span

MAX_LINES = 50_000
"""Lines laid out at most (some 700 000 pixels of document); each costs a few hundred bytes."""
MARGIN = 8  # around the page, as a browser's default body margin
INDENT = 24  # per level of list or quote nesting
GAP = 7  # blank space above a paragraph, heading, list, …
LEADING = 3  # space under each line's tallest item
PAD = 3  # inside a control's box, around its text

_UNDRAWABLE = re.compile(r"[^\x20-\x7e\xa0-\xff]")


@functools.cache
def font() -> ImageFont.ImageFont:
    """The bitmap font. Load it before the sandbox closes (the zygote imports this module and
    calls it): Pillow builds it from data inside the module, but imports its PNG decoder."""
    return ImageFont.load_default_imagefont()


@functools.cache
def cell() -> tuple[int, int]:
    """The font's character cell (width, height) in pixels at scale 1."""
    left, top, right, bottom = font().getbbox("M")
    return int(right - left), int(bottom - top)


def drawable(text: str) -> str:
    """`text` with every character the font lacks replaced by "?" (one cell each)."""
    return _UNDRAWABLE.sub("?", text)


@dataclass(frozen=True, slots=True)
class TextRun:
    """Text of one style on one line; `y` is the top of its cells, in document pixels."""

    x: int
    y: int
    text: str  # drawable: every character is one cell
    scale: int = 1
    bold: bool = False
    href: str | None = None

    @property
    def width(self) -> int:
        return len(self.text) * cell()[0] * self.scale

    @property
    def height(self) -> int:
        return cell()[1] * self.scale


@dataclass(frozen=True, slots=True)
class ControlBox:
    """A form control's box; painted with the control's current value."""

    x: int
    y: int
    width: int
    height: int
    control: Control


Item = TextRun | ControlBox


@dataclass(frozen=True, slots=True)
class Line:
    y: int
    height: int
    items: tuple[Item, ...]


@dataclass(frozen=True, slots=True)
class Layout:
    """Lines in document order. `height` is the document's height, which bounds scrolling."""

    width: int
    height: int
    lines: tuple[Line, ...]
    truncated: str | None = None

    def max_scroll(self, viewport_height: int) -> int:
        return max(0, self.height - viewport_height)

    def visible(self, scroll_y: int, viewport_height: int) -> Iterator[Line]:
        """The lines that show in a viewport scrolled to `scroll_y` (found by bisection)."""
        first = bisect.bisect_right(self.lines, scroll_y, key=lambda line: line.y + line.height)
        for line in self.lines[first:]:
            if line.y >= scroll_y + viewport_height:
                break
            yield line


class _Full(Exception):
    """`MAX_LINES` reached: the layout ends there."""


class _Writer:
    """Fills lines between `left` and `right` with one block's items."""

    def __init__(self, lines: list[Line], y: int, left: int, right: int, scale: int) -> None:
        self.lines = lines
        self.y = y
        self.left = left
        self.right = right
        self.scale = scale
        self.advance = cell()[0] * scale
        self.x = left
        self.pending: list[TextRun | ControlBox] = []  # on the current line; y filled in later

    def marker(self, text: str) -> None:
        """A list item's marker, in the indent to the left of the first line."""
        x = max(0, self.left - (len(text) + 1) * self.advance)
        self.pending.append(TextRun(x, 0, drawable(text), self.scale))

    def span(self, span: Span, pre: bool) -> None:
        for n, part in enumerate(span.text.split("\n")):
            if n:
                self.newline()
            if pre:
                self._pre(drawable(part.expandtabs(8)), span.href, span.bold)
            else:
                self._flow(drawable(part), span.href, span.bold)

    def _flow(self, part: str, href: str | None, bold: bool) -> None:
        """Greedy word wrap; a word longer than a whole line is broken anywhere."""
        pos, end = 0, len(part)
        while pos < end:
            if self.x == self.left:
                while pos < end and part[pos] == " ":
                    pos += 1
                if pos == end:
                    return
            room = (self.right - self.x) // self.advance
            if end - pos <= room:
                self._run(part[pos:], href, bold)
                return
            cut = part.rfind(" ", pos, pos + room + 1)
            if cut > pos:  # the words up to the space fit
                self._run(part[pos:cut], href, bold)
                pos = cut + 1
            elif self.x == self.left:  # one word wider than the line
                take = max(room, 1)
                self._run(part[pos : pos + take], href, bold)
                pos += take
            elif cut == pos:
                pos += 1
            self.newline()

    def _pre(self, part: str, href: str | None, bold: bool) -> None:
        """Preformatted: spaces kept, lines broken only where they would overflow."""
        pos = 0
        while pos < len(part):
            room = max((self.right - self.x) // self.advance, 1 if self.x == self.left else 0)
            if room:
                self._run(part[pos : pos + room], href, bold)
                pos += room
            if pos < len(part):
                self.newline()

    def _run(self, text: str, href: str | None, bold: bool) -> None:
        last = self.pending[-1] if self.pending else None
        if (
            isinstance(last, TextRun)
            and (last.href, last.bold) == (href, bold)
            and last.x + last.width == self.x
        ):
            self.pending[-1] = TextRun(last.x, 0, last.text + text, self.scale, bold, href)
        else:
            self.pending.append(TextRun(self.x, 0, text, self.scale, bold, href))
        self.x += len(text) * self.advance

    def control(self, control: Control) -> None:
        width, height = _control_size(control, self.right - self.left)
        if self.x + width > self.right and self.x > self.left:
            self.newline()
        self.pending.append(ControlBox(self.x, 0, width, height, control))
        self.x += width

    def newline(self) -> None:
        """End the current line: align its items on their bottoms and move down."""
        if len(self.lines) >= MAX_LINES:
            raise _Full
        items = self.pending
        if items and isinstance(items[-1], TextRun):  # trailing spaces have no width to show
            last = items[-1]
            text = last.text.rstrip(" ")
            items[-1] = TextRun(last.x, 0, text, last.scale, last.bold, last.href)
        content = max((i.height for i in items), default=cell()[1] * self.scale)
        placed = tuple(
            replace(i, y=self.y + content - i.height)
            for i in items
            if not (isinstance(i, TextRun) and not i.text)
        )
        height = content + LEADING * self.scale
        self.lines.append(Line(self.y, height, placed))
        self.y += height
        self.x = self.left
        self.pending = []


def _control_size(control: Control, room: int) -> tuple[int, int]:
    """A control's box: checkboxes and radios a cell-high square; buttons fit their label;
    text fields `cols` x `rows` cells (a select its longest option, plus its arrow)."""
    cw, ch = cell()
    if control.kind in ("checkbox", "radio"):
        return ch, ch
    if control.kind == "button":
        cols = len(control.value) + 2
    elif control.kind == "select":
        cols = control.cols + 2
    else:
        cols = control.cols
    return min(cols * cw + 2 * PAD, max(room, ch)), control.rows * ch + 2 * PAD


def layout(blocks: Sequence[Block], width: int) -> Layout:
    """Lay the blocks out for a viewport `width` pixels wide."""
    cw, _ = cell()
    lines: list[Line] = []
    y = MARGIN
    truncated = None
    try:
        for block in blocks:
            if block.gap and lines:
                y += GAP
            scale = 2 if block.level in (1, 2) else 1
            usable = max(width - 2 * MARGIN, cw * scale)
            left = MARGIN + min(block.indent * INDENT, usable // 2)
            right = max(MARGIN + usable, left + cw * scale)
            writer = _Writer(lines, y, left, right, scale)
            if block.marker:
                writer.marker(block.marker)
            for item in block.items:
                if isinstance(item, Span):
                    writer.span(item, block.pre)
                else:
                    writer.control(item)
            writer.newline()
            y = writer.y
    except _Full:
        truncated = f"more than {MAX_LINES} lines"
        y = lines[-1].y + lines[-1].height
    return Layout(width, y + MARGIN, tuple(lines), truncated)
