"""`fos-host bench ipc`: round trips and big transfers of the IPC layer (`fos_host.ipc`)
against peers, measured side by side in one run.

Every peer's server is a real second process, forked before any asyncio loop runs here;
fos-host servers run an asyncio loop of their own with an `Endpoint`, the others a blocking
loop (except the asyncio floor). This process is the client of them all, in one asyncio
loop.

Round trips (64 B and 4 KiB, the argument echoed back), timed call by call:

- fos_plain / fos_coro: `await proxy.echo(data)` on the `IpcBench` interface; the server's
  `echo` is a plain `def` (the Endpoint serves it inline, as the request is read) or an
  `async def` (served in a task of its own: one more turn of the loop).
- mp_pipe: `multiprocessing.Pipe`, `send_bytes` / `recv_bytes` on both sides.
- seqpacket: a raw AF_UNIX SOCK_SEQPACKET socketpair, blocking `send` / `recv` on both sides.
- seqpacket_asyncio: the same socketpair driven by `loop.add_reader` on both sides — no
  encoding, no checks: the floor of any channel integrated with asyncio.

Each of them twice, pinned: client and server on one CPU, and on two. Unpinned, the
scheduler puts a pair on one CPU in some rounds and on two in others, and on this VM that
alone moves a round trip between ~20 and ~65 µs (waking an idle vCPU is slow), swamping the
differences between the methods; pinned, each figure is stable and says what it measures.

Transfers of 64 MiB (GB/s, 10^9 bytes per second), client and server on two CPUs, from the
call to the answer; the receiver ends up with all of it as bytes it can parse:

- fos_pool_shared: `await proxy.take_shared(data)` after `channel.share_pool(2, 64 MiB)` on
  this side: the sender copies into a pool slot, the receiver sees it in place (`Shared`,
  no copy) and releases it — the one copy shared memory is for.
- fos_pool: `await proxy.take(data)` through the same pool: the
  sender copies into a pool slot, the receiver copies out (`Channel.pool_bytes`).
- fos_memfd: the same call without a pool: the argument travels as a sealed memfd.
- mp_pipe: `send_bytes` of the 64 MiB, `recv_bytes` on the other side.
- socketpair: a SOCK_STREAM socketpair, `sendall` / `recv_into` a bytearray the receiver
  allocated once.

And, for the ceiling, two copies of 64 MiB in this process: `bytes(memoryview)` (into fresh
pages, allocated and freed, as every receiver above but the socketpair's gets them) and into
a buffer that is reused.

The methods are interleaved: each round runs `runs` calls of every method, size and placement,
then one transfer of every kind, the order rotated every round, so that the noise of a shared
machine hits all of them alike; a first round (fewer calls) warms up and is not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import socket
import statistics
import struct
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Generic, TypeVar

from fos_host.bench import MIB, BenchError, machine, machine_line, summarize
from fos_host.closing import Closing
from fos_host.errors import ConfigError, FosError
from fos_host.interfaces.bench import IpcBench
from fos_host.ipc.channel import Channel
from fos_host.ipc.interface import Endpoint
from fos_host.ipc.wire import Shared
from fos_host.kernel.fds import readable

SIZES = (64, 4096)  # round-trip argument sizes, bytes
TRANSFER = 64 * MIB
POOL_SLOTS = 2
RUNS = 500  # calls per method, size and placement per round
ROUNDS = 20
QUICK_RUNS = 20
QUICK_ROUNDS = 2
WARMUP_CALLS = 200  # per method, size and placement, in the uncounted first round
RECV_MAX = 1 << 16  # bytes; more than any datagram here
REAP_TIMEOUT = 5.0  # seconds for a server to exit once its peer end is closed

SAME_CPU = "same_cpu"
TWO_CPUS = "two_cpus"
PLACEMENTS = {SAME_CPU: "client and server on one CPU", TWO_CPUS: "on two CPUs"}

GOAL_CALL_VS_PIPE = 1.0  # "64 B call p50 no slower than multiprocessing.Pipe's"
GOAL_GBPS = 5.0  # "64 MiB at >= 5 GB/s …
GOAL_TRANSFER_VS_PIPE = 8.0  # … and >= 8x multiprocessing.Pipe"

_COUNT = struct.Struct("<Q")  # the byte count a sink answers with

Batch = Callable[[bytes, int], Awaitable[list[float]]]  # (argument, calls) -> µs per call
Send = Callable[[bytes], Awaitable[int]]  # hand over the data; the receiver's byte count


class PlainBench:
    """Plain functions: the Endpoint calls them inline, as the request is read."""

    def echo(self, data: bytes) -> bytes:
        return data

    def take(self, data: bytes) -> int:
        return len(data)

    def take_shared(self, data: Shared) -> int:
        with data:
            return len(data)


class CoroutineBench:
    """Coroutines: the Endpoint runs each call in a task of its own. (Only `echo` is
    measured; `take` is here because an implementation has every method.)"""

    async def echo(self, data: bytes) -> bytes:
        return data

    async def take(self, data: bytes) -> int:
        return len(data)

    async def take_shared(self, data: Shared) -> int:
        with data:
            return len(data)


# --------------------------------------------------------------------------------------
# the servers, in child processes

E = TypeVar("E", socket.socket, Connection)


@dataclass(frozen=True)
class Server(Generic[E]):
    end: E  # this side's end of the server's socketpair or Pipe
    pid: int


class Servers(Closing):
    """The server processes. Each is forked with one end of a fresh socketpair (or Pipe) and
    first closes this side's ends of all pairs, its own and the earlier ones, so that closing
    this side's end is an EOF its server sees; it serves until that EOF and exits.
    `close()` closes this side's ends and reaps every server (killed if it does not exit)."""

    def __init__(self) -> None:
        self.started: list[Server[Any]] = []
        self.failed: list[str] = []  # servers that did not exit with status 0

    def socket(
        self, kind: socket.SocketKind, serve: Callable[[socket.socket], None]
    ) -> Server[socket.socket]:
        mine, theirs = socket.socketpair(socket.AF_UNIX, kind)
        return self._fork(mine, theirs, serve)

    def pipe(self, serve: Callable[[Connection], None]) -> Server[Connection]:
        mine, theirs = multiprocessing.Pipe()
        return self._fork(mine, theirs, serve)

    def _fork(self, mine: E, theirs: E, serve: Callable[[E], None]) -> Server[E]:
        try:
            pid = os.fork()
        except BaseException:
            mine.close()
            theirs.close()
            raise
        if pid == 0:  # pragma: no cover - the server
            code = 1
            try:
                mine.close()
                for server in self.started:
                    server.end.close()
                serve(theirs)
                code = 0
            except Exception:
                traceback.print_exc()
            finally:
                os._exit(code)
        theirs.close()
        server = Server(mine, pid)
        self.started.append(server)
        return server

    def close(self) -> None:
        for server in self.started:
            server.end.close()
        for server in self.started:
            code = os.waitstatus_to_exitcode(_reap(server.pid))
            if code:
                how = f"signal {-code}" if code < 0 else f"status {code}"
                self.failed.append(f"server {server.pid} ended with {how}")
        self.started = []


def _reap(pid: int) -> int:
    """Wait for a server to exit (SIGKILL after REAP_TIMEOUT); its wait status."""
    fd = os.pidfd_open(pid)
    try:
        if not readable([fd], REAP_TIMEOUT):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    return status


def serve_fos(impl: object) -> Callable[[socket.socket], None]:
    """A fos-host server: an Endpoint offering `impl` as IpcBench on a loop of its own,
    until the client closes the channel."""

    async def serve(sock: socket.socket) -> None:
        endpoint = Endpoint(Channel(sock, name="bench-server"), {IpcBench: impl})
        await endpoint.connect()
        await endpoint.wait_closed()

    return lambda sock: asyncio.run(serve(sock))


def serve_seqpacket(sock: socket.socket) -> None:
    """Echo datagrams, blocking, until EOF."""
    while data := sock.recv(RECV_MAX):
        sock.send(data)


def serve_seqpacket_asyncio(sock: socket.socket) -> None:
    """Echo datagrams from a reader callback of an asyncio loop, until EOF: the server half
    of the floor."""

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            try:
                data = sock.recv(RECV_MAX)
            except BlockingIOError:
                return
            if data:
                sock.send(data)
            else:
                loop.remove_reader(sock.fileno())
                ended.set_result(None)

        sock.setblocking(False)
        loop.add_reader(sock.fileno(), readable)
        await ended

    asyncio.run(serve())


def serve_pipe_echo(conn: Connection) -> None:
    """Echo messages until EOF."""
    with contextlib.suppress(EOFError):
        while True:
            conn.send_bytes(conn.recv_bytes())


def serve_pipe_sink(conn: Connection) -> None:
    """Receive messages until EOF; answer each with its length."""
    with contextlib.suppress(EOFError):
        while True:
            conn.send_bytes(_COUNT.pack(len(conn.recv_bytes())))


def serve_stream_sink(sock: socket.socket) -> None:
    """Receive TRANSFER bytes at a time into one buffer, allocated (and faulted in) once;
    answer each with the count."""
    buf = memoryview(bytearray(TRANSFER))
    while True:
        got = 0
        while got < TRANSFER:
            n = sock.recv_into(buf[got:])
            if not n:
                return
            got += n
        sock.sendall(_COUNT.pack(got))


# --------------------------------------------------------------------------------------
# the clients, in this process


def _timed_blocking(call: Callable[[bytes], bytes]) -> Batch:
    """A batch of blocking round trips, each timed and checked. A twin of `_timed_awaiting`
    on purpose: wrapping each blocking call in a coroutine would add its cost to the peers."""

    async def batch(data: bytes, calls: int) -> list[float]:
        out = []
        for _ in range(calls):
            t0 = time.perf_counter_ns()
            reply = call(data)
            t1 = time.perf_counter_ns()
            if reply != data:
                raise BenchError(_mismatch(reply, data))
            out.append((t1 - t0) / 1e3)
        return out

    return batch


def _timed_awaiting(call: Callable[[bytes], Awaitable[bytes]]) -> Batch:
    """A batch of awaited round trips, each timed and checked."""

    async def batch(data: bytes, calls: int) -> list[float]:
        out = []
        for _ in range(calls):
            t0 = time.perf_counter_ns()
            reply = await call(data)
            t1 = time.perf_counter_ns()
            if reply != data:
                raise BenchError(_mismatch(reply, data))
            out.append((t1 - t0) / 1e3)
        return out

    return batch


def _mismatch(reply: bytes, data: bytes) -> str:
    if not reply:
        return "the server is gone"
    return f"a reply of {len(reply)} bytes that is not the {len(data)} bytes sent"


async def fos_proxy(sock: socket.socket, stack: contextlib.ExitStack, pool: bool) -> IpcBench:
    """A proxy to a fos-host server; with `pool`, this side shares a BufferPool first."""
    channel = Channel(sock, name="bench-client")
    stack.callback(channel.close)
    endpoint = await Endpoint(channel).connect()
    if pool:
        channel.share_pool(POOL_SLOTS, TRANSFER)
    return endpoint.proxy(IpcBench)


class AsyncSeqpacket:
    """The client half of the asyncio floor: a datagram out, and a reader callback that
    hands the answer to the waiting future — the least any asyncio channel does."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.waiter: asyncio.Future[bytes] | None = None
        self.ended = False
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(RECV_MAX)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.ended = True
            self.loop.remove_reader(self.sock.fileno())
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            waiter.set_result(data)

    async def roundtrip(self, data: bytes) -> bytes:
        if self.ended:
            return b""
        self.waiter = waiter = self.loop.create_future()
        self.sock.send(data)
        return await waiter

    def close(self) -> None:
        if not self.ended:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


def _seqpacket_roundtrip(sock: socket.socket) -> Callable[[bytes], bytes]:
    """A datagram out, the echo back, blocking."""

    def roundtrip(data: bytes) -> bytes:
        sock.send(data)
        return sock.recv(RECV_MAX)

    return roundtrip


def _pipe_roundtrip(conn: Connection) -> Callable[[bytes], bytes]:
    """A message out, the echo back."""

    def roundtrip(data: bytes) -> bytes:
        conn.send_bytes(data)
        return conn.recv_bytes()

    return roundtrip


def _pipe_send(conn: Connection) -> Send:
    """The data as one message; the answer is the length the sink received."""

    async def send(data: bytes) -> int:
        conn.send_bytes(data)
        count: int = _COUNT.unpack(conn.recv_bytes())[0]
        return count

    return send


def _stream_send(sock: socket.socket) -> Send:
    """The data down the stream; the answer is the count the sink received."""

    async def send(data: bytes) -> int:
        sock.sendall(data)
        answer = sock.recv(_COUNT.size, socket.MSG_WAITALL)
        if len(answer) != _COUNT.size:
            raise BenchError("the server is gone")
        count: int = _COUNT.unpack(answer)[0]
        return count

    return send


def _copy_send() -> Send:
    """A copy into fresh pages (allocated, faulted in, freed), as most receivers make."""

    async def send(data: bytes) -> int:
        return len(bytes(memoryview(data)))

    return send


def _copy_reused_send() -> Send:
    """A copy into a buffer allocated and faulted in once: the speed of memory itself."""
    buf = memoryview(bytearray(TRANSFER))

    async def send(data: bytes) -> int:
        buf[:] = data
        return len(buf)

    return send


# --------------------------------------------------------------------------------------
# the run


@dataclass
class RoundTrip:
    """A round-trip method: its batch of timed calls, its server, its samples."""

    key: str
    label: str
    batch: Batch
    pid: int  # the server's
    samples: dict[tuple[str, int], list[list[float]]] = field(default_factory=dict)
    # (placement, size) -> one list of µs per round

    def result(self, placement: str) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label}
        for size in SIZES:
            rounds = self.samples[placement, size]
            values = [v for r in rounds for v in r]
            medians = [statistics.median(r) for r in rounds]
            out[str(size)] = {
                **summarize(values),
                "p99": round(_p99(values), 3),
                "n": len(values),
                "round_p50_min": round(min(medians), 3),
                "round_p50_max": round(max(medians), 3),
            }
        return out


@dataclass
class Transfer:
    """A way to hand 64 MiB to a receiver (or, server None, to copy it here)."""

    key: str
    label: str
    send: Send
    pid: int | None  # the server's; None: a copy in this process
    gbps: list[float] = field(default_factory=list)

    async def once(self, data: bytes) -> float:
        """One transfer of `data`, in GB/s."""
        t0 = time.perf_counter_ns()
        count = await self.send(data)
        t1 = time.perf_counter_ns()
        if count != len(data):
            raise BenchError(f"{count} bytes arrived of {len(data)}")
        return len(data) / (t1 - t0)  # bytes per ns = GB/s

    def result(self) -> dict[str, Any]:
        return {"label": self.label, "n": len(self.gbps), "gbps": summarize(self.gbps)}


def _p99(values: list[float]) -> float:
    """The 99th percentile (summarize stops at p90; a round trip's tail matters)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def _rotated(items: list[Any], k: int) -> list[Any]:
    k %= len(items)
    return items[k:] + items[:k]


def _pin(placement: str, server: int | None, cpus: list[int], r: int) -> None:
    """Pin this process (the client) and the server for `placement`. The client's CPU
    alternates between rounds, so that neither CPU's other load always falls on one side."""
    here = cpus[r % len(cpus)]
    os.sched_setaffinity(0, {here})
    if server is not None:
        there = here if placement == SAME_CPU else cpus[(r + 1) % len(cpus)]
        os.sched_setaffinity(server, {there})


@contextlib.contextmanager
def _naming(what: str) -> Iterator[None]:
    """A failure of one method as a BenchError that names it."""
    try:
        yield
    except BenchError as e:
        raise BenchError(f"{what}: {e}") from e
    except (OSError, EOFError, FosError) as e:
        raise BenchError(f"{what}: {type(e).__name__}: {e}") from e


@dataclass(frozen=True)
class Peers:
    """The servers of every method."""

    plain: Server[socket.socket]
    coro: Server[socket.socket]
    pool: Server[socket.socket]
    memfd: Server[socket.socket]
    pipe_echo: Server[Connection]
    seqpacket: Server[socket.socket]
    floor: Server[socket.socket]
    pipe_sink: Server[Connection]
    stream_sink: Server[socket.socket]

    @classmethod
    def start(cls, servers: Servers) -> Peers:
        """Fork every server. Before any asyncio loop runs in this process: a child would
        inherit the running loop's epoll fd and signal handlers."""
        seqpacket, stream = socket.SOCK_SEQPACKET, socket.SOCK_STREAM
        return cls(
            plain=servers.socket(seqpacket, serve_fos(PlainBench())),
            coro=servers.socket(seqpacket, serve_fos(CoroutineBench())),
            pool=servers.socket(seqpacket, serve_fos(PlainBench())),
            memfd=servers.socket(seqpacket, serve_fos(PlainBench())),
            pipe_echo=servers.pipe(serve_pipe_echo),
            seqpacket=servers.socket(seqpacket, serve_seqpacket),
            floor=servers.socket(seqpacket, serve_seqpacket_asyncio),
            pipe_sink=servers.pipe(serve_pipe_sink),
            stream_sink=servers.socket(stream, serve_stream_sink),
        )


async def _measure(
    peers: Peers, runs: int, rounds: int, cpus: list[int]
) -> tuple[list[RoundTrip], list[Transfer], list[Transfer]]:
    """Connect to the servers and run the rounds; the methods with their samples."""
    with contextlib.ExitStack() as stack:
        with _naming("connecting to the fos-host servers"):
            plain = await fos_proxy(peers.plain.end, stack, pool=False)
            coro = await fos_proxy(peers.coro.end, stack, pool=False)
            pool = await fos_proxy(peers.pool.end, stack, pool=True)
            memfd = await fos_proxy(peers.memfd.end, stack, pool=False)
        floor = AsyncSeqpacket(peers.floor.end)
        stack.callback(floor.close)
        trips = [
            RoundTrip(
                "fos_plain",
                "fos-host call, server method a plain def",
                _timed_awaiting(plain.echo),
                peers.plain.pid,
            ),
            RoundTrip(
                "fos_coro",
                "fos-host call, server method a coroutine",
                _timed_awaiting(coro.echo),
                peers.coro.pid,
            ),
            RoundTrip(
                "mp_pipe",
                "multiprocessing.Pipe send_bytes/recv_bytes",
                _timed_blocking(_pipe_roundtrip(peers.pipe_echo.end)),
                peers.pipe_echo.pid,
            ),
            RoundTrip(
                "seqpacket",
                "SEQPACKET socketpair, blocking send/recv",
                _timed_blocking(_seqpacket_roundtrip(peers.seqpacket.end)),
                peers.seqpacket.pid,
            ),
            RoundTrip(
                "seqpacket_asyncio",
                "SEQPACKET + asyncio add_reader (the floor)",
                _timed_awaiting(floor.roundtrip),
                peers.floor.pid,
            ),
        ]
        transfers = [
            Transfer(
                "fos_pool_shared",
                "fos-host take_shared(), pool, read in place",
                lambda data: pool.take_shared(Shared(memoryview(data))),
                peers.pool.pid,
            ),
            Transfer("fos_pool", "fos-host take(), pool, copied out", pool.take, peers.pool.pid),
            Transfer("fos_memfd", "fos-host take(), sealed memfd", memfd.take, peers.memfd.pid),
            Transfer(
                "mp_pipe",
                "multiprocessing.Pipe send_bytes",
                _pipe_send(peers.pipe_sink.end),
                peers.pipe_sink.pid,
            ),
            Transfer(
                "socketpair",
                "SOCK_STREAM sendall / recv_into a buffer",
                _stream_send(peers.stream_sink.end),
                peers.stream_sink.pid,
            ),
        ]
        copies = [
            Transfer("new", "bytes(memoryview): fresh pages", _copy_send(), None),
            Transfer("reused", "into a reused buffer", _copy_reused_send(), None),
        ]
        await _run_rounds(trips, transfers + copies, runs, rounds, cpus)
    return trips, transfers, copies


async def _run_rounds(
    trips: list[RoundTrip], transfers: list[Transfer], runs: int, rounds: int, cpus: list[int]
) -> None:
    """Round 0 warms up (not counted); then `rounds` rounds, each `runs` calls of every
    method, size and placement, then one transfer of each kind; the order rotated every
    round."""
    payloads = {size: bytes(i % 251 for i in range(size)) for size in SIZES}
    big = bytes(range(256)) * (TRANSFER // 256)
    placements = _placements(cpus)
    jobs = [(trip, size, where) for trip in trips for size in SIZES for where in placements]
    for r in range(rounds + 1):
        calls = min(runs, WARMUP_CALLS) if r == 0 else runs
        for trip, size, where in _rotated(jobs, r):
            with _naming(f"{trip.label}, {size} B"):
                _pin(where, trip.pid, cpus, r)
                samples = await trip.batch(payloads[size], calls)
            if r:
                trip.samples.setdefault((where, size), []).append(samples)
        for t in _rotated(transfers, r):
            with _naming(t.label):
                _pin(placements[-1], t.pid, cpus, r)
                gbps = await t.once(big)
            if r:
                t.gbps.append(gbps)


def _placements(cpus: list[int]) -> list[str]:
    """Where client and server run: on one CPU, and on two if there are two."""
    return [SAME_CPU, TWO_CPUS] if len(cpus) > 1 else [SAME_CPU]


def measure(runs: int = RUNS, rounds: int = ROUNDS) -> dict[str, Any]:
    """Run everything; the report as a JSON-able dict."""
    if runs < 1 or rounds < 1:
        raise ConfigError(f"--runs and --rounds must be at least 1, not {runs} and {rounds}")
    load_before = os.getloadavg()[0]
    affinity = os.sched_getaffinity(0)
    cpus = sorted(affinity)[:2]
    try:
        with Servers() as servers:
            peers = Peers.start(servers)
            trips, transfers, copies = asyncio.run(_measure(peers, runs, rounds, cpus))
    finally:
        os.sched_setaffinity(0, affinity)
    placements = _placements(cpus)
    report: dict[str, Any] = {
        "benchmark": "ipc",
        "runs": runs,
        "rounds": rounds,
        "warmup_calls": min(runs, WARMUP_CALLS),
        "sizes": list(SIZES),
        "transfer_bytes": TRANSFER,
        "placements": {p: PLACEMENTS[p] for p in placements},
        "transfer_placement": placements[-1],
        "machine": {**machine(load_before), "cpus_used": cpus},
        "roundtrip_us": {p: {t.key: t.result(p) for t in trips} for p in placements},
        "transfer_gbps": {t.key: t.result() for t in transfers},
        "memcpy_gbps": {t.key: t.result() for t in copies},
        "failed": servers.failed,
    }
    return _goals(report)


def _goals(report: dict[str, Any]) -> dict[str, Any]:
    """Ratios of every peer to ours (above 1: ours is faster), and the issue's goals."""
    gbps = {k: v["gbps"]["p50"] for k, v in report["transfer_gbps"].items()}
    ratios: dict[str, float] = {}
    for where, trip in report["roundtrip_us"].items():
        for ours in ("fos_plain", "fos_coro"):
            for peer in ("mp_pipe", "seqpacket", "seqpacket_asyncio"):
                for size in SIZES:
                    key = f"{peer}_over_{ours}_{size}_{where}"
                    ratios[key] = round(
                        trip[peer][str(size)]["p50"] / trip[ours][str(size)]["p50"], 2
                    )
    for ours in ("fos_pool_shared", "fos_pool", "fos_memfd"):
        for peer in ("mp_pipe", "socketpair"):
            ratios[f"{ours}_over_{peer}"] = round(gbps[ours] / gbps[peer], 2)
    report["ratios"] = ratios
    goals = [
        (
            f"{SIZES[0]} B call p50 vs mp.Pipe, {how}, {where.replace('_', ' ')}",
            GOAL_CALL_VS_PIPE,
            ratios[f"mp_pipe_over_{ours}_{SIZES[0]}_{where}"],
            "x",
        )
        for where in report["roundtrip_us"]
        for ours, how in (("fos_plain", "plain def"), ("fos_coro", "coroutine"))
    ]
    for ours, how in (("fos_pool_shared", "read in place"), ("fos_pool", "copied out")):
        goals += [
            (f"64 MiB via the pool, {how}", GOAL_GBPS, gbps[ours], "GB/s"),
            (f"64 MiB via the pool, {how}, vs mp.Pipe", GOAL_TRANSFER_VS_PIPE,
             ratios[f"{ours}_over_mp_pipe"], "x"),
        ]  # fmt: skip
    report["goals"] = [
        {
            "goal": name,
            "target": f">= {limit:g} {unit}",
            "value": value,
            "unit": unit,
            "met": value >= limit,
        }
        for name, limit, value, unit in goals
    ]
    return report


# --------------------------------------------------------------------------------------
# output


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    sizes = report["sizes"]
    lines = [
        f"fos-host IPC benchmark: {report['runs']} calls per method, size and placement in each "
        f"of {report['rounds']} rounds, interleaved (order rotated each round), after a "
        "warm-up round",
        machine_line(m),
        "A shared machine is noisy: compare figures of one run, and mind the spread of the "
        "rounds' medians.",
    ]
    for where, trips in report["roundtrip_us"].items():
        lines += [
            "",
            f"{'round trip (µs), ' + report['placements'][where]:<46}"
            + "".join(f"{f'{s} B p50':>12}{'p99':>8}{'rounds p50':>14}" for s in sizes),
        ]
        for e in trips.values():
            row = f"{e['label']:<46}"
            for s in sizes:
                st = e[str(s)]
                spread = f"{st['round_p50_min']:.1f}-{st['round_p50_max']:.1f}"
                row += f"{st['p50']:>12.1f}{st['p99']:>8.1f}{spread:>14}"
            lines.append(row)
    mib = report["transfer_bytes"] // MIB
    how = report["placements"][report["transfer_placement"]]
    lines += [
        "",
        f"{f'{mib} MiB transfer (GB/s), {how}':<46}{'p50':>12}{'min':>8}{'max':>8}{'n':>6}",
    ]
    lines += [_gbps_row(e) for e in report["transfer_gbps"].values()]
    lines.append("memcpy in this process, the ceiling:")
    lines += [_gbps_row(e, "  ") for e in report["memcpy_gbps"].values()]
    r = report["ratios"]
    lines += ["", "peer / fos-host (above 1: fos-host is faster)"]
    for where in report["roundtrip_us"]:
        for ours, how in (("fos_plain", "plain def"), ("fos_coro", "coroutine")):
            parts = [
                f"{peer} "
                + " / ".join(f"{r[f'{peer}_over_{ours}_{s}_{where}']:.2f}x" for s in sizes)
                for peer in ("mp_pipe", "seqpacket", "seqpacket_asyncio")
            ]
            lines.append(f"  p50, {how}, {where.replace('_', ' ')}: {', '.join(parts)}")
    for ours in ("fos_pool_shared", "fos_pool", "fos_memfd"):
        parts = [f"{peer} {r[f'{ours}_over_{peer}']:.2f}x" for peer in ("mp_pipe", "socketpair")]
        lines.append(f"  GB/s, {ours}: {', '.join(parts)}")
    lines += ["", "goals:"]
    for g in report["goals"]:
        value = f"{g['value']:.2f} {g['unit']}"
        verdict = "MET" if g["met"] else "NOT MET"
        lines.append(f"  {g['goal']:<46}{g['target']:>10}{value:>12}   {verdict}")
    if report["failed"]:
        lines += ["", f"FAILED: {'; '.join(report['failed'])}"]
    return "\n".join(lines)


def _gbps_row(e: dict[str, Any], indent: str = "") -> str:
    g = e["gbps"]
    return f"{indent + e['label']:<46}{g['p50']:>12.2f}{g['min']:>8.2f}{g['max']:>8.2f}{e['n']:>6}"


def run_ipc_bench(
    runs: int | None = None, rounds: int | None = None, quick: bool = False, as_json: bool = False
) -> int:
    """Measure and print (a table, or JSON); 0 unless a server failed. `quick`: a few calls
    (QUICK_RUNS, QUICK_ROUNDS unless given), to see that everything works."""
    report = measure(
        runs=runs if runs is not None else QUICK_RUNS if quick else RUNS,
        rounds=rounds if rounds is not None else QUICK_ROUNDS if quick else ROUNDS,
    )
    print(json.dumps(report, indent=2) if as_json else render(report), flush=True)
    return 1 if report["failed"] else 0
