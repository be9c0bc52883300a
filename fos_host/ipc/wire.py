"""The wire format: one SEQPACKET datagram per message, a fixed header and a msgpack body.

    header (16 bytes, little-endian)  kind u8 · flags u8 · interface u16 · method u16 ·
                                      handles u16 · request id u32 · body length u32
    body                              msgpack (never pickle): the arguments, the result, …

File descriptors travel beside the datagram (SCM_RIGHTS). In the body a descriptor is an
extension value naming its place among the message's fds (`EXT_HANDLE`); every fd must be
named exactly once. Byte strings above `Limits.inline_max` go as sealed memfds
(`EXT_SEALED`; the receiver checks the seals before it reads) and a slot of a shared
`BufferPool` travels as `EXT_POOL` (slot, length), resolved by the channel.

`decode` trusts nothing: a wrong length, an unknown kind, too many fds, an fd that is not
what its place says, a malformed body (msgpack's decoder bounds the nesting; the interface
layer then checks every value against its declared, finite type) — each is a `BadMessage`
naming the reason, and every fd that came with the message is closed before it is raised.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from fos_host.closing import Closing
from fos_host.errors import FosError
from fos_host.ipc.shm import ShmError, open_sealed, seal_bytes
from fos_host.kernel.fds import fd_kind

HEADER = struct.Struct("<BBHHHII")
HEADER_SIZE = HEADER.size  # 16

EXT_HANDLE = 1  # data: u16 index among the message's fds
EXT_SEALED = 2  # data: u16 index of a sealed memfd holding a byte string
EXT_POOL = 3  # data: u16 slot, u32 length, of the sender's BufferPool
_U16 = struct.Struct("<H")
_POOL = struct.Struct("<HI")


class Kind(enum.IntEnum):
    HELLO = 1  # the interfaces each side implements, with versions and schema hashes
    REQUEST = 2  # a call that wants a result
    ONEWAY = 3  # a call without one
    RESPONSE = 4  # the result of a request
    ERROR = 5  # a request's failure: [error type, message]
    EVENT = 6  # one item of a request's stream
    END = 7  # the end of a stream
    RELEASE = 8  # the receiver is done with a pool slot: [slot]
    POOL = 9  # a BufferPool the sender will use: [slots, slot size], the memfd as a handle


_KINDS = {k.value: k for k in Kind}


class BadMessage(FosError):
    """A message that breaks the protocol; `reason` says how. The peer that sent it is not
    to be trusted again: the channel closes (and the host kills a renderer for it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"bad message: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts; checked on every message before anything else is done."""

    max_message: int = 64 * 1024  # one datagram, header included
    max_handles: int = 16  # fds per message
    max_outstanding: int = 256  # requests of the peer not yet answered
    inline_max: int = 16 * 1024  # byte strings above this go as sealed memfds
    max_sealed: int = 256 << 20  # bytes of sealed memfds in one message, all together
    max_pool: int = 256 << 20  # bytes of a pool the peer shares (slots times slot size)


# -- handles ---------------------------------------------------------------------------------


class Handle(Closing):
    """A file descriptor that travels with a message. Whoever holds the Handle owns the fd:
    sending one hands it over (the sender's copy is closed once it is sent); a received one
    must be closed or `take()`n. Subclasses name the kind a receiver insists on."""

    kind: ClassVar[str] = ""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __repr__(self) -> str:
        return f"<{type(self).__name__} fd={self.fd}>"

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def take(self) -> int:
        """The fd, which the caller now owns; the Handle is left closed."""
        if self.fd < 0:
            raise FosError(f"{type(self).__name__} was already closed or taken")
        fd, self.fd = self.fd, -1
        return fd

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class Memfd(Handle):
    kind = "memfd"


class Socket(Handle):
    kind = "socket"


class PidFd(Handle):
    kind = "pidfd"


class EventFd(Handle):
    kind = "eventfd"


HANDLE_TYPES: dict[str, type[Handle]] = {t.kind: t for t in (Memfd, Socket, PidFd, EventFd)}


def receive_handle(fd: int) -> Handle:
    """The typed Handle of a received fd (its kind read from the kernel, not believed)."""
    kind = fd_kind(fd)
    cls = HANDLE_TYPES.get(kind)
    if cls is None:
        raise BadMessage(f"an fd of kind {kind!r} (only {', '.join(HANDLE_TYPES)} may travel)")
    return cls(fd)


def close_handles_in(body: Any) -> None:
    """Close every Handle in a body that will not be sent (its channel is closed): they
    were handed over, so nobody else will."""
    if isinstance(body, Handle):
        body.close()
    elif isinstance(body, list | tuple):
        for item in body:
            close_handles_in(item)
    elif isinstance(body, dict):
        for item in body.values():
            close_handles_in(item)
    elif dataclasses.is_dataclass(body) and not isinstance(body, type):
        for f in dataclasses.fields(body):
            close_handles_in(getattr(body, f.name))


@dataclass(frozen=True)
class PoolRef:
    """A slot of the sender's BufferPool as it arrives; the channel turns it into a view."""

    slot: int
    length: int


class Shared:
    """A byte string the receiver sees in place, without a copy: a slot of the peer's pool
    (or, when it came inline or in a sealed memfd, those bytes). Held until `release()`
    (or the end of a `with` block), which hands the slot back to the peer.

    The peer can still write to its slot while it is held: read it for what tearing cannot
    hurt (pixels), and copy what you parse (`bytes(shared.memory)`, or into a reused buffer)."""

    def __init__(self, memory: memoryview, release: Callable[[], None] | None = None) -> None:
        self.memory = memory
        self._release = release

    def __len__(self) -> int:
        return len(self.memory)

    def __repr__(self) -> str:
        return f"<Shared {len(self.memory)} bytes>"

    def release(self) -> None:
        """Drop the view and give the slot back. Idempotent."""
        self.memory.release()
        done, self._release = self._release, None
        if done is not None:
            done()

    def __enter__(self) -> Shared:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# -- messages --------------------------------------------------------------------------------


@dataclass
class Message:
    kind: Kind
    interface: int
    method: int
    request_id: int
    body: Any = None
    handles: list[Handle] = field(default_factory=list)  # all that came, in body order

    def close_handles(self) -> None:
        for h in self.handles:
            h.close()


PoolWriter = Callable[[bytes | bytearray | memoryview], PoolRef | None]


class Outgoing:
    """An encoded message: the datagram, the fds to send with it, and what the sender must
    close once it is sent (the handles it gave away, the sealed memfds it made)."""

    __slots__ = ("data", "fds", "given", "limits", "owned", "pool")

    def __init__(self, limits: Limits, pool: PoolWriter | None) -> None:
        self.data = b""
        self.fds: list[int] = []
        self.owned: list[int] = []  # fds made here (sealed memfds): closed after sending
        self.given: list[Handle] = []  # handles handed over: closed after sending
        self.limits = limits
        self.pool = pool

    def discard(self) -> None:
        """Sending failed: close what encode() made; the caller keeps its handles."""
        for fd in self.owned:
            os.close(fd)
        self.owned = []

    def _fd_ref(self, code: int, fd: int) -> msgpack.ExtType:
        self.fds.append(fd)
        return msgpack.ExtType(code, _U16.pack(len(self.fds) - 1))

    def special(self, obj: Any) -> Any:
        """msgpack's hook for what it cannot pack itself."""
        if isinstance(obj, Shared):
            return obj.memory
        if isinstance(obj, Handle):
            if obj.closed:
                raise FosError(f"cannot send {type(obj).__name__}: already closed or taken")
            self.given.append(obj)
            return self._fd_ref(EXT_HANDLE, obj.fd)
        if isinstance(obj, enum.Enum):
            return obj.value
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return [getattr(obj, f.name) for f in dataclasses.fields(obj)]
        if isinstance(obj, PoolRef):
            return msgpack.ExtType(EXT_POOL, _POOL.pack(obj.slot, obj.length))
        raise FosError(f"cannot send a {type(obj).__name__}")

    def big_bytes_out(self, obj: Any) -> Any:
        """`obj` with every byte string above the inline limit moved to shared memory."""
        if isinstance(obj, Shared):
            obj = obj.memory
        if isinstance(obj, bytes | bytearray | memoryview):
            if len(obj) <= self.limits.inline_max:
                return obj
            ref = self.pool(obj) if self.pool is not None else None
            if ref is not None:
                return msgpack.ExtType(EXT_POOL, _POOL.pack(ref.slot, ref.length))
            fd = seal_bytes(obj)
            self.owned.append(fd)
            return self._fd_ref(EXT_SEALED, fd)
        if isinstance(obj, list | tuple):
            return [self.big_bytes_out(x) for x in obj]
        if isinstance(obj, dict):
            return {k: self.big_bytes_out(v) for k, v in obj.items()}
        if isinstance(obj, enum.Enum):
            return obj.value
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return [self.big_bytes_out(getattr(obj, f.name)) for f in dataclasses.fields(obj)]
        return obj


def encode(
    kind: Kind,
    interface: int,
    method: int,
    request_id: int,
    body: Any,
    limits: Limits,
    pool: PoolWriter | None = None,
) -> Outgoing:
    """Encode a message. Handles in `body` become fds; byte strings above the inline limit
    go into a pool slot (when `pool` gives one) or a sealed memfd; enums become their
    values and dataclasses the list of their fields."""
    out = Outgoing(limits, pool)
    try:
        if _big_at_top(body, limits.inline_max):  # do not pack 64 MiB only to find it big
            payload = msgpack.packb(out.big_bytes_out(body), default=out.special, use_bin_type=True)
        else:
            payload = msgpack.packb(body, default=out.special, use_bin_type=True)
            if len(payload) > limits.inline_max:  # a big byte string deeper down, maybe
                out.fds, out.given = [], []
                body = out.big_bytes_out(body)
                payload = msgpack.packb(body, default=out.special, use_bin_type=True)
        if len(out.fds) > limits.max_handles:
            raise FosError(f"{len(out.fds)} fds in one message (at most {limits.max_handles})")
        head = HEADER.pack(kind, 0, interface, method, len(out.fds), request_id, len(payload))
        out.data = head + payload
        if len(out.data) > limits.max_message:
            raise FosError(
                f"a message of {len(out.data)} bytes (at most {limits.max_message}): big byte "
                "strings go in shared memory, many small values do not"
            )
    except BaseException:
        out.discard()
        raise
    return out


def _big_at_top(body: Any, limit: int) -> bool:
    """A byte string above `limit` among the arguments themselves (the usual place)."""
    items = body if isinstance(body, list | tuple) else (body,)
    return any(
        isinstance(x, bytes | bytearray | memoryview | Shared) and len(x) > limit for x in items
    )


def peek_header(data: bytes) -> tuple[int, int, int, int, int, int, int]:
    if len(data) < HEADER_SIZE:
        raise BadMessage(f"{len(data)} bytes, shorter than the {HEADER_SIZE}-byte header")
    return HEADER.unpack_from(data)


def decode(data: bytes, fds: list[int], limits: Limits) -> Message:
    """Check and decode one received datagram with the fds that came with it. Raises
    BadMessage (having closed every fd) if anything is wrong."""
    handles: list[Handle | None] = []
    try:
        return _decode(data, fds, limits, handles)
    except BaseException:
        for h in handles:
            if h is not None:
                h.close()
        for fd in fds[len(handles) :]:
            os.close(fd)
        raise


def _decode(data: bytes, fds: list[int], limits: Limits, handles: list[Handle | None]) -> Message:
    kind_n, flags, interface, method, n_handles, request_id, length = peek_header(data)
    if len(data) > limits.max_message:
        raise BadMessage(f"{len(data)} bytes (at most {limits.max_message})")
    if flags:
        raise BadMessage(f"unknown flags {flags:#x}")
    kind = _KINDS.get(kind_n)
    if kind is None:
        raise BadMessage(f"unknown message kind {kind_n}")
    if length != len(data) - HEADER_SIZE:
        raise BadMessage(f"body length {length} but {len(data) - HEADER_SIZE} bytes came")
    if n_handles != len(fds):
        raise BadMessage(f"header says {n_handles} fds, {len(fds)} came")
    if len(fds) > limits.max_handles:
        raise BadMessage(f"{len(fds)} fds (at most {limits.max_handles})")
    for fd in fds:
        try:
            handles.append(receive_handle(fd))
        except OSError as e:
            raise BadMessage(f"an fd that cannot be inspected: {e}") from e
    used: set[int] = set()
    sealed = [0]  # bytes of sealed memfds so far in this message

    def index(raw: bytes) -> int:
        if len(raw) != _U16.size:
            raise BadMessage(f"a handle reference of {len(raw)} bytes")
        (i,) = _U16.unpack(raw)
        if i >= len(handles) or i in used:
            raise BadMessage(f"handle reference {i} is out of range or used twice")
        used.add(i)
        return i

    def ext_hook(code: int, raw: bytes) -> Any:
        if code == EXT_HANDLE:
            h = handles[index(raw)]
            assert h is not None
            return h
        if code == EXT_SEALED:
            i = index(raw)
            h = handles[i]
            if not isinstance(h, Memfd):
                raise BadMessage(f"sealed bytes in a {type(h).__name__}, not a memfd")
            handles[i] = None  # open_sealed owns (and closes) the fd from here
            try:
                with open_sealed(h.take(), limits.max_sealed - sealed[0]) as view:
                    sealed[0] += len(view)
                    return bytes(view.memory)
            except ShmError as e:
                raise BadMessage(str(e)) from e
        if code == EXT_POOL:
            if len(raw) != _POOL.size:
                raise BadMessage(f"a pool reference of {len(raw)} bytes")
            return PoolRef(*_POOL.unpack(raw))
        raise BadMessage(f"unknown extension type {code}")

    try:
        body = msgpack.unpackb(
            data[HEADER_SIZE:],
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=ext_hook,
        )
    except BadMessage:
        raise
    except Exception as e:  # msgpack's ExtraData, FormatError, StackError, ValueError, …
        raise BadMessage(f"malformed body: {type(e).__name__}: {e}") from None
    if len(used) != len(handles):
        raise BadMessage(f"{len(handles) - len(used)} fds not named in the body")
    return Message(kind, interface, method, request_id, body, [h for h in handles if h])
