"""The renderer process: `fos_host.renderer.main:main`, run inside a renderer sandbox.

It serves `RendererProcess` on the SEQPACKET socket at fd 3; each view (a tab) the host opens
gets a channel of its own, on which it serves `Renderer` and calls the host's `RendererHost`.
It needs nothing else: no network (pages come from the host's
`fetch`, which enforces the site lock), no files (storage goes through the host), and no
copy of the pixels (it paints into a shared memfd the host maps read-only). It runs until
the host closes the first channel, then exits 0.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

from fos_host.interfaces.renderer import (
    BadFrame,
    NoPage,
    NoSuchControl,
    PageInfo,
    Renderer,
    RendererHost,
    RendererProcess,
    RestoreFailed,
)
from fos_host.ipc.channel import Channel
from fos_host.ipc.interface import Endpoint
from fos_host.ipc.wire import Memfd, Socket
from fos_host.renderer.page import MAX_VIEWPORT, BadSnapshot, Page
from fos_host.renderer.paint import frame_size

CHANNEL_FD = 3
FIRST_VIEW_FD, FRAME_FD = 4, 5  # with --view WxH: a first view, ready at start
HOST_CALL_TIMEOUT = 120.0  # the host bounds fetches itself (and answers within its bound)
WARM_ROUNDS = 10  # of `warm_up`: Python 3.11 quickens a function's code after 8 calls
WARM_URL, WARM_VIEWPORT, WARM_SCROLL = "http://warm-up.invalid/", (320, 240), 40
WARM_PAGE = b"""<!doctype html><title>warm-up</title><h1>Warm-up</h1>
<p>Text, <b>bold</b> and <a href="/link">a link</a>, long enough to wrap at this width.</p>
<ul><li>one<li>two</ul><pre>pre
formatted</pre><form><input name=q value=v> <input type=checkbox name=c checked>
<select name=s><option value=1>One</select><textarea name=t>x</textarea></form>"""


def origin_of(url: str) -> str:
    """A page's origin as storage names it: "scheme://host[:port]"."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def read_body(body: Memfd, length: int) -> bytes:
    """The bytes of a fetched body (the memfd is closed)."""
    with body:
        if length == 0:
            return b""
        with mmap.mmap(body.fd, length, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            return m[:length]


def charset_of(content_type: str) -> str | None:
    """The charset parameter of a Content-Type header, if it names one."""
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"') or None
    return None


class RendererImpl:
    """One renderer's state: the frame it paints into and the page it shows."""

    def __init__(self, host: Callable[[], RendererHost]) -> None:
        self._host_of = host
        self._host: RendererHost | None = None
        self._frame: mmap.mmap | None = None
        self._viewport = (0, 0)
        self._page: Page | None = None

    def host(self) -> RendererHost:
        """The proxy to the host, made on first use rather than in `serve`: the host may call
        before `connect()` returns there, but its HELLO (which a proxy needs) is always
        handled before its first call arrives."""
        if self._host is None:
            self._host = self._host_of()
        return self._host

    def close(self) -> None:
        if self._frame is not None:
            self._frame.close()
            self._frame = None

    def attach_frame(self, frame: Memfd, width: int, height: int) -> None:
        with frame:
            if not (0 < width <= MAX_VIEWPORT and 0 < height <= MAX_VIEWPORT):
                raise BadFrame(f"{width}x{height}: width and height are 1-{MAX_VIEWPORT}")
            size = frame_size(width, height)
            have = os.fstat(frame.fd).st_size
            if have < size:
                raise BadFrame(f"a frame of {have} bytes; {width}x{height} needs {size}")
            mapped = mmap.mmap(frame.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.close()
        self._frame, self._viewport = mapped, (width, height)
        if self._page is not None and self._page.viewport != self._viewport:
            self._page = None  # laid out for another size: the host navigates again
        if self._page is not None:
            self._paint(self._page)

    async def navigate(self, url: str) -> PageInfo:
        self._need_frame()
        fetched = await self.host().fetch(url)
        body = read_body(fetched.body, fetched.length)
        page = Page.load(fetched.final_url, body, self._viewport, charset_of(fetched.content_type))
        return self._show(page)

    def scroll(self, y: int) -> int:
        page = self._need_page()
        at = page.scroll_to(y)
        self._paint(page)
        return at

    def paint(self) -> None:
        self._paint(self._need_page())

    def snapshot(self) -> bytes:
        return self._need_page().snapshot()

    def restore(self, data: bytes) -> PageInfo:
        self._need_frame()
        try:
            page = Page.restore(data)
        except BadSnapshot as e:
            raise RestoreFailed(str(e)) from None
        if page.viewport != self._viewport:
            raise RestoreFailed(
                f"the snapshot is of a {page.viewport} viewport, the frame's is {self._viewport}"
            )
        return self._show(page)

    def set_form_value(self, key: str, value: str) -> None:
        page = self._need_page()
        try:
            page.set_form_value(key, value)
        except KeyError:
            raise NoSuchControl(f"no form control named {key!r}") from None
        self._paint(page)

    async def local_get(self, key: str) -> bytes | None:
        return await self.host().storage_get(origin_of(self._need_page().url), key)

    async def local_set(self, key: str, value: bytes) -> None:
        await self.host().storage_set(origin_of(self._need_page().url), key, value)

    def _show(self, page: Page) -> PageInfo:
        self._page = page
        self._paint(page)
        return PageInfo(page.url, page.title, list(page.links), page.height, page.scroll_y)

    def _paint(self, page: Page) -> None:
        assert self._frame is not None
        with memoryview(self._frame) as view:  # released, so a re-attach can close the map
            page.paint(view)

    def _need_frame(self) -> None:
        if self._frame is None:
            raise NoPage("no frame attached")

    def _need_page(self) -> Page:
        if self._page is None:
            raise NoPage("no page loaded")
        return self._page


class ProcessImpl:
    """`RendererProcess`: the views of this process, each a `RendererImpl` on its own channel."""

    def __init__(self, make_view: Callable[[Callable[[], RendererHost]], RendererImpl]) -> None:
        self._make_view = make_view
        self._views: set[asyncio.Task[None]] = set()

    def open_view(self, channel: Socket) -> None:
        self.start_view(channel.take())

    def start_view(self, fd: int, frame: tuple[Memfd, int, int] | None = None) -> None:
        """Serve a view on the channel `fd`, painting into `frame` (memfd, width, height)
        from the start if one is given."""
        view = self._make_view(lambda: endpoint.proxy(RendererHost))
        if frame is not None:
            view.attach_frame(*frame)
        channel = Channel(socket.socket(fileno=fd), name="view")
        endpoint = Endpoint(channel, {Renderer: view}, call_timeout=HOST_CALL_TIMEOUT)
        task = asyncio.get_running_loop().create_task(self._serve_view(view, endpoint))
        self._views.add(task)
        task.add_done_callback(self._views.discard)

    async def _serve_view(self, view: RendererImpl, endpoint: Endpoint) -> None:
        try:
            await endpoint.connect()
            await endpoint.wait_closed()
        finally:
            endpoint.close()
            view.close()

    def close(self) -> None:
        for task in self._views:
            task.cancel()


async def serve(
    fd: int,
    make_view: Callable[[Callable[[], RendererHost]], RendererImpl] = RendererImpl,
    first_view: tuple[int, int] | None = None,
) -> None:
    """Serve `RendererProcess` on `fd` until the host closes the channel; with `first_view`
    (width, height), a view on FIRST_VIEW_FD painting into the frame on FRAME_FD at once."""
    impl = ProcessImpl(make_view)
    endpoint = Endpoint(Channel(socket.socket(fileno=fd), name="renderer"), {RendererProcess: impl})
    if first_view is not None:
        impl.start_view(FIRST_VIEW_FD, (Memfd(FRAME_FD), *first_view))
    try:
        await endpoint.connect()
        await endpoint.wait_closed()
    finally:
        impl.close()


def first_view(argv: tuple[str, ...]) -> tuple[int, int] | None:
    """The viewport of `--view WxH`, or None without arguments."""
    if not argv:
        return None
    if len(argv) != 2 or argv[0] != "--view":
        raise SystemExit(f"renderer: expected no arguments or --view WxH, not {argv}")
    width, _, height = argv[1].partition("x")
    return int(width), int(height)


def main(*argv: str) -> int:
    """The sandbox's entry: serves `RendererProcess` on fd 3; with `args=("--view", "WxH")`
    also a first view on fd 4 whose frame is the memfd on fd 5 (no round trips to set up)."""
    asyncio.run(serve(CHANNEL_FD, first_view=first_view(argv)))
    return 0


def warm_up() -> None:
    """For the zygote, before it forks (RENDERER_PRELOAD): a renderer's start run in-process
    WARM_ROUNDS times — its event loop, the process channel, a view with a frame, a page
    restored, scrolled and painted — so that what the interpreter writes on a first run
    (Python 3.11 rewrites a function's code as it warms up; caches fill) is written once, in
    the zygote's copy-on-write memory, and not again in each renderer's private memory."""
    snapshot = Page.load(WARM_URL, WARM_PAGE * 4, WARM_VIEWPORT).snapshot()  # taller: scrolls
    for _ in range(WARM_ROUNDS):
        asyncio.run(_warm_once(snapshot))


async def _warm_once(snapshot: bytes) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    view_ours, view_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    renderer = asyncio.get_running_loop().create_task(serve(theirs.detach()))
    host = Endpoint(Channel(ours, name="warm-up"), {})
    view = Endpoint(Channel(view_ours, name="warm-up view"), {})
    try:
        await host.connect()
        process = host.proxy(RendererProcess)
        await asyncio.gather(process.open_view(Socket(view_theirs.detach())), view.connect())
        page = view.proxy(Renderer)
        width, height = WARM_VIEWPORT
        frame = os.memfd_create("fos-warm-up", os.MFD_CLOEXEC)
        os.ftruncate(frame, frame_size(width, height))
        await page.attach_frame(Memfd(frame), width, height)
        await page.restore(snapshot)
        await page.scroll(WARM_SCROLL)
        await page.paint()
    finally:
        view.close()
        host.close()
        await renderer
