"""The builder: what a sandbox may see and use, configured in the host.

    jail = Jail("renderer").memory("64M").pids(64).ro_bind("/srv/data").pass_fd(sock, 3)
    with Spawner() as sp, sp.spawn(jail, argv=["python3", "-c", "..."]) as sb:
        status = sb.wait()

A `Jail` holds no kernel objects; `Spawner.spawn` turns it into a `Plan` (plain data that
crosses to the zygote) plus the fds to pass.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fos_host.errors import ConfigError
from fos_host.kernel.cgroup import Limits, parse_size
from fos_host.kernel.mounts import Bind

DEFAULT_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
}
PROFILES = ("renderer", "network", "storage", "none")


def python_prefixes() -> list[str]:
    """The interpreter trees a Python workload of this host needs: the base interpreter,
    the venv, and the fos_host package itself (an editable install points into a checkout).
    A package that sits in a site-packages directory outside those prefixes — the
    single-file binary's extraction (packaging/binary/build.py), a `pip install --target` —
    brings its dependencies beside it: then that whole directory."""
    pkg = Path(__file__).resolve().parent.parent
    if pkg.parent.name in ("site-packages", "dist-packages"):
        pkg = pkg.parent
    return sorted({sys.base_prefix, sys.prefix, str(pkg)})


@dataclass
class Jail:
    """Everything a sandbox gets. Methods return `self` so calls chain."""

    profile: str = "renderer"
    limits: Limits = field(default_factory=Limits)
    binds: list[Bind] = field(default_factory=list)
    tmpfs_dirs: list[str] = field(default_factory=list)
    fds: dict[int, int] = field(default_factory=dict)  # target fd in the sandbox -> host fd
    environ: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ENV))
    host_name: str = "fos-sandbox"
    network: str = "none"
    learn: bool = False
    runtime: bool = True  # bind the system and Python runtime read-only

    def __post_init__(self) -> None:
        if self.profile not in PROFILES and "/" not in self.profile:
            raise ConfigError(
                f"unknown profile {self.profile!r}: choose one of {', '.join(PROFILES)}"
            )

    def memory(self, size: str | int) -> Jail:
        n = parse_size(size) if isinstance(size, str) else size
        self.limits = _replace(self.limits, memory_max=n)
        return self

    def memory_high(self, size: str | int) -> Jail:
        n = parse_size(size) if isinstance(size, str) else size
        self.limits = _replace(self.limits, memory_high=n)
        return self

    def pids(self, n: int) -> Jail:
        if n < 1:
            raise ConfigError(f"pids limit must be at least 1, not {n}")
        self.limits = _replace(self.limits, pids_max=n)
        return self

    def cpu_weight(self, w: int) -> Jail:
        if not 1 <= w <= 10000:
            raise ConfigError(f"cpu weight must be within 1..10000, not {w}")
        self.limits = _replace(self.limits, cpu_weight=w)
        return self

    def ro_bind(self, src: str, dst: str | None = None) -> Jail:
        self.binds.append(Bind(os.path.abspath(src), dst or os.path.abspath(src)))
        return self

    def bind(self, src: str, dst: str | None = None) -> Jail:
        self.binds.append(Bind(os.path.abspath(src), dst or os.path.abspath(src), writable=True))
        return self

    def tmpfs(self, dst: str) -> Jail:
        self.tmpfs_dirs.append(dst)
        return self

    def pass_fd(self, fd: int, target: int) -> Jail:
        self.fds[target] = fd
        return self

    def env(self, key: str, value: str) -> Jail:
        self.environ[key] = value
        return self

    def hostname(self, name: str) -> Jail:
        self.host_name = name
        return self

    def net(self, mode: str) -> Jail:
        if mode not in ("none", "host"):
            raise ConfigError(f"--net must be 'none' or 'host', not {mode!r}")
        self.network = mode
        return self

    def seccomp_learn(self, on: bool = True) -> Jail:
        self.learn = on
        return self


def _replace(limits: Limits, **kw: int) -> Limits:
    d = asdict(limits)
    d.update(kw)
    return Limits(**d)
