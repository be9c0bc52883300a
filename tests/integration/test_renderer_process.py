"""The renderer process for real: `fos_host.renderer.main` in a renderer sandbox (seccomp on),
serving `RendererProcess` on fd 3; each test opens a view on it, whose channel carries
`Renderer` one way and `RendererHost` the other — served by a fake host in this process:
pages from a dict behind a site lock, storage in a dict. (The real host is test_host.py.)

The frame is a memfd this process makes, seals against resizing (a renderer that shrank it
would make the host's reads fault), maps read-only and passes to the renderer.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pytest
from fdcheck import run

from fos_host.host.sites import SiteLock, site_of
from fos_host.interfaces.renderer import (
    Fetched,
    NoSuchControl,
    NotAllowed,
    Renderer,
    RendererHost,
    RendererProcess,
    RestoreFailed,
)
from fos_host.ipc.channel import Channel
from fos_host.ipc.interface import Endpoint
from fos_host.ipc.shm import seal_bytes
from fos_host.ipc.wire import Memfd, Socket
from fos_host.renderer.paint import frame_size, to_png
from fos_host.sandbox.jail import Jail
from fos_host.sandbox.sandbox import Sandbox, Spawner

T = TypeVar("T")
WIDTH, HEIGHT = 320, 240
HOME = "https://a.example/"
PARAGRAPHS = "".join(f"<p>Paragraph {i} of a page long enough to scroll.</p>" for i in range(60))
PAGES = {
    HOME: (
        "<!doctype html><title>Home of A</title><h1>Welcome</h1>"
        '<p><a href="/two">two</a> and <a href="https://b.example/x">elsewhere</a></p>'
        '<form><input name="q" value="start"></form>' + PARAGRAPHS
    ).encode(),
    "https://a.example/two": b"<title>Two</title><p>second page</p>",
    "https://b.example/x": b"<title>Other site</title>",
}


class FakeHost:
    """`RendererHost` as the host would offer it to a renderer locked to a.example."""

    def __init__(self) -> None:
        self.lock = SiteLock(site_of(HOME))
        self.fetches: list[str] = []
        self.storage: dict[tuple[str, str], bytes] = {}

    def fetch(self, url: str) -> Fetched:
        if not self.lock.allows(url):
            raise NotAllowed(f"{url} is not of {self.lock.site}")
        self.fetches.append(url)
        status, body = (200, PAGES[url]) if url in PAGES else (404, b"<title>Not found</title>")
        return Fetched(url, status, "text/html; charset=utf-8", Memfd(seal_bytes(body)), len(body))

    def storage_get(self, origin: str, key: str) -> bytes | None:
        assert self.lock.allows(origin)
        return self.storage.get((origin, key))

    def storage_set(self, origin: str, key: str, value: bytes) -> None:
        assert self.lock.allows(origin)
        self.storage[(origin, key)] = value


pytestmark = pytest.mark.usefixtures("no_fd_leak")


@dataclass
class Session:
    renderer: Renderer
    frame: mmap.mmap  # read-only
    sandbox: Sandbox


@pytest.fixture(scope="module")
def spawner() -> Iterator[Spawner]:
    with Spawner(zygote=True) as sp:
        yield sp


def sealed_frame() -> int:
    """A frame-sized memfd that neither side can resize."""
    fd = os.memfd_create("frame", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, frame_size(WIDTH, HEIGHT))
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    return fd


@contextlib.asynccontextmanager
async def renderer_process(sp: Spawner, host: FakeHost) -> AsyncIterator[Session]:
    """A renderer in a sandbox with a frame attached; on the way out, close the channel and
    check that the renderer exits by itself, with status 0."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sb = sp.spawn(Jail("renderer").pass_fd(theirs.fileno(), 3),
                      entry="fos_host.renderer.main:main", args=())  # fmt: skip
    finally:
        theirs.close()
    with sb:
        control = Endpoint(Channel(mine, name="host"), call_timeout=20)
        view_mine, view_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ep = Endpoint(Channel(view_mine, name="view"), {RendererHost: host}, call_timeout=20)
        try:
            await control.connect(timeout=20)
            await control.proxy(RendererProcess).open_view(Socket(view_theirs.detach()))
            await ep.connect(timeout=20)
            renderer = ep.proxy(Renderer)
            size = frame_size(WIDTH, HEIGHT)
            with (
                Memfd(sealed_frame()) as memfd,  # sending it closes it here (close is idempotent)
                mmap.mmap(memfd.fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as frame,
            ):
                await renderer.attach_frame(memfd, WIDTH, HEIGHT)
                yield Session(renderer, frame, sb)
        finally:
            ep.close()
            control.close()
        status = sb.wait(timeout=20)
        assert (status.code, status.signal) == (0, None), status.describe()


def test_navigate_paints_into_the_shared_frame(spawner: Spawner) -> None:
    host = FakeHost()

    async def body() -> None:
        async with renderer_process(spawner, host) as s:
            info = await s.renderer.navigate(HOME)
            assert (info.url, info.title, info.scroll_y) == (HOME, "Home of A", 0)
            assert info.links == ["https://a.example/two", "https://b.example/x"]
            assert info.height > HEIGHT
            pixels = bytes(s.frame)
            assert pixels != b"\xff" * len(pixels)  # text on the white page
            with memoryview(s.frame) as view:
                png = to_png(view, WIDTH, HEIGHT)
            assert png.startswith(b"\x89PNG\r\n\x1a\n")
            with pytest.raises(TypeError):
                s.frame[0] = 0  # the host's mapping is read-only

            at = await s.renderer.scroll(200)
            assert at == 200
            assert bytes(s.frame) != pixels  # the frame moved
            assert await s.renderer.scroll(10**9) == info.height - HEIGHT  # clamped

            await s.renderer.set_form_value("q", "typed")
            with pytest.raises(NoSuchControl):
                await s.renderer.set_form_value("nope", "x")

            two = await s.renderer.navigate(info.links[0])
            assert (two.title, two.links, two.scroll_y) == ("Two", [], 0)

    run(body(), timeout=90)
    assert host.fetches == [HOME, "https://a.example/two"]


def test_snapshot_restores_in_a_fresh_process_without_fetching(spawner: Spawner) -> None:
    first, second = FakeHost(), FakeHost()

    async def body() -> None:
        async with renderer_process(spawner, first) as s:
            info = await s.renderer.navigate(HOME)
            await s.renderer.scroll(150)
            await s.renderer.set_form_value("q", "kept")
            snapshot = await s.renderer.snapshot()
            painted = bytes(s.frame)
            first_pid = s.sandbox.pid
        async with renderer_process(spawner, second) as s:
            assert s.sandbox.pid != first_pid
            assert bytes(s.frame) == b"\0" * len(painted)  # a new frame, not painted yet
            restored = await s.renderer.restore(snapshot)
            assert restored.title == info.title
            assert restored.links == info.links
            assert (restored.url, restored.height, restored.scroll_y) == (HOME, info.height, 150)
            assert bytes(s.frame) == painted  # same text, same scroll, same form: same pixels
            with pytest.raises(RestoreFailed):
                await s.renderer.restore(b"not a snapshot")

    run(body(), timeout=90)
    assert first.fetches == [HOME]
    assert second.fetches == []


def test_a_cross_site_navigation_is_refused_by_the_host(spawner: Spawner) -> None:
    host = FakeHost()

    async def body() -> None:
        async with renderer_process(spawner, host) as s:
            await s.renderer.navigate(HOME)
            shown = bytes(s.frame)
            with pytest.raises(NotAllowed, match=r"b\.example"):
                await s.renderer.navigate("https://b.example/x")
            assert bytes(s.frame) == shown  # the page stays as it was
            assert (await s.renderer.scroll(0)) == 0  # and the renderer still serves

    run(body(), timeout=90)
    assert host.fetches == [HOME]


def test_storage_goes_through_the_host_under_its_site(spawner: Spawner) -> None:
    host = FakeHost()

    async def body() -> None:
        async with renderer_process(spawner, host) as s:
            await s.renderer.navigate(HOME)  # storage is the page's origin's
            assert await s.renderer.local_get("theme") is None
            await s.renderer.local_set("theme", b"dark")
            assert await s.renderer.local_get("theme") == b"dark"

    run(body(), timeout=90)
    assert host.storage == {("https://a.example", "theme"): b"dark"}
