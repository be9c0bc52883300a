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
data files, pyproject.toml, the pinned dependency versions, this script and
packaging/buildkit.py, the interpreter and shiv's version): with nothing changed it only checks
that build/fos-host is that file. Each step prints what it does and how long it took.
"""

from __future__ import annotations

import argparse
import compileall
import filecmp
import importlib.metadata
import py_compile
import shutil
import sys
import time
from pathlib import Path

# run by path, so packaging/ (buildkit's folder) is not on sys.path by itself
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import buildkit
from buildkit import REPO, BuildError, run

CACHE = REPO / "build" / "binary"
OUTPUT = REPO / "build" / "fos-host"
SHEBANG = "/usr/bin/env python3"  # the target's python3 on PATH: 3.11, as the build's (PREAMBLE)
ENTRY = "fos_host.cli:main"
PROJECT = ("fos_host", "pyproject.toml")  # what pip needs to build the wheel (and a README)
DATA = ("seccomp", "cgroups")  # bundled as fos_host/_data/<name> (fos_host/paths.py)
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


log = buildkit.Log("[binary]", sys.stdout, steps=5)


def shiv_version() -> str:
    """shiv's version (the key hashes it); a BuildError when this venv lacks shiv."""
    try:
        return importlib.metadata.version("shiv")
    except importlib.metadata.PackageNotFoundError as e:
        raise BuildError(
            f"shiv is not installed for {sys.executable}: run scripts/bootstrap"
        ) from e


# -- the build ---------------------------------------------------------------------------


def build(key: str, files: list[Path], pins: list[str]) -> Path:
    """The cached binary for `key`, built first if missing; other keys' builds are removed."""
    out = CACHE / key / "fos-host"
    if out.is_file():
        log(f"cached: {out.relative_to(REPO)} (nothing changed)")
        return out
    t0 = time.monotonic()
    tmp = CACHE / f"{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    src, site = tmp / "src", tmp / "site"
    with log.step(1, "staging the sources (pip builds the wheel in a copy, not in the checkout)"):
        src.mkdir(parents=True)
        for name in PROJECT:
            buildkit.copy_inputs(files, name, src / name)
        # pyproject.toml names README.md as the long description, which nothing here reads:
        # a stand-in keeps README edits from changing the key.
        (src / "README.md").write_text("fos-host: the process host of the fOS browser.\n")
        (tmp / "constraints.txt").write_text("\n".join(pins) + "\n")
        (tmp / "preamble.py").write_text(preamble(sys.version_info[:2]))
    with log.step(2, f"pip install fos-host and {len(pins)} dependencies, pinned to this venv's"):
        run(sys.executable, "-m", "pip", "install", "--quiet", "--no-input", "--no-compile",
            "--disable-pip-version-check", "--target", site,
            "--constraint", tmp / "constraints.txt", src)  # fmt: skip
        # Console scripts of the dependencies: their #! names this venv's interpreter.
        shutil.rmtree(site / "bin", ignore_errors=True)
    with log.step(3, "bundling the data files as fos_host/_data/ and compiling bytecode"):
        for name in DATA:
            buildkit.copy_inputs(files, name, site / "fos_host" / "_data" / name)
        # Unchecked-hash pycs stay valid after extraction, which does not keep the sources'
        # mtimes; the extracted tree is not meant to be edited (SHIV_FORCE_EXTRACT=1 resets it).
        unchecked = py_compile.PycInvalidationMode.UNCHECKED_HASH
        if not compileall.compile_dir(site, quiet=2, workers=0, invalidation_mode=unchecked):
            raise BuildError(f"compileall failed in {site}: run it without quiet=2 to see why")
    with log.step(4, "shiv: one zip, site-packages and a bootstrap"):
        run(sys.executable, "-m", "shiv", "--site-packages", site, "--entry-point", ENTRY,
            "--python", SHEBANG, "--preamble", tmp / "preamble.py", "--reproducible",
            "--output-file", tmp / "fos-host")  # fmt: skip
    with log.step(5, "keeping it, removing the staging and older builds"):
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
        pins = buildkit.runtime_pins()
        tools = (sys.version, shiv_version(), SHEBANG)  # the interpreter, shiv and the #! line
        files, key = buildkit.inputs(Path(__file__), (*PROJECT, *DATA), *pins, *tools)
        if a.force:
            shutil.rmtree(CACHE / key, ignore_errors=True)
        install(build(key, files, pins))
    except BuildError as e:
        log.error(e)
        return 1
    size = OUTPUT.stat().st_size / 2**20
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    log(f"{OUTPUT.relative_to(REPO)}: {size:.1f} MiB, runs with the python3 on PATH ({python})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
