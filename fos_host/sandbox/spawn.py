"""The spawn sequence, read top to bottom.

Three processes take part (KERNEL_NOTES "Spawning a sandboxed process"):

  launcher (host or zygote)      M (middle, short-lived)   G (the sandbox, pid 1)
  fork M ──────────────────────▶ drop_groups
                                 make + join its cgroup
                                 unshare(user…cgroup)
  write setgroups, id maps ◀──── "U"
  "M" ─────────────────────────▶ fork G ──────────────────▶ wait for M to exit
  reap M                   ◀──── "P<pid of G>", exit        die_with_parent
                                                            make_private, open_sources
                                                            become_root, build_root,
                                                            pivot, seal_root, lo up,
                                                            setsid, rlimits, empty the
                                                            bounding set, lock securebits,
                                                          [ a spare: EOF to the launcher,
                                                            wait for the order ]
                                                            hostname, close fds,
                                                            clear cap sets + NNP,
                                                            seccomp (last)
  read G's status channel  ◀─────────────────────────────── "R", then EOF (exec/entry);
                                                            or "E<why>"

The host is a child subreaper, so when M exits G becomes the host's child: the host reaps G
and reads its exit status, whether the launcher was the host itself or the zygote.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from fos_host.errors import FosError, StepError
from fos_host.kernel import caps, cgroup, fds, mounts, namespaces, netns, proc, seccomp
from fos_host.kernel.cgroup import Limits
from fos_host.kernel.mounts import Bind
from fos_host.kernel.namespaces import IdMap

STATUS_MAX = 65536
MAX_ORDER = 1 << 20
MAX_ORDER_FDS = 64


@dataclass
class Order:
    """What runs in a sandbox and with what. Part of the plan of a cold spawn; sent later,
    over its order channel, to a spare that waits for it (see sandbox/pool.py)."""

    hostname: str
    env: dict[str, str]
    fd_targets: list[int]  # the n-th passed fd becomes this fd number in the sandbox
    argv: list[str] | None = None  # exec this …
    entry: str | None = None  # … or call "module:function" (zygote path)
    entry_args: list[str] = field(default_factory=list)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Order:
        return cls(**json.loads(raw))


@dataclass
class Plan:
    """Everything the launcher and the child need, as plain data (crosses to the zygote).

    With `order` None the plan makes a spare: it goes through every step that does not
    depend on the workload, then waits for its order on the one fd passed to it."""

    binds: list[Bind]
    tmpfs: list[str]
    isolate_net: bool
    ids: IdMap
    cgroup: dict[str, Any] | None  # the sandbox's cgroup (Cgroup.spec()), made by M …
    limits: dict[str, int | None]  # … with these limits
    bpf: bytes | None
    learn: bool
    order: Order | None

    def shape(self) -> str:
        """What a spare must share with a request to serve it: all but ids, cgroup, order."""
        return json.dumps(
            [[asdict(b) for b in self.binds], self.tmpfs, self.isolate_net, self.learn,
             self.limits, hashlib.sha256(self.bpf).hexdigest() if self.bpf is not None else None]
        )  # fmt: skip

    def to_json(self) -> bytes:
        d = asdict(self)
        d["bpf"] = self.bpf.hex() if self.bpf is not None else None
        return json.dumps(d).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Plan:
        d = json.loads(raw)
        d["binds"] = [Bind(**b) for b in d["binds"]]
        d["ids"] = IdMap(**d["ids"])
        d["bpf"] = bytes.fromhex(d["bpf"]) if d["bpf"] is not None else None
        d["order"] = Order(**d["order"]) if d["order"] is not None else None
        return cls(**d)


@dataclass
class Launched:
    pid: int  # G, in the launcher's pid namespace; the host's child once M is reaped
    notify_fd: int | None  # learn mode: the seccomp user-notification fd


class LaunchError(FosError):
    """A step failed; `pid` is G's pid when G was forked (the host must reap it).
    Exit code as a shell's: 127 when the command could not be executed, else 2."""

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid
        self.exit_code = 127 if message.startswith("exec ") else 2


# -- launcher (host or zygote) -----------------------------------------------------------


def launch(plan: Plan, pass_fds: list[int]) -> Launched:
    sync, sync_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    status, status_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        mid = os.fork()
        if mid == 0:
            _run_child(lambda: _middle(plan, sync_child, status_child, pass_fds), sync_child)
        sync_child.close()
        status_child.close()
        g_pid = _handshake(sync, mid, plan.ids)
        return await_status(status, g_pid, plan.learn)
    finally:
        for s in (sync, sync_child, status, status_child):
            s.close()


def _handshake(sync: socket.socket, mid: int, ids: IdMap) -> int:
    try:
        msg = sync.recv(STATUS_MAX)
        if msg == b"U":
            namespaces.write_id_maps(mid, ids)
            sync.send(b"M")
            msg = sync.recv(STATUS_MAX)
    except (StepError, OSError) as e:
        os.kill(mid, 9)
        os.waitpid(mid, 0)
        raise LaunchError(str(e), None) from e
    os.waitpid(mid, 0)
    if msg.startswith(b"P"):
        return int(msg[1:])
    raise LaunchError(_why(msg, "the middle process died"), None)


def await_status(
    status: socket.socket, g_pid: int, learn: bool, *, claim: bool = False
) -> Launched:
    """Read G's status channel to the end: "L" + fd (learn mode's notification fd), "R" (set-up
    done), "E<why>" (failed), EOF (exec'd or running). A claimed spare that ends without "R"
    died before it took the order (it may have been killed with the order in flight): SpareGone.
    A cold spawn that does is reported by its exit status instead."""
    notify_fd = None
    ready = False
    while True:
        msg, got, _, _ = socket.recv_fds(status, STATUS_MAX, 1)
        if got and notify_fd is None and learn:
            notify_fd = got[0]
        else:
            for fd in got:
                os.close(fd)
        if msg in (b"L", b"R"):
            ready = ready or msg == b"R"
            continue
        if msg == b"" and (ready or not claim):
            return Launched(g_pid, notify_fd)
        if notify_fd is not None:
            os.close(notify_fd)
        if msg == b"":
            raise SpareGone("the spare sandbox died before it took its order", g_pid)
        raise LaunchError(_why(msg, "the sandbox died during set-up"), g_pid)


def _why(msg: bytes, default: str) -> str:
    return msg[1:].decode(errors="replace") if msg.startswith(b"E") else default


def _run_child(body: Callable[[], None], report: socket.socket) -> None:
    """Run a forked child's body; any failure is reported as one line, then _exit(127)."""
    try:
        body()
    except BaseException as e:
        text = str(e) if isinstance(e, FosError) else f"{type(e).__name__}: {e}"
        with contextlib.suppress(OSError):
            report.send(b"E" + text.encode(errors="replace")[: STATUS_MAX - 1])
        os._exit(127)
    os._exit(0)


# -- M: the middle process ---------------------------------------------------------------


def _middle(plan: Plan, sync: socket.socket, status: socket.socket, pass_fds: list[int]) -> None:
    proc.die_with_parent()
    namespaces.drop_groups()
    if plan.cgroup is not None:
        cg = cgroup.from_spec(plan.cgroup)
        cg.make(Limits(**plan.limits))
        cgroup.join(cg.procs_files())
    flags = namespaces.ALL_SANDBOX
    if not plan.isolate_net:
        flags &= ~namespaces.CLONE_NEWNET
    namespaces.unshare(flags)
    sync.send(b"U")
    if sync.recv(16) != b"M":
        raise StepError("wait for id maps", 0, "the launcher went away")
    m_alive_r, m_alive_w = os.pipe()
    m_pid = os.getpid()
    g_pid = os.fork()
    if g_pid == 0:
        os.close(m_alive_w)
        _run_child(lambda: _contain(plan, status, m_alive_r, m_pid, pass_fds), status)
    sync.send(b"P%d" % g_pid)


# -- G: the sandbox ----------------------------------------------------------------------


def _contain(
    plan: Plan, status: socket.socket, m_alive: int, m_pid: int, pass_fds: list[int]
) -> None:
    _wait_for_middle_exit(m_alive, m_pid)
    mounts.make_private()
    sources = mounts.open_sources(plan.binds)
    namespaces.become_root()
    proc.die_with_parent()  # after the uid change, which would clear it
    root = mounts.build_root(plan.binds, sources, plan.tmpfs)
    mounts.pivot(root)
    mounts.seal_root()
    if plan.isolate_net:
        netns.loopback_up()
    proc.new_session()
    proc.set_rlimits()
    caps.lock_bounding()
    order = plan.order
    if order is None:
        order, pass_fds = _await_order(status, pass_fds[0])
    namespaces.set_hostname(order.hostname)
    fds.install_fds(dict(zip(order.fd_targets, pass_fds, strict=True)), (status.fileno(),))
    caps.clear_sets()
    if plan.bpf is not None:
        _load_seccomp(plan, status)
    _enter_workload(order, status)


def _await_order(status: socket.socket, order_fd: int) -> tuple[Order, list[int]]:
    """A spare: the order channel takes the status channel's fd number, which closes the
    launcher's channel (EOF: the spare is ready); then wait for the order and its fds.
    From here on, failures are reported to whoever sent the order. Named "fos-spare" first,
    so that a ready spare always shows as one."""
    proc.set_name("fos-spare")
    os.dup2(order_fd, status.fileno(), inheritable=False)
    os.close(order_fd)
    try:
        raw, got = fds.recv_fds(status, MAX_ORDER, MAX_ORDER_FDS)
    except OSError as e:
        raise StepError("receive the order", e.errno or 0) from e
    if not raw:  # the host let the spare go
        os._exit(0)
    return Order.from_json(raw), got


def give_order(sock: socket.socket, pid: int, order: Order, pass_fds: list[int]) -> Launched:
    """Host half of claiming a spare: send the order with its fds and wait until it runs.
    SpareGone when the spare died before it read the order (its channel resets)."""
    try:
        fds.send_fds(sock, order.to_json(), pass_fds)
    except OSError as e:
        if e.errno == errno.EBADF:  # one of ours: no spare would take it
            raise FosError(f"a file descriptor to pass is not open: {pass_fds}") from e
        raise SpareGone(f"the spare sandbox is gone: {e}", pid) from e
    try:
        return await_status(sock, pid, learn=False, claim=True)
    except OSError as e:
        raise SpareGone(f"the spare sandbox is gone: {e}", pid) from e


class SpareGone(LaunchError):
    """A spare died while it waited for its order: take another."""


def _wait_for_middle_exit(m_alive: int, m_pid: int) -> None:
    """PDEATHSIG fires when the *parent* exits: set it only once G has a new parent.
    M's fds close (EOF here) a moment before the kernel reparents G, so after the EOF wait
    until the host's /proc (still mounted) shows another parent."""
    while os.read(m_alive, 1):
        pass
    os.close(m_alive)
    while proc.host_ppid() == m_pid:
        time.sleep(0.0001)


def _load_seccomp(plan: Plan, status: socket.socket) -> None:
    assert plan.bpf is not None
    notify_fd = seccomp.install_filter(plan.bpf, listener=plan.learn)
    if notify_fd is not None:
        socket.send_fds(status, [b"L"], [notify_fd])
        os.close(notify_fd)


def _fresh_stdio() -> None:
    """The launcher's sys.stdout & co. may be anything (a test runner's capture object):
    the workload's are fds 0, 1, 2."""
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - lives as long as the process
    sys.stdout = open(1, "w", closefd=False, buffering=1)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115


def _enter_workload(order: Order, status: socket.socket) -> None:
    os.write(status.fileno(), b"R")  # set-up done; what follows is the workload's
    if order.argv is not None:
        proc.reset_signals_for_exec()
        try:
            os.execvpe(order.argv[0], order.argv, order.env)
        except OSError as e:
            raise StepError(f"exec {order.argv[0]}", e.errno or 0) from e
    assert order.entry is not None
    proc.reset_signals_for_python()
    proc.set_name("fos-" + order.entry.partition(":")[0].rpartition(".")[2])
    _fresh_stdio()
    # Forked, not exec'd: the flag is the launcher's, whatever PYTHONDONTWRITEBYTECODE the
    # order names. The trees are read-only here and seccomp kills mkdir, so an import of a
    # module without a current .pyc must not try to write one.
    sys.dont_write_bytecode = True
    os.environ.clear()
    os.environ.update(order.env)
    proc.wipe_environ_area()  # the host's environment, inherited through the fork
    module, _, func = order.entry.partition(":")
    target = getattr(importlib.import_module(module), func)
    status.close()  # EOF: set-up is done
    code = 1
    try:
        code = int(target(*order.entry_args) or 0)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
