"""Memory pressure from the kernel: PSI triggers, cgroup v1 vmpressure, PSI polling, meminfo.

Three ways to hear about memory pressure, best first:

- `PsiTrigger`: a PSI trigger ("some 150000 2000000": 150 ms of stall within 2 s) written to a
  `memory.pressure` file; the kernel raises POLLPRI on the fd when the stall crosses the
  threshold. The window may be as short as 500 ms only with CAP_SYS_RESOURCE; without it the
  kernel wants multiples of 2 s and answers EINVAL, so windows are tried shortest first.
  `/proc/pressure/memory` refuses triggers on some machines altogether (EINVAL even for 2 s).
- `PressureLevelV1`: cgroup v1's vmpressure (`memory.pressure_level` registered with an
  eventfd in `cgroup.event_control`), where no cgroup2 PSI file exists. It measures reclaim
  efficiency (how many scanned pages could not be reclaimed), not stall time.
- `PsiPoller`: reads `total=` (µs of stall) every so often and turns the growth into a share
  of wall time; works wherever the file can be read.

`mem_available()` reads MemAvailable and MemTotal: PSI says that tasks wait for memory, not
that memory is short (a cgroup at its own limit stalls on a machine full of free memory), so
the host's pressure monitor gates every PSI signal on it.

Every class owns file descriptors and is a context manager; `attach` hands events to asyncio.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fos_host.closing import Closing
from fos_host.errors import ConfigError, FosError
from fos_host.kernel.cgroup import parse_pressure

SYSTEM_PRESSURE = Path("/proc/pressure/memory")
MEMINFO = Path("/proc/meminfo")
WINDOWS = (0.5, 1.0, 2.0)
"""Trigger windows tried in order (seconds): 500 ms is the kernel's minimum; without
CAP_SYS_RESOURCE only multiples of 2 s are accepted."""
V1_LEVELS = ("low", "medium", "critical")
V1_MODES = ("default", "hierarchy", "local")


class TriggerRefused(FosError):
    """The kernel accepts no PSI trigger on this file (EINVAL for every window, EPERM or EACCES):
    poll it instead."""


def _open(path: Path, flags: int, what: str) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise ConfigError(f"{path} does not exist: no {what} here") from e
    except OSError as e:
        raise FosError(f"cannot open {path} for {what}: {e.strerror}") from e


# --------------------------------------------------------------------------------------
# PSI triggers


class PsiTrigger(Closing):
    """A PSI trigger on one pressure file, its events delivered to asyncio.

    The trigger's fd signals POLLPRI, which asyncio's `add_reader` does not watch: it sits in
    an epoll set of its own (EPOLLPRI), and that epoll fd, readable whenever it has an event,
    is what the loop watches. EPOLLERR means the trigger is gone (its cgroup was removed).
    """

    def __init__(
        self,
        path: Path | str,
        share: float,
        *,
        kind: str = "some",
        windows: Sequence[float] = WINDOWS,
    ) -> None:
        """Fire when stall of `kind` ("some" or "full") reaches `share` (0..1] of the window,
        on the shortest of `windows` the kernel accepts. TriggerRefused if it accepts none."""
        if kind not in ("some", "full"):
            raise ConfigError(f"PSI trigger kind must be 'some' or 'full', not {kind!r}")
        if not 0 < share <= 1:
            raise ConfigError(f"PSI trigger share must be in (0, 1], not {share!r}")
        if not windows:
            raise ConfigError("PSI trigger: no window to try")
        self.path = Path(path)
        self.kind = kind
        self.share = share
        self.window = 0.0  # the accepted window, seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = _open(self.path, os.O_RDWR | os.O_NONBLOCK, "a PSI trigger")
        try:
            self._write_trigger(windows)
            self._epoll = select.epoll(1, select.EPOLL_CLOEXEC)
        except BaseException:
            os.close(self._fd)
            raise
        try:
            self._epoll.register(self._fd, select.EPOLLPRI | select.EPOLLERR)
        except OSError as e:  # EPERM: a regular file took the write but cannot be polled
            self.close()
            raise ConfigError(f"{self.path} is not a pressure file: {e.strerror}") from e

    def _write_trigger(self, windows: Sequence[float]) -> None:
        refusals = []
        for window in windows:
            window_us = round(window * 1_000_000)
            threshold_us = max(1, round(self.share * window_us))
            # The kernel overwrites the last byte written with NUL: send one.
            text = f"{self.kind} {threshold_us} {window_us}\0"
            try:
                os.write(self._fd, text.encode())
            except OSError as e:
                if e.errno == errno.EINVAL:
                    refusals.append(f"{window:g} s")
                    continue
                if e.errno in (errno.EPERM, errno.EACCES):
                    raise TriggerRefused(f"{self.path}: PSI trigger refused ({e.strerror})") from e
                raise FosError(f"{self.path}: cannot write a PSI trigger: {e.strerror}") from e
            self.window = window
            return
        raise TriggerRefused(
            f"{self.path}: PSI trigger refused (EINVAL) for windows of {', '.join(refusals)}"
        )

    @property
    def threshold(self) -> float:
        """Seconds of stall within `window` that fire the trigger."""
        return self.share * self.window

    def __repr__(self) -> str:
        return f"<PsiTrigger {self.kind} {self.share:.1%} of {self.window:g} s on {self.path}>"

    def attach(self, on_event: Callable[[], None], on_gone: Callable[[], None]) -> None:
        """Call `on_event` on the running loop each time the trigger fires, and `on_gone` once
        (after which nothing more comes) if the file goes away with its cgroup."""
        loop = asyncio.get_running_loop()

        def ready() -> None:
            # Polling a trigger consumes its event, and the loop's own epoll already polled
            # ours (which polled the trigger) to find it readable: by now our poll usually
            # returns nothing. Readable is the event; only EPOLLERR (not consumed) differs.
            flags = 0
            for _, ev in self._epoll.poll(0):
                flags |= ev
            if flags & select.EPOLLERR:
                self._detach()
                on_gone()
            else:
                on_event()

        loop.add_reader(self._epoll.fileno(), ready)
        self._loop = loop

    def _detach(self) -> None:
        if self._loop is not None:
            if not self._loop.is_closed():
                self._loop.remove_reader(self._epoll.fileno())
            self._loop = None

    def close(self) -> None:
        if self._fd < 0:
            return
        self._detach()
        self._epoll.close()
        os.close(self._fd)
        self._fd = -1


# --------------------------------------------------------------------------------------
# cgroup v1 vmpressure


class PressureLevelV1(Closing):
    """cgroup v1 `memory.pressure_level` at one level, events delivered to asyncio.

    Levels are the kernel's: "low" (reclaim runs at all), "medium" (reclaim finds ≥ 60 % of
    scanned pages in use: swapping or refaulting caches), "critical" (≥ 95 %: about to OOM).
    Mode "hierarchy" also hears pressure in every descendant, even if it has listeners of its
    own ("default" stops at the first cgroup with a listener).
    """

    def __init__(
        self, memory_dir: Path | str, level: str = "medium", mode: str = "hierarchy"
    ) -> None:
        if level not in V1_LEVELS:
            raise ConfigError(f"v1 pressure level must be one of {V1_LEVELS}, not {level!r}")
        if mode not in V1_MODES:
            raise ConfigError(f"v1 pressure mode must be one of {V1_MODES}, not {mode!r}")
        self.dir = Path(memory_dir)
        self.level = level
        self._loop: asyncio.AbstractEventLoop | None = None
        self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._plfd = -1
        try:
            self._plfd = _open(self.dir / "memory.pressure_level", os.O_RDONLY, "v1 vmpressure")
            control = self.dir / "cgroup.event_control"
            cfd = _open(control, os.O_WRONLY, "v1 vmpressure")
            try:
                os.write(cfd, f"{self._efd} {self._plfd} {level},{mode}".encode())
            except OSError as e:
                raise FosError(
                    f"{control}: cannot register memory.pressure_level {level},{mode}: {e.strerror}"
                ) from e
            finally:
                os.close(cfd)
        except BaseException:
            self._close_fds()
            raise

    def __repr__(self) -> str:
        return f"<PressureLevelV1 {self.level} on {self.dir}>"

    def attach(self, on_event: Callable[[int], None]) -> None:
        """Call `on_event(count)` on the running loop for the events since the last call."""
        loop = asyncio.get_running_loop()

        def ready() -> None:
            try:
                count = os.eventfd_read(self._efd)
            except BlockingIOError:
                return
            on_event(count)

        loop.add_reader(self._efd, ready)
        self._loop = loop

    def _close_fds(self) -> None:
        # Closing the eventfd unregisters the event in the kernel.
        for fd in (self._efd, self._plfd):
            if fd >= 0:
                os.close(fd)
        self._efd = self._plfd = -1

    def close(self) -> None:
        if self._efd < 0:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._efd)
        self._loop = None
        self._close_fds()


# --------------------------------------------------------------------------------------
# polling


@dataclass(frozen=True)
class Stall:
    """Stall as shares of wall time (0..1): `some` (at least one task waited for memory) and
    `full` (all non-idle tasks did), over the poller's window; `avg10`/`avg60` are the
    kernel's own running averages, as shares too."""

    some: float
    full: float
    avg10: float
    avg60: float


class PsiPoller(Closing):
    """Reads one pressure file's `total=` counters and turns their growth into stall shares.

    The share is taken over the last `window` seconds of polls (the growth since the newest
    poll at least `window` old, else since the oldest). The first poll has no growth to go by
    and reports the kernel's avg10 instead.
    """

    def __init__(
        self, path: Path | str, window: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if window <= 0:
            raise ConfigError(f"PSI poll window must be positive, not {window!r}")
        self.path = Path(path)
        self.window = window
        self._clock = clock
        self._history: deque[tuple[float, float, float]] = deque()  # (time, some µs, full µs)
        self._fd = _open(self.path, os.O_RDONLY, "PSI")

    def __repr__(self) -> str:
        return f"<PsiPoller {self.path} over {self.window:g} s>"

    def read(self) -> dict[str, dict[str, float]]:
        """The file, parsed ({"some": {"avg10": …, "total": …}, "full": {…}})."""
        if self._fd < 0:
            raise FosError(f"{self.path}: the PSI poller is closed")
        try:
            text = os.pread(self._fd, 4096, 0).decode()
        except OSError as e:
            raise FosError(f"cannot read {self.path}: {e.strerror}") from e
        values = parse_pressure(text)
        if "total" not in values.get("some", {}):
            raise FosError(f"{self.path}: not a PSI file (no 'some … total=' line): {text!r}")
        return values

    def poll(self) -> Stall:
        now = self._clock()
        values = self.read()
        some, full = values["some"], values.get("full", {})
        # /proc/pressure/cpu had no "full" line before 5.13; memory always has one.
        some_total, full_total = some["total"], full.get("total", 0.0)
        history = self._history
        history.append((now, some_total, full_total))
        while len(history) > 2 and history[1][0] <= now - self.window:
            history.popleft()
        then, some_then, full_then = history[0]
        elapsed = (now - then) * 1_000_000
        if elapsed > 0:
            some_share = _share(some_total - some_then, elapsed)
            full_share = _share(full_total - full_then, elapsed)
        else:
            some_share, full_share = some["avg10"] / 100, full.get("avg10", 0.0) / 100
        return Stall(some_share, full_share, some["avg10"] / 100, some.get("avg60", 0.0) / 100)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _share(stalled_us: float, elapsed_us: float) -> float:
    return min(1.0, max(0.0, stalled_us / elapsed_us))


# --------------------------------------------------------------------------------------
# meminfo


@dataclass(frozen=True)
class MemInfo:
    available: int  # bytes: MemAvailable, the kernel's estimate of what can be had without swap
    total: int  # bytes: MemTotal

    @property
    def share(self) -> float:
        return self.available / self.total


def mem_available(path: Path = MEMINFO) -> MemInfo:
    """MemAvailable and MemTotal from /proc/meminfo."""
    try:
        text = path.read_text()
    except OSError as e:
        raise FosError(f"cannot read {path}: {e.strerror}") from e
    found: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemAvailable", "MemTotal"):
            found[key] = int(rest.split()[0]) * 1024  # always kB
    if len(found) < 2 or found["MemTotal"] <= 0:
        missing = [k for k in ("MemAvailable", "MemTotal") if k not in found]
        raise FosError(f"{path}: no usable {' or '.join(missing) or 'MemTotal'} (kernel < 3.14?)")
    return MemInfo(found["MemAvailable"], found["MemTotal"])
