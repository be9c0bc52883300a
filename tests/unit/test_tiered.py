"""fos_host.host.tiered on real files and real LZ4: round trips per tier, promotion and
demotion, budgets (eviction keeps the metadata), damaged files of every kind, what a reopened
store finds after a crash, and a full disk (a small tmpfs, as root)."""

from __future__ import annotations

import errno
import os
import stat
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import lz4.frame
import pytest

from fos_host.host.tiered import (
    CorruptSnapshot,
    SnapshotLost,
    SnapshotMeta,
    SnapshotWriteError,
    StoreConfig,
    StoreTier,
    TieredStore,
    read_snapshot_file,
    snapshot_path,
    write_snapshot_file,
)
from fos_host.kernel import libc
from fos_host.renderer.page import Page
from fos_host.services.origin import demo_sites

HOT, WARM, COLD, LOST = StoreTier.HOT, StoreTier.WARM, StoreTier.COLD, StoreTier.LOST


def snap(i: int, size: int = 40_000) -> bytes:
    """A compressible snapshot-sized blob, different for each `i`."""
    line = f"tab {i}: <p>All the news that fits in a sandbox.</p>\n".encode()
    return (line * (size // len(line) + 1))[:size]


def meta(i: int) -> SnapshotMeta:
    return SnapshotMeta(f"http://news.fos.test/article/{i}", f"Article {i}", 1_700_000_000.0 + i)


def store_at(directory: Path, **budgets: int) -> TieredStore:
    return TieredStore(directory, StoreConfig(**budgets))


@pytest.fixture
def snapshots(tmp_path: Path) -> Path:
    return tmp_path / "profile" / "snapshots"


def tmp_files(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


# ---- round trips and placement -------------------------------------------------------------


@pytest.mark.parametrize("tier", [HOT, WARM, COLD])
def test_round_trip_per_tier(snapshots: Path, tier: StoreTier) -> None:
    store = store_at(snapshots)
    data = snap(1)
    store.put("tab-1", data, meta(1), tier=tier)
    assert store.tier_of("tab-1") is tier
    assert store.meta("tab-1") == meta(1)
    assert snapshot_path(snapshots, "tab-1").exists() == (tier is COLD)
    assert store.get("tab-1", promote=False) == data
    assert store.tier_of("tab-1") is tier


def test_cold_file_and_directory_permissions(snapshots: Path) -> None:
    store = store_at(snapshots)
    store.put("tab-1", snap(1), meta(1), tier=COLD)
    path = snapshot_path(snapshots, "tab-1")
    assert path.name == "fos-tab-1.snap"
    assert stat.S_IMODE(os.stat(snapshots).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert tmp_files(snapshots) == []


def test_sizes_and_compression_ratio_of_a_real_snapshot(snapshots: Path) -> None:
    page = demo_sites()["news.fos.test"]["/slow"]
    data = Page.load("http://news.fos.test/slow", page.body).snapshot()
    store = store_at(snapshots)
    store.put("hot", data, meta(1), tier=HOT)
    store.put("warm", data, meta(2))
    store.put("cold", data, meta(3), tier=COLD)
    stats = store.stats()
    frame = len(lz4.frame.compress(data))
    file_size = os.path.getsize(snapshot_path(snapshots, "cold"))
    assert (stats.hot.count, stats.hot.bytes, stats.hot.raw_bytes) == (1, len(data), len(data))
    assert (stats.warm.count, stats.warm.bytes, stats.warm.raw_bytes) == (1, frame, len(data))
    assert (stats.cold.count, stats.cold.bytes) == (1, file_size)
    assert stats.lost == 0
    assert frame < file_size < frame + 512  # the header and the metadata are small
    assert stats.compression_ratio == pytest.approx(2 * len(data) / (frame + file_size))
    assert stats.compression_ratio is not None and stats.compression_ratio > 5


def test_put_replaces_and_removes_an_old_cold_file(snapshots: Path) -> None:
    store = store_at(snapshots)
    store.put("tab-1", snap(1), meta(1), tier=COLD)
    store.put("tab-1", snap(2), meta(2))
    assert not snapshot_path(snapshots, "tab-1").exists()
    assert store.get("tab-1") == snap(2)
    assert store.meta("tab-1") == meta(2)


@pytest.mark.parametrize("key", ["", "../x", "a/b", ".fos-x", "-x", "x" * 129, "tab 1"])
def test_bad_keys(snapshots: Path, key: str) -> None:
    with pytest.raises(ValueError, match="snapshot key"):
        store_at(snapshots).put(key, b"x", meta(1))


def test_missing_key(snapshots: Path) -> None:
    store = store_at(snapshots)
    with pytest.raises(KeyError, match="no snapshot 'nope'"):
        store.get("nope")
    store.drop("nope")  # nothing to do


def test_drop(snapshots: Path) -> None:
    store = store_at(snapshots)
    store.put("a", snap(1), meta(1), tier=COLD)
    store.put("b", snap(2), meta(2))
    store.drop("a")
    store.drop("b")
    assert store.keys() == []
    assert os.listdir(snapshots) == []


# ---- promotion and demotion ----------------------------------------------------------------


def test_demote_one_step_at_a_time(snapshots: Path) -> None:
    store = store_at(snapshots)
    store.put("tab-1", snap(1), meta(1), tier=HOT)
    assert store.demote("tab-1") is WARM
    assert not snapshot_path(snapshots, "tab-1").exists()
    assert store.demote("tab-1") is COLD
    assert snapshot_path(snapshots, "tab-1").exists()
    with pytest.raises(ValueError, match="nothing below"):
        store.demote("tab-1")
    assert store.get("tab-1", promote=False) == snap(1)


def test_demote_to_a_tier(snapshots: Path) -> None:
    store = store_at(snapshots)
    store.put("tab-1", snap(1), meta(1), tier=HOT)
    assert store.demote("tab-1", to=COLD) is COLD
    assert snapshot_path(snapshots, "tab-1").exists()
    with pytest.raises(ValueError, match="not above cold"):
        store.demote("tab-1", to=COLD)
    assert store.get("tab-1", promote=False) == snap(1)


def test_get_promotes_one_step_when_there_is_room(snapshots: Path) -> None:
    store = store_at(snapshots)
    store.put("tab-1", snap(1), meta(1), tier=COLD)
    assert store.get("tab-1") == snap(1)
    assert store.tier_of("tab-1") is WARM
    assert not snapshot_path(snapshots, "tab-1").exists()  # one tier at a time
    assert store.get("tab-1") == snap(1)
    assert store.tier_of("tab-1") is HOT
    assert store.get("tab-1") == snap(1)
    assert store.tier_of("tab-1") is HOT


def test_no_promotion_without_room(snapshots: Path) -> None:
    store = store_at(snapshots, hot_budget=0, warm_budget=0)
    store.put("cold", snap(1), meta(1), tier=COLD)
    store.put("warm", snap(2), meta(2))
    assert store.get("cold") == snap(1)
    assert store.get("warm") == snap(2)
    assert (store.tier_of("cold"), store.tier_of("warm")) == (COLD, WARM)
    assert snapshot_path(snapshots, "cold").exists()


def test_get_without_promote_keeps_the_age_order(snapshots: Path) -> None:
    store = store_at(snapshots)
    for i in range(3):
        store.put(f"k{i}", snap(i), meta(i))
    store.get("k0", promote=False)
    assert store.keys() == ["k0", "k1", "k2"]
    store.get("k0")
    assert store.keys() == ["k1", "k2", "k0"]


# ---- budgets -------------------------------------------------------------------------------


def test_rebalance_demotes_the_least_recently_used(snapshots: Path) -> None:
    size = len(snap(0))
    store = store_at(snapshots, hot_budget=2 * size)
    for i in range(3):
        store.put(f"k{i}", snap(i), meta(i), tier=HOT)
    store.get("k0")  # now k1 is the oldest
    moves = store.rebalance()
    assert moves.demoted == [("k1", WARM)]
    assert store.keys(HOT) == ["k2", "k0"]
    assert moves.freed == size - store.stats().warm.bytes
    assert store.rebalance().demoted == []  # within budget now


def test_rebalance_moves_warm_over_budget_to_disk(snapshots: Path) -> None:
    frame = len(lz4.frame.compress(snap(0)))
    store = store_at(snapshots, warm_budget=frame + 10)
    for i in range(3):
        store.put(f"k{i}", snap(i), meta(i))
    moves = store.rebalance()
    assert moves.demoted == [("k0", COLD), ("k1", COLD)]
    assert store.keys(WARM) == ["k2"]
    assert sorted(os.listdir(snapshots)) == ["fos-k0.snap", "fos-k1.snap"]
    assert moves.freed == 2 * frame


def test_cold_budget_evicts_the_oldest_and_keeps_its_meta(snapshots: Path) -> None:
    store = store_at(snapshots)
    for i in range(3):
        store.put(f"k{i}", snap(i), meta(i), tier=COLD)
    file_size = store.stats().cold.bytes // 3
    store = store_at(snapshots, cold_budget=2 * file_size)  # a smaller disk budget next start
    moves = store.rebalance()
    assert moves.evicted == ["k0"]
    assert store.tier_of("k0") is LOST
    assert store.stats().lost == 1
    assert store.stats().cold.count == 2
    with pytest.raises(SnapshotLost, match="evicted") as info:
        store.get("k0")
    assert not isinstance(info.value, CorruptSnapshot)
    assert info.value.meta == meta(0)
    assert "reload it from http://news.fos.test/article/0" in str(info.value)
    assert os.path.getsize(snapshot_path(snapshots, "k0")) < 300  # a stub: metadata only
    reopened = store_at(snapshots)  # the next host still knows the tab
    assert reopened.cold_entries() == {"k0": meta(0), "k1": meta(1), "k2": meta(2)}
    assert reopened.tier_of("k0") is LOST
    with pytest.raises(SnapshotLost, match="evicted"):
        reopened.get("k0")
    assert reopened.get("k1") == snap(1)


def test_squeeze_frees_the_target_oldest_first(snapshots: Path) -> None:
    store = store_at(snapshots)
    store.put("old", snap(0), meta(0))
    store.put("mid", snap(1), meta(1), tier=HOT)
    store.put("new", snap(2), meta(2), tier=HOT)
    frame = store.stats().warm.bytes
    moves = store.squeeze(target=1)
    assert moves.demoted == [("old", COLD)]
    assert moves.freed == frame
    moves = store.squeeze()
    assert moves.demoted == [("mid", WARM), ("new", WARM)]
    assert [store.tier_of(k) for k in ("old", "mid", "new")] == [COLD, WARM, WARM]
    assert store.get("old", promote=False) == snap(0)


# ---- damaged files -------------------------------------------------------------------------

HEADER = 44


Damage = Callable[[Path], object]


def flip(at: int) -> Damage:
    def damage(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[at if at >= 0 else len(data) + at] ^= 0x40
        path.write_bytes(bytes(data))

    return damage


def keep(n: int) -> Damage:
    def damage(path: Path) -> None:
        path.write_bytes(path.read_bytes()[:n])

    return damage


def replace_payload(path: Path) -> None:
    """A well-formed file (every checksum right) whose payload is not LZ4: only
    decompressing finds it."""
    write_snapshot_file(path.parent, "bad", meta(9), os.urandom(2000), 4000)


def set_version(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:10] = struct.pack("<H", 2)
    data[40:44] = struct.pack("<I", zlib.crc32(bytes(data[:40])))
    path.write_bytes(bytes(data))


# (how, what the error says, whether the file can still be listed with its metadata)
DAMAGE: list[tuple[Damage, str, bool]] = [
    (flip(-1), "payload checksum mismatch", True),
    (flip(HEADER + 5), "metadata checksum mismatch", False),
    (flip(17), "header checksum mismatch", False),
    (flip(0), "bad magic", False),
    (keep(-100), "truncated", False),
    (keep(20), "short file", False),
    (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 8), "trailing bytes", False),
    (lambda p: p.write_bytes(b""), "short file", False),
    (lambda p: p.write_bytes(os.urandom(5000)), "bad magic", False),
    (set_version, "format version 2", False),
    (replace_payload, "not an LZ4 frame", True),
]


@pytest.mark.parametrize(("damage", "says", "listable"), DAMAGE, ids=[d[1] for d in DAMAGE])
def test_damaged_cold_file(snapshots: Path, damage: Damage, says: str, listable: bool) -> None:
    store = store_at(snapshots)
    store.put("good", snap(1), meta(1), tier=COLD)
    store.put("bad", snap(9), meta(9), tier=COLD)
    path = snapshot_path(snapshots, "bad")
    damage(path)

    with pytest.raises(CorruptSnapshot) as info:
        store.get("bad")
    e = info.value
    assert e.path == path and e.key == "bad"
    assert says in str(e) and str(path) in str(e)
    assert e.meta == meta(9)  # the store knew the URL to reload from
    assert store.tier_of("bad") is LOST
    assert store.get("good", promote=False) == snap(1)  # nothing else is affected

    reopened = store_at(snapshots)
    if listable:
        assert reopened.tier_of("bad") is COLD
        with pytest.raises(CorruptSnapshot, match=says) as info:
            reopened.get("bad")
        assert info.value.meta == meta(9)
    else:
        assert "bad" not in reopened
        assert [(d.key, d.path) for d in reopened.damaged] == [("bad", path)]
        assert says in reopened.damaged[0].reason
    assert reopened.get("good") == snap(1)
    reopened.drop("bad")
    assert not path.exists() and reopened.damaged == []


def test_read_snapshot_file_checks_the_key(snapshots: Path) -> None:
    store_at(snapshots).put("tab-1", snap(1), meta(1), tier=COLD)
    moved = snapshot_path(snapshots, "tab-2")
    os.rename(snapshot_path(snapshots, "tab-1"), moved)
    with pytest.raises(CorruptSnapshot, match="metadata of another key"):
        read_snapshot_file(moved, "tab-2")


# ---- crash safety --------------------------------------------------------------------------


def test_reopen_lists_cold_entries_and_removes_temporary_files(snapshots: Path) -> None:
    store = store_at(snapshots)
    for i, key in enumerate(["b", "a", "c"]):
        store.put(key, snap(i), meta(i), tier=COLD)
        os.utime(snapshot_path(snapshots, key), (1000 + i, 1000 + i))
    store.put("warm", snap(5), meta(5))  # memory only: gone with the process
    leftover = snapshots / ".fos-abc123.tmp"
    leftover.write_bytes(b"half a snapshot")
    other = snapshots / "notes.txt"
    other.write_text("not ours")

    reopened = store_at(snapshots)
    assert not leftover.exists()
    assert other.exists()
    assert reopened.keys() == ["b", "a", "c"]  # least recently written first
    assert reopened.cold_entries() == {"b": meta(0), "a": meta(1), "c": meta(2)}
    assert reopened.stats().cold.raw_bytes == 3 * len(snap(0))
    assert reopened.get("a") == snap(1)
    assert reopened.damaged == []


# ---- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    libc.mount("tmpfs", str(mnt), "tmpfs", 0, "size=256k,mode=0700")
    try:
        yield mnt
    finally:
        libc.umount2(str(mnt), 0)


def test_full_disk_keeps_the_old_file_and_the_new_snapshot(small_disk: Path) -> None:
    directory = small_disk / "snapshots"
    store = store_at(directory)
    store.put("tab-1", snap(1), meta(1), tier=COLD)
    path = snapshot_path(directory, "tab-1")
    before = path.read_bytes()
    big = os.urandom(400 * 1024)  # incompressible, larger than the disk

    with pytest.raises(SnapshotWriteError) as info:
        store.put("tab-1", big, meta(2), tier=COLD)
    assert info.value.errno == errno.ENOSPC
    assert "ENOSPC" in str(info.value) and str(path) in str(info.value)
    assert "stays in memory" in str(info.value)
    assert tmp_files(directory) == []
    assert path.read_bytes() == before  # the previous snapshot, intact and readable
    old = read_snapshot_file(path, "tab-1")
    assert old.meta == meta(1) and old.payload is not None
    assert lz4.frame.decompress(old.payload) == snap(1)
    assert store.tier_of("tab-1") is WARM  # nothing lost
    assert store.get("tab-1", promote=False) == big

    store.put("tab-2", big, meta(3))
    moves = store.squeeze()  # pressure: the disk refuses once, the rest stays in memory
    assert moves.demoted == [] and len(moves.errors) == 1
    assert moves.errors[0].errno == errno.ENOSPC
    assert store.keys(WARM) == ["tab-1", "tab-2"]
    assert tmp_files(directory) == []

    store.drop("tab-2")
    store.put("tab-1", snap(3), meta(3), tier=COLD)  # room again: written
    assert store_at(directory).get("tab-1") == snap(3)
