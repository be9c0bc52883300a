"""Shipped seccomp profiles loaded into forked children on the real kernel.

Each test forks; the child loads the filter with `install_filter`, runs one body, and reports
its JSON result through a pipe before `_exit`; the parent checks the result or that the child
was killed by SIGSYS. Calls that should be refused use harmless arguments (bad fds, NULLs), so
that a broken filter fails the test instead of doing damage.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import json
import mmap
import os
import select
import signal
import socket
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyseccomp
import pytest

from fos_host.kernel.seccomp import Learner, compile_bpf, install_filter, killed_syscall
from fos_host.sandbox.seccomp_policy import load_policy

TIMEOUT = 30.0
CLONE_NEWUSER = 0x10000000
TIOCSTI = 0x5412
FIONREAD = 0x541B
PR_SET_NAME = 15
PR_SET_DUMPABLE = 4
SO_DOMAIN = 39
X32_SYSCALL_BIT = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def nr(name: str) -> int:
    return int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))


def raw(number: int, *args: int) -> tuple[int, int]:
    """syscall(2) with full 64-bit arguments: (return value, errno)."""
    ctypes.set_errno(0)
    ret = _libc.syscall(ctypes.c_long(number), *(ctypes.c_ulong(a & (2**64 - 1)) for a in args))
    return int(ret), ctypes.get_errno()


def bpf(profile: str) -> bytes:
    return compile_bpf(load_policy(profile))


class Outcome:
    def __init__(self, pid: int, status: int, data: bytes) -> None:
        self.pid = pid
        self.status = status
        self.result: Any = json.loads(data) if data else None

    @property
    def killed_by(self) -> int | None:
        return os.WTERMSIG(self.status) if os.WIFSIGNALED(self.status) else None

    @property
    def exit_code(self) -> int | None:
        return os.WEXITSTATUS(self.status) if os.WIFEXITED(self.status) else None

    def value(self) -> Any:
        assert self.exit_code == 0, (self.killed_by, self.exit_code, self.result)
        return self.result


def wait_with_timeout(pid: int, timeout: float = TIMEOUT) -> int:
    pidfd = os.pidfd_open(pid)
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"child {pid} hung")
    finally:
        os.close(pidfd)
    return os.waitpid(pid, 0)[1]


def run(program: bytes, body: Callable[[], Any]) -> Outcome:
    """Fork; the child installs `program`, runs `body` and writes its JSON result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            install_filter(program)
            os.write(w, json.dumps(body()).encode())
        except BaseException as exc:
            code = 1
            os.write(w, json.dumps(repr(exc)).encode())
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    try:
        while select.select([r], [], [], TIMEOUT)[0]:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
    return Outcome(pid, wait_with_timeout(pid), b"".join(chunks))


@pytest.fixture(autouse=True)
def no_fd_leaks() -> Iterator[None]:
    before = sorted(os.listdir("/proc/self/fd"))
    yield
    assert sorted(os.listdir("/proc/self/fd")) == before


# --- renderer: what works --------------------------------------------------------------------


def test_unix_socketpair_works() -> None:
    def body() -> str:
        a, b = socket.socketpair()
        with a, b:
            a.sendall(b"ping")
            return b.recv(4).decode()

    assert run(bpf("renderer"), body).value() == "ping"


def test_json_asyncio_threads_and_memfd_work() -> None:
    def body() -> dict[str, Any]:
        async def echo() -> bytes:
            a, b = socket.socketpair()
            reader, writer = await asyncio.open_unix_connection(sock=a)
            b.sendall(json.dumps({"n": [1, 2]}).encode() + b"\n")
            line = await reader.readline()
            await asyncio.sleep(0.001)
            writer.close()
            await writer.wait_closed()
            b.close()
            return line

        line = asyncio.run(echo())
        seen: list[int] = []
        thread = threading.Thread(target=lambda: seen.append(threading.get_native_id()))
        thread.start()
        thread.join()
        fd = os.memfd_create("fos-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 4096)
        with mmap.mmap(fd, 4096) as m:
            m[:5] = b"hello"
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        data = os.pread(fd, 5, 0)
        os.close(fd)
        return {"json": json.loads(line), "thread": len(seen), "memfd": data.decode()}

    assert run(bpf("renderer"), body).value() == {
        "json": {"n": [1, 2]},
        "thread": 1,
        "memfd": "hello",
    }


def test_fork_works() -> None:
    def body() -> int:
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    assert run(bpf("renderer"), body).value() == 7


def test_clone3_returns_enosys() -> None:
    assert run(bpf("renderer"), lambda: raw(nr("clone3"), 0, 0)).value() == [-1, errno.ENOSYS]


def test_harmless_ioctl_and_prctl_work() -> None:
    def body() -> list[Any]:
        r, w = os.pipe()
        os.write(w, b"abc")
        ready = fcntl.ioctl(r, FIONREAD, b"\0\0\0\0")
        os.set_inheritable(r, True)  # FIONCLEX
        os.close(r)
        os.close(w)
        return [int.from_bytes(ready, "little"), raw(nr("prctl"), PR_SET_NAME, 0)[1]]

    # PR_SET_NAME with a NULL name gets EFAULT from the kernel: the filter let it through.
    assert run(bpf("renderer"), body).value() == [3, errno.EFAULT]


def test_exec_of_bin_true_works() -> None:
    outcome = run(bpf("renderer"), lambda: os.execv("/bin/true", ["true"]))
    assert outcome.exit_code == 0 and outcome.result is None


WORKLOAD = """
import asyncio, json, os, socket, subprocess, threading
async def main():
    a, b = socket.socketpair()
    r, w = await asyncio.open_unix_connection(sock=a)
    b.sendall(b'{"ok": true}\\n')
    assert json.loads(await r.readline()) == {"ok": True}
    w.close(); b.close()
asyncio.run(main())
t = threading.Thread(target=lambda: None); t.start(); t.join()
assert subprocess.run(["/bin/true"]).returncode == 0
os.write(1, b"done")
"""


def test_exec_of_a_python_workload_works() -> None:
    def body() -> None:
        os.execv(sys.executable, [sys.executable, "-B", "-c", WORKLOAD])

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(w, 1)
            install_filter(bpf("renderer"))
            body()
        finally:
            os._exit(1)
    os.close(w)
    try:
        if not select.select([r], [], [], TIMEOUT)[0]:
            pytest.fail("no output")
        out = os.read(r, 100)
    finally:
        os.close(r)
    assert os.waitstatus_to_exitcode(wait_with_timeout(pid)) == 0
    assert out == b"done"


# --- renderer: the 64-bit argument trick ---------------------------------------------------


def test_kernel_truncates_socket_family() -> None:
    """Without a filter: arg0 = 0x1_00000002 makes an AF_INET socket (why the mask matters)."""
    fd, err = raw(nr("socket"), 0x1_00000002, socket.SOCK_STREAM, 0)
    assert fd >= 0, os.strerror(err)
    with socket.socket(fileno=fd) as sock:
        assert sock.family == socket.AF_INET


def test_high_bits_do_not_make_af_inet_pass() -> None:
    outcome = run(bpf("renderer"), lambda: raw(nr("socket"), 0x1_00000002, socket.SOCK_STREAM, 0))
    assert outcome.killed_by == signal.SIGSYS


def test_high_bits_on_af_unix_are_still_af_unix() -> None:
    """0x1_00000001 is AF_UNIX to the kernel, so allowing it is right: the filter judges what
    the kernel will do, and the socket made is an AF_UNIX one."""

    def body() -> list[int]:
        fd, err = raw(nr("socket"), 0x1_00000001, socket.SOCK_STREAM, 0)
        if fd < 0:
            return [fd, err]
        with socket.socket(fileno=fd) as sock:
            return [int(sock.family), sock.getsockopt(socket.SOL_SOCKET, SO_DOMAIN)]

    assert run(bpf("renderer"), body).value() == [socket.AF_UNIX, socket.AF_UNIX]


# --- renderer: what is refused ---------------------------------------------------------------


def test_af_inet_socket_is_killed() -> None:
    assert run(bpf("renderer"), lambda: socket.socket(socket.AF_INET).close()).killed_by == (
        signal.SIGSYS
    )


def test_killed_syscall_is_found_in_the_audit_log() -> None:
    outcome = run(bpf("renderer"), lambda: raw(nr("personality"), 0xFFFFFFFF))
    assert outcome.killed_by == signal.SIGSYS
    name = killed_syscall(outcome.pid, os.getuid(), wait=1.0)
    if name is None:  # the kernel rate-limits audit lines in dmesg
        pytest.skip("no audit record (rate-limited or /dev/kmsg unreadable)")
    assert name == "personality"
    assert killed_syscall(outcome.pid, os.getuid() + 1, wait=0) is None


REFUSED: list[tuple[str, Callable[[], Any]]] = [
    ("socket AF_INET6", lambda: raw(nr("socket"), socket.AF_INET6, socket.SOCK_DGRAM, 0)),
    ("socket AF_NETLINK", lambda: raw(nr("socket"), 16, socket.SOCK_RAW, 0)),
    ("socket AF_PACKET", lambda: raw(nr("socket"), 17, socket.SOCK_RAW, 0)),
    ("socketpair AF_INET", lambda: raw(nr("socketpair"), socket.AF_INET, 1, 0, 0)),
    ("clone CLONE_NEWUSER", lambda: raw(nr("clone"), CLONE_NEWUSER | signal.SIGCHLD, 0, 0, 0, 0)),
    ("ioctl TIOCSTI", lambda: raw(nr("ioctl"), 2**32 - 1, TIOCSTI, 0)),
    ("prctl PR_SET_DUMPABLE", lambda: raw(nr("prctl"), PR_SET_DUMPABLE, 1, 0, 0, 0)),
    ("setuid", lambda: os.setuid(os.getuid())),
    ("setresuid", lambda: raw(nr("setresuid"), 2**32 - 1, 2**32 - 1, 2**32 - 1)),
    ("ptrace", lambda: raw(nr("ptrace"), 2, 0, 0, 0)),
    ("process_vm_readv", lambda: raw(nr("process_vm_readv"), 0, 0, 0, 0, 0, 0)),
    ("personality", lambda: raw(nr("personality"), 0xFFFFFFFF)),
    ("unshare", lambda: raw(nr("unshare"), 0)),
    ("setns", lambda: raw(nr("setns"), 2**32 - 1, 0)),
    ("mount", lambda: raw(nr("mount"), 0, 0, 0, 0, 0)),
    ("chroot", lambda: raw(nr("chroot"), 0)),
    ("bpf", lambda: raw(nr("bpf"), 2**32 - 1, 0, 0)),
    ("userfaultfd", lambda: raw(nr("userfaultfd"), 2**32 - 1)),
    ("io_uring_setup", lambda: raw(nr("io_uring_setup"), 0, 0)),
    ("keyctl", lambda: raw(nr("keyctl"), 2**32 - 1, 0, 0, 0, 0)),
    ("perf_event_open", lambda: raw(nr("perf_event_open"), 0, 0, 0, 0, 0)),
    ("seccomp", lambda: raw(nr("seccomp"), 2**32 - 1, 0, 0)),
    ("unlink", lambda: raw(nr("unlink"), 0)),
    ("x32 ABI getpid", lambda: raw(X32_SYSCALL_BIT | nr("getpid"))),
]


@pytest.mark.parametrize("call", [c for _, c in REFUSED], ids=[n for n, _ in REFUSED])
def test_refused_calls_are_killed(call: Callable[[], Any]) -> None:
    outcome = run(bpf("renderer"), call)
    assert outcome.killed_by == signal.SIGSYS, (outcome.exit_code, outcome.result)


def test_install_filter_rejects_garbage() -> None:
    def body() -> str:
        try:
            install_filter(b"\0" * 7)
        except Exception as exc:
            return str(exc)
        return "loaded"

    # The good filter is loaded first by `run`; a second one must be well-formed too.
    assert run(bpf("renderer"), body).value().startswith("load seccomp: EINVAL")


# --- network and storage -------------------------------------------------------------------


def test_network_profile_allows_tcp_but_not_raw_or_netlink() -> None:
    def body() -> str:
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            with socket.create_connection(server.getsockname()) as client:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn, _ = server.accept()
                with conn:
                    client.sendall(b"x")
                    return conn.recv(1).decode()

    assert run(bpf("network"), body).value() == "x"
    udp = run(bpf("network"), lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close())
    assert udp.value() is None
    for family, kind in ((socket.AF_INET, socket.SOCK_RAW), (16, socket.SOCK_RAW)):
        outcome = run(bpf("network"), lambda f=family, k=kind: raw(nr("socket"), f, k, 0))
        assert outcome.killed_by == signal.SIGSYS


def test_storage_profile_runs_sqlite(tmp_path: Path) -> None:
    def body() -> int:
        db = tmp_path / "site" / "x.db"
        db.parent.mkdir()
        with sqlite3.connect(db) as conn:
            conn.execute("pragma journal_mode=wal")
            conn.execute("create table t(a)")
            conn.executemany("insert into t values (?)", [(1,), (2,)])
        conn.close()
        conn = sqlite3.connect(db)
        (count,) = conn.execute("select count(*) from t").fetchone()
        conn.execute("pragma journal_mode=delete")
        conn.close()
        os.rename(db, db.with_suffix(".old"))
        os.unlink(db.with_suffix(".old"))
        return int(count)

    assert run(bpf("storage"), body).value() == 2


def test_renderer_cannot_write_a_database(tmp_path: Path) -> None:
    def body() -> None:
        with sqlite3.connect(tmp_path / "x.db") as conn:
            conn.execute("create table t(a)")

    assert run(bpf("renderer"), body).killed_by == signal.SIGSYS


# --- learn mode ----------------------------------------------------------------------------


def test_learn_mode_records_refused_calls() -> None:
    program = compile_bpf(load_policy("renderer"), learn=True)
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            parent_end.close()
            notify_fd = install_filter(program, listener=True)
            assert notify_fd is not None
            socket.send_fds(child_end, [b"listener"], [notify_fd])
            os.close(notify_fd)
            raw(nr("ptrace"), 2, 0, 0, 0)  # PTRACE_PEEKDATA of pid 0: ESRCH
            raw(nr("personality"), 0xFFFFFFFF)  # query only
            socket.socket(socket.AF_INET).close()
            raw(nr("clone3"), 0, 0)  # errno in the profile, notified in learn mode
            child_end.send(b"done")
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    child_end.close()
    try:
        _msg, fds, _flags, _addr = socket.recv_fds(parent_end, 64, 1)
        assert len(fds) == 1
        pidfd = os.pidfd_open(pid)
        try:
            with Learner(fds[0]) as learner:
                learner.run_until_exit(pidfd)
                refused = learner.refused()
        finally:
            os.close(pidfd)
        assert parent_end.recv(64) == b"done"
    finally:
        parent_end.close()
    assert os.waitstatus_to_exitcode(wait_with_timeout(pid)) == 0
    assert {"ptrace", "personality", "socket", "clone3"} <= set(refused)
    assert not {"sendmsg", "close", "write", "exit_group"} & set(refused)
