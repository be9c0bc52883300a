"""What the build scripts share: container/build.py (`make image`) and binary/build.py (`make
binary`) both build one artefact from this checkout, cached under a key that hashes its inputs.

- `BuildError`: a step failed; each script's main says why in one line and exits 1;
- `Log`: the script's messages with its prefix, and its numbered steps with their times;
- `run`: a build tool, its stdout returned, its output in the BuildError when it fails;
- `runtime_pins`: fos-host's run-time dependencies at the versions installed here;
- `inputs`, `copy_inputs`: the checkout's files that go into the artefact, the key over them,
  and copying them into a staging tree (what is copied is exactly what is hashed).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TextIO

REPO = Path(__file__).resolve().parents[1]


class BuildError(Exception):
    """A step failed; the message says which and why."""


@dataclass(frozen=True)
class Log:
    """A build script's messages, each line with its prefix, and its numbered, timed steps."""

    prefix: str
    stream: TextIO
    steps: int

    def __call__(self, msg: str) -> None:
        print(f"{self.prefix} {msg}", file=self.stream, flush=True)

    def error(self, e: BuildError) -> None:
        """Why the build failed: on stderr, whichever stream the other messages go to."""
        print(f"{self.prefix} error: {e}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def step(self, n: int, what: str) -> Iterator[None]:
        """Step n of the build, and how long it took."""
        self(f"{n}/{self.steps} {what} ...")
        t0 = time.monotonic()
        yield
        self(f"{n}/{self.steps} {what}: done in {time.monotonic() - t0:.1f} s")


def run(*argv: str | Path, cwd: Path | None = None, tail: int | None = None) -> str:
    """Run a build tool with no stdin and return its stdout; on failure raise with its own
    output, stdout and stderr (pip's say what is missing), or their last `tail` lines."""
    cmd = [str(a) for a in argv]
    cp = subprocess.run(cmd, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if cp.returncode != 0:
        lines = (cp.stdout + cp.stderr).strip().splitlines()
        output = "\n".join(lines[-tail:] if tail else lines)
        raise BuildError(f"{' '.join(cmd)} failed (exit {cp.returncode}):\n{output}")
    return cp.stdout


# -- the pinned dependencies -------------------------------------------------------------


def _name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0]


def runtime_pins() -> list[str]:
    """`name==version` of every package fos-host needs at run time (pyproject.toml's
    dependencies and theirs), as installed for the running interpreter, which `make` makes the
    venv's: the artefact gets exactly what the tests here ran against, and the test tools,
    linters and whatever else the venv holds neither go in nor change the key. A dependency the
    venv lacks is left to pip (unpinned)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins: dict[str, str] = {}
    todo = [_name(r) for r in project["dependencies"]]
    while todo:
        try:
            dist = importlib.metadata.distribution(todo.pop())
        except importlib.metadata.PackageNotFoundError:
            # not in this venv, or excluded by its marker on this Python (3.11, the image's and
            # the binary's too) or platform
            continue
        name = dist.metadata["Name"]
        if name.lower() not in pins:
            pins[name.lower()] = f"{name}=={dist.version}"
            todo += [_name(r) for r in dist.requires or () if "extra ==" not in r]
    return sorted(pins.values())


# -- inputs and the cache key ------------------------------------------------------------


class Inputs(NamedTuple):
    files: list[Path]
    key: str


def inputs(script: Path, names: Iterable[str], *extra: str) -> Inputs:
    """The files below `names` (relative to the checkout) that go into the artefact, sorted:
    the ones git tracks or would (untracked but not ignored, so no __pycache__ and no build
    output); and a key hashing them, the build's code (`script` and this module) and `extra`."""
    out = run("git", "ls-files", "-z", "-co", "--exclude-standard", "--", *names, cwd=REPO)
    files = sorted({REPO / rel for rel in out.split("\0") if rel and (REPO / rel).is_file()})
    h = hashlib.sha256()
    for f in (script.resolve(), Path(__file__).resolve(), *files):
        h.update(f"{f.relative_to(REPO)}\0".encode() + f.read_bytes() + b"\0")
    for text in extra:
        h.update(text.encode() + b"\0")
    return Inputs(files, h.hexdigest()[:16])


def copy_inputs(files: Iterable[Path], name: str, dst: Path) -> None:
    """Copy those of `files` that are REPO/name or below it to dst, keeping their paths below it."""
    top = REPO / name
    for f in files:
        if f.is_relative_to(top):
            target = dst / f.relative_to(top)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
