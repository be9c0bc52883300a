"""The container image: built from Debian packages (cached under build/image/), then
`fos-host doctor` and `fos-host exec` run inside it with podman.

Two sets of options, both from packaging/README.md:
- `--privileged`: everything works, memory limits included (the container's cgroups are
  writable only in a privileged container: podman mounts cgroup v1 read-only otherwise);
- the least set that sandboxes (`--security-opt unmask=/proc/*`, `seccomp=unconfined`): every
  isolation but limits, and `--memory` is refused in one line naming the read-only cgroups.

Options that this machine adds for any container (see the README): `--runtime runc` (crun 1.8
refuses hybrid cgroups: "cgroups in hybrid mode not supported, drop all controllers from
cgroupv2"), `--ulimit` at this machine's limits (without CAP_SYS_RESOURCE podman's defaults,
nofile 1048576, cannot be set), `--network none`. For hygiene: podman's storage is a vfs
directory in a temporary folder (no mounts) removed at the end, conmon stays in our cgroup
(`--cgroups=no-conmon`) and the container's cgroup goes below our own (`--cgroup-parent`
relative), removed at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import own_cgroup_dirs

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "packaging" / "container" / "build.py"
TOOLS = ("mmdebstrap", "buildah", "podman", "runc")
LEAST = ["--security-opt", "unmask=/proc/*", "--security-opt", "seccomp=unconfined"]
PARENT = f"fos-ctr-{os.getpid()}"  # the containers' cgroup parent, below ours

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="building and running the image needs root"),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in TOOLS),
        reason=f"needs {', '.join(TOOLS)} (scripts/bootstrap installs them)",
    ),
]


@pytest.fixture(scope="module")
def image() -> str:
    """The image's oci-archive, built (or found in the cache) by packaging/container/build.py."""
    cp = subprocess.run(
        [sys.executable, str(BUILD)], stdout=subprocess.PIPE, text=True, timeout=900
    )
    assert cp.returncode == 0, "the image build failed: its output is above"
    return cp.stdout.strip()


# podman's own exit codes (125: podman failed; 126, 127: its runtime could not run the command):
# this machine's podman cannot do it, recorded with podman's words; fos-host's codes are 0-2
PODMAN_REFUSED = (125, 126, 127)


def _podman_refused(what: str, cp: subprocess.CompletedProcess[str]) -> None:
    """Skip, naming what blocks it, when podman itself (not fos-host in the image) failed."""
    if cp.returncode in PODMAN_REFUSED:
        pytest.skip(f"podman could not {what} on this machine (exit {cp.returncode}): "
                    f"{cp.stderr.strip()[-2000:]}")  # fmt: skip


@pytest.fixture(scope="module")
def podman(image: str) -> Iterator[list[str]]:
    """`podman run --rm ...` with this machine's options and a storage of its own."""
    # podman, like buildah, keeps a blob-info cache in /var/lib/containers whatever --root says,
    # and its lock table in /dev/shm
    new = [p for p in (Path("/var/lib/containers"), Path("/var/lib/containers/cache"),
                       Path("/dev/shm/libpod_lock")) if not p.exists()]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fos-podman.", dir=REPO / "build" / "image") as tmp:
        base = ["podman", "--root", f"{tmp}/storage", "--runroot", f"{tmp}/run",
                "--tmpdir", f"{tmp}/tmp", "--storage-driver", "vfs",
                "--cgroup-manager", "cgroupfs", "--events-backend", "file"]  # fmt: skip
        # the archive is unpacked in TMPDIR (/var/tmp by default): ours
        env = {**os.environ, "TMPDIR": f"{tmp}/tmp"}
        Path(f"{tmp}/tmp").mkdir()
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        try:
            loaded = subprocess.run([*base, "load", "--quiet", "--input", image],
                                    capture_output=True, text=True, env=env)  # fmt: skip
            _podman_refused("load the image", loaded)
            assert loaded.returncode == 0, loaded.stderr
            name = loaded.stdout.strip().removeprefix("Loaded image: ")
            yield [
                *base, "run", "--rm", "--network", "none", "--runtime", "runc",
                "--cgroups", "no-conmon", "--cgroup-parent", PARENT,
                "--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=32768:32768",
                name,
            ]  # fmt: skip
        finally:
            subprocess.run([*base, "rm", "--all", "--force"], capture_output=True, env=env)
            for p in new:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


def _run(podman: list[str], opts: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the image; its cgroup parent (below ours, in every hierarchy) is removed after."""
    # the image reference is last in `podman`: options go before it, fos-host's after
    argv = [*podman[:-1], *opts, podman[-1], *args]
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    finally:
        for d in own_cgroup_dirs():
            if (d / PARENT).is_dir():
                (d / PARENT).rmdir()  # podman removed the container's own, below it
    _podman_refused(f"run the image with {' '.join(opts) or 'no options'}", cp)
    return cp


def _verdicts(out: str) -> dict[str, str]:
    return {c["name"]: c["verdict"] for c in json.loads(out)["checks"]}


def test_the_archive_is_a_whole_oci_image(image: str) -> None:
    """Read without podman: every blob matches its digest, and the config runs fos-host."""
    with tarfile.open(image) as tar:

        def blob(descriptor: dict[str, object]) -> bytes:
            algo, digest = str(descriptor["digest"]).split(":")
            f = tar.extractfile(f"blobs/{algo}/{digest}")
            assert f is not None, descriptor
            data = f.read()
            assert (hashlib.sha256(data).hexdigest(), len(data)) == (digest, descriptor["size"])
            return data

        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        (ref,) = index["manifests"]
        manifest = json.loads(blob(ref))
        config = json.loads(blob(manifest["config"]))["config"]
        layers = [blob(layer) for layer in manifest["layers"]]
    assert config["Entrypoint"] == ["/opt/fos-host/bin/fos-host"], config
    assert any(e.startswith("FOS_HOST_DATA=") for e in config["Env"]), config
    assert layers and all(layers)


def test_doctor_privileged(podman: list[str]) -> None:
    cp = _run(podman, ["--privileged"], "doctor", "--json")
    assert cp.returncode == 0, cp.stderr
    verdicts = _verdicts(cp.stdout)
    for name in ("namespace: user", "namespace: pid", "namespace: mount", "namespace: cgroup",
                 "seccomp filter", "memory limits", "library: prctl"):  # fmt: skip
        assert verdicts[name] == "OK", (name, cp.stdout)


def test_exec_privileged_with_a_memory_limit(podman: list[str]) -> None:
    cp = _run(
        podman, ["--privileged"], "exec", "--memory", "64M", "--json", "--", "/bin/echo", "hi"
    )
    assert (cp.returncode, cp.stdout) == (0, "hi\n"), cp.stderr
    outcome = json.loads(cp.stderr.strip().splitlines()[-1])
    assert outcome["memory_limit"] == 64 * 2**20
    assert outcome["reason"] == "exited with status 0"


def test_exec_with_the_least_options(podman: list[str]) -> None:
    cp = _run(podman, LEAST, "exec", "--", "/bin/echo", "hi")
    assert (cp.returncode, cp.stdout) == (0, "hi\n"), cp.stderr
    assert "sandboxes run without a cgroup of their own" in cp.stderr


def test_least_options_refuse_limits_naming_the_read_only_cgroups(podman: list[str]) -> None:
    cp = _run(podman, LEAST, "exec", "--memory", "64M", "--", "/bin/echo", "hi")
    assert cp.returncode == 2, (cp.stdout, cp.stderr)
    assert "/sys/fs/cgroup/memory is not writable" in cp.stderr
    verdicts = _verdicts(_run(podman, LEAST, "doctor", "--json").stdout)
    assert verdicts["memory limits"] == "MISSING"
    assert verdicts["namespace: user"] == "OK"


def test_without_options_the_sandbox_cannot_mount_proc(podman: list[str]) -> None:
    """podman's masked /proc paths make a fresh /proc refused (the kernel's mount_too_revealing)."""
    cp = _run(podman, [], "exec", "--", "/bin/echo", "hi")
    assert cp.returncode == 2
    assert "mount /proc: EPERM" in cp.stderr
