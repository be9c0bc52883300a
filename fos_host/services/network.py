"""The network service: the one process with a network, fetching for the host.

`NetworkService` implements `fos_host.interfaces.network.Network` with httpx. It follows
redirects itself, one hop at a time, and reports every hop: the host decides whether the
final URL still belongs to the renderer's site, so it must see where the chain went. The
body is read as it streams, counted after any Content-Encoding is undone, and the fetch is
abandoned the moment it passes `max_bytes` (a small gzip body that would inflate to
gigabytes stops there too); nothing partial is ever returned. One deadline covers the whole
fetch — every hop, connect, TLS and the last byte — so a server that trickles a byte at a
time cannot hold a fetch open. No cookies are kept, no environment (proxies, netrc,
SSL_CERT_FILE) is read.

The resolve map (`--resolve NAME=ADDR`) connects to ADDR for host NAME. Only the TCP
connection's address changes: the request still says `Host: NAME`, TLS still sends NAME
(SNI) and checks the certificate against NAME, and connections are pooled by NAME, so two
names mapped to one address never share a connection or a TLS session. With `resolve_only`
a host not in the map fails as a DNS failure without any lookup: tests and the demo can
then never leave the addresses they mapped.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import os
import socket
import ssl
import zlib
from collections.abc import Iterable, Mapping
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import httpcore
import httpx

from fos_host import __version__
from fos_host.errors import ConfigError, FosError
from fos_host.interfaces.network import (
    BadScheme,
    FetchFailed,
    Network,
    Response,
    TooBig,
    TooManyRedirects,
)
from fos_host.ipc.channel import Channel
from fos_host.ipc.interface import Endpoint
from fos_host.ipc.shm import seal_bytes
from fos_host.ipc.wire import Memfd

log = logging.getLogger(__name__)

MAX_REDIRECTS = 20  # the Fetch standard's limit
REDIRECTS = frozenset({301, 302, 303, 307, 308})
USER_AGENT = f"fOS/{__version__}"
POOL = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)
ACCEPT_ENCODING = "gzip, deflate"  # what `_Body` can inflate with a bound on the output
_ZLIB_OR_GZIP = 32 + zlib.MAX_WBITS  # zlib detects either header


class NetworkService:
    """Fetches for the host (see the module's docstring). An async context manager: the
    connection pool is closed on exit.

    `resolve` maps a host name to `IP` or `IP:PORT` (`[v6]:PORT`); a port there replaces
    the URL's, so `http://news.fos.test/` can reach a test server on an ephemeral port.
    `ca_pem` adds certificate authorities (PEM text) to the system's, for a local test CA.
    """

    def __init__(
        self,
        resolve: Mapping[str, str] | None = None,
        *,
        resolve_only: bool = False,
        ca_pem: str | None = None,
    ) -> None:
        backend = _ResolvingBackend(parse_resolve(resolve or {}), resolve_only)
        tls = _tls_context(ca_pem)
        no_cookies = CookieJar(DefaultCookiePolicy(allowed_domains=[]))  # refuses every cookie
        self._client = httpx.AsyncClient(
            transport=_Transport(tls, backend),
            cookies=no_cookies,  # the jar itself: httpx copies a Cookies into a default jar
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": ACCEPT_ENCODING},
            timeout=None,  # one deadline for the whole fetch, in fetch()
            follow_redirects=False,
            trust_env=False,
        )

    async def __aenter__(self) -> NetworkService:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str, max_bytes: int, timeout: float) -> Response:
        if max_bytes < 0 or not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(
                f"fetch: max_bytes must be >= 0 and timeout > 0 s (got {max_bytes}, {timeout})"
            )
        try:
            async with asyncio.timeout(timeout):
                response = await self._follow(url, max_bytes)
        except TimeoutError:
            raise FetchFailed(f"timeout: no complete answer for {url} in {timeout:g} s") from None
        redirects = len(response.redirects)
        log.debug(
            "%s: %d, %d bytes, %d redirects", url, response.status, response.length, redirects
        )
        return response

    async def _follow(self, url: str, max_bytes: int) -> Response:
        current = _http_url(url, url)
        redirects: list[str] = []
        while True:
            try:
                async with self._client.stream("GET", current) as answer:
                    location = answer.headers.get("location")
                    if answer.status_code not in REDIRECTS or location is None:
                        body = await _read(answer, current, max_bytes)
                        return Response(
                            status=answer.status_code,
                            final_url=str(current),
                            redirects=redirects,
                            content_type=answer.headers.get("content-type", ""),
                            body=Memfd(seal_bytes(body, "fos-net-body")),
                            length=len(body),
                        )
            except httpx.TransportError as e:
                raise _failure(current, e) from None
            if len(redirects) == MAX_REDIRECTS:
                raise TooManyRedirects(
                    f"{url}: more than {MAX_REDIRECTS} redirects (the last to {current})"
                )
            try:
                target = current.join(location)
            except httpx.InvalidURL as e:
                raise FetchFailed(
                    f"protocol: {current.host}: a bad Location {location!r}: {e}"
                ) from None
            current = _http_url(target, f"the redirect from {current} to {location}")
            redirects.append(str(current))


def _http_url(url: str | httpx.URL, what: str | httpx.URL) -> httpx.URL:
    """`url`, parsed, if it is an absolute http(s) URL with a host; else BadScheme."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise BadScheme(f"{what}: not a URL ({e})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise BadScheme(f"{what}: only absolute http:// and https:// URLs are fetched")
    return parsed


async def _read(answer: httpx.Response, url: httpx.URL, max_bytes: int) -> bytearray:
    """The body, decoded, refused as soon as it is known to exceed `max_bytes`."""
    encoding = answer.headers.get("content-encoding", "identity").strip().lower()
    declared = answer.headers.get("content-length")
    if encoding == "identity" and declared and declared.isdigit() and int(declared) > max_bytes:
        raise TooBig(f"{url}: the body is {declared} bytes, above the limit of {max_bytes}")
    body = _Body(url, encoding, max_bytes)
    async for chunk in answer.aiter_raw():
        body.feed(chunk)
    return body.finish()


class _Body:
    """A body as it streams in: inflated if it was compressed (at most one byte past the
    limit per chunk, however much the chunk would inflate to), counted, refused past the
    limit."""

    def __init__(self, url: httpx.URL, encoding: str, limit: int) -> None:
        if encoding not in ("identity", "gzip", "x-gzip", "deflate"):
            raise FetchFailed(
                f"protocol: {url.host} sent Content-Encoding {encoding!r}; only "
                f"{ACCEPT_ENCODING} was accepted"
            )
        self._inflate = None if encoding == "identity" else zlib.decompressobj(_ZLIB_OR_GZIP)
        self._url = url
        self._limit = limit
        self._data = bytearray()

    def feed(self, chunk: bytes) -> None:
        if self._inflate is not None:
            room = self._limit - len(self._data)
            try:  # max_length room + 1: enough to know it is too big, never more
                chunk = self._inflate.decompress(self._inflate.unconsumed_tail + chunk, room + 1)
            except zlib.error as e:
                raise FetchFailed(
                    f"protocol: {self._url.host}: a corrupt compressed body: {e}"
                ) from None
        if len(self._data) + len(chunk) > self._limit:
            raise TooBig(f"{self._url}: the body is more than {self._limit} bytes")
        self._data += chunk

    def finish(self) -> bytearray:
        if self._inflate is not None and not self._inflate.eof:
            raise FetchFailed(f"protocol: {self._url.host}: the compressed body is cut short")
        return self._data


def _failure(url: httpx.URL, e: httpx.TransportError) -> FetchFailed:
    """FetchFailed saying what failed. httpcore's pool drops the exceptions' causes, so the
    connection's own failures are named where they happen (`_ResolvingBackend`, `_Stream`:
    "DNS: …", "connect: …", "TLS: …"); anything later is the server breaking HTTP."""
    text = str(e) or type(e).__name__
    if isinstance(e, httpx.ConnectError) and text.startswith(_NAMED):
        return FetchFailed(text)
    return FetchFailed(f"protocol: {url.host}: {text}")


_NAMED = ("DNS: ", "connect: ", "TLS: ")


def _reason(e: BaseException) -> str:
    """What `e` was raised from, at the bottom, in words (httpcore's ConnectError wraps
    anyio's "All connection attempts failed", which wraps the refusal that says why)."""
    for _ in range(8):  # a bound, in case of a cycle
        if e.__cause__ is None:
            break
        e = e.__cause__
    if isinstance(e, OSError) and not isinstance(e, ssl.SSLError) and e.errno and e.strerror:
        return os.strerror(e.errno) if e.errno > 0 else e.strerror  # < 0: a getaddrinfo code
    return str(e)


# -- connecting ------------------------------------------------------------------------------


def parse_resolve(resolve: Mapping[str, str]) -> dict[str, tuple[str, int | None]]:
    """{name: (ip, port or None)} from {name: "IP" | "IP:PORT" | "[v6]:PORT"}; ConfigError
    naming the entry if an address is not an IP (a name there would need DNS after all)."""
    out: dict[str, tuple[str, int | None]] = {}
    for name, addr in resolve.items():
        target = _address(addr)
        if target is None or not name:
            raise ConfigError(
                f"--resolve {name}={addr}: give NAME=IP or NAME=IP:PORT "
                "(news.fos.test=127.0.0.1:8080, news.fos.test=[::1]:8080)"
            )
        out[name.lower().rstrip(".")] = target
    return out


def _address(addr: str) -> tuple[str, int | None] | None:
    """(ip, port or None) of "IP", "IP:PORT", "[v6]" or "[v6]:PORT"; None if it is not."""
    host, port = addr, ""
    if addr.startswith("["):
        host, _, port = addr[1:].partition("]")
        if port and not port.startswith(":"):
            return None
        port = port[1:]
    elif addr.count(":") == 1:
        host, _, port = addr.partition(":")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if not port:
        return str(ip), None
    if not port.isdigit() or not 0 < int(port) < 0x10000:
        return None
    return str(ip), int(port)


class _ResolvingBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the resolve map in front: httpcore asks it for a
    connection to the URL's host and keeps using that host for SNI, certificate checks and
    pooling; only the address the socket connects to comes from the map."""

    def __init__(self, resolve: dict[str, tuple[str, int | None]], resolve_only: bool) -> None:
        self._resolve = resolve
        self._resolve_only = resolve_only
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        name = host
        mapped = self._resolve.get(host.lower().rstrip("."))
        if mapped is not None:
            host, port = mapped[0], mapped[1] or port
        elif self._resolve_only:  # refused before any lookup: tests never leave the map
            raise httpcore.ConnectError(f"DNS: {name}: not in the resolve map (only mapped hosts)")
        try:
            stream = await self._inner.connect_tcp(
                host, port, timeout, local_address, socket_options
            )
        except httpcore.ConnectError as e:
            if isinstance(e.__cause__, socket.gaierror):
                raise httpcore.ConnectError(f"DNS: {name}: {_reason(e)}") from e
            raise httpcore.ConnectError(f"connect: {name}: {_reason(e)} ({host}:{port})") from e
        return _Stream(stream, name)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _Stream(httpcore.AsyncNetworkStream):
    """A connection whose TLS handshake failures say so, with the name they were for."""

    def __init__(self, inner: httpcore.AsyncNetworkStream, name: str) -> None:
        self._inner = inner
        self._name = name

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            return await self._inner.start_tls(ssl_context, server_hostname, timeout)
        except httpcore.ConnectError as e:
            raise httpcore.ConnectError(f"TLS: {self._name}: {_reason(e)}") from e

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Transport(httpx.AsyncHTTPTransport):
    """httpx's transport over a connection pool that connects through our backend. httpx
    0.28 takes no network backend (encode/httpx#3749 would add one), so the pool it made is
    replaced — checked, so that a change in httpx fails here rather than quietly using DNS."""

    def __init__(self, tls: ssl.SSLContext, backend: httpcore.AsyncNetworkBackend) -> None:
        super().__init__(verify=tls, trust_env=False, limits=POOL)
        if not isinstance(getattr(self, "_pool", None), httpcore.AsyncConnectionPool):
            raise FosError("this httpx keeps no _pool: the resolve map cannot be applied")
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=tls,
            max_connections=POOL.max_connections,
            max_keepalive_connections=POOL.max_keepalive_connections,
            keepalive_expiry=POOL.keepalive_expiry,
            network_backend=backend,
        )


def _tls_context(ca_pem: str | None) -> ssl.SSLContext:
    """The system's CAs (plus `ca_pem`), hostname checks on, TLS 1.2 at least."""
    tls = ssl.create_default_context()
    tls.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_pem:
        try:
            tls.load_verify_locations(cadata=ca_pem)
        except (ssl.SSLError, ValueError) as e:
            raise ConfigError(f"the extra CA certificates are not PEM certificates: {e}") from e
    return tls


# -- the service process ---------------------------------------------------------------------


def main(
    fd: int,
    resolve: Mapping[str, str] | None = None,
    *,
    resolve_only: bool = False,
    ca_pem: str | None = None,
) -> None:
    """Serve `Network` on the SEQPACKET socket `fd` (which this takes over and closes) until
    the host closes its end: the network service process's entry point."""
    asyncio.run(_serve(fd, resolve, resolve_only, ca_pem))


def run(config: str) -> int:
    """The service sandbox's entry (`fos_host.services.network:run`): serve on fd 3.
    `config` is JSON: {"resolve": {NAME: ADDR}, "resolve_only": bool, "ca_pem": str|null}."""
    c = json.loads(config)
    main(3, c["resolve"], resolve_only=c["resolve_only"], ca_pem=c["ca_pem"])
    return 0


async def _serve(
    fd: int, resolve: Mapping[str, str] | None, resolve_only: bool, ca_pem: str | None
) -> None:
    with socket.socket(fileno=fd) as sock:  # closed however this ends
        async with NetworkService(resolve, resolve_only=resolve_only, ca_pem=ca_pem) as service:
            endpoint = Endpoint(Channel(sock, name="network"), {Network: service})
            await endpoint.connect()
            await endpoint.wait_closed()
