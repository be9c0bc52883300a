"""Prometheus metrics of a running host (`fos-host run --metrics ADDR`, or `/metrics` next to
the dashboard with `--dashboard ADDR`).

Everything but the spawn histogram is read from the Host at each scrape (a custom collector),
so a metric is never stale and the host keeps no second copy of its state. The histogram of
renderer spawn latency has to remember every start since the host began, which the host's
bounded `spawn_seconds` deque cannot: each scrape moves the starts that came since the last one
into a real `Histogram`. Starts that arrive and rotate out of the deque between two scrapes
(more than `SPAWNS_KEPT`, 1000, in one scrape interval) are not counted.

    fos_tab_memory_bytes{tab,site,tier}    memory of the tab's renderer cgroup (tabs with one)
    fos_tabs{tier}                         tabs per tier, every tier (0 included)
    fos_renderers                          live renderer processes, warm ones included
    fos_memory_pressure_level              0 none, 1 moderate, 2 critical, 3 emergency
    fos_memory_pressure{fos_memory_pressure=LEVEL}   the same as a state set
    fos_memory_pressure_source_info{source}          trigger, v1, polling, or "" (no monitor)
    fos_memory_stall_some_ratio, fos_memory_stall_full_ratio, fos_memory_available_ratio
                                           the monitor's last reading (absent before one)
    fos_bad_messages_total, fos_renderer_crashes_total, fos_oom_kills_total
    fos_snapshot_store_bytes{tier}, fos_snapshot_store_snapshots{tier}   hot, warm, cold
    fos_renderer_spawn_seconds             histogram: spawn to ready (both channels said HELLO)
    process_*                              the host process itself (CPU, memory, fds)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from fos_host.host.lifecycle import Tier
from fos_host.host.pressure import Level

if TYPE_CHECKING:
    from fos_host.host.host import Host

# Renderer starts: ~5 ms from the zygote, tens of ms on a busy machine, seconds when stuck.
SPAWN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class HostCollector(Collector):
    """The Host as Prometheus metrics, read at each scrape (see the module's docstring)."""

    def __init__(self, host: Host) -> None:
        self._host = host
        self._spawns = Histogram(
            "fos_renderer_spawn_seconds",
            "Renderer start to ready (both channels said HELLO), in seconds",
            buckets=SPAWN_BUCKETS,
            registry=None,  # collected through this collector, after `_take_spawns`
        )
        self._last_spawn: float | None = None  # the newest start already observed

    def describe(self) -> list[Metric]:
        """Nothing: lets the registry skip a collect at registration (the names come and go
        with tabs)."""
        return []

    def collect(self) -> Iterator[Metric]:
        host = self._host
        tabs = host.infos()
        memory = GaugeMetricFamily(
            "fos_tab_memory_bytes",
            "Memory charged to the tab's renderer cgroup (shared by the tabs of one renderer)",
            labels=["tab", "site", "tier"],
        )
        for t in tabs:
            if t.memory is not None:
                memory.add_metric([str(t.id), t.site, t.tier], t.memory)
        yield memory

        per_tier = Counter(t.tier for t in tabs)
        counts = GaugeMetricFamily("fos_tabs", "Tabs in each tier", labels=["tier"])
        for tier in Tier:
            counts.add_metric([tier.value], per_tier[tier.value])
        yield counts
        yield GaugeMetricFamily(
            "fos_renderers", "Live renderer processes, warm ones included", len(host.renderers())
        )
        yield from self._pressure()
        yield CounterMetricFamily(
            "fos_bad_messages", "Renderers killed for breaking the rules", host.bad_messages
        )
        yield CounterMetricFamily(
            "fos_renderer_crashes", "Renderers that ended unasked (bad messages included)",
            host.crashes,
        )  # fmt: skip
        yield CounterMetricFamily(
            "fos_oom_kills", "Renderers ended by the OOM killer in their cgroup", host.oom_kills
        )
        yield from self._store()
        self._take_spawns()
        yield from self._spawns.collect()

    def _pressure(self) -> Iterator[Metric]:
        host = self._host
        level = host.level()
        yield GaugeMetricFamily(
            "fos_memory_pressure_level",
            "Memory pressure: 0 none, 1 moderate, 2 critical, 3 emergency",
            level.rank,
        )
        yield StateSetMetricFamily(
            "fos_memory_pressure",
            "Memory pressure level",
            {other.value: other is level for other in Level},
        )
        monitor = host.monitor
        source = monitor.source if monitor is not None else ""
        yield InfoMetricFamily(
            "fos_memory_pressure_source",
            "How the renderers' cgroup is listened to (empty: no monitor)",
            {"source": source},
        )
        reading = monitor.reading if monitor is not None else None
        if reading is None:
            return
        for name, value, text in (
            ("stall_some", reading.some, "Share of time some task stalled on memory"),
            ("stall_full", reading.full, "Share of time all tasks stalled on memory"),
            ("available", reading.available, "Share of memory available (the gate)"),
        ):
            yield GaugeMetricFamily(f"fos_memory_{name}_ratio", text, value)

    def _store(self) -> Iterator[Metric]:
        stats = self._host.store.stats()
        size = GaugeMetricFamily(
            "fos_snapshot_store_bytes", "Bytes the snapshot store holds", labels=["tier"]
        )
        count = GaugeMetricFamily(
            "fos_snapshot_store_snapshots", "Snapshots the store holds", labels=["tier"]
        )
        for name, tier in (("hot", stats.hot), ("warm", stats.warm), ("cold", stats.cold)):
            size.add_metric([name], tier.bytes)
            count.add_metric([name], tier.count)
        yield size
        yield count

    def _take_spawns(self) -> None:
        """Observe the starts appended to `host.spawn_seconds` since the last call. They are
        found by identity: each entry is a float object of its own, so the newest one already
        observed is located from the right even after older ones rotated out."""
        kept = self._host.spawn_seconds
        start = 0
        if self._last_spawn is not None:
            for i in range(len(kept) - 1, -1, -1):
                if kept[i] is self._last_spawn:
                    start = i + 1
                    break
        for i in range(start, len(kept)):
            self._spawns.observe(kept[i])
        if kept:
            self._last_spawn = kept[-1]


class Metrics:
    """A registry holding the host's collector and the host process's own metrics;
    `exposition()` is the body and content type of one scrape."""

    def __init__(self, host: Host) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(HostCollector(host))
        ProcessCollector(registry=self.registry)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
