"""The lifecycle policy (fos_host/host/lifecycle.py): pure logic, so plain facts in and one
decision out."""

from __future__ import annotations

import pytest

from fos_host.host.lifecycle import Action, MiB, Policy, TabFacts, Tier, decide
from fos_host.host.pressure import Level


def tab(
    id: int,
    tier: Tier = Tier.BACKGROUND,
    idle: float = 10,
    memory: int = 10 * MiB,
    protected: bool = False,
    renderer: int | None = None,
) -> TabFacts:
    if renderer is None and tier.has_process:
        renderer = 100 + id
    return TabFacts(id, tier, idle, memory if tier.has_process else 0, protected, renderer)


def test_no_pressure_freezes_only_tabs_idle_past_the_limit() -> None:
    tabs = [tab(1, Tier.ACTIVE, 0, protected=True), tab(2, idle=299), tab(3, idle=301)]
    d = decide(tabs, Level.NONE)
    assert d is not None and (d.action, d.tab) == (Action.FREEZE, 3)
    assert decide(tabs[:2], Level.NONE) is None
    assert decide(tabs[:2], Level.NONE, Policy(idle_freeze=60)).tab == 2  # type: ignore[union-attr]


def test_moderate_freezes_background_tabs_then_hibernates_frozen_ones_lru_first() -> None:
    tabs = [tab(1, idle=50), tab(2, idle=500), tab(3, Tier.FROZEN, idle=1000)]
    d = decide(tabs, Level.MODERATE)
    assert d is not None and (d.action, d.tab) == (Action.FREEZE, 2)
    tabs = [tab(1, Tier.FROZEN, idle=50), tab(2, Tier.FROZEN, idle=500)]
    d = decide(tabs, Level.MODERATE)
    assert d is not None and (d.action, d.tab) == (Action.HIBERNATE, 2)
    assert decide([tab(1, Tier.HIBERNATED, idle=900)], Level.MODERATE) is None


def test_memory_weighs_in_the_order() -> None:
    small_old = tab(1, Tier.FROZEN, idle=100, memory=1 * MiB)
    big_newer = tab(2, Tier.FROZEN, idle=60, memory=40 * MiB)
    d = decide([small_old, big_newer], Level.MODERATE)
    assert d is not None and d.tab == 2  # 60 s x 41 beats 100 s x 2


def test_critical_discards_hibernated_tabs_first_then_live_ones() -> None:
    tabs = [tab(1, Tier.FROZEN, idle=900), tab(2, Tier.HIBERNATED, idle=10)]
    d = decide(tabs, Level.CRITICAL)
    assert d is not None and (d.action, d.tab) == (Action.DISCARD, 2)
    d = decide([tabs[0], tab(2, Tier.DISCARDED)], Level.CRITICAL)
    assert d is not None and (d.action, d.tab) == (Action.DISCARD, 1)
    assert decide([tab(2, Tier.DISCARDED)], Level.CRITICAL) is None


def test_emergency_kills_the_largest_live_tab_and_only_one() -> None:
    tabs = [tab(1, memory=5 * MiB, idle=1000), tab(2, Tier.FROZEN, memory=30 * MiB),
            tab(3, Tier.ACTIVE, memory=90 * MiB, protected=True)]  # fmt: skip
    d = decide(tabs, Level.EMERGENCY)
    assert d is not None and (d.action, d.tab) == (Action.KILL, 2)
    # nothing left alive: what is held in memory goes to disk instead
    d = decide([tab(1, Tier.HIBERNATED)], Level.EMERGENCY)
    assert d is not None and d.action is Action.DISCARD


@pytest.mark.parametrize("level", list(Level))
def test_protected_tabs_are_never_touched(level: Level) -> None:
    tabs = [
        tab(1, Tier.ACTIVE, idle=0, protected=True),
        tab(2, idle=10_000, protected=True),  # pinned, or unsaved input
        tab(3, Tier.FROZEN, idle=10_000, protected=True),
    ]
    assert decide(tabs, level) is None


def test_a_tab_sharing_a_renderer_with_a_protected_tab_is_spared() -> None:
    tabs = [
        tab(1, Tier.ACTIVE, idle=0, protected=True, renderer=7),
        tab(2, idle=10_000, renderer=7),  # same renderer: freezing it freezes tab 1
        tab(3, idle=20, renderer=8),
    ]
    d = decide(tabs, Level.MODERATE)
    assert d is not None and d.tab == 3
    assert decide(tabs[:2], Level.MODERATE) is None


def test_a_bad_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="idle_freeze"):
        Policy(idle_freeze=-1)
