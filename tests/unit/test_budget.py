"""cgroups/budget.toml (fos_host.kernel.cgroup `load_budget`, `Budget`, `MemoryUse`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fos_host.errors import ConfigError
from fos_host.kernel.cgroup import Budget, MemoryUse, load_budget

GiB = 1 << 30


def test_the_shipped_budget_loads() -> None:
    budget = load_budget()
    assert budget == Budget(memory_share=0.5, high_share=0.9)
    limits = budget.limits(24 * GiB)
    assert limits.memory_max == 12 * GiB
    assert limits.memory_high == int(12 * GiB * 0.9)
    assert limits.pids_max is None and limits.cpu_weight is None


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[renderers]\nmemory_share = 0.5\n", r"\[renderers\] high_share: missing"),
        ("[renderers]\nmemory_share = 1.5\nhigh_share = 0.9\n",
         r"\[renderers\] memory_share: must be a number in \(0, 1\], not 1.5"),
        ("[renderers]\nmemory_share = 0.5\nhigh_share = true\n",
         r"\[renderers\] high_share: must be a number in \(0, 1\], not True"),
        ("[renderers]\nmemory_share = 0.5\nhigh_share = 0.9\nswap = 1\n",
         r"\[renderers\] swap: unknown key \(known: memory_share, high_share\)"),
        ("[tabs]\n", r"\[tabs\]: unknown table"),
        ("", r"\[renderers\]: missing"),
        ("[renderers\n", "not valid TOML"),
    ],
)  # fmt: skip
def test_a_bad_budget_names_file_and_key(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "budget.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^{path}: {error}"):
        load_budget(path)


def test_a_missing_budget_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"{tmp_path}/none.toml: cannot read the budget"):
        load_budget(tmp_path / "none.toml")


def test_available_share_counts_the_working_set() -> None:
    """Inactive page cache is room (the kernel drops it first); the rest is not."""
    use = MemoryUse(current=100, inactive_file=30, limit=100)
    assert use.working_set == 70
    assert use.available_share == pytest.approx(0.3)
    assert MemoryUse(current=120, inactive_file=0, limit=100).available_share == 0.0
    assert MemoryUse(current=10, inactive_file=50, limit=100).available_share == 1.0
    assert MemoryUse(current=10, inactive_file=0, limit=None).available_share is None
