"""What the in-sandbox probe (`fos_host.probe ipc`) offers over a channel: the tests and the
benchmark use it to move bytes and file descriptors across a real sandbox boundary."""

from __future__ import annotations

from fos_host.ipc.interface import Interface, RemoteError, method
from fos_host.ipc.wire import EventFd, Memfd, Socket


class ProbeFailed(RemoteError):
    """The probe could not do what it was asked (the reason says why)."""


class Probe(Interface, version=1):
    errors = (ProbeFailed,)

    @method(0)
    async def echo(self, data: bytes) -> bytes:
        """`data`, back."""
        ...

    @method(1)
    async def read_memfd(self, memfd: Memfd) -> bytes:
        """Everything in `memfd` (the probe closes it)."""
        ...

    @method(2)
    async def sealed(self, data: bytes) -> Memfd:
        """A new memfd holding `data`, sealed against any change, made in the sandbox."""
        ...

    @method(3)
    async def send_on(self, sock: Socket, data: bytes) -> int:
        """Write `data` to `sock` (then close it); the number of bytes written."""
        ...

    @method(4)
    async def read_eventfd(self, eventfd: EventFd) -> int:
        """The eventfd's counter (read, which resets it)."""
        ...

    @method(5)
    async def exit_now(self, code: int) -> None:
        """Exit at once, without answering: the host sees the peer die mid-call."""
        ...

    @method(6)
    async def identity(self) -> list[int]:
        """[pid, uid] as the sandbox sees them."""
        ...
