"""Waiting in async tests for what happens in other processes: `until(condition)` and
`alive(pid)`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import pytest


async def until(condition: Callable[[], bool], what: str, seconds: float = 10) -> None:
    """Poll `condition` every 50 ms; fail the test naming `what` after `seconds`."""
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"not within {seconds:g} s: {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
