"""fos_host.ipc.shm on the real kernel: sealed memfds against their own sender, what
open_sealed rejects (always closing the fd), and a BufferPool shared with a forked process."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fos_host.ipc.shm import (
    F_SEAL_FUTURE_WRITE,
    REQUIRED_SEALS,
    BufferPool,
    ShmError,
    open_sealed,
    seal_bytes,
)

MiB = 1 << 20
PAGE = mmap.PAGESIZE


def fd_entries() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    before = sorted(os.listdir("/proc/self/fd"), key=int)
    yield
    after = sorted(os.listdir("/proc/self/fd"), key=int)
    assert after == before, "fds left open"


def assert_closed(fd: int) -> None:
    with pytest.raises(OSError) as e:
        os.fstat(fd)
    assert e.value.errno == errno.EBADF


def mapped(name: str) -> bool:
    """Whether a memfd called `name` is mapped in this process."""
    with open("/proc/self/maps") as f:
        return f"/memfd:{name} " in f.read()


# ---- sealed blobs -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_seal_round_trip(kind: Callable[[bytes], bytes | bytearray | memoryview]) -> None:
    data = os.urandom(3 * PAGE + 123)
    fd = seal_bytes(kind(data))
    assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:fos-ipc")
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & REQUIRED_SEALS == REQUIRED_SEALS
    assert not os.get_inheritable(fd)
    with open_sealed(fd, len(data)) as view:
        assert_closed(fd)  # the mapping needs no fd of the caller's
        assert len(view) == len(data)
        assert view.memory.readonly
        assert bytes(view.memory) == data


def test_empty_blob() -> None:
    fd = seal_bytes(b"")
    with open_sealed(fd, 0) as view:
        assert len(view) == 0
        assert bytes(view.memory) == b""
    assert_closed(fd)


def test_sealed_memfd_resists_its_sender() -> None:
    """The sender keeps an fd to what it sent: every way of changing it fails."""
    data = b"the original" * 1000
    fd = seal_bytes(data)
    kept = os.dup(fd)
    with open_sealed(fd, len(data)) as view:
        attempts: dict[str, Callable[[], object]] = {
            "write": lambda: os.write(kept, b"evil"),
            "pwrite": lambda: os.pwrite(kept, b"evil", 0),
            "shrink": lambda: os.ftruncate(kept, 0),
            "grow": lambda: os.ftruncate(kept, len(data) + PAGE),
            "fallocate beyond the end": lambda: os.posix_fallocate(kept, 0, len(data) + PAGE),
            "writable shared mapping": lambda: mmap.mmap(kept, len(data), mmap.MAP_SHARED),
            "more seals": lambda: fcntl.fcntl(kept, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE),
        }
        for what, attempt in attempts.items():
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno == errno.EPERM, what
        # A new open file description of the same memfd: the seals are on the file itself.
        reopened = os.open(f"/proc/self/fd/{kept}", os.O_RDWR | os.O_CLOEXEC)
        try:
            with pytest.raises(PermissionError):
                os.write(reopened, b"evil")
        finally:
            os.close(reopened)
        # A private writable mapping is allowed, and changes only the sender's own copy.
        with mmap.mmap(kept, len(data), mmap.MAP_PRIVATE) as private:
            private[:4] = b"evil"
        assert bytes(view.memory) == data
    os.close(kept)


def test_future_write_seal_lets_an_old_mapping_write() -> None:
    """Why REQUIRED_SEALS has F_SEAL_WRITE: F_SEAL_FUTURE_WRITE leaves a sender's writable
    mapping made before sealing in place, and it can still change the data."""
    fd = os.memfd_create("future", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, PAGE)
    with mmap.mmap(fd, PAGE, mmap.MAP_SHARED) as sender:
        seals = F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        with pytest.raises(PermissionError):
            os.write(fd, b"new")
        sender[:4] = b"late"  # still possible
        assert os.pread(fd, 4, 0) == b"late"
        with pytest.raises(ShmError, match=r"^memfd not sealed: missing F_SEAL_WRITE$"):
            open_sealed(fd, PAGE)
    assert_closed(fd)


# Each maker returns an fd to hand to open_sealed and registers anything else it opened.
Maker = Callable[[Path, contextlib.ExitStack], int]


def unsealed_memfd(tmp: Path, stack: contextlib.ExitStack) -> int:
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, b"data")
    return fd


def memfd_without_sealing(tmp: Path, stack: contextlib.ExitStack) -> int:
    fd = os.memfd_create("no-sealing", os.MFD_CLOEXEC)  # born with F_SEAL_SEAL alone
    os.write(fd, b"data")
    return fd


def future_write_only(tmp: Path, stack: contextlib.ExitStack) -> int:
    fd = unsealed_memfd(tmp, stack)
    seals = F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def without_seal_seal(tmp: Path, stack: contextlib.ExitStack) -> int:
    fd = unsealed_memfd(tmp, stack)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS & ~fcntl.F_SEAL_SEAL)
    return fd


def regular_file(tmp: Path, stack: contextlib.ExitStack) -> int:
    path = tmp / "blob"
    path.write_bytes(b"data")
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def dev_shm_file(tmp: Path, stack: contextlib.ExitStack) -> int:
    """A tmpfs file: shmem like a memfd, and F_GET_SEALS works on it."""
    path = f"/dev/shm/fos-test-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.unlink(path)
    os.write(fd, b"data")
    return fd


def pipe(tmp: Path, stack: contextlib.ExitStack) -> int:
    r, w = os.pipe()
    stack.callback(os.close, w)
    return r


def unix_socket(tmp: Path, stack: contextlib.ExitStack) -> int:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stack.callback(b.close)
    return a.detach()


def oversize(tmp: Path, stack: contextlib.ExitStack) -> int:
    return seal_bytes(b"x" * 5000)


REJECTED: list[tuple[Maker, str]] = [
    (
        unsealed_memfd,
        r"^memfd not sealed: missing F_SEAL_WRITE, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_SEAL$",
    ),
    (
        memfd_without_sealing,
        r"^memfd not sealed: missing F_SEAL_WRITE, F_SEAL_SHRINK, F_SEAL_GROW$",
    ),
    (future_write_only, r"^memfd not sealed: missing F_SEAL_WRITE$"),
    (without_seal_seal, r"^memfd not sealed: missing F_SEAL_SEAL$"),
    (regular_file, r"^not a memfd: /.*/blob$"),
    (dev_shm_file, r"^not a memfd: /dev/shm/fos-test-[0-9]+ \(deleted\)$"),
    (pipe, r"^not a memfd: pipe:\[[0-9]+\]$"),
    (unix_socket, r"^not a memfd: socket:\[[0-9]+\]$"),
    (oversize, r"^sealed memfd of 5000 bytes exceeds the limit of 4096$"),
]


@pytest.mark.parametrize(
    ("make", "reason"), [pytest.param(m, r, id=m.__name__) for m, r in REJECTED]
)
def test_open_sealed_rejects_and_closes(make: Maker, reason: str, tmp_path: Path) -> None:
    before = fd_entries()
    with contextlib.ExitStack() as stack:
        fd = make(tmp_path, stack)
        with pytest.raises(ShmError, match=reason):
            open_sealed(fd, 4096)
        assert_closed(fd)
    assert fd_entries() == before
    assert not mapped("unsealed") and not mapped("fos-ipc")


def test_sealed_view_close() -> None:
    fd = seal_bytes(b"0123456789")
    view = open_sealed(fd, 10)
    kept = view.memory[2:5]
    view.close()
    view.close()
    with pytest.raises(ShmError, match="closed"):
        _ = view.memory
    # A slice taken before close() keeps the mapping (unmapping would crash on access) …
    assert bytes(kept) == b"234"
    assert mapped("fos-ipc")
    # … until it is released.
    kept.release()
    assert not mapped("fos-ipc")


# ---- the buffer pool ------------------------------------------------------------------------


def reader_child(sock: socket.socket, slots: int, slot_size: int) -> None:
    """Attach the pool whose fd arrives on `sock`, answer each "slot, length" with the
    sha256 of a copy of it, until an empty message."""
    _, fds, _, _ = socket.recv_fds(sock, 16, 1)
    with BufferPool.attach(fds[0], slots, slot_size) as pool:
        assert not pool.writable and pool.view(0, 1).readonly
        while request := sock.recv(16):
            slot, length = struct.unpack("<II", request)
            sock.send(hashlib.sha256(pool.copy(slot, length)).digest())


def test_pool_across_fork() -> None:
    slots, slot_size = 4, 2 * MiB
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b, BufferPool.create(slots, slot_size) as pool:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                a.close()
                reader_child(b, slots, slot_size)
                code = 0
            finally:
                os._exit(code)
        b.close()
        try:
            a.settimeout(30)
            socket.send_fds(a, [b"pool"], [pool.fd])
            payload = os.urandom(MiB)
            slot = pool.acquire()
            pool.write(slot, payload)
            a.send(struct.pack("<II", slot, len(payload)))
            assert a.recv(64) == hashlib.sha256(payload).digest()
            # Filled in place through a writable view, in another slot.
            other = pool.acquire()
            with pool.view(other, slot_size) as v:
                v[:] = payload * 2
            a.send(struct.pack("<II", other, slot_size))
            assert a.recv(64) == hashlib.sha256(payload * 2).digest()
            pool.release(slot)
            pool.release(other)
            a.send(b"")
        finally:
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def test_pool_is_shared_and_read_only_on_the_reader() -> None:
    with (
        BufferPool.create(2, PAGE, name="pool-test") as writer,
        BufferPool.attach(os.dup(writer.fd), 2, PAGE) as reader,
    ):
        with reader.view(1, 5) as seen:
            writer.write(1, b"hello")
            assert bytes(seen) == b"hello"  # zero-copy: the reader sees the write at once
            with pytest.raises(TypeError):
                seen[0] = 0
        with pytest.raises(ShmError, match="read-only"):
            reader.write(0, b"x")
        kept = reader.copy(1, 5)
        writer.write(1, b"HELLO")
        assert kept == b"hello"  # copy() is private
        assert reader.copy(1, 5) == b"HELLO"
    assert not mapped("pool-test")


@pytest.mark.parametrize(
    ("op", "reason"),
    [
        pytest.param(
            lambda p: p.write(2, b"x"),
            r"^slot 2 out of range: the buffer pool has slots 0\.\.1$",
            id="slot past the end",
        ),
        pytest.param(lambda p: p.write(-1, b"x"), r"^slot -1 out of range", id="negative slot"),
        pytest.param(
            lambda p: p.write(0, bytes(PAGE + 1)),
            rf"^{PAGE + 1} bytes at offset 0 exceed the slot size of {PAGE}$",
            id="data too long",
        ),
        pytest.param(
            lambda p: p.write(0, b"0123456789", offset=PAGE - 9),
            rf"^10 bytes at offset {PAGE - 9} exceed",
            id="offset + data too long",
        ),
        pytest.param(
            lambda p: p.write(0, b"x", offset=-1), r"^negative offset -1", id="negative offset"
        ),
        pytest.param(lambda p: p.view(1, PAGE + 1), r"exceed the slot size", id="view too long"),
        pytest.param(
            lambda p: p.copy(0, -1),
            r"^negative offset 0 or length -1 in slot 0$",
            id="negative length",
        ),
        pytest.param(lambda p: p.copy(5, 1), r"^slot 5 out of range", id="copy past the end"),
        pytest.param(
            lambda p: p.release(1),
            r"^slot 1 of the buffer pool is not in use$",
            id="release a free slot",
        ),
        pytest.param(lambda p: p.release(9), r"^slot 9 out of range", id="release past the end"),
    ],
)
def test_pool_bounds(op: Callable[[BufferPool], object], reason: str) -> None:
    with BufferPool.create(2, PAGE) as pool:
        with pytest.raises(ShmError, match=reason):
            op(pool)
        pool.write(0, b"y" * PAGE)  # the edges themselves are fine
        assert pool.copy(0, PAGE) == b"y" * PAGE
        assert pool.copy(1, 0) == b""


def test_pool_acquire_until_exhausted() -> None:
    with BufferPool.create(3, PAGE) as pool:
        assert [pool.acquire() for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ShmError, match=r"^no free slot: all 3 slots"):
            pool.acquire()
        pool.release(1)
        assert pool.acquire() == 1


@pytest.mark.parametrize(("slots", "slot_size"), [(0, PAGE), (2, 0), (-1, PAGE)])
def test_pool_shape(slots: int, slot_size: int) -> None:
    with pytest.raises(ShmError, match="needs slots of bytes"):
        BufferPool.create(slots, slot_size)


def test_attach_rejects_and_closes(tmp_path: Path) -> None:
    with BufferPool.create(2, PAGE) as pool:
        fd = os.dup(pool.fd)
        with pytest.raises(ShmError, match=rf"of {2 * PAGE} bytes, expected 3 slots of"):
            BufferPool.attach(fd, 3, PAGE)
        assert_closed(fd)
    # A memfd whose size is not sealed: its creator could shrink it under the reader (SIGBUS).
    fd = os.memfd_create("growable", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 2 * PAGE)
    with pytest.raises(ShmError, match="missing F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_SEAL"):
        BufferPool.attach(fd, 2, PAGE)
    assert_closed(fd)
    fd = regular_file(tmp_path, contextlib.ExitStack())
    with pytest.raises(ShmError, match="not a memfd"):
        BufferPool.attach(fd, 1, 4)
    assert_closed(fd)
    fd = seal_bytes(bytes(2 * PAGE))  # write-sealed: cannot be mapped writable
    with pytest.raises(ShmError, match="cannot map"):
        BufferPool.attach(fd, 2, PAGE, writable=True)
    assert_closed(fd)


def test_pool_close() -> None:
    pool = BufferPool.create(2, PAGE, name="pool-close")
    fd = pool.fd
    held = pool.view(0, 10)
    pool.close()
    pool.close()
    assert_closed(fd)
    for op in (pool.acquire, lambda: pool.copy(0, 1), lambda: pool.write(0, b"x")):
        with pytest.raises(ShmError, match=r"^the buffer pool is closed$"):
            op()
    # The view handed out before close() still works and keeps the mapping until released.
    held[:3] = b"abc"
    assert bytes(held[:3]) == b"abc"
    assert mapped("pool-close")
    held.release()
    assert not mapped("pool-close")
