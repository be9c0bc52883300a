"""A real memory hog, for what must see memory pressure without mocks: the pressure tests
(tests/integration/test_pressure.py and its followers) and `fos-host bench lifecycle`.

The hog is a forked process in a cgroup that holds anonymous memory and reads a file on disk
through a mapping, page after page, round and round. With no swap (the dev and CI machines)
anonymous memory cannot be reclaimed, so a tight limit — the cgroup's own, or the budget of a
parent it sits in — leaves the file's pages too little room: they are reclaimed and read again
(refaults), and the hog stalls on memory, which is what PSI and v1 vmpressure measure. The
file must be on a disk (a tmpfs file is itself unreclaimable without swap). Without a file
the hog writes its own memory round and round instead, which thrashes where there is swap.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from fos_host.kernel.cgroup import Cgroup, join

MiB = 1 << 20
FILE_SIZE = 64 * MiB  # the file the hog reads round and round
HELD = 40 * MiB  # anonymous memory it keeps (as renderers do): a 64 MiB limit leaves ~24 MiB
MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")


def fstype(path: Path) -> str:
    """The filesystem type of the mount holding `path` (the longest mount point above it)."""
    best, kind = "", ""
    with open("/proc/self/mounts") as f:
        for line in f:
            _, point, fs, *_ = line.split()
            if (str(path) + "/").startswith(point.rstrip("/") + "/") and len(point) > len(best):
                best, kind = point, fs
    return kind


def write_file(path: Path, size: int = FILE_SIZE) -> Path:
    """`size` random bytes at `path`, synced: clean pages, which the hog can drop before it
    starts so that every page it reads is charged to its cgroup."""
    with open(path, "wb") as f:
        block = os.urandom(MiB)
        for _ in range(size // MiB):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    return path


class Hog:
    """The thrashing process (see the module's docstring), in `cgroup`: it holds `held` bytes
    of anonymous memory and reads `file` round and round (or, without a file, writes its own
    memory). `onset` is when its first pass began (monotonic clock, told through a pipe).
    A context manager: leaving it kills and reaps the hog."""

    def __init__(self, cgroup: Cgroup, file: Path | None, held: int = HELD) -> None:
        r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(r)
            self._run(cgroup, file, held, w)
        os.close(w)
        try:
            ready = os.read(r, 1)
        finally:
            os.close(r)
        self.onset = time.monotonic()
        if ready != b"!":
            self.stop()
            raise RuntimeError("the hog died before it began")

    @staticmethod
    def _run(cgroup: Cgroup, file: Path | None, held: int, w: int) -> None:
        code = 70
        try:
            # Forked from a host, it would keep the host's ends of renderer channels open:
            # a renderer the host lets go would never see EOF.
            os.closerange(3, w)
            os.closerange(w + 1, os.sysconf("SC_OPEN_MAX"))
            join(cgroup.procs_files())
            memory = bytearray(b"\x01") * held  # written: every page is touched and charged
            pages: bytearray | mmap.mmap
            if file is None:
                pages, size = memory, held
            else:
                fd = os.open(file, os.O_RDONLY)
                # Drop what is cached of the file, so every page is charged here when read.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                size = os.fstat(fd).st_size
                pages = mmap.mmap(fd, size, prot=mmap.PROT_READ)
            os.write(w, b"!")
            while True:
                for offset in range(0, size, mmap.PAGESIZE):
                    if file is None:
                        memory[offset] ^= 1
                    else:
                        pages[offset]
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)

    def __enter__(self) -> Hog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
