"""Fuzzing the IPC receiver: no input crashes it, hangs it or leaks an fd.

Two levels:

- `decode` on its own: arbitrary bytes, a header (valid or not) with an arbitrary body, and
  a header with a structurally valid msgpack body (nested values, extension values of any
  code naming fds in and out of range, twice, or all of them once) — each sent with 0..18
  real fds of mixed kinds. `decode` returns a Message or raises BadMessage, nothing else;
  on BadMessage every fd it was given is closed, and when it returns, closing the message's
  handles closes every fd. The check compares the sets of entries of /proc/self/fd before
  the fds are made and after, so a reused fd number cannot hide a leak.
- A real receiver: a `Channel` and an `Endpoint` serving a typed interface on an asyncio
  loop, fed raw datagrams (with SCM_RIGHTS fds) from the other end of the socketpair after
  a valid HELLO: random bytes, headers, structured bodies, well-typed and mistyped calls,
  answers to the receiver's own calls, POOL and RELEASE messages, oversize datagrams and too
  many fds. After each input the receiver is open or closed as a bad message with a reason;
  no exception reaches the event loop; the implementation only ever sees values of its
  declared types; nothing hangs; and once the channel is closed the fds are back to what
  they were before.

The default run is bounded (a few seconds); `-m slow` runs >= 100 000 decoder cases and
many thousands of receiver sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import fcntl
import functools
import inspect
import logging
import os
import re
import select
import signal
import socket
import struct
import types
import typing
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from fos_host.errors import FosError
from fos_host.ipc.channel import Channel
from fos_host.ipc.interface import Endpoint, Interface, RemoteError, method
from fos_host.ipc.shm import POOL_SEALS, seal_bytes
from fos_host.ipc.wire import (
    EXT_HANDLE,
    EXT_POOL,
    EXT_SEALED,
    HEADER,
    BadMessage,
    EventFd,
    Handle,
    Kind,
    Limits,
    Memfd,
    Message,
    PidFd,
    PoolRef,
    Shared,
    Socket,
    decode,
)

LIMITS = Limits()
U16 = struct.Struct("<H")
POOL_REF = struct.Struct("<HI")
POOL_SLOTS, POOL_SLOT_SIZE = 2, 4096  # what a "pool" fd made here holds
SESSION_SECONDS = 5.0  # one receiver session; longer is a hang
DECODE_SECONDS = 5.0  # one decode() call

COMMON = {
    "database": None,  # no .hypothesis/ in the repository
    "deadline": None,
    "suppress_health_check": list(HealthCheck),
}


# -- fds ----------------------------------------------------------------------------------

FD_KINDS = ("sealed", "memfd", "pool", "eventfd", "pipe", "socket", "file", "pidfd")
HANDLE_OF: dict[str, type[Handle] | None] = {
    "sealed": Memfd,
    "memfd": Memfd,
    "pool": Memfd,
    "eventfd": EventFd,
    "socket": Socket,
    "pidfd": PidFd,
    "pipe": None,  # may not travel: a message carrying one is bad
    "file": None,
}


def make_fd(kind: str, data: bytes = b"") -> int:
    """A new fd of `kind` that this process owns."""
    if kind == "sealed":  # a memfd with REQUIRED_SEALS holding `data`
        return seal_bytes(data)
    if kind == "memfd":  # unsealed, writable
        fd = os.memfd_create("fuzz", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        if data:
            os.write(fd, data)
        return fd
    if kind == "pool":  # what a peer's BufferPool is: size sealed, contents not
        fd = os.memfd_create("fuzz-pool", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, POOL_SLOTS * POOL_SLOT_SIZE)
        os.pwrite(fd, data, 0)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, POOL_SEALS)
        return fd
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_CLOEXEC)
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return r
    if kind == "socket":
        s1, s2 = socket.socketpair()
        s2.close()
        return s1.detach()
    if kind == "file":  # a regular file: this very test
        return os.open(__file__, os.O_RDONLY | os.O_CLOEXEC)
    if kind == "pidfd":
        return os.pidfd_open(os.getpid())
    raise AssertionError(kind)


def open_fds() -> set[int]:
    """The fds open in this process (including, each time, the one listdir uses)."""
    return {int(n) for n in os.listdir("/proc/self/fd")}


def describe(fds: set[int]) -> list[str]:
    out = []
    for fd in sorted(fds):
        try:
            out.append(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            out.append(f"{fd} -> ?")
    return out


def close_leaked(baseline: set[int]) -> set[int]:
    """Close whatever is open beyond `baseline` (so one failure does not cascade) and say
    what it was."""
    leaked = open_fds() - baseline
    text = describe(leaked)
    for fd in leaked:
        with contextlib.suppress(OSError):
            os.close(fd)
    assert not leaked, f"fds leaked: {text}"
    return leaked


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail with Hang if the block runs longer than `seconds` (SIGALRM: works even when the
    block is stuck in a system call or in code that never yields to an event loop)."""

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"no progress in {seconds:g} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# -- building datagrams ---------------------------------------------------------------------


@dataclass(frozen=True)
class Ext:
    """A msgpack extension value of any code (-128..127) with raw data."""

    code: int
    data: bytes


@dataclass(frozen=True)
class NewFd:
    """A fd of `kind` sent with the message (the next index) and named here by `code`."""

    kind: str
    code: int = EXT_HANDLE
    data: bytes = b""


@dataclass(frozen=True)
class Pairs:
    """A msgpack map with keys of any type, duplicates allowed."""

    items: tuple[tuple[Any, Any], ...]


@dataclass(frozen=True)
class Deep:
    """`depth` nested one-element arrays around a nil."""

    depth: int


@dataclass(frozen=True)
class Datagram:
    data: bytes
    fds: tuple[tuple[str, bytes], ...] = ()  # (kind, contents) of each fd sent with it

    @property
    def empty(self) -> bool:
        return not self.data and not self.fds

    def __repr__(self) -> str:  # a 64 KiB datagram is not worth printing in full
        data = self.data if len(self.data) <= 256 else self.data[:64] + b"..."
        return f"Datagram({data!r}, len={len(self.data)}, fds={self.fds!r})"


class Packer:
    """msgpack, written by hand where msgpack-python refuses (negative extension codes,
    unhashable or duplicate map keys); the fds named by NewFd are collected in order."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.fds: list[tuple[str, bytes]] = []

    def ext(self, code: int, data: bytes) -> None:
        n, t = len(data), code & 0xFF
        fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
        if n in fixed:
            self.out += bytes([fixed[n], t])
        elif n < 0x100:
            self.out += bytes([0xC7, n, t])
        elif n < 0x10000:
            self.out += struct.pack(">BHB", 0xC8, n, t)
        else:
            self.out += struct.pack(">BIB", 0xC9, n, t)
        self.out += data

    def container(self, n: int, fix: int, c16: int) -> None:
        if n < 16:
            self.out.append(fix | n)
        elif n < 0x10000:
            self.out += struct.pack(">BH", c16, n)
        else:
            self.out += struct.pack(">BI", c16 + 1, n)

    def pack(self, obj: Any) -> None:
        if isinstance(obj, NewFd):
            self.fds.append((obj.kind, obj.data))
            self.ext(obj.code, U16.pack(len(self.fds) - 1))
        elif isinstance(obj, Ext):
            self.ext(obj.code, obj.data)
        elif isinstance(obj, Deep):
            self.out += b"\x91" * obj.depth + b"\xc0"
        elif isinstance(obj, list | tuple):
            self.container(len(obj), 0x90, 0xDC)
            for x in obj:
                self.pack(x)
        elif isinstance(obj, Pairs | dict):
            items = obj.items if isinstance(obj, Pairs) else tuple(obj.items())
            self.container(len(items), 0x80, 0xDE)
            for k, v in items:
                self.pack(k)
                self.pack(v)
        elif isinstance(obj, enum.Enum):
            self.pack(obj.value)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            self.pack([getattr(obj, f.name) for f in dataclasses.fields(obj)])
        else:
            self.out += msgpack.packb(obj, use_bin_type=True)


def datagram(
    kind: int,
    body: Any,
    *,
    interface: int = 0,
    method: int = 0,
    request_id: int = 0,
    extra_fds: tuple[tuple[str, bytes], ...] = (),
) -> Datagram:
    """A message with a right header: `body` packed, the fds it names by NewFd and then
    `extra_fds` sent with it."""
    p = Packer()
    p.pack(body)
    fds = (*p.fds, *extra_fds)
    head = HEADER.pack(kind, 0, interface, method, len(fds), request_id, len(p.out))
    return Datagram(head + bytes(p.out), fds)


# -- strategies: values ------------------------------------------------------------------


@st.composite
def _weighted(draw: st.DrawFn, options: tuple[st.SearchStrategy[Any], ...]) -> Any:
    return draw(options[draw(st.integers(0, len(options) - 1))])


def weighted(
    first: st.SearchStrategy[Any], *rest: st.SearchStrategy[Any], usual: int
) -> st.SearchStrategy[Any]:
    """`first` in about `usual` of `usual + len(rest)` draws, each of `rest` in one (listing
    a strategy twice in one_of does not make it twice as likely)."""
    return _weighted((first,) * usual + rest)


u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
any_kind = st.sampled_from([int(k) for k in Kind]) | st.integers(0, 255)
TRAVELLING = [k for k in FD_KINDS if HANDLE_OF[k] is not None]
fd_kinds = weighted(st.sampled_from(TRAVELLING), st.sampled_from(FD_KINDS), usual=6)
fd_spec = st.tuples(fd_kinds, st.binary(max_size=64))
fd_specs = weighted(
    st.lists(fd_spec, max_size=4), st.lists(fd_spec, min_size=14, max_size=18), usual=7
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=16)
    | st.binary(max_size=32)
)
deep = st.integers(900, 1100).map(Deep)
pool_refs = st.builds(
    lambda slot, n: Ext(EXT_POOL, POOL_REF.pack(slot, n)),
    st.integers(0, 3) | u16,
    st.integers(0, POOL_SLOT_SIZE + 2) | u32,
)


@functools.cache
def raw_exts(n_fds: int) -> st.SearchStrategy[Ext]:
    """Extension values of the codes decode knows and some it does not, naming fds in and
    out of range (and, drawn more than once, twice)."""
    code = st.integers(0, 5) | st.integers(-128, 127)
    data = (
        st.integers(0, n_fds + 1).map(U16.pack)
        | u16.map(U16.pack)
        | st.tuples(u16, u32).map(lambda t: POOL_REF.pack(*t))
        | st.binary(max_size=20)
    )
    return st.builds(Ext, code, data)


def trees(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Nested lists, str-keyed maps and maps of any keys over `leaves`."""
    return st.recursive(
        leaves,
        lambda kids: (
            st.lists(kids, max_size=4)
            | st.dictionaries(st.text(max_size=6), kids, max_size=3)
            | st.lists(st.tuples(kids, kids), max_size=3).map(lambda x: Pairs(tuple(x)))
        ),
        max_leaves=12,
    )


plain_trees = trees(scalars)


@functools.cache
def ext_trees(n_fds: int) -> st.SearchStrategy[Any]:
    """Trees with extension values naming fds 0..n_fds+1 and deep nests among the leaves
    (strategies are cached: building a recursive one per draw is slow)."""
    return trees(scalars | raw_exts(n_fds) | deep)


new_fds = st.builds(
    NewFd,
    st.sampled_from(FD_KINDS),
    st.sampled_from([EXT_HANDLE, EXT_SEALED]),
    st.binary(max_size=32),
)
# any value at all: what a mistyped call or a random body carries
any_value = trees(scalars | raw_exts(4) | new_fds | pool_refs | deep)


# -- strategies: decoder cases -------------------------------------------------------------


@st.composite
def arbitrary_bytes(draw: st.DrawFn) -> Datagram:
    data = draw(st.binary(max_size=300) | st.binary(min_size=16, max_size=40))
    return Datagram(data, tuple(draw(fd_specs)))


@st.composite
def header_and_random_body(draw: st.DrawFn) -> Datagram:
    """A header of random fields (the counts and length right or not) and random bytes."""
    fds = tuple(draw(fd_specs))
    body = draw(st.binary(max_size=200))
    n_handles = draw(weighted(st.just(len(fds)), u16, usual=3))
    length = draw(weighted(st.just(len(body)), st.integers(0, 300), u32, usual=4))
    head = HEADER.pack(
        draw(any_kind),
        draw(weighted(st.just(0), st.integers(0, 255), usual=3)),
        draw(u16),
        draw(u16),
        n_handles,
        draw(u32),
        length,
    )
    return Datagram(head + body, fds)


@st.composite
def header_and_msgpack_body(draw: st.DrawFn) -> Datagram:
    """A right header and a well-formed msgpack body; in half of the cases every fd is named
    exactly once (mostly by the code that fits its kind), so decode often succeeds."""
    fds = tuple(draw(fd_specs))
    n = len(fds)
    if draw(st.booleans()):
        tree = plain_trees if draw(st.booleans()) else ext_trees(n)
        refs = []
        for i in draw(st.permutations(range(n))):
            sealed = fds[i][0] == "sealed"
            fits, other = (EXT_SEALED, EXT_HANDLE) if sealed else (EXT_HANDLE, EXT_SEALED)
            code = draw(weighted(st.just(fits), st.sampled_from([other, EXT_POOL]), usual=6))
            refs.append(Ext(code, U16.pack(i)))
        items = draw(st.lists(tree, max_size=3)) + refs
        body: Any = draw(st.permutations(items))
        if draw(st.booleans()):  # nest the whole thing once more
            body = Pairs(tuple((f"k{j}", v) for j, v in enumerate(body)))
    else:
        body = draw(ext_trees(n))
    return datagram(
        draw(weighted(st.sampled_from([int(k) for k in Kind]), any_kind, usual=3)),
        body,
        interface=draw(u16),
        method=draw(u16),
        request_id=draw(u32),
        extra_fds=fds,
    )


# -- the decoder property ------------------------------------------------------------------

ALLOWED = (type(None), bool, int, float, str, bytes, list, dict, Handle, PoolRef)
# msgpack-python turns extension type -1 into a Timestamp by itself (ext_hook never sees
# it); no type of the interface layer accepts one, so it is let through here.
ALLOWED_TOO = (msgpack.Timestamp,)


def body_handles(body: Any) -> list[Handle]:
    """The handles in a decoded body, checking on the way that it holds only what decode may
    return (iteratively: bodies may be nested ~1000 deep)."""
    found: list[Handle] = []
    stack = [body]
    while stack:
        v = stack.pop()
        assert isinstance(v, ALLOWED + ALLOWED_TOO), f"decode returned a {type(v).__name__}"
        if isinstance(v, Handle):
            found.append(v)
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            for k, x in v.items():
                assert type(k) in (str, bytes), f"a map key of type {type(k).__name__}"
                stack.append(x)
    return found


def check_decode(dg: Datagram) -> None:
    baseline = open_fds()
    fds = [make_fd(kind, data) for kind, data in dg.fds]
    kind_of = dict(zip(fds, (kind for kind, _ in dg.fds), strict=True))
    try:
        with time_limit(DECODE_SECONDS):
            msg = decode(dg.data, list(fds), LIMITS)
    except BadMessage as e:
        assert isinstance(e.reason, str) and e.reason
        close_leaked(baseline)  # every fd passed in is closed
        event(re.sub(r"\d+", "N", e.reason)[:40])  # for --hypothesis-show-statistics
        return
    except BaseException:
        with contextlib.suppress(AssertionError):
            close_leaked(baseline)
        raise
    event("decoded")
    try:
        assert isinstance(msg, Message)
        kind, _, interface, meth, _, rid, _ = HEADER.unpack_from(dg.data)
        assert (msg.kind, msg.interface, msg.method, msg.request_id) == (
            kind,
            interface,
            meth,
            rid,
        )
        assert isinstance(msg.kind, Kind)
        in_body = body_handles(msg.body)
        assert sorted(map(id, in_body)) == sorted(map(id, msg.handles)), "handles != body"
        assert len({h.fd for h in msg.handles}) == len(msg.handles)
        for h in msg.handles:
            assert h.fd in kind_of, f"{h!r} is not one of the fds passed in"
            assert type(h) is HANDLE_OF[kind_of[h.fd]], f"{h!r} for a {kind_of[h.fd]}"
    finally:
        msg.close_handles()
        close_leaked(baseline)  # the fds not in handles were sealed blobs, closed already


def decode_test(strategy: st.SearchStrategy[Datagram], n: int) -> Callable[[], None]:
    @settings(max_examples=n, **COMMON)
    @given(strategy)
    def test(dg: Datagram) -> None:
        check_decode(dg)

    return test


test_decode_arbitrary_bytes = decode_test(arbitrary_bytes(), 400)
test_decode_header_and_random_body = decode_test(header_and_random_body(), 400)
test_decode_header_and_msgpack_body = decode_test(header_and_msgpack_body(), 600)

SLOW_DECODE = 34_000  # x 3 strategies: > 100 000 decoder cases
test_decode_arbitrary_bytes_slow = pytest.mark.slow(decode_test(arbitrary_bytes(), SLOW_DECODE))
test_decode_header_and_random_body_slow = pytest.mark.slow(
    decode_test(header_and_random_body(), SLOW_DECODE)
)
test_decode_header_and_msgpack_body_slow = pytest.mark.slow(
    decode_test(header_and_msgpack_body(), SLOW_DECODE)
)


# -- the receiver: a typed interface and its implementation ----------------------------------


class Color(enum.Enum):
    RED = 1
    GREEN = 2
    BLUE = "blue"


@dataclass
class Point:
    x: int
    y: float
    label: str | None


@dataclass
class Blob:
    name: str
    fd: Memfd | None


class NotFound(RemoteError):
    pass


class Target(Interface, version=2):
    """What the receiver serves."""

    errors = (NotFound,)

    @method(0)
    async def add(self, a: int, b: int) -> int: ...

    @method(1)
    def greet(self, name: str) -> str: ...

    @method(2)
    async def echo(self, data: bytes) -> bytes: ...

    @method(3)
    async def total(self, xs: list[int]) -> int: ...

    @method(4)
    async def tally(self, counts: dict[str, int]) -> int: ...

    @method(5)
    async def move(self, p: Point, by: float) -> Point: ...

    @method(6)
    async def maybe(self, x: int | None) -> int | None: ...

    @method(7)
    async def paint(self, c: Color) -> Color: ...

    @method(8)
    async def size(self, fd: Memfd) -> int: ...

    @method(9)
    async def count(self, n: int) -> AsyncIterator[int]: ...

    @method(10, oneway=True)
    def note(self, text: str) -> None: ...

    @method(11)
    async def store(self, blob: Blob, extra: list[EventFd]) -> int: ...

    @method(12)
    async def flag(self, on: bool) -> bool: ...

    @method(13, min_version=2)
    async def fail(self, key: str) -> None: ...

    @method(14)
    def peek(self, data: Shared) -> int: ...


class Remote(Interface):
    """What the fuzzing side claims to serve, so that the receiver has calls of its own
    pending (request ids 1 and 2) and answers to them can be fuzzed too."""

    @method(0)
    async def fetch(self, n: int) -> Memfd | None: ...

    @method(1)
    async def watch(self) -> AsyncIterator[EventFd]: ...


def conforms(v: Any, tp: Any) -> bool:
    """Whether `v` is exactly of type `tp` (what the implementation may assume)."""
    if tp is None or tp is type(None):
        return v is None
    if tp in (bool, int, float, str, bytes):
        return type(v) is tp
    if isinstance(tp, type) and issubclass(tp, Handle):
        return isinstance(v, tp) and not v.closed
    if isinstance(tp, type) and issubclass(tp, enum.Enum | Shared):
        return isinstance(v, tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        hints = typing.get_type_hints(tp)
        return isinstance(v, tp) and all(
            conforms(getattr(v, f.name), hints[f.name]) for f in dataclasses.fields(tp)
        )
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return type(v) is list and all(conforms(x, args[0]) for x in v)
    if origin is dict:
        return type(v) is dict and all(
            conforms(k, args[0]) and conforms(x, args[1]) for k, x in v.items()
        )
    if origin in (typing.Union, types.UnionType):
        return any(conforms(v, a) for a in args)
    raise AssertionError(f"conforms: {tp!r}")


def handles_in(v: Any) -> list[Handle]:
    if isinstance(v, Handle):
        return [v]
    if isinstance(v, list):
        return [h for x in v for h in handles_in(x)]
    if isinstance(v, dict):
        return [h for x in v.values() for h in handles_in(x)]
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return [h for f in dataclasses.fields(v) for h in handles_in(getattr(v, f.name))]
    return []


SPECS = {spec.name: spec for spec in Target.methods.values()}


class TargetImpl(Target):
    """Records any argument that is not of its declared type, and closes every handle it is
    given (the test counts fds)."""

    def __init__(self) -> None:
        self.violations: list[str] = []

    def got(self, name: str, *args: Any) -> None:
        for (param, tp), v in zip(SPECS[name].params, args, strict=True):
            if not conforms(v, tp):
                self.violations.append(f"{name}({param}) got {v!r:.200}")
        for h in handles_in(list(args)):
            h.close()

    async def add(self, a: int, b: int) -> int:
        self.got("add", a, b)
        return a + b

    def greet(self, name: str) -> str:
        self.got("greet", name)
        return f"hello {name}"

    async def echo(self, data: bytes) -> bytes:
        self.got("echo", data)
        return data

    async def total(self, xs: list[int]) -> int:
        self.got("total", xs)
        return len(xs)

    async def tally(self, counts: dict[str, int]) -> int:
        self.got("tally", counts)
        return len(counts)

    async def move(self, p: Point, by: float) -> Point:
        self.got("move", p, by)
        return Point(p.x, p.y + by, p.label)

    async def maybe(self, x: int | None) -> int | None:
        self.got("maybe", x)
        return x

    async def paint(self, c: Color) -> Color:
        self.got("paint", c)
        return c

    async def size(self, fd: Memfd) -> int:
        size = os.fstat(fd.fd).st_size if isinstance(fd, Handle) and not fd.closed else -1
        self.got("size", fd)
        return size

    async def count(self, n: int) -> AsyncIterator[int]:
        self.got("count", n)
        for i in range(min(n, 5)):
            yield i

    def note(self, text: str) -> None:
        self.got("note", text)

    async def store(self, blob: Blob, extra: list[EventFd]) -> int:
        self.got("store", blob, extra)
        return len(extra)

    async def flag(self, on: bool) -> bool:
        self.got("flag", on)
        return on

    async def fail(self, key: str) -> None:
        self.got("fail", key)
        raise NotFound(key)

    def peek(self, data: Shared) -> int:
        self.got("peek", data)
        with data:  # hands a pool slot back
            return len(data.memory)


def serve(channel: Channel, impl: Target) -> Endpoint:
    """An Endpoint serving `impl`, whichever way Endpoint takes its implementations
    ({interface: implementation} or a list of Interface subclasses' instances)."""
    annotation = str(inspect.signature(Endpoint).parameters["implements"].annotation)
    if "Mapping" in annotation or "dict" in annotation:
        return Endpoint(channel, {Target: impl})
    return Endpoint(channel, [impl])


# -- strategies: what the receiver is sent -------------------------------------------------

RIGHT_KINDS = {Memfd: ("memfd", "sealed", "pool"), EventFd: ("eventfd",)}


@functools.cache
def typed(tp: Any) -> st.SearchStrategy[Any]:
    """Values of type `tp` as they go on the wire (handles as NewFd, mostly of the right
    kind; byte strings sometimes as sealed memfds or pool slots)."""
    if tp is None or tp is type(None):
        return st.none()
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(-(2**63), 2**64 - 1)
    if tp is float:
        return st.floats() | st.integers(-(2**53), 2**53)
    if tp is str:
        return st.text(max_size=24)
    if tp is bytes or tp is Shared:
        sealed = st.builds(NewFd, st.just("sealed"), st.just(EXT_SEALED), st.binary(max_size=64))
        return st.binary(max_size=64) | sealed | pool_refs
    if isinstance(tp, type) and issubclass(tp, Handle):
        right = st.sampled_from(RIGHT_KINDS[tp])
        return st.builds(NewFd, weighted(right, st.sampled_from(FD_KINDS), usual=3))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return st.sampled_from([m.value for m in tp])
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        hints = typing.get_type_hints(tp)
        return st.tuples(*(typed(hints[f.name]) for f in dataclasses.fields(tp))).map(list)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return st.lists(typed(args[0]), max_size=4)
    if origin is dict:
        return st.dictionaries(st.text(max_size=8), typed(args[1]), max_size=3)
    if origin in (typing.Union, types.UnionType):
        return st.none() | typed(next(a for a in args if a is not type(None)))
    raise AssertionError(f"typed: {tp!r}")


ALL_METHODS = sorted(Target.methods.values(), key=lambda s: s.ordinal)
# the methods whose arguments may carry fds or pool slots, a third of the calls
WITH_FDS = [SPECS[name] for name in ("echo", "size", "store", "peek")]


@st.composite
def calls(draw: st.DrawFn) -> Datagram:
    """A call of a Target method: well-typed, or with one argument replaced by anything,
    one too many or too few, as the wrong kind, to another interface or method."""
    spec = draw(weighted(st.sampled_from(ALL_METHODS), st.sampled_from(WITH_FDS), usual=2))
    args = [draw(typed(tp)) for _, tp in spec.params]
    how = draw(weighted(st.just("valid"), st.just("mistyped"), st.just("arity"), usual=6))
    if how == "mistyped" and args:
        args[draw(st.integers(0, len(args) - 1))] = draw(any_value)
    elif how == "arity":
        args = args[:-1] if args and draw(st.booleans()) else [*args, draw(any_value)]
    kind = Kind.ONEWAY if spec.oneway else Kind.REQUEST
    if draw(st.integers(0, 19)) == 0:
        kind = Kind.REQUEST if spec.oneway else Kind.ONEWAY
    rid = 0 if kind is Kind.ONEWAY else draw(st.integers(1, 4) | u32)
    return datagram(
        kind,
        args,
        interface=draw(weighted(st.just(0), st.integers(1, 3), usual=8)),
        method=draw(weighted(st.just(spec.ordinal), st.integers(0, 20) | u16, usual=8)),
        request_id=rid,
    )


@st.composite
def answers(draw: st.DrawFn) -> Datagram:
    """An answer to one of the receiver's calls (fetch: request 1, watch: request 2) or to
    none."""
    kind = draw(st.sampled_from([Kind.RESPONSE, Kind.ERROR, Kind.EVENT, Kind.END]))
    body = draw(
        st.tuples(typed(Memfd | None)).map(list)
        | st.tuples(typed(EventFd)).map(list)
        | st.just(["NotFound", "gone"])
        | st.just(["RemoteError", "failed"])
        | st.just([])
        | st.lists(any_value, max_size=3)
    )
    return datagram(
        kind,
        body,
        method=draw(st.sampled_from([0, 1]) | u16),
        request_id=draw(st.sampled_from([1, 2, 3]) | u32),
    )


def pool_message(slots: int = POOL_SLOTS, size: int = POOL_SLOT_SIZE, **kw: Any) -> Datagram:
    contents = kw.pop("contents", b"")
    return datagram(Kind.POOL, [slots, size, NewFd("pool", EXT_HANDLE, contents)], **kw)


@st.composite
def controls(draw: st.DrawFn) -> Datagram:
    """The channel's own messages: RELEASE of a slot of the receiver's pool, POOL."""
    if draw(st.booleans()):
        body = draw(st.tuples(st.integers(-2, 4)).map(list) | any_value)
        return datagram(Kind.RELEASE, body)
    slots = draw(st.sampled_from([POOL_SLOTS, 1, 0, -1]) | u32)
    size = draw(st.sampled_from([POOL_SLOT_SIZE, 2 * POOL_SLOT_SIZE, 0]) | u32)
    kind = draw(st.sampled_from(["pool", "pool", *FD_KINDS]))
    body: Any = [slots, size, NewFd(kind)]
    if draw(st.integers(0, 4)) == 0:
        body = draw(any_value)
    return datagram(Kind.POOL, body)


@st.composite
def generic(draw: st.DrawFn) -> Datagram:
    """Any kind, interface, method and request id with a random well-formed body."""
    return datagram(
        draw(any_kind),
        draw(any_value),
        interface=draw(st.integers(0, 2) | u16),
        method=draw(st.integers(0, 15) | u16),
        request_id=draw(st.integers(0, 4) | u32),
    )


@st.composite
def oddities(draw: st.DrawFn) -> Datagram:
    """Datagrams the socket layer must catch: above the size limit, too many fds, empty."""
    what = draw(st.sampled_from(["big", "fds", "empty"]))
    if what == "big":
        extra = draw(st.integers(0, 100))
        filler = b"\xc0" * (LIMITS.max_message - 16 + extra)
        head = HEADER.pack(Kind.ONEWAY, 0, 0, 10, 0, 0, len(filler))
        return Datagram(head + filler)
    if what == "fds":
        n = draw(st.integers(LIMITS.max_handles - 1, LIMITS.max_handles + 4))
        body = [NewFd("eventfd") for _ in range(n)]
        return datagram(Kind.REQUEST, [body], method=3, request_id=draw(u32))
    return Datagram(b"")


# mostly calls, so that sessions get past their first message
fuzzed = weighted(
    calls(),
    answers(),
    controls(),
    generic(),
    header_and_msgpack_body(),
    header_and_random_body(),
    arbitrary_bytes(),
    oddities(),
    usual=8,
)


@dataclass(frozen=True)
class Session:
    """One receiver, fed `messages` (after a valid HELLO, mostly)."""

    messages: tuple[Datagram, ...]
    burst: bool = False  # all at once, not one at a time
    server_pool: bool = False  # the receiver shares a BufferPool (RELEASE means something)
    client_pool: bool = False  # the fuzzer shares one first (pool slots can be named)
    calls_out: bool = False  # the receiver calls Remote.fetch and Remote.watch first
    hello: bool = True  # False: the messages come before any HELLO


sessions = st.builds(
    Session,
    st.lists(fuzzed, min_size=1, max_size=6).map(tuple),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    weighted(st.just(True), st.just(False), usual=5),
)


# -- the receiver harness --------------------------------------------------------------------


def fds_of(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", data[:usable]))
    return fds


class Receiver:
    """One event loop for many sessions; each session gets a new socketpair, Channel and
    Endpoint, and must leave the fds as it found them."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda loop, context: self.loop_errors.append(context))

    def close(self) -> None:
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def run(self, session: Session) -> None:
        baseline = open_fds()
        self.loop_errors.clear()
        try:
            with time_limit(SESSION_SECONDS * 2):  # the loop itself stuck: wait_for cannot help
                self.loop.run_until_complete(
                    asyncio.wait_for(self.session(session), SESSION_SECONDS * 1.5)
                )
            self.check_loop()
        except BaseException:
            with contextlib.suppress(AssertionError):
                close_leaked(baseline)
            raise
        close_leaked(baseline)

    def check_loop(self) -> None:
        errors = [f"{c.get('message')}: {c.get('exception')!r}" for c in self.loop_errors]
        assert not errors, f"exceptions reached the event loop: {errors}"

    async def session(self, s: Session) -> None:
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + SESSION_SECONDS
        self.outer = set(asyncio.all_tasks())  # this one and wait_for's: not the receiver's
        self.peer, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.peer.setblocking(False)
        self.channel = channel = Channel(server, name="receiver")
        self.impl = TargetImpl()
        self.callers: list[asyncio.Task[None]] = []
        self.answers_seen: list[str] = []
        self.heard: list[tuple[int, int]] = []  # (kind, request id) of what it sent
        endpoint = serve(channel, self.impl)
        try:
            if s.hello:
                hello = [[Remote.name, Remote.version, Remote.schema]]
                await self.send(datagram(Kind.HELLO, hello))
                await asyncio.wait_for(endpoint.connect(), SESSION_SECONDS)
            if s.server_pool:
                channel.share_pool(POOL_SLOTS, 32 * 1024)
            if s.calls_out and s.hello:
                remote = endpoint.proxy(Remote)
                self.callers += [
                    loop.create_task(self.fetch(remote)),  # request 1
                    loop.create_task(self.watch(remote)),  # request 2
                ]
            if s.client_pool:
                await self.send(pool_message(contents=os.urandom(64)))
            await self.settle()
            self.check(eof=False)
            for dg in s.messages:
                sent = await self.send(dg)
                if not s.burst:
                    await self.settle()
                    self.check(eof=dg.empty)
                if channel.closed or not sent:
                    break
            await self.settle()
            self.check(eof=any(dg.empty for dg in s.messages))
            closed = channel.closed
            # what happened, for --hypothesis-show-statistics
            if currently_in_test_context():
                event(re.sub(r"\d+", "N", closed.reason)[:60] if closed else "stayed open")
        finally:
            self.peer.close()
            channel.close()
            stuck = set()
            if self.callers:  # a closed channel must fail every call still waiting
                _, stuck = await asyncio.wait(self.callers, timeout=1.0)
                for task in stuck:
                    task.cancel()
            for _ in range(3):  # the cancelled serving tasks finish
                await asyncio.sleep(0)
        assert not stuck, f"calls of the receiver still waiting after it closed: {stuck}"
        violations = self.impl.violations
        assert not violations, f"mistyped arguments reached the implementation: {violations}"
        assert not self.answers_seen, f"mistyped answers reached the caller: {self.answers_seen}"

    async def fetch(self, remote: Remote) -> None:
        try:
            fd = await remote.fetch(7)
        except FosError:
            return
        if not conforms(fd, Memfd | None):
            self.answers_seen.append(f"fetch() -> {fd!r:.200}")
        for h in handles_in(fd):
            h.close()

    async def watch(self, remote: Remote) -> None:
        with contextlib.suppress(FosError):
            async for item in remote.watch():
                if not conforms(item, EventFd):
                    self.answers_seen.append(f"watch() -> {item!r:.200}")
                for h in handles_in(item):
                    h.close()

    def check(self, *, eof: bool) -> None:
        """After an input: no exception in the loop, and the channel open or closed as a bad
        message with a reason. An empty datagram reads like the peer's end of the socket
        (SOCK_SEQPACKET has no way to tell them apart), so after one (`eof`) the channel may
        also be closed as "the peer closed the channel", not as a bad message."""
        self.check_loop()
        closed = self.channel.closed
        if closed is None:
            return
        assert isinstance(closed.reason, str) and closed.reason
        if eof and not closed.bad:
            assert closed.reason == "the peer closed the channel", closed.reason
        else:
            assert closed.bad, f"closed, not as a bad message: {closed.reason}"

    async def send(self, dg: Datagram) -> bool:
        """Send one datagram with its fds (our copies are closed after); False once the
        receiver is gone."""
        fds = [make_fd(kind, data) for kind, data in dg.fds]
        try:
            while True:
                try:
                    if fds:
                        socket.send_fds(self.peer, [dg.data], fds)
                    else:
                        self.peer.send(dg.data)
                    return True
                except BlockingIOError:  # the receiver is behind: let it read
                    self.tick()
                    await asyncio.sleep(0)
                except OSError:  # EPIPE, ECONNRESET: it closed the channel
                    return False
        finally:
            for fd in fds:
                os.close(fd)

    def drain(self) -> bool:
        """Read (and drop, closing their fds) what the receiver sent; True if anything."""
        got = False
        while True:
            try:
                data, anc, _, _ = self.peer.recvmsg(1 << 17, socket.CMSG_SPACE(64 * 4))
            except OSError:  # BlockingIOError: nothing more; others: gone
                return got
            for fd in fds_of(anc):
                os.close(fd)
            if not data and not anc:
                return got
            if len(data) >= HEADER.size:
                kind, *_, rid, _ = HEADER.unpack_from(data)
                self.heard.append((kind, rid))
            got = True

    def tick(self) -> None:
        if asyncio.get_running_loop().time() > self.deadline:
            raise Hang(f"the receiver made no progress in {SESSION_SECONDS:g} s")

    async def settle(self) -> None:
        """Run the loop until the receiver has read everything sent, its serving tasks are
        done and it has nothing more to say."""
        quiet = 0
        while quiet < 3:
            self.tick()
            await asyncio.sleep(0)
            busy = self.drain()
            ours = self.outer.union(self.callers)
            busy |= any(t not in ours and not t.done() for t in asyncio.all_tasks())
            if not self.channel.closed:
                sock = self.channel.sock
                busy |= bool(select.select([sock], [], [], 0)[0])
            quiet = 0 if busy else quiet + 1


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Each bad message logs a warning: thousands of them are not worth capturing."""
    logger = logging.getLogger("fos_host.ipc")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        with quiet_logs():
            yield r
    finally:
        r.close()


def receiver_fuzz(n: int) -> None:
    with receiver() as r:

        @settings(max_examples=n, **COMMON)
        @given(sessions)
        def fuzz(session: Session) -> None:
            r.run(session)

        fuzz()


def test_receiver_fuzz() -> None:
    receiver_fuzz(600)


@pytest.mark.slow
def test_receiver_fuzz_slow() -> None:
    receiver_fuzz(20_000)


# -- what the fuzzers found, pinned -------------------------------------------------------

DEPTH = 1000  # msgpack accepts 1024 levels; repr() of 1000 overflows Python's stack

FOUND = {  # each broke the receiver when found (the comment says how); now regressions
    # Channel._control: BadMessage(f"RELEASE of {msg.body!r}") -> RecursionError
    "release-of-a-deep-body": Session((datagram(Kind.RELEASE, Deep(DEPTH)),)),
    # interface enumeration(): BadMessage(f"{where}: {v!r} is not a Color") -> RecursionError
    "enum-given-a-deep-list": Session(
        (datagram(Kind.REQUEST, [Deep(DEPTH)], method=7, request_id=1),)
    ),
    # Channel._control: BufferPool.release raised ShmError for a slot not in use
    "release-of-a-free-slot": Session((datagram(Kind.RELEASE, [1]),), server_pool=True),
    # msgpack's strict_map_key lets bytes keys through; dict[str, T] did not check keys
    "bytes-key-for-dict-str": Session(
        (datagram(Kind.REQUEST, [Pairs(((b"k", 1),))], method=4, request_id=1),)
    ),
    # Endpoint._on_answer popped the call before _error() rejected the body: the caller
    # waited for ever (not even its timeout fired)
    "error-with-a-malformed-body": Session(
        (datagram(Kind.ERROR, None, method=0, request_id=1),), calls_out=True
    ),
    # Endpoint._on_answer: END ignored its body, and the handles in it were never closed
    "end-carrying-a-handle": Session(
        (datagram(Kind.END, [NewFd("eventfd")], method=1, request_id=2),), calls_out=True
    ),
}
SOUND = {  # well-formed sessions: must pass, and show that the harness serves real calls
    "every-method": Session(
        (
            datagram(Kind.REQUEST, [1, 2], method=0, request_id=1),
            datagram(Kind.REQUEST, ["x"], method=1, request_id=2),
            datagram(Kind.REQUEST, [NewFd("sealed", EXT_SEALED, b"blob")], method=2, request_id=3),
            datagram(Kind.REQUEST, [[1, 2, 3]], method=3, request_id=4),
            datagram(Kind.REQUEST, [{"a": 1}], method=4, request_id=5),
            datagram(Kind.REQUEST, [[1, 2.5, None], 1.0], method=5, request_id=6),
            datagram(Kind.REQUEST, [None], method=6, request_id=7),
            datagram(Kind.REQUEST, ["blue"], method=7, request_id=8),
            datagram(Kind.REQUEST, [NewFd("memfd", EXT_HANDLE, b"abc")], method=8, request_id=9),
            datagram(Kind.REQUEST, [3], method=9, request_id=10),
            datagram(Kind.ONEWAY, ["hi"], method=10),
            datagram(
                Kind.REQUEST,
                [["b", NewFd("memfd")], [NewFd("eventfd"), NewFd("eventfd")]],
                method=11,
                request_id=11,
            ),
            datagram(Kind.REQUEST, [True], method=12, request_id=12),
            datagram(Kind.REQUEST, ["k"], method=13, request_id=13),
            datagram(Kind.REQUEST, [b"xyz"], method=14, request_id=14),
        ),
        server_pool=True,
        calls_out=True,
    ),
    "pool-slot-as-bytes": Session(
        (
            datagram(Kind.REQUEST, [Ext(EXT_POOL, POOL_REF.pack(1, 100))], method=2, request_id=1),
            datagram(Kind.REQUEST, [Ext(EXT_POOL, POOL_REF.pack(1, 9))], method=14, request_id=2),
            datagram(Kind.REQUEST, [Ext(EXT_POOL, POOL_REF.pack(1, 0))], method=14, request_id=3),
        ),
        client_pool=True,
    ),
    "answers-to-the-receiver": Session(
        (
            datagram(Kind.EVENT, [NewFd("eventfd")], method=1, request_id=2),
            datagram(Kind.RESPONSE, [NewFd("memfd")], method=0, request_id=1),
            datagram(Kind.END, [], method=1, request_id=2),
        ),
        calls_out=True,
    ),
}


@pytest.mark.parametrize("name", [*SOUND, *FOUND])
def test_receiver_pinned(name: str) -> None:
    """The sound sessions, and each input the fuzzers found a bug with."""
    session = SOUND.get(name) or FOUND[name]
    with receiver() as r:
        r.run(session)
    if name in SOUND:
        asked = {
            rid
            for dg in session.messages
            for kind, *_, rid, _ in [HEADER.unpack_from(dg.data)]
            if kind == Kind.REQUEST
        }
        done = (Kind.RESPONSE, Kind.ERROR, Kind.END)
        answered = {rid for kind, rid in r.heard if kind in done}
        assert asked <= answered, f"no answer to requests {sorted(asked - answered)}"
