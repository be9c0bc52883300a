"""`fos-host run --dashboard` and `--metrics`: the JSON the page draws from, the sandbox of
every process as /proc shows it, Prometheus metrics parsed by prometheus_client's own parser,
the flags' errors, and the page itself in headless Chromium (Playwright driving Debian's
/usr/bin/chromium), which saves a screenshot to build/dashboard.png.

The daemon is a real subprocess (tests/daemons.py); it prints the ports it chose for port 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import pytest
from daemons import FOS, Daemon, ctl_json, daemon, failed
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from fos_host.host.metrics import HostCollector

if TYPE_CHECKING:
    from fos_host.host.host import Host

NEWS, EXAMPLE = "http://news.fos.test/", "http://a.b.example.co.uk/"
LEVELS = ["none", "moderate", "critical", "emergency"]
CHROMIUM = "/usr/bin/chromium"
# Without these Chromium phones home at start; here, where only the package registries are
# reachable, its refused connections come many at a time.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-quic"]  # fmt: skip
SCREENSHOT = Path(__file__).resolve().parents[2] / "build" / "dashboard.png"


def served(stderr: str, what: str) -> str:
    """The URL the daemon printed for `what` (dashboard or metrics)."""
    found = re.search(rf"^fos-host: {what} (http://\S+)$", stderr, re.MULTILINE)
    assert found, stderr
    return found.group(1)


def get(url: str, host: str | None = None, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method)
    if host is not None:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=20) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()


def get_text(url: str) -> str:
    status, body = get(url)
    assert status == 200, body
    return body.decode()


def get_json(url: str) -> Any:
    return json.loads(get_text(url))


def samples(text: str) -> dict[str, list[Sample]]:
    """The exposition's samples by metric family name."""
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


@contextlib.contextmanager
def two_tabs(tmp_path: Path, origin: dict[str, str],
             *extra: str) -> Iterator[tuple[Daemon, dict[str, Any], dict[str, Any]]]:  # fmt: skip
    """A daemon with the dashboard on a free port, a hibernated tab of fOS News and a live
    tab of Example A (both as `ctl` shows them)."""
    sock = tmp_path / "s" / "control.sock"
    with daemon(sock, tmp_path, origin, "--dashboard", "127.0.0.1:0", *extra) as d:
        news = ctl_json(sock, "open", NEWS)
        example = ctl_json(sock, "open", EXAMPLE)
        news = ctl_json(sock, "hibernate", str(news["id"]))
        assert (news["tier"], news["pid"]) == ("hibernated", None)
        yield d, news, example


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 10) -> Any:
    """`probe()` once it is truthy, polled."""
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.2)
    return value


@pytest.mark.usefixtures("no_fd_leak")
def test_state_sandbox_and_metrics(tmp_path: Path, origin: dict[str, str]) -> None:
    with two_tabs(tmp_path, origin, "--metrics", "127.0.0.1:0") as (d, news, example):
        url = served(d.stderr(), "dashboard")
        state = get_json(url + "api/state")
        tabs = {t["id"]: t for t in state["tabs"]}
        assert (tabs[news["id"]]["tier"], tabs[news["id"]]["pid"]) == ("hibernated", None)
        live = tabs[example["id"]]
        assert (live["pid"], live["site"], live["title"]) == (
            example["pid"], "http://example.co.uk", "Example A")  # fmt: skip
        assert live["memory"] > 0
        assert state["pressure"]["level"] in LEVELS
        assert state["pressure"]["source"] in ("trigger", "v1", "polling", "")
        assert state["events"][-1]["action"] == "hibernate"
        assert state["store"]["warm"]["count"] + state["store"]["hot"]["count"] == 1

        def sampled() -> Any:  # both tabs sampled since the hibernation
            history = get_json(url + "api/state")["history"]
            kept = history["tabs"]
            hibernated = kept.get(str(news["id"]), [[0, 0, ""]])[-1][2] == "hibernated"
            return hibernated and len(kept.get(str(example["id"]), [])) >= 2 and history

        history = wait_for("samples of both tabs", sampled)
        assert history["tabs"][str(news["id"])][-1][1] is None, "no process, no memory"
        assert all(s[1] > 0 for s in history["tabs"][str(example["id"])])
        times = [s[0] for s in history["pressure"]]
        assert len(times) >= 2 and times == sorted(times)
        assert all(s[1] in LEVELS for s in history["pressure"])

        procs = get_json(url + "api/sandbox")
        renderers = [p for p in procs if p["kind"] == "renderer"]
        assert len(renderers) >= 2, f"the example tab's and a warm one: {procs}"
        assert {"network", "storage"} <= {p["kind"] for p in procs}, procs
        for p in renderers:
            assert (p["seccomp"], p["no_new_privs"], int(p["cap_eff"], 16)) == (2, 1, 0), p
            assert p["namespaces"]["user"] == p["namespaces"]["pid"] == "own", p
            assert p["namespaces"]["net"] == "own", p
            assert p["uid"] != 0 and p["confined"], p
        (mine,) = [p for p in renderers if p["pid"] == example["pid"]]
        assert (mine["site"], mine["uid"]) == ("http://example.co.uk", example["host_uid"])
        assert mine["cgroup"].rsplit("/", 1)[1].startswith("sb-"), mine
        (network,) = [p for p in procs if p["kind"] == "network"]
        assert network["namespaces"]["net"] == "host", "the network service has the network"

        m = samples(get_text(url + "metrics"))
        memory = {s.labels["tab"]: s for s in m["fos_tab_memory_bytes"]}
        assert set(memory) == {str(example["id"])}, "a hibernated tab has no memory"
        assert memory[str(example["id"])].labels["site"] == "http://example.co.uk"
        assert memory[str(example["id"])].value > 0
        tiers = {s.labels["tier"]: s.value for s in m["fos_tabs"]}
        assert tiers["hibernated"] == 1 and tiers[example["tier"]] == 1
        assert sum(tiers.values()) == 2
        spawns = {s.name: s.value for s in m["fos_renderer_spawn_seconds"]}
        assert spawns["fos_renderer_spawn_seconds_count"] >= 2, "the tab's and a warm one"
        assert 0 < spawns["fos_renderer_spawn_seconds_sum"] < 60
        assert [s.value for s in m["fos_bad_messages"]] == [0]
        assert [s.value for s in m["fos_oom_kills"]] == [0]
        ((level,),) = [[s.value for s in m["fos_memory_pressure_level"]]]
        (on,) = [s.labels["fos_memory_pressure"] for s in m["fos_memory_pressure"] if s.value]
        assert LEVELS[int(level)] == on
        stored = {s.labels["tier"]: s.value for s in m["fos_snapshot_store_snapshots"]}
        assert stored["hot"] + stored["warm"] == 1

        # The spawns are taken from the host's deque once: scraping again counts none twice.
        again = samples(get_text(url + "metrics"))
        assert {s.name: s.value for s in again["fos_renderer_spawn_seconds"]} == spawns

        only = served(d.stderr(), "metrics")
        assert "fos_tabs" in samples(get_text(only))
        assert get(only.removesuffix("metrics"))[0] == 404, "--metrics serves /metrics alone"

        port = url.rstrip("/").rsplit(":", 1)[1]
        assert get(url + "api/state", host=f"rebound.example:{port}")[0] == 421, "DNS rebinding"
        assert get(url + "api/state", host=f"localhost:{port}")[0] == 200
        assert get(url + "nothing")[0] == 404
        assert get(url + "api/state", method="POST")[0] == 405


@pytest.mark.usefixtures("no_fd_leak")
def test_flag_errors(tmp_path: Path) -> None:
    """Bad addresses and a port in use: one line, exit 2, before any host starts."""
    sock = tmp_path / "s" / "control.sock"

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*FOS, "run", "--socket", str(sock), "--profile", str(tmp_path / "p"), *args],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
        )  # fmt: skip

    for args, says in (
        (("--dashboard", "0.0.0.0:8090"), "not a loopback address"),
        (("--metrics", "192.0.2.1:9100"), "add --dashboard-public"),
        (("--dashboard", "127.0.0.1"), "give ADDRESS:PORT"),
        (("--dashboard", "127.0.0.1:65536"), "give ADDRESS:PORT"),
        (("--metrics", "metrics.test:9100"), "is not an IP address"),
        (("--dashboard-public",), "without --dashboard or --metrics"),
    ):
        r = run(*args)
        assert says in failed(r) and r.returncode == 2, (args, r)

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = run("--dashboard", f"127.0.0.1:{port}")
    assert failed(r) == f"fos-host: --dashboard 127.0.0.1:{port}: cannot listen: in use"
    assert r.returncode == 2
    assert not sock.exists(), "the control socket it had bound is removed"


def using(profile: str) -> list[int]:
    """Live processes whose command line names `profile` (a zombie's is empty)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            if profile.encode() in f.read():
                pids.append(int(pid))
    return pids


# Drawn: both tabs in the table and the memory chart, some pressure samples, the sandbox table.
DRAWN = """() =>
    document.querySelectorAll("#tabs tbody tr").length === 2 &&
    document.querySelectorAll("#memory-chart polyline").length === 2 &&
    Number(document.getElementById("pressure-chart").dataset.samples) >= 3 &&
    document.querySelectorAll("#sandbox tbody tr").length >= 3"""


def test_page_in_headless_chromium(tmp_path: Path, origin: dict[str, str]) -> None:
    from playwright.sync_api import sync_playwright

    assert os.access(CHROMIUM, os.X_OK), f"no {CHROMIUM}: scripts/bootstrap installs chromium"
    with two_tabs(tmp_path, origin) as (d, news, example):
        url = served(d.stderr(), "dashboard")
        profile = tempfile.mkdtemp(prefix="fos-chromium-")
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch_persistent_context(
                    profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
                    viewport={"width": 1280, "height": 900},
                )  # fmt: skip
                try:
                    page = browser.pages[0] if browser.pages else browser.new_page()
                    complaints: list[str] = []  # a CSP refusal or a script error shows here
                    page.on("console", lambda m: m.type == "error" and complaints.append(m.text))
                    page.on("pageerror", lambda e: complaints.append(str(e)))
                    page.goto(url)
                    page.wait_for_function(DRAWN, timeout=20_000)
                    tabs = page.inner_text("#tabs")
                    sandbox = page.inner_text("#sandbox")
                    header = page.inner_text("header")
                    lines = page.eval_on_selector_all(
                        "#memory-chart polyline", "ls => ls.map(l => l.getAttribute('points'))"
                    )
                    SCREENSHOT.parent.mkdir(exist_ok=True)
                    page.screenshot(path=str(SCREENSHOT), full_page=True)
                finally:
                    browser.close()
        finally:
            wait_for("the end of Chromium", lambda: not using(profile))
            shutil.rmtree(profile)
    assert not complaints, complaints
    hibernated = rf"^{news['id']}\tfOS News\thttp://fos\.test\thibernated\tready\t\t"
    live = (rf"^(★ )?{example['id']}\tExample A\thttp://example\.co\.uk\t"
            rf"{example['tier']}\tready\t{example['pid']}\t{example['host_uid']}\t"
            r"[\d.]+ MiB\t64\.0 MiB$")  # fmt: skip
    confined = (rf"^{example['pid']}\trenderer\thttp://example\.co\.uk\t{example['host_uid']}"
                r"\tfilter \(\d+\)\tyes\t0{16}\tuser pid net ")  # fmt: skip
    assert re.search(hibernated, tabs, re.MULTILINE), tabs
    assert re.search(live, tabs, re.MULTILINE), tabs
    assert re.search(confined, sandbox, re.MULTILINE), sandbox
    assert "2 tabs" in header and "memory pressure" in header
    assert all(len(points.split()) >= 2 for points in lines), lines
    assert SCREENSHOT.stat().st_size > 20_000, "a blank page compresses to a few KiB"


def test_spawn_histogram_takes_each_start_once() -> None:
    """From the host's bounded deque of start times: new ones only, also after it rotated."""
    host = SimpleNamespace(spawn_seconds=deque(maxlen=3))
    collector = HostCollector(cast("Host", host))

    def observed() -> tuple[float, float]:
        collector._take_spawns()
        (family,) = collector._spawns.collect()
        by_name = {s.name: s.value for s in family.samples}
        return by_name["fos_renderer_spawn_seconds_count"], by_name[
            "fos_renderer_spawn_seconds_sum"
        ]

    assert observed() == (0, 0)
    host.spawn_seconds.extend([0.5, 1.0])
    assert observed() == (2, 1.5)
    assert observed() == (2, 1.5), "nothing new, nothing counted"
    host.spawn_seconds.extend([2.0, 4.0])  # 0.5 rotates out
    assert observed() == (4, 7.5)
    host.spawn_seconds.extend([8.0, 16.0, 32.0])  # every one seen before rotates out
    assert observed() == (7, 63.5)
    host.spawn_seconds.append(1.0)  # equal to an old value, yet a new start
    assert observed() == (8, 64.5)
