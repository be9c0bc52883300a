"""Build the fos-host OCI image from Debian packages and this checkout (`make image`).

    .venv/bin/python packaging/container/build.py [--force]

Steps, each printed with its time on stderr:
  1. wheels: fos-host (built from a copy of this checkout) and its dependencies, pinned to the
     versions in .venv, built or fetched with the venv's pip (CPython 3.11, like Debian 12's
     python3: python-prctl compiles here against libcap-dev, so the image needs no compiler);
  2. root tree: `mmdebstrap --variant=essential` of bookworm with python3, python3-venv,
     libseccomp2 and libcap2, then, in its customize hooks, a venv at /opt/fos-host with the
     wheels installed offline (pip and setuptools removed again) and the data files
     (seccomp/, cgroups/) in /usr/share/fos-host; written as a tar;
  3. image: `buildah from scratch`, `buildah add` of that tar, `buildah config` (entrypoint
     fos-host, FOS_HOST_DATA), `buildah commit` to an oci-archive. buildah's storage is a
     temporary vfs directory (no mounts), removed afterwards.

The result is build/image/<key>/fos-host.oci.tar, where the key hashes every input (this
script and packaging/buildkit.py, the project's sources and data files, the pinned dependency
versions); a second run with the same inputs does nothing. Its path is the only thing printed
on stdout. The .debs are kept in build/image/apt-cache/ so that a rebuild downloads only what
changed.
Needs root (mmdebstrap's root mode, buildah) and the Debian packages mmdebstrap and buildah.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# run by path, so packaging/ (buildkit's folder) is not on sys.path by itself
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import buildkit
from buildkit import REPO, BuildError, run

BUILD = REPO / "build" / "image"
SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# python3 is Debian 12's CPython 3.11 (the wheels' ABI); python3-venv makes the venv; the
# sandbox loads libseccomp (pyseccomp, ctypes) and python-prctl links libcap.
DEBIAN_PACKAGES = ("python3", "python3-venv", "libseccomp2", "libcap2")
# Nothing in the image reads documentation, manuals or translations.
DPKG_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)
SOURCES = ("pyproject.toml", "fos_host", "seccomp", "cgroups")
DATA = ("seccomp", "cgroups")
VENV = "/opt/fos-host"
DATA_DIR = "/usr/share/fos-host"
IMAGE_NAME = "localhost/fos-host"
ARCHIVE = "fos-host.oci.tar"
NEEDED_TOOLS = ("mmdebstrap", "buildah")
BUILDAH_LEFTOVERS = (Path("/var/lib/containers"), Path("/var/lib/containers/cache"))


log = buildkit.Log("[image]", sys.stderr, steps=3)


# -- the steps ---------------------------------------------------------------------------


def build_wheels(files: list[Path], pins: list[str], tmp: Path) -> Path:
    """fos-host's wheel and every dependency's, in tmp/wheels."""
    src = tmp / "src"
    for name in SOURCES:
        buildkit.copy_inputs(files, name, src / name)
    # pyproject names README.md as the long description; the image does not need ours (and
    # its edits would otherwise change nothing but the cache key)
    (src / "README.md").write_text("fos-host: the process host of the fOS browser.\n")
    constraints = tmp / "constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    wheels = tmp / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-input",
        "--disable-pip-version-check", "--wheel-dir", wheels,
        "--constraint", constraints, src)  # fmt: skip
    return wheels


def build_rootfs(files: list[Path], wheels: Path, tmp: Path, apt_cache: Path) -> Path:
    """mmdebstrap's root tree with fos-host installed, as a tar."""
    stage = tmp / "stage"  # copied into the tree at /tmp/fos by a hook
    stage.mkdir()
    shutil.copytree(wheels, stage / "wheels")
    for d in DATA:
        buildkit.copy_inputs(files, d, stage / "data" / d)
    apt_cache.mkdir(parents=True, exist_ok=True)
    rootfs = tmp / "rootfs.tar"
    # the chroot gets a clean environment: none of this machine's PIP_* or PYTHON* settings
    chroot = 'chroot "$1" env -i PATH=/usr/bin:/bin'
    pip = f"{chroot} {VENV}/bin/python -m pip --disable-pip-version-check --no-input --quiet"
    hooks = [
        # fos-host into a venv, offline, from the wheels built on the host
        f"copy-in {stage} /tmp",  # special hooks are not shell: no quotes
        f"{chroot} python3 -m venv {VENV}",
        f"{pip} install --no-index --find-links /tmp/stage/wheels fos-host",
        f"{pip} uninstall --yes pip setuptools",
        f'mkdir -p "$1{DATA_DIR}" && cp -r "$1"/tmp/stage/data/. "$1{DATA_DIR}/"',
        'rm -rf "$1"/tmp/stage',
        # smoke test in the tree itself: the entry point starts and finds its data files
        f"{chroot} FOS_HOST_DATA={DATA_DIR} {VENV}/bin/fos-host --help >/dev/null",
        # keep the downloaded .debs for the next build (--skip=essential/unlink keeps them)
        f"sync-out /var/cache/apt/archives {apt_cache}",
    ]
    argv: list[str | Path] = [
        "mmdebstrap", "--mode=root", "--variant=essential", "--format=tar", "--quiet",
        f"--include={','.join(DEBIAN_PACKAGES)}", "--skip=essential/unlink",
        # no /dev in the image: the runtime mounts its own there, and device nodes in a layer
        # make loading the image need mknod, which a devices cgroup may deny even to root
        # (podman load: "ApplyLayer ... operation not permitted")
        "--skip=output/dev",
        # merged /usr by symlinks, as debootstrap makes it, instead of the usrmerge package
        # (which would pull in perl: +60 MB)
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives",
        f"--setup-hook=sync-in {apt_cache} /var/cache/apt/archives/",
        *(f"--dpkgopt={o}" for o in DPKG_EXCLUDES),
        *(f"--customize-hook={h}" for h in hooks),
        SUITE, rootfs, *MIRRORS,
    ]  # fmt: skip
    # its hooks are chatty: their output is shown only when it fails, and only its end
    run(*argv, tail=30)
    return rootfs


@contextlib.contextmanager
def removing_new(paths: tuple[Path, ...]) -> Iterator[None]:
    """Remove afterwards whichever of `paths` did not exist before (buildah's own caches)."""
    new = [p for p in paths if not p.exists()]
    try:
        yield
    finally:
        for p in new:
            shutil.rmtree(p, ignore_errors=True)


def build_image(rootfs: Path, tmp: Path, key: str, archive: Path) -> None:
    """An OCI archive with rootfs as its one layer, entry point fos-host."""
    buildah = ["buildah", "--root", str(tmp / "storage"), "--runroot", str(tmp / "run"),
               "--storage-driver", "vfs"]  # fmt: skip
    ctr = run(*buildah, "from", "--quiet", "--name", f"fos-host-build-{key}", "scratch").strip()
    try:
        run(*buildah, "add", "--quiet", ctr, rootfs, "/")
        run(*buildah, "config",
            "--entrypoint", json.dumps([f"{VENV}/bin/fos-host"]),
            "--cmd", json.dumps(["doctor"]),
            "--env", f"FOS_HOST_DATA={DATA_DIR}",
            "--env", "PYTHONDONTWRITEBYTECODE=1",
            "--workingdir", "/",
            "--label", "org.opencontainers.image.title=fos-host",
            "--label", f"org.opencontainers.image.version={key}",
            "--label", "org.opencontainers.image.licenses=GPL-3.0-or-later",
            ctr)  # fmt: skip
        run(*buildah, "commit", "--quiet", "--rm", "--disable-compression=false", ctr,
            f"oci-archive:{archive}:{IMAGE_NAME}:{key}")  # fmt: skip
    except BuildError:
        subprocess.run([*buildah, "rm", ctr], capture_output=True)
        raise


def build(key: str, files: list[Path], pins: list[str]) -> Path:
    out = BUILD / key
    archive = out / ARCHIVE
    t0 = time.monotonic()
    BUILD.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{key}.", dir=BUILD) as tmp_name:
        tmp = Path(tmp_name)
        with log.step(1, "wheels (fos-host and its pinned dependencies)"):
            wheels = build_wheels(files, pins, tmp)
        with log.step(2, f"root tree (mmdebstrap {SUITE}: {', '.join(DEBIAN_PACKAGES)})"):
            rootfs = build_rootfs(files, wheels, tmp, BUILD / "apt-cache")
        with log.step(3, "OCI image (buildah from scratch, add, config, commit)"):
            staged = tmp / "out"
            staged.mkdir()
            # buildah keeps a blob-info cache in /var/lib/containers whatever --root says
            with removing_new(BUILDAH_LEFTOVERS):
                build_image(rootfs, tmp, key, staged / ARCHIVE)
            seconds = time.monotonic() - t0
            info = {
                "key": key,
                "image": f"{IMAGE_NAME}:{key}",
                "archive_bytes": (staged / ARCHIVE).stat().st_size,
                "rootfs_bytes": rootfs.stat().st_size,
                "build_seconds": round(seconds, 1),
            }
            (staged / "info.json").write_text(json.dumps(info, indent=2) + "\n")
            shutil.rmtree(out, ignore_errors=True)
            staged.rename(out)
    for old in BUILD.iterdir():  # one cached image is enough
        if old.is_dir() and old.name not in (key, "apt-cache"):
            shutil.rmtree(old, ignore_errors=True)
    mib = info["archive_bytes"] / 2**20
    log(f"built {IMAGE_NAME}:{key} in {seconds:.0f} s: {archive.relative_to(REPO)} ({mib:.0f} MiB)")
    return archive


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if the image is cached")
    a = ap.parse_args(argv)
    try:
        if os.geteuid() != 0:
            raise BuildError("run as root (mmdebstrap's root mode and buildah need it)")
        if missing := [t for t in NEEDED_TOOLS if shutil.which(t) is None]:
            raise BuildError(
                f"missing {', '.join(missing)}: apt-get install {' '.join(missing)}"
                " (scripts/bootstrap installs them)"
            )
        pins = buildkit.runtime_pins()
        files, key = buildkit.inputs(Path(__file__), SOURCES, *pins)
        archive = BUILD / key / ARCHIVE
        if archive.exists() and not a.force:
            log(f"{IMAGE_NAME}:{key} is cached: {archive.relative_to(REPO)}")
        else:
            archive = build(key, files, pins)
    except BuildError as e:
        log.error(e)
        return 1
    print(archive)
    return 0


if __name__ == "__main__":
    sys.exit(main())
