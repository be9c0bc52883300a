"""The host's lifecycle event stream (`Host.subscribe`, behind `fos-host ctl events`): every
reader gets every event in order; a reader that stops reading is dropped without holding the
host up, gets what it had, and then an error that says so instead of a stream that never ends.

The host is built but not started: events are bookkeeping, no process takes part."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from fos_host.host.host import EVENT_QUEUE, Dropped, Host, HostConfig


def test_a_reader_that_falls_behind_is_dropped_and_told(tmp_path: Path) -> None:
    async def run() -> None:
        host = Host(HostConfig(profile=tmp_path))
        try:
            slow, keeping_up = host.subscribe(), host.subscribe()
            for n in range(EVENT_QUEUE + 5):
                host._event(None, "level moderate", f"event {n}", time.monotonic())
                assert (await keeping_up.next()).why == f"event {n}"
            for n in range(EVENT_QUEUE):  # what it had when it was dropped, in order
                assert (await slow.next()).why == f"event {n}"
            with pytest.raises(Dropped, match=f"fell {EVENT_QUEUE} events behind"):
                await asyncio.wait_for(slow.next(), 5)  # not a stream that never ends
            host._event(None, "level none", "after", time.monotonic())
            assert (await keeping_up.next()).why == "after"
            assert slow.queue.empty()  # no longer fed
            host.unsubscribe(slow)  # as a reader's `finally` does: harmless when dropped
            host.unsubscribe(keeping_up)
        finally:
            await host.close()

    asyncio.run(run())
