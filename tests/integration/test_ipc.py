"""The IPC layer for real: SEQPACKET socketpairs, fds over SCM_RIGHTS, sealed memfds, a
shared pool, typed interfaces — in one process, across a fork, and across a sandbox boundary
(the probe serving `fos_host.interfaces.probe.Probe` inside a renderer sandbox).

Every test checks that the fds it opened are gone at the end (`no_fd_leak`); attacks on the
receiver come from a raw socket end that writes whatever it likes.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import enum
import fcntl
import hashlib
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack
import pytest
from fdcheck import open_fds, run

from fos_host.interfaces.probe import Probe
from fos_host.ipc.channel import Channel, ChannelClosed
from fos_host.ipc.interface import (
    CallTimeout,
    Endpoint,
    Interface,
    NotSupported,
    RemoteError,
    SchemaMismatch,
    method,
)
from fos_host.ipc.shm import POOL_SEALS, REQUIRED_SEALS, seal_bytes
from fos_host.ipc.wire import (
    EXT_SEALED,
    HEADER,
    BadMessage,
    EventFd,
    Kind,
    Limits,
    Memfd,
    PidFd,
    Shared,
    Socket,
    decode,
)
from fos_host.kernel.libc import mount, unshare
from fos_host.kernel.mounts import MS_PRIVATE, MS_REC
from fos_host.kernel.namespaces import CLONE_NEWNS
from fos_host.sandbox.jail import Jail
from fos_host.sandbox.sandbox import Spawner

T = TypeVar("T")
MiB = 1 << 20


pytestmark = pytest.mark.usefixtures("no_fd_leak")


# -- a test interface ------------------------------------------------------------------------


class Color(enum.Enum):
    RED = 1
    GREEN = 2


@dataclass
class Point:
    x: int
    y: float
    label: str | None


class Missing(RemoteError):
    pass


class Store(Interface, version=2):
    errors = (Missing,)

    @method(0)
    async def echo(self, data: bytes) -> bytes: ...

    @method(1)
    async def move(self, p: Point, by: list[int], tags: dict[str, Color]) -> Point: ...

    @method(2)
    async def get(self, key: str) -> int: ...

    @method(3, oneway=True)
    def note(self, text: str) -> None: ...

    @method(4)
    async def count(self, n: int) -> AsyncIterator[int]: ...

    @method(5)
    async def slow(self, seconds: float) -> int: ...

    @method(6)
    async def memfd_size(self, memfd: Memfd) -> int: ...

    @method(7, min_version=2)
    async def newer(self) -> str: ...

    @method(8)
    async def broken(self) -> int: ...

    @method(9)
    async def digest(self, data: Shared) -> str: ...

    @method(10)
    async def later_memfd(self, seconds: float) -> Memfd: ...


class StoreV1(Interface, version=1):
    """The same interface as an older peer has it (the name must match on the wire)."""

    name = "Store"

    @method(0)
    async def echo(self, data: bytes) -> bytes: ...


class StoreImpl:
    def __init__(self) -> None:
        self.notes: list[str] = []
        self.seen: list[str] = []

    def echo(self, data: bytes) -> bytes:
        return data

    async def move(self, p: Point, by: list[int], tags: dict[str, Color]) -> Point:
        return Point(p.x + sum(by), p.y * 2, f"{p.label}:{','.join(t.name for t in tags.values())}")

    def get(self, key: str) -> int:
        if key != "one":
            raise Missing(f"no key {key!r}")
        return 1

    def note(self, text: str) -> None:
        self.notes.append(text)

    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def slow(self, seconds: float) -> int:
        await asyncio.sleep(seconds)
        return 7

    def memfd_size(self, memfd: Memfd) -> int:
        with memfd:
            return os.fstat(memfd.fd).st_size

    def newer(self) -> str:
        return "v2"

    def broken(self) -> int:
        raise KeyError("the secret internal detail")

    async def later_memfd(self, seconds: float) -> Memfd:
        with contextlib.suppress(asyncio.CancelledError):  # finishes even when cancelled,
            await asyncio.sleep(seconds)  # as work done in a thread would
        return Memfd(os.memfd_create("answer"))

    def digest(self, data: Shared) -> str:
        self.seen.append(type(data.memory.obj).__name__)  # mmap: in the pool, in place
        with data:  # released (the slot goes back) at the end
            return hashlib.sha256(data.memory).hexdigest()


async def connected(
    impl: object | None = None, iface: type[Interface] = Store, **kw: Any
) -> tuple[Endpoint, Endpoint, Any]:
    """A client endpoint, a server endpoint offering `impl` as `iface`, and a proxy."""
    a, b = Channel.pair(names=("client", "server"))
    server = Endpoint(b, {iface: impl or StoreImpl()}, **kw)
    client = Endpoint(a, **kw)
    await asyncio.gather(server.connect(), client.connect())
    return client, server, client.proxy(iface)


# -- round trips -----------------------------------------------------------------------------


def test_round_trips_of_every_supported_type() -> None:
    async def go() -> None:
        client, server, store = await connected()
        assert await store.echo(b"hi") == b"hi"
        moved = await store.move(Point(1, 1.5, "p"), [2, 3], {"a": Color.RED, "b": Color.GREEN})
        assert moved == Point(6, 3.0, "p:RED,GREEN")
        assert await store.move(Point(0, 0.0, None), [], {}) == Point(0, 0.0, "None:")
        store.note("one-way")
        assert [i async for i in store.count(4)] == [0, 1, 2, 3]
        assert server.implements[0][1].notes == ["one-way"]  # type: ignore[attr-defined]
        client.close()
        assert (await server.wait_closed()).reason == "the peer closed the channel"

    run(go())


def test_big_byte_strings_go_through_sealed_memfds_and_a_pool() -> None:
    async def go() -> None:
        client, server, store = await connected()
        big = os.urandom(3 * MiB)
        assert await store.echo(big) == big  # sealed memfds both ways (no pool yet)
        client.channel.share_pool(2, 4 * MiB)
        server.channel.share_pool(2, 4 * MiB)
        for _ in range(5):  # more transfers than slots: each slot comes back (RELEASE)
            assert await store.echo(big) == big
        assert client.channel.pool is not None
        assert sorted(client.channel.pool.acquire() for _ in range(2)) == [0, 1]
        client.close()
        await server.wait_closed()

    run(go())


def test_shared_bytes_are_read_in_place_and_their_slot_comes_back() -> None:
    async def go() -> None:
        client, server, store = await connected()
        small, big = b"tiny", os.urandom(8 * MiB)
        assert await store.digest(small) == hashlib.sha256(small).hexdigest()  # inline
        assert await store.digest(big) == hashlib.sha256(big).hexdigest()  # sealed memfd
        client.channel.share_pool(1, 8 * MiB)
        for _ in range(3):  # one slot, three transfers: it is released each time
            assert await store.digest(big) == hashlib.sha256(big).hexdigest()
        assert client.channel.pool is not None and client.channel.pool.acquire() == 0
        assert server.implements[0][1].seen == ["bytes", "bytes", "mmap", "mmap", "mmap"]  # type: ignore[attr-defined]
        client.close()
        await server.wait_closed()

    run(go())


def test_an_answer_with_a_handle_to_a_caller_that_left_is_closed() -> None:
    async def go() -> None:
        client, server, store = await connected()
        call = asyncio.ensure_future(store.later_memfd(0.1))
        await asyncio.sleep(0.02)
        client.close()  # the server's answer, a memfd, now has nowhere to go
        with pytest.raises(ChannelClosed):
            await call
        await server.wait_closed()
        await asyncio.sleep(0.2)  # the implementation returns its memfd meanwhile

    run(go())  # no_fd_leak: the memfd was closed, not dropped


def test_declared_errors_arrive_typed_and_others_without_details() -> None:
    async def go() -> None:
        client, _server, store = await connected()
        assert await store.get("one") == 1
        with pytest.raises(Missing, match="no key 'two'"):
            await store.get("two")
        with pytest.raises(RemoteError) as info:
            await store.broken()
        assert type(info.value) is RemoteError
        assert "secret" not in str(info.value)
        assert await store.get("one") == 1  # the channel is fine
        client.close()

    run(go())


def test_a_call_times_out_and_its_late_answer_is_dropped() -> None:
    async def go() -> None:
        client, server, store = await connected(call_timeout=0.2)
        with pytest.raises(CallTimeout, match=r"Store.slow: no answer in 0.2 s"):
            await store.slow(0.5)
        await asyncio.sleep(0.4)  # the answer comes now, for a call nobody waits for
        assert client.closed is None and server.closed is None
        assert await store.echo(b"still") == b"still"
        client.close()

    run(go())


def test_versions_and_schemas_are_negotiated() -> None:
    async def go() -> None:
        class Old:
            def echo(self, data: bytes) -> bytes:
                return data

        a, b = Channel.pair()
        server = Endpoint(b, {StoreV1: Old()})
        client = Endpoint(a)
        await asyncio.gather(server.connect(), client.connect())
        old = client.proxy(StoreV1)
        assert await old.echo(b"x") == b"x"
        new = client.proxy(Store)  # a newer client talks to the older server
        with pytest.raises(NotSupported, match="needs version 2, the peer has 1"):
            await new.newer()
        assert await new.echo(b"y") == b"y"
        client.close()

        class Changed(Interface, version=1):
            name = "Store"

            @method(0)
            async def echo(self, data: str) -> str: ...

        a, b = Channel.pair()
        server = Endpoint(b, {StoreV1: Old()})
        client = Endpoint(a)
        await asyncio.gather(server.connect(), client.connect())
        with pytest.raises(SchemaMismatch, match="bump the version"):
            client.proxy(Changed)
        client.close()

    run(go())


def test_handles_of_every_kind_travel_and_are_owned_by_the_receiver() -> None:
    async def go() -> None:
        received: list[Any] = []

        class Sink(Interface):
            @method(0)
            async def take(self, m: Memfd, s: Socket, p: PidFd, e: EventFd) -> int: ...

        class Impl:
            def take(self, m: Memfd, s: Socket, p: PidFd, e: EventFd) -> int:
                received.extend([m, s, p, e])
                value = os.eventfd_read(e.fd)
                for h in (m, s, p, e):
                    h.close()
                return value

        client, _server, sink = await connected(Impl(), Sink)
        memfd = os.memfd_create("t")
        s1, s2 = socket.socketpair()
        pidfd = os.pidfd_open(os.getpid())
        efd = os.eventfd(5)
        handles = [Memfd(memfd), Socket(s1.detach()), PidFd(pidfd), EventFd(efd)]
        assert await sink.take(*handles) == 5
        assert all(h.closed for h in handles)  # handed over: closed on this side once sent
        assert [type(h) for h in received] == [Memfd, Socket, PidFd, EventFd]
        s2.close()
        client.close()

    run(go())


# -- bad messages: the channel closes, reports why, and closes every fd that came ------------


class Attacker:
    """The raw end of a socketpair whose other end is a server endpoint."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.reasons: list[str] = []
        self.server = Endpoint(
            Channel(theirs, limits=limits, name="server"),
            {Store: StoreImpl()},
            on_bad_message=self.reasons.append,
        )

    def send(self, data: bytes, fds: list[int] = ()) -> None:  # type: ignore[assignment]
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], anc)

    def message(self, kind: Kind, method: int, body: Any, rid: int = 1, n_fds: int = 0) -> bytes:
        payload = msgpack.packb(body, use_bin_type=True)
        return HEADER.pack(kind, 0, 0, method, n_fds, rid, len(payload)) + payload

    def hello(self) -> None:
        self.send(self.message(Kind.HELLO, 0, [], rid=0))

    async def outcome(self) -> str:
        """The reason the server closed (it must close, and only for a bad message)."""
        closed = await asyncio.wait_for(self.server.wait_closed(), 5)
        self.sock.close()
        assert closed.bad, closed.reason
        assert self.reasons == [closed.reason]
        return closed.reason


def attack(steps: Callable[[Attacker], None], limits: Limits | None = None) -> str:
    async def go() -> str:
        a = Attacker(limits)
        steps(a)
        return await a.outcome()

    return run(go())


def test_an_unknown_method_is_a_bad_message() -> None:
    def steps(a: Attacker) -> None:
        a.hello()
        a.send(a.message(Kind.REQUEST, 99, []))

    assert attack(steps) == "unknown method 99 of Store"


def test_a_wrong_argument_type_is_a_bad_message() -> None:
    def steps(a: Attacker) -> None:
        a.hello()
        a.send(a.message(Kind.REQUEST, 2, [b"not a str"]))

    assert attack(steps) == "Store.get(key): expected str, got bytes"


def test_a_wrong_field_deep_inside_is_named() -> None:
    def steps(a: Attacker) -> None:
        a.hello()
        a.send(a.message(Kind.REQUEST, 1, [[1, 2.0, None], [1, "x"], {}]))

    assert attack(steps) == "Store.move(by)[1]: expected int, got str"


def test_a_call_before_hello_is_a_bad_message() -> None:
    assert attack(lambda a: a.send(a.message(Kind.REQUEST, 0, [b""]))) == "a REQUEST before HELLO"


def test_an_oversize_message_is_a_bad_message() -> None:
    def steps(a: Attacker) -> None:
        a.hello()
        a.send(a.message(Kind.REQUEST, 0, [b"x" * 5000]))

    assert attack(steps, Limits(max_message=4096)) == "more than 4096 bytes"


def test_too_many_fds_are_a_bad_message_and_all_are_closed() -> None:
    fds = [os.eventfd(0) for _ in range(5)]
    try:

        def steps(a: Attacker) -> None:
            a.hello()
            a.send(a.message(Kind.REQUEST, 6, [None], n_fds=5), fds)

        assert attack(steps, Limits(max_handles=4)) == "more than 4 fds"
    finally:
        for fd in fds:
            os.close(fd)  # ours; the server's copies must be gone (no_fd_leak)


def test_a_handle_of_the_wrong_kind_is_a_bad_message() -> None:
    efd = os.eventfd(0)
    try:

        def steps(a: Attacker) -> None:
            a.hello()
            ref = msgpack.ExtType(1, (0).to_bytes(2, "little"))
            a.send(a.message(Kind.REQUEST, 6, [ref], n_fds=1), [efd])

        assert attack(steps) == "Store.memfd_size(memfd): expected Memfd, got EventFd"
    finally:
        os.close(efd)


def test_an_unsealed_memfd_posing_as_sealed_bytes_is_refused() -> None:
    memfd = os.memfd_create("evil", os.MFD_ALLOW_SEALING)
    os.write(memfd, b"x" * 100_000)
    try:

        def steps(a: Attacker) -> None:
            a.hello()
            ref = msgpack.ExtType(EXT_SEALED, (0).to_bytes(2, "little"))
            a.send(a.message(Kind.REQUEST, 0, [ref], n_fds=1), [memfd])

        reason = attack(steps)
        assert reason.startswith("memfd not sealed"), reason
        assert "F_SEAL_WRITE" in reason
    finally:
        os.close(memfd)


def _sparse_memfd(size: int, seals: int) -> int:
    """A memfd of `size` bytes that costs its maker nothing (a hole), sealed with `seals`."""
    fd = os.memfd_create("sparse", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def test_a_pool_bigger_than_allowed_is_refused_before_it_is_mapped() -> None:
    fd = _sparse_memfd(1 << 30, POOL_SEALS)  # 1 GiB that would land in the receiver's memory
    try:

        def steps(a: Attacker) -> None:
            ref = msgpack.ExtType(1, (0).to_bytes(2, "little"))
            a.send(a.message(Kind.POOL, 0, [1, 1 << 30, ref], rid=0, n_fds=1), [fd])

        assert attack(steps) == f"a pool of 1 slots of {1 << 30} bytes (at most {256 << 20})"
    finally:
        os.close(fd)


def test_sealed_bytes_count_against_one_total_per_message() -> None:
    fds = [_sparse_memfd(600 << 10, REQUIRED_SEALS) for _ in range(2)]
    try:

        def steps(a: Attacker) -> None:
            a.hello()
            refs = [msgpack.ExtType(EXT_SEALED, i.to_bytes(2, "little")) for i in (0, 1)]
            a.send(a.message(Kind.REQUEST, 1, [refs[0], refs[1], {}], n_fds=2), fds)

        reason = attack(steps, Limits(max_sealed=1 << 20))
        assert reason == f"sealed memfd of {600 << 10} bytes exceeds the limit of {424 << 10}"
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="a private mount namespace: needs root")
def test_a_file_named_like_a_memfd_is_not_a_memfd(tmp_path: Any) -> None:
    """A peer can name a file "memfd:x" at the root of a mount of its own: /proc shows the
    host "/memfd:x", the text a memfd's link has. The kind comes from the device instead."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the "renderer", in a mount namespace of its own
        code = 1
        try:
            unshare(CLONE_NEWNS)
            mount(None, "/", None, MS_REC | MS_PRIVATE)
            mount("tmpfs", str(tmp_path), "tmpfs", 0, "size=64k")
            fd = os.open(tmp_path / "memfd:evil", os.O_CREAT | os.O_RDWR, 0o600)
            body = [msgpack.ExtType(1, b"\0\0")]
            message = Attacker.__new__(Attacker).message(Kind.REQUEST, 6, body, n_fds=1)
            socket.send_fds(theirs, [message], [fd])
            code = 0
        finally:
            os._exit(code)
    theirs.close()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    data, fds, _, _ = socket.recv_fds(mine, 4096, 4)
    mine.close()
    assert os.readlink(f"/proc/self/fd/{fds[0]}") == "/memfd:evil"  # what a memfd shows
    with pytest.raises(BadMessage, match="an fd of kind 'file'"):
        decode(data, fds, Limits())


def test_more_requests_in_flight_than_allowed_is_a_bad_message() -> None:
    def steps(a: Attacker) -> None:
        a.hello()
        for rid in range(1, 5):
            a.send(a.message(Kind.REQUEST, 5, [10.0], rid=rid))

    assert attack(steps, Limits(max_outstanding=3)) == "more than 3 requests in flight"


def test_an_answer_to_no_request_is_a_bad_message() -> None:
    async def go() -> None:
        reasons: list[str] = []
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        client = Endpoint(Channel(mine), on_bad_message=reasons.append)
        raw = Attacker.__new__(Attacker)
        raw.sock = theirs
        theirs.send(raw.message(Kind.HELLO, 0, [["Store", 2, Store.schema]], rid=0))
        await client.connect()
        theirs.send(raw.message(Kind.RESPONSE, 0, [1], rid=77))
        closed = await client.wait_closed()
        theirs.close()
        assert reasons == ["a RESPONSE for request 77, which is not pending"] == [closed.reason]

    run(go())


def test_the_sender_of_sealed_bytes_cannot_change_them() -> None:
    data = os.urandom(64 * 1024)
    fd = seal_bytes(data)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & REQUIRED_SEALS == REQUIRED_SEALS
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"changed", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 10)
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)


# -- peer death -------------------------------------------------------------------------------


def _fork_server(sock: socket.socket, impl: object) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:

            async def serve() -> None:
                ep = Endpoint(Channel(sock, name="child"), {Store: impl})
                await ep.connect()
                await ep.wait_closed()

            asyncio.run(serve())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    sock.close()
    return pid


def test_peer_death_mid_call_fails_pending_calls_at_once() -> None:
    class Dying(StoreImpl):
        async def slow(self, seconds: float) -> int:
            os._exit(3)

    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = _fork_server(theirs, Dying())

    async def go() -> float:
        client = Endpoint(Channel(mine, name="parent"), call_timeout=30)
        await client.connect()
        store = client.proxy(Store)
        assert await store.echo(b"alive") == b"alive"
        others = [asyncio.ensure_future(store.slow(20)) for _ in range(3)]
        t0 = time.monotonic()
        with pytest.raises(ChannelClosed, match="the peer"):
            await store.slow(20)
        took = time.monotonic() - t0
        for f in others:
            with pytest.raises(ChannelClosed):
                await f
        with pytest.raises(ChannelClosed):
            await store.echo(b"after")
        return took

    took = run(go())
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3
    assert took < 2, f"pending calls failed only after {took:.2f} s"


# -- across a sandbox boundary -----------------------------------------------------------------


@pytest.fixture(scope="module")
def spawner() -> Iterator[Spawner]:
    with Spawner(zygote=True) as sp:
        yield sp


def _in_sandbox(sp: Spawner, body: Callable[[Probe, Endpoint], Awaitable[T]]) -> T:
    """Run `body` against the probe serving Probe inside a renderer sandbox (seccomp on)."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sb = sp.spawn(Jail("renderer").pass_fd(theirs.fileno(), 3),
                      entry="fos_host.probe:main", args=("ipc",))  # fmt: skip
    finally:
        theirs.close()

    async def go() -> T:
        ep = Endpoint(Channel(mine, name="host"), call_timeout=20)
        await ep.connect(timeout=20)
        try:
            return await body(ep.proxy(Probe), ep)
        finally:
            ep.close()

    with sb:
        out = run(go(), timeout=60)
        sb.wait(timeout=20)
    return out


def test_fds_cross_the_sandbox_boundary_both_ways(spawner: Spawner) -> None:
    async def body(probe: Probe, ep: Endpoint) -> None:
        pid, _ = await probe.identity()
        assert pid == 1  # it is pid 1 of its own namespace: really the sandbox
        assert await probe.echo(b"ping") == b"ping"
        big = os.urandom(2 * MiB)
        assert await probe.echo(big) == big  # sealed memfds, both ways
        memfd = os.memfd_create("to-sandbox")
        os.write(memfd, b"host data")
        assert await probe.read_memfd(Memfd(memfd)) == b"host data"
        sealed = await probe.sealed(b"made inside")  # a memfd made in the sandbox
        with sealed:
            assert fcntl.fcntl(sealed.fd, fcntl.F_GET_SEALS) & REQUIRED_SEALS == REQUIRED_SEALS
            assert os.pread(sealed.fd, 100, 0) == b"made inside"
        here, there = socket.socketpair()
        with here:
            assert await probe.send_on(Socket(there.detach()), b"over a passed socket") == 20
            assert here.recv(100) == b"over a passed socket"
        efd = os.eventfd(0)
        os.eventfd_write(efd, 42)
        assert await probe.read_eventfd(EventFd(efd)) == 42

    run_fds = open_fds()
    _in_sandbox(spawner, body)
    assert open_fds() <= run_fds | {max(run_fds) + 1}


def test_a_sandbox_dying_mid_call_fails_the_call_promptly(spawner: Spawner) -> None:
    async def body(probe: Probe, ep: Endpoint) -> float:
        t0 = time.monotonic()
        with pytest.raises(ChannelClosed, match="the peer"):
            await probe.exit_now(9)
        return time.monotonic() - t0

    assert _in_sandbox(spawner, body) < 2
