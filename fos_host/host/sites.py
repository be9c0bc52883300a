"""Sites, site locks and the renderer process model (pure logic: no processes here).

A **site** is a scheme plus a registrable domain ("eTLD+1") from the Public Suffix List, as
in Chromium's site isolation: `https://news.example.co.uk` and `https://shop.example.co.uk`
are one site, `https://example.co.uk`; `http://x.com` and `https://x.com` are two. Ports are
not part of a site. A renderer is locked to one site before it gets any content, and the
lock never changes: every URL a renderer asks for is checked against it.

The URL parsing here decides which renderer may see which content, so it is deliberately
stricter than a browser's address bar. It takes the host the way the WHATWG URL standard
does (the last `@` ends the userinfo, UTS #46 for international names, `0x7f.1` and
`2130706433` are IPv4 addresses) but refuses, rather than repairs, anything a browser would
have to fix up first: backslashes, spaces or control characters in the authority,
percent-encoded hosts, `http:example.com`. A URL that needs repairing is a bug or a forged
message, and refusing it leaves no room for a difference between this parser and the one
that fetches to put a host in the wrong site.

Decisions worth knowing:

- The list is the one bundled with `publicsuffixlist` (no network), with its private section
  (`github.io`, ...: `a.github.io` and `b.github.io` are different sites, as in Chromium),
  and the PSL's default rule for unknown top-level labels: an unknown TLD is itself a public
  suffix. `.test` (reserved by RFC 2606, not on the list) is therefore a public suffix, so
  `news.fos.test` and `shop.fos.test` are the same site `https://fos.test` — what our test
  servers rely on. Likewise `localhost` is a site of its own, and `a.localhost` another.
- A host that *is* a public suffix (`co.uk`, `github.io`) is its own site, as in Chromium.
- IP addresses are their own site (`http://127.0.0.1`, `http://[::1]`): the PSL must never
  see `1.2.3.4`, or `5.6.3.4` would share its "registrable domain" `3.4`.
- One trailing dot is dropped (`example.com.` is `example.com`: the same server).
- `about:blank`, `about:srcdoc`, `data:`, `blob:`, `javascript:` and `file:` have no site of
  their own: they are refused with `BadUrl`. A blank or opener-made document takes the site of
  whoever made it, so the host keeps such a tab where it is (or, for a brand new blank tab,
  starts no renderer until the first real navigation) instead of asking for a site.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import string
from dataclasses import dataclass, field
from typing import cast

import idna
from publicsuffixlist import PublicSuffixList

from fos_host.errors import ConfigError, FosError

MiB = 1024 * 1024

SCHEMES = frozenset({"http", "https"})

_HOST_CHARS = frozenset(string.ascii_lowercase + string.digits + "-_")
_HEX_DIGITS = frozenset(string.hexdigits)
_DIGITS = frozenset(string.digits)
_OCTAL_DIGITS = frozenset(string.octdigits)
_AUTHORITY_END = "/?#"
_SHOWN = 120  # characters of a URL quoted in an error: a forged one may be megabytes


class BadUrl(FosError):
    """A URL that has no site: not http(s), no host, or a host no browser would accept."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"bad URL {_shown(url)}: {reason}")


class LockViolation(FosError):
    """A renderer asked for a URL of a site other than the one it is locked to."""

    def __init__(self, locked_to: Site, url: str, url_site: Site) -> None:
        self.locked_to = locked_to
        self.url = url
        self.url_site = url_site
        super().__init__(
            f"renderer locked to {locked_to} may not load {_shown(url)} (site {url_site})"
        )


@dataclass(frozen=True)
class Site:
    """Scheme and registrable domain, both canonical: lower case, A-labels (punycode) for
    international names, no trailing dot; an IPv6 address in brackets, as in a URL."""

    scheme: str
    domain: str

    def __str__(self) -> str:
        return f"{self.scheme}://{self.domain}"


def site_of(url: str) -> Site:
    """The site of an http(s) URL; `BadUrl` for anything else (see the module docstring)."""
    scheme, colon, rest = url.partition(":")
    scheme = scheme.lower()
    if not colon:
        raise BadUrl(url, "no scheme: expected http:// or https://")
    if scheme == "about":
        raise BadUrl(url, "about: URLs have no site of their own: they take their opener's")
    if scheme not in SCHEMES:
        raise BadUrl(url, f"scheme {_shown(scheme)} has no site: only http and https have one")
    if not rest.startswith("//"):
        raise BadUrl(url, f"expected {scheme}:// followed by a host")
    authority = rest[2:]
    for end in _AUTHORITY_END:
        authority = authority.partition(end)[0]
    if "\\" in authority or any(c <= " " or c == "\x7f" for c in authority):
        raise BadUrl(url, "backslash, space or control character before the path")
    host, is_address = _host_of(url, authority.rpartition("@")[2])
    return Site(scheme, host if is_address else _registrable(host))


@dataclass(frozen=True)
class SiteLock:
    """The one site a renderer may handle, fixed when it is created, before any content."""

    site: Site

    def check(self, url: str) -> None:
        """Raise `LockViolation` if `url` is of another site (`BadUrl` if it has none): the
        host then treats the request as a bad message from that renderer."""
        url_site = site_of(url)
        if url_site != self.site:
            raise LockViolation(self.site, url, url_site)

    def allows(self, url: str) -> bool:
        """Whether `url` is of this lock's site (a URL with no site is not)."""
        try:
            self.check(url)
        except (BadUrl, LockViolation):
            return False
        return True


@dataclass(frozen=True)
class Assignment:
    """Where a tab's document goes. `new`: the host must start `renderer` locked to `lock`.
    `moved`: a cross-site navigation took the tab out of renderer `left`. `released`: a
    renderer (the one left) has no tab any more, and the host should end it."""

    renderer: int
    lock: SiteLock
    new: bool
    moved: bool = False
    left: int | None = None
    released: int | None = None


@dataclass
class _Renderer:
    lock: SiteLock
    tabs: set[int] = field(default_factory=set)


class ProcessModel:
    """Which renderer each tab's document lives in.

    Tabs of one site share a renderer up to `tabs_per_renderer` tabs (the default, 1, is
    Chromium's: a process per tab until the limit); past that a new renderer is started
    while there are fewer than `process_limit`; at the limit, tabs go to the least loaded
    renderer of their site, however full. A site with no renderer at all still gets a new
    one above the limit: the limit saves memory, site isolation keeps one site's data out of
    another's process, and isolation wins — a renderer never holds two sites.

    Renderer ids count from 1 and are never reused, so an id the host has released can
    never come back naming another site's process.
    """

    def __init__(self, process_limit: int, tabs_per_renderer: int = 1) -> None:
        if process_limit < 1 or tabs_per_renderer < 1:
            raise ValueError(
                f"process_limit ({process_limit}) and tabs_per_renderer "
                f"({tabs_per_renderer}) must be at least 1"
            )
        self.process_limit = process_limit
        self.tabs_per_renderer = tabs_per_renderer
        self._renderers: dict[int, _Renderer] = {}
        self._tabs: dict[int, int] = {}
        self._ids = itertools.count(1)

    def assign(self, tab_id: int, url: str) -> Assignment:
        """Place a new tab whose first document is `url` (`BadUrl` leaves no trace)."""
        if tab_id in self._tabs:
            raise ValueError(f"tab {tab_id} is already in renderer {self._tabs[tab_id]}")
        return self._place(tab_id, site_of(url), left=None, released=None)

    def navigate(self, tab_id: int, url: str) -> Assignment:
        """Navigate a tab: it stays in its renderer within the site and moves across sites
        (the renderer it leaves is released if that emptied it)."""
        current = self.renderer_of(tab_id)
        site = site_of(url)
        lock = self._renderers[current].lock
        if lock.site == site:
            return Assignment(current, lock, new=False)
        released = self._detach(tab_id)
        return self._place(tab_id, site, left=current, released=released)

    def close(self, tab_id: int) -> int | None:
        """Forget a tab; the renderer to release if it has no tab left, else None."""
        self.renderer_of(tab_id)  # a clear error for an unknown tab
        return self._detach(tab_id)

    def renderer_of(self, tab_id: int) -> int:
        """The renderer a tab is in (`KeyError` for a tab this model does not know)."""
        try:
            return self._tabs[tab_id]
        except KeyError:
            raise KeyError(f"no tab {tab_id} in the process model") from None

    def tabs_of(self, renderer_id: int) -> frozenset[int]:
        """The tabs in a renderer (`KeyError` for a released or unknown renderer)."""
        return frozenset(self._renderer(renderer_id).tabs)

    def lock_of(self, renderer_id: int) -> SiteLock:
        """The lock to check that renderer's requests against."""
        return self._renderer(renderer_id).lock

    def locks(self) -> dict[int, SiteLock]:
        """Every live renderer and its lock (a copy)."""
        return {rid: r.lock for rid, r in self._renderers.items()}

    def _renderer(self, renderer_id: int) -> _Renderer:
        try:
            return self._renderers[renderer_id]
        except KeyError:
            raise KeyError(f"no renderer {renderer_id} in the process model") from None

    def _place(self, tab_id: int, site: Site, left: int | None, released: int | None) -> Assignment:
        """The placement rule of the class docstring; the least loaded same-site renderer
        (lowest id on a tie) both when it has room and when the limit forces sharing."""
        same_site = [
            (len(r.tabs), rid) for rid, r in self._renderers.items() if r.lock.site == site
        ]
        moved = left is not None
        if same_site:
            load, rid = min(same_site)
            if load < self.tabs_per_renderer or len(self._renderers) >= self.process_limit:
                renderer = self._renderers[rid]
                renderer.tabs.add(tab_id)
                self._tabs[tab_id] = rid
                return Assignment(rid, renderer.lock, False, moved, left, released)
        rid = next(self._ids)
        renderer = _Renderer(SiteLock(site), {tab_id})
        self._renderers[rid] = renderer
        self._tabs[tab_id] = rid
        return Assignment(rid, renderer.lock, True, moved, left, released)

    def _detach(self, tab_id: int) -> int | None:
        rid = self._tabs.pop(tab_id)
        renderer = self._renderers[rid]
        renderer.tabs.remove(tab_id)
        if renderer.tabs:
            return None
        del self._renderers[rid]
        return rid


def process_limit(
    mem_total_bytes: int,
    per_renderer_bytes: int = 80 * MiB,
    floor: int = 4,
    ceiling: int = 256,
) -> int:
    """How many renderers to run before same-site tabs share, in the spirit of Chromium's
    `GetMaxRendererProcessCount`: renderers may use half the RAM at an estimated
    `per_renderer_bytes` each, but never fewer than `floor` (a small machine still gets some
    isolation between tabs) nor more than `ceiling` (per-process overhead and pids)."""
    if mem_total_bytes < 0 or per_renderer_bytes < 1 or not 1 <= floor <= ceiling:
        raise ValueError(
            f"process_limit({mem_total_bytes}, {per_renderer_bytes}, {floor}, {ceiling}): "
            "need mem_total_bytes >= 0, per_renderer_bytes >= 1 and 1 <= floor <= ceiling"
        )
    return max(floor, min(ceiling, mem_total_bytes // 2 // per_renderer_bytes))


def mem_total(meminfo: str = "/proc/meminfo") -> int:
    """Physical memory in bytes, from `MemTotal` (a container sees the machine's RAM here,
    not its cgroup's limit)."""
    try:
        with open(meminfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "MemTotal":
                    number, unit = value.split()
                    if unit != "kB":
                        break
                    return int(number) * 1024
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read MemTotal from {meminfo}: {e}") from e
    raise ConfigError(f"no MemTotal line in kB in {meminfo}")


@functools.cache
def _psl() -> PublicSuffixList:
    """The list bundled with the package, parsed once (it takes a while) on first use."""
    return PublicSuffixList(accept_unknown=True, only_icann=False)


def _registrable(host: str) -> str:
    """eTLD+1 of a canonical domain name, or the name itself when it is a public suffix."""
    return cast("str | None", _psl().privatesuffix(host)) or host  # str in, str out


def _host_of(url: str, hostport: str) -> tuple[str, bool]:
    """The canonical host of `host[:port]` and whether it is an IP address: lower case,
    A-labels, IPv4 as a dotted quad, IPv6 in brackets, no trailing dot. The port is only
    checked, since it is no part of a site."""
    if hostport.startswith("["):
        inside, bracket, after = hostport[1:].partition("]")
        if not bracket:
            raise BadUrl(url, "IPv6 address without its closing ]")
        if after and not after.startswith(":"):
            raise BadUrl(url, f"{after!r} after an IPv6 address")
        host, is_address, port = _ipv6(url, inside), True, after[1:]
    else:
        name, _, port = hostport.partition(":")
        host, is_address = _domain(url, name)
    significant = port.lstrip("0")  # leading zeros are allowed, and int() has a digit limit
    if not set(port) <= _DIGITS or len(significant) > 5 or int(significant or "0") > 65535:
        raise BadUrl(url, f"port {_shown(port)} is not a number from 0 to 65535")
    return host, is_address


def _ipv6(url: str, text: str) -> str:
    if "%" in text:
        raise BadUrl(url, "IPv6 zone ids are not allowed in URLs")
    try:
        return f"[{ipaddress.IPv6Address(text).compressed}]"
    except ValueError as e:
        raise BadUrl(url, f"bad IPv6 address: {e}") from None


def _domain(url: str, name: str) -> tuple[str, bool]:
    """A canonical domain name, or an IPv4 address if the name ends in a number."""
    if not name:
        raise BadUrl(url, "no host")
    if "%" in name:
        raise BadUrl(url, "percent-encoded host")
    if not name.isascii():
        try:
            name = idna.uts46_remap(name, std3_rules=False, transitional=False)
        except idna.IDNAError as e:
            raise BadUrl(url, f"bad international host name: {e}") from None
    labels = name.lower().removesuffix(".").split(".")
    if "" in labels:
        raise BadUrl(url, "empty label in host")
    if any(len(label) > 63 for label in labels):  # and int() never sees 5000 digits
        raise BadUrl(url, "host label longer than 63 characters")
    if _ends_in_number(labels[-1]):
        return _ipv4(url, labels), True
    host = ".".join(_alabel(url, label) for label in labels)
    if len(host) > 253:
        raise BadUrl(url, "host longer than 253 characters")
    return host, False


def _alabel(url: str, label: str) -> str:
    """A label as it goes into DNS: a Unicode one punycoded, a punycode one checked."""
    if not label.isascii():
        label = "xn--" + label.encode("punycode").decode("ascii")
    elif label.startswith("xn--"):
        try:
            label[4:].encode("ascii").decode("punycode")
        except UnicodeError:
            raise BadUrl(url, f"host label {label!r} is not valid punycode") from None
    if not set(label) <= _HOST_CHARS:
        raise BadUrl(url, f"host label {label!r} has characters a DNS name cannot have")
    if len(label) > 63:
        raise BadUrl(url, f"host label {label[:20]!r}... is longer than 63 characters")
    return label


def _ends_in_number(label: str) -> bool:
    """WHATWG's test for "this host is meant as an IPv4 address"."""
    return set(label) <= _DIGITS or _ipv4_number(label) is not None


def _ipv4(url: str, labels: list[str]) -> str:
    """The WHATWG IPv4 parser: `1.2.3.4`, `0x7f.1`, `2130706433` and `010.0.0.1` (octal) are
    addresses; a host ending in a number that is no valid address is no host at all."""
    numbers = [_ipv4_number(label) for label in labels]
    parts = [n for n in numbers if n is not None]
    if (
        len(parts) != len(numbers)
        or len(parts) > 4
        or any(n > 255 for n in parts[:-1])
        or parts[-1] >= 256 ** (5 - len(parts))
    ):
        raise BadUrl(url, f"host {'.'.join(labels)!r} ends in a number but is no IPv4 address")
    address = parts[-1]
    for i, n in enumerate(parts[:-1]):
        address += n * 256 ** (3 - i)
    return str(ipaddress.IPv4Address(address))


def _ipv4_number(label: str) -> int | None:
    if label[:2] == "0x":
        digits, base, allowed = label[2:], 16, _HEX_DIGITS
    elif len(label) > 1 and label[0] == "0":
        digits, base, allowed = label[1:], 8, _OCTAL_DIGITS
    else:
        digits, base, allowed = label, 10, _DIGITS
    if not label or not set(digits) <= allowed:
        return None
    return int(digits, base) if digits else 0


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")
