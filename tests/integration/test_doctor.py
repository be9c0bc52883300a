"""`fos_host.doctor` on the machine the tests run on: every check tried for real, nothing mocked."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fos_host.doctor import Check, Verdict, render_table, run_checks, to_json

NAMESPACE_CHECKS = [
    f"namespace: {kind}" for kind in ("user", "pid", "net", "ipc", "uts", "mount", "cgroup")
]
LIBRARY_CHECKS = [
    f"library: {mod}"
    for mod in ("prctl", "pyseccomp", "cgroupspy", "pyroute2", "posix_ipc", "sdnotify")
]
EXPECTED = [
    "kernel release",
    "architecture",
    "cgroup layout",
    "memory limits",
    *NAMESPACE_CHECKS,
    "unprivileged user namespaces",
    "cgroup delegation (rootless)",
    "seccomp actions",
    "seccomp filter",
    "psi: /proc/pressure/memory",
    "psi: cgroup2 memory.pressure",
    *LIBRARY_CHECKS,
]

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture(scope="module")
def checks() -> list[Check]:
    return run_checks()


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_every_check_has_a_verdict(checks: list[Check]) -> None:
    assert [c.name for c in checks] == EXPECTED
    for c in checks:
        assert isinstance(c.verdict, Verdict), c
        assert c.detail, c
        assert isinstance(c.fix, str), c


@as_root
def test_namespaces_ok_as_root(checks: list[Check]) -> None:
    found = by_name(checks)
    for name in NAMESPACE_CHECKS:
        assert found[name].verdict is Verdict.OK, found[name]
    assert "pid 1" in found["namespace: pid"].detail


def test_libraries_importable(checks: list[Check]) -> None:
    found = by_name(checks)
    for name in LIBRARY_CHECKS:
        assert found[name].verdict is Verdict.OK, found[name]


def test_seccomp_filter_loads(checks: list[Check]) -> None:
    check = by_name(checks)["seccomp filter"]
    assert check.verdict is Verdict.OK, check


def test_psi_verdict_texts(checks: list[Check]) -> None:
    texts = ("triggers allowed", "only 2 s windows", "refused: polling fallback")
    for name in ("psi: /proc/pressure/memory", "psi: cgroup2 memory.pressure"):
        check = by_name(checks)[name]
        if check.verdict is not Verdict.MISSING:
            assert check.detail.startswith(texts), check


def test_json_round_trip(checks: list[Check]) -> None:
    doc = json.loads(to_json(checks))
    assert set(doc) == {"kernel", "checks"}
    assert doc["kernel"]["release"] == os.uname().release
    assert doc["kernel"]["machine"] == os.uname().machine
    assert [c["name"] for c in doc["checks"]] == EXPECTED
    for entry, check in zip(doc["checks"], checks, strict=True):
        assert set(entry) == {"name", "verdict", "detail", "fix"}
        assert entry["verdict"] in {v.value for v in Verdict}
        assert (
            Check(entry["name"], Verdict(entry["verdict"]), entry["detail"], entry["fix"]) == check
        )


def test_table_lists_every_check(checks: list[Check]) -> None:
    table = render_table(checks)
    lines = table.splitlines()
    assert lines[0].split() == ["CHECK", "VERDICT", "DETAIL"]
    for c in checks:
        assert any(line.startswith(c.name) and c.verdict.value in line for line in lines), c
        if c.verdict is not Verdict.OK and c.fix:
            assert f"fix: {c.fix}" in table


def _cgroup_mounts() -> list[Path]:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        if post.split()[0] in ("cgroup", "cgroup2"):
            mounts.append(Path(pre.split()[4]))
    return mounts


def _fos_dirs() -> set[Path]:
    found = set()
    for mount in _cgroup_mounts():
        for top, dirs, _ in os.walk(mount):
            found.update(Path(top, d) for d in dirs if d.startswith("fos"))
    return found


def test_leaves_no_cgroup_behind() -> None:
    before = _fos_dirs()
    run_checks()
    after = _fos_dirs()
    assert after - before == set()
    assert not [p for p in after if p.name.startswith("fos-doctor-")]
