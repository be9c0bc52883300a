"""The IPC benchmark runs end to end (its quick variant), its JSON report has every figure,
and it leaves nothing behind: no fd, no memfd mapping, no child, no CPU pinning.

No timing is asserted: this machine is noisy and the figures are for people to read.
"""

from __future__ import annotations

import json
import os

import pytest

from fos_host.bench_ipc import QUICK_ROUNDS, QUICK_RUNS, SIZES, run_ipc_bench
from fos_host.kernel import proc
from fos_host.kernel.fds import open_fd_count

ROUNDTRIPS = {"fos_plain", "fos_coro", "mp_pipe", "seqpacket", "seqpacket_asyncio"}
TRANSFERS = {"fos_pool_shared", "fos_pool", "fos_memfd", "mp_pipe", "socketpair"}
COPIES = {"new", "reused"}
STATS = {"p50", "p90", "p99", "min", "max", "n", "round_p50_min", "round_p50_max"}


def memfd_mappings() -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if "/memfd:" in line]


def positive(value: object) -> bool:
    return isinstance(value, int | float) and value > 0


def test_ipc_bench_quick_json(capsys: pytest.CaptureFixture[str]) -> None:
    fds, maps = open_fd_count(), memfd_mappings()
    children, affinity = set(proc.children()), os.sched_getaffinity(0)

    code = run_ipc_bench(quick=True, as_json=True)
    report = json.loads(capsys.readouterr().out)

    assert code == 0, report["failed"]
    assert report["failed"] == []
    assert (report["runs"], report["rounds"]) == (QUICK_RUNS, QUICK_ROUNDS)
    placements = ["same_cpu", "two_cpus"] if len(affinity) > 1 else ["same_cpu"]
    assert list(report["roundtrip_us"]) == list(report["placements"]) == placements

    for where, trips in report["roundtrip_us"].items():
        assert set(trips) == ROUNDTRIPS, where
        for key, entry in trips.items():
            for size in SIZES:
                stats = entry[str(size)]
                assert set(stats) == STATS, (where, key, size)
                assert stats["n"] == QUICK_RUNS * QUICK_ROUNDS, (where, key, size)
                assert all(positive(v) for v in stats.values()), (where, key, size, stats)
    for section, keys in (("transfer_gbps", TRANSFERS), ("memcpy_gbps", COPIES)):
        assert set(report[section]) == keys, section
        for key, entry in report[section].items():
            assert entry["n"] == QUICK_ROUNDS, (section, key)
            assert set(entry["gbps"]) == {"p50", "p90", "min", "max"}, (section, key)
            assert all(positive(v) for v in entry["gbps"].values()), (section, key)

    assert all(positive(v) for v in report["ratios"].values())
    assert len(report["goals"]) == 2 * len(placements) + 4  # calls; pool in place, copied out
    for goal in report["goals"]:
        assert positive(goal["value"]) and goal["met"] in (True, False), goal

    assert open_fd_count() == fds
    assert memfd_mappings() == maps
    assert set(proc.children()) == children
    assert os.sched_getaffinity(0) == affinity


def test_ipc_bench_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_ipc_bench(runs=2, rounds=1) == 0
    out = capsys.readouterr().out
    assert "fos-host call, server method a plain def" in out
    assert "goals:" in out
