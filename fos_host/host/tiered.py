"""The tiered snapshot store: where a hibernated or discarded tab's page snapshot waits.

    store = TieredStore(profile / "snapshots", StoreConfig(warm_budget=64 * MiB))
    store.put("tab-7", snapshot, SnapshotMeta(url, title))      # warm: LZ4 in memory
    store.demote("tab-7")                                        # cold: a file on disk
    data = store.get("tab-7")                                    # back to warm, the bytes

Three tiers, each with a budget in bytes (`StoreConfig`):

- **hot** — the bytes as given: costs the most memory, gives them back at once;
- **warm** — an LZ4 frame in memory (a real page's snapshot shrinks ~2.2x): a hibernated tab;
- **cold** — one file per key, `fos-<key>.snap` in the store's directory: a discarded tab.

An entry is in exactly one tier. `get` **promotes** it one step (cold → warm, warm → hot) when
the tier above has room within its budget, so what is used again climbs back and what is not
stays down; a cold file is removed once its entry is warm again. `rebalance()` **demotes** the
least recently used entries of each tier over its budget (hot → warm → cold) and, over the
cold budget, **evicts** the least recently used cold snapshots. `squeeze()` is the memory
pressure hook: it demotes hot and warm entries one step, least recently used first, until it
has freed the bytes asked for (or all of them). Neither `put` nor `get` moves other entries:
the host calls `rebalance()` after its lifecycle actions.

An evicted or damaged snapshot is **lost** but its metadata is not: the entry stays in the
store as `StoreTier.LOST` (on disk a meta-only stub file, so it survives a restart too), and
`get` raises `SnapshotLost` — or `CorruptSnapshot`, its subclass, naming the file and what was
wrong with it — whose `meta.url` is what the tab reloads from. Nothing else is affected.

Cold files are crash-safe: each is written to a temporary file in the same directory
(`.fos-*.tmp`), fsynced, renamed over the old one and the directory fsynced, so a crash or a
full disk leaves either the old file or the new one, never a mix. A write that fails (ENOSPC,
EIO) removes its temporary file, leaves the previous file as it was, keeps the entry in the
warm tier and raises `SnapshotWriteError`. Every file has a header with a magic, the format
version, the lengths and CRC-32s of the header, the metadata and the payload (see
`write_snapshot_file`); metadata are checked when the store opens, payloads when they are
read. Opening the store on the same directory (the next host) removes leftover temporary
files and lists what the disk holds, with its metadata (`cold_entries()`); files it
cannot even list are reported in `damaged` and left alone (`drop` removes them).

Blocking: `TieredStore(...)` (lists the directory), `get` of a cold entry, `demote` of a warm
entry, `put(..., tier=COLD)`, `rebalance`, `squeeze` and `drop` (when a file exists) do disk
I/O and fsync: the host runs those on a thread (`asyncio.to_thread`). Every method takes the
store's lock, so calls from the event loop and from worker threads may mix; a call waits while
another thread writes a file (a few ms). The disk work itself is the plain functions
`write_snapshot_file` and `read_snapshot_file`, which hold no state.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import json
import logging
import os
import re
import struct
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

import lz4.frame

from fos_host.errors import FosError

log = logging.getLogger(__name__)

MiB = 1 << 20

MAGIC = b"FOSSNAP\0"
FORMAT_VERSION = 1
# magic, version, flags, meta length, payload length, raw length, crc32 of meta, of payload,
# of the 40 bytes before it (so lengths are trusted only once the header checks out).
_HEADER = struct.Struct("<8sHHIQQIII")
_FLAG_LOST = 1  # a meta-only stub: the snapshot was evicted (the reason is in the meta)
MAX_META = 64 * 1024
MAX_SNAPSHOT = 1 << 30
"""Largest snapshot the store keeps, uncompressed (a header claiming more is damaged)."""

P = ParamSpec("P")
R = TypeVar("R")

_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_FILE_PREFIX, _FILE_SUFFIX = "fos-", ".snap"
_TMP_PREFIX, _TMP_SUFFIX = ".fos-", ".tmp"


class StoreTier(enum.Enum):
    """Where an entry is. Ordered from the top: demotion moves one step down."""

    HOT = "hot"  # the bytes, in memory
    WARM = "warm"  # LZ4-compressed, in memory
    COLD = "cold"  # LZ4-compressed, in a file
    LOST = "lost"  # only the metadata: the snapshot was evicted or is damaged


_DOWN = {StoreTier.HOT: StoreTier.WARM, StoreTier.WARM: StoreTier.COLD}


@dataclass(frozen=True)
class SnapshotMeta:
    """What the host needs to list a held tab after a restart, and to reload it from its URL
    if its snapshot is lost."""

    url: str
    title: str = ""
    created: float = field(default_factory=time.time)  # wall clock: it outlives the process


@dataclass(frozen=True)
class StoreConfig:
    """Each tier's budget, in bytes (see `rebalance`), and how hard LZ4 tries."""

    hot_budget: int = 16 * MiB
    warm_budget: int = 128 * MiB
    cold_budget: int = 1024 * MiB  # file sizes on disk
    compression_level: int = 0  # lz4.frame: 0 is the fast default, up to 16

    def __post_init__(self) -> None:
        for name in ("hot_budget", "warm_budget", "cold_budget"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")


class SnapshotLost(FosError):
    """The snapshot of `key` is gone (evicted or damaged): reload the tab from `meta.url`."""

    def __init__(self, key: str, meta: SnapshotMeta | None, why: str) -> None:
        self.key = key
        self.meta = meta
        self.why = why
        where = f"; reload it from {meta.url}" if meta is not None else ""
        super().__init__(f"snapshot {key!r} is lost: {why}{where}")


class CorruptSnapshot(SnapshotLost):
    """A cold file that fails its checks: names the file and what was wrong. `meta` is None
    when the damage is in the header or the metadata themselves."""

    def __init__(self, key: str, path: Path, reason: str, meta: SnapshotMeta | None = None) -> None:
        self.path = path
        self.reason = reason
        super().__init__(key, meta, f"damaged file {path}: {reason}")


class SnapshotWriteError(FosError):
    """A cold file could not be written; the previous file (if any) is intact and the entry
    is still in memory."""

    def __init__(self, key: str, path: Path, err: OSError) -> None:
        self.key = key
        self.path = path
        self.errno = err.errno
        name = errno.errorcode.get(err.errno or 0, str(err.errno))
        super().__init__(
            f"cannot write snapshot {key!r} to {path}: {name} ({err.strerror}); "
            "it stays in memory (warm tier)"
        )


# --------------------------------------------------------------------------------------
# cold files: plain functions, no state (the host may run them on any thread)


@dataclass(frozen=True)
class ColdFile:
    """A cold file's contents as read back. `payload` is None when only the header and the
    metadata were read, or for a lost-snapshot stub (`lost` says why)."""

    key: str
    meta: SnapshotMeta
    raw_size: int
    payload: bytes | None
    lost: str | None
    file_size: int


def snapshot_path(directory: Path, key: str) -> Path:
    """The cold file of `key`. ValueError for a key that cannot be a file name."""
    if not _KEY_RE.fullmatch(key):
        raise ValueError(
            f"snapshot key {key!r}: 1-128 letters, digits, '_', '.' and '-', "
            "starting with a letter or digit"
        )
    return directory / f"{_FILE_PREFIX}{key}{_FILE_SUFFIX}"


def write_snapshot_file(
    directory: Path,
    key: str,
    meta: SnapshotMeta,
    payload: bytes,
    raw_size: int,
    lost: str | None = None,
) -> int:
    """Write `payload` (an LZ4 frame of `raw_size` bytes) as the cold file of `key`,
    atomically; returns the file's size. With `lost`, a meta-only stub (empty payload).

    Layout: the header (`_HEADER`, 44 bytes, little-endian), the metadata as UTF-8 JSON
    ({"key", "url", "title", "created"[, "lost"]}), the payload. SnapshotWriteError if the
    disk refuses: the temporary file is removed and the previous file left as it was.
    """
    path = snapshot_path(directory, key)
    doc: dict[str, object] = {
        "key": key,
        "url": meta.url,
        "title": meta.title,
        "created": meta.created,
    }
    if lost is not None:
        doc["lost"] = lost
    meta_bytes = json.dumps(doc, ensure_ascii=False).encode()
    if len(meta_bytes) > MAX_META:
        raise ValueError(f"snapshot {key!r}: metadata of {len(meta_bytes)} bytes > {MAX_META}")
    head = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        _FLAG_LOST if lost is not None else 0,
        len(meta_bytes),
        len(payload),
        raw_size,
        zlib.crc32(meta_bytes),
        zlib.crc32(payload),
        0,
    )
    head = head[:-4] + struct.pack("<I", zlib.crc32(head[:-4]))
    try:
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX, dir=directory)
    except OSError as e:
        raise SnapshotWriteError(key, path, e) from e
    try:
        try:
            for part in (head, meta_bytes, payload):
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise SnapshotWriteError(key, path, e) from e
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    try:
        _fsync_dir(directory)
    except OSError as e:  # the new file is in place; only its durability is in doubt
        raise SnapshotWriteError(key, path, e) from e
    return len(head) + len(meta_bytes) + len(payload)


def read_snapshot_file(path: Path, key: str, payload: bool = True) -> ColdFile:
    """The cold file at `path`, checked: magic, version, header, metadata (its key must be
    `key`) and, with `payload`, the payload's length and CRC. CorruptSnapshot says what is
    wrong (with the metadata when they were readable); OSError if it cannot be read at all.
    The payload is not decompressed here (the store does it, bounded by the raw size)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise CorruptSnapshot(
                key, path, f"short file: {size} bytes, the header alone is {_HEADER.size}"
            )
        magic, version, flags, meta_len, payload_len, raw_size, meta_crc, payload_crc, head_crc = (
            _HEADER.unpack(head)
        )
        if magic != MAGIC:
            raise CorruptSnapshot(key, path, "not a fos snapshot file (bad magic)")
        if version != FORMAT_VERSION:
            raise CorruptSnapshot(
                key, path, f"format version {version}; this host reads version {FORMAT_VERSION}"
            )
        if zlib.crc32(head[:-4]) != head_crc:
            raise CorruptSnapshot(key, path, "header checksum mismatch")
        if meta_len > MAX_META or raw_size > MAX_SNAPSHOT:
            raise CorruptSnapshot(
                key,
                path,
                f"header claims {meta_len} bytes of metadata and a {raw_size}-byte snapshot",
            )
        expected = _HEADER.size + meta_len + payload_len
        if size != expected:
            why = "truncated" if size < expected else "trailing bytes"
            raise CorruptSnapshot(key, path, f"{why}: {size} bytes, the header says {expected}")
        meta_bytes = f.read(meta_len)
        if zlib.crc32(meta_bytes) != meta_crc:
            raise CorruptSnapshot(key, path, "metadata checksum mismatch")
        meta, lost = _parse_meta(meta_bytes, key, path)
        if flags & _FLAG_LOST and lost is None:
            raise CorruptSnapshot(key, path, "a lost-snapshot stub without a reason", meta)
        data = None
        if payload and lost is None:
            data = f.read(payload_len)
            if zlib.crc32(data) != payload_crc:
                raise CorruptSnapshot(key, path, "payload checksum mismatch", meta)
    return ColdFile(key, meta, raw_size, data, lost, size)


def _parse_meta(data: bytes, key: str, path: Path) -> tuple[SnapshotMeta, str | None]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptSnapshot(key, path, f"metadata are not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("key") != key:
        raise CorruptSnapshot(key, path, f"metadata of another key: {str(doc)[:80]}")
    url, title, created = doc.get("url"), doc.get("title"), doc.get("created")
    lost = doc.get("lost")
    if not (
        isinstance(url, str)
        and isinstance(title, str)
        and isinstance(created, int | float)
        and not isinstance(created, bool)
        and (lost is None or isinstance(lost, str))
    ):
        raise CorruptSnapshot(key, path, f"malformed metadata: {str(doc)[:80]}")
    return SnapshotMeta(url, title, float(created)), lost


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _decompress(frame: bytes, raw_size: int) -> bytes:
    """The bytes of an LZ4 frame that must hold exactly `raw_size` of them (never more are
    produced, whatever the frame says); ValueError saying why not."""
    d = lz4.frame.LZ4FrameDecompressor()
    try:
        raw = d.decompress(frame, max_length=raw_size + 1)
    except RuntimeError as e:
        raise ValueError(f"payload is not an LZ4 frame: {e}") from None
    if len(raw) != raw_size or not d.eof or d.unused_data:
        raise ValueError(f"payload decompresses to {len(raw)}+ bytes, not {raw_size}")
    return bytes(raw)


# --------------------------------------------------------------------------------------
# the store


@dataclass
class _Entry:
    meta: SnapshotMeta
    tier: StoreTier
    raw_size: int
    data: bytes | None  # hot: the bytes; warm: the LZ4 frame; cold and lost: None
    stored: int  # bytes it costs its tier: len(data), or the cold file's size; 0 when lost
    why: str = ""  # when lost


@dataclass(frozen=True)
class TierStats:
    count: int
    bytes: int  # what the tier holds (hot: raw, warm: compressed, cold: file sizes)
    raw_bytes: int  # the same snapshots uncompressed


@dataclass(frozen=True)
class StoreStats:
    hot: TierStats
    warm: TierStats
    cold: TierStats
    lost: int  # entries whose snapshot is gone (metadata only)

    @property
    def compression_ratio(self) -> float | None:
        """Uncompressed over compressed bytes in the warm and cold tiers (None if empty)."""
        stored = self.warm.bytes + self.cold.bytes
        return (self.warm.raw_bytes + self.cold.raw_bytes) / stored if stored else None


@dataclass
class Moves:
    """What `rebalance` or `squeeze` did. `evicted`: keys whose snapshot was dropped for the
    cold budget (their tabs will reload from `meta(key).url`). `errors`: cold writes that
    failed (those entries stayed warm); the first one stops further cold writes."""

    demoted: list[tuple[str, StoreTier]] = field(default_factory=list)  # key, its new tier
    evicted: list[str] = field(default_factory=list)
    errors: list[SnapshotWriteError] = field(default_factory=list)
    freed: int = 0  # bytes of memory freed (hot and warm)


def _locked(
    method: Callable[Concatenate[TieredStore, P], R],
) -> Callable[Concatenate[TieredStore, P], R]:
    @functools.wraps(method)
    def locked(self: TieredStore, *args: P.args, **kw: P.kwargs) -> R:
        with self._lock:
            return method(self, *args, **kw)

    return locked


class TieredStore:
    """See the module's docstring. Keys are stable ids (a tab's), 1-128 characters of
    letters, digits, '_', '.' and '-'."""

    def __init__(self, directory: Path, config: StoreConfig | None = None) -> None:
        self.config = config or StoreConfig()
        self.directory = directory  # made (0700) if missing
        self._lock = threading.RLock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self.damaged: list[CorruptSnapshot] = []  # cold files found unreadable at open
        self._open()

    # -- what is held ------------------------------------------------------------------------

    @_locked
    def __contains__(self, key: str) -> bool:
        return key in self._entries

    @_locked
    def tier_of(self, key: str) -> StoreTier:
        return self._entry(key).tier

    @_locked
    def meta(self, key: str) -> SnapshotMeta:
        return self._entry(key).meta

    @_locked
    def keys(self, tier: StoreTier | None = None) -> list[str]:
        """The keys (of one tier), least recently used first."""
        return [k for k, e in self._entries.items() if tier is None or e.tier is tier]

    @_locked
    def cold_entries(self) -> dict[str, SnapshotMeta]:
        """What the disk holds — cold entries and lost ones (their stubs) — with their
        metadata, least recently used first: after a restart, the tabs to bring back."""
        on_disk = (StoreTier.COLD, StoreTier.LOST)
        return {k: e.meta for k, e in self._entries.items() if e.tier in on_disk}

    @_locked
    def stats(self) -> StoreStats:
        def of(tier: StoreTier) -> TierStats:
            held = [e for e in self._entries.values() if e.tier is tier]
            return TierStats(len(held), sum(e.stored for e in held), sum(e.raw_size for e in held))

        lost = sum(1 for e in self._entries.values() if e.tier is StoreTier.LOST)
        return StoreStats(of(StoreTier.HOT), of(StoreTier.WARM), of(StoreTier.COLD), lost)

    # -- in and out --------------------------------------------------------------------------

    @_locked
    def put(
        self, key: str, data: bytes, meta: SnapshotMeta, tier: StoreTier = StoreTier.WARM
    ) -> None:
        """Hold `data` for `key` in `tier` (replacing what was held). Budgets are not
        enforced here (`rebalance`). With COLD: blocks; SnapshotWriteError if the write
        fails, and then the snapshot is held warm (the previous file stays as it was)."""
        path = snapshot_path(self.directory, key)
        if tier is StoreTier.LOST:
            raise ValueError("put: a snapshot cannot be stored lost")
        if len(data) > MAX_SNAPSHOT:
            raise ValueError(f"snapshot {key!r} of {len(data)} bytes > {MAX_SNAPSHOT}")
        old = self._entries.pop(key, None)
        if tier is StoreTier.HOT:
            entry = _Entry(meta, tier, len(data), bytes(data), len(data))
        else:
            frame = self._compress(data)
            entry = _Entry(meta, StoreTier.WARM, len(data), frame, len(frame))
        self._entries[key] = entry
        if tier is StoreTier.COLD:
            self._to_cold(key, entry)  # overwrites the old file, if any
        elif old is not None and old.tier in (StoreTier.COLD, StoreTier.LOST):
            _remove(path)

    @_locked
    def get(self, key: str, promote: bool = True) -> bytes:
        """The snapshot's bytes; promotes the entry one step if the tier above has room
        (not with `promote=False`, which also leaves its place in the age order).
        KeyError if nothing is held for `key`; SnapshotLost (or CorruptSnapshot, for a cold
        file that fails its checks) when only the metadata are left: reload from the URL.
        Blocks for a cold entry."""
        entry = self._entry(key)
        if promote:
            self._entries.move_to_end(key)
        if entry.tier is StoreTier.LOST:
            raise SnapshotLost(key, entry.meta, entry.why)
        if entry.tier is StoreTier.HOT:
            assert entry.data is not None
            return entry.data
        if entry.tier is StoreTier.WARM:
            assert entry.data is not None
            raw = _decompress(entry.data, entry.raw_size)
            if promote and self._room(StoreTier.HOT, len(raw)):
                entry.tier, entry.data, entry.stored = StoreTier.HOT, raw, len(raw)
            return raw
        path = snapshot_path(self.directory, key)
        try:
            frame, raw = self._read_cold(key, path)
        except SnapshotLost as e:
            entry.tier, entry.stored, entry.why = StoreTier.LOST, 0, e.why
            if isinstance(e, CorruptSnapshot) and e.meta is None:  # the store still knows it
                raise CorruptSnapshot(key, path, e.reason, entry.meta) from None
            raise
        if promote and self._room(StoreTier.WARM, len(frame)):
            entry.tier, entry.data, entry.stored = StoreTier.WARM, frame, len(frame)
            _remove(path)
        return raw

    @_locked
    def demote(self, key: str, to: StoreTier | None = None) -> StoreTier:
        """Move the entry one tier down (hot → warm → cold), or with `to` down to that tier
        (to=COLD: to disk, wherever it is); returns its new tier. Blocks from warm;
        SnapshotWriteError if the file cannot be written (it stays warm). ValueError for an
        entry already cold or lost, or already below `to`."""
        entry = self._entry(key)
        order = list(StoreTier)
        if to is not None and order.index(entry.tier) >= order.index(to):
            raise ValueError(f"snapshot {key!r} is {entry.tier.value}: not above {to.value}")
        while True:
            if entry.tier is StoreTier.HOT:
                assert entry.data is not None
                frame = self._compress(entry.data)
                entry.tier, entry.data, entry.stored = StoreTier.WARM, frame, len(frame)
            elif entry.tier is StoreTier.WARM:
                self._to_cold(key, entry)
            else:
                raise ValueError(f"snapshot {key!r} is {entry.tier.value}: nothing below")
            if to is None or entry.tier is to:
                return entry.tier

    @_locked
    def drop(self, key: str) -> None:
        """Forget `key`: its entry and its file, if any (also one listed in `damaged`).
        Nothing happens for a key that is not held."""
        self._entries.pop(key, None)
        _remove(snapshot_path(self.directory, key))
        self.damaged = [d for d in self.damaged if d.key != key]

    # -- budgets -----------------------------------------------------------------------------

    @_locked
    def rebalance(self) -> Moves:
        """Bring every tier within its budget: demote the least recently used hot entries to
        warm and warm ones to cold, then evict the least recently used cold snapshots (each
        becomes LOST, its metadata kept in a stub file). A failed cold write is recorded in
        the result, not raised: the entry stays warm, and no further cold write is tried.
        Blocks."""
        moves = Moves()
        for tier, budget in (
            (StoreTier.HOT, self.config.hot_budget),
            (StoreTier.WARM, self.config.warm_budget),
        ):
            for key in self.keys(tier):
                if self._bytes(tier) <= budget or (tier is StoreTier.WARM and moves.errors):
                    break
                self._step(key, moves)
        for key in self.keys(StoreTier.COLD):
            if self._bytes(StoreTier.COLD) <= self.config.cold_budget:
                break
            self._evict(
                key,
                f"evicted: the cold tier was over its budget of {self.config.cold_budget} bytes",
            )
            moves.evicted.append(key)
        return moves

    @_locked
    def squeeze(self, target: int | None = None) -> Moves:
        """Memory pressure: demote hot and warm entries one step each, least recently used
        first, until `target` bytes of memory are freed (None: every one of them). Budgets
        are not checked here: `rebalance` afterwards evicts if the cold tier is over. Blocks."""
        moves = Moves()
        candidates = [k for k, e in self._entries.items() if e.tier in _DOWN]
        for key in candidates:
            if target is not None and moves.freed >= target:
                break
            if moves.errors and self._entries[key].tier is StoreTier.WARM:
                continue  # the disk refused once: do not hammer it, demote what is hot
            self._step(key, moves)
        return moves

    # -- inside ------------------------------------------------------------------------------

    def _entry(self, key: str) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"no snapshot {key!r} in the store") from None

    def _compress(self, data: bytes) -> bytes:
        frame: bytes = lz4.frame.compress(data, compression_level=self.config.compression_level)
        return frame

    def _bytes(self, tier: StoreTier) -> int:
        return sum(e.stored for e in self._entries.values() if e.tier is tier)

    def _room(self, tier: StoreTier, size: int) -> bool:
        budget = self.config.hot_budget if tier is StoreTier.HOT else self.config.warm_budget
        return self._bytes(tier) + size <= budget

    def _step(self, key: str, moves: Moves) -> None:
        """One demotion for rebalance/squeeze, recorded in `moves` (a write error too)."""
        entry = self._entries[key]
        before = entry.stored
        try:
            tier = self.demote(key)
        except SnapshotWriteError as e:
            log.warning("%s", e)
            moves.errors.append(e)
            return
        moves.demoted.append((key, tier))
        moves.freed += before - (0 if tier is StoreTier.COLD else entry.stored)

    def _read_cold(self, key: str, path: Path) -> tuple[bytes, bytes]:
        """A cold entry's frame and bytes; SnapshotLost (CorruptSnapshot) if it is gone."""
        meta = self._entries[key].meta
        try:
            cold = read_snapshot_file(path, key)
        except OSError as e:
            raise SnapshotLost(key, meta, f"cannot read {path}: {e.strerror}") from e
        if cold.lost is not None or cold.payload is None:  # replaced by a stub since listed
            raise SnapshotLost(key, meta, cold.lost or "a stub without a snapshot")
        try:
            return cold.payload, _decompress(cold.payload, cold.raw_size)
        except ValueError as e:
            raise CorruptSnapshot(key, path, str(e), meta) from None

    def _to_cold(self, key: str, entry: _Entry) -> None:
        """Write a warm entry's frame to its file and make it cold (left warm on error)."""
        assert entry.tier is StoreTier.WARM and entry.data is not None
        size = write_snapshot_file(self.directory, key, entry.meta, entry.data, entry.raw_size)
        entry.tier, entry.data, entry.stored = StoreTier.COLD, None, size

    def _evict(self, key: str, why: str) -> None:
        """Drop a cold entry's snapshot, keeping its metadata (in a stub file, so that the
        next host still knows the tab; if even that cannot be written, only in memory)."""
        entry = self._entries[key]
        try:
            write_snapshot_file(self.directory, key, entry.meta, b"", 0, lost=why)
        except SnapshotWriteError as e:
            log.warning("%s; removing the file instead", e)
            _remove(snapshot_path(self.directory, key))
        entry.tier, entry.data, entry.stored, entry.why = StoreTier.LOST, None, 0, why

    def _open(self) -> None:
        """Make the directory (0700), remove temporary files a crash left, and list the cold
        files, least recently written first."""
        d = self.directory
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)
            names = os.listdir(d)
        except OSError as e:
            raise FosError(f"snapshot store {d}: {e.strerror}") from e
        found: list[tuple[float, str, _Entry]] = []
        for name in names:
            path = d / name
            if name.startswith(_TMP_PREFIX) and name.endswith(_TMP_SUFFIX):
                log.info("removing %s, left by an interrupted write", path)
                _remove(path)
                continue
            if not (name.startswith(_FILE_PREFIX) and name.endswith(_FILE_SUFFIX)):
                continue
            key = name[len(_FILE_PREFIX) : -len(_FILE_SUFFIX)]
            if not _KEY_RE.fullmatch(key):
                continue
            try:
                cold = read_snapshot_file(path, key, payload=False)
                mtime = path.stat().st_mtime
            except CorruptSnapshot as e:
                log.warning("%s", e)
                self.damaged.append(e)
                continue
            except OSError as e:
                self.damaged.append(CorruptSnapshot(key, path, f"unreadable: {e.strerror}"))
                continue
            if cold.lost is not None:
                entry = _Entry(cold.meta, StoreTier.LOST, 0, None, 0, cold.lost)
            else:
                entry = _Entry(cold.meta, StoreTier.COLD, cold.raw_size, None, cold.file_size)
            found.append((mtime, key, entry))
        for _, key, entry in sorted(found, key=lambda f: (f[0], f[1])):
            self._entries[key] = entry


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
