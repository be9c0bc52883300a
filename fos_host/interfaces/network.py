"""What the network service offers the host: fetch a URL, hand back the answer as a sealed
memfd. The service is the only process with a network; renderers never reach it directly —
the host checks a renderer's request against its site lock, calls `fetch`, re-checks the
final URL (and every redirect on the way) against that lock, and only then passes the body on.
"""

from __future__ import annotations

from dataclasses import dataclass

from fos_host.ipc.interface import Interface, RemoteError, method
from fos_host.ipc.wire import Memfd


class FetchFailed(RemoteError):
    """No answer: the message starts with what failed — `DNS`, `connect`, `TLS`, `timeout` or
    `protocol` (the server broke HTTP or hung up mid-answer) — and names the host."""


class TooBig(RemoteError):
    """The body is longer than the `max_bytes` the caller allowed (nothing of it is returned)."""


class TooManyRedirects(RemoteError):
    """The chain of redirects is longer than the service follows (a loop, most likely)."""


class BadScheme(RemoteError):
    """The URL, or a redirect's target, is not an absolute http:// or https:// URL."""


@dataclass
class Response:
    status: int
    final_url: str  # the URL the body came from: the last redirect's target, or the request's
    redirects: list[str]  # every URL a redirect led to, in order (the request's URL not included)
    content_type: str  # the Content-Type header as sent, "" if there was none
    body: Memfd  # sealed against any change; the receiver owns (and closes) it
    length: int  # bytes in `body`, after any Content-Encoding was undone


class Network(Interface, version=1):
    errors = (FetchFailed, TooBig, TooManyRedirects, BadScheme)

    @method(0)
    async def fetch(self, url: str, max_bytes: int, timeout: float) -> Response:
        """GET `url`, following redirects, within `timeout` seconds in all and `max_bytes`
        of body. Any status is an answer (a 404 page is content); only a failure to get one
        raises. No cookies, no credentials and no cache are kept between calls."""
        ...
