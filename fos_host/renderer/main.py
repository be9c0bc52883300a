"""The renderer process: `fos_host.renderer.main:main`, run inside a renderer sandbox.

It serves `Renderer` on the SEQPACKET socket at fd 3 and calls the host's `RendererHost`
over the same channel, so it needs nothing else: no network (pages come from the host's
`fetch`, which enforces the site lock), no files (storage goes through the host), and no
copy of the pixels (it paints into a shared memfd the host maps read-only). It runs until
the host closes the channel, then exits 0.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
from collections.abc import Callable

from fos_host.interfaces.renderer import (
    BadFrame,
    NoPage,
    NoSuchControl,
    PageInfo,
    Renderer,
    RendererHost,
    RestoreFailed,
)
from fos_host.ipc.channel import Channel
from fos_host.ipc.interface import Endpoint
from fos_host.ipc.wire import Memfd
from fos_host.renderer.page import MAX_VIEWPORT, BadSnapshot, Page
from fos_host.renderer.paint import frame_size

CHANNEL_FD = 3


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
        page = Page.load(
            fetched.final_url, fetched.body, self._viewport, charset_of(fetched.content_type)
        )
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
        return await self.host().storage_get(key)

    async def local_set(self, key: str, value: bytes) -> None:
        await self.host().storage_set(key, value)

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


async def serve(fd: int) -> None:
    """Serve `Renderer` on `fd` until the host closes the channel."""
    impl = RendererImpl(lambda: endpoint.proxy(RendererHost))
    endpoint = Endpoint(Channel(socket.socket(fileno=fd), name="renderer"), {Renderer: impl})
    try:
        await endpoint.connect()
        await endpoint.wait_closed()
    finally:
        impl.close()


def main(*argv: str) -> int:
    """The sandbox's entry: `args=()` serves on fd 3, `args=("N",)` on fd N."""
    asyncio.run(serve(int(argv[0]) if argv else CHANNEL_FD))
    return 0
