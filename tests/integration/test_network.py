"""The network service over a real channel, fetching from the built-in origin server on
loopback: the demo's names (news.fos.test, shop.fos.test, …) reach it through the service's
resolve map, so the hosts, redirects and certificates are the real names.

Nothing here may leave loopback: every service runs with `resolve_only` (a name not in the
map fails without a lookup) and `no_dns` replaces the system resolver with one that refuses
every name and records it — the tests assert nothing asked it, except the one test that
checks how a DNS failure is reported. Every test checks its fds are gone at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gzip
import os
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import pytest
import trustme
from fdcheck import run

from fos_host.errors import ConfigError
from fos_host.interfaces.network import (
    BadScheme,
    FetchFailed,
    Network,
    Response,
    TooBig,
    TooManyRedirects,
)
from fos_host.ipc.channel import Channel
from fos_host.ipc.interface import Endpoint, RemoteError
from fos_host.services import network as network_service
from fos_host.services.network import NetworkService, parse_resolve
from fos_host.services.origin import OriginServer, Page, demo_sites, html, redirect

T = TypeVar("T")
MiB = 1 << 20
SEALED = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


pytestmark = pytest.mark.usefixtures("no_fd_leak")


@pytest.fixture(autouse=True)
def no_dns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names anything tried to resolve; every one is refused (numeric hosts pass)."""
    looked_up: list[str] = []
    real = socket.getaddrinfo

    def refuse(
        host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> Any:
        try:
            return real(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
        except socket.gaierror:
            looked_up.append(host.decode() if isinstance(host, bytes) else str(host))
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return looked_up


@contextlib.asynccontextmanager
async def network(resolve: dict[str, str], **kw: Any) -> AsyncIterator[Network]:
    """A proxy to a NetworkService at the other end of a channel pair."""
    host_end, service_end = Channel.pair(names=("host", "network"))
    async with NetworkService(resolve, resolve_only=kw.pop("resolve_only", True), **kw) as svc:
        served = Endpoint(service_end, {Network: svc})
        host = Endpoint(host_end)
        await asyncio.gather(served.connect(), host.connect())
        try:
            yield host.proxy(Network)
        finally:
            host.close()
            await served.wait_closed()


def body_of(response: Response) -> bytes:
    """The body, after checking the memfd is sealed against any change; closes it."""
    with response.body as memfd:
        assert fcntl.fcntl(memfd.fd, fcntl.F_GET_SEALS) & SEALED == SEALED
        data = os.pread(memfd.fd, response.length + 1, 0)
    assert len(data) == response.length
    return data


async def fetch(net: Network, url: str, max_bytes: int = MiB, timeout: float = 5) -> bytes:
    return body_of(await net.fetch(url, max_bytes, timeout))


# -- fetching --------------------------------------------------------------------------------


def test_fetch_a_page_by_its_name(no_dns: list[str]) -> None:
    async def go() -> None:
        async with OriginServer() as origin, network(origin.resolve()) as net:
            got = await net.fetch("http://news.fos.test/", MiB, 5)
            assert (got.status, got.final_url, got.redirects) == (200, "http://news.fos.test/", [])
            assert got.content_type == "text/html; charset=utf-8"
            assert b"<title>fOS News</title>" in body_of(got)
            seen = origin.seen[-1]
            assert (seen.host, seen.path, seen.headers["host"]) == ("news.fos.test", "/", seen.host)
            assert seen.headers["user-agent"].startswith("fOS/")
            missing = await net.fetch("http://news.fos.test/nowhere", MiB, 5)
            assert missing.status == 404  # a status is an answer, not a failure
            assert b"no page /nowhere" in body_of(missing)

    run(go())
    assert no_dns == []


def test_many_sites_at_once_on_one_address_keep_apart() -> None:
    """Every name maps to the same address and port: connections are pooled by name, so
    each answer is its own site's (a pool keyed by address would mix them)."""

    async def go() -> None:
        async with OriginServer() as origin, network(origin.resolve()) as net:
            names = ["news.fos.test", "shop.fos.test", "a.b.example.co.uk", "c.example.co.uk"]
            titles = ["fOS News", "fOS Shop", "Example A", "Example C"]
            bodies = await asyncio.gather(*(fetch(net, f"http://{n}/") for n in names * 5))
            for body, title in zip(bodies, titles * 5, strict=True):
                assert f"<title>{title}</title>".encode() in body

    run(go())


def test_redirects_are_followed_and_every_hop_recorded() -> None:
    async def go() -> None:
        async with OriginServer() as origin, network(origin.resolve()) as net:
            got = await net.fetch("http://news.fos.test/moved", MiB, 5)
            assert got.redirects == [
                "http://news.fos.test/old-article",
                "http://news.fos.test/article/1",
            ]
            assert (got.status, got.final_url) == (200, "http://news.fos.test/article/1")
            assert b"<title>Kernel sandboxes explained</title>" in body_of(got)

    run(go())


def test_cross_site_redirects_are_reported_for_the_host_to_refuse() -> None:
    """The service follows them; the host sees from `redirects` and `final_url` that the
    answer is another site's and does not hand it to the renderer."""

    async def go() -> None:
        async with OriginServer() as origin, network(origin.resolve()) as net:
            deal = await net.fetch("http://news.fos.test/to-shop", MiB, 5)
            assert deal.redirects == ["http://shop.fos.test/deal"] and deal.final_url.startswith(
                "http://shop.fos.test/"
            )
            body_of(deal)
            stolen = await net.fetch("http://evil.test/steal", MiB, 5)
            assert stolen.redirects == [stolen.final_url] == ["http://shop.fos.test/cart"]
            assert b"<title>Your cart</title>" in body_of(stolen)
            same_site = await net.fetch("http://a.b.example.co.uk/to-c", MiB, 5)
            assert same_site.redirects == ["http://c.example.co.uk/"]
            body_of(same_site)

    run(go())


def test_a_redirect_loop_is_too_many_redirects() -> None:
    async def go() -> None:
        async with OriginServer() as origin, network(origin.resolve()) as net:
            with pytest.raises(TooManyRedirects, match=r"more than 20 redirects"):
                await net.fetch("http://news.fos.test/loop", MiB, 5)

    run(go())


def test_no_cookies_are_kept_between_fetches() -> None:
    async def go() -> None:
        async with OriginServer() as origin, network(origin.resolve()) as net:
            await fetch(net, "http://shop.fos.test/")  # answers with Set-Cookie
            assert "set-cookie" not in origin.seen[-1].headers
            await fetch(net, "http://shop.fos.test/cart")
            assert "cookie" not in origin.seen[-1].headers

    run(go())


# -- limits ----------------------------------------------------------------------------------


def sized_sites() -> dict[str, dict[str, Page]]:
    sites = demo_sites()
    zeros = bytes(20 * MiB)
    sites["news.fos.test"].update(
        {
            "/exact": Page(200, {"Content-Type": "text/plain"}, b"x" * 1000),
            "/exact-chunked": Page(200, {"Content-Type": "text/plain"}, b"x" * 1000, chunked=True),
            "/gzip": Page(
                200,
                {"Content-Type": "text/html", "Content-Encoding": "gzip"},
                gzip.compress(html("Compressed", "<p>small</p>").body),
            ),
            "/bomb": Page(200, {"Content-Encoding": "gzip"}, gzip.compress(zeros), chunked=True),
            "/corrupt": Page(200, {"Content-Encoding": "gzip"}, b"\x1f\x8b not gzip at all"),
            "/cut": Page(200, {"Content-Encoding": "gzip"}, gzip.compress(b"hello" * 999)[:-20]),
            "/brotli": Page(200, {"Content-Encoding": "br"}, b"whatever"),
        }
    )
    return sites


def test_a_body_above_max_bytes_is_refused_whole() -> None:
    async def go() -> None:
        async with OriginServer(sized_sites()) as origin, network(origin.resolve()) as net:
            for path in ("/exact", "/exact-chunked"):  # known in advance, and only at the end
                assert len(await fetch(net, f"http://news.fos.test{path}", 1000)) == 1000
                with pytest.raises(TooBig, match=r"above the limit of 999|more than 999"):
                    await net.fetch(f"http://news.fos.test{path}", 999, 5)
            started = time.monotonic()
            with pytest.raises(TooBig, match=r"more than 1048576 bytes"):
                await net.fetch("http://news.fos.test/big", MiB, 5)  # chunked: while streaming
            assert time.monotonic() - started < 2
            big = await fetch(net, "http://news.fos.test/big", 8 * MiB)  # in a memfd, whole
            assert len(big) > 3 * MiB - 4096 and big.endswith(b"</html>\n")

    run(go())


def test_compressed_bodies_are_inflated_within_the_limit() -> None:
    """max_bytes counts the inflated body, and a gzip bomb (20 MiB of zeros in 20 KiB) stops
    at the limit instead of inflating in memory."""

    async def go() -> None:
        async with OriginServer(sized_sites()) as origin, network(origin.resolve()) as net:
            assert b"<title>Compressed</title>" in await fetch(net, "http://news.fos.test/gzip")
            with pytest.raises(TooBig, match=r"more than 1048576 bytes"):
                await net.fetch("http://news.fos.test/bomb", MiB, 5)
            assert len(await fetch(net, "http://news.fos.test/bomb", 20 * MiB)) == 20 * MiB
            with pytest.raises(FetchFailed, match=r"^protocol: news.fos.test: a corrupt"):
                await net.fetch("http://news.fos.test/corrupt", MiB, 5)
            with pytest.raises(FetchFailed, match=r"cut short"):
                await net.fetch("http://news.fos.test/cut", MiB, 5)
            with pytest.raises(FetchFailed, match=r"Content-Encoding 'br'"):
                await net.fetch("http://news.fos.test/brotli", MiB, 5)

    run(go())


def test_a_slow_server_is_stopped_by_the_total_time_limit() -> None:
    """The slow page sends a chunk every 0.25 s: no single read ever waits long, only the
    deadline for the whole fetch stops it."""

    async def go() -> None:
        async with OriginServer() as origin, network(origin.resolve()) as net:
            started = time.monotonic()
            with pytest.raises(FetchFailed, match=r"^timeout: .*news.fos.test/slow in 0.6 s"):
                await net.fetch("http://news.fos.test/slow", MiB, 0.6)
            assert 0.6 <= time.monotonic() - started < 2
            assert b"A slow page" in await fetch(net, "http://news.fos.test/slow", timeout=10)

    run(go())


def test_nonsense_limits_are_a_remote_error() -> None:
    async def go() -> None:
        async with OriginServer() as origin, network(origin.resolve()) as net:
            for max_bytes, timeout in ((-1, 5.0), (MiB, 0.0), (MiB, float("nan"))):
                with pytest.raises(RemoteError, match=r"failed on the other side"):
                    await net.fetch("http://news.fos.test/", max_bytes, timeout)

    run(go())


# -- where a fetch may go --------------------------------------------------------------------


def test_names_outside_the_resolve_map_are_refused_without_a_lookup(no_dns: list[str]) -> None:
    async def go() -> None:
        async with OriginServer() as origin, network(origin.resolve()) as net:
            with pytest.raises(FetchFailed, match=r"^DNS: unknown.fos.test: not in the resolve"):
                await net.fetch("http://unknown.fos.test/", MiB, 5)
            loopback = f"http://127.0.0.1:{origin.port}/"  # an address, but not mapped
            with pytest.raises(FetchFailed, match=r"^DNS: 127.0.0.1: not in the resolve map"):
                await net.fetch(loopback, MiB, 5)
            assert [s.path for s in origin.seen] == []  # nothing reached the server

    run(go())
    assert no_dns == []


def test_dns_and_connect_failures_say_which(no_dns: list[str]) -> None:
    """Without resolve_only an unmapped name goes to the system resolver (here `no_dns`,
    which refuses it); a mapped name whose port is closed fails to connect."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]

    async def go() -> None:
        resolve = {"closed.fos.test": f"127.0.0.1:{closed}"}
        async with network(resolve, resolve_only=False) as net:
            with pytest.raises(FetchFailed, match=r"^DNS: nowhere.fos.test: .*not known"):
                await net.fetch("http://nowhere.fos.test/", MiB, 5)
            with pytest.raises(FetchFailed, match=r"^connect: closed.fos.test: .*refused"):
                await net.fetch("http://closed.fos.test/", MiB, 5)

    run(go())
    assert no_dns == ["nowhere.fos.test"]


def test_only_absolute_http_urls_are_fetched() -> None:
    sites = demo_sites()
    sites["news.fos.test"]["/to-file"] = redirect("file:///etc/passwd")

    async def go() -> None:
        async with OriginServer(sites) as origin, network(origin.resolve()) as net:
            for url in ("ftp://news.fos.test/", "file:///etc/passwd", "news.fos.test/", "http://"):
                with pytest.raises(
                    BadScheme, match=r"only absolute http:// and https://|not a URL"
                ):
                    await net.fetch(url, MiB, 5)
            with pytest.raises(BadScheme, match=r"the redirect from .* to file:///etc/passwd"):
                await net.fetch("http://news.fos.test/to-file", MiB, 5)

    run(go())


def test_resolve_entries_must_be_addresses() -> None:
    assert parse_resolve({"A.Test.": "127.0.0.1", "b.test": "127.0.0.1:8080"}) == {
        "a.test": ("127.0.0.1", None),
        "b.test": ("127.0.0.1", 8080),
    }
    assert parse_resolve({"c.test": "[::1]:443", "d.test": "::1", "e.test": "[::1]"}) == {
        "c.test": ("::1", 443),
        "d.test": ("::1", None),
        "e.test": ("::1", None),
    }
    for addr in ("localhost", "localhost:80", "127.0.0.1:0", "127.0.0.1:65536", "[::1]x", ""):
        with pytest.raises(ConfigError, match=r"give NAME=IP or NAME=IP:PORT"):
            parse_resolve({"x.test": addr})


# -- TLS ------------------------------------------------------------------------------------


def test_https_checks_the_certificate_against_the_name_not_the_address() -> None:
    """The certificate names news.fos.test only (not 127.0.0.1, the address connected to):
    it is accepted for news.fos.test, refused for shop.fos.test on the same server, and
    refused without the CA."""
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("news.fos.test").configure_cert(server_tls)
    ca_pem = ca.cert_pem.bytes().decode()

    async def go() -> None:
        async with OriginServer(tls=server_tls) as origin:
            async with network(origin.resolve(), ca_pem=ca_pem) as net:
                assert b"<title>fOS News</title>" in await fetch(net, "https://news.fos.test/")
                with pytest.raises(FetchFailed, match=r"^TLS: shop.fos.test: .*(mismatch|match)"):
                    await net.fetch("https://shop.fos.test/", MiB, 5)
            async with network(origin.resolve()) as net:
                with pytest.raises(FetchFailed, match=r"^TLS: news.fos.test: .*issuer"):
                    await net.fetch("https://news.fos.test/", MiB, 5)

    run(go())


# -- the service process's entry point ------------------------------------------------------


def test_main_serves_until_the_host_closes_the_channel() -> None:
    async def go() -> None:
        async with OriginServer() as origin:
            host_end, service_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            service = threading.Thread(
                target=network_service.main,
                args=(service_end.detach(), origin.resolve()),
                kwargs={"resolve_only": True},
            )
            service.start()
            host = Endpoint(Channel(host_end, name="host"))
            await host.connect()
            net = host.proxy(Network)
            assert b"<title>fOS Shop</title>" in await fetch(net, "http://shop.fos.test/")
            host.close()
            await asyncio.to_thread(service.join, 10)
            assert not service.is_alive()

    run(go())
