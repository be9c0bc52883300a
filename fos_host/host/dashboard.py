"""The host's web pages: `fos-host run --dashboard 127.0.0.1:PORT` (the page, its JSON and
`/metrics`) and `fos-host run --metrics 127.0.0.1:PORT` (`/metrics` alone).

    /              one self-contained page (dashboard.html, inline CSS and JS, fetches nothing
                   else): tabs with tier and memory over time, the pressure timeline, events,
                   and the sandbox of every process (in the spirit of chrome://discards and
                   chrome://sandbox); it polls /api/state every second
    /api/state     tabs, pressure, recent events, counters, and the sampled history
    /api/sandbox   each process below the host as /proc shows it: seccomp mode, no_new_privs,
                   capabilities, which namespaces are its own, uid, cgroup
    /metrics       Prometheus exposition (host/metrics.py)

A plain HTTP/1.1 server on the host's event loop (asyncio.start_server): four read-only GET
routes, one request per connection, need no framework, and the host's state is read in place,
on the loop that changes it, without locks. The history is sampled here, once a second, into
ring buffers of `HISTORY_SECONDS`: the host keeps no history of its own.

The pages show the user's URLs, sites and titles, so the server binds only loopback addresses
unless told otherwise (`--dashboard-public`), and answers only requests whose Host header names
that address (a web page's script cannot reach it through a DNS name rebound to 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import errno
import hashlib
import ipaddress
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fos_host.errors import ConfigError
from fos_host.host.metrics import Metrics
from fos_host.kernel import caps

if TYPE_CHECKING:
    from fos_host.host.host import Host

log = logging.getLogger(__name__)

HISTORY_SECONDS = 600  # samples kept per tab and of the pressure: 10 minutes at one a second
SAMPLE_SECONDS = 1.0
EVENTS_SHOWN = 50
REQUEST_TIMEOUT = 10.0  # seconds for a client to send its request head
HEAD_LIMIT = 16384  # bytes of request line and headers
STORE_TIERS = ("hot", "warm", "cold")
NAMESPACES = ("user", "pid", "net", "mnt", "ipc", "uts", "cgroup")
PAGE = Path(__file__).with_name("dashboard.html")

Route = Callable[[], tuple[bytes, str]]  # the body and its content type
JSON_TYPE = "application/json"


@dataclass(frozen=True)
class Address:
    host: str  # an IP address, IPv6 without brackets
    port: int  # 0: the kernel picks one (see WebServer.url)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, flag: str, public: bool) -> Address:
    """`flag`'s ADDRESS:PORT (`127.0.0.1:8080`, `[::1]:8080`, `localhost:8080`). A
    non-loopback address only when `public`: the pages show the user's URLs."""
    name, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{flag} {text}: give ADDRESS:PORT, e.g. 127.0.0.1:8080")
    name = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    if name == "localhost":
        name = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        raise ConfigError(f"{flag} {text}: {name!r} is not an IP address "
                          "(give 127.0.0.1, [::1] or localhost)") from None  # fmt: skip
    if not ip.is_loopback and not public:
        raise ConfigError(
            f"{flag} {text}: not a loopback address, and the pages show the user's URLs "
            "to whoever connects: add --dashboard-public to serve them there anyway"
        )
    return Address(str(ip), int(port))


# -- what the page shows -----------------------------------------------------------------------


TabSample = tuple[float, int | None, str]  # time, bytes (None: no process), tier
PressureSample = tuple[float, str, float | None, float | None]  # time, level, stall some,
# available share (both None before the monitor's first reading)


class History:
    """Memory of each tab and the pressure reading, once a second, the last `keep` samples.
    A tab's buffer goes with the tab."""

    def __init__(self, keep: int = HISTORY_SECONDS) -> None:
        self.keep = keep
        self.tabs: dict[int, collections.deque[TabSample]] = {}
        self.pressure: collections.deque[PressureSample] = collections.deque(maxlen=keep)

    def sample(self, host: Host, now: float) -> None:
        infos = host.infos()
        for gone in self.tabs.keys() - {t.id for t in infos}:
            del self.tabs[gone]
        for t in infos:
            kept = self.tabs.setdefault(t.id, collections.deque(maxlen=self.keep))
            kept.append((round(now, 3), t.memory, t.tier))
        reading = host.monitor.reading if host.monitor is not None else None
        self.pressure.append((
            round(now, 3), host.level().value,
            reading.some if reading else None, reading.available if reading else None,
        ))  # fmt: skip

    def as_json(self) -> dict[str, Any]:
        return {
            "interval": SAMPLE_SECONDS,
            "tabs": {str(tab): list(kept) for tab, kept in self.tabs.items()},
            "pressure": list(self.pressure),
        }


def state(host: Host, history: History) -> dict[str, Any]:
    """What /api/state answers: the host as `fos-host top` shows it, plus the history."""
    monitor = host.monitor
    reading = monitor.reading if monitor is not None else None
    store = host.store.stats()
    return {
        "time": time.time(),
        "host": {
            "pid": os.getpid(),
            "renderers": len(host.renderers()),
            "bad_messages": host.bad_messages,
            "crashes": host.crashes,
            "oom_kills": host.oom_kills,
        },
        "pressure": {
            "level": host.level().value,
            "source": monitor.source if monitor is not None else "",
            "describe": monitor.describe() if monitor is not None else host.monitor_error,
            "reading": dataclasses.asdict(reading) if reading is not None else None,
        },
        "tabs": [dataclasses.asdict(t) for t in host.infos()],
        "events": [dataclasses.asdict(e) for e in list(host.events)[-EVENTS_SHOWN:]],
        "store": {tier: dataclasses.asdict(getattr(store, tier)) for tier in STORE_TIERS},
        "history": history.as_json(),
    }


def descendants(pid: int) -> Iterator[int]:
    """Every process below `pid`, parents before their children (children of any of its
    threads: the host spawns from a worker thread)."""
    todo = [pid]
    while todo:
        parent = todo.pop(0)
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:  # gone meanwhile
            continue
        for tid in tids:
            with contextlib.suppress(OSError), open(f"/proc/{parent}/task/{tid}/children") as f:
                for child in map(int, f.read().split()):
                    yield child
                    todo.append(child)


def _namespace(pid: int | str, name: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{name}")
    except OSError:  # gone, or not ours to look at (a rootless host and a foreign process)
        return None


def _cgroup(pid: int) -> str:
    """The process's memory cgroup (cgroup v1), else its cgroup v2 path: where its limit is."""
    with open(f"/proc/{pid}/cgroup") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    paths = {controllers: path for _, controllers, path in lines}
    return paths.get("memory", paths.get("", ""))


def process_sandbox(
    pid: int, kind: str, site: str, host_ns: dict[str, str | None]
) -> dict[str, Any]:
    """One process's sandbox as /proc shows it (root reads any). FileNotFoundError if gone."""
    st = caps.read_status(pid)
    cgroup = _cgroup(pid)
    namespaces: dict[str, str | None] = {}
    for name in NAMESPACES:
        own = _namespace(pid, name)
        namespaces[name] = None if own is None or host_ns[name] is None else (
            "host" if own == host_ns[name] else "own")  # fmt: skip
    cap_eff = int(st["CapEff"], 16)
    confined = (st["Seccomp"] == "2" and st["NoNewPrivs"] == "1" and cap_eff == 0
                and namespaces["user"] == namespaces["pid"] == "own")  # fmt: skip
    return {
        "pid": pid,
        "kind": kind,
        "site": site,
        "uid": int(st["Uid"].split()[0]),
        "seccomp": int(st["Seccomp"]),
        "seccomp_filters": int(st.get("Seccomp_filters", "0")),
        "no_new_privs": int(st["NoNewPrivs"]),
        "cap_eff": st["CapEff"],
        "cap_bnd": st["CapBnd"],
        "namespaces": namespaces,
        "cgroup": cgroup,
        "confined": confined,
    }


def sandboxes(host: Host) -> list[dict[str, Any]]:
    """What /api/sandbox answers: every process below the host. Renderers are named by the
    host (with their site lock); the others by the name they gave themselves (fos-zygote,
    fos-network, fos-storage, fos-spare, ...)."""
    renderers = {p.pid: p for p in host.renderers()}
    host_ns = {name: _namespace("self", name) for name in NAMESPACES}
    out = []
    for pid in descendants(os.getpid()):
        proc = renderers.get(pid)
        try:
            if proc is not None:
                site = str(proc.lock.site) if proc.lock is not None else ""
                out.append(process_sandbox(pid, "renderer", site, host_ns))
            else:
                with open(f"/proc/{pid}/comm") as f:
                    kind = f.read().strip().removeprefix("fos-")
                out.append(process_sandbox(pid, kind, "", host_ns))
        except (FileNotFoundError, ProcessLookupError):  # it ended while we looked
            continue
    return out


class Dashboard:
    """The page and its JSON, and the sampler that fills the history (`start`, `close`)."""

    def __init__(self, host: Host) -> None:
        self._host = host
        self.history = History()
        self.page = PAGE.read_bytes()
        self.csp = content_security_policy(self.page.decode())
        self._sampler: asyncio.Task[None] | None = None

    def routes(self) -> dict[str, Route]:
        host = self._host
        return {
            "/": lambda: (self.page, "text/html; charset=utf-8"),
            "/api/state": lambda: (_json(state(host, self.history)), JSON_TYPE),
            "/api/sandbox": lambda: (_json(sandboxes(host)), JSON_TYPE),
        }

    def start(self) -> None:
        self._sampler = asyncio.get_running_loop().create_task(self._sample())

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None

    async def _sample(self) -> None:
        while True:
            try:
                self.history.sample(self._host, time.time())
            except Exception:  # a cgroup read racing a renderer's end: the next tick is fine
                log.exception("dashboard: sampling failed")
            await asyncio.sleep(SAMPLE_SECONDS)


def content_security_policy(page: str) -> str:
    """Only the page's own inline script and style (by hash) and fetches to this server:
    tab titles and URLs are the web's text, and must never run as code here."""
    hashes = {
        kind: " ".join(
            "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
            for body in re.findall(rf"<{kind}>(.*?)</{kind}>", page, re.DOTALL)
        )
        for kind in ("script", "style")
    }
    return (f"default-src 'none'; script-src {hashes['script']}; style-src {hashes['style']}; "
            "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")  # fmt: skip


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# -- the server --------------------------------------------------------------------------------

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            421: "Misdirected Request", 500: "Internal Server Error"}  # fmt: skip


class WebServer:
    """HTTP on one address: `bind()` claims it (before the host starts, so a port in use
    fails at once), `start(host)` serves, `close()` stops. With `dashboard`, the page and its
    JSON besides /metrics."""

    def __init__(self, address: Address, flag: str, *, dashboard: bool, public: bool) -> None:
        self.address = address
        self.flag = flag
        self.dashboard = dashboard
        self.public = public
        self._sock: socket.socket | None = None
        self._server: asyncio.Server | None = None
        self._page: Dashboard | None = None
        self._routes: dict[str, Route] = {}
        self._headers: dict[str, dict[str, str]] = {}  # per route, besides the usual ones

    @property
    def port(self) -> int:
        """The bound port (the kernel's choice for port 0)."""
        assert self._sock is not None, "bind() first"
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{Address(self.address.host, self.port)}/"

    def bind(self) -> None:
        family = socket.AF_INET6 if ":" in self.address.host else socket.AF_INET
        try:
            self._sock = socket.create_server((self.address.host, self.address.port), family=family)
        except OSError as e:
            why = "in use" if e.errno == errno.EADDRINUSE else e.strerror
            raise ConfigError(f"{self.flag} {self.address}: cannot listen: {why}") from e
        self._sock.setblocking(False)

    async def start(self, host: Host) -> None:
        assert self._sock is not None, "bind() first"
        metrics = Metrics(host)
        self._routes = {"/metrics": metrics.exposition}
        if self.dashboard:
            self._page = Dashboard(host)
            self._routes |= self._page.routes()
            self._headers["/"] = {"Content-Security-Policy": self._page.csp}
            self._page.start()
        self._server = await asyncio.start_server(self._serve, sock=self._sock, limit=HEAD_LIMIT)
        log.info("%s: serving %s", self.flag, self.url)

    async def close(self) -> None:
        """Stop serving; idempotent (run_host calls it before the host closes and at exit)."""
        if self._page is not None:
            self._page.close()
            self._page = None
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()
            self._server = None
        elif self._sock is not None:  # bound, never served
            self._sock.close()
        self._sock = None

    def _allowed_hosts(self) -> set[str]:
        where = {f"{Address(self.address.host, self.port)}"}
        if ipaddress.ip_address(self.address.host).is_loopback:
            where.add(f"localhost:{self.port}")
        return where

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, body, ctype, extra = self._answer(head)
            writer.write(_response(status, body, ctype, extra))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError) as e:  # fmt: skip
            log.debug("%s: a client went away or sent too little or too much: %r", self.flag, e)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _answer(self, head: bytes) -> tuple[int, bytes, str, dict[str, str]]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, b"bad request line\n", "text/plain", {}
        method, target, _ = parts
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        if not self.public and headers.get("host") not in self._allowed_hosts():
            return 421, b"wrong Host header for this server\n", "text/plain", {}
        path = target.partition("?")[0]
        route = self._routes.get(path)
        if route is None:
            return 404, f"no page {path}\n".encode(), "text/plain", {}
        if method != "GET":
            return 405, b"GET only\n", "text/plain", {"Allow": "GET"}
        try:
            body, ctype = route()
        except Exception:
            log.exception("%s: %s failed", self.flag, path)
            return 500, b"failed: see the host's log\n", "text/plain", {}
        return 200, body, ctype, self._headers.get(path, {})


def _response(status: int, body: bytes, ctype: str, extra: dict[str, str]) -> bytes:
    headers = {
        "Content-Type": ctype,
        "Content-Length": str(len(body)),
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Connection": "close",
        **extra,
    }
    head = f"HTTP/1.1 {status} {_REASONS[status]}\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers.items()
    )
    return head.encode("latin-1") + b"\r\n" + body
