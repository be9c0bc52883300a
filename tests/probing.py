"""Running the probe (fos_host/probe.py) in a sandbox and reading what it says."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from fos_host.sandbox.jail import Jail
from fos_host.sandbox.sandbox import ExitStatus, Sandbox, Spawner


def run_probe(
    sp: Spawner,
    jail: Jail,
    *args: str,
    exec_path: bool = False,
    started: Callable[[Sandbox], None] = lambda sb: None,
) -> tuple[str, ExitStatus]:
    """Run the probe in a sandbox (from the zygote, or exec'd; from a spare when the spawner
    keeps one of the jail's kind), calling `started` with it; its stdout and exit status."""
    r, w = os.pipe()
    jail.pass_fd(w, 1)
    if exec_path:
        kw: dict = {"argv": [sys.executable, "-m", "fos_host.probe", *args]}
    else:
        kw = {"entry": "fos_host.probe:main", "args": args}
    try:
        with sp.spawn(jail, **kw) as sb:
            os.close(w)
            w = -1
            started(sb)
            out = b""
            while chunk := os.read(r, 1 << 16):
                out += chunk
            status = sb.wait(timeout=60)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    return out.decode(), status


def assert_isolated(rep: dict[str, Any]) -> None:
    """What every sandbox's isolation report must say, whoever spawned it."""
    assert rep["pid"] == 1
    assert rep["visible_pids"] == [1]
    assert rep["uid"] == "0"
    for key in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"):
        assert rep[key] == "0000000000000000", key
    assert rep["NoNewPrivs"] == "1"
    assert rep["Seccomp"] == "2"
    assert rep["interfaces"] == ["lo"]
    assert rep["fds"] == [0, 1, 2]
    assert rep["sid_is_self"]
