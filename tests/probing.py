"""Running the probe (fos_host/probe.py) in a sandbox and reading what it says."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

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
