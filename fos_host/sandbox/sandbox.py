"""The handle of a running sandbox, its exit status, and the `Spawner` that makes them.

    with Spawner(zygote=True) as sp:
        with sp.spawn(Jail("renderer").memory("64M"), entry="fos_host.probe:main") as sb:
            status = sb.wait()
            print(status.describe())   # e.g. "out of memory at the 64 MB limit"

A `Spawner` is the host side of every sandbox: it is a child subreaper (so it reaps its
sandboxes), owns the host's cgroup directory (stale ones of a SIGKILLed host are removed when
it opens), hands out one unprivileged host uid per sandbox when root, and compiles each
seccomp policy once. Closing it kills and removes whatever is still running.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from dataclasses import asdict, dataclass
from types import TracebackType

from fos_host.closing import Closing
from fos_host.errors import ConfigError, FosError
from fos_host.kernel import cgroup, proc, seccomp
from fos_host.kernel.cgroup import Cgroup, HostCgroups, Limits
from fos_host.kernel.fds import readable
from fos_host.kernel.mounts import Bind, check_binds, python_runtime_binds
from fos_host.kernel.namespaces import IdMap
from fos_host.sandbox.jail import Jail, python_prefixes
from fos_host.sandbox.pool import Pool, Spare
from fos_host.sandbox.seccomp_policy import load_policy
from fos_host.sandbox.spawn import Launched, LaunchError, Order, Plan, SpareGone, give_order, launch
from fos_host.sandbox.zygote import PRELOAD, Zygote

log = logging.getLogger(__name__)

UID_BASE = 300000
UID_COUNT = 65536


@dataclass(frozen=True)
class ExitStatus:
    code: int | None  # exit status, when it exited
    signal: int | None  # terminating signal, when killed
    oom_kills: int  # OOM kills inside its cgroup
    memory_limit: int | None
    seccomp_syscall: str | None  # the refused syscall, when killed by seccomp and known

    @property
    def returncode(self) -> int:
        """As a shell reports it: the exit status, or 128 + signal."""
        return self.code if self.code is not None else 128 + (self.signal or 0)

    def describe(self) -> str:
        limit = (
            f" at the {cgroup.format_size(self.memory_limit)} limit" if self.memory_limit else ""
        )
        if self.signal == signal.SIGKILL and self.oom_kills:
            return f"out of memory{limit}"
        if self.signal == signal.SIGSYS:
            if self.seccomp_syscall:
                return f"killed by seccomp on syscall {self.seccomp_syscall}"
            return "killed by seccomp (SIGSYS); rerun with --seccomp-learn to see the syscall"
        if self.signal is not None:
            return f"killed by signal {signal.Signals(self.signal).name}"
        text = f"exited with status {self.code}"
        if self.oom_kills:
            text += f" after {self.oom_kills} out-of-memory kill(s){limit}"
        return text


class Sandbox(Closing):
    """A running sandbox. Context manager: leaving it kills, reaps and removes everything."""

    def __init__(
        self, spawner: Spawner, launched: Launched, cg: Cgroup | None, ids: IdMap, limits: Limits
    ) -> None:
        self.pid = launched.pid
        self.pidfd = proc.pidfd_open(self.pid)
        self.cgroup = cg
        self.ids = ids
        self.limits = limits
        self.learner = (
            seccomp.Learner(launched.notify_fd) if launched.notify_fd is not None else None
        )
        self._spawner = spawner
        self._status: ExitStatus | None = None

    @property
    def host_uid(self) -> int:
        return self.ids.host_uid

    def poll(self) -> ExitStatus | None:
        if self._status is None:
            self._serve_learner(0)
            if readable([self.pidfd], 0):
                self._reap()
        return self._status

    def wait(self, timeout: float | None = None) -> ExitStatus:
        """Wait for the end; serves learn-mode notifications meanwhile. TimeoutError if
        it is still running after `timeout` seconds."""
        while self._status is None:
            ready = self._serve_learner(timeout)
            if self.pidfd in ready:
                self._reap()
            elif not ready:
                raise TimeoutError(f"sandbox {self.pid} still running after {timeout} s")
        return self._status

    def _serve_learner(self, timeout: float | None) -> list[int]:
        watch = [self.pidfd] + ([self.learner.fileno()] if self.learner else [])
        ready = readable(watch, timeout)
        if self.learner and self.learner.fileno() in ready:
            self.learner.handle_one()
        return ready

    def _reap(self) -> None:
        _, status = os.waitpid(self.pid, 0)
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        oom = self.cgroup.stats().oom_kills if self.cgroup else 0
        syscall = None
        if sig == signal.SIGSYS:
            syscall = seccomp.killed_syscall(self.pid, self.ids.host_uid)
        self._status = ExitStatus(code, sig, oom, self.limits.memory_max, syscall)

    def kill(self) -> None:
        if self._status is not None:
            return
        if self.cgroup is not None:
            self.cgroup.kill()
        else:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def close(self) -> None:
        if self._status is None:
            self.kill()
            self.wait()
        if self.learner:
            self.learner.close()
            self.learner = None
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        self._spawner._forget(self)


class Spawner:
    """The host side of every sandbox. Use as a context manager.

    `preload` names what the zygote imports before it forks ("module" or "module:function",
    the function then called). With `pool=N` (which needs the zygote) it keeps N spare
    sandboxes of each shape given to `prewarm()`, and `spawn()` hands a request to a spare
    of its shape when one is ready (sandbox/pool.py): the request then costs an order, not a
    whole spawn sequence.
    """

    def __init__(
        self,
        *,
        zygote: bool = False,
        pool: int = 0,
        uid_base: int = UID_BASE,
        uid_count: int = UID_COUNT,
        preload: tuple[str, ...] = PRELOAD,
    ) -> None:
        if pool and not zygote:
            raise ConfigError("a warm pool of sandboxes needs the zygote (zygote=True)")
        self._want_zygote = zygote
        self._preload = preload
        self._pool_size = pool
        self.zygote: Zygote | None = None
        self._pool: Pool | None = None
        self._uid_base, self._uid_count = uid_base, uid_count
        self._next_uid = random.randrange(uid_count)
        self._live: dict[int, Sandbox] = {}
        self._cgroups: HostCgroups | None = None
        self._cgroup_error: ConfigError | None = None
        self._serial = 0
        self._warned = False
        self._bpf: dict[tuple[str, bool], bytes] = {}  # (profile, learn) -> compiled filter
        self._runtime: list[Bind] | None = None

    def __enter__(self) -> Spawner:
        proc.become_subreaper()
        try:
            self._cgroups = cgroup.detect().open_host()
        except ConfigError as e:  # e.g. rootless without a delegated cgroup
            self._cgroup_error = e
        if self._want_zygote:
            self.zygote = Zygote.start(self._preload)
            self._pool = Pool(self.zygote, self._prepare)
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def cgroups(self) -> HostCgroups | None:
        """The host's cgroup directories (None without cgroups: rootless, not delegated)."""
        return self._cgroups

    def close(self) -> None:
        for sb in list(self._live.values()):
            sb.close()
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self.zygote is not None:
            self.zygote.close()
            self.zygote = None
        if self._cgroups is not None:
            self._cgroups.close()
            self._cgroups = None

    def _ids(self, uid: int | None = None) -> IdMap:
        if os.geteuid() != 0:
            return IdMap(os.geteuid(), os.getegid())
        if uid is not None:
            return IdMap(uid, uid)
        used = {sb.ids.host_uid for sb in self._live.values()}
        if self._pool is not None:
            used |= self._pool.uids()
        for _ in range(self._uid_count):
            uid = self._uid_base + self._next_uid
            self._next_uid = (self._next_uid + 1) % self._uid_count
            if uid not in used:
                return IdMap(uid, uid)
        raise FosError(f"all {self._uid_count} sandbox uids are in use")

    def _cgroup(self, limits: Limits) -> Cgroup | None:
        self._serial += 1
        if self._cgroups is None:
            assert self._cgroup_error is not None
            if limits != Limits():
                raise self._cgroup_error
            if not self._warned:
                self._warned = True
                log.warning("sandboxes run without a cgroup of their own: %s", self._cgroup_error)
            return None
        return self._cgroups.handle(f"sb-{self._serial}", limits)

    def _prepare(self, plan: Plan, uid: int | None = None) -> Cgroup | None:
        """Give a plan its host uid (`uid` when given and root, else one of its own) and a
        cgroup of its own with the plan's limits, which the launcher makes; the handle is
        returned (to remove it when the sandbox is gone)."""
        plan.ids = self._ids(uid)
        cg = self._cgroup(Limits(**plan.limits))
        plan.cgroup = cg.spec() if cg else None
        return cg

    def plan(self, jail: Jail, order: Order | None = None) -> Plan:
        """Check the jail and compile its policy; no process or cgroup is made here."""
        bpf = None
        if jail.profile != "none":
            key = (jail.profile, jail.learn)
            bpf = self._bpf.get(key)
            if bpf is None:  # parsed and compiled once per Spawner
                bpf = seccomp.compile_bpf(load_policy(jail.profile), learn=jail.learn)
                self._bpf[key] = bpf
        return Plan(
            binds=check_binds(self._runtime_binds(jail) + jail.binds, jail.tmpfs_dirs),
            tmpfs=list(jail.tmpfs_dirs),
            isolate_net=jail.network == "none",
            ids=IdMap(0, 0),
            cgroup=None,
            limits=asdict(jail.limits),
            bpf=bpf,
            learn=jail.learn,
            order=order,
        )

    def _runtime_binds(self, jail: Jail) -> list[Bind]:
        """The system and Python runtime, bound read-only (looked up once per Spawner)."""
        if not jail.runtime:
            return []
        if self._runtime is None:
            self._runtime = python_runtime_binds(python_prefixes())
        return self._runtime

    def prewarm(self, jail: Jail, size: int | None = None) -> None:
        """Keep `size` (default: the Spawner's pool size) spares for jails of this shape
        and limits."""
        if self._pool is None:
            raise ConfigError("prewarm needs a Spawner with the zygote")
        self._pool.keep(self.plan(jail), self._pool_size if size is None else size)

    def settle(self) -> None:
        """Wait until the spares on their way are ready."""
        if self._pool is not None:
            self._pool.settle()

    def spawn(
        self,
        jail: Jail,
        *,
        argv: list[str] | None = None,
        entry: str | None = None,
        args: tuple[str, ...] = (),
        warm: bool = True,
        uid: int | None = None,
    ) -> Sandbox:
        """Start `argv` (exec) or the Python `entry` ("module:function", called with `args`)
        in a sandbox made by `jail`; from a spare when `warm` and one of its shape is kept.
        `uid`: as root, the host uid to run as (a service whose files must stay its own
        across runs), outside the range renderers get theirs from; else one of that range."""
        if uid is not None and self._uid_base <= uid < self._uid_base + self._uid_count:
            raise ConfigError(f"uid {uid} is in the range sandboxes get theirs from")
        if (argv is None) == (entry is None):
            raise ConfigError("give either a command to exec or a Python entry point")
        if argv is not None and not argv:
            raise ConfigError("no command given")
        order = Order(jail.host_name, dict(jail.environ), list(jail.fds), argv, entry, list(args))
        plan = self.plan(jail, order)
        if self._pool is not None:
            while warm and not plan.learn and uid is None:
                spare = self._pool.take(plan.shape())
                if spare is None:
                    break
                try:
                    return self._claim(spare, order, jail)
                except SpareGone as e:
                    log.warning("spare sandbox pid=%d: %s; taking another", spare.pid, e)
            self._pool.settle()  # the zygote answers in order
        cg = self._prepare(plan, uid)
        try:
            launcher = self.zygote.launch if self.zygote else launch
            launched = launcher(plan, list(jail.fds.values()))
        except LaunchError as e:
            if e.pid is not None:
                os.waitpid(e.pid, 0)
            if cg is not None:
                cg.remove()
            raise
        except BaseException:
            if cg is not None:
                cg.remove()
            raise
        return self._track(Sandbox(self, launched, cg, plan.ids, jail.limits))

    def _claim(self, spare: Spare, order: Order, jail: Jail) -> Sandbox:
        assert self._pool is not None
        try:
            launched = give_order(spare.sock, spare.pid, order, list(jail.fds.values()))
        except BaseException:
            spare.discard()
            raise
        finally:
            self._pool.refill()
        spare.sock.close()
        return self._track(Sandbox(self, launched, spare.cgroup, spare.ids, jail.limits))

    def _track(self, sb: Sandbox) -> Sandbox:
        self._live[sb.pid] = sb
        log.debug(
            "sandbox pid=%d uid=%d cgroup=%s",
            sb.pid,
            sb.host_uid,
            sb.cgroup.name if sb.cgroup else None,
        )
        return sb

    def _forget(self, sb: Sandbox) -> None:
        self._live.pop(sb.pid, None)
