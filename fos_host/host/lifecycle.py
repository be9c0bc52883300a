"""When a tab steps down a tier: the lifecycle policy (pure logic; the host carries it out).

    active ──▶ background ──idle/pressure──▶ frozen ──pressure──▶ hibernated ──pressure──▶ discarded
      ▲                                                                                      │
      └────────────── activate: thaw, or a warm renderer restores the snapshot ──────────────┘

`decide()` looks at every tab and the pressure level and returns **one** action, or None; the
host carries it out, then asks again (so every action sees what the last one freed). The
seed's rule — idle > 300 s and pressure > 0.8 → hibernate — is the default, generalised:

- no pressure: a background tab idle longer than `idle_freeze` (5 minutes) is frozen: it
  costs no CPU, and it is the first to go when pressure comes;
- moderate: freeze the background tabs, then hibernate the frozen ones (snapshot kept in
  memory, LZ4-compressed; the process is killed and its memory freed);
- critical: discard (the snapshot moves to disk): hibernated tabs first (they free host
  memory only), then tabs that still have a process (snapshot straight to disk);
- emergency: kill the largest tab that still has a process, without a snapshot: no time to
  take one (Android's lmkd does the same). Only ever one tab's renderer.

Victims are the least recently used first, weighted by the memory each would free: the
score is idle seconds x MiB freed (+1 MiB, so a tab that frees nothing still ages). The
active tab, pinned tabs and tabs with unsaved input are never touched, nor is a tab whose
renderer also shows a protected or more active tab (an action on a tab acts on its
renderer, and so on every tab in it).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from fos_host.host.pressure import Level

MiB = 1 << 20


class Tier(enum.Enum):
    ACTIVE = "active"
    BACKGROUND = "background"
    FROZEN = "frozen"
    HIBERNATED = "hibernated"  # snapshot in the host's warm tier, no process
    DISCARDED = "discarded"  # snapshot on disk, no process

    @property
    def has_process(self) -> bool:
        return self in (Tier.ACTIVE, Tier.BACKGROUND, Tier.FROZEN)


class Action(enum.Enum):
    FREEZE = "freeze"
    HIBERNATE = "hibernate"
    DISCARD = "discard"
    KILL = "kill"


@dataclass(frozen=True)
class TabFacts:
    """What the policy knows of a tab."""

    id: int
    tier: Tier
    idle: float  # seconds since it was last active
    memory: int  # bytes its renderer would free (its cgroup's usage), 0 without a process
    protected: bool  # the active tab, pinned, unsaved input — or sharing a renderer with one
    renderer: int | None = None  # tabs sharing a renderer share its fate


@dataclass(frozen=True)
class Decision:
    action: Action
    tab: int
    why: str


@dataclass(frozen=True)
class Policy:
    idle_freeze: float = 300.0  # seconds in the background before a tab is frozen anyway

    def __post_init__(self) -> None:
        if self.idle_freeze < 0:
            raise ValueError(f"idle_freeze must be >= 0, not {self.idle_freeze}")


def score(tab: TabFacts) -> float:
    """Least recently used first, weighted by the memory it would free."""
    return tab.idle * (1 + tab.memory / MiB)


def decide(tabs: Iterable[TabFacts], level: Level, policy: Policy = Policy()) -> Decision | None:
    """The next step, or None when there is nothing to do at this level."""
    candidates = _unprotected(list(tabs))
    if level is Level.EMERGENCY:
        alive = [t for t in candidates if t.tier.has_process and t.tier is not Tier.ACTIVE]
        if alive:
            victim = max(alive, key=lambda t: (t.memory, t.idle))
            why = f"memory emergency: the largest tab ({victim.memory / MiB:.1f} MiB), no snapshot"
            return Decision(Action.KILL, victim.id, why)
        level = Level.CRITICAL  # nothing left to kill: discard what is held in memory
    if level is Level.CRITICAL:
        for tier in (Tier.HIBERNATED, Tier.FROZEN, Tier.BACKGROUND):
            best = _best(candidates, tier)
            if best is not None:
                why = f"critical memory pressure: a {tier.value} tab to disk"
                return Decision(Action.DISCARD, best.id, why)
        return None
    if level is Level.MODERATE:
        for tier, action in ((Tier.BACKGROUND, Action.FREEZE), (Tier.FROZEN, Action.HIBERNATE)):
            best = _best(candidates, tier)
            if best is not None:
                return Decision(action, best.id, "moderate memory pressure")
        return None
    idle = [t for t in candidates if t.tier is Tier.BACKGROUND and t.idle >= policy.idle_freeze]
    if idle:
        victim = max(idle, key=score)
        return Decision(Action.FREEZE, victim.id,
                        f"idle for {victim.idle:.0f} s in the background")  # fmt: skip
    return None


def _best(tabs: list[TabFacts], tier: Tier) -> TabFacts | None:
    of_tier = [t for t in tabs if t.tier is tier]
    return max(of_tier, key=score) if of_tier else None


def _unprotected(tabs: list[TabFacts]) -> list[TabFacts]:
    """Tabs the policy may act on: not protected, and not sharing a renderer with a tab that
    is protected or in a higher tier (its renderer must keep running for that one)."""
    order = list(Tier)
    keep: set[int] = set()
    by_renderer: dict[int, list[TabFacts]] = {}
    for t in tabs:
        if t.renderer is not None:
            by_renderer.setdefault(t.renderer, []).append(t)
    for group in by_renderer.values():
        top = min(order.index(t.tier) for t in group)
        if any(t.protected for t in group):
            keep.update(t.id for t in group)
        else:
            keep.update(t.id for t in group if order.index(t.tier) > top)
    return [t for t in tabs if not t.protected and t.id not in keep]
