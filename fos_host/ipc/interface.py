"""Typed interfaces over a channel — our Mojo.

An interface is a class whose methods are typed stubs marked with `@method(ordinal)`:

    class Storage(Interface, version=2):
        errors = (QuotaExceeded,)

        @method(0)
        async def get(self, key: str) -> bytes | None: ...

        @method(1, oneway=True)
        def log(self, line: str) -> None: ...

        @method(2, min_version=2)
        async def watch(self, prefix: str) -> AsyncIterator[str]: ...   # a stream of events

Ordinals are the wire identity of a method (stable across renames); `version` and each
method's `min_version` let an older and a newer peer talk; a schema hash of every ordinal,
name, type and flag is exchanged at connect, so two peers of the same version but different
definitions refuse to talk instead of misreading each other.

An implementation is any object with those methods (plain functions are served at once,
coroutines in a task of their own; a stream is an async generator); subclassing the
interface is not needed. An `Endpoint` joins a channel: it offers implementations to the
peer (`Endpoint(channel, {Storage: StorageImpl()})`; every incoming call is checked —
interface, method, version, argument count and every argument's type — before the
implementation sees it) and gives proxies to the peer's (`endpoint.proxy(Storage)`, typed
as a `Storage`: `await proxy.get("k")`). Interface modules are declarations only: mypy's
empty-body check is off for `fos_host.interfaces` (pyproject.toml).

Supported types: None, bool, int, float, str, bytes, list[T], dict[str, T], T | None,
enums, dataclasses (sent as a list of their fields), the handle types of `wire` (fds), and
`Shared`: a byte string the receiver sees in the sender's pool without a copy (the sender
passes bytes; big ones are copied once, into a slot).
A wrong type, an unknown method or interface, a reply to no request, more requests in flight
than allowed — each closes the channel as a bad message (`on_bad_message` gets the reason;
the host kills a renderer for it). The peer dying fails every pending call at once with
`ChannelClosed`; a call may also time out (`CallTimeout`). An implementation's exception
of a type the interface lists in `errors` arrives as that type; any other as `RemoteError`
without the peer's details.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import dataclasses
import enum
import hashlib
import inspect
import itertools
import logging
import reprlib
import types
import typing
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from fos_host.errors import FosError
from fos_host.ipc.channel import Channel, ChannelClosed
from fos_host.ipc.wire import (
    HANDLE_TYPES,
    BadMessage,
    Handle,
    Kind,
    Message,
    PoolRef,
    Shared,
    close_handles_in,
)

log = logging.getLogger(__name__)

I = TypeVar("I", bound="Interface")  # noqa: E741
F = TypeVar("F", bound=Callable[..., Any])
MAX_INTERFACES = 64
CONNECT_TIMEOUT = 10.0
CALL_TIMEOUT = 30.0
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 40, 40
MAX_EXPIRED = 4096  # request ids given up on that are remembered (their answers are dropped)


class RemoteError(FosError):
    """The implementation on the other side failed. Interfaces list the subclasses they
    may raise in `errors`; those arrive as themselves, anything else as RemoteError."""


class CallTimeout(FosError):
    """No answer within the call's timeout."""


class NotSupported(FosError):
    """The peer's version of the interface is too old for this method."""


class SchemaMismatch(FosError):
    """The peer's interface has the same name and version but a different definition."""


# -- types: checking what arrives, converting what leaves ------------------------------------

Check = Callable[[Any, str, Channel], Any]  # (value, where, channel) -> the typed value


def _short(value: Any) -> str:
    """A repr for a reason, whatever the peer sent (deep, long): bounded in depth and size."""
    return _REPR.repr(value)


def _bad(where: str, want: str, value: Any) -> BadMessage:
    return BadMessage(f"{where}: expected {want}, got {type(value).__name__}")


def _type_name(tp: Any) -> str:
    """A stable spelling of a type, for error messages and the schema hash."""
    if tp is None or tp is type(None):
        return "None"
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        fields = ",".join(f"{f.name}:{_type_name(f.type)}" for f in _fields(tp))
        return f"{tp.__name__}{{{fields}}}"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return f"{tp.__name__}({','.join(repr(m.value) for m in tp)})"
    origin = typing.get_origin(tp)
    if origin is not None:
        args = ",".join(_type_name(a) for a in typing.get_args(tp))
        name = "Union" if origin in (typing.Union, types.UnionType) else origin.__name__
        return f"{name}[{args}]"
    return str(getattr(tp, "__name__", tp))


def _fields(tp: type) -> list[dataclasses.Field[Any]]:
    hints = typing.get_type_hints(tp)
    out = []
    for f in dataclasses.fields(tp):
        f.type = hints[f.name]
        out.append(f)
    return out


def _checker(tp: Any) -> Check:
    """A function that checks an arriving value against `tp` and returns it typed."""
    if tp is None or tp is type(None):

        def none(v: Any, where: str, ch: Channel) -> Any:
            if v is not None:
                raise _bad(where, "None", v)
            return v

        return none
    if tp is bool:

        def boolean(v: Any, where: str, ch: Channel) -> Any:
            if not isinstance(v, bool):
                raise _bad(where, "bool", v)
            return v

        return boolean
    if tp is float:

        def real(v: Any, where: str, ch: Channel) -> Any:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise _bad(where, "float", v)
            return float(v)

        return real
    if tp is int or tp is str:

        def scalar(v: Any, where: str, ch: Channel) -> Any:
            if not isinstance(v, tp) or isinstance(v, bool):
                raise _bad(where, tp.__name__, v)
            return v

        return scalar
    if tp is bytes:

        def byte_string(v: Any, where: str, ch: Channel) -> Any:
            if isinstance(v, PoolRef):
                return ch.pool_bytes(v)
            if not isinstance(v, bytes):
                raise _bad(where, "bytes", v)
            return v

        return byte_string
    if tp is Shared:

        def shared(v: Any, where: str, ch: Channel) -> Any:
            if isinstance(v, PoolRef):
                return ch.pool_view(v)
            if not isinstance(v, bytes):
                raise _bad(where, "bytes", v)
            return Shared(memoryview(v))

        return shared
    if isinstance(tp, type) and issubclass(tp, Handle):
        if tp is Handle:
            raise FosError(f"name the kind of handle ({', '.join(HANDLE_TYPES)}), not Handle")

        def handle(v: Any, where: str, ch: Channel) -> Any:
            if not isinstance(v, tp):
                raise _bad(where, tp.__name__, v)
            return v

        return handle
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        members = {m.value: m for m in tp}

        def enumeration(v: Any, where: str, ch: Channel) -> Any:
            try:
                return members[v]
            except (KeyError, TypeError):
                raise BadMessage(f"{where}: {_short(v)} is not a {tp.__name__}") from None

        return enumeration
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        fields = [(f.name, _checker(f.type)) for f in _fields(tp)]

        def record(v: Any, where: str, ch: Channel) -> Any:
            if not isinstance(v, list) or len(v) != len(fields):
                raise _bad(where, f"{tp.__name__} ({len(fields)} fields)", v)
            return tp(**{n: c(x, f"{where}.{n}", ch) for (n, c), x in zip(fields, v, strict=True)})

        return record
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        item = _checker(args[0])

        def sequence(v: Any, where: str, ch: Channel) -> Any:
            if not isinstance(v, list):
                raise _bad(where, _type_name(tp), v)
            return [item(x, f"{where}[{i}]", ch) for i, x in enumerate(v)]

        return sequence
    if origin is dict:
        if args[0] is not str:
            raise FosError(f"{_type_name(tp)}: map keys must be str")
        value = _checker(args[1])

        def mapping(v: Any, where: str, ch: Channel) -> Any:
            if not isinstance(v, dict):
                raise _bad(where, _type_name(tp), v)
            for k in v:
                if not isinstance(k, str):
                    raise BadMessage(f"{where}: a key that is {type(k).__name__}, not str")
            return {k: value(x, f"{where}[{_short(k)}]", ch) for k, x in v.items()}

        return mapping
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) != 1 or len(args) != 2:
            raise FosError(f"{_type_name(tp)}: only `T | None` unions are supported")
        inner = _checker(options[0])

        def optional(v: Any, where: str, ch: Channel) -> Any:
            return None if v is None else inner(v, where, ch)

        return optional
    raise FosError(f"type {_type_name(tp)} cannot cross a channel")


# -- interfaces ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    name: str
    ordinal: int
    params: tuple[tuple[str, Any], ...]
    returns: Any  # the item type for a stream
    min_version: int
    oneway: bool
    stream: bool
    signature: inspect.Signature
    checks: tuple[Check, ...]
    check_result: Check
    labels: tuple[str, ...]  # "Interface.method(param)", for bad-message reasons

    def describe(self) -> str:
        params = ", ".join(f"{n}: {_type_name(t)}" for n, t in self.params)
        flags = "oneway " if self.oneway else "stream " if self.stream else ""
        returns = _type_name(self.returns)
        return f"{self.ordinal} {flags}{self.name}({params}) -> {returns} since {self.min_version}"


def method(ordinal: int, *, min_version: int = 1, oneway: bool = False) -> Callable[[F], F]:
    """Mark an interface method: its wire ordinal, the interface version that added it,
    and whether it is one-way (no result, no wait). A method annotated to return
    `AsyncIterator[T]` is a stream of T."""

    def mark(fn: F) -> F:
        fn.__fos_method__ = (ordinal, min_version, oneway)  # type: ignore[attr-defined]
        return fn

    return mark


def _spec(
    owner: str, name: str, fn: Callable[..., Any], ordinal: int, min_version: int, oneway: bool
) -> MethodSpec:
    where = fn.__qualname__
    hints = typing.get_type_hints(fn)
    sig = inspect.signature(fn)
    params = []
    for p in list(sig.parameters.values())[1:]:  # without self
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) or p.default is not p.empty:
            raise FosError(f"{where}: parameter {p.name} must be plain and required")
        if p.name not in hints:
            raise FosError(f"{where}: parameter {p.name} has no type")
        params.append((p.name, hints[p.name]))
    if "return" not in hints:
        raise FosError(f"{where}: no return type")
    returns = hints["return"]
    stream = typing.get_origin(returns) in (collections.abc.AsyncIterator, AsyncIterator)
    if stream:
        returns = typing.get_args(returns)[0]
    if oneway and (stream or returns not in (None, type(None))):
        raise FosError(f"{where}: a one-way method returns None")
    if not 0 <= ordinal < 0x10000 or min_version < 1:
        raise FosError(f"{where}: ordinal must be 0..65535 and min_version >= 1")
    return MethodSpec(
        name, ordinal, tuple(params), returns, min_version, oneway, stream, sig,
        tuple(_checker(t) for _, t in params), _checker(returns),
        tuple(f"{owner}.{name}({p})" for p, _ in params),
    )  # fmt: skip


class Interface:
    """Base class of interfaces, which mark their methods with @method. A subclass without
    marked methods (a proxy, or an implementation that chooses to subclass) inherits the
    interface it derives from."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    errors: ClassVar[tuple[type[RemoteError], ...]] = ()
    methods: ClassVar[dict[int, MethodSpec]] = {}
    schema: ClassVar[str] = ""
    interface: ClassVar[type[Interface]]

    def __init_subclass__(cls, *, version: int | None = None, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        marked = {k: v for k, v in cls.__dict__.items() if hasattr(v, "__fos_method__")}
        if not marked:  # an implementation (or a proxy): the interface is inherited
            if version is not None:
                raise FosError(f"{cls.__qualname__}: only an interface has a version")
            return
        if Interface not in cls.__bases__:
            raise FosError(f"{cls.__qualname__}: an interface derives from Interface only")
        cls.name = cls.__dict__.get("name") or cls.__qualname__
        cls.version = version or 1
        cls.interface = cls
        specs: dict[int, MethodSpec] = {}
        for attr, fn in marked.items():
            spec = _spec(cls.name, attr, fn, *fn.__fos_method__)
            if spec.ordinal in specs:
                raise FosError(f"{cls.name}: ordinal {spec.ordinal} used twice")
            if spec.min_version > cls.version:
                raise FosError(f"{cls.name}.{attr}: min_version above the interface's version")
            specs[spec.ordinal] = spec
        cls.methods = specs
        text = "\n".join(
            [f"{cls.name} {cls.version}", *(specs[o].describe() for o in sorted(specs))]
            + [f"error {e.__name__}" for e in cls.errors]
        )
        cls.schema = hashlib.sha256(text.encode()).hexdigest()[:16]


# -- the endpoint ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _PeerInterface:
    id: int
    name: str
    version: int
    schema: str


class _Stream:
    """The proxy side of a stream: items as they come."""

    def __init__(self, spec: MethodSpec) -> None:
        self.spec = spec
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> Any:
        what, value = await self.queue.get()
        if what == "item":
            return value
        if what == "end":
            raise StopAsyncIteration
        raise value


class Endpoint:
    """Interfaces over one channel. Offers `implements` ({interface: implementation}) to the
    peer and gives proxies to
    what the peer offers; `await connect()` exchanges the HELLOs first.

    `on_bad_message(reason)` is called once if the peer breaks the protocol (the channel is
    then closed); `closed` is set when the channel is gone, for any reason.
    """

    def __init__(
        self,
        channel: Channel,
        implements: Mapping[type[Interface], object] | None = None,
        *,
        call_timeout: float = CALL_TIMEOUT,
        on_bad_message: Callable[[str], None] | None = None,
    ) -> None:
        offered = list((implements or {}).items())
        if len(offered) > MAX_INTERFACES:
            raise FosError(f"at most {MAX_INTERFACES} interfaces on one channel")
        for iface, impl in offered:
            for spec in iface.methods.values():
                if not callable(getattr(impl, spec.name, None)):
                    raise FosError(f"{impl!r} does not implement {iface.name}.{spec.name}")
        self.channel = channel
        self.implements = offered
        self.call_timeout = call_timeout
        self.on_bad_message = on_bad_message
        self.peer: dict[str, _PeerInterface] = {}
        self._hello: asyncio.Future[None] = channel.loop.create_future()
        self._closed: asyncio.Future[None] = channel.loop.create_future()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._expired: dict[int, None] = {}  # calls given up on, whose answers may still come
        self._serving: dict[int, asyncio.Task[None]] = {}  # the peer's requests in flight
        self._oneway_tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_every = min(0.25, max(0.005, call_timeout / 10))
        self.closed: ChannelClosed | None = None
        channel.on_message = self._on_message
        channel.on_close = self._on_close

    async def connect(self, timeout: float = CONNECT_TIMEOUT) -> Endpoint:
        hello = [[iface.name, iface.version, iface.schema] for iface, _ in self.implements]
        self.channel.send(Kind.HELLO, 0, 0, 0, hello)
        try:
            await asyncio.wait_for(asyncio.shield(self._hello), timeout)
        except TimeoutError:
            self.channel.close(f"no HELLO from the peer in {timeout:g} s")
            raise CallTimeout(
                f"{self.channel.name}: no HELLO from the peer in {timeout:g} s"
            ) from None
        return self

    def close(self) -> None:
        self.channel.close()

    async def wait_closed(self) -> ChannelClosed:
        """Wait until the channel is closed, for any reason; returns why."""
        if self.closed is None:
            await asyncio.shield(self._closed)
        assert self.closed is not None
        return self.closed

    def proxy(self, iface: type[I]) -> I:
        """A proxy to the peer's implementation of `iface`, typed as `iface`."""
        if self.closed:
            raise self.closed
        if not self._hello.done():
            raise FosError("connect() first: the peer's interfaces are not known yet")
        iface = iface.interface  # type: ignore[assignment]
        peer = self.peer.get(iface.name)
        if peer is None:
            offered = ", ".join(self.peer) or "nothing"
            raise FosError(f"the peer does not implement {iface.name} (it offers {offered})")
        if peer.version == iface.version and peer.schema != iface.schema:
            raise SchemaMismatch(
                f"{iface.name} version {iface.version}: the peer's definition differs "
                f"(schema {peer.schema}, ours {iface.schema}); bump the version on changes"
            )
        return typing.cast(I, _proxy_class(iface)(self, peer))

    # -- calls out -------------------------------------------------------------------------

    def _begin(self, peer: _PeerInterface, spec: MethodSpec, args: tuple[Any, ...]) -> int:
        """Check a call before it goes out; returns a new request id."""
        if self.closed:
            raise self.closed
        if spec.min_version > peer.version:
            raise NotSupported(
                f"{peer.name}.{spec.name} needs version {spec.min_version}, the peer has "
                f"{peer.version}"
            )
        if len(args) != len(spec.params):
            raise TypeError(f"{spec.name}() takes {len(spec.params)} arguments, {len(args)} given")
        return next(self._ids) & 0xFFFFFFFF or next(self._ids)

    async def _call(self, proxy: _Proxy, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        peer = proxy._peer
        rid = self._begin(peer, spec, args)
        loop = self.channel.loop
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending[rid] = _Pending(proxy._iface, spec, fut, loop.time() + self.call_timeout)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._sweep_every, self._sweep)
        try:
            self.channel.send(Kind.REQUEST, peer.id, spec.ordinal, rid, args)
            return await fut
        finally:
            if self._pending.pop(rid, None) is not None:  # timed out or cancelled
                self._expired[rid] = None
                if len(self._expired) > MAX_EXPIRED:
                    del self._expired[next(iter(self._expired))]

    def _sweep(self) -> None:
        """Fail the calls past their deadline (one timer for all: a timer per call costs
        more than the call's own work)."""
        self._sweeper = None
        now = self.channel.loop.time()
        for entry in self._pending.values():
            fut = entry.waiter
            if isinstance(fut, asyncio.Future) and now >= entry.deadline and not fut.done():
                name = f"{entry.iface.name}.{entry.spec.name}"
                fut.set_exception(CallTimeout(f"{name}: no answer in {self.call_timeout:g} s"))
        if self._pending and not self.closed:
            self._sweeper = self.channel.loop.call_later(self._sweep_every, self._sweep)

    def _oneway(self, proxy: _Proxy, spec: MethodSpec, args: tuple[Any, ...]) -> None:
        self._begin(proxy._peer, spec, args)
        self.channel.send(Kind.ONEWAY, proxy._peer.id, spec.ordinal, 0, args)

    def _stream(self, proxy: _Proxy, spec: MethodSpec, args: tuple[Any, ...]) -> _Stream:
        rid = self._begin(proxy._peer, spec, args)
        stream = _Stream(spec)
        self._pending[rid] = _Pending(proxy._iface, spec, stream, float("inf"))
        self.channel.send(Kind.REQUEST, proxy._peer.id, spec.ordinal, rid, args)
        return stream

    # -- messages in -----------------------------------------------------------------------

    def _on_message(self, msg: Message) -> None:
        try:
            if msg.kind is Kind.HELLO:
                self._on_hello(msg)
            elif not self._hello.done():
                raise BadMessage(f"a {msg.kind.name} before HELLO")
            elif msg.kind in (Kind.REQUEST, Kind.ONEWAY):
                self._on_request(msg)
            else:
                self._on_answer(msg)
        except BadMessage:
            msg.close_handles()
            raise

    def _on_hello(self, msg: Message) -> None:
        if self._hello.done():
            raise BadMessage("a second HELLO")
        body = msg.body
        if not isinstance(body, list) or len(body) > MAX_INTERFACES:
            raise BadMessage("HELLO is not a list of at most 64 interfaces")
        for i, entry in enumerate(body):
            match entry:
                case [str(name), int(version), str(schema)] if version >= 1:
                    self.peer[name] = _PeerInterface(i, name, version, schema)
                case _:
                    raise BadMessage(f"HELLO entry {i} is not [name, version, schema]")
        self._hello.set_result(None)

    def _on_request(self, msg: Message) -> None:
        if msg.interface >= len(self.implements):
            raise BadMessage(f"a call to interface {msg.interface}, which this side lacks")
        iface, impl = self.implements[msg.interface]
        spec = iface.methods.get(msg.method)
        if spec is None:
            raise BadMessage(f"unknown method {msg.method} of {iface.name}")
        if spec.oneway != (msg.kind is Kind.ONEWAY):
            raise BadMessage(f"{iface.name}.{spec.name} called as {msg.kind.name}")
        if not isinstance(msg.body, list) or len(msg.body) != len(spec.params):
            raise BadMessage(f"{iface.name}.{spec.name}: expected {len(spec.params)} arguments")
        ch = self.channel
        args = [
            c(v, label, ch) for c, v, label in zip(spec.checks, msg.body, spec.labels, strict=True)
        ]
        rid = msg.request_id
        if not spec.oneway:
            if rid in self._serving:
                raise BadMessage(f"request id {rid} is already in flight")
            if len(self._serving) >= ch.limits.max_outstanding:
                raise BadMessage(f"more than {ch.limits.max_outstanding} requests in flight")
        try:  # a plain function is served here and now, a coroutine in a task of its own
            result = getattr(impl, spec.name)(*args)
        except Exception as e:
            self._failed(iface, spec, rid, e)
            return
        if spec.stream:
            self._track(rid, self._serve_stream(iface, spec, rid, result))
        elif inspect.isawaitable(result):
            self._track(rid, self._finish(iface, spec, rid, result))
        elif not spec.oneway:
            self._reply(Kind.RESPONSE, spec, rid, [result])

    def _track(self, rid: int, work: collections.abc.Coroutine[Any, Any, None]) -> None:
        task = self.channel.loop.create_task(work)
        if rid:
            self._serving[rid] = task
            task.add_done_callback(lambda _: self._serving.pop(rid, None))
        else:  # one-way
            self._oneway_tasks.add(task)
            task.add_done_callback(self._oneway_tasks.discard)

    async def _finish(
        self, iface: type[Interface], spec: MethodSpec, rid: int, result: Any
    ) -> None:
        try:
            value = await result
        except Exception as e:
            self._failed(iface, spec, rid, e)
            return
        if not spec.oneway:
            self._reply(Kind.RESPONSE, spec, rid, [value])

    async def _serve_stream(
        self, iface: type[Interface], spec: MethodSpec, rid: int, items: AsyncIterator[Any]
    ) -> None:
        try:
            async for item in items:
                if not self._reply(Kind.EVENT, spec, rid, [item]):
                    return
                await self.channel.drain()
        except Exception as e:
            self._failed(iface, spec, rid, e)
            return
        self._reply(Kind.END, spec, rid, [])

    def _reply(self, kind: Kind, spec: MethodSpec, rid: int, body: list[Any]) -> bool:
        """Send an answer; False if it could not go (the channel is closed, or the value
        cannot travel, in which case the caller gets an ERROR instead)."""
        if self.closed:
            close_handles_in(body)
            return False
        try:
            self.channel.send(kind, 0, spec.ordinal, rid, body)
            return True
        except ChannelClosed:
            return False
        except FosError as e:  # too big, or a type that cannot be sent
            close_handles_in(body)
            log.error("%s: the answer cannot be sent: %s", spec.name, e)
            with contextlib.suppress(ChannelClosed):
                text = f"{spec.name}: the answer cannot be sent: {e}"
                self.channel.send(Kind.ERROR, 0, spec.ordinal, rid, ["RemoteError", text])
            return False

    def _failed(self, iface: type[Interface], spec: MethodSpec, rid: int, e: Exception) -> None:
        """An implementation raised: the caller gets the error if the interface declares
        its type, else a RemoteError without details (which are logged here)."""
        if isinstance(e, iface.errors) and not spec.oneway:
            self._reply(Kind.ERROR, spec, rid, [type(e).__name__, str(e)])
            return
        log.error("%s.%s failed", iface.name, spec.name, exc_info=e)
        if not spec.oneway:
            text = f"{iface.name}.{spec.name} failed on the other side"
            self._reply(Kind.ERROR, spec, rid, ["RemoteError", text])

    def _on_answer(self, msg: Message) -> None:
        rid = msg.request_id
        entry = self._pending.get(rid)
        if entry is None:
            if rid in self._expired:  # the answer to a call given up on
                if msg.kind is not Kind.EVENT:
                    del self._expired[rid]
                msg.close_handles()
                return
            raise BadMessage(f"a {msg.kind.name} for request {rid}, which is not pending")
        spec, waiter = entry.spec, entry.waiter
        if msg.method != spec.ordinal:
            raise BadMessage(f"a {msg.kind.name} for request {rid} names another method")
        where = f"{spec.name}() answer"
        if msg.kind is Kind.ERROR:
            error = _error(entry.iface, spec, msg.body)  # before the call stops pending
            self._pending.pop(rid, None)
            _deliver(waiter, error)
            return
        if isinstance(waiter, _Stream) != (msg.kind in (Kind.EVENT, Kind.END)):
            raise BadMessage(f"a {msg.kind.name} for {spec.name}, which is not a stream")
        if msg.kind is Kind.END:
            if msg.body != []:
                raise BadMessage(f"an END for {spec.name} with a body")
            self._pending.pop(rid, None)
            waiter.queue.put_nowait(("end", None))  # type: ignore[union-attr]
            return
        body = msg.body
        if not isinstance(body, list) or len(body) != 1:
            raise BadMessage(f"{where}: not a one-element list")
        value = spec.check_result(body[0], where, self.channel)
        if isinstance(waiter, _Stream):
            waiter.queue.put_nowait(("item", value))
        else:
            self._pending.pop(rid, None)
            if not waiter.done():
                waiter.set_result(value)

    def _on_close(self, closed: ChannelClosed) -> None:
        self.closed = closed
        self._closed.set_result(None)
        if closed.bad and self.on_bad_message is not None:
            self.on_bad_message(closed.reason)
        if not self._hello.done():
            self._hello.set_exception(closed)
            self._hello.exception()  # retrieved: connect() re-raises it
        for entry in list(self._pending.values()):
            _deliver(entry.waiter, closed)
        self._pending.clear()
        for task in [*self._serving.values(), *self._oneway_tasks]:
            task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


@dataclass
class _Pending:
    iface: type[Interface]
    spec: MethodSpec
    waiter: asyncio.Future[Any] | _Stream
    deadline: float  # loop time; streams have none


def _error(iface: type[Interface], spec: MethodSpec, body: Any) -> Exception:
    """The exception an ERROR message stands for: a type `iface` declares, else RemoteError."""
    match body:
        case [str(name), str(text)]:
            for cls in iface.errors:
                if cls.__name__ == name:
                    return cls(text)
            return RemoteError(text if name == "RemoteError" else f"{name}: {text}")
    raise BadMessage(f"an ERROR for {spec.name} that is not [type, message]")


def _deliver(waiter: asyncio.Future[Any] | _Stream, error: BaseException) -> None:
    if isinstance(waiter, _Stream):
        waiter.queue.put_nowait(("error", error))
    elif not waiter.done():
        waiter.set_exception(error)


# -- proxies ---------------------------------------------------------------------------------

_PROXIES: dict[type[Interface], Callable[[Endpoint, _PeerInterface], Any]] = {}


def _proxy_class(iface: type[Interface]) -> Callable[[Endpoint, _PeerInterface], Any]:
    """A subclass of `iface` whose methods call the peer (made once per interface)."""
    cls = _PROXIES.get(iface)
    if cls is not None:
        return cls

    def make(spec: MethodSpec) -> Callable[..., Any]:
        def bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
            if kwargs:
                return tuple(spec.signature.bind(None, *args, **kwargs).arguments.values())[1:]
            return args

        if spec.oneway:

            def oneway(self: _Proxy, *args: Any, **kwargs: Any) -> None:
                self._ep._oneway(self, spec, bind(args, kwargs))

            return oneway
        if spec.stream:

            def stream(self: _Proxy, *args: Any, **kwargs: Any) -> _Stream:
                return self._ep._stream(self, spec, bind(args, kwargs))

            return stream

        def call(self: _Proxy, *args: Any, **kwargs: Any) -> Any:  # the coroutine of _call
            return self._ep._call(self, spec, bind(args, kwargs))

        return call

    namespace: dict[str, Any] = {s.name: make(s) for s in iface.methods.values()}
    namespace["_iface"] = iface
    cls = types.new_class(
        f"{iface.name}Proxy", (_Proxy, iface), {}, lambda ns: ns.update(namespace)
    )
    _PROXIES[iface] = cls
    return cls


class _Proxy:
    _iface: ClassVar[type[Interface]]

    def __init__(self, ep: Endpoint, peer: _PeerInterface) -> None:
        self._ep = ep
        self._peer = peer

    def __repr__(self) -> str:
        return f"<proxy to the peer's {self._peer.name} v{self._peer.version}>"
