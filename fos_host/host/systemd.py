"""Telling systemd how the host is doing (sd_notify), for `Type=notify` units
(packaging/fos-host.service, packaging/fos-host-user.service).

- `READY=1` (with `MAINPID=` and a first `STATUS=`) once the zygote, the services, the warm
  pool and the control socket are up: `systemctl start` returns then, and units ordered after
  fos-host can use the socket at once.
- `STATUS=` — tabs, renderers and the memory pressure level — whenever it changes (looked at
  every `STATUS_EVERY` seconds), for `systemctl status`.
- `WATCHDOG=1` every half `WATCHDOG_USEC` (`WatchdogSec=`), sent from the event loop: a loop
  stuck in a blocking call stops the pings, and systemd kills and restarts the host.
- `STOPPING=1` when the host begins to shut down.

Without `NOTIFY_SOCKET` (not started by systemd) every method is a no-op. `NOTIFY_SOCKET` and
`WATCHDOG_*` are taken out of the environment as they are read: they are the host's alone, and
no child (zygote, services, renderers) may see where systemd listens. Sandboxes get a clean
environment anyway (sandbox/jail.py DEFAULT_ENV), but they are forked, never exec'd, and so
inherit the memory `/proc/<pid>/environ` shows: the strings are wiped there too.

The `sdnotify` package sends the datagrams. It connects at construction (from
`NOTIFY_SOCKET`), does not read `WATCHDOG_USEC`, and swallows errors unless `debug=True`: a
failure is logged once here, and never stops the host — systemd will act on the missing
pings or the exit, which is its job.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
from collections.abc import AsyncIterator, Callable

import sdnotify

from fos_host.interfaces.control import Status
from fos_host.kernel import proc

log = logging.getLogger(__name__)

STATUS_EVERY = 1.0  # seconds between looks at the status (sent only when it changed)
ENVIRON = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")  # systemd's, for the host alone


def status_line(status: Status) -> str:
    """What `systemctl status` shows under "Status:"."""
    return f"tabs: {status.tabs}, renderers: {status.renderers}, pressure: {status.level}"


class Notifier:
    """sd_notify for one host process; see the module's docstring. Make it with
    `from_environ()` before anything forks, and `close()` it at the end."""

    def __init__(self, sender: sdnotify.SystemdNotifier | None, address: str = "",
                 watchdog_interval: float | None = None) -> None:  # fmt: skip
        self._sender = sender
        self._address = address  # NOTIFY_SOCKET, for the log
        self._failed = False  # a send failed: logged once, later failures are quiet
        self._status = ""  # the last STATUS= sent
        self.watchdog_interval = watchdog_interval if sender is not None else None

    @classmethod
    def from_environ(cls) -> Notifier:
        """From `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`, which leave the
        environment (and the process's exec-time environment memory) here."""
        address = os.environ.get("NOTIFY_SOCKET", "")
        sender, error = None, None
        if address:
            try:
                sender = sdnotify.SystemdNotifier(debug=True)  # connects to NOTIFY_SOCKET
            except OSError as e:
                error = e
        taken = _take_environ(ENVIRON)
        interval = _watchdog_interval(taken.get("WATCHDOG_USEC"), taken.get("WATCHDOG_PID"))
        notifier = cls(sender, address, interval)
        if error is not None:
            notifier._fail(error)
        return notifier

    @property
    def enabled(self) -> bool:
        return self._sender is not None

    def send(self, message: str) -> None:
        """One datagram of `KEY=value` lines; a failure is logged once, never raised."""
        if self._sender is None:
            return
        try:
            self._sender.notify(message)
        except OSError as e:
            self._fail(e)

    def status(self, line: str) -> None:
        """`STATUS=line`, if it differs from the last one sent."""
        if line != self._status:
            self._status = line
            self.send(f"STATUS={line}")

    @contextlib.asynccontextmanager
    async def serving(self, status: Callable[[], Status]) -> AsyncIterator[None]:
        """Around the host's serving time: READY=1 on entry, STATUS= and WATCHDOG=1 while
        inside, STOPPING=1 on the way out (a signal, or an error)."""
        if self._sender is None:
            yield
            return
        self._status = status_line(status())
        self.send(f"READY=1\nMAINPID={os.getpid()}\nSTATUS={self._status}")
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self._report(status))]
        if self.watchdog_interval is not None:
            tasks.append(loop.create_task(self._ping(self.watchdog_interval)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.send("STOPPING=1\nSTATUS=stopping: closing tabs, renderers and services")

    def close(self) -> None:
        if self._sender is not None and self._sender.socket is not None:
            self._sender.socket.close()
        self._sender = None

    async def _report(self, status: Callable[[], Status]) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY)
            self.status(status_line(status()))

    async def _ping(self, interval: float) -> None:
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    def _fail(self, error: OSError) -> None:
        if not self._failed:
            self._failed = True
            log.warning("cannot notify systemd at NOTIFY_SOCKET=%s: %s (the host runs on; "
                        "later failures are not logged)", self._address, error)  # fmt: skip


def _watchdog_interval(usec: str | None, pid: str | None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half the timeout, as sd_watchdog_enabled(3) advises),
    or None: no watchdog, or one meant for another process (WATCHDOG_PID)."""
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        log.info("WATCHDOG_PID=%s is not this process (%d): no watchdog pings", pid, os.getpid())
        return None
    if not usec.isdigit() or int(usec) == 0:
        log.warning("WATCHDOG_USEC=%r is not a positive number of microseconds: no watchdog "
                    "pings (set WatchdogSec= in the unit)", usec)  # fmt: skip
        return None
    return int(usec) / 2e6


def _take_environ(names: tuple[str, ...]) -> dict[str, str]:
    """Remove `names` from the environment and return their values.

    `del os.environ[name]` unsetenv()s it, but the string stays in the memory exec put the
    environment in, which `/proc/<pid>/environ` shows and every forked child (the zygote, and
    every sandbox it forks) inherits: it is overwritten with NULs there. After unsetenv()
    nothing points at it any more."""
    taken = {name: os.environ.pop(name) for name in names if name in os.environ}
    area = proc.environ_area()
    if not taken or area is None:
        return taken
    start, end = area
    keys = {name.encode() for name in taken}
    offset = start
    for entry in ctypes.string_at(start, end - start).split(b"\0"):
        if entry.partition(b"=")[0] in keys:
            ctypes.memset(offset, 0, len(entry))
        offset += len(entry) + 1
    return taken
