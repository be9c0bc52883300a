"""The pressure level rules (fos_host/host/pressure.py `decide`): the gate, hysteresis and
dwell, driven by readings at chosen times (no kernel, no clock of the machine)."""

from __future__ import annotations

import pytest

from fos_host.errors import ConfigError
from fos_host.host.pressure import (
    Change,
    Level,
    LevelRule,
    LevelState,
    PressureConfig,
    Reading,
    decide,
)

DWELL = 5.0
PLENTY = 0.9  # available share: far above every gate
CALM = 0.0  # no stall


def step(
    state: LevelState, now: float, some: float, available: float, full: float = 0.0
) -> LevelState:
    return decide(state, Reading(some, full, available), now, dwell=DWELL)


def at(level: Level, since: float = 0.0) -> LevelState:
    return LevelState(level, since)


def test_levels_are_ordered_and_named() -> None:
    assert Level.NONE < Level.MODERATE < Level.CRITICAL < Level.EMERGENCY
    assert max(Level) is Level.EMERGENCY
    assert [level.value for level in Level] == ["none", "moderate", "critical", "emergency"]


@pytest.mark.parametrize("some", [0.1, 0.5, 1.0])
def test_stall_alone_never_raises_the_level(some: float) -> None:
    """A tab thrashing at its own limit while memory is plentiful: PSI says stall, the gate
    says no (lmkd's rule: PSI alone never kills)."""
    assert step(LevelState(), 1.0, some, PLENTY, full=some).level is Level.NONE
    assert step(LevelState(), 1.0, some, 0.41, full=some).level is Level.NONE


@pytest.mark.parametrize("available", [0.3, 0.04, 0.0])
def test_a_low_gate_alone_never_raises_the_level(available: float) -> None:
    """Memory full but nobody waiting for it: memory well used, nothing to shed."""
    assert step(LevelState(), 1.0, CALM, available).level is Level.NONE
    assert step(LevelState(), 1.0, 0.07, available).level is Level.NONE  # under 7.5 %


@pytest.mark.parametrize(
    ("some", "full", "available", "level"),
    [
        (0.075, 0.0, 0.39, Level.MODERATE),
        (0.5, 0.0, 0.39, Level.MODERATE),  # heavy stall, but the gate is only at moderate
        (0.1, 0.0, 0.04, Level.MODERATE),  # short of memory, stall only moderate
        (0.2, 0.0, 0.049, Level.CRITICAL),
        (0.2, 0.0, 0.019, Level.EMERGENCY),
        (0.6, 0.5, 0.049, Level.EMERGENCY),  # full stall with critical shortage
        (0.6, 0.5, 0.05, Level.MODERATE),  # … but not above the critical gate
    ],
)
def test_entry_needs_both_signals(some: float, full: float, available: float, level: Level) -> None:
    assert step(LevelState(), 1.0, some, available, full).level is level


def test_up_at_once_even_within_the_dwell() -> None:
    s = step(LevelState(), 0.0, 0.1, 0.3)
    assert s == LevelState(Level.MODERATE, 0.0, s.rule)
    s = step(s, 0.1, 0.25, 0.03)
    assert (s.level, s.since) == (Level.CRITICAL, 0.1)
    s = step(s, 0.2, 0.25, 0.01)
    assert (s.level, s.since) == (Level.EMERGENCY, 0.2)


def test_dwell_holds_a_level_after_the_signal_is_gone() -> None:
    s = at(Level.CRITICAL, since=10.0)
    assert step(s, 10.0 + DWELL - 0.01, CALM, PLENTY) is s
    s = step(s, 10.0 + DWELL, CALM, PLENTY)
    assert (s.level, s.since) == (Level.NONE, 10.0 + DWELL)


def test_a_reading_that_enters_the_level_again_restarts_the_dwell() -> None:
    s = at(Level.MODERATE, since=0.0)
    s = step(s, 4.0, 0.1, 0.3)  # confirmed
    assert (s.level, s.since) == (Level.MODERATE, 4.0)
    assert step(s, 8.9, CALM, PLENTY).level is Level.MODERATE
    assert step(s, 9.0, CALM, PLENTY).level is Level.NONE


@pytest.mark.parametrize(
    ("some", "available", "held"),
    [
        (0.04, 0.3, True),  # stall above half the entry (3.75 %)
        (0.03, 0.3, False),  # below half
        (0.1, 0.79, True),  # available below twice the entry (80 %)
        (0.1, 0.81, False),  # above twice
    ],
)
def test_moderate_exits_at_half_the_stall_or_twice_the_available(
    some: float, available: float, held: bool
) -> None:
    s = at(Level.MODERATE, since=0.0)
    after = step(s, 100.0, some, available)  # long past the dwell
    assert after.level is (Level.MODERATE if held else Level.NONE)
    assert step(LevelState(), 100.0, some, available).level is Level.NONE  # never enters


def test_stepping_down_stops_at_the_highest_level_still_held() -> None:
    s = at(Level.EMERGENCY, since=0.0)
    s = step(s, 10.0, 0.15, 0.08)  # critical held (some ≥ 10 %, available < 10 %)
    assert (s.level, s.since) == (Level.CRITICAL, 10.0)
    s = step(s, 12.0, 0.15, 0.3)  # within CRITICAL's dwell: kept
    assert s.level is Level.CRITICAL
    s = step(s, 15.0, 0.15, 0.3)  # moderate entered again at the same time
    assert (s.level, s.since) == (Level.MODERATE, 15.0)


def test_none_stays_none_without_touching_since() -> None:
    s = LevelState()
    assert step(s, 3.0, CALM, PLENTY) is s


def test_a_scripted_squeeze_with_a_fake_clock() -> None:
    """Readings once a second: pressure builds, peaks and goes; the levels follow with the
    dwell on the way down."""
    script = [  # (some, available)
        (0.0, 0.8), (0.1, 0.5), (0.1, 0.35), (0.3, 0.04), (0.3, 0.04),
        (0.05, 0.2), (0.05, 0.2), (0.05, 0.2), (0.05, 0.2), (0.05, 0.2),
        (0.05, 0.2), (0.01, 0.2), (0.01, 0.2), (0.01, 0.2), (0.01, 0.2),
        (0.0, 0.9), (0.0, 0.9),
    ]  # fmt: skip
    s, levels = LevelState(), []
    for t, (some, available) in enumerate(script):
        s = step(s, float(t), some, available)
        levels.append(s.level.value[0])
    # t=1: available 50 % is above the gate; t=3: critical, confirmed at t=4; t=5..: only
    # moderate holds, so CRITICAL lasts until t=4+5; MODERATE (entered at 9) is no longer
    # held from t=11 (some 1 % < 3.75 %) and goes at t=9+5.
    assert "".join(levels) == "nnmcccccc" + "mmmmm" + "nnn"


def test_rules_and_config_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"Level\.NONE"):
        LevelRule(Level.NONE, available=0.4, some=0.1)
    with pytest.raises(ConfigError, match="needs a some or full"):
        LevelRule(Level.MODERATE, available=0.4)
    with pytest.raises(ConfigError, match=r"MODERATE: some must be a share in \(0, 1\]"):
        LevelRule(Level.MODERATE, available=0.4, some=15)
    with pytest.raises(ConfigError, match="exit_factor"):
        PressureConfig(exit_factor=0.5)
    with pytest.raises(ConfigError, match="interval must be positive"):
        PressureConfig(interval=0)
    with pytest.raises(ConfigError, match="no 'some' stall rule for CRITICAL"):
        PressureConfig(rules=(LevelRule(Level.MODERATE, 0.4, some=0.1),)).stall_for(Level.CRITICAL)
    assert PressureConfig().stall_for(Level.MODERATE) == 0.075


def test_a_change_says_why() -> None:
    reading = Reading(0.21, 0.0, 0.03, "event on sb-3", "budget of fos.1.2")
    s = decide(LevelState(), reading, 1.0)
    up = Change(s.level, Level.NONE, 1.0, reading, s.rule)
    assert up.reason == (
        "CRITICAL: some ≥ 20.0% and available < 5%: "
        "stall some 21.0% full 0.0% (event on sb-3), available 3.0% (budget of fos.1.2)"
    )
    down = Change(Level.NONE, Level.CRITICAL, 9.0, Reading(0.0, 0.0, 0.9), None)
    assert down.reason.startswith("CRITICAL no longer holds: stall some 0.0%")
