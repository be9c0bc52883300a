"""`fos-host demo` as a user runs it: real host, renderers and origin server, in a subprocess.

The demo runs in a process of its own, so the autouse `leaves_no_trace` fixture cannot see its
processes or cgroups: the tests here check those themselves.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from terminal import on_terminal, plain_env, read_until

from fos_host.kernel import proc
from tests.integration.test_cli import FOS, ROOT, cgroups_of, fos

SITES = {  # every host of the demo's origin server, and its site
    "news.fos.test": "http://fos.test",
    "shop.fos.test": "http://fos.test",
    "a.b.example.co.uk": "http://example.co.uk",
    "c.example.co.uk": "http://example.co.uk",
    "evil.test": "http://evil.test",
}
COLUMNS = ["tab", "title", "url", "site", "pid", "host uid", "memory", "state"]


def demo_env(tmpdir: Path) -> dict[str, str]:
    """This environment without what would change rich's idea of the terminal, and with
    TMPDIR in `tmpdir` (the demo's temporary profile goes there: the test sees it removed)."""
    return {**plain_env(), "TMPDIR": str(tmpdir)}


def rows(table: str) -> list[dict[str, str]]:
    """The rows of the plain-text (ASCII box) table, as {column: cell}."""
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header, *body = ([cell.strip() for cell in line.strip("|").split("|")] for line in lines)
    assert header == COLUMNS, table
    return [dict(zip(header, cells, strict=True)) for cells in body if cells[0][:1] != "-"]


def test_once_puts_each_site_in_renderers_of_its_own(tmp_path: Path) -> None:
    r = fos("demo", "--once", timeout=120, env=demo_env(tmp_path))
    assert r.returncode == 0, r.stderr
    tabs = rows(r.stdout)
    assert len(tabs) == 12, r.stdout
    assert [t["state"] for t in tabs] == ["ready"] * 12, r.stdout
    assert sum(t["tab"].startswith("*") for t in tabs) == 1  # one active tab
    hosts_shown = " ".join(t["url"] for t in tabs)  # redirected tabs name their first URL too
    assert all(f"http://{h}/" in hosts_shown for h in SITES), r.stdout
    for t in tabs:
        host = t["url"].split()[0].split("/")[2]
        assert t["site"] == SITES[host], t
        assert t["memory"].endswith(" / 64 MiB"), t
    # a.b.example.co.uk and c.example.co.uk: one site; a redirect across sites moves the tab
    by_url = {t["url"]: t for t in tabs}
    assert by_url["http://a.b.example.co.uk/"]["site"] == "http://example.co.uk"
    assert by_url["http://c.example.co.uk/"]["site"] == "http://example.co.uk"
    assert by_url["http://shop.fos.test/cart ← http://evil.test/steal"]["site"] == "http://fos.test"
    # a renderer process, and (as root) a host uid, never serves two sites
    for column in ["pid", *(["host uid"] if ROOT else [])]:
        sites_of: dict[str, set[str]] = {}
        for t in tabs:
            sites_of.setdefault(t[column], set()).add(t["site"])
        assert all(len(s) == 1 for s in sites_of.values()), (column, sites_of)
        assert len(sites_of) >= len(set(SITES.values()))
    assert "0 bad messages · 0 crashes" in r.stdout
    assert cgroups_of(r.pid) == []
    assert list(tmp_path.iterdir()) == []  # the temporary profile is gone


def descendants(pid: int) -> set[tuple[int, int | None]]:
    """(pid, start time) of every live process whose parent chain leads to `pid`."""
    parent = {}
    for name in os.listdir("/proc"):
        fields = proc.stat_fields(name) if name.isdigit() else None
        if fields is not None:
            parent[int(name)] = int(fields[1])
    found = set()
    for p in parent:
        q = parent.get(p)
        while q is not None and q > 1 and q != pid:
            q = parent.get(q)
        if q == pid:
            found.add((p, proc.starttime(p)))
    return found


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_on_the_live_table_shuts_everything_down(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """On a terminal (a pty: rich draws the live table) until the signal; then exit 0 with a
    summary, leaving no process, cgroup or profile behind."""
    with on_terminal([*FOS, "demo"], demo_env(tmp_path)) as (demo, terminal):
        shown = read_until(terminal, b"Ctrl-C stops the demo", timeout=60)
        assert b"Ctrl-C stops the demo" in shown, shown.decode(errors="replace")
        assert demo.poll() is None
        kids = descendants(demo.pid)
        assert len(kids) >= 12 + 3, kids  # renderers, zygote, network and storage services
        assert cgroups_of(demo.pid)
        demo.send_signal(sig)
        rest = read_until(terminal, b"temporary profile are gone", timeout=10)
        assert demo.wait(timeout=10) == 0, rest.decode(errors="replace")
    assert f"fos-host demo: {sig.name} after".encode() in rest
    assert b"closed 12 tabs" in rest
    alive = {(p, start) for p, start in kids if proc.starttime(p) == start}
    assert not alive, f"processes of the demo left behind: {alive}"
    assert cgroups_of(demo.pid) == []
    assert list(tmp_path.iterdir()) == []


def test_sandbox_report_still_passes() -> None:
    r = fos("demo", "--sandbox-report")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Isolation report (seen from inside):" in r.stdout
    assert r.stdout.rstrip().endswith("all checks passed")
    assert cgroups_of(r.pid) == []
