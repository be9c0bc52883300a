"""`fos-host run` under systemd, as systemd sees it: the daemon is started with NOTIFY_SOCKET
pointing at a datagram socket this test binds (and WATCHDOG_USEC), and what arrives there is
checked — READY=1 only once everything is up, STATUS= lines, WATCHDOG=1 pings at half the
watchdog timeout, STOPPING=1 on SIGTERM — and that no child of the host, renderers included,
holds NOTIFY_SOCKET in its environment. Also: the packaged units pass `systemd-analyze verify`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemons import Daemon, ctl, ctl_json, daemon

from fos_host.kernel import proc

ROOT = os.geteuid() == 0
NEWS = "http://news.fos.test/"
PACKAGING = Path(__file__).resolve().parents[2] / "packaging"
UNITS = {"fos-host.service": [], "fos-host-user.service": ["--user"]}  # and their manager
INSTALLED = "/usr/local/bin/fos-host"  # the path the units document
WATCHDOG_USEC = 400_000  # pings expected every 0.2 s
NOTIFY_FAILED = "cannot notify systemd"  # the warning host/systemd.py logs once
SYSTEMD_VARIABLES = (b"NOTIFY_SOCKET=", b"WATCHDOG_USEC=", b"WATCHDOG_PID=")
SECRET = "FOS_TEST_SECRET=hunter2"


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket; every datagram is kept with the
    time it was read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[tuple[float, str]] = []

    def _read(self, timeout: float, d: Daemon) -> str | None:
        """The next datagram within `timeout` seconds, or None; the daemon must be running."""
        assert d.proc.poll() is None, f"run exited {d.proc.returncode}: {d.stderr()}"
        self.sock.settimeout(timeout)
        try:
            message = self.sock.recv(4096).decode()
        except TimeoutError:
            return None
        self.received.append((time.monotonic(), message))
        return message

    def until(self, wanted: str, timeout: float, d: Daemon) -> str:
        """Read until a datagram containing `wanted` arrives; that datagram."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self._read(min(left, 0.5), d)
            if message is not None and wanted in message:
                return message
        raise AssertionError(f"no {wanted!r} in {timeout} s: {self.received}\n{d.stderr()}")

    def collect(self, seconds: float, d: Daemon) -> list[tuple[float, str]]:
        """Every datagram of the next `seconds`, with the times they arrived."""
        start, deadline = len(self.received), time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._read(left, d)
        return self.received[start:]

    def drain(self) -> list[str]:
        """The datagrams already waiting."""
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                self.received.append((time.monotonic(), self.sock.recv(4096).decode()))
        return [message for _, message in self.received]

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


@pytest.fixture
def notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    """A notify socket, and the environment systemd would give `fos-host run` (inherited by
    the daemons this test starts)."""
    listener = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(listener.path))
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.setenv(SECRET.split("=")[0], SECRET.split("=")[1])  # any host secret
    try:
        yield listener
    finally:
        listener.close()


def children(pid: int) -> dict[int, str]:
    """{pid: comm} of the processes whose parent is `pid` (the host is every sandbox's
    parent: it is a child subreaper)."""
    found: dict[int, str] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            for kid in map(int, f.read().split()):
                with contextlib.suppress(OSError):
                    found[kid] = proc.comm(kid)
    return found


def environ(pid: int) -> bytes:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read()


@pytest.mark.skipif(not ROOT, reason="reads the sandboxes' /proc/<pid>/environ: root only")
def test_systemd_hears_ready_status_watchdog_and_stopping(
    tmp_path: Path, origin: dict[str, str], notify: NotifySocket
) -> None:
    sock = tmp_path / "s" / "control.sock"
    d = Daemon(sock, tmp_path, origin)
    try:
        ready = notify.until("READY=1", 60, d)
        up = set(children(d.pid).values())
        assert {"fos-zygote", "fos-network", "fos-storage", "fos-main"} <= up, (
            "READY=1 once the zygote, the services and the warm pool are up",
            up,
        )
        assert ctl_json(sock, "status")["pid"] == d.pid, "and the control socket serves"
        assert f"MAINPID={d.pid}\n" in ready
        assert re.search(r"^STATUS=tabs: 0, renderers: 1, pressure: \w+$", ready, re.M), ready

        tab = ctl_json(sock, "open", NEWS)
        assert tab["state"] == "ready", tab
        status = notify.until("STATUS=tabs: 1,", 10, d)
        assert re.fullmatch(r"STATUS=tabs: 1, renderers: \d+, pressure: \w+", status), status

        assert b"PATH=" in environ(d.pid), "/proc/<pid>/environ is what exec gave the host"
        kids = children(d.pid)
        assert tab["pid"] in kids, (tab, kids)
        for pid in [d.pid, *kids]:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a spare ended
                env = environ(pid)
                leaked = [v.decode() for v in SYSTEMD_VARIABLES if v in env]
                assert not leaked, f"{kids.get(pid, 'the host')} ({pid}) holds {leaked}"
                if kids.get(pid, "fos-zygote") not in ("fos-zygote", "fos-spare"):
                    # a sandbox that runs: none of the host's environment, the PATH it was
                    # given only (a spare wipes it when it takes its order)
                    assert SECRET.encode() not in env, f"{kids[pid]} ({pid}) holds {env!r}"
                    assert b"PATH=" not in env, f"{kids[pid]} ({pid}) holds {env!r}"

        quiet = notify.collect(2.0, d)  # the host has nothing to do
        pings = [t for t, m in quiet if m == "WATCHDOG=1"]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert len(pings) >= 8, quiet
        assert 0.15 < statistics.median(gaps) < 0.25, gaps
        assert max(gaps) < WATCHDOG_USEC / 1e6, ("systemd would have killed the host", gaps)

        assert d.stop() == 0, d.stderr()
        assert any(m.startswith("STOPPING=1\n") for m in notify.drain()[-3:]), notify.received
        assert NOTIFY_FAILED not in d.stderr(), d.stderr()
    finally:
        if d.proc.poll() is None:  # a failed assertion: still stop cleanly, cgroups and all
            d.stop()


def test_a_vanished_notify_socket_is_logged_once_and_the_host_runs_on(
    tmp_path: Path, origin: dict[str, str], notify: NotifySocket
) -> None:
    sock = tmp_path / "s" / "control.sock"
    with daemon(sock, tmp_path, origin) as d:
        notify.until("READY=1", 10, d)
        notify.close()  # systemd went away: every ping from now on fails
        time.sleep(1.0)
        assert ctl_json(sock, "status")["pid"] == d.pid, d.stderr()
    assert d.stderr().count(NOTIFY_FAILED) == 1, d.stderr()


def test_without_notify_socket_nothing_changes(
    tmp_path: Path, origin: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))  # no socket: nobody to ping
    sock = tmp_path / "s" / "control.sock"
    with daemon(sock, tmp_path, origin) as d:
        assert ctl_json(sock, "status")["pid"] == d.pid
        assert ctl(sock, "open", NEWS).returncode == 0
    assert NOTIFY_FAILED not in d.stderr(), d.stderr()


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze")
@pytest.mark.parametrize(("unit", "manager"), UNITS.items())
def test_units_pass_systemd_analyze_verify(unit: str, manager: list[str], tmp_path: Path) -> None:
    """`verify` loads the unit as systemd would. An unknown option or a bad value is only a
    warning (exit status 0), so any output fails too. It also wants ExecStart's binary to
    exist: the check runs on a copy naming this checkout's fos-host instead of the documented
    /usr/local/bin/fos-host."""
    text = (PACKAGING / unit).read_text()
    assert f"ExecStart={INSTALLED} run " in text
    fos_host = Path(sys.executable).with_name("fos-host")
    assert fos_host.is_file(), "the editable install's console script (scripts/bootstrap)"
    (tmp_path / unit).write_text(text.replace(INSTALLED, str(fos_host)))
    runtime = tmp_path / "run"  # the user manager's %t
    runtime.mkdir(mode=0o700)
    r = subprocess.run(
        ["systemd-analyze", *manager, "verify", f"./{unit}"],
        cwd=tmp_path, env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (r.returncode, r.stdout + r.stderr) == (0, ""), r
