"""The single-file fos-host (`make binary`: packaging/binary/build.py), run as on a machine
that has only Python 3.11+ and the libraries: a clean environment (`env -i` with a system
PATH, so `/usr/bin/env python3` finds the system's python3, not this venv; a temporary HOME
for shiv's extraction; the working directory outside the checkout). Doctor, a command and a
Python program in real sandboxes, and the demo, whose services and renderers are forked by
the zygote and import their code from the extraction through the sandbox's read-only binds.
The extraction is removed at the end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import fos_cgroups

REPO = Path(__file__).resolve().parents[2]
BINARY = REPO / "build" / "fos-host"
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def binary() -> Path:
    """build/fos-host, built unless the cached build is current (fast then)."""
    cp = subprocess.run(
        [sys.executable, REPO / "packaging/binary/build.py"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert cp.returncode == 0, cp.stdout + cp.stderr
    return BINARY


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    """HOME for the binary: shiv extracts into HOME/.shiv; removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="fos-binary-home-"))
    yield path
    shutil.rmtree(path)


@dataclass
class Result:
    returncode: int
    out: str
    err: str


def run(binary: Path, home: Path, *args: str, timeout: float = 120) -> Result:
    """Run the binary in a clean environment; check that it left no cgroup behind."""
    env = {"PATH": SYSTEM_PATH, "HOME": str(home), "LANG": "C.UTF-8"}
    with subprocess.Popen(
        [str(binary), *args],
        env=env,
        cwd=home,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as p:
        out, err = p.communicate(timeout=timeout)
    assert [c for c in fos_cgroups() if c.name.startswith(f"fos.{p.pid}.")] == []
    return Result(p.returncode, out, err)


def test_another_python_is_refused_in_one_line(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("build", REPO / "packaging/binary/build.py")
    assert spec and spec.loader
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    script = tmp_path / "preamble.py"
    script.write_text(build.preamble((3, 10)))
    cp = subprocess.run([sys.executable, script], capture_output=True, text=True)
    assert cp.returncode == 1
    assert cp.stderr.startswith("fos-host: this build needs Python 3.10 (its C extensions")
    assert f"is {sys.executable}, Python 3." in cp.stderr and len(cp.stderr.splitlines()) == 1
    script.write_text(build.preamble(sys.version_info[:2]))
    cp = subprocess.run([sys.executable, script], capture_output=True, text=True)
    assert (cp.returncode, cp.stdout, cp.stderr) == (0, "", "")


def test_it_is_one_file_with_a_python3_line(binary: Path) -> None:
    assert binary.is_file() and os.access(binary, os.X_OK)
    with open(binary, "rb") as f:
        assert f.readline() == b"#!/usr/bin/env python3\n"


def test_it_runs_from_its_own_extraction_not_this_checkout(binary: Path, home: Path) -> None:
    p = run(binary, home, "--version")
    assert p.returncode == 0, p.err
    out = p.out
    assert out.startswith("fos-host 0.1.0 ("), out
    where, _, python = out.strip()[len("fos-host 0.1.0 (") : -1].partition("; Python ")
    assert Path(where).is_relative_to(home / ".shiv"), out
    assert Path(where, "_data", "seccomp", "renderer.policy").is_file()
    interpreter = python.partition(", ")[2]
    assert not Path(interpreter).resolve().is_relative_to(REPO), out  # not the venv
    assert str(REPO) not in out


def test_doctor_json(binary: Path, home: Path) -> None:
    p = run(binary, home, "doctor", "--json")
    assert p.returncode == 0, p.err
    checks = {c["name"]: c for c in json.loads(p.out)["checks"]}
    # the C extension (python-prctl, linked against libcap) and libseccomp loaded from the zip's
    # extraction; the seccomp filter compiled from the bundled policies and applied
    for name in ("library: prctl", "library: pyseccomp", "seccomp filter"):
        assert checks[name]["verdict"] == "OK", checks[name]


def test_exec_a_command(binary: Path, home: Path) -> None:
    p = run(binary, home, "exec", "--json", "--", "/bin/echo", "hi")
    assert (p.returncode, p.out) == (0, "hi\n"), p.err
    outcome = json.loads(p.err)
    assert outcome["reason"] == "exited with status 0"
    if ROOT:
        assert outcome["host_uid"] >= 300000


@pytest.mark.skipif(not ROOT, reason="a memory limit needs root or a delegated cgroup")
def test_exec_python_out_of_memory(binary: Path, home: Path) -> None:
    code = "import sys; print(sys.version_info >= (3, 11), flush=True); x = bytearray(200 << 20)"
    p = run(binary, home, "exec", "--memory", "32M", "--", "python3", "-c", code)
    assert p.returncode == 128 + signal.SIGKILL
    assert p.out == "True\n"
    assert p.err == "fos-host: sandbox out of memory at the 32 MiB limit\n"


def test_demo_renderers_and_services_import_from_the_extraction(binary: Path, home: Path) -> None:
    p = run(binary, home, "demo", "--json", "--tabs", "3")
    assert p.returncode == 0, p.err
    shown = json.loads(p.out)
    assert [t["state"] for t in shown["tabs"]] == ["ready"] * 3, shown
    assert all(t["pid"] and t["title"] for t in shown["tabs"]), shown
    assert shown["totals"]["crashes"] == 0 and "restarting" not in p.err
