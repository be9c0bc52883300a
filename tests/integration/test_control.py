"""`fos-host run` and `fos-host ctl` as a user runs them: the daemon is a real subprocess (a
host with its zygote, services and sandboxed renderers), driven by `fos-host ctl --json`
subprocesses over its control socket, fetching the demo sites from an OriginServer that runs
in this process (a background thread's event loop) through `--resolve` and `--resolve-only`.

Also: who may use the socket (the filesystem, then SO_PEERCRED at accept), a dead host's socket
file removed at the next start and a live host's refused, and a SIGKILLed host whose renderers,
services and zygote all die with it and whose cgroups the next start removes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from daemons import FOS, Daemon, ctl, ctl_json, daemon, failed

from fos_host.kernel import proc
from tests.conftest import fos_cgroups

ROOT = os.geteuid() == 0
NOBODY = 65534
PNG = b"\x89PNG\r\n\x1a\n"
NEWS, SHOP, EXAMPLE = "http://news.fos.test/", "http://shop.fos.test/", "http://a.b.example.co.uk/"

pytestmark = pytest.mark.usefixtures("no_fd_leak")


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (its threads' children, theirs, ...)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{parent}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = {int(p) for p in f.read().split()} - found
                    found |= kids
                    todo += kids
    return found


@contextlib.contextmanager
def pidfds(pids: Iterable[int]) -> Iterator[dict[int, int]]:
    """{pidfd: pid} of those of `pids` still running: a pidfd names a process for good (a pid
    may be reused). One that ended since it was listed is left out: a spawn's middle process
    (M, which exits once its child is pid 1 of the new namespace) lives for milliseconds."""
    fds: dict[int, int] = {}
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                fds[os.pidfd_open(pid)] = pid
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def still_running(fds: dict[int, int], timeout: float) -> list[int]:
    """The pids of `fds` that have not exited within `timeout` seconds (a pidfd is readable
    once its process exited, zombie or reaped)."""
    left = set(fds)
    deadline = time.monotonic() + timeout
    while left and (wait := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(list(left), [], [], wait)
        left -= set(ready)
    return sorted(fds[fd] for fd in left)


def ppid(pid: int) -> int | None:
    fields = proc.stat_fields(pid)
    return None if fields is None else int(fields[1])


def test_ctl_drives_the_host(tmp_path: Path, origin: dict[str, str]) -> None:
    sock = tmp_path / "s" / "control.sock"
    with daemon(sock, tmp_path, origin) as d:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700
        assert ctl_json(sock, "list") == []

        news = ctl_json(sock, "open", NEWS)
        example = ctl_json(sock, "open", EXAMPLE)
        assert (news["state"], news["title"], news["site"]) == (
            "ready",
            "fOS News",
            "http://fos.test",
        )
        assert (example["state"], example["site"]) == ("ready", "http://example.co.uk")
        assert news["pid"] != example["pid"], "two sites, two renderer processes"
        assert news["host_uid"] != example["host_uid"], "each renderer has a host uid of its own"
        for tab in (news, example):
            assert ppid(tab["pid"]) == d.pid, "a renderer is the host's child (subreaper)"
            assert tab["memory_limit"] == 64 << 20 and 0 < tab["memory"] < tab["memory_limit"]

        assert ctl_json(sock, "activate", str(example["id"]))["active"] is True
        listed = [(t["id"], t["active"]) for t in ctl_json(sock, "list")]
        assert listed == [(news["id"], False), (example["id"], True)]
        table = ctl(sock, "list").stdout.decode()  # for a person: a table
        assert "fOS News" in table and f"{example['id']}*" in table and str(news["pid"]) in table

        moved = ctl_json(sock, "navigate", str(news["id"]), SHOP)
        assert (moved["url"], moved["title"], moved["state"]) == (SHOP, "fOS Shop", "ready")
        again = ctl_json(sock, "reload", str(news["id"]))
        assert (again["url"], again["state"], again["pid"]) == (SHOP, "ready", moved["pid"])

        png = ctl(sock, "screenshot", str(news["id"])).stdout  # stdout is a pipe: the PNG
        assert png.startswith(PNG) and len(png) > 1000
        out = tmp_path / "example.png"
        written = ctl_json(sock, "screenshot", str(example["id"]), "-o", str(out))
        assert written == {"tab": example["id"], "file": str(out), "bytes": out.stat().st_size}
        assert out.read_bytes().startswith(PNG) and out.read_bytes() != png
        snap = ctl(sock, "snapshot", str(example["id"]))
        assert snap.returncode == 0 and b"a.b.example.co.uk" in snap.stdout

        with pidfds([example["pid"]]) as fds:
            assert ctl_json(sock, "close", str(example["id"])) == {"closed": example["id"]}
            assert [t["id"] for t in ctl_json(sock, "list")] == [news["id"]]
            assert not still_running(fds, 10), "the closed tab's renderer ended"

        status = ctl_json(sock, "status")
        assert status["pid"] == d.pid and status["tabs"] == 1
        assert status["bad_messages"] == 0 and status["crashes"] == 0
        assert status["renderers"] >= 2, "the shop tab's renderer, and a warm one"

        # What a user can act on, in one line each.
        assert failed(ctl(sock, "close", "99")) == "fos-host: no tab 99"
        assert failed(ctl(sock, "snapshot", "99")) == "fos-host: no tab 99"
        assert "has no site" in failed(ctl(sock, "open", "ftp://news.fos.test/"))
        assert "needs -o FILE" in failed(ctl(sock, "screenshot", str(news["id"]), "--json"))
        lost = ctl_json(sock, "open", "http://unknown.test/")  # --resolve-only: no DNS
        assert lost["state"] == "failed" and "unknown.test" in lost["reason"], lost
        with pidfds(t["pid"] for t in ctl_json(sock, "list")) as fds:
            assert len(fds) == 2
            d.stop()
            assert not still_running(fds, 10), "SIGTERM: the host took its renderers along"
    assert "no fos-host is running at" in failed(ctl(sock, "list"))


def connect_as(uid: int, path: Path) -> tuple[str, int]:
    """Connect to `path` from a child running as `uid`: ("served" if the host said HELLO,
    "closed" if it hung up, else the errno's name), and the child's pid."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # only system calls here: this process has threads
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(10)
            try:
                s.connect(str(path))
                outcome = "served" if s.recv(65536) else "closed"
            except OSError as e:
                outcome = errno.errorcode.get(e.errno or 0, str(e))
            os.write(w, outcome.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        outcome = f.read().decode()
    os.waitpid(pid, 0)
    return outcome, pid


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory in /tmp that another uid can traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="fos-test-control-"))
    try:
        path.chmod(0o711)
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.skipif(not ROOT, reason="needs root to be another uid")
def test_other_uids_are_refused(
    tmp_path: Path, origin: dict[str, str], reachable_dir: Path
) -> None:
    sock = reachable_dir / "s" / "control.sock"
    with daemon(sock, tmp_path, origin) as d:
        assert connect_as(os.geteuid(), sock)[0] == "served"
        assert connect_as(NOBODY, sock)[0] == "EACCES", "the filesystem keeps others out"
        sock.parent.chmod(0o711)  # a mistake of the admin's: now the peer check is all
        sock.chmod(0o666)
        outcome, pid = connect_as(NOBODY, sock)
        assert outcome == "closed", "SO_PEERCRED: uid 65534 is refused at accept"
        assert f"refused a connection from uid {NOBODY} (pid {pid})" in d.stderr()
        assert ctl_json(sock, "status")["pid"] == d.pid, "and the host serves on"

    with daemon(sock, tmp_path, origin, "--allow-uid", str(NOBODY)) as d:
        assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o711
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o666
        assert connect_as(NOBODY, sock)[0] == "served", "--allow-uid lets it in"
        assert connect_as(NOBODY + 1, sock)[0] == "closed", "and only it"


def test_dead_hosts_socket_is_removed_live_hosts_is_refused(
    tmp_path: Path, origin: dict[str, str]
) -> None:
    sock = tmp_path / "s" / "control.sock"
    sock.parent.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dead.bind(str(sock))
    dead.listen()
    dead.close()  # as a SIGKILLed host leaves it: the file, nobody listening
    assert stat.S_ISSOCK(os.lstat(sock).st_mode)
    with daemon(sock, tmp_path, origin) as d:
        assert f"removing the control socket {sock} of a host that is gone" in d.stderr()
        second = subprocess.run(
            [*FOS, "run", "--socket", str(sock), "--profile", str(tmp_path / "p2")],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 2
        assert failed(second) == (
            f"fos-host: another fos-host is running with control socket {sock} (pid {d.pid}): "
            "stop it first (kill -TERM), or give this one another --socket"
        )
        assert not (tmp_path / "p2").exists(), "it started nothing"
        assert ctl_json(sock, "status")["pid"] == d.pid, "the first one serves on"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--renderer-memory", "lots"], "bad size 'lots'"),
        (["--viewport", "800"], "--viewport 800: give WIDTHxHEIGHT"),
        (["--resolve", "news.fos.test"], "--resolve wants NAME=ADDR"),
        (["--resolve", "news.fos.test=somewhere"], "give NAME=IP or NAME=IP:PORT"),
        (["--warm", "-1"], "--warm -1: must be at least 0"),
        (["--process-limit", "0"], "--process-limit 0: must be at least 1"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    r = subprocess.run(
        [*FOS, "run", "--socket", str(tmp_path / "s" / "c.sock"), "--profile",
         str(tmp_path / "p"), *args],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2
    assert message in failed(r)
    assert not (tmp_path / "s").exists() and not (tmp_path / "p").exists()


def test_a_socket_directory_open_to_others_is_refused(tmp_path: Path) -> None:
    where = tmp_path / "open"
    where.mkdir()
    where.chmod(0o777)
    r = subprocess.run(
        [*FOS, "run", "--socket", str(where / "c.sock"), "--profile", str(tmp_path / "p")],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2
    assert failed(r) == (
        f"fos-host: {where} is open to other users (mode 0777): make it 0700 "
        f"(chmod 700 {where}) or choose another --socket"
    )
    assert list(where.iterdir()) == []


def test_sigkill_of_the_host_leaves_nothing_behind(tmp_path: Path, origin: dict[str, str]) -> None:
    sock = tmp_path / "s" / "control.sock"
    d = Daemon(sock, tmp_path, origin)
    try:
        d.wait_ready()
        tabs = [ctl_json(sock, "open", url) for url in (NEWS, EXAMPLE)]
        renderers = {t["pid"] for t in tabs}
        assert len(renderers) == 2
        family = descendants(d.pid)  # renderers, warm ones, network, storage, the zygote
        assert renderers <= family
        assert len(family) >= 6, family
        own = [p for p in fos_cgroups() if p.name.startswith(f"fos.{d.pid}.")]
        assert own, "the host made its cgroup directories"
        with pidfds(family) as fds:
            assert renderers <= set(fds.values()), "the renderers are watched"
            d.kill()
            assert not still_running(fds, 5), "every process of the host died with it"
        assert stat.S_ISSOCK(os.lstat(sock).st_mode), "its socket file is left..."
        assert all(p.exists() for p in own), "...and its cgroups, for the next start"
    finally:
        d.kill()

    with daemon(sock, tmp_path, origin) as again:
        assert f"removing the control socket {sock} of a host that is gone" in again.stderr()
        assert [p for p in own if p.exists()] == [], "the next start removed the dead one's"
        assert ctl_json(sock, "list") == []
