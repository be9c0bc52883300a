"""The lifecycle benchmark runs end to end (its quick variant: one sample of every page, one
pressure onset with a real hog), its JSON report has every figure, the table shows them, and
it leaves no fd or child behind (nor a cgroup: conftest checks), and removes the v1 freezer
cgroup that a killed run left.

No timing is asserted: this machine is noisy and the figures are for people to read. That the
memory came back and the pressure led to an action is: those are what the figures stand on.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from fos_host.bench_lifecycle import (
    BENCH_FREEZER,
    OPTIONAL,
    PAGES,
    QUICK_ONSETS,
    STEPS,
    render,
    run_lifecycle_bench,
)
from fos_host.kernel import proc
from fos_host.kernel.cgroup import detect
from fos_host.kernel.fds import open_fd_count

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="renderers, the hog and the peers' cgroups need root"
)

STATS = {"p50", "p90", "min", "max"}


def test_lifecycle_bench_quick_json(capsys: pytest.CaptureFixture[str]) -> None:
    fds, children = open_fd_count(), set(proc.children())
    freezer = detect().own_dir("freezer")
    if freezer is not None:  # as a SIGKILLed run leaves it: named after a pid no longer alive
        gone = subprocess.Popen(["true"])
        gone.wait()
        stale = freezer / f"{BENCH_FREEZER}{gone.pid}"
        stale.mkdir()

    code = run_lifecycle_bench(quick=True, as_json=True)
    report = json.loads(capsys.readouterr().out)

    assert code == 0, report["failed"]
    assert report["failed"] == []
    assert set(report["steps"]) == {s.key for s in STEPS}
    for key, entry in report["steps"].items():
        if key in OPTIONAL and entry["ms"] is None:
            continue
        assert entry["n"] == len(PAGES), (key, entry)
        assert set(entry["ms"]) >= STATS and entry["ms"]["min"] > 0, (key, entry)
        assert set(entry["ms"]["pages"]) == set(PAGES), key

    memory = report["memory"]
    assert memory["freed_mib"]["min"] > 1, memory  # every hibernation ended a renderer
    assert memory["freed_share"]["p50"] > 0.5, memory  # and most of it came back
    for page, row in report["per_page"].items():
        assert row["compression"] > 1, (page, row)
    warm = report["warm_tier"]
    assert warm["tabs"] == len(PAGES) and warm["ratio"] > 1, warm

    pressure = report["pressure"]
    assert pressure["source"] in ("trigger", "v1", "polling"), pressure
    assert len(pressure["samples_s"]) == QUICK_ONSETS, pressure
    assert all(a.startswith("freeze") for a in pressure["first_actions"]), pressure

    assert len(report["goals"]) == 5
    for goal in report["goals"]:
        assert goal["value"] is not None and goal["met"] in (True, False), goal

    table = render(report)
    for line in ("hibernated -> restored, painted", "peers, for orientation:", "goals:"):
        assert line in table

    assert open_fd_count() == fds
    assert set(proc.children()) == children
    if freezer is not None:
        assert not stale.exists()
