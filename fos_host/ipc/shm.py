"""Shared memory across the sandbox boundary: sealed memfds and a reusable buffer pool.

A memfd is anonymous (no name in /dev/shm to leak or to be isolated by namespaces) and travels
as an fd over SCM_RIGHTS. Two uses:

- `seal_bytes` / `open_sealed`: one immutable blob. The sender seals the memfd against writes
  and size changes, so the receiver can check it once and use it without copying: the sender
  keeps its fd but can no longer change a byte. Costs a fresh mapping per transfer.
- `BufferPool`: one memfd of fixed slots, mapped once on each side and reused. Fresh pages
  cost 3-4 µs each to fault in here, so a new memfd per transfer is no faster than a socket
  (~0.7 GB/s); a pool mapped and pre-faulted once reaches memcpy speed. Its contents are not
  sealed (they are rewritten), so a receiver that does not trust the sender copies out.

CPython's mmap keeps its own dup of the fd until it is closed (3.11 has no trackfd=False): an
open `SealedView` holds one fd, a `BufferPool` two.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os

from fos_host.closing import Closing
from fos_host.errors import FosError

log = logging.getLogger(__name__)

# F_SEAL_FUTURE_WRITE (Linux 5.1) is not in 3.11's fcntl module. It is NOT enough: it stops
# new writes and new writable mappings, but a sender that mapped the memfd writable before
# sealing keeps writing through that mapping after the receiver has checked the data.
# F_SEAL_WRITE is refused (EBUSY) while any writable mapping exists, so it guarantees none.
F_SEAL_FUTURE_WRITE = 0x0010
REQUIRED_SEALS: int = (
    fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
)
"""What a received blob must carry: no writes, no size change, no way to change the seals."""
POOL_SEALS: int = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
"""What a pool carries: its contents change, its size must not — a peer that shrank the memfd
would turn the other side's next access into a SIGBUS."""
_SEAL_NAMES = (
    (fcntl.F_SEAL_WRITE, "F_SEAL_WRITE"),
    (fcntl.F_SEAL_SHRINK, "F_SEAL_SHRINK"),
    (fcntl.F_SEAL_GROW, "F_SEAL_GROW"),
    (fcntl.F_SEAL_SEAL, "F_SEAL_SEAL"),
)
MADV_POPULATE_WRITE = 23  # Linux 5.14; not in 3.11's mmap module
_MEMFD_FLAGS = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING


class ShmError(FosError):
    """A memfd or a pool access that cannot be used; the message says what was wrong (for a
    received fd: the reason to reject the message that carried it)."""


# --------------------------------------------------------------------------------------
# sealed blobs


def seal_bytes(data: bytes | bytearray | memoryview, name: str = "fos-ipc") -> int:
    """A new memfd (MFD_CLOEXEC | MFD_ALLOW_SEALING) holding `data`, sealed with
    REQUIRED_SEALS; returns the fd (the caller owns it). OSError if the kernel refuses
    (EMFILE, ENOMEM)."""
    view = memoryview(data).cast("B")
    fd = os.memfd_create(name, _MEMFD_FLAGS)
    try:
        # write(2), not a mapping: F_SEAL_WRITE fails with EBUSY while a writable mapping
        # exists, and this way none ever does.
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


class SealedView(Closing):
    """A read-only mapping of a received sealed memfd (from `open_sealed`).

    `memory` is zero-copy and safe to use as it is: the seals guarantee nobody can change or
    truncate it. Slices of it stay valid after `close()`: the mapping then goes away when the
    last of them is released (unmapping under them would crash the process instead).
    """

    def __init__(self, mm: mmap.mmap | None, size: int) -> None:
        self._mm = mm
        self._size = size
        self._memory: memoryview | None = memoryview(mm) if mm is not None else memoryview(b"")

    @property
    def memory(self) -> memoryview:
        """The contents, read-only."""
        if self._memory is None:
            raise ShmError("the sealed view is closed")
        return self._memory

    def __len__(self) -> int:
        return self._size

    def close(self) -> None:
        """Unmap (idempotent)."""
        if self._memory is None:
            return
        _unmap(self._mm, self._memory)
        self._mm = self._memory = None


def open_sealed(fd: int, max_size: int) -> SealedView:
    """Map a sealed memfd received from a peer, read-only. Takes ownership of `fd`: it is
    closed in every case (the mapping needs no fd of ours).

    Rejects with a ShmError what could change under the reader or is not what it claims:
    anything but a memfd, a memfd lacking one of REQUIRED_SEALS, one above `max_size` bytes.
    """
    try:
        size = _sealed_size(fd, REQUIRED_SEALS)
        if size > max_size:
            raise ShmError(f"sealed memfd of {size} bytes exceeds the limit of {max_size}")
        if size == 0:  # mmap cannot map 0 bytes
            return SealedView(None, 0)
        return SealedView(_map(fd, size, writable=False), size)
    finally:
        os.close(fd)


def _sealed_size(fd: int, required: int) -> int:
    """The size of memfd `fd` after checking that it is one and carries `required` seals."""
    st = os.fstat(fd)  # EBADF: not an fd at all, a bug of the caller rather than of the peer
    # The name is for the message: the seals are the guarantee. Only shmem files can carry
    # seals, and those that are not memfds (tmpfs, /dev/shm) have F_SEAL_SEAL alone, fixed.
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        raise ShmError(f"cannot tell what fd {fd} is: /proc/self/fd: {e.strerror}") from e
    if not target.startswith("/memfd:"):
        raise ShmError(f"not a memfd: {target}")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as e:
        raise ShmError(f"not a memfd: {target} has no seals ({e.strerror})") from e
    missing = [name for bit, name in _SEAL_NAMES if required & bit and not seals & bit]
    if missing:
        raise ShmError(f"memfd not sealed: missing {', '.join(missing)}")
    return st.st_size


def _map(fd: int, size: int, *, writable: bool, populate: bool = False) -> mmap.mmap:
    """A shared mapping of `size` bytes of `fd`. `populate` fills the page tables at once
    (MAP_POPULATE) instead of one fault per page on first touch — only for memory this side
    made: populating a peer's sparse memfd would allocate all of it, here."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
    try:
        return mmap.mmap(fd, size, flags=flags, prot=prot)
    except OSError as e:
        raise ShmError(f"cannot map {size} bytes of shared memory: {e.strerror}") from e


def _unmap(mm: mmap.mmap | None, view: memoryview) -> None:
    view.release()
    if mm is None:
        return
    try:
        mm.close()
    except BufferError:
        # Memoryviews handed out (slices of `view`) still point into the mapping: unmapping
        # now would make their next access a segfault, so mmap refuses. Dropping our reference
        # leaves it to them: the mapping is unmapped when the last one is released.
        log.debug("mapping still in use by memoryviews: unmapped when they are released")


# --------------------------------------------------------------------------------------
# the buffer pool


class BufferPool(Closing):
    """A reusable, pre-mapped shared buffer: `slots` slots of `slot_size` bytes in one memfd.

    The creating side (`create`) maps it read-write, faults every page in once and hands `fd`
    to the peer once; the peer `attach`es it. Who may use which slot when is the channel's
    business (it passes slot numbers in messages); the pool only keeps the writer's own
    bookkeeping (`acquire` / `release`) and checks every slot index and length.

    Reading: `view` is zero-copy, but the bytes can change under it while a sender writes to
    the slot — NOT safe against an untrusted sender (check-then-use races). Use `copy` when the
    sender is untrusted: parse the copy, never the view.

    Views (memoryviews from `view`) pin the mapping: release them (`with pool.view(…) as v:`)
    before `close()`, else the mapping stays until they are released.
    """

    def __init__(self, fd: int, slots: int, slot_size: int, mm: mmap.mmap, writable: bool) -> None:
        """Use `create` or `attach`."""
        self.fd = fd
        self.slots = slots
        self.slot_size = slot_size
        self.writable = writable
        self._mm: mmap.mmap | None = mm
        self._memory = memoryview(mm)
        self._free = list(range(slots - 1, -1, -1))  # a stack: acquire() hands out 0 first
        self._in_use: set[int] = set()

    @classmethod
    def create(cls, slots: int, slot_size: int, name: str = "fos-pool") -> BufferPool:
        """A new pool, mapped read-write and pre-faulted; hand `fd` to the peer."""
        size = _pool_size(slots, slot_size)
        fd = os.memfd_create(name, _MEMFD_FLAGS)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, POOL_SEALS)
            mm = _map(fd, size, writable=True, populate=True)
            try:
                _prefault(mm)
            except BaseException:
                mm.close()
                raise
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, slots, slot_size, mm, writable=True)

    @classmethod
    def attach(cls, fd: int, slots: int, slot_size: int, writable: bool = False) -> BufferPool:
        """Map the peer's pool. Takes ownership of `fd` (closed on error, else by `close`).
        ShmError if it is not a memfd of exactly `slots * slot_size` bytes whose size is sealed.
        """
        try:
            size = _pool_size(slots, slot_size)
            actual = _sealed_size(fd, POOL_SEALS)
            if actual != size:
                raise ShmError(
                    f"buffer pool memfd of {actual} bytes, expected {slots} slots of "
                    f"{slot_size} bytes = {size}"
                )
            mm = _map(fd, size, writable=writable)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, slots, slot_size, mm, writable)

    # writer side

    def acquire(self) -> int:
        """A free slot's index, now in use until `release`."""
        self._live()
        if not self._free:
            raise ShmError(f"no free slot: all {self.slots} slots of the buffer pool are in use")
        slot = self._free.pop()
        self._in_use.add(slot)
        return slot

    def release(self, slot: int) -> None:
        """Give back a slot from `acquire`."""
        self._check(slot, 0)
        if slot not in self._in_use:
            raise ShmError(f"slot {slot} of the buffer pool is not in use")
        self._in_use.remove(slot)
        self._free.append(slot)

    def write(self, slot: int, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        """Copy `data` into `slot` at `offset`."""
        n = memoryview(data).nbytes
        start = self._check(slot, n, offset)
        if not self.writable:
            raise ShmError("this side of the buffer pool is read-only")
        mm = self._mm
        assert mm is not None  # _check ensured it
        mm[start : start + n] = data

    # both sides

    def view(self, slot: int, length: int) -> memoryview:
        """The first `length` bytes of `slot`, zero-copy: writable on a writable side (to fill
        in place), read-only otherwise. The class docstring says when not to trust it."""
        start = self._check(slot, length)
        return self._memory[start : start + length]

    def copy(self, slot: int, length: int) -> bytes:
        """The first `length` bytes of `slot` as a private copy: what the sender does to the
        slot afterwards cannot change it."""
        start = self._check(slot, length)
        mm = self._mm
        assert mm is not None
        return mm[start : start + length]

    def close(self) -> None:
        """Unmap and close the fd (idempotent)."""
        if self._mm is None:
            return
        _unmap(self._mm, self._memory)
        self._mm = None
        os.close(self.fd)

    def _live(self) -> None:
        if self._mm is None:
            raise ShmError("the buffer pool is closed")

    def _check(self, slot: int, length: int, offset: int = 0) -> int:
        """The byte offset of `offset` in `slot`, after checking that `length` bytes from
        there fit in the slot."""
        self._live()
        if not 0 <= slot < self.slots:
            raise ShmError(
                f"slot {slot} out of range: the buffer pool has slots 0..{self.slots - 1}"
            )
        if offset < 0 or length < 0:
            raise ShmError(f"negative offset {offset} or length {length} in slot {slot}")
        if offset + length > self.slot_size:
            raise ShmError(
                f"{length} bytes at offset {offset} exceed the slot size of {self.slot_size}"
            )
        return slot * self.slot_size + offset


def _pool_size(slots: int, slot_size: int) -> int:
    if slots < 1 or slot_size < 1:
        raise ShmError(f"a buffer pool needs slots of bytes, not {slots} slots of {slot_size}")
    return slots * slot_size


def _prefault(mm: mmap.mmap) -> None:
    """Make sure every page of a fresh writable mapping is allocated now, so that transfers
    run at memcpy speed.

    MAP_POPULATE (in `_map`) already faulted the pages in, but ignores failures, which would
    then hit the first write instead; MADV_POPULATE_WRITE reports them (ENOMEM) and costs only
    a page-table walk once all pages are present.
    """
    try:
        mm.madvise(MADV_POPULATE_WRITE)
    except OSError as e:
        if e.errno == errno.EINVAL:  # a kernel before 5.14: MAP_POPULATE's work has to do
            return
        raise ShmError(f"cannot allocate a buffer pool of {len(mm)} bytes: {e.strerror}") from e
