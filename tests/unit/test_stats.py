"""fos_host.ipc.stats on the real /dev/shm: the seqlock under a writer in another process,
names, unlinking, and the removal of a dead host's page."""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import signal
import struct
import time
from collections.abc import Iterator

import posix_ipc
import pytest

from fos_host.errors import FosError
from fos_host.ipc.stats import StatsPage, cleanup_stale_pages, list_pages, read_stats
from fos_host.kernel import proc


@pytest.fixture(autouse=True)
def no_page_left() -> Iterator[None]:
    before = set(list_pages())
    yield
    left = set(list_pages()) - before
    for name in left:  # leave the machine clean even when failing
        posix_ipc.unlink_shared_memory(name)
    assert not left, f"stats pages left in /dev/shm: {sorted(left)}"


def starttime(pid: int) -> str:
    fields = proc.stat_fields(pid)
    assert fields is not None
    return fields[22 - 3]


def test_publish_and_read() -> None:
    with StatsPage() as page:
        assert page.name == f"/fos.{os.getpid()}.{starttime(os.getpid())}.stats"
        assert page.name in list_pages()
        assert all(name.startswith("/fos.") for name in list_pages())
        assert read_stats(page.name) == {}  # nothing published yet
        page.publish({"tabs": 3, "sandboxes": [{"id": "a", "rss": 123}]})
        assert read_stats(page.name) == {"tabs": 3, "sandboxes": [{"id": "a", "rss": 123}]}
        page.publish({"tabs": 1})  # shorter than before: the old tail must not show
        assert read_stats(page.name) == {"tabs": 1}


def test_too_big_for_the_page() -> None:
    with StatsPage(size=4096) as page:
        page.publish({"n": 1})
        with pytest.raises(FosError, match=r"^stats of 5010 bytes do not fit .* 4096 bytes"):
            page.publish({"pad": "x" * 5000})
        assert read_stats(page.name) == {"n": 1}


def test_one_page_per_process() -> None:
    with StatsPage() as page, pytest.raises(FosError, match=f"{page.name}.*exists"):
        StatsPage()


def test_page_gone_after_close() -> None:
    page = StatsPage()
    name = page.name
    page.publish({"n": 1})
    page.close()
    page.close()
    assert name not in list_pages()
    with pytest.raises(FosError, match=rf"^no stats page {name}: is the host running\?$"):
        read_stats(name)
    with pytest.raises(FosError, match="closed"):
        page.publish({"n": 2})


def test_sequence_only_grows() -> None:
    """The seqlock needs each sequence update to be one store: read it raw (a u64 at offset 0)
    while a writer process republishes, it must never go back (struct.pack_into, which
    zero-fills before it writes, let readers see 0 thousands of times a second)."""
    with StatsPage() as page:
        page.publish({"n": 0})
        with writer(page):
            shm = posix_ipc.SharedMemory(page.name, read_only=True)
            try:
                mm = mmap.mmap(shm.fd, shm.size, prot=mmap.PROT_READ)
            finally:
                shm.close_fd()
            with mm:  # until the writer has published 200 times (10 s at most: a busy machine)
                seen, deadline = [0], time.monotonic() + 10
                while seen[-1] < seen[0] + 400 and time.monotonic() < deadline:
                    seen.append(struct.unpack_from("<Q", mm, 0)[0])
        assert seen[-1] >= seen[0] + 400, "the writer did not run"
        assert all(a <= b for a, b in itertools.pairwise(seen))


@contextlib.contextmanager
def writer(page: StatsPage) -> Iterator[None]:
    """A forked process republishing {"n": i, "pad": "x" * (i % 1000)} on `page` as fast as
    it can, until the block ends (then killed and reaped)."""
    pid = os.fork()
    if pid == 0:
        try:
            i = 0
            while True:
                i += 1
                page.publish({"n": i, "pad": "x" * (i % 1000)})
        finally:
            os._exit(1)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_reader_never_sees_a_torn_page() -> None:
    """A writer process republishes pages of varying length in a tight loop; every read must
    be one whole publication, and they only move forward."""
    with StatsPage() as page:
        page.publish({"n": 0, "pad": ""})
        with writer(page):
            last, reads, deadline = -1, 0, time.monotonic() + 1.0
            while time.monotonic() < deadline:
                stats = read_stats(page.name)
                assert len(stats["pad"]) == stats["n"] % 1000
                assert stats["n"] >= last
                last = stats["n"]
                reads += 1
        assert last > 1000 and reads > 1000, (last, reads)  # the two really overlapped


def test_cleanup_removes_only_dead_hosts_pages() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)  # wait until the parent has seen our start time
        os._exit(0)
    os.close(r)
    dead_start = starttime(pid)
    os.close(w)
    os.waitpid(pid, 0)
    dead = f"/fos.{pid}.{dead_start}.stats"
    # This pid with another start time: the pid was reused, the old host is gone.
    reused = f"/fos.{os.getpid()}.{int(starttime(os.getpid())) + 1}.stats"
    for name in (dead, reused):
        posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=4096).close_fd()
    with StatsPage() as live:
        live.publish({"alive": True})
        removed = cleanup_stale_pages()
        assert dead in removed and reused in removed
        assert live.name not in removed
        assert read_stats(live.name) == {"alive": True}
        assert dead not in list_pages() and reused not in list_pages()
