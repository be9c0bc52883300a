"""Build build/fos-host: fos-host as one executable file (`make binary`).

    .venv/bin/python packaging/binary/build.py [--force]

The file is a shiv zipapp (README.md, "A single-file fos-host", says why shiv): a zip with a
`#!/usr/bin/env python3` line, holding fos-host, its dependencies at the versions this venv
has (compiled C extensions included), the data files (`seccomp/`, `cgroups/`, as
`fos_host/_data/`, see fos_host/paths.py) and compiled bytecode. The compiled extensions tie
it to this interpreter's minor version (3.11): a preamble refuses another python3 in one line.
On its first start it
extracts that site-packages into `~/.shiv/fos-host_<build id>/` (`$SHIV_ROOT` instead of
`~/.shiv`) and runs from there, so extension modules load from real files and a sandbox can
bind the code it imports read-only (fos_host/sandbox/jail.py, `python_prefixes`).

The build is cached under build/binary/<key>, the key hashing every input (the sources, the
data files, pyproject.toml, the pinned dependency versions, this script, the interpreter and
shiv's version): with nothing changed it only checks that build/fos-host is that file. Each
step prints what it does and how long it took.
"""

from __future__ import annotations

import argparse
import compileall
import filecmp
import hashlib
import importlib.metadata
import py_compile
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "build" / "binary"
OUTPUT = REPO / "build" / "fos-host"
SHEBANG = "/usr/bin/env python3"  # the target's python3 on PATH: 3.11, as the build's (PREAMBLE)
ENTRY = "fos_host.cli:main"
PROJECT = ("fos_host", "pyproject.toml")  # what pip needs to build the wheel (and a README)
DATA = ("seccomp", "cgroups")  # bundled as fos_host/_data/<name> (fos_host/paths.py)
STEPS = 5
# Run by shiv's bootstrap before fos-host's code. The extension modules inside (python-prctl,
# msgpack, Pillow, lz4, posix_ipc) are compiled for the building interpreter's minor version
# only; on another one an import fails deep inside a dependency, so say it in one line first.
PREAMBLE = """import sys
if sys.version_info[:2] != {built_for}:
    sys.exit("fos-host: this build needs Python {text} (its C extensions are compiled for it); "
             f"python3 on PATH is {{sys.executable}}, Python {{sys.version.split()[0]}}")
"""


def preamble(built_for: tuple[int, int]) -> str:
    return PREAMBLE.format(built_for=built_for, text=".".join(map(str, built_for)))


def log(msg: str) -> None:
    print(f"[binary] {msg}", flush=True)


@contextmanager
def step(n: int, what: str) -> Iterator[None]:
    """One numbered step of the build, and how long it took."""
    log(f"{n}/{STEPS} {what} ...")
    t0 = time.monotonic()
    yield
    log(f"{n}/{STEPS} {what}: {time.monotonic() - t0:.1f} s")


def run(*argv: str | Path) -> None:
    """Run a build tool; on failure, stop with its own output (pip's say what is missing)."""
    cp = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if cp.returncode != 0:
        sys.exit(f"[binary] {' '.join(map(str, argv[:4]))} ... failed:\n{cp.stdout}{cp.stderr}")


# -- inputs and the cache key ------------------------------------------------------------


def _name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0]


def runtime_pins() -> list[str]:
    """`name==version` of every package fos-host needs at run time (pyproject.toml's
    dependencies and theirs), as installed in this venv: the binary gets exactly what the tests
    here ran against, and the test tools, linters and whatever else the venv holds neither go
    in nor change the key. A dependency the venv lacks is left to pip (unpinned)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins: dict[str, str] = {}
    todo = [_name(r) for r in project["dependencies"]]
    while todo:
        try:
            dist = importlib.metadata.distribution(todo.pop())
        except importlib.metadata.PackageNotFoundError:
            continue  # not in this venv, or only for other platforms or Python versions
        name = dist.metadata["Name"]
        if name.lower() not in pins:
            pins[name.lower()] = f"{name}=={dist.version}"
            todo += [_name(r) for r in dist.requires or () if "extra ==" not in r]
    return sorted(pins.values())


def input_files() -> list[Path]:
    """Every file the build reads from the checkout (caches and bytecode left out)."""
    files = [Path(__file__).resolve()]
    for name in (*PROJECT, *DATA):
        path = REPO / name
        if path.is_file():
            files.append(path)
        else:
            files += (p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return sorted(files)


def input_key(pins: list[str]) -> str:
    h = hashlib.sha256()
    for f in input_files():
        h.update(f"{f.relative_to(REPO)}\0".encode() + f.read_bytes() + b"\0")
    h.update("\n".join(pins).encode())
    h.update(f"{sys.version}\0{importlib.metadata.version('shiv')}\0{SHEBANG}".encode())
    return h.hexdigest()[:16]


# -- the build ---------------------------------------------------------------------------


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def build(key: str, pins: list[str]) -> Path:
    """The cached binary for `key`, built first if missing; other keys' builds are removed."""
    out = CACHE / key / "fos-host"
    if out.is_file():
        log(f"cached: {out.relative_to(REPO)} (nothing changed)")
        return out
    t0 = time.monotonic()
    tmp = CACHE / f"{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    src, site = tmp / "src", tmp / "site"
    with step(1, "staging the sources (pip builds the wheel in a copy, not in the checkout)"):
        src.mkdir(parents=True)
        for name in PROJECT:
            (_copy_tree if (REPO / name).is_dir() else shutil.copy2)(REPO / name, src / name)
        # pyproject.toml names README.md as the long description, which nothing here reads:
        # a stand-in keeps README edits from changing the key.
        (src / "README.md").write_text("fos-host: the process host of the fOS browser.\n")
        (tmp / "constraints.txt").write_text("\n".join(pins) + "\n")
        (tmp / "preamble.py").write_text(preamble(sys.version_info[:2]))
    with step(2, f"pip install fos-host and {len(pins)} dependencies, pinned to this venv's"):
        run(sys.executable, "-m", "pip", "install", "--quiet", "--no-input", "--no-compile",
            "--disable-pip-version-check", "--target", site,
            "--constraint", tmp / "constraints.txt", src)  # fmt: skip
        # Console scripts of the dependencies: their #! names this venv's interpreter.
        shutil.rmtree(site / "bin", ignore_errors=True)
    with step(3, "bundling the data files as fos_host/_data/ and compiling bytecode"):
        for name in DATA:
            _copy_tree(REPO / name, site / "fos_host" / "_data" / name)
        # Unchecked-hash pycs stay valid after extraction, which does not keep the sources'
        # mtimes; the extracted tree is not meant to be edited (SHIV_FORCE_EXTRACT=1 resets it).
        unchecked = py_compile.PycInvalidationMode.UNCHECKED_HASH
        if not compileall.compile_dir(site, quiet=2, workers=0, invalidation_mode=unchecked):
            sys.exit(f"[binary] compileall failed in {site}: run it without quiet=2 to see why")
    with step(4, "shiv: one zip, site-packages and a bootstrap"):
        run(sys.executable, "-m", "shiv", "--site-packages", site, "--entry-point", ENTRY,
            "--python", SHEBANG, "--preamble", tmp / "preamble.py", "--reproducible",
            "--output-file", tmp / "fos-host")  # fmt: skip
    with step(5, "keeping it, removing the staging and older builds"):
        shutil.rmtree(src)
        shutil.rmtree(site)
        tmp.rename(CACHE / key)
        for old in CACHE.iterdir():  # one cached build is enough
            if old.name != key:
                shutil.rmtree(old, ignore_errors=True)
    log(f"built {key} in {time.monotonic() - t0:.0f} s")
    return out


def install(built: Path) -> None:
    """Put the build at OUTPUT, replacing it in one rename (a running copy keeps its file)."""
    if OUTPUT.is_file() and filecmp.cmp(built, OUTPUT, shallow=False):
        return
    tmp = OUTPUT.with_name(OUTPUT.name + ".tmp")
    shutil.copy2(built, tmp)
    tmp.replace(OUTPUT)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    a = ap.parse_args(argv)
    try:
        importlib.metadata.version("shiv")
    except importlib.metadata.PackageNotFoundError:
        sys.exit(f"[binary] shiv is not installed for {sys.executable}: run scripts/bootstrap")
    pins = runtime_pins()
    key = input_key(pins)
    if a.force:
        shutil.rmtree(CACHE / key, ignore_errors=True)
    install(build(key, pins))
    size = OUTPUT.stat().st_size / 2**20
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    log(f"{OUTPUT.relative_to(REPO)}: {size:.1f} MiB, runs with the python3 on PATH ({python})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
