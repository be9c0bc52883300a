"""The tabs benchmark runs end to end (its quick variant), its JSON report has every figure,
the table shows them, and it leaves no fd or child behind (nor a cgroup: conftest checks).

No timing or size is asserted: this machine is noisy and the figures are for people to read.
"""

from __future__ import annotations

import json
import os

import pytest

from fos_host.bench_tabs import (
    IDLE_RENDERERS,
    PEER,
    QUICK_PYTHON_SAMPLES,
    QUICK_ROUNDS,
    QUICK_RUNS,
    QUICK_TABS,
    SETUPS,
    render,
    run_tabs_bench,
)
from fos_host.kernel import proc
from fos_host.kernel.fds import open_fd_count

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="renderers with memory limits need root (or a delegated cgroup)"
)

STATS = {"p50", "p90", "min", "max"}


def positive(value: object) -> bool:
    return isinstance(value, int | float) and value > 0


def check_stats(stats: dict[str, float], where: object) -> None:
    assert set(stats) == STATS, where
    assert all(positive(v) for v in stats.values()), (where, stats)


def test_tabs_bench_quick_json(capsys: pytest.CaptureFixture[str]) -> None:
    fds, children = open_fd_count(), set(proc.children())

    code = run_tabs_bench(quick=True, as_json=True)
    report = json.loads(capsys.readouterr().out)

    assert code == 0, report["failed"]
    assert report["failed"] == []
    assert (report["runs"], report["rounds"]) == (QUICK_RUNS, QUICK_ROUNDS)

    assert set(report["open"]) == {s.key for s in SETUPS} | {PEER}
    for key, entry in report["open"].items():
        check_stats(entry["ms"], key)
        if key == PEER:
            assert entry["n"] >= QUICK_RUNS, entry  # one right before every counted open
            assert "loaded_ms" not in entry
        else:
            assert entry["n"] == QUICK_RUNS, entry
            check_stats(entry["loaded_ms"], key)

    tabs = report["tabs"]
    assert (tabs["tabs"], tabs["loaded"], tabs["failures"]) == (QUICK_TABS, QUICK_TABS, 0)
    memory = report["memory"]
    assert set(memory) == {"renderer_page", "renderer_pages", "renderer_idle", "python_idle"}
    assert memory["renderer_page"]["n"] + memory["renderer_pages"]["n"] == tabs["renderers"] > 0
    assert memory["renderer_idle"]["n"] == IDLE_RENDERERS
    assert memory["python_idle"]["n"] == QUICK_PYTHON_SAMPLES
    for key, entry in memory.items():
        assert entry["failures"] == 0, (key, entry)
        if entry["n"]:
            check_stats(entry["uss_mib"], key)
            check_stats(entry["pss_mib"], key)
    assert positive(tabs["total_pss_mib"]) and positive(tabs["pss_per_tab_mib"])
    check_stats(tabs["cgroup_memory_mib"], "cgroup memory")
    assert report["reference"]["chromium_renderer_mb"] == [42, 87]

    assert len(report["ratios"]) == len(SETUPS) + 2
    assert all(positive(v) for v in report["ratios"].values()), report["ratios"]
    assert len(report["goals"]) == 4
    for goal in report["goals"]:
        assert positive(goal["value"]) and goal["met"] in (True, False), goal

    table = render(report)
    for line in ("fos-host, from the warm pool", "idle warm renderer", "goals:"):
        assert line in table

    assert open_fd_count() == fds
    assert set(proc.children()) == children
