"""A command on a terminal of its own, for tests of what rich draws live (`demo`, `top`): a
pty of a fixed size, an environment without what would change rich's idea of the terminal,
and `read_until` with a deadline, so a test never hangs on a screen that does not come."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import select
import struct
import subprocess
import termios
import time
from collections.abc import Iterator, Sequence

RICH_ENV = ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "LINES")


def plain_env() -> dict[str, str]:
    """This environment without what would change rich's idea of the terminal."""
    return {k: v for k, v in os.environ.items() if k not in RICH_ENV}


@contextlib.contextmanager
def on_terminal(
    argv: Sequence[str], env: dict[str, str], rows: int = 50, columns: int = 200
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`argv` with a pty of `rows` x `columns` as stdin, stdout and stderr, in a session of its
    own (only the test signals it, not a Ctrl-C at the test runner); yields the process and
    the terminal's fd to read. Killed at the end if it still runs."""
    terminal, side = pty.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    process = subprocess.Popen(
        argv,
        stdin=side,
        stdout=side,
        stderr=side,
        env={**env, "TERM": "xterm-256color"},
        start_new_session=True,
    )
    os.close(side)
    try:
        yield process, terminal
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(terminal)


def read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    """What `fd` gave until `needle` came (or `timeout` seconds passed, or the end)."""
    out = b""
    deadline = time.monotonic() + timeout
    while needle not in out and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: every writer of the terminal is gone
                break
            if not chunk:
                break
            out += chunk
    return out
