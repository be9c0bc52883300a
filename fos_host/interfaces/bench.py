"""The IPC benchmark's interface (`fos-host bench ipc`, fos_host/bench_ipc.py)."""

from __future__ import annotations

from fos_host.ipc.interface import Interface, method
from fos_host.ipc.wire import Shared


class IpcBench(Interface):
    """An echo for round trips, sinks for transfers."""

    @method(0)
    async def echo(self, data: bytes) -> bytes:
        """`data`, back."""
        ...

    @method(1)
    async def take(self, data: bytes) -> int:
        """The length of `data`, which arrives as bytes (copied out of shared memory)."""
        ...

    @method(2)
    async def take_shared(self, data: Shared) -> int:
        """The length of `data`, seen in place in the sender's pool (no copy), released."""
        ...
