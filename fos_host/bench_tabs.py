"""`fos-host bench tabs`: how fast a new tab gets a sandboxed renderer, and what 200 tabs cost
in memory, against peers measured in the same run.

Open latency: `await host.open(url, wait=False)`, from the call until the tab has a renderer
locked to its site, a view channel in it and its frame attached (then the page loads: not part
of the figure, but the time from the same call to the page shown is reported as "loaded").
Three setups, each a `Host` of its own (a process holds one `Spawner` at a time, so they take
turns: in every round each gets a fresh Host, the order rotated round by round):

- fos_warm: `HostConfig(warm_renderers=2)`: a running, connected renderer from the warm pool
  is locked to the tab's site; the pool is refilled behind it.
- fos_zygote: `warm_renderers=0, spare_sandboxes=1`: a new renderer, from a spare sandbox the
  zygote made ahead of time, which takes the order; the renderer starts its loop and connects
  while the tab waits.
- fos_cold: `warm_renderers=0, spare_sandboxes=0`: the whole spawn sequence from the zygote.

Before every sample the host is left to come to rest, as between a person's clicks: the last
sample's renderer has exited, the warm pool is full and the spare sandboxes are made. Each
sample opens a tab of the next site, waits for its page and closes the tab; with one tab per
renderer (the default) every new tab needs a renderer of its own anyway. The first open of
every Host is a warm-up, not counted.

Peer: multiprocessing's forkserver (this benchmark's target module preloaded; see
`fos_host.bench.Forkserver`) starting a Process that sends one message back over a Pipe — a
fork from a preloaded server with no sandbox at all. One sample right before every counted
open, with the host at rest.

Memory: one Host (warm_renderers=4) opens 200 tabs over 50 sites (site0.test … site49.test,
a few small pages each, served by an `OriginServer` in this process), one after another, each
loaded; tabs of one site share a renderer only past the process limit (from RAM). Then, from
/proc/PID/smaps_rollup of each renderer: USS (Private_Clean + Private_Dirty) and PSS — of the
renderers showing one page, of those sharing several, and of the idle warm ones; the total PSS
of all renderers showing pages; and, for context, their cgroups' memory usage. Peer: an exec'd,
unsandboxed `python -S -I -c` idling (what a renderer would cost without the zygote).
Chromium's published median per renderer is quoted, not measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fos_host.bench import (
    MAX_FAILURES_IN_A_ROW,
    MIB,
    BenchError,
    Forkserver,
    Memory,
    failure_lines,
    goal_lines,
    machine,
    machine_line,
    num,
    python_idle_memory,
    smaps_rollup,
    summarize,
)
from fos_host.errors import ConfigError, FosError
from fos_host.host.host import Host, HostConfig, RendererProc, TabState
from fos_host.services.origin import OriginServer, Page, Sites, html

SITES = 50
ARTICLES = 3  # pages per site besides its index
TABS = 200
RUNS = 50  # counted opens per setup
ROUNDS = 5
QUICK_RUNS = 3
QUICK_ROUNDS = 1
QUICK_TABS = 20
QUICK_SITES = 5
WARM = 2  # the warm pool of the fos_warm setup
IDLE_RENDERERS = 4  # the warm pool of the memory host: the idle renderers measured
PYTHON_SAMPLES = 5
QUICK_PYTHON_SAMPLES = 2
SETTLE_TIMEOUT = 30.0  # seconds for a host to come to rest between samples
POLL = 0.002  # seconds between looks while it does

CHROMIUM_MB = (42, 87)  # a renderer, published median (as quoted in the issue); not measured
CGROUP_MEMORY = (
    "the renderer cgroup's charge (v2 memory.current, v1 memory.usage_in_bytes): what the "
    "renderer faulted in itself (its heap, its copies of the zygote's pages, the frame it "
    "paints into) and kernel memory charged to it (page tables, sockets); not the pages it "
    "inherited from the zygote, which stay charged where they were first faulted even once "
    "only the renderer maps them: so it can be below USS"
)

GOAL_WARM_MS = 1.0
GOAL_ZYGOTE_MS = 5.0
GOAL_IDLE_USS_MIB = 5.0  # "5 MB" of the issue; sizes in this project are binary
GOAL_PAGE_USS_MIB = 15.0


@dataclass(frozen=True)
class Setup:
    key: str
    label: str
    warm_renderers: int
    spare_sandboxes: int


SETUPS = (
    Setup("fos_warm", "fos-host, from the warm pool", WARM, 1),
    Setup("fos_zygote", "fos-host, from the zygote (spare sandbox)", 0, 1),
    Setup("fos_cold", "fos-host, cold (whole spawn sequence)", 0, 0),
)
PEER = "mp_forkserver"


@dataclass
class Opens:
    """The samples of one way to start something: a setup's opens, or the peer's."""

    key: str
    label: str
    ms: list[float] = field(default_factory=list)
    loaded_ms: list[float] = field(default_factory=list)  # fos-host: to the page shown
    failures: int = 0  # samples that failed (made up for; not in the figures)
    error: str = ""  # the first failure
    in_a_row: int = 0

    @property
    def broken(self) -> bool:
        return self.in_a_row >= MAX_FAILURES_IN_A_ROW

    def add(self, ms: float, loaded_ms: float | None = None) -> None:
        self.in_a_row = 0
        self.ms.append(ms)
        if loaded_ms is not None:
            self.loaded_ms.append(loaded_ms)

    def fail(self, e: BaseException) -> None:
        self.failures += 1
        self.in_a_row += 1
        self.error = self.error or f"{type(e).__name__}: {e}"

    def result(self) -> dict[str, object]:
        out: dict[str, object] = {"label": self.label, "n": len(self.ms)}
        if self.ms:
            out["ms"] = summarize(self.ms)
        if self.loaded_ms:
            out["loaded_ms"] = summarize(self.loaded_ms)
        out["failures"] = self.failures
        if self.error:
            out["error"] = self.error
        return out


# --------------------------------------------------------------------------------------
# the sites


def bench_sites(count: int) -> dict[str, dict[str, Page]]:
    """`count` sites, site0.test …: each an index and ARTICLES articles, small pages like the
    demo's, linking to each other and to the next sites."""
    names = [f"site{i}.test" for i in range(count)]
    paragraph = "<p>" + "A sentence of an article about sandboxes. " * 12 + "</p>\n"
    sites = {}
    for i, name in enumerate(names):
        others = " · ".join(
            f'<a href="//{other}/">{other}</a>' for other in names[i + 1 : i + 4] + names[:1]
        )
        links = f"<p>{others}</p>\n"
        index = "".join(f'<li><a href="/article/{n}">Article {n}</a></li>' for n in range(ARTICLES))
        pages = {"/": html(f"Site {i}", f"{links}<ul>{index}</ul>")}
        for n in range(ARTICLES):
            pages[f"/article/{n}"] = html(f"Site {i}, article {n}", links + paragraph * (n + 2))
        sites[name] = pages
    return sites


def tab_urls(sites: Sites) -> Iterator[str]:
    """Every site's first page, then every site's second page, …, round and round: the next
    URL is always of the next site."""
    pages = [[f"http://{name}{path}" for path in paths] for name, paths in sites.items()]
    for n in itertools.count():
        for urls in pages:
            yield urls[n % len(urls)]


# --------------------------------------------------------------------------------------
# open latency


def _idle(host: Host) -> list[RendererProc]:
    """The warm renderers: running, connected and not locked to a site yet."""
    return [p for p in host.renderers() if p.lock is None and p.ready_view is not None]


async def settle(host: Host, gone: RendererProc | None = None) -> None:
    """Wait until the host is at rest: `gone` (a renderer released) has exited, the warm pool
    is full and the spare sandboxes are made (`Host.settle`)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while gone is not None and gone.status is None:
        if time.monotonic() > deadline:
            raise BenchError(f"renderer pid={gone.pid} did not exit within {SETTLE_TIMEOUT:g} s")
        await asyncio.sleep(POLL)
    try:
        await asyncio.wait_for(host.settle(), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise BenchError(f"the host did not come to rest within {SETTLE_TIMEOUT:g} s") from None
    if len(_idle(host)) < host.config.warm_renderers:
        raise BenchError("the warm pool could not be refilled (see the log)")


async def _open_once(host: Host, url: str) -> tuple[float, float, RendererProc]:
    """Open a tab (timed), wait for its page, close it: ms to open, ms to loaded, and the
    renderer, which the close released."""
    t0 = time.perf_counter_ns()
    tab = await host.open(url, wait=False)
    t1 = time.perf_counter_ns()
    proc = tab.renderer
    try:
        await host.wait_loaded(tab.id)
        t2 = time.perf_counter_ns()
    finally:
        await host.close_tab(tab.id)
    if tab.state is not TabState.READY or proc is None:
        raise BenchError(f"{url}: {tab.state.value} {tab.reason}".rstrip())
    return (t1 - t0) / 1e6, (t2 - t0) / 1e6, proc


def _config(profile: Path, origin: OriginServer, warm: int, spare: int) -> HostConfig:
    return HostConfig(
        profile=profile,
        warm_renderers=warm,
        spare_sandboxes=spare,
        resolve=origin.resolve(),
        resolve_only=True,
    )


async def _session(
    config: HostConfig, row: Opens, peer: Opens, fs: Forkserver, target: int, urls: Iterator[str]
) -> None:
    """One Host of a setup: a warm-up open, then opens until `row` has `target` samples, one
    peer sample right before each."""
    async with Host(config) as host:
        gone: RendererProc | None = None
        counted = False  # the first open of a Host warms up
        while len(row.ms) < target and not row.broken:
            await settle(host, gone)
            gone = None
            if counted:
                try:
                    peer.add(fs.run()[0] / 1e6)
                except (OSError, FosError) as e:
                    peer.fail(e)
            try:
                ms, loaded_ms, gone = await _open_once(host, next(urls))
            except (OSError, FosError) as e:
                row.fail(e)
                continue
            if counted:
                row.add(ms, loaded_ms)
            counted = True


async def _latency(
    runs: int, rounds: int, fs: Forkserver, profile: Path, origin: OriginServer
) -> list[Opens]:
    """The setups in turns, `rounds` rounds; the rows of the setups and of the peer."""
    rows = {s.key: Opens(s.key, s.label) for s in SETUPS}
    peer = Opens(PEER, "multiprocessing forkserver, 1 message back")
    urls = tab_urls(origin.sites)
    with contextlib.suppress(OSError, FosError):  # a warm-up; failures show in the samples
        fs.run()
    for r in range(rounds):
        k = r % len(SETUPS)
        for setup in SETUPS[k:] + SETUPS[:k]:
            row = rows[setup.key]
            config = _config(profile, origin, setup.warm_renderers, setup.spare_sandboxes)
            target = runs * (r + 1) // rounds
            try:
                await _session(config, row, peer, fs, target, urls)
            except (OSError, FosError) as e:  # the Host did not start, or did not come to rest
                row.fail(e)
    return [*rows.values(), peer]


# --------------------------------------------------------------------------------------
# memory


def _rollups(key: str, label: str, pids: list[int]) -> Memory:
    """USS and PSS of each of `pids` (one that is gone counts as a failure)."""
    todo = iter(pids)
    row = Memory(key, label, lambda: smaps_rollup(next(todo)))
    for _ in pids:
        row.sample()
    return row


async def _memory(
    tabs: int, profile: Path, origin: OriginServer
) -> tuple[list[Memory], dict[str, Any]]:
    """Open `tabs` tabs in one Host, each loaded; the memory of its renderers."""
    loaded = failures = 0
    error = ""
    config = _config(profile, origin, IDLE_RENDERERS, 1)
    async with Host(config) as host:
        for url in itertools.islice(tab_urls(origin.sites), tabs):
            try:
                tab = await host.open(url)
            except (OSError, FosError) as e:
                failures += 1
                error = error or f"{url}: {type(e).__name__}: {e}"
                continue
            if tab.state is TabState.READY:
                loaded += 1
            else:
                failures += 1
                error = error or f"{url}: {tab.state.value} {tab.reason}".rstrip()
        await settle(host)
        shown: dict[int, list[int | None]] = {}  # renderer pid -> its tabs' memory figures
        for info in host.infos():
            if info.pid is not None and info.state == TabState.READY.value:
                shown.setdefault(info.pid, []).append(info.memory)
        one = [pid for pid, tabs_in in shown.items() if len(tabs_in) == 1]
        rows = [
            _rollups("renderer_page", "renderer showing one page", one),
            _rollups(
                "renderer_pages",
                "renderer with 2+ tabs of its site (past the limit)",
                [pid for pid in shown if pid not in one],
            ),
            _rollups("renderer_idle", "idle warm renderer", [p.pid for p in _idle(host)]),
        ]
        cgroup = [mem[0] / MIB for mem in shown.values() if mem[0] is not None]
        process_limit = host.model.process_limit
    pages = rows[0].pss + rows[1].pss
    summary: dict[str, Any] = {
        "tabs": tabs,
        "loaded": loaded,
        "failures": failures,
        "renderers": len(shown),
        "process_limit": process_limit,
        "total_pss_mib": round(sum(pages), 2) if pages else None,
        "pss_per_tab_mib": round(sum(pages) / loaded, 3) if pages and loaded else None,
        "cgroup_memory_mib": summarize(cgroup) if cgroup else None,
        "cgroup_memory_is": CGROUP_MEMORY,
    }
    if error:
        summary["error"] = error
    return rows, summary


def _python_idle(samples: int) -> Memory:
    """The peer: an exec'd `python -S -I -c` idling, `samples` times (failures made up for)."""
    row = Memory("python_idle", "python -S -I -c, exec'd, idle (peer)", python_idle_memory)
    while len(row.uss) < samples and row.in_a_row < MAX_FAILURES_IN_A_ROW:
        row.sample()
    return row


# --------------------------------------------------------------------------------------
# the run


async def _measure(
    runs: int, rounds: int, tabs: int, sites: int, fs: Forkserver
) -> tuple[list[Opens], list[Memory], dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="fos-bench-tabs-") as tmp:
        async with OriginServer(bench_sites(sites)) as origin:
            opens = await _latency(runs, rounds, fs, Path(tmp), origin)
            memory, summary = await _memory(tabs, Path(tmp), origin)
    return opens, memory, summary


def measure(
    runs: int = RUNS, rounds: int = ROUNDS, tabs: int = TABS, sites: int = SITES,
    python_samples: int = PYTHON_SAMPLES,
) -> dict[str, Any]:  # fmt: skip
    """Run everything; the report as a JSON-able dict. Failed samples are counted in it; a
    failure of the memory part's Host (it did not start, or did not come to rest) raises."""
    if runs < 1 or rounds < 1:
        raise ConfigError(f"--runs and --rounds must be at least 1, not {runs} and {rounds}")
    rounds = min(rounds, runs)
    load_before = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        fs = Forkserver()  # before any Host: it inherits nothing of them
        stack.callback(fs.close)
        opens, memory, summary = asyncio.run(_measure(runs, rounds, tabs, sites, fs))
    memory.append(_python_idle(python_samples))
    report: dict[str, Any] = {
        "benchmark": "tabs",
        "runs": runs,
        "rounds": rounds,
        "sites": sites,
        "warm_renderers": WARM,
        "idle_renderers": IDLE_RENDERERS,
        "machine": machine(load_before),
        "open": {o.key: o.result() for o in opens},
        "memory": {m.key: m.result() for m in memory},
        "tabs": summary,
        "reference": {
            "chromium_renderer_mb": list(CHROMIUM_MB),
            "note": "Chromium's published median per renderer, as quoted in the issue; "
            "not measured here",
        },
    }
    # A figure is missing: a setup or the peer gave up, a tab did not load, or a memory row
    # has no sample (renderers sharing pages exist only past the process limit).
    report["failed"] = sorted(
        [o.key for o in opens if len(o.ms) < runs]
        + [m.key for m in memory if not m.uss and m.key != "renderer_pages"]
        + (["tabs"] if summary["loaded"] < tabs else [])
    )
    return _goals(report)


def _p50(entry: dict[str, Any], stat: str) -> float | None:
    stats = entry.get(stat)
    return stats["p50"] if stats else None


def _goals(report: dict[str, Any]) -> dict[str, Any]:
    """Ratios of the peers' medians to ours (above 1: ours is faster, or smaller), and the
    issue's goals."""
    opens, memory = report["open"], report["memory"]
    peer = _p50(opens[PEER], "ms")
    ratios: dict[str, float | None] = {}
    for s in SETUPS:
        ours = _p50(opens[s.key], "ms")
        ratios[f"{PEER}_over_{s.key}"] = round(peer / ours, 2) if peer and ours else None
    python = _p50(memory["python_idle"], "uss_mib")
    for key in ("renderer_idle", "renderer_page"):
        ours = _p50(memory[key], "uss_mib")
        ratios[f"python_idle_over_{key}_uss"] = round(python / ours, 2) if python and ours else None
    report["ratios"] = ratios
    goals = [
        ("open a tab, warm pool, p50", GOAL_WARM_MS, _p50(opens["fos_warm"], "ms"), "ms"),
        ("open a tab, from the zygote, p50", GOAL_ZYGOTE_MS, _p50(opens["fos_zygote"], "ms"),
         "ms"),
        ("idle renderer USS, p50", GOAL_IDLE_USS_MIB, _p50(memory["renderer_idle"], "uss_mib"),
         "MiB"),
        ("renderer with a page USS, p50", GOAL_PAGE_USS_MIB,
         _p50(memory["renderer_page"], "uss_mib"), "MiB"),
    ]  # fmt: skip
    report["goals"] = [
        {
            "goal": name,
            "target": f"<= {limit:g} {unit}",
            "value": value,
            "unit": unit,
            "met": None if value is None else value <= limit,
        }
        for name, limit, value, unit in goals
    ]
    return report


# --------------------------------------------------------------------------------------
# output


def render(report: dict[str, Any]) -> str:
    m, t = report["machine"], report["tabs"]
    lines = [
        f"fos-host tabs benchmark: {report['runs']} counted opens per setup in "
        f"{report['rounds']} round(s), each setup a Host of its own (order rotated each round); "
        f"then {t['tabs']} tabs over {report['sites']} sites in one Host",
        machine_line(m),
        "",
        f"{'open a tab to a ready renderer (ms)':<46}{'p50':>8}{'p90':>8}{'min':>8}{'max':>8}"
        f"{'n':>5}{'loaded p50':>12}",
    ]
    for e in report["open"].values():
        ms = e.get("ms")
        if ms is None:
            lines.append(f"{e['label']:<46}  no figure: {e.get('error', 'no data')}")
            continue
        loaded = e.get("loaded_ms")
        lines.append(
            f"{e['label']:<46}{ms['p50']:>8.2f}{ms['p90']:>8.2f}{ms['min']:>8.2f}"
            f"{ms['max']:>8.2f}{e['n']:>5}{num(loaded and loaded['p50']):>12}"
        )
    lines += failure_lines(report["open"].values(), "samples")
    r = report["ratios"]
    lines += [
        "forkserver p50 / ours (above 1: ours is faster): "
        + ", ".join(f"{s.key} {num(r[f'{PEER}_over_{s.key}'])}x" for s in SETUPS),
        "",
        f"{'memory per renderer (MiB)':<52}{'USS p50':>9}{'USS p90':>9}{'PSS p50':>9}{'n':>5}",
    ]
    for e in report["memory"].values():
        uss, pss = e.get("uss_mib"), e.get("pss_mib")
        row = (
            f"{e['label']:<52}{num(uss and uss['p50']):>9}{num(uss and uss['p90']):>9}"
            f"{num(pss and pss['p50']):>9}{e['n']:>5}"
        )
        if e["failures"]:
            row += f"  ({e['failures']} failed, first: {e['error']})"
        lines.append(row)
    low, high = report["reference"]["chromium_renderer_mb"]
    cg = t["cgroup_memory_mib"]
    lines += [
        f"{'Chromium renderer, published median (not measured)':<52}{f'{low}-{high} MB':>9}",
        f"python idle USS / ours: idle renderer {num(r['python_idle_over_renderer_idle_uss'])}x"
        f", renderer with a page {num(r['python_idle_over_renderer_page_uss'])}x",
        "",
        f"{t['loaded']} of {t['tabs']} tabs loaded, in {t['renderers']} renderers (process "
        f"limit {t['process_limit']}): total PSS of those renderers {num(t['total_pss_mib'])} "
        f"MiB, {num(t['pss_per_tab_mib'])} MiB per tab",
        f"cgroup memory per renderer showing pages: p50 {num(cg and cg['p50'])} MiB, p90 "
        f"{num(cg and cg['p90'])} MiB",
        textwrap.fill(t["cgroup_memory_is"], 100, initial_indent="  ", subsequent_indent="  "),
    ]
    if t["failures"]:
        lines.append(f"tabs that did not load: {t['failures']}, first: {t['error']}")
    lines += goal_lines(report, 36, 12)
    return "\n".join(lines)


def run_tabs_bench(
    runs: int | None = None, rounds: int | None = None, quick: bool = False, as_json: bool = False
) -> int:
    """Measure and print (a table, or JSON); 0 unless a figure is missing. `quick`: a few
    opens per setup and QUICK_TABS tabs over QUICK_SITES sites, to see that it works."""
    report = measure(
        runs=runs if runs is not None else QUICK_RUNS if quick else RUNS,
        rounds=rounds if rounds is not None else QUICK_ROUNDS if quick else ROUNDS,
        tabs=QUICK_TABS if quick else TABS,
        sites=QUICK_SITES if quick else SITES,
        python_samples=QUICK_PYTHON_SAMPLES if quick else PYTHON_SAMPLES,
    )
    print(json.dumps(report, indent=2) if as_json else render(report), flush=True)
    return 1 if report["failed"] else 0
