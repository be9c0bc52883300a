"""The warm pool: spare sandboxes made ahead of time serve spawns of their kind.

A claimed spare must be exactly as sandboxed as a cold spawn — the attacks from inside fail,
its limits hold, it sees the order's hostname, environment and fds and nothing of the host —
and spares never outlive their Spawner.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator

import pytest
from attacks import assert_attacks_failed
from limits import needs_limits
from probing import assert_isolated, run_probe

from fos_host.errors import ConfigError
from fos_host.kernel import proc
from fos_host.sandbox.jail import Jail
from fos_host.sandbox.sandbox import Sandbox, Spawner
from fos_host.sandbox.spawn import LaunchError

pytestmark = needs_limits


def spares() -> set[int]:
    return {pid for pid in proc.children() if proc.comm(pid) == "fos-spare"}


@pytest.fixture
def pooled() -> Iterator[Spawner]:
    with Spawner(zygote=True, pool=2) as sp:
        yield sp


def warm(sp: Spawner, jail: Jail) -> set[int]:
    """Prewarm the jail's kind and return the pids of the spares, all ready."""
    sp.prewarm(jail)
    sp.settle()
    ready = spares()
    assert len(ready) == 2
    return ready


def claimed_probe(sp: Spawner, jail: Jail, *args: str) -> tuple[str, int]:
    """Run the probe from a spare (asserting it was one); its stdout and host uid."""
    before = warm(sp, jail)
    seen: list[Sandbox] = []
    out, status = run_probe(sp, jail, *args, started=seen.append)
    assert seen[0].pid in before, "the spawn did not take a spare"
    assert status.code == 0, status.describe()
    return out, seen[0].host_uid


def test_a_claimed_spare_is_fully_sandboxed(
    pooled: Spawner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FOS_TEST_SECRET", "hunter2")
    jail = Jail("renderer").memory("64M").hostname("fos-warm").env("FOS_ORDER", "yes")
    out, host_uid = claimed_probe(pooled, jail, "report")
    rep = json.loads(out)
    assert_isolated(rep)  # the order channel is gone from the fds too
    assert rep["hostname"] == "fos-warm"  # the order's, not the spare's
    assert "FOS_ORDER" in rep["environ"]
    assert "FOS_TEST_SECRET" not in rep["environ"]
    assert int(rep["uid_map"][1]) == host_uid
    assert host_uid >= 300000 if os.geteuid() == 0 else host_uid == os.geteuid()


def test_attacks_from_inside_a_claimed_spare_fail(pooled: Spawner, targets: dict[str, str]) -> None:
    args = [f"{k}={v}" for k, v in targets.items()]
    out, _ = claimed_probe(pooled, Jail("renderer"), "attack", *args)
    assert_attacks_failed(out)


def test_the_spares_memory_limit_holds(pooled: Spawner) -> None:
    jail = Jail("renderer").memory("32M")
    before = warm(pooled, jail)
    pids: list[int] = []
    _, status = run_probe(pooled, jail, "alloc", "200", started=lambda sb: pids.append(sb.pid))
    assert pids[0] in before
    assert status.describe() == "out of memory at the 32 MiB limit"


def test_a_request_of_other_limits_goes_cold(pooled: Spawner) -> None:
    before = warm(pooled, Jail("renderer").memory("64M"))
    out, status = run_probe(pooled, Jail("renderer").memory("32M"), "alloc", "8")
    assert status.code == 0 and out.strip() == "allocated"
    assert spares() == before  # untouched


def test_warm_false_goes_cold(pooled: Spawner) -> None:
    jail = Jail("renderer")
    before = warm(pooled, jail)
    with pooled.spawn(jail, entry="fos_host.probe:main", args=("idle",), warm=False) as sb:
        assert sb.pid not in before
    assert spares() == before


@pytest.mark.skipif(os.geteuid() != 0, reason="distinct host uids need root")
def test_the_pool_refills_with_distinct_uids(pooled: Spawner) -> None:
    jail = Jail("renderer")
    before = warm(pooled, jail)
    with pooled.spawn(jail, entry="fos_host.probe:main", args=("idle",)) as sb:
        pooled.settle()
        now = spares()
        assert sb.pid in before and sb.pid not in now
        assert len(now) == 2
        uids = {os.stat(f"/proc/{pid}").st_uid for pid in now | {sb.pid}}
        assert len(uids) == 3 and min(uids) >= 300000


def test_a_dead_spare_is_not_handed_out(pooled: Spawner) -> None:
    jail = Jail("renderer")
    before = warm(pooled, jail)
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    out, status = run_probe(pooled, Jail("renderer"), "byte")
    assert status.code == 0 and out == "!"


def test_an_order_that_cannot_run_is_reported(pooled: Spawner) -> None:
    jail = Jail("renderer")
    before = warm(pooled, jail)
    with pytest.raises(LaunchError, match="exec /nonexistent") as err:
        pooled.spawn(jail, argv=["/nonexistent"])
    assert err.value.exit_code == 127
    assert not (before - spares()) & set(proc.children())  # the failed spare is reaped


def test_closing_the_spawner_ends_every_spare() -> None:
    with Spawner(zygote=True, pool=2) as sp:
        warm(sp, Jail("renderer"))
    assert not spares()  # and leaves_no_trace checks their cgroups


def test_a_pool_needs_the_zygote() -> None:
    with pytest.raises(ConfigError, match="needs the zygote"):
        Spawner(pool=1)
