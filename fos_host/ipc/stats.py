"""A read-only stats page: the host publishes, local tools (`fos-host top`) map it unasked.

This is the one use of posix_ipc here: a *named* shared memory object in /dev/shm, so that a
tool started later finds it by name without a connection to the host. Names in /dev/shm are
not isolated by IPC namespaces and outlive a creator that dies before unlinking them, so this
is for the host and its own local tools only, never across the sandbox boundary (that is
`fos_host.ipc.shm`'s memfds). A page is `/fos.<pid>.<starttime>.stats` (starttime: field 22 of
/proc/<pid>/stat), so `cleanup_stale_pages` can tell a dead host's page from a live one's —
the rule of `CgroupSystem.cleanup_stale` for cgroup directories.

Layout: a 16-byte header — u64 sequence, u32 body length, 4 bytes padding — then the body,
JSON. The sequence is a seqlock: odd while the host writes; a reader retries until it reads
the same even sequence before and after the body. Single writer per page.

Each sequence update must be one aligned 8-byte store, or a reader sees a value in between:
`struct.pack_into` zero-fills its target first (readers saw the sequence drop to 0), so the
writer stores through a ctypes c_uint64 (one memcpy of constant size: one store). Memory
ordering: CPython does each load and store of the protocol in its own C call, and x86-64 keeps
stores in program order and loads in program order (TSO), so no barriers are needed; a weakly
ordered CPU (arm64) would need them, which Python cannot issue.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import mmap
import os
import re
import struct
import time
from pathlib import Path
from typing import Any

import posix_ipc

from fos_host.closing import Closing
from fos_host.errors import FosError
from fos_host.kernel import proc

log = logging.getLogger(__name__)

PAGE_PREFIX = "fos."
PAGE_SUFFIX = ".stats"
SHM_DIR = Path("/dev/shm")
_PAGE_RE = re.compile(r"fos\.([0-9]+)\.([0-9]+)\.stats")
_HEADER = struct.Struct("<QI4x")  # sequence, body length, padding: the body starts aligned
_SEQ = struct.Struct("<Q")  # reading only: unpack_from is one 8-byte load
_LEN = struct.Struct("<I")
_LEN_OFFSET = _SEQ.size


class StatsPage(Closing):
    """The host's stats page, created on construction, unlinked by `close()`.

    One per process (its name is the process's): a second one fails while the first is open.
    Mode 0600: only the host's own user (and root) can read it; tabs' URLs may be in it.
    """

    def __init__(self, size: int = 64 * 1024) -> None:
        if size <= _HEADER.size:
            raise FosError(f"a stats page needs more than {_HEADER.size} bytes, not {size}")
        pid = os.getpid()
        self._name = f"/{PAGE_PREFIX}{pid}.{proc.starttime(pid)}{PAGE_SUFFIX}"
        try:
            shm = posix_ipc.SharedMemory(self._name, posix_ipc.O_CREX, mode=0o600, size=size)
        except posix_ipc.Error as e:
            if not SHM_DIR.is_dir():  # posix_ipc then says "does not exist", of the page
                raise FosError(f"cannot create the stats page: no {SHM_DIR}") from e
            raise FosError(f"cannot create the stats page {self._name}: {e}") from e
        try:
            self._size: int = shm.size  # gone once the fd is closed
            self._mm: mmap.mmap | None = mmap.mmap(shm.fd, self._size)
            self._seq: ctypes.c_uint64 | None = ctypes.c_uint64.from_buffer(self._mm)
        except BaseException:
            posix_ipc.unlink_shared_memory(self._name)
            raise
        finally:
            shm.close_fd()  # the mapping keeps the memory

    @property
    def name(self) -> str:
        """The page's name for `read_stats`: "/fos.<pid>.<starttime>.stats"."""
        return self._name

    def publish(self, stats: dict[str, Any]) -> None:
        """Replace the page's contents with `stats` as JSON; readers never see half of it."""
        mm, seq_field = self._mm, self._seq
        if mm is None or seq_field is None:
            raise FosError(f"the stats page {self._name} is closed")
        body = json.dumps(stats, separators=(",", ":")).encode()
        room = self._size - _HEADER.size
        if len(body) > room:
            raise FosError(
                f"stats of {len(body)} bytes do not fit the stats page of {self._size} bytes "
                f"({room} for the stats)"
            )
        # From the page, not a counter of ours, so that a forked writer continues the sequence;
        # & ~1 ends a write a dead writer left odd.
        seq = seq_field.value & ~1
        seq_field.value = seq + 1
        _LEN.pack_into(mm, _LEN_OFFSET, len(body))
        mm[_HEADER.size : _HEADER.size + len(body)] = body
        seq_field.value = seq + 2

    def close(self) -> None:
        """Unmap and unlink the page (idempotent)."""
        if self._mm is None:
            return
        self._seq = None  # it holds a buffer export, which mmap.close() refuses
        self._mm.close()
        self._mm = None
        with contextlib.suppress(posix_ipc.ExistentialError):  # a cleaner removed it already
            posix_ipc.unlink_shared_memory(self._name)


def read_stats(name: str, retries: int = 100) -> dict[str, Any]:
    """The stats last published on page `name`, {} if none yet. FosError if there is no such
    page or it does not hold still during any of `retries` reads (~55 ms in all for 100: a
    host stuck mid-update)."""
    try:
        shm = posix_ipc.SharedMemory(name, read_only=True)
    except posix_ipc.ExistentialError as e:
        raise FosError(f"no stats page {name}: is the host running?") from e
    except posix_ipc.Error as e:
        raise FosError(f"cannot open the stats page {name}: {e}") from e
    try:
        size = shm.size
        if size <= _HEADER.size:
            raise FosError(f"{name} is not a stats page: {size} bytes")
        mm = mmap.mmap(shm.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        shm.close_fd()
    room = size - _HEADER.size
    with mm:
        for attempt in range(retries):
            seq, length = _HEADER.unpack_from(mm, 0)
            body = mm[_HEADER.size : _HEADER.size + min(length, room)]
            if _SEQ.unpack_from(mm, 0)[0] == seq and seq % 2 == 0 and length <= room:
                return _decode(name, body) if seq else {}
            # Retry at once: a clash with one update passes in microseconds. Every 10th try,
            # pause (1, 2, 3 … ms): a writer preempted mid-update holds the page for a
            # scheduler tick or more (4-28 ms seen), and a reader that pauses after every try
            # is slow enough just after waking to clash with a busy writer every time.
            if attempt % 10 == 9:
                time.sleep((attempt + 1) / 10 * 1e-3)
    raise FosError(f"the stats page {name} changed during each of {retries} reads")


def _decode(name: str, body: bytes) -> dict[str, Any]:
    try:
        stats = json.loads(body)
    except ValueError as e:
        raise FosError(f"the stats page {name} does not hold JSON: {e}") from e
    if not isinstance(stats, dict):
        raise FosError(f"the stats page {name} holds a {type(stats).__name__}, not an object")
    return stats


def list_pages() -> list[str]:
    """The names of the fos stats pages in /dev/shm, live or stale."""
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(f"/{entry}" for entry in entries if _PAGE_RE.fullmatch(entry))


def cleanup_stale_pages() -> list[str]:
    """Unlink the pages of hosts no longer alive (no process with that pid and start time);
    returns their names. A page of another user's dead host is left (with a warning) if /dev/shm
    does not let us remove it."""
    removed = []
    for name in list_pages():
        m = _PAGE_RE.fullmatch(name[1:])
        assert m is not None  # list_pages matched it
        if proc.starttime(int(m.group(1))) == int(m.group(2)):
            continue
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:  # another cleaner was faster
            continue
        except posix_ipc.PermissionsError as e:
            log.warning("cannot remove the stale stats page %s: %s", name, e)
            continue
        removed.append(name)
    return removed
