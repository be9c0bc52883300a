"""The spawn benchmark runs end to end and its JSON report has every figure.

No timing is asserted: this machine is noisy and the figures are for people to read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from fos_host.bench import run_spawn_bench

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="sandboxes with memory limits need root (or a delegated cgroup)"
)

RUNS = 3
METHODS = {"fos_zygote_warm", "fos_zygote", "fos_exec", "bwrap", "mp_forkserver", "mp_fork"}
PEERS = METHODS - {"fos_zygote_warm", "fos_zygote"}
MEMORY = {"fos_zygote_idle", "python_idle", "zygote_process"}


def medians(node: object, path: str = "") -> Iterator[tuple[str, object]]:
    """Every "p50" in the report, with where it is."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "p50":
                yield path, value
            else:
                yield from medians(value, f"{path}.{key}")


def test_spawn_bench_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = run_spawn_bench(runs=RUNS, as_json=True)
    report = json.loads(capsys.readouterr().out)

    assert code in (0, 1)
    assert code == (1 if report["failed"] else 0)
    assert {"runs", "machine", "spawn", "memory", "ratios", "goals", "failed"} <= set(report)
    assert report["runs"] == RUNS
    assert set(report["spawn"]) == METHODS
    assert set(report["memory"]) == MEMORY

    for key, entry in report["spawn"].items():
        if not entry["available"]:
            assert key == "bwrap", f"{key} unavailable: {entry.get('why')}"
            continue
        assert entry["n"] == RUNS, (key, entry)
        for metric in ("first_byte_ms", "exit_ms"):
            assert set(entry[metric]) == {"p50", "p90", "min", "max"}, (key, metric)
    for key, entry in report["memory"].items():
        assert entry["n"] >= 1, (key, entry)
        assert set(entry["uss_mib"]) == set(entry["pss_mib"]) == {"p50", "p90", "min", "max"}

    assert set(report["ratios"]) == {
        f"{peer}_over_{ours}" for peer in PEERS for ours in ("zygote_warm", "zygote")
    }
    assert [g["met"] in (True, False, None) for g in report["goals"]] == [True] * 5

    found = list(medians(report))
    assert len(found) >= 2 * 5 + 2 * 3  # 5 methods besides bwrap, 3 memory rows
    for where, value in found:
        assert isinstance(value, int | float) and value > 0, where
