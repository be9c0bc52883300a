"""Seeing a running host: `fos-host ctl events`, the step commands (`ctl hibernate`, `freeze`,
`pin`, ...), `fos-host top` once, as JSON and live. The daemon is a real subprocess
(tests/daemons.py), its tabs fetched from the `origin` fixture's sites.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from daemons import FOS, ctl, ctl_json, daemon, failed
from terminal import on_terminal, plain_env, read_until

from fos_host.interfaces.control import Event, Pressure, Status, TabView

NEWS, EXAMPLE = "http://news.fos.test/", "http://a.b.example.co.uk/"
LEVEL_LINE = re.compile(  # the header: the level and its source, then the counts
    r"^memory pressure (none|moderate|critical|emergency) "
    r"\((PSI trigger|cgroup v1 memory\.pressure_level|polling|no monitor)\) · 2 tabs",
    re.MULTILINE,
)

pytestmark = pytest.mark.usefixtures("no_fd_leak")


def keys(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


class Follower:
    """`fos-host ctl events` (following) in a subprocess, its JSON lines read as they come."""

    def __init__(self, sock: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as in a shell
        self.proc = subprocess.Popen(
            [*FOS, "ctl", "--socket", str(sock), "events"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )  # fmt: skip
        self.events: list[dict[str, Any]] = []
        self._rest = b""

    def wait_for(self, action: str, tab: int, timeout: float = 20) -> dict[str, Any]:
        """The first event `action` of `tab` (read so far or arriving within `timeout`)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if (event["action"], event["tab"]) == (action, tab):
                    return event
            left = deadline - time.monotonic()
            assert left > 0, f"no {action} of tab {tab} in {timeout} s: {self.events}"
            if select.select([self.proc.stdout], [], [], left)[0]:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                assert chunk, f"ctl events ended: {self.proc.wait(10)} {self.stderr()}"
                *lines, self._rest = (self._rest + chunk).split(b"\n")
                self.events += [json.loads(line) for line in lines]

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def kept_events(sock: Path) -> list[dict[str, Any]]:
    """`ctl events --no-follow`: the kept events, one JSON object a line."""
    r = ctl(sock, "events", "--no-follow")
    assert r.returncode == 0, r.stderr.decode()
    return [json.loads(line) for line in r.stdout.decode().splitlines()]


def top(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FOS, "top", "--socket", str(sock), *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_step_commands_events_and_top(tmp_path: Path, origin: dict[str, str]) -> None:
    sock = tmp_path / "s" / "control.sock"
    with daemon(sock, tmp_path, origin) as d:
        news = ctl_json(sock, "open", NEWS)
        example = ctl_json(sock, "open", EXAMPLE)
        assert news["tier"] in ("active", "background") and news["pid"] is not None
        tab = str(news["id"])

        hibernated = ctl_json(sock, "hibernate", tab)
        assert (hibernated["tier"], hibernated["pid"], hibernated["state"]) == (
            "hibernated", None, "ready")  # fmt: skip
        listed = {t["id"]: t for t in ctl_json(sock, "list")}
        assert (listed[news["id"]]["tier"], listed[news["id"]]["pid"]) == ("hibernated", None)
        assert listed[example["id"]]["pid"] == example["pid"], "the other tab's renderer stays"
        assert "hibernated" in ctl(sock, "list").stdout.decode(), "the table has the tier"

        kept = kept_events(sock)
        assert all(set(e) == keys(Event) for e in kept), kept
        (step,) = [e for e in kept if e["action"] == "hibernate"]
        assert (step["tab"], step["tier"]) == (news["id"], "hibernated")
        assert step["freed"] > 0 and step["why"] == "asked by fos-host ctl"

        follower = Follower(sock)
        try:
            follower.wait_for("hibernate", news["id"])  # the kept ones first: it is subscribed
            frozen = ctl_json(sock, "freeze", str(example["id"]))
            assert (frozen["tier"], frozen["pid"]) == ("frozen", example["pid"])
            event = follower.wait_for("freeze", example["id"])
            assert event["tier"] == "frozen" and event["freed"] is None
            follower.proc.send_signal(signal.SIGTERM)
            assert follower.proc.wait(10) == 0, follower.stderr()
        finally:
            follower.close()

        once = top(sock, "--once")
        assert once.returncode == 0, once.stderr
        assert LEVEL_LINE.search(once.stdout), once.stdout
        assert "2 tabs: 1 frozen, 1 hibernated" in once.stdout, once.stdout
        row = rf"\|\s+{news['id']} \| fOS News\s+\| http://fos.test\s+\| hibernated\s+\| ready"
        assert re.search(row, once.stdout), once.stdout
        assert re.search(r"\| hibernate\s+\| asked by fos-host ctl\s+\| [\d.]+ [KM]iB", once.stdout)

        shown = json.loads(top(sock, "--json").stdout)
        assert set(shown) == {"status", "pressure", "tabs", "events"}
        assert set(shown["status"]) == keys(Status) and shown["status"]["pid"] == d.pid
        assert set(shown["pressure"]) == keys(Pressure)
        assert shown["pressure"]["level"] == shown["status"]["level"]
        assert shown["pressure"]["source"] in ("trigger", "v1", "polling", "")
        assert [(t["id"], t["tier"]) for t in shown["tabs"]] == [
            (news["id"], "hibernated"), (example["id"], "frozen")]  # fmt: skip
        assert all(set(t) == keys(TabView) for t in shown["tabs"])
        assert [e["action"] for e in shown["events"]][-2:] == ["hibernate", "freeze"]

        back = ctl_json(sock, "activate", tab)
        assert (back["tier"], back["active"], back["state"]) == ("active", True, "ready")
        assert back["pid"] is not None and back["title"] == "fOS News"
        last = kept_events(sock)[-1]
        assert (last["action"], last["tab"], last["tier"]) == ("restore", news["id"], "active")

        pinned = ctl_json(sock, "pin", str(example["id"]))
        assert pinned["id"] == example["id"]
        assert ctl_json(sock, "pin", str(example["id"]), "--off")["id"] == example["id"]
        assert failed(ctl(sock, "pin", "99")) == "fos-host: no tab 99"
        assert failed(ctl(sock, "hibernate", "99")) == "fos-host: no tab 99"

        follower = Follower(sock)  # the host going away ends it, with one line
        try:
            follower.wait_for("restore", news["id"])
            assert d.stop() == 0
            assert follower.proc.wait(10) == 1
            (line,) = follower.stderr().splitlines()
            assert line.startswith(f"fos-host: the fos-host at {sock} went away"), line
        finally:
            follower.close()
    assert "no fos-host is running at" in failed(ctl(sock, "events"))
    gone = top(sock, "--once")
    assert gone.returncode == 1 and "no fos-host is running at" in gone.stderr


def test_live_top_quits_on_ctrl_c(tmp_path: Path, origin: dict[str, str]) -> None:
    sock = tmp_path / "s" / "control.sock"
    with daemon(sock, tmp_path, origin):
        news = ctl_json(sock, "open", NEWS)
        argv = [*FOS, "top", "--socket", str(sock), "--interval", "0.2"]
        with on_terminal(argv, plain_env()) as (shown, terminal):
            screen = read_until(terminal, b"Ctrl-C quits", timeout=20).decode(errors="replace")
            assert "Ctrl-C quits" in screen and "memory pressure" in screen, screen
            assert "fOS News" in screen and str(news["pid"]) in screen, screen
            ctl_json(sock, "freeze", str(news["id"]))
            redrawn = read_until(terminal, b"freeze", timeout=10).decode(errors="replace")
            assert "frozen" in redrawn, "redrawn with the new tier and the event"
            shown.send_signal(signal.SIGINT)
            assert shown.wait(10) == 0
