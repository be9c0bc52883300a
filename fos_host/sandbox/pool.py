"""The warm pool: spare sandboxes made ahead of time, so that a spawn only hands over its order.

A spare has gone through every step of the spawn sequence that does not depend on the
workload — its own cgroup and host uid, the seven namespaces, the root file system, loopback,
rlimits — and waits on its order channel (Chromium keeps a "spare renderer" for the same
reason). Claiming one: the host sends the order (hostname, environment, entry point or argv,
fds); the spare sets its hostname, installs the fds, drops
its capabilities, loads seccomp and runs. A spare serves only requests of its own shape
and cgroup limits (binds, tmpfs, network, seccomp filter, limits: `Plan.shape`); it gets its
limits when it is made.

Refills go through the zygote without waiting: the request is sent when a spare is taken and
its reply is read at a later pool operation, so the spawn that took the spare does not pay for
the next one.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from fos_host.errors import FosError
from fos_host.kernel.cgroup import Cgroup
from fos_host.kernel.fds import readable
from fos_host.kernel.namespaces import IdMap
from fos_host.sandbox.spawn import LaunchError, Plan
from fos_host.sandbox.zygote import Zygote

log = logging.getLogger(__name__)


@dataclass
class Spare:
    pid: int
    sock: socket.socket  # the host's end of its order channel
    cgroup: Cgroup | None
    ids: IdMap

    def alive(self) -> bool:
        """A spare that died reads EOF on its order channel; a live one sends nothing."""
        return not readable([self.sock.fileno()], 0)

    def discard(self) -> None:
        """Kill and reap it and remove its cgroup."""
        self.sock.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        if self.cgroup is not None:
            self.cgroup.remove()


@dataclass
class _Pending:
    """A spare asked of the zygote whose reply has not been read yet."""

    kind: str
    sock: socket.socket
    cgroup: Cgroup | None
    ids: IdMap


class Pool:
    """Spares per kind (`Plan.shape()`), refilled through the zygote. `prepare(plan)` gives a
    plan its host uid and a cgroup with the plan's limits (returned, so the pool can remove
    it)."""

    def __init__(self, zygote: Zygote, prepare: Callable[[Plan], Cgroup | None]) -> None:
        self._zygote = zygote
        self._prepare = prepare
        self._want: dict[str, tuple[Plan, int]] = {}  # kind -> (template, how many)
        self._ready: dict[str, list[Spare]] = {}
        self._pending: deque[_Pending] = deque()

    def keep(self, template: Plan, size: int) -> None:
        """Keep `size` spares of this kind from now on (0 stops refilling it)."""
        if template.order is not None or template.learn:
            raise FosError("a spare's plan has no order and no learn mode")
        self._want[template.shape()] = (template, size)
        self.refill()

    def uids(self) -> set[int]:
        spares = [s for ready in self._ready.values() for s in ready]
        return {s.ids.host_uid for s in spares} | {p.ids.host_uid for p in self._pending}

    def take(self, kind: str) -> Spare | None:
        """A live spare of this kind, waiting for one that is on its way if none is ready;
        None when there is none."""
        self._collect(block=False)
        while True:
            ready = self._ready.get(kind, [])
            while ready:
                spare = ready.pop(0)
                if spare.alive():
                    return spare
                log.warning("spare sandbox pid=%d died while waiting; discarded", spare.pid)
                spare.discard()
            if not any(p.kind == kind for p in self._pending):
                return None
            self._collect_one()

    def refill(self) -> None:
        """Ask the zygote for the spares that are missing (does not wait for them)."""
        for kind, (template, size) in list(self._want.items()):
            have = len(self._ready.get(kind, [])) + sum(p.kind == kind for p in self._pending)
            for _ in range(size - have):
                self._submit(kind, template)

    def settle(self) -> None:
        """Wait until every spare on its way is ready (or has failed)."""
        while self._pending:
            self._collect_one()

    def close(self) -> None:
        self._want.clear()
        try:
            self.settle()
        finally:
            for p in self._pending:  # only when the zygote went away
                _drop(p)
            self._pending.clear()
            for ready in self._ready.values():
                for spare in ready:
                    spare.discard()
            self._ready.clear()

    def _submit(self, kind: str, template: Plan) -> None:
        plan = copy.deepcopy(template)
        cg = self._prepare(plan)
        host_end, spare_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._zygote.submit(plan, [spare_end.fileno()])
        except BaseException:
            host_end.close()
            if cg is not None:
                cg.remove()
            raise
        finally:
            spare_end.close()
        self._pending.append(_Pending(kind, host_end, cg, plan.ids))

    def _collect(self, *, block: bool) -> None:
        while self._pending and (block or self._zygote.has_result()):
            self._collect_one()

    def _collect_one(self) -> None:
        p = self._pending.popleft()
        try:
            launched = self._zygote.result()
        except LaunchError as e:
            # Spares of a kind that cannot be made are not asked for again; a spawn of that
            # kind goes the cold way and reports the error itself.
            log.warning("cannot make a spare sandbox (no more are kept of its kind): %s", e)
            self._want.pop(p.kind, None)
            if e.pid is not None:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(e.pid, 0)
            _drop(p)
            return
        except BaseException:
            _drop(p)
            raise
        self._ready.setdefault(p.kind, []).append(Spare(launched.pid, p.sock, p.cgroup, p.ids))


def _drop(p: _Pending) -> None:
    p.sock.close()
    if p.cgroup is not None:
        p.cgroup.remove()
