"""A small origin server for the tests and the demo: several sites, told apart by the Host
header, on one loopback port (plain HTTP/1.1, or TLS with a context the caller makes).

The network service reaches it through its resolve map (`OriginServer.resolve()` gives
{name: 127.0.0.1:port} for every site), so URLs keep their real names — `http://news.fos.test/`
— and site isolation sees real sites: news.fos.test and shop.fos.test are one site (fos.test:
`.test` is a public suffix), a.b.example.co.uk and c.example.co.uk one (example.co.uk),
evil.test another. `demo_sites()` is the default content: pages with titles and links
between the sites, redirects within a site and across sites, a redirect loop, a big page of
unknown length, a slow page, a page that sets a cookie.

Only what a fetch needs is spoken: GET and HEAD, keep-alive, Content-Length or chunked
answers. Stdlib only, so the demo runs it anywhere the host runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

CHUNK = 4096  # bytes written at a time (and per pause, for a page that trickles)
MAX_HEAD = 64 * 1024  # request line and headers
MAX_REQUEST_BODY = 1 << 20


class Page(NamedTuple):
    status: int
    headers: Mapping[str, str]
    body: bytes
    trickle: float = 0.0  # seconds to wait before each CHUNK of the body: a slow server
    chunked: bool = False  # no Content-Length: the client learns the size only at the end


Sites = Mapping[str, Mapping[str, Page]]  # {host: {path: page}}


@dataclass(frozen=True)
class Seen:
    """A request as the server got it, for tests to check what a client sent."""

    host: str
    path: str
    headers: dict[str, str]  # names in lower case


class OriginServer:
    """Serves `sites` (default: `demo_sites()`) on `address`, port chosen by the kernel.
    An async context manager; or `await start()` and `await stop()`. `seen` lists every
    request, in order."""

    def __init__(
        self,
        sites: Sites | None = None,
        *,
        tls: ssl.SSLContext | None = None,
        address: str = "127.0.0.1",
    ) -> None:
        self.sites = demo_sites() if sites is None else sites
        self.tls = tls
        self.address = address
        self.port = 0
        self.seen: list[Seen] = []
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> OriginServer:
        self._server = await asyncio.start_server(
            self._serve, self.address, 0, ssl=self.tls, limit=MAX_HEAD
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("origin server on %s:%d (%s)", self.address, self.port, ", ".join(self.sites))
        return self

    async def stop(self) -> None:
        """Stop listening and drop every open connection (a keep-alive one included)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> OriginServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def resolve(self) -> dict[str, str]:
        """The network service's resolve map that sends every site's name here."""
        address = f"[{self.address}]" if ":" in self.address else self.address
        return {host: f"{address}:{self.port}" for host in self.sites}

    # -- one connection ----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while await self._one_request(reader, writer):
                pass
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # the client went away, or sent more head than MAX_HEAD
        except asyncio.CancelledError:
            pass  # stop(): end quietly (asyncio's stream callback logs a cancelled handler)
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; whether the connection stays open for another."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise
            return False  # closed between requests: the usual end of a keep-alive connection
        request = _parse_head(head)
        if request is None:
            await _answer(writer, _text(400, "a malformed request"), keep=False)
            return False
        method, target, version, headers = request
        if "transfer-encoding" in headers:
            await _answer(writer, _text(501, "request bodies must have a Content-Length"), False)
            return False
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > MAX_REQUEST_BODY:
            await _answer(writer, _text(413, "a request body too big or unsized"), keep=False)
            return False
        await reader.readexactly(int(length))  # not used: read to reach the next request
        host = urlsplit("//" + headers.get("host", "")).hostname or ""  # no port, lower case
        path = target.partition("?")[0]
        self.seen.append(Seen(host, path, headers))
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if method not in ("GET", "HEAD"):
            page = _text(405, f"{method} is not served here")
        elif host not in self.sites:
            page = _text(421, f"no site {host!r} is served here")
        else:
            page = self.sites[host].get(path) or _text(404, f"no page {path} on {host}")
        await _answer(writer, page, keep, head_only=method == "HEAD")
        return keep


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]] | None:
    """(method, target, version, {lower-case name: value}), or None if malformed."""
    try:
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
    except ValueError:
        return None
    if not version.startswith("HTTP/1.") or not target.startswith("/"):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            return None
        headers[name.lower()] = value.strip()
    return method, target, version, headers


async def _answer(
    writer: asyncio.StreamWriter, page: Page, keep: bool, *, head_only: bool = False
) -> None:
    try:
        reason = http.HTTPStatus(page.status).phrase
    except ValueError:  # a status of the caller's own
        reason = ""
    lines = [f"HTTP/1.1 {page.status} {reason}"]
    lines += [f"{name}: {value}" for name, value in page.headers.items()]
    lines.append(
        "Transfer-Encoding: chunked" if page.chunked else f"Content-Length: {len(page.body)}"
    )
    lines.append("Connection: " + ("keep-alive" if keep else "close"))
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    await writer.drain()
    if head_only:
        return
    for start in range(0, len(page.body), CHUNK):
        if page.trickle:
            await asyncio.sleep(page.trickle)
        chunk = page.body[start : start + CHUNK]
        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if page.chunked else chunk)
        await writer.drain()
    if page.chunked:
        writer.write(b"0\r\n\r\n")
        await writer.drain()


# -- content ---------------------------------------------------------------------------------


def _text(status: int, message: str) -> Page:
    return Page(status, {"Content-Type": "text/plain; charset=utf-8"}, f"{message}\n".encode())


def html(title: str, body: str, *, headers: Mapping[str, str] | None = None) -> Page:
    """A 200 HTML page titled `title`, with `body` (HTML) below an <h1> of the title."""
    text = (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{title}</title></head>\n'
        f"<body><h1>{title}</h1>\n{body}\n</body></html>\n"
    )
    return Page(200, {"Content-Type": "text/html; charset=utf-8", **(headers or {})}, text.encode())


def redirect(location: str, status: int = 302) -> Page:
    """A redirect. A scheme-relative `location` (//host/path) works over http and https."""
    return Page(status, {"Location": location, "Content-Type": "text/plain"}, b"moved\n")


def demo_sites() -> dict[str, dict[str, Page]]:
    """The demo's sites (a fresh copy: tests may add pages to it)."""
    links = (
        '<p><a href="//news.fos.test/">News</a> · <a href="//shop.fos.test/">Shop</a> · '
        '<a href="//a.b.example.co.uk/">Example A</a> · '
        '<a href="//c.example.co.uk/">Example C</a> · <a href="//evil.test/">Evil</a></p>'
    )
    paragraph = "<p>" + "All the news that fits in a sandbox. " * 20 + "</p>\n"
    big = html("A very long page", links + paragraph * (3 * 1024 * 1024 // len(paragraph)))
    slow = html("A slow page", links + "<p>" + "Loading, slowly. " * 2400 + "</p>")
    return {
        "news.fos.test": {
            "/": html(
                "fOS News",
                links + '<ul><li><a href="/article/1">Kernel sandboxes explained</a></li>'
                '<li><a href="/article/2">Site isolation in practice</a></li>'
                '<li><a href="/moved">An article that moved</a></li>'
                '<li><a href="/to-shop">Today\'s deal (a redirect to the shop)</a></li>'
                '<li><a href="/big">A very long page</a></li>'
                '<li><a href="/slow">A slow page</a></li></ul>',
            ),
            "/article/1": html("Kernel sandboxes explained", links + "<p>Namespaces.</p>"),
            "/article/2": html("Site isolation in practice", links + "<p>One site each.</p>"),
            "/moved": redirect("/old-article", 301),
            "/old-article": redirect("/article/1"),
            "/to-shop": redirect("//shop.fos.test/deal"),
            "/loop": redirect("/loop"),
            "/big": big._replace(chunked=True),
            "/slow": slow._replace(trickle=0.25),
        },
        "shop.fos.test": {
            "/": html(
                "fOS Shop",
                links + '<p><a href="/deal">Deal of the day</a> · <a href="/cart">Cart</a></p>',
                headers={"Set-Cookie": "cart=42; Path=/"},
            ),
            "/deal": html("Deal of the day", links + "<p>Half off every sandbox.</p>"),
            "/cart": html("Your cart", links + "<p>One sandbox, 0 EUR.</p>"),
        },
        "a.b.example.co.uk": {
            "/": html(
                "Example A",
                links + '<p>Same site as <a href="//c.example.co.uk/">Example C</a>; '
                '<a href="/to-c">a redirect there</a>.</p>',
            ),
            "/to-c": redirect("//c.example.co.uk/"),
        },
        "c.example.co.uk": {
            "/": html("Example C", links + "<p>Same site as Example A (example.co.uk).</p>"),
        },
        "evil.test": {
            "/": html(
                "Totally harmless",
                links + '<p><a href="/steal">Free prizes</a></p>'
                '<iframe src="//shop.fos.test/cart"></iframe>',
            ),
            "/steal": redirect("//shop.fos.test/cart"),
        },
    }
