"""Helpers of the IPC tests: open fds of this process, and a bounded `asyncio.run`.
The `no_fd_leak` fixture (tests/conftest.py) uses `open_fds`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


def open_fds() -> set[int]:
    """The fds open now: without the one the listing itself used (closed once it returns:
    counting it would hide a leak that later gets its number)."""
    return {int(n) for n in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{n}")}


def run(coro: Awaitable[T], timeout: float = 30) -> T:
    """Run `coro` in a new event loop, failing it after `timeout` seconds."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())
