"""A `fos-host run` daemon as a user runs it, for tests: a real subprocess (a host with its
zygote, services and sandboxed renderers) on a control socket, driven by `fos-host ctl`
subprocesses. The demo sites it fetches come from the `origin` fixture (tests/conftest.py),
passed to `Daemon` as its `--resolve` map.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FOS = [sys.executable, "-m", "fos_host.cli"]


class Daemon:
    """A `fos-host run` subprocess; its stderr goes to a file, read whenever asked."""

    def __init__(self, sock: Path, tmp: Path, resolve: dict[str, str], *extra: str) -> None:
        self.sock = sock
        self.log = tmp / f"run-{time.monotonic_ns()}.err"
        args = [f"--resolve={name}={addr}" for name, addr in resolve.items()]
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [*FOS, "run", "--socket", str(sock), "--profile", str(tmp / "profile"), *args,
                 "--resolve-only", "--warm", "1", *extra],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.log.read_text()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        line = f"fos-host: ready, control socket {self.sock}\n"
        while line not in self.stderr():
            assert self.proc.poll() is None, f"run exited {self.proc.returncode}: {self.stderr()}"
            assert time.monotonic() < deadline, f"not ready in {timeout} s: {self.stderr()}"
            time.sleep(0.05)

    def stop(self) -> int:
        """SIGTERM, as systemd stops it; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(30)


@contextlib.contextmanager
def daemon(sock: Path, tmp: Path, resolve: dict[str, str], *extra: str) -> Iterator[Daemon]:
    """A ready daemon, stopped cleanly at the end (its exit status checked)."""
    d = Daemon(sock, tmp, resolve, *extra)
    try:
        d.wait_ready()
        yield d
        assert d.stop() == 0, d.stderr()
        assert not sock.exists(), "a clean shutdown removes the socket"
    finally:
        if d.proc.poll() is None:
            d.stop()


def ctl(sock: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*FOS, "ctl", "--socket", str(sock), *args],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=90,
    )  # fmt: skip


def ctl_json(sock: Path, *args: str) -> Any:
    r = ctl(sock, *args, "--json")
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


def failed(r: subprocess.CompletedProcess[bytes]) -> str:
    """The one line a failed command printed (it must have failed)."""
    assert r.returncode != 0 and r.stdout == b"", r
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    return lines[0]
