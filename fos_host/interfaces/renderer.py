"""host ↔ renderer: the two interfaces on a renderer's one channel (fd 3 in its sandbox).

The host offers `RendererHost`: everything a renderer may ask of the world goes through it,
because the renderer has no network and no files. The host knows the renderer's site lock
(fixed before any content) and checks every URL against it before fetching, and adds the
site to every storage key itself, so a compromised renderer can neither read another site's
pages nor its storage — it can only ask, and be refused with `NotAllowed`.

The renderer offers `RendererProcess` on its first channel, and `Renderer` on the channel of
each view (a tab it shows; same-site tabs may share a renderer process): the host attaches a
frame (a memfd of width*height*4 RGBA bytes that the renderer maps read-write and the host
maps read-only, so a painted frame is never copied), then navigates, scrolls, snapshots and
restores. Errors of `RendererHost` that a renderer method meets (`NotAllowed`,
`FetchFailed`) are declared by `Renderer` too, so the host sees a refused navigation as
`NotAllowed` rather than as an anonymous `RemoteError`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fos_host.ipc.interface import Interface, RemoteError, method
from fos_host.ipc.wire import Memfd, Socket


class NotAllowed(RemoteError):
    """The URL is of another site than the renderer's lock (or of no site at all)."""


class Redirected(RemoteError):
    """A fetch was redirected to another site: the message is the redirect's target URL.
    Not the renderer's fault; the host moves the tab to a renderer of that site."""


class FetchFailed(RemoteError):
    """The host could not fetch the URL (network failure, too big, too many redirects)."""


class StorageRefused(RemoteError):
    """The storage service refused (a bad key, the site's quota, a broken database)."""


class NoPage(RemoteError):
    """Nothing to act on yet: no frame attached, or no page loaded."""


class BadFrame(RemoteError):
    """The frame memfd is smaller than width*height*4 bytes, or the size is out of range."""


class RestoreFailed(RemoteError):
    """The snapshot is not one this renderer restores, or its viewport is not the frame's."""


class NoSuchControl(RemoteError):
    """`set_form_value` named a control the page does not have."""


@dataclass
class Fetched:
    final_url: str  # the URL the body came from, after redirects (each checked by the host)
    status: int
    content_type: str  # the Content-Type header as sent, "" if there was none
    body: Memfd  # sealed against any change; the receiver owns (and closes) it
    length: int  # bytes of body in `body`


@dataclass
class PageInfo:
    url: str
    title: str
    links: list[str]  # absolute http(s) URLs, each once, in document order
    height: int  # the document's height in pixels
    scroll_y: int


class RendererHost(Interface, version=1):
    """What the host offers a renderer."""

    errors = (NotAllowed, FetchFailed, Redirected, StorageRefused)

    @method(0)
    async def fetch(self, url: str) -> Fetched:
        """GET `url` on the renderer's behalf. A URL of another site than the renderer's
        lock is a bad message: the host kills the renderer. A redirect to another site ends
        the fetch with `Redirected`. Any HTTP status is an answer."""
        ...

    @method(1)
    async def storage_get(self, origin: str, key: str) -> bytes | None:
        """The value stored under `key` for `origin` (the page's "scheme://host"), None if
        there is none. An origin outside the renderer's lock is a bad message (killed)."""
        ...

    @method(2)
    async def storage_set(self, origin: str, key: str, value: bytes) -> None:
        """Store `value` under `key` for `origin`; checked as `storage_get` is."""
        ...


class RendererProcess(Interface, version=1):
    """What a renderer process offers the host on its first channel (fd 3): views. Each tab
    the renderer shows is a view with a channel of its own, over which the host calls
    `Renderer` and the renderer calls `RendererHost`; closing a view's channel drops the
    view. The process exits when the host closes this first channel."""

    @method(0)
    async def open_view(self, channel: Socket) -> None:
        """Serve a new view on `channel` (one end of a SEQPACKET socketpair)."""
        ...


class Renderer(Interface, version=1):
    """What a renderer offers the host."""

    errors = (
        NotAllowed,
        FetchFailed,
        Redirected,
        StorageRefused,
        NoPage,
        BadFrame,
        RestoreFailed,
        NoSuchControl,
    )

    @method(0)
    async def attach_frame(self, frame: Memfd, width: int, height: int) -> None:
        """Paint into `frame` from now on, a `width` x `height` viewport (the renderer owns
        and closes the fd it receives). A loaded page of another size is dropped: the host
        navigates or restores again."""
        ...

    @method(1)
    async def navigate(self, url: str) -> PageInfo:
        """Fetch `url` through `RendererHost.fetch`, lay it out at the frame's width, and
        paint it at the top."""
        ...

    @method(2)
    async def scroll(self, y: int) -> int:
        """Scroll to `y` (clamped to the document) and repaint; where it scrolled to."""
        ...

    @method(3)
    async def paint(self) -> None:
        """Paint the page into the frame again."""
        ...

    @method(4)
    async def snapshot(self) -> bytes:
        """The page's state, for `restore` in this or another renderer."""
        ...

    @method(5)
    async def restore(self, data: bytes) -> PageInfo:
        """Rebuild a page from a snapshot and paint it; nothing is fetched."""
        ...

    @method(6)
    async def set_form_value(self, key: str, value: str) -> None:
        """Set a named form control's value and repaint."""
        ...

    @method(7)
    async def local_get(self, key: str) -> bytes | None:
        """The page's localStorage: `RendererHost.storage_get` for the page's origin, as a
        page script would."""
        ...

    @method(8)
    async def local_set(self, key: str, value: bytes) -> None:
        """The page's localStorage: `RendererHost.storage_set` for the page's origin."""
        ...
