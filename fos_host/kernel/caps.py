"""Capabilities, securebits and no_new_privs (python-prctl).

Child half: `lock_bounding` empties the bounding set, sets and locks the securebits so that
neither uid 0 nor an exec can regain a capability; `clear_sets` clears the effective,
permitted and inheritable sets (ambient capabilities go with them), then sets no_new_privs.
A spare sandbox (sandbox/pool.py) does the first before it waits for its order, the second
after setting its hostname.
Host half: `read_status` reports a process's CapEff/CapBnd/NoNewPrivs/Seccomp from
/proc/PID/status (used by the isolation report and tests).
"""

from __future__ import annotations

import prctl

from fos_host.errors import StepError


def _cap_last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def lock_bounding() -> None:
    """Empty the bounding set and lock the securebits: no exec or uid change can gain a
    capability from here on. The process keeps the ones it has (`clear_sets` drops them)."""
    last = _cap_last_cap()
    known = max(prctl.ALL_CAPS)
    if last > known:
        raise StepError(
            "drop capabilities",
            0,
            f"kernel has capability {last} but python-prctl knows up to {known}: upgrade it",
        )
    try:
        prctl.capbset.drop(*prctl.ALL_CAPS)
        sb = prctl.securebits
        sb.noroot = True
        sb.noroot_locked = True
        sb.no_setuid_fixup = True
        sb.no_setuid_fixup_locked = True
        sb.keep_caps = False
        sb.keep_caps_locked = True
    except OSError as e:
        raise StepError("drop capabilities", e.errno or 0) from e


def clear_sets() -> None:
    """Clear the inheritable, effective and permitted sets (ambient go with them), then
    set no_new_privs."""
    try:
        prctl.cap_inheritable.limit()
        prctl.cap_effective.limit()
        prctl.cap_permitted.limit()
    except OSError as e:
        raise StepError("drop capabilities", e.errno or 0) from e
    no_new_privs()


def no_new_privs() -> None:
    try:
        prctl.set_no_new_privs(1)
    except OSError as e:
        raise StepError("no_new_privs", e.errno or 0) from e


def read_status(pid: int | str = "self") -> dict[str, str]:
    """The capability and sandbox lines of /proc/PID/status."""
    keys = (
        "Uid",
        "Gid",
        "CapInh",
        "CapPrm",
        "CapEff",
        "CapBnd",
        "CapAmb",
        "NoNewPrivs",
        "Seccomp",
        "Seccomp_filters",
        "NSpid",
    )
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = value.strip()
    return out
