"""A channel: one end of an AF_UNIX SOCK_SEQPACKET socketpair, driven by an asyncio loop.

The socket is non-blocking and watched with `loop.add_reader` / `add_writer` (asyncio
streams were measured 5x slower than raw sockets here, and a datagram socket needs no
framing). Each datagram is one message (`wire`), received with room for one byte more than
the limit and for one fd more than allowed, so an oversize message or too many fds are seen
(MSG_TRUNC / MSG_CTRUNC) rather than silently cut.

The channel knows messages, not interfaces: it hands each decoded `Message` to `on_message`
and, once, the reason it closed to `on_close`. A message that breaks the protocol closes the
channel with `bad=True` — the peer is not trusted again — and every fd that came with it is
closed. The `BufferPool` each side may share for big byte strings lives here too: `pool`
is this side's (it writes into slots), `peer_pool` the peer's (it reads slots the peer
names, then releases them with a RELEASE message).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from fos_host.errors import FosError
from fos_host.ipc.shm import BufferPool, ShmError
from fos_host.ipc.wire import (
    BadMessage,
    Kind,
    Limits,
    Memfd,
    Message,
    Outgoing,
    PoolRef,
    Shared,
    close_handles_in,
    decode,
    encode,
)

log = logging.getLogger(__name__)

_CTRUNC = int(socket.MSG_CTRUNC)  # plain ints: the IntFlag operators cost µs per message
_TRUNC = int(socket.MSG_TRUNC)


class ChannelClosed(FosError):
    """The channel is closed: the peer went away, or a bad message closed it."""

    def __init__(self, reason: str, *, bad: bool = False) -> None:
        super().__init__(f"channel closed: {'bad message: ' if bad else ''}{reason}")
        self.reason = reason
        self.bad = bad


@dataclass
class _Sending:
    out: Outgoing
    sent: asyncio.Future[None] | None


class Channel:
    """One end of a SEQPACKET socketpair. Takes ownership of `sock`."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        limits: Limits | None = None,
        name: str = "channel",
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if sock.type != socket.SOCK_SEQPACKET or sock.family != socket.AF_UNIX:
            raise FosError(f"{name}: a channel needs an AF_UNIX SOCK_SEQPACKET socket")
        sock.setblocking(False)
        self.sock = sock
        self.limits = limits or Limits()
        self.name = name
        self.loop = loop or asyncio.get_running_loop()
        self.on_message: Callable[[Message], None] = self._unhandled
        self.on_close: Callable[[ChannelClosed], None] = lambda closed: None
        self.closed: ChannelClosed | None = None
        self.pool: BufferPool | None = None
        self.peer_pool: BufferPool | None = None
        self._peer_slots: set[int] = set()  # slots of the peer's pool not yet released
        self._queue: deque[_Sending] = deque()
        self._ancbuf = socket.CMSG_SPACE((self.limits.max_handles + 1) * 4)
        self.loop.add_reader(sock.fileno(), self._readable)

    def __repr__(self) -> str:
        state = f"closed: {self.closed.reason}" if self.closed else "open"
        return f"<Channel {self.name} {state}>"

    @classmethod
    def pair(
        cls, limits: Limits | None = None, names: tuple[str, str] = ("a", "b")
    ) -> tuple[Channel, Channel]:
        """Both ends in this process (tests, benchmarks)."""
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(a, limits=limits, name=names[0]), cls(b, limits=limits, name=names[1])

    def _unhandled(self, msg: Message) -> None:
        msg.close_handles()
        self.close(f"a {msg.kind.name} message before anyone listens", bad=True)

    # -- sending ---------------------------------------------------------------------------

    def send(self, kind: Kind, interface: int, method: int, request_id: int, body: object) -> None:
        """Encode and send a message now, or queue it when the socket is full. Handles in
        `body` are handed over (closed here once sent, or at once if the channel is closed).
        Raises ChannelClosed if closed."""
        if self.closed:
            close_handles_in(body)
            raise self.closed
        out = encode(kind, interface, method, request_id, body, self.limits, self._to_pool)
        if self._queue or not self._try_send(out):
            self._queue.append(_Sending(out, None))
            if len(self._queue) == 1:
                self.loop.add_writer(self.sock.fileno(), self._writable)

    async def drain(self) -> None:
        """Wait until everything queued so far has gone into the socket."""
        if not self._queue:
            return
        fut: asyncio.Future[None] = self.loop.create_future()
        self._queue[-1].sent = fut
        await fut

    def _try_send(self, out: Outgoing) -> bool:
        """True if sent; False if the socket is full (EAGAIN). Closes on other errors."""
        try:
            if out.fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", out.fds))]
                self.sock.sendmsg([out.data], anc)
            else:
                self.sock.send(out.data)
        except BlockingIOError:
            return False
        except OSError as e:
            out.discard()
            for h in out.given:  # handed over: gone with the message that failed
                h.close()
            self.close(_peer_gone(e))
            return True
        for fd in out.owned:
            os.close(fd)
        for h in out.given:
            h.close()
        return True

    def _writable(self) -> None:
        while self._queue and not self.closed:
            item = self._queue[0]
            if not self._try_send(item.out):
                return
            self._queue.popleft()
            if item.sent is not None and not item.sent.done():
                item.sent.set_result(None)
        self.loop.remove_writer(self.sock.fileno())

    # -- the buffer pools ------------------------------------------------------------------

    def share_pool(self, slots: int, slot_size: int) -> None:
        """Make this side's BufferPool and send it to the peer: byte strings above the
        inline limit that fit a free slot go through it from now on."""
        if self.pool is not None:
            raise FosError(f"{self.name}: a pool is already shared")
        pool = BufferPool.create(slots, slot_size)
        try:
            self.send(Kind.POOL, 0, 0, 0, [slots, slot_size, Memfd(os.dup(pool.fd))])
        except BaseException:
            pool.close()
            raise
        self.pool = pool

    def _to_pool(self, data: bytes | bytearray | memoryview) -> PoolRef | None:
        pool = self.pool
        if pool is None or len(data) > pool.slot_size:
            return None
        try:
            slot = pool.acquire()
        except ShmError:
            return None  # all in use: a sealed memfd instead
        pool.write(slot, data)
        return PoolRef(slot, len(data))

    def _claim(self, ref: PoolRef) -> BufferPool:
        pool = self.peer_pool
        if pool is None:
            raise BadMessage("a pool slot, but no pool was shared")
        if not 0 <= ref.slot < pool.slots or ref.length > pool.slot_size:
            raise BadMessage(f"pool slot {ref.slot} of {ref.length} bytes is out of bounds")
        if ref.slot in self._peer_slots:
            raise BadMessage(f"pool slot {ref.slot} is sent again before it was released")
        self._peer_slots.add(ref.slot)
        return pool

    def pool_bytes(self, ref: PoolRef) -> bytes:
        """The bytes of a slot of the peer's pool, copied out (the peer may write to its
        slots: a copy is what is safe to parse), and the slot released."""
        data = self._claim(ref).copy(ref.slot, ref.length)
        self.release(ref.slot)
        return data

    def pool_view(self, ref: PoolRef) -> Shared:
        """A slot of the peer's pool seen in place (no copy), released by the receiver."""
        view = self._claim(ref).view(ref.slot, ref.length)
        return Shared(view, lambda: self.release(ref.slot))

    def release(self, slot: int) -> None:
        if slot in self._peer_slots:
            self._peer_slots.discard(slot)
            if not self.closed:
                self.send(Kind.RELEASE, 0, 0, 0, [slot])

    def _control(self, msg: Message) -> bool:
        """Handle the channel's own messages (POOL, RELEASE); False for the others."""
        if msg.kind is Kind.POOL:
            if self.peer_pool is not None:
                raise BadMessage("a second pool")
            match msg.body:
                case [int(slots), int(size), Memfd()] if slots * size > self.limits.max_pool:
                    limit = self.limits.max_pool
                    raise BadMessage(f"a pool of {slots} slots of {size} bytes (at most {limit})")
                case [int(slots), int(size), Memfd() as memfd] if slots > 0 and size > 0:
                    try:
                        self.peer_pool = BufferPool.attach(memfd.take(), slots, size)
                    except ShmError as e:
                        raise BadMessage(f"pool: {e}") from e
                case _:
                    raise BadMessage("a POOL message that is not [slots, slot size, memfd]")
            return True
        if msg.kind is Kind.RELEASE:
            match msg.body:
                case [int(slot)] if self.pool is not None and 0 <= slot < self.pool.slots:
                    try:
                        self.pool.release(slot)
                    except ShmError as e:  # a slot this side has not sent
                        raise BadMessage(f"RELEASE: {e}") from e
                case _:
                    raise BadMessage("a RELEASE that is not [a slot of this side's pool]")
            return True
        return False

    # -- receiving -------------------------------------------------------------------------

    def _readable(self) -> None:
        """Read one message. One per wakeup: a reader that drains the socket pays a failed
        read (EAGAIN) on every wakeup, which costs more than the loop's next turn, and one
        message at a time keeps a flooding peer from starving the other channels."""
        if self.closed:
            return
        try:
            data, anc, flags, _ = self.sock.recvmsg(self.limits.max_message + 1, self._ancbuf)
        except BlockingIOError:
            return
        except OSError as e:
            self.close(_peer_gone(e))
            return
        fds = _fds_of(anc)
        if not data and not fds:
            self.close("the peer closed the channel")
            return
        too_many = flags & _CTRUNC or len(fds) > self.limits.max_handles
        if too_many or flags & _TRUNC or len(data) > self.limits.max_message:
            for fd in fds:
                os.close(fd)
            what = (
                f"{self.limits.max_handles} fds" if too_many else f"{self.limits.max_message} bytes"
            )
            self.close(f"more than {what}", bad=True)
            return
        msg: Message | None = None
        try:
            msg = decode(data, fds, self.limits)  # on BadMessage it has closed the fds
            if not self._control(msg):
                self.on_message(msg)
        except BadMessage as e:
            if msg is not None:
                msg.close_handles()
            self.close(e.reason, bad=True)

    # -- closing ---------------------------------------------------------------------------

    def close(self, reason: str = "closed by this side", *, bad: bool = False) -> None:
        """Close the socket, drop what is queued, report `reason` once. Idempotent."""
        if self.closed:
            return
        self.closed = ChannelClosed(reason, bad=bad)
        if bad:
            log.warning("%s: bad message from the peer: %s", self.name, reason)
        fd = self.sock.fileno()
        if fd >= 0:
            self.loop.remove_reader(fd)
            self.loop.remove_writer(fd)
        self.sock.close()
        while self._queue:
            item = self._queue.popleft()
            item.out.discard()
            for h in item.out.given:
                h.close()
            if item.sent is not None and not item.sent.done():
                item.sent.set_exception(self.closed)
        for pool in (self.pool, self.peer_pool):
            if pool is not None:
                pool.close()
        self.pool = self.peer_pool = None
        self.on_close(self.closed)


def _fds_of(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


def _peer_gone(e: OSError) -> str:
    if e.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
        return "the peer is gone"
    with contextlib.suppress(ValueError):
        return f"socket error: {errno.errorcode[e.errno or 0]} ({e.strerror})"
    return f"socket error: {e}"
