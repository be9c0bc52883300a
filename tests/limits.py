"""Whether this test process can give its sandboxes cgroup limits: as root, or rootless in a
delegated cgroup (the VM's unprivileged run, tests/vm/guest.sh). Asked once, of the real
kernel, by opening the host's cgroups as fos-host does; tests that need limits are marked
`needs_limits` and skip with the reason where they cannot have them."""

from __future__ import annotations

import pytest

from fos_host.errors import ConfigError
from fos_host.kernel.cgroup import LIMIT_CONTROLLERS, detect


def _refused() -> str | None:
    try:
        with detect().open_host() as host:
            missing = [c for c in LIMIT_CONTROLLERS if c not in host.controllers]
            if missing:
                return "; ".join(host.unavailable.get(c, f"no {c} controller") for c in missing)
    except ConfigError as e:
        return str(e)
    return None


REFUSED = _refused()
needs_limits = pytest.mark.skipif(
    REFUSED is not None, reason=f"this process cannot set cgroup limits: {REFUSED}"
)
