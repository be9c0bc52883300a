"""A loaded page: what the renderer process holds for one document, and its snapshot.

A snapshot is what a hibernated tab keeps instead of its process: a msgpack map (never
pickle — the snapshot comes back from storage into a fresh renderer, and unpickling would
run whatever it says) holding the URL, the viewport, the scroll position, the form state and
the DOM as flat records (`dom.to_records`). Restoring rebuilds the DOM from the records, then
extracts and lays out again: no HTML is parsed and nothing is fetched, and since layout and
painting are deterministic the restored page paints the same frame.

    {"format": "fos-page", "version": 1, "url": str, "viewport": [w, h], "scroll": int,
     "form": {key: value}, "truncated": str | nil, "dom": [record, ...]}

Password fields' values are left out (as browsers' session restore does): a snapshot may be
kept on disk. A restored password field shows its initial value.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from types import MappingProxyType

import msgpack
import webencodings

from fos_host.errors import FosError
from fos_host.renderer import dom
from fos_host.renderer.layout import Layout, font, layout
from fos_host.renderer.paint import paint

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = "fos-page"
SNAPSHOT_VERSION = 1
MAX_VIEWPORT = 16384
"""Widest and tallest viewport, in pixels."""

_KEYS = frozenset({"format", "version", "url", "viewport", "scroll", "form", "truncated", "dom"})


def preload() -> None:
    """Load now what the engine would load on first use: the font (with Pillow's image
    plugins) and every text codec a page can name (html5lib looks them up through
    webencodings; a CJK codec is a C extension). For the zygote to call before it forks: a
    sandboxed renderer then never imports, the modules are already in its copy-on-write
    memory (the test checks that nothing is opened or imported after this)."""
    font()
    for name in set(webencodings.LABELS.values()):
        webencodings.lookup(name)


class BadSnapshot(FosError):
    """A snapshot this renderer cannot restore: not a page snapshot, another version, or
    damaged. The message names what was wrong."""


class Page:
    """One document in the renderer: made by `load` or `restore`, never directly."""

    def __init__(
        self,
        url: str,
        root: dom.Element,
        parse_truncated: str | None,
        viewport: tuple[int, int],
    ) -> None:
        width, height = viewport
        if not (
            isinstance(width, int)
            and isinstance(height, int)
            and 0 < width <= MAX_VIEWPORT
            and 0 < height <= MAX_VIEWPORT
        ):
            raise ValueError(f"viewport {viewport!r}: width and height are 1-{MAX_VIEWPORT}")
        self._url = url
        self._root = root
        self._parse_truncated = parse_truncated
        self._viewport = (width, height)
        self._content = dom.extract(root, url)
        self._layout: Layout = layout(self._content.blocks, width)
        self._form = dict(self._content.form)
        self._scroll = 0
        if self.truncated:
            log.warning("page %s cut short: %s", url, "; ".join(self.truncated))

    @classmethod
    def load(
        cls,
        url: str,
        html: bytes,
        viewport: tuple[int, int] = (800, 600),
        charset: str | None = None,
    ) -> Page:
        """Parse `html` fetched from `url` (which resolves its relative links). `charset` is
        the one HTTP's Content-Type named, if any."""
        parsed = dom.parse(html, charset)
        return cls(url, parsed.root, parsed.truncated, viewport)

    # -- what the host asks about --------------------------------------------------------

    @property
    def url(self) -> str:
        return self._url

    @property
    def viewport(self) -> tuple[int, int]:
        return self._viewport

    @property
    def title(self) -> str:
        return self._content.title

    @property
    def links(self) -> tuple[str, ...]:
        """The page's link targets: absolute http(s) URLs, each once, in document order."""
        return self._content.links

    @functools.cached_property
    def text(self) -> str:
        """The visible text, a line per block."""
        return self._content.text

    @property
    def height(self) -> int:
        """The document's height in pixels."""
        return self._layout.height

    @property
    def scroll_y(self) -> int:
        return self._scroll

    @property
    def form(self) -> Mapping[str, str]:
        """The form state: each named control's value (a read-only view)."""
        return MappingProxyType(self._form)

    @property
    def truncated(self) -> tuple[str, ...]:
        """The limits this page hit (parsing, layout): it shows only what came before."""
        return tuple(t for t in (self._parse_truncated, self._layout.truncated) if t)

    @property
    def layout(self) -> Layout:
        """The laid-out lines (where each text run and control box is, for hit tests)."""
        return self._layout

    @property
    def root(self) -> dom.Element:
        """The DOM (what a snapshot stores)."""
        return self._root

    # -- what the host tells it ----------------------------------------------------------

    def scroll_to(self, y: int) -> int:
        """Scroll to `y`, clamped to the document; returns where it scrolled to."""
        self._scroll = max(0, min(int(y), self._layout.max_scroll(self._viewport[1])))
        return self._scroll

    def set_form_value(self, key: str, value: str) -> None:
        """Set a named control's value (for a checkbox or radio group: the checked one's
        value, "" for none). `KeyError` for a name no control has."""
        if key not in self._form:
            raise KeyError(f"no form control named {key!r}")
        self._form[key] = value

    def paint(self, into: memoryview | bytearray) -> None:
        """Paint the viewport into `into` (RGBA, width x height x 4 bytes at least)."""
        width, height = self._viewport
        paint(self._layout, self._scroll, into, width, height, self._form)

    # -- snapshot and restore ------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The page's state for `restore` (see the module docstring for the format)."""
        state = {
            "format": SNAPSHOT_FORMAT,
            "version": SNAPSHOT_VERSION,
            "url": self._url,
            "viewport": list(self._viewport),
            "scroll": self._scroll,
            "form": {k: v for k, v in self._form.items() if k not in self._content.passwords},
            "truncated": self._parse_truncated,
            "dom": dom.to_records(self._root),
        }
        data: bytes = msgpack.packb(state, use_bin_type=True)
        return data

    @classmethod
    def restore(cls, data: bytes) -> Page:
        """The page a snapshot was taken of, at the same scroll position with the same form
        state. `BadSnapshot` for anything that is not a version-1 page snapshot."""
        try:
            state = msgpack.unpackb(data, raw=False)
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise BadSnapshot(f"not a page snapshot: {e}") from None
        if not isinstance(state, dict) or state.get("format") != SNAPSHOT_FORMAT:
            raise BadSnapshot("not a page snapshot")
        if state.get("version") != SNAPSHOT_VERSION:
            raise BadSnapshot(
                f"page snapshot version {state.get('version')!r:.40}; "
                f"this renderer restores version {SNAPSHOT_VERSION}"
            )
        if set(state) != _KEYS:
            raise BadSnapshot(f"page snapshot with fields {sorted(map(str, state))[:12]}")
        url, viewport, scroll = state["url"], state["viewport"], state["scroll"]
        form, truncated = state["form"], state["truncated"]
        if not isinstance(url, str):
            raise BadSnapshot("the snapshot's url is not a string")
        if not (isinstance(viewport, list) and len(viewport) == 2):
            raise BadSnapshot("the snapshot's viewport is not [width, height]")
        if not isinstance(scroll, int):
            raise BadSnapshot("the snapshot's scroll position is not an integer")
        if not (
            isinstance(form, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in form.items())
        ):
            raise BadSnapshot("the snapshot's form state is not a map of strings")
        if not (truncated is None or isinstance(truncated, str)):
            raise BadSnapshot("the snapshot's truncation note is not a string")
        try:
            root = dom.from_records(state["dom"])
            page = cls(url, root, truncated, (viewport[0], viewport[1]))
        except ValueError as e:
            raise BadSnapshot(f"damaged page snapshot: {e}") from None
        unknown = set(form) - set(page._form)
        if unknown:
            names = sorted(unknown)[:12]
            raise BadSnapshot(f"the snapshot's form state names no control: {names}")
        page._form.update(form)
        page.scroll_to(scroll)
        return page
