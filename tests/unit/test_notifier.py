"""The sd_notify side of host/systemd.py without a host: which environment turns what on, what
is sent and when, and that a missing or vanished socket is one warning, never an error. The
daemon under a fake systemd is tests/integration/test_systemd.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from fos_host.host import systemd
from fos_host.host.systemd import ENVIRON, Notifier
from fos_host.interfaces.control import Status


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    with sock:
        yield sock


def notifier() -> contextlib.closing[Notifier]:
    return contextlib.closing(Notifier.from_environ())


def test_without_notify_socket_it_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    with notifier() as n:
        assert (n.enabled, n.watchdog_interval) == (False, None)
        n.send("READY=1")  # no-op, no error
    assert "WATCHDOG_USEC" not in os.environ


@pytest.mark.parametrize(
    ("usec", "pid", "interval"),
    [("400000", None, 0.2), ("400000", "self", 0.2), ("400000", "1", None), ("0", None, None),
     ("soon", None, None), (None, None, None)],
)  # fmt: skip
def test_the_watchdog_pings_at_half_its_timeout_when_it_is_ours(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch, usec: str | None,
    pid: str | None, interval: float | None,
) -> None:  # fmt: skip
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    with notifier() as n:
        assert n.enabled and n.watchdog_interval == interval
    assert not set(ENVIRON) & set(os.environ), "taken out of the environment"


def test_ready_status_on_change_and_stopping(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.setattr(systemd, "STATUS_EVERY", 0.01)
    tabs = [0]

    def status() -> Status:
        return Status(os.getpid(), tabs[0], 2, 0, 0, "none")

    async def serve(n: Notifier) -> None:
        async with n.serving(status):
            await asyncio.sleep(0.1)  # ten looks, one status: nothing changed
            tabs[0] = 3
            await asyncio.sleep(0.1)

    with notifier() as n:
        asyncio.run(serve(n))
    listener.setblocking(False)
    got = []
    while True:
        try:
            got.append(listener.recv(4096).decode())
        except BlockingIOError:
            break
    assert got == [
        f"READY=1\nMAINPID={os.getpid()}\nSTATUS=tabs: 0, renderers: 2, pressure: none",
        "STATUS=tabs: 3, renderers: 2, pressure: none",
        "STOPPING=1\nSTATUS=stopping: closing tabs, renderers and services",
    ]


def test_an_abstract_socket_address_works(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"fos-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        with notifier() as n:
            n.send("WATCHDOG=1")
        assert sock.recv(64) == b"WATCHDOG=1"


def test_a_missing_or_vanished_socket_is_one_warning(
    tmp_path: Path, listener: socket.socket, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.WARNING, logger=systemd.__name__)
    with notifier() as n:
        listener.close()  # systemd went away
        for _ in range(3):
            n.send("WATCHDOG=1")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    with notifier() as n:
        assert not n.enabled
        n.send("READY=1")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    assert all("cannot notify systemd" in w for w in warnings), warnings
