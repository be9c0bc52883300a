"""The control socket of a running host (`fos-host run`), and the client `fos-host ctl` uses.

    fos-host run --socket /run/fos-host/control.sock &
    fos-host ctl open https://news.fos.test/

An AF_UNIX SOCK_SEQPACKET socket (one datagram per message, as every other channel here)
serving the `Control` interface (fos_host/interfaces/control.py). Who may control the host is
checked twice, because a renderer's pages, screenshots and snapshots are the user's data:

- the filesystem: the socket is 0600 in a directory that is the host user's and 0700, so no
  other user reaches it (with `--allow-uid` the directory is 0711 and the socket 0666: others
  can connect to the known path, not list or replace anything);
- the kernel's word on the peer (SO_PEERCRED) at every accept: the host's own euid, root and
  the `--allow-uid` uids are served, anyone else is closed at once and logged with uid and pid.

A socket file outlives a SIGKILLed host. At start, a socket that refuses connections
(ECONNREFUSED: nobody listens) is a dead host's and is removed; one that answers belongs to a
live host, and starting is refused with its pid. A clean shutdown removes the file.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fos_host.errors import ConfigError, FosError
from fos_host.interfaces.control import (
    BadUrl,
    Control,
    Event,
    Failed,
    NoSuchTab,
    Pressure,
    Status,
    TabView,
)
from fos_host.ipc.channel import Channel, ChannelClosed
from fos_host.ipc.interface import Endpoint

if TYPE_CHECKING:  # the client (fos-host ctl) imports this module without the host's code
    from fos_host.host.dashboard import WebServer
    from fos_host.host.host import Host, HostConfig

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
CALL_TIMEOUT = 60.0  # open and navigate answer once the page loaded (fetches time out at 15 s)
PROBE_TIMEOUT = 5.0  # seconds to wait for a live host's socket to take a connection
BACKLOG = 16
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def default_socket_path() -> Path:
    """root: /run/fos-host/control.sock; others: $XDG_RUNTIME_DIR/fos-host/control.sock, or
    /tmp/fos-host-<uid>/control.sock without one (checked to be ours and 0700 at start)."""
    uid = os.geteuid()
    if uid == 0:
        return Path("/run/fos-host") / SOCKET_NAME
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "fos-host" / SOCKET_NAME
    return Path(f"/tmp/fos-host-{uid}") / SOCKET_NAME


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    """Who is at the other end, as the kernel recorded it at connect (or listen) time."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return Peer(pid, uid, gid)


# -- the server ------------------------------------------------------------------------------


class ControlService:
    """`Control` on a Host: the host's errors become the interface's declared ones, so the
    client shows the real reason."""

    def __init__(self, host: Host) -> None:
        self._host = host

    async def open(self, url: str) -> TabView:
        with _translated():
            return self._host.info(await self._host.open(url))

    async def navigate(self, tab: int, url: str) -> TabView:
        with _translated():
            return self._host.info(await self._host.navigate(tab, url))

    async def reload(self, tab: int) -> TabView:
        with _translated():
            return self._host.info(await self._host.reload(tab))

    async def activate(self, tab: int) -> TabView:
        with _translated():
            return self._host.info(await self._host.activate(tab))

    async def close(self, tab: int) -> None:
        with _translated():
            await self._host.close_tab(tab)

    def list(self) -> list[TabView]:
        return self._host.infos()

    def screenshot(self, tab: int) -> bytes:
        with _translated():
            return self._host.screenshot(tab)

    async def snapshot(self, tab: int) -> bytes:
        with _translated():
            return await self._host.snapshot(tab)

    async def events(self) -> AsyncIterator[Event]:
        host = self._host
        sub = host.subscribe()
        try:
            for event in list(host.events):
                yield event
            while True:
                with _translated():
                    event = await sub.next()
                yield event
        finally:
            host.unsubscribe(sub)

    async def step(self, tab: int, action: str) -> TabView:
        from fos_host.host.lifecycle import Action

        try:
            act = Action(action)
        except ValueError:
            raise Failed(f"no action {action!r}: freeze, hibernate, discard or kill") from None
        with _translated():
            await self._host.step(tab, act, "asked by fos-host ctl")
            return self._host.info(self._host.tab(tab))

    def pin(self, tab: int, pinned: bool) -> TabView:
        with _translated():
            return self._host.info(self._host.pin(tab, pinned))

    def status(self) -> Status:
        host = self._host
        return Status(os.getpid(), len(host.tabs), len(host.renderers()), host.bad_messages,
                      host.crashes, host.level().value)  # fmt: skip

    def pressure(self) -> Pressure:
        monitor = self._host.monitor
        if monitor is None:
            return Pressure(self._host.level().value, "", self._host.monitor_error)
        return Pressure(monitor.level.value, monitor.source, monitor.describe())

    def recent_events(self, last: int) -> builtins.list[Event]:  # not the method `list`
        kept = list(self._host.events)
        return kept[-last:] if last > 0 else kept


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """The host's exceptions as `Control` declares them (a renderer's own RemoteErrors, a
    channel that closed mid-call, ... are all FosErrors: Failed, with their text)."""
    from fos_host.host import sites  # here: the client (ctl) never loads the site rules

    try:
        yield
    except KeyError as e:  # Host.tab(): "no tab N"
        raise NoSuchTab(str(e.args[0]) if e.args else "no such tab") from None
    except sites.BadUrl as e:
        raise BadUrl(str(e)) from None
    except FosError as e:
        raise Failed(str(e)) from None


class ControlServer:
    """The listening socket and its connections. `bind()` claims the path (removing a dead
    host's socket, refusing a live host's), `start()` serves, `close()` removes the file."""

    def __init__(self, path: Path, allow_uids: Iterable[int] = ()) -> None:
        self.path = path
        self.allowed = frozenset({os.geteuid(), 0, *allow_uids})
        self._service: object = None  # the `Control` implementation, from start()
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we bound
        self._connections: set[asyncio.Task[None]] = set()
        self._endpoints: set[Endpoint] = set()

    def bind(self) -> None:
        """Create the socket's directory (0700) if needed, check it, remove a dead host's
        socket, then bind (0600; 0666 when other uids are allowed) and listen."""
        others = bool(self.allowed - {os.geteuid(), 0})
        _check_dir(self.path.parent, others)
        _remove_stale(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            os.fchmod(sock.fileno(), 0o600)  # the mode bind() gives the file (less the umask)
            sock.bind(str(self.path))
            if others:  # after bind: until then, only this user may connect
                os.chmod(self.path, 0o666)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise ConfigError(f"cannot listen on {self.path}: {e.strerror}") from e
        self._listener = sock

    def start(self, service: object) -> None:
        """Serve `service` (a `Control` implementation) on this event loop, to the
        connections that came since `bind` too."""
        assert self._listener is not None, "bind() first"
        self._service = service
        asyncio.get_running_loop().add_reader(self._listener.fileno(), self._accept)

    def close(self) -> None:
        """Stop listening, drop every connection, and remove the socket file if it is still
        the one we bound (not a successor's)."""
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        for endpoint in list(self._endpoints):
            endpoint.close()
        for task in list(self._connections):
            task.cancel()
        if self._inode is not None:
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)
            self._inode = None

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: the connection waits in the backlog
                log.error("control socket %s: accept failed: %s", self.path, e.strerror)
                return
            peer = peer_of(conn)
            if peer.uid not in self.allowed:
                log.warning(
                    "control socket %s: refused a connection from uid %d (pid %d): allowed are "
                    "uids %s (start the host with --allow-uid %d to let it in)",
                    self.path, peer.uid, peer.pid, ", ".join(map(str, sorted(self.allowed))),
                    peer.uid,
                )  # fmt: skip
                conn.close()
                continue
            task = asyncio.get_running_loop().create_task(self._serve(conn, peer))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, conn: socket.socket, peer: Peer) -> None:
        name = f"control uid={peer.uid} pid={peer.pid}"
        endpoint = Endpoint(
            Channel(conn, name=name),
            {Control: self._service},
            on_bad_message=lambda why: log.warning("%s: bad message: %s", name, why),
        )
        self._endpoints.add(endpoint)
        try:
            await endpoint.connect()
            log.debug("%s: connected", name)
            await endpoint.wait_closed()
        except (ChannelClosed, FosError) as e:  # gone before its HELLO (a probe), or silent
            log.debug("%s: %s", name, e)
        finally:
            endpoint.close()
            self._endpoints.discard(endpoint)


def _check_dir(directory: Path, others: bool) -> None:
    """The socket's directory: created 0700 if missing; else it must be a directory of this
    user that other users cannot list or write (0700). With `others` (--allow-uid) it is made
    0711, so they can reach the socket by name and nothing more."""
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise ConfigError(f"cannot create the control socket's directory {directory}: "
                          f"{e.strerror}") from e  # fmt: skip
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{directory} is not a directory: choose another --socket")
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"{directory} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}): "
            "it could replace the control socket; remove it or choose another --socket"
        )
    if st.st_mode & 0o066:
        raise ConfigError(
            f"{directory} is open to other users (mode {stat.S_IMODE(st.st_mode):04o}): "
            f"make it 0700 (chmod 700 {directory}) or choose another --socket"
        )
    os.chmod(directory, 0o711 if others else 0o700)


def _remove_stale(path: Path) -> None:
    """A socket at `path` that nobody listens on is a dead host's: remove it. One a live host
    answers on: refuse, naming its pid."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(
            f"{path} exists and is not a socket: remove it or choose another --socket"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect(str(path))
        pid = peer_of(probe).pid
    except ConnectionRefusedError:
        log.warning("removing the control socket %s of a host that is gone", path)
        os.unlink(path)
        return
    except OSError as e:  # EACCES: another user's; a timeout: a live host that is stuck
        why = e.strerror or "no answer"
        raise ConfigError(f"{path} is in use and cannot be checked ({why}): "
                          "choose another --socket") from e  # fmt: skip
    finally:
        probe.close()
    raise ConfigError(
        f"another fos-host is running with control socket {path} (pid {pid}): stop it first "
        "(kill -TERM), or give this one another --socket"
    )


async def run_host(
    config: HostConfig,
    path: Path,
    allow_uids: Iterable[int] = (),
    on_ready: Callable[[Path], None] = lambda path: None,
    web: Sequence[WebServer] = (),
) -> None:
    """Serve a Host on the control socket at `path` until SIGTERM or SIGINT, then close both:
    every sandbox ends, every cgroup and the socket file are removed. `on_ready` is called
    once the host is up and the socket accepts; so is systemd, when it started the host
    (host/systemd.py). The `web` servers (--dashboard, --metrics: host/dashboard.py) are bound
    with the socket and serve from just before `on_ready`."""
    from fos_host.host.host import Host
    from fos_host.host.systemd import Notifier

    notifier = Notifier.from_environ()  # before the zygote forks: no child sees NOTIFY_SOCKET
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = ControlServer(path, allow_uids)
    try:
        server.bind()  # first: a second host on this socket fails before it spawns anything
        for w in web:  # --dashboard, --metrics: a port in use fails before the host starts too
            w.bind()
        async with Host(config) as host:
            service = ControlService(host)
            server.start(service)
            for w in web:
                await w.start(host)
            on_ready(path)
            async with notifier.serving(service.status):  # READY=1 ... STOPPING=1
                await stop.wait()
            log.info("stopping (signal)")
            server.close()  # no control calls into a closing host
            for w in web:
                await w.close()
    finally:
        server.close()
        for w in web:
            await w.close()
        notifier.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


# -- the client ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def connect(path: Path) -> AsyncIterator[Control]:
    """A proxy to the host's `Control` at `path`, with errors that say what to do."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise FosError(
            f"no fos-host is running at {path} (start one with `fos-host run`, or give the "
            "--socket it runs with)"
        ) from None
    except OSError as e:
        sock.close()
        hint = ""
        if e.errno in (errno.EACCES, errno.EPERM):
            hint = " (the host runs as another user: run this as that user or root)"
        raise FosError(f"cannot connect to {path}: {e.strerror}{hint}") from None
    endpoint = Endpoint(Channel(sock, name=f"control {path}"), call_timeout=CALL_TIMEOUT)
    try:
        try:
            await endpoint.connect()
        except ChannelClosed:
            uid = os.geteuid()
            raise FosError(
                f"the fos-host at {path} closed the connection: uid {uid} is not allowed to "
                f"control it (it serves its own uid and root; start it with --allow-uid {uid})"
            ) from None
        yield endpoint.proxy(Control)
    except ChannelClosed as e:
        raise FosError(f"the fos-host at {path} went away: {e}") from None
    finally:
        endpoint.close()
